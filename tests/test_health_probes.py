"""Liveness, readiness and degraded health (issue 17, point 5).

``critical=`` marks the primitives whose failure takes the process out of rotation; any
other failing check only degrades ``health()`` to ``"warn"``; ``liveness()`` never reads
a primitive. The ASGI probe apps are driven in process through ``httpx.ASGITransport``.
"""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import httpx
import pytest

import buttress
from buttress import Bulkhead, CircuitBreaker, RateLimiter, Registry, retry
from buttress.exceptions import ConfigTypeError, ConfigValueError
from buttress.integrations.asgi import health_app, liveness_app, readiness_app
from buttress.testing import FakeClock

# -- the option -------------------------------------------------------------------------------


def test_critical_defaults_to_false_and_is_read_only():
    """critical= is off unless asked for, and a property afterwards."""
    assert CircuitBreaker("a").critical is False
    breaker = CircuitBreaker("b", critical=True)
    assert breaker.critical is True
    with pytest.raises(AttributeError):
        breaker.critical = False  # type: ignore[misc]


@pytest.mark.parametrize("value", [1, "yes", None, 0.0])
def test_critical_must_be_a_bool(value: object):
    """A non-bool critical= is a TypeError naming the option and the value."""
    with pytest.raises(ConfigTypeError, match=r"critical must be True or False, got") as info:
        CircuitBreaker("db", critical=value)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    assert repr(value) in str(info.value)


def test_critical_needs_a_name():
    """An unnamed primitive joins no registry, so critical=True on it is refused."""
    with pytest.raises(ConfigValueError, match=r"critical=True needs name=") as info:
        Bulkhead(max_concurrent=2, critical=True)
    assert isinstance(info.value, ValueError)
    Bulkhead(max_concurrent=2, critical=False)  # explicit False is fine


def test_every_named_primitive_takes_critical():
    """The option is a Policy option: limiters and bulkheads take it like breakers."""
    limiter = RateLimiter("geo", rate=1, critical=True)
    bulkhead = Bulkhead("pool", max_concurrent=1, critical=True)
    assert limiter.critical and bulkhead.critical
    checks = buttress.readiness()["checks"]
    assert set(checks) == {"geo:rate_limiter", "pool:bulkhead"}


# -- health: degraded vs failing ----------------------------------------------------------------


def test_an_open_breaker_that_is_not_critical_degrades_health_to_warn():
    """The check itself still fails; the report is warn (still serving), not fail."""
    breaker = CircuitBreaker("recommendations")
    breaker.open()
    report = buttress.health()
    assert report["status"] == "warn"
    check = report["checks"]["recommendations:circuit_breaker"][0]
    assert check["status"] == "fail"
    assert "critical" not in check


def test_an_open_critical_breaker_fails_health():
    """A critical failing check makes the whole report fail, and says it is critical."""
    clock = FakeClock()
    database = CircuitBreaker("database", clock=clock, critical=True)
    recommendations = CircuitBreaker("recommendations")  # held: registries hold primitives weakly
    recommendations.open()
    database.open()
    report = buttress.health()
    assert report["status"] == "fail"
    assert report["checks"]["database:circuit_breaker"][0]["critical"] is True
    database.close()
    assert buttress.health()["status"] == "warn"  # back to the non-critical one only


def test_health_passes_when_everything_passes():
    """Nothing degraded: pass, with critical primitives flagged in their checks."""
    _database = CircuitBreaker("database", critical=True)  # held: registries hold primitives weakly
    _fetch = retry(attempts=2, name="fetch")
    report = buttress.health()
    assert report["status"] == "pass"
    assert report["checks"]["database:circuit_breaker"][0]["critical"] is True
    json.dumps(report)


# -- readiness ------------------------------------------------------------------------------------


def test_readiness_ignores_primitives_that_are_not_critical():
    """Every non-critical breaker open: still ready (the herd stays in rotation)."""
    breakers = [CircuitBreaker(name) for name in ("recommendations", "reviews", "ads")]
    for breaker in breakers:
        breaker.open()
    assert buttress.health()["status"] == "warn"
    assert buttress.readiness() == {"status": "pass", "checks": {}}


def test_readiness_follows_the_critical_primitives():
    """Open critical breaker: fail; half-open: warn; closed: pass."""
    clock = FakeClock()
    database = CircuitBreaker(
        "database", failure_threshold=1, reset_timeout=5, clock=clock, critical=True
    )
    recommendations = CircuitBreaker("recommendations")  # held: registries hold primitives weakly
    recommendations.open()
    assert buttress.readiness()["status"] == "pass"

    @database
    def query() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        query()
    report = buttress.readiness()
    assert report["status"] == "fail"
    assert list(report["checks"]) == ["database:circuit_breaker"]
    check = report["checks"]["database:circuit_breaker"][0]
    assert check["observedValue"] == "open" and check["critical"] is True
    clock.advance(5)
    assert buttress.readiness()["status"] == "warn"  # half-open: probing, still ready
    database.close()
    assert buttress.readiness()["status"] == "pass"


