"""Persistent per-project state shared by every worker: SQLite in ``MODEL_DIR`` or Redis.

What is kept per project (keyed by Label Studio's project id, never mixed between projects):

* :class:`ProjectState`: the serialised reference, the learned state that goes into the model
  version, the model version itself, the labeling config (and its hash), the connection details
  Label Studio gave at ``/setup``;
* the version history (``/versions``);
* the annotations received by webhooks (*examples*), kept until they are deleted in Label Studio,
  so learning can replay them;
* short-lived named locks (one training per project across processes and machines): leases
  that their holder renews (:meth:`StateStore.extend_lock`) and that a write can be *fenced* by
  (``update(..., fence=(name, token))`` writes only while that token still holds the lock, so a
  trainer that lost its lease, e.g. paused past its expiry, cannot overwrite a newer training).

A project's total stored bytes (state, reference and examples) can be capped
(``max_project_bytes``, the ``MAX_PROJECT_STATE_BYTES`` setting): a write that would grow the
project past it raises :class:`StateTooLarge` and writes nothing.

Every write is atomic: :meth:`StateStore.update` runs a read-modify-write in one SQLite
``BEGIN IMMEDIATE`` transaction (WAL journal, ``synchronous=FULL``) or one Redis ``WATCH`` /
``MULTI`` / ``EXEC``; a crash or a lost connection mid-write leaves the previous state intact.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from labelstudio.redaction import redact_url

from .settings import Settings

log = logging.getLogger(__name__)

WAITING_VERSION = "oneshot-waiting"
"""Model version served before a project has a reference."""


MAX_KEY_CHARS = 128
"""Longest id accepted in a store key (Label Studio's ids are integers: a handful of digits)."""


class InvalidKey(ValueError):
    """A value that cannot name anything in the store (the message says why)."""


def key_part(value: object, what: str = "id") -> str:
    """``value`` (an int or a string) as text safe in a store key, a lock name or a log line.

    The one check every id goes through before it names anything stored: SQLite and Redis take
    keys as UTF-8, which a lone UTF-16 surrogate cannot be written in, and a NUL or another
    control character would split or forge log lines and keys.

    Raises:
        InvalidKey: not an int or a string, empty, over ``MAX_KEY_CHARS`` characters, with a
            control character, or not encodable as UTF-8.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidKey(f"{what} {str(value)[:40]!r} is not an id")
    text = str(value)
    if not text or len(text) > MAX_KEY_CHARS:
        raise InvalidKey(f"{what} must have 1 to {MAX_KEY_CHARS} characters, not {len(text)}")
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise InvalidKey(f"{what} {ascii(text[:40])} holds a control character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKey(f"{what} {ascii(text[:40])} is not valid Unicode text") from None
    return text


def example_key(annotation_id: object) -> str:
    """The store key of the example an annotation id names (``annotation:<id>``).

    Raises:
        InvalidKey: the id cannot name an example (see :func:`key_part`).
    """
    return f"annotation:{key_part(annotation_id, 'annotation id')}"


class StoreError(RuntimeError):
    """The state store failed; nothing was written. ``http_status``: what a request that hit it
    answers."""

    http_status = 503


class StoreUnavailable(StoreError):
    """The state store cannot be reached (Redis down, database locked for too long)."""


class StateTooLarge(StoreError):
    """The write would take the project past its byte cap (``MAX_PROJECT_STATE_BYTES``)."""

    http_status = 507


class LockLost(StoreError):
    """A fenced write whose lock is no longer held by the writer's token (its lease ran out and
    maybe another process took it): the write is refused."""

    http_status = 409


@dataclass
class ProjectState:
    """What the backend knows about one Label Studio project."""

    project_id: str
    model_version: str = WAITING_VERSION
    reference: bytes | None = None
    """:meth:`matcher_core.Reference.to_bytes` of the project's reference, ``None`` until the first
    annotation with masks has been learned."""
    reference_source: dict | None = None
    """Which annotation the reference came from: ``{"annotation_id", "task_id"}``."""
    learned: dict = field(default_factory=dict)
    """JSON state learned beyond the reference (filled by learning); part of the model version."""
    label_config: str | None = None
    label_config_hash: str | None = None
    connection: dict = field(default_factory=dict)
    """``{"hostname", "access_token"}`` from Label Studio's last ``/setup`` (for downloads and
    posting predictions from background jobs)."""
    applied_examples: list[str] = field(default_factory=list)
    """Keys of the stored examples already taken into the reference / learned state."""
    applied_stamps: dict = field(default_factory=dict)
    """``received_at`` of each applied example as it was learned: an example stored again
    since (an updated annotation, even one arriving while that training ran) differs, and is
    learned again."""
    last_error: str | None = None
    """The last background failure for this project (shown by ``/versions`` and the logs)."""
    training_requested_at: float | None = None
    """When a training was last requested and not yet done (a successful or cleanly failed
    training clears it). Still set long after, with nobody holding the training lock, means the
    trainer died: the next request starts the training again (``backend.jobs``)."""
    revision: int = 0
    """Incremented by every write (lets tests and jobs see that something changed)."""
    updated_at: float = 0.0

    def header(self) -> dict:
        """Everything but the reference bytes, as JSON-able data."""
        data = asdict(self)
        data.pop("reference")
        return data

    @staticmethod
    def from_parts(project_id: str, header: dict | None, reference: bytes | None) -> ProjectState:
        if header is None:
            return ProjectState(project_id=project_id)
        known = {k: v for k, v in header.items() if k in ProjectState.__dataclass_fields__}
        known["project_id"] = project_id
        return ProjectState(**known, reference=reference)


StateChange = Callable[[ProjectState], "ProjectState | None"]
"""Receives a private copy of the current state; returns the new state, or ``None`` to write
nothing. It runs inside the store's transaction: keep it fast (no model work)."""


