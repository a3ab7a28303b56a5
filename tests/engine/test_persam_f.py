"""PerSAM-F: the loss, training on cached logits, equality with the decode-every-iteration
loop, serialisation and determinism."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from matcher_core import Example, OneShotSegmenter, Reference, persam, persam_f, tiny_config
from matcher_core.config import PRESETS


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> OneShotSegmenter:
    model_dir = str(tmp_path_factory.mktemp("models"))
    return OneShotSegmenter(tiny_config(model_dir=model_dir, mode="persam"))


def scene(seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with a bright ellipse, and the ellipse's mask."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:height, :width]
    mask = ((ys - height * 0.45) / (height * 0.3)) ** 2 + (
        (xs - width * 0.55) / (width * 0.25)
    ) ** 2 < 1
    image = rng.integers(0, 80, (height, width, 3)).astype(np.uint8)
    image[mask] = (40, 200, 220)
    return image, mask


@pytest.fixture(scope="module")
def labelled(segmenter):
    """A reference on one image and two (features, mask) training examples, one portrait."""
    image, mask = scene(0, 96, 128)
    reference = segmenter.build_reference([Example(image, {"ball": [mask]})])
    other_image, other_mask = scene(1, 112, 80)
    pairs = [(segmenter.features(image), mask), (segmenter.features(other_image), other_mask)]
    return reference, pairs


def test_loss_terms_match_hand_computed_values():
    logits = torch.tensor([2.0, -1.0, 0.0, 3.0])
    target = persam_f._Target.of(np.array([1, 0, 1, 0], bool))
    p = 1 / (1 + np.exp(-logits.numpy().astype(np.float64)))
    dice = 1 - (2 * (p[0] + p[2]) + 1) / (p.sum() + 2 + 1)
    p_t = np.array([p[0], 1 - p[1], p[2], 1 - p[3]])
    alpha_t = np.array([0.25, 0.75, 0.25, 0.75])
    focal = np.mean(alpha_t * -np.log(p_t) * (1 - p_t) ** 2)
    got_dice = persam_f.dice_loss(logits, target.mask, target.mask_sum)
    got_focal = persam_f.focal_loss(logits, target.mask, target.alpha_t)
    assert float(got_dice) == pytest.approx(dice, rel=1e-6)
    assert float(got_focal) == pytest.approx(focal, rel=1e-6)


@pytest.mark.parametrize("weights", [(1 / 3, 1 / 3, 1 / 3), (1.4, -0.6, 0.2), (0.0, 0.0, 1.0)])
@pytest.mark.parametrize("size", [(30, 40), (400, 400)])  # one block of pixels; several
def test_the_closed_form_loss_and_gradient_equal_autograd(weights, size):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, *size, generator=g) * 6  # large logits: saturated sigmoids too
    mask = (torch.rand(*size, generator=g) > 0.6).numpy()
    leaf = torch.tensor(weights, requires_grad=True)
    expected = persam_f._Target.of(mask).loss(logits, leaf)
    expected.backward()
    loss, gradient = persam_f._CachedExample(logits, mask).loss_and_gradient(leaf.detach())
    assert loss == pytest.approx(float(expected.detach()), rel=1e-5)
    torch.testing.assert_close(gradient, leaf.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("inside", [False, True])
def test_an_example_all_object_or_all_background_has_the_autograd_loss(inside):
    logits = torch.randn(1, 3, 20, 30, generator=torch.Generator().manual_seed(1)) * 4
    mask = np.full((20, 30), inside)
    leaf = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
    expected = persam_f._Target.of(mask).loss(logits, leaf)
    expected.backward()
    loss, gradient = persam_f._CachedExample(logits, mask).loss_and_gradient(leaf.detach())
    assert loss == pytest.approx(float(expected.detach()), rel=1e-5)
    torch.testing.assert_close(gradient, leaf.grad, atol=1e-6, rtol=1e-5)


def test_threads_sharing_the_blocks_give_the_serial_loss_and_gradient():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 3, 480, 640, generator=g) * 6
    mask = (torch.rand(480, 640, generator=g) > 0.7).numpy()
    example = persam_f._CachedExample(logits, mask)
    assert len(example.blocks) >= 3  # the threads each get blocks
    weights = torch.tensor([0.5, 0.3, 0.2])
    serial = example.loss_and_gradient(weights)
    with ThreadPoolExecutor(persam_f.LOSS_THREADS) as pool:
        shared = example.loss_and_gradient(weights, pool)
    assert shared[0] == pytest.approx(serial[0], rel=1e-12)
    torch.testing.assert_close(shared[1], serial[1], rtol=1e-6, atol=1e-9)


def test_the_cross_entropy_from_the_probability_is_softplus_where_the_loss_can_see_it():
    s = torch.linspace(-60, 60, 240_001)
    expected = F.softplus(s.double())
    q = torch.sigmoid(s)
    got = persam_f.cross_entropy_from_probability(s.clone(), q, 1 - q).double()
    # error within float32 resolution of the larger of softplus and 1 ...
    assert float(((got - expected).abs() / expected.clamp(min=1)).max()) < 3e-7
    # ... so the focal term the loss sums, q^2 * softplus, keeps float32 precision
    q2 = torch.sigmoid(s.double()) ** 2
    assert float((got * q2).sum()) == pytest.approx(float((expected * q2).sum()), rel=1e-7)


def test_blend_weights_sum_to_one_and_start_at_a_third():
    weights = persam_f.blend_weights(torch.full((2,), 1 / 3))
    torch.testing.assert_close(weights, torch.full((3,), 1 / 3))
    assert float(persam_f.blend_weights(torch.tensor([0.7, 0.5])).sum()) == pytest.approx(1.0)


def test_training_lowers_the_loss_and_moves_the_weights(segmenter, labelled):
    reference, pairs = labelled
    report = persam_f.train_mask_weights(segmenter, reference.labels["ball"], pairs[:1])
    assert report.iterations == segmenter.config.persam_f_iterations == 1000
    assert report.examples == 1 and report.seconds > 0
    assert report.loss_after < report.loss_before
    assert report.weights.shape == (3,) and report.weights.dtype == np.float32
    assert np.abs(report.weights - 1 / 3).max() > 0.05
    assert report.weights.sum() == pytest.approx(1.0, abs=1e-5)


@contextmanager
def configured(segmenter: OneShotSegmenter, **changes):
    """The module's segmenter with ``changes`` to its configuration, for one block."""
    saved = segmenter.config
    segmenter.config = saved.replace(**changes)
    try:
        yield segmenter
    finally:
        segmenter.config = saved


