"""Prediction: a ``/predict`` batch within the time budget (the rest continues in the
background), smart-tool (interactive) masks, and background predictions posted to Label Studio.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from labelstudio import LabelingSchema, instances_to_results, interactive_prompts, task_score
from labelstudio.api import LabelStudioAPI, LabelStudioAPIError
from matcher_core import Instance, Reference

from .errors import TASK_INPUT_ERRORS, BadRequest, LimitExceeded, ServiceUnavailable
from .leases import resume_stalled_training
from .project import ProjectContext
from .store import WAITING_VERSION, ProjectState, StoreError, key_part

log = logging.getLogger("oneshot.model")


def predict(project: ProjectContext, tasks: list[dict], context: dict | None = None) -> dict:
    """``/predict`` (see :meth:`backend.model.OneShotModel.predict`): smart-tool requests, empty
    predictions while there is no reference, else the batch.

    Raises:
        BadRequest: malformed tasks or an unusable label config.
        LimitExceeded: more than ``MAX_TASKS_PER_REQUEST`` tasks.
        BackendError: the state store is unreachable.
    """
    settings = project.settings
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise BadRequest("'tasks' must be a list of task objects")
    if len(tasks) > settings.max_tasks_per_request:
        raise LimitExceeded(
            f"{len(tasks)} tasks in one request; the limit is "
            f"{settings.max_tasks_per_request} (MAX_TASKS_PER_REQUEST)"
        )
    state = project.load_state()
    resume_stalled_training(project.runtime, state)
    schema = project.schema(state)
    if context and isinstance(context, dict) and context.get("result"):
        return predict_interactive(project, tasks, context, schema, state)
    if not tasks:
        return {"results": [], "model_version": state.model_version}
    if state.reference is None:
        log.info(
            "project %s: no reference yet, %d task(s) get no prediction (nothing is stored, so "
            "Label Studio asks again once there is one): %s",
            state.project_id,
            len(tasks),
            why_no_reference(state),
        )
        project.metrics.tasks_predicted.inc("no_reference", amount=len(tasks))
        # A per-task [] stores nothing in Label Studio: no empty "waiting" prediction that would
        # stay on the task forever.
        return {"results": [[] for _ in tasks], "model_version": WAITING_VERSION}
    if project.label_config and state.label_config is None:
        # Background jobs read the config from the store (normally /setup put it there). Only
        # for a project with a reference: a /predict must not create a project that was never
        # set up.
        state = project.record_label_config()
    return predict_batch(project, tasks, schema, state)


def why_no_reference(state: ProjectState) -> str:
    """Why a project has no reference yet, in words for the log."""
    if state.last_error:
        return f"its training failed: {state.last_error}"
    if state.training_requested_at is not None:
        return "an annotation was received and the reference is being built"
    return "submit one annotation with masks to start pre-labeling"


def predict_batch(
    project: ProjectContext, tasks: list[dict], schema: LabelingSchema, state: ProjectState
) -> dict:
    """Predict ``tasks`` in order until ``PREDICT_TIME_BUDGET`` would be exceeded by one more
    (judged by the slowest task so far); the rest are predicted and posted in the background
    when Label Studio can be reached, and answered with empty lists now."""
    runtime, metrics = project.runtime, project.metrics
    started = time.monotonic()
    version = state.model_version
    reference = runtime.reference(state.project_id, version, state.reference)
    try:
        segmenter = runtime.segmenter()
    except Exception as error:
        raise ServiceUnavailable(runtime.model_problem or str(error)) from error
    if reference.model_id != segmenter.model_id:
        log.error(
            "project %s: its reference was built with other models (%s; now %s); "
            "rebuilding it from the stored annotations",
            state.project_id,
            reference.model_id,
            segmenter.model_id,
        )
        runtime.jobs.request_training(state.project_id)
        errors = [
            {"task": t.get("id"), "error": "reference is being rebuilt for the current models"}
            for t in tasks
        ]
        return {"results": [[] for _ in tasks], "model_version": version, "errors": errors}

    budget = project.settings.predict_time_budget
    can_defer = all(project.connection(state))
    results: list[Any] = []
    errors: list[dict] = []
    slowest = 0.0
    for index, task in enumerate(tasks):
        elapsed = time.monotonic() - started
        if index > 0 and can_defer and elapsed + slowest > budget:
            rest = tasks[index:]
            try:
                job_ids = runtime.jobs.submit_predictions(state.project_id, rest)
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
            metrics.tasks_predicted.inc("deferred", amount=len(rest))
            results.extend([] for _ in rest)
            break
        task_started = time.monotonic()
        try:
            results.append(predict_task(project, task, schema, state, reference))
        except TASK_INPUT_ERRORS as error:
            log.warning("project %s task %s: %s", state.project_id, task.get("id"), error)
            errors.append({"task": task.get("id"), "error": str(error)})
            metrics.tasks_predicted.inc("error")
            results.append([])
        except StoreError:
            raise
        except Exception as error:
            # An engine bug on one image must not cost the other tasks of the batch.
            log.exception("project %s task %s: prediction failed", state.project_id, task.get("id"))
            errors.append(
                {
                    "task": task.get("id"),
                    "error": f"internal error: {type(error).__name__}: {error}",
                }
            )
            metrics.tasks_predicted.inc("error")
            results.append([])
        slowest = max(slowest, time.monotonic() - task_started)
    response = {"results": results, "model_version": version}
    if errors:
        response["errors"] = errors
    return response


def predict_task(
    project: ProjectContext,
    task: dict,
    schema: LabelingSchema,
    state: ProjectState,
    reference: Reference,
) -> dict:
    """One task's prediction entry ``{"result": [...], "score": s, "model_version": v}``.

    Raises:
        FetchError, ImageError, ValueError: the task's image is unusable.
    """
    started = time.perf_counter()
    image = project.load_task_image(task, schema, state)
    labels = [label for label in reference.labels if label in schema.output.labels]
    segmenter = project.runtime.segmenter()
    with project.runtime.inference_slot():
        instances = segmenter.segment(reference, image, labels=labels)
    result = instances_to_results(instances, schema, image.shape[:2], state.model_version)
    seconds = time.perf_counter() - started
    project.metrics.task_seconds.observe(seconds)
    project.metrics.tasks_predicted.inc("ok" if result else "empty")
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


def predict_interactive(
    project: ProjectContext,
    tasks: list[dict],
    context: dict,
    schema: LabelingSchema,
    state: ProjectState,
) -> dict:
    """Smart tools: SAM's mask for the keypoints / rectangle just drawn (from the cached
    embedding when the image was seen before).

    Raises:
        BadRequest: not exactly one task, or its image or prompts are unusable.
    """
    if len(tasks) != 1:
        raise BadRequest(f"smart-tool requests carry one task, got {len(tasks)}")
    task = tasks[0]
    try:
        image = project.load_task_image(task, schema, state)
        points, point_labels, box, label = interactive_prompts(context, schema, image.shape[:2])
    except TASK_INPUT_ERRORS as error:
        raise BadRequest(f"smart tool on task {task.get('id')}: {error}") from error
    segmenter = project.runtime.segmenter()
    with project.runtime.inference_slot():
        mask, predicted_iou = segmenter.segment_from_prompts(image, points, point_labels, box)
    instances = [Instance.from_mask(label, mask, predicted_iou)] if mask.any() else []
    result = instances_to_results(instances, schema, image.shape[:2], state.model_version)
    entry = {
        "result": result,
        "score": task_score(instances),
        "model_version": state.model_version,
    }
    return {"results": [entry], "model_version": state.model_version}


POST_CLAIM_TTL = 24 * 3600.0
"""Seconds a claim to post a (task, model version) prediction is kept: past it, the listing of the
task's predictions that every post starts with is what prevents a duplicate."""


