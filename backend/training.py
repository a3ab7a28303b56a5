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
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from labelstudio import LabelingSchema, annotation_to_masks
from labelstudio.api import LabelStudioAPI
from matcher_core import Example, Reference
from matcher_core.learning import Correction, LearningReport, model_version
from matcher_core.learning import learn as learn_from_corrections

from .errors import TASK_INPUT_ERRORS
from .project import ProjectContext
from .store import (
    WAITING_VERSION,
    InvalidKey,
    LockLost,
    ProjectState,
    StateStore,
    StoreError,
    StoreUnavailable,
    example_key,
)
from .superseded import remove_superseded
from .telemetry import Metrics

if TYPE_CHECKING:
    from matcher_core import OneShotSegmenter

    from .jobs import Jobs

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
    schema: LabelingSchema,
    load_image: Callable[[dict], np.ndarray],
    fetch_task: Callable[[Any], dict],
    engine: Callable[[], OneShotSegmenter],
    inference_slot: Callable[[], AbstractContextManager],
) -> Callable[[TrainingExample], Example]:
    """Loads an example: its task (``fetch_task``, from Label Studio) when it was stored without
    data, its image, and its masks (rectangles / keypoints turned into masks by SAM)."""

    def load(example: TrainingExample) -> Example:
        task = example.task
        if not isinstance(task.get("data"), dict):
            task = fetch_task(task.get("id") or example.annotation.get("task"))
            example.task = task
        image = load_image(task)
        segmenter = engine()

        def sam(points, point_labels, box):
            with inference_slot():
                return segmenter.segment_from_prompts(image, points, point_labels, box)[0]

        masks = annotation_to_masks(
            example.annotation.get("result") or [], schema, image.shape[:2], sam
        )
        return Example(image=image, masks=masks)

    return load


def project_example_loader(
    project: ProjectContext, schema: LabelingSchema, state: ProjectState
) -> Callable[[TrainingExample], Example]:
    """:func:`example_loader` on ``project``'s images, engine and Label Studio connection (the
    API client is made on the first task that needs one)."""
    clients: list[LabelStudioAPI] = []

    def fetch_task(task_id: Any) -> dict:
        if not clients:
            clients.append(project.api(state))
        return clients[0].task(task_id)

    runtime = project.runtime
    return example_loader(
        schema,
        partial(project.load_task_image, schema=schema, state=state),
        fetch_task,
        runtime.segmenter,
        runtime.inference_slot,
    )


def sync_examples_from_label_studio(
    store: StateStore, api: LabelStudioAPI, project_id: str
) -> None:
    """Replace the stored examples by the project's annotations in Label Studio."""
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
    started = time.perf_counter()
    project_id = project.require_project_id()
    store, metrics = project.store, project.metrics
    requested: float | None = None
    try:
        state = store.load(project_id)
        requested = state.training_requested_at
        run = start_run(project, state, full)
        run.learn(learn or default_learn_hook(project))
    except Exception as error:
        training_failed(store, metrics, project_id, error, started, requested)
        raise
    unlearned = run.unlearned()
    if unlearned:
        schedule_retry(
            project.runtime.jobs, project_id, unlearned, project.settings.train_retry_delay
        )
    if run.reference is None and run.failures:
        # Nothing usable now (Label Studio down, images failing): keep serving what we have.
        error = RuntimeError("no annotation could be used: " + "; ".join(run.failures.values()))
        training_failed(store, metrics, project_id, error, started, requested)
        return store.load(project_id)
    if not run.rebuild and not run.learned_something:
        return nothing_learned(store, metrics, run, unlearned, requested, fence)
    if run.reference is not None and learn is not None:
        cap_shots(run.reference, project.settings.max_shots_per_label, project_id)
    try:
        new_state = _commit(store, run, project.settings.mode, unlearned, fence, requested)
    except StoreError as error:
        training_failed(store, metrics, project_id, error, started, requested)
        raise
    log_trained(metrics, run, unlearned, new_state, state.model_version, started)
    if new_state.model_version != state.model_version and all(project.connection(new_state)):
        remove_superseded(project.api(new_state), new_state)
    return new_state


