"""Prediction: a ``/predict`` batch within the time budget (the rest continues in the
background), smart-tool (interactive) masks, and background predictions posted to Label Studio.

:func:`predict` and :func:`predict_and_post` take the project's context and build from it what
the steps below take as plain arguments (:class:`TaskPredictor`, the store, a job queue).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from labelstudio import LabelingSchema, instances_to_results, interactive_prompts, task_score
from labelstudio.api import LabelStudioAPI, LabelStudioAPIError
from matcher_core import Instance, Reference

from .errors import TASK_INPUT_ERRORS, BadRequest, LimitExceeded, ServiceUnavailable
from .leases import resume_stalled_training
from .project import ProjectContext
from .store import WAITING_VERSION, ProjectState, StateStore, StoreError, key_part
from .telemetry import Metrics

if TYPE_CHECKING:
    from matcher_core import OneShotSegmenter

    from .runtime import Runtime

log = logging.getLogger("oneshot.model")


@dataclass(frozen=True)
class TaskPredictor:
    """What predicting a project's tasks takes: the served version and its reference, the label
    config, the engine, how a task's image is loaded, and the metrics."""

    project_id: str
    model_version: str
    reference: Reference | None
    """``None`` for smart-tool requests (they need no reference)."""
    schema: LabelingSchema
    engine: Callable[[], OneShotSegmenter]
    """The process's segmenter (loaded on first call)."""
    inference_slot: Callable[[], AbstractContextManager]
    load_image: Callable[[dict], np.ndarray]
    """A task -> its ``(H, W, 3)`` uint8 RGB image (raises ``TASK_INPUT_ERRORS``)."""
    metrics: Metrics
    encoder_batch: int = 0
    """Tasks whose images go through the encoders together (``ENCODER_BATCH``; 0: 8 on a GPU,
    1 on a CPU, where a batch saves nothing measurable)."""


def task_predictor(
    project: ProjectContext,
    state: ProjectState,
    schema: LabelingSchema,
    reference: Reference | None,
) -> TaskPredictor:
    """The :class:`TaskPredictor` of ``project`` as ``state`` serves it."""
    runtime = project.runtime
    return TaskPredictor(
        project_id=state.project_id,
        model_version=state.model_version,
        reference=reference,
        schema=schema,
        engine=runtime.segmenter,
        inference_slot=runtime.inference_slot,
        load_image=partial(project.load_task_image, schema=schema, state=state),
        metrics=project.metrics,
        encoder_batch=project.settings.encoder_batch,
    )


def predict(project: ProjectContext, tasks: list[dict], context: dict | None = None) -> dict:
    """``/predict`` (see :meth:`backend.model.OneShotModel.predict`): smart-tool requests, empty
    predictions while there is no reference, else the batch.

    Raises:
        BadRequest: malformed tasks or an unusable label config.
        LimitExceeded: more than ``MAX_TASKS_PER_REQUEST`` tasks.
        BackendError: the state store is unreachable.
    """
    check_tasks(tasks, project.settings.max_tasks_per_request)
    state = project.load_state()
    resume_stalled_training(project.runtime, state)
    schema = project.schema(state)
    if context and isinstance(context, dict) and context.get("result"):
        return predict_interactive(task_predictor(project, state, schema, None), tasks, context)
    if not tasks:
        return {"results": [], "model_version": state.model_version}
    if state.reference is None:
        return waiting_answer(state, tasks, project.metrics)
    if project.label_config and state.label_config is None:
        # Background jobs read the config from the store (normally /setup put it there). Only
        # for a project with a reference: a /predict must not create a project that was never
        # set up.
        state = project.record_label_config()
    runtime = project.runtime
    reference = runtime.reference(state.project_id, state.model_version, state.reference)
    segmenter = loaded_segmenter(runtime)
    if reference.model_id != segmenter.model_id:
        answer = rebuilding_answer(state, tasks, reference, segmenter.model_id)
        runtime.jobs.request_training(state.project_id)
        return answer
    defer = None
    if all(project.connection(state)):

        def defer(rest: list[dict]) -> list[str]:
            return runtime.jobs.submit_predictions(state.project_id, rest)

    predictor = task_predictor(project, state, schema, reference)
    return predict_batch(predictor, tasks, project.settings.predict_time_budget, defer)


def loaded_segmenter(runtime: Runtime) -> OneShotSegmenter:
    """The process's segmenter.

    Raises:
        ServiceUnavailable: the models cannot be loaded (the message says why).
    """
    try:
        return runtime.segmenter()
    except Exception as error:
        raise ServiceUnavailable(runtime.model_problem or str(error)) from error


