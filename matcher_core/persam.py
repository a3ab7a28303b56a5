"""PerSAM (Zhang et al., ICLR 2024): training-free one-shot segmentation with SAM features only.

For one label and one target image:

1. **Location prior**: cosine similarity between the label's *target embedding* (mean SAM feature
   under the reference mask) and every cell of the target's SAM embedding, ``(He, We)``.
2. **Prompts**: a positive point at the prior's maximum, a negative point at its minimum (cell
   centres, SAM input frame).
3. **Target-guided attention** (the sigmoid of the standardised prior biases the token-to-image
   attention of SAM's decoder) and **target-semantic prompting** (the target embedding is added
   to the decoder tokens), both in the first decoding pass only.
4. **Cascaded post-refinement**: pass 2 feeds pass 1's logits back as a mask prompt (multimask,
   best predicted IoU kept); pass 3 adds the box of the pass-2 mask to the mask prompt.

With PerSAM-F weights on the label (:mod:`matcher_core.persam_f`), pass 1 is multimask and its 3
logits are blended with the learned weights.

Multi-instance (beyond the paper, which returns one mask): after an instance is found, its
region, dilated by ``persam_suppress_dilation`` cells, is removed from the prior and the search
repeats on the same embedding (no re-encoding) while the prior's peak, mapped to [0, 1], stays at
least ``persam_prior_threshold`` (the first instance too: an absent object returns nothing).
Since the target-guided attention favours every look-alike region at once, SAM may answer a
prompt on one instance with a mask over several; when more than one instance is allowed, an
instance is the connected part of SAM's mask that holds its positive point (an object split in
two by an occluder can then come back as two instances: the price of separating neighbours).
A mask mostly inside an earlier instance (or containing one) is a duplicate and is dropped.

Instance score: ``sqrt(iou * peak)``, the geometric mean of SAM's predicted IoU of the final mask
(clipped to [0, 1]: is this a clean object mask?) and the prior peak mapped to [0, 1] (does the
prompted place look like the reference?). Both must be high for a confident instance; a perfect
mask on an unlike object, or a like place with a torn mask, scores low.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .features import ImageFeatures
from .prior import location_prior
from .reference import Instance, LabelReference
from .sam_decoder import SamDecoder, blend

if TYPE_CHECKING:  # pragma: no cover
    from .segmenter import OneShotSegmenter

#: Most decoding rounds per label and target, as a multiple of ``max_instances`` (rounds that find
#: a duplicate or an empty mask still suppress a region, so the loop always ends; this bounds it).
MAX_ROUNDS_PER_INSTANCE = 2
#: A new mask sharing at least this fraction of the smaller mask's area with a found instance is
#: the same object found again (SAM prompted on a part returns the whole), not a new instance.
DUPLICATE_OVERLAP = 0.5


@dataclass
class FirstPassPrompt:
    """PerSAM's prompts for one decoding round (first pass), all in the SAM input frame."""

    point_coords: torch.Tensor
    """``(1, 2, 2)`` XY: the positive point (prior maximum), then the negative (prior minimum)."""
    point_labels: torch.Tensor
    """``(1, 2)``: ``[[1, 0]]``."""
    attn_sim: torch.Tensor
    """``(He, We)`` target-guided attention prior (0 on padding cells)."""
    peak: float
    """The prior's maximum mapped from cosine [-1, 1] to [0, 1]."""
    peak_cell: tuple[int, int]
    """``(row, col)`` of the positive point on the embedding grid."""


def valid_cells(decoder: SamDecoder, input_size: tuple[int, int]) -> torch.Tensor:
    """``(He, We)`` bool: embedding cells whose centre lies on the image, not on SAM's padding."""
    he, we = decoder.embedding_size
    cell_h, cell_w = decoder.img_size / he, decoder.img_size / we
    rows = (torch.arange(he) + 0.5) * cell_h < input_size[0]
    cols = (torch.arange(we) + 0.5) * cell_w < input_size[1]
    rows[0] = cols[0] = True  # an image thinner than half a cell still lies on the first ones
    return rows[:, None] & cols[None, :]


def cell_centre(decoder: SamDecoder, cell: tuple[int, int]) -> tuple[float, float]:
    """XY centre (SAM input frame) of embedding cell ``(row, col)``."""
    he, we = decoder.embedding_size
    return (cell[1] + 0.5) * decoder.img_size / we, (cell[0] + 0.5) * decoder.img_size / he