def test_a_saturated_critical_bulkhead_warns_but_stays_ready():
    """Bulkheads and limiters only ever warn: readiness never fails on load alone."""
    pool = Bulkhead("pool", max_concurrent=1, critical=True)
    permit = pool.acquire()
    try:
        report = buttress.readiness()
        assert report["status"] == "warn"
        assert report["checks"]["pool:bulkhead"][0]["observedValue"] == {
            "in_flight": 1,
            "queued": 0,
        }
    finally:
        permit.release()
    assert buttress.readiness()["status"] == "pass"


def test_drain_fails_readiness_until_resume():
    """drain() takes the process out of rotation; health and liveness are unchanged."""
    registry = Registry()
    _database = CircuitBreaker(
        "database", registry=registry, critical=True
    )  # held: registries hold primitives weakly
    assert registry.draining is False
    registry.drain()
    assert registry.draining is True
    report = registry.readiness()
    assert report["status"] == "fail"
    assert report["output"].startswith("draining")
    assert report["checks"]["database:circuit_breaker"][0]["status"] == "pass"
    assert registry.health()["status"] == "pass"
    assert registry.liveness() == {"status": "pass"}
    registry.resume()
    assert registry.draining is False
    report = registry.readiness()
    assert report["status"] == "pass"
    assert "output" not in report


def test_a_collected_critical_primitive_leaves_readiness():
    """Held weakly like every member: a collected critical primitive no longer counts."""
    registry = Registry()
    breaker = CircuitBreaker("temporary", registry=registry, critical=True)
    breaker.open()
    assert registry.readiness()["status"] == "fail"
    del breaker
    gc.collect()
    assert registry.readiness() == {"status": "pass", "checks": {}}


# -- liveness -------------------------------------------------------------------------------------


def test_liveness_never_depends_on_a_primitive():
    """Critical breakers open, draining: liveness still passes."""
    database = CircuitBreaker("database", critical=True)  # held: registries hold primitives weakly
    database.open()
    buttress.default_registry().drain()
    assert buttress.liveness() == {"status": "pass"}
    assert buttress.readiness()["status"] == "fail"


# -- ASGI probe endpoints -------------------------------------------------------------------------


async def _get(app: Any, method: str = "GET", path: str = "/") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as http:
        return await http.request(method, path)


def _call(app: Any, method: str = "GET", path: str = "/") -> httpx.Response:
    return asyncio.run(_get(app, method, path))


def test_readiness_app_200_then_503_on_a_critical_failure():
    """The readiness endpoint: 200 while ready, 503 with the JSON report when not."""
    database = CircuitBreaker("database", critical=True)
    recommendations = CircuitBreaker("recommendations")  # held: registries hold primitives weakly
    recommendations.open()
    ok = _call(readiness_app(), path="/readyz")
    assert ok.status_code == 200
    assert ok.headers["content-type"] == "application/health+json"
    assert ok.headers["cache-control"] == "no-store"
    assert ok.json()["status"] == "pass"
    database.open()
    failing = _call(readiness_app())
    assert failing.status_code == 503
    assert failing.json()["checks"]["database:circuit_breaker"][0]["status"] == "fail"
    head = _call(readiness_app(), "HEAD")
    assert head.status_code == 503 and head.content == b""
    post = _call(readiness_app(), "POST")
    assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"


def test_readiness_app_503_while_draining():
    """A draining registry fails the readiness endpoint with its output."""
    registry = Registry()
    registry.drain()
    response = _call(readiness_app(registry))
    assert response.status_code == 503
    assert response.json() == {
        "status": "fail",
        "checks": {},
        "output": "draining: shutting down, send no new traffic",
    }


def test_liveness_app_always_200():
    """The liveness endpoint answers 200 pass whatever the primitives say."""
    database = CircuitBreaker("database", critical=True)  # held: registries hold primitives weakly
    database.open()
    response = _call(liveness_app(), path="/livez")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/health+json"
    assert response.json() == {"status": "pass"}
    assert _call(liveness_app(), "HEAD").content == b""
    assert _call(liveness_app(), "DELETE").status_code == 405


def test_health_app_serves_degraded_as_200():
    """An open breaker that is not critical: health answers 200 with status warn."""
    recommendations = CircuitBreaker("recommendations")  # held: registries hold primitives weakly
    recommendations.open()
    response = _call(health_app())
    assert response.status_code == 200
    assert response.json()["status"] == "warn"


def test_probe_apps_report_on_a_given_registry():
    """registry= pins readiness to that registry; a bad one is refused at once."""
    mine = Registry()
    private = CircuitBreaker(
        "private", registry=mine, critical=True
    )  # held: registries hold primitives weakly
    private.open()
    assert _call(readiness_app(mine)).status_code == 503
    assert _call(readiness_app()).status_code == 200  # the default registry is fine
    with pytest.raises(TypeError, match="registry must be"):
        readiness_app({})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="registry must be"):
        liveness_app("default")  # type: ignore[arg-type]
    assert repr(readiness_app()) == "<buttress readiness app>"


def test_a_critical_saga_is_in_readiness():
    """Saga takes critical= like every policy: its store check then counts for readiness."""
    from buttress.saga import Saga

    saga = Saga("checkout", critical=True)
    assert saga.critical is True
    assert list(buttress.readiness()["checks"]) == ["checkout:saga"]
    with pytest.raises(ConfigTypeError, match="critical must be True or False"):
        Saga("refund", critical="yes")  # type: ignore[arg-type]