def check_tasks(tasks: Any, limit: int) -> None:
    """Refuse what is not a list of task objects, or more than ``limit`` of them.

    Raises:
        BadRequest, LimitExceeded: as said.
    """
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise BadRequest("'tasks' must be a list of task objects")
    if len(tasks) > limit:
        raise LimitExceeded(
            f"{len(tasks)} tasks in one request; the limit is {limit} (MAX_TASKS_PER_REQUEST)"
        )


def waiting_answer(state: ProjectState, tasks: list[dict], metrics: Metrics) -> dict:
    """The answer while a project has no reference: no prediction per task."""
    log.info(
        "project %s: no reference yet, %d task(s) get no prediction (nothing is stored, so "
        "Label Studio asks again once there is one): %s",
        state.project_id,
        len(tasks),
        why_no_reference(state),
    )
    metrics.tasks_predicted.inc("no_reference", amount=len(tasks))
    # A per-task [] stores nothing in Label Studio: no empty "waiting" prediction that would
    # stay on the task forever.
    return {"results": [[] for _ in tasks], "model_version": WAITING_VERSION}


def rebuilding_answer(
    state: ProjectState, tasks: list[dict], reference: Reference, model_id: str
) -> dict:
    """The answer while a reference built with other models is rebuilt (the caller requests
    that training)."""
    log.error(
        "project %s: its reference was built with other models (%s; now %s); "
        "rebuilding it from the stored annotations",
        state.project_id,
        reference.model_id,
        model_id,
    )
    errors = [
        {"task": t.get("id"), "error": "reference is being rebuilt for the current models"}
        for t in tasks
    ]
    return {"results": [[] for _ in tasks], "model_version": state.model_version, "errors": errors}


def why_no_reference(state: ProjectState) -> str:
    """Why a project has no reference yet, in words for the log."""
    if state.last_error:
        return f"its training failed: {state.last_error}"
    if state.training_requested_at is not None:
        return "an annotation was received and the reference is being built"
    return "submit one annotation with masks to start pre-labeling"


def predict_batch(
    predictor: TaskPredictor,
    tasks: list[dict],
    budget: float,
    defer: Callable[[list[dict]], list[str]] | None,
) -> dict:
    """Predict ``tasks`` in order until ``budget`` seconds (``PREDICT_TIME_BUDGET``) would be
    exceeded by one more (judged by the slowest task so far); the rest are handed to ``defer``
    (predicted and posted in the background; ``None`` when Label Studio cannot be reached) and
    answered with empty lists now. Images go through the encoders in batches
    (:func:`encode_ahead`) no larger than what the budget leaves room for."""
    started = time.monotonic()
    results: list[Any] = []
    errors: list[dict] = []
    slowest = 0.0
    predictor, batch = with_encoder_batches(predictor)
    encoded_until, encoding_share = 0, 0.0
    for index, task in enumerate(tasks):
        elapsed = time.monotonic() - started
        if index > 0 and defer is not None and elapsed + slowest > budget:
            rest = tasks[index:]
            errors.extend(defer_rest(predictor, defer, rest, index, elapsed))
            results.extend([] for _ in rest)
            break
        if index >= encoded_until:
            size = batch if defer is None else batch_within(batch, budget - elapsed, slowest)
            encoding_started = time.monotonic()
            encode_ahead(predictor, tasks[index : index + size])
            encoding_share = (time.monotonic() - encoding_started) / size
            encoded_until = index + size
        task_started = time.monotonic()
        result, error = predict_or_report(predictor, task)
        results.append(result)
        if error is not None:
            errors.append(error)
        slowest = max(slowest, time.monotonic() - task_started + encoding_share)
    response = {"results": results, "model_version": predictor.model_version}
    if errors:
        response["errors"] = errors
    return response


def batch_within(batch: int, time_left: float, slowest: float) -> int:
    """How many of the next tasks to encode together: ``batch``, but no more than the time left
    is expected to predict (one before any task has been timed)."""
    if slowest <= 0:
        return 1
    return max(1, min(batch, int(time_left / slowest)))


def with_encoder_batches(predictor: TaskPredictor) -> tuple[TaskPredictor, int]:
    """The batch size for :func:`encode_ahead` (:attr:`TaskPredictor.encoder_batch` resolved for
    the engine's device; 1 when the engine cannot load, whose tasks then report it) and a
    predictor whose image loader keeps the images of the batch being predicted, so that each is
    downloaded and decoded once."""
    batch = predictor.encoder_batch
    if batch <= 0:
        try:
            on_gpu = predictor.engine().device.type == "cuda"
        except Exception:  # each task reports the engine's failure
            on_gpu = False
        batch = GPU_ENCODER_BATCH if on_gpu else 1
    return replace(predictor, load_image=_BatchImages(predictor.load_image)), batch


GPU_ENCODER_BATCH = 8
"""Images per encoder call on a GPU when ``ENCODER_BATCH`` is 0 (8 of 854x480 fit with vit_h)."""