def recorded_training_calls(segmenter, label, pairs) -> list[dict]:
    decode = segmenter.decoder.decode
    calls = []

    def counting_decode(*args, **kwargs):
        calls.append(kwargs)
        return decode(*args, **kwargs)

    segmenter.decoder.decode = counting_decode
    try:
        persam_f.train_mask_weights(segmenter, label, pairs, iterations=20)
    finally:
        segmenter.decoder.decode = decode
    return calls


def test_each_example_is_decoded_once_with_the_published_first_pass(segmenter, labelled):
    """Published (persam_f.py): one positive point, no decoder hooks, three masks."""
    reference, pairs = labelled
    calls = recorded_training_calls(segmenter, reference.labels["ball"], pairs)
    assert len(calls) == 2
    assert all(c["multimask"] for c in calls)
    assert all("attn_sim" not in c and "target_embedding" not in c for c in calls)
    assert all(c["point_labels"].tolist() == [[1]] for c in calls)


def test_the_persam_first_pass_is_a_named_departure(segmenter, labelled):
    """persam_f_first_pass="persam": PerSAM's first pass (two points, both hooks)."""
    reference, pairs = labelled
    with configured(segmenter, persam_f_first_pass="persam"):
        calls = recorded_training_calls(segmenter, reference.labels["ball"], pairs)
    assert len(calls) == 2
    assert all(c["multimask"] and c["attn_sim"] is not None for c in calls)
    assert all(c["target_embedding"] is not None for c in calls)
    assert all(c["point_labels"].tolist() == [[1, 0]] for c in calls)


def test_the_published_prior_uses_half_the_mean_plus_half_the_max(segmenter, labelled):
    """persam_f.py: the location prior's embedding is (mean + max) / 2 of the reference
    features under the mask (persam.py: the mean); the positive point is its peak."""
    reference, pairs = labelled
    label = reference.labels["ball"]
    features, mask = pairs[0]
    inside = segmenter._embedding_cells(features, mask).reshape(-1)
    under = features.sam_embedding.float().flatten(1)[:, inside]  # (C, N)
    mixed = under.mean(1) / 2 + under.max(1).values / 2
    np.testing.assert_allclose(label.sam_prior_embedding("mean_max"), mixed.numpy(), atol=1e-5)
    np.testing.assert_allclose(label.sam_prior_embedding("mean"), under.mean(1).numpy(), atol=1e-5)

    cells = torch.nn.functional.normalize(features.sam_embedding.float().flatten(1), dim=0)
    prior = torch.nn.functional.normalize(mixed, dim=0) @ cells
    valid = persam.valid_cells(segmenter.decoder, features.input_size).reshape(-1)
    expected = int(torch.where(valid, prior, -torch.inf).argmax())
    prompt = persam_f.example_prompt(segmenter, label, features)
    assert prompt.peak_cell == divmod(expected, features.sam_embedding.shape[2])