def attention_prior(prior: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """PerSAM's target-guided attention bias: ``sigmoid((prior - mean) / std)`` over the image's
    cells, ``(He, We)``; padding cells get 0, the weakest bias, so they draw no extra attention."""
    values = prior[valid]
    std = values.std() if values.numel() > 1 else values.new_tensor(0.0)
    standardised = (prior - values.mean()) / std.clamp_min(1e-6)
    return torch.where(valid, torch.sigmoid(standardised), torch.zeros_like(prior))


def first_pass_prompt(
    decoder: SamDecoder,
    prior: torch.Tensor,
    valid: torch.Tensor,
    available: torch.Tensor | None = None,
) -> FirstPassPrompt:
    """Prompts from a location prior.

    Args:
        decoder: gives the embedding grid and the SAM input frame.
        prior: ``(He, We)`` cosine similarity to the target embedding.
        valid: ``(He, We)`` bool, cells on the image (:func:`valid_cells`).
        available: ``(He, We)`` bool, cells not yet taken by a found instance (default: all
            valid cells). Taken cells can hold neither the positive point nor attention weight.
    """
    available = valid if available is None else available & valid
    if not available.any():
        raise ValueError("no available cell in the prior")
    floor = prior[valid].min()
    current = torch.where(available, prior, floor)  # taken cells look like the least alike
    positive = divmod(int(torch.where(available, prior, -torch.inf).argmax()), prior.shape[1])
    negative = divmod(int(torch.where(valid, prior, torch.inf).argmin()), prior.shape[1])
    coords = torch.tensor([[cell_centre(decoder, positive), cell_centre(decoder, negative)]])
    return FirstPassPrompt(
        point_coords=coords.float(),
        point_labels=torch.tensor([[1, 0]]),
        attn_sim=attention_prior(current, valid),
        peak=float((prior[positive] + 1) / 2),
        peak_cell=positive,
    )


def sam_location_prior(features: ImageFeatures, target_embedding: np.ndarray) -> torch.Tensor:
    """``(He, We)`` cosine similarity of the target embedding to each SAM embedding cell."""
    embedding = features.sam_embedding.float().cpu()
    return location_prior(torch.as_tensor(target_embedding), embedding.permute(1, 2, 0))


def _mask_box(mask: torch.Tensor) -> torch.Tensor | None:
    """``(1, 4)`` XYXY box (pixel indices) around a ``(h, w)`` bool mask, ``None`` if empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()[None]


def cascade(
    segmenter: OneShotSegmenter,
    features: ImageFeatures,
    prompt: FirstPassPrompt,
    target_embedding: np.ndarray,
    mask_weights: np.ndarray | None = None,
) -> tuple[torch.Tensor, float]:
    """PerSAM's three decoding passes for one prompt.

    Returns:
        ``(1, 1, 4 He, 4 We)`` final low-res logits and SAM's predicted IoU of that mask.
    """
    decoder = segmenter.decoder
    embedding = features.sam_embedding
    points = dict(point_coords=prompt.point_coords, point_labels=prompt.point_labels)
    with segmenter.timed("decoding"):
        hooks = dict(attn_sim=prompt.attn_sim, target_embedding=target_embedding)
        if mask_weights is not None:
            first = decoder.decode(embedding, **points, multimask=True, **hooks)
            logits = blend(first.low_res_logits, mask_weights)
        else:
            first = decoder.decode(embedding, **points, multimask=False, **hooks)
            logits = first.low_res_logits

        second = decoder.decode(embedding, **points, mask_input=logits, multimask=True)
        best = int(second.iou_predictions[0].argmax())
        logits = second.low_res_logits[:, best : best + 1]
        iou = float(second.iou_predictions[0, best])
        in_input = decoder.upscale_to_input(logits, features.input_size)[0, 0]
        box = _mask_box(in_input > decoder.mask_threshold)
        if box is None:  # nothing to box: pass 2's (empty) mask is the answer
            return logits, iou

        third = decoder.decode(embedding, **points, boxes=box, mask_input=logits, multimask=True)
        best = int(third.iou_predictions[0].argmax())
        return third.low_res_logits[:, best : best + 1], float(third.iou_predictions[0, best])


def _taken_cells(
    decoder: SamDecoder,
    mask: np.ndarray,
    input_size: tuple[int, int],
    peak_cell: tuple[int, int],
    dilation: int,
) -> torch.Tensor:
    """``(He, We)`` bool: embedding cells at least half covered by an instance's mask (``(H, W)``
    bool, original resolution), plus the cell that prompted it, dilated by ``dilation`` cells."""
    he, we = decoder.embedding_size
    h, w = input_size
    resized = F.interpolate(
        torch.from_numpy(mask).float()[None, None], (h, w), mode="bilinear", align_corners=False
    )
    padded = torch.zeros(1, 1, decoder.img_size, decoder.img_size)
    padded[..., :h, :w] = resized
    taken = F.adaptive_avg_pool2d(padded, (he, we))[0, 0] >= 0.5
    taken[peak_cell] = True
    if dilation > 0:
        size = 2 * dilation + 1
        grown = F.max_pool2d(taken.float()[None, None], size, stride=1, padding=dilation)
        taken = grown[0, 0] > 0
    return taken


def _component_at(mask: np.ndarray, xy: tuple[float, float]) -> np.ndarray:
    """The 8-connected part of ``mask`` ((H, W) bool) that contains the pixel at ``xy``, or is
    nearest to it when the point fell outside the mask."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count <= 1:
        return mask
    height, width = mask.shape
    col = min(max(int(xy[0]), 0), width - 1)
    row = min(max(int(xy[1]), 0), height - 1)
    chosen = labels[row, col]
    if chosen == 0:
        rows, cols = np.nonzero(labels)
        nearest = np.argmin((rows - row) ** 2 + (cols - col) ** 2)
        chosen = labels[rows[nearest], cols[nearest]]
    return labels == chosen