class _BatchImages:
    """A task image loader that remembers the images of the current batch (by task object), and
    the error of one that could not be loaded, so that no image is fetched twice."""

    def __init__(self, load: Callable[[dict], np.ndarray]) -> None:
        self.load = load
        self.loaded: dict[int, np.ndarray | Exception] = {}

    def __call__(self, task: dict) -> np.ndarray:
        image = self.loaded.pop(id(task), None)
        if image is None:
            return self.load(task)
        if isinstance(image, Exception):
            raise image
        return image

    def keep(self, tasks: list[dict]) -> list[np.ndarray]:
        """Load ``tasks``' images (forgetting the previous batch) and return those that loaded;
        a task whose image failed gets that error when it is predicted."""
        self.loaded = {}
        for task in tasks:
            try:
                self.loaded[id(task)] = self.load(task)
            except StoreError:
                raise
            except Exception as error:
                self.loaded[id(task)] = error
        return [image for image in self.loaded.values() if not isinstance(image, Exception)]


def encode_ahead(predictor: TaskPredictor, tasks: list[dict]) -> None:
    """Run the encoders once over the images of ``tasks`` (the engine's cache keeps the
    features for the tasks' predictions); a no-op for one task (or a predictor that did not go
    through :func:`with_encoder_batches`). A failure is logged: each task then encodes, and
    reports, on its own."""
    if len(tasks) < 2 or not isinstance(predictor.load_image, _BatchImages):
        return  # one task: nothing to batch (its image is loaded when it is predicted)
    images = predictor.load_image.keep(tasks)
    if len(images) < 2:
        return
    try:
        segmenter = predictor.engine()
        with predictor.inference_slot():
            segmenter.features_many(images, batch_size=len(images))
    except Exception as error:
        log.warning(
            "project %s: encoding %d images together failed (%s: %s); encoding one by one",
            predictor.project_id,
            len(images),
            type(error).__name__,
            error,
        )


def defer_rest(
    predictor: TaskPredictor,
    defer: Callable[[list[dict]], list[str]],
    rest: list[dict],
    done: int,
    elapsed: float,
) -> list[dict]:
    """Hand ``rest`` to the background; the per-task errors when it cannot be (no queue: these
    tasks get nothing now and Label Studio asks again later)."""
    project_id = predictor.project_id
    try:
        job_ids = defer(rest)
    except StoreError as error:
        log.error("project %s: cannot defer %d task(s): %s", project_id, len(rest), error)
        return [{"task": t.get("id"), "error": f"not predicted in time, and {error}"} for t in rest]
    log.info(
        "project %s: %d task(s) predicted in %.1f s; %d more continue in the background (jobs %s)",
        project_id,
        done,
        elapsed,
        len(rest),
        ", ".join(job_ids),
    )
    predictor.metrics.tasks_predicted.inc("deferred", amount=len(rest))
    return []


def predict_or_report(predictor: TaskPredictor, task: dict) -> tuple[Any, dict | None]:
    """One task's prediction entry, or ``[]`` and the error that stopped it (an unusable image,
    or an engine bug on one image, which must not cost the other tasks of the batch).

    Raises:
        StoreError: the state store failed.
    """
    try:
        return predict_task(predictor, task), None
    except TASK_INPUT_ERRORS as error:
        log.warning("project %s task %s: %s", predictor.project_id, task.get("id"), error)
        message = str(error)
    except StoreError:
        raise
    except Exception as error:
        log.exception("project %s task %s: prediction failed", predictor.project_id, task.get("id"))
        message = f"internal error: {type(error).__name__}: {error}"
    predictor.metrics.tasks_predicted.inc("error")
    return [], {"task": task.get("id"), "error": message}


def predict_task(predictor: TaskPredictor, task: dict) -> dict:
    """One task's prediction entry ``{"result": [...], "score": s, "model_version": v}``.

    Raises:
        FetchError, ImageError, ValueError: the task's image is unusable.
    """
    started = time.perf_counter()
    schema, reference = predictor.schema, predictor.reference
    assert reference is not None, "a task is predicted from a reference"
    image = predictor.load_image(task)
    labels = [label for label in reference.labels if label in schema.output.labels]
    segmenter = predictor.engine()
    with predictor.inference_slot():
        instances = segmenter.segment(reference, image, labels=labels)
    result = instances_to_results(instances, schema, image.shape[:2], predictor.model_version)
    seconds = time.perf_counter() - started
    predictor.metrics.task_seconds.observe(seconds)
    predictor.metrics.tasks_predicted.inc("ok" if result else "empty")
    log.info(
        "project %s task %s: %d instance(s) in %.2f s",
        predictor.project_id,
        task.get("id"),
        len(result),
        seconds,
    )
    return {
        "result": result,
        "score": task_score(instances),
        "model_version": predictor.model_version,
    }


