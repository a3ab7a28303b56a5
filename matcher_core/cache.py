"""A memory-bounded LRU cache of image features, keyed by image content.

Re-predicting an image (after a retraining, or when Label Studio asks again) then costs no encoder
pass: only matching, decoding and scoring run again.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from .features import ImageFeatures


def image_key(image: np.ndarray, model_id: str = "") -> str:
    """Content hash of an ``(H, W, 3)`` uint8 image (pixels and shape) and of the models used."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(model_id.encode())
    digest.update(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    """Thread-safe LRU of :class:`ImageFeatures` bounded by total tensor bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> ImageFeatures | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: str, features: ImageFeatures) -> None:
        size = features.nbytes()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key).nbytes()
            self._items[key] = features
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
