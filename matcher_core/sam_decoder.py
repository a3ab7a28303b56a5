"""Batched SAM mask decoding from a cached image embedding, with PerSAM's two decoder hooks.

All prompt sets for one image go through SAM's prompt encoder and mask decoder in one batch.
Point and box coordinates are in the *SAM input* frame (the image resized so its long side is
``img_size``); use :meth:`SamDecoder.to_input_coords` to convert from original ``XY`` pixels.

The mask decoder is run by this module's own forward over the weights of SAM's ``MaskDecoder``
and ``TwoWayTransformer`` (same modules, same arithmetic), for two reasons:

* PerSAM's *target-guided attention* and *target-semantic prompting* act inside the transformer,
  which the stock ``sam.mask_decoder`` cannot take as arguments.
* Speed: the stock decoder copies the image embedding and its positional encoding once per
  prompt set (``repeat_interleave``). Here, while the image tokens are still the same for every
  prompt set (until the first image-to-token attention updates them), they stay a batch of one
  that broadcasts, so their projections are computed once instead of B times.

With both hooks off the output equals the stock decoder's (``tests/test_sam_decoder.py``).

The hooks follow the released PerSAM code (``per_segment_anything/modeling/transformer.py``,
``TwoWayTransformer.forward`` and ``Attention.forward``):

* *Target-guided attention*: the attention prior is added to the softmax-normalised
  token-to-image attention of every two-way block (not the final attention), which is then
  normalised again.
* *Target-semantic prompting*: the target embedding is added to the queries before every
  block and once more to the final attention's queries. The released code adds it *in place*
  (``queries += target_embedding``) while ``queries`` is still the very tensor passed as
  ``point_embedding``, so before the first block the token positional term ``query_pe`` becomes
  ``tokens + target`` too, and stays so for every block and for the final attention, whose
  queries are therefore ``queries + tokens + 2 target``. The published PerSeg numbers come
  from that arithmetic, so it is the default (``semantic_prompt="published"``);
  ``semantic_prompt="queries_only"`` is the paper's clean reading (the queries get the target,
  the positional term does not; final queries ``queries + tokens + target``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import DECODER_PRECISIONS

SemanticPrompt = Literal["published", "queries_only"]
"""Where PerSAM's target embedding enters the decoder transformer (module docstring)."""


@dataclass
class DecoderOutput:
    low_res_logits: torch.Tensor
    """``(B, M, 4 He, 4 We)`` mask logits (``256 x 256`` for the real models), SAM input frame
    padded to a square; M is 3 with ``multimask`` else 1."""
    iou_predictions: torch.Tensor
    """``(B, M)`` SAM's predicted IoU of each mask."""


