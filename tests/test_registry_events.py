"""Registry, health/state views, events and the public surface."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

import buttress
from buttress import Bulkhead, CircuitBreaker, RateLimiter, Registry, events, retry, timeout
from buttress.testing import FakeClock, capture_events, isolated_registry


def test_state_is_json_serialisable_and_grouped_by_kind():
    """state() has one entry per live named primitive, all JSON-ready."""
    alive = [
        CircuitBreaker("db"),
        Bulkhead("db-pool", max_concurrent=4),
        RateLimiter("api", rate=5),
        timeout(1, name="query"),
        CircuitBreaker(),  # unnamed: not registered
    ]
    policy = retry(3, name="fetch")
    state = buttress.state()
    assert set(state) == {"circuit_breaker", "bulkhead", "rate_limiter", "retry", "timeout"}
    assert state["bulkhead"]["db-pool"]["max_concurrent"] == 4
    assert state["retry"]["fetch"]["attempts"] == 3
    json.dumps(state)
    assert policy.snapshot()["name"] == "fetch"
    assert len(alive) == 5
    del alive
    import gc

    gc.collect()
    assert set(buttress.state()) == {"retry"}  # only live primitives are listed


def test_health_has_the_ietf_shape():
    """health() returns status plus checks keyed component:kind with IETF fields."""
    clock = FakeClock()
    breaker = CircuitBreaker("payments", failure_threshold=1, clock=clock)
    health = buttress.health()
    assert health["status"] == "pass"
    check = health["checks"]["payments:circuit_breaker"][0]
    assert {"componentId", "componentType", "observedValue", "status", "time"} <= set(check)
    breaker.open()
    assert buttress.health()["status"] == "warn"  # degraded: the breaker is not critical
    assert buttress.health()["checks"]["payments:circuit_breaker"][0]["status"] == "fail"
    json.dumps(buttress.health())


def test_a_private_registry_keeps_its_own_set():
    """registry= keeps a primitive out of the default registry."""
    mine = Registry()
    first = CircuitBreaker("db", registry=mine)
    second = CircuitBreaker("db")  # no clash: different registries
    assert first is not second
    assert len(mine) == 1
    assert mine.get("circuit_breaker", "db") is not None
    assert set(mine.state()) == {"circuit_breaker"}


def test_isolated_registry_restores_the_default():
    """isolated_registry() swaps in a fresh default registry for a block."""
    outer = buttress.default_registry()
    with isolated_registry() as inner:
        assert buttress.default_registry() is inner
    assert buttress.default_registry() is outer


def test_subscribe_and_unsubscribe():
    """A global listener sees every primitive's events until it unsubscribes."""
    seen: list[events.Event] = []
    unsubscribe = events.subscribe(seen.append)
    breaker = CircuitBreaker("s", failure_threshold=1)
    breaker.open()
    unsubscribe()
    breaker.close()
    assert [event.kind for event in seen] == ["circuit_state_changed"]
    data = seen[0].to_dict()
    assert data["old"] == "closed" and data["new"] == "open" and data["severity"] == "warning"
    json.dumps(data)


def test_listener_errors_are_isolated(caplog):
    """A failing global listener does not stop the others or the call."""
    seen = []

    def broken(event: events.Event) -> None:
        raise RuntimeError("bad listener")

    with capture_events() as captured:
        unsubscribe = events.subscribe(broken)
        events.subscribe(seen.append)()
        CircuitBreaker(failure_threshold=1).open()
        unsubscribe()
    assert len(captured) == 1
    assert "bad listener" in caplog.text


def test_subscribe_rejects_non_callables():
    """Listeners must be callable."""
    with pytest.raises(TypeError, match="listener must be callable"):
        events.subscribe(42)  # type: ignore[arg-type]


def test_all_is_sorted_and_complete():
    """__all__ lists exactly the public names, sorted."""
    import inspect

    public = {
        name
        for name in dir(buttress)
        if not name.startswith("_")
        and (
            name in ("backoff", "chaos", "events") or not inspect.ismodule(getattr(buttress, name))
        )
    }
    assert sorted(buttress.__all__) == buttress.__all__
    assert set(buttress.__all__) == public
    for name in buttress.__all__:
        assert getattr(buttress, name) is not None


