"""Reading images and masks safely: EXIF orientation, any mode, a pixel cap against bombs."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000

# The one pixel cap is the caller's (``max_pixels``, checked in ``_open`` on the header's size
# before any pixel is decoded): Pillow's own fixed 89.5 Mpx limit would refuse, with its own
# message, images that a raised cap allows.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """The bytes are not a usable image (empty, corrupt, too large, unsupported)."""


def _open(source: bytes | str | Path, max_pixels: int) -> Image.Image:
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if not data:
        raise ImageError("empty image file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image of {width}x{height} pixels exceeds the cap of {max_pixels}"
                )
            image.load()
    except ImageError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as error:
        raise ImageError(f"not a readable image: {error}") from error
    return image


def load_image(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB, EXIF rotation applied (as browsers and Label Studio show it).

    Grayscale, palette, RGBA (composited on black) and 16-bit images are converted.
    """
    image = _open(source, max_pixels)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray(np.rint(array * (255.0 / peak)).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def load_label_mask(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``(H, W)`` integer label map of a mask file.

    A binary mask (values {0, 255} or {0, 1}, or any grayscale thresholded at half range) gives
    {0, 1}; an indexed (palette) PNG gives its indices, one label per index, 0 = background.
    """
    image = _open(source, max_pixels)
    if image.mode == "P":
        return np.asarray(image, dtype=np.int32).copy()
    array = np.asarray(image.convert("L"), dtype=np.uint8)
    threshold = 0 if array.max() <= 1 else 127
    return (array > threshold).astype(np.int32)
