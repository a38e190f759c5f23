"""Registry, health/state views, events and the public surface."""

from __future__ import annotations

import json

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
    assert buttress.health()["status"] == "fail"
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
