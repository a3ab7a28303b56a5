"""Model loading goes through the real checkpoint code path, random weights only when asked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import SHARED_DATA
from matcher_core import SegmenterConfig, models, tiny_config

DATA = SHARED_DATA


def test_random_sam_is_saved_once_and_loaded_as_a_checkpoint(tmp_path):
    config = tiny_config(model_dir=str(tmp_path))
    first = models.load_sam(config)
    checkpoint = models.resolve_sam_checkpoint(config)
    assert checkpoint.exists() and checkpoint.parent == tmp_path
    second = models.load_sam(config)
    saved = torch.load(checkpoint, weights_only=True)
    for name, tensor in second.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
        assert torch.equal(tensor, first.state_dict()[name]), name


def test_random_encoder_loads_from_its_saved_file_through_timm(tmp_path):
    config = tiny_config(model_dir=str(tmp_path))
    encoder = models.load_encoder(config)
    files = list(tmp_path.glob("random-encoder-*.pth"))
    assert len(files) == 1
    saved = torch.load(files[0], weights_only=True)
    state = encoder.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_real_types_never_fall_back_to_random_weights(tmp_path):
    config = SegmenterConfig(sam_type="tiny", random_weights=False, model_dir=str(tmp_path))
    with pytest.raises(ValueError, match="random"):
        models.resolve_sam_checkpoint(config)
    with pytest.raises(ValueError, match="unknown SAM type"):
        models.resolve_sam_checkpoint(SegmenterConfig(sam_type="vit_x", model_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError):
        models.resolve_sam_checkpoint(
            SegmenterConfig(sam_checkpoint=str(tmp_path / "missing.pth"), model_dir=str(tmp_path))
        )


def test_official_checkpoints_are_listed_with_md5():
    assert set(models.SAM_CHECKPOINTS) == {"vit_h", "vit_l", "vit_b"}
    for url, md5 in models.SAM_CHECKPOINTS.values():
        assert url.startswith("https://dl.fbaipublicfiles.com/segment_anything/sam_")
        assert len(md5) == 32 and url.rsplit("_", 1)[1].startswith(md5[:6])


def test_download_refuses_a_file_with_the_wrong_checksum(tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"not the weights")
    with pytest.raises(RuntimeError, match="checksum"):
        models.download_checkpoint(source.as_uri(), tmp_path / "out.pth", md5="0" * 32)
    assert not (tmp_path / "out.pth").exists()
    good = models.download_checkpoint(source.as_uri(), tmp_path / "ok.pth", models.md5_of(source))
    assert good.read_bytes() == b"not the weights"


def test_device_selection():
    assert models.select_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.select_device("auto").type == expected


def test_efficientnet_lite0_real_weights_recognise_a_black_swan():
    from matcher_core.imageio import load_image

    frame = DATA / "davis2016_val" / "blackswan" / "00000.jpg"
    if not frame.exists():
        pytest.skip(f"shared data not found at {frame}")
    model = models.load_efficientnet_lite0(models.efficientnet_lite0_checkpoint())
    image = load_image(frame)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    with torch.inference_mode():
        logits = model((x - 0.5) / 0.5)  # TF conversion: mean 0.5, std 0.5
    assert int(logits.argmax()) == 100  # ImageNet class 100: black swan
    assert np.isfinite(logits.numpy()).all()
