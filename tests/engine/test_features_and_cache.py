"""Image features: coordinate frames, caching by content, reference serialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import disc_image
from matcher_core import Example, Reference
from matcher_core.cache import EmbeddingCache, image_key
from matcher_core.features import patch_centres, pool_mask_to_grid


@pytest.mark.parametrize("size", [(64, 96), (120, 50), (77, 77)])
def test_features_cover_the_whole_image_in_every_aspect_ratio(tiny_segmenter, size):
    image, _ = disc_image(*size, centre=(20, 20), radius=8)
    features = tiny_segmenter.features(image)
    img_size = tiny_segmenter.decoder.img_size
    assert features.original_size == size
    assert max(features.input_size) == img_size
    h, w = features.input_size
    assert abs(h / w - size[0] / size[1]) < 0.05
    grid = tiny_segmenter.config.encoder_input_size // 14
    assert features.patch_features.shape[:2] == (grid, grid)
    norms = features.patch_features.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    assert features.sam_embedding.shape[1:] == (img_size // 16, img_size // 16)


def test_patch_centres_are_in_original_xy_pixels():
    centres = patch_centres((2, 4), (100, 200))
    assert centres.shape == (8, 2)
    assert np.allclose(centres[0], [25, 25])  # first cell: x = 0.5 * 200/4, y = 0.5 * 100/2
    assert np.allclose(centres[7], [175, 75])


def test_pooling_a_mask_gives_cell_coverage():
    mask = np.zeros((4, 8), bool)
    mask[:, :4] = True
    pooled = pool_mask_to_grid(mask, (2, 2)).numpy()
    assert np.allclose(pooled, [[1, 0], [1, 0]])


def test_a_cached_image_runs_no_encoder(tiny_segmenter):
    image, _ = disc_image(50, 70, centre=(30, 20), radius=10, seed=7)
    before = tiny_segmenter.encoder_calls
    first = tiny_segmenter.features(image)
    second = tiny_segmenter.features(image.copy())
    assert tiny_segmenter.encoder_calls == before + 1
    assert second is first
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    tiny_segmenter.features(changed)
    assert tiny_segmenter.encoder_calls == before + 2


def test_cache_is_bounded_and_least_recently_used_goes_first(tiny_segmenter):
    image, _ = disc_image(40, 40, centre=(20, 20), radius=5)
    features = tiny_segmenter.features(image)
    cache = EmbeddingCache(max_bytes=2 * features.nbytes())
    for key in ("a", "b"):
        cache.put(key, features)
    assert cache.get("a") is features  # "a" now most recent
    cache.put("c", features)
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert cache.get("b") is None and cache.get("a") is features
    assert cache.hits == 2 and cache.misses == 1


def test_image_key_depends_on_pixels_shape_and_models():
    image = np.zeros((4, 6, 3), np.uint8)
    assert image_key(image, "m") == image_key(image.copy(), "m")
    assert image_key(image, "m") != image_key(image, "other-models")
    assert image_key(image, "m") != image_key(np.zeros((6, 4, 3), np.uint8), "m")


def test_reference_round_trips_through_bytes(tiny_segmenter):
    image, mask = disc_image(60, 80, centre=(40, 30), radius=12)
    reference = tiny_segmenter.build_reference([Example(image, {"disc": [mask], "none": []})])
    assert list(reference.labels) == ["disc"]
    reference.labels["disc"].mask_weights = np.array([0.2, 0.3, 0.5], np.float32)
    reference.labels["disc"].score_threshold = 0.42
    reference.labels["disc"].negatives = np.ones((3, 48), np.float16)
    restored = Reference.from_bytes(reference.to_bytes())
    assert restored.model_id == reference.model_id
    original, copy = reference.labels["disc"], restored.labels["disc"]
    assert np.array_equal(original.mask_weights, copy.mask_weights)
    assert copy.score_threshold == pytest.approx(0.42)
    assert np.array_equal(original.negatives, copy.negatives)
    for a, b in zip(original.shots, copy.shots, strict=True):
        assert np.array_equal(a.patch_features, b.patch_features)
        assert np.array_equal(a.patch_mask, b.patch_mask)
        assert np.array_equal(a.sam_target_embedding, b.sam_target_embedding)


def test_garbage_is_not_a_reference():
    with pytest.raises(ValueError, match="not a serialised reference"):
        Reference.from_bytes(b"\x00garbage")


def test_empty_reference_masks_are_refused(tiny_segmenter):
    image, mask = disc_image(30, 30, centre=(15, 15), radius=5)
    with pytest.raises(ValueError, match="does not fit"):
        tiny_segmenter.make_shot(tiny_segmenter.features(image), [mask[:20]])
    with pytest.raises(ValueError, match="empty mask"):
        tiny_segmenter.make_shot(tiny_segmenter.features(image), [np.zeros_like(mask)])


def test_references_never_mix_models(tiny_segmenter):
    image, mask = disc_image(30, 30, centre=(15, 15), radius=5)
    reference = tiny_segmenter.build_reference([Example(image, {"disc": [mask]})])
    reference.model_id = "sam=vit_h:official;encoder=other"
    with pytest.raises(ValueError, match="other models"):
        tiny_segmenter.segment(reference, image)


def test_sam_target_embedding_is_the_mean_under_the_mask(tiny_segmenter):
    image, mask = disc_image(64, 64, centre=(32, 32), radius=30)
    features = tiny_segmenter.features(image)
    full = np.ones((64, 64), bool)
    embedding = tiny_segmenter.sam_target_embedding(features, full)
    expected = features.sam_embedding.reshape(features.sam_embedding.shape[0], -1).mean(1).numpy()
    assert np.allclose(embedding, expected, atol=1e-5)  # square image: every cell is covered


def test_vit_patch_features_are_the_pre_norm_tokens_as_in_matcher(tiny_segmenter):
    # Matcher matches DINOv2's ``x_prenorm`` tokens; timm's forward_features ends with the norm.
    encoder = tiny_segmenter.patch_encoder
    model = encoder.model
    image, _ = disc_image(60, 90, (30, 40), 12)
    features = encoder(image)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    size = (encoder.input_size, encoder.input_size)
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True)
    x = (x - encoder.mean) / encoder.std
    with torch.inference_mode():
        prenorm = model.blocks(model._pos_embed(model.patch_embed(x)))
        normed = model.forward_features(x)
    tokens = prenorm[0, model.num_prefix_tokens :]
    expected = torch.nn.functional.normalize(tokens, dim=-1).reshape(features.shape)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(prenorm, normed, atol=1e-3)


def test_persam_mode_loads_and_runs_no_matching_encoder(tiny_model_dir, monkeypatch):
    from matcher_core import OneShotSegmenter, tiny_config
    from matcher_core import segmenter as segmenter_module

    def no_encoder(*args, **kwargs):
        raise AssertionError("PerSAM mode must not load the matching encoder")

    monkeypatch.setattr(segmenter_module, "load_encoder", no_encoder)
    persam = OneShotSegmenter(tiny_config(model_dir=tiny_model_dir, mode="persam"))
    image, mask = disc_image(64, 96, (30, 40), 12)
    features = persam.features(image)
    assert persam.patch_encoder is None and "encoder_patch" not in persam.timings
    # Its patch grid is SAM's embedding over the image: 256 / 96 * 64 -> 11 of 16 rows.
    assert tuple(features.patch_features.shape) == (11, 16, features.sam_embedding.shape[0])
    reference = persam.build_reference([Example(image, {"disc": [mask]})])
    assert reference.labels["disc"].shots[0].patch_mask.shape == (11, 16)
