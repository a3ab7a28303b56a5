"""Background training: bring a project's reference and learned state up to date from its
stored annotations.

The first usable annotation (oldest first) becomes the reference; every usable annotation is
then handed to the model's learning hook (:meth:`backend.model.OneShotModel.learn`, which defaults to
:func:`learn_from_examples`). The result is written only while the training lease is held, and
the model version is a hash of the state it decides predictions with.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from labelstudio import LabelingSchema, annotation_to_masks
from matcher_core import Example, Reference
from matcher_core.learning import Correction, model_version
from matcher_core.learning import learn as learn_from_corrections

from .errors import TASK_INPUT_ERRORS
from .project import ProjectContext
from .store import (
    WAITING_VERSION,
    InvalidKey,
    LockLost,
    ProjectState,
    StoreError,
    StoreUnavailable,
    example_key,
)
from .superseded import remove_superseded

log = logging.getLogger("oneshot.model")


@dataclass
class TrainingExample:
    """One stored annotation, loaded (image downloaded, masks decoded) only when needed."""

    key: str
    annotation: dict
    task: dict
    loader: Callable[[TrainingExample], Example] = field(repr=False)
    _loaded: Example | None = field(default=None, repr=False)
    error: str | None = None
    """Why the last :meth:`load` failed (None: it did not, or was not tried): such an example is
    not learned, stays pending, and is tried again by a later training."""

    @property
    def annotation_id(self) -> int | str | None:
        return self.annotation.get("id")

    def load(self) -> Example:
        """The image and ``{label: [(H, W) bool mask, ...]}`` of this annotation.

        Raises:
            FetchError, ImageError, AnnotationError: the image or the annotation is unusable.
        """
        if self._loaded is None:
            try:
                self._loaded = self.loader(self)
            except TASK_INPUT_ERRORS as error:
                self.error = str(error)
                raise
            self.error = None
        return self._loaded


# The learning hook: (private copy of the state, private copy of the reference, every usable
# example oldest first) -> the learned reference, or None when nothing could be learned.
LearnHook = Callable[[ProjectState, Reference, list[TrainingExample]], "Reference | None"]


VOLATILE_FIGURES = ("seconds",)
"""Keys of the learned summary that measure a run rather than describe what was learned (wall-clock
time): left out of the version, so the same data always gives the same version."""

VERSION_PATTERN = re.compile(r"^(?P<prefix>(?:rnd-)?)g(?P<generation>\d+)-(?P<digest>[0-9a-f]+)$")
VERSION_DIGEST_CHARS = 6
"""Hex digits of the content hash in a served version: Label Studio 1.23's prediction tabs
show a version of up to 15 characters whole and cut longer ones to ``first 8...last 6``, so
``rnd-g12-5a7baf`` (random weights, generation 12) is read at a glance there."""


def stable_figures(learned: Any) -> Any:
    """``learned`` without its wall-clock figures (``*seconds`` keys, at any depth)."""
    if isinstance(learned, dict):
        return {
            key: stable_figures(value)
            for key, value in learned.items()
            if not (isinstance(key, str) and key.endswith(VOLATILE_FIGURES))
        }
    if isinstance(learned, list):
        return [stable_figures(value) for value in learned]
    return learned


def model_version_of(reference: Reference | None, learned: dict, mode: str) -> str:
    """The content hash of what is served: :func:`matcher_core.learning.model_version` of the
    reference with the learned summary (timings left out) and the engine mode;
    ``oneshot-waiting`` without a reference."""
    if reference is None:
        return WAITING_VERSION
    return model_version(reference, context={"mode": mode, "learned": stable_figures(learned)})


def served_version(previous: str, content_version: str) -> str:
    """The version shown in Label Studio for ``content_version`` (a content hash), after
    ``previous``: ``g<generation>-<6 hex>``, with ``rnd-`` first for random test weights.

    The generation counts the learned states a project has served (1 for the first reference);
    it grows only when the content hash changes, so an unchanged retraining keeps ``previous``.
    """
    if content_version == WAITING_VERSION:
        return WAITING_VERSION
    digest = content_version.rsplit("-", 1)[-1][:VERSION_DIGEST_CHARS]
    prefix = "rnd-" if content_version.startswith("oneshot-random-") else ""
    match = VERSION_PATTERN.match(previous)
    if match and match["digest"] == digest and match["prefix"] == prefix:
        return previous
    generation = int(match["generation"]) + 1 if match else 1
    return f"{prefix}g{generation}-{digest}"


def example_order(item: tuple[str, dict]) -> tuple:
    """Annotations in the order they were created in Label Studio (ids increase), so the
    incremental path and a full rebuild pick the same first annotation as the reference."""
    annotation_id = item[1].get("annotation", {}).get("id")
    return (0, annotation_id, item[0]) if isinstance(annotation_id, int) else (1, 0, item[0])


def example_loader(
    project: ProjectContext, schema: LabelingSchema, state: ProjectState, api_holder: dict
) -> Callable[[TrainingExample], Example]:
    """Loads an example: its task from Label Studio when it was stored without data, its
    image, and its masks (rectangles / keypoints turned into masks by SAM)."""
    runtime = project.runtime

    def load(example: TrainingExample) -> Example:
        task = example.task
        if not isinstance(task.get("data"), dict):
            if "api" not in api_holder:
                api_holder["api"] = project.api(state)
            task = api_holder["api"].task(task.get("id") or example.annotation.get("task"))
            example.task = task
        image = project.load_task_image(task, schema, state)
        segmenter = runtime.segmenter()

        def sam(points, point_labels, box):
            with runtime.inference_slot():
                return segmenter.segment_from_prompts(image, points, point_labels, box)[0]

        masks = annotation_to_masks(
            example.annotation.get("result") or [], schema, image.shape[:2], sam
        )
        return Example(image=image, masks=masks)

    return load


def sync_examples_from_label_studio(project: ProjectContext, state: ProjectState) -> None:
    """Replace the stored examples by the project's annotations in Label Studio."""
    project_id = project.require_project_id()
    store = project.store
    api = project.api(state)
    fresh: dict[str, dict] = {}
    for task in api.annotated_tasks(project_id):
        for annotation in task.get("annotations") or []:
            if annotation.get("was_cancelled") or not annotation.get("result"):
                continue
            try:
                key = example_key(annotation.get("id"))
            except InvalidKey as error:
                log.warning("project %s: annotation skipped: %s", project_id, error)
                continue
            fresh[key] = {
                "annotation": {**annotation, "task": task.get("id")},
                "task": {"id": task.get("id"), "data": task.get("data")},
                "received_at": time.time(),
            }
    stale = set(store.examples(project_id)) - set(fresh)
    store.delete_examples(project_id, stale)
    for key, payload in fresh.items():
        store.put_example(project_id, key, payload)
    log.info(
        "project %s: %d annotation(s) fetched from Label Studio (%d stale removed)",
        project_id,
        len(fresh),
        len(stale),
    )


