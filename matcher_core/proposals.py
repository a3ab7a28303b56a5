"""SAM's answers to the Matcher prompt sets, as filtered mask proposals.

Prompt sets go through SAM's decoder in chunks; the configured outputs become proposals
(``mask_output``); SAM's "everything" grid can add more (``dense_grid``); then proposals are
filtered by predicted IoU and stability score and deduplicated by box non-maximum suppression, the
rules of Matcher's ``SamAutomaticMaskGenerator``.

Everything stays on SAM's low-resolution logits (``256 x 256`` for the real models) cropped to the
part that covers the image: stability scores and boxes are computed there rather than on masks
upsampled to the image, so hundreds of proposals cost no full-resolution work (a departure in
arithmetic only; Matcher upsamples every mask first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from segment_anything.utils.amg import (
    batched_mask_to_box,
    build_point_grid,
    calculate_stability_score,
)
from torchvision.ops import batched_nms

from .config import SegmenterConfig
from .prompts import POSITIVE_LABEL, PromptBatch
from .sam_decoder import DecoderOutput

DECODER_CHUNK = 64
"""Most prompt sets per decoder call on a GPU: SAM's decoder copies the image embedding once per
prompt set (4 MiB each for the real models), so a chunk bounds that memory."""
CPU_DECODER_CHUNK = 4
"""Most prompt sets per decoder call on a CPU: each set's image-side tensors (4-8 MiB) then stay
in the CPU caches between the decoder's steps; 33 sets decode 1.45x faster in chunks of 4 than in
one call (MobileSAM, 2 cores; chunks of 1, 2, 8, 16: 1.1-1.3x; BENCHMARKS.md)."""
STABILITY_OFFSET = 1.0
"""SAM's stability score offset (``stability_score_offset``), as in Matcher."""


