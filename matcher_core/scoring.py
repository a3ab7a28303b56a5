"""Instance-level matching: scoring SAM's proposals against the reference, then keeping instances.

Everything here works on the target's *patch grid* (``(gh, gw)`` cells, flat row-major indices):
a proposal is described by the fraction of each cell its mask covers, which is cheap to get from
SAM's low-resolution masks, so dozens of proposals are scored without upsampling any of them.

Three metrics per proposal (Matcher, ICLR 2024):

* **EMD**: earth mover's distance between the reference object's features and the proposal's
  features, uniform weights, ground cost ``(1 - cos) / 2`` in [0, 1] (``ot.emd2``);
* **purity**: how much of the proposal is made of matched points;
* **coverage**: how many of the matched points the proposal contains.

Two outputs. ``union`` (Matcher's): :func:`matcher_metrics` and :func:`union_members` reproduce
its score, filters and merging, and the label's mask is the union of the chosen proposals.
``instances`` (the product's): proposals are merged into **separate instances** (overlapping
proposals are one instance, disjoint ones are several), each with its own score in [0, 1]
(:func:`score_proposals`, :func:`select_instances`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ot
from scipy import ndimage

from .config import SegmenterConfig
from .matching import l2_normalise

INSIDE_FRACTION = 0.5
"""A patch cell belongs to a proposal when the proposal's mask covers at least this fraction of
it (the same rule as for the reference mask)."""
CONTAINMENT = 0.8
"""Two proposals are also one instance when this fraction of the smaller lies inside the larger
(an object and one of its parts have a low IoU but are still one instance)."""
NEGATIVE_TEMPERATURE = 0.05
"""Softness of the negative-evidence factor (in units of cosine)."""
MIN_COMPONENT_FRACTION = 0.05
"""Connected pieces of a SAM mask smaller than this fraction of the mask are speckles, dropped."""


def inside_cells(coverage: np.ndarray) -> np.ndarray:
    """``(P, Nc)`` bool cells of each proposal from its ``(P, gh, gw)`` or ``(P, Nc)`` per-cell
    coverage fractions.

    A cell is inside when covered at least :data:`INSIDE_FRACTION`; a proposal smaller than that
    everywhere gets its most covered cell(s), and an empty proposal (coverage 0 everywhere) none.
    """
    coverage = np.asarray(coverage, dtype=np.float32)
    coverage = coverage.reshape(len(coverage), -1)
    inside = coverage >= INSIDE_FRACTION
    peak = coverage.max(1, keepdims=True)
    small = ~inside.any(1, keepdims=True) & (peak > 0)
    return inside | (small & (coverage >= peak))


def reduce_points(features: np.ndarray, max_points: int) -> np.ndarray:
    """At most ``max_points`` rows of ``(N, D)`` features, evenly strided.

    Why a stride and not k-means: the rows come from a row-major patch grid, so evenly spaced rows
    are spread evenly over the region and form an unbiased sample of its feature distribution,
    which keeps the uniform weights of the EMD exact. It is deterministic and free, whereas k-means
    in the encoder's 384-1024 dimensions, once per proposal, would cost more than the EMD itself
    and would need cluster-mass weights to stay faithful.
    """
    if max_points <= 0 or len(features) <= max_points:
        return features
    rows = np.linspace(0, len(features) - 1, max_points).round().astype(np.int64)
    return features[rows]


def emd_distance(first: np.ndarray, second: np.ndarray, max_points: int = 0) -> float:
    """EMD between two feature sets, uniform weights, cost ``(1 - cos) / 2``; in [0, 1].

    Args:
        first: ``(N1, D)`` features (any scale; normalised here).
        second: ``(N2, D)`` features.
        max_points: each set is first reduced to this many rows (:func:`reduce_points`); 0 = all.

    ``1 - 2 * emd`` is the transport-plan-weighted mean cosine between the two sets.
    """
    if len(first) == 0 or len(second) == 0:
        return 1.0
    a = l2_normalise(reduce_points(np.asarray(first), max_points)).astype(np.float64)
    b = l2_normalise(reduce_points(np.asarray(second), max_points)).astype(np.float64)
    cost = np.clip((1.0 - a @ b.T) / 2.0, 0.0, 1.0)
    weights_a = np.full(len(a), 1.0 / len(a))
    weights_b = np.full(len(b), 1.0 / len(b))
    return float(np.clip(ot.emd2(weights_a, weights_b, cost), 0.0, 1.0))


def purity_coverage(inside: np.ndarray, matched_cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Purity and coverage of each proposal.

    With ``A`` = the proposal's cells (:func:`inside_cells`; its area in patch cells) and ``T`` =
    the matched target cells (distinct cells):

    * ``purity = |A & T| / |A|``: the fraction of the proposal's cells that are matched points;
    * ``coverage = |A & T| / |T|``: the fraction of matched points inside the proposal.

    Both are 0 for an empty proposal or when nothing was matched.

    Args:
        inside: ``(P, Nc)`` bool proposal cells.
        matched_cells: ``(M,)`` flat indices of matched target cells.

    Returns:
        ``(P,)`` purity and ``(P,)`` coverage, float64 in [0, 1].
    """
    inside = np.asarray(inside, dtype=bool)
    matched = np.zeros(inside.shape[1], dtype=bool)
    matched[np.asarray(matched_cells, dtype=np.int64)] = True
    hits = (inside & matched).sum(1).astype(np.float64)
    area = inside.sum(1)
    purity = np.divide(hits, area, out=np.zeros_like(hits), where=area > 0)
    total = matched.sum()
    coverage = hits / total if total else np.zeros_like(hits)
    return purity, coverage


