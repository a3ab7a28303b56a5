"""The SQLite state store (one file in ``MODEL_DIR``; WAL journal, ``BEGIN IMMEDIATE`` writes)."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

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


class SQLiteStore(StoreBase):
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

    def _atomically(
        self,
        project_id: str,
        fence: tuple[str, str] | None,
        step: Callable[[StateWrite], ProjectState],
    ) -> ProjectState:
        """One ``BEGIN IMMEDIATE`` transaction (see :meth:`StoreBase.update`).

        Raises:
            StoreError: SQLite failed (disk full, I/O error...); nothing was written.
        """
        try:
            with self._transaction() as conn:
                if fence is not None and not self._holds(conn, *fence):
                    raise lock_lost(fence[0])
                return step(_SQLiteWrite(conn, project_id))
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
                    check_room(
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

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()
        self._local = threading.local()


class _SQLiteWrite:
    """A project's state inside a SQLite write transaction (:class:`StateWrite`)."""

    def __init__(self, conn: sqlite3.Connection, project_id: str):
        self.conn, self.project_id = conn, project_id

    def load(self) -> ProjectState:
        return SQLiteStore._load_with(self.conn, self.project_id)

    def state_bytes(self) -> int:
        return SQLiteStore._state_bytes_with(self.conn, self.project_id)

    def examples_bytes(self) -> int:
        return SQLiteStore._examples_bytes_with(self.conn, self.project_id)

    def write(self, state: ProjectState, header: str, version: dict | None) -> None:
        self.conn.execute(
            "INSERT INTO projects (project_id, header, reference) VALUES (?, ?, ?) "
            "ON CONFLICT (project_id) DO UPDATE SET header = excluded.header, "
            "reference = excluded.reference",
            (self.project_id, header, state.reference),
        )
        if version is not None:
            self.conn.execute(
                "INSERT INTO versions (project_id, entry) VALUES (?, ?)",
                (self.project_id, json.dumps(version)),
            )