def blend(logits: torch.Tensor, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
    """PerSAM-F: weighted sum of SAM's 3 multimask logits.

    Args:
        logits: ``(B, 3, h, w)`` multimask logits (any resolution).
        weights: ``(3,)`` blend weights (a tensor keeps the autograd graph, for training).

    Returns:
        ``(B, 1, h, w)`` blended logits.
    """
    weights = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device)
    if logits.shape[1] != weights.shape[0]:
        raise ValueError(f"{logits.shape[1]} masks but {weights.shape[0]} weights")
    return (logits * weights.view(1, -1, 1, 1)).sum(dim=1, keepdim=True)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``(Ba, M, K) @ (Bb, K, N)`` where one batch may be 1 and broadcast.

    ``torch.matmul`` would materialise the broadcast operand B times; folding the batch into the
    other operand's rows or columns keeps it a single matrix product without that copy.
    """
    if a.shape[0] == b.shape[0]:
        return a @ b
    if b.shape[0] == 1:  # rows of every a[i] times the one b
        return (a.reshape(-1, a.shape[-1]) @ b[0]).view(a.shape[0], a.shape[1], b.shape[-1])
    # the one a times the columns of every b[i]
    count, inner, cols = b.shape
    product = a[0] @ b.permute(1, 0, 2).reshape(inner, count * cols)
    return product.view(a.shape[1], count, cols).transpose(0, 1)


def _block_diagonal(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, heads * c)`` to ``(B, heads * N, heads * c)``: row ``(g, n)`` holds head ``g``'s
    channels of ``x[:, n]`` and zeros elsewhere, so one matrix product against the other side's
    unsplit channels computes every head's dot products at once (the zeros add exactly 0)."""
    count, tokens, channels = x.shape
    out = x.new_zeros(count, heads, tokens, heads, channels // heads)
    torch.diagonal(out, dim1=1, dim2=3).copy_(x.view(count, tokens, heads, -1).permute(0, 1, 3, 2))
    return out.view(count, heads * tokens, channels)


def _attend(
    attention: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """SAM's ``Attention.forward`` over its weights, with an optional additive attention prior.

    ``q`` is ``(Bq, Nq, C)``, ``k`` and ``v`` ``(Bk, Nk, C)``; a batch size of 1 broadcasts. One
    side is always the few prompt tokens, the other the many image tokens. Splitting the image
    side into heads (``B x heads x HW x c``) forces a transposed copy of it before every matrix
    product; instead the *token* side is laid out block-diagonally (:func:`_block_diagonal`), so
    the image side stays in its projection's layout and no per-head copy of it is made.

    ``prior`` (only with few queries, many keys) is ``(1, 1, 1, Nk)``: added to the
    softmax-normalised attention, which is normalised again (PerSAM's target-guided attention).
    """
    heads = attention.num_heads
    q = attention.q_proj(q)
    k = attention.k_proj(k)
    v = attention.v_proj(v)
    scale = math.sqrt(q.shape[-1] // heads)
    # The 1 / sqrt(d) of the scores goes on the prompt-token side (few rows) instead of the
    # (B, ..., H*W) scores: the same products, and exactly the same numbers when sqrt(d) is a
    # power of two (SAM's cross-attention: d = 16).
    if q.shape[1] <= k.shape[1]:  # prompt tokens attend to image tokens
        count, tokens, channels = max(q.shape[0], k.shape[0]), q.shape[1], q.shape[2]
        scores = _matmul(_block_diagonal(q / scale, heads), k.transpose(1, 2))
        weights = torch.softmax(scores.view(count, heads, tokens, -1), dim=-1)
        if prior is not None:
            weights = torch.softmax(weights + prior, dim=-1)
        out = _matmul(weights.view(count, heads * tokens, -1), v)  # (B, heads * Nq, C)
        out = out.view(count, heads, tokens, heads, channels // heads)
        out = torch.diagonal(out, dim1=1, dim2=3).transpose(2, 3).reshape(count, tokens, channels)
    else:  # image tokens attend to prompt tokens
        if prior is not None:
            raise ValueError("an attention prior applies to prompt-to-image attention only")
        count, tokens = max(q.shape[0], k.shape[0]), k.shape[1]
        scores = _matmul(q, _block_diagonal(k / scale, heads).transpose(1, 2))
        weights = _softmax_over_few(scores.reshape(count, -1, heads, tokens))
        out = _matmul(weights.view(count, -1, heads * tokens), _block_diagonal(v, heads))
    return attention.out_proj(out)


def _softmax_over_few(scores: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(scores, dim=-1)`` for a last axis of a few prompt tokens, spelled out
    (max, subtract, exp, sum, divide: the same steps): PyTorch's CPU kernel vectorises along that
    axis, which for ~7 entries made it 4x slower than these whole-tensor steps, 13 % of decoding
    (BENCHMARKS.md). Equal to ``torch.softmax`` to float rounding (tested)."""
    dtype = scores.dtype  # bfloat16 under the bfloat16 decoder: the softmax itself in float32
    scores = scores.float()
    exp = (scores - scores.amax(-1, keepdim=True)).exp_()
    return exp.div_(exp.sum(-1, keepdim=True)).to(dtype)


def _two_way_block(
    block: nn.Module,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
    prior: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayAttentionBlock.forward``; the prior biases the token-to-image cross-attention."""
    if block.skip_first_layer_pe:
        queries = _attend(block.self_attn, queries, queries, queries)
    else:
        q = queries + query_pe
        queries = queries + _attend(block.self_attn, q, q, queries)
    queries = block.norm1(queries)

    k = keys + key_pe
    queries = block.norm2(
        queries + _attend(block.cross_attn_token_to_image, queries + query_pe, k, keys, prior)
    )
    queries = block.norm3(queries + block.mlp(queries))

    # Image tokens attend to the prompt tokens: from here on they differ per prompt set.
    keys = block.norm4(
        keys + _attend(block.cross_attn_image_to_token, k, queries + query_pe, queries)
    )
    return queries, keys


class SamDecoder:
    """SAM's prompt encoder + mask decoder over a batch of prompt sets for one image."""

    def __init__(self, sam: nn.Module, precision: str = "float32"):
        if precision not in DECODER_PRECISIONS:
            raise ValueError(
                f"unknown decoder precision {precision!r}; one of {DECODER_PRECISIONS}"
            )
        self.sam = sam
        self.precision = precision
        """``float32``, or ``bfloat16`` autocast (``SegmenterConfig.decoder_precision``)."""
        self.img_size: int = sam.image_encoder.img_size
        self.mask_threshold: float = sam.mask_threshold
        self._dense_pe: torch.Tensor | None = None
        self.prompt_sets_decoded = 0
        """Prompt sets decoded so far (``bench/`` reports it per target)."""

    @property
    def device(self) -> torch.device:
        return next(self.sam.parameters()).device

    @property
    def embedding_size(self) -> tuple[int, int]:
        """``(He, We)`` of SAM's image embedding grid."""
        return tuple(self.sam.prompt_encoder.image_embedding_size)

    def to_input_coords(self, xy: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """``(..., 2)`` XY original pixels to the SAM input frame (ResizeLongestSide)."""
        height, width = original_size
        scale = self.img_size / max(height, width)
        new_h, new_w = max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
        out = np.asarray(xy, dtype=np.float32).copy()
        out[..., 0] *= new_w / width
        out[..., 1] *= new_h / height
        return out

    def _image_pe(self, device: torch.device) -> torch.Tensor:
        """``(1, He * We, C)`` positional encoding of the embedding grid (computed once)."""
        if self._dense_pe is None or self._dense_pe.device != device:
            pe = self.sam.prompt_encoder.get_dense_pe().to(device)
            self._dense_pe = pe.flatten(2).transpose(1, 2).contiguous()
        return self._dense_pe

    @torch.inference_mode()
    def decode(
        self,
        embedding: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = True,
        attn_sim: torch.Tensor | None = None,
        target_embedding: torch.Tensor | np.ndarray | None = None,
        semantic_prompt: SemanticPrompt = "published",
    ) -> DecoderOutput:
        """Decode B prompt sets against one image embedding.

        Args:
            embedding: ``(C, He, We)`` SAM image embedding.
            point_coords: ``(B, N, 2)`` XY points, SAM input frame.
            point_labels: ``(B, N)`` 1 positive, 0 negative, -1 padding.
            boxes: ``(B, 4)`` XYXY boxes, SAM input frame.
            mask_input: ``(B, 1, 4 He, 4 We)`` low-resolution logits from an earlier pass.
            multimask: return SAM's 3 masks (else its single-mask output).
            attn_sim: PerSAM target-guided attention: a prior on the embedding grid, ``(He, We)``
                or ``(He * We,)`` (e.g. the sigmoid of the standardised location prior), added to
                the token-to-image attention of every transformer block, shared by all B sets.
            target_embedding: PerSAM target-semantic prompting: a ``(C,)`` SAM feature (the
                reference object's mean embedding) added to all decoder tokens (output and
                prompt tokens) before every transformer block and the final attention.
            semantic_prompt: ``published`` (the released code's arithmetic: the target also
                stays in the tokens' positional term of every block and enters the final
                attention twice) or ``queries_only``; see the module docstring.

        Returns float32 outputs whatever :attr:`precision`.
        """
        if semantic_prompt not in ("published", "queries_only"):
            raise ValueError(f"unknown semantic_prompt {semantic_prompt!r}")
        device = self.device
        # Only entered for bfloat16: a disabled autocast would also switch off a caller's.
        precision = (
            torch.autocast(device.type, torch.bfloat16)
            if self.precision == "bfloat16"
            else contextlib.nullcontext()
        )
        with precision:
            tokens = self._prompt_tokens(point_coords, point_labels, boxes, mask_input, device)
            keys = self._image_tokens(embedding, mask_input, device)
            prior = None
            if attn_sim is not None:
                prior = attn_sim.to(device, torch.float32).reshape(1, 1, 1, keys.shape[1])
            target = None
            if target_embedding is not None:
                target = torch.as_tensor(target_embedding, dtype=torch.float32, device=device)
                target = target.reshape(1, 1, keys.shape[2])
            queries, keys = self._transformer(tokens, keys, prior, target, semantic_prompt)
            logits, iou = self._predict_masks(queries, keys, embedding.shape[-2:])
        selected = slice(1, None) if multimask else slice(0, 1)
        return DecoderOutput(
            low_res_logits=logits[:, selected].float(), iou_predictions=iou[:, selected].float()
        )

    def _prompt_tokens(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor:
        """``(B, 5 + prompts, C)``: SAM's output tokens then the sparse prompt embeddings."""
        prompt_encoder = self.sam.prompt_encoder
        decoder = self.sam.mask_decoder
        points = None
        if point_coords is not None:
            points = (point_coords.to(device, torch.float32), point_labels.to(device, torch.int64))
        boxes = boxes.to(device, torch.float32) if boxes is not None else None
        if points is None and boxes is None:
            count = mask_input.shape[0] if mask_input is not None else 1
            sparse = torch.empty((count, 0, prompt_encoder.embed_dim), device=device)
        else:
            # The mask prompt is embedded in _image_tokens, without the stock per-set expansion.
            sparse, _ = prompt_encoder(points=points, boxes=boxes, masks=None)
        count = sparse.shape[0]
        self.prompt_sets_decoded += count
        if mask_input is not None and mask_input.shape[0] != count:
            raise ValueError(f"{mask_input.shape[0]} mask inputs for {count} prompt sets")
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        return torch.cat([output_tokens.expand(count, -1, -1), sparse], dim=1)

    def _image_tokens(
        self, embedding: torch.Tensor, mask_input: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """``(1 or B, He * We, C)`` image tokens: a batch of one while no mask prompt makes them
        differ per set."""
        prompt_encoder = self.sam.prompt_encoder
        if mask_input is not None:
            dense = prompt_encoder.mask_downscaling(mask_input.to(device, torch.float32))
        else:
            dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        src = embedding.to(device, torch.float32)[None] + dense
        return src.flatten(2).transpose(1, 2)

    def _transformer(
        self,
        tokens: torch.Tensor,
        keys: torch.Tensor,
        prior: torch.Tensor | None,
        target: torch.Tensor | None,
        semantic_prompt: SemanticPrompt,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``TwoWayTransformer.forward`` with PerSAM's hooks (module docstring): the updated
        ``(B, T, C)`` tokens and ``(B, He * We, C)`` image tokens."""
        transformer = self.sam.mask_decoder.transformer
        key_pe = self._image_pe(keys.device)
        queries, query_pe = tokens, tokens
        if target is not None and semantic_prompt == "published" and len(transformer.layers):
            # The released code's in-place `queries += target` before the first block also
            # changes `point_embedding`, the positional term of every block and of the final
            # attention (module docstring).
            query_pe = tokens + target
        for block in transformer.layers:
            if target is not None:
                queries = queries + target
            queries, keys = _two_way_block(block, queries, keys, query_pe, key_pe, prior)
        q = queries + query_pe
        if target is not None:
            q = q + target
        final = _attend(transformer.final_attn_token_to_image, q, keys + key_pe, keys)
        return transformer.norm_final_attn(queries + final), keys

    def _predict_masks(
        self, queries: torch.Tensor, keys: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``MaskDecoder.predict_masks`` after the transformer: ``(B, 4, 4 He, 4 We)`` logits
        and ``(B, 4)`` IoU predictions of all 4 mask tokens."""
        decoder = self.sam.mask_decoder
        count = queries.shape[0]
        height, width = grid
        keys = keys.expand(count, -1, -1)  # a no-op unless the transformer had no block
        image = keys.transpose(1, 2).reshape(count, keys.shape[2], height, width)
        upscaled = decoder.output_upscaling(image)
        mask_tokens = queries[:, 1 : 1 + decoder.num_mask_tokens]
        hyper_in = torch.stack(
            [mlp(mask_tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
            dim=1,
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        return masks, decoder.iou_prediction_head(queries[:, 0])

    def upscale_to_input(
        self, low_res_logits: torch.Tensor, input_size: tuple[int, int]
    ) -> torch.Tensor:
        """``(B, M, h, w)`` low-res logits to ``(B, M, *input_size)`` logits in the SAM input frame
        (upsample to the padded square, crop the padding)."""
        x = F.interpolate(
            low_res_logits, (self.img_size, self.img_size), mode="bilinear", align_corners=False
        )
        return x[..., : input_size[0], : input_size[1]]

    def upscale(
        self,
        low_res_logits: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """``(B, M, h, w)`` low-res logits to ``(B, M, H, W)`` logits at the original resolution
        (SAM's ``postprocess_masks``: upsample to the padded square, crop, resize)."""
        x = self.upscale_to_input(low_res_logits, input_size)
        return F.interpolate(x, original_size, mode="bilinear", align_corners=False)


# Exposed on the class too: callers holding a decoder need not import the module function.
SamDecoder.blend = staticmethod(blend)
