"""Background work: trainings (one per project at a time, bursts coalesced) and predictions of
batches too long for Label Studio's 100 s timeout, posted to its API.

Two runners with one interface (:class:`Jobs`):

* :class:`ThreadJobs` (default): threads inside the web process;
* :class:`RQJobs` (when ``REDIS_URL`` is set, unless ``JOBS=thread``): jobs go to a Redis queue and
  run on RQ workers (``rq worker -u $REDIS_URL oneshot``), possibly on several GPU machines.

Coalescing: a training request sets a per-project *requested* flag; only the request that sets it
starts (or enqueues) a training. That training waits ``TRAIN_DEBOUNCE`` seconds, clears the flag,
then trains on everything stored at that moment. Requests arriving during the training set the
flag again and cause exactly one more training: a burst of N events gives 1-2 trainings.
A store lock (``train:<project>``) keeps trainings of one project sequential across processes.

Nothing lost when a trainer dies: the training lock is a *lease* of ``TRAIN_LOCK_TTL`` seconds
(60 by default) that the training renews every third of it (:class:`Lease`), and the training
commits its result fenced by that lease (a trainer that lost it writes nothing). Every request
also records ``training_requested_at`` in the project's state, which a finished training clears.
A request that finds that mark older than one lease while nobody holds the lock knows the
trainer died (worker killed, machine lost) and starts the training again
(:func:`backend.leases.resume_stalled_training`, called by ``/predict`` and ``/setup``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

from labelstudio.redaction import redact_url

from . import background
from .leases import lock_held, mark_training_requested
from .store import StateStore, StoreUnavailable

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger(__name__)

QUEUE_NAME = "oneshot"
# RQ runs jobs by dotted name (:mod:`backend.rq_worker` needs the runtime, which builds these).
RQ_TRAIN = "backend.rq_worker.rq_train"
RQ_RETRY_TRAINING = "backend.rq_worker.rq_retry_training"
RQ_PREDICT = "backend.rq_worker.rq_predict"
"""Seconds a training waits at most for another, live, training of the same project."""
PREDICT_CHUNK = 16
"""Tasks per background prediction job (several RQ workers share a long batch)."""


class Jobs(Protocol):
    """Where background work goes."""

    description: str

    def request_training(self, project_id: str, full: bool = False) -> None:
        """Ask for a training of ``project_id`` (``full``: refetch all annotations from Label
        Studio and rebuild from scratch). Returns at once; coalesced with other requests."""

    def submit_predictions(self, project_id: str, tasks: list[dict]) -> list[str]:
        """Predict ``tasks`` in the background and post the predictions to Label Studio;
        returns job ids."""

    def retry_training_later(self, project_id: str, delay: float) -> None:
        """Request a training of ``project_id`` in ``delay`` seconds (annotations that could
        not be loaded yet are tried again then)."""

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job is queued or running (tests); False on timeout."""

    def training_pending(self, project_id: str) -> bool:
        """Whether this runner already has a training of ``project_id`` queued or running."""

    def shutdown(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Coalescing flags, shared by every process on the store
# ---------------------------------------------------------------------------------------------

FLAG_TTL = 86400.0
"""Seconds a raised flag lasts at most (one whose clearing was lost clears itself)."""


@dataclass(frozen=True)
class StoreFlag:
    """A named flag on the state store, seen by every process and machine on it.

    Kept as a store lock, the store's one atomic set-if-clear: the flag is set while its lock
    is held. Only the set/clear/test operations below touch that lock.
    """

    store: StateStore
    name: str

    def set(self) -> bool:
        """Set the flag; whether this call set it (False: it was set already)."""
        return self.store.acquire_lock(self.name, FLAG_TTL) is not None

    def clear(self) -> None:
        self.store.release_lock(self.name)

    def is_set(self) -> bool:
        """Whether the flag is set (tested by setting it briefly when clear)."""
        return lock_held(self.store, self.name)

    def pop(self) -> bool:
        """Whether the flag was set; clears it."""
        probe = self.store.acquire_lock(self.name, 1.0)
        self.store.release_lock(self.name)
        return probe is None


def training_requested(store: StateStore, project_id: str) -> StoreFlag:
    """Set from a training's enqueue until its job starts: later requests ride on that job."""
    return StoreFlag(store, f"train-requested:{project_id}")


def full_training_requested(store: StateStore, project_id: str) -> StoreFlag:
    """Set by a ``START_TRAINING`` request until the next training job takes it."""
    return StoreFlag(store, f"train-full:{project_id}")


# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------


@dataclass
class _TrainSlot:
    running: bool = False
    requested: bool = False
    full: bool = False


class ThreadJobs:
    """Background threads in the current process."""

    description = "threads"

    def __init__(
        self,
        runtime: Runtime,
        debounce: float,
        train: Callable[[str, bool], None] | None = None,
        predict: Callable[[str, list[dict]], None] | None = None,
    ):
        self.runtime = runtime
        self.debounce = debounce
        self._train = train or (
            lambda pid, full: background.train_with_project_lock(runtime, pid, full)
        )
        self._predict = predict or (
            lambda pid, tasks: background.predict_and_post(runtime, pid, tasks)
        )
        self._slots: dict[str, _TrainSlot] = {}
        self._lock = threading.Condition()
        self._pending_predictions = 0
        self._predict_pool = ThreadPoolExecutor(1, thread_name_prefix="oneshot-predict")
        self._retries: dict[str, threading.Timer] = {}

    def request_training(self, project_id: str, full: bool = False) -> None:
        mark_training_requested(self.runtime.store, project_id)
        with self._lock:
            slot = self._slots.setdefault(project_id, _TrainSlot())
            slot.requested = True
            slot.full = slot.full or full
            if slot.running:
                return  # the running loop trains once more after its current pass
            slot.running = True
        threading.Thread(
            target=self._train_loop,
            args=(project_id,),
            name=f"oneshot-train-{project_id}",
            daemon=True,
        ).start()

    def retry_training_later(self, project_id: str, delay: float) -> None:
        with self._lock:
            previous = self._retries.pop(project_id, None)
            if previous is not None:
                previous.cancel()  # one pending retry per project: the latest delay counts
            timer = threading.Timer(delay, self._retry, args=(project_id,))
            timer.daemon = True
            timer.name = f"oneshot-retry-{project_id}"
            self._retries[project_id] = timer
        timer.start()

    def _retry(self, project_id: str) -> None:
        with self._lock:
            self._retries.pop(project_id, None)
        try:
            self.request_training(project_id)
        except Exception:  # a timer thread has nobody to raise to
            log.exception("retrying the training of project %s failed", project_id)

    def _train_loop(self, project_id: str) -> None:
        while True:
            time.sleep(self.debounce)  # let a burst of events arrive: they train together
            with self._lock:
                slot = self._slots[project_id]
                if not slot.requested:
                    slot.running = False
                    self._lock.notify_all()
                    return
                full, slot.full, slot.requested = slot.full, False, False
            try:
                self._train(project_id, full)
            except Exception:
                log.exception("training of project %s failed", project_id)

    def submit_predictions(self, project_id: str, tasks: list[dict]) -> list[str]:
        ids = []
        for start in range(0, len(tasks), PREDICT_CHUNK):
            chunk = tasks[start : start + PREDICT_CHUNK]
            with self._lock:
                self._pending_predictions += 1
            self._predict_pool.submit(self._run_prediction, project_id, chunk)
            ids.append(f"thread-{uuid.uuid4().hex[:12]}")
        return ids

    def _run_prediction(self, project_id: str, tasks: list[dict]) -> None:
        try:
            self._predict(project_id, tasks)
        except Exception:
            log.exception("background prediction for project %s failed", project_id)
        finally:
            with self._lock:
                self._pending_predictions -= 1
                self._lock.notify_all()

    def training_pending(self, project_id: str) -> bool:
        with self._lock:
            slot = self._slots.get(project_id)
            return slot is not None and slot.running

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending_predictions > 0 or any(s.running for s in self._slots.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def shutdown(self) -> None:
        with self._lock:
            for timer in self._retries.values():
                timer.cancel()
            self._retries.clear()
        self._predict_pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# RQ
# ---------------------------------------------------------------------------------------------


class RQJobs:
    """Jobs in a Redis queue, run by ``rq worker`` processes."""

    def __init__(self, runtime: Runtime, redis_url: str, queue_name: str = QUEUE_NAME):
        import redis
        from rq import Queue

        self.runtime = runtime
        self.redis_url = redis_url
        self.connection = redis.Redis.from_url(
            redis_url, socket_connect_timeout=3, socket_timeout=10
        )
        self.queue = Queue(queue_name, connection=self.connection, default_timeout=3600)
        self.description = f"rq queue {queue_name!r}"

    @contextlib.contextmanager
    def _queue_errors(self, what: str) -> Iterator[None]:
        """Redis failures of the queue as :class:`StoreUnavailable` (a 503 with the reason)."""
        import redis

        try:
            yield
        except redis.exceptions.RedisError as error:
            raise StoreUnavailable(
                f"job queue at {redact_url(self.redis_url)} is unreachable while {what} ({error})"
            ) from error

    def request_training(self, project_id: str, full: bool = False) -> None:
        store = self.runtime.store
        mark_training_requested(store, project_id)
        if full:
            full_training_requested(store, project_id).set()
        # Only the request that sets the flag enqueues; the others ride on that job.
        requested = training_requested(store, project_id)
        if not requested.set():
            return
        try:
            with self._queue_errors("queueing a training"):
                self.queue.enqueue(
                    RQ_TRAIN, project_id, job_id=f"train-{project_id}-{uuid.uuid4().hex[:12]}"
                )
        except Exception:
            requested.clear()
            raise

    def retry_training_later(self, project_id: str, delay: float) -> None:
        # Scheduled jobs need a worker started with --with-scheduler (docker-compose.yml).
        with self._queue_errors("scheduling a training retry"):
            self.queue.enqueue_in(
                timedelta(seconds=delay),
                RQ_RETRY_TRAINING,
                project_id,
                job_id=f"retry-{project_id}-{uuid.uuid4().hex[:12]}",
            )

    def training_pending(self, project_id: str) -> bool:
        # The requested flag is set from the enqueue until the job starts.
        return training_requested(self.runtime.store, project_id).is_set()

    def submit_predictions(self, project_id: str, tasks: list[dict]) -> list[str]:
        ids = []
        with self._queue_errors("queueing background predictions"):
            for start in range(0, len(tasks), PREDICT_CHUNK):
                job = self.queue.enqueue(
                    RQ_PREDICT,
                    project_id,
                    tasks[start : start + PREDICT_CHUNK],
                    job_id=f"predict-{project_id}-{uuid.uuid4().hex[:12]}",
                )
                ids.append(job.id)
        return ids

    def wait_idle(self, timeout: float) -> bool:
        from rq.registry import StartedJobRegistry

        deadline = time.monotonic() + timeout
        started = StartedJobRegistry(queue=self.queue)
        while self.queue.count or started.count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def shutdown(self) -> None:
        self.connection.close()


def make_jobs(runtime: Runtime) -> Jobs:
    """RQ when ``REDIS_URL`` is set (unless ``JOBS=thread``), else threads."""
    settings = runtime.settings
    if settings.jobs == "rq" and settings.redis_url:
        jobs: Jobs = RQJobs(runtime, settings.redis_url)
    else:
        jobs = ThreadJobs(runtime, settings.train_debounce)
    log.info("background jobs: %s", jobs.description)
    return jobs
