"""Image features: SAM image embeddings and dense patch features of the matching encoder.

Coordinate frames used across the package:

* *original*: pixels of the image as given, ``(H, W)``, points as ``XY``.
* *SAM input*: the image resized so its long side is SAM's ``img_size`` (1024 for the real models),
  ``input_size = (h, w)``; SAM's embedding covers the padded square ``img_size x img_size``.
* *patch grid*: the matching encoder sees the whole image resized to a square
  ``encoder_input_size``; its features form a ``(gh, gw)`` grid that covers the whole original image,
  cell ``(i, j)`` centred on original pixel ``((j + 0.5) * W / gw, (i + 0.5) * H / gh)`` (for the
  EfficientNet too: see the note above :class:`PatchEncoder`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageFeatures:
    """Everything the pipelines need to know about one image, computed once and cached."""

    original_size: tuple[int, int]
    """``(H, W)`` of the original image."""
    input_size: tuple[int, int]
    """``(h, w)`` of the image resized for SAM (long side = SAM ``img_size``)."""
    sam_embedding: torch.Tensor
    """SAM image embedding, ``(C, He, We)`` (``(256, 64, 64)`` for the real models)."""
    patch_features: torch.Tensor
    """L2-normalised encoder features, ``(gh, gw, D)``, covering the whole original image."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sam_embedding, self.patch_features))

    def patch_centres(self) -> np.ndarray:
        """``(gh * gw, 2)`` XY centres of the patch cells in original pixels, row-major."""
        gh, gw = self.patch_features.shape[:2]
        return patch_centres((gh, gw), self.original_size)


