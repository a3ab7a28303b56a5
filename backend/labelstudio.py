"""Label Studio JSON <-> engine conversion: label configs, annotations, predictions, smart tools.

Coordinate frames used here:

* Label Studio stores geometry in **percent** of the image: ``x`` of the width, ``y`` of the height,
  origin at the top-left corner of the image (0 = left edge, 100 = right edge).
* The engine works in **original pixels**: masks are ``(H, W)`` bool arrays, points are ``XY``
  (continuous: the left edge of pixel column ``i`` is at ``x = i``, its centre at ``i + 0.5``),
  boxes are ``XYXY`` in the same continuous frame.
* ``image_size`` arguments are always ``(height, width)``, i.e. ``image.shape[:2]`` of the image
  as the engine loaded it (EXIF orientation applied, as browsers and Label Studio show it).

Brush masks use Label Studio's RLE (the rle-pack bit stream of the RGBA buffer, mask in the
alpha channel) through ``label_studio_sdk.converter.brush``; label configs are parsed with
``label_studio_sdk.label_interface.LabelInterface``.

Policies (documented here because the server and the README rely on them):

* **Controls read**: ``BrushLabels``, ``PolygonLabels``, ``RectangleLabels`` and
  ``KeyPointLabels`` with ``<Label>`` children, on an ``<Image value="$key">``. Bare ``Brush``,
  ``Polygon``... tags paired with a separate ``<Labels>`` control, and ``valueList`` (multi-page)
  images, are not read.
* **Output control**: predictions go to the first ``BrushLabels`` control of the config, else the
  first ``PolygonLabels``, else ``RectangleLabels`` (mask bounding boxes), else ``KeyPointLabels``
  (one point inside each mask, at its pole of inaccessibility).
* **Annotations**: results of other types (choices, text...) are ignored. A result whose label is
  not in its control's labels, whose control is unknown or bound to another image, or whose mask is
  empty is skipped with a warning; the annotation is rejected (:class:`AnnotationError`) only when
  a result is corrupt (bad RLE, wrong size, rotated image, malformed value) or when nothing usable
  is left.
* **Rotated images** (``image_rotation`` other than 0) are rejected: Label Studio's rotated-image
  coordinates cannot be mapped back reliably, so the user is asked to reset the rotation.
* **Boxes and keypoints** become masks through SAM (``prompt_masker``), after the brush and
  polygon masks. With smart tools the annotation keeps the prompts next to the masks they
  produced, so a rectangle whose box matches (IoU >= 0.5) the bounding box of a mask of its label,
  and a keypoint inside a mask of its label, mark an object already there and are not used;
  negative clicks (``is_positive: false``) are never objects.
* **Keypoints** of one label in one annotation: a keypoint inside the mask already produced for an
  earlier keypoint of that label refines that object (SAM is asked again with all its points);
  a keypoint outside starts a new object. So several clicks on one object give one instance, and
  clicks on separate objects give separate instances.
* **Task score**: the mean of the instance scores, 0 when nothing was found (so tasks where the
  model found nothing sort first for review, with the least confident ones).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from matcher_core.reference import Instance

log = logging.getLogger(__name__)

BRUSH = "brushlabels"
POLYGON = "polygonlabels"
RECTANGLE = "rectanglelabels"
KEYPOINT = "keypointlabels"
MASK_CAPABLE_TYPES = (BRUSH, POLYGON, RECTANGLE, KEYPOINT)
"""Result types that can become a mask, in order of preference for the output control."""

_TAG_TO_TYPE = {
    "brushlabels": BRUSH,
    "polygonlabels": POLYGON,
    "rectanglelabels": RECTANGLE,
    "keypointlabels": KEYPOINT,
}

MAX_CONFIG_CHARS = 1_000_000
"""Longest label config accepted (Label Studio configs are a few KB)."""
MAX_POLYGON_POINTS = 100_000
BRUSH_ALPHA_THRESHOLD = 128
"""Alpha at or above which a brush pixel counts as painted (the canvas anti-aliases edges)."""
POLYGON_MIN_COMPONENT_FRACTION = 0.01
"""Connected parts of a predicted mask smaller than this fraction of it get no polygon."""
POLYGON_TOLERANCE_PX = 1.0
"""Douglas-Peucker tolerance, in pixels, when a predicted mask is written as a polygon."""
RESULT_ID_LENGTH = 10

PromptMasker = Callable[[np.ndarray | None, np.ndarray | None, np.ndarray | None], np.ndarray]
"""SAM for explicit prompts: ``(points (N, 2) XY pixels, point labels (N,) 1/0, box (4,) XYXY
pixels) -> (H, W) bool mask``. Any of the three may be None (points and labels go together)."""


class ConfigError(ValueError):
    """The label config cannot be used (no image, no mask-capable control with labels...)."""


class AnnotationError(ValueError):
    """An annotation (or smart-tool context) cannot be turned into masks or prompts."""


class TaskDataError(ValueError):
    """A task lacks the image the label config points at."""


@dataclass
class ControlSpec:
    """One mask-capable control of the label config."""

    from_name: str
    """The control's ``name`` (results carry it as ``from_name``)."""
    to_name: str
    """The name of the ``<Image>`` it labels (results carry it as ``to_name``)."""
    type: str
    """Result type: ``brushlabels``, ``polygonlabels``, ``rectanglelabels`` or ``keypointlabels``."""
    labels: list[str]
    """Label values as results carry them (a ``<Label alias>`` wins over its ``value``)."""
    image_key: str
    """Task data key of the image, e.g. ``"image"`` for ``<Image value="$image">``."""


