"""OpenTelemetry traces and metrics for buttress (extra ``buttress[otel]``).

- :func:`traced` is a policy that opens a span per call. Put it outermost in a
  pipeline: the events emitted inside the call (retries, rejections, state changes,
  timeouts...) become span events, and the span ends with attributes summing them up
  (``buttress.attempts``, ``buttress.outcome``, ``buttress.circuit_breaker.state``...).
- :func:`instrument` turns on metrics (the buttress metric set: calls, failures,
  retries, rejections, durations, waits, breaker state, bulkhead occupancy, limiter
  tokens...), spans for saga runs, steps and compensations, and span events on
  whatever span is current when an event happens outside a ``traced`` call.

Only ``opentelemetry-api`` is needed at run time; the application configures the SDK
(providers, exporters), or passes its providers here.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from contextvars import ContextVar, Token
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
    from opentelemetry.trace import Span, Status, StatusCode, Tracer, TracerProvider
    from opentelemetry.util.types import AttributeValue
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "buttress.telemetry.otel needs opentelemetry-api: pip install 'buttress[otel]'"
    ) from exc

from buttress import events as _events
from buttress.clock import Clock
from buttress.exceptions import ConfigTypeError
from buttress.registry import Registry

from . import _metrics
from ._core import Installation, Measured, outcome_of

__all__ = ["Traced", "instrument", "traced"]

_log = logging.getLogger("buttress.telemetry")
_SCOPE = "buttress"


def _scope_version() -> str:
    try:
        from importlib.metadata import version

        return version("buttress")
    except Exception:  # pragma: no cover - running from a source tree without metadata
        return ""


_VERSION = _scope_version()
_EVENT_SKIPPED = frozenset({"kind", "severity", "time"})


def _event_attributes(event: _events.Event) -> dict[str, AttributeValue]:
    """The event's fields as span-event attributes (``None`` values left out)."""
    out: dict[str, AttributeValue] = {}
    for key, value in event.to_dict().items():
        if key in _EVENT_SKIPPED or value is None:
            continue
        label = "primitive" if key == "source" else key
        out[f"buttress.{label}"] = value  # type: ignore[assignment]  # to_dict: str/int/float/bool
    return out


def _error_status(error: BaseException) -> Status:
    return Status(StatusCode.ERROR, f"{type(error).__name__}: {error}")


# -- traced calls -------------------------------------------------------------------------------


