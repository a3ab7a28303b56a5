"""Instance-level matching: EMD, purity, coverage, ranking, merging into separate instances."""

from __future__ import annotations

import numpy as np
import pytest

from matcher_core.config import SegmenterConfig
from matcher_core.scoring import (
    emd_distance,
    first_unique,
    group_proposals,
    inside_cells,
    negative_factor,
    purity_coverage,
    rank_proposals,
    reduce_points,
    same_instance,
    score_proposals,
    select_instances,
    split_components,
)

E1, E2, E3, E4 = np.eye(4, dtype=np.float32)
GRID = (6, 6)


def cells(*flat: int) -> np.ndarray:
    """``(36,)`` bool mask of the given flat cells of a 6x6 grid."""
    mask = np.zeros(GRID[0] * GRID[1], dtype=bool)
    mask[list(flat)] = True
    return mask


def rect(rows: range, cols: range) -> np.ndarray:
    mask = np.zeros(GRID, dtype=bool)
    mask[rows.start : rows.stop, cols.start : cols.stop] = True
    return mask.reshape(-1)


# --- EMD ---------------------------------------------------------------------------------------


def test_emd_of_identical_sets_is_zero():
    assert emd_distance(np.stack([E1, E2]), np.stack([E2, E1])) == pytest.approx(0.0)


def test_emd_on_hand_computed_cases():
    # Half the mass moves at no cost (E1 -> E1), half from E2 to E1 at cost (1 - 0) / 2.
    assert emd_distance(np.stack([E1, E2]), np.stack([E1, E1])) == pytest.approx(0.25)
    # Orthogonal sets: every unit of mass costs 1/2; opposite sets cost 1.
    assert emd_distance(np.stack([E1, E2]), np.stack([E3, E4])) == pytest.approx(0.5)
    assert emd_distance(np.stack([E1]), np.stack([-E1])) == pytest.approx(1.0)
    # Uneven sizes: 1/3 of E1 mass to each of three targets with cos 1, 0, 0 -> (0 + .5 + .5) / 3.
    assert emd_distance(np.stack([E1]), np.stack([E1, E2, E3])) == pytest.approx(1 / 3)


def test_emd_is_scale_invariant():
    assert emd_distance(np.stack([3 * E1, E2]), np.stack([E1, 0.1 * E1])) == pytest.approx(0.25)


def test_reduce_points_strides_evenly_and_keeps_small_sets():
    features = np.arange(100, dtype=np.float32)[:, None]
    reduced = reduce_points(features, 5)
    assert reduced[:, 0].tolist() == [0, 25, 50, 74, 99]
    assert reduce_points(features[:3], 5).shape == (3, 1)


# --- purity and coverage -----------------------------------------------------------------------


def test_inside_cells_use_half_coverage_and_fall_back_to_the_best_cell():
    coverage = np.array(
        [
            [0.5, 0.49, 1.0, 0.0],  # two cells reach half
            [0.1, 0.3, 0.0, 0.3],  # none does: the best ones
            [0.0, 0.0, 0.0, 0.0],  # empty
        ]
    )
    assert inside_cells(coverage).tolist() == [
        [True, False, True, False],
        [False, True, False, True],
        [False, False, False, False],
    ]


