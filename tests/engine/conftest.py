"""Fixtures of the engine tests (matcher_core only: no Label Studio, no server)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_segmenter(tiny_model_dir):
    from matcher_core import OneShotSegmenter, tiny_config

    return OneShotSegmenter(tiny_config(model_dir=tiny_model_dir))
