"""Every mode on every device this machine has (``cuda`` is skipped without a GPU; the prepared
``bench/gpu_check.sh`` runs this file on one), in fp32 and under bf16 autocast: masks come back
as host numpy arrays whatever device the tensors live on."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from matcher_core import Example, OneShotSegmenter, tiny_config

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


def _scene():
    g = np.random.default_rng(5)
    out = []
    for centre in ((60, 50), (100, 70)):
        image = g.integers(0, 80, (120, 160, 3), dtype=np.uint8)
        ys, xs = np.mgrid[:120, :160]
        mask = (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 <= 20**2
        image[mask] = (220, 40, 40)
        out.append((image, mask))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("device"))


@pytest.mark.parametrize("autocast", [None, "bf16", "decoder_bf16"])
@pytest.mark.parametrize("preset", ["fast", "persam", "persam_f"])
@pytest.mark.parametrize("sam_type", ["tiny", "mobile_sam_tiny"])
@pytest.mark.parametrize("device", DEVICES)
def test_every_mode_on_every_device(model_dir, device, sam_type, preset, autocast):
    """``bf16``: the caller's autocast around everything; ``decoder_bf16``: the engine's own
    ``decoder_precision="bfloat16"``."""
    (ref_image, ref_mask), (target, _) = _scene()
    config = tiny_config(model_dir=model_dir, sam_type=sam_type, device=device)
    if autocast == "decoder_bf16":
        config = config.replace(decoder_precision="bfloat16")
    segmenter = OneShotSegmenter(config.with_preset(preset).replace(min_instance_area=1))
    assert segmenter.sam.image_encoder.neck[0].weight.device.type == device
    context = (
        torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        if autocast == "bf16"
        else contextlib.nullcontext()
    )
    with context:
        features = segmenter.features_many([ref_image, target])
        assert features[0].sam_embedding.device.type == device
        reference = segmenter.build_reference([Example(ref_image, {"disc": [ref_mask]})])
        instances = segmenter.segment(reference, target)
        mask, score = segmenter.segment_from_prompts(
            target, points=np.array([[100, 70]]), point_labels=[1]
        )
    for instance in instances:
        assert isinstance(instance.mask, np.ndarray) and instance.mask.shape == (120, 160)
    assert isinstance(mask, np.ndarray) and mask.shape == (120, 160) and 0 <= score <= 1