def train(
    project: ProjectContext,
    learn: LearnHook | None = None,
    full: bool = False,
    fence: tuple[str, str] | None = None,
) -> ProjectState:
    """One training of ``project`` (see :meth:`backend.model.OneShotModel.train`).

    Args:
        learn: the learning hook, called with every usable example once there is a reference
            and something new to learn (default: :func:`learn_from_examples`).
        full: refetch every annotation from Label Studio and rebuild from scratch.
        fence: ``(lock, token)`` of the training lease: the result is written only while
            that lease is held (see ``backend.leases``).

    Returns:
        The project's state after the training (the previous one when it failed cleanly).
    """
    custom_hook = learn is not None
    if learn is None:

        def learn(state: ProjectState, reference: Reference, examples: list[TrainingExample]):
            return learn_from_examples(project, state, reference, examples)

    started = time.perf_counter()
    project_id = project.require_project_id()
    requested: float | None = None
    try:
        state = project.store.load(project_id)
        requested = state.training_requested_at
        run = _TrainingRun(project, state, full)
        run.prepare()
        run.learn(learn)
    except Exception as error:
        training_failed(project, project_id, error, started, requested)
        raise

    unlearned = run.unlearned()
    if unlearned:
        schedule_retry(project, project_id, unlearned)
    if run.reference is None and run.failures:
        # Nothing usable now (Label Studio down, images failing): keep serving what we have.
        error = RuntimeError("no annotation could be used: " + "; ".join(run.failures.values()))
        training_failed(project, project_id, error, started, requested)
        return project.store.load(project_id)
    if not run.rebuild and not run.learned_something:
        log.info("project %s: nothing new to learn (%d pending)", project_id, len(run.pending))
        project.metrics.trainings.inc("skipped")

        def served(current: ProjectState) -> ProjectState | None:
            if not unlearned:
                return request_served(current, requested)
            current.last_error = unlearned_error(unlearned)
            request_served(current, requested)
            return current

        return project.store.update(project_id, served, reason="nothing to learn", fence=fence)
    if run.reference is not None and custom_hook:
        cap_shots(project, run.reference)
    new_state = _commit(project, run, unlearned, fence, started, requested)
    if new_state.model_version != state.model_version and all(project.connection(new_state)):
        remove_superseded(project, new_state)
    return new_state


