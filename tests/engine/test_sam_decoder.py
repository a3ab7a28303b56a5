"""SamDecoder: its own mask-decoder forward equals SAM's, batches equal single prompts, and the
PerSAM hooks and the PerSAM-F blend do what they say."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from matcher_core.config import tiny_config
from matcher_core.models import load_sam
from matcher_core.sam_decoder import SamDecoder, blend


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> SamDecoder:
    sam = load_sam(tiny_config(model_dir=str(tmp_path_factory.mktemp("models"))))
    return SamDecoder(sam)


@pytest.fixture(scope="module")
def embedding(decoder) -> torch.Tensor:
    he, we = decoder.embedding_size
    channels = decoder.sam.prompt_encoder.embed_dim
    return torch.randn(channels, he, we, generator=torch.Generator().manual_seed(1))


def _prompts(decoder: SamDecoder, count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random prompt sets in the SAM input frame: 3 points (some negative, some padding), a box
    and a low-res mask prompt each."""
    g = torch.Generator().manual_seed(seed)
    size = decoder.img_size
    he, we = decoder.embedding_size
    corners = torch.rand(count, 2, 2, generator=g) * size
    return dict(
        point_coords=torch.rand(count, 3, 2, generator=g) * size,
        point_labels=torch.randint(-1, 2, (count, 3), generator=g),
        boxes=torch.cat([corners.min(1).values, corners.max(1).values], dim=1),
        mask_input=torch.randn(count, 1, 4 * he, 4 * we, generator=g) * 3,
    )


def _stock(decoder: SamDecoder, embedding, multimask, **prompts):
    """SAM's own prompt encoder + mask decoder, as SamPredictor runs them."""
    sam = decoder.sam
    points = None
    if "point_coords" in prompts:
        points = (prompts["point_coords"], prompts["point_labels"])
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(
            points=points, boxes=prompts.get("boxes"), masks=prompts.get("mask_input")
        )
        return sam.mask_decoder(
            image_embeddings=embedding[None],
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )


PROMPT_KINDS = {
    "points": ("point_coords", "point_labels"),
    "box": ("boxes",),
    "points+box": ("point_coords", "point_labels", "boxes"),
    "points+mask": ("point_coords", "point_labels", "mask_input"),
    "points+box+mask": ("point_coords", "point_labels", "boxes", "mask_input"),
    "mask": ("mask_input",),
}


@pytest.mark.parametrize("count", [1, 4])
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("kind", sorted(PROMPT_KINDS))
def test_hooks_off_equals_the_stock_sam_decoder(decoder, embedding, kind, multimask, count):
    everything = _prompts(decoder, count)
    prompts = {name: everything[name] for name in PROMPT_KINDS[kind]}
    stock_logits, stock_iou = _stock(decoder, embedding, multimask, **prompts)
    out = decoder.decode(embedding, multimask=multimask, **prompts)
    masks = 3 if multimask else 1
    he, we = decoder.embedding_size
    assert out.low_res_logits.shape == (count, masks, 4 * he, 4 * we)
    assert out.iou_predictions.shape == (count, masks)
    torch.testing.assert_close(out.low_res_logits, stock_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.iou_predictions, stock_iou, atol=1e-5, rtol=0)


