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