class _TrainingRun:
    """One training's work before anything is written: the examples, the reference (kept or
    rebuilt from the first usable annotation) and what the learning hook made of the rest."""

    def __init__(self, project: ProjectContext, state: ProjectState, full: bool):
        self.project, self.state, self.full = project, state, full
        self.project_id = project.require_project_id()
        self.stored: list[tuple[str, dict]] = []
        self.examples: list[TrainingExample] = []
        self.reference: Reference | None = None
        self.source: str | None = None
        self.rebuild = False
        self.applied: list[str] = []
        self.failures: dict[str, str] = {}
        """Examples that cannot be the reference (key -> why)."""
        self.pending: list[TrainingExample] = []
        self.learned_something = False

    def prepare(self) -> None:
        """Load the stored examples and decide whether the reference is rebuilt."""
        project, state, store = self.project, self.state, self.project.store
        schema = project.schema(state)
        if self.full:
            sync_examples_from_label_studio(project, state)
        self.stored = sorted(store.examples(self.project_id).items(), key=example_order)
        # An example stored again after it was learned (e.g. an annotation updated while
        # the last training ran, which then marked the old content applied) is learned anew.
        relearn = {
            key
            for key, payload in self.stored
            if state.applied_stamps.get(key, payload.get("received_at"))
            != payload.get("received_at")
        }
        state.applied_examples = [k for k in state.applied_examples if k not in relearn]
        segmenter = project.runtime.segmenter()
        loader = example_loader(project, schema, state, {})
        self.examples = [
            TrainingExample(key, p.get("annotation", {}), p.get("task") or {}, loader)
            for key, p in self.stored
        ]
        keys = {e.key for e in self.examples}
        source = (state.reference_source or {}).get("key")
        if state.reference is not None and not self.full:
            self.reference = Reference.from_bytes(state.reference)  # a private copy to modify
        self.rebuild = (
            self.reference is None
            or source not in keys
            or source not in state.applied_examples
            or self.reference.model_id != segmenter.model_id
        )
        self.source = source
        self.applied = [] if self.rebuild else list(state.applied_examples)
        if self.rebuild:
            self._build_reference(segmenter)

    def _build_reference(self, segmenter) -> None:
        """The reference from the first example that loads (the others' failures kept)."""
        self.reference, self.source = None, None
        self.state.learned = {}  # learned state is relearned from scratch with the reference
        for example in self.examples:
            try:
                self.reference = segmenter.build_reference([example.load()])
            except TASK_INPUT_ERRORS as error:
                self.failures[example.key] = str(error)
                log.warning(
                    "project %s %s cannot be the reference: %s", self.project_id, example.key, error
                )
                continue
            self.source = example.key
            self.applied = [example.key]
            break

    def learn(self, learn: LearnHook) -> None:
        """Hand every usable example to ``learn`` when something new loads."""
        self.pending = [
            e for e in self.examples if e.key not in self.applied and e.key not in self.failures
        ]
        if self.reference is None or not any(loads(e) for e in list(self.pending)):
            return
        usable = [e for e in self.examples if e.key not in self.failures]
        learned = learn(self.state, self.reference, usable)
        if learned is not None:
            self.reference, self.learned_something = learned, True
            # Only what loaded was learned: the rest stays pending for the retry.
            self.applied += [e.key for e in self.pending if e.error is None]

    def unlearned(self) -> dict[str, str]:
        """Examples not learned this time (key -> why): retried later."""
        return {
            **self.failures,
            **{e.key: e.error for e in self.examples if e.error and e.key not in self.applied},
        }


