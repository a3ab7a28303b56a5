"""Annotation -> masks: Label Studio results (percent of the image) to ``(H, W)`` bool masks.

Frames: see :mod:`labelstudio` (percent of the image in, original pixels out).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image, ImageDraw

from .schema import (
    BRUSH,
    BRUSH_ALPHA_THRESHOLD,
    KEYPOINT,
    MASK_CAPABLE_TYPES,
    MAX_POLYGON_POINTS,
    RECTANGLE,
    AnnotationError,
    ControlSpec,
    LabelingSchema,
    PromptMasker,
)

log = logging.getLogger(__name__)


def annotation_to_masks(
    results: list[dict],
    schema: LabelingSchema,
    image_size: tuple[int, int],
    prompt_masker: PromptMasker | None = None,
) -> dict[str, list[np.ndarray]]:
    """Masks per label from an annotation's (or prediction's) ``result`` list.

    Args:
        results: Label Studio results (``annotation["result"]``).
        schema: from :func:`parse_label_config`.
        image_size: ``(H, W)`` of the task image as loaded.
        prompt_masker: SAM for rectangles and keypoints; without it those results are skipped.

    Returns:
        ``{label: [(H, W) bool mask, ...]}``, one mask per region (non-empty, never an empty dict).

    Raises:
        AnnotationError: a corrupt result, or no usable mask at all (the message says why each
            result was skipped).
    """
    height, width = check_image_size(image_size)
    if not isinstance(results, list):
        raise AnnotationError(f"annotation result must be a list, got {type(results).__name__}")
    regions = _Regions(schema, height, width)
    for index, result in enumerate(results):
        regions.read(result, index)
    # Boxes and clicks last: with smart tools, the annotation keeps the prompts next to the
    # masks they produced, and a prompt covering an object already drawn is not another object.
    regions.add_rectangles(prompt_masker)
    regions.add_keypoints(prompt_masker)
    masks, skipped = regions.masks, regions.skipped
    if not masks:
        reasons = "; ".join(skipped) if skipped else "it has no brush, polygon, box or keypoint"
        raise AnnotationError(f"annotation has no usable mask: {reasons}")
    for reason in skipped:
        log.warning("annotation: skipped %s", reason)
    return masks


@dataclass
class _Regions:
    """What :func:`annotation_to_masks` collects from one annotation, in original pixels."""

    schema: LabelingSchema
    height: int
    width: int
    masks: dict[str, list[np.ndarray]] = field(default_factory=dict)
    """label -> ``(H, W)`` bool masks, one per region."""
    skipped: list[str] = field(default_factory=list)
    """Why each unusable result was skipped (logged, or the error when nothing is left)."""
    keypoints: dict[str, list[np.ndarray]] = field(default_factory=dict)
    """label -> XY pixel points, in order."""
    rectangles: list[tuple[str, list[str], np.ndarray]] = field(default_factory=list)
    """``(where, labels, XYXY box)``."""

    def _add(self, labels: Iterable[str], mask: np.ndarray) -> None:
        for label in labels:
            self.masks.setdefault(label, []).append(mask)

    def read(self, result: Any, index: int) -> None:
        """Take one result: brush and polygon masks at once, boxes and clicks for later."""
        height, width = self.height, self.width
        where = f"result #{index}"
        if not isinstance(result, dict):
            raise AnnotationError(f"{where} is not an object")
        result_type = result.get("type")
        if result_type not in MASK_CAPABLE_TYPES:
            log.debug("%s of type %r carries no mask; ignored", where, result_type)
            return
        where = f"{result_type} {where} (id {result.get('id')!r})"
        control = self.schema.control(result.get("from_name"))
        if control is None or control.type != result_type:
            self.skipped.append(
                f"{where}: no {result_type} control named {result.get('from_name')!r}"
            )
            return
        if control.image_key != self.schema.image_key:
            self.skipped.append(f"{where}: labels image {control.to_name!r}, not the output image")
            return
        check_frame(result, height, width, where)
        value = result.get("value")
        if not isinstance(value, dict):
            raise AnnotationError(f"{where}: 'value' must be an object")
        labels = _known_labels(value, result_type, control, where, self.skipped)
        if not labels:
            return
        if result_type == KEYPOINT:
            point = keypoint_xy(value, height, width, where)
            if result.get("is_positive") is False:
                log.debug("%s is a negative smart-tool click, not an object; ignored", where)
                return
            for label in labels:
                self.keypoints.setdefault(label, []).append(point)
            return
        if result_type == RECTANGLE:
            box = rectangle_box(value, height, width, where)
            if box[2] <= box[0] or box[3] <= box[1]:
                self.skipped.append(f"{where}: empty rectangle")
            else:
                self.rectangles.append((where, labels, box))
            return
        if result_type == BRUSH:
            mask = decode_brush(value, height, width, where)
        else:
            points_xy = _percent_to_pixels(_polygon_points(value, where), height, width)
            mask = rasterize_polygon(points_xy, height, width)
        if not mask.any():
            self.skipped.append(f"{where}: empty mask")
            return
        self._add(labels, mask)

    def add_rectangles(self, prompt_masker: PromptMasker | None) -> None:
        """Boxes that do not outline a mask already drawn, through SAM."""
        for where, labels, box in self.rectangles:
            if all(_box_repeats_a_mask(box, self.masks.get(label, ())) for label in labels):
                log.info("%s: outlines a mask already in the annotation; not a new object", where)
                continue
            if prompt_masker is None:
                self.skipped.append(f"{where}: rectangles need SAM (no prompt_masker given)")
                continue
            mask = _call_masker(prompt_masker, None, None, box, self.height, self.width)
            if not mask.any():
                self.skipped.append(f"{where}: SAM returned an empty mask for the box")
                continue
            self._add(labels, mask)

    def add_keypoints(self, prompt_masker: PromptMasker | None) -> None:
        """Clicks outside every mask of their label, grouped into objects, through SAM."""
        for label, points in self.keypoints.items():
            drawn = self.masks.get(label, [])
            points = [p for p in points if not any(m[int(p[1]), int(p[0])] for m in drawn)]
            if not points:
                continue
            if prompt_masker is None:
                self.skipped.append(
                    f"{len(points)} keypoint(s) of {label!r}: need SAM (no prompt_masker)"
                )
                continue
            for mask in _keypoint_objects(points, prompt_masker, self.height, self.width):
                if mask.any():
                    self._add([label], mask)
                else:
                    self.skipped.append(f"keypoint object of {label!r}: SAM returned an empty mask")


def decode_brush(value: dict, height: int, width: int, where: str = "brush") -> np.ndarray:
    """``(H, W)`` bool mask of a brush result's ``value`` (``{"format": "rle", "rle": [...]}``).

    Raises:
        AnnotationError: not RLE, not bytes, truncated or corrupt, or holding another number of
            pixels than ``height * width``.
    """
    if value.get("format", "rle") != "rle":
        raise AnnotationError(f"{where}: brush format {value.get('format')!r} is not 'rle'")
    rle = value.get("rle")
    if not isinstance(rle, list) or not rle:
        raise AnnotationError(f"{where}: 'rle' must be a non-empty list of bytes")
    expected = height * width * 4
    # The encoder spends at most 14 bits per value (a literal run of one); anything longer is
    # not an RLE of this size, and refusing it early bounds the decoding work.
    if len(rle) > expected * 14 // 8 + 16:
        raise AnnotationError(f"{where}: RLE of {len(rle)} bytes is too long for {width}x{height}")
    if not all(type(item) is int for item in rle):
        raise AnnotationError(f"{where}: RLE items must be integers 0..255")
    try:
        data = bytes(rle)
    except ValueError as error:
        raise AnnotationError(f"{where}: RLE items must be integers 0..255") from error
    if len(data) < 7:  # 32-bit count, 5-bit word size, four 4-bit run-length sizes
        raise AnnotationError(f"{where}: truncated RLE ({len(data)} bytes, no complete header)")
    count = int.from_bytes(data[:4], "big")
    if count != expected:
        hint = ""
        if count % 4 == 0 and count // 4 > 0:
            hint = f" ({count // 4} pixels)"
        raise AnnotationError(
            f"{where}: RLE holds {count} values{hint} but original_width x original_height = "
            f"{width}x{height} needs {expected} (4 per pixel)"
        )
    word_size = (data[4] >> 3) + 1
    if word_size > 8:
        raise AnnotationError(f"{where}: RLE word size {word_size} bits (brush RLE uses 8)")
    try:
        flat = decode_rle(data)
        # A stream cut inside its last field still decodes, with that field's value read short;
        # decoding it again with zero padding changes that value, so a difference reveals the cut.
        padded = decode_rle(data + bytes(8))
    except (ValueError, IndexError, OverflowError) as error:
        raise AnnotationError(f"{where}: corrupt or truncated RLE ({error})") from error
    if flat.shape != (expected,) or not np.array_equal(flat, padded):
        raise AnnotationError(f"{where}: truncated RLE (the bit stream ends inside a run)")
    return flat.reshape(height, width, 4)[:, :, 3] >= BRUSH_ALPHA_THRESHOLD


def rasterize_polygon(points_xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(H, W)`` bool mask of a polygon given as ``(N, 2)`` XY pixels (continuous frame).

    PIL addresses pixels by their centres, which sit at ``i + 0.5`` in the continuous frame, hence
    the half-pixel shift. PIL also fills the pixels the outline touches, so the area exceeds the
    exact one (pixel centres inside) by up to about half a pixel per unit of perimeter; for a
    reference mask that bias is immaterial.
    """
    canvas = Image.new("1", (width, height), 0)
    shifted = [(float(x) - 0.5, float(y) - 0.5) for x, y in points_xy]
    ImageDraw.Draw(canvas).polygon(shifted, fill=1)
    return np.asarray(canvas, dtype=bool).copy()