def patch_centres(grid: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """``(gh * gw, 2)`` XY centres (original pixels) of a ``grid`` laid over the whole image."""
    gh, gw = grid
    height, width = original_size
    ys, xs = np.meshgrid(
        (np.arange(gh) + 0.5) * height / gh, (np.arange(gw) + 0.5) * width / gw, indexing="ij"
    )
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def pool_mask_to_grid(mask: np.ndarray | torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each grid cell covered by ``mask`` ((H, W) bool), as a ``grid`` float tensor."""
    tensor = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(tensor, grid)[0, 0]


def sam_patch_grid(
    embedding: torch.Tensor, input_size: tuple[int, int], img_size: int
) -> torch.Tensor:
    """PerSAM mode's patch grid: the cells of SAM's ``(C, He, We)`` embedding that cover the image
    (SAM input frame ``input_size`` inside the padded ``img_size`` square; at least one cell each
    way), as ``(gh, gw, C)`` L2-normalised features. The grid then spans the image to within one
    cell (16 SAM input pixels)."""
    _, he, we = embedding.shape
    gh = min(he, max(1, round(input_size[0] * he / img_size)))
    gw = min(we, max(1, round(input_size[1] * we / img_size)))
    return F.normalize(embedding[:, :gh, :gw].permute(1, 2, 0).float(), dim=-1)


def _to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB to a ``(1, 3, H, W)`` float tensor in [0, 255]."""
    return torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float()


class SamImageEncoder:
    """Runs SAM's image encoder the way ``SamPredictor.set_image`` does (resize, normalise, pad)."""

    def __init__(self, sam: nn.Module):
        self.sam = sam
        self.img_size: int = sam.image_encoder.img_size

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """``(h, w)`` with the long side scaled to ``img_size`` (SAM's ResizeLongestSide rule)."""
        height, width = original_size
        scale = self.img_size / max(height, width)
        # At least one row / column: a thin panorama or line scan must not round a side to 0.
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(C, He, We)`` embedding of an ``(H, W, 3)`` uint8 RGB image, and its input size."""
        x, size = self.prepare(image)
        return self.sam.image_encoder(x)[0], size

    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(1, 3, S, S)`` SAM input of an ``(H, W, 3)`` uint8 image (``SamPredictor``'s resize,
        normalisation and padding to ``img_size``) and its ``(h, w)`` before padding."""
        device = next(self.sam.parameters()).device
        size = self.input_size(image.shape[:2])
        x = F.interpolate(
            _to_tensor(image, device),
            size=size,
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        return self.sam.preprocess(x), size  # normalise and pad to img_size x img_size

    @torch.inference_mode()
    def many(self, images: list[np.ndarray]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """:meth:`__call__` for several images in one encoder batch (each resized and padded
        alone, so every embedding equals its single-image one up to float rounding)."""
        batch, sizes = [], []
        for image in images:
            x, size = self.prepare(image)
            batch.append(x)
            sizes.append(size)
        embeddings = self.sam.image_encoder(torch.cat(batch))
        return [(embeddings[i], sizes[i]) for i in range(len(images))]


# The EfficientNet's stride-16 cells are taken as centred like a ViT's, at ``c + 0.5`` cells: TF
# "SAME" padding puts the *geometric* centre of cell ``c`` at input pixel ``16 c + 15.5`` (each
# stride-2 convolution pads one pixel less before than after), but the *effective* centre
# (gradient-weighted, real weights, 4 DAVIS frames at 448 px) is at ``c + 0.49`` rows and
# ``c + 0.63`` columns (spread 0.3 cells).


class PatchEncoder:
    """Dense, L2-normalised patch features of a timm ViT (DINOv2) or EfficientNet.

    A ViT gives its *pre-norm* patch tokens (the last block's output before the final LayerNorm),
    as Matcher does (``forward_features(...)["x_prenorm"]``): the final norm rescales every token
    and shifts every cosine the matching and scoring rules were tuned on.
    """

    def __init__(self, model: nn.Module, input_size: int):
        self.model = model
        self.input_size = input_size
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = torch.tensor(cfg.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", IMAGENET_STD)).view(1, 3, 1, 1)
        self.is_vit = hasattr(model, "patch_embed")

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """``(gh, gw, D)`` features of an ``(H, W, 3)`` uint8 RGB image."""
        device = next(self.model.parameters()).device
        size = (self.input_size, self.input_size)
        x = F.interpolate(
            _to_tensor(image, device) / 255.0,
            size=size,
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        x = (x - self.mean.to(device)) / self.std.to(device)
        return F.normalize(self.grid(x)[0].float(), dim=-1)

    @torch.inference_mode()
    def many(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """:meth:`__call__` for several images in one encoder batch."""
        device = next(self.model.parameters()).device
        size = (self.input_size, self.input_size)
        x = torch.cat(
            [
                F.interpolate(
                    _to_tensor(image, device) / 255.0,
                    size=size,
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )
                for image in images
            ]
        )
        x = (x - self.mean.to(device)) / self.std.to(device)
        grids = F.normalize(self.grid(x).float(), dim=-1)
        return [grids[i] for i in range(len(images))]

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, gh, gw, D)`` features of normalised ``(B, 3, S, S)`` inputs (the network part;
        :mod:`matcher_core.runtime` may replace it by an ONNX Runtime session)."""
        if self.is_vit:
            tokens = self._vit_prenorm_tokens(x)[:, self.model.num_prefix_tokens :]
            gh, gw = self.model.patch_embed.grid_size
            return tokens.reshape(x.shape[0], gh, gw, -1)
        return self._cnn_features(x)

    def _vit_prenorm_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``VisionTransformer.forward_features`` without its final ``norm``."""
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        return m.blocks(x)

    def _cnn_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stride-16 EfficientNet features with the stride-32 stage upsampled and concatenated."""
        m = self.model
        x = m.bn1(m.conv_stem(x))
        stride16 = None
        for index, stage in enumerate(m.blocks):
            x = stage(x)
            if index == 4:  # last stage of stride 16 (112 channels for Lite0)
                stride16 = x
        stride32 = F.interpolate(x, size=stride16.shape[-2:], mode="bilinear", align_corners=False)
        both = torch.cat([F.normalize(stride16, dim=1), F.normalize(stride32, dim=1)], dim=1)
        return both.permute(0, 2, 3, 1)
