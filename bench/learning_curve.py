"""Learning curve of the matching stage: 1, 2, 4, 8 examples per label, with and without negatives.

On ``oneshot_seg_real`` (27 folders of real photographs with ground-truth masks, one object or
category per folder), with real ImageNet EfficientNet-Lite0 features and no SAM, the project is
simulated as one Label Studio project with one label per folder:

* each folder's images are split in name order: the last 30% (at least one) are *targets*, never
  used for learning, so every ``k`` is measured on the same targets; the others are *training*
  images, annotated in name order;
* after ``k`` examples per label, label ``F``'s shots are its first ``k`` training images (fewer
  when the folder has fewer), matched to a target exactly as
  :func:`matcher_core.matching.match_shots` does with the configured pooling;
* *negative evidence*: the annotator has also corrected the first ``k`` training images of every
  *other* folder; wherever ``F``'s one-shot reference (the reference ``learn()`` predicts with)
  was not rejected, the matched cells were a wrong prediction of ``F`` that the annotator deleted,
  and their features join ``F``'s negatives (:func:`matcher_core.learning.select_negatives`,
  ``--max-negatives`` rows). With negatives, matched target cells closer to a negative than to
  the reference are dropped and a target that looks like the deleted kind is rejected
  (:func:`matcher_core.matching.filter_negative_matches`), as in the Matcher pipeline.

Metrics, per ``k`` and arm:

* *precision*: fraction of a target's matched points (the points prompts are sampled from) inside
  its ground-truth mask, averaged over the targets that are not rejected;
* *hit rate*: fraction of targets with at least one matched point inside the mask (a rejected
  target is a miss);
* *false positives*: fraction of other folders' targets (the first target of every other folder)
  where the match is not rejected, i.e. a prompt would be issued: at least
  ``min_matched_points`` matches, forward matches closer to the object than the reference's own
  background (:func:`matcher_core.matching.absence_baseline`) and, with negatives, not taken for
  the deleted kind.

Arms: ``union`` (the shots' matches pooled by union, no negatives), ``consensus`` (the engine's
pooling, no negatives) and ``consensus + negatives``.

Usage::

    python bench/learning_curve.py [--limit 2] [--json out.json] [--plot bench/learning_curve.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realdata import (  # noqa: E402
    DEFAULT_DATA,
    SUBSETS,
    EncodedFolder,
    encoded_folders,
    real_encoder,
    real_feature_config,
    shot_of,
)

from matcher_core.config import SegmenterConfig  # noqa: E402
from matcher_core.features import patch_centres  # noqa: E402
from matcher_core.learning import select_negatives  # noqa: E402
from matcher_core.matching import (  # noqa: E402
    MatchResult,
    absence_baseline,
    bidirectional_match,
    filter_negative_matches,
    pool_matches,
)
from matcher_core.reference import Shot  # noqa: E402

SHOT_COUNTS = (1, 2, 4, 8)
TARGET_FRACTION = 0.3
ARMS = ("union", "consensus", "consensus + negatives")


@dataclass
class Image:
    features: np.ndarray
    """``(gh, gw, D)`` float16 L2-normalised patch features."""
    mask: np.ndarray
    """``(H, W)`` bool ground truth."""


@dataclass
class Folder:
    name: str
    training: list[Image] = field(default_factory=list)
    targets: list[Image] = field(default_factory=list)


def split_folders(encoded: list[EncodedFolder]) -> list[Folder]:
    """Each folder's images split into training (the first ~70%) and held-out targets."""
    folders = []
    for entry in encoded:
        images = [
            Image(features.numpy().astype(np.float16), mask)
            for features, mask in zip(entry.features, entry.masks, strict=True)
        ]
        held_out = max(1, round(TARGET_FRACTION * len(images)))
        split = len(images) - held_out
        subset = next(d for d, short in SUBSETS.items() if short == entry.subset)
        folders.append(Folder(f"{subset}/{entry.name}", images[:split], images[split:]))
    return folders


def flat(features: np.ndarray) -> np.ndarray:
    return features.reshape(-1, features.shape[-1]).astype(np.float32)