@runtime_checkable
class StateStore(Protocol):
    """Storage of :class:`ProjectState`, versions, examples and locks (SQLite or Redis)."""

    description: str

    def load(self, project_id: str) -> ProjectState: ...

    def update(
        self,
        project_id: str,
        change: StateChange,
        reason: str = "",
        fence: tuple[str, str] | None = None,
    ) -> ProjectState: ...

    def stored_bytes(self, project_id: str) -> int: ...

    def versions(self, project_id: str | None = None) -> list[dict]: ...

    def projects(self) -> list[str]: ...

    def put_example(self, project_id: str, key: str, payload: dict) -> None: ...

    def delete_examples(self, project_id: str, keys: Iterable[str]) -> int: ...

    def examples(self, project_id: str) -> dict[str, dict]: ...

    def acquire_lock(self, name: str, ttl: float) -> str | None: ...

    def extend_lock(self, name: str, token: str, ttl: float) -> bool: ...

    def release_lock(self, name: str, token: str | None = None) -> None: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


def _apply(current: ProjectState, change: StateChange) -> ProjectState | None:
    new = change(copy.deepcopy(current))
    if new is None:
        return None
    if new.project_id != current.project_id:
        raise StoreError(
            f"a change for project {current.project_id} returned project {new.project_id}"
        )
    new.revision = current.revision + 1
    new.updated_at = time.time()
    return new


def _version_entry(state: ProjectState, reason: str) -> dict:
    return {"model_version": state.model_version, "created_at": state.updated_at, "reason": reason}


def _state_bytes(header_json: str | bytes | None, reference: bytes | None) -> int:
    return len(header_json or b"") + len(reference or b"")


def _check_room(
    project_id: str, limit: int | None, before: int, after: int, other: Callable[[], int]
) -> None:
    """Refuse a write that grows the project (``before`` -> ``after`` bytes of the part being
    written; ``other()`` the bytes of the rest) past ``limit``. Shrinking writes always pass, so
    a project over a lowered limit can still record errors and delete examples."""
    if limit is None or after <= before:
        return
    total = after + other()
    if total > limit:
        raise StateTooLarge(
            f"project {project_id} would store {total} bytes, over the limit of {limit} "
            "(MAX_PROJECT_STATE_BYTES); nothing was written. Delete annotations of the project "
            "in Label Studio or raise the limit"
        )


def _lock_lost(name: str) -> LockLost:
    return LockLost(
        f"lock {name} is no longer held by this writer (its lease expired); nothing was written"
    )


