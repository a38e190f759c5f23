"""The one definition of buttress's metric set, shared by every metrics backend.

A backend (OpenTelemetry, Prometheus) creates one instrument per :class:`Metric` in
:data:`METRICS` and implements :class:`Sink`. What to record comes from here only:

- :class:`EventMapper` turns each buttress event into measurements (retries,
  rejections, waits, saga runs...);
- :func:`call_measurements` turns one finished call of a ``measured``/``traced``
  policy into measurements (calls, failures, durations);
- :func:`observe_gauges` reads the gauges (breaker state, bulkhead occupancy,
  limiter tokens, running sagas) from the primitives' snapshots at collection time.

Label values are strings, in the order of the metric's ``labels``. An unnamed
primitive has the name ``""``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from buttress import events as _events
from buttress.registry import Registry, default_registry

__all__ = [
    "CALLS",
    "CALL_DURATION",
    "EVENTS",
    "FAILURES",
    "METRICS",
    "REJECTIONS",
    "RETRIES",
    "EventMapper",
    "Measurement",
    "Metric",
    "Sink",
    "call_measurements",
    "observe_gauges",
]

_log = logging.getLogger("buttress.telemetry")

#: Bucket bounds (seconds) of every duration histogram: 1 ms to 1 minute.
SECONDS_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric: its OpenTelemetry name, and the Prometheus name derived from it."""

    name: str  # OpenTelemetry name, dotted: "buttress.call.duration"
    kind: Literal["counter", "histogram", "gauge"]
    unit: str  # UCUM as OpenTelemetry wants it: "s", "{call}"
    description: str
    labels: tuple[str, ...]

    @property
    def prometheus_name(self) -> str:
        """``buttress_call_duration_seconds``; counters get ``_total`` from the client."""
        base = self.name.replace(".", "_")
        return f"{base}_seconds" if self.unit == "s" else base


CALLS = Metric(
    "buttress.calls",
    "counter",
    "{call}",
    "Calls through measured/traced policies, by outcome (success, failure, rejected, cancelled).",
    ("name", "outcome"),
)
FAILURES = Metric(
    "buttress.failures",
    "counter",
    "{call}",
    "Calls through measured/traced policies that raised, by exception type.",
    ("name", "error_type"),
)
CALL_DURATION = Metric(
    "buttress.call.duration",
    "histogram",
    "s",
    "Duration of calls through measured/traced policies, retries and waits included.",
    ("name", "outcome"),
)
RETRIES = Metric(
    "buttress.retries",
    "counter",
    "{retry}",
    "Retries scheduled by retry policies.",
    ("primitive", "name"),
)
RETRY_DELAY = Metric(
    "buttress.retry.delay",
    "histogram",
    "s",
    "Backoff delays before retries.",
    ("primitive", "name"),
)
REJECTIONS = Metric(
    "buttress.rejections",
    "counter",
    "{call}",
    "Calls refused before they ran (circuit open, bulkhead full, rate limited).",
    ("primitive", "name", "reason"),
)
WAIT_DURATION = Metric(
    "buttress.wait.duration",
    "histogram",
    "s",
    "Time spent waiting for a bulkhead slot or a rate-limit permit.",
    ("primitive", "name"),
)
EVENTS = Metric(
    "buttress.events",
    "counter",
    "{event}",
    "Every buttress event, by primitive and event kind.",
    ("primitive", "name", "event"),
)
SAGA_RUNS = Metric(
    "buttress.saga.runs",
    "counter",
    "{run}",
    "Finished saga runs, by status (completed, failed, replayed).",
    ("name", "status"),
)
SAGA_DURATION = Metric(
    "buttress.saga.duration",
    "histogram",
    "s",
    "Duration of saga runs (compensation included), by status.",
    ("name", "status"),
)
BREAKER_STATE = Metric(
    "buttress.circuit_breaker.state",
    "gauge",
    "1",
    "1 for the circuit breaker's current state (closed, open, half_open), 0 for the others.",
    ("name", "state"),
)
BULKHEAD_IN_FLIGHT = Metric(
    "buttress.bulkhead.in_flight",
    "gauge",
    "{call}",
    "Calls running inside the bulkhead.",
    ("name",),
)
BULKHEAD_QUEUED = Metric(
    "buttress.bulkhead.queued",
    "gauge",
    "{call}",
    "Calls waiting for a bulkhead slot.",
    ("name",),
)
LIMITER_TOKENS = Metric(
    "buttress.rate_limiter.tokens",
    "gauge",
    "{token}",
    "Permits the rate limiter could grant right now.",
    ("name",),
)
SAGA_RUNNING = Metric(
    "buttress.saga.running",
    "gauge",
    "{run}",
    "Saga runs in progress in this process.",
    ("name",),
)
SAGA_STUCK = Metric(
    "buttress.saga.stuck",
    "gauge",
    "{run}",
    "Saga runs whose compensation failed: an operator must look.",
    ("name",),
)

METRICS: tuple[Metric, ...] = (
    CALLS,
    FAILURES,
    CALL_DURATION,
    RETRIES,
    RETRY_DELAY,
    REJECTIONS,
    WAIT_DURATION,
    EVENTS,
    SAGA_RUNS,
    SAGA_DURATION,
    BREAKER_STATE,
    BULKHEAD_IN_FLIGHT,
    BULKHEAD_QUEUED,
    LIMITER_TOKENS,
    SAGA_RUNNING,
    SAGA_STUCK,
)

_BREAKER_STATES = ("closed", "open", "half_open")


