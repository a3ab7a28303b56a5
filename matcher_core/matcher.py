"""The Matcher pipeline (Matcher, ICLR 2024) for one label on one target image.

1. *matching*: bidirectional Hungarian matching of the reference object's patches to the target's
   (:mod:`matcher_core.matching`), several shots pooled by consensus; matched points that look
   more like the label's negative evidence than like the reference are dropped; above 40 matches
   the better half is kept. With ``absence_test`` a target whose matches are no better than the
   reference's own background, or that looks like what annotators deleted, returns nothing.
2. *prompts*: the product's part/instance/global sets or Matcher's subsets
   (:mod:`matcher_core.prompts`).
3. *proposals*: every prompt set through SAM's decoder, filtered (:mod:`matcher_core.proposals`).
4. *output*: ``union``, Matcher's one mask per label (:func:`matcher_core.scoring.union_members`);
   or ``instances``, SAM's masks split into connected pieces, scored by EMD, purity and coverage
   on the patch grid and merged into separate instances (:func:`matcher_core.scoring.select_instances`).
   Only the kept masks are upsampled to the original image.

PerSAM-F mask weights are not used here: they are learned on PerSAM's first pass (one positive and
one negative point, decoder hooks) and mean nothing for Matcher's prompt sets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .features import ImageFeatures
from .matching import (
    MatchResult,
    absence_baseline,
    filter_negative_matches,
    match_shots,
    prune_matches,
)
from .prompts import PromptBatch, kmeans_centroids, points_box, sample_prompts, sample_subsets
from .proposals import Proposals, propose
from .reference import Instance, LabelReference
from .scoring import (
    first_unique,
    inside_cells,
    matcher_metrics,
    score_proposals,
    select_instances,
    split_components,
    union_members,
)

if TYPE_CHECKING:
    from .config import SegmenterConfig
    from .pipelines import PipelineContext
    from .proposals import PromptableSegmenter

SUPPRESSED_LOGIT = -20.0
"""Logit given to the pixels of a SAM mask that belong to another of its connected pieces."""


def _reference_features(label_ref: LabelReference, object_coverage: float) -> np.ndarray:
    """``(N, D)`` features of the reference object over all shots."""
    return np.concatenate([shot.masked_features(object_coverage) for shot in label_ref.shots])


def _looks_present(match: MatchResult, baseline: float, margin: float) -> bool:
    """The absence test's rule: forward matches closer than the background baseline, less
    ``margin`` of the distance from the baseline to a perfect match."""
    return match.forward_similarity > baseline - margin * (1.0 - baseline)


def find_matches(
    config: SegmenterConfig,
    target: ImageFeatures,
    label_ref: LabelReference,
    reference_features: np.ndarray,
) -> MatchResult | None:
    """The matched target cells that prompts are drawn from, or ``None`` when the object is taken
    to be absent (``absence_test``: too few matches, forward matches no better than
    :func:`matcher_core.matching.absence_baseline`, or mostly like the label's negatives).
    ``reference_features`` are the label's object features (:func:`_reference_features`)."""
    match = match_shots(
        label_ref.shots,
        target.patch_features,
        config.shot_pooling,
        config.keep_forward_if_none_survive,
        config.object_cell_coverage,
    )
    # Matched points that resemble what annotators deleted more than the reference are no
    # prompts; when most are such points, the target shows the deleted kind, not the object.
    check = filter_negative_matches(
        match,
        target.patch_features,
        reference_features,
        label_ref.negatives,
    )
    match = check.kept
    if len(match) == 0:
        return None
    if config.absence_test and (
        len(match) < max(1, config.min_matched_points)
        or not _looks_present(
            match,
            absence_baseline(label_ref.shots, config.object_cell_coverage),
            config.absence_margin,
        )
        or check.looks_deleted(config.negative_rejection_fraction, config.negative_rejection_margin)
    ):
        return None
    return prune_matches(match, config.prune_matches_above)


def prompt_sets(
    config: SegmenterConfig, target: ImageFeatures, matched_xy: np.ndarray, rng: np.random.Generator
) -> PromptBatch:
    """The prompt sets of ``config.prompt_sampler`` from ``(M, 2)`` matched XY points."""
    height, width = target.original_size
    if config.prompt_sampler == "parts":
        grid_h, grid_w = target.patch_features.shape[:2]
        margin = 0.5 * max(width / grid_w, height / grid_h)
        return sample_prompts(matched_xy, config, rng, margin, target.original_size)
    if config.prompt_sampler != "subsets":
        raise ValueError(f"unknown prompt_sampler {config.prompt_sampler!r}")
    points = matched_xy
    if config.subset_points == "centres":
        points = kmeans_centroids(matched_xy, config.num_clusters, rng)
    box = points_box(matched_xy, target.original_size) if config.use_box else None
    return sample_subsets(points, config.subset_sizes, config.subsets_per_size, rng, box)


def segment_label(
    segmenter: PipelineContext, target: ImageFeatures, label_ref: LabelReference
) -> list[Instance]:
    """Instances of ``label_ref``'s object in ``target``, best score first.

    ``segmenter`` provides ``config``, ``decoder`` (a
    :class:`matcher_core.proposals.PromptableSegmenter`, SAM's in production) and ``timed(stage)``.
    Returns ``[]`` when :func:`find_matches` takes the object to be absent. Otherwise, with
    ``output="union"``, one instance (Matcher's union mask); with ``instances``, at most
    ``config.max_instances``, each scoring at least ``instance_score_ratio`` of the best. Masks are
    ``(H, W)`` bool at the target's original resolution, at least ``config.min_instance_area``
    pixels; scores in [0, 1]. The per-label score threshold is applied by the caller. Random
    choices come from ``np.random.default_rng(config.seed)``: the same inputs give the same
    instances.
    """
    config = segmenter.config
    if not label_ref.shots:
        return []
    rng = np.random.default_rng(config.seed)
    reference_features = _reference_features(label_ref, config.object_cell_coverage)
    with segmenter.timed("matching"):
        match = find_matches(config, target, label_ref, reference_features)
    if match is None:
        return []
    with segmenter.timed("prompts"):
        matched_xy = target.patch_centres()[match.target_indices]
        batch = prompt_sets(config, target, matched_xy, rng)
    with segmenter.timed("decoding"):
        proposals = propose(
            segmenter.decoder,
            target.sam_embedding,
            batch,
            target.original_size,
            target.input_size,
            config,
        )
    if len(proposals) == 0:
        return []
    if config.output == "union":
        return union_output(
            segmenter, target, label_ref.label, proposals, match, reference_features
        )
    return separate_instances(segmenter, target, label_ref, proposals, match, reference_features)


def _target_flat(target: ImageFeatures) -> np.ndarray:
    dims = target.patch_features.shape[-1]
    return target.patch_features.float().cpu().numpy().reshape(-1, dims)


def _grid_coverage(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(P, gh * gw)`` fraction of each patch cell covered by each ``(P, h, w)`` bool mask."""
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(masks).float()[:, None], grid)
    return pooled[:, 0].numpy().reshape(len(masks), -1)


def union_output(
    segmenter: PipelineContext,
    target: ImageFeatures,
    label: str,
    proposals: Proposals,
    match: MatchResult,
    reference_features: np.ndarray,
) -> list[Instance]:
    """Matcher's output: one instance, the union of the proposals :func:`union_members` picks,
    scored by the best one's score (clipped to [0, 1])."""
    config, decoder = segmenter.config, segmenter.decoder
    height, width = target.original_size
    with segmenter.timed("scoring"):
        binary = (proposals.cropped > decoder.mask_threshold).cpu().numpy()
        crop_h, crop_w = binary.shape[1:]
        grid = tuple(target.patch_features.shape[:2])
        cells = _grid_coverage(binary, grid) > 0
        xy = target.patch_centres()[match.target_indices]
        cols = np.clip((xy[:, 0] * crop_w / width).astype(np.int64), 0, crop_w - 1)
        rows = np.clip((xy[:, 1] * crop_h / height).astype(np.int64), 0, crop_h - 1)
        metrics = matcher_metrics(
            cells,
            binary[:, rows, cols],
            _target_flat(target),
            reference_features,
            config.emd_max_points,
        )
        chosen, best = union_members(metrics, config)
    if len(chosen) == 0:
        return []
    with segmenter.timed("decoding"):
        full = decoder.upscale(
            proposals.logits[chosen][:, None], target.input_size, (height, width)
        )
        mask = (full[:, 0] > decoder.mask_threshold).any(0).cpu().numpy()
    if mask.sum() < config.min_instance_area:
        return []
    return [Instance.from_mask(label, mask, best)]


def separate_instances(
    segmenter: PipelineContext,
    target: ImageFeatures,
    label_ref: LabelReference,
    proposals: Proposals,
    match: MatchResult,
    reference_features: np.ndarray,
) -> list[Instance]:
    """The product's output: SAM's masks split into connected pieces, scored and merged into
    separate instances; those scoring at least ``instance_score_ratio`` of the best are kept."""
    config = segmenter.config
    decoder: PromptableSegmenter = segmenter.decoder
    height, width = target.original_size
    logits = proposals.logits
    crop_h, crop_w = proposals.crop
    with segmenter.timed("scoring"):
        binary = (proposals.cropped > decoder.mask_threshold).cpu().numpy()
        pieces, parents = split_components(binary)
        if len(pieces) == 0:
            return []
        distinct = first_unique(pieces)
        pieces, parents = pieces[distinct], parents[distinct]
        grid = tuple(target.patch_features.shape[:2])
        inside = inside_cells(_grid_coverage(pieces, grid))
        scores = score_proposals(
            inside,
            _target_flat(target),
            reference_features,
            match.target_indices,
            config,
            label_ref.negatives,
        )
        choices = select_instances(
            scores, inside, pieces.reshape(len(pieces), -1), match.target_indices, config
        )
    if not choices:
        return []
    floor = config.instance_score_ratio * choices[0].score
    instances: list[Instance] = []
    with segmenter.timed("decoding"):  # SAM's post-processing, for the kept instances only
        for choice in choices:
            if len(instances) >= config.max_instances or choice.score < floor:
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
