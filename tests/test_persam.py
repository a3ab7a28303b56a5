"""PerSAM: location prior, prompts, cascade, multi-instance search, coordinate frames.

Random SAM weights give random masks, so the tests that check *where* masks land use a tiny SAM
whose mask decoder is set by hand to a "feature oracle": whatever the prompt, it segments the
embedding cells whose feature correlates with one chosen feature (see :func:`make_oracle`).
That makes the expected instances computable, while every PerSAM step (prior, prompts, the
three decoding passes, suppression, frames) runs for real.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from matcher_core import Example, LabelReference, OneShotSegmenter, Shot, persam, tiny_config
from matcher_core.features import ImageFeatures
from matcher_core.sam_decoder import blend

CHANNELS = 32  # the tiny SAM's embedding channels


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("models"))


def make_segmenter(model_dir: str, **config) -> OneShotSegmenter:
    defaults = dict(mode="persam", score_threshold=0.0, persam_prior_threshold=0.8)
    return OneShotSegmenter(tiny_config(model_dir=model_dir, **{**defaults, **config}))


@torch.no_grad()
def make_oracle(segmenter: OneShotSegmenter, feature: torch.Tensor) -> None:
    """Set the tiny SAM's decoder so that every mask it returns is the set of pixels whose
    embedding cell correlates with ``feature`` by more than 0.5; predicted IoU 0.9.

    How: prompts never reach the image tokens (image-to-token attention outputs zero, mask
    prompts embed to zero), so the final image tokens are the layer-normalised embedding. The
    first upscaling layer computes ``s = corr(cell, feature) - 0.5`` into channel 0 and ``-s``
    into channel 1 (layer norm turns them into +-2 by the sign of s); the second one passes
    channel 0 minus channel 1 and a constant 1 in channel 1; the hypernetworks return (1, -1):
    the logit is ``gelu(+-2) - gelu(1)``, positive exactly where ``s > 0``.
    """
    sam = segmenter.sam
    sam.prompt_encoder.no_mask_embed.weight.zero_()
    mask_embedding = sam.prompt_encoder.mask_downscaling[-1]
    mask_embedding.weight.zero_()
    mask_embedding.bias.zero_()
    for block in sam.mask_decoder.transformer.layers:
        block.cross_attn_image_to_token.out_proj.weight.zero_()
        block.cross_attn_image_to_token.out_proj.bias.zero_()
    first, _, _, second, _ = sam.mask_decoder.output_upscaling
    direction = F.layer_norm(feature.float(), (CHANNELS,)) / CHANNELS
    first.weight.zero_()
    first.bias.zero_()
    first.weight[:, 0] = direction[:, None, None]
    first.weight[:, 1] = -direction[:, None, None]
    first.bias[0], first.bias[1] = -0.5, 0.5
    second.weight.zero_()
    second.bias.zero_()
    second.weight[0, 0], second.weight[1, 0], second.bias[1] = 1.0, -1.0, 1.0
    for mlp in sam.mask_decoder.output_hypernetworks_mlps:
        mlp.layers[-1].weight.zero_()
        mlp.layers[-1].bias.zero_()
        mlp.layers[-1].bias[0], mlp.layers[-1].bias[1] = 1.0, -1.0
    head = sam.mask_decoder.iou_prediction_head.layers[-1]
    head.weight.zero_()
    head.bias.fill_(0.9)


def label_with(feature: torch.Tensor, name: str = "thing") -> LabelReference:
    shot = Shot(
        patch_features=np.zeros((2, 2, 4), np.float16),
        patch_mask=np.ones((2, 2), np.float32),
        sam_target_embedding=feature.numpy().astype(np.float32),
    )
    return LabelReference(label=name, shots=[shot])


def features_with(
    cell_blocks: list[tuple[slice, slice]],
    feature: torch.Tensor,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    seed: int = 0,
) -> ImageFeatures:
    """Hand-made ImageFeatures: a noise SAM embedding (16 x 16 cells of 16 input pixels) with
    ``feature`` written into the given blocks of cells."""
    g = torch.Generator().manual_seed(seed)
    embedding = torch.randn(CHANNELS, 16, 16, generator=g) * 0.5
    for rows, cols in cell_blocks:
        embedding[:, rows, cols] = feature[:, None, None]
    return ImageFeatures(
        original_size=original_size,
        input_size=input_size,
        sam_embedding=embedding,
        patch_features=torch.zeros(2, 2, 4),
    )


@pytest.fixture(scope="module")
def feature() -> torch.Tensor:
    return torch.randn(CHANNELS, generator=torch.Generator().manual_seed(42))


@pytest.fixture(scope="module")
def oracle(model_dir, feature) -> OneShotSegmenter:
    segmenter = make_segmenter(model_dir)
    make_oracle(segmenter, feature)
    return segmenter


def cells_to_original_box(rows: slice, cols: slice, scale: float) -> tuple[float, ...]:
    """XYXY original pixels of a block of 16-pixel embedding cells (input frame / ``scale``)."""
    return (
        cols.start * 16 / scale,
        rows.start * 16 / scale,
        cols.stop * 16 / scale,
        rows.stop * 16 / scale,
    )


def assert_box_close(box, expected, tolerance=3.0):
    assert np.allclose(box, expected, atol=tolerance), f"box {box}, expected about {expected}"


# --- the pieces ------------------------------------------------------------------------------


def test_valid_cells_exclude_the_padding_of_the_sam_input(oracle):
    decoder = oracle.decoder  # 256 input pixels, 16 x 16 cells of 16 pixels
    landscape = persam.valid_cells(decoder, (154, 256))  # centre of row 9 is 152 < 154
    assert landscape[:10].all() and not landscape[10:].any()
    portrait = persam.valid_cells(decoder, (256, 100))  # centre of col 5 is 88, col 6 is 104
    assert portrait[:, :6].all() and not portrait[:, 6:].any()


def test_prompts_put_the_positive_point_on_the_peak_and_the_negative_on_the_minimum(oracle):
    decoder = oracle.decoder
    prior = torch.zeros(16, 16)
    prior[4, 7] = 0.9
    prior[2, 1] = -0.8
    prior[14, 14] = -1.0  # lower, but on the padding of a (154, 256) input
    valid = persam.valid_cells(decoder, (154, 256))
    prompt = persam.first_pass_prompt(decoder, prior, valid)
    torch.testing.assert_close(prompt.point_coords, torch.tensor([[[120.0, 72.0], [24.0, 40.0]]]))
    assert prompt.point_labels.tolist() == [[1, 0]]
    assert prompt.peak == pytest.approx(0.95)
    assert prompt.peak_cell == (4, 7)
    # the attention prior: sigmoid of the standardised prior on the image, zero on the padding
    assert prompt.attn_sim[10:].abs().max() == 0
    assert prompt.attn_sim[4, 7] == prompt.attn_sim[:10].max() and prompt.attn_sim[4, 7] > 0.9
    assert prompt.attn_sim[2, 1] == prompt.attn_sim[:10].min()


def test_taken_cells_hold_neither_the_positive_point_nor_attention(oracle):
    decoder = oracle.decoder
    prior = torch.zeros(16, 16)
    prior[4, 7], prior[9, 2] = 0.9, 0.7
    valid = persam.valid_cells(decoder, (256, 256))
    available = valid.clone()
    available[3:6, 6:9] = False
    prompt = persam.first_pass_prompt(decoder, prior, valid, available)
    assert prompt.peak_cell == (9, 2)
    assert prompt.attn_sim[4, 7] == prompt.attn_sim.min()


def test_the_cascade_blends_the_first_pass_with_persam_f_weights(model_dir, feature):
    segmenter = make_segmenter(model_dir)  # random weights: the three passes differ
    target = features_with([(slice(3, 6), slice(3, 6))], feature, (256, 256), (256, 256))
    prior = persam.sam_location_prior(target, feature.numpy())
    prompt = persam.first_pass_prompt(
        segmenter.decoder, prior, persam.valid_cells(segmenter.decoder, (256, 256))
    )
    calls = []
    decode = segmenter.decoder.decode

    def recording_decode(*args, **kwargs):
        out = decode(*args, **kwargs)
        calls.append((kwargs, out))
        return out

    segmenter.decoder.decode = recording_decode
    weights = np.array([0.6, 0.3, 0.1], np.float32)
    persam.cascade(segmenter, target, prompt, feature.numpy(), weights)

    (first_kwargs, first), (second_kwargs, _), (third_kwargs, _) = calls
    assert first_kwargs["multimask"] and first_kwargs["attn_sim"] is prompt.attn_sim
    assert first_kwargs["target_embedding"] is not None
    torch.testing.assert_close(second_kwargs["mask_input"], blend(first.low_res_logits, weights))
    assert "attn_sim" not in second_kwargs and "attn_sim" not in third_kwargs
    assert third_kwargs["boxes"].shape == (1, 4) and third_kwargs["mask_input"] is not None

    calls.clear()
    persam.cascade(segmenter, target, prompt, feature.numpy(), None)
    assert not calls[0][0]["multimask"]  # plain PerSAM: single-mask first pass
    assert segmenter.timings["decoding"] > 0


# --- whole label search ----------------------------------------------------------------------


def test_two_separated_copies_of_the_target_give_two_instances(oracle, feature):
    blocks = [(slice(2, 5), slice(2, 5)), (slice(10, 13), slice(9, 12))]
    target = features_with(blocks, feature, (200, 200), (256, 256))
    instances = persam.segment_label(oracle, target, label_with(feature))

    assert len(instances) == 2  # one mask per copy although the oracle returns both at once
    scale = 256 / 200
    for instance, (rows, cols) in zip(instances, blocks, strict=True):
        assert instance.label == "thing"
        assert instance.mask.shape == (200, 200) and instance.mask.dtype == bool
        assert_box_close(instance.box, cells_to_original_box(rows, cols, scale))
        assert instance.score == pytest.approx(np.sqrt(0.9 * 1.0), abs=1e-3)
    assert not (instances[0].mask & instances[1].mask).any()


def test_max_instances_bounds_the_search(model_dir, feature):
    segmenter = make_segmenter(model_dir, max_instances=1)
    make_oracle(segmenter, feature)
    blocks = [(slice(2, 5), slice(2, 5)), (slice(10, 13), slice(9, 12))]
    target = features_with(blocks, feature, (200, 200), (256, 256))
    instances = persam.segment_label(segmenter, target, label_with(feature))
    assert len(instances) == 1
    # one instance allowed: SAM's whole mask is kept (both copies)
    assert instances[0].mask[30:60, 30:60].any() and instances[0].mask[130:160, 120:140].any()


def test_an_absent_object_gives_no_instance(oracle, feature):
    target = features_with([], feature, (200, 200), (256, 256), seed=1)
    peak = (persam.sam_location_prior(target, feature.numpy()).max() + 1) / 2
    assert peak < oracle.config.persam_prior_threshold  # only noise looks like the target
    assert persam.segment_label(oracle, target, label_with(feature)) == []


@pytest.mark.parametrize(
    "original_size, input_size, block",
    [
        ((120, 200), (154, 256), (slice(6, 9), slice(10, 14))),  # landscape
        ((200, 120), (256, 154), (slice(10, 14), slice(6, 9))),  # portrait
    ],
)
def test_masks_come_back_at_the_original_resolution_in_place(
    oracle, feature, original_size, input_size, block
):
    target = features_with([block], feature, original_size, input_size)
    (instance,) = persam.segment_label(oracle, target, label_with(feature))
    assert instance.mask.shape == original_size
    assert_box_close(instance.box, cells_to_original_box(*block, 256 / 200))


def test_segmenter_in_persam_mode_finds_the_object_in_real_images(model_dir):
    """End to end through OneShotSegmenter (encoder, cache, reference): a red square on noise,
    found again in a landscape and a portrait image."""
    segmenter = make_segmenter(model_dir, max_instances=1)
    rng = np.random.default_rng(0)

    def scene(height, width, box):
        image = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
        mask = np.zeros((height, width), bool)
        mask[box[1] : box[3], box[0] : box[2]] = True
        image[mask] = (230, 40, 40)
        return image, mask

    reference_image, reference_mask = scene(180, 240, (40, 50, 120, 130))
    reference = segmenter.build_reference([Example(reference_image, {"red": [reference_mask]})])
    make_oracle(segmenter, torch.from_numpy(reference.labels["red"].sam_target_embedding()))
    for height, width, box in [(120, 260, (150, 30, 220, 90)), (260, 120, (20, 150, 90, 230))]:
        image, mask = scene(height, width, box)
        (instance,) = segmenter.segment(reference, image)
        assert instance.label == "red" and instance.mask.shape == (height, width)
        centre = ((box[1] + box[3]) // 2, (box[0] + box[2]) // 2)
        assert instance.mask[centre]
        assert 0.0 <= instance.score <= 1.0


def test_segment_label_is_deterministic(model_dir, feature):
    segmenter = make_segmenter(model_dir, persam_prior_threshold=0.0, min_instance_area=1)
    target = features_with([(slice(3, 6), slice(3, 6))], feature, (100, 150), (171, 256))
    first = persam.segment_label(segmenter, target, label_with(feature))
    second = persam.segment_label(segmenter, target, label_with(feature))
    assert first  # a prior threshold of 0 always prompts SAM, and the random SAM answers
    assert [i.box for i in first] == [i.box for i in second]
    assert all((a.mask == b.mask).all() for a, b in zip(first, second, strict=True))
