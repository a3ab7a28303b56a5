"""Persistent per-project state shared by every worker: SQLite in ``MODEL_DIR`` or Redis.

* :mod:`.state`: what is stored (:class:`ProjectState`, examples, versions, locks), the
  :class:`StateStore` protocol, keys, errors, size accounting;
* :mod:`.sqlite_store`, :mod:`.redis_store`: the two implementations;
* :func:`make_store`: the one the settings ask for.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..settings import Settings
from .redis_store import RedisStore
from .sqlite_store import SQLiteStore
from .state import (
    MAX_KEY_CHARS,
    WAITING_VERSION,
    InvalidKey,
    LockLost,
    ProjectState,
    StateChange,
    StateStore,
    StateTooLarge,
    StoreError,
    StoreUnavailable,
    example_key,
    key_part,
)

__all__ = [
    "MAX_KEY_CHARS",
    "WAITING_VERSION",
    "InvalidKey",
    "LockLost",
    "ProjectState",
    "RedisStore",
    "SQLiteStore",
    "StateChange",
    "StateStore",
    "StateTooLarge",
    "StoreError",
    "StoreUnavailable",
    "example_key",
    "key_part",
    "make_store",
]

log = logging.getLogger("backend.store")


def make_store(settings: Settings) -> StateStore:
    """Redis when ``REDIS_URL`` is set, else SQLite in ``MODEL_DIR``."""
    limit = settings.max_project_state_bytes
    if settings.redis_url:
        store: StateStore = RedisStore(settings.redis_url, max_project_bytes=limit)
    else:
        store = SQLiteStore(
            Path(settings.model_dir).expanduser() / "state.sqlite3", max_project_bytes=limit
        )
    log.info("state store: %s", store.description)
    return store
