"""The robust prompt sampler: k-means, part / instance / global prompt sets, determinism."""

from __future__ import annotations

import numpy as np

from matcher_core.config import SegmenterConfig
from matcher_core.prompts import PAD_LABEL, POSITIVE_LABEL, kmeans, sample_prompts


def blobs(rng: np.random.Generator, centres: list[tuple[float, float]], per_blob: int = 20):
    """``(len(centres) * per_blob, 2)`` XY points scattered (sd 3 px) around each centre."""
    return np.concatenate([rng.normal(c, 3.0, size=(per_blob, 2)) for c in centres]).astype(
        np.float32
    )


def test_kmeans_separates_well_separated_blobs():
    points = blobs(np.random.default_rng(0), [(20, 20), (200, 40), (100, 150)])
    centroids, assignment = kmeans(points, 3, np.random.default_rng(5))
    assert centroids.shape == (3, 2)
    for blob in range(3):
        labels = assignment[blob * 20 : (blob + 1) * 20]
        assert len(set(labels.tolist())) == 1  # one blob, one cluster
        np.testing.assert_allclose(
            centroids[labels[0]], points[assignment == labels[0]].mean(0), rtol=1e-6
        )
    assert len(set(assignment.tolist())) == 3


def test_kmeans_is_deterministic_for_a_seed():
    points = np.random.default_rng(0).uniform(0, 100, size=(200, 2))
    first = kmeans(points, 8, np.random.default_rng(42))
    second = kmeans(points, 8, np.random.default_rng(42))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_kmeans_returns_no_more_clusters_than_distinct_points():
    points = np.array([[1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    centroids, assignment = kmeans(points, 8, np.random.default_rng(0))
    assert len(centroids) == 2
    assert assignment[0] == assignment[1] != assignment[2]


def config(**changes) -> SegmenterConfig:
    base = SegmenterConfig(
        num_clusters=4,
        part_prompts=4,
        instance_prompts=10,
        global_prompts=1,
        max_points_per_prompt=3,
    )
    return base.replace(**changes)


def test_prompt_sets_have_the_three_kinds_padded_with_minus_one():
    rng = np.random.default_rng(0)
    matched = blobs(rng, [(20, 20), (200, 40), (100, 150), (30, 180)])
    batch = sample_prompts(matched, config(), np.random.default_rng(7))
    count, width, _ = batch.points.shape
    assert batch.labels.shape == (count, width) and len(batch.kinds) == count
    assert batch.boxes is None
    assert batch.kinds[:4] == ["part"] * 4 and batch.kinds[-1] == "global"
    assert set(batch.kinds[4:-1]) == {"instance"}
    matched_set = {tuple(p) for p in matched.tolist()}
    centre_set = {tuple(p) for p in batch.centres.tolist()}
    assert centre_set <= matched_set  # centres are matched points, not free centroids
    seen = set()
    for points, labels, kind in zip(batch.points, batch.labels, batch.kinds, strict=True):
        positives = int((labels == POSITIVE_LABEL).sum())
        # Positives first, then only padding.
        assert (labels[:positives] == POSITIVE_LABEL).all()
        assert (labels[positives:] == PAD_LABEL).all()
        chosen = {tuple(p) for p in points[:positives].tolist()}
        assert chosen <= centre_set
        if kind == "part":
            assert positives == 1
        elif kind == "instance":
            assert 2 <= positives <= 3
        else:
            assert chosen == centre_set
        assert frozenset(chosen) not in seen  # no set is decoded twice
        seen.add(frozenset(chosen))


def test_part_prompts_beyond_the_clusters_add_points_of_the_same_cluster():
    rng = np.random.default_rng(0)
    matched = blobs(rng, [(20, 20), (300, 300)])
    batch = sample_prompts(
        matched,
        config(num_clusters=2, part_prompts=6, instance_prompts=0),
        np.random.default_rng(1),
    )
    parts = [i for i, kind in enumerate(batch.kinds) if kind == "part"]
    assert len(parts) > 2
    for i in parts:
        points = batch.points[i][batch.labels[i] == POSITIVE_LABEL]
        near_first = np.linalg.norm(points - [20, 20], axis=1) < 50
        assert near_first.all() or (~near_first).all()  # never mixes the two clusters


def test_sampling_is_deterministic_for_a_seed():
    matched = np.random.default_rng(3).uniform(0, 500, size=(120, 2)).astype(np.float32)
    cfg = config(num_clusters=8, instance_prompts=24, max_points_per_prompt=4, use_box=True)
    first = sample_prompts(matched, cfg, np.random.default_rng(11))
    second = sample_prompts(matched, cfg, np.random.default_rng(11))
    other = sample_prompts(matched, cfg, np.random.default_rng(12))
    np.testing.assert_array_equal(first.points, second.points)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.boxes, second.boxes)
    assert first.kinds == second.kinds
    assert first.points.shape != other.points.shape or not np.array_equal(
        first.points, other.points
    )


def test_boxes_surround_their_clusters_and_stay_in_the_image():
    rng = np.random.default_rng(0)
    matched = np.clip(blobs(rng, [(10, 10), (150, 60), (80, 90)]), 0, None)
    batch = sample_prompts(
        matched,
        config(num_clusters=3, max_points_per_prompt=2, use_box=True),
        np.random.default_rng(0),
        box_margin=4.0,
        image_size=(100, 170),
    )
    assert batch.boxes.shape == (len(batch), 4)
    for points, labels, box in zip(batch.points, batch.labels, batch.boxes, strict=True):
        positives = points[labels == POSITIVE_LABEL]
        x0, y0, x1, y1 = box
        assert 0 <= x0 <= positives[:, 0].min() and positives[:, 0].max() <= x1 <= 170
        assert 0 <= y0 <= positives[:, 1].min() and positives[:, 1].max() <= y1 <= 100
    # The global box holds every matched point.
    x0, y0, x1, y1 = batch.boxes[batch.kinds.index("global")]
    assert x0 <= matched[:, 0].min() and matched[:, 0].max() <= x1
    assert y0 <= matched[:, 1].min() and matched[:, 1].max() <= y1


def test_a_single_matched_point_gives_a_single_prompt():
    batch = sample_prompts(np.array([[5.0, 7.0]]), config(), np.random.default_rng(0))
    assert batch.kinds == ["part"]
    np.testing.assert_array_equal(batch.points, [[[5.0, 7.0]]])
    np.testing.assert_array_equal(batch.labels, [[1]])


def test_matcher_fss_sampler_takes_every_4_5_and_6_subset_of_8_centres():
    from matcher_core.config import PRESETS, SegmenterConfig
    from matcher_core.prompts import kmeans_centroids, sample_subsets

    config = SegmenterConfig().with_preset("fss")
    assert PRESETS["fss"]["subset_sizes"] == (4, 6)
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 500, size=(60, 2)).astype(np.float32)
    centres = kmeans_centroids(points, config.num_clusters, rng)
    batch = sample_subsets(centres, config.subset_sizes, config.subsets_per_size, rng)
    assert len(centres) == 8 and len(batch) == 70 + 56 + 28 == 154
    sets = {
        tuple(sorted(map(tuple, pts[lab == 1].tolist())))
        for pts, lab in zip(batch.points, batch.labels, strict=True)
    }
    assert len(sets) == 154  # all distinct: every subset exactly once
    assert batch.boxes is None


def test_matcher_coco_sampler_draws_random_subsets_of_each_size_above_eight_points():
    from matcher_core.prompts import points_box, sample_subsets

    rng = np.random.default_rng(0)
    points = rng.uniform(0, 100, size=(20, 2)).astype(np.float32)
    box = points_box(points, (100, 100))
    batch = sample_subsets(points, (1, 6), 64, rng, box)
    assert len(batch) == 6 * 64
    sizes = (batch.labels == 1).sum(1)
    assert np.bincount(sizes).tolist() == [0] + [64] * 6
    assert (batch.boxes == box).all()
    few = sample_subsets(points[:3], (1, 6), 64, rng)  # 3 points: every subset of size 1..3
    assert len(few) == 3 + 3 + 1
