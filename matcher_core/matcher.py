"""The Matcher pipeline (Matcher, ICLR 2024) for one label on one target image.

1. *matching*: bidirectional Hungarian matching of the reference object's patches to the target's
   (:mod:`matcher_core.matching`), several shots pooled by consensus; matched points that look
   more like the label's negative evidence than like the reference are dropped. A target with too
   few or too poor matches, or one that looks like what annotators deleted, is rejected here, so
   a target without the object returns nothing.
2. *prompts*: k-means over the matched points and part-level, instance-level and global prompt
   sets (:mod:`matcher_core.prompts`).
3. *decoding*: every prompt set through SAM's mask decoder in one batch (chunked when huge).
4. *scoring*: SAM's low-resolution masks are split into connected pieces, pooled to the patch grid
   and scored by EMD, purity and coverage, then merged into separate instances
   (:mod:`matcher_core.scoring`). Only the kept instances are upsampled to the original image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .features import ImageFeatures
from .matching import filter_negative_matches, match_shots
from .prompts import PromptBatch, sample_prompts
from .reference import Instance, LabelReference
from .sam_decoder import DecoderOutput, SamDecoder
from .scoring import (
    first_unique,
    inside_cells,
    score_proposals,
    select_instances,
    split_components,
)

if TYPE_CHECKING:
    from .segmenter import OneShotSegmenter

DECODER_CHUNK = 64
"""Most prompt sets per decoder call: SAM's decoder copies the image embedding once per prompt set
(4 MiB each for the real models), so a chunk bounds that memory."""
SUPPRESSED_LOGIT = -20.0
"""Logit given to the pixels of a SAM mask that belong to another of its connected pieces."""


def blend_logits(logits: torch.Tensor, weights: np.ndarray | torch.Tensor) -> torch.Tensor:
    """PerSAM-F blend: ``(B, 3, h, w)`` multimask logits, ``(3,)`` weights -> ``(B, 1, h, w)``."""
    weights = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device).reshape(
        1, -1, 1, 1
    )
    if weights.shape[1] != logits.shape[1]:
        raise ValueError(f"{weights.shape[1]} weights for {logits.shape[1]} masks")
    return (logits * weights).sum(1, keepdim=True)


def decode_prompts(
    decoder: SamDecoder,
    embedding: torch.Tensor,
    batch: PromptBatch,
    original_size: tuple[int, int],
    chunk_size: int = DECODER_CHUNK,
    multimask: bool = True,
) -> DecoderOutput:
    """All prompt sets of ``batch`` through SAM's decoder, ``chunk_size`` sets per call.

    Args:
        decoder: SAM's prompt encoder + mask decoder.
        embedding: ``(C, He, We)`` SAM image embedding of the target.
        batch: ``B`` prompt sets in original XY pixels (converted here to the SAM input frame).
        original_size: ``(H, W)`` of the target.

    Returns:
        ``(B, M, 4 He, 4 We)`` low-resolution logits (SAM input frame, padded square) and
        ``(B, M)`` IoU predictions, M = 3 with ``multimask`` else 1.
    """
    points = torch.from_numpy(decoder.to_input_coords(batch.points, original_size))
    labels = torch.from_numpy(batch.labels)
    boxes = None
    if batch.boxes is not None:
        corners = decoder.to_input_coords(batch.boxes.reshape(-1, 2, 2), original_size)
        boxes = torch.from_numpy(corners.reshape(-1, 4))
    logits, ious = [], []
    for start in range(0, len(batch), max(1, chunk_size)):
        part = slice(start, start + max(1, chunk_size))
        output = decoder.decode(
            embedding,
            point_coords=points[part],
            point_labels=labels[part],
            boxes=boxes[part] if boxes is not None else None,
            multimask=multimask,
        )
        logits.append(output.low_res_logits)
        ious.append(output.iou_predictions)
    return DecoderOutput(low_res_logits=torch.cat(logits), iou_predictions=torch.cat(ious))


def choose_masks(
    output: DecoderOutput, mask_weights: np.ndarray | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(B, h, w)`` logit map and ``(B,)`` IoU prediction per prompt set.

    With PerSAM-F ``mask_weights`` the three multimask logits (and IoU predictions) are blended.
    Without, the mask SAM predicts best (highest IoU prediction) is taken: SAM's three outputs are
    its guesses at the whole / part / sub-part ambiguity of a prompt, and its own IoU head is the
    ranking it was trained to give.
    """
    logits, iou = output.low_res_logits, output.iou_predictions
    if logits.shape[1] == 1:
        return logits[:, 0], iou[:, 0]
    if mask_weights is not None:
        weights = torch.as_tensor(mask_weights, dtype=iou.dtype, device=iou.device)
        return blend_logits(logits, mask_weights)[:, 0], (iou * weights).sum(1)
    best = iou.argmax(1)
    rows = torch.arange(len(best), device=best.device)
    return logits[rows, best], iou[rows, best]