def post_claim_name(project_id: str, task_id: Any, model_version: str) -> str:
    """The store lock that claims posting ``model_version``'s prediction of a task."""
    return f"posted:{project_id}:{key_part(task_id, 'task id')}:{model_version}"


def post_once(
    project: ProjectContext, api: LabelStudioAPI, task_id: Any, entry: dict
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
    store = project.store
    name = post_claim_name(project.require_project_id(), task_id, entry["model_version"])
    if store.acquire_lock(name, POST_CLAIM_TTL) is None:
        log.info(
            "project %s task %s: a prediction of %s was already posted or is being posted; "
            "not posted again",
            project.project_id,
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
    metrics = project.metrics
    state = project.load_state()
    if state.reference is None:
        log.warning("project %s: no reference; background prediction skipped", state.project_id)
        return 0
    schema = project.schema(state)
    reference = project.runtime.reference(state.project_id, state.model_version, state.reference)
    api = project.api(state)
    posted = 0
    for task in tasks:
        try:
            entry = predict_task(project, task, schema, state, reference)
            if post_once(project, api, task["id"], entry) is None:
                metrics.predictions_posted.inc("already_posted")
                continue
        except StoreError:
            raise
        except Exception as error:  # one failing task must not stop the others
            metrics.predictions_posted.inc("failed")
            log.warning(
                "project %s task %s: background prediction failed: %s: %s",
                state.project_id,
                task.get("id"),
                type(error).__name__,
                error,
            )
            continue
        posted += 1
        metrics.predictions_posted.inc("ok")
    log.info(
        "project %s: %d/%d background prediction(s) posted",
        state.project_id,
        posted,
        len(tasks),
    )
    return posted
