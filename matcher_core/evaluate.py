"""One-shot / k-shot evaluation on a folder dataset or a Label Studio export.

Protocol (that of FSS-1000 and COCO-20i papers): per category, the first ``k`` samples (sorted
by name) are the references and every other sample is a target; a prediction is the union of
the returned instances; category IoU = sum of intersections / sum of unions over its targets;
mean IoU averages categories. We also report boundary IoU, the false-positive rate (targets of
*other* categories for which anything is returned) and seconds per target.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .datasets import Sample
from .metrics import IoUAccumulator, boundary_iou
from .reference import Example, Reference
from .segmenter import OneShotSegmenter


@dataclass
class TargetResult:
    category: str
    image: str
    iou: float
    boundary_iou: float
    instances: int
    seconds: float


@dataclass
class EvaluationReport:
    shots: int
    mode: str
    random_weights: bool
    categories: dict[str, dict[str, float]] = field(default_factory=dict)
    mean_iou: float = float("nan")
    mean_boundary_iou: float = float("nan")
    false_positive_rate: float = float("nan")
    seconds_per_target: float = float("nan")
    targets: list[TargetResult] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def table(self) -> str:
        """Markdown table, one row per category plus the mean."""
        rows = [
            "| category | targets | IoU | boundary IoU | FP rate | s/target |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, c in self.categories.items():
            rows.append(
                f"| {name} | {int(c['targets'])} | {c['iou']:.3f} | {c['boundary_iou']:.3f} "
                f"| {c['false_positive_rate']:.2f} | {c['seconds_per_target']:.2f} |"
            )
        rows.append(
            f"| **mean** | {len(self.targets)} | {self.mean_iou:.3f} | "
            f"{self.mean_boundary_iou:.3f} | {self.false_positive_rate:.2f} | "
            f"{self.seconds_per_target:.2f} |"
        )
        return "\n".join(rows)


def _union(instances, shape: tuple[int, int]) -> np.ndarray:
    prediction = np.zeros(shape, dtype=bool)
    for instance in instances:
        prediction |= instance.mask
    return prediction


def evaluate(
    segmenter: OneShotSegmenter,
    categories: dict[str, list[Sample]],
    shots: int = 1,
    negatives_per_category: int = 2,
    max_targets: int | None = None,
    progress: bool = True,
) -> tuple[EvaluationReport, dict[str, list[tuple[float, np.ndarray, np.ndarray, np.ndarray]]]]:
    """Run the protocol; returns the report and, per category, ``(iou, image, truth, prediction)``
    of its targets (for overlays)."""
    config = segmenter.config
    report = EvaluationReport(shots=shots, mode=config.mode, random_weights=config.random_weights)
    accumulator = IoUAccumulator()
    cases: dict[str, list] = {}
    names = sorted(categories)
    false_positives = negatives_seen = 0
    usable = {n: s for n, s in categories.items() if len(s) > shots}
    total = sum(len(s[shots:][:max_targets]) + negatives_per_category for s in usable.values())
    bar = tqdm(total=total, desc="evaluate", unit="img", disable=not progress)
    for index, name in enumerate(names):
        samples = categories[name]
        if len(samples) <= shots:
            continue
        examples = []
        for sample in samples[:shots]:
            image, mask = sample.load()
            examples.append(Example(image, {name: [mask]}))
        reference = segmenter.build_reference(examples)
        targets = samples[shots:][:max_targets]
        results = [
            _evaluate_target(segmenter, reference, name, sample, accumulator, cases, bar)
            for sample in targets
        ]
        report.targets.extend(results)
        # Negatives: the first target of the next categories in name order (deterministic).
        others = [n for n in names[index + 1 :] + names[:index] if len(categories[n]) > 0]
        negatives = min(negatives_per_category, len(others))
        fp = _false_positives(
            segmenter, reference, categories, others[:negatives_per_category], bar
        )
        false_positives += fp
        negatives_seen += negatives
        report.categories[name] = {
            "targets": len(targets),
            "iou": accumulator.category_iou()[name],
            "mean_image_iou": float(np.mean(accumulator.per_image[name])),
            "boundary_iou": float(np.mean([r.boundary_iou for r in results])),
            "false_positive_rate": fp / max(1, negatives),
            "seconds_per_target": float(np.mean([r.seconds for r in results])),
        }
    bar.close()
    if report.categories:
        report.mean_iou = accumulator.mean_iou()
        report.mean_boundary_iou = float(
            np.mean([c["boundary_iou"] for c in report.categories.values()])
        )
        report.false_positive_rate = false_positives / max(1, negatives_seen)
        report.seconds_per_target = float(np.mean([t.seconds for t in report.targets]))
    return report, cases


def _evaluate_target(
    segmenter: OneShotSegmenter,
    reference: Reference,
    name: str,
    sample: Sample,
    accumulator: IoUAccumulator,
    cases: dict[str, list],
    bar: tqdm,
) -> TargetResult:
    """Segment one target of category ``name``; its IoU goes into ``accumulator`` and its
    ``(iou, image, truth, prediction)`` into ``cases``."""
    image, truth = sample.load()
    start = time.perf_counter()
    instances = segmenter.segment(reference, image)
    elapsed = time.perf_counter() - start
    prediction = _union(instances, truth.shape)
    value = accumulator.add(name, prediction, truth)
    result = TargetResult(
        name,
        str(sample.image_path),
        value,
        boundary_iou(prediction, truth),
        len(instances),
        elapsed,
    )
    cases.setdefault(name, []).append((value, image, truth, prediction))
    bar.update(1)
    return result


def _false_positives(
    segmenter: OneShotSegmenter,
    reference: Reference,
    categories: dict[str, list[Sample]],
    others: list[str],
    bar: tqdm,
) -> int:
    """How many of the ``others`` categories' last samples get any instance from ``reference``."""
    found = 0
    for other in others:
        image, _ = categories[other][-1].load()
        found += bool(segmenter.segment(reference, image))
        bar.update(1)
    return found


