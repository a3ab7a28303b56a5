"""Label Studio's brush RLE, vectorised (the format of ``label_studio_sdk.converter.brush``).

Hand-rolled because the SDK's ``mask2rle`` builds a bit string run by run in Python: 2.9 ms
against 0.5 ms here on a real 854 x 480 DAVIS mask, 249 ms against 23 ms on a ragged one (masks
of a poorly matched target). This computes the same bytes with numpy; the tests compare the two.
"""

from __future__ import annotations

import numpy as np

_CHANNELS = 4
"""Label Studio's brush RLE encodes an RGBA image: each mask pixel is repeated 4 times."""
_WORD_BITS = 8
_LENGTH_FIELDS = (3, 4, 8, 16)
"""Bits of a run-length field, by the 2-bit size index of a run's code."""
_LONGEST_RUN = 1 << 16
_HEADER_BITS = 32 + 5 + 4 * len(_LENGTH_FIELDS)


def _header(values: int) -> np.ndarray:
    bits = f"{values:032b}{_WORD_BITS - 1:05b}" + "".join(f"{n - 1:04b}" for n in _LENGTH_FIELDS)
    return np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0")


def _runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths (of the 4-channel array) and pixel values (0 or 255) of bool ``flat``."""
    ends = np.flatnonzero(flat[1:] != flat[:-1])
    ends = np.append(ends, flat.size - 1)
    lengths = np.diff(np.append(-1, ends)) * _CHANNELS
    return lengths, np.where(flat[ends], 255, 0)


def _size_index(lengths: np.ndarray) -> np.ndarray:
    """Index into :data:`_LENGTH_FIELDS` of the shortest field that holds ``length - 1``."""
    return np.searchsorted(np.array([1 << n for n in _LENGTH_FIELDS]), lengths, side="left")


def _split_long(
    lengths: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs longer than 2^16 become runs of 2^16 and a remainder, each written with the 16-bit
    field (the SDK's loop keeps the long-run branch for the remainder); returns lengths, values
    and size indices."""
    pieces = (lengths - 1) // _LONGEST_RUN + 1
    size_index = _size_index(np.minimum(lengths, _LONGEST_RUN))
    if np.all(pieces == 1):
        return lengths, values, size_index
    first = np.cumsum(pieces) - pieces
    split = np.full(int(pieces.sum()), _LONGEST_RUN, dtype=np.int64)
    split[first + pieces - 1] = lengths - (pieces - 1) * _LONGEST_RUN
    return split, np.repeat(values, pieces), np.repeat(size_index, pieces)


_RUNS_PER_CHUNK = 1 << 16


def _code_bits(code: np.ndarray, width: np.ndarray) -> np.ndarray:
    """The codes' bits, most significant first, each code in its own ``width`` bits."""
    shifts = np.arange(int(width.max()) - 1, -1, -1)
    bits = (code[:, None] >> shifts[None, :]) & 1  # right-aligned in the widest code's bits
    return bits[shifts[None, :] < width[:, None]].astype(np.uint8)


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """``(H, W)`` mask (bool or 0/1/255) to Label Studio brush RLE bytes, pixel value 255 inside.

    Equal, byte for byte, to ``mask2rle(mask.astype(np.uint8) * 255)`` for a bool mask.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, not {mask.shape}")
    flat = mask.reshape(-1) > 0
    if flat.size == 0:
        raise ValueError("empty mask")
    lengths, values, size_index = _split_long(*_runs(flat))
    # Each run: '1', a 2-bit size index, the length - 1 in that many bits, the 8-bit value.
    field_bits = np.array(_LENGTH_FIELDS)[size_index]
    code = (
        (1 << (2 + field_bits + _WORD_BITS))
        | (size_index << (field_bits + _WORD_BITS))
        | ((lengths - 1) << _WORD_BITS)
        | values
    )
    width = 1 + 2 + field_bits + _WORD_BITS
    parts = [_header(flat.size * _CHANNELS)]
    for start in range(0, code.size, _RUNS_PER_CHUNK):  # bounds memory on very ragged masks
        chunk = slice(start, start + _RUNS_PER_CHUNK)
        parts.append(_code_bits(code[chunk], width[chunk]))
    stream = np.concatenate(parts)
    # The SDK pads to a whole byte with 1-8 zeros (8 when already whole).
    stream = np.append(stream, np.zeros(8 - stream.size % 8, dtype=np.uint8))
    return np.packbits(stream).tolist()
