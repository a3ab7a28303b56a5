"""MobileSAM (TinyViT encoder + SAM's decoder): loads through the real loading code from a saved
random checkpoint, keeps MobileSAM's parameter names, and every mode runs on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import disc_image
from matcher_core import Example, OneShotSegmenter, models, tiny_config
from matcher_core.config import SegmenterConfig
from matcher_core.light_sam import TINY_SPEC, TinyViT
from matcher_core.sam_decoder import SamDecoder

# Parameter names of MobileSAM's released mobile_sam.pt (a sample across the modules).
MOBILE_SAM_KEYS = (
    "image_encoder.patch_embed.seq.0.c.weight",
    "image_encoder.patch_embed.seq.2.bn.running_var",
    "image_encoder.layers.0.blocks.0.conv2.c.weight",
    "image_encoder.layers.0.downsample.conv2.bn.weight",
    "image_encoder.layers.1.blocks.1.attn.attention_biases",
    "image_encoder.layers.2.blocks.5.local_conv.c.weight",
    "image_encoder.layers.3.blocks.1.mlp.fc2.bias",
    "image_encoder.norm_head.weight",
    "image_encoder.head.weight",
    "image_encoder.neck.3.bias",
    "prompt_encoder.mask_downscaling.0.weight",
    "mask_decoder.output_hypernetworks_mlps.3.layers.2.weight",
)


@pytest.fixture(scope="module")
def light(tmp_path_factory) -> OneShotSegmenter:
    directory = str(tmp_path_factory.mktemp("light"))
    return OneShotSegmenter(tiny_config(model_dir=directory, sam_type="mobile_sam_tiny"))


@pytest.fixture(scope="module")
def scene():
    reference = disc_image(120, 160, (60, 50), 22, seed=1)
    target = disc_image(120, 160, (100, 70), 20, seed=2)
    return reference, target


def test_mobile_sam_real_size_loads_from_a_saved_checkpoint_with_mobile_sams_names(tmp_path):
    config = SegmenterConfig(sam_type="mobile_sam", random_weights=True, model_dir=str(tmp_path))
    sam = models.load_sam(config, torch.device("cpu"))
    saved = torch.load(models.resolve_sam_checkpoint(config), weights_only=True)
    state = sam.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert set(MOBILE_SAM_KEYS) <= set(state)
    encoder_params = sum(p.numel() for p in sam.image_encoder.parameters())
    assert 5.5e6 < encoder_params < 6.2e6  # TinyViT-5M + neck (+ unused 1000-class head)
    assert sam.image_encoder.img_size == 1024 and sam.image_encoder.grid == 64
    assert tuple(sam.prompt_encoder.image_embedding_size) == (64, 64)
    assert models.LIGHT_SAM_CHECKPOINTS["mobile_sam"][0].endswith("/weights/mobile_sam.pt")


def test_mobile_sam_never_falls_back_to_random_weights(tmp_path):
    config = SegmenterConfig(sam_type="mobile_sam_tiny", model_dir=str(tmp_path))
    with pytest.raises(ValueError, match="random"):
        models.resolve_sam_checkpoint(config)


def test_a_batch_equals_its_images_one_by_one():
    torch.manual_seed(0)
    encoder = TinyViT(TINY_SPEC).eval()
    x = torch.randn(2, 3, 256, 256)
    with torch.inference_mode():
        both = encoder(x)
        assert both.shape == (2, 32, 16, 16)
        for i in range(2):
            torch.testing.assert_close(both[i : i + 1], encoder(x[i : i + 1]), atol=1e-5, rtol=0)


def test_hooks_off_equals_mobile_sams_own_decoder(light):
    decoder: SamDecoder = light.decoder
    sam = decoder.sam
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(32, 16, 16, generator=g)
    coords = torch.rand(3, 2, 2, generator=g) * decoder.img_size
    labels = torch.tensor([[1, 0], [1, 1], [1, -1]])
    corners = torch.rand(3, 2, 2, generator=g) * decoder.img_size
    boxes = torch.cat([corners.min(1).values, corners.max(1).values], dim=1)
    for multimask in (True, False):
        with torch.inference_mode():
            sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=boxes, masks=None)
            stock_logits, stock_iou = sam.mask_decoder(
                image_embeddings=embedding[None],
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        out = decoder.decode(embedding, coords, labels, boxes, multimask=multimask)
        torch.testing.assert_close(out.low_res_logits, stock_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.iou_predictions, stock_iou, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["fast", "fss", "persam", "persam_f"])
def test_every_mode_runs_on_mobile_sam(light, scene, preset):
    (ref_image, ref_mask), (target, _) = scene
    config = light.config.with_preset(preset).replace(min_instance_area=1)
    segmenter = OneShotSegmenter(config)  # loads the saved random checkpoint again
    assert segmenter.sam.image_encoder.__class__ is TinyViT
    reference = segmenter.build_reference([Example(ref_image, {"disc": [ref_mask]})])
    if preset == "persam_f":
        weights = reference.labels["disc"].mask_weights
        assert weights is not None and np.isclose(weights.sum(), 1)
    instances = segmenter.segment(reference, target)
    for instance in instances:
        assert instance.mask.shape == target.shape[:2] and instance.mask.dtype == bool


def test_smart_tools_run_on_mobile_sam(light, scene):
    (image, _), _ = scene
    mask, score = light.segment_from_prompts(image, points=np.array([[60, 50]]), point_labels=[1])
    assert mask.shape == image.shape[:2] and 0 <= score <= 1
    mask, _ = light.segment_from_prompts(image, box=np.array([30, 20, 90, 80]))
    assert mask.shape == image.shape[:2]


def test_mobile_sam_tiny_embedding_shape(light, scene):
    (image, _), _ = scene
    features = light.features(image)
    assert features.sam_embedding.shape == (32, 16, 16)
    assert features.input_size == (192, 256)
