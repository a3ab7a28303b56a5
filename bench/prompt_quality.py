"""Real-feature check of the prompt points: Matcher's bidirectional matching vs PerSAM's prior.

On ``oneshot_seg_real`` (real photographs with ground-truth masks), with real ImageNet
EfficientNet-Lite0 features and no SAM: for each folder the first image (sorted by name) is the
reference, every other image a target. For each method, the positive prompt points it would give
SAM in a target are checked against the target's ground-truth mask:

* (a) *precision*: fraction of a target's positive points inside the mask, averaged over targets
  that received at least one point;
* (b) *hit rate*: fraction of targets whose mask receives at least one positive point (a target
  that receives no point, e.g. rejected by Matcher, counts as a miss).

Methods (all on the same encoder features, so only the point selection differs):

* ``Matcher matched points``: the bidirectionally matched target patch centres the pipeline
  prompts from (the better half above 40 matches);
* ``Matcher prompt centres``: the k-means cluster centres of those (``num_clusters`` of them, the
  points the part-level prompts use);
* ``PerSAM prior top-1``: the argmax of the location prior (cosine of every target patch with the
  masked-mean reference feature);
* ``PerSAM prior top-k``: the ``k`` highest cells of that prior (``k = num_clusters``).

A second table reports the absence test's margin (forward-match cosine minus the reference's
background baseline, :func:`matcher_core.matching.absence_baseline`) on these *present* pairs and
on *absent* pairs (each folder's reference against the first target of the next folder), and how
well the kept fraction of forward matches would separate them instead.

Usage::

    python bench/prompt_quality.py [--limit 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realdata import (  # noqa: E402
    DEFAULT_DATA,
    SUBSETS,
    encoded_folders,
    real_encoder,
    real_feature_config,
    shot_of,
)

from matcher_core.config import SegmenterConfig  # noqa: E402
from matcher_core.features import patch_centres  # noqa: E402
from matcher_core.matching import absence_baseline, match_shots, prune_matches  # noqa: E402
from matcher_core.prior import location_prior  # noqa: E402
from matcher_core.prompts import sample_prompts  # noqa: E402
from matcher_core.reference import Shot  # noqa: E402

METHODS = (
    "Matcher matched points",
    "Matcher prompt centres",
    "PerSAM prior top-1",
    "PerSAM prior top-k",
)


@dataclass
class Tally:
    """Per-method counts over targets."""

    targets: int = 0
    with_points: int = 0
    hits: int = 0
    precision_sum: float = 0.0
    points: int = 0

    def add(self, inside: np.ndarray) -> None:
        self.targets += 1
        self.points += len(inside)
        if len(inside):
            self.with_points += 1
            self.precision_sum += float(inside.mean())
            self.hits += int(inside.any())

    def merge(self, other: Tally) -> None:
        for name in ("targets", "with_points", "hits", "precision_sum", "points"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def row(self) -> dict:
        return {
            "precision": self.precision_sum / self.with_points
            if self.with_points
            else float("nan"),
            "hit_rate": self.hits / self.targets if self.targets else float("nan"),
            "points_per_target": self.points / self.targets if self.targets else float("nan"),
            "no_point": self.targets - self.with_points,
            "targets": self.targets,
        }


def inside_mask(mask: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: which ``(n, 2)`` XY original-pixel points fall on ``mask`` ((H, W) bool)."""
    if len(xy) == 0:
        return np.zeros(0, dtype=bool)
    height, width = mask.shape
    cols = np.clip(np.floor(xy[:, 0]).astype(int), 0, width - 1)
    rows = np.clip(np.floor(xy[:, 1]).astype(int), 0, height - 1)
    return mask[rows, cols]


def method_points(
    shot: Shot, target: torch.Tensor, size: tuple[int, int], config: SegmenterConfig
) -> tuple[dict[str, np.ndarray], tuple[float, float]]:
    """XY original-pixel positive points of every method in one target, and the absence test's
    margin (forward-match cosine minus the reference's background baseline; the object is taken
    to be present above 0) and the kept fraction (forward matches surviving the reverse check)."""
    centres = patch_centres(tuple(target.shape[:2]), size)
    coverage = config.object_cell_coverage
    full = match_shots([shot], target, object_coverage=coverage)
    match = prune_matches(full, config.prune_matches_above)  # what the pipeline prompts from
    matched_xy = centres[match.target_indices]
    if len(matched_xy):
        rng = np.random.default_rng(config.seed)
        prompt_centres = sample_prompts(matched_xy, config, rng).centres
    else:
        prompt_centres = np.zeros((0, 2), np.float32)
    reference_mean = torch.from_numpy(shot.masked_features(coverage).mean(0))
    prior = location_prior(reference_mean, target).reshape(-1)
    top_k = torch.topk(prior, min(config.num_clusters, len(prior))).indices.numpy()
    points = {
        METHODS[0]: matched_xy,
        METHODS[1]: prompt_centres,
        METHODS[2]: centres[top_k[:1]],
        METHODS[3]: centres[top_k],
    }
    margin = full.forward_similarity - absence_baseline([shot], coverage)
    return points, (margin, full.kept_fraction)


