"""Bidirectional patch matching, proved on hand-made features."""

from __future__ import annotations

import numpy as np
import pytest

from matcher_core.matching import (
    MatchResult,
    bidirectional_match,
    correspondence_matrix,
    match_shots,
    prune_matches,
)
from matcher_core.reference import Shot

E1, E2, E3 = np.eye(3, dtype=np.float32)


def unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def shot_from(features: np.ndarray, mask: np.ndarray) -> Shot:
    """A shot from ``(gh, gw, D)`` features and a ``(gh, gw)`` coverage mask."""
    return Shot(
        patch_features=features.astype(np.float16),
        patch_mask=mask.astype(np.float32),
        sam_target_embedding=np.zeros(4, np.float32),
    )


def test_correspondence_matrix_is_cosine_whatever_the_scale():
    reference = np.array([[2.0, 0.0], [1.0, 1.0]])
    target = np.array([[0.0, 5.0], [3.0, 0.0]])
    similarity = correspondence_matrix(reference, target)
    np.testing.assert_allclose(similarity, [[0.0, 1.0], [np.sqrt(0.5), np.sqrt(0.5)]], atol=1e-6)


def test_forward_match_is_rejected_when_its_reverse_lands_outside_the_mask():
    # Reference: cells 0 and 1 are the object (features E1, E2), cell 2 is background (E3).
    reference = np.stack([E1, E2, E3])
    mask = np.array([True, True, False])
    # Target cell 1 is the best partner of object cell 1 (cos 0.6) but resembles the reference
    # background more (cos 0.8): its reverse match is cell 2, outside the mask.
    target = np.stack([E1, unit(0.6 * E2 + 0.8 * E3)])
    result = bidirectional_match(reference, mask, target)
    assert result.forward_matches == 2
    assert result.target_indices.tolist() == [0]
    assert result.reference_indices.tolist() == [0]
    np.testing.assert_allclose(result.similarities, [1.0], atol=1e-6)
    assert result.kept_fraction == 0.5


def test_forward_match_is_kept_when_its_reverse_lands_inside_the_mask():
    reference = np.stack([E1, E2, E3])
    mask = np.array([True, True, False])
    # Same layout, but target cell 1 now resembles object cell 1 (0.8) more than background (0.6).
    target = np.stack([E1, unit(0.8 * E2 + 0.6 * E3)])
    result = bidirectional_match(reference, mask, target)
    assert result.target_indices.tolist() == [0, 1]
    assert result.reference_indices.tolist() == [0, 1]
    np.testing.assert_allclose(result.similarities, [1.0, 0.8], atol=1e-6)
    assert result.quality == pytest.approx((0.9 + 1.0) / 2)


def test_forward_matching_is_one_to_one():
    # Two identical object cells cannot both take the single perfect target cell.
    reference = np.stack([E1, E1, E3])
    mask = np.array([True, True, False])
    target = np.stack([E1, unit(0.9 * E1 + 0.1 * E2), E3])
    result = bidirectional_match(reference, mask, target)
    assert sorted(result.target_indices.tolist()) == [0, 1]
    assert len(set(result.reference_indices.tolist())) == 2


def test_identical_images_match_every_object_cell_to_itself():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, 16)).astype(np.float32)
    mask = np.zeros(30, dtype=bool)
    mask[[3, 4, 10, 11, 17]] = True
    result = bidirectional_match(features, mask, features)
    assert result.target_indices.tolist() == [3, 4, 10, 11, 17]
    assert result.reference_indices.tolist() == [3, 4, 10, 11, 17]
    assert result.quality == pytest.approx(1.0)


def test_empty_mask_or_nothing_kept_gives_quality_zero():
    features = np.stack([E1, E2])
    assert len(bidirectional_match(features, np.array([False, False]), features)) == 0
    assert MatchResult.empty().quality == 0.0
    assert MatchResult.empty().kept_fraction == 0.0


def test_a_reference_cell_is_object_when_half_covered_or_with_matchers_rule_touched_at_all():
    features = np.ones((2, 2, 3), np.float32)
    shot = shot_from(features, np.array([[0.5, 0.01], [0.0, 1.0]]))
    assert shot.object_cells().tolist() == [True, False, False, True]  # the product: >= half
    # Matcher: avg_pool(mask) > 0, so a thin object keeps every cell it crosses.
    assert shot.object_cells(0.0).tolist() == [True, True, False, True]
    assert len(shot.masked_features(0.0)) == 3
    thin = shot_from(features, np.array([[0.1, 0.3], [0.0, 0.3]]))
    assert thin.object_cells().tolist() == [False, True, False, True]  # the most covered cells


def test_above_forty_matches_the_better_half_by_forward_cosine_is_kept():
    count = 41
    match = MatchResult(
        target_indices=np.arange(count),
        reference_indices=np.arange(count),
        shot_indices=np.zeros(count, np.int64),
        similarities=np.linspace(0.0, 1.0, count, dtype=np.float32)[::-1].copy(),
        forward_matches=count,
    )
    pruned = prune_matches(match)
    assert pruned.target_indices.tolist() == list(range(20))  # 41 // 2, the most similar
    assert prune_matches(match.subset(np.arange(40))).target_indices.tolist() == list(range(40))
    assert len(prune_matches(match, above=0)) == count


def test_published_fallback_keeps_every_forward_match_when_none_survives_the_reverse_check():
    reference = np.stack([E1, E2, E3])
    mask = np.array([True, False, False])
    target = np.stack([unit(0.6 * E1 + 0.8 * E3)])  # more like the background than the object
    assert len(bidirectional_match(reference, mask, target)) == 0
    kept = bidirectional_match(reference, mask, target, keep_forward_if_none_survive=True)
    assert kept.target_indices.tolist() == [0]


def test_several_shots_pool_their_matches_and_keep_each_target_cell_once():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(4, 4, 8)).astype(np.float32)
    target /= np.linalg.norm(target, axis=-1, keepdims=True)
    flat = target.reshape(16, 8)
    # Shot 0 shows cells 0 and 1 of the target, shot 1 cells 1 and 2 (cell 1 slightly noisy).
    mask0 = np.zeros((4, 4))
    mask0.flat[[0, 1]] = 1.0
    shot0 = shot_from(target, mask0)
    noisy = target.copy()
    noisy.flat[8:16] = unit(flat[1] + 0.3 * flat[5])
    mask1 = np.zeros((4, 4))
    mask1.flat[[1, 2]] = 1.0
    shot1 = shot_from(noisy, mask1)

    pooled = match_shots([shot0, shot1], target)
    assert pooled.target_indices.tolist() == [0, 1, 2]
    # Cell 1 is kept once, from the shot that matched it best (shot 0, exact copy).
    assert pooled.shot_indices.tolist() == [0, 0, 1]
    assert pooled.forward_matches == 4
    np.testing.assert_allclose(pooled.similarities, 1.0, atol=2e-3)  # float16 shot features
