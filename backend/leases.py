"""Training leases and stall recovery: one training per project across processes, none lost.

The training lock is a *lease* of ``TRAIN_LOCK_TTL`` seconds (60 by default) that the training
renews every third of it (:class:`Lease`), and the training commits its result fenced by that
lease (a trainer that lost it writes nothing). Every request also records
``training_requested_at`` in the project's state, which a finished training clears. A request
that finds that mark older than one lease while nobody holds the lock knows the trainer died
(worker killed, machine lost) and starts the training again (:func:`resume_stalled_training`,
called by ``/predict`` and ``/setup``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from .store import ProjectState, StateStore, StoreError

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("backend.jobs")  # the log lines keep the name they always had

TRAIN_LOCK_WAIT = 1800.0
"""Seconds a training waits for the project's lease held by another trainer."""


def train_lock_name(project_id: str) -> str:
    return f"train:{project_id}"


class Lease:
    """A held store lock, renewed every third of ``ttl`` by a daemon thread until released.

    ``fence`` goes to fenced writes (``store.update(..., fence=lease.fence)``): once the lease is
    lost (not renewed in time, e.g. the store was unreachable for a whole ``ttl``, and maybe taken
    by another process), those writes are refused, so two trainers never both commit.
    """

    def __init__(self, store: StateStore, name: str, token: str, ttl: float):
        self.store, self.name, self.token, self.ttl = store, name, token, ttl
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name=f"lease-{name}", daemon=True)
        self._renewer.start()

    @property
    def fence(self) -> tuple[str, str]:
        return (self.name, self.token)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                renewed = self.store.extend_lock(self.name, self.token, self.ttl)
            except StoreError as error:
                # Keep trying: the lease may still be valid when the store comes back.
                log.warning("lock %s: could not renew its lease: %s", self.name, error)
                continue
            if not renewed:
                log.error("lock %s: lease lost; this holder's writes will be refused", self.name)
                self.lost.set()
                return

    def release(self) -> None:
        self._stop.set()
        self._renewer.join()
        try:
            self.store.release_lock(self.name, self.token)
        except StoreError as error:
            log.warning(
                "lock %s: could not release it (%s); it expires within %g s",
                self.name,
                error,
                self.ttl,
            )


def acquire_lease(store: StateStore, name: str, ttl: float, wait: float) -> Lease:
    """Wait (at most ``wait`` seconds) for the lock ``name`` and hold it as a :class:`Lease`.

    Raises:
        StoreError: the lock stayed held (renewed by a live holder) for ``wait`` seconds.
    """
    deadline = time.monotonic() + wait
    while True:
        token = store.acquire_lock(name, ttl)
        if token is not None:
            return Lease(store, name, token, ttl)
        if time.monotonic() > deadline:
            raise StoreError(f"lock {name} held by another process for over {wait:g} s")
        time.sleep(0.25)


def mark_training_requested(store: StateStore, project_id: str) -> None:
    """Record in the project's state that a training is due (cleared by the training)."""

    def change(state: ProjectState) -> ProjectState:
        state.training_requested_at = time.time()
        return state

    store.update(project_id, change, reason="training requested")


def lock_held(store: StateStore, name: str, probe_ttl: float = 1.0) -> bool:
    """Whether someone holds the store lock ``name`` right now (probes by taking it for at most
    ``probe_ttl`` seconds and giving it back)."""
    token = store.acquire_lock(name, probe_ttl)
    if token is None:
        return True
    store.release_lock(name, token)
    return False


def training_lock_free(store: StateStore, project_id: str) -> bool:
    """Whether nobody holds the project's training lease right now."""
    return not lock_held(store, train_lock_name(project_id), 5.0)


def resume_stalled_training(runtime: Runtime, state: ProjectState) -> bool:
    """Start again a training that was requested but never finished because its trainer died.

    A training is stalled when its request mark is older than one lease plus the debounce and
    neither this runner nor any lease holder is working on it. Re-requesting refreshes the mark,
    so a project whose trainings keep dying is retried once per lease, not on every request.
    Returns whether a training was requested. Never raises: a failing check only logs.
    """
    requested = state.training_requested_at
    if requested is None:
        return False
    settings = runtime.settings
    age = time.time() - requested
    if age < settings.train_lock_ttl + settings.train_debounce:
        return False
    try:
        if runtime.jobs.training_pending(state.project_id):
            return False
        if not training_lock_free(runtime.store, state.project_id):
            return False
        log.warning(
            "project %s: a training requested %.0f s ago never finished (its worker died?); "
            "starting it again",
            state.project_id,
            age,
        )
        runtime.jobs.request_training(state.project_id)
    except StoreError as error:
        log.warning("project %s: cannot resume its training now: %s", state.project_id, error)
        return False
    return True
