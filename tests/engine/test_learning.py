"""Learning from corrections: shots, negative evidence, thresholds, PerSAM-F weights, versions.

Two kinds of tests, as for the Matcher pipeline:

* a *hand-made world* (:class:`WorldSegmenter`): images whose patch features are made by hand and
  a SAM stand-in that returns the true object under the prompt points. Here quality means
  something: a deleted look-alike must stop being predicted, the real object must not.
* the tiny random models: the real SAM decoder and PerSAM-F path, for state, determinism and
  versions (the masks mean nothing).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from matcher_core import Example, OneShotSegmenter, Reference, tiny_config
from matcher_core.config import SegmenterConfig
from matcher_core.features import ImageFeatures, SamImageEncoder, pool_mask_to_grid
from matcher_core.learning import (
    Correction,
    base_reference,
    calibrate_threshold,
    learn,
    model_version,
    select_negatives,
)
from matcher_core.matcher import segment_label
from matcher_core.matching import MatchResult, filter_negative_matches, pool_matches
from matcher_core.sam_decoder import DecoderOutput, SamDecoder
from matcher_core.scoring import score_proposals

SIZE = (100, 100)
GRID = (10, 10)
DIMS = 8
E = np.eye(DIMS, dtype=np.float32)
OBJECT = E[0]
"""Feature of the labelled object."""
LOOK_ALIKE = (0.75 * E[0] + np.sqrt(1 - 0.75**2) * E[2]).astype(np.float32)
"""A different object the one-shot reference confuses with it (cosine 0.75)."""
BACKGROUND = E[1]


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """``(100, 100)`` bool rectangle in pixels."""
    mask = np.zeros(SIZE, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# --- the hand-made world ------------------------------------------------------------------------


class World:
    """Images by id: an ``(100, 100, 3)`` uint8 image filled with its id stands for a scene of
    objects ``(mask, feature)`` on a background, with noisy L2-normalised ``(10, 10, 8)`` patch
    features."""

    def __init__(self) -> None:
        self.scenes: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def image(self, *objects: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        image_id = len(self.scenes) + 1
        rng = np.random.default_rng(image_id)
        features = np.tile(BACKGROUND, (*GRID, 1))
        outline = np.zeros(SIZE, dtype=bool)
        for mask, feature in objects:
            features[pool_mask_to_grid(mask, GRID).numpy() >= 0.5] = feature
            outline |= mask
        features = features + 0.03 * rng.normal(size=features.shape).astype(np.float32)
        features /= np.linalg.norm(features, axis=-1, keepdims=True)
        self.scenes[image_id] = (features, outline)
        return np.full((*SIZE, 3), image_id, dtype=np.uint8)


class WorldDecoder(SamDecoder):
    """SAM stand-in: the mask of a prompt set is the union of the scene's objects under its
    positive points (SAM's low-resolution frame). The scene is read from the image embedding,
    which :class:`WorldSegmenter` fills with the image id."""

    def __init__(self, sam: torch.nn.Module, world: World):
        super().__init__(sam)
        self.world = world
        self.low_res = 4 * sam.prompt_encoder.image_embedding_size[0]
        self.input_size = SamImageEncoder(sam).input_size(SIZE)

    def components(self, image_id: int) -> np.ndarray:
        _, outline = self.world.scenes[image_id]
        h, w = self.input_size
        resized = F.interpolate(torch.from_numpy(outline.astype(np.float32))[None, None], (h, w))
        padded = torch.zeros(1, 1, self.img_size, self.img_size)
        padded[..., :h, :w] = resized
        low = F.adaptive_avg_pool2d(padded, self.low_res)[0, 0].numpy() > 0.5
        return ndimage.label(low)[0]

    def decode(self, embedding, point_coords=None, point_labels=None, boxes=None, **kwargs):
        components = self.components(int(embedding[0, 0, 0]))
        logits = torch.full((len(point_coords), 3, self.low_res, self.low_res), -8.0)
        scale = self.low_res / self.img_size
        for b, (points, labels) in enumerate(zip(point_coords, point_labels, strict=True)):
            for (x, y), label in zip(points.tolist(), labels.tolist(), strict=True):
                component = components[int(y * scale), int(x * scale)]
                if label == 1 and component:
                    logits[b, :, torch.from_numpy(components == component)] = 8.0
        return DecoderOutput(logits, torch.ones(logits.shape[:2]))


class WorldSegmenter(OneShotSegmenter):
    """The tiny segmenter's models, with the world's features and the SAM stand-in."""

    def __init__(self, tiny: OneShotSegmenter, world: World):
        self.__dict__.update(tiny.__dict__)
        self.config = tiny.config.replace(min_instance_area=1)
        self.decoder = WorldDecoder(tiny.sam, world)
        self.world = world

    def features(self, image: np.ndarray) -> ImageFeatures:
        image_id = int(image[0, 0, 0])
        patch_features, _ = self.world.scenes[image_id]
        return ImageFeatures(
            original_size=SIZE,
            input_size=self.decoder.input_size,
            sam_embedding=torch.full((32, 16, 16), float(image_id)),
            patch_features=torch.from_numpy(patch_features),
        )


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> OneShotSegmenter:
    return OneShotSegmenter(tiny_config(model_dir=tiny_model_dir))


def iou(first: np.ndarray, second: np.ndarray) -> float:
    return float((first & second).sum() / max(1, (first | second).sum()))


def world_case(tiny: OneShotSegmenter):
    """A reference of the object, and a correction where the reference also found a look-alike
    that the annotator deleted (only the object is annotated)."""
    world = World()
    segmenter = WorldSegmenter(tiny, world)
    reference_object = box(30, 70, 30, 70)
    reference_image = world.image((reference_object, OBJECT))
    reference = segmenter.build_reference([Example(reference_image, {"thing": [reference_object]})])
    corrected_object, deleted = box(10, 40, 10, 40), box(60, 90, 50, 90)
    corrected_image = world.image((corrected_object, OBJECT), (deleted, LOOK_ALIKE))
    correction = Correction(corrected_image, {"thing": [corrected_object]}, task_id=2)
    return world, segmenter, reference, correction


def test_a_deleted_look_alike_becomes_negative_evidence_and_is_no_longer_predicted(tiny):
    world, segmenter, reference, correction = world_case(tiny)
    # A new image with a small object and a large look-alike: the one-shot reference finds both.
    new_object, new_look_alike = box(60, 80, 10, 30), box(10, 40, 50, 90)
    target = segmenter.features(world.image((new_object, OBJECT), (new_look_alike, LOOK_ALIKE)))
    before = segment_label(segmenter, target, reference.labels["thing"])
    assert sorted(round(iou(i.mask, new_look_alike)) for i in before) == [0, 1]

    learned, report = learn(segmenter, reference, [correction], train_weights=False)
    thing = learned.labels["thing"]
    assert report.labels["thing"]["unmatched_predictions"] == 1
    assert thing.negatives is not None and len(thing.negatives) > 0
    # The negatives are the look-alike's cells, never the annotated object's.
    negatives = thing.negatives.astype(np.float32)
    assert (negatives @ LOOK_ALIKE).min() > 0.9 and (negatives @ OBJECT).max() < 0.8

    after = segment_label(segmenter, target, thing)
    assert len(after) == 1
    assert iou(after[0].mask, new_object) > 0.85
    # An image showing only a look-alike is now rejected outright.
    look_alike_only = segmenter.features(world.image((box(20, 60, 20, 60), LOOK_ALIKE)))
    assert segment_label(segmenter, look_alike_only, reference.labels["thing"])
    assert segment_label(segmenter, look_alike_only, thing) == []


def test_corrections_join_the_shots_worst_predicted_first_and_the_reference_stays_first(tiny):
    world, segmenter, reference, _ = world_case(tiny)
    # Well predicted: the object alone. Badly predicted: the object next to a look-alike.
    easy_object = box(20, 60, 20, 60)
    easy = Correction(world.image((easy_object, OBJECT)), {"thing": [easy_object]}, task_id=5)
    hard_object = box(5, 30, 5, 30)
    hard = Correction(
        world.image((hard_object, OBJECT), (box(50, 95, 40, 95), LOOK_ALIKE)),
        {"thing": [hard_object]},
        task_id=9,
    )
    learned, _ = learn(segmenter, reference, [easy, hard], max_shots=2, train_weights=False)
    shots = learned.labels["thing"].shots
    assert len(shots) == 2 and learned.labels["thing"].base_shots == 1
    assert shots[0] is reference.labels["thing"].shots[0]
    expected = pool_mask_to_grid(hard_object, GRID).numpy()
    np.testing.assert_allclose(shots[1].patch_mask, expected)


def test_the_reference_task_among_the_corrections_adds_no_second_shot(tiny):
    world, segmenter, reference, correction = world_case(tiny)
    reference_image = np.full((*SIZE, 3), 1, np.uint8)  # world image 1 is the reference
    again = Correction(reference_image, {"thing": [box(30, 70, 30, 70)]}, task_id=1)
    learned, report = learn(segmenter, reference, [again, correction], train_weights=False)
    assert report.labels["thing"]["shots"] == 2  # the reference and the correction


def test_a_label_only_corrections_show_is_learned_from_them(tiny):
    world, segmenter, reference, correction = world_case(tiny)
    other = box(10, 50, 50, 90)
    new_label = Correction(world.image((other, LOOK_ALIKE)), {"other": [other]}, task_id=3)
    learned, report = learn(segmenter, reference, [correction, new_label], train_weights=False)
    assert set(learned.labels) == {"thing", "other"}
    assert learned.labels["other"].base_shots == 0 and len(learned.labels["other"].shots) == 1
    # Rebuilding strips it: it was learned, not part of the reference.
    assert set(base_reference(learned).labels) == {"thing"}


# --- state, determinism and versions --------------------------------------------------------------


def state(reference: Reference) -> dict:
    """Every array of a reference, for exact comparisons."""
    out = {}
    for name, label_ref in reference.labels.items():
        for i, shot in enumerate(label_ref.shots):
            out[f"{name}/shot{i}/features"] = shot.patch_features
            out[f"{name}/shot{i}/mask"] = shot.patch_mask
        out[f"{name}/negatives"] = label_ref.negatives
        out[f"{name}/weights"] = label_ref.mask_weights
        out[f"{name}/threshold"] = label_ref.score_threshold
        out[f"{name}/base_shots"] = label_ref.base_shots
    return out


def assert_same_state(first: Reference, second: Reference) -> None:
    a, b = state(first), state(second)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key
    assert model_version(first) == model_version(second)


def synthetic_image(height: int, width: int, shift: int = 0) -> np.ndarray:
    """``(H, W, 3)`` uint8 colour ramps and a checkerboard (so every region differs)."""
    ys, xs = np.mgrid[:height, :width]
    checker = (((xs + shift) // 10 + ys // 10) % 2) * 255
    return np.stack([(xs + shift) * 255 // width % 256, ys * 255 // height, checker], -1).astype(
        np.uint8
    )


@pytest.fixture(scope="module")
def tiny_case(tiny):
    """The tiny models with filters opened (random SAM masks are small), a reference and three
    corrections: two showing the label, one where every prediction was deleted."""
    segmenter = OneShotSegmenter.__new__(OneShotSegmenter)
    segmenter.__dict__.update(tiny.__dict__)
    segmenter.config = tiny.config.replace(
        min_purity=0.0, min_instance_area=1, persam_f_iterations=20
    )
    size = (60, 80)
    thing = np.zeros(size, dtype=bool)
    thing[15:45, 20:60] = True
    reference = segmenter.build_reference([Example(synthetic_image(*size), {"thing": [thing]})])
    a = Correction(synthetic_image(*size, shift=7), {"thing": [np.roll(thing, 5, 1)]}, task_id=1)
    b = Correction(synthetic_image(*size, shift=19), {"thing": [np.roll(thing, -9, 0)]}, task_id=2)
    c = Correction(synthetic_image(*size, shift=33), {}, task_id=3)
    return segmenter, reference, a, b, c


def test_learning_the_same_corrections_twice_gives_the_same_state_whatever_their_order(tiny_case):
    segmenter, reference, a, b, c = tiny_case
    first, report = learn(segmenter, reference, [a, b, c], train_weights=True)
    second, _ = learn(segmenter, reference, [c, a, b], train_weights=True)
    assert_same_state(first, second)
    assert report.version == model_version(first)
    assert report.examples == 3 and report.labels["thing"]["shots"] == 3


def test_incremental_learning_ends_where_a_rebuild_from_all_annotations_does(tiny_case):
    segmenter, reference, a, b, c = tiny_case
    after_a, _ = learn(segmenter, reference, [a], train_weights=True)
    incremental, _ = learn(segmenter, after_a, [a, b, c], train_weights=True)
    from_scratch, _ = learn(segmenter, reference, [a, b, c], train_weights=True)
    assert_same_state(incremental, from_scratch)
    # A serialised learned reference (what the server stores) rebuilds the same way.
    restored = Reference.from_bytes(after_a.to_bytes())
    assert model_version(restored) == model_version(after_a)
    assert_same_state(learn(segmenter, restored, [a, b, c], train_weights=True)[0], incremental)


def test_an_updated_annotation_of_a_task_replaces_the_earlier_one(tiny_case):
    segmenter, reference, a, b, _ = tiny_case
    updated_a = Correction(a.image, {"thing": [np.roll(a.masks["thing"][0], 3, 0)]}, task_id=1)
    both, _ = learn(segmenter, reference, [a, b, updated_a], train_weights=False)
    latest, _ = learn(segmenter, reference, [updated_a, b], train_weights=False)
    assert_same_state(both, latest)


def test_a_correction_changes_the_shots_and_the_version(tiny_case):
    segmenter, reference, a, b, _ = tiny_case
    after_a, _ = learn(segmenter, reference, [a], train_weights=False)
    after_ab, _ = learn(segmenter, reference, [a, b], train_weights=False)
    assert len(reference.labels["thing"].shots) == 1
    assert [len(r.labels["thing"].shots) for r in (after_a, after_ab)] == [2, 3]
    versions = {model_version(r) for r in (reference, after_a, after_ab)}
    # Tiny random models: the version says so.
    assert len(versions) == 3 and all(
        re.fullmatch(r"oneshot-random-[0-9a-f]{12}", v) for v in versions
    )
    assert model_version(learn(segmenter, after_ab, [], train_weights=False)[0]) == model_version(
        learn(segmenter, reference, [], train_weights=False)[0]
    )


def test_a_correction_trains_the_persam_f_weights(tiny_case):
    segmenter, reference, a, b, _ = tiny_case
    learned, report = learn(segmenter, reference, [a, b])
    weights = learned.labels["thing"].mask_weights
    assert weights is not None and weights.shape == (3,)
    assert not np.allclose(weights, 1 / 3)
    entry = report.labels["thing"]
    assert entry["loss_after"] <= entry["loss_before"]
    assert model_version(learned) != model_version(
        learn(segmenter, reference, [a, b], train_weights=False)[0]
    )


def test_versions_of_real_models_carry_no_random_mark(tiny_case):
    _, reference, _, _, _ = tiny_case
    real = Reference(labels=reference.labels, model_id="sam=vit_h:official;random=False")
    assert re.fullmatch(r"oneshot-[0-9a-f]{12}", model_version(real))
    assert model_version(real, {"mode": "persam"}) != model_version(real, {"mode": "matcher"})


def test_every_learned_change_gives_a_new_version(tiny_case):
    segmenter, reference, a, _, _ = tiny_case
    learned, _ = learn(segmenter, reference, [a], train_weights=False)
    thing = learned.labels["thing"]
    seen = {model_version(learned)}
    thing.score_threshold = 0.42
    seen.add(model_version(learned))
    thing.mask_weights = np.array([0.2, 0.3, 0.5], np.float32)
    seen.add(model_version(learned))
    thing.negatives = np.ones((2, thing.shots[0].patch_features.shape[-1]), np.float16)
    seen.add(model_version(learned))
    thing.shots = thing.shots[:1]
    seen.add(model_version(learned))
    assert len(seen) == 5


def test_masks_that_do_not_fit_the_image_are_refused(tiny_case):
    segmenter, reference, a, _, _ = tiny_case
    wrong = Correction(a.image, {"thing": [np.ones((10, 10), bool)]}, task_id=4)
    with pytest.raises(ValueError, match="does not fit"):
        learn(segmenter, reference, [wrong], train_weights=False)


# --- thresholds ------------------------------------------------------------------------------------


def test_threshold_tuning_picks_the_value_that_separates_kept_from_deleted():
    scores = np.array([0.91, 0.84, 0.78, 0.70, 0.55, 0.52, 0.40, 0.31])
    kept = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    assert calibrate_threshold(scores, kept) == pytest.approx((0.70 + 0.55) / 2)
    # One kept prediction among the low ones: losing it costs less than showing two deleted.
    kept_low = np.array([1, 1, 1, 1, 0, 0, 1, 0], bool)
    assert calibrate_threshold(scores, kept_low) == pytest.approx((0.70 + 0.55) / 2)
    # Everything kept scores low: keep all (threshold 0) rather than hide kept predictions.
    assert calibrate_threshold(scores, ~kept) == 0.0


def test_threshold_stays_unset_with_too_few_examples_of_either_kind():
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    assert calibrate_threshold(scores, np.array([1, 1, 1, 0, 0], bool)) is None
    assert calibrate_threshold(scores, np.array([1, 1, 1, 0, 0], bool), min_examples=2) == 0.45


# --- negatives at matching and scoring -------------------------------------------------------------


def test_negatives_are_bounded_hardest_first_and_taken_from_every_region():
    objects = OBJECT[None]
    close, far = LOOK_ALIKE, BACKGROUND
    big_region = np.stack([far] * 6 + [close])
    small_region = np.stack([E[3], E[4]])
    rows = select_negatives([(0, big_region), (1, small_region)], objects, max_negatives=3)
    # Round robin: the hardest cell of each region, then the next of each.
    np.testing.assert_allclose(rows.astype(np.float32), [close, E[3], far], atol=1e-3)
    assert select_negatives([(0, big_region)], objects, 10, exclude=0) is None


def matches(cells: list[int], similarities: list[float]) -> MatchResult:
    count = len(cells)
    return MatchResult(
        target_indices=np.asarray(cells),
        reference_indices=np.zeros(count, np.int64),
        shot_indices=np.zeros(count, np.int64),
        similarities=np.asarray(similarities, np.float32),
        forward_matches=count,
    )


def test_matched_points_closer_to_a_negative_than_to_the_reference_are_dropped():
    target = np.stack([OBJECT, LOOK_ALIKE, E[3]])
    match = matches([0, 1, 2], [1.0, 0.75, 0.1])
    check = filter_negative_matches(match, target, OBJECT[None], LOOK_ALIKE[None])
    assert check.kept.target_indices.tolist() == [0, 2]
    assert check.dropped_fraction == pytest.approx(1 / 3)
    assert not check.looks_deleted(max_fraction=0.5, margin=0.1)
    unfiltered = filter_negative_matches(match, target, OBJECT[None], None)
    assert unfiltered.kept is match and unfiltered.dropped_fraction == 0.0


def test_a_target_is_taken_for_the_deleted_kind_when_most_points_are_and_match_best():
    # Absent object: the look-alike took most matches and the best ones; leftovers match worse.
    target = np.stack([LOOK_ALIKE, LOOK_ALIKE, LOOK_ALIKE, E[3]])
    absent = filter_negative_matches(
        matches([0, 1, 2, 3], [0.75, 0.75, 0.75, 0.2]), target, OBJECT[None], LOOK_ALIKE[None]
    )
    assert absent.dropped_fraction == 0.75 and absent.looks_deleted(0.5, 0.1)
    # A small object beside a large look-alike: most points dropped, but the kept ones are the
    # object's and match clearly better, so the target is not rejected.
    target[3] = OBJECT
    beside = filter_negative_matches(
        matches([0, 1, 2, 3], [0.75, 0.75, 0.75, 1.0]), target, OBJECT[None], LOOK_ALIKE[None]
    )
    assert beside.dropped_fraction == 0.75 and not beside.looks_deleted(0.5, 0.1)


def test_a_proposal_like_one_of_many_deleted_regions_scores_lower():
    rng = np.random.default_rng(0)
    features = np.tile(BACKGROUND, (36, 1)) + 0.02 * rng.normal(size=(36, DIMS))
    proposal = np.zeros(36, dtype=bool)
    proposal[[7, 8, 13, 14]] = True
    features[proposal] = LOOK_ALIKE + 0.02 * rng.normal(size=(4, DIMS))
    config = SegmenterConfig()
    plain = score_proposals(
        proposal[None], features, OBJECT[None], np.flatnonzero(proposal), config
    )
    # Negatives pooled from four deleted regions, only one of which looks like the proposal.
    negatives = np.concatenate([np.tile(v, (8, 1)) for v in (E[3], E[4], LOOK_ALIKE, E[5])])
    penalised = score_proposals(
        proposal[None], features, OBJECT[None], np.flatnonzero(proposal), config, negatives
    )
    assert penalised.negative_factor[0] < 0.1
    assert penalised.raw[0] < 0.2 * plain.raw[0]


def test_consensus_pooling_keeps_the_points_the_shots_agree_on():
    def result(cells, similarity, shot):
        cells = np.asarray(cells)
        return MatchResult(
            cells, cells.copy(), np.full(len(cells), shot), np.full(len(cells), similarity), 4
        )

    # Three shots agree on cells 1 and 2; each also reached a leftover cell of its own.
    shots = [result([1, 2, 9], 0.9, 0), result([1, 2, 20], 0.8, 1), result([1, 2, 31], 0.95, 2)]
    union = pool_matches(shots, "union")
    assert union.target_indices.tolist() == [1, 2, 9, 20, 31]
    consensus = pool_matches(shots, "consensus")
    # As many points as one shot matched: the two agreed cells, then the most similar leftover.
    assert consensus.target_indices.tolist() == [1, 2, 31]
    assert consensus.shot_indices.tolist() == [2, 2, 2]
    assert consensus.forward_matches == union.forward_matches == 12
    # One shot: both poolings are that shot's matches.
    single = pool_matches(shots[:1], "consensus")
    assert single.target_indices.tolist() == [1, 2, 9]


def test_learning_works_in_persam_mode(tiny_case):
    segmenter, reference, a, b, c = tiny_case
    persam = OneShotSegmenter.__new__(OneShotSegmenter)
    persam.__dict__.update(segmenter.__dict__)
    persam.config = segmenter.config.replace(mode="persam")
    learned, report = learn(persam, reference, [a, b, c], train_weights=True)
    assert report.labels["thing"]["shots"] == 3
    assert learn(persam, learned, [c, b, a], train_weights=True)[1].version == report.version
