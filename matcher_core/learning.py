"""Learning from annotators' corrections: the engine side of ``fit()``.

Every submitted annotation of a task is a :class:`Correction`: the image and the annotator's final
instance masks per label. :func:`learn` turns the reference and *all* corrections into a new
:class:`~matcher_core.reference.Reference`:

* **few-shot references**: corrected examples join the label's shots, the worst-predicted first;
* **negative evidence**: predictions the annotator deleted become the label's ``negatives``;
* **PerSAM-F mask weights**: retrained on every corrected example;
* **calibrated thresholds**: the label's instance score threshold, tuned on what annotators kept
  and deleted.

It always starts from the reference's *base* (the annotated reference shots, nothing learned), so
the result depends only on the base and the *set* of corrections: learning incrementally (``[a]``,
then ``[a, b]``) and rebuilding from every annotation of the project (Label Studio's "Start
Training") give the same state, and :func:`model_version` the same version.

A submitted annotation is taken as the complete truth of its task: a label without masks in it
has no instance in the image, so every prediction of that label there was deleted.

>>> learned, report = learn(segmenter, reference, [Correction(image, {"cat": [mask]}, task_id=7)])
>>> version = model_version(learned)  # "oneshot-3f9a0c1b2d4e"
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .features import ImageFeatures, pool_mask_to_grid
from .metrics import iou
from .reference import Example, Instance, LabelReference, Reference, Shot
from .scoring import inside_cells

if TYPE_CHECKING:  # pragma: no cover
    from .segmenter import OneShotSegmenter

log = logging.getLogger(__name__)

KEPT_IOU = 0.5
"""A prediction overlapping an annotated mask of its label at least this much (IoU) was kept."""
DELETED_IOU = 0.1
"""A prediction overlapping every annotated mask of its label less than this (IoU) was deleted:
it shows something else, and its features become negative evidence. Predictions in between were
kept but reshaped by the annotator: not negatives, but not "kept" for the threshold either."""
MIN_CALIBRATION_EXAMPLES = 3
"""The score threshold is tuned only with at least this many kept and this many not-kept
predictions of the label; below that it stays ``None`` (the configuration's threshold)."""


@dataclass
class Correction:
    """One submitted annotation of a task."""

    image: np.ndarray
    """``(H, W, 3)`` uint8 RGB."""
    masks: dict[str, list[np.ndarray]]
    """The annotator's final instance masks per label, each ``(H, W)`` bool. A label missing here
    (or with no non-empty mask) has no instance in the image."""
    task_id: int | str | None = None
    """Label Studio task id. Corrections of the same task: the last one in the list wins."""


@dataclass
class LearningReport:
    """What one :func:`learn` call did (logged, and exposed by the server's ``/metrics``)."""

    examples: int
    """Corrections used (after merging those of the same task)."""
    labels: dict[str, dict] = field(default_factory=dict)
    """Per label: ``shots`` (kept), ``base_shots``, ``negatives`` (feature rows),
    ``unmatched_predictions`` (regions the model predicts on the corrected images that no annotated
    mask overlaps, each taken as a deletion: counted by re-predicting, so not the number of regions
    the annotator removed), ``threshold`` (tuned or ``None``), ``calibration`` (kept / not-kept
    counts), and with PerSAM-F ``loss_before``, ``loss_after``, ``weights_seconds``."""
    seconds: float = 0.0
    version: str = ""
    """:func:`model_version` of the learned reference (its content hash; the version the service
    serves, ``backend.training.model_version_of``, hashes the mode and this report too)."""


# --- state and versions ---------------------------------------------------------------------


def base_reference(reference: Reference) -> Reference:
    """A copy of ``reference`` with only its annotated reference shots: no learned shots,
    negatives, mask weights or thresholds (arrays are shared, not copied)."""
    labels = {}
    for name, label_ref in reference.labels.items():
        count = len(label_ref.shots) if label_ref.base_shots is None else label_ref.base_shots
        if count > 0:
            labels[name] = LabelReference(label=name, shots=list(label_ref.shots[:count]))
    return Reference(labels=labels, model_id=reference.model_id)


def model_version(reference: Reference, context: dict | None = None) -> str:
    """``oneshot-<12 hex>``: a content hash of everything that changes predictions (the models'
    identity, every label's shots, negatives, mask weights, score threshold, and any JSON-able
    ``context`` the caller adds, such as the engine mode). The same state always gives the same
    version, and any learned change gives a new one. References built with random test weights
    get ``oneshot-random-<12 hex>``, so their predictions say so wherever the version shows."""
    digest = hashlib.blake2b(digest_size=16)

    def add(tag: str, value: object) -> None:
        if isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value)
            digest.update(f"{tag}:{array.dtype.str}:{array.shape}:".encode())
            digest.update(array.tobytes())
        else:
            digest.update(f"{tag}:{value!r};".encode())

    add("model", reference.model_id)
    for name in sorted(reference.labels):
        label_ref = reference.labels[name]
        add("label", name)
        add("base_shots", label_ref.base_shots)
        add("threshold", label_ref.score_threshold)
        for shot in label_ref.shots:
            add("features", np.asarray(shot.patch_features, np.float16))
            add("mask", np.asarray(shot.patch_mask, np.float32))
            add("embedding", np.asarray(shot.sam_target_embedding, np.float32))
            add("instances", shot.instance_count)
        add("negatives", None if label_ref.negatives is None else label_ref.negatives)
        add("weights", None if label_ref.mask_weights is None else label_ref.mask_weights)
    if context is not None:
        add("context", json.dumps(context, sort_keys=True, default=str))
    prefix = "oneshot-random-" if "random=True" in reference.model_id else "oneshot-"
    return f"{prefix}{digest.hexdigest()[:12]}"


