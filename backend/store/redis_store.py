"""The Redis state store (``REDIS_URL``): ``WATCH``/``MULTI``/``EXEC`` writes, Lua for locks."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from labelstudio.redaction import redact_url

from .state import (
    ProjectState,
    StateWrite,
    StoreBase,
    StoreError,
    StoreUnavailable,
    check_room,
    lock_lost,
)

log = logging.getLogger("backend.store")


# Deletes a lock only if the caller still holds it (atomic on the server).
_RELEASE_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# Renews a lock's lease only if the caller still holds it.
_EXTEND_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
# Bytes of a project's stored examples (summed on the server: nothing large travels).
_EXAMPLES_BYTES_SCRIPT = """
local total = 0
for _, value in ipairs(redis.call('hvals', KEYS[1])) do total = total + #value end
if ARGV[1] ~= '' then total = total - redis.call('hstrlen', KEYS[1], ARGV[1]) end
return total
"""


class RedisStore(StoreBase):
    """Shared store for several machines: one Redis (``REDIS_URL``)."""

    def __init__(
        self,
        url: str,
        namespace: str = "oneshot",
        max_retries: int = 50,
        max_project_bytes: int | None = None,
    ):
        import redis

        self._redis_module = redis
        self.max_project_bytes = max_project_bytes
        self.url = url
        self.description = f"redis:{redact_url(url)}"
        self.namespace = namespace
        self.max_retries = max_retries
        self.client = redis.Redis.from_url(
            url, socket_timeout=10, socket_connect_timeout=3, health_check_interval=30
        )

    # --- keys and errors ----------------------------------------------------------------
    def _key(self, project_id: str, part: str = "") -> str:
        return f"{self.namespace}:project:{project_id}" + (f":{part}" if part else "")

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        errors = self._redis_module.exceptions
        try:
            yield
        except (errors.ConnectionError, errors.TimeoutError) as error:
            raise StoreUnavailable(
                f"Redis at {redact_url(self.url)} is unreachable while {what} ({error}); "
                "nothing was written"
            ) from error
        except errors.RedisError as error:
            raise StoreError(f"Redis at {redact_url(self.url)} failed while {what}: {error}") from (
                error
            )

    # --- state --------------------------------------------------------------------------
    def _load_with(self, client: Any, project_id: str) -> ProjectState:
        header, reference = client.hmget(self._key(project_id), ["header", "reference"])
        return ProjectState.from_parts(
            project_id, json.loads(header) if header is not None else None, reference
        )

    def load(self, project_id: str) -> ProjectState:
        with self._errors(f"loading project {project_id}"):
            return self._load_with(self.client, project_id)

    def _atomically(
        self,
        project_id: str,
        fence: tuple[str, str] | None,
        step: Callable[[StateWrite], ProjectState],
    ) -> ProjectState:
        """Optimistic: ``WATCH`` the key (and the ``fence`` lock), run ``step``, which writes in
        ``MULTI``/``EXEC``; retried when another writer got there first (see
        :meth:`StoreBase.update`)."""
        watch_error = self._redis_module.exceptions.WatchError
        with self._errors(f"updating project {project_id}"):
            for _ in range(self.max_retries):
                with self.client.pipeline() as pipe:
                    try:
                        self._watch(pipe, project_id, fence)
                        return step(_RedisWrite(self, pipe, project_id))
                    except watch_error:
                        continue
            raise StoreError(
                f"project {project_id}: gave up after {self.max_retries} conflicting writes"
            )

    def _watch(self, pipe: Any, project_id: str, fence: tuple[str, str] | None) -> None:
        """``WATCH`` the project's key, and the ``fence`` lock once it is held by its token.

        Raises:
            LockLost: ``fence``'s lock is not held by its token.
        """
        key = self._key(project_id)
        if fence is None:
            pipe.watch(key)
            return
        lock_key = self._lock_key(fence[0])
        pipe.watch(key, lock_key)
        if pipe.get(lock_key) != fence[1].encode():
            raise lock_lost(fence[0])

    def _examples_bytes(self, client: Any, project_id: str, except_key: str = "") -> int:
        return int(
            client.eval(_EXAMPLES_BYTES_SCRIPT, 1, self._key(project_id, "examples"), except_key)
        )

    def stored_bytes(self, project_id: str) -> int:
        """Bytes the project takes: state header, reference and stored examples."""
        key = self._key(project_id)
        with self._errors(f"measuring project {project_id}"):
            state = self.client.hstrlen(key, "header") + self.client.hstrlen(key, "reference")
            return int(state) + self._examples_bytes(self.client, project_id)

    def versions(self, project_id: str | None = None) -> list[dict]:
        with self._errors("reading versions"):
            projects = [project_id] if project_id is not None else self.projects()
            entries = []
            for pid in projects:
                for raw in self.client.lrange(self._key(pid, "versions"), 0, -1):
                    entries.append({"project_id": pid, **json.loads(raw)})
        if project_id is None:
            entries.sort(key=lambda e: e.get("created_at", 0.0))
        return entries

    def projects(self) -> list[str]:
        with self._errors("listing projects"):
            return sorted(p.decode() for p in self.client.smembers(f"{self.namespace}:projects"))

    # --- examples -----------------------------------------------------------------------
    def put_example(self, project_id: str, key: str, payload: dict) -> None:
        """Store (or replace, keeping its place in the order) one example.

        Raises:
            StateTooLarge: the project would exceed ``max_project_bytes``.
        """
        text = json.dumps(payload)
        examples_key = self._key(project_id, "examples")
        with self._errors(f"storing example {key} of project {project_id}"):
            if self.max_project_bytes is not None:
                state_key = self._key(project_id)
                check_room(
                    project_id,
                    self.max_project_bytes,
                    int(self.client.hstrlen(examples_key, key)),
                    len(text.encode()),
                    lambda: (
                        int(self.client.hstrlen(state_key, "header"))
                        + int(self.client.hstrlen(state_key, "reference"))
                        + self._examples_bytes(self.client, project_id, except_key=key)
                    ),
                )
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(examples_key, key, text)
            # nx: an updated example keeps the place of its first version.
            pipe.zadd(self._key(project_id, "example-order"), {key: time.time()}, nx=True)
            pipe.sadd(f"{self.namespace}:projects", project_id)
            pipe.execute()

    def delete_examples(self, project_id: str, keys: Iterable[str]) -> int:
        keys = list(keys)
        if not keys:
            return 0
        with self._errors(f"deleting examples of project {project_id}"):
            pipe = self.client.pipeline(transaction=True)
            pipe.hdel(self._key(project_id, "examples"), *keys)
            pipe.zrem(self._key(project_id, "example-order"), *keys)
            deleted, _ = pipe.execute()
            return int(deleted)

    def examples(self, project_id: str) -> dict[str, dict]:
        with self._errors(f"reading examples of project {project_id}"):
            pipe = self.client.pipeline(transaction=True)
            pipe.zrange(self._key(project_id, "example-order"), 0, -1)
            pipe.hgetall(self._key(project_id, "examples"))
            order, payloads = pipe.execute()
        return {k.decode(): json.loads(payloads[k]) for k in order if k in payloads}

    # --- locks --------------------------------------------------------------------------
    def _lock_key(self, name: str) -> str:
        return f"{self.namespace}:lock:{name}"

    def acquire_lock(self, name: str, ttl: float) -> str | None:
        token = uuid.uuid4().hex
        with self._errors(f"taking lock {name}"):
            taken = self.client.set(
                self._lock_key(name), token, nx=True, px=max(1, int(ttl * 1000))
            )
        return token if taken else None

    def extend_lock(self, name: str, token: str, ttl: float) -> bool:
        """Renew the lease of ``name`` for ``ttl`` seconds if ``token`` still holds it."""
        with self._errors(f"renewing lock {name}"):
            renewed = self.client.eval(
                _EXTEND_SCRIPT, 1, self._lock_key(name), token, max(1, int(ttl * 1000))
            )
        return bool(renewed)

    def release_lock(self, name: str, token: str | None = None) -> None:
        key = self._lock_key(name)
        with self._errors(f"releasing lock {name}"):
            if token is None:
                self.client.delete(key)
            else:
                self.client.eval(_RELEASE_SCRIPT, 1, key, token)

    def close(self) -> None:
        self.client.close()


class _RedisWrite:
    """A project's state inside a watched Redis pipeline (:class:`StateWrite`)."""

    def __init__(self, store: RedisStore, pipe: Any, project_id: str):
        self.store, self.pipe, self.project_id = store, pipe, project_id
        self.key = store._key(project_id)

    def load(self) -> ProjectState:
        return self.store._load_with(self.pipe, self.project_id)

    def state_bytes(self) -> int:
        return self.pipe.hstrlen(self.key, "header") + self.pipe.hstrlen(self.key, "reference")

    def examples_bytes(self) -> int:
        return self.store._examples_bytes(self.pipe, self.project_id)

    def write(self, state: ProjectState, header: str, version: dict | None) -> None:
        pipe, key = self.pipe, self.key
        pipe.multi()
        pipe.hset(key, "header", header)
        if state.reference is None:
            pipe.hdel(key, "reference")
        else:
            pipe.hset(key, "reference", state.reference)
        pipe.sadd(f"{self.store.namespace}:projects", self.project_id)
        if version is not None:
            pipe.rpush(self.store._key(self.project_id, "versions"), json.dumps(version))
        pipe.execute()