class PromptableSegmenter(Protocol):
    """What the Matcher pipeline needs of a promptable segmenter: SAM's decoder interface.

    :class:`matcher_core.sam_decoder.SamDecoder` is the production one; ``bench/oracle.py`` plugs
    in a ground-truth oracle through the same interface, to measure every stage below SAM on real
    features without SAM weights. Frames: prompts in the *SAM input* frame (the image resized so
    its long side is ``img_size``), masks as logits over the padded ``L x L`` low-resolution square
    (``L = 4 He``), positive where ``> mask_threshold``.
    """

    img_size: int
    mask_threshold: float

    @property
    def embedding_size(self) -> tuple[int, int]:
        """``(He, We)`` of the image embedding."""
        ...

    def to_input_coords(self, xy: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """``(..., 2)`` XY original pixels to the SAM input frame."""
        ...

    def decode(
        self,
        embedding: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        multimask: bool = True,
    ) -> DecoderOutput:
        """``(B, N, 2)`` points, ``(B, N)`` labels (1, 0, -1 padding), ``(B, 4)`` boxes to
        ``(B, M, L, L)`` logits and ``(B, M)`` predicted IoUs (M = 3 with ``multimask``, else 1)."""
        ...

    def upscale(
        self,
        low_res_logits: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """``(B, M, L, L)`` logits to ``(B, M, H, W)`` at the original resolution."""
        ...


@dataclass
class Proposals:
    """``P`` candidate masks of one target in SAM's low-resolution frame."""

    logits: torch.Tensor
    """``(P, L, L)`` mask logits over SAM's padded square (``L = 256`` for the real models)."""
    iou: torch.Tensor
    """``(P,)`` SAM's predicted IoU of each mask."""
    crop: tuple[int, int]
    """``(hc, wc)``: the top-left part of the square that covers the image (:func:`low_res_crop`)."""

    def __len__(self) -> int:
        return len(self.iou)

    @property
    def cropped(self) -> torch.Tensor:
        """``(P, hc, wc)`` logits of the image part (padding cut off)."""
        return self.logits[:, : self.crop[0], : self.crop[1]]

    def subset(self, keep: torch.Tensor) -> Proposals:
        return Proposals(self.logits[keep], self.iou[keep], self.crop)

    @staticmethod
    def concat(parts: list[Proposals]) -> Proposals:
        return Proposals(
            torch.cat([p.logits for p in parts]),
            torch.cat([p.iou for p in parts]),
            parts[0].crop,
        )


def low_res_crop(low_res_side: int, input_size: tuple[int, int], img_size: int) -> tuple[int, int]:
    """``(hc, wc)``: the part of SAM's ``low_res_side``-square logits that covers the image (the
    rest is padding of the SAM input frame); at least one cell each way."""
    scale = low_res_side / img_size
    return max(1, round(input_size[0] * scale)), max(1, round(input_size[1] * scale))


def _decode(
    decoder: PromptableSegmenter,
    embedding: torch.Tensor,
    points: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor | None,
    multimask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, M, L, L)`` logits and ``(B, M)`` IoU predictions, :data:`DECODER_CHUNK` sets a call
    (:data:`CPU_DECODER_CHUNK` on a CPU)."""
    chunk = CPU_DECODER_CHUNK if embedding.device.type == "cpu" else DECODER_CHUNK
    logits, ious = [], []
    for start in range(0, len(points), chunk):
        part = slice(start, start + chunk)
        output = decoder.decode(
            embedding,
            point_coords=points[part],
            point_labels=labels[part],
            boxes=boxes[part] if boxes is not None else None,
            multimask=multimask,
        )
        logits.append(output.low_res_logits)
        ious.append(output.iou_predictions)
    return torch.cat(logits), torch.cat(ious)


def _best_of_three(logits: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    best = iou.argmax(1)
    rows = torch.arange(len(best), device=best.device)
    return logits[rows, best][:, None], iou[rows, best][:, None]


def decode_prompt_sets(
    decoder: PromptableSegmenter,
    embedding: torch.Tensor,
    batch: PromptBatch,
    original_size: tuple[int, int],
    mask_output: str,
    crop: tuple[int, int],
) -> Proposals:
    """Every prompt set of ``batch`` through SAM's decoder, the outputs ``mask_output`` names.

    Args:
        decoder: SAM's prompt encoder + mask decoder.
        embedding: ``(C, He, We)`` SAM image embedding of the target.
        batch: ``B`` prompt sets, original XY pixels.
        original_size: ``(H, W)`` of the target.
        mask_output: ``single`` (one proposal per set: SAM's single-mask output), ``all`` (three
            per set: its multimask outputs) or ``auto`` (a lone point without a box: the best of
            the three by predicted IoU; any other set: the single-mask output).
        crop: ``(hc, wc)`` of :func:`low_res_crop`.
    """
    if mask_output not in ("single", "all", "auto"):
        raise ValueError(f"unknown mask_output {mask_output!r}; choose single, all or auto")
    points = torch.from_numpy(decoder.to_input_coords(batch.points, original_size))
    labels = torch.from_numpy(batch.labels)
    boxes = None
    if batch.boxes is not None:
        corners = decoder.to_input_coords(batch.boxes.reshape(-1, 2, 2), original_size)
        boxes = torch.from_numpy(corners.reshape(-1, 4))
    if mask_output == "auto":
        lone = (batch.labels == POSITIVE_LABEL).sum(1) == 1
        lone = torch.from_numpy(lone & (batch.boxes is None))
    else:
        lone = torch.full((len(batch),), mask_output == "all")
    parts = []
    for multimask in (True, False):
        rows = torch.nonzero(lone == multimask)[:, 0]
        if len(rows) == 0:
            continue
        logits, iou = _decode(
            decoder,
            embedding,
            points[rows],
            labels[rows],
            boxes[rows] if boxes is not None else None,
            multimask,
        )
        if multimask and mask_output == "auto":
            logits, iou = _best_of_three(logits, iou)
        parts.append(Proposals(logits.flatten(0, 1), iou.flatten(), crop))
    return Proposals.concat(parts)


def dense_proposals(
    decoder: PromptableSegmenter,
    embedding: torch.Tensor,
    original_size: tuple[int, int],
    config: SegmenterConfig,
    crop: tuple[int, int],
) -> Proposals:
    """SAM's "everything" proposals: one positive point at each cell centre of a
    ``dense_grid x dense_grid`` grid over the image, single-mask output, kept when the predicted
    IoU is above ``dense_min_predicted_iou`` and the stability at least ``dense_min_stability``."""
    height, width = original_size
    grid = build_point_grid(config.dense_grid) * np.array([width, height], dtype=np.float64)
    kept = []
    # Filtered chunk by chunk, as SAM's mask generator does: 4096 masks of 256 x 256 would hold
    # 1 GiB at once.
    for start in range(0, len(grid), DECODER_CHUNK):
        points = grid[start : start + DECODER_CHUNK].astype(np.float32)
        batch = PromptBatch(
            points=points[:, None],
            labels=np.full((len(points), 1), POSITIVE_LABEL, dtype=np.int64),
            boxes=None,
            kinds=["dense"] * len(points),
            centres=points,
        )
        proposals = decode_prompt_sets(decoder, embedding, batch, original_size, "single", crop)
        kept.append(
            filter_proposals(
                proposals,
                decoder.mask_threshold,
                config.dense_min_predicted_iou,
                config.dense_min_stability,
            )
        )
    return Proposals.concat(kept)


def filter_proposals(
    proposals: Proposals, mask_threshold: float, min_iou: float, min_stability: float
) -> Proposals:
    """Proposals whose predicted IoU is above ``min_iou`` (when positive) and whose stability
    score is at least ``min_stability`` (when positive), as SAM's mask generator filters."""
    keep = torch.ones(len(proposals), dtype=torch.bool, device=proposals.iou.device)
    if min_iou > 0:
        keep &= proposals.iou > min_iou
    if min_stability > 0:
        stability = calculate_stability_score(proposals.cropped, mask_threshold, STABILITY_OFFSET)
        keep &= stability >= min_stability
    return proposals.subset(keep)


def suppress_duplicates(proposals: Proposals, mask_threshold: float, iou: float) -> Proposals:
    """Box non-maximum suppression by predicted IoU (``iou >= 1`` keeps all, as published)."""
    if iou >= 1.0 or len(proposals) == 0:
        return proposals
    boxes = batched_mask_to_box(proposals.cropped > mask_threshold).float()
    keep = batched_nms(boxes, proposals.iou, torch.zeros_like(proposals.iou), iou)
    return proposals.subset(torch.sort(keep).values)


def propose(
    decoder: PromptableSegmenter,
    embedding: torch.Tensor,
    batch: PromptBatch,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    config: SegmenterConfig,
) -> Proposals:
    """The filtered proposals of one target: the prompt sets' masks (and the dense grid's),
    filtered by ``min_predicted_iou`` / ``min_stability``, deduplicated by ``box_nms_iou``; empty
    masks dropped."""
    crop = low_res_crop(decoder.embedding_size[0] * 4, input_size, decoder.img_size)
    proposals = decode_prompt_sets(
        decoder, embedding, batch, original_size, config.mask_output, crop
    )
    threshold = decoder.mask_threshold
    proposals = filter_proposals(
        proposals, threshold, config.min_predicted_iou, config.min_stability
    )
    if config.dense_grid > 0:
        dense = dense_proposals(decoder, embedding, original_size, config, crop)
        proposals = Proposals.concat([dense, proposals])
    proposals = suppress_duplicates(proposals, threshold, config.box_nms_iou)
    return proposals.subset((proposals.cropped > threshold).flatten(1).any(1))
