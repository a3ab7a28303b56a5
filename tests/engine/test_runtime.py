"""The ONNX Runtime and OpenVINO encoders: built from the loaded weights, cached by checkpoint identity, and
equal to PyTorch within float rounding (embeddings) with the same masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import disc_image
from matcher_core import Example, OneShotSegmenter, runtime, tiny_config

pytest.importorskip("onnxruntime")

EMBEDDING_RTOL = 1e-4
"""Relative L2 error allowed between the fp32 ONNX Runtime and PyTorch embeddings (measured
~1e-6 on the tiny models and on real-size random MobileSAM / vit_b: ``BENCHMARKS.md``)."""
INT8_RTOL = 0.1
"""int8 weights drift more; the figure measured on the real sizes is in ``BENCHMARKS.md``."""
BF16_RTOL = 0.05
"""bfloat16 keeps 8 bits of mantissa (relative rounding 4e-3 per operation); measured on the real
sizes: ``BENCHMARKS.md``. On a CPU without bfloat16 OpenVINO computes in fp32 (error ~1e-6)."""


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def scene():
    return disc_image(120, 160, (60, 50), 22, seed=1), disc_image(120, 160, (100, 70), 20, seed=2)


@pytest.mark.parametrize("runtime_name", ["onnx", "openvino"])
@pytest.mark.parametrize("sam_type", ["tiny", "mobile_sam_tiny"])
def test_fp32_runtimes_match_pytorch_and_give_the_same_masks(
    model_dir, scene, sam_type, runtime_name
):
    if runtime_name == "openvino":
        pytest.importorskip("openvino")
    (ref_image, ref_mask), (target, _) = scene
    eager = OneShotSegmenter(tiny_config(model_dir=model_dir, sam_type=sam_type))
    onnx = OneShotSegmenter(
        tiny_config(model_dir=model_dir, sam_type=sam_type, encoder_runtime=runtime_name)
    )
    assert isinstance(onnx.sam.image_encoder, runtime.SamEncoderOnnx)
    expected = runtime.OpenVinoModule if runtime_name == "openvino" else runtime.OnnxModule
    assert isinstance(onnx.sam.image_encoder.onnx, expected)
    for image in (ref_image, target):
        a, b = eager.features(image), onnx.features(image)
        rel = (a.sam_embedding - b.sam_embedding).norm() / a.sam_embedding.norm()
        assert rel < EMBEDDING_RTOL
        rel = (a.patch_features - b.patch_features).norm() / a.patch_features.norm()
        assert rel < EMBEDDING_RTOL
    # Masks: smart tool on a grid of points, and the Matcher pipeline end to end.
    for x in range(20, 160, 30):
        for y in range(20, 120, 30):
            point = np.array([[x, y]])
            ma, _ = eager.segment_from_prompts(target, points=point, point_labels=[1])
            mb, _ = onnx.segment_from_prompts(target, points=point, point_labels=[1])
            assert _iou(ma, mb) >= 0.98
    examples = [Example(ref_image, {"disc": [ref_mask]})]
    found_a = eager.segment(eager.build_reference(examples), target)
    found_b = onnx.segment(onnx.build_reference(examples), target)
    assert len(found_a) == len(found_b)
    for ia, ib in zip(found_a, found_b, strict=True):
        assert _iou(ia.mask, ib.mask) >= 0.98


def test_the_export_is_cached_and_keyed_by_the_checkpoint(model_dir, tmp_path, monkeypatch):
    OneShotSegmenter(tiny_config(model_dir=model_dir, encoder_runtime="onnx"))
    files = sorted((tmp_path.parent / model_dir).glob("onnx/*.onnx"))
    assert files
    exported = []
    monkeypatch.setattr(runtime.torch.onnx, "export", lambda *a, **k: exported.append(a))
    OneShotSegmenter(tiny_config(model_dir=model_dir, encoder_runtime="onnx"))
    assert exported == []  # served from the cache
    # Another checkpoint (other seed) gets other files.
    a = runtime.cache_path(tmp_path, "sam-encoder", "x:1:2", (3, 8, 8))
    b = runtime.cache_path(tmp_path, "sam-encoder", "x:1:3", (3, 8, 8))
    assert a != b and a.parent == tmp_path / "onnx"


def test_batches_run_through_the_exported_graph(model_dir):
    segmenter = OneShotSegmenter(
        tiny_config(model_dir=model_dir, sam_type="mobile_sam_tiny", encoder_runtime="onnx")
    )
    x = torch.randn(3, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    batched = segmenter.sam.image_encoder(x)
    torch_encoder = segmenter.sam.torch_image_encoder
    with torch.inference_mode():
        expected = torch_encoder(x)
    assert batched.shape == expected.shape == (3, 32, 16, 16)
    assert (batched - expected).norm() / expected.norm() < EMBEDDING_RTOL


def test_int8_runs_with_bounded_drift(model_dir, scene):
    (image, _), _ = scene
    eager = OneShotSegmenter(tiny_config(model_dir=model_dir, sam_type="mobile_sam_tiny"))
    int8 = OneShotSegmenter(
        tiny_config(model_dir=model_dir, sam_type="mobile_sam_tiny", encoder_runtime="onnx_int8")
    )
    assert int8.sam.image_encoder.onnx.path.name.endswith("-int8.onnx")
    a, b = eager.features(image).sam_embedding, int8.features(image).sam_embedding
    assert (a - b).norm() / a.norm() < INT8_RTOL


def test_openvino_bf16_runs_with_bounded_drift_and_batches(model_dir, scene):
    pytest.importorskip("openvino")
    (image, _), _ = scene
    eager = OneShotSegmenter(tiny_config(model_dir=model_dir, sam_type="mobile_sam_tiny"))
    bf16 = OneShotSegmenter(
        tiny_config(
            model_dir=model_dir, sam_type="mobile_sam_tiny", encoder_runtime="openvino_bf16"
        )
    )
    import openvino

    expected = "bf16" if runtime.cpu_has_bfloat16(openvino.Core()) else "f32"
    assert bf16.sam.image_encoder.onnx.precision == expected
    a, b = eager.features(image).sam_embedding, bf16.features(image).sam_embedding
    assert (a - b).norm() / a.norm() < BF16_RTOL
    x = torch.randn(3, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    assert bf16.sam.image_encoder(x).shape == (3, 32, 16, 16)


def test_unknown_runtime_is_refused(model_dir):
    with pytest.raises(ValueError, match="runtime"):
        OneShotSegmenter(tiny_config(model_dir=model_dir, encoder_runtime="tensorrt"))
