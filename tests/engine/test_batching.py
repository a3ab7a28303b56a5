"""Work the engine does not need: encoders batched across the images of one call, duplicates
encoded once, and PerSAM mode runs no matching encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matcher_core import OneShotSegmenter, tiny_config


def _images(count: int) -> list[np.ndarray]:
    g = np.random.default_rng(3)
    sizes = [(120, 160), (90, 200), (150, 150), (64, 48)]
    return [g.integers(0, 255, (*sizes[i % 4], 3), dtype=np.uint8) for i in range(count)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("batching"))


@pytest.mark.parametrize(
    "sam_type, runtime",
    [("tiny", "torch"), ("mobile_sam_tiny", "torch"), ("mobile_sam_tiny", "onnx")],
)
def test_features_many_equals_features_one_by_one(model_dir, sam_type, runtime):
    if runtime != "torch":
        pytest.importorskip("onnxruntime")
    config = tiny_config(model_dir=model_dir, sam_type=sam_type, encoder_runtime=runtime)
    batched, single = OneShotSegmenter(config), OneShotSegmenter(config)
    images = _images(4)
    many = batched.features_many(images + [images[1]], batch_size=3)  # one duplicate
    assert batched.encoder_calls == 4
    assert many[4] is many[1]
    for image, features in zip(images, many, strict=False):
        one = single.features(image)
        assert features.input_size == one.input_size
        assert features.original_size == one.original_size
        torch.testing.assert_close(features.sam_embedding, one.sam_embedding, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            features.patch_features, one.patch_features, atol=1e-4, rtol=1e-4
        )
    # Cached now: no encoder runs again.
    batched.features_many(images)
    assert batched.encoder_calls == 4


def test_persam_mode_runs_no_matching_encoder(model_dir):
    segmenter = OneShotSegmenter(tiny_config(model_dir=model_dir, mode="persam"))
    assert segmenter.patch_encoder is None
    segmenter.features_many(_images(2))
    segmenter.features(_images(3)[2])
    assert "encoder_patch" not in segmenter.timings
    assert segmenter.timings["encoder_sam"] > 0
