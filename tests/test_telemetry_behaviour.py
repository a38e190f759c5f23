"""Telemetry never changes a protected call, and a broken backend never breaks one."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

from buttress import CircuitBreaker, CircuitOpenError, fallback, pipeline, retry
from buttress.telemetry import Installation, _metrics, measured, otel, prometheus
from buttress.telemetry import logging as blog
from buttress.testing import FakeClock, capture_events


class Providers:
    """In-memory OpenTelemetry providers."""

    def __init__(self, *processors: SpanProcessor) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(shutdown_on_exit=False)
        for processor in processors:
            self.tracer_provider.add_span_processor(processor)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.meter_provider = MeterProvider(
            metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False
        )

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def close(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def providers() -> Iterator[Providers]:
    """In-memory OpenTelemetry providers, shut down afterwards."""
    made = Providers()
    yield made
    made.close()


def install_everything(made: Providers) -> list[Installation]:
    quiet = logging.getLogger("tests.telemetry.quiet")
    quiet.propagate = False
    quiet.addHandler(logging.NullHandler())
    quiet.setLevel(logging.DEBUG)
    return [
        blog.install(quiet),
        otel.instrument(meter_provider=made.meter_provider, tracer_provider=made.tracer_provider),
        prometheus.instrument(CollectorRegistry()),
    ]


# -- identical behaviour ----------------------------------------------------------------------

OUTCOMES = st.lists(st.sampled_from(["ok", "conn", "value", "none"]), min_size=1, max_size=6)


def run_scenario(
    outcomes: list[str], attempts: int, use_fallback: bool, is_async: bool, traced: Any
) -> tuple[Any, ...]:
    """Run one call through a pipeline; return everything observable about it."""
    clock = FakeClock()
    queue = list(outcomes)
    calls = []

    def behaviour() -> object:
        calls.append(clock.now())
        outcome = queue.pop(0) if queue else "ok"
        if outcome == "conn":
            raise ConnectionError("down")
        if outcome == "value":
            raise ValueError("bad")
        return None if outcome == "none" else "ok"

    policies: list[Any] = [] if traced is None else [traced(clock)]
    if use_fallback:
        policies.append(fallback("cached", on=ValueError, clock=clock))
    policies += [
        retry(
            attempts,
            on=ConnectionError,
            backoff=[0.1, 0.2],
            retry_if_result=lambda r: r is None,
            clock=clock,
        ),
        CircuitBreaker(failure_threshold=2, reset_timeout=5, clock=clock),
    ]
    policy = pipeline(*policies)
    if is_async:

        async def coro() -> object:
            return behaviour()

        protected = policy(coro)
        call: Callable[[], object] = lambda: asyncio.run(protected())  # noqa: E731
    else:
        call = policy(behaviour)
    results: list[object] = []
    with capture_events() as seen:
        for _ in range(2):  # twice: the second call meets the breaker the first one left
            try:
                results.append(("returned", call()))
            except Exception as exc:
                results.append(("raised", type(exc), exc.args))
    kinds = [(type(event).__name__, event.time) for event in seen]
    return results, calls, clock.sleeps, kinds


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_telemetry_changes_nothing(is_async):
    """Same results, exceptions, attempts, sleeps and events with every backend on."""
    made = Providers()
    handles = install_everything(made)

    @settings(max_examples=60, deadline=None)
    @given(outcomes=OUTCOMES, attempts=st.integers(1, 4), use_fallback=st.booleans())
    def check(outcomes: list[str], attempts: int, use_fallback: bool) -> None:
        plain = run_scenario(outcomes, attempts, use_fallback, is_async, None)
        with_otel = run_scenario(
            outcomes,
            attempts,
            use_fallback,
            is_async,
            lambda clock: otel.traced("call", tracer_provider=made.tracer_provider, clock=clock),
        )
        with_metrics = run_scenario(
            outcomes, attempts, use_fallback, is_async, lambda clock: measured("call", clock=clock)
        )
        assert with_otel == plain
        assert with_metrics == plain

    try:
        check()
    finally:
        for handle in handles:
            handle.uninstall()
        made.close()
    assert made.spans(), "the traced runs produced spans"


def test_cancelled_traced_call(providers):
    """Cancellation propagates untouched; the span ends as cancelled, the context resets."""

    @otel.traced("slow", tracer_provider=providers.tracer_provider)
    async def slow() -> None:
        await asyncio.sleep(3600)

    async def main() -> None:
        task = asyncio.create_task(slow())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    (span,) = providers.spans()
    assert span.attributes is not None and span.attributes["buttress.outcome"] == "cancelled"
    assert span.status.is_unset


def test_concurrent_threads_keep_their_own_spans(providers):
    """Traced calls on many threads: each span counts its own call's attempts."""
    clock = FakeClock()
    local = threading.local()

    @pipeline(
        otel.traced("work", tracer_provider=providers.tracer_provider),
        retry(5, backoff=[0.0], clock=clock),
    )
    def work(failures: int) -> int:
        local.seen = getattr(local, "seen", 0) + 1
        if local.seen <= failures:
            raise ConnectionError("again")
        local.seen = 0
        return failures

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(work, [i % 4 for i in range(40)])) == [i % 4 for i in range(40)]
    attempts = sorted(
        span.attributes["buttress.attempts"] for span in providers.spans() if span.attributes
    )
    assert attempts == sorted((i % 4) + 1 for i in range(40))