def low_res_crop(low_res_side: int, input_size: tuple[int, int], img_size: int) -> tuple[int, int]:
    """``(hc, wc)``: the part of SAM's ``low_res_side``-square logits that covers the image (the
    rest is padding of the SAM input frame)."""
    scale = low_res_side / img_size
    return max(1, round(input_size[0] * scale)), max(1, round(input_size[1] * scale))


def _reference_features(label_ref: LabelReference) -> np.ndarray:
    """``(N, D)`` features of the reference object over all shots."""
    return np.concatenate([shot.masked_features() for shot in label_ref.shots])


def segment_label(
    segmenter: OneShotSegmenter, target: ImageFeatures, label_ref: LabelReference
) -> list[Instance]:
    """Instances of ``label_ref``'s object in ``target``, best score first.

    ``segmenter`` provides ``config``, ``decoder`` (:class:`SamDecoder`) and ``timed(stage)``.
    Returns ``[]`` when fewer than ``config.min_matched_points`` patches match bidirectionally or
    the match quality is below ``config.rejection_threshold`` (the object is taken to be absent),
    and when the label has negative evidence and the matched points mostly resemble it
    (:meth:`matcher_core.matching.NegativeCheck.looks_deleted`).
    Otherwise at most ``config.max_instances`` instances, each an ``(H, W)`` bool mask at the
    target's original resolution of at least ``config.min_instance_area`` pixels with a score in
    [0, 1]. The per-label score threshold is applied by the caller. Random choices come from
    ``np.random.default_rng(config.seed)``: the same inputs give the same instances.
    """
    config = segmenter.config
    decoder: SamDecoder = segmenter.decoder
    if not label_ref.shots:
        return []
    rng = np.random.default_rng(config.seed)
    grid_h, grid_w, dims = target.patch_features.shape
    height, width = target.original_size

    with segmenter.timed("matching"):
        match = match_shots(label_ref.shots, target.patch_features, config.shot_pooling)
        reference_features = _reference_features(label_ref)
        # Matched points that resemble what annotators deleted more than the reference are no
        # prompts; when most are such points, the target shows the deleted kind, not the object.
        check = filter_negative_matches(
            match, target.patch_features, reference_features, label_ref.negatives
        )
        match = check.kept
    if check.looks_deleted(config.negative_rejection_fraction, config.negative_rejection_margin):
        return []
    if len(match) < max(1, config.min_matched_points) or match.quality < config.rejection_threshold:
        return []

    with segmenter.timed("prompts"):
        matched_xy = target.patch_centres()[match.target_indices]
        margin = 0.5 * max(width / grid_w, height / grid_h)
        batch = sample_prompts(matched_xy, config, rng, margin, target.original_size)

    with segmenter.timed("decoding"):
        output = decode_prompts(decoder, target.sam_embedding, batch, target.original_size)
        logits, _ = choose_masks(output, label_ref.mask_weights)  # (B, L, L)

    with segmenter.timed("scoring"):
        crop_h, crop_w = low_res_crop(logits.shape[-1], target.input_size, decoder.img_size)
        binary = (logits[:, :crop_h, :crop_w] > decoder.mask_threshold).cpu().numpy()
        pieces, parents = split_components(binary)
        if len(pieces) == 0:
            return []
        distinct = first_unique(pieces)
        pieces, parents = pieces[distinct], parents[distinct]
        coverage = F.adaptive_avg_pool2d(
            torch.from_numpy(pieces).float()[:, None], (grid_h, grid_w)
        )[:, 0].numpy()
        inside = inside_cells(coverage)
        target_flat = target.patch_features.float().cpu().numpy().reshape(-1, dims)
        scores = score_proposals(
            inside,
            target_flat,
            reference_features,
            match.target_indices,
            config,
            label_ref.negatives,
        )
        choices = select_instances(
            scores, inside, pieces.reshape(len(pieces), -1), match.target_indices, config
        )

    instances: list[Instance] = []
    with segmenter.timed("decoding"):  # SAM's post-processing, for the kept instances only
        for choice in choices:
            if len(instances) >= config.max_instances:
                break
            piece = torch.zeros(logits.shape[-2:], dtype=torch.bool, device=logits.device)
            piece[:crop_h, :crop_w] = torch.from_numpy(pieces[choice.proposal]).to(logits.device)
            parent = logits[parents[choice.proposal]]
            # Pixels of the parent mask outside this piece belong to another piece: switch them off.
            outside = ~piece & (parent > decoder.mask_threshold)
            piece_logits = torch.where(outside, torch.full_like(parent, SUPPRESSED_LOGIT), parent)
            full = decoder.upscale(piece_logits[None, None], target.input_size, (height, width))
            mask = (full[0, 0] > decoder.mask_threshold).cpu().numpy()
            if mask.sum() >= config.min_instance_area:
                instances.append(Instance.from_mask(label_ref.label, mask, choice.score))
    return instances
