"""Smart tools: an interactive context (clicks, boxes) to SAM prompts in original pixels.

Frames: see :mod:`labelstudio` (percent of the image in, original pixels out).
"""

from __future__ import annotations

import logging

import numpy as np

from .annotations import check_frame, check_image_size, keypoint_xy, rectangle_box
from .schema import KEYPOINT, RECTANGLE, AnnotationError, LabelingSchema

log = logging.getLogger(__name__)


def interactive_prompts(
    context: dict, schema: LabelingSchema, image_size: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, str]:
    """SAM prompts from a smart-tool request's ``params.context``.

    Label Studio sends ``{"result": [...]}`` with the smart regions just drawn: keypoints
    (``is_positive`` false for negative clicks) and rectangles.

    Returns:
        ``(points (N, 2) XY pixels or None, point labels (N,) 1/0 or None, box (4,) XYXY pixels
        or None, label)``. The label is that of the first positive prompt; with several
        rectangles the last one is the box (SAM takes one).

    Raises:
        AnnotationError: no keypoint or rectangle, a malformed one, or a label the output
            control lacks.
    """
    height, width = check_image_size(image_size)
    results = context.get("result") if isinstance(context, dict) else None
    if not isinstance(results, list):
        raise AnnotationError("smart-tool context has no 'result' list")
    points: list[np.ndarray] = []
    point_labels: list[int] = []
    box: np.ndarray | None = None
    positive_label: str | None = None
    any_label: str | None = None
    for index, result in enumerate(results):
        region = _smart_region(result, index, schema, height, width)
        if region is None:
            continue
        result_type, prompt, label, positive = region
        if result_type == KEYPOINT:
            points.append(prompt)
            point_labels.append(1 if positive else 0)
        else:
            box = prompt
        any_label = any_label or label
        if positive and positive_label is None:
            positive_label = label
    if not points and box is None:
        raise AnnotationError("smart-tool context has no keypoint or rectangle")
    label = _output_label(positive_label or any_label, schema)
    if not points:
        return None, None, box, label
    return (
        np.asarray(points, dtype=np.float32),
        np.asarray(point_labels, dtype=np.int64),
        box,
        label,
    )


def _smart_region(
    result: object, index: int, schema: LabelingSchema, height: int, width: int
) -> tuple[str, np.ndarray, str | None, bool] | None:
    """``(type, prompt, label, positive)`` of one smart result: a keypoint's XY or a rectangle's
    XYXY box in pixels; ``None`` for what is not a smart region on the output's image.

    Raises:
        AnnotationError: a malformed region.
    """
    if not isinstance(result, dict) or result.get("type") not in (KEYPOINT, RECTANGLE):
        return None
    result_type = result["type"]
    where = f"smart {result_type} #{index}"
    control = schema.control(result.get("from_name"))
    if control is not None and control.image_key != schema.image_key:
        return None
    check_frame(result, height, width, where)
    value = result.get("value")
    if not isinstance(value, dict):
        raise AnnotationError(f"{where}: 'value' must be an object")
    labels = value.get(result_type)
    label = labels[0] if isinstance(labels, list) and labels else None
    if label is not None and not isinstance(label, str):
        raise AnnotationError(f"{where}: labels must be strings")
    positive = result.get("is_positive", True) is not False
    if result_type == KEYPOINT:
        prompt = keypoint_xy(value, height, width, where)
    else:
        prompt = rectangle_box(value, height, width, where)
    return result_type, prompt, label, positive


def _output_label(label: str | None, schema: LabelingSchema) -> str:
    """``label``, once it is one of the output control's.

    Raises:
        AnnotationError: no label, or one the output control lacks.
    """
    if label is None:
        raise AnnotationError("smart-tool regions carry no label")
    if label not in schema.output.labels:
        raise AnnotationError(
            f"smart-tool label {label!r} is not a label of output control "
            f"{schema.output.from_name!r} ({', '.join(schema.output.labels)})"
        )
    return label
