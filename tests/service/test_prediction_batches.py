"""Encoding the tasks of a /predict together: each image is loaded once, a failed one keeps its
error for its task, and a batch is no larger than the time budget leaves room for."""

from __future__ import annotations

import numpy as np
import pytest

from backend.prediction import _BatchImages, batch_within
from labelstudio.guard import FetchError


def test_each_image_of_a_batch_is_loaded_once_and_a_failure_keeps_its_error():
    calls = []

    def load(task):
        calls.append(task["id"])
        if task["id"] == 2:
            raise FetchError("HTTP 404")
        return np.zeros((2, 2, 3), np.uint8)

    loader = _BatchImages(load)
    tasks = [{"id": 1}, {"id": 2}, {"id": 3}]
    assert len(loader.keep(tasks)) == 2
    assert loader(tasks[0]).shape == (2, 2, 3)
    with pytest.raises(FetchError, match="404"):
        loader(tasks[1])
    loader(tasks[2])
    assert calls == [1, 2, 3]  # nothing fetched twice
    loader(tasks[0])  # outside the batch now: loaded again
    assert calls == [1, 2, 3, 1]


@pytest.mark.parametrize(
    ("time_left", "slowest", "expected"),
    [(100.0, 0.0, 1), (100.0, 2.0, 8), (7.0, 2.0, 3), (1.0, 2.0, 1), (-5.0, 2.0, 1)],
)
def test_a_batch_is_what_the_time_left_can_predict(time_left, slowest, expected):
    assert batch_within(8, time_left, slowest) == expected
