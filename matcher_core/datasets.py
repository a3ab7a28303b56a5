"""Evaluation datasets: a folder of image/mask pairs, or a Label Studio JSON export.

Folder layout (that of ``oneshot_seg_real`` and FSS-1000)::

    root/<category>/<name>.jpg  +  root/<category>/<name>.png     (any depth of folders)

A category is any folder that holds at least one image with a same-stem PNG mask; its name is the
folder's path relative to ``root``. Samples are sorted by file name, so "the first k images" is
well defined.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from .imageio import load_image, load_label_mask

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Sample:
    """One image with its ground-truth mask of one category."""

    category: str
    image_path: Path
    mask_path: Path | None = None
    mask: np.ndarray | None = None
    """Ground truth given directly (Label Studio exports); else read from ``mask_path``."""

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """``(H, W, 3)`` uint8 image and ``(H, W)`` bool mask (foreground = any non-zero label)."""
        image = load_image(self.image_path)
        mask = self.mask if self.mask is not None else load_label_mask(self.mask_path) > 0
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"{self.mask_path}: mask {mask.shape} does not fit image {image.shape[:2]}"
            )
        return image, mask


def folder_dataset(root: str | Path) -> dict[str, list[Sample]]:
    """Categories of a folder dataset, each with its samples sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    categories: dict[str, list[Sample]] = {}
    for image_path in sorted(root.rglob("*")):
        if image_path.suffix.lower() not in IMAGE_SUFFIXES or image_path.suffix.lower() == ".png":
            continue
        mask_path = image_path.with_suffix(".png")
        if not mask_path.exists():
            continue
        category = image_path.parent.relative_to(root).as_posix()
        categories.setdefault(category, []).append(Sample(category, image_path, mask_path))
    if not categories:
        raise ValueError(f"no <name>.jpg + <name>.png pairs under {root}")
    return categories


def _local_image_path(url: str, image_root: Path) -> Path:
    """Map an exported task URL (``/data/upload/3/ab12-cat.jpg``, ``/data/local-files/?d=x/y.jpg``,
    a plain path) to a file under ``image_root``."""
    parsed = urlparse(url)
    if parsed.query.startswith("d="):
        relative = unquote(parsed.query[2:])
    else:
        relative = unquote(parsed.path).lstrip("/")
        if relative.startswith("data/"):
            relative = relative[len("data/") :]
    candidates = [image_root / relative, image_root / Path(relative).name]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"image of {url!r} not found under {image_root}")


def labelstudio_export_dataset(
    export: str | Path, image_root: str | Path
) -> dict[str, list[Sample]]:
    """Categories (labels) of a Label Studio JSON export: one sample per task and label, the mask
    being the union of that label's regions in the task's first annotation."""
    from backend.labelstudio import annotation_to_masks, label_config_xml, parse_label_config

    tags = {"brushlabels": "BrushLabels", "polygonlabels": "PolygonLabels"}

    tasks = json.loads(Path(export).read_text())
    if not isinstance(tasks, list):
        raise ValueError(f"{export}: a Label Studio JSON export is a list of tasks")
    image_root = Path(image_root)
    categories: dict[str, list[Sample]] = {}
    for task in tasks:
        annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        if not annotations:
            continue
        results = [r for r in annotations[0].get("result", []) if r.get("type") in tags]
        url = next((v for v in task.get("data", {}).values() if isinstance(v, str)), None)
        if url is None or not results:
            continue
        # Exports carry no label config: rebuild the controls the results name.
        controls: dict[tuple[str, str], set[str]] = {}
        for r in results:
            labels = r.get("value", {}).get(r["type"], [])
            controls.setdefault((tags[r["type"]], r["from_name"]), set()).update(labels)
        to_name = results[0].get("to_name", "image")
        schema = parse_label_config(
            label_config_xml(
                [(tag, name, sorted(labels)) for (tag, name), labels in controls.items()], to_name
            )
        )
        height, width = results[0]["original_height"], results[0]["original_width"]
        image_path = _local_image_path(url, image_root)
        for label, masks in annotation_to_masks(results, schema, (height, width)).items():
            union = np.any(masks, axis=0)
            categories.setdefault(label, []).append(Sample(label, image_path, mask=union))
    if not categories:
        raise ValueError(f"{export}: no annotated task with masks")
    return categories