def _input_to_original(xy: list[float], features: ImageFeatures) -> tuple[float, float]:
    """An XY point from the SAM input frame to original pixels."""
    (height, width), (h, w) = features.original_size, features.input_size
    return xy[0] * width / w, xy[1] * height / h


def _is_duplicate(mask: np.ndarray, found: list[Instance]) -> bool:
    area = int(mask.sum())
    for instance in found:
        shared = int(np.logical_and(mask, instance.mask).sum())
        if shared >= DUPLICATE_OVERLAP * min(area, int(instance.mask.sum())):
            return True
    return False


@torch.inference_mode()
def segment_label(
    segmenter: OneShotSegmenter, target: ImageFeatures, label_ref: LabelReference
) -> list[Instance]:
    """Instances of one label in a target image, PerSAM style (see the module docstring).

    Args:
        segmenter: gives ``config`` (thresholds, limits), ``decoder`` and ``timed``.
        target: the target's cached features (only ``sam_embedding`` and the sizes are used).
        label_ref: the label's shots (their mean SAM target embedding) and optional PerSAM-F
            ``mask_weights``.

    Returns:
        Up to ``config.max_instances`` instances, best first found, masks ``(H, W)`` bool at the
        target's original resolution, scores in [0, 1] (not yet thresholded).
    """
    config = segmenter.config
    decoder = segmenter.decoder
    target_embedding = label_ref.sam_target_embedding()
    prior = sam_location_prior(target, target_embedding)
    valid = valid_cells(decoder, target.input_size)
    available = valid.clone()
    found: list[Instance] = []

    for _ in range(MAX_ROUNDS_PER_INSTANCE * config.max_instances):
        if len(found) >= config.max_instances or not available.any():
            break
        prompt = first_pass_prompt(decoder, prior, valid, available)
        if prompt.peak < config.persam_prior_threshold:
            break
        logits, iou = cascade(segmenter, target, prompt, target_embedding, label_ref.mask_weights)
        upscaled = decoder.upscale(logits, target.input_size, target.original_size)
        mask = (upscaled[0, 0] > decoder.mask_threshold).cpu().numpy()
        if config.max_instances > 1 and mask.any():
            # The target-guided attention favours every look-alike region at once, so SAM may
            # return several instances as one mask; keep the part this round was prompted on.
            xy = _input_to_original(prompt.point_coords[0, 0].tolist(), target)
            mask = _component_at(mask, xy)
        available &= ~_taken_cells(
            decoder, mask, target.input_size, prompt.peak_cell, config.persam_suppress_dilation
        )
        if mask.sum() < max(config.min_instance_area, 1) or _is_duplicate(mask, found):
            continue
        score = float(np.sqrt(np.clip(iou, 0.0, 1.0) * prompt.peak))
        found.append(Instance.from_mask(label_ref.label, mask, score))
    return found