def _commit(
    project: ProjectContext,
    run: _TrainingRun,
    unlearned: dict[str, str],
    fence: tuple[str, str] | None,
    started: float,
    requested: float | None,
) -> ProjectState:
    """Write the run's reference, learned state and version (fenced by the lease) and log it."""
    project_id, state, reference = run.project_id, run.state, run.reference
    content = model_version_of(reference, state.learned, project.settings.mode)
    version = served_version(state.model_version, content)
    blob = reference.to_bytes() if reference is not None else None
    source_info = None
    if run.source is not None:
        annotation = next(e.annotation for e in run.examples if e.key == run.source)
        source_info = {
            "key": run.source,
            "annotation_id": annotation.get("id"),
            "task_id": annotation.get("task"),
        }
    reason = "full retraining" if run.full else ("reference built" if run.rebuild else "learned")
    applied = run.applied

    def change(current: ProjectState) -> ProjectState:
        current.reference = blob
        current.reference_source = source_info
        current.applied_examples = applied
        received = {key: payload.get("received_at") for key, payload in run.stored}
        current.applied_stamps = {key: received.get(key) for key in applied}
        current.model_version = version
        current.learned = state.learned
        current.last_error = unlearned_error(unlearned)
        request_served(current, requested)
        return current

    try:
        new_state = project.store.update(project_id, change, reason=reason, fence=fence)
    except StoreError as error:
        training_failed(project, project_id, error, started, requested)
        raise
    seconds = time.perf_counter() - started
    project.metrics.trainings.inc("ok")
    project.metrics.training_seconds.observe(seconds)
    # One line per training, with true numbers: an annotation that could not be loaded this
    # time (e.g. its download got HTTP 401) is counted as not learned, not as learned.
    not_learned = sorted(unlearned)
    log.info(
        "project %s: %s from %d annotation(s): %d learned, %d not learned%s in %.1f s; "
        "model version %s",
        project_id,
        reason,
        len(run.examples),
        len([key for key in applied if key not in unlearned]),
        len(not_learned),
        f" ({', '.join(not_learned[:5])}: retried later)" if not_learned else "",
        seconds,
        version if version == state.model_version else f"{state.model_version} -> {version}",
    )
    return new_state


def loads(example: TrainingExample) -> bool:
    """Whether ``example`` loads (its failure is kept in ``example.error``). Checked before
    learning, so a retry whose examples still cannot be loaded does not relearn everything."""
    try:
        example.load()
    except TASK_INPUT_ERRORS:
        return False
    return True


def unlearned_error(unlearned: dict[str, str]) -> str | None:
    """The ``last_error`` of a training that left ``unlearned`` (key -> why) pending."""
    if not unlearned:
        return None
    reasons = "; ".join(f"{key}: {why}" for key, why in unlearned.items())
    return f"{len(unlearned)} annotation(s) not learned yet, retried later: {reasons}"[:1000]


def schedule_retry(project: ProjectContext, project_id: str, unlearned: dict[str, str]) -> None:
    """Train again in ``TRAIN_RETRY_DELAY`` seconds: the examples that could not be loaded (their
    image source unreachable, most often) are learned once it is back, with no new event."""
    delay = project.settings.train_retry_delay
    log.warning(
        "project %s: %d annotation(s) could not be loaded (%s); training again in %g s "
        "(TRAIN_RETRY_DELAY)",
        project_id,
        len(unlearned),
        ", ".join(unlearned),
        delay,
    )
    try:
        project.runtime.jobs.retry_training_later(project_id, delay)
    except Exception as error:  # the next event retries then; the training itself stands
        log.error("project %s: cannot schedule the retry: %s", project_id, error)