def auc(positive: list[float], negative: list[float]) -> float:
    """Probability that a random present pair has a higher quality than a random absent pair."""
    if not positive or not negative:
        return float("nan")
    pos, neg = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def best_threshold(positive: list[float], negative: list[float]) -> float:
    """The quality threshold that best separates present from absent pairs (balanced accuracy:
    mean of the fraction of present pairs kept and of absent pairs rejected)."""
    if not positive or not negative:
        return float("nan")
    candidates = np.unique(np.concatenate([positive, negative]))
    pos, neg = np.asarray(positive), np.asarray(negative)
    balanced = [((pos >= t).mean() + (neg < t).mean()) / 2 for t in candidates]
    return float(candidates[int(np.argmax(balanced))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=None, help="targets per folder (quick run)")
    parser.add_argument("--input-size", type=int, default=448)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--object-cell-coverage",
        type=float,
        default=None,
        help="which reference cells are object (default: the engine's; 0 = Matcher's any coverage)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = real_feature_config(args.input_size)
    if args.object_cell_coverage is not None:
        config = config.replace(object_cell_coverage=args.object_cell_coverage)
    encoder = real_encoder(config)
    start = time.perf_counter()
    # The reference and at most `limit` targets per folder.
    per_folder = None if args.limit is None else args.limit + 1
    folders = encoded_folders(args.data, encoder, images_per_folder=per_folder)
    encode_seconds = time.perf_counter() - start

    tallies = {subset: {m: Tally() for m in METHODS} for subset in SUBSETS.values()}
    # Per subset: (quality, kept fraction) of each present / absent pair.
    present_quality: dict[str, list[tuple[float, float]]] = {s: [] for s in SUBSETS.values()}
    absent_quality: dict[str, list[tuple[float, float]]] = {s: [] for s in SUBSETS.values()}
    start = time.perf_counter()
    for index, folder in enumerate(folders):
        shot = shot_of(folder.features[0], folder.masks[0])
        for target, mask in zip(folder.features[1:], folder.masks[1:], strict=True):
            points, quality = method_points(shot, target, mask.shape, config)
            present_quality[folder.subset].append(quality)
            for method, xy in points.items():
                tallies[folder.subset][method].add(inside_mask(mask, xy))
        other = folders[(index + 1) % len(folders)]
        if len(other.features) > 1:  # an image of another object: the reference is absent
            _, quality = method_points(shot, other.features[1], other.masks[1].shape, config)
            absent_quality[folder.subset].append(quality)
    match_seconds = time.perf_counter() - start

    overall = {m: Tally() for m in METHODS}
    for per_method in tallies.values():
        for method, tally in per_method.items():
            overall[method].merge(tally)
    groups = {**tallies, "overall": overall}

    print(
        f"EfficientNet-Lite0 @ {args.input_size} ({tuple(folders[0].features[0].shape)} features), "
        f"{len(folders)} folders, reference = first image; encoder {encode_seconds:.1f} s, "
        f"matching {match_seconds:.1f} s\n"
    )
    print(
        "| subset | method | targets | (a) points inside GT | (b) targets hit | points/target | targets without point |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    results: dict = {"points": {}, "quality": {}}
    for group, per_method in groups.items():
        results["points"][group] = {}
        for method, tally in per_method.items():
            row = tally.row()
            results["points"][group][method] = row
            print(
                f"| {group} | {method} | {row['targets']} | {row['precision']:.3f} | "
                f"{row['hit_rate']:.3f} | {row['points_per_target']:.1f} | {row['no_point']} |"
            )

    threshold = 0.0  # the absence test: forward cosine above the reference's background
    print("\nAbsence test margin (forward-match cosine minus the background baseline):\n")
    print(
        "| subset | present pairs | mean margin present | absent pairs | mean margin absent | AUC present vs absent | absent rejected | best threshold | AUC of kept fraction |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    present_all = [q for qs in present_quality.values() for q in qs]
    absent_all = [q for qs in absent_quality.values() for q in qs]
    rows = {**{s: (present_quality[s], absent_quality[s]) for s in SUBSETS.values()}}
    rows["overall"] = (present_all, absent_all)
    for group, (present_pairs, absent_pairs) in rows.items():
        present = [quality for quality, _ in present_pairs]
        absent = [quality for quality, _ in absent_pairs]
        figures = {
            "present": len(present),
            "mean_present": float(np.mean(present)) if present else float("nan"),
            "absent": len(absent),
            "mean_absent": float(np.mean(absent)) if absent else float("nan"),
            "auc": auc(present, absent),
            "absent_rejected": float(np.mean(np.asarray(absent) <= threshold))
            if absent
            else float("nan"),
            "best_threshold": best_threshold(present, absent),
            "auc_kept_fraction": auc(
                [kept for _, kept in present_pairs], [kept for _, kept in absent_pairs]
            ),
        }
        results["quality"][group] = figures
        print(
            f"| {group} | {figures['present']} | {figures['mean_present']:.3f} | "
            f"{figures['absent']} | {figures['mean_absent']:.3f} | {figures['auc']:.3f} | "
            f"{figures['absent_rejected']:.2f} | {figures['best_threshold']:.3f} | "
            f"{figures['auc_kept_fraction']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