def _hooks(decoder: SamDecoder, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
    he, we = decoder.embedding_size
    g = torch.Generator().manual_seed(7)
    return dict(
        attn_sim=torch.rand(he, we, generator=g),
        target_embedding=embedding[:, 3, 5] * 2,
    )


@pytest.mark.parametrize("with_hooks", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_a_batch_equals_its_prompt_sets_decoded_one_by_one(
    decoder, embedding, with_hooks, with_mask
):
    count = 5
    prompts = _prompts(decoder, count, seed=3)
    if not with_mask:
        del prompts["mask_input"]
    hooks = _hooks(decoder, embedding) if with_hooks else {}
    batched = decoder.decode(embedding, **prompts, **hooks)
    for i in range(count):
        single = decoder.decode(embedding, **{k: v[i : i + 1] for k, v in prompts.items()}, **hooks)
        torch.testing.assert_close(
            batched.low_res_logits[i : i + 1], single.low_res_logits, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            batched.iou_predictions[i : i + 1], single.iou_predictions, atol=1e-5, rtol=0
        )


def test_each_hook_changes_the_masks_and_the_prior_may_be_flat(decoder, embedding):
    prompts = _prompts(decoder, 2, seed=5)
    del prompts["mask_input"]
    hooks = _hooks(decoder, embedding)
    plain = decoder.decode(embedding, **prompts).low_res_logits
    guided = decoder.decode(embedding, **prompts, attn_sim=hooks["attn_sim"]).low_res_logits
    flat = decoder.decode(embedding, **prompts, attn_sim=hooks["attn_sim"].reshape(-1))
    semantic = decoder.decode(embedding, **prompts, target_embedding=hooks["target_embedding"])
    assert (guided - plain).abs().max() > 1e-4
    assert (semantic.low_res_logits - plain).abs().max() > 1e-4
    torch.testing.assert_close(flat.low_res_logits, guided, atol=0, rtol=0)


def test_mask_prompts_must_match_the_number_of_prompt_sets(decoder, embedding):
    prompts = _prompts(decoder, 3)
    with pytest.raises(ValueError, match="mask inputs"):
        decoder.decode(
            embedding,
            point_coords=prompts["point_coords"],
            point_labels=prompts["point_labels"],
            mask_input=prompts["mask_input"][:1],
        )


def test_blend_is_the_weighted_sum_of_the_three_masks():
    logits = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    first = blend(logits, torch.tensor([1.0, 0.0, 0.0]))
    assert first.shape == (2, 1, 8, 6)
    torch.testing.assert_close(first, logits[:, :1])
    weights = [0.2, -0.5, 1.3]
    expected = sum(w * logits[:, i : i + 1] for i, w in enumerate(weights))
    torch.testing.assert_close(blend(logits, weights), expected)
    with pytest.raises(ValueError):
        blend(logits, [0.5, 0.5])


def test_blend_keeps_the_gradient_of_its_weights():
    logits = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    weights = torch.full((3,), 1 / 3, requires_grad=True)
    blend(logits, weights).sum().backward()
    torch.testing.assert_close(weights.grad, logits.sum(dim=(0, 2, 3)))


def test_upscale_maps_the_input_frame_to_the_original_resolution(decoder):
    # A low-res mask over the left half of the padded square, for a landscape image whose input
    # frame is the top 128 rows: after cropping the padding and resizing, the left half of the
    # original image is inside.
    he, we = decoder.embedding_size
    low = -torch.ones(1, 1, 4 * he, 4 * we)
    low[..., : 2 * we] = 1.0
    size = decoder.img_size
    original = (90, 180)
    upscaled = decoder.upscale(low, (size // 2, size), original)
    assert upscaled.shape == (1, 1, *original)
    inside = upscaled[0, 0] > 0
    assert inside[:, :85].all() and not inside[:, 95:].any()


# --- PerSAM's published decoder arithmetic, transcribed -----------------------------------
# A plain-torch transcription of the released PerSAM transformer
# (per_segment_anything/modeling/transformer.py: TwoWayTransformer, TwoWayAttentionBlock,
# Attention), over the tiny SAM's weights. It keeps the released in-place
# `queries += target_embedding` on the tensor that is also `point_embedding`, so whatever that
# aliasing does, the transcription does too. It does not call matcher_core.


def _published_attention(attention, q, k, v, attn_sim=None):
    """Attention.forward: heads split, softmax, then (+ attn_sim, softmax again)."""
    q, k, v = attention.q_proj(q), attention.k_proj(k), attention.v_proj(v)
    heads = attention.num_heads

    def split(x):
        b, n, c = x.shape
        return x.reshape(b, n, heads, c // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    attn = torch.softmax(q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1]), dim=-1)
    if attn_sim is not None:
        attn = torch.softmax(attn + attn_sim, dim=-1)
    out = attn @ v
    b, h, n, c = out.shape
    return attention.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


def _published_block(block, queries, keys, query_pe, key_pe, attn_sim):
    """TwoWayAttentionBlock.forward (attn_sim in the token-to-image attention only)."""
    if block.skip_first_layer_pe:
        queries = _published_attention(block.self_attn, queries, queries, queries)
    else:
        q = queries + query_pe
        queries = queries + _published_attention(block.self_attn, q, q, queries)
    queries = block.norm1(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = block.norm2(
        queries + _published_attention(block.cross_attn_token_to_image, q, k, keys, attn_sim)
    )
    queries = block.norm3(queries + block.mlp(queries))
    q, k = queries + query_pe, keys + key_pe
    keys = block.norm4(keys + _published_attention(block.cross_attn_image_to_token, k, q, queries))
    return queries, keys


class _PublishedTransformer(torch.nn.Module):
    """TwoWayTransformer.forward of the released PerSAM code, hooks bound at construction."""

    def __init__(self, stock, attn_sim, target_embedding, in_place: bool = True):
        super().__init__()
        self.stock, self.attn_sim, self.target, self.in_place = (
            stock,
            attn_sim,
            target_embedding,
            in_place,
        )

    def forward(self, image_embedding, image_pe, point_embedding):
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)
        image_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries, keys = point_embedding, image_embedding
        for layer in self.stock.layers:
            if self.in_place:
                queries += self.target  # released: also changes point_embedding (same tensor)
            else:
                queries = queries + self.target  # the clean reading
            queries, keys = _published_block(
                layer, queries, keys, point_embedding, image_pe, self.attn_sim
            )
        q = queries + point_embedding
        k = keys + image_pe
        q += self.target
        attn_out = _published_attention(self.stock.final_attn_token_to_image, q, k, keys)
        return self.stock.norm_final_attn(queries + attn_out), keys


def _published_decode(decoder, embedding, attn_sim, target, multimask, in_place, **prompts):
    """SAM's stock prompt encoder and MaskDecoder around the transcribed PerSAM transformer."""
    sam = decoder.sam
    mask_decoder = copy.deepcopy(sam.mask_decoder)
    he, we = decoder.embedding_size
    mask_decoder.transformer = _PublishedTransformer(
        mask_decoder.transformer,
        attn_sim.reshape(1, 1, 1, he * we),  # persam.py: sim.sigmoid_().unsqueeze(0).flatten(3)
        target.reshape(1, 1, -1),  # persam.py: target_embedding (1, 1, C)
        in_place,
    )
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(
            points=(prompts["point_coords"], prompts["point_labels"]), boxes=None, masks=None
        )
        return mask_decoder(
            image_embeddings=embedding[None],
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize(
    ("semantic_prompt", "in_place"), [("published", True), ("queries_only", False)]
)
def test_persam_hooks_equal_the_published_transformer_arithmetic(
    decoder, embedding, semantic_prompt, in_place, multimask
):
    """Published rule: the released in-place `queries += target_embedding` is the default
    arithmetic; `queries_only` equals the same transcription without the aliasing."""
    prompts = _prompts(decoder, 1, seed=11)
    prompts = {k: prompts[k] for k in ("point_coords", "point_labels")}
    hooks = _hooks(decoder, embedding)
    ours = decoder.decode(
        embedding, **prompts, multimask=multimask, **hooks, semantic_prompt=semantic_prompt
    )
    masks, iou = _published_decode(
        decoder,
        embedding,
        hooks["attn_sim"],
        hooks["target_embedding"],
        multimask,
        in_place,
        **prompts,
    )
    torch.testing.assert_close(ours.low_res_logits, masks, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.iou_predictions, iou, atol=1e-5, rtol=1e-4)


def test_the_published_and_clean_semantic_prompts_differ(decoder, embedding):
    """The two arithmetics are really different computations (else the test above pins
    nothing): the leak into the positional term moves the logits."""
    prompts = _prompts(decoder, 1, seed=11)
    prompts = {k: prompts[k] for k in ("point_coords", "point_labels")}
    hooks = _hooks(decoder, embedding)
    published = decoder.decode(embedding, **prompts, **hooks, semantic_prompt="published")
    clean = decoder.decode(embedding, **prompts, **hooks, semantic_prompt="queries_only")
    assert (published.low_res_logits - clean.low_res_logits).abs().max() > 1e-4


def test_bfloat16_precision_returns_float32_close_to_float32_decoding(decoder, embedding):
    bf16 = SamDecoder(decoder.sam, precision="bfloat16")
    prompts = _prompts(decoder, 6)
    hooks = dict(attn_sim=torch.rand(*decoder.embedding_size), target_embedding=embedding[:, 0, 0])
    for kwargs in ({}, hooks):  # Matcher's calls and PerSAM's hooked ones
        exact = decoder.decode(embedding, multimask=True, **prompts, **kwargs)
        approx = bf16.decode(embedding, multimask=True, **prompts, **kwargs)
        assert approx.low_res_logits.dtype == approx.iou_predictions.dtype == torch.float32
        a, b = exact.low_res_logits > 0, approx.low_res_logits > 0
        iou = (a & b).sum() / (a | b).sum().clamp(min=1)
        assert float(iou) >= 0.9  # bfloat16 rounding; the real-size drift is in BENCHMARKS.md
        assert not torch.equal(exact.low_res_logits, approx.low_res_logits)  # it did run bf16


def test_an_unknown_decoder_precision_is_refused(decoder):
    with pytest.raises(ValueError, match="precision"):
        SamDecoder(decoder.sam, precision="float16")


def test_the_spelled_out_softmax_equals_torch_softmax():
    from matcher_core.sam_decoder import _softmax_over_few

    scores = torch.randn(2, 50, 8, 7, generator=torch.Generator().manual_seed(0)) * 30
    scores[0, 0, 0] = torch.tensor([1e3, -1e3, 0, 0, 0, 0, 0])  # no overflow: max subtracted
    torch.testing.assert_close(_softmax_over_few(scores), torch.softmax(scores, dim=-1))