def request_served(state: ProjectState, requested: float | None) -> ProjectState | None:
    """Clear the training request this training started from (a later request stays: its
    own training is queued). ``None`` (nothing to write) when there is nothing to clear."""
    if state.training_requested_at is None or state.training_requested_at != requested:
        return None
    state.training_requested_at = None
    return state


def cap_shots(project: ProjectContext, reference: Reference) -> None:
    """Keep at most ``MAX_SHOTS_PER_LABEL`` shots per label (:meth:`LabelReference.cap_shots`),
    saying so. Applied to what a custom learning hook returns; the default one caps itself."""
    limit = project.settings.max_shots_per_label
    for name, label_ref in reference.labels.items():
        count = len(label_ref.shots)
        if label_ref.cap_shots(limit):
            log.warning(
                "project %s label %r: %d reference shots, over the limit of %d "
                "(MAX_SHOTS_PER_LABEL); keeping the newest %d",
                project.project_id,
                name,
                count,
                limit,
                limit,
            )


def training_failed(
    project: ProjectContext,
    project_id: str,
    error: BaseException,
    started: float,
    requested: float | None = None,
) -> None:
    """Count and log a failed training and record it in the state (the previous reference
    and version keep serving)."""
    project.metrics.trainings.inc("failed")
    project.metrics.training_seconds.observe(time.perf_counter() - started)
    log.error("project %s: training failed, previous version kept: %s", project_id, error)
    if isinstance(error, (StoreUnavailable, LockLost)):
        # Unreachable store: the request mark stays, and the training is resumed once the
        # store is back. Lost lease: another trainer owns the project now.
        return
    message = f"{type(error).__name__}: {error}"

    def change(state: ProjectState) -> ProjectState:
        state.last_error = message[:1000]
        # A clean failure is recorded, not retried in a loop: the next event retrains.
        request_served(state, requested)
        return state

    try:
        project.store.update(project_id, change, reason="training failed")
    except StoreError:
        log.error("project %s: could not record the training failure", project_id)


def learn_from_examples(
    project: ProjectContext,
    state: ProjectState,
    reference: Reference,
    examples: list[TrainingExample],
) -> Reference | None:
    """The default learning hook: :func:`matcher_core.learning.learn` on every example that
    loads, with its figures in the metrics and the log (see :meth:`backend.model.OneShotModel.learn`).
    """
    corrections = []
    for example in examples:
        try:
            loaded = example.load()
        except TASK_INPUT_ERRORS as error:
            log.warning("project %s %s: not learned from: %s", state.project_id, example.key, error)
            continue
        task_id = example.annotation.get("task") if isinstance(example.annotation, dict) else None
        corrections.append(
            Correction(
                loaded.image,
                loaded.masks,
                task_id=task_id if task_id is not None else example.key,
            )
        )
    if not corrections:
        return None
    learned, report = learn_from_corrections(
        project.runtime.segmenter(),
        reference,
        corrections,
        max_shots=project.settings.max_shots_per_label,
    )
    state.learned = {"examples": report.examples, "labels": report.labels}
    last_training = project.metrics.last_training
    for label, figures in report.labels.items():
        for quantity in ("shots", "negatives", "threshold", "loss_before", "loss_after"):
            if isinstance(figures.get(quantity), int | float):
                last_training.set(state.project_id, label, quantity, value=figures[quantity])
        last_training.set(state.project_id, label, "examples", value=report.examples)
        last_training.set(state.project_id, label, "seconds", value=report.seconds)
    log.info(
        "project %s: learned from %d example(s) in %.1f s: %s",
        state.project_id,
        report.examples,
        report.seconds,
        "; ".join(
            f"{label}: {f.get('shots')} shots, {f.get('negatives')} negatives, threshold "
            f"{f.get('threshold')}, PerSAM-F loss {f.get('loss_before')} -> {f.get('loss_after')}"
            for label, f in report.labels.items()
        ),
    )
    return learned