def predict_interactive(predictor: TaskPredictor, tasks: list[dict], context: dict) -> dict:
    """Smart tools: SAM's mask for the keypoints / rectangle just drawn (from the cached
    embedding when the image was seen before).

    Raises:
        BadRequest: not exactly one task, or its image or prompts are unusable.
    """
    if len(tasks) != 1:
        raise BadRequest(f"smart-tool requests carry one task, got {len(tasks)}")
    task, schema, version = tasks[0], predictor.schema, predictor.model_version
    try:
        image = predictor.load_image(task)
        points, point_labels, box, label = interactive_prompts(context, schema, image.shape[:2])
    except TASK_INPUT_ERRORS as error:
        raise BadRequest(f"smart tool on task {task.get('id')}: {error}") from error
    segmenter = predictor.engine()
    with predictor.inference_slot():
        mask, predicted_iou = segmenter.segment_from_prompts(image, points, point_labels, box)
    instances = [Instance.from_mask(label, mask, predicted_iou)] if mask.any() else []
    result = instances_to_results(instances, schema, image.shape[:2], version)
    entry = {"result": result, "score": task_score(instances), "model_version": version}
    return {"results": [entry], "model_version": version}


POST_CLAIM_TTL = 24 * 3600.0
"""Seconds a claim to post a (task, model version) prediction is kept: past it, the listing of the
task's predictions that every post starts with is what prevents a duplicate."""


def post_claim_name(project_id: str, task_id: Any, model_version: str) -> str:
    """The store lock that claims posting ``model_version``'s prediction of a task."""
    return f"posted:{project_id}:{key_part(task_id, 'task id')}:{model_version}"


def post_once(
    store: StateStore, project_id: str, api: LabelStudioAPI, task_id: Any, entry: dict
) -> dict | None:
    """Post ``entry`` on the task unless another attempt claimed it first; returns Label Studio's
    prediction, or None when it was claimed elsewhere.

    The claim (a store lock, shared by the processes and machines on one store) is taken before
    posting: a rerun of the job or a concurrent worker, arriving while Label Studio still holds
    the first post unstored, cannot see that post in the task's list, but sees the claim. A post
    that certainly stored nothing gives the claim back, so a later run may post; one whose fate
    is unknown keeps it (see ``labelstudio.api``: at most once).

    Raises:
        LabelStudioAPIError, InvalidKey: the post failed, or the task id cannot name a claim.
    """
    name = post_claim_name(project_id, task_id, entry["model_version"])
    if store.acquire_lock(name, POST_CLAIM_TTL) is None:
        log.info(
            "project %s task %s: a prediction of %s was already posted or is being posted; "
            "not posted again",
            project_id,
            task_id,
            entry["model_version"],
        )
        return None
    try:
        return api.post_prediction(task_id, entry["result"], entry["score"], entry["model_version"])
    except LabelStudioAPIError as error:
        if not error.maybe_done:
            store.release_lock(name)
        raise


def predict_and_post(project: ProjectContext, tasks: list[dict]) -> int:
    """Background: predict ``tasks`` and store each prediction in Label Studio
    (``POST /api/predictions/``). Returns how many were posted; a failing task is counted
    and logged, and the others go on."""
    state = project.load_state()
    if state.reference is None:
        log.warning("project %s: no reference; background prediction skipped", state.project_id)
        return 0
    schema = project.schema(state)
    reference = project.runtime.reference(state.project_id, state.model_version, state.reference)
    predictor, batch = with_encoder_batches(task_predictor(project, state, schema, reference))
    api = project.api(state)
    posted = 0
    for start in range(0, len(tasks), batch):
        chunk = tasks[start : start + batch]
        encode_ahead(predictor, chunk)
        posted += sum(post_prediction(predictor, project.store, api, task) for task in chunk)
    log.info(
        "project %s: %d/%d background prediction(s) posted",
        state.project_id,
        posted,
        len(tasks),
    )
    return posted


def post_prediction(
    predictor: TaskPredictor, store: StateStore, api: LabelStudioAPI, task: dict
) -> bool:
    """Predict ``task`` and post it once (:func:`post_once`); whether it was posted now. A
    failure is counted and logged, never raised (but a store failure).

    Raises:
        StoreError: the state store failed.
    """
    metrics = predictor.metrics
    try:
        entry = predict_task(predictor, task)
        if post_once(store, predictor.project_id, api, task["id"], entry) is None:
            metrics.predictions_posted.inc("already_posted")
            return False
    except StoreError:
        raise
    except Exception as error:  # one failing task must not stop the others
        metrics.predictions_posted.inc("failed")
        log.warning(
            "project %s task %s: background prediction failed: %s: %s",
            predictor.project_id,
            task.get("id"),
            type(error).__name__,
            error,
        )
        return False
    metrics.predictions_posted.inc("ok")
    return True
