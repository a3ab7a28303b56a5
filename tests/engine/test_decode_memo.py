"""The decoder memo: a repeated call returns the very outputs a fresh decode gives without running
the decoder; any change of prompt, hook or image misses; the bound holds; the published PerSAM-F
loop bypasses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matcher_core import Example, OneShotSegmenter, persam_f, tiny_config
from matcher_core.decode_memo import MemoSamDecoder


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> OneShotSegmenter:
    return OneShotSegmenter(tiny_config(model_dir=str(tmp_path_factory.mktemp("memo"))))


def _scene(seed=1):
    g = np.random.default_rng(seed)
    image = g.integers(0, 80, (120, 160, 3), dtype=np.uint8)
    ys, xs = np.mgrid[:120, :160]
    mask = (xs - 60) ** 2 + (ys - 50) ** 2 <= 22**2
    image[mask] = (220, 40, 40)
    return image, mask


def test_a_repeated_call_is_served_bit_identical_without_decoding(segmenter):
    decoder: MemoSamDecoder = segmenter.decoder
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(32, 16, 16, generator=g)
    coords = torch.rand(4, 2, 2, generator=g) * 256
    labels = torch.ones(4, 2, dtype=torch.int64)
    first = decoder.decode(embedding, coords, labels, multimask=True)
    decoded, hits = decoder.prompt_sets_decoded, decoder.memo_hits
    again = decoder.decode(embedding, coords.clone(), labels.clone(), multimask=True)
    assert decoder.prompt_sets_decoded == decoded and decoder.memo_hits == hits + 1
    assert torch.equal(again.low_res_logits, first.low_res_logits)
    assert torch.equal(again.iou_predictions, first.iou_predictions)
    with decoder.bypass():
        fresh = decoder.decode(embedding, coords, labels, multimask=True)
    assert decoder.prompt_sets_decoded == decoded + 4
    assert torch.equal(fresh.low_res_logits, first.low_res_logits)
    # Any change misses: a point, the output kind, a hook, another embedding object.
    moved = coords.clone()
    moved[0, 0, 0] += 1
    for call in (
        lambda: decoder.decode(embedding, moved, labels, multimask=True),
        lambda: decoder.decode(embedding, coords, labels, multimask=False),
        lambda: decoder.decode(embedding, coords, labels, attn_sim=torch.rand(16, 16)),
        lambda: decoder.decode(embedding.clone(), coords, labels, multimask=True),
    ):
        before = decoder.prompt_sets_decoded
        call()
        assert decoder.prompt_sets_decoded == before + 4


def test_the_memo_stays_within_its_bound(tmp_path):
    segmenter = OneShotSegmenter(
        tiny_config(
            model_dir=str(tmp_path), decoder_memo_bytes=5 * (4 * 3 * 64 * 64 + 4 * 3) * 4 // 2
        )
    )
    decoder = segmenter.decoder
    embedding = torch.randn(32, 16, 16)
    for i in range(5):
        decoder.decode(
            embedding, torch.full((4, 1, 2), float(i)), torch.ones(4, 1, dtype=torch.int64)
        )
        assert decoder._bytes <= decoder.max_bytes
    assert len(decoder._entries) == 2


def test_a_repeated_prediction_decodes_nothing_and_finds_the_same(segmenter):
    image, mask = _scene()
    target, _ = _scene(seed=2)
    reference = segmenter.build_reference([Example(image, {"disc": [mask]})])
    first = segmenter.segment(reference, target)
    decoded = segmenter.decoder.prompt_sets_decoded
    again = segmenter.segment(reference, target)
    assert segmenter.decoder.prompt_sets_decoded == decoded
    assert len(again) == len(first)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.mask, b.mask) and a.score == b.score


def test_the_published_persam_f_loop_still_decodes_every_iteration(tmp_path):
    segmenter = OneShotSegmenter(tiny_config(model_dir=str(tmp_path), mode="persam"))
    image, mask = _scene()
    reference = segmenter.build_reference([Example(image, {"disc": [mask]})])
    pairs = [(segmenter.features(image), mask)]
    before = segmenter.decoder.prompt_sets_decoded
    persam_f.train_mask_weights_reference(segmenter, reference.labels["disc"], pairs, iterations=3)
    assert segmenter.decoder.prompt_sets_decoded - before >= 4  # 3 iterations + the final loss
