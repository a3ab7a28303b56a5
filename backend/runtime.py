"""The per-process runtime: settings, state store, background jobs, metrics, and the engine.

The engine (:class:`matcher_core.OneShotSegmenter`, i.e. SAM and the matching encoder) loads once
per process, lazily and thread-safely, on first use or from :meth:`Runtime.warm_up` (called at
``/setup`` so the first prediction does not pay for it). Requests never load models.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .health import ConnectionChecks, model_problem
from .jobs import Jobs, make_jobs
from .settings import Settings
from .store import StateStore, make_store
from .telemetry import Metrics

if TYPE_CHECKING:
    from matcher_core import OneShotSegmenter, Reference


log = logging.getLogger(__name__)


class Runtime:
    """Everything a request or a background job needs, built once per process."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore | None = None,
        jobs: Jobs | None = None,
        metrics: Metrics | None = None,
        segmenter: OneShotSegmenter | None = None,
    ):
        self.settings = settings
        self.store = store if store is not None else make_store(settings)
        self.metrics = metrics or Metrics()
        self._segmenter: OneShotSegmenter | None = segmenter
        self._segmenter_error: BaseException | None = None
        self._segmenter_lock = threading.Lock()
        self._loading = threading.Event()
        """Set while a load of the models is in progress."""
        self._inference = threading.BoundedSemaphore(settings.max_concurrent_inference)
        self._references: OrderedDict[tuple[str, str], Reference] = OrderedDict()
        self._references_lock = threading.Lock()
        self.started_at = time.time()
        self.connections = ConnectionChecks()
        """Cached checks that Label Studio accepts the backend's token (see ``backend.health``)."""
        self.jobs = jobs if jobs is not None else make_jobs(self)
        self.metrics.add_gauge(
            "oneshot_model_loaded", "1 once SAM and the encoder are loaded.", self._loaded_value
        )
        self.metrics.add_gauge(
            "oneshot_embedding_cache_hits_total",
            "Embedding cache hits (images whose features were reused).",
            lambda: self._segmenter.cache.hits if self._segmenter else 0,
            kind="counter",
        )
        self.metrics.add_gauge(
            "oneshot_embedding_cache_misses_total",
            "Embedding cache misses (encoder passes).",
            lambda: self._segmenter.cache.misses if self._segmenter else 0,
            kind="counter",
        )
        self.metrics.add_gauge(
            "oneshot_embedding_cache_bytes",
            "Bytes held by the embedding cache.",
            lambda: self._segmenter.cache.nbytes if self._segmenter else 0,
        )

    def _loaded_value(self) -> float:
        return 1.0 if self._segmenter is not None else 0.0

    # --- engine ------------------------------------------------------------------------
    @property
    def model_loaded(self) -> bool:
        return self._segmenter is not None

    @property
    def model_problem(self) -> str | None:
        """Why the models are not loaded, with the fix, after a failed load; else ``None``."""
        return None if self._segmenter is not None else model_problem(self._segmenter_error)

    def wait_for_models(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a load in progress; whether the models are loaded."""
        deadline = time.monotonic() + timeout_s
        while self._segmenter is None and self._loading.is_set():
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return self._segmenter is not None

    def segmenter(self) -> OneShotSegmenter:
        """The process's engine, loaded on first call (other callers wait for that load)."""
        if self._segmenter is not None:
            return self._segmenter
        with self._segmenter_lock:
            if self._segmenter is None:
                self._loading.set()
                try:
                    self._load_segmenter()
                finally:
                    self._loading.clear()
        return self._segmenter

    def _load_segmenter(self) -> None:
        """Load the engine (under the segmenter lock); a failure is kept for ``model_problem``
        and logged once, with the fix."""
        from matcher_core import OneShotSegmenter

        config = self.settings.segmenter_config()
        started = time.perf_counter()
        log.info(
            "loading models: SAM %s, encoder %s, mode %s, device %s",
            config.sam_type,
            config.encoder,
            config.mode,
            config.device,
        )
        try:
            self._segmenter = OneShotSegmenter(config)
        except BaseException as error:
            repeated = repr(error) == repr(self._segmenter_error)
            self._segmenter_error = error
            # Every use retries the load: the same failure is logged once, with the fix.
            log.log(
                logging.DEBUG if repeated else logging.ERROR,
                "%s",
                model_problem(error),
                exc_info=not repeated,
            )
            raise
        self._segmenter_error = None
        log.info(
            "models loaded on %s in %.1f s",
            self._segmenter.device,
            time.perf_counter() - started,
        )

    def warm_up(self) -> None:
        """Start loading the models in a background thread (no-op once loaded or loading)."""
        if self._segmenter is not None or self._loading.is_set():
            return

        def load() -> None:
            with contextlib.suppress(Exception):  # logged by segmenter(); retried on next use
                self.segmenter()

        threading.Thread(target=load, name="oneshot-warm-up", daemon=True).start()

    @contextlib.contextmanager
    def inference_slot(self) -> Iterator[None]:
        """Bounds how many images one process segments at once (memory)."""
        with self._inference:
            yield

    def reference(self, project_id: str, model_version: str, blob: bytes) -> Reference:
        """The deserialised reference of a project version (a small LRU: requests of the same
        version do not decode the blob again)."""
        from matcher_core import Reference

        key = (project_id, model_version)
        with self._references_lock:
            cached = self._references.get(key)
            if cached is not None:
                self._references.move_to_end(key)
                return cached
        reference = Reference.from_bytes(blob)
        with self._references_lock:
            self._references[key] = reference
            while len(self._references) > 16:
                self._references.popitem(last=False)
        return reference

    def close(self) -> None:
        self.jobs.shutdown()
        self.store.close()


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The process's runtime, built from the environment on first use."""
    global _runtime
    if _runtime is None:
        with _runtime_lock:
            if _runtime is None:
                _runtime = Runtime(Settings.from_env())
    return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    """Install ``runtime`` as the process's runtime (tests, RQ workers)."""
    global _runtime
    with _runtime_lock:
        _runtime = runtime
