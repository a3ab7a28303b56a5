"""Webhooks: annotations are validated and stored at once (Label Studio waits 1 s), and a
background training is requested; deletions drop the stored examples."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from labelstudio import (
    MASK_CAPABLE_TYPES,
    AnnotationError,
    LabelingSchema,
    annotation_to_masks,
)

from .errors import BadRequest, LimitExceeded, store_failure
from .project import ProjectContext, project_id_of
from .store import InvalidKey, ProjectState, StoreError, example_key

log = logging.getLogger("oneshot.model")

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
TRAINING_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
HANDLED_EVENTS = (*TRAINING_EVENTS, "ANNOTATIONS_DELETED", "START_TRAINING")


def handle_webhook(project: ProjectContext, event: str | None, data: dict) -> dict:
    """Dispatch one webhook event (see :meth:`backend.model.OneShotModel.fit`); fills in the project's
    id and label config from the payload when the request did not carry them.

    Raises:
        BadRequest: a malformed payload or an unusable annotation (nothing is stored).
    """
    if not isinstance(data, dict):
        raise BadRequest("webhook body must be a JSON object")
    event = event or data.get("action")
    if not isinstance(event, str):
        raise BadRequest("webhook without 'action'")
    if event not in HANDLED_EVENTS:
        # Counted as "other": an event name from the body must not become a metric label
        # (unbounded series, and text /metrics cannot print).
        project.metrics.webhooks.inc("other")
        log.debug("webhook %s ignored", ascii(event[:100]))
        return {"status": "ignored", "action": event}
    project.metrics.webhooks.inc(event)
    if project.project_id is None:
        project.project_id = project_id_of(data.get("project"))
    project_object = data.get("project")
    if isinstance(project_object, dict) and isinstance(project_object.get("label_config"), str):
        project.label_config = project.label_config or project_object["label_config"]

    if event == "START_TRAINING":
        project.record_label_config()
        project.runtime.jobs.request_training(project.project_id, full=True)
        log.info("project %s: training requested (full rebuild)", project.project_id)
        return {"status": "training queued", "project": project.project_id, "full": True}
    if event == "ANNOTATIONS_DELETED":
        return delete_annotations(project, data.get("annotations"))
    if event == "ANNOTATIONS_CREATED":
        annotations = data.get("annotation")
        task_list = data.get("task") if isinstance(data.get("task"), list) else []
        if not isinstance(annotations, list):
            raise BadRequest("ANNOTATIONS_CREATED without an 'annotation' list")
        ids = (int, str)  # anything else in an id field cannot name a task
        tasks_by_id = {
            t["id"]: t for t in task_list if isinstance(t, dict) and isinstance(t.get("id"), ids)
        }
        pairs = [
            (a, tasks_by_id.get(a["task"]) if isinstance(a.get("task"), ids) else None)
            for a in annotations
            if isinstance(a, dict)
        ]
    else:
        pairs = [(data.get("annotation"), data.get("task"))]
    return receive_annotations(project, pairs, event)


def footprint_masker(image_size: tuple[int, int]) -> Callable:
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


def validate_annotation(
    annotation: dict, schema: LabelingSchema, max_instances_per_label: int, max_image_pixels: int
) -> None:
    """Reject an unusable annotation before storing it (decodes its masks at the size it
    was drawn at; rectangles / keypoints count as their footprint here).

    Raises:
        BadRequest: no results, sizes that disagree or are not numbers, corrupt results.
        LimitExceeded: drawn on more than ``max_image_pixels`` (``MAX_IMAGE_PIXELS``), or more
            than ``max_instances_per_label`` (``MAX_INSTANCES_PER_LABEL``) regions of one label.
    """
    results = annotation.get("result")
    if not isinstance(results, list) or not results:
        raise BadRequest(f"annotation {annotation.get('id')} has no results")
    check_regions_per_label(annotation, results, max_instances_per_label)
    height, width = drawn_size(annotation, results)
    if height * width > max_image_pixels:
        raise LimitExceeded(
            f"annotation {annotation.get('id')}: drawn on a {width:g}x{height:g} image, over "
            f"the limit of {max_image_pixels} pixels (MAX_IMAGE_PIXELS)"
        )
    try:
        annotation_to_masks(
            results, schema, (int(height), int(width)), footprint_masker((height, width))
        )
    except (AnnotationError, ValueError, TypeError) as error:
        raise BadRequest(f"annotation {annotation.get('id')}: {error}") from error


def check_regions_per_label(annotation: dict, results: list, limit: int) -> None:
    """Refuse more than ``limit`` regions of one label.

    Raises:
        LimitExceeded: as said, naming the most crowded label.
    """
    regions: dict[str, int] = {}
    for result in results:
        if not isinstance(result, dict) or not isinstance(result.get("type"), str):
            continue
        value = result.get("value")
        labels = value.get(result["type"]) if isinstance(value, dict) else None
        for label in labels if isinstance(labels, list) else ():
            if isinstance(label, str):
                regions[label] = regions.get(label, 0) + 1
    crowded = {label: n for label, n in regions.items() if n > limit}
    if crowded:
        label, count = max(crowded.items(), key=lambda item: item[1])
        raise LimitExceeded(
            f"annotation {annotation.get('id')}: {count} regions of label {label!r}; the "
            f"limit is {limit} (MAX_INSTANCES_PER_LABEL)"
        )


def drawn_size(annotation: dict, results: list) -> tuple[float, float]:
    """``(height, width)`` of the image the annotation's regions were drawn on.

    Raises:
        BadRequest: a result that is no object, a region without a size or with one that is not
            a positive number, sizes that disagree, or no region at all.
    """
    sizes = set()
    for index, result in enumerate(results):
        if not isinstance(result, dict):
            raise BadRequest(f"annotation {annotation.get('id')}: result #{index} is not an object")
        height, width = result.get("original_height"), result.get("original_width")
        if height is None and width is None:
            if result.get("type") in MASK_CAPABLE_TYPES:
                # Label Studio sends the canvas size with every image region; without it the
                # region cannot be checked now, and would fail only at every later training.
                raise BadRequest(
                    f"annotation {annotation.get('id')}: {result['type']} result #{index} has "
                    "no original_width / original_height"
                )
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
        # Every region carries its size (checked above): without any, nothing here is a region.
        raise BadRequest(
            f"annotation {annotation.get('id')} has no image region (brush, polygon, rectangle "
            "or keypoint) to learn from"
        )
    return sizes.pop()


def receive_annotations(project: ProjectContext, pairs: list[tuple[Any, Any]], event: str) -> dict:
    """Validate every ``(annotation, task)`` of the event, then store them all and request a
    training. A refused event (any annotation unusable, or the label config) writes nothing."""
    state = project.load_state()
    schema = project.schema(state)
    settings = project.settings
    accepted: list[tuple[str, dict]] = []
    skipped: list[str] = []
    for annotation, task in pairs:
        key = checked_annotation(event, annotation)
        if annotation.get("was_cancelled"):
            skipped.append(f"annotation {annotation['id']} is a skipped task")
            continue
        validate_annotation(
            annotation, schema, settings.max_instances_per_label, settings.max_image_pixels
        )
        accepted.append((key, example_payload(annotation, task)))
    stored = store_examples(project, accepted)
    for reason in skipped:
        log.info("project %s: %s; ignored", project.project_id, reason)
    log.info("project %s: %s stored %s; training requested", project.project_id, event, stored)
    return {
        "status": "training queued" if stored else "ignored",
        "project": project.project_id,
        "stored": stored,
        "skipped": skipped,
    }


def checked_annotation(event: str, annotation: Any) -> str:
    """The example key of an event's annotation, once it is an object with an id and names
    a task by id (or none).

    Raises:
        BadRequest: any of these is not so.
    """
    if not isinstance(annotation, dict) or annotation.get("id") is None:
        raise BadRequest(f"{event} without an annotation object with an 'id'")
    annotation_id = annotation["id"]
    key = checked_example_key(event, annotation_id)
    task_ref = annotation.get("task")
    if task_ref is not None and (
        isinstance(task_ref, bool) or not isinstance(task_ref, (int, str))
    ):
        raise BadRequest(
            f"{event}: annotation {annotation_id} names task {str(task_ref)[:40]!r}, not a task id"
        )
    return key


def example_payload(annotation: dict, task: Any) -> dict:
    """What is stored of an annotation and its task (the fields training reads)."""
    if not isinstance(task, dict):
        task = {"id": annotation.get("task")}
    return {
        "annotation": {
            k: annotation.get(k)
            for k in ("id", "result", "task", "created_at", "updated_at", "completed_by")
        },
        "task": {k: task.get(k) for k in ("id", "data") if k in task},
        "received_at": time.time(),
    }


def store_examples(project: ProjectContext, accepted: list[tuple[str, dict]]) -> list[str]:
    """Store the accepted examples (with the label config) and request a training; returns the
    stored keys."""
    stored: list[str] = []
    if accepted:
        project.record_label_config()
    for key, payload in accepted:
        try:
            project.store.put_example(project.require_project_id(), key, payload)
        except StoreError as error:
            raise store_failure(error) from error
        stored.append(key)
    if stored:
        # An updated annotation is learned again (if it is the reference, the reference
        # is rebuilt): it leaves the applied set.
        project.update_state(
            lambda s: forget_applied(s, stored) if set(stored) & set(s.applied_examples) else None,
            reason="annotation updated",
        )
        project.runtime.jobs.request_training(project.require_project_id())
    return stored


def checked_example_key(event: str, annotation_id: Any) -> str:
    """The store key of ``annotation_id`` (the one place ids become keys: see
    :func:`backend.store.key_part`).

    Raises:
        BadRequest: the id cannot name an example (wrong type, too long, NUL, lone surrogate).
    """
    try:
        return example_key(annotation_id)
    except InvalidKey as error:
        raise BadRequest(f"{event}: {error}") from None


def forget_applied(state: ProjectState, keys: list[str]) -> ProjectState:
    """``state`` with ``keys`` no longer marked as learned (they are learned again)."""
    state.applied_examples = [k for k in state.applied_examples if k not in keys]
    return state


def delete_annotations(project: ProjectContext, annotations: Any) -> dict:
    """``ANNOTATIONS_DELETED``: drop the stored examples and request a training when any was
    stored (deleting the reference's annotation promotes the next one)."""
    if not isinstance(annotations, list):
        raise BadRequest("ANNOTATIONS_DELETED without an 'annotations' list")
    keys = [
        checked_example_key("ANNOTATIONS_DELETED", a["id"])
        for a in annotations
        if isinstance(a, dict) and "id" in a
    ]
    try:
        deleted = project.store.delete_examples(project.require_project_id(), keys)
    except StoreError as error:
        raise store_failure(error) from error
    state = project.update_state(
        lambda s: forget_applied(s, keys) if set(keys) & set(s.applied_examples) else None,
        reason="annotations deleted",
    )
    source = (state.reference_source or {}).get("key")
    if source in keys:
        log.info(
            "project %s: the reference's annotation was deleted; rebuilding", project.project_id
        )
    if deleted:
        project.runtime.jobs.request_training(project.require_project_id())
    return {"status": "deleted", "project": project.project_id, "deleted": deleted}
