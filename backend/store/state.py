"""The state store's data model and contract (project state, keys, errors, the protocol both
stores implement, size accounting). Persistent per-project state shared by every worker.

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

import copy
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

log = logging.getLogger("backend.store")  # the name its log lines always had

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

    def close(self) -> None: ...


def apply_change(current: ProjectState, change: StateChange) -> ProjectState | None:
    """``change`` applied to a private copy of ``current``, revision and time stamped (None: no
    write)."""
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


def version_entry(state: ProjectState, reason: str) -> dict:
    """One ``/versions`` history entry."""
    return {"model_version": state.model_version, "created_at": state.updated_at, "reason": reason}


def state_bytes(header_json: str | bytes | None, reference: bytes | None) -> int:
    """Bytes a project's state counts against ``max_project_bytes``."""
    return len(header_json or b"") + len(reference or b"")


def check_room(
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


def lock_lost(name: str) -> LockLost:
    return LockLost(
        f"lock {name} is no longer held by this writer (its lease expired); nothing was written"
    )


class StateWrite(Protocol):
    """One store's view of a project inside a write transaction (see :class:`StoreBase`)."""

    def load(self) -> ProjectState:
        """The project's state as the transaction sees it."""

    def state_bytes(self) -> int:
        """Bytes of the project's state (header and reference) stored now."""

    def examples_bytes(self) -> int:
        """Bytes of the project's stored examples."""

    def write(self, state: ProjectState, header: str, version: dict | None) -> None:
        """Store ``state`` (its ``header`` JSON given) and append ``version`` to the history."""


class StoreBase:
    """What both stores share: :meth:`update`'s read-modify-write, on the transaction each
    store supplies (:meth:`_atomically`)."""

    max_project_bytes: int | None = None

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
            StoreUnavailable: the store cannot be reached; nothing was written.
            StoreError: the store failed (disk full, I/O error...); nothing was written.
        """

        def step(write: StateWrite) -> ProjectState:
            return write_state(write, project_id, change, reason, self.max_project_bytes)

        return self._atomically(project_id, fence, step)

    def _atomically(
        self,
        project_id: str,
        fence: tuple[str, str] | None,
        step: Callable[[StateWrite], ProjectState],
    ) -> ProjectState:
        """Run ``step`` in one write transaction of ``project_id`` (held only while ``fence``'s
        token holds its lock); what it writes is committed together or not at all."""
        raise NotImplementedError


def write_state(
    write: StateWrite, project_id: str, change: StateChange, reason: str, limit: int | None
) -> ProjectState:
    """The read-modify-write of :meth:`StoreBase.update` inside a transaction: ``change``
    applied, the byte cap checked, the state and a new version written."""
    current = write.load()
    new = apply_change(current, change)
    if new is None:
        return current
    header = json.dumps(new.header())
    if limit is not None:
        check_room(
            project_id,
            limit,
            write.state_bytes(),
            state_bytes(header.encode(), new.reference),
            write.examples_bytes,
        )
    changed = new.model_version != current.model_version
    write.write(new, header, version_entry(new, reason) if changed else None)
    return new
