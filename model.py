"""The Label Studio ML backend model: one annotated task labels the whole project.

:class:`OneShotModel` reads like any ``LabelStudioMLBase`` backend (``setup``, ``predict``,
``fit``) but is a thin adapter: the science is in :mod:`matcher_core`, the Label Studio JSON
conversions in :mod:`backend.labelstudio`, image download in :mod:`backend.fetch`, persistence in
:mod:`backend.store` and background work in :mod:`backend.jobs`.

Lifecycle of a project:

1. ``/setup``: the connection details and the label config are recorded; the model version is
   ``oneshot-waiting`` and ``/predict`` answers an empty prediction per task, quickly.
2. The first submitted annotation with masks (brush, polygon, or rectangle / keypoint turned into
   masks by SAM) arrives by webhook: it is validated at once, stored, and a background training
   builds the reference from it (every label, every instance). The model version becomes
   ``oneshot-<hash of the learned state>``, so Label Studio asks again for every task.
3. Later annotations are stored as examples and handed to :meth:`OneShotModel.learn` (learning
   from corrections). ``START_TRAINING`` refetches every annotation from Label Studio and rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from backend.fetch import FetchError, fetch_image_bytes
from backend.jobs import resume_stalled_training
from backend.labelstudio import (
    AnnotationError,
    ConfigError,
    LabelingSchema,
    annotation_to_masks,
    instances_to_results,
    interactive_prompts,
    parse_label_config,
    task_image_url,
    task_score,
)
from backend.ls_api import LabelStudioAPI
from backend.runtime import Runtime, get_runtime
from backend.store import (
    WAITING_VERSION,
    LockLost,
    ProjectState,
    StoreError,
    StoreUnavailable,
)
from matcher_core import Example, Instance, Reference
from matcher_core.imageio import ImageError, load_image
from matcher_core.learning import Correction
from matcher_core.learning import learn as learn_from_corrections

log = logging.getLogger("oneshot.model")

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
TRAINING_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
PROJECT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Errors of one task's input (its image, its annotation): reported for that task, never fatal.
TASK_INPUT_ERRORS = (FetchError, ImageError, ValueError)


class BackendError(Exception):
    """A request the backend refuses or cannot serve; ``status`` is the HTTP status to answer."""

    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(BackendError):
    status = 400


class ServiceUnavailable(BackendError):
    status = 503


class LimitExceeded(BackendError):
    """A request over one of the documented limits (the message names the setting)."""

    status = 413


def store_failure(error: StoreError) -> BackendError:
    """The HTTP error for a store failure: 503 unreachable, 507 project over its byte cap."""
    return BackendError(f"state store unavailable: {error}", status=error.http_status)


def project_id_of(value: Any) -> str:
    """Label Studio's project id from ``/setup``'s ``"<id>.<timestamp>"``, a webhook's project
    object, or a bare id.

    Raises:
        BadRequest: none of these, or an id with characters other than letters, digits, ``-_``.
    """
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool) or value is None:
        raise BadRequest("missing project id")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        project_id = value.strip().split(".", 1)[0]
        if PROJECT_ID_PATTERN.match(project_id):
            return project_id
    raise BadRequest(f"invalid project id {str(value)[:80]!r}")


@lru_cache(maxsize=64)
def _parse_config_cached(label_config: str) -> LabelingSchema:
    return parse_label_config(label_config)


def schema_of(label_config: str | None) -> LabelingSchema:
    """The parsed label config (cached by text).

    Raises:
        BadRequest: no config, or one this backend cannot use (the message says why).
    """
    if not label_config:
        raise BadRequest(
            "no label config: Label Studio sends it at /setup and with /predict; connect the "
            "backend to the project first"
        )
    if not isinstance(label_config, str):
        raise BadRequest(f"the label config must be a string, not {type(label_config).__name__}")
    try:
        return _parse_config_cached(label_config)
    except ConfigError as error:
        raise BadRequest(f"unusable label config: {error}") from error


def config_hash(label_config: str) -> str:
    return hashlib.blake2b(label_config.encode(), digest_size=8).hexdigest()


def model_version_of(reference: Reference | None, learned: dict, mode: str) -> str:
    """``oneshot-<hash>`` of everything that decides predictions: the reference content (shots,
    negatives, mask weights, thresholds, the models that built it), the learned state and the
    engine mode. ``oneshot-waiting`` without a reference.

    The hash is of the arrays and values themselves, not of serialised bytes (``npz`` embeds
    timestamps), so rebuilding the same state gives the same version.
    """
    if reference is None:
        return WAITING_VERSION
    digest = hashlib.blake2b(digest_size=6)
    digest.update(json.dumps({"mode": mode, "model_id": reference.model_id}).encode())
    for name in sorted(reference.labels):
        label_ref = reference.labels[name]
        digest.update(
            json.dumps(
                {
                    "label": name,
                    "shots": len(label_ref.shots),
                    "threshold": label_ref.score_threshold,
                }
            ).encode()
        )
        arrays: list[np.ndarray | None] = [label_ref.negatives, label_ref.mask_weights]
        for shot in label_ref.shots:
            arrays += [shot.patch_features, shot.patch_mask, shot.sam_target_embedding]
        for array in arrays:
            if array is None:
                digest.update(b"-")
            else:
                array = np.ascontiguousarray(array)
                digest.update(f"{array.dtype}{array.shape}".encode())
                digest.update(array.tobytes())
    digest.update(json.dumps(learned, sort_keys=True, default=str).encode())
    return f"oneshot-{digest.hexdigest()}"


def _footprint_masker(image_size: tuple[int, int]) -> Callable:
    """A stand-in for SAM when only validating an annotation: a box prompt covers its box, a
    point prompt a small disc. Lets a webhook check an annotation within Label Studio's 1 s
    timeout, without downloading the image or running a model."""
    height, width = image_size

    def masker(points, point_labels, box) -> np.ndarray:
        mask = np.zeros((height, width), dtype=bool)
        if box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in np.asarray(box, dtype=float))
            mask[max(y0, 0) : max(y1, y0 + 1), max(x0, 0) : max(x1, x0 + 1)] = True
        if points is not None:
            for (x, y), positive in zip(np.asarray(points), np.asarray(point_labels), strict=True):
                if positive:
                    mask[int(min(max(y, 0), height - 1)), int(min(max(x, 0), width - 1))] = True
        return mask

    return masker


@dataclass
class TrainingExample:
    """One stored annotation, loaded (image downloaded, masks decoded) only when needed."""

    key: str
    annotation: dict
    task: dict
    loader: Callable[[TrainingExample], Example] = field(repr=False)
    _loaded: Example | None = field(default=None, repr=False)

    @property
    def annotation_id(self) -> int | str | None:
        return self.annotation.get("id")

    def load(self) -> Example:
        """The image and ``{label: [(H, W) bool mask, ...]}`` of this annotation.

        Raises:
            FetchError, ImageError, AnnotationError: the image or the annotation is unusable.
        """
        if self._loaded is None:
            self._loaded = self.loader(self)
        return self._loaded


def _example_order(item: tuple[str, dict]) -> tuple:
    """Annotations in the order they were created in Label Studio (ids increase), so the
    incremental path and a full rebuild pick the same first annotation as the reference."""
    annotation_id = item[1].get("annotation", {}).get("id")
    return (0, annotation_id, item[0]) if isinstance(annotation_id, int) else (1, 0, item[0])


class OneShotModel:
    """Label Studio ML backend in the ``LabelStudioMLBase`` style."""

    def __init__(
        self,
        project_id: Any = None,
        label_config: str | None = None,
        runtime: Runtime | None = None,
        **kwargs: Any,
    ):
        self.runtime = runtime or get_runtime()
        self.settings = self.runtime.settings
        self.store = self.runtime.store
        self.metrics = self.runtime.metrics
        self.project_id = project_id_of(project_id) if project_id is not None else None
        self.label_config = label_config
        self.extra = kwargs

    # ----------------------------------------------------------------------------------
    # Small helpers
    # ----------------------------------------------------------------------------------
    def _project(self) -> str:
        if self.project_id is None:
            raise BadRequest("missing 'project' (Label Studio sends '<id>.<timestamp>')")
        return self.project_id

    def _load_state(self) -> ProjectState:
        try:
            return self.store.load(self._project())
        except StoreError as error:
            raise store_failure(error) from error

    def _update_state(self, change, reason: str = "") -> ProjectState:
        try:
            return self.store.update(self._project(), change, reason)
        except StoreError as error:
            raise store_failure(error) from error

    def _schema(self, state: ProjectState | None = None) -> LabelingSchema:
        label_config = self.label_config or (state.label_config if state else None)
        if label_config is None and state is None:
            label_config = self._load_state().label_config
        return schema_of(label_config)

    def _connection(self, state: ProjectState) -> tuple[str | None, str | None]:
        """Label Studio URL and key: the environment's when set (an operator's explicit choice,
        e.g. a personal access token where ``/setup`` sends a legacy key), else ``/setup``'s."""
        hostname = self.settings.label_studio_url or state.connection.get("hostname")
        token = self.settings.label_studio_api_key or state.connection.get("access_token")
        return hostname, token

    def _api(self, state: ProjectState) -> LabelStudioAPI:
        hostname, token = self._connection(state)
        return LabelStudioAPI(
            hostname or "",
            token or "",
            timeout=self.settings.fetch_timeout,
            retries=self.settings.post_retries,
            backoff=self.settings.post_retry_backoff,
        )

    def _load_task_image(self, task: dict, schema: LabelingSchema, state: ProjectState):
        """``(H, W, 3)`` uint8 RGB image of a task (downloaded, EXIF-rotated, pixel-capped)."""
        hostname, token = self._connection(state)
        url = task_image_url(task, schema)
        data = fetch_image_bytes(
            url,
            hostname=hostname,
            access_token=token,
            task_id=task.get("id"),
            cache_dir=str(Path(self.settings.model_dir).expanduser() / "image-cache"),
            max_bytes=self.settings.max_image_bytes,
            timeout=self.settings.fetch_timeout,
            allowed_hosts=self.settings.allowed_hosts,
        )
        try:
            return load_image(data, self.settings.max_image_pixels)
        except ImageError as error:
            if "exceeds the cap" in str(error):  # name the setting that decides it
                raise ImageError(f"{error} (MAX_IMAGE_PIXELS)") from error
            raise

    # ----------------------------------------------------------------------------------
    # LabelStudioMLBase interface
    # ----------------------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        """The project's current model version (what ``/setup`` and ``/predict`` report)."""
        return self._load_state().model_version

    def setup(self, hostname: str | None = None, access_token: str | None = None) -> str:
        """Record Label Studio's connection details and label config; returns the model
        version. Starts loading the models in the background so the first prediction is fast.

        Raises:
            BadRequest: the label config cannot be used (Label Studio shows the message).
        """
        schema = self._schema() if self.label_config else None
        # What the environment pins is never taken from /setup, nor stored (a token the
        # operator configured needs no copy in the state store).
        if self.settings.label_studio_url:
            hostname = None
        if self.settings.label_studio_api_key:
            access_token = None
        connection = {
            k: v for k, v in (("hostname", hostname), ("access_token", access_token)) if v
        }

        def change(state: ProjectState) -> ProjectState | None:
            changed = False
            if self.label_config and state.label_config != self.label_config:
                if state.label_config_hash and state.reference is not None:
                    log.warning(
                        "project %s: the label config changed; predictions keep the reference "
                        "labels that the new config still has",
                        state.project_id,
                    )
                state.label_config = self.label_config
                state.label_config_hash = config_hash(self.label_config)
                changed = True
            if connection and connection != state.connection:
                state.connection = connection
                changed = True
            return state if changed else None

        state = self._update_state(change, reason="setup")
        resume_stalled_training(self.runtime, state)
        self.runtime.warm_up()
        log.info(
            "project %s set up (%s; labels %s); model version %s",
            state.project_id,
            f"output {schema.output.type} {schema.output.from_name!r}" if schema else "no config",
            ", ".join(schema.labels) if schema else "-",
            state.model_version,
        )
        return state.model_version

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> dict:
        """Predictions for ``tasks``, one ``results`` entry per task, in order.

        An entry is ``{"result": [...], "score": s, "model_version": v}``; a task that could not
        be predicted in this call (its image failed, or the time budget ran out and it is being
        predicted in the background) gets an empty list, which Label Studio stores nothing for,
        so it is asked for again later. ``errors`` lists what went wrong, per task.

        Raises:
            BadRequest: malformed tasks or an unusable label config.
            ServiceUnavailable: the state store is unreachable.
        """
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise BadRequest("'tasks' must be a list of task objects")
        if len(tasks) > self.settings.max_tasks_per_request:
            raise LimitExceeded(
                f"{len(tasks)} tasks in one request; the limit is "
                f"{self.settings.max_tasks_per_request} (MAX_TASKS_PER_REQUEST)"
            )
        state = self._load_state()
        resume_stalled_training(self.runtime, state)
        schema = self._schema(state)
        if context and isinstance(context, dict) and context.get("result"):
            return self._predict_interactive(tasks, context, schema, state)
        if not tasks:
            return {"results": [], "model_version": state.model_version}
        if self.label_config and state.label_config is None:
            # Background jobs read the config from the store (normally /setup put it there).
            state = self._record_label_config()
        if state.reference is None:
            log.info(
                "project %s has no reference yet: %d empty prediction(s); submit one annotation "
                "with masks to start pre-labeling",
                state.project_id,
                len(tasks),
            )
            self.metrics.tasks_predicted.inc("no_reference", amount=len(tasks))
            empty = {"result": [], "score": 0.0, "model_version": WAITING_VERSION}
            return {"results": [dict(empty) for _ in tasks], "model_version": WAITING_VERSION}
        return self._predict_batch(tasks, schema, state)

    def fit(self, event: str | None, data: dict, **kwargs: Any) -> dict:
        """Handle a webhook event quickly (Label Studio waits 1 s); work runs in the background.

        ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` (and bulk ``ANNOTATIONS_CREATED``): the
        annotation is validated, stored, and a training is requested (the first one builds the
        reference). ``ANNOTATIONS_DELETED``: the examples are dropped (deleting the reference's
        annotation promotes the next one). ``START_TRAINING``: full rebuild from Label Studio.
        Other events are acknowledged and ignored.

        Raises:
            BadRequest: a malformed payload or an unusable annotation (nothing is stored).
        """
        if not isinstance(data, dict):
            raise BadRequest("webhook body must be a JSON object")
        event = event or data.get("action")
        if not isinstance(event, str):
            raise BadRequest("webhook without 'action'")
        self.metrics.webhooks.inc(event)
        if event not in (*TRAINING_EVENTS, "ANNOTATIONS_DELETED", "START_TRAINING"):
            log.debug("webhook %s ignored", event)
            return {"status": "ignored", "action": event}
        if self.project_id is None:
            self.project_id = project_id_of(data.get("project"))
        project = data.get("project")
        if isinstance(project, dict) and isinstance(project.get("label_config"), str):
            self.label_config = self.label_config or project["label_config"]

        if event == "START_TRAINING":
            self._record_label_config()
            self.runtime.jobs.request_training(self.project_id, full=True)
            log.info("project %s: training requested (full rebuild)", self.project_id)
            return {"status": "training queued", "project": self.project_id, "full": True}
        if event == "ANNOTATIONS_DELETED":
            return self._delete_annotations(data.get("annotations"))
        if event == "ANNOTATIONS_CREATED":
            annotations = data.get("annotation")
            task_list = data.get("task") if isinstance(data.get("task"), list) else []
            if not isinstance(annotations, list):
                raise BadRequest("ANNOTATIONS_CREATED without an 'annotation' list")
            ids = (int, str)  # anything else in an id field cannot name a task
            tasks_by_id = {
                t["id"]: t
                for t in task_list
                if isinstance(t, dict) and isinstance(t.get("id"), ids)
            }
            pairs = [
                (a, tasks_by_id.get(a["task"]) if isinstance(a.get("task"), ids) else None)
                for a in annotations
                if isinstance(a, dict)
            ]
        else:
            pairs = [(data.get("annotation"), data.get("task"))]
        return self._receive_annotations(pairs, event)

    # ----------------------------------------------------------------------------------
    # Learning hook (issue 4)
    # ----------------------------------------------------------------------------------
    def learn(
        self, project: ProjectState, reference: Reference, examples: list[TrainingExample]
    ) -> Reference | None:
        """Learn from every stored annotation (:func:`matcher_core.learning.learn`).

        ``learn`` rebuilds the learned state from the reference's own shots each time (few-shot
        references, negative evidence, PerSAM-F weights, calibrated thresholds), so the
        incremental path and a START_TRAINING rebuild end in the same state.

        Args:
            project: a private copy of the project's state; ``project.learned`` (JSON) gets a
                summary of what was learned and goes into the model version.
            reference: a private copy of the project's current reference.
            examples: every usable stored annotation, oldest first (the reference's own
                included); ``load()`` downloads an image and decodes its masks.

        Returns:
            The learned reference, or ``None`` when no annotation could be loaded.
        """
        corrections = []
        for example in examples:
            try:
                loaded = example.load()
            except TASK_INPUT_ERRORS as error:
                log.warning(
                    "project %s %s: not learned from: %s", project.project_id, example.key, error
                )
                continue
            task_id = (
                example.annotation.get("task") if isinstance(example.annotation, dict) else None
            )
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
            self.runtime.segmenter(),
            reference,
            corrections,
            max_shots=self.settings.max_shots_per_label,
        )
        project.learned = {"examples": report.examples, "labels": report.labels}
        for label, figures in report.labels.items():
            for quantity in ("shots", "negatives", "threshold", "loss_before", "loss_after"):
                if isinstance(figures.get(quantity), int | float):
                    self.metrics.last_training.set(
                        project.project_id, label, quantity, value=figures[quantity]
                    )
            self.metrics.last_training.set(
                project.project_id, label, "examples", value=report.examples
            )
            self.metrics.last_training.set(
                project.project_id, label, "seconds", value=report.seconds
            )
        log.info(
            "project %s: learned from %d example(s) in %.1f s: %s",
            project.project_id,
            report.examples,
            report.seconds,
            "; ".join(
                f"{label}: {f.get('shots')} shots, {f.get('negatives')} negatives, threshold "
                f"{f.get('threshold')}, PerSAM-F loss {f.get('loss_before')} -> {f.get('loss_after')}"
                for label, f in report.labels.items()
            ),
        )
        return learned

    # ----------------------------------------------------------------------------------
    # Prediction
    # ----------------------------------------------------------------------------------
    def _predict_batch(self, tasks: list[dict], schema: LabelingSchema, state: ProjectState):
        started = time.monotonic()
        version = state.model_version
        reference = self.runtime.reference(state.project_id, version, state.reference)
        segmenter = self.runtime.segmenter()
        if reference.model_id != segmenter.model_id:
            log.error(
                "project %s: its reference was built with other models (%s; now %s); "
                "rebuilding it from the stored annotations",
                state.project_id,
                reference.model_id,
                segmenter.model_id,
            )
            self.runtime.jobs.request_training(state.project_id)
            errors = [
                {"task": t.get("id"), "error": "reference is being rebuilt for the current models"}
                for t in tasks
            ]
            return {"results": [[] for _ in tasks], "model_version": version, "errors": errors}

        budget = self.settings.predict_time_budget
        can_defer = all(self._connection(state))
        results: list[Any] = []
        errors: list[dict] = []
        slowest = 0.0
        for index, task in enumerate(tasks):
            elapsed = time.monotonic() - started
            if index > 0 and can_defer and elapsed + slowest > budget:
                rest = tasks[index:]
                try:
                    job_ids = self.runtime.jobs.submit_predictions(state.project_id, rest)
                except StoreError as error:
                    # No queue: these tasks get nothing now and Label Studio asks again later.
                    log.error(
                        "project %s: cannot defer %d task(s): %s",
                        state.project_id,
                        len(rest),
                        error,
                    )
                    errors.extend(
                        {"task": t.get("id"), "error": f"not predicted in time, and {error}"}
                        for t in rest
                    )
                    results.extend([] for _ in rest)
                    break
                log.info(
                    "project %s: %d task(s) predicted in %.1f s; %d more continue in the "
                    "background (jobs %s)",
                    state.project_id,
                    index,
                    elapsed,
                    len(rest),
                    ", ".join(job_ids),
                )
                self.metrics.tasks_predicted.inc("deferred", amount=len(rest))
                results.extend([] for _ in rest)
                break
            task_started = time.monotonic()
            try:
                results.append(self._predict_task(task, schema, state, reference))
            except TASK_INPUT_ERRORS as error:
                log.warning("project %s task %s: %s", state.project_id, task.get("id"), error)
                errors.append({"task": task.get("id"), "error": str(error)})
                self.metrics.tasks_predicted.inc("error")
                results.append([])
            except StoreError:
                raise
            except Exception as error:
                # An engine bug on one image must not cost the other tasks of the batch.
                log.exception(
                    "project %s task %s: prediction failed", state.project_id, task.get("id")
                )
                errors.append(
                    {
                        "task": task.get("id"),
                        "error": f"internal error: {type(error).__name__}: {error}",
                    }
                )
                self.metrics.tasks_predicted.inc("error")
                results.append([])
            slowest = max(slowest, time.monotonic() - task_started)
        response = {"results": results, "model_version": version}
        if errors:
            response["errors"] = errors
        return response

    def _predict_task(
        self, task: dict, schema: LabelingSchema, state: ProjectState, reference: Reference
    ) -> dict:
        started = time.perf_counter()
        image = self._load_task_image(task, schema, state)
        labels = [label for label in reference.labels if label in schema.output.labels]
        segmenter = self.runtime.segmenter()
        with self.runtime.inference_slot():
            instances = segmenter.segment(reference, image, labels=labels)
        result = instances_to_results(instances, schema, image.shape[:2], state.model_version)
        seconds = time.perf_counter() - started
        self.metrics.task_seconds.observe(seconds)
        self.metrics.tasks_predicted.inc("ok" if result else "empty")
        log.info(
            "project %s task %s: %d instance(s) in %.2f s",
            state.project_id,
            task.get("id"),
            len(result),
            seconds,
        )
        return {
            "result": result,
            "score": task_score(instances),
            "model_version": state.model_version,
        }

    def _predict_interactive(
        self, tasks: list[dict], context: dict, schema: LabelingSchema, state: ProjectState
    ) -> dict:
        """Smart tools: SAM's mask for the keypoints / rectangle just drawn (from the cached
        embedding when the image was seen before)."""
        if len(tasks) != 1:
            raise BadRequest(f"smart-tool requests carry one task, got {len(tasks)}")
        task = tasks[0]
        try:
            image = self._load_task_image(task, schema, state)
            points, point_labels, box, label = interactive_prompts(context, schema, image.shape[:2])
        except TASK_INPUT_ERRORS as error:
            raise BadRequest(f"smart tool on task {task.get('id')}: {error}") from error
        segmenter = self.runtime.segmenter()
        with self.runtime.inference_slot():
            mask, predicted_iou = segmenter.segment_from_prompts(image, points, point_labels, box)
        instances = [Instance.from_mask(label, mask, predicted_iou)] if mask.any() else []
        result = instances_to_results(instances, schema, image.shape[:2], state.model_version)
        entry = {
            "result": result,
            "score": task_score(instances),
            "model_version": state.model_version,
        }
        return {"results": [entry], "model_version": state.model_version}

    def predict_and_post(self, tasks: list[dict]) -> int:
        """Background: predict ``tasks`` and store each prediction in Label Studio
        (``POST /api/predictions/``). Returns how many were posted."""
        state = self._load_state()
        if state.reference is None:
            log.warning("project %s: no reference; background prediction skipped", state.project_id)
            return 0
        schema = self._schema(state)
        reference = self.runtime.reference(state.project_id, state.model_version, state.reference)
        api = self._api(state)
        posted = 0
        for task in tasks:
            try:
                entry = self._predict_task(task, schema, state, reference)
                api.post_prediction(
                    task["id"], entry["result"], entry["score"], entry["model_version"]
                )
            except StoreError:
                raise
            except Exception as error:  # one failing task must not stop the others
                self.metrics.predictions_posted.inc("failed")
                log.warning(
                    "project %s task %s: background prediction failed: %s: %s",
                    state.project_id,
                    task.get("id"),
                    type(error).__name__,
                    error,
                )
                continue
            posted += 1
            self.metrics.predictions_posted.inc("ok")
        log.info(
            "project %s: %d/%d background prediction(s) posted",
            state.project_id,
            posted,
            len(tasks),
        )
        return posted

    # ----------------------------------------------------------------------------------
    # Webhook handling
    # ----------------------------------------------------------------------------------
    def _record_label_config(self) -> ProjectState:
        label_config = self.label_config
        if label_config:
            schema_of(label_config)  # an unusable config is refused (400), never stored

        def change(state: ProjectState) -> ProjectState | None:
            if not label_config or state.label_config == label_config:
                return None
            state.label_config = label_config
            state.label_config_hash = config_hash(label_config)
            return state

        return self._update_state(change, reason="label config")

    def _validate_annotation(self, annotation: dict, schema: LabelingSchema) -> None:
        """Reject an unusable annotation before storing it (decodes its masks at the size it
        was drawn at; rectangles / keypoints count as their footprint here).

        Raises:
            BadRequest: no results, sizes that disagree or are not numbers, corrupt results.
            LimitExceeded: drawn on more than ``MAX_IMAGE_PIXELS``, or more than
                ``MAX_INSTANCES_PER_LABEL`` regions of one label.
        """
        results = annotation.get("result")
        if not isinstance(results, list) or not results:
            raise BadRequest(f"annotation {annotation.get('id')} has no results")
        regions: dict[str, int] = {}
        for result in results:
            if not isinstance(result, dict) or not isinstance(result.get("type"), str):
                continue
            value = result.get("value")
            labels = value.get(result["type"]) if isinstance(value, dict) else None
            for label in labels if isinstance(labels, list) else ():
                if isinstance(label, str):
                    regions[label] = regions.get(label, 0) + 1
        crowded = {
            label: n for label, n in regions.items() if n > self.settings.max_instances_per_label
        }
        if crowded:
            label, count = max(crowded.items(), key=lambda item: item[1])
            raise LimitExceeded(
                f"annotation {annotation.get('id')}: {count} regions of label {label!r}; the "
                f"limit is {self.settings.max_instances_per_label} (MAX_INSTANCES_PER_LABEL)"
            )
        sizes = set()
        for result in results:
            if not isinstance(result, dict):
                continue
            height, width = result.get("original_height"), result.get("original_width")
            if height is None and width is None:
                continue
            if not all(
                isinstance(side, (int, float)) and not isinstance(side, bool) and side >= 1
                for side in (height, width)
            ):
                raise BadRequest(
                    f"annotation {annotation.get('id')}: original_height and original_width "
                    f"must be positive numbers, got {height!r} and {width!r}"
                )
            sizes.add((height, width))
        if len(sizes) > 1:
            raise BadRequest(
                f"annotation {annotation.get('id')}: its results disagree on the image size "
                f"({sorted(sizes)})"
            )
        if not sizes:
            return  # sizes unknown until the image is downloaded; the training checks then
        (height, width) = sizes.pop()
        if height * width > self.settings.max_image_pixels:
            raise LimitExceeded(
                f"annotation {annotation.get('id')}: drawn on a {width:g}x{height:g} image, over "
                f"the limit of {self.settings.max_image_pixels} pixels (MAX_IMAGE_PIXELS)"
            )
        try:
            annotation_to_masks(
                results, schema, (int(height), int(width)), _footprint_masker((height, width))
            )
        except (AnnotationError, ValueError, TypeError) as error:
            raise BadRequest(f"annotation {annotation.get('id')}: {error}") from error

    def _receive_annotations(self, pairs: list[tuple[Any, Any]], event: str) -> dict:
        """Validate every annotation of the event, then store them all and request a training.
        A refused event (any annotation unusable, or the label config) writes nothing."""
        state = self._load_state()
        schema = self._schema(state)
        accepted: list[tuple[str, dict]] = []
        skipped: list[str] = []
        for annotation, task in pairs:
            if not isinstance(annotation, dict) or annotation.get("id") is None:
                raise BadRequest(f"{event} without an annotation object with an 'id'")
            annotation_id = annotation["id"]
            if isinstance(annotation_id, bool) or not isinstance(annotation_id, (int, str)):
                raise BadRequest(f"{event}: annotation id {str(annotation_id)[:40]!r} is not an id")
            task_ref = annotation.get("task")
            if task_ref is not None and (
                isinstance(task_ref, bool) or not isinstance(task_ref, (int, str))
            ):
                raise BadRequest(
                    f"{event}: annotation {annotation_id} names task {str(task_ref)[:40]!r}, "
                    "not a task id"
                )
            if annotation.get("was_cancelled"):
                skipped.append(f"annotation {annotation_id} is a skipped task")
                continue
            self._validate_annotation(annotation, schema)
            if not isinstance(task, dict):
                task = {"id": annotation.get("task")}
            payload = {
                "annotation": {
                    k: annotation.get(k)
                    for k in ("id", "result", "task", "created_at", "updated_at", "completed_by")
                },
                "task": {k: task.get(k) for k in ("id", "data") if k in task},
                "received_at": time.time(),
            }
            accepted.append((f"annotation:{annotation_id}", payload))
        stored: list[str] = []
        if accepted:
            self._record_label_config()
        for key, payload in accepted:
            try:
                self.store.put_example(self._project(), key, payload)
            except StoreError as error:
                raise store_failure(error) from error
            stored.append(key)
        if stored:
            # An updated annotation is learned again (if it is the reference, the reference
            # is rebuilt): it leaves the applied set.
            self._update_state(
                lambda s: (
                    self._forget_applied(s, stored)
                    if set(stored) & set(s.applied_examples)
                    else None
                ),
                reason="annotation updated",
            )
            self.runtime.jobs.request_training(self._project())
        for reason in skipped:
            log.info("project %s: %s; ignored", self.project_id, reason)
        log.info("project %s: %s stored %s; training requested", self.project_id, event, stored)
        return {
            "status": "training queued" if stored else "ignored",
            "project": self.project_id,
            "stored": stored,
            "skipped": skipped,
        }

    @staticmethod
    def _forget_applied(state: ProjectState, keys: list[str]) -> ProjectState:
        state.applied_examples = [k for k in state.applied_examples if k not in keys]
        return state

    def _delete_annotations(self, annotations: Any) -> dict:
        if not isinstance(annotations, list):
            raise BadRequest("ANNOTATIONS_DELETED without an 'annotations' list")
        keys = [f"annotation:{a['id']}" for a in annotations if isinstance(a, dict) and "id" in a]
        try:
            deleted = self.store.delete_examples(self._project(), keys)
        except StoreError as error:
            raise store_failure(error) from error
        state = self._update_state(
            lambda s: (
                self._forget_applied(s, keys) if set(keys) & set(s.applied_examples) else None
            ),
            reason="annotations deleted",
        )
        source = (state.reference_source or {}).get("key")
        if source in keys:
            log.info(
                "project %s: the reference's annotation was deleted; rebuilding", self.project_id
            )
        if deleted:
            self.runtime.jobs.request_training(self._project())
        return {"status": "deleted", "project": self.project_id, "deleted": deleted}

    # ----------------------------------------------------------------------------------
    # Training (background)
    # ----------------------------------------------------------------------------------
    def _example_loader(self, schema: LabelingSchema, state: ProjectState, api_holder: dict):
        def load(example: TrainingExample) -> Example:
            task = example.task
            if not isinstance(task.get("data"), dict):
                if "api" not in api_holder:
                    api_holder["api"] = self._api(state)
                task = api_holder["api"].task(task.get("id") or example.annotation.get("task"))
                example.task = task
            image = self._load_task_image(task, schema, state)
            segmenter = self.runtime.segmenter()

            def sam(points, point_labels, box):
                with self.runtime.inference_slot():
                    return segmenter.segment_from_prompts(image, points, point_labels, box)[0]

            masks = annotation_to_masks(
                example.annotation.get("result") or [], schema, image.shape[:2], sam
            )
            return Example(image=image, masks=masks)

        return load

    def _sync_examples_from_label_studio(self, state: ProjectState) -> None:
        """Replace the stored examples by the project's annotations in Label Studio."""
        api = self._api(state)
        fresh: dict[str, dict] = {}
        for task in api.annotated_tasks(self._project()):
            for annotation in task.get("annotations") or []:
                if annotation.get("was_cancelled") or not annotation.get("result"):
                    continue
                fresh[f"annotation:{annotation['id']}"] = {
                    "annotation": {**annotation, "task": task.get("id")},
                    "task": {"id": task.get("id"), "data": task.get("data")},
                    "received_at": time.time(),
                }
        stale = set(self.store.examples(self._project())) - set(fresh)
        self.store.delete_examples(self._project(), stale)
        for key, payload in fresh.items():
            self.store.put_example(self._project(), key, payload)
        log.info(
            "project %s: %d annotation(s) fetched from Label Studio (%d stale removed)",
            self._project(),
            len(fresh),
            len(stale),
        )

    def train(self, full: bool = False, fence: tuple[str, str] | None = None) -> ProjectState:
        """Bring the project's reference and learned state up to date (background job).

        Builds the reference from the first usable annotation when there is none (or when its
        annotation changed or was deleted, or ``full``), then hands later annotations to
        :meth:`learn`. A failure leaves the previous state and version serving.

        Args:
            fence: ``(lock, token)`` of the training lease: the result is written only while
                that lease is held (see ``backend.jobs``).
        """
        started = time.perf_counter()
        project_id = self._project()
        requested: float | None = None
        try:
            state = self.store.load(project_id)
            requested = state.training_requested_at
            schema = self._schema(state)
            if full:
                self._sync_examples_from_label_studio(state)
            stored = sorted(self.store.examples(project_id).items(), key=_example_order)
            # An example stored again after it was learned (e.g. an annotation updated while
            # the last training ran, which then marked the old content applied) is learned anew.
            relearn = {
                key
                for key, payload in stored
                if state.applied_stamps.get(key, payload.get("received_at"))
                != payload.get("received_at")
            }
            state.applied_examples = [k for k in state.applied_examples if k not in relearn]
            segmenter = self.runtime.segmenter()
            loader = self._example_loader(schema, state, {})
            examples = [
                TrainingExample(key, p.get("annotation", {}), p.get("task") or {}, loader)
                for key, p in stored
            ]
            keys = {e.key for e in examples}
            source = (state.reference_source or {}).get("key")
            reference = None
            if state.reference is not None and not full:
                reference = Reference.from_bytes(state.reference)  # a private copy to modify
            rebuild = (
                reference is None
                or source not in keys
                or source not in state.applied_examples
                or reference.model_id != segmenter.model_id
            )
            applied = [] if rebuild else list(state.applied_examples)
            failures: dict[str, str] = {}
            if rebuild:
                reference, source = None, None
                state.learned = {}  # learned state is relearned from scratch with the reference
                for example in examples:
                    try:
                        reference = segmenter.build_reference([example.load()])
                    except TASK_INPUT_ERRORS as error:
                        failures[example.key] = str(error)
                        log.warning(
                            "project %s %s cannot be the reference: %s",
                            project_id,
                            example.key,
                            error,
                        )
                        continue
                    source = example.key
                    applied = [example.key]
                    break
            pending = [e for e in examples if e.key not in applied and e.key not in failures]
            learned_something = False
            if reference is not None and pending:
                usable = [e for e in examples if e.key not in failures]
                learned = self.learn(state, reference, usable)
                if learned is not None:
                    reference, learned_something = learned, True
                    applied += [e.key for e in pending]
        except Exception as error:
            self._training_failed(project_id, error, started, requested)
            raise

        if reference is None and failures:
            # Nothing usable now (Label Studio down, images failing): keep serving what we have.
            error = RuntimeError("no annotation could be used: " + "; ".join(failures.values()))
            self._training_failed(project_id, error, started, requested)
            return self.store.load(project_id)

        if not rebuild and not learned_something:
            log.info("project %s: nothing new to learn (%d pending)", project_id, len(pending))
            self.metrics.trainings.inc("skipped")
            return self.store.update(
                project_id,
                lambda current: self._request_served(current, requested),
                reason="nothing to learn",
                fence=fence,
            )
        if reference is not None:
            self._cap_shots(reference)
        version = model_version_of(reference, state.learned, self.settings.mode)
        blob = reference.to_bytes() if reference is not None else None
        source_info = None
        if source is not None:
            annotation = next(e.annotation for e in examples if e.key == source)
            source_info = {
                "key": source,
                "annotation_id": annotation.get("id"),
                "task_id": annotation.get("task"),
            }
        reason = "full retraining" if full else ("reference built" if rebuild else "learned")

        def change(current: ProjectState) -> ProjectState:
            current.reference = blob
            current.reference_source = source_info
            current.applied_examples = applied
            received = {key: payload.get("received_at") for key, payload in stored}
            current.applied_stamps = {key: received.get(key) for key in applied}
            current.model_version = version
            current.learned = state.learned
            current.last_error = None
            self._request_served(current, requested)
            return current

        try:
            new_state = self.store.update(project_id, change, reason=reason, fence=fence)
        except StoreError as error:
            self._training_failed(project_id, error, started, requested)
            raise
        seconds = time.perf_counter() - started
        self.metrics.trainings.inc("ok")
        self.metrics.training_seconds.observe(seconds)
        log.info(
            "project %s: %s from %d annotation(s) (%d learned, %d unusable) in %.1f s; "
            "model version %s -> %s",
            project_id,
            reason,
            len(examples),
            len(applied),
            len(failures),
            seconds,
            state.model_version,
            version,
        )
        return new_state

    @staticmethod
    def _request_served(state: ProjectState, requested: float | None) -> ProjectState | None:
        """Clear the training request this training started from (a later request stays: its
        own training is queued). ``None`` (nothing to write) when there is nothing to clear."""
        if state.training_requested_at is None or state.training_requested_at != requested:
            return None
        state.training_requested_at = None
        return state

    def _cap_shots(self, reference: Reference) -> None:
        """Keep at most ``MAX_SHOTS_PER_LABEL`` shots per label, saying so: the reference's own
        (base) shots first, then the newest learned ones."""
        limit = self.settings.max_shots_per_label
        for name, label_ref in reference.labels.items():
            if len(label_ref.shots) > limit:
                log.warning(
                    "project %s label %r: %d reference shots, over the limit of %d "
                    "(MAX_SHOTS_PER_LABEL); keeping the newest %d",
                    self.project_id,
                    name,
                    len(label_ref.shots),
                    limit,
                    limit,
                )
                base = min(label_ref.base_shots or 0, limit)
                learned = label_ref.shots[base:][-(limit - base) :] if limit > base else []
                label_ref.shots = label_ref.shots[:base] + learned
                if label_ref.base_shots is not None:
                    label_ref.base_shots = base

    def _training_failed(
        self,
        project_id: str,
        error: BaseException,
        started: float,
        requested: float | None = None,
    ) -> None:
        self.metrics.trainings.inc("failed")
        self.metrics.training_seconds.observe(time.perf_counter() - started)
        log.error("project %s: training failed, previous version kept: %s", project_id, error)
        if isinstance(error, (StoreUnavailable, LockLost)):
            # Unreachable store: the request mark stays, and the training is resumed once the
            # store is back. Lost lease: another trainer owns the project now.
            return
        message = f"{type(error).__name__}: {error}"

        def change(state: ProjectState) -> ProjectState:
            state.last_error = message[:1000]
            # A clean failure is recorded, not retried in a loop: the next event retrains.
            self._request_served(state, requested)
            return state

        try:
            self.store.update(project_id, change, reason="training failed")
        except StoreError:
            log.error("project %s: could not record the training failure", project_id)