# --- small pieces ---------------------------------------------------------------------------


def best_iou(mask: np.ndarray, truths: list[np.ndarray]) -> float:
    """Largest IoU of ``mask`` with any of ``truths`` (0 when there are none)."""
    return max((iou(mask, truth) for truth in truths), default=0.0)


def calibrate_threshold(
    scores: np.ndarray, kept: np.ndarray, min_examples: int = MIN_CALIBRATION_EXAMPLES
) -> float | None:
    """The instance score threshold that best separates kept from not-kept predictions.

    Predictions scoring at least the threshold are shown. Among candidate thresholds (0, and the
    midpoints between consecutive distinct scores) the one with the highest F1 of the kept class
    wins, the lowest on ties. Why F1: a kept prediction saves the annotator drawing it, a shown
    wrong one costs a deletion, and F1 weighs those two errors equally while ignoring correctly
    hidden predictions, which cost nothing. The midpoint places the threshold halfway between the
    scores it separates.

    Args:
        scores: ``(N,)`` instance scores in [0, 1].
        kept: ``(N,)`` bool, whether each prediction was kept.
        min_examples: fewer kept or fewer not-kept predictions than this give ``None``.

    Returns:
        The threshold rounded to 4 decimals, or ``None`` when there are too few examples.
    """
    scores = np.asarray(scores, dtype=np.float64)
    kept = np.asarray(kept, dtype=bool)
    if kept.sum() < min_examples or (~kept).sum() < min_examples:
        return None
    values = np.unique(scores)
    candidates = np.concatenate([[0.0], (values[:-1] + values[1:]) / 2.0])
    shown = scores[None, :] >= candidates[:, None]  # (C, N)
    true_positives = (shown & kept).sum(1)
    false_positives = (shown & ~kept).sum(1)
    false_negatives = (~shown & kept).sum(1)
    f1 = 2 * true_positives / np.maximum(1, 2 * true_positives + false_positives + false_negatives)
    return round(float(candidates[int(np.argmax(f1))]), 4)  # argmax: the first (lowest) of ties


def select_negatives(
    regions: list[tuple[int, np.ndarray]],
    object_features: np.ndarray,
    max_negatives: int,
    exclude: int | None = None,
) -> np.ndarray | None:
    """At most ``max_negatives`` feature rows from deleted regions, hardest first, spread evenly.

    Each region's cells are ordered by how much they resemble the reference object (highest
    cosine to any object cell first: the negatives that can change a decision); the regions then
    give one cell each in turn, so one large deleted region cannot crowd out the others.

    Args:
        regions: ``(correction index, (n, D) features)`` per deleted prediction, in learning order.
        object_features: ``(N, D)`` reference object features (masked cells of the shots).
        max_negatives: bound on the rows returned.
        exclude: regions of this correction are left out (leave-one-out calibration).

    Returns:
        ``(M, D)`` float16 rows, or ``None`` when there is none.
    """
    if max_negatives <= 0:
        return None
    objects = _unit(object_features)
    ordered = []
    for source, cells in regions:
        if source == exclude or len(cells) == 0:
            continue
        hardness = (_unit(cells) @ objects.T).max(1)
        ordered.append(cells[np.argsort(-hardness, kind="stable")])
    if not ordered:
        return None
    rows: list[np.ndarray] = []
    depth = 0
    while len(rows) < max_negatives and any(depth < len(cells) for cells in ordered):
        rows.extend(cells[depth] for cells in ordered if depth < len(cells))
        depth += 1
    return np.stack(rows[:max_negatives]).astype(np.float16)


