"""OpenTelemetry: traced() spans, saga spans and the metric set, against the real SDK."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import buttress
from buttress import (
    Bulkhead,
    CircuitBreaker,
    CircuitOpenError,
    RateLimiter,
    Saga,
    fallback,
    hedge,
    pipeline,
    retry,
    timeout,
)
from buttress.telemetry import Installation, measured, otel
from buttress.testing import FakeClock


class OTel:
    """An SDK tracer provider and meter provider that keep everything in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def span(self, name: str) -> ReadableSpan:
        (found,) = [span for span in self.spans() if span.name == name]
        return found

    def points(self, metric: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        """Data points of ``metric`` keyed by their sorted attributes (value, or the
        histogram point itself)."""
        data = self.reader.get_metrics_data()
        out: dict[tuple[tuple[str, Any], ...], Any] = {}
        if data is None:
            return out
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for found in scope.metrics:
                    if found.name != metric:
                        continue
                    for point in found.data.data_points:
                        key = tuple(sorted(dict(point.attributes or {}).items()))
                        out[key] = getattr(point, "value", point)
        return out

    def tracer(self) -> trace.Tracer:
        return self.tracer_provider.get_tracer("tests")

    def close(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def sdk() -> Iterator[OTel]:
    """In-memory OpenTelemetry providers."""
    providers = OTel()
    yield providers
    providers.close()


@pytest.fixture
def installed(sdk: OTel) -> Iterator[OTel]:
    """The providers, with otel.instrument() on them."""
    with otel.instrument(meter_provider=sdk.meter_provider, tracer_provider=sdk.tracer_provider):
        yield sdk


def key(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


# -- traced calls ---------------------------------------------------------------------------


def test_traced_call_records_retries_as_span_events(face, flaky, sdk):
    """One span per call; retries inside become span events; attempts on the span."""
    clock = FakeClock()
    behaviour = flaky(ConnectionError("down"), ConnectionError("down"), value="paid")
    policy = pipeline(
        otel.traced("payments", tracer_provider=sdk.tracer_provider, clock=clock),
        retry(3, backoff=[0.5], clock=clock),
    )
    assert face.wrap(policy, behaviour)() == "paid"
    span = sdk.span("payments")
    assert span.attributes is not None
    assert span.attributes["buttress.outcome"] == "success"
    assert span.attributes["buttress.attempts"] == 3
    assert span.attributes["buttress.call"] == "payments"
    assert [event.name for event in span.events] == [
        "retry_scheduled",
        "retry_scheduled",
        "retry_recovered",
    ]
    first = span.events[0].attributes
    assert first is not None
    assert first["buttress.attempt"] == 1
    assert first["buttress.delay"] == 0.5
    assert first["buttress.error"] == "ConnectionError: down"
    assert first["buttress.primitive"] == "retry"
    assert span.status.status_code is StatusCode.UNSET


def test_traced_failure_sets_error_status_and_reraises_the_same_exception(face, sdk):
    """A failing call: ERROR status, the exception recorded, the very same object raised."""
    error = ValueError("bad input")

    def fail() -> None:
        raise error

    protected = face.wrap(otel.traced("parse", tracer_provider=sdk.tracer_provider), fail)
    with pytest.raises(ValueError) as caught:
        protected()
    assert caught.value is error
    span = sdk.span("parse")
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError: bad input"
    assert span.attributes is not None and span.attributes["buttress.outcome"] == "failure"
    assert [event.name for event in span.events] == ["exception"]


def test_traced_rejection_names_the_breaker_state(face, sdk):
    """An open breaker's rejection: outcome rejected, breaker state open, the reason."""
    clock = FakeClock()
    breaker = CircuitBreaker("pricing", failure_threshold=1, reset_timeout=30, clock=clock)
    breaker.open()
    protected = face.wrap(
        pipeline(otel.traced("price", tracer_provider=sdk.tracer_provider), breaker), lambda: 1
    )
    with pytest.raises(CircuitOpenError):
        protected()
    span = sdk.span("price")
    assert span.attributes is not None
    assert span.attributes["buttress.outcome"] == "rejected"
    assert span.attributes["buttress.circuit_breaker.state"] == "open"
    assert span.attributes["buttress.rejected.reason"] == "circuit_open"
    assert [event.name for event in span.events] == ["call_rejected", "exception"]


def test_traced_span_records_breaker_transitions_and_give_ups(face, sdk):
    """A call that exhausts its retries and opens the breaker says so on its span."""
    clock = FakeClock()
    breaker = CircuitBreaker("stock", failure_threshold=2, clock=clock)
    protected = face.wrap(
        pipeline(
            otel.traced("stock", tracer_provider=sdk.tracer_provider),
            retry(2, on=ConnectionError, backoff=[0.1], clock=clock),
            breaker,
        ),
        lambda: (_ for _ in ()).throw(ConnectionError("down")),
    )
    with pytest.raises(ConnectionError):
        protected()
    attributes = sdk.span("stock").attributes
    assert attributes is not None
    assert attributes["buttress.attempts"] == 2
    assert attributes["buttress.retry.gave_up"] == "attempts"
    assert attributes["buttress.circuit_breaker.state"] == "open"


def test_traced_span_is_current_inside_the_call(face, sdk):
    """Spans the function opens are children of the traced span."""
    tracer = sdk.tracer()

    def work() -> str:
        with tracer.start_as_current_span("inner"):
            return "done"

    protected = face.wrap(otel.traced("outer", tracer_provider=sdk.tracer_provider), work)
    with tracer.start_as_current_span("request"):
        assert protected() == "done"
    inner, outer, request = sdk.span("inner"), sdk.span("outer"), sdk.span("request")
    assert inner.parent is not None and inner.parent.span_id == outer.context.span_id
    assert outer.parent is not None and outer.parent.span_id == request.context.span_id
    assert trace.get_current_span() is trace.INVALID_SPAN  # the context was restored


def test_traced_guards_blocks_sync_and_async(sdk):
    """`with traced(...)` and `async with` open and close a span, exceptions untouched."""
    block = otel.traced("block", tracer_provider=sdk.tracer_provider)
    with block:
        pass
    with pytest.raises(KeyError), block:
        raise KeyError("k")

    async def guarded() -> None:
        async with block:
            await asyncio.sleep(0)

    asyncio.run(guarded())
    outcomes = [span.attributes["buttress.outcome"] for span in sdk.spans() if span.attributes]
    assert outcomes == ["success", "failure", "success"]


def test_traced_pipeline_as_a_block(sdk):
    """A pipeline with traced outermost can guard a block too."""
    clock = FakeClock()
    guard = pipeline(
        otel.traced("block", tracer_provider=sdk.tracer_provider),
        CircuitBreaker(clock=clock),
    )
    with guard:
        pass
    assert [span.name for span in sdk.spans()] == ["block"]


def test_traced_hedge_events_from_hedged_tasks():
    """Events emitted by hedged attempts (their own tasks) reach the call's span."""
    providers = OTel()
    clock = FakeClock()
    durations = iter([10.0, 1.0])

    @pipeline(
        otel.traced("query", tracer_provider=providers.tracer_provider), hedge(0.5, clock=clock)
    )
    async def query() -> str:
        await clock.asleep(next(durations))
        return "ok"

    assert asyncio.run(query()) == "ok"
    attributes = providers.span("query").attributes
    assert attributes is not None and attributes["buttress.hedges"] == 1
    providers.close()


def test_traced_records_timeouts_and_fallbacks(sdk):
    """A timeout replaced by a fallback is a success that says what happened."""
    clock = FakeClock()

    @pipeline(
        otel.traced("slow", tracer_provider=sdk.tracer_provider),
        fallback("cached"),
        timeout(1, clock=clock),
    )
    async def slow() -> str:
        await clock.asleep(5)
        return "fresh"

    assert asyncio.run(slow()) == "cached"
    attributes = sdk.span("slow").attributes
    assert attributes is not None
    assert attributes["buttress.timeout.fired"] is True
    assert attributes["buttress.fallback.used"] is True
    assert attributes["buttress.outcome"] == "success"


def test_traced_waits_are_summed(sdk):
    """A permit obtained after a wait adds buttress.waited."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, per=10, clock=clock)
    limiter.acquire()
    protected = pipeline(otel.traced("wait", tracer_provider=sdk.tracer_provider), limiter)(
        lambda: "ok"
    )
    assert protected() == "ok"
    attributes = sdk.span("wait").attributes
    assert attributes is not None and attributes["buttress.waited"] == pytest.approx(10.0)


def test_traced_validation():
    """traced() needs a name, and attributes must be a mapping."""
    with pytest.raises(buttress.ConfigTypeError, match="needs a name"):
        otel.traced(None)  # type: ignore[arg-type]
    with pytest.raises(buttress.ConfigValueError, match="name must not be empty"):
        otel.traced(" ")
    with pytest.raises(buttress.ConfigTypeError, match="attributes must be a mapping"):
        otel.traced("x", attributes=[("a", 1)])  # type: ignore[arg-type]


def test_traced_extra_attributes(sdk):
    """attributes= are set on every span."""
    protected = otel.traced(
        "tagged", tracer_provider=sdk.tracer_provider, attributes={"peer.service": "bank"}
    )(lambda: None)
    protected()
    attributes = sdk.span("tagged").attributes
    assert attributes is not None and attributes["peer.service"] == "bank"


# -- events outside traced calls ------------------------------------------------------------


def test_instrument_adds_events_to_the_current_span(installed):
    """With instrument(), events outside traced calls land on whatever span is current."""
    clock = FakeClock()
    calls = []

    @retry(2, backoff=[0.1], clock=clock)
    def flaky_call() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("once")
        return "ok"

    with installed.tracer().start_as_current_span("request"):
        assert flaky_call() == "ok"
    assert [event.name for event in installed.span("request").events] == [
        "retry_scheduled",
        "retry_recovered",
    ]


# -- sagas ----------------------------------------------------------------------------------


def make_saga(clock: FakeClock, *, fail: str | None = None, undo_fails: bool = False) -> Saga:
    saga = Saga("checkout", clock=clock)

    def release(ctx: Any) -> None:
        if undo_fails:
            raise RuntimeError("warehouse unreachable")

    @saga.step("reserve", compensate=release, compensate_retry=retry(1, clock=clock))
    def reserve(ctx: Any) -> str:
        return "held"

    attempts: list[int] = []

    @saga.step("charge", retry=retry(2, backoff=[0.5], clock=clock))
    def charge(ctx: Any) -> str:
        attempts.append(1)
        if fail == "charge" or len(attempts) == 1:
            raise ConnectionError("gateway down")
        return "charged"

    return saga


def test_saga_run_and_step_spans(installed):
    """A completed run: a run span with one child span per step; retries as span events."""
    result = make_saga(FakeClock()).run({"order": 1})
    assert result.ok
    run = installed.span("saga checkout")
    reserve, charge = installed.span("step reserve"), installed.span("step charge")
    for step in (reserve, charge):
        assert step.parent is not None and step.parent.span_id == run.context.span_id
        assert step.attributes is not None
        assert step.attributes["buttress.saga.run_id"] == result.run_id
    assert charge.attributes is not None and charge.attributes["buttress.attempts"] == 2
    assert [event.name for event in charge.events] == ["step_retrying"]
    assert run.attributes is not None
    assert run.attributes["buttress.saga.status"] == "completed"
    assert run.attributes["buttress.saga.run_id"] == result.run_id
    assert run.status.status_code is StatusCode.UNSET


def test_saga_failure_compensation_spans(installed):
    """A failed run: the failed step and the run are ERROR, the compensation has its span."""
    result = make_saga(FakeClock(), fail="charge").run({})
    assert not result.ok
    charge = installed.span("step charge")
    assert charge.status.status_code is StatusCode.ERROR
    assert charge.status.description == "ConnectionError: gateway down"
    undo = installed.span("compensate reserve")
    assert undo.status.status_code is StatusCode.UNSET
    run = installed.span("saga checkout")
    assert undo.parent is not None and undo.parent.span_id == run.context.span_id
    assert run.status.status_code is StatusCode.ERROR
    assert run.attributes is not None
    assert run.attributes["buttress.saga.status"] == "failed"
    assert run.attributes["buttress.saga.compensated"] is True


def test_saga_compensation_failure_span(installed):
    """A compensation that fails is an ERROR span, and the run is not compensated."""
    result = make_saga(FakeClock(), fail="charge", undo_fails=True).run({})
    assert not result.compensated
    undo = installed.span("compensate reserve")
    assert undo.status.status_code is StatusCode.ERROR
    run = installed.span("saga checkout")
    assert run.attributes is not None and run.attributes["buttress.saga.compensated"] is False


def test_saga_replay_span(installed):
    """A run replayed from its idempotency key gets a short span saying so."""
    saga = make_saga(FakeClock())
    first = saga.run({}, key="order-1")
    again = saga.run({}, key="order-1")
    assert again.run_id == first.run_id
    replayed = [
        span
        for span in installed.spans()
        if span.attributes and span.attributes.get("buttress.saga.replayed")
    ]
    assert len(replayed) == 1
    assert replayed[0].attributes is not None
    assert replayed[0].attributes["buttress.saga.key"] == "order-1"


def test_saga_run_span_is_a_child_of_the_callers_span(installed):
    """The run span's parent is the span current when the run started."""
    with installed.tracer().start_as_current_span("request"):
        make_saga(FakeClock()).run({})
    run, request = installed.span("saga checkout"), installed.span("request")
    assert run.parent is not None and run.parent.span_id == request.context.span_id


def test_uninstall_ends_open_saga_spans(sdk):
    """Spans of runs still open at uninstall are ended, not leaked."""
    handle = otel.instrument(tracer_provider=sdk.tracer_provider, metrics=False)
    saga = Saga("stuck", clock=FakeClock())

    @saga.step("wait")
    def wait(ctx: Any) -> None:
        handle.uninstall()

    saga.run({})
    assert {span.name for span in sdk.spans()} == {"saga stuck", "step wait"}


# -- metrics --------------------------------------------------------------------------------


def test_call_metrics_from_measured_and_traced(face, installed):
    """Calls by outcome, failures by type, durations from the policy's clock."""
    clock = FakeClock()

    def slow_then(result: object) -> Any:
        def run() -> object:
            clock.advance(0.25)
            if isinstance(result, BaseException):
                raise result
            return result

        return run

    ok = face.wrap(measured("api", clock=clock), slow_then("ok"))
    bad = face.wrap(otel.traced("api", clock=clock), slow_then(KeyError("k")))
    assert ok() == "ok"
    assert ok() == "ok"
    with pytest.raises(KeyError):
        bad()
    calls = installed.points("buttress.calls")
    assert calls[key(name="api", outcome="success")] == 2
    assert calls[key(name="api", outcome="failure")] == 1
    assert installed.points("buttress.failures") == {key(name="api", error_type="KeyError"): 1}
    durations = installed.points("buttress.call.duration")
    assert durations[key(name="api", outcome="success")].sum == pytest.approx(0.5)
    assert durations[key(name="api", outcome="success")].count == 2


def test_event_metrics(installed):
    """Retries, rejections and waits from events; every event counted by kind."""
    clock = FakeClock()
    breaker = CircuitBreaker("pricing", failure_threshold=1, clock=clock)
    policy = pipeline(retry(3, on=ConnectionError, backoff=[0.5], clock=clock), breaker)

    @policy
    def price() -> None:
        raise ConnectionError("down")

    with pytest.raises(CircuitOpenError):
        price()  # attempt 1 fails and opens the breaker; the retry is rejected: fail fast
    with pytest.raises(CircuitOpenError):
        price()
    limiter = RateLimiter("partner", rate=1, per=10, clock=clock)
    limiter.acquire()
    limiter.acquire()  # waits 10 s
    assert installed.points("buttress.retries") == {key(primitive="retry", name=""): 1}
    assert installed.points("buttress.rejections") == {
        key(primitive="circuit_breaker", name="pricing", reason="circuit_open"): 2
    }
    waits = installed.points("buttress.wait.duration")
    assert waits[key(primitive="rate_limiter", name="partner")].sum == pytest.approx(10.0)
    delays = installed.points("buttress.retry.delay")
    assert delays[key(primitive="retry", name="")].sum == pytest.approx(0.5)
    events = installed.points("buttress.events")
    assert (
        events[key(primitive="circuit_breaker", name="pricing", event="circuit_state_changed")] == 1
    )


def test_saga_metrics(installed):
    """Finished runs by status, with their durations."""
    clock = FakeClock()
    make_saga(clock).run({})
    make_saga(clock, fail="charge").run({})
    runs = installed.points("buttress.saga.runs")
    assert runs == {
        key(name="checkout", status="completed"): 1,
        key(name="checkout", status="failed"): 1,
    }
    durations = installed.points("buttress.saga.duration")
    assert durations[key(name="checkout", status="completed")].sum == pytest.approx(0.5)


def test_gauges_read_the_registry(installed):
    """Breaker state, bulkhead occupancy and limiter tokens come from the snapshots."""
    clock = FakeClock()
    breaker = CircuitBreaker("pricing", clock=clock)
    bulkhead = Bulkhead("pool", max_concurrent=4)
    limiter = RateLimiter("partner", rate=5, burst=3, clock=clock)
    breaker.open()
    limiter.acquire()
    seen: dict[str, Any] = {}

    @bulkhead
    def inside() -> None:
        seen.update(installed.points("buttress.bulkhead.in_flight"))

    inside()
    assert seen == {key(name="pool"): 1}
    states = installed.points("buttress.circuit_breaker.state")
    assert states == {
        key(name="pricing", state="open"): 1,
        key(name="pricing", state="closed"): 0,
        key(name="pricing", state="half_open"): 0,
    }
    assert installed.points("buttress.bulkhead.in_flight") == {key(name="pool"): 0}
    assert installed.points("buttress.rate_limiter.tokens") == {key(name="partner"): 2}


def test_gauges_of_an_explicit_registry(sdk):
    """primitives= points the gauges at another registry."""
    own = buttress.Registry()
    kept = [CircuitBreaker("elsewhere", registry=own), CircuitBreaker("default-one")]
    with otel.instrument(meter_provider=sdk.meter_provider, primitives=own, traces=False):
        names = {dict(k)["name"] for k in sdk.points("buttress.circuit_breaker.state")}
    assert names == {"elsewhere"}
    assert len(kept) == 2


def test_uninstall_stops_metrics_and_reinstall_works(sdk):
    """After uninstall nothing is recorded; installing again on the same provider works."""
    breaker = CircuitBreaker("pricing")
    counted = measured("api")(lambda: None)
    handle = otel.instrument(meter_provider=sdk.meter_provider, traces=False)
    assert isinstance(handle, Installation) and handle.installed
    counted()
    handle.uninstall()
    handle.uninstall()  # idempotent
    assert not handle.installed
    counted()
    assert sdk.points("buttress.calls") == {key(name="api", outcome="success"): 1}
    assert sdk.points("buttress.circuit_breaker.state") == {}
    with otel.instrument(meter_provider=sdk.meter_provider, traces=False):
        counted()
        assert sdk.points("buttress.calls") == {key(name="api", outcome="success"): 2}
        assert len(sdk.points("buttress.circuit_breaker.state")) == 3
    assert breaker.name == "pricing"


def test_instrument_validation():
    """Bad arguments are rejected when installing."""
    with pytest.raises(buttress.ConfigTypeError, match=r"primitives must be a buttress\.Registry"):
        otel.instrument(primitives="default")  # type: ignore[arg-type]
    with pytest.raises(buttress.ConfigTypeError, match="metrics must be True or False"):
        otel.instrument(metrics=1)  # type: ignore[arg-type]


def test_instrument_with_the_global_providers():
    """Without providers, the global ones (no-op until configured) are used."""
    with otel.instrument() as handle:
        measured("api")(lambda: None)()
        plain = Saga("plain")
        plain.step("noop", lambda ctx: None)
        plain.run({})
    assert not handle.installed
