"""The Matcher pipeline end to end.

Two kinds of tests:

* with the tiny random models (``tiny_config``): shapes, coordinate frames, determinism, batching;
  the masks themselves mean nothing.
* with hand-made patch features and :class:`OutlineDecoder`, a stand-in for SAM that returns the
  true object under the prompt points: these prove the algorithm (two objects give two instances,
  an absent object gives none) through the real matching, prompt, decoding-frame, scoring and
  upsampling code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from matcher_core import Example, LabelReference, OneShotSegmenter, Shot, tiny_config
from matcher_core import proposals as proposals_module
from matcher_core.features import ImageFeatures, SamImageEncoder, pool_mask_to_grid
from matcher_core.matcher import segment_label
from matcher_core.matching import absence_baseline
from matcher_core.prompts import PromptBatch, sample_prompts
from matcher_core.proposals import decode_prompt_sets, low_res_crop
from matcher_core.sam_decoder import DecoderOutput, SamDecoder

STAGES = {"matching", "prompts", "decoding", "scoring"}


@pytest.fixture(scope="module")
def segmenter(tiny_model_dir) -> OneShotSegmenter:
    return OneShotSegmenter(tiny_config(model_dir=tiny_model_dir))


@pytest.fixture
def permissive(segmenter, monkeypatch) -> OneShotSegmenter:
    """The tiny segmenter with filters opened: random SAM masks are small and hold few matches."""
    config = segmenter.config.replace(min_purity=0.0, min_instance_area=1)
    monkeypatch.setattr(segmenter, "config", config)
    return segmenter


def synthetic_image(height: int, width: int) -> np.ndarray:
    """``(H, W, 3)`` uint8: colour ramps and a checkerboard, so every region differs."""
    ys, xs = np.mgrid[:height, :width]
    checker = ((xs // 10 + ys // 10) % 2) * 255
    return np.stack([xs * 255 // width, ys * 255 // height, checker], -1).astype(np.uint8)


def box_mask(size: tuple[int, int], y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    """``(H, W)`` bool rectangle given in fractions of the height and width."""
    height, width = size
    mask = np.zeros(size, dtype=bool)
    mask[round(y0 * height) : round(y1 * height), round(x0 * width) : round(x1 * width)] = True
    return mask


def iou(first: np.ndarray, second: np.ndarray) -> float:
    return float((first & second).sum() / max(1, (first | second).sum()))


# --- small pieces --------------------------------------------------------------------------------


def test_low_res_crop_keeps_the_image_part_of_the_padded_square():
    assert low_res_crop(256, (576, 1024), 1024) == (144, 256)
    assert low_res_crop(64, (256, 144), 256) == (64, 36)


# --- tiny random models: frames, batching, determinism -------------------------------------------


def test_batched_decoding_equals_one_prompt_set_at_a_time(segmenter, monkeypatch):
    image = synthetic_image(90, 160)
    features = segmenter.features(image)
    matched = features.patch_centres()[[9, 10, 18, 27, 36, 44, 45, 50]]
    config = segmenter.config.replace(num_clusters=4, instance_prompts=6, use_box=True)
    batch = sample_prompts(matched, config, np.random.default_rng(0), 5.0, features.original_size)
    assert len(batch) > 4
    crop = low_res_crop(64, features.input_size, 256)

    def decode():
        return decode_prompt_sets(
            segmenter.decoder, features.sam_embedding, batch, (90, 160), "all", crop
        )

    monkeypatch.setattr(proposals_module, "CPU_DECODER_CHUNK", 64)
    batched = decode()
    monkeypatch.setattr(proposals_module, "CPU_DECODER_CHUNK", 1)
    single = decode()
    torch.testing.assert_close(batched.logits, single.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.iou, single.iou, atol=1e-5, rtol=1e-5)


def one_set(points: list[tuple[float, float]], box=None) -> PromptBatch:
    return PromptBatch(
        points=np.array([points], np.float32),
        labels=np.ones((1, len(points)), np.int64),
        boxes=None if box is None else np.array([box], np.float32),
        kinds=["test"],
        centres=np.array(points, np.float32),
    )


def test_sam_outputs_are_the_ones_trained_for_the_prompt(segmenter):
    # SAM trains its 3 multimask outputs for a lone point, its single-mask output for several
    # points or a box (SamPredictor.predict's docstring).
    features = segmenter.features(synthetic_image(90, 160))
    embedding, crop = features.sam_embedding, low_res_crop(64, features.input_size, 256)
    decoder = segmenter.decoder

    def outputs(batch, mask_output):
        return decode_prompt_sets(decoder, embedding, batch, (90, 160), mask_output, crop)

    def sam(batch, multimask):
        coords = torch.from_numpy(decoder.to_input_coords(batch.points, (90, 160)))
        boxes = None
        if batch.boxes is not None:
            corners = decoder.to_input_coords(batch.boxes.reshape(-1, 2, 2), (90, 160))
            boxes = torch.from_numpy(corners.reshape(-1, 4))
        return decoder.decode(
            embedding, coords, torch.from_numpy(batch.labels), boxes, multimask=multimask
        )

    lone, pair = one_set([(40.0, 30.0)]), one_set([(40.0, 30.0), (100.0, 60.0)])
    boxed = one_set([(40.0, 30.0)], box=(10.0, 10.0, 80.0, 70.0))
    for batch in (pair, boxed):
        torch.testing.assert_close(
            outputs(batch, "auto").logits, sam(batch, False).low_res_logits[:, 0]
        )
        assert len(outputs(batch, "single")) == 1 and len(outputs(batch, "all")) == 3
    three = sam(lone, True)
    best = int(three.iou_predictions[0].argmax())
    torch.testing.assert_close(outputs(lone, "auto").logits[0], three.low_res_logits[0, best])
    torch.testing.assert_close(outputs(lone, "all").iou, three.iou_predictions[0])


@pytest.mark.parametrize(
    "size", [(90, 160), (160, 90), (37, 301)], ids=["wide", "portrait", "strip"]
)
def test_masks_come_back_at_the_original_resolution(permissive, size):
    image = synthetic_image(*size)
    object_mask = box_mask(size, 0.25, 0.6, 0.3, 0.7)
    reference = permissive.build_reference([Example(image, {"thing": [object_mask]})])
    instances = segment_label(permissive, permissive.features(image), reference.labels["thing"])
    assert 1 <= len(instances) <= permissive.config.max_instances
    for instance in instances:
        assert instance.label == "thing"
        assert instance.mask.shape == size and instance.mask.dtype == bool
        ys, xs = np.nonzero(instance.mask)
        assert instance.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert 0.0 <= instance.score <= 1.0
    assert [i.score for i in instances] == sorted((i.score for i in instances), reverse=True)


def test_same_inputs_and_seed_give_the_same_instances(permissive):
    reference_image, target_image = synthetic_image(90, 160), synthetic_image(90, 160)[:, ::-1]
    object_mask = box_mask((90, 160), 0.2, 0.7, 0.1, 0.5)
    reference = permissive.build_reference([Example(reference_image, {"thing": [object_mask]})])
    target = permissive.features(np.ascontiguousarray(target_image))
    permissive.timings.clear()
    first = segment_label(permissive, target, reference.labels["thing"])
    assert set(permissive.timings) >= STAGES
    second = segment_label(permissive, target, reference.labels["thing"])
    assert len(first) == len(second) >= 1
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.score == b.score


def test_persam_f_weights_do_not_reach_matcher_prompt_sets(permissive):
    # They are learned on PerSAM's first pass and mean nothing for Matcher's prompt sets.
    image = synthetic_image(90, 160)
    reference = permissive.build_reference(
        [Example(image, {"thing": [box_mask((90, 160), 0.2, 0.7, 0.1, 0.5)]})]
    )
    label_ref = reference.labels["thing"]
    without = segment_label(permissive, permissive.features(image), label_ref)
    label_ref.mask_weights = np.array([0.2, 0.3, 0.5], np.float32)
    with_weights = segment_label(permissive, permissive.features(image), label_ref)
    assert without and len(without) == len(with_weights)
    for a, b in zip(without, with_weights, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)


# --- hand-made features with a SAM stand-in: the algorithm ----------------------------------------


class OutlineDecoder(SamDecoder):
    """SAM stand-in: the mask of a prompt set is the union of the true objects under its positive
    points (in SAM's low-resolution frame), whatever the image embedding.

    It uses the real decoder's frames (``img_size``, low-resolution side, ``upscale``), so the
    pipeline's coordinate conversions are exercised as with SAM.
    """

    def __init__(self, sam: torch.nn.Module, objects: np.ndarray):
        super().__init__(sam)
        height, width = objects.shape
        self.low_res = 4 * sam.prompt_encoder.image_embedding_size[0]
        input_h, input_w = SamImageEncoder(sam).input_size((height, width))
        resized = F.interpolate(
            torch.from_numpy(objects.astype(np.float32))[None, None], (input_h, input_w)
        )
        padded = torch.zeros(1, 1, self.img_size, self.img_size)
        padded[..., :input_h, :input_w] = resized
        low = F.adaptive_avg_pool2d(padded, self.low_res)[0, 0].numpy() > 0.5
        self.components, _ = ndimage.label(low)

    def decode(self, embedding, point_coords=None, point_labels=None, boxes=None, **kwargs):
        multimask = kwargs.get("multimask", True)
        logits = torch.full(
            (len(point_coords), 3 if multimask else 1, self.low_res, self.low_res), -8.0
        )
        scale = self.low_res / self.img_size
        for b, (points, labels) in enumerate(zip(point_coords, point_labels, strict=True)):
            for (x, y), label in zip(points.tolist(), labels.tolist(), strict=True):
                component = self.components[int(y * scale), int(x * scale)]
                if label == 1 and component:
                    logits[b, :, torch.from_numpy(self.components == component)] = 8.0
        return DecoderOutput(logits, torch.ones(logits.shape[:2]))


class Host:
    """What :func:`segment_label` needs from a segmenter, around the stand-in decoder."""

    def __init__(self, segmenter: OneShotSegmenter, decoder: SamDecoder, **config_changes):
        self.config = segmenter.config.replace(**config_changes)
        self.decoder = decoder
        self.timed = segmenter.timed


GRID = (10, 10)
DIMS = 8


def hand_made_features(objects: list[np.ndarray], rng, object_feature: np.ndarray) -> np.ndarray:
    """``(10, 10, 8)`` features: ``object_feature`` (+ noise) on cells the objects cover at least
    half, a background feature (+ noise) elsewhere; L2-normalised."""
    features = np.zeros((*GRID, DIMS), np.float32)
    features[..., 1] = 1.0
    for obj in objects:
        features[pool_mask_to_grid(obj, GRID).numpy() >= 0.5] = object_feature
    features += 0.05 * rng.normal(size=features.shape)
    return features / np.linalg.norm(features, axis=-1, keepdims=True)


def hand_made_case(segmenter, size, target_objects, object_feature=None, seed=0):
    """A reference shot (an object in the middle of a 10x10 grid) and a target with
    ``target_objects`` (``(H, W)`` masks), features made by hand."""
    rng = np.random.default_rng(seed)
    reference_object = np.eye(DIMS, dtype=np.float32)[0]
    ref_mask = box_mask((100, 100), 0.3, 0.7, 0.3, 0.7)
    shot = Shot(
        patch_features=hand_made_features([ref_mask], rng, reference_object).astype(np.float16),
        patch_mask=pool_mask_to_grid(ref_mask, GRID).numpy(),
        sam_target_embedding=np.zeros(32, np.float32),
    )
    target_feature = reference_object if object_feature is None else object_feature
    encoder = SamImageEncoder(segmenter.sam)
    target = ImageFeatures(
        original_size=size,
        input_size=encoder.input_size(size),
        sam_embedding=torch.zeros(32, 16, 16),
        patch_features=torch.from_numpy(hand_made_features(target_objects, rng, target_feature)),
    )
    objects = np.any(target_objects, axis=0) if target_objects else np.zeros(size, dtype=bool)
    decoder = OutlineDecoder(segmenter.sam, objects)
    return LabelReference(label="thing", shots=[shot]), target, decoder


@pytest.mark.parametrize("size", [(120, 200), (200, 120)], ids=["wide", "portrait"])
def test_two_separated_objects_come_back_as_two_instances(segmenter, size):
    first = box_mask(size, 0.1, 0.4, 0.1, 0.4)
    second = box_mask(size, 0.6, 0.9, 0.5, 0.9)
    label_ref, target, decoder = hand_made_case(segmenter, size, [first, second])
    instances = segment_label(Host(segmenter, decoder), target, label_ref)
    assert len(instances) == 2
    found = sorted(instances, key=lambda i: i.box[1])  # top object first
    assert iou(found[0].mask, first) > 0.85
    assert iou(found[1].mask, second) > 0.85
    assert all(i.score > 0.8 for i in instances)


def test_max_instances_keeps_the_best(segmenter):
    size = (120, 200)
    objects = [box_mask(size, 0.1, 0.4, 0.1, 0.4), box_mask(size, 0.6, 0.9, 0.5, 0.9)]
    label_ref, target, decoder = hand_made_case(segmenter, size, objects)
    both = segment_label(Host(segmenter, decoder), target, label_ref)
    best = segment_label(Host(segmenter, decoder, max_instances=1), target, label_ref)
    assert len(best) == 1
    np.testing.assert_array_equal(best[0].mask, both[0].mask)


def test_an_absent_object_yields_no_instance(segmenter):
    # The target shows only background: forward matches land on background cells, whose reverse
    # matches land on the reference background, so every match is rejected.
    label_ref, target, decoder = hand_made_case(segmenter, (120, 200), [])
    assert segment_label(Host(segmenter, decoder, min_purity=0.0), target, label_ref) == []


def test_the_absence_baseline_is_the_reference_object_matched_to_its_own_far_background():
    # Object cells E0; the ring of cells next to it would match perfectly but is not background
    # (its receptive field sees the object); the far background has cosine 0.6 to the object.
    features = np.zeros((8, 8, DIMS), np.float32)
    far = np.zeros(DIMS, np.float32)
    far[[0, 1]] = [0.6, 0.8]
    features[:] = far
    mask = np.zeros((8, 8), np.float32)
    mask[3:5, 3:5] = 1.0  # the object
    for row, col in np.ndindex(8, 8):  # it and its ring: up to 2 steps (4-connected) away
        steps = max(0, 3 - row, row - 4) + max(0, 3 - col, col - 4)
        if steps <= 2:
            features[row, col] = np.eye(DIMS)[0]
    shot = Shot(features.astype(np.float16), mask, np.zeros(4, np.float32))
    assert absence_baseline([shot]) == pytest.approx(0.6, abs=1e-3)


def test_a_target_matching_no_better_than_the_reference_background_is_absent(segmenter):
    # The target object resembles the reference object (cosine 0.3) less than the reference's
    # own background does (noise makes that about 0.5 here): absent, unless the test is off.
    weak = np.zeros(DIMS, np.float32)
    weak[[0, 2]] = [0.3, 0.95]
    size = (120, 200)
    label_ref, target, decoder = hand_made_case(
        segmenter, size, [box_mask(size, 0.2, 0.7, 0.2, 0.6)], object_feature=weak
    )
    shot = label_ref.shots[0]
    far = np.zeros(DIMS, np.float32)
    far[[0, 1]] = [0.5, 0.87]
    outside = ~ndimage.binary_dilation(shot.patch_mask > 0, iterations=2)
    shot.patch_features[outside] = far.astype(np.float16)
    assert segment_label(Host(segmenter, decoder, min_purity=0.0), target, label_ref) == []
    assert segment_label(
        Host(segmenter, decoder, min_purity=0.0, absence_test=False), target, label_ref
    )
    # A margin (in units of the baseline's distance to a perfect match) lets weaker matches pass.
    assert segment_label(
        Host(segmenter, decoder, min_purity=0.0, absence_margin=0.9), target, label_ref
    )


@pytest.mark.parametrize("preset", ["fss", "coco", "part"])
def test_published_presets_return_matchers_one_union_mask(segmenter, monkeypatch, preset):
    config = segmenter.config.with_preset(preset)
    if preset == "coco":  # random SAM heads predict low IoUs; a small grid keeps the test fast
        config = config.replace(
            min_predicted_iou=0.0,
            dense_grid=8,
            dense_min_predicted_iou=0.0,
            dense_min_stability=0.0,
        )
    monkeypatch.setattr(segmenter, "config", config)
    image = synthetic_image(90, 160)
    reference = segmenter.build_reference(
        [Example(image, {"thing": [box_mask((90, 160), 0.2, 0.7, 0.1, 0.5)]})]
    )
    target = segmenter.features(np.ascontiguousarray(image[:, ::-1]))
    instances = segment_label(segmenter, target, reference.labels["thing"])
    assert len(instances) == 1  # no absence test: the published method always answers
    assert instances[0].mask.shape == (90, 160) and instances[0].mask.any()


def test_smart_tools_take_the_single_mask_output_for_several_clicks_or_a_box(segmenter):
    image = synthetic_image(90, 160)
    features = segmenter.features(image)
    decoder = segmenter.decoder
    clicks = np.array([[40.0, 30.0], [100.0, 60.0]], np.float32)
    mask, predicted = segmenter.segment_from_prompts(image, clicks, np.array([1, 0]))
    coords = torch.from_numpy(decoder.to_input_coords(clicks, (90, 160)))[None]
    single = decoder.decode(
        features.sam_embedding, coords, torch.tensor([[1, 0]]), None, multimask=False
    )
    expected = decoder.upscale(single.low_res_logits, features.input_size, (90, 160))[0, 0] > 0
    np.testing.assert_array_equal(mask, expected.numpy())
    assert predicted == pytest.approx(float(single.iou_predictions[0, 0].clamp(0, 1)))