class _CallRecord:
    """The span of one traced call and the events seen inside it.

    A record belongs to one call: its own thread or task (and the tasks that copy its
    context, such as hedged attempts). ``list.append`` keeps it consistent even so.
    """

    __slots__ = ("events", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.events: list[_events.Event] = []

    def observe(self, event: _events.Event) -> None:
        if self.span.is_recording():  # a sampled-out span: nothing to record
            self.events.append(event)
            self.span.add_event(event.kind, _event_attributes(event))

    def finish(self, error: BaseException | None) -> None:
        span = self.span
        if not span.is_recording():
            span.end()
            return
        attributes: dict[str, AttributeValue] = {
            "buttress.outcome": outcome_of(error),
            "buttress.attempts": 1,
        }
        attempts, hedges, waited = 1, 0, 0.0
        for event in list(self.events):
            if isinstance(event, _events.RetryScheduled):
                attempts += 1
            elif isinstance(event, _events.RetryGaveUp):
                attributes["buttress.retry.gave_up"] = event.reason
            elif isinstance(event, _events.CircuitStateChanged):
                attributes["buttress.circuit_breaker.state"] = event.new
            elif isinstance(event, _events.CallRejected):
                attributes["buttress.rejected.reason"] = event.reason
                if event.reason == "circuit_open":
                    attributes["buttress.circuit_breaker.state"] = "open"
            elif isinstance(event, _events.AcquiredAfterWait):
                waited += event.waited
            elif isinstance(event, _events.TimeoutFired):
                attributes["buttress.timeout.fired"] = True
            elif isinstance(event, _events.FallbackUsed):
                attributes["buttress.fallback.used"] = True
            elif isinstance(event, _events.HedgeLaunched):
                hedges += 1
        attributes["buttress.attempts"] = attempts
        if hedges:
            attributes["buttress.hedges"] = hedges
        if waited:
            attributes["buttress.waited"] = waited
        span.set_attributes(attributes)
        if error is not None and isinstance(error, Exception):
            span.record_exception(error, escaped=True)
            span.set_status(_error_status(error))
        span.end()


_current: ContextVar[_CallRecord | None] = ContextVar("buttress_traced_call", default=None)
_listener_lock = threading.Lock()


def _on_event(event: _events.Event) -> None:
    """The global listener of traced calls: events inside one go to its span."""
    record = _current.get()
    if record is not None:
        record.observe(event)


def _ensure_listener() -> None:
    with _listener_lock:
        if _on_event not in _events.hub.listeners:
            _events.subscribe(_on_event)


class _Open:
    __slots__ = ("current", "measuring", "otel_token", "record")

    def __init__(
        self,
        measuring: Any,
        record: _CallRecord | None = None,
        otel_token: Token[Any] | None = None,
        current: Token[_CallRecord | None] | None = None,
    ) -> None:
        self.measuring = measuring
        self.record = record
        self.otel_token = otel_token
        self.current = current


class Traced(Measured):
    """A span per call, plus the call metrics of :class:`~buttress.telemetry.Measured`.

    Build it with :func:`traced`.
    """

    kind = "traced"

    def __init__(
        self,
        name: str,
        *,
        tracer_provider: TracerProvider | None = None,
        attributes: Mapping[str, AttributeValue] | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(name, clock=clock)
        if attributes is not None and not isinstance(attributes, Mapping):
            raise ConfigTypeError(
                f"attributes must be a mapping of span attributes, got {attributes!r} "
                f"({type(attributes).__name__})"
            )
        self._tracer: Tracer = trace.get_tracer(_SCOPE, _VERSION, tracer_provider=tracer_provider)
        self._attributes: dict[str, AttributeValue] = {"buttress.call": self.name}
        if attributes:
            self._attributes.update(attributes)
        _ensure_listener()

    def _begin(self) -> _Open:
        state = _Open(super()._begin())
        span: Span | None = None
        try:
            # Exceptions are recorded in _end, where the outcome is known; the span
            # itself must never see (let alone swallow) the call's exception.
            span = self._tracer.start_span(
                self.name,
                attributes=self._attributes,
                record_exception=False,
                set_status_on_exception=False,
            )
            record = _CallRecord(span)
            state.otel_token = otel_context.attach(trace.set_span_in_context(span))
            state.current = _current.set(record)
            state.record = record
        except Exception:
            _log.exception("buttress telemetry: %r could not open its span", self)
            if state.otel_token is not None:
                otel_context.detach(state.otel_token)
                state.otel_token = None
            if span is not None:
                try:
                    span.end()
                except Exception:
                    _log.exception("buttress telemetry: %r could not end its span", self)
        return state

    def _end(self, state: _Open, error: BaseException | None) -> None:
        record = state.record
        if record is not None:
            try:
                if state.current is not None:
                    _current.reset(state.current)
                if state.otel_token is not None:
                    otel_context.detach(state.otel_token)
                record.finish(error)
            except Exception:
                _log.exception("buttress telemetry: %r could not close its span", self)
        super()._end(state.measuring, error)


def traced(
    name: str,
    *,
    tracer_provider: TracerProvider | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
    clock: Clock | None = None,
) -> Traced:
    """Open a span named ``name`` around each call (decorator, pipeline member or block).

    Put it first in a pipeline so the span covers the retries and the waits:
    ``pipeline(traced("payments"), retry(...), breaker)``. The span becomes the current
    span inside the call, and records each event emitted inside as a span event; when
    the call ends it gets ``buttress.outcome`` (success, failure, rejected, cancelled),
    ``buttress.attempts``, and when they happened ``buttress.retry.gave_up``,
    ``buttress.circuit_breaker.state``, ``buttress.rejected.reason``,
    ``buttress.timeout.fired``, ``buttress.fallback.used``, ``buttress.hedges`` and
    ``buttress.waited``. A call that raises gets an ERROR status and the exception.
    Like :func:`~buttress.telemetry.measured`, it also reports the call metrics when
    a metrics backend is installed.

    Args:
        name: the span name (also the ``name`` label of the call metrics).
        tracer_provider: the provider to use (default: the global one).
        attributes: extra attributes set on every span.
        clock: time source for the call metrics' durations (default: the system clock).
    """
    return Traced(name, tracer_provider=tracer_provider, attributes=attributes, clock=clock)


# -- saga spans ---------------------------------------------------------------------------------


def _close(span: Span, attributes: dict[str, AttributeValue], error: str | None) -> None:
    if attributes:
        span.set_attributes(attributes)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


class _SagaSpans:
    """Spans for saga runs, steps and compensations, opened and closed by saga events."""

    def __init__(self, tracer: Tracer, max_runs: int = 10_000) -> None:
        self._tracer = tracer
        self._max_runs = max_runs
        self._runs: OrderedDict[str, Span] = OrderedDict()
        self._children: dict[tuple[str, str, str], Span] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _attributes(event: _events.SagaEvent, step: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "buttress.saga.name": event.name or "",
            "buttress.saga.run_id": event.run_id,
        }
        if step is not None:
            out["buttress.saga.step"] = step
        return out

    def _child(self, event: _events.SagaEvent, role: str, step: str) -> None:
        with self._lock:
            parent = self._runs.get(event.run_id)
            stale = self._children.pop((event.run_id, role, step), None)
        if stale is not None:
            stale.end()
        context = None if parent is None else trace.set_span_in_context(parent)
        span = self._tracer.start_span(
            f"{role} {step}", context=context, attributes=self._attributes(event, step)
        )
        with self._lock:
            self._children[(event.run_id, role, step)] = span

    def _pop(self, event: _events.SagaEvent, role: str, step: str) -> Span | None:
        with self._lock:
            return self._children.pop((event.run_id, role, step), None)

    def observe(self, event: _events.SagaEvent) -> None:
        if isinstance(event, _events.RunStarted):
            self._start_run(event)
        elif isinstance(event, _events.RunReplayed):
            attributes = self._attributes(event)
            attributes.update(
                {
                    "buttress.saga.replayed": True,
                    "buttress.saga.key": event.key,
                    "buttress.saga.status": event.status,
                }
            )
            self._tracer.start_span(f"saga {event.name}", attributes=attributes).end()
        elif isinstance(event, _events.StepStarted):
            self._child(event, "step", event.step)
        elif isinstance(event, _events.CompensationStarted):
            self._child(event, "compensate", event.step)
        elif isinstance(event, _events.StepRetrying):
            with self._lock:
                running = self._children.get((event.run_id, "step", event.step))
            if running is not None:
                retry: dict[str, AttributeValue] = {"buttress.attempt": event.attempt}
                if event.error is not None:
                    retry["buttress.error"] = event.error
                running.add_event("step_retrying", retry)
        elif isinstance(event, _events.StepCompleted):
            self._end_child(event, "step", event.step, {"buttress.attempts": event.attempts})
        elif isinstance(event, _events.StepFailed):
            attributes = {"buttress.saga.uncertain": event.uncertain}
            self._end_child(event, "step", event.step, attributes, event.error or "failed")
        elif isinstance(event, _events.CompensationCompleted):
            self._end_child(event, "compensate", event.step, {})
        elif isinstance(event, _events.CompensationFailed):
            self._end_child(event, "compensate", event.step, {}, event.error or "failed")
        elif isinstance(event, _events.RunCompleted):
            self._end_run(event, {"buttress.saga.status": "completed"})
        elif isinstance(event, _events.RunFailed):
            attributes = {
                "buttress.saga.status": "failed",
                "buttress.saga.compensated": event.compensated,
            }
            self._end_run(event, attributes, event.error or "failed")

    def _start_run(self, event: _events.RunStarted) -> None:
        attributes = self._attributes(event)
        attributes["buttress.saga.resumed"] = event.resumed
        span = self._tracer.start_span(f"saga {event.name}", attributes=attributes)
        with self._lock:
            stale = self._runs.pop(event.run_id, None)
            self._runs[event.run_id] = span
            evicted = (
                self._runs.popitem(last=False)[1] if len(self._runs) > self._max_runs else None
            )
        for old in (stale, evicted):
            if old is not None:
                old.end()

    def _end_child(
        self,
        event: _events.SagaEvent,
        role: str,
        step: str,
        attributes: dict[str, AttributeValue],
        error: str | None = None,
    ) -> None:
        with self._lock:
            span = self._children.pop((event.run_id, role, step), None)
        if span is not None:
            _close(span, attributes, error)

    def _end_run(
        self,
        event: _events.SagaEvent,
        attributes: dict[str, AttributeValue],
        error: str | None = None,
    ) -> None:
        with self._lock:
            span = self._runs.pop(event.run_id, None)
            leftovers = [key for key in self._children if key[0] == event.run_id]
            orphans = [self._children.pop(key) for key in leftovers]
        for orphan in orphans:
            orphan.end()
        if span is not None:
            _close(span, attributes, error)

    def close(self) -> None:
        """End every span still open (at uninstall)."""
        with self._lock:
            spans = [*self._children.values(), *self._runs.values()]
            self._children.clear()
            self._runs.clear()
        for span in spans:
            span.end()


# -- metrics ------------------------------------------------------------------------------------


class _Instruments:
    """The instruments of the metric set on one meter, shared by the installs using it.

    OpenTelemetry meters cannot forget an instrument, and creating one again returns
    the first (with its callbacks): so the instruments live as long as their meter
    provider, and the gauges read the registries of the installs active at the time.
    """

    def __init__(self, meter: Meter) -> None:
        self.sources: tuple[_Source, ...] = ()
        self.lock = threading.Lock()
        self.by_metric: dict[str, Any] = {}
        for metric in _metrics.METRICS:
            if metric.kind == "counter":
                instrument: Any = meter.create_counter(metric.name, metric.unit, metric.description)
            elif metric.kind == "histogram":
                try:
                    instrument = meter.create_histogram(
                        metric.name,
                        metric.unit,
                        metric.description,
                        explicit_bucket_boundaries_advisory=_metrics.SECONDS_BUCKETS,
                    )
                except TypeError:  # pragma: no cover - opentelemetry-api < 1.23
                    instrument = meter.create_histogram(
                        metric.name, metric.unit, metric.description
                    )
            else:
                instrument = meter.create_observable_gauge(
                    metric.name, [self._gauge(metric)], metric.unit, metric.description
                )
            self.by_metric[metric.name] = instrument

    def _gauge(self, metric: _metrics.Metric) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            seen: set[int] = set()
            out: list[Observation] = []
            for source in self.sources:
                key = id(source.primitives)
                if key in seen:
                    continue
                seen.add(key)
                for reading in _metrics.observe_gauges(source.primitives, metric):
                    out.append(Observation(reading.value, reading.attributes()))
            return out

        return observe


class _Source:
    """One install's view: the metrics sink, and the registry its gauges read."""

    __slots__ = ("instruments", "primitives")

    def __init__(self, instruments: _Instruments, primitives: Registry | None) -> None:
        self.instruments = instruments
        self.primitives = primitives

    def record(self, measurements: Iterable[_metrics.Measurement]) -> None:
        by_metric = self.instruments.by_metric
        for metric, value, labels in measurements:
            instrument = by_metric[metric.name]
            attributes = dict(zip(metric.labels, labels, strict=True))
            if metric.kind == "counter":
                instrument.add(value, attributes)
            else:
                instrument.record(value, attributes)


_instruments: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
_instruments_lock = threading.Lock()


def _instruments_for(provider: MeterProvider | None) -> _Instruments:
    if provider is None:
        provider = otel_metrics.get_meter_provider()
    with _instruments_lock:
        found = _instruments.get(provider)
        if found is None:
            meter = otel_metrics.get_meter(_SCOPE, _VERSION, meter_provider=provider)
            found = _instruments[provider] = _Instruments(meter)
        return found


def instrument(
    *,
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
    primitives: Registry | None = None,
    metrics: bool = True,
    traces: bool = True,
) -> Installation:
    """Send buttress's metrics and saga spans to OpenTelemetry; returns the handle that stops it.

    Args:
        meter_provider: where the metrics go (default: the global provider).
        tracer_provider: where the spans go (default: the global provider).
        primitives: the registry whose primitives the gauges read (default: the default
            registry at the time of each reading).
        metrics: record the metric set (counters and histograms from events and from
            ``measured``/``traced`` calls; gauges from the primitives' snapshots).
        traces: open spans for saga runs, steps and compensations, and add events that
            happen outside a ``traced`` call as span events to the current span.
    """
    if primitives is not None and not isinstance(primitives, Registry):
        raise ConfigTypeError(
            f"primitives must be a buttress.Registry, got {primitives!r} "
            f"({type(primitives).__name__})"
        )
    for label, flag in (("metrics", metrics), ("traces", traces)):
        if not isinstance(flag, bool):
            raise ConfigTypeError(f"{label} must be True or False, got {flag!r}")

    source: _Source | None = None
    mapper = _metrics.EventMapper()
    if metrics:
        instruments = _instruments_for(meter_provider)
        source = _Source(instruments, primitives)
    sagas: _SagaSpans | None = None
    if traces:
        sagas = _SagaSpans(trace.get_tracer(_SCOPE, _VERSION, tracer_provider=tracer_provider))

    def listener(event: _events.Event) -> None:
        if source is not None:
            source.record(mapper.measure(event))
        if sagas is not None:
            if isinstance(event, _events.SagaEvent):
                sagas.observe(event)
            elif _current.get() is None:  # inside a traced call, its own listener records it
                span = trace.get_current_span()
                if span.is_recording():
                    span.add_event(event.kind, _event_attributes(event))

    unsubscribe = _events.subscribe(listener)
    if source is not None:
        with source.instruments.lock:
            source.instruments.sources = (*source.instruments.sources, source)
        _metrics.sinks.add(source)

    def close() -> None:
        unsubscribe()
        if source is not None:
            _metrics.sinks.remove(source)
            with source.instruments.lock:
                source.instruments.sources = tuple(
                    item for item in source.instruments.sources if item is not source
                )
        if sagas is not None:
            sagas.close()

    return Installation(close, "otel")
