"""Proposal filtering as in Matcher's SamAutomaticMaskGenerator, on hand-made logits."""

from __future__ import annotations

import pytest
import torch
from segment_anything.utils.amg import calculate_stability_score

from matcher_core.proposals import Proposals, filter_proposals, suppress_duplicates


def square(size: int, y0: int, y1: int, x0: int, x1: int, inside: float = 8.0) -> torch.Tensor:
    logits = torch.full((size, size), -8.0)
    logits[y0:y1, x0:x1] = inside
    return logits


def test_predicted_iou_must_be_above_and_stability_at_least_the_threshold():
    sharp = square(16, 2, 8, 2, 8)
    soft = square(16, 2, 8, 2, 8, inside=0.5)  # flips between thresholds -1 and +1: unstable
    proposals = Proposals(
        torch.stack([sharp, sharp, soft]), torch.tensor([0.9, 0.85, 0.95]), (16, 16)
    )
    kept = filter_proposals(proposals, 0.0, min_iou=0.85, min_stability=0.9)
    assert kept.iou.tolist() == pytest.approx(
        [0.9]
    )  # 0.85 is not above 0.85; the soft mask is unstable
    assert calculate_stability_score(soft[None], 0.0, 1.0).item() < 0.9
    assert len(filter_proposals(proposals, 0.0, 0.0, 0.0)) == 3


def test_box_nms_keeps_the_higher_predicted_iou_of_two_overlapping_masks():
    first = square(32, 2, 12, 2, 12)
    shifted = square(32, 3, 13, 2, 12)  # box IoU 9/11, above 0.65
    apart = square(32, 20, 30, 20, 30)
    proposals = Proposals(
        torch.stack([first, shifted, apart]), torch.tensor([0.8, 0.9, 0.7]), (32, 32)
    )
    kept = suppress_duplicates(proposals, 0.0, 0.65)
    assert kept.iou.tolist() == pytest.approx([0.9, 0.7])
    assert len(suppress_duplicates(proposals, 0.0, 1.0)) == 3  # 1.0: no suppression (FSS)
