"""The backend's metrics on ``prometheus_client``, rendered in the Prometheus text format.

Counters and histograms are per process (each gunicorn worker reports its own; run one worker
with several threads, as the Dockerfile does, or sum across workers in Prometheus). The small
wrappers keep call sites short (label values in order: ``requests.inc(route, status)``) and let
tests read a value back.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client import Counter as _Counter
from prometheus_client import Gauge as _Gauge
from prometheus_client import Histogram as _Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# The *_created series would double the output; nothing here reads them.
disable_created_metrics()

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 100.0)


class _Series:
    """A labelled prometheus_client metric, called with label values in order."""

    def __init__(
        self, metric, registry: CollectorRegistry, name: str, label_names: tuple[str, ...]
    ):
        self._metric, self._registry, self.name, self.label_names = (
            metric,
            registry,
            name,
            label_names,
        )

    def _child(self, label_values: tuple[str, ...]):
        return self._metric.labels(*label_values) if label_values else self._metric

    def _sample(self, suffix: str, label_values: tuple[str, ...]) -> float | None:
        labels = dict(zip(self.label_names, label_values, strict=True))
        return self._registry.get_sample_value(self.name + suffix, labels)


class Counter(_Series):
    def __init__(
        self, registry: CollectorRegistry, name: str, help_text: str, label_names=()
    ) -> None:
        metric = _Counter(name, help_text, label_names, registry=registry)
        super().__init__(metric, registry, name, tuple(label_names))

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        self._child(label_values).inc(amount)

    def value(self, *label_values: str) -> float:
        return self._sample("", label_values) or 0.0


class Histogram(_Series):
    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        help_text: str,
        label_names=(),
        buckets: tuple[float, ...] = DEFAULT_BUCKETS,
    ) -> None:
        metric = _Histogram(name, help_text, label_names, registry=registry, buckets=buckets)
        super().__init__(metric, registry, name, tuple(label_names))

    def observe(self, value: float, *label_values: str) -> None:
        self._child(label_values).observe(value)

    def count(self, *label_values: str) -> int:
        return int(self._sample("_count", label_values) or 0)


class LabeledGauge(_Series):
    """Gauges set explicitly, one value per label combination (last training's figures)."""

    def __init__(
        self, registry: CollectorRegistry, name: str, help_text: str, label_names=()
    ) -> None:
        metric = _Gauge(name, help_text, label_names, registry=registry)
        super().__init__(metric, registry, name, tuple(label_names))

    def set(self, *label_values: str, value: float) -> None:
        self._child(label_values).set(float(value))

    def value(self, *label_values: str) -> float | None:
        return self._sample("", label_values)


class _ReadOnRender:
    """A collector of one value read when the metrics are rendered (cache sizes, hit counts kept
    elsewhere)."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float], kind: str):
        self.name, self.help, self.read, self.kind = name, help_text, read, kind

    def collect(self):
        try:
            value = float(self.read())
        except Exception:  # a failing reader must not break /metrics
            return []
        family = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        return [family(self.name, self.help, value=value)]


class Metrics:
    """The backend's metrics (names prefixed ``oneshot_``)."""

    def __init__(self) -> None:
        # One registry per Metrics (per runtime), not prometheus_client's global one: tests and
        # embedders build several runtimes in one process.
        self.registry = CollectorRegistry()
        self.requests = Counter(
            self.registry,
            "oneshot_http_requests_total",
            "HTTP requests by route and status.",
            ("route", "status"),
        )
        self.latency = Histogram(
            self.registry,
            "oneshot_http_request_seconds",
            "HTTP request latency by route.",
            ("route",),
        )
        self.tasks_predicted = Counter(
            self.registry,
            "oneshot_tasks_predicted_total",
            "Tasks predicted, by outcome (ok, empty, error, deferred, no_reference).",
            ("outcome",),
        )
        self.task_seconds = Histogram(
            self.registry,
            "oneshot_task_predict_seconds",
            "Seconds to download and segment one task.",
        )
        self.trainings = Counter(
            self.registry,
            "oneshot_trainings_total",
            "Trainings by outcome (ok, failed, skipped).",
            ("outcome",),
        )
        self.training_seconds = Histogram(
            self.registry,
            "oneshot_training_seconds",
            "Duration of a training (reference build or learning).",
        )
        self.predictions_posted = Counter(
            self.registry,
            "oneshot_background_predictions_total",
            "Predictions posted to Label Studio by background jobs, by outcome.",
            ("outcome",),
        )
        self.webhooks = Counter(
            self.registry, "oneshot_webhook_events_total", "Webhook events by action.", ("action",)
        )
        self.last_training = LabeledGauge(
            self.registry,
            "oneshot_last_training",
            "Figures of the project's last learning from corrections, by quantity (examples, "
            "shots, negatives, threshold, loss_before, loss_after, seconds).",
            ("project", "label", "quantity"),
        )

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float], kind="gauge"):
        """A value read when the metrics are rendered (``kind``: ``gauge`` or ``counter``)."""
        self.registry.register(_ReadOnRender(name, help_text, read, kind))

    def render(self) -> str:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry).decode()