def _unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


def _object_features(shots: list[Shot]) -> np.ndarray:
    return np.concatenate([shot.masked_features() for shot in shots])


def _segment_label(
    segmenter: OneShotSegmenter, features: ImageFeatures, label_ref: LabelReference
) -> list[Instance]:
    """Every instance the configured pipeline (Matcher or PerSAM) finds, before any threshold."""
    return segmenter.segment_label(features, label_ref)


def _task_key(task_id: int | str | None) -> tuple:
    if task_id is None:
        return (2, 0, "")
    if isinstance(task_id, int | np.integer):
        return (0, int(task_id), "")
    return (1, 0, str(task_id))


@dataclass
class _Seen:
    """A correction ready for learning."""

    correction: Correction
    features: ImageFeatures
    masks: dict[str, list[np.ndarray]]
    """Non-empty ``(H, W)`` bool masks per label."""

    def truth(self, label: str) -> list[np.ndarray]:
        return self.masks.get(label, [])


def _prepare(segmenter: OneShotSegmenter, corrections: list[Correction]) -> list[_Seen]:
    """Merge corrections of the same task (the last wins), compute features (cached) and put
    them in a canonical order (task id, then content), so the list's order never matters."""
    last = {c.task_id: index for index, c in enumerate(corrections) if c.task_id is not None}
    keyed = []
    for index, correction in enumerate(corrections):
        if correction.task_id is not None and last[correction.task_id] != index:
            continue
        features = segmenter.features(correction.image)
        masks: dict[str, list[np.ndarray]] = {}
        content = hashlib.blake2b(digest_size=16)
        content.update(np.ascontiguousarray(correction.image).tobytes())
        for label in sorted(correction.masks):
            for mask in correction.masks[label]:
                mask = np.asarray(mask).astype(bool)
                if mask.shape != features.original_size:
                    raise ValueError(
                        f"mask of shape {mask.shape} for label {label!r} does not fit image "
                        f"{features.original_size} (task {correction.task_id})"
                    )
                if mask.any():
                    masks.setdefault(label, []).append(mask)
                    content.update(label.encode())
                    content.update(np.packbits(mask).tobytes())
        key = (*_task_key(correction.task_id), content.hexdigest())
        keyed.append((key, _Seen(correction, features, masks)))
    keyed.sort(key=lambda item: item[0])
    return [seen for _, seen in keyed]


def _deleted_cells(
    instance: Instance, seen: _Seen, label: str, grid: tuple[int, int]
) -> np.ndarray:
    """``(n, D)`` float32 features of the patch cells under a deleted prediction, without any
    cell an annotated mask of ``label`` touches (negatives must never hold the object)."""
    inside = inside_cells(pool_mask_to_grid(instance.mask, grid).numpy()[None])[0]
    truths = seen.truth(label)
    if truths:
        annotated = pool_mask_to_grid(np.any(truths, axis=0), grid).numpy().reshape(-1)
        inside &= annotated <= 0
    flat = seen.features.patch_features.float().cpu().numpy().reshape(len(inside), -1)
    return flat[inside]


# --- learning ---------------------------------------------------------------------------------


def learn(
    segmenter: OneShotSegmenter,
    reference: Reference,
    corrections: list[Correction],
    *,
    max_shots: int = 8,
    max_negatives: int = 1024,
    train_weights: bool = True,
) -> tuple[Reference, LearningReport]:
    """Learn a new reference from ``reference``'s base and every correction (from scratch).

    The steps, per label, each a function below: what the base reference predicts on every
    correction (:func:`_base_predictions`); the label's shots and negatives
    (:func:`_learn_label`); PerSAM-F mask weights (:func:`_train_mask_weights`); the score
    threshold on leave-one-out predictions (:func:`_calibrate_thresholds`).

    Args:
        segmenter: the segmenter whose models built ``reference``.
        reference: the project's reference; anything it learned before is discarded.
        corrections: every submitted annotation to learn from (order does not matter).
        max_shots: most shots per label, base shots included (base shots are always kept).
        max_negatives: most negative feature rows per label.
        train_weights: run PerSAM-F.

    Returns:
        The learned reference (a new object; ``reference`` is not modified) and a report.
    """
    start = time.perf_counter()
    segmenter.check_model(reference)
    if max_shots < 1:
        raise ValueError("max_shots must be at least 1")
    base = base_reference(reference)
    seen = _prepare(segmenter, corrections)
    predictions = _base_predictions(segmenter, base, seen)
    labels = list(base.labels) + sorted(
        {label for item in seen for label in item.masks} - set(base.labels)
    )
    learned = Reference(model_id=base.model_id or segmenter.model_id)
    report = LearningReport(examples=len(seen))
    by_label = _LabelLearning(segmenter, base, seen, predictions, max_shots, max_negatives)
    for label in labels:
        learned.labels[label], report.labels[label] = by_label.learn_label(label)
    if train_weights and seen:
        _train_mask_weights(segmenter, learned, seen, report)
    _calibrate_thresholds(segmenter, learned, seen, by_label, max_negatives, report)
    report.seconds = time.perf_counter() - start
    report.version = model_version(learned)
    # No version in this line: the service logs the version it serves (which also hashes the mode
    # and this report, see backend.training.model_version_of).
    log.info(
        "learned from %d corrections in %.1f s: %s",
        report.examples,
        report.seconds,
        report.labels,
    )
    return learned, report