# -- broken backends ------------------------------------------------------------------------


class Exploding(SpanProcessor):
    """A span processor that raises where it is told to."""

    def __init__(self, *, on_start: bool = False, on_end: bool = False) -> None:
        self.fail_start, self.fail_end = on_start, on_end

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.fail_start:
            raise RuntimeError("processor broke on start")

    def on_end(self, span: Any) -> None:
        if self.fail_end:
            raise RuntimeError("processor broke on end")


class FailingExporter(SpanExporter):
    """An exporter whose backend is down."""

    def export(self, spans: Any) -> SpanExportResult:
        raise ConnectionError("collector unreachable")


@pytest.mark.parametrize(
    "make_processor",
    [
        lambda: Exploding(on_start=True),
        lambda: Exploding(on_end=True),
        lambda: SimpleSpanProcessor(FailingExporter()),
    ],
    ids=["start", "end", "exporter"],
)
def test_a_broken_tracing_pipeline_never_breaks_a_call(face, flaky, make_processor, caplog):
    """Span processors and exporters that raise: results and exceptions are unchanged."""
    made = Providers(make_processor())
    clock = FakeClock()
    try:
        policy = pipeline(
            otel.traced("call", tracer_provider=made.tracer_provider),
            retry(2, backoff=[0.1], clock=clock),
        )
        behaviour = flaky(ConnectionError("once"))
        with caplog.at_level(logging.ERROR):
            assert face.wrap(policy, behaviour)() == "ok"
            error = KeyError("k")
            failing = face.wrap(policy, lambda: (_ for _ in ()).throw(error))
            with pytest.raises(KeyError) as caught:
                failing()
        assert caught.value is error
        assert behaviour.calls == 2
        assert any(record.levelno >= logging.ERROR for record in caplog.records)  # reported
    finally:
        made.close()


def test_a_failing_metrics_sink_never_breaks_a_call(face, flaky, monkeypatch, caplog):
    """A metrics backend that raises on every record: the call is unchanged, errors logged."""

    def broken(self: object, measurements: object) -> None:
        raise RuntimeError("metrics backend down")

    monkeypatch.setattr(prometheus._Sink, "record", broken)
    clock = FakeClock()
    with prometheus.instrument(CollectorRegistry()), caplog.at_level(logging.ERROR):
        policy = pipeline(measured("call", clock=clock), retry(3, backoff=[0.1], clock=clock))
        assert face.wrap(policy, flaky(ConnectionError("x"), ConnectionError("y")))() == "ok"
    logged = {record.name for record in caplog.records}
    assert logged == {"buttress.telemetry", "buttress.events"}


def test_a_failing_snapshot_never_breaks_a_scrape(monkeypatch, caplog):
    """A primitive whose snapshot raises is skipped; the other gauges are still exposed."""
    target = CollectorRegistry()
    broken = CircuitBreaker("broken")
    healthy = CircuitBreaker("healthy")

    def explode() -> dict[str, Any]:
        raise RuntimeError("snapshot failed")

    monkeypatch.setattr(broken, "snapshot", explode)
    with prometheus.instrument(target), caplog.at_level(logging.ERROR):
        body = generate_latest(target).decode()
    assert 'buttress_circuit_breaker_state{name="healthy",state="closed"} 1.0' in body
    assert 'name="broken"' not in body
    assert any("snapshot" in record.getMessage() for record in caplog.records)
    assert healthy.name == "healthy"


def test_a_raising_log_handler_never_breaks_a_call(face, flaky, caplog):
    """A logging handler that raises is contained like any failing listener."""

    class Raising(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise RuntimeError("disk full")

    logger = logging.getLogger("tests.telemetry.raising")
    logger.propagate = False
    logger.addHandler(Raising())
    try:
        with blog.install(logger), caplog.at_level(logging.ERROR, logger="buttress.events"):
            policy = retry(2, backoff=[0.1], clock=FakeClock())
            assert face.wrap(policy, flaky(ConnectionError("x")))() == "ok"
    finally:
        logger.handlers.clear()


def test_measured_without_backends_reads_no_clock():
    """With no metrics backend installed, measured() costs a check and nothing else."""

    class CountingClock(FakeClock):
        reads = 0

        def now(self) -> float:
            CountingClock.reads += 1
            return super().now()

    clock = CountingClock()
    wrapped = measured("idle", clock=clock)(lambda: "ok")
    assert not _metrics.sinks.items
    assert wrapped() == "ok"
    assert CountingClock.reads == 0


def test_open_breaker_rejections_identical(face, providers):
    """A rejected call raises the same CircuitOpenError with or without tracing."""
    breaker = CircuitBreaker(failure_threshold=1)
    breaker.open()
    plain = face.wrap(breaker, lambda: "x")
    traced = face.wrap(
        pipeline(otel.traced("t", tracer_provider=providers.tracer_provider), breaker), lambda: "x"
    )
    for call in (plain, traced):
        with pytest.raises(CircuitOpenError, match="is open"):
            call()