def check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    try:
        height, width = (int(side) for side in image_size)
    except (TypeError, ValueError) as error:
        raise ValueError(f"image_size must be (height, width), got {image_size!r}") from error
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return height, width


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AnnotationError(f"{where}: {name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise AnnotationError(f"{where}: {name} must be finite, got {value!r}")
    return number


def check_frame(result: dict, height: int, width: int, where: str) -> None:
    """Reject results drawn on a rotated view or on an image of another size."""
    rotation = result.get("image_rotation", 0)
    if rotation is None:
        rotation = 0
    rotation = _number(rotation, "image_rotation", where)
    if rotation % 360 != 0:
        raise AnnotationError(
            f"{where}: drawn on an image rotated by {rotation:g} degrees; rotated images are "
            "not supported, reset the rotation in Label Studio and annotate again"
        )
    original_width = result.get("original_width")
    original_height = result.get("original_height")
    if original_width is None and original_height is None:
        return
    ow = _number(original_width, "original_width", where)
    oh = _number(original_height, "original_height", where)
    if (ow, oh) == (width, height):
        return
    hint = ""
    if (ow, oh) == (height, width):
        hint = " (width and height swapped: an EXIF orientation disagreement)"
    raise AnnotationError(
        f"{where}: drawn on a {ow:g}x{oh:g} image but the task image is {width}x{height}{hint}"
    )


def _known_labels(
    value: dict, result_type: str, control: ControlSpec, where: str, skipped: list[str]
) -> list[str]:
    labels = value.get(result_type)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise AnnotationError(f"{where}: value.{result_type} must be a non-empty list of labels")
    known = [label for label in dict.fromkeys(labels) if label in control.labels]
    for label in labels:
        if label not in control.labels:
            skipped.append(f"{where}: label {label!r} is not in control {control.from_name!r}")
    return known


def _polygon_points(value: dict, where: str) -> np.ndarray:
    """``(N, 2)`` XY percent points of a polygon result."""
    points = value.get("points")
    if not isinstance(points, list) or len(points) < 3:
        raise AnnotationError(f"{where}: a polygon needs a list of at least 3 points")
    if len(points) > MAX_POLYGON_POINTS:
        raise AnnotationError(f"{where}: polygon of {len(points)} points is too large")
    pairs = []
    for point in points:
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            raise AnnotationError(f"{where}: polygon points must be [x, y] pairs")
        pairs.append((_number(point[0], "x", where), _number(point[1], "y", where)))
    return np.asarray(pairs, dtype=np.float64)


def _percent_to_pixels(points_percent: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(N, 2)`` percent XY -> pixel XY, clipped to one image size around the image (points
    that far out only occur in corrupt data, and huge values would upset the rasteriser)."""
    size = np.array([width, height], dtype=np.float64)
    return np.clip(points_percent * size / 100.0, -size, 2 * size)


def keypoint_xy(value: dict, height: int, width: int, where: str) -> np.ndarray:
    x = _number(value.get("x"), "x", where)
    y = _number(value.get("y"), "y", where)
    xy = _percent_to_pixels(np.array([[x, y]]), height, width)[0]
    # A click exactly on the right/bottom edge is still on the image.
    return np.clip(xy, 0.0, [width - 1e-3, height - 1e-3])


def rectangle_box(value: dict, height: int, width: int, where: str) -> np.ndarray:
    """``(4,)`` XYXY pixel box: the axis-aligned hull of a possibly rotated rectangle.

    Label Studio rotates a rectangle clockwise (on screen, y pointing down) about its top-left
    corner ``(x, y)``; SAM takes axis-aligned boxes, so the hull of the rotated corners is used.
    """
    # Clipped like polygon points, so corrupt huge values cannot overflow to inf/nan.
    x, w = (
        float(np.clip(_number(value.get(key), key, where), -100, 200)) * width / 100.0
        for key in ("x", "width")
    )
    y, h = (
        float(np.clip(_number(value.get(key), key, where), -100, 200)) * height / 100.0
        for key in ("y", "height")
    )
    angle = math.radians(_number(value.get("rotation", 0) or 0, "rotation", where))
    cos, sin = math.cos(angle), math.sin(angle)
    offsets = np.array([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]])
    corners = np.stack(
        [
            x + offsets[:, 0] * cos - offsets[:, 1] * sin,
            y + offsets[:, 0] * sin + offsets[:, 1] * cos,
        ],
        axis=1,
    )
    low = np.clip(corners.min(axis=0), 0, [width, height])
    high = np.clip(corners.max(axis=0), 0, [width, height])
    return np.array([low[0], low[1], high[0], high[1]], dtype=np.float32)


def _box_repeats_a_mask(box: np.ndarray, masks: Iterable[np.ndarray]) -> bool:
    """Whether an XYXY box and the bounding box of one of ``masks`` overlap with IoU >= 0.5."""
    for mask in masks:
        rows, columns = np.nonzero(mask)
        other = (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)
        width = min(box[2], other[2]) - max(box[0], other[0])
        height = min(box[3], other[3]) - max(box[1], other[1])
        inter = max(width, 0) * max(height, 0)
        union = (
            (box[2] - box[0]) * (box[3] - box[1])
            + (other[2] - other[0]) * (other[3] - other[1])
            - inter
        )
        if union > 0 and inter / union >= 0.5:
            return True
    return False


def _call_masker(
    prompt_masker: PromptMasker,
    points: np.ndarray | None,
    point_labels: np.ndarray | None,
    box: np.ndarray | None,
    height: int,
    width: int,
) -> np.ndarray:
    mask = np.asarray(prompt_masker(points, point_labels, box))
    if mask.shape != (height, width):
        raise ValueError(f"prompt_masker returned a {mask.shape} mask for a {height}x{width} image")
    return mask.astype(bool)


def _keypoint_objects(
    points: list[np.ndarray], prompt_masker: PromptMasker, height: int, width: int
) -> list[np.ndarray]:
    """One mask per object clicked: a point inside an object's current mask refines it."""
    groups: list[list[np.ndarray]] = []
    group_masks: list[np.ndarray] = []
    for point in points:
        column, row = int(point[0]), int(point[1])
        owner = next((i for i, mask in enumerate(group_masks) if mask[row, column]), None)
        if owner is None:
            groups.append([point])
            group_masks.append(np.zeros((height, width), dtype=bool))
            owner = len(groups) - 1
        else:
            groups[owner].append(point)
        group_points = np.asarray(groups[owner], dtype=np.float32)
        group_masks[owner] = _call_masker(
            prompt_masker,
            group_points,
            np.ones(len(group_points), dtype=np.int64),
            None,
            height,
            width,
        )
    return group_masks
