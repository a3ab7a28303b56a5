"""Instances -> prediction results: engine masks to Label Studio results, and the task score.

Frames: see :mod:`labelstudio` (percent of the image in, original pixels out).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from .annotations import check_image_size
from .brush import mask_to_rle
from .schema import (
    BRUSH,
    POLYGON,
    POLYGON_MIN_COMPONENT_FRACTION,
    POLYGON_TOLERANCE_PX,
    RECTANGLE,
    RESULT_ID_LENGTH,
    LabelingSchema,
)

if TYPE_CHECKING:
    from matcher_core.reference import Instance


log = logging.getLogger(__name__)


def instances_to_results(
    instances: Iterable[Instance],
    schema: LabelingSchema,
    image_size: tuple[int, int],
    model_version: str | None = None,
) -> list[dict]:
    """Label Studio results for the engine's instances, in the schema's output control.

    Args:
        instances: objects with ``label``, ``mask`` (``(H, W)`` bool) and ``score`` in [0, 1].
        image_size: ``(H, W)`` of the task image (every mask must have this shape).
        model_version: mixed into the result ids, so the same prediction gets the same ids.

    Returns:
        One result per instance (brush, rectangle, keypoint), or per sizeable connected part of
        it (polygon). Instances with a label the output control lacks, or an empty mask, are
        skipped with a warning.
    """
    height, width = check_image_size(image_size)
    output = schema.output
    results: list[dict] = []
    for index, instance in enumerate(instances):
        mask = np.asarray(instance.mask).astype(bool)
        if mask.shape != (height, width):
            raise ValueError(
                f"instance {index} ({instance.label!r}) has a {mask.shape} mask "
                f"for a {height}x{width} image"
            )
        if instance.label not in output.labels:
            log.warning(
                "instance label %r is not in output control %r; not predicted",
                instance.label,
                output.from_name,
            )
            continue
        if not mask.any():
            log.warning("instance %d (%r) has an empty mask; not predicted", index, instance.label)
            continue
        score = float(np.clip(float(instance.score), 0.0, 1.0))
        for part, value in enumerate(_output_values(output.type, mask, height, width)):
            value[output.type] = [instance.label]
            identity = f"{model_version}|{output.from_name}|{instance.label}|{index}|{part}"
            results.append(
                {
                    "id": _result_id(identity, mask),
                    "from_name": output.from_name,
                    "to_name": output.to_name,
                    "type": output.type,
                    "original_width": width,
                    "original_height": height,
                    "image_rotation": 0,
                    "value": value,
                    "score": score,
                    "readonly": False,
                }
            )
    return results


def _result_id(identity: str, mask: np.ndarray) -> str:
    digest = hashlib.blake2b(identity.encode(), digest_size=16)
    digest.update(np.packbits(mask).tobytes())
    return digest.hexdigest()[:RESULT_ID_LENGTH]


def _output_values(result_type: str, mask: np.ndarray, height: int, width: int) -> list[dict]:
    if result_type == BRUSH:
        return [{"format": "rle", "rle": mask_to_rle(mask)}]
    if result_type == POLYGON:
        return [{"points": points, "closed": True} for points in mask_to_polygons(mask)]
    if result_type == RECTANGLE:
        rows, columns = np.nonzero(mask)
        x0, x1 = int(columns.min()), int(columns.max()) + 1
        y0, y1 = int(rows.min()), int(rows.max()) + 1
        return [
            {
                "x": 100.0 * x0 / width,
                "y": 100.0 * y0 / height,
                "width": 100.0 * (x1 - x0) / width,
                "height": 100.0 * (y1 - y0) / height,
                "rotation": 0,
            }
        ]
    x, y = _interior_point(mask)
    return [{"x": 100.0 * x / width, "y": 100.0 * y / height}]


def mask_to_polygons(mask: np.ndarray) -> list[list[list[float]]]:
    """Outer outlines of a ``(H, W)`` bool mask as polygons of ``[x%, y%]`` points.

    One polygon per connected part covering at least ``POLYGON_MIN_COMPONENT_FRACTION`` of the
    mask (the largest part always); holes are filled (Label Studio polygons have none). Outlines
    run through boundary pixel centres and are simplified with ``POLYGON_TOLERANCE_PX``.
    """
    import cv2  # opencv-python-headless; only needed for polygon output

    height, width = mask.shape
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    # Approximate pixel count per part (the outline runs through boundary pixel centres, so add
    # half a pixel per unit of perimeter), so tiny specks of a large mask get no polygon.
    sized = [
        (cv2.contourArea(contour) + cv2.arcLength(contour, True) / 2 + 1, contour)
        for contour in contours
    ]
    sized.sort(key=lambda item: item[0], reverse=True)
    total = sum(size for size, _ in sized)
    polygons = []
    for rank, (size, contour) in enumerate(sized):
        if rank > 0 and size < POLYGON_MIN_COMPONENT_FRACTION * total:
            break
        simplified = cv2.approxPolyDP(contour, POLYGON_TOLERANCE_PX, closed=True)[:, 0, :]
        if len(simplified) < 3:  # a line or a dot: keep its unsimplified outline if it has one
            simplified = contour[:, 0, :]
        if len(simplified) < 3:
            simplified = _pixel_square(simplified[0])
        centres = simplified.astype(np.float64) + 0.5
        polygons.append([[100.0 * x / width, 100.0 * y / height] for x, y in centres.tolist()])
    return polygons


def _pixel_square(pixel: np.ndarray) -> np.ndarray:
    """The corners of one pixel as a polygon (centre-based, so shifted back by -0.5 later)."""
    x, y = float(pixel[0]), float(pixel[1])
    return np.array(
        [[x - 0.5, y - 0.5], [x + 0.5, y - 0.5], [x + 0.5, y + 0.5], [x - 0.5, y + 0.5]]
    )


def _interior_point(mask: np.ndarray) -> tuple[float, float]:
    """XY (continuous) of the mask pixel farthest from its boundary: always inside the object."""
    import cv2

    distance = cv2.distanceTransform(
        np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE
    )[1:-1, 1:-1]
    row, column = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(column) + 0.5, int(row) + 0.5


def task_score(instances: Iterable[Instance]) -> float:
    """Overall task score for Data Manager sorting: the mean instance score, 0 when none."""
    scores = [float(instance.score) for instance in instances]
    return float(np.mean(scores)) if scores else 0.0
