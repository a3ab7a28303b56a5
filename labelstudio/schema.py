"""Label configs: which controls the backend reads and writes, and config XML for tests and exports.

Policies (controls read, output control) are described in :mod:`labelstudio`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from label_studio_sdk.label_interface import LabelInterface

if TYPE_CHECKING:
    pass


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


def parse_label_config(xml: str) -> LabelingSchema:
    """Read the controls the backend can use from a Label Studio label config.

    Raises:
        ConfigError: not a parseable config, no ``<Image>`` with a ``$key`` value, or no
            Brush/Polygon/Rectangle/KeyPoint ``...Labels`` control with labels on such an image.
    """
    controls, objects = _parsed_tags(xml)
    images = _image_keys(objects)
    specs = _mask_controls(controls, images)
    output = min(specs, key=lambda spec: MASK_CAPABLE_TYPES.index(spec.type))
    labels = list(dict.fromkeys(label for spec in specs for label in spec.labels))
    return LabelingSchema(controls=specs, output=output, image_key=output.image_key, labels=labels)


def _parsed_tags(xml: str) -> tuple[list, list]:
    """The control tags and object tags of a label config (the SDK's ``LabelInterface``),
    after the checks that come before any XML parsing."""
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
        return list(interface.controls), list(interface.objects)
    except Exception as error:  # the SDK raises many types (lxml, pydantic, KeyError...)
        raise ConfigError(f"label config cannot be parsed: {error}") from error


def _image_keys(objects: list) -> dict[str, str]:
    """Image tag name -> task data key, of every ``<Image value="$key">``."""
    images: dict[str, str] = {}
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
    return images


def _mask_controls(controls: list, images: dict[str, str]) -> list[ControlSpec]:
    """The mask-capable controls with labels on one of ``images`` (the others logged)."""
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
    return specs


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