def points_inside(image: Image, cells: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: which matched cells' centres (original XY pixels) fall on the mask."""
    xy = patch_centres(tuple(image.features.shape[:2]), image.mask.shape)[cells]
    height, width = image.mask.shape
    cols = np.clip(np.floor(xy[:, 0]).astype(int), 0, width - 1)
    rows = np.clip(np.floor(xy[:, 1]).astype(int), 0, height - 1)
    return image.mask[rows, cols]


class ShotMatches:
    """Each shot matched once against each image it meets (pools of any prefix of shots reuse
    them: pooling works on per-shot results, as :func:`match_shots` does)."""

    def __init__(self, shots: list[Shot]):
        self.shots = shots
        self.cache: dict[tuple[int, int], MatchResult] = {}

    def per_shot(self, image: Image, count: int) -> list[MatchResult]:
        out = []
        for index, shot in enumerate(self.shots[:count]):
            key = (index, id(image))
            if key not in self.cache:
                self.cache[key] = bidirectional_match(
                    flat(shot.patch_features), shot.object_cells(), flat(image.features), index
                )
            out.append(self.cache[key])
        return out


def accepted(match: MatchResult, shots: list[Shot], config: SegmenterConfig) -> bool:
    """Whether the pipeline would go on to prompt SAM (its absence test)."""
    return len(match) >= max(1, config.min_matched_points) and (
        match.forward_similarity > absence_baseline(shots)
    )


def decide(
    matcher: ShotMatches,
    count: int,
    pooling: str,
    object_features: np.ndarray,
    negatives: np.ndarray | None,
    target: Image,
    config: SegmenterConfig,
) -> MatchResult | None:
    """The matches the pipeline would sample prompts from, or ``None`` if it rejects the target."""
    pooled = pool_matches(matcher.per_shot(target, count), pooling)
    check = filter_negative_matches(pooled, target.features, object_features, negatives)
    if check.looks_deleted(config.negative_rejection_fraction, config.negative_rejection_margin):
        return None
    return check.kept if accepted(check.kept, matcher.shots[:count], config) else None


@dataclass
class Tally:
    targets: int = 0
    hits: int = 0
    precision: list[float] = field(default_factory=list)
    points: int = 0
    others: int = 0
    false_positives: int = 0
    negatives: list[int] = field(default_factory=list)
    shots: list[int] = field(default_factory=list)

    def row(self) -> dict:
        return {
            "precision": float(np.mean(self.precision)) if self.precision else float("nan"),
            "hit_rate": self.hits / max(1, self.targets),
            "false_positive_rate": self.false_positives / max(1, self.others),
            "points_per_target": self.points / max(1, self.targets),
            "mean_shots": float(np.mean(self.shots)),
            "mean_negatives": float(np.mean(self.negatives)),
            "targets": self.targets,
            "other_targets": self.others,
        }


def evaluate(
    folders: list[Folder], config: SegmenterConfig, max_negatives: int
) -> dict[tuple[int, str], Tally]:
    tallies = {(k, arm): Tally() for k in SHOT_COUNTS for arm in ARMS}
    others_targets = [folder.targets[0] for folder in folders]
    for index, folder in enumerate(folders):
        shots = [
            shot_of(image.features, image.mask) for image in folder.training[: max(SHOT_COUNTS)]
        ]
        matcher = ShotMatches(shots)
        others = [f for j, f in enumerate(folders) if j != index]
        other_targets = [t for j, t in enumerate(others_targets) if j != index]
        for k in SHOT_COUNTS:
            count = min(k, len(shots))
            object_features = np.concatenate([s.masked_features() for s in shots[:count]])
            # Deleted predictions of this label on the other labels' first k training images,
            # predicted by the one-shot reference (what learn() runs on corrections).
            regions = []
            for other in others:
                for image in other.training[:k]:
                    base = matcher.per_shot(image, 1)[0]
                    if accepted(base, shots[:1], config):
                        regions.append((len(regions), flat(image.features)[base.target_indices]))
            negatives = select_negatives(regions, object_features, max_negatives)
            for arm in ARMS:
                tally = tallies[k, arm]
                pooling = "union" if arm == "union" else "consensus"
                use_negatives = negatives if arm.endswith("negatives") else None
                tally.shots.append(count)
                tally.negatives.append(0 if use_negatives is None else len(use_negatives))

                for target in folder.targets:
                    tally.targets += 1
                    match = decide(
                        matcher, count, pooling, object_features, use_negatives, target, config
                    )
                    if match is None:
                        continue
                    inside = points_inside(target, match.target_indices)
                    tally.points += len(inside)
                    tally.precision.append(float(inside.mean()))
                    tally.hits += int(inside.any())
                for target in other_targets:
                    tally.others += 1
                    found = decide(
                        matcher, count, pooling, object_features, use_negatives, target, config
                    )
                    tally.false_positives += int(found is not None)
    return tallies


def plot(rows: dict[tuple[int, str], dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (
        ("precision", "point precision (inside GT)"),
        ("hit_rate", "object hit rate"),
        ("false_positive_rate", "false positives (other folders)"),
    )
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for axis, (key, label) in zip(axes, metrics, strict=True):
        for arm, style in zip(ARMS, (":o", "-s", "-^"), strict=True):
            axis.plot(SHOT_COUNTS, [rows[k, arm][key] for k in SHOT_COUNTS], style, label=arm)
        axis.set_xscale("log", base=2)
        axis.set_xticks(SHOT_COUNTS, [str(k) for k in SHOT_COUNTS])
        axis.set_xlabel("examples per label")
        axis.set_title(label, fontsize=10)
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=None, help="folders per subset (quick run)")
    parser.add_argument("--input-size", type=int, default=448)
    parser.add_argument("--max-negatives", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the curves")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = real_feature_config(args.input_size)
    encoder = real_encoder(config)
    start = time.perf_counter()
    folders = split_folders(encoded_folders(args.data, encoder, folders_per_subset=args.limit))
    encode_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tallies = evaluate(folders, config, args.max_negatives)
    match_seconds = time.perf_counter() - start

    rows = {key: tally.row() for key, tally in tallies.items()}
    targets = rows[SHOT_COUNTS[0], ARMS[0]]
    header = (
        f"EfficientNet-Lite0 @ {args.input_size}, {len(folders)} folders, "
        f"{targets['targets']} targets, {targets['other_targets']} other-folder targets; "
        f"absence test against the reference background, max negatives {args.max_negatives}; "
        f"encoder {encode_seconds:.0f} s, matching {match_seconds:.0f} s"
    )
    print(header + "\n")
    print(
        "| examples | arm | shots (mean) | negatives (mean) | point precision | "
        "object hit rate | false positives | points/target |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in SHOT_COUNTS:
        for arm in ARMS:
            row = rows[k, arm]
            print(
                f"| {k} | {arm} | {row['mean_shots']:.1f} | {row['mean_negatives']:.0f} | "
                f"{row['precision']:.3f} | {row['hit_rate']:.3f} | "
                f"{row['false_positive_rate']:.3f} | {row['points_per_target']:.1f} |"
            )
    if args.json:
        args.json.write_text(
            json.dumps({f"{k}/{arm}": row for (k, arm), row in rows.items()}, indent=2)
        )
    if args.plot:
        plot(rows, args.plot, f"Matching stage after k examples ({len(folders)} folders)")


if __name__ == "__main__":
    main()