@dataclass
class ProposalScores:
    """Per-proposal metrics, all ``(P,)`` arrays."""

    emd: np.ndarray
    """EMD to the reference features, in [0, 1] (1 for an empty proposal)."""
    emd_similarity: np.ndarray
    """``clip(1 - 2 * emd, 0, 1)``: plan-weighted mean cosine to the reference, negatives cut to 0
    (unrelated features have cosines near 0, so this spreads the useful range over [0, 1])."""
    purity: np.ndarray
    coverage: np.ndarray
    negative_factor: np.ndarray
    """In (0, 1]; 1 without negative evidence (see :func:`negative_factor`)."""
    raw: np.ndarray
    """Weighted mean of ``emd_similarity``, ``purity``, ``coverage`` (config weights) times
    ``negative_factor``; in [0, 1]. Used to rank proposals."""
    valid: np.ndarray
    """bool: the proposal covers at least one cell."""


def negative_factor(positive_similarity: float, negative_similarity: float) -> float:
    """``sigmoid((positive - negative) / T)``: near 1 when the proposal is clearly closer to the
    reference than to the rejected regions, 0.5 when equally close, near 0 when closer to them."""
    return float(
        1.0 / (1.0 + np.exp(-(positive_similarity - negative_similarity) / NEGATIVE_TEMPERATURE))
    )


def _weighted(config: SegmenterConfig, emd_similarity, purity, coverage):
    total = config.emd_weight + config.purity_weight + config.coverage_weight
    if total <= 0:
        raise ValueError("emd_weight + purity_weight + coverage_weight must be positive")
    return (
        config.emd_weight * emd_similarity
        + config.purity_weight * purity
        + config.coverage_weight * coverage
    ) / total