def test_every_error_derives_from_one_base():
    """The exception tree is rooted in ButtressError; rejections share RejectedError."""
    from buttress import exceptions

    for name in exceptions.__all__:
        assert issubclass(getattr(exceptions, name), buttress.ButtressError)
    for rejected in (buttress.CircuitOpenError, buttress.BulkheadFull, buttress.RateLimited):
        assert issubclass(rejected, buttress.RejectedError)
    assert issubclass(buttress.TimeoutExceeded, TimeoutError)


def test_version_is_exposed():
    """buttress.__version__ comes from the installed metadata."""
    assert buttress.__version__.count(".") >= 1


def test_every_event_class_is_defined_in_buttress_events():
    """One vocabulary: each Event subclass lives in buttress.events and is listed there."""
    import importlib
    import pkgutil

    seen: set[type[events.Event]] = set()
    for info in pkgutil.walk_packages(buttress.__path__, "buttress."):
        if info.name.startswith(("buttress.integrations", "buttress.telemetry.otel")):
            continue  # optional dependencies; they define no events
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, events.Event):
                seen.add(value)
    assert {cls.__module__ for cls in seen} == {"buttress.events"}
    assert {cls.__name__ for cls in seen} <= set(events.__all__)


def test_events_moved_to_buttress_events_keep_their_old_import_paths():
    """LimitChanged, CacheStaleServed, CacheRefreshFailed, ChaosInjected: one class each."""
    import importlib

    adaptive, cache, chaos = (
        importlib.import_module(f"buttress.{name}") for name in ("adaptive", "cache", "chaos")
    )
    assert adaptive.LimitChanged is events.LimitChanged
    assert cache.CacheStaleServed is events.CacheStaleServed
    assert cache.CacheRefreshFailed is events.CacheRefreshFailed
    assert chaos.ChaosInjected is events.ChaosInjected


def _rejections_and_failures(listeners: list[events.Listener] | None) -> list[Exception]:
    """An open breaker, a full bulkhead, a drained limiter and a retry failing 3 times."""
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, clock=clock, listeners=listeners)
    bulkhead = Bulkhead(max_concurrent=1, clock=clock, listeners=listeners)
    limiter = RateLimiter(rate=1, per=60, max_wait=0, clock=clock, listeners=listeners)
    failing = retry(3, backoff=[0], clock=clock, listeners=listeners)

    def boom() -> None:
        raise ValueError("down")

    with pytest.raises(ValueError):
        breaker(boom)()
    held = bulkhead.acquire()
    limiter.acquire()
    caught: list[Exception] = []
    for call in (breaker(lambda: None), bulkhead(lambda: None), limiter(lambda: None)):
        with pytest.raises(buttress.RejectedError) as info:
            call()
        caught.append(info.value)
    with pytest.raises(ValueError) as failed:
        failing(boom)()
    caught.append(failed.value)
    held.release()
    assert breaker.snapshot()["rejections"] == 1
    assert bulkhead.snapshot()["rejected"] == 1
    assert limiter.snapshot()["rejected"] == 1
    assert failing.snapshot()["retries"] == 2
    assert failing.snapshot()["gave_up"] == 1
    return caught


def test_nothing_is_built_for_events_when_nobody_listens(monkeypatch):
    """Rejections and failed retries never reach emit() (so build no event and no
    keyword dict) while no listener is attached; with one, every event arrives. (The
    breaker's one transition, a rare event, still goes through emit, which builds nothing.)"""
    emitted: list[type[events.Event]] = []

    def counting_emit(self: object, event_type: type[events.Event], **fields: object) -> None:
        emitted.append(event_type)

    from buttress._policy import Policy

    monkeypatch.setattr(Policy, "emit", counting_emit)
    errors = _rejections_and_failures(None)
    assert emitted == [events.CircuitStateChanged]
    assert [type(e).__name__ for e in errors] == [
        "CircuitOpenError",
        "BulkheadFull",
        "RateLimited",
        "ValueError",
    ]
    monkeypatch.undo()
    seen: list[events.Event] = []
    _rejections_and_failures([seen.append])
    kinds = [event.kind for event in seen]
    assert kinds.count("call_rejected") == 3
    assert kinds.count("retry_scheduled") == 2
    assert kinds.count("retry_gave_up") == 1


