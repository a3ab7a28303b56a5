"""A Label Studio JSON export as an evaluation dataset of the engine (``Sample`` per task and label)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from matcher_core.datasets import Sample

from .annotations import annotation_to_masks
from .schema import label_config_xml, parse_label_config


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
