"""Prometheus metrics in its text exposition format: counters, gauges and histograms, thread-safe, no dependency.

The scheduler thread and the HTTP event loop both record here, hence the lock in each metric.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Counter:
    """A value that only goes up, per label combination."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._values: dict[tuple[str, ...], float] = {} if self.label_names else {(): 0.0}  # shown from the start
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add `amount` to the series with these labels."""
        key = tuple(str(labels[n]) for n in self.label_names)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        """The current value of one series (0 if never touched)."""
        return self._values.get(tuple(str(labels[n]) for n in self.label_names), 0.0)

    def samples(self) -> list[str]:
        """Exposition lines of every series."""
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge:
    """A value read when scraped, from a callback (running requests, KV-cache use, ...)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help, read

    def samples(self) -> list[str]:
        """One exposition line."""
        return [f"{self.name} {_number(self.read())}"]


class Histogram:
    """Observations counted into cumulative buckets, with their sum and count, per label combination."""

    kind = "histogram"

    def __init__(
        self, name: str, help: str, labels: Iterable[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS
    ) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self.buckets = (*sorted(buckets), math.inf)
        self._series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., sum, count
        if not self.label_names:
            self._series[()] = [0.0] * (len(self.buckets) + 2)
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        """Record one observation."""
        key = tuple(str(labels[n]) for n in self.label_names)
        with self._lock:
            s = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    s[i] += 1
            s[-2] += value
            s[-1] += 1

    def count(self, **labels: str) -> int:
        """How many observations one series holds."""
        s = self._series.get(tuple(str(labels[n]) for n in self.label_names))
        return int(s[-1]) if s else 0

    def samples(self) -> list[str]:
        """Bucket, sum and count lines of every series."""
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        lines = []
        for key, s in items:
            for bound, c in zip(self.buckets, s):
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {_number(c)}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(s[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {_number(s[-1])}")
        return lines


class Registry:
    """The metrics one server exposes at /metrics."""

    def __init__(self) -> None:
        self.metrics: list[Counter | Gauge | Histogram] = []

    def add(self, metric):
        """Register a metric and return it."""
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        out = []
        for m in self.metrics:
            out.append(f"# HELP {m.name} {m.help}")
            out.append(f"# TYPE {m.name} {m.kind}")
            out.extend(m.samples())
        return "\n".join(out) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """Sample lines of an exposition as {'name{labels}': value}: for tests and the benchmark."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
