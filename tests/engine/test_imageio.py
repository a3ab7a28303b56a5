"""Images arrive in every form annotation teams have: each loads as (H, W, 3) uint8 or fails clearly."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from matcher_core.imageio import ImageError, load_image, load_label_mask


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16", "RGB", "1"])
def test_every_mode_becomes_rgb_uint8(mode):
    source = Image.new("RGB", (7, 5), (200, 100, 50)).convert(mode)
    array = load_image(encode(source))
    assert array.shape == (5, 7, 3) and array.dtype == np.uint8


def test_16_bit_images_are_scaled_not_clipped():
    values = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000).astype(np.uint16)
    array = load_image(encode(Image.fromarray(values)))
    assert array[..., 0].max() == 255 and array[0, 0, 0] == 0


def test_exif_rotation_is_applied():
    source = Image.new("RGB", (8, 4), (10, 20, 30))
    exif = source.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    array = load_image(encode(source, "JPEG", exif=exif.tobytes()))
    assert array.shape == (8, 4, 3)


def test_empty_corrupt_and_oversized_images_fail_clearly():
    with pytest.raises(ImageError, match="0 bytes"):
        load_image(b"")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"this is not an image")
    truncated = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:100]
    with pytest.raises(ImageError):
        load_image(truncated)
    with pytest.raises(ImageError, match="exceeds the cap"):
        load_image(encode(Image.new("L", (300, 300))), max_pixels=10_000)


def test_binary_and_indexed_masks():
    binary = np.zeros((4, 4), np.uint8)
    binary[1:3, 1:3] = 255
    assert load_label_mask(encode(Image.fromarray(binary))).sum() == 4
    assert load_label_mask(encode(Image.fromarray((binary > 0).astype(np.uint8)))).sum() == 4
    indexed = Image.fromarray(np.array([[0, 1], [2, 2]], np.uint8), mode="P")
    indexed.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    assert load_label_mask(encode(indexed)).tolist() == [[0, 1], [2, 2]]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` grayscale pixels and that holds none (a
    decompression bomb's first bytes: the size is all a cap may look at)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_a_bomb_over_pillows_own_limit_is_refused_by_the_cap_with_its_message():
    # 100 Mpx: above Pillow's built-in 89.5 Mpx warning and near its 179 Mpx error.
    with pytest.raises(ImageError, match="10000x10000 pixels exceeds the cap of 64000000"):
        load_image(png_header_only(10_000, 10_000))
    with pytest.raises(ImageError, match="20000x20000 pixels exceeds the cap of 64000000"):
        load_image(png_header_only(20_000, 20_000))


def test_a_raised_cap_is_the_only_limit():
    # A cap of 200 Mpx lets a 100 Mpx header through to decoding (which fails here only because
    # the file holds no pixels), instead of Pillow's 89.5 Mpx limit refusing it.
    with pytest.raises(ImageError) as refused:
        load_image(png_header_only(10_000, 10_000), max_pixels=200_000_000)
    assert "cap" not in str(refused.value) and "decompression bomb" not in str(refused.value)
    image = Image.new("L", (9_500, 10_000))  # 95 Mpx, really decoded
    assert load_label_mask(encode(image), max_pixels=200_000_000).shape == (10_000, 9_500)
