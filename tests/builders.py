"""Test data builders shared by the layers (import: ``from builders import ...``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def disc_image(
    height: int, width: int, centre: tuple[int, int], radius: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A textured background with one bright disc; returns (image (H, W, 3) uint8, mask (H, W) bool)."""
    generator = np.random.default_rng(seed)
    image = generator.integers(0, 80, size=(height, width, 3), dtype=np.uint8)
    ys, xs = np.mgrid[:height, :width]
    mask = (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 <= radius**2
    image[mask] = (220, 40, 40)
    return image, mask


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "oneshot_seg_real"
"""The real photographs beside the checkout (``../shared``), when present."""


def brush_result(
    mask: np.ndarray, label: str = "Cat", size: tuple[int, int] | None = None, **overrides
) -> dict:
    """A Label Studio brush result for an ``(H, W)`` bool mask (``size``: the ``(H, W)`` it
    claims, the mask's own by default; ``overrides`` replace top-level keys)."""
    # Imported here: the engine tests use this module too and need no Label Studio SDK.
    from label_studio_sdk.converter.brush import mask2rle

    height, width = size or mask.shape
    result = {
        "id": f"r{label}",
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "format": "rle",
            "rle": mask2rle(mask.astype(np.uint8) * 255),
            "brushlabels": [label],
        },
    }
    result.update(overrides)
    return result