def default_learn_hook(project: ProjectContext) -> LearnHook:
    """:func:`learn_from_examples` on ``project``'s engine, metrics and shot limit."""

    def learn(state: ProjectState, reference: Reference, examples: list[TrainingExample]):
        return learn_from_examples(
            state,
            reference,
            examples,
            segmenter=project.runtime.segmenter(),
            metrics=project.metrics,
            max_shots=project.settings.max_shots_per_label,
        )

    return learn


def start_run(project: ProjectContext, state: ProjectState, full: bool) -> _TrainingRun:
    """A training run of ``project`` with its examples loaded and its reference kept or rebuilt
    (``full``: the examples refetched from Label Studio first)."""
    project_id = state.project_id
    schema = project.schema(state)
    if full:
        sync_examples_from_label_studio(project.store, project.api(state), project_id)
    stored = sorted(project.store.examples(project_id).items(), key=example_order)
    run = _TrainingRun(state, full, stored)
    run.prepare(project.runtime.segmenter(), project_example_loader(project, schema, state))
    return run


def nothing_learned(
    store: StateStore,
    metrics: Metrics,
    run: _TrainingRun,
    unlearned: dict[str, str],
    requested: float | None,
    fence: tuple[str, str] | None,
) -> ProjectState:
    """Record a training that had nothing new to learn (and what stays pending)."""
    log.info("project %s: nothing new to learn (%d pending)", run.project_id, len(run.pending))
    metrics.trainings.inc("skipped")

    def served(current: ProjectState) -> ProjectState | None:
        if not unlearned:
            return request_served(current, requested)
        current.last_error = unlearned_error(unlearned)
        request_served(current, requested)
        return current

    return store.update(run.project_id, served, reason="nothing to learn", fence=fence)


class _TrainingRun:
    """One training's work before anything is written: the examples, the reference (kept or
    rebuilt from the first usable annotation) and what the learning hook made of the rest."""

    def __init__(self, state: ProjectState, full: bool, stored: list[tuple[str, dict]]):
        self.state, self.full = state, full
        self.project_id = state.project_id
        self.stored = stored
        """The stored examples ``(key, payload)``, oldest first."""
        self.examples: list[TrainingExample] = []
        self.reference: Reference | None = None
        self.source: str | None = None
        self.rebuild = False
        self.applied: list[str] = []
        self.failures: dict[str, str] = {}
        """Examples that cannot be the reference (key -> why)."""
        self.pending: list[TrainingExample] = []
        self.learned_something = False

    @property
    def reason(self) -> str:
        """What this training is, in the version history."""
        return (
            "full retraining" if self.full else ("reference built" if self.rebuild else "learned")
        )

    def prepare(
        self, segmenter: OneShotSegmenter, loader: Callable[[TrainingExample], Example]
    ) -> None:
        """Wrap the stored examples and decide whether the reference is rebuilt."""
        state = self.state
        # An example stored again after it was learned (e.g. an annotation updated while
        # the last training ran, which then marked the old content applied) is learned anew.
        relearn = {
            key
            for key, payload in self.stored
            if state.applied_stamps.get(key, payload.get("received_at"))
            != payload.get("received_at")
        }
        state.applied_examples = [k for k in state.applied_examples if k not in relearn]
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
    store: StateStore,
    run: _TrainingRun,
    mode: str,
    unlearned: dict[str, str],
    fence: tuple[str, str] | None,
    requested: float | None,
) -> ProjectState:
    """Write the run's reference, learned state and version (fenced by the lease)."""
    state, reference = run.state, run.reference
    content = model_version_of(reference, state.learned, mode)
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

    return store.update(run.project_id, change, reason=run.reason, fence=fence)


def log_trained(
    metrics: Metrics,
    run: _TrainingRun,
    unlearned: dict[str, str],
    new_state: ProjectState,
    previous_version: str,
    started: float,
) -> None:
    """Count a training and log it in one line, with true numbers: an annotation that could not
    be loaded this time (e.g. its download got HTTP 401) is counted as not learned."""
    seconds = time.perf_counter() - started
    metrics.trainings.inc("ok")
    metrics.training_seconds.observe(seconds)
    version = new_state.model_version
    not_learned = sorted(unlearned)
    log.info(
        "project %s: %s from %d annotation(s): %d learned, %d not learned%s in %.1f s; "
        "model version %s",
        run.project_id,
        run.reason,
        len(run.examples),
        len([key for key in run.applied if key not in unlearned]),
        len(not_learned),
        f" ({', '.join(not_learned[:5])}: retried later)" if not_learned else "",
        seconds,
        version if version == previous_version else f"{previous_version} -> {version}",
    )


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