class Measurement(NamedTuple):
    metric: Metric
    value: float
    labels: tuple[str, ...]

    def attributes(self) -> dict[str, str]:
        """The labels as a mapping of label name to value."""
        return dict(zip(self.metric.labels, self.labels, strict=True))


class Sink(Protocol):
    """A metrics backend: adds to counters and records into histograms."""

    def record(self, measurements: Iterable[Measurement]) -> None:
        """Apply ``measurements`` (a counter adds the value, a histogram records it)."""


# -- the active sinks, which measured/traced calls report to -----------------------------------


class _Sinks:
    """Installed metrics backends, kept as an immutable tuple so readers need no lock."""

    __slots__ = ("items", "lock")

    def __init__(self) -> None:
        self.items: tuple[Sink, ...] = ()
        self.lock = threading.Lock()

    def add(self, sink: Sink) -> None:
        with self.lock:
            self.items = (*self.items, sink)

    def remove(self, sink: Sink) -> None:
        with self.lock:
            self.items = tuple(item for item in self.items if item is not sink)


sinks = _Sinks()


def deliver(measurements: list[Measurement]) -> None:
    """Send ``measurements`` to every installed sink; a failing sink is logged and skipped."""
    for sink in sinks.items:
        try:
            sink.record(measurements)
        except Exception:
            _log.exception("buttress metrics sink %r failed", sink)


def call_measurements(
    name: str, outcome: str, duration: float, error: BaseException | None
) -> list[Measurement]:
    """What one finished call of a ``measured`` policy records."""
    out = [
        Measurement(CALLS, 1.0, (name, outcome)),
        Measurement(CALL_DURATION, duration, (name, outcome)),
    ]
    if error is not None and outcome in ("failure", "rejected"):
        out.append(Measurement(FAILURES, 1.0, (name, type(error).__qualname__)))
    return out


class EventMapper:
    """Turns events into measurements; remembers when saga runs started, for their duration.

    Args:
        max_runs: saga runs whose start it remembers at most (the oldest are forgotten
            first: a run that never finishes, say its process was killed, cannot grow it).
    """

    def __init__(self, max_runs: int = 10_000) -> None:
        self._starts: OrderedDict[str, float] = OrderedDict()
        self._max_runs = max_runs
        self._lock = threading.Lock()

    def measure(self, event: _events.Event) -> list[Measurement]:
        source, name = event.source, event.name or ""
        out = [Measurement(EVENTS, 1.0, (source, name, event.kind))]
        if isinstance(event, _events.RetryScheduled):
            out.append(Measurement(RETRIES, 1.0, (source, name)))
            out.append(Measurement(RETRY_DELAY, event.delay, (source, name)))
        elif isinstance(event, _events.CallRejected):
            out.append(Measurement(REJECTIONS, 1.0, (source, name, event.reason)))
        elif isinstance(event, _events.AcquiredAfterWait):
            out.append(Measurement(WAIT_DURATION, event.waited, (source, name)))
        elif isinstance(event, _events.RunStarted):
            with self._lock:
                self._starts[event.run_id] = event.time
                if len(self._starts) > self._max_runs:
                    self._starts.popitem(last=False)
        elif isinstance(event, (_events.RunCompleted, _events.RunFailed)):
            status = "completed" if isinstance(event, _events.RunCompleted) else "failed"
            with self._lock:
                started = self._starts.pop(event.run_id, None)
            out.append(Measurement(SAGA_RUNS, 1.0, (name, status)))
            if started is not None:
                out.append(
                    Measurement(SAGA_DURATION, max(event.time - started, 0.0), (name, status))
                )
        elif isinstance(event, _events.RunReplayed):
            out.append(Measurement(SAGA_RUNS, 1.0, (name, "replayed")))
        return out


_GAUGE_KINDS = {
    BREAKER_STATE: "circuit_breaker",
    BULKHEAD_IN_FLIGHT: "bulkhead",
    BULKHEAD_QUEUED: "bulkhead",
    LIMITER_TOKENS: "rate_limiter",
    SAGA_RUNNING: "saga",
    SAGA_STUCK: "saga",
}


def observe_gauges(
    primitives: Registry | None = None, only: Metric | None = None
) -> Iterator[Measurement]:
    """The gauges (or only the gauge ``only``), read from the primitives' snapshots.

    ``primitives`` is the registry to read; ``None`` means the default registry *at the
    time of the reading*. A primitive whose snapshot fails is logged and skipped.
    """
    registry = default_registry() if primitives is None else primitives
    kinds = set(_GAUGE_KINDS.values()) if only is None else {_GAUGE_KINDS[only]}
    for primitive in registry:
        kind = primitive.kind
        if kind not in kinds:
            continue
        name = primitive.name or ""
        try:
            snap = primitive.snapshot()
        except Exception:
            _log.exception("snapshot of %r failed while reading buttress gauges", primitive)
            continue
        if kind == "circuit_breaker":
            for state in _BREAKER_STATES:
                value = 1.0 if snap["state"] == state else 0.0
                yield Measurement(BREAKER_STATE, value, (name, state))
        else:
            fields = {
                "bulkhead": ((BULKHEAD_IN_FLIGHT, "in_flight"), (BULKHEAD_QUEUED, "queued")),
                "rate_limiter": ((LIMITER_TOKENS, "tokens"),),
                "saga": ((SAGA_RUNNING, "running"), (SAGA_STUCK, "stuck")),
            }[kind]
            for metric, key in fields:
                if only is None or metric is only:
                    yield Measurement(metric, float(snap[key]), (name,))
