"""Fixtures of the Label Studio format and HTTP tests."""

from __future__ import annotations

import pytest

from labelstudio import auth


@pytest.fixture(autouse=True)
def fresh_access_tokens():
    """No test sees another's exchanged access tokens (the cache is per process)."""
    auth.forget_access_tokens()
    yield
    auth.forget_access_tokens()