def _base_predictions(
    segmenter: OneShotSegmenter, base: Reference, seen: list[_Seen]
) -> dict[tuple[str, int], list[Instance]]:
    """What the base reference (:func:`base_reference`) predicts on every correction's image,
    by ``(label, correction index)`` (features come from the segmenter's cache: no encoder pass
    for an image seen before)."""
    return {
        (label, index): _segment_label(segmenter, item.features, label_ref)
        for label, label_ref in base.labels.items()
        for index, item in enumerate(seen)
    }


class _LabelLearning:
    """The shots and negatives of each label, and what each came from (kept for the threshold's
    leave-one-out predictions)."""

    def __init__(
        self,
        segmenter: OneShotSegmenter,
        base: Reference,
        seen: list[_Seen],
        predictions: dict[tuple[str, int], list[Instance]],
        max_shots: int,
        max_negatives: int,
    ):
        self.segmenter, self.base, self.seen = segmenter, base, seen
        self.predictions, self.max_shots, self.max_negatives = predictions, max_shots, max_negatives
        # The base has no tuned threshold: annotators were shown the configuration's.
        self.threshold_shown = segmenter.config.score_threshold
        self.seen_features = [
            item.features.patch_features.cpu().numpy().astype(np.float16) for item in seen
        ]
        self.shot_sources: dict[str, list[int | None]] = {}
        self.regions: dict[str, list[tuple[int, np.ndarray]]] = {}

    def learn_label(self, label: str) -> tuple[LabelReference, dict]:
        """``label``'s learned reference (threshold not yet calibrated) and its report figures.

        *Shots*: the base shots stay first; corrections showing the label follow, worst
        predicted first (``1 - IoU`` of the union of shown predictions with the union of
        annotated masks), up to ``max_shots`` in all. A correction of the same image as a base
        shot (the reference task itself) adds no shot. A label only corrections show gets shots
        from them alone.

        *Negatives*: every predicted instance, whatever its score, overlapping each annotated
        mask of the label by less than :data:`DELETED_IOU` was deleted; the features of its
        patch cells (those no annotated mask touches) join the label's negatives, at most
        ``max_negatives`` rows (:func:`select_negatives`). They act at matching (points closer
        to a negative than to the reference are dropped, and a target where most are is
        rejected) and at scoring (:func:`matcher_core.scoring.score_proposals`).
        """
        seen = self.seen
        base_shots = self.base.labels[label].shots if label in self.base.labels else []
        chosen, sources = _choose_corrections(
            label,
            base_shots,
            seen,
            self.seen_features,
            self.predictions,
            self.threshold_shown,
            self.max_shots,
        )
        shots = list(base_shots) + [
            self.segmenter.make_shot(seen[index].features, seen[index].truth(label))
            for index in chosen
        ]
        self.shot_sources[label] = sources
        regions = self.regions[label] = _deleted_regions(label, seen, self.predictions)
        negatives = select_negatives(regions, _object_features(shots), self.max_negatives)
        label_ref = LabelReference(
            label=label, shots=shots, negatives=negatives, base_shots=len(base_shots)
        )
        figures = {
            "shots": len(shots),
            "base_shots": len(base_shots),
            "negatives": 0 if negatives is None else len(negatives),
            "unmatched_predictions": len(regions),
        }
        return label_ref, figures


