"""Segmentation quality metrics: foreground IoU (FSS-1000 / COCO-20i protocol) and boundary IoU."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def intersection_union(prediction: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """Pixel counts ``(|P and G|, |P or G|)`` of two ``(H, W)`` boolean masks."""
    if prediction.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {prediction.shape} vs {truth.shape}")
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    return int(np.logical_and(prediction, truth).sum()), int(np.logical_or(prediction, truth).sum())


def iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Foreground IoU of two ``(H, W)`` masks; 1.0 when both are empty (nothing to find, nothing found)."""
    inter, union = intersection_union(prediction, truth)
    return 1.0 if union == 0 else inter / union


def boundary_region(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its contour (mask minus its erosion).

    The image border counts as outside, so an object cut by the border has a boundary there too.
    """
    mask = mask.astype(bool)
    if width <= 0 or not mask.any():
        return np.zeros_like(mask)
    padded = np.pad(mask, width, constant_values=False)
    eroded = ndimage.binary_erosion(padded, structure=np.ones((3, 3), bool), iterations=width)
    return mask & ~eroded[width:-width, width:-width]


def boundary_width(shape: tuple[int, int], dilation_ratio: float = 0.02) -> int:
    """Boundary band width: ``dilation_ratio`` of the image diagonal, at least one pixel
    (Cheng et al., Boundary IoU, CVPR 2021)."""
    return max(1, int(round(dilation_ratio * float(np.hypot(*shape)))))


def boundary_iou(prediction: np.ndarray, truth: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """IoU of the two masks' boundary bands; 1.0 when both masks are empty."""
    width = boundary_width(prediction.shape, dilation_ratio)
    return iou(boundary_region(prediction, width), boundary_region(truth, width))


class IoUAccumulator:
    """Per-category sums of intersections and unions.

    ``category_iou`` is the FSS-1000 / HSNet protocol: sum of intersections over sum of unions of
    every target of the category; ``mean_iou`` averages it over categories.
    """

    def __init__(self) -> None:
        self.intersections: dict[str, int] = {}
        self.unions: dict[str, int] = {}
        self.per_image: dict[str, list[float]] = {}

    def add(self, category: str, prediction: np.ndarray, truth: np.ndarray) -> float:
        inter, union = intersection_union(prediction, truth)
        self.intersections[category] = self.intersections.get(category, 0) + inter
        self.unions[category] = self.unions.get(category, 0) + union
        value = 1.0 if union == 0 else inter / union
        self.per_image.setdefault(category, []).append(value)
        return value

    def category_iou(self) -> dict[str, float]:
        return {c: (self.intersections[c] / u if u else 1.0) for c, u in self.unions.items()}

    def mean_iou(self) -> float:
        values = list(self.category_iou().values())
        return float(np.mean(values)) if values else float("nan")