def test_purity_and_coverage_on_a_hand_computed_case():
    matched = np.array([0, 1, 6, 7, 35])  # five matched cells
    proposals = np.stack(
        [
            cells(0, 1, 2, 6, 7, 8),  # 4 of its 6 cells matched; 4 of 5 matched points
            cells(35),  # 1 of 1; 1 of 5
            cells(20, 21),  # none
            np.zeros(36, dtype=bool),  # empty
        ]
    )
    purity, coverage = purity_coverage(proposals, matched)
    np.testing.assert_allclose(purity, [4 / 6, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(coverage, [4 / 5, 1 / 5, 0.0, 0.0])


# --- ranking ------------------------------------------------------------------------------------


def scene(rng: np.random.Generator):
    """6x6 target: an object (E1, slightly noisy) in rows 1-2, cols 1-3; background E2 elsewhere.

    Returns target features ``(36, 4)``, reference object features and matched cells (the
    object's cells)."""
    features = np.tile(E2, (36, 1)) + 0.05 * rng.normal(size=(36, 4)).astype(np.float32)
    obj = rect(range(1, 3), range(1, 4))
    features[obj] = E1 + 0.05 * rng.normal(size=(obj.sum(), 4))
    reference = np.tile(E1, (5, 1)) + 0.05 * rng.normal(size=(5, 4))
    return features, reference, np.flatnonzero(obj)


def test_proposal_covering_the_matched_points_outranks_one_that_does_not():
    features, reference, matched = scene(np.random.default_rng(0))
    on_object = rect(range(1, 3), range(1, 4))
    elsewhere = rect(range(4, 6), range(2, 5))  # same size, background
    scores = score_proposals(
        np.stack([elsewhere, on_object]), features, reference, matched, SegmenterConfig()
    )
    # The background proposal holds no matched point at all: no candidate, whatever min_purity.
    assert rank_proposals(scores, SegmenterConfig(min_purity=0.0)).tolist() == [1]
    assert scores.raw[1] > scores.raw[0] + 0.5
    assert scores.purity.tolist() == [0.0, 1.0] and scores.coverage.tolist() == [0.0, 1.0]
    assert scores.emd[1] < 0.05 < 0.4 < scores.emd[0]


def test_purity_and_coverage_rank_proposals_when_features_cannot():
    # Every cell has the same feature: EMD is blind, the matched points decide.
    features = np.tile(E1, (36, 1))
    matched = np.flatnonzero(rect(range(0, 2), range(0, 2)))
    covering = rect(range(0, 2), range(0, 2))
    leaking = rect(range(0, 3), range(0, 3))  # all matched points, lower purity
    partial = rect(range(0, 1), range(0, 2))  # pure, half the matched points
    config = SegmenterConfig(min_purity=0.0)
    scores = score_proposals(
        np.stack([partial, leaking, covering]), features, E1[None], matched, config
    )
    np.testing.assert_allclose(scores.emd, 0.0, atol=1e-9)
    assert rank_proposals(scores, config).tolist()[0] == 2


def test_filtering_drops_impure_proposals():
    features, reference, matched = scene(np.random.default_rng(1))
    proposals = np.stack([rect(range(4, 6), range(0, 6))] + [rect(range(1, 3), range(1, 4))] * 3)
    config = SegmenterConfig(min_purity=0.1)
    scores = score_proposals(proposals, features, reference, matched, config)
    assert rank_proposals(scores, config).tolist() == [1, 2, 3]


def test_negative_evidence_lowers_the_score_of_look_alike_proposals():
    features, reference, matched = scene(np.random.default_rng(2))
    on_object = rect(range(1, 3), range(1, 4))
    config = SegmenterConfig()
    plain = score_proposals(on_object[None], features, reference, matched, config)
    # Annotators rejected regions that look exactly like this proposal.
    negatives = features[on_object] * 1.0
    penalised = score_proposals(on_object[None], features, reference, matched, config, negatives)
    unrelated = score_proposals(
        on_object[None], features, reference, matched, config, E3[None] * 1.0
    )
    assert penalised.raw[0] < 0.7 * plain.raw[0]
    assert unrelated.raw[0] == pytest.approx(plain.raw[0], rel=1e-3)
    assert negative_factor(0.5, 0.5) == pytest.approx(0.5)


# --- merging into instances --------------------------------------------------------------------


def test_same_instance_by_iou_or_containment_and_never_when_disjoint():
    whole = rect(range(0, 4), range(0, 4))
    assert same_instance(whole, rect(range(0, 4), range(0, 3)), merge_iou=0.5)  # IoU 0.75
    assert same_instance(whole, rect(range(0, 2), range(0, 2)), merge_iou=0.5)  # a part of it
    assert not same_instance(whole, rect(range(4, 6), range(4, 6)), merge_iou=0.5)
    assert not same_instance(
        rect(range(0, 2), range(0, 4)), rect(range(1, 3), range(0, 4)), merge_iou=0.5
    )  # IoU 1/3, half of each inside the other


def test_grouping_keeps_the_best_proposal_as_the_instance_mask():
    first = rect(range(0, 3), range(0, 3))
    near_copy = rect(range(0, 3), range(0, 2))
    other = rect(range(4, 6), range(4, 6))
    groups = group_proposals(np.array([1, 2, 0]), np.stack([first, near_copy, other]), 0.5)
    assert groups == [[1, 0], [2]]


def two_objects_scene(rng: np.random.Generator):
    """Two separated objects (E1-like) on E2 background in a 6x6 grid, all object cells matched."""
    features = np.tile(E2, (36, 1)) + 0.05 * rng.normal(size=(36, 4)).astype(np.float32)
    first, second = rect(range(0, 2), range(0, 2)), rect(range(3, 6), range(3, 5))
    for obj in (first, second):
        features[obj] = E1 + 0.05 * rng.normal(size=(obj.sum(), 4))
    matched = np.flatnonzero(first | second)
    return features, first, second, matched


def test_two_separated_matched_regions_give_two_instances():
    features, first, second, matched = two_objects_scene(np.random.default_rng(3))
    part_of_first = cells(0)
    proposals = np.stack(
        [first, second, first, part_of_first, second, rect(range(4, 6), range(0, 2))]
    )
    config = SegmenterConfig()
    scores = score_proposals(proposals, features, np.tile(E1, (4, 1)), matched, config)
    choices = select_instances(scores, proposals, proposals, matched, config)
    assert len(choices) == 2
    assert {tuple(np.flatnonzero(proposals[c.proposal])) for c in choices} == {
        tuple(np.flatnonzero(first)),
        tuple(np.flatnonzero(second)),
    }
    # Each object is whole: no matched point is left unexplained, so no 1/n coverage penalty.
    assert [c.exclusive_coverage for c in choices] == [1.0, 1.0]
    assert all(c.score > 0.9 for c in choices)
    first_choice = next(c for c in choices if proposals[c.proposal][0])
    assert sorted(first_choice.members) == [0, 2, 3]  # the copy and the part merged into it


def test_copies_of_one_object_do_not_crowd_out_another():
    features, first, second, matched = two_objects_scene(np.random.default_rng(6))
    proposals = np.stack([first] * 8 + [second])  # eight prompts found the first object
    config = SegmenterConfig(top_proposals=2)
    scores = score_proposals(proposals, features, np.tile(E1, (4, 1)), matched, config)
    choices = select_instances(scores, proposals, proposals, matched, config)
    assert sorted(c.proposal for c in choices) == [0, 8]
    capped = select_instances(
        scores, proposals, proposals, matched, config.replace(top_proposals=1)
    )
    assert len(capped) == 1


def test_first_unique_keeps_one_of_each_mask():
    a, b = cells(1, 2), cells(3)
    assert first_unique(np.stack([a, b, a, a, b])).tolist() == [0, 1]


def test_a_part_whose_object_nobody_covers_scores_below_the_whole_object():
    features, first, second, matched = two_objects_scene(np.random.default_rng(4))
    config = SegmenterConfig()
    only_part = np.stack([cells(0), second])
    whole = np.stack([first, second])
    reference = np.tile(E1, (4, 1))
    part_choices = select_instances(
        score_proposals(only_part, features, reference, matched, config),
        only_part,
        only_part,
        matched,
        config,
    )
    whole_choices = select_instances(
        score_proposals(whole, features, reference, matched, config), whole, whole, matched, config
    )
    part_score = next(c.score for c in part_choices if c.proposal == 0)
    whole_score = next(c.score for c in whole_choices if c.proposal == 0)
    assert part_score < whole_score - 0.1
    assert all(0.0 <= c.score <= 1.0 for c in part_choices + whole_choices)


def test_nothing_passes_when_no_proposal_holds_matched_points():
    features, first, second, matched = two_objects_scene(np.random.default_rng(5))
    background = np.stack([rect(range(3, 6), range(0, 2))])
    scores = score_proposals(background, features, np.tile(E1, (4, 1)), matched, SegmenterConfig())
    assert select_instances(scores, background, background, matched, SegmenterConfig()) == []


# --- connected pieces --------------------------------------------------------------------------


def test_split_components_separates_objects_and_drops_speckles():
    mask = np.zeros((20, 20), dtype=bool)
    mask[1:8, 1:8] = True  # 49 px
    mask[12:19, 10:18] = True  # 56 px
    mask[0, 19] = True  # 1 px speckle, under 5 % of the mask
    empty = np.zeros((20, 20), dtype=bool)
    pieces, parents = split_components(np.stack([empty, mask]))
    assert parents.tolist() == [1, 1]
    assert sorted(p.sum() for p in pieces) == [49, 56]
    assert not np.logical_and(pieces[0], pieces[1]).any()
    # Diagonal neighbours are one piece (8-connectivity).
    diagonal = np.eye(6, dtype=bool)[None]
    assert len(split_components(diagonal)[0]) == 1


def _metrics(emd_score, purity, coverage):
    from matcher_core.scoring import MatcherMetrics

    return MatcherMetrics(np.array(emd_score), np.array(purity), np.array(coverage))


def test_metric_filters_never_drop_the_best_proposal():
    from matcher_core.scoring import relative_filter

    assert relative_filter(np.array([0.01, 0.015]), 0.02).tolist() == [False, True]
    assert relative_filter(np.array([0.01, 0.5]), 0.02).tolist() == [False, True]
    assert relative_filter(np.array([0.01, 0.5]), 0.0).tolist() == [True, True]


def test_fss_union_merges_the_top_ten_scoring_above_seventy_percent_of_the_best():
    from matcher_core.config import SegmenterConfig
    from matcher_core.scoring import union_members

    config = SegmenterConfig().with_preset("fss")
    # score = 0.8 * emd_score + 0.2 * purity * coverage
    metrics = _metrics([0.9, 0.5, 0.7, 0.2], [1.0, 0.0, 0.5, 1.0], [1.0, 0.0, 0.5, 1.0])
    chosen, best = union_members(metrics, config)
    scores = [0.8 * 0.9 + 0.2, 0.8 * 0.5, 0.8 * 0.7 + 0.2 * 0.25, 0.8 * 0.2 + 0.2]
    assert best == pytest.approx(scores[0])
    assert chosen.tolist() == [i for i in np.argsort(scores)[::-1] if scores[i] / scores[0] > 0.7]
    assert union_members(_metrics([0.9] * 12, [1.0] * 12, [1.0] * 12), config)[0].size == 10


def test_coco_union_keeps_close_emd_proposals_relative_to_the_best():
    from matcher_core.config import SegmenterConfig
    from matcher_core.scoring import union_members

    config = SegmenterConfig().with_preset("coco")
    # distance = emd = 1 - emd_score; kept: emd < 0.33 and (emd - min) / (max + 1e-6) < 0.1
    metrics = _metrics([0.9, 0.85, 0.75, 0.3], [0.5] * 4, [0.5] * 4)
    chosen, best = union_members(metrics, config)
    assert best == pytest.approx(0.9)
    assert chosen.tolist() == [0, 1]  # 0.15-0.1 = 0.05 / 0.7 < 0.1; 0.25: 0.15 / 0.7 > 0.1
    lone = _metrics([0.3, 0.2], [0.5] * 2, [0.5] * 2)  # the best is kept even at emd 0.7
    assert union_members(lone, config)[0].tolist() == [0]
    # purity >= 0.02 (relative): a proposal without matched points goes first
    assert union_members(_metrics([0.9, 0.8], [0.0, 0.5], [0.0, 0.5]), config)[0].tolist() == [1]


def test_matcher_metrics_follow_get_mask_scores():
    from matcher_core.scoring import matcher_metrics

    e0, e1 = np.eye(2, dtype=np.float32)
    reference = np.stack([e0, e0])
    target = np.stack([e0, e1, e0])
    cells = np.array([[True, False, False], [True, True, False]])
    points_inside = np.array([[True, False, False], [True, True, False]])  # 3 matched points
    metrics = matcher_metrics(cells, points_inside, target, reference)
    # EMD, uniform weights, cost (1 - cos) / 2: all of e0 to e0 costs 0; half of it to e1, 0.5.
    np.testing.assert_allclose(metrics.emd_score, [1.0, 0.75], atol=1e-9)
    np.testing.assert_allclose(metrics.purity, [1.0 + 1e-6, 1.0 + 1e-6])  # points / mask cells
    np.testing.assert_allclose(metrics.coverage, [1 / 3 + 1e-6, 2 / 3 + 1e-6])
