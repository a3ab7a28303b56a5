"""A small thread-safe metrics registry rendered in the Prometheus text format (version 0.0.4).

Counters and histograms are per process (each gunicorn worker reports its own; run one worker
with several threads, as the Dockerfile does, or sum across workers in Prometheus).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

LabelValues = tuple[str, ...]

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 100.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Iterable[str], values: Iterable[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Counter:
    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_text, label_names
        self._values: dict[LabelValues, float] = {}
        self._lock = threading.Lock()

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[label_values] = self._values.get(label_values, 0.0) + amount

    def value(self, *label_values: str) -> float:
        with self._lock:
            return self._values.get(label_values, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            for values, count in sorted(self._values.items()):
                lines.append(f"{self.name}{_labels(self.label_names, values)} {_number(count)}")
        return lines


class Histogram:
    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: tuple[str, ...] = (),
        buckets: tuple[float, ...] = DEFAULT_BUCKETS,
    ):
        self.name, self.help, self.label_names = name, help_text, label_names
        self.buckets = tuple(sorted(buckets))
        self._series: dict[LabelValues, tuple[list[int], float, int]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, *label_values: str) -> None:
        with self._lock:
            counts, total, n = self._series.get(label_values, ([0] * len(self.buckets), 0.0, 0))
            for index, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[index] += 1
            self._series[label_values] = (counts, total + value, n + 1)

    def count(self, *label_values: str) -> int:
        with self._lock:
            return self._series.get(label_values, ([], 0.0, 0))[2]

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            for values, (counts, total, n) in sorted(self._series.items()):
                for bound, count in zip(self.buckets, counts, strict=True):
                    labels = _labels(self.label_names, values, f'le="{_number(bound)}"')
                    lines.append(f"{self.name}_bucket{labels} {count}")
                labels = _labels(self.label_names, values, 'le="+Inf"')
                lines.append(f"{self.name}_bucket{labels} {n}")
                plain = _labels(self.label_names, values)
                lines.append(f"{self.name}_sum{plain} {_number(total)}")
                lines.append(f"{self.name}_count{plain} {n}")
        return lines


class Gauge:
    """A value read when the metrics are rendered (cache sizes, hit counts kept elsewhere)."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float], kind: str = "gauge"):
        self.name, self.help, self.read, self.kind = name, help_text, read, kind

    def render(self) -> list[str]:
        try:
            value = float(self.read())
        except Exception:  # a failing reader must not break /metrics
            return []
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} {self.kind}",
            f"{self.name} {_number(value)}",
        ]


class LabeledGauge:
    """Gauges set explicitly, one value per label combination (last training's figures)."""

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...]):
        self.name, self.help, self.label_names = name, help_text, label_names
        self._values: dict[LabelValues, float] = {}
        self._lock = threading.Lock()

    def set(self, *label_values: str, value: float) -> None:
        with self._lock:
            self._values[label_values] = float(value)

    def value(self, *label_values: str) -> float | None:
        with self._lock:
            return self._values.get(label_values)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        with self._lock:
            for values, value in sorted(self._values.items()):
                lines.append(f"{self.name}{_labels(self.label_names, values)} {_number(value)}")
        return lines


class Metrics:
    """The backend's metrics (names prefixed ``oneshot_``)."""

    def __init__(self) -> None:
        self.requests = Counter(
            "oneshot_http_requests_total", "HTTP requests by route and status.", ("route", "status")
        )
        self.latency = Histogram(
            "oneshot_http_request_seconds", "HTTP request latency by route.", ("route",)
        )
        self.tasks_predicted = Counter(
            "oneshot_tasks_predicted_total",
            "Tasks predicted, by outcome (ok, empty, error, deferred, no_reference).",
            ("outcome",),
        )
        self.task_seconds = Histogram(
            "oneshot_task_predict_seconds", "Seconds to download and segment one task."
        )
        self.trainings = Counter(
            "oneshot_trainings_total", "Trainings by outcome (ok, failed, skipped).", ("outcome",)
        )
        self.training_seconds = Histogram(
            "oneshot_training_seconds", "Duration of a training (reference build or learning)."
        )
        self.predictions_posted = Counter(
            "oneshot_background_predictions_total",
            "Predictions posted to Label Studio by background jobs, by outcome.",
            ("outcome",),
        )
        self.webhooks = Counter(
            "oneshot_webhook_events_total", "Webhook events by action.", ("action",)
        )
        self.last_training = LabeledGauge(
            "oneshot_last_training",
            "Figures of the project's last learning from corrections, by quantity (examples, "
            "shots, negatives, threshold, loss_before, loss_after, seconds).",
            ("project", "label", "quantity"),
        )
        self.gauges: list[Gauge] = []

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float], kind="gauge"):
        self.gauges.append(Gauge(name, help_text, read, kind))

    def render(self) -> str:
        lines: list[str] = []
        for metric in (
            self.requests,
            self.latency,
            self.tasks_predicted,
            self.task_seconds,
            self.trainings,
            self.training_seconds,
            self.predictions_posted,
            self.webhooks,
            self.last_training,
            *self.gauges,
        ):
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