@dataclass
class LabelingSchema:
    """What the backend needs from a label config."""

    controls: list[ControlSpec]
    output: ControlSpec
    """Where predictions go (see the module docstring for the order of preference)."""
    image_key: str
    """Task data key of the image the output control labels."""
    labels: list[str]
    """All labels of the mask-capable controls, in config order, without duplicates."""
    _by_name: dict[str, ControlSpec] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name = {control.from_name: control for control in self.controls}

    def control(self, from_name: object) -> ControlSpec | None:
        """The mask-capable control called ``from_name``, or None."""
        return self._by_name.get(from_name) if isinstance(from_name, str) else None


# ---------------------------------------------------------------------------------------------
# Label config


def parse_label_config(xml: str) -> LabelingSchema:
    """Read the controls the backend can use from a Label Studio label config.

    Raises:
        ConfigError: not a parseable config, no ``<Image>`` with a ``$key`` value, or no
            Brush/Polygon/Rectangle/KeyPoint ``...Labels`` control with labels on such an image.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise ConfigError("label config is empty")
    if len(xml) > MAX_CONFIG_CHARS:
        raise ConfigError(f"label config is longer than {MAX_CONFIG_CHARS} characters")
    # Label configs never need a DTD; refusing it rules out entity-expansion and XXE tricks
    # before the XML parser sees them.
    if re.search(r"<!\s*(DOCTYPE|ENTITY)", xml, re.IGNORECASE):
        raise ConfigError("label config must not contain a DOCTYPE or ENTITY declaration")
    try:
        interface = LabelInterface(xml)
        controls = list(interface.controls)
        objects = list(interface.objects)
    except Exception as error:  # the SDK raises many types (lxml, pydantic, KeyError...)
        raise ConfigError(f"label config cannot be parsed: {error}") from error

    images: dict[str, str] = {}  # image tag name -> task data key
    for obj in objects:
        tag = str(getattr(obj, "tag", "") or "").lower()
        # The raw attribute: the SDK falls back to valueList (multi-page images) for ``value``.
        value = (getattr(obj, "attr", None) or {}).get("value")
        if tag != "image" or not obj.name:
            continue
        if isinstance(value, str) and re.fullmatch(r"\$[^\s,$]+", value):
            images[obj.name] = value[1:]
        else:
            log.warning(
                "<Image name=%r> has no $key value (valueList images are not supported)",
                obj.name,
            )
    if not images:
        raise ConfigError(
            'label config has no <Image name="..." value="$key"> tag: this backend labels images'
        )

    specs: list[ControlSpec] = []
    ignored: list[str] = []
    for control in controls:
        result_type = _TAG_TO_TYPE.get(str(getattr(control, "tag", "") or "").lower())
        if result_type is None:
            continue
        image_names = [name for name in (control.to_name or []) if name in images]
        labels = [label for label in (control.labels or []) if isinstance(label, str) and label]
        if not image_names:
            ignored.append(f"{control.tag} {control.name!r} is not bound to an <Image>")
            continue
        if not labels:
            ignored.append(f"{control.tag} {control.name!r} has no <Label>")
            continue
        specs.append(
            ControlSpec(
                from_name=control.name,
                to_name=image_names[0],
                type=result_type,
                labels=list(dict.fromkeys(labels)),
                image_key=images[image_names[0]],
            )
        )
    if not specs:
        detail = f" ({'; '.join(ignored)})" if ignored else ""
        raise ConfigError(
            "label config has no BrushLabels, PolygonLabels, RectangleLabels or KeyPointLabels "
            f"control with labels on an image{detail}"
        )
    for reason in ignored:
        log.warning("label config: %s; ignored", reason)

    output = min(specs, key=lambda spec: MASK_CAPABLE_TYPES.index(spec.type))
    labels = list(dict.fromkeys(label for spec in specs for label in spec.labels))
    return LabelingSchema(controls=specs, output=output, image_key=output.image_key, labels=labels)


def task_image_url(task: dict, schema: LabelingSchema) -> str:
    """The URL of the task's image that the output control labels (``task["data"][image_key]``).

    Raises:
        TaskDataError: the task has no such key, or its value is not a non-empty string.
    """
    data = task.get("data") if isinstance(task, dict) else None
    task_id = task.get("id") if isinstance(task, dict) else None
    if not isinstance(data, dict):
        raise TaskDataError(f"task {task_id} has no 'data' object")
    url = data.get(schema.image_key)
    if not isinstance(url, str) or not url.strip():
        available = ", ".join(sorted(str(key) for key in data)) or "none"
        raise TaskDataError(
            f"task {task_id} has no image under data[{schema.image_key!r}] "
            f"(the key of the <Image> labelled by {schema.output.from_name!r}; "
            f"keys present: {available})"
        )
    return url.strip()


# ---------------------------------------------------------------------------------------------
# Annotation -> masks


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
    height, width = _check_image_size(image_size)
    if not isinstance(results, list):
        raise AnnotationError(f"annotation result must be a list, got {type(results).__name__}")
    masks: dict[str, list[np.ndarray]] = {}
    skipped: list[str] = []
    keypoints: dict[str, list[np.ndarray]] = {}  # label -> XY pixel points, in order
    rectangles: list[tuple[str, list[str], np.ndarray]] = []  # (where, labels, XYXY box)

    for index, result in enumerate(results):
        where = f"result #{index}"
        if not isinstance(result, dict):
            raise AnnotationError(f"{where} is not an object")
        result_type = result.get("type")
        if result_type not in MASK_CAPABLE_TYPES:
            log.debug("%s of type %r carries no mask; ignored", where, result_type)
            continue
        where = f"{result_type} {where} (id {result.get('id')!r})"
        control = schema.control(result.get("from_name"))
        if control is None or control.type != result_type:
            skipped.append(f"{where}: no {result_type} control named {result.get('from_name')!r}")
            continue
        if control.image_key != schema.image_key:
            skipped.append(f"{where}: labels image {control.to_name!r}, not the output image")
            continue
        _check_frame(result, height, width, where)
        value = result.get("value")
        if not isinstance(value, dict):
            raise AnnotationError(f"{where}: 'value' must be an object")
        labels = _known_labels(value, result_type, control, where, skipped)
        if not labels:
            continue

        if result_type == KEYPOINT:
            point = _keypoint_xy(value, height, width, where)
            if result.get("is_positive") is False:
                log.debug("%s is a negative smart-tool click, not an object; ignored", where)
                continue
            for label in labels:
                keypoints.setdefault(label, []).append(point)
            continue
        if result_type == RECTANGLE:
            box = _rectangle_box(value, height, width, where)
            if box[2] <= box[0] or box[3] <= box[1]:
                skipped.append(f"{where}: empty rectangle")
            else:
                rectangles.append((where, labels, box))
            continue
        if result_type == BRUSH:
            mask = decode_brush(value, height, width, where)
        else:
            points_xy = _percent_to_pixels(_polygon_points(value, where), height, width)
            mask = rasterize_polygon(points_xy, height, width)
        if not mask.any():
            skipped.append(f"{where}: empty mask")
            continue
        for label in labels:
            masks.setdefault(label, []).append(mask)

    # Boxes and clicks last: with smart tools, the annotation keeps the prompts next to the
    # masks they produced, and a prompt covering an object already drawn is not another object.
    for where, labels, box in rectangles:
        if all(_box_repeats_a_mask(box, masks.get(label, ())) for label in labels):
            log.info("%s: outlines a mask already in the annotation; not a new object", where)
            continue
        if prompt_masker is None:
            skipped.append(f"{where}: rectangles need SAM (no prompt_masker given)")
            continue
        mask = _call_masker(prompt_masker, None, None, box, height, width)
        if not mask.any():
            skipped.append(f"{where}: SAM returned an empty mask for the box")
            continue
        for label in labels:
            masks.setdefault(label, []).append(mask)
    for label, points in keypoints.items():
        drawn = masks.get(label, [])
        points = [p for p in points if not any(m[int(p[1]), int(p[0])] for m in drawn)]
        if not points:
            continue
        if prompt_masker is None:
            skipped.append(f"{len(points)} keypoint(s) of {label!r}: need SAM (no prompt_masker)")
            continue
        for mask in _keypoint_objects(points, prompt_masker, height, width):
            if mask.any():
                masks.setdefault(label, []).append(mask)
            else:
                skipped.append(f"keypoint object of {label!r}: SAM returned an empty mask")

    if not masks:
        reasons = "; ".join(skipped) if skipped else "it has no brush, polygon, box or keypoint"
        raise AnnotationError(f"annotation has no usable mask: {reasons}")
    for reason in skipped:
        log.warning("annotation: skipped %s", reason)
    return masks


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


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
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


def _check_frame(result: dict, height: int, width: int, where: str) -> None:
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


def _keypoint_xy(value: dict, height: int, width: int, where: str) -> np.ndarray:
    x = _number(value.get("x"), "x", where)
    y = _number(value.get("y"), "y", where)
    xy = _percent_to_pixels(np.array([[x, y]]), height, width)[0]
    # A click exactly on the right/bottom edge is still on the image.
    return np.clip(xy, 0.0, [width - 1e-3, height - 1e-3])


def _rectangle_box(value: dict, height: int, width: int, where: str) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------
# Instances -> prediction results


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
    height, width = _check_image_size(image_size)
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
        return [{"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255)}]
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


# ---------------------------------------------------------------------------------------------
# Smart tools


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
    height, width = _check_image_size(image_size)
    results = context.get("result") if isinstance(context, dict) else None
    if not isinstance(results, list):
        raise AnnotationError("smart-tool context has no 'result' list")
    points: list[np.ndarray] = []
    point_labels: list[int] = []
    box: np.ndarray | None = None
    positive_label: str | None = None
    any_label: str | None = None
    for index, result in enumerate(results):
        if not isinstance(result, dict) or result.get("type") not in (KEYPOINT, RECTANGLE):
            continue
        result_type = result["type"]
        where = f"smart {result_type} #{index}"
        control = schema.control(result.get("from_name"))
        if control is not None and control.image_key != schema.image_key:
            continue
        _check_frame(result, height, width, where)
        value = result.get("value")
        if not isinstance(value, dict):
            raise AnnotationError(f"{where}: 'value' must be an object")
        labels = value.get(result_type)
        label = labels[0] if isinstance(labels, list) and labels else None
        if label is not None and not isinstance(label, str):
            raise AnnotationError(f"{where}: labels must be strings")
        positive = result.get("is_positive", True) is not False
        if result_type == KEYPOINT:
            points.append(_keypoint_xy(value, height, width, where))
            point_labels.append(1 if positive else 0)
        else:
            box = _rectangle_box(value, height, width, where)
        any_label = any_label or label
        if positive and positive_label is None:
            positive_label = label
    if not points and box is None:
        raise AnnotationError("smart-tool context has no keypoint or rectangle")
    label = positive_label or any_label
    if label is None:
        raise AnnotationError("smart-tool regions carry no label")
    if label not in schema.output.labels:
        raise AnnotationError(
            f"smart-tool label {label!r} is not a label of output control "
            f"{schema.output.from_name!r} ({', '.join(schema.output.labels)})"
        )
    if not points:
        return None, None, box, label
    return (
        np.asarray(points, dtype=np.float32),
        np.asarray(point_labels, dtype=np.int64),
        box,
        label,
    )


def label_config_xml(
    controls: Iterable[tuple[str, str, Iterable[str]]], image_key: str = "image"
) -> str:
    """A minimal label config for ``(control tag, control name, labels)`` triples on one image,
    e.g. ``[("BrushLabels", "label", ["cat"])]`` (used where no project config exists: the
    command line, exported datasets)."""
    from xml.sax.saxutils import quoteattr

    body = "".join(
        f"<{tag} name={quoteattr(name)} toName={quoteattr(image_key)}>"
        + "".join(f"<Label value={quoteattr(label)}/>" for label in labels)
        + f"</{tag}>"
        for tag, name, labels in controls
    )
    return f"<View><Image name={quoteattr(image_key)} value={quoteattr('$' + image_key)}/>{body}</View>"