def overlay(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> Image.Image:
    """Prediction tinted red, ground truth outlined green, on the image."""
    canvas = image.astype(np.float32).copy()
    canvas[prediction] = 0.5 * canvas[prediction] + 0.5 * np.array([255, 0, 0])
    from .metrics import boundary_region

    edge = boundary_region(truth, max(1, round(0.005 * np.hypot(*truth.shape))))
    canvas[edge] = (0, 255, 0)
    return Image.fromarray(canvas.astype(np.uint8))


def write_report(
    report: EvaluationReport, cases: dict, out_dir: str | Path, worst_best: int = 4
) -> Path:
    """``report.json``, ``report.html`` and overlay PNGs of the best and worst targets."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(report.to_json())
    flat = sorted(
        ((v, c, i, t, p) for c, items in cases.items() for (v, i, t, p) in items),
        key=lambda item: item[0],
    )
    chosen = {"worst": flat[:worst_best], "best": flat[::-1][:worst_best]}
    figures = []
    for kind, items in chosen.items():
        for rank, (value, category, image, truth, prediction) in enumerate(items):
            name = f"{kind}-{rank}.png"
            overlay(image, truth, prediction).save(out / name)
            figures.append((kind, category, value, name))
    warning = (
        "<p><b>Random weights: these numbers say nothing about quality.</b></p>"
        if report.random_weights
        else ""
    )
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{int(c['targets'])}</td><td>{c['iou']:.3f}</td>"
        f"<td>{c['boundary_iou']:.3f}</td><td>{c['false_positive_rate']:.2f}</td>"
        f"<td>{c['seconds_per_target']:.2f}</td></tr>"
        for n, c in report.categories.items()
    )
    cells = "".join(
        f"<figure><img src='{name}' width='320'><figcaption>{kind}: {html.escape(cat)} "
        f"IoU {value:.3f}</figcaption></figure>"
        for kind, cat, value, name in figures
    )
    page = (
        "<!doctype html><meta charset='utf-8'><title>One-shot evaluation</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px}figure{display:inline-block}</style>"
        f"<h1>{report.shots}-shot evaluation ({report.mode})</h1>{warning}"
        f"<p>mean IoU <b>{report.mean_iou:.3f}</b>, boundary IoU {report.mean_boundary_iou:.3f}, "
        f"false-positive rate {report.false_positive_rate:.2f}, "
        f"{report.seconds_per_target:.2f} s per target</p>"
        "<table><tr><th>category</th><th>targets</th><th>IoU</th><th>boundary IoU</th>"
        f"<th>FP rate</th><th>s/target</th></tr>{rows}</table>"
        f"<h2>Worst and best targets</h2><p>red: prediction, green: ground truth</p>{cells}"
    )
    (out / "report.html").write_text(page)
    return out / "report.html"
