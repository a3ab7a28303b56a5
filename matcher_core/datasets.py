"""Evaluation datasets: a folder of image/mask pairs (a Label Studio export: ``labelstudio.export``).

Folder layout (that of ``oneshot_seg_real`` and FSS-1000)::

    root/<category>/<name>.jpg  +  root/<category>/<name>.png     (any depth of folders)

A category is any folder that holds at least one image with a same-stem PNG mask; its name is the
folder's path relative to ``root``. Samples are sorted by file name, so "the first k images" is
well defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
