"""Metric code checked against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from matcher_core.metrics import (
    IoUAccumulator,
    boundary_iou,
    boundary_region,
    boundary_width,
    iou,
)


def box(shape, y0, y1, x0, x1):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_iou_of_overlapping_boxes():
    a = box((10, 10), 0, 4, 0, 4)  # 16 px
    b = box((10, 10), 2, 6, 2, 6)  # 16 px, overlap 2x2 = 4
    assert iou(a, b) == pytest.approx(4 / 28)
    assert iou(a, a) == 1.0
    assert iou(a, np.zeros_like(a)) == 0.0
    assert iou(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_iou_refuses_masks_of_different_sizes():
    with pytest.raises(ValueError, match="shapes differ"):
        iou(np.zeros((2, 3), bool), np.zeros((3, 2), bool))


def test_boundary_band_of_a_square():
    square = box((20, 20), 5, 15, 5, 15)  # 10x10 = 100 px; its 1-px band is 100 - 8x8 = 36 px
    assert boundary_region(square, 1).sum() == 36
    assert boundary_region(square, 2).sum() == 100 - 36  # 6x6 interior left
    assert boundary_region(square, 0).sum() == 0


def test_the_image_border_is_a_boundary():
    full = np.ones((6, 6), bool)
    assert boundary_region(full, 1).sum() == 36 - 16


def test_boundary_width_is_two_percent_of_the_diagonal():
    assert boundary_width((300, 400)) == 10  # diagonal 500
    assert boundary_width((10, 10)) == 1


def test_boundary_iou_by_hand():
    truth = box((50, 50), 10, 20, 10, 20)  # width = round(0.02 * 70.7) = 1
    shifted = box((50, 50), 10, 20, 11, 21)
    band_truth = boundary_region(truth, 1)
    band_pred = boundary_region(shifted, 1)
    inter = (band_truth & band_pred).sum()
    union = (band_truth | band_pred).sum()
    # Hand count: each ring has 36 px. Shared: the top and bottom rows at x = 11..19 (2 x 9 = 18);
    # the side columns never coincide (truth: x = 10, 19; shifted: x = 11, 20). Union 36 + 36 - 18.
    assert (inter, union) == (18, 54)
    assert boundary_iou(shifted, truth) == pytest.approx(18 / 54)
    assert iou(shifted, truth) == pytest.approx(90 / 110)  # boundary IoU punishes shifts more


def test_category_iou_sums_before_dividing():
    acc = IoUAccumulator()
    acc.add("cat", box((10, 10), 0, 10, 0, 10), box((10, 10), 0, 10, 0, 10))  # 100 / 100
    acc.add("cat", box((10, 10), 0, 1, 0, 1), box((10, 10), 0, 1, 0, 2))  # 1 / 2
    acc.add("dog", np.zeros((4, 4), bool), box((4, 4), 0, 2, 0, 2))  # 0 / 4
    assert acc.category_iou() == {"cat": pytest.approx(101 / 102), "dog": 0.0}
    assert acc.mean_iou() == pytest.approx((101 / 102) / 2)
    assert acc.per_image["cat"] == [1.0, 0.5]
