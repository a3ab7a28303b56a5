"""Light SAM-compatible image encoders: MobileSAM's TinyViT with SAM's own prompt encoder and
mask decoder.

MobileSAM (Zhang et al. 2023, "Faster Segment Anything", Apache-2.0) distils SAM ViT-H's image
encoder into a 5.7M-parameter TinyViT-5M (Wu et al. 2022) and keeps SAM's prompt encoder and mask
decoder *unchanged*, so everything downstream here (``sam_decoder.py`` and its PerSAM hooks,
PerSAM-F, the smart tools) runs on it as on SAM.

The architecture below is written from the published description (TinyViT paper, MobileSAM's
``build_sam_vit_t``): a two-convolution stride-4 stem, one MBConv stage, three windowed-attention
stages with patch-merging convolutions between them (the last merge keeps the resolution, so a
1024-pixel input gives a 64 x 64 grid like SAM's ViTs), then SAM's neck (1x1 conv, LayerNorm2d,
3x3 conv, LayerNorm2d) to 256 channels. Module and parameter names follow MobileSAM's so its
released ``mobile_sam.pt`` loads with ``load_state_dict(strict=True)``; the unused classifier
``norm_head``/``head`` are kept for that reason only.

:func:`build_mobile_sam` gives the real model (``mobile_sam``); :func:`build_mobile_sam_tiny` a
small configuration of the same classes for tests (``mobile_sam_tiny``, random weights only).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MOBILE_SAM_URL = "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt"
"""MobileSAM's released checkpoint (the whole SAM: TinyViT encoder + SAM prompt encoder and mask
decoder; 40.7 MB). The project publishes no checksum for it."""


class Conv2dBN(nn.Sequential):
    """Convolution without bias followed by BatchNorm (keys ``c.*`` and ``bn.*``)."""

    def __init__(self, a, b, kernel=1, stride=1, pad=0, groups=1, bn_weight_init=1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, kernel, stride, pad, groups=groups, bias=False))
        bn = nn.BatchNorm2d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module("bn", bn)


class PatchEmbed(nn.Module):
    """Stride-4 stem: two 3x3 stride-2 Conv-BN with a GELU between."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, dim // 2, 3, 2, 1), nn.GELU(), Conv2dBN(dim // 2, dim, 3, 2, 1)
        )

    def forward(self, x):
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, dim, bn_weight_init=0.0)
        self.act3 = nn.GELU()

    def forward(self, x):
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Tokens ``(B, H*W, C)`` or a map ``(B, C, H, W)`` to tokens at ``stride`` (1x1, depthwise
    3x3 with the stride, 1x1; GELU between)."""

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int, stride: int):
        super().__init__()
        self.resolution = resolution
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x):
        if x.ndim == 3:
            h, w = self.resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks, then a patch merge."""

    def __init__(self, dim, resolution, depth, out_dim, stride, expand_ratio=4.0):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(resolution, dim, out_dim, stride)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Pre-norm multi-head attention inside a window, with a learned bias per head and per
    absolute 2D offset between the two positions (LeViT's attention bias)."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.key_dim = dim // heads
        self.scale = self.key_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(window), range(window)))
        offsets: dict[tuple[int, int], int] = {}
        index = []
        for p in points:
            for q in points:
                offset = (abs(p[0] - q[0]), abs(p[1] - q[1]))
                index.append(offsets.setdefault(offset, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(heads, len(offsets)))
        self.register_buffer(
            "attention_bias_idxs",
            torch.tensor(index, dtype=torch.long).view(len(points), len(points)),
            persistent=False,
        )

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.heads, -1)
        q, k, v = qkv.split([self.key_dim] * 3, dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        bias = self.attention_biases[:, self.attention_bias_idxs]
        attn = (q @ k.transpose(-2, -1)) * self.scale + bias
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


class TinyViTBlock(nn.Module):
    """Windowed attention (zero-padded to whole windows), 3x3 depthwise Conv-BN, MLP."""

    def __init__(self, dim, resolution, heads, window, mlp_ratio=4.0):
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = Attention(dim, heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x):
        h, w = self.resolution
        b, n, c = x.shape
        s = self.window
        if h == s and w == s:
            y = self.attn(x)
        else:
            y = x.view(b, h, w, c)
            pad_b, pad_r = (s - h % s) % s, (s - w % s) % s
            if pad_b or pad_r:
                y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
            ph, pw = h + pad_b, w + pad_r
            nh, nw = ph // s, pw // s
            y = y.view(b, nh, s, nw, s, c).transpose(2, 3).reshape(b * nh * nw, s * s, c)
            y = self.attn(y)
            y = y.view(b, nh, nw, s, s, c).transpose(2, 3).reshape(b, ph, pw, c)
            y = y[:, :h, :w].reshape(b, n, c)
        x = x + y
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """Stages 1-3: TinyViT blocks, then (except the last stage) a patch merge."""

    def __init__(self, dim, resolution, depth, heads, window, out_dim=None, stride=2):
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, resolution, heads, window) for _ in range(depth)
        )
        self.downsample = (
            PatchMerging(resolution, dim, out_dim, stride) if out_dim is not None else None
        )

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (SAM's neck norm)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


@dataclass(frozen=True)
class TinyViTSpec:
    img_size: int = 1024
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    heads: tuple[int, ...] = (2, 4, 5, 10)
    windows: tuple[int, ...] = (7, 7, 14, 7)
    out_chans: int = 256
    num_classes: int = 1000


MOBILE_SAM_SPEC = TinyViTSpec()
"""MobileSAM's image encoder (TinyViT-5M at 1024 pixels)."""
TINY_SPEC = TinyViTSpec(
    img_size=256,
    embed_dims=(16, 24, 32, 40),
    depths=(1, 1, 1, 1),
    heads=(1, 2, 2, 2),
    windows=(7, 7, 14, 7),
    out_chans=32,
    num_classes=8,
)
"""A small configuration of the same classes for tests: a 16 x 16 x 32 embedding, like the tiny SAM."""


class TinyViT(nn.Module):
    """TinyViT image encoder for SAM: ``(B, 3, S, S)`` to ``(B, out_chans, S/16, S/16)``."""

    def __init__(self, spec: TinyViTSpec = MOBILE_SAM_SPEC):
        super().__init__()
        self.img_size = spec.img_size
        dims, depths = spec.embed_dims, spec.depths
        self.patch_embed = PatchEmbed(3, dims[0])
        r = spec.img_size // 4
        # stage 0 at r, 1 at r/2, 2 and 3 at r/4 (the last merge has stride 1)
        resolutions = [r, r // 2, r // 4, r // 4]
        strides = [2, 2, 1]
        layers: list[nn.Module] = [
            ConvLayer(dims[0], (r, r), depths[0], dims[1], strides[0]),
        ]
        for i in range(1, len(dims)):
            last = i == len(dims) - 1
            layers.append(
                BasicLayer(
                    dims[i],
                    (resolutions[i], resolutions[i]),
                    depths[i],
                    spec.heads[i],
                    spec.windows[i],
                    out_dim=None if last else dims[i + 1],
                    stride=1 if last else strides[i],
                )
            )
        self.layers = nn.ModuleList(layers)
        self.grid = resolutions[-1]
        self.norm_head = nn.LayerNorm(dims[-1])  # unused; kept so released checkpoints load
        self.head = nn.Linear(dims[-1], spec.num_classes)  # unused, idem
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], spec.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(spec.out_chans),
            nn.Conv2d(spec.out_chans, spec.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(spec.out_chans),
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.grid, self.grid, c).permute(0, 3, 1, 2)
        return self.neck(x)


def _sam_with(encoder: TinyViT, spec: TinyViTSpec, checkpoint: str | None) -> nn.Module:
    """SAM's prompt encoder and mask decoder (SAM's sizes for ``spec.out_chans == 256``) around
    ``encoder``; weights from ``checkpoint`` (strict)."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    dim, grid = spec.out_chans, spec.img_size // 16
    real = dim == 256
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(spec.img_size, spec.img_size),
            mask_in_chans=16 if real else 4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=dim, mlp_dim=2048 if real else 64, num_heads=8 if real else 2
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256 if real else 32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    if checkpoint is not None:
        with open(checkpoint, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
        sam.load_state_dict(state)
    return sam


def build_mobile_sam(checkpoint: str | None = None) -> nn.Module:
    """MobileSAM (``sam_type="mobile_sam"``): TinyViT-5M encoder + SAM's decoder, 1024 pixels."""
    return _sam_with(TinyViT(MOBILE_SAM_SPEC), MOBILE_SAM_SPEC, checkpoint)


def build_mobile_sam_tiny(checkpoint: str | None = None) -> nn.Module:
    """The test configuration (``sam_type="mobile_sam_tiny"``): 256 pixels, 32 channels."""
    return _sam_with(TinyViT(TINY_SPEC), TINY_SPEC, checkpoint)
