"""Matcher's robust prompt sampler: many small prompt sets instead of one fragile prompt.

The matched target points are clustered with k-means; each cluster stands for a part of the
object (or for one of several objects). Three kinds of prompt sets are drawn:

* *part-level*: one cluster's centre alone (then, if more part prompts are asked for than there
  are clusters, a centre with a few other points of its own cluster);
* *instance-level*: random subsets of 2..``max_points_per_prompt`` cluster centres, which SAM tends
  to complete into whole objects;
* *global*: all cluster centres together.

That is the product's sampler (``prompt_sampler="parts"``, about 33 sets). Matcher's own robust
prompt sampler is :func:`sample_subsets` (``prompt_sampler="subsets"``, 154 to 768 sets).

A cluster's *centre* is the matched point nearest its k-means centroid, not the centroid itself: a
centroid can fall between two objects or in a hole of a ring-shaped one, while the nearest matched
point is by construction on a bidirectionally matched patch.

All coordinates are XY pixels of the target's original image.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from .config import SegmenterConfig

PAD_LABEL = -1
POSITIVE_LABEL = 1


@dataclass
class PromptBatch:
    """``B`` prompt sets padded to ``N`` points, ready for batched SAM decoding."""

    points: np.ndarray
    """``(B, N, 2)`` float32 XY, original pixels (padding rows are 0)."""
    labels: np.ndarray
    """``(B, N)`` int64: 1 positive point, -1 padding."""
    boxes: np.ndarray | None
    """``(B, 4)`` float32 XYXY boxes, original pixels, or ``None`` without ``use_box``."""
    kinds: list[str]
    """``B`` entries: ``part`` | ``instance`` | ``global``."""
    centres: np.ndarray
    """``(k, 2)`` float32 XY cluster centres (matched points nearest each centroid), largest
    cluster first."""

    def __len__(self) -> int:
        return len(self.kinds)


def kmeans(
    points: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded k-means (k-means++ initialisation, then Lloyd iterations).

    Args:
        points: ``(N, d)`` points, ``N >= 1``.
        k: wanted number of clusters; fewer come back when the points have fewer distinct values.
        rng: the only source of randomness (same generator state, same clusters).

    Returns:
        ``(k', d)`` float64 centroids and ``(N,)`` int64 cluster index of each point; every cluster
        has at least one point.
    """
    points = np.asarray(points, dtype=np.float64)
    if len(points) == 0:
        raise ValueError("k-means needs at least one point")
    k = max(1, min(k, len(np.unique(points, axis=0))))
    centroids = [points[rng.integers(len(points))]]
    closest = ((points - centroids[0]) ** 2).sum(1)
    while len(centroids) < k:
        total = closest.sum()
        if total <= 0:  # every point coincides with a centroid already
            break
        centroids.append(points[rng.choice(len(points), p=closest / total)])
        closest = np.minimum(closest, ((points - centroids[-1]) ** 2).sum(1))
    centres = np.stack(centroids)

    assignment = np.full(len(points), -1, dtype=np.int64)
    for _ in range(iterations):
        distances = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
        new_assignment = distances.argmin(1)
        if np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
        for c in range(len(centres)):
            members = assignment == c
            if members.any():  # an emptied cluster keeps its centroid and is dropped below
                centres[c] = points[members].mean(0)
    used = np.unique(assignment)
    remap = np.full(len(centres), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return centres[used], remap[assignment]


def _box_around(
    points: np.ndarray, margin: float, image_size: tuple[int, int] | None
) -> np.ndarray:
    """``(4,)`` XYXY box around ``(n, 2)`` XY points, grown by ``margin`` and clipped."""
    x0, y0 = points.min(0) - margin
    x1, y1 = points.max(0) + margin
    if image_size is not None:
        height, width = image_size
        x0, x1 = np.clip([x0, x1], 0, width)
        y0, y1 = np.clip([y0, y1], 0, height)
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def sample_prompts(
    matched_xy: np.ndarray,
    config: SegmenterConfig,
    rng: np.random.Generator,
    box_margin: float = 0.0,
    image_size: tuple[int, int] | None = None,
) -> PromptBatch:
    """Part-level, instance-level and global prompt sets from matched target points.

    Args:
        matched_xy: ``(M, 2)`` XY original pixels of the matched target points, ``M >= 1``.
        config: ``num_clusters``, ``part_prompts``, ``instance_prompts``, ``global_prompts``,
            ``max_points_per_prompt`` and ``use_box`` are read.
        rng: the only source of randomness (k-means initialisation and subsets).
        box_margin: pixels added around each box (half a patch cell keeps the boxed patches whole).
        image_size: ``(H, W)`` to clip boxes to, or ``None``.

    Returns:
        The prompt sets in the order part, instance, global. Identical sets are drawn only once,
        so there may be fewer than asked for. With ``use_box``, each set's box surrounds every
        matched point of the clusters its points belong to.
    """
    matched_xy = np.asarray(matched_xy, dtype=np.float32).reshape(-1, 2)
    if len(matched_xy) == 0:
        raise ValueError("no matched points to sample prompts from")
    members, centre_index = _clusters(matched_xy, config.num_clusters, rng)
    prompt_sets = _prompt_sets(members, centre_index, config, rng)
    count = len(prompt_sets)
    width = max(len(ids) for _, ids, _ in prompt_sets)
    points = np.zeros((count, width, 2), dtype=np.float32)
    labels = np.full((count, width), PAD_LABEL, dtype=np.int64)
    boxes = np.zeros((count, 4), dtype=np.float32) if config.use_box else None
    for b, (_, point_ids, clusters) in enumerate(prompt_sets):
        points[b, : len(point_ids)] = matched_xy[list(point_ids)]
        labels[b, : len(point_ids)] = POSITIVE_LABEL
        if boxes is not None:
            support = np.concatenate([members[c] for c in clusters])
            boxes[b] = _box_around(matched_xy[support], box_margin, image_size)
    return PromptBatch(
        points=points,
        labels=labels,
        boxes=boxes,
        kinds=[kind for kind, _, _ in prompt_sets],
        centres=matched_xy[centre_index].astype(np.float32),
    )


def _clusters(
    matched_xy: np.ndarray, num_clusters: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[int]]:
    """k-means clusters of the matched points, largest first: each one's member indices into
    ``matched_xy`` and the index of its centre point (the member nearest its mean)."""
    _, assignment = kmeans(matched_xy, num_clusters, rng)
    cluster_ids = np.arange(assignment.max() + 1)
    sizes = np.bincount(assignment)
    cluster_ids = cluster_ids[np.argsort(-sizes, kind="stable")]  # largest cluster first
    members = [np.flatnonzero(assignment == c) for c in cluster_ids]
    centre_index = []
    for member_ids in members:
        mean = matched_xy[member_ids].mean(0)
        nearest = ((matched_xy[member_ids] - mean) ** 2).sum(1).argmin()
        centre_index.append(int(member_ids[nearest]))
    return members, centre_index


def _prompt_sets(
    members: list[np.ndarray],
    centre_index: list[int],
    config: SegmenterConfig,
    rng: np.random.Generator,
) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """The part, instance and global prompt sets, each ``(kind, indices into matched_xy,
    clusters it draws on)``; a set of points already drawn is not drawn again."""
    max_points = max(1, config.max_points_per_prompt)
    k = len(members)
    prompt_sets: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    seen: set[tuple[int, ...]] = set()

    def add(kind: str, point_ids: list[int], clusters: list[int]) -> None:
        key = tuple(sorted(point_ids))
        if key not in seen:
            seen.add(key)
            prompt_sets.append((kind, tuple(point_ids), tuple(sorted(clusters))))

    for c in range(min(config.part_prompts, k)):
        add("part", [centre_index[c]], [c])
    for extra in range(max(0, config.part_prompts - k)):
        c = extra % k
        others = members[c][members[c] != centre_index[c]]
        if len(others) == 0:
            continue
        count = int(rng.integers(1, min(max_points - 1, len(others)) + 1)) if max_points > 1 else 0
        chosen = rng.choice(others, size=count, replace=False) if count else []
        add("part", [centre_index[c], *map(int, chosen)], [c])
    if k >= 2 and max_points >= 2:
        for _ in range(config.instance_prompts):
            size = int(rng.integers(2, min(max_points, k) + 1))
            clusters = sorted(int(c) for c in rng.choice(k, size=size, replace=False))
            add("instance", [centre_index[c] for c in clusters], clusters)
    for _ in range(config.global_prompts):
        add("global", list(centre_index), list(range(k)))
    return prompt_sets


SUBSET_ENUMERATION_LIMIT = 8
"""Matcher's ``RobustPromptSampler``: with at most this many points every subset of a size is
taken, with more a number of random ones."""


def sample_subsets(
    points: np.ndarray,
    sizes: tuple[int, int],
    per_size: int,
    rng: np.random.Generator,
    box: np.ndarray | None = None,
) -> PromptBatch:
    """Matcher's robust prompt sampler: subsets of ``points`` of every size in ``sizes``.

    For each size ``i`` from ``min(sizes[0], n)`` to ``min(sizes[1], n)``: every ``i``-subset
    when ``n <= 8`` (in lexicographic order), else ``per_size`` random ``i``-subsets (each without
    repetition; two draws may give the same subset, as published, so each keeps its weight in the
    later top-k). Eight k-means centres and sizes 4..6 give 70 + 56 + 28 = 154 sets.

    Args:
        points: ``(n, 2)`` XY original pixels, ``n >= 1``.
        sizes: smallest and largest subset size.
        per_size: random subsets per size when ``n > 8``.
        rng: the only source of randomness.
        box: ``(4,)`` XYXY box added to every set, or ``None``.
    """
    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    n = len(points)
    if n == 0:
        raise ValueError("no points to sample prompt subsets from")
    subsets: list[tuple[int, ...]] = []
    for size in range(min(sizes[0], n), min(sizes[1], n) + 1):
        if n <= SUBSET_ENUMERATION_LIMIT:
            subsets += list(combinations(range(n), size))
        else:
            subsets += [
                tuple(int(i) for i in rng.choice(n, size=size, replace=False))
                for _ in range(per_size)
            ]
    width = max(len(subset) for subset in subsets)
    coords = np.zeros((len(subsets), width, 2), dtype=np.float32)
    labels = np.full((len(subsets), width), PAD_LABEL, dtype=np.int64)
    for b, subset in enumerate(subsets):
        coords[b, : len(subset)] = points[list(subset)]
        labels[b, : len(subset)] = POSITIVE_LABEL
    boxes = None if box is None else np.repeat(np.asarray(box, np.float32)[None], len(subsets), 0)
    return PromptBatch(
        points=coords,
        labels=labels,
        boxes=boxes,
        kinds=[f"subset{len(subset)}" for subset in subsets],
        centres=points,
    )


def kmeans_centroids(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``(k', 2)`` k-means++ centroids of ``(n, 2)`` points, ``k' = min(k, distinct points)``
    (Matcher's ``clustering``: the centroids themselves are the prompt points)."""
    centroids, _ = kmeans(points, min(k, len(points)), rng)
    return centroids.astype(np.float32)


def points_box(points: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """``(4,)`` XYXY box around ``(n, 2)`` XY points, clipped to the image (Matcher's box prompt:
    one box around all matched points, for every prompt set)."""
    height, width = image_size
    x0, y0 = np.maximum(points.min(0), 0)
    x1, y1 = points.max(0)
    return np.array([x0, y0, min(x1, width - 1), min(y1, height - 1)], dtype=np.float32)