def score_proposals(
    inside: np.ndarray,
    target_features: np.ndarray,
    reference_features: np.ndarray,
    matched_cells: np.ndarray,
    config: SegmenterConfig,
    negatives: np.ndarray | None = None,
) -> ProposalScores:
    """Instance-level metrics of ``P`` proposals.

    Args:
        inside: ``(P, Nc)`` bool cells of each proposal (:func:`inside_cells`).
        target_features: ``(Nc, D)`` target patch features, flat row-major.
        reference_features: ``(Nr, D)`` features of the reference object (the masked cells of
            every shot).
        matched_cells: ``(M,)`` flat indices of the bidirectionally matched target cells.
        config: weights and ``emd_max_points``.
        negatives: ``(Nn, D)`` features of regions annotators rejected for this label, or ``None``.
            Each proposal cell's nearest-neighbour cosine to them is compared with its
            nearest-neighbour cosine to the reference; the raw score is multiplied by
            :func:`negative_factor` of the two means over the proposal's cells. Nearest neighbours
            rather than an EMD: negatives pool the regions of many deleted predictions, and an
            EMD to the pooled set would spread each proposal over all of them, so a proposal that
            resembles one deleted region exactly would still look unlike "the negatives".
    """
    inside = np.asarray(inside, dtype=bool)
    target_features = np.asarray(target_features, dtype=np.float32)
    count = len(inside)
    emd = np.ones(count)
    factor = np.ones(count)
    valid = inside.any(1)
    reference = reduce_points(np.asarray(reference_features, np.float32), config.emd_max_points)
    negative = positive = None
    if negatives is not None and len(negatives):
        negative = l2_normalise(negatives)
        positive = l2_normalise(reference_features)
    for p in np.flatnonzero(valid):
        features = target_features[inside[p]]
        emd[p] = emd_distance(reference, features, config.emd_max_points)
        if negative is not None:
            cells = l2_normalise(features)
            factor[p] = negative_factor(
                float((cells @ positive.T).max(1).mean()), float((cells @ negative.T).max(1).mean())
            )
    emd_similarity = np.clip(1.0 - 2.0 * emd, 0.0, 1.0)
    purity, coverage = purity_coverage(inside, matched_cells)
    raw = _weighted(config, emd_similarity, purity, coverage) * factor
    raw[~valid] = 0.0
    return ProposalScores(emd, emd_similarity, purity, coverage, factor, raw, valid)


def relative_filter(values: np.ndarray, threshold: float) -> np.ndarray:
    """``(P,)`` bool: values at least ``min(threshold, max(values))`` (Matcher's metric filters,
    which never drop the best proposal); all True when ``threshold <= 0`` or nothing is given."""
    values = np.asarray(values, dtype=np.float64)
    if threshold <= 0 or len(values) == 0:
        return np.ones(len(values), dtype=bool)
    return values >= min(threshold, float(values.max()))


def rank_proposals(scores: ProposalScores, config: SegmenterConfig) -> np.ndarray:
    """Indices of the valid proposals that hold at least one matched point and pass
    ``min_purity`` and ``min_coverage`` (:func:`relative_filter`), best raw score first (ties:
    lower index first)."""
    valid = np.flatnonzero(scores.valid & (scores.purity > 0))
    passing = relative_filter(scores.purity[valid], config.min_purity)
    passing &= relative_filter(scores.coverage[valid], config.min_coverage)
    candidates = valid[passing]
    return candidates[np.argsort(-scores.raw[candidates], kind="stable")]


def same_instance(first: np.ndarray, second: np.ndarray, merge_iou: float) -> bool:
    """Whether two bool masks (any equal shapes) show the same instance: IoU at least
    ``merge_iou``, or at least :data:`CONTAINMENT` of the smaller inside the larger."""
    intersection = np.logical_and(first, second).sum()
    if intersection == 0:
        return False
    area_first, area_second = first.sum(), second.sum()
    union = area_first + area_second - intersection
    return bool(
        intersection / union >= merge_iou
        or intersection / min(area_first, area_second) >= CONTAINMENT
    )


def group_proposals(
    order: np.ndarray, overlap_masks: np.ndarray, merge_iou: float
) -> list[list[int]]:
    """Greedy grouping of ranked proposals into instances.

    Proposals are visited best first; one joins the first group whose *leader* (best member) it is
    the same instance as (:func:`same_instance`), else it leads a new group. Merging keeps the
    leader's mask rather than the union: the union of SAM's masks of one object only adds the
    leaks of the weaker ones, while the best-scoring mask is the cleanest; the other members count
    as support. Non-overlapping proposals always end in separate groups.

    Args:
        order: proposal indices, best first (:func:`rank_proposals`).
        overlap_masks: ``(P, K)`` bool masks used for overlap (any resolution, same for all).
    """
    groups: list[list[int]] = []
    for p in map(int, order):
        for group in groups:
            if same_instance(overlap_masks[p], overlap_masks[group[0]], merge_iou):
                group.append(p)
                break
        else:
            groups.append([p])
    return groups