def schedule_retry(jobs: Jobs, project_id: str, unlearned: dict[str, str], delay: float) -> None:
    """Train again in ``delay`` seconds (``TRAIN_RETRY_DELAY``): the examples that could not be
    loaded (their image source unreachable, most often) are learned once it is back, with no
    new event."""
    log.warning(
        "project %s: %d annotation(s) could not be loaded (%s); training again in %g s "
        "(TRAIN_RETRY_DELAY)",
        project_id,
        len(unlearned),
        ", ".join(unlearned),
        delay,
    )
    try:
        jobs.retry_training_later(project_id, delay)
    except Exception as error:  # the next event retries then; the training itself stands
        log.error("project %s: cannot schedule the retry: %s", project_id, error)


def request_served(state: ProjectState, requested: float | None) -> ProjectState | None:
    """Clear the training request this training started from (a later request stays: its
    own training is queued). ``None`` (nothing to write) when there is nothing to clear."""
    if state.training_requested_at is None or state.training_requested_at != requested:
        return None
    state.training_requested_at = None
    return state


def cap_shots(reference: Reference, limit: int, project_id: str) -> None:
    """Keep at most ``limit`` (``MAX_SHOTS_PER_LABEL``) shots per label
    (:meth:`LabelReference.cap_shots`), saying so. Applied to what a custom learning hook
    returns; the default one caps itself."""
    for name, label_ref in reference.labels.items():
        count = len(label_ref.shots)
        if label_ref.cap_shots(limit):
            log.warning(
                "project %s label %r: %d reference shots, over the limit of %d "
                "(MAX_SHOTS_PER_LABEL); keeping the newest %d",
                project_id,
                name,
                count,
                limit,
                limit,
            )


def training_failed(
    store: StateStore,
    metrics: Metrics,
    project_id: str,
    error: BaseException,
    started: float,
    requested: float | None = None,
) -> None:
    """Count and log a failed training and record it in the state (the previous reference
    and version keep serving)."""
    metrics.trainings.inc("failed")
    metrics.training_seconds.observe(time.perf_counter() - started)
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
        store.update(project_id, change, reason="training failed")
    except StoreError:
        log.error("project %s: could not record the training failure", project_id)


def learn_from_examples(
    state: ProjectState,
    reference: Reference,
    examples: list[TrainingExample],
    *,
    segmenter: OneShotSegmenter,
    metrics: Metrics,
    max_shots: int,
) -> Reference | None:
    """The default learning hook: :func:`matcher_core.learning.learn` on every example that
    loads, with its figures in the metrics and the log (see
    :meth:`backend.model.OneShotModel.learn`)."""
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
    learned, report = learn_from_corrections(segmenter, reference, corrections, max_shots=max_shots)
    state.learned = {"examples": report.examples, "labels": report.labels}
    record_learning(metrics, state.project_id, report)
    return learned


def record_learning(metrics: Metrics, project_id: str, report: LearningReport) -> None:
    """A learning's figures per label in the metrics (``last_training``) and the log."""
    last_training = metrics.last_training
    for label, figures in report.labels.items():
        for quantity in ("shots", "negatives", "threshold", "loss_before", "loss_after"):
            if isinstance(figures.get(quantity), int | float):
                last_training.set(project_id, label, quantity, value=figures[quantity])
        last_training.set(project_id, label, "examples", value=report.examples)
        last_training.set(project_id, label, "seconds", value=report.seconds)
    log.info(
        "project %s: learned from %d example(s) in %.1f s: %s",
        project_id,
        report.examples,
        report.seconds,
        "; ".join(
            f"{label}: {f.get('shots')} shots, {f.get('negatives')} negatives, threshold "
            f"{f.get('threshold')}, PerSAM-F loss {f.get('loss_before')} -> {f.get('loss_after')}"
            for label, f in report.labels.items()
        ),
    )
