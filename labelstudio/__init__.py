"""Label Studio formats and HTTP: everything that knows Label Studio, nothing that serves it.

Depends on the engine (:mod:`matcher_core`) only; the service (:mod:`backend`) depends on it.

* :mod:`.schema`: label config -> :class:`LabelingSchema`; config XML.
* :mod:`.annotations`: annotation results -> masks.
* :mod:`.results`: engine instances -> prediction results; task score.
* :mod:`.tools`: smart-tool context -> SAM prompts.
* :mod:`.export`: a Label Studio JSON export as an evaluation dataset.
* :mod:`.auth`: token kinds and the one personal-token exchange.
* :mod:`.redaction`: secrets out of URLs and messages.
* :mod:`.guard`: host policy and connections checked on the address they connect to.
* :mod:`.download`: task image bytes (guarded download, local files, data URIs, cache).
* :mod:`.api`: the Label Studio API client of background jobs.


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

from .annotations import annotation_to_masks, decode_brush, rasterize_polygon
from .results import instances_to_results, mask_to_polygons, task_score
from .schema import (
    BRUSH,
    KEYPOINT,
    MASK_CAPABLE_TYPES,
    POLYGON,
    RECTANGLE,
    AnnotationError,
    ConfigError,
    ControlSpec,
    LabelingSchema,
    PromptMasker,
    TaskDataError,
    label_config_xml,
    parse_label_config,
    task_image_url,
)
from .tools import interactive_prompts

__all__ = [
    "BRUSH",
    "KEYPOINT",
    "MASK_CAPABLE_TYPES",
    "POLYGON",
    "RECTANGLE",
    "AnnotationError",
    "ConfigError",
    "ControlSpec",
    "LabelingSchema",
    "PromptMasker",
    "TaskDataError",
    "annotation_to_masks",
    "decode_brush",
    "instances_to_results",
    "interactive_prompts",
    "label_config_xml",
    "mask_to_polygons",
    "parse_label_config",
    "rasterize_polygon",
    "task_image_url",
    "task_score",
]