def _train_mask_weights(
    segmenter: OneShotSegmenter, learned: Reference, seen: list[_Seen], report: LearningReport
) -> None:
    """PerSAM-F mask weights (:meth:`OneShotSegmenter.train_mask_weights`) on every corrected
    example, their losses and time in ``report``."""
    examples = [Example(item.correction.image, item.masks) for item in seen]
    for label, training in segmenter.train_mask_weights(learned, examples).items():
        report.labels[label].update(
            loss_before=float(training.loss_before),
            loss_after=float(training.loss_after),
            weights_seconds=float(training.seconds),
        )


def _calibrate_thresholds(
    segmenter: OneShotSegmenter,
    learned: Reference,
    seen: list[_Seen],
    labels: _LabelLearning,
    max_negatives: int,
    report: LearningReport,
) -> None:
    """Each label's ``score_threshold``: the learned reference predicts every correction again,
    leaving out what that correction contributed (its shot and its negatives, so it is not
    judged by itself); each instance is kept (IoU at least :data:`KEPT_IOU` with an annotated
    mask) or not, and :func:`calibrate_threshold` picks the threshold."""
    for label, label_ref in learned.labels.items():
        scores, kept = _leave_one_out(
            segmenter,
            label_ref,
            seen,
            labels.shot_sources[label],
            labels.regions[label],
            max_negatives,
        )
        label_ref.score_threshold = calibrate_threshold(np.asarray(scores), np.asarray(kept))
        report.labels[label].update(
            threshold=label_ref.score_threshold,
            calibration={"kept": int(np.sum(kept)), "not_kept": int(len(kept) - np.sum(kept))},
        )


def _choose_corrections(
    label: str,
    base_shots: list[Shot],
    seen: list[_Seen],
    seen_features: list[np.ndarray],
    predictions: dict[tuple[str, int], list[Instance]],
    threshold_shown: float,
    max_shots: int,
) -> tuple[list[int], list[int | None]]:
    """The corrections that become shots of ``label``, worst predicted first, and the
    source (correction index, None for the reference's own) of every shot, base shots first."""
    sources: list[int | None] = [None] * len(base_shots)
    candidates = []
    for index, item in enumerate(seen):
        truths = item.truth(label)
        if not truths:
            continue
        same_image = [
            j
            for j, shot in enumerate(base_shots)
            if np.array_equal(shot.patch_features, seen_features[index])
        ]
        if same_image:
            sources[same_image[0]] = index
            continue
        shown = [i.mask for i in predictions.get((label, index), []) if i.score >= threshold_shown]
        predicted = np.any(shown, axis=0) if shown else np.zeros_like(truths[0])
        missed = 1.0 - iou(predicted, np.any(truths, axis=0))
        candidates.append((-missed, index))
    candidates.sort()
    chosen = [index for _, index in candidates[: max(0, max_shots - len(base_shots))]]
    return chosen, sources + chosen


def _deleted_regions(
    label: str, seen: list[_Seen], predictions: dict[tuple[str, int], list[Instance]]
) -> list[tuple[int, np.ndarray]]:
    """``(correction index, patch cells)`` of every prediction of ``label`` that no
    annotated mask of it overlaps (a deletion)."""
    regions = []
    for index, item in enumerate(seen):
        for instance in predictions.get((label, index), []):
            if best_iou(instance.mask, item.truth(label)) < DELETED_IOU:
                grid = tuple(item.features.patch_features.shape[:2])
                cells = _deleted_cells(instance, item, label, grid)
                if len(cells):
                    regions.append((index, cells))
    return regions


def _leave_one_out(
    segmenter: OneShotSegmenter,
    label_ref: LabelReference,
    seen: list[_Seen],
    sources: list[int | None],
    regions: list[tuple[int, np.ndarray]],
    max_negatives: int,
) -> tuple[list[float], list[bool]]:
    """Scores of the learned reference's predictions on every correction, leaving out
    what that correction contributed, and whether each was kept (matches an annotated mask)."""
    label = label_ref.label
    scores, kept = [], []
    for index, item in enumerate(seen):
        own_shot = [s == index for s in sources]
        own_negatives = any(source == index for source, _ in regions)
        if any(own_shot) or own_negatives:
            shots = [s for s, own in zip(label_ref.shots, own_shot, strict=True) if not own]
            if not shots:
                continue
            judge = LabelReference(
                label=label,
                shots=shots,
                negatives=select_negatives(
                    regions, _object_features(label_ref.shots), max_negatives, index
                ),
                mask_weights=label_ref.mask_weights,
            )
        else:
            judge = label_ref
        for instance in _segment_label(segmenter, item.features, judge):
            scores.append(instance.score)
            kept.append(best_iou(instance.mask, item.truth(label)) >= KEPT_IOU)
    return scores, kept