# ---------------------------------------------------------------------------------------------
# SQLite
# ---------------------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    project_id TEXT PRIMARY KEY,
    header TEXT NOT NULL,
    reference BLOB
);
CREATE TABLE IF NOT EXISTS versions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id TEXT NOT NULL,
    entry TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS versions_by_project ON versions (project_id, seq);
CREATE TABLE IF NOT EXISTS examples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id TEXT NOT NULL,
    example_key TEXT NOT NULL,
    payload TEXT NOT NULL,
    UNIQUE (project_id, example_key)
);
CREATE TABLE IF NOT EXISTS locks (
    name TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""


class SQLiteStore:
    """Embedded store: one SQLite file (WAL) shared by the processes of one machine."""

    def __init__(
        self, path: str | Path, busy_timeout: float = 30.0, max_project_bytes: int | None = None
    ):
        self.path = Path(path).expanduser()
        self.max_project_bytes = max_project_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout = busy_timeout
        self.description = f"sqlite:{self.path}"
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        try:
            self._connection().executescript(SCHEMA)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"cannot create state store {self.path}: {error}") from error

    # --- connections and transactions ---------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                # FULL: a committed write survives a power cut, not only a process crash.
                conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as error:
                raise StoreUnavailable(f"cannot open state store {self.path}: {error}") from error
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: ``BEGIN IMMEDIATE`` takes the write lock up front, so two
        read-modify-writes never interleave; any exception rolls everything back."""
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            raise StoreUnavailable(f"state store {self.path} is busy: {error}") from error
        try:
            yield conn
        except BaseException:
            # SQLite rolls back by itself after some errors (SQLITE_FULL, SQLITE_IOERR...); a
            # second ROLLBACK would fail and hide the original error.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as error:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise StoreError(f"state store {self.path}: commit failed: {error}") from error

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as error:
            raise StoreError(f"state store {self.path}: {error}") from error

    # --- state --------------------------------------------------------------------------
    @staticmethod
    def _load_with(conn: sqlite3.Connection, project_id: str) -> ProjectState:
        row = conn.execute(
            "SELECT header, reference FROM projects WHERE project_id = ?", (project_id,)
        ).fetchone()
        if row is None:
            return ProjectState(project_id=project_id)
        return ProjectState.from_parts(project_id, json.loads(row[0]), row[1])

    def load(self, project_id: str) -> ProjectState:
        """The project's state (a fresh :class:`ProjectState` if it has none yet)."""
        try:
            return self._load_with(self._connection(), project_id)
        except sqlite3.Error as error:
            raise StoreError(f"state store {self.path}: {error}") from error

    def update(
        self,
        project_id: str,
        change: StateChange,
        reason: str = "",
        fence: tuple[str, str] | None = None,
    ) -> ProjectState:
        """Atomically replace the project's state by ``change(state)``; returns the state now
        stored. A new model version is appended to the history in the same transaction.

        Args:
            fence: ``(lock name, token)``: write only if that token holds that lock (unexpired).

        Raises:
            LockLost: ``fence`` is given and its lock is not held by its token.
            StateTooLarge: the project would exceed ``max_project_bytes``.
            StoreError: SQLite failed (disk full, I/O error...); nothing was written.
        """
        try:
            with self._transaction() as conn:
                if fence is not None and not self._holds(conn, *fence):
                    raise _lock_lost(fence[0])
                current = self._load_with(conn, project_id)
                new = _apply(current, change)
                if new is None:
                    return current
                header = json.dumps(new.header())
                _check_room(
                    project_id,
                    self.max_project_bytes,
                    self._state_bytes_with(conn, project_id),
                    _state_bytes(header, new.reference),
                    lambda: self._examples_bytes_with(conn, project_id),
                )
                conn.execute(
                    "INSERT INTO projects (project_id, header, reference) VALUES (?, ?, ?) "
                    "ON CONFLICT (project_id) DO UPDATE SET header = excluded.header, "
                    "reference = excluded.reference",
                    (project_id, header, new.reference),
                )
                if new.model_version != current.model_version:
                    conn.execute(
                        "INSERT INTO versions (project_id, entry) VALUES (?, ?)",
                        (project_id, json.dumps(_version_entry(new, reason))),
                    )
                return new
        except sqlite3.Error as error:
            raise StoreError(f"state store {self.path}: {error}") from error

    @staticmethod
    def _state_bytes_with(conn: sqlite3.Connection, project_id: str) -> int:
        row = conn.execute(
            "SELECT LENGTH(CAST(header AS BLOB)) + COALESCE(LENGTH(reference), 0) FROM projects "
            "WHERE project_id = ?",
            (project_id,),
        ).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _examples_bytes_with(
        conn: sqlite3.Connection, project_id: str, except_key: str | None = None
    ) -> int:
        row = conn.execute(
            "SELECT COALESCE(SUM(LENGTH(CAST(payload AS BLOB))), 0) FROM examples "
            "WHERE project_id = ? AND example_key IS NOT ?",
            (project_id, except_key),
        ).fetchone()
        return int(row[0])

    def stored_bytes(self, project_id: str) -> int:
        """Bytes the project takes: state header, reference and stored examples."""
        try:
            conn = self._connection()
            return self._state_bytes_with(conn, project_id) + self._examples_bytes_with(
                conn, project_id
            )
        except sqlite3.Error as error:
            raise StoreError(f"state store {self.path}: {error}") from error

    def versions(self, project_id: str | None = None) -> list[dict]:
        """Version history, oldest first (of one project, or of all)."""
        if project_id is None:
            rows = self._read("SELECT project_id, entry FROM versions ORDER BY seq")
        else:
            rows = self._read(
                "SELECT project_id, entry FROM versions WHERE project_id = ? ORDER BY seq",
                (project_id,),
            )
        return [{"project_id": pid, **json.loads(entry)} for pid, entry in rows]

    def projects(self) -> list[str]:
        return [row[0] for row in self._read("SELECT project_id FROM projects ORDER BY project_id")]

    # --- examples -----------------------------------------------------------------------
    def put_example(self, project_id: str, key: str, payload: dict) -> None:
        """Store (or replace, keeping its place in the order) one example.

        Raises:
            StateTooLarge: the project would exceed ``max_project_bytes``.
        """
        text = json.dumps(payload)
        try:
            with self._transaction() as conn:
                if self.max_project_bytes is not None:
                    old = conn.execute(
                        "SELECT LENGTH(CAST(payload AS BLOB)) FROM examples "
                        "WHERE project_id = ? AND example_key = ?",
                        (project_id, key),
                    ).fetchone()
                    _check_room(
                        project_id,
                        self.max_project_bytes,
                        int(old[0]) if old else 0,
                        len(text.encode()),
                        lambda: (
                            self._state_bytes_with(conn, project_id)
                            + self._examples_bytes_with(conn, project_id, except_key=key)
                        ),
                    )
                conn.execute(
                    "INSERT INTO examples (project_id, example_key, payload) VALUES (?, ?, ?) "
                    "ON CONFLICT (project_id, example_key) DO UPDATE SET payload = excluded.payload",
                    (project_id, key, text),
                )
        except sqlite3.Error as error:
            raise StoreError(f"state store {self.path}: {error}") from error

    def delete_examples(self, project_id: str, keys: Iterable[str]) -> int:
        keys = list(keys)
        try:
            with self._transaction() as conn:
                return sum(
                    conn.execute(
                        "DELETE FROM examples WHERE project_id = ? AND example_key = ?",
                        (project_id, key),
                    ).rowcount
                    for key in keys
                )
        except sqlite3.Error as error:
            raise StoreError(f"state store {self.path}: {error}") from error

    def examples(self, project_id: str) -> dict[str, dict]:
        """The project's examples, in the order they were first received."""
        rows = self._read(
            "SELECT example_key, payload FROM examples WHERE project_id = ? ORDER BY seq",
            (project_id,),
        )
        return {key: json.loads(payload) for key, payload in rows}

    # --- locks --------------------------------------------------------------------------
    def acquire_lock(self, name: str, ttl: float) -> str | None:
        """A token if ``name`` was free (or its holder's ``ttl`` ran out), else ``None``."""
        token = uuid.uuid4().hex
        now = time.time()
        try:
            with self._transaction() as conn:
                # Every expired lock goes, not only this one: claims (``backend.prediction``)
                # name one lock per posted task, which nothing else would remove.
                conn.execute("DELETE FROM locks WHERE expires_at < ?", (now,))
                inserted = conn.execute(
                    "INSERT OR IGNORE INTO locks (name, token, expires_at) VALUES (?, ?, ?)",
                    (name, token, now + ttl),
                ).rowcount
        except sqlite3.Error as error:
            raise StoreError(f"state store {self.path}: {error}") from error
        return token if inserted else None

    @staticmethod
    def _holds(conn: sqlite3.Connection, name: str, token: str) -> bool:
        row = conn.execute(
            "SELECT 1 FROM locks WHERE name = ? AND token = ? AND expires_at >= ?",
            (name, token, time.time()),
        ).fetchone()
        return row is not None

    def extend_lock(self, name: str, token: str, ttl: float) -> bool:
        """Renew the lease of ``name`` for ``ttl`` seconds from now if ``token`` still holds it
        (unexpired); False when it does not (the holder must stop writing)."""
        now = time.time()
        try:
            with self._transaction() as conn:
                return (
                    conn.execute(
                        "UPDATE locks SET expires_at = ? "
                        "WHERE name = ? AND token = ? AND expires_at >= ?",
                        (now + ttl, name, token, now),
                    ).rowcount
                    == 1
                )
        except sqlite3.Error as error:
            raise StoreError(f"state store {self.path}: {error}") from error

    def release_lock(self, name: str, token: str | None = None) -> None:
        """Release ``name`` if ``token`` still holds it (any holder when ``token`` is None)."""
        try:
            with self._transaction() as conn:
                if token is None:
                    conn.execute("DELETE FROM locks WHERE name = ?", (name,))
                else:
                    conn.execute("DELETE FROM locks WHERE name = ? AND token = ?", (name, token))
        except sqlite3.Error as error:
            raise StoreError(f"state store {self.path}: {error}") from error

    def ping(self) -> None:
        self._read("SELECT 1")

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()
        self._local = threading.local()


# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------

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


class RedisStore:
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

    def update(
        self,
        project_id: str,
        change: StateChange,
        reason: str = "",
        fence: tuple[str, str] | None = None,
    ) -> ProjectState:
        """Optimistic read-modify-write: ``WATCH`` the key (and the ``fence`` lock), apply
        ``change``, ``MULTI``/``EXEC``; retried when another writer got there first.

        Raises:
            LockLost: ``fence`` is given and its lock is not held by its token.
            StateTooLarge: the project would exceed ``max_project_bytes``.
            StoreUnavailable: Redis cannot be reached; nothing was written.
        """
        key = self._key(project_id)
        watch_error = self._redis_module.exceptions.WatchError
        with self._errors(f"updating project {project_id}"):
            for _ in range(self.max_retries):
                with self.client.pipeline() as pipe:
                    try:
                        if fence is not None:
                            lock_key = self._lock_key(fence[0])
                            pipe.watch(key, lock_key)
                            if pipe.get(lock_key) != fence[1].encode():
                                raise _lock_lost(fence[0])
                        else:
                            pipe.watch(key)
                        current = self._load_with(pipe, project_id)
                        new = _apply(current, change)
                        if new is None:
                            return current
                        header = json.dumps(new.header())
                        if self.max_project_bytes is not None:
                            before = pipe.hstrlen(key, "header") + pipe.hstrlen(key, "reference")
                            _check_room(
                                project_id,
                                self.max_project_bytes,
                                before,
                                _state_bytes(header.encode(), new.reference),
                                lambda: self._examples_bytes(pipe, project_id),
                            )
                        pipe.multi()
                        pipe.hset(key, "header", header)
                        if new.reference is None:
                            pipe.hdel(key, "reference")
                        else:
                            pipe.hset(key, "reference", new.reference)
                        pipe.sadd(f"{self.namespace}:projects", project_id)
                        if new.model_version != current.model_version:
                            pipe.rpush(
                                self._key(project_id, "versions"),
                                json.dumps(_version_entry(new, reason)),
                            )
                        pipe.execute()
                        return new
                    except watch_error:
                        continue
            raise StoreError(
                f"project {project_id}: gave up after {self.max_retries} conflicting writes"
            )

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
                _check_room(
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

    def ping(self) -> None:
        with self._errors("pinging"):
            self.client.ping()

    def close(self) -> None:
        self.client.close()


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
