"""Fixtures every layer shares: the folder of the tiny random-weight engine, made once per test
session under pytest's temporary folder (never a fixed path, so concurrent runs do not collide).

Layers: ``engine/`` (matcher_core), ``labelstudio/`` (formats and HTTP), ``service/`` (backend),
``e2e/`` (a real Label Studio, CI only); each has its own conftest. Builders of test data live in
``builders.py`` (shared) and ``service/server_helpers.py`` (the service's stand-ins).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