@dataclass
class InstanceChoice:
    """One instance kept from the proposals."""

    proposal: int
    """Index of the proposal whose mask is the instance's (the group leader)."""
    members: list[int]
    """All proposals merged into it, leader first."""
    score: float
    """Calibrated score in [0, 1] (see :func:`select_instances`)."""
    exclusive_coverage: float


def select_instances(
    scores: ProposalScores,
    inside: np.ndarray,
    overlap_masks: np.ndarray,
    matched_cells: np.ndarray,
    config: SegmenterConfig,
) -> list[InstanceChoice]:
    """Filter, rank and merge proposals into separate instances, each with a score in [0, 1].

    Every passing proposal is grouped (:func:`group_proposals`), then the ``top_proposals`` best
    groups are kept. Capping groups rather than raw proposals matters for separate instances:
    many prompts land on the same object, and the best few raw proposals are often all copies of
    one object, which would silently drop every other object.

    The instance score is the configured weighted mean of the leader's EMD similarity, purity and
    *exclusive coverage*, times its negative-evidence factor. Exclusive coverage replaces coverage
    because plain coverage punishes every one of ``n`` objects by ``1/n``: it counts the matched
    points inside the instance against those inside it plus those *no* instance explains,
    ``|A & T| / (|A & T| + |T - union of instances|)``. A part of an object whose rest no proposal
    covers still scores low; each of two whole objects scores like a single one. The score is not
    a fitted probability: its terms have fixed meanings whatever the image size or instance count,
    which is what lets a per-label threshold be tuned on it.

    Returns:
        Instances, best score first.
    """
    order = rank_proposals(scores, config)
    groups = group_proposals(order, overlap_masks, config.merge_iou)[: max(0, config.top_proposals)]
    if not groups:
        return []
    inside = np.asarray(inside, dtype=bool)
    matched = np.zeros(inside.shape[1], dtype=bool)
    matched[np.asarray(matched_cells, dtype=np.int64)] = True
    explained = np.zeros_like(matched)
    for group in groups:
        explained |= inside[group[0]]
    unexplained = int((matched & ~explained).sum())
    choices = []
    for group in groups:
        leader = group[0]
        hits = int((inside[leader] & matched).sum())
        exclusive = hits / (hits + unexplained) if hits + unexplained else 0.0
        score = (
            _weighted(config, scores.emd_similarity[leader], scores.purity[leader], exclusive)
            * scores.negative_factor[leader]
        )
        choices.append(InstanceChoice(leader, group, float(np.clip(score, 0, 1)), exclusive))
    choices.sort(key=lambda choice: -choice.score)
    return choices


