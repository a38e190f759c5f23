"""buttress.telemetry.prometheus: the metric set on a prometheus_client registry."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.parser import text_string_to_metric_families

import buttress
from buttress import Bulkhead, CircuitBreaker, CircuitOpenError, RateLimiter, Saga, pipeline, retry
from buttress.telemetry import _metrics, measured, prometheus
from buttress.testing import FakeClock


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    """A CollectorRegistry of its own, with buttress's metrics on it."""
    target = CollectorRegistry()
    with prometheus.instrument(target):
        yield target


def value(registry: CollectorRegistry, sample: str, /, **labels: str) -> float | None:
    return registry.get_sample_value(sample, labels)


def test_call_and_event_metrics(face, flaky, registry):
    """Calls, failures, retries and rejections are counted; durations observed."""
    clock = FakeClock()
    breaker = CircuitBreaker("payments", failure_threshold=3, clock=clock)
    policy = pipeline(
        measured("charge", clock=clock),
        retry(3, on=ConnectionError, backoff=[0.5], clock=clock),
        breaker,
    )
    assert face.wrap(policy, flaky(ConnectionError("down")))() == "ok"
    breaker.open()
    with pytest.raises(CircuitOpenError):
        face.wrap(policy, flaky())()
    assert value(registry, "buttress_calls_total", name="charge", outcome="success") == 1
    assert value(registry, "buttress_calls_total", name="charge", outcome="rejected") == 1
    assert (
        value(registry, "buttress_failures_total", name="charge", error_type="CircuitOpenError")
        == 1
    )
    assert value(registry, "buttress_retries_total", primitive="retry", name="") == 1
    assert (
        value(
            registry,
            "buttress_rejections_total",
            primitive="circuit_breaker",
            name="payments",
            reason="circuit_open",
        )
        == 1
    )
    assert value(
        registry, "buttress_call_duration_seconds_sum", name="charge", outcome="success"
    ) == pytest.approx(0.5)
    assert value(registry, "buttress_retry_delay_seconds_count", primitive="retry", name="") == 1


def test_gauges_are_read_at_scrape_time(registry):
    """Breaker state, bulkhead occupancy, limiter tokens and sagas come from snapshots."""
    clock = FakeClock()
    breaker = CircuitBreaker("pricing", clock=clock)
    bulkhead = Bulkhead("pool", max_concurrent=2)
    limiter = RateLimiter("partner", rate=5, burst=4, clock=clock)
    saga = Saga("checkout", clock=clock)
    assert value(registry, "buttress_circuit_breaker_state", name="pricing", state="closed") == 1
    breaker.open()
    assert value(registry, "buttress_circuit_breaker_state", name="pricing", state="closed") == 0
    assert value(registry, "buttress_circuit_breaker_state", name="pricing", state="open") == 1
    limiter.acquire()
    assert value(registry, "buttress_rate_limiter_tokens", name="partner") == 3
    inside: list[float | None] = []

    @bulkhead
    def work() -> None:
        inside.append(value(registry, "buttress_bulkhead_in_flight", name="pool"))

    work()
    assert inside == [1]
    assert value(registry, "buttress_bulkhead_in_flight", name="pool") == 0
    assert value(registry, "buttress_bulkhead_queued", name="pool") == 0
    assert value(registry, "buttress_saga_running", name="checkout") == 0
    assert value(registry, "buttress_saga_stuck", name="checkout") == 0
    assert saga.name == "checkout"


def test_saga_metrics(registry):
    """Finished runs by status, and their duration on the saga's clock."""
    clock = FakeClock()
    saga = Saga("checkout", clock=clock)

    @saga.step("slow")
    def slow(ctx: Any) -> None:
        clock.advance(2.0)

    saga.run({})
    saga.run({}, key="k")
    saga.run({}, key="k")  # replayed
    assert value(registry, "buttress_saga_runs_total", name="checkout", status="completed") == 2
    assert value(registry, "buttress_saga_runs_total", name="checkout", status="replayed") == 1
    assert value(
        registry, "buttress_saga_duration_seconds_sum", name="checkout", status="completed"
    ) == pytest.approx(4.0)


def test_the_metric_set_is_the_shared_one(registry):
    """Every metric of the shared definition is exposed, under its derived name."""
    CircuitBreaker("pricing")
    exposed = {
        family.name for family in text_string_to_metric_families(generate_latest(registry).decode())
    }
    for metric in _metrics.METRICS:
        assert metric.prometheus_name in exposed, metric.name
    assert "buttress_call_duration_seconds" in exposed
    assert "buttress_calls" in exposed  # the family of buttress_calls_total


def test_twice_on_one_registry_is_refused_and_harmless(registry):
    """A second install on the same registry raises and leaves the first intact."""
    with pytest.raises(buttress.ConfigValueError, match="already registered"):
        prometheus.instrument(registry)
    measured("api")(lambda: None)()
    assert value(registry, "buttress_calls_total", name="api", outcome="success") == 1


def test_uninstall_unregisters_and_reinstall_works():
    """After uninstall the registry is empty of buttress metrics; a new install works."""
    target = CollectorRegistry()
    counted = measured("api")(lambda: None)
    handle = prometheus.instrument(target)
    counted()
    handle.uninstall()
    counted()
    assert "buttress" not in generate_latest(target).decode()
    with prometheus.instrument(target):
        counted()
        assert value(target, "buttress_calls_total", name="api", outcome="success") == 1


def test_instrument_validation():
    """A wrong registry type is refused with the parameter named."""
    with pytest.raises(buttress.ConfigTypeError, match="registry must be a prometheus_client"):
        prometheus.instrument(buttress.Registry())  # type: ignore[arg-type]
    with pytest.raises(buttress.ConfigTypeError, match=r"primitives must be a buttress\.Registry"):
        prometheus.instrument(CollectorRegistry(), primitives=CollectorRegistry())  # type: ignore[arg-type]


def test_default_registry_install():
    """Without a registry, the client's global REGISTRY is used (and cleaned up)."""
    from prometheus_client import REGISTRY

    with prometheus.instrument():
        measured("global-api")(lambda: None)()
        assert value(REGISTRY, "buttress_calls_total", name="global-api", outcome="success") == 1
    assert (
        REGISTRY.get_sample_value(
            "buttress_calls_total", {"name": "global-api", "outcome": "success"}
        )
        is None
    )


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_scraped_over_http(registry):
    """A real HTTP GET of /metrics on a loopback server returns the metrics."""
    breaker = CircuitBreaker("pricing")
    breaker.open()
    server: WSGIServer = make_server("127.0.0.1", 0, make_wsgi_app(registry), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert 'buttress_circuit_breaker_state{name="pricing",state="open"} 1.0' in body