@pytest.mark.parametrize("count", [1, 2])
def test_cached_training_learns_the_weights_of_the_decode_every_iteration_loop(
    segmenter, labelled, count
):
    reference, pairs = labelled
    label = reference.labels["ball"]
    fast = persam_f.train_mask_weights(segmenter, label, pairs[:count], iterations=50)
    slow = persam_f.train_mask_weights_reference(segmenter, label, pairs[:count], iterations=50)
    np.testing.assert_allclose(fast.weights, slow.weights, atol=1e-5, rtol=0)
    assert fast.loss_before == pytest.approx(slow.loss_before, abs=1e-6)
    assert fast.loss_after == pytest.approx(slow.loss_after, abs=1e-6)
    assert fast.examples == slow.examples == count


def test_several_examples_average_their_losses(segmenter, labelled):
    reference, pairs = labelled
    label = reference.labels["ball"]
    single = [persam_f.train_mask_weights(segmenter, label, [p], iterations=1) for p in pairs]
    both = persam_f.train_mask_weights(segmenter, label, pairs, iterations=1)
    assert both.loss_before == pytest.approx(np.mean([r.loss_before for r in single]), rel=1e-6)


def test_training_is_deterministic(segmenter, labelled):
    reference, pairs = labelled
    first = persam_f.train_mask_weights(segmenter, reference.labels["ball"], pairs, iterations=100)
    second = persam_f.train_mask_weights(segmenter, reference.labels["ball"], pairs, iterations=100)
    np.testing.assert_array_equal(first.weights, second.weights)


def test_a_mask_must_fit_its_image(segmenter, labelled):
    reference, pairs = labelled
    features, mask = pairs[0]
    with pytest.raises(ValueError, match="does not fit"):
        persam_f.train_mask_weights(segmenter, reference.labels["ball"], [(features, mask.T)])
    with pytest.raises(ValueError, match="at least one"):
        persam_f.train_mask_weights(segmenter, reference.labels["ball"], [])


def test_learned_weights_are_stored_on_the_label_and_survive_serialisation(segmenter):
    image, mask = scene(2, 90, 120)
    reference = segmenter.build_reference([Example(image, {"ball": [mask]})])
    segmenter.config.persam_f_iterations = 200
    try:
        reports = segmenter.train_mask_weights(reference, [Example(image, {"ball": [mask]})])
    finally:
        segmenter.config.persam_f_iterations = 1000
    learned = reference.labels["ball"].mask_weights
    np.testing.assert_array_equal(learned, reports["ball"].weights)

    restored = Reference.from_bytes(reference.to_bytes())
    np.testing.assert_array_equal(restored.labels["ball"].mask_weights, learned)
    assert restored.labels["ball"].mask_weights.dtype == np.float32


def test_shot_statistics_survive_serialisation(segmenter, labelled):
    reference, _ = labelled
    shot = reference.labels["ball"].shots[0]
    assert shot.sam_target_max.shape == shot.sam_target_embedding.shape
    assert shot.sam_background_cosine.shape == (2,)
    restored = Reference.from_bytes(reference.to_bytes()).labels["ball"].shots[0]
    np.testing.assert_array_equal(restored.sam_target_max, shot.sam_target_max)
    np.testing.assert_array_equal(restored.sam_background_cosine, shot.sam_background_cosine)


def test_the_persam_f_preset_trains_the_weights_on_the_reference(segmenter):
    """persam_f.py learns its weights on the reference image itself."""
    image, mask = scene(3, 90, 120)
    with configured(segmenter, **{**PRESETS["persam_f"], "persam_f_iterations": 20}):
        reference = segmenter.build_reference([Example(image, {"ball": [mask]})])
    weights = reference.labels["ball"].mask_weights
    assert weights is not None and weights.sum() == pytest.approx(1.0, abs=1e-5)
    plain = segmenter.build_reference([Example(image, {"ball": [mask]})])
    assert plain.labels["ball"].mask_weights is None  # the product default trains on corrections
