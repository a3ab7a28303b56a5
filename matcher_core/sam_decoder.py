"""Batched SAM mask decoding from a cached image embedding.

All prompt sets for one image go through SAM's prompt encoder and mask decoder in one batch.
Point and box coordinates are in the *SAM input* frame (the image resized so its long side is
``img_size``); use :meth:`SamDecoder.to_input_coords` to convert from original ``XY`` pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecoderOutput:
    low_res_logits: torch.Tensor
    """``(B, M, 4 He, 4 We)`` mask logits (``256 x 256`` for the real models), SAM input frame
    padded to a square; M is 3 with ``multimask`` else 1."""
    iou_predictions: torch.Tensor
    """``(B, M)`` SAM's predicted IoU of each mask."""


class SamDecoder:
    """SAM's prompt encoder + mask decoder over a batch of prompt sets for one image."""

    def __init__(self, sam: nn.Module):
        self.sam = sam
        self.img_size: int = sam.image_encoder.img_size
        self.mask_threshold: float = sam.mask_threshold

    @property
    def device(self) -> torch.device:
        return next(self.sam.parameters()).device

    def to_input_coords(self, xy: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """``(..., 2)`` XY original pixels to the SAM input frame (ResizeLongestSide)."""
        height, width = original_size
        scale = self.img_size / max(height, width)
        new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
        out = np.asarray(xy, dtype=np.float32).copy()
        out[..., 0] *= new_w / width
        out[..., 1] *= new_h / height
        return out

    @torch.inference_mode()
    def decode(
        self,
        embedding: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = True,
    ) -> DecoderOutput:
        """Decode B prompt sets against one image embedding.

        Args:
            embedding: ``(C, He, We)`` SAM image embedding.
            point_coords: ``(B, N, 2)`` XY points, SAM input frame.
            point_labels: ``(B, N)`` 1 positive, 0 negative, -1 padding.
            boxes: ``(B, 4)`` XYXY boxes, SAM input frame.
            mask_input: ``(B, 1, 4 He, 4 We)`` low-resolution logits from an earlier pass.
            multimask: return SAM's 3 masks (else its single-mask output).
        """
        device = self.device
        points = None
        if point_coords is not None:
            points = (point_coords.to(device, torch.float32), point_labels.to(device, torch.int64))
        sparse, dense = self.sam.prompt_encoder(
            points=points,
            boxes=boxes.to(device, torch.float32) if boxes is not None else None,
            masks=mask_input.to(device, torch.float32) if mask_input is not None else None,
        )
        logits, iou = self.sam.mask_decoder(
            image_embeddings=embedding[None].to(device),
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        return DecoderOutput(low_res_logits=logits, iou_predictions=iou)

    def upscale(
        self,
        low_res_logits: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """``(B, M, h, w)`` low-res logits to ``(B, M, H, W)`` logits at the original resolution
        (SAM's ``postprocess_masks``: upsample to the padded square, crop, resize)."""
        x = F.interpolate(
            low_res_logits, (self.img_size, self.img_size), mode="bilinear", align_corners=False
        )
        x = x[..., : input_size[0], : input_size[1]]
        return F.interpolate(x, original_size, mode="bilinear", align_corners=False)
