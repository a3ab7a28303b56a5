"""Bidirectional patch matching: Matcher's correspondence step.

The reference object's patches are matched one-to-one to target patches (Hungarian assignment on
the cosine correspondence matrix, *forward*); each matched target patch is then matched back,
one-to-one, to *all* reference patches (*reverse*). A forward match survives only when its reverse
match lands inside the reference mask: a target patch that resembles the reference background
better than the object is an outlier, however similar it is to some object patch.

Indices are flat, row-major positions on a patch grid: cell ``(i, j)`` of a ``(gh, gw)`` grid is
index ``i * gw + j`` (see :func:`matcher_core.features.patch_centres` for their XY centres).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .reference import OBJECT_CELL_COVERAGE, Shot

BACKGROUND_RING = 2
"""Cells this many 4-connected steps from the reference object or closer are not its background
in :func:`absence_baseline`: their receptive fields still see the object. Measured on real
EfficientNet-Lite0 features (27 folders of ``oneshot_seg_real``, 135 present and 702 absent
pairs): a ring of 1 / 2 / 3 cells keeps 81.5 / 92.7 / 97.6 % of present objects and rejects
99.1 / 98.1 / 89.6 % of absent ones."""
PRUNE_ABOVE = 40
"""Matcher keeps the better half of the matches (by forward cosine) when more than this many
survive the reverse check (``patch_level_matching``: ``len // 2 if len > 40``)."""


@dataclass
class MatchResult:
    """Bidirectionally consistent matches between reference shots and one target.

    All arrays have one entry per kept match (``M`` of them), sorted by target index, and each
    target cell appears at most once.
    """

    target_indices: np.ndarray
    """``(M,)`` int64 flat indices of matched target patch cells."""
    reference_indices: np.ndarray
    """``(M,)`` int64 flat indices of the reference cells they were matched from (forward), in the
    grid of the shot given by :attr:`shot_indices`."""
    shot_indices: np.ndarray
    """``(M,)`` int64 index of the shot each match comes from."""
    similarities: np.ndarray
    """``(M,)`` float32 cosine similarity of each forward match."""
    forward_matches: int
    """Number of forward matches before the reverse check (summed over shots)."""
    forward_similarity: float = 0.0
    """Mean cosine of all forward matches, before the reverse check (the absence test's side)."""

    def __len__(self) -> int:
        return len(self.target_indices)

    @property
    def quality(self) -> float:
        """Match quality in [0, 1]: mean cosine of the kept matches mapped by ``(c + 1) / 2``;
        0 when nothing survived the reverse check."""
        if len(self) == 0:
            return 0.0
        return float(np.clip((float(self.similarities.mean()) + 1.0) / 2.0, 0.0, 1.0))

    @property
    def kept_fraction(self) -> float:
        """Fraction of forward matches that survived the reverse check (0 when none were made)."""
        return len(self) / self.forward_matches if self.forward_matches else 0.0

    def subset(self, rows: np.ndarray) -> MatchResult:
        """The matches at ``rows`` (indices or a bool mask), same forward count."""
        return MatchResult(
            target_indices=self.target_indices[rows],
            reference_indices=self.reference_indices[rows],
            shot_indices=self.shot_indices[rows],
            similarities=self.similarities[rows],
            forward_matches=self.forward_matches,
            forward_similarity=self.forward_similarity,
        )

    @staticmethod
    def empty() -> MatchResult:
        none = np.zeros(0, dtype=np.int64)
        return MatchResult(none, none.copy(), none.copy(), np.zeros(0, np.float32), 0)


def l2_normalise(features: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``(..., D)`` float32 features scaled to unit length along the last axis."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.maximum(norms, eps)


def correspondence_matrix(
    reference_features: np.ndarray, target_features: np.ndarray
) -> np.ndarray:
    """``(Nr, Nt)`` cosine similarity between ``(Nr, D)`` reference and ``(Nt, D)`` target
    features (both L2-normalised here, whatever their input scale)."""
    return l2_normalise(reference_features) @ l2_normalise(target_features).T


def bidirectional_match(
    reference_features: np.ndarray,
    reference_mask: np.ndarray,
    target_features: np.ndarray,
    shot_index: int = 0,
    keep_forward_if_none_survive: bool = False,
) -> MatchResult:
    """Forward Hungarian matching of the masked reference cells to the target, kept only where the
    reverse Hungarian matching (target to all reference cells) returns inside the mask.

    Args:
        reference_features: ``(Nr, D)`` features of every reference cell (flat, row-major).
        reference_mask: ``(Nr,)`` bool, the reference cells inside the object.
        target_features: ``(Nt, D)`` features of every target cell (flat, row-major).
        shot_index: recorded in :attr:`MatchResult.shot_indices`.
        keep_forward_if_none_survive: when the reverse check rejects every forward match, keep
            them all (Matcher's ``patch_level_matching`` does; the product instead takes such a
            target to be without the object).
    """
    reference_mask = np.asarray(reference_mask, dtype=bool).reshape(-1)
    if reference_mask.shape[0] != len(reference_features):
        raise ValueError(
            f"mask of {reference_mask.shape[0]} cells for {len(reference_features)} features"
        )
    masked_rows = np.flatnonzero(reference_mask)
    if len(masked_rows) == 0 or len(target_features) == 0:
        return MatchResult.empty()
    similarity = correspondence_matrix(reference_features, target_features)  # (Nr, Nt)

    # Forward: every masked reference cell gets a distinct target cell (or min(Nm, Nt) of them
    # do when the target grid is smaller).
    forward_rows, forward_cols = linear_sum_assignment(similarity[masked_rows], maximize=True)
    forward_reference = masked_rows[forward_rows]
    forward_target = forward_cols

    # Reverse: the matched target cells compete, one-to-one, for all reference cells.
    reverse_rows, reverse_cols = linear_sum_assignment(
        similarity[:, forward_target].T, maximize=True
    )
    lands_inside = np.zeros(len(forward_target), dtype=bool)
    lands_inside[reverse_rows] = reference_mask[reverse_cols]
    if keep_forward_if_none_survive and not lands_inside.any():
        lands_inside[:] = True

    kept_target = forward_target[lands_inside].astype(np.int64)
    kept_reference = forward_reference[lands_inside].astype(np.int64)
    order = np.argsort(kept_target, kind="stable")
    return MatchResult(
        target_indices=kept_target[order],
        reference_indices=kept_reference[order],
        shot_indices=np.full(len(order), shot_index, dtype=np.int64),
        similarities=similarity[kept_reference, kept_target][order].astype(np.float32),
        forward_matches=len(forward_target),
        forward_similarity=float(similarity[forward_reference, forward_target].mean()),
    )


def _flat_features(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().float().cpu().numpy()
    features = np.asarray(features, dtype=np.float32)
    return features.reshape(-1, features.shape[-1])


Pooling = Literal["union", "consensus"]


def match_shots(
    shots: Sequence[Shot],
    target_features: np.ndarray | torch.Tensor,
    pooling: Pooling = "union",
    keep_forward_if_none_survive: bool = False,
    object_coverage: float = OBJECT_CELL_COVERAGE,
) -> MatchResult:
    """Bidirectional matches of every shot against one target, pooled (:func:`pool_matches`).

    Each shot is matched on its own (its own mask and background take part in the reverse check).

    Args:
        shots: reference shots with ``(gh, gw, D)`` patch features on the same encoder as the target.
        target_features: ``(gh, gw, D)`` or ``(gh * gw, D)`` target patch features.
        pooling: ``union`` or ``consensus`` (see :func:`pool_matches`).
        keep_forward_if_none_survive: see :func:`bidirectional_match`.
        object_coverage: which reference cells are object (:meth:`Shot.object_cells`).
    """
    target = _flat_features(target_features)
    return pool_matches(
        [
            bidirectional_match(
                _flat_features(shot.patch_features),
                shot.object_cells(object_coverage),
                target,
                i,
                keep_forward_if_none_survive,
            )
            for i, shot in enumerate(shots)
        ],
        pooling,
    )


def pool_matches(results: Sequence[MatchResult], pooling: Pooling = "union") -> MatchResult:
    """Pool per-shot matches on one target; a target cell found by several shots is kept once,
    with the shot that matched it most similarly.

    * ``union``: every cell any shot matched.
    * ``consensus``: at most as many cells as one shot matches (the median over shots), those
      matched by the most shots first, then the most similar. Why: each shot's forward matching
      assigns *every* one of its object cells somewhere, so the union of ``k`` shots holds up to
      ``k`` times the object's size in points and, measured on real features
      (``bench/learning_curve.py``), its precision falls as shots are added. Cells several shots
      agree on are the object; a cell only one shot reached is mostly that shot's leftovers.
      With one shot both modes are the same.

    Exposed so that callers matching the same shots against many targets (``bench/``) can match
    each shot once and pool any subset of shots later.
    """
    if pooling not in ("union", "consensus"):
        raise ValueError(f"unknown pooling {pooling!r}; choose union or consensus")
    results = [r for r in results if r.forward_matches]
    if not results:
        return MatchResult.empty()
    forward_matches = sum(r.forward_matches for r in results)
    forward_similarity = (
        sum(r.forward_similarity * r.forward_matches for r in results) / forward_matches
    )
    target_indices = np.concatenate([r.target_indices for r in results])
    similarities = np.concatenate([r.similarities for r in results])
    by_similarity = np.argsort(-similarities, kind="stable")
    # np.unique keeps the first occurrence in the similarity-sorted order: the best shot per cell.
    cells, first, votes = np.unique(
        target_indices[by_similarity], return_index=True, return_counts=True
    )
    chosen = by_similarity[first]  # sorted by target index, since np.unique sorts its values
    if pooling == "consensus" and len(results) > 1:
        budget = int(round(float(np.median([len(r) for r in results]))))
        # Most votes first, then the highest similarity, then the lower cell index (stable).
        rank = np.lexsort((cells, -similarities[chosen], -votes))
        chosen = chosen[np.sort(rank[:budget])]  # back to target-index order
    return MatchResult(
        target_indices=target_indices[chosen],
        reference_indices=np.concatenate([r.reference_indices for r in results])[chosen],
        shot_indices=np.concatenate([r.shot_indices for r in results])[chosen],
        similarities=similarities[chosen],
        forward_matches=forward_matches,
        forward_similarity=forward_similarity,
    )


def absence_baseline(shots: Sequence[Shot], object_coverage: float = OBJECT_CELL_COVERAGE) -> float:
    """How well the reference object matches what is *not* it: the mean cosine of a forward
    Hungarian matching of each shot's object cells to that shot's own background cells (those
    more than :data:`BACKGROUND_RING` cells away from the object), averaged over shots (-1 when no
    shot has background).

    A target whose :attr:`MatchResult.forward_similarity` is not above it matches the object no
    better than the reference's own background does: the object is taken to be absent. Both sides
    are cosines of one encoder computed by one rule, so the test needs no threshold tuned to a
    model's cosine scale.
    """
    values = []
    for shot in shots:
        features = _flat_features(shot.patch_features)
        inside = shot.object_cells(object_coverage)
        near = inside.reshape(np.shape(shot.patch_mask))
        if BACKGROUND_RING > 0:  # scipy dilates until nothing changes when iterations < 1
            near = ndimage.binary_dilation(near, iterations=BACKGROUND_RING)
        background = ~near.reshape(-1)
        if not background.any():
            continue
        similarity = correspondence_matrix(features[inside], features[background])
        rows, cols = linear_sum_assignment(similarity, maximize=True)
        values.append(float(similarity[rows, cols].mean()))
    return float(np.mean(values)) if values else -1.0


def prune_matches(match: MatchResult, above: int = PRUNE_ABOVE) -> MatchResult:
    """The better half of ``match`` by forward cosine when it holds more than ``above`` matches
    (Matcher's rule, :data:`PRUNE_ABOVE`), else ``match`` itself; ``above <= 0`` never prunes."""
    if above <= 0 or len(match) <= above:
        return match
    best = np.argsort(-match.similarities, kind="stable")[: len(match) // 2]
    return match.subset(np.sort(best))


@dataclass
class NegativeCheck:
    """Matches split by negative evidence (:func:`filter_negative_matches`)."""

    kept: MatchResult
    """Matches closer to the reference than to any negative."""
    dropped_similarities: np.ndarray
    """``(K,)`` forward-match cosines of the dropped matches."""

    @property
    def dropped_fraction(self) -> float:
        """Fraction of the matches dropped (0 when nothing was matched)."""
        total = len(self.kept) + len(self.dropped_similarities)
        return len(self.dropped_similarities) / total if total else 0.0

    def looks_deleted(self, max_fraction: float, margin: float) -> bool:
        """Whether the target shows the kind of thing annotators deleted rather than the object:
        more than ``max_fraction`` of the matches were dropped, and the kept ones do not match the
        reference clearly better (by ``margin`` mean cosine) than the dropped ones did.

        The margin spares a target that shows a small object beside a large look-alike: most
        matches fall on the look-alike and are dropped, but the few kept ones are the object's
        and match better; when the object is absent, the kept leftovers match worse.
        """
        if self.dropped_fraction <= max_fraction:
            return False
        kept = float(self.kept.similarities.mean()) if len(self.kept) else -1.0
        return kept < float(self.dropped_similarities.mean()) + margin


def filter_negative_matches(
    match: MatchResult,
    target_features: np.ndarray | torch.Tensor,
    object_features: np.ndarray,
    negatives: np.ndarray | None,
) -> NegativeCheck:
    """Drop the matched target cells that look more like negative evidence than like the object.

    A matched cell is dropped when its nearest negative (highest cosine over ``negatives``) is
    more similar than its nearest reference object cell (highest cosine over ``object_features``).
    Nearest neighbours, not means: negatives pool regions of many deleted predictions, and a
    target cell needs to resemble only one of them to be suspect.

    Args:
        match: matches on the target (flat indices into ``target_features``).
        target_features: ``(gh, gw, D)`` or ``(gh * gw, D)`` target patch features.
        object_features: ``(N, D)`` reference object features (the masked cells of every shot).
        negatives: ``(Nn, D)`` features of regions annotators deleted, or ``None`` (keeps all).
    """
    if negatives is None or len(negatives) == 0 or len(match) == 0:
        return NegativeCheck(match, np.zeros(0, np.float32))
    target = l2_normalise(_flat_features(target_features)[match.target_indices])
    to_object = (target @ l2_normalise(object_features).T).max(1)
    to_negative = (target @ l2_normalise(negatives).T).max(1)
    keep = to_negative <= to_object
    return NegativeCheck(match.subset(keep), match.similarities[~keep])
