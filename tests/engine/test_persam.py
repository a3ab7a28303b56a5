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

from matcher_core import (
    Example,
    LabelReference,
    OneShotSegmenter,
    SegmenterConfig,
    Shot,
    persam,
    tiny_config,
)
from matcher_core.features import ImageFeatures
from matcher_core.prior import reference_statistics
from matcher_core.sam_decoder import blend

CHANNELS = 32  # the tiny SAM's embedding channels


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("models"))


def make_segmenter(model_dir: str, **config) -> OneShotSegmenter:
    defaults = dict(mode="persam")
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
    """A label whose one shot shows ``feature`` on a block of cells of a noise reference image
    (so its background baseline is that of noise, as the segmenter would compute it)."""
    reference = features_with([(slice(5, 9), slice(5, 9))], feature, (256, 256), (256, 256), 7)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[5:9, 5:9] = True
    mean, maximum, background = reference_statistics(
        reference.sam_embedding, inside, torch.ones(16, 16, dtype=torch.bool)
    )
    shot = Shot(
        patch_features=np.zeros((2, 2, 4), np.float16),
        patch_mask=np.ones((2, 2), np.float32),
        sam_target_embedding=mean.numpy(),
        sam_target_max=maximum.numpy(),
        sam_background_cosine=background.numpy(),
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


def test_grid_prompts_put_the_positive_point_on_the_peak_and_the_negative_on_the_minimum(oracle):
    """persam_prior_frame="grid" (a departure): points at cell centres, padding excluded."""
    decoder = oracle.decoder
    prior = torch.zeros(16, 16)
    prior[4, 7] = 0.9
    prior[2, 1] = -0.8
    prior[14, 14] = -1.0  # lower, but on the padding of a (154, 256) input
    valid = persam.valid_cells(decoder, (154, 256))
    prompt = persam.first_pass_prompt(decoder, prior, valid)
    torch.testing.assert_close(prompt.point_coords, torch.tensor([[[120.0, 72.0], [24.0, 40.0]]]))
    assert prompt.point_labels.tolist() == [[1, 0]]
    assert prompt.peak == pytest.approx(0.9)  # a cosine
    assert prompt.peak_cell == (4, 7)
    # the attention prior: sigmoid of the standardised prior on the image, zero on the padding
    assert prompt.attn_sim[10:].abs().max() == 0
    assert prompt.attn_sim[4, 7] == prompt.attn_sim[:10].max() and prompt.attn_sim[4, 7] > 0.9
    assert prompt.attn_sim[2, 1] == prompt.attn_sim[:10].min()


def _released_prompts(prior, input_size, original_size, img_size=256, grid=(16, 16)):
    """persam.py's prior upsampling, point_selection and attn_sim lines, transcribed in plain
    torch (predictor.postprocess_masks and ResizeLongestSide.apply_coords included)."""
    sim = F.interpolate(prior[None, None], scale_factor=4, mode="bilinear")
    sim = F.interpolate(sim, (img_size, img_size), mode="bilinear", align_corners=False)
    sim = sim[..., : input_size[0], : input_size[1]]
    sim = F.interpolate(sim, original_size, mode="bilinear", align_corners=False).squeeze()
    width = sim.shape[1]
    points = []
    for index in (sim.flatten(0).topk(1)[1], sim.flatten(0).topk(1, largest=False)[1]):
        x = index // width
        y = index - x * width
        points.append([float(y), float(x)])
    coords = torch.tensor(points)
    coords[:, 0] *= input_size[1] / original_size[1]
    coords[:, 1] *= input_size[0] / original_size[0]
    standardised = (sim - sim.mean()) / torch.std(sim)
    attn_sim = F.interpolate(standardised[None, None], size=grid, mode="bilinear").sigmoid()
    return coords, attn_sim[0, 0], sim.max()


@pytest.mark.parametrize(
    "original_size, input_size", [((120, 200), (154, 256)), ((200, 120), (256, 154))]
)
def test_image_prompts_are_the_released_point_selection_and_attention(
    oracle, original_size, input_size
):
    """Published (persam_prior_frame="image"): the prior upsampled to the original image, the
    extreme pixels as points, attn_sim resized from the whole image onto the whole grid."""
    prior = torch.randn(16, 16, generator=torch.Generator().manual_seed(4)).tanh()
    features = ImageFeatures(
        original_size=original_size,
        input_size=input_size,
        sam_embedding=torch.zeros(CHANNELS, 16, 16),
        patch_features=torch.zeros(2, 2, 4),
    )
    prompt = persam.first_pass_prompt_image(oracle.decoder, prior, features)
    coords, attn_sim, peak = _released_prompts(prior, input_size, original_size)
    torch.testing.assert_close(prompt.point_coords[0], coords)
    torch.testing.assert_close(prompt.attn_sim, attn_sim)
    assert prompt.point_labels.tolist() == [[1, 0]]
    assert prompt.peak == pytest.approx(float(peak))
    unguided = persam.first_pass_prompt_image(oracle.decoder, prior, features, guided=False)
    torch.testing.assert_close(unguided.point_coords[0], coords[:1])  # persam_f.py: positive only
    assert unguided.attn_sim is None


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


def recording(segmenter: OneShotSegmenter) -> list[tuple[dict, object]]:
    """Record the decoder calls of ``segmenter`` (keyword arguments and output)."""
    calls = []
    decode = segmenter.decoder.decode

    def recording_decode(*args, **kwargs):
        out = decode(*args, **kwargs)
        calls.append((kwargs, out))
        return out

    segmenter.decoder.decode = recording_decode
    return calls


def cascade_calls(model_dir, feature, weights, guided=True, **config) -> list:
    segmenter = make_segmenter(model_dir, **config)  # random weights: the three passes differ
    target = features_with([(slice(3, 6), slice(3, 6))], feature, (200, 256), (200, 256))
    prior = persam.sam_location_prior(target, feature.numpy())
    valid = persam.valid_cells(segmenter.decoder, (200, 256))
    prompt = persam.first_pass_prompt(segmenter.decoder, prior, valid, guided=guided)
    calls = recording(segmenter)
    persam.cascade(segmenter, target, prompt, feature.numpy(), weights)
    assert segmenter.timings["decoding"] > 0
    return [(kwargs, out, prompt) for kwargs, out in calls]


def test_the_persam_cascade_is_the_published_one(model_dir, feature):
    """persam.py: pass 1 two points + both hooks, single-mask output; pass 2 points + pass-1
    logits, multimask; pass 3 points + box of pass 2's best mask + its logits, multimask."""
    (first, out1, prompt), (second, out2, _), (third, _, _) = cascade_calls(
        model_dir, feature, None
    )
    assert not first["multimask"] and first["attn_sim"] is prompt.attn_sim
    assert first["target_embedding"] is not None and first["semantic_prompt"] == "published"
    assert first["point_labels"].tolist() == [[1, 0]]
    torch.testing.assert_close(second["mask_input"], out1.low_res_logits)
    assert second["boxes"] is None and second["multimask"]
    best = int(out2.iou_predictions[0].argmax())
    torch.testing.assert_close(third["mask_input"], out2.low_res_logits[:, best : best + 1])
    assert third["boxes"].shape == (1, 4) and third["multimask"]
    assert "attn_sim" not in second and "attn_sim" not in third


def test_the_persam_f_cascade_is_the_published_one(model_dir, feature):
    """persam_f.py: pass 1 the positive point, no hooks, multimask, blended with the weights;
    pass 2 point + box of the blended mask + blended logits, multimask; pass 3 point + box of
    pass 2's best mask + its logits, multimask."""
    weights = np.array([0.6, 0.3, 0.1], np.float32)
    (first, out1, _), (second, _, _), (third, _, _) = cascade_calls(
        model_dir, feature, weights, guided=False
    )
    assert first["multimask"] and "attn_sim" not in first and "target_embedding" not in first
    assert first["point_labels"].tolist() == [[1]]
    blended = blend(out1.low_res_logits, weights)
    torch.testing.assert_close(second["mask_input"], blended)
    assert second["multimask"] and third["multimask"]
    # the box of the blended mask, found at the original resolution (pixel indices), then
    # mapped to the SAM input frame like the released predictor's apply_boxes
    segmenter = make_segmenter(model_dir)
    upscaled = segmenter.decoder.upscale(blended, (200, 256), (200, 256))[0, 0] > 0
    ys, xs = np.nonzero(upscaled.numpy())
    expected = [[xs.min(), ys.min(), xs.max(), ys.max()]]
    torch.testing.assert_close(second["boxes"], torch.tensor(expected, dtype=torch.float32))
    assert third["boxes"].shape == (1, 4)


@pytest.mark.parametrize("weights", [None, np.array([0.6, 0.3, 0.1], np.float32)])
def test_single_mask_refinement_is_a_named_departure(model_dir, feature, weights):
    """persam_refine_multimask=False: passes 2 and 3 take SAM's single-mask output (the head
    SAM trains for several prompts); pass 1 keeps the published choice."""
    calls = cascade_calls(
        model_dir, feature, weights, guided=weights is None, persam_refine_multimask=False
    )
    assert [kwargs["multimask"] for kwargs, _, _ in calls] == [weights is not None, False, False]


# --- whole label search ----------------------------------------------------------------------


@pytest.mark.parametrize("frame", ["image", "grid"])
def test_two_separated_copies_of_the_target_give_two_instances(model_dir, feature, frame):
    segmenter = make_segmenter(model_dir, persam_prior_frame=frame)
    make_oracle(segmenter, feature)
    blocks = [(slice(2, 5), slice(2, 5)), (slice(10, 13), slice(9, 12))]
    target = features_with(blocks, feature, (200, 200), (256, 256))
    instances = persam.segment_label(segmenter, target, label_with(feature))

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


def absent_target(feature: torch.Tensor) -> ImageFeatures:
    """Noise with the feature's direction projected out of every cell: nothing looks like it."""
    target = features_with([], feature, (200, 200), (256, 256), seed=1)
    unit = F.normalize(feature, dim=0)
    embedding = target.sam_embedding
    embedding -= unit[:, None, None] * torch.einsum("chw,c->hw", embedding, unit)[None]
    return target


def test_an_absent_object_gives_no_instance(oracle, feature):
    """The absence test: no cell of the target beats the reference's own background."""
    target, label = absent_target(feature), label_with(feature)
    peak = persam.sam_location_prior(target, feature.numpy()).max()
    assert peak < label.background_cosine("mean")
    assert persam.segment_label(oracle, target, label) == []


def test_a_further_instance_must_stand_out_like_the_first(model_dir, feature):
    """Scale-free rule: a second copy that stands above the reference's background by less than
    persam_instance_ratio of the first copy's margin ends the search."""
    blocks = [(slice(2, 5), slice(2, 5)), (slice(10, 13), slice(9, 12))]
    target = features_with(blocks[:1], feature, (200, 200), (256, 256))
    noise = torch.randn(CHANNELS, generator=torch.Generator().manual_seed(3))
    target.sam_embedding[:, blocks[1][0], blocks[1][1]] = (feature + 0.8 * noise)[:, None, None]
    label = label_with(feature)
    prior = persam.sam_location_prior(target, feature.numpy())
    baseline = label.background_cosine("mean")
    second = float(prior[11, 10])
    margin = (second - baseline) / (1.0 - baseline)  # the first copy's peak is 1
    assert 0.1 < margin < 0.9

    def count(ratio: float) -> int:
        segmenter = make_segmenter(model_dir, persam_instance_ratio=ratio)
        make_oracle(segmenter, feature)
        return len(persam.segment_label(segmenter, target, label))

    assert count(margin - 0.05) == 2
    assert count(margin + 0.05) == 1


def test_the_decision_rules_are_scale_free():
    """Shifting and scaling every cosine (another backbone's range) changes no decision."""
    cases = [(0.5, 0.9, 0.2), (0.3, 0.9, 0.2), (0.1, 0.9, 0.2), (0.25, 0.3, 0.2)]
    for scale, shift in [(1.0, 0.0), (0.2, 0.7), (3.0, -0.5)]:
        for peak, first, baseline in cases:
            moved = [scale * v + shift for v in (peak, first, baseline)]
            assert persam.is_further_instance(*moved, 0.5) == persam.is_further_instance(
                peak, first, baseline, 0.5
            )
            assert persam.is_absent(moved[0], moved[2]) == persam.is_absent(peak, baseline)
    assert persam.is_further_instance(0.6, 0.9, 0.2, 0.5)  # margin 0.4 >= 0.5 * 0.7
    assert not persam.is_further_instance(0.5, 0.9, 0.2, 0.5)  # margin 0.3 < 0.35
    assert persam.is_absent(0.2, 0.2) and not persam.is_absent(0.21, 0.2)


def test_the_score_is_the_geometric_mean_of_iou_and_lift_over_the_baseline():
    assert persam.instance_score(0.81, 1.0, 0.3) == pytest.approx(0.9)
    assert persam.instance_score(1.0, 0.65, 0.3) == pytest.approx(np.sqrt(0.5))
    assert persam.instance_score(1.0, 0.2, 0.3) == 0.0  # below the baseline
    assert persam.instance_score(1.4, 1.0, 0.3) == 1.0  # SAM's IoU clipped to [0, 1]


@pytest.mark.parametrize("preset", ["persam", "persam_f"])
def test_the_published_presets_return_exactly_one_mask(model_dir, feature, preset):
    """persam.py / persam_f.py: one mask per target, whatever the target: no instance search
    (two copies come back as SAM's one mask) and no absence test."""
    segmenter = OneShotSegmenter(tiny_config(model_dir=model_dir).with_preset(preset))
    make_oracle(segmenter, feature)
    label = label_with(feature)
    if preset == "persam_f":
        label.mask_weights = np.array([0.5, 0.3, 0.2], np.float32)
    blocks = [(slice(2, 5), slice(2, 5)), (slice(10, 13), slice(9, 12))]
    (both,) = persam.segment_label(
        segmenter, features_with(blocks, feature, (200, 200), (256, 256)), label
    )
    assert both.mask[30:60, 30:60].any() and both.mask[130:160, 120:140].any()
    (absent,) = persam.segment_label(segmenter, absent_target(feature), label)
    assert absent.mask.shape == (200, 200)


def test_the_presets_switch_every_departure_off():
    for name in ("persam", "persam_f"):
        config = SegmenterConfig().with_preset(name)
        assert config.mode == "persam" and config.max_instances == 1
        assert not config.persam_multi_instance and not config.absence_test
        assert config.persam_semantic_prompt == "published" and config.persam_refine_multimask
        assert config.persam_prior_frame == "image"
    assert not SegmenterConfig().with_preset("persam").persam_use_mask_weights
    persam_f_config = SegmenterConfig().with_preset("persam_f")
    assert persam_f_config.persam_f_first_pass == "published"
    assert persam_f_config.persam_use_mask_weights and persam_f_config.persam_f_train_on_reference
    product = SegmenterConfig()
    assert product.persam_multi_instance and product.absence_test  # the departures


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
    segmenter = make_segmenter(model_dir, min_instance_area=1)
    target = features_with([(slice(3, 6), slice(3, 6))], feature, (100, 150), (171, 256))
    first = persam.segment_label(segmenter, target, label_with(feature))
    second = persam.segment_label(segmenter, target, label_with(feature))
    assert first  # the copy beats the reference's background, and the random SAM answers
    assert [i.box for i in first] == [i.box for i in second]
    assert all((a.mask == b.mask).all() for a, b in zip(first, second, strict=True))
