"""Shared fixtures: the tiny random-weight segmenter, built once per test session."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_segmenter(tiny_model_dir):
    from matcher_core import OneShotSegmenter, tiny_config

    return OneShotSegmenter(tiny_config(model_dir=tiny_model_dir))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


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
