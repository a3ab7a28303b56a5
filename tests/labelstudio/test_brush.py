"""Brush RLE: the vectorised encoder writes the SDK's bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from builders import SHARED_DATA
from labelstudio.brush import mask_to_rle


def _sdk(mask: np.ndarray) -> list[int]:
    return mask2rle(mask.astype(np.uint8) * 255)


@pytest.mark.parametrize("value", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (480, 854)])
def test_uniform_masks_encode_as_the_sdk_does(shape, value):
    mask = np.full(shape, value)
    assert mask_to_rle(mask) == _sdk(mask)


# Runs of 4 x length values cross the SDK's field limits 8, 16, 256 and 2^16 (and 2 x 2^16).
@pytest.mark.parametrize(
    "length", [1, 2, 3, 4, 5, 64, 65, 16383, 16384, 16385, 32768, 32769, 40000]
)
def test_runs_at_every_field_boundary_encode_as_the_sdk_does(length):
    mask = np.zeros((1, length + 3), bool)
    mask[0, 1 : 1 + length] = True
    assert mask_to_rle(mask) == _sdk(mask)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31 - 1),
)
def test_random_masks_encode_as_the_sdk_does(height, width, density, seed):
    mask = np.random.default_rng(seed).random((height, width)) < density
    assert mask_to_rle(mask) == _sdk(mask)


def test_a_real_mask_round_trips_through_the_sdk_decoder():
    path = SHARED_DATA / "davis2016_val" / "dog" / "00000.png"
    if not path.exists():
        pytest.skip("shared data set not present")
    from PIL import Image

    mask = np.asarray(Image.open(path).convert("L")) > 0
    rle = mask_to_rle(mask)
    assert rle == _sdk(mask)
    decoded = decode_rle(rle).reshape(*mask.shape, 4)[..., 3]
    np.testing.assert_array_equal(decoded > 0, mask)


def test_a_mask_that_is_not_2d_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(np.zeros((2, 2, 2), bool))


def test_a_ragged_mask_of_more_runs_than_one_chunk_encodes_as_the_sdk_does():
    mask = np.random.default_rng(7).random((300, 600)) > 0.5  # ~90k runs: two chunks
    assert mask_to_rle(mask) == _sdk(mask)