def test_cheaply_built_rejections_carry_what_the_constructor_would_set():
    """The rejections built on the hot paths equal what their public constructors build:
    message, retry_after, name and reason."""
    clock = FakeClock()
    breaker = CircuitBreaker("db", failure_threshold=1, reset_timeout=30, clock=clock)
    bulkhead = Bulkhead("pool", max_concurrent=1, clock=clock)
    limiter = RateLimiter("api", rate=1, per=60, max_wait=0, clock=clock)
    with pytest.raises(ValueError):
        breaker(lambda: (_ for _ in ()).throw(ValueError("down")))()
    clock.advance(10)
    held = bulkhead.acquire()
    limiter.acquire()
    errors = []
    for call in (breaker(lambda: None), bulkhead(lambda: None), limiter(lambda: None)):
        with pytest.raises(buttress.RejectedError) as info:
            call()
        errors.append(info.value)
    held.release()
    opened, full, limited = errors
    assert (str(opened), opened.retry_after, opened.name, opened.reason) == (
        "circuit breaker 'db' is open",
        20.0,
        "db",
        "circuit_open",
    )
    assert opened.args == (str(opened),)
    assert (full.retry_after, full.name, full.reason) == (None, "pool", "bulkhead_full")
    assert str(full) == "bulkhead 'pool' is full: all 1 slots busy and 0/0 queued"
    assert limited.retry_after == pytest.approx(60.0)
    assert (limited.name, limited.reason) == ("api", "rate_limited")
    assert str(limited) == "rate limiter 'api': no permit within the allowed wait (next in 60.000s)"
    for error in errors:
        assert not error.__dict__  # slots only: no instance dict was made


def test_a_refilled_limiter_reports_exactly_its_burst():
    """A full bucket reads as its burst exactly (no float residue from per / rate), in
    snapshot() and in health(); a partly refilled one is rounded to 6 decimals."""
    clock = FakeClock()
    limiter = RateLimiter("odd", rate=3, per=0.7, burst=10, clock=clock)
    assert limiter.snapshot()["tokens"] == 10.0
    assert buttress.health()["checks"]["odd:rate_limiter"][0]["observedValue"] == {
        "tokens": 10.0,
        "waiting": 0,
    }
    assert limiter.try_acquire()
    clock.advance(0.1)
    tokens = limiter.snapshot()["tokens"]
    assert 9.0 < tokens < 10.0 and tokens == round(tokens, 6)


def test_events_are_built_frozen_and_of_their_own_class():
    """An event built by its constructor is exactly of its class, equal to one built
    again from its fields, frozen, and picklable; a plain subclass's instances keep the
    subclass, and defaults fill the fields not given."""
    error = ValueError("down")
    event = events.RetryScheduled("retry", "db", 1.0, 2, 0.5, error)
    assert type(event) is events.RetryScheduled
    assert (event.attempt, event.delay, event.error, event.result, event.kwargs) == (
        2,
        0.5,
        error,
        None,
        None,
    )
    assert event == dataclasses.replace(event)
    assert pickle.loads(pickle.dumps(events.CallRejected("bulkhead", None, 1.0, "full", None)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.attempt = 3  # type: ignore[misc]

    class Mine(events.CallRejected):
        __slots__ = ()

    mine = Mine("bulkhead", "pool", 2.0, "bulkhead_full", None)
    assert type(mine) is Mine
    assert (mine.name, mine.reason, mine.retry_after) == ("pool", "bulkhead_full", None)