def split_components(
    masks: np.ndarray, min_fraction: float = MIN_COMPONENT_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Split each mask into its connected pieces (8-connectivity), dropping speckles.

    SAM prompted with points on two separate objects often returns one mask holding both; split,
    each object becomes its own proposal and can become its own instance.

    Args:
        masks: ``(P, h, w)`` bool masks.
        min_fraction: pieces smaller than this fraction of their mask are dropped (the largest
            piece is always kept).

    Returns:
        ``(Q, h, w)`` bool pieces and ``(Q,)`` int64 index of the mask each came from; empty masks
        give no piece.
    """
    masks = np.asarray(masks, dtype=bool)
    structure = np.ones((3, 3), dtype=bool)
    pieces, parents = [], []
    for p, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(labelled.ravel())[1:]
        keep = np.flatnonzero(sizes >= min_fraction * sizes.sum())
        if len(keep) == 0:
            keep = [int(sizes.argmax())]
        for component in keep:
            pieces.append(labelled == component + 1)
            parents.append(p)
    if not pieces:
        return np.zeros((0, *masks.shape[1:]), dtype=bool), np.zeros(0, dtype=np.int64)
    return np.stack(pieces), np.asarray(parents, dtype=np.int64)


def first_unique(masks: np.ndarray) -> np.ndarray:
    """``(U,)`` indices of the first occurrence of each distinct mask in ``(P, ...)`` bool masks,
    in order: different prompts often give SAM the same mask, which needs scoring only once."""
    seen: set[bytes] = set()
    keep = []
    for index, mask in enumerate(np.asarray(masks, dtype=bool)):
        key = np.packbits(mask).tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(index)
    return np.asarray(keep, dtype=np.int64)


@dataclass
class MatcherMetrics:
    """Matcher's instance-level metrics of ``P`` proposals (``get_mask_scores``), all ``(P,)``."""

    emd_score: np.ndarray
    """``1 - emd``: EMD between the reference object's cells and the proposal's cells."""
    purity: np.ndarray
    """Matched points inside the proposal per proposal cell, plus 1e-6."""
    coverage: np.ndarray
    """Fraction of the matched points inside the proposal, plus 1e-6."""


def matcher_metrics(
    cells: np.ndarray,
    points_inside: np.ndarray,
    target_features: np.ndarray,
    reference_features: np.ndarray,
    emd_max_points: int = 0,
) -> MatcherMetrics:
    """Matcher's metrics.

    Args:
        cells: ``(P, Nc)`` bool, the patch cells each proposal touches at all (its mask pooled to
            the patch grid, ``> 0``).
        points_inside: ``(P, M)`` bool, which matched points (their pixel) fall in each mask.
        target_features: ``(Nc, D)`` target patch features.
        reference_features: ``(Nr, D)`` the reference object's features.
        emd_max_points: see :func:`emd_distance` (0, all points, as published).
    """
    cells = np.asarray(cells, dtype=bool).reshape(len(cells), -1)
    # Many prompt sets give the same mask: each distinct cell set is transported once.
    distinct, inverse = np.unique(cells, axis=0, return_inverse=True)
    emd = np.array(
        [emd_distance(reference_features, target_features[row], emd_max_points) for row in distinct]
    )[np.asarray(inverse).reshape(-1)]
    hits = np.asarray(points_inside, dtype=bool).sum(1).astype(np.float64)
    purity = hits / np.maximum(cells.sum(1), 1.0) + 1e-6
    total = max(np.asarray(points_inside).shape[1], 1)
    return MatcherMetrics(1.0 - emd, purity, hits / total + 1e-6)


def union_members(metrics: MatcherMetrics, config: SegmenterConfig) -> tuple[np.ndarray, float]:
    """Which proposals Matcher merges into the label's mask, and the best one's score.

    Score ``alpha * emd_score + beta * purity * coverage ** exp``; then the coverage, EMD and
    purity filters (:func:`relative_filter`, in that order); then either the distance filter
    (``union_distance_filter``: distance ``1 - score`` below ``union_max_distance``, and
    ``(d - d_min) / (d_max + 1e-6)`` below ``union_max_norm_distance``, the best always kept)
    or the top ``union_top`` by score keeping those above ``union_score_ratio`` of the best.

    Returns:
        ``(K,)`` proposal indices (best first; none when there are no proposals) and the best
        kept proposal's score.
    """
    score = config.union_alpha * metrics.emd_score + config.union_beta * (
        metrics.purity * metrics.coverage**config.union_exp
    )
    keep = np.arange(len(score))
    for values, threshold in (
        (metrics.coverage, config.min_coverage),
        (metrics.emd_score, config.min_emd_score),
        (metrics.purity, config.min_purity),
    ):
        keep = keep[relative_filter(values[keep], threshold)]
    if len(keep) == 0:
        return keep, 0.0
    order = keep[np.argsort(-score[keep], kind="stable")]
    if config.union_distance_filter:
        distance = 1.0 - score[order]
        normalised = (distance - distance.min()) / (distance.max() + 1e-6)
        passing = distance < config.union_max_distance
        passing[0] = True
        chosen = order[passing & (normalised < config.union_max_norm_distance)]
        chosen = chosen[: config.union_top]
    else:
        chosen = order[: config.union_top]
        if config.union_score_ratio > 0:
            chosen = chosen[score[chosen] / score[chosen[0]] > config.union_score_ratio]
    return chosen, float(score[order[0]])
