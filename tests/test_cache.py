"""cache(): memoisation, request coalescing, stale-while-revalidate and stale-if-error."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

import buttress
from buttress import cache, pipeline, retry
from buttress.cache import CacheInfo, CacheRefreshFailed, CacheStaleServed, MissingExtraError
from buttress.testing import FakeClock, capture_events


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Block (really) until another thread makes ``condition`` true."""
    event = threading.Event()
    for _ in range(int(timeout / 0.001)):
        if condition():
            return
        event.wait(0.001)
    raise AssertionError("condition never became true")


def join_refreshes() -> None:
    """Wait for the background refresh threads of sync caches to finish."""
    for thread in threading.enumerate():
        if thread.name == "buttress-cache-refresh":
            thread.join(10)


async def settle(rounds: int = 20) -> None:
    """Let every ready task run (background refreshes included)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class Counted:
    """A behaviour that counts its calls and returns ``f"{prefix}{n}"`` for call n."""

    def __init__(self, prefix: str = "v") -> None:
        self.calls = 0
        self.prefix = prefix
        self.fail: BaseException | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return f"{self.prefix}{self.calls}"


# -- memoisation and TTL ----------------------------------------------------------------------


def test_results_are_memoised_per_arguments(face: Any, clock: FakeClock) -> None:
    """Same arguments hit the cache; different arguments call again; kwargs order is ignored."""
    behaviour = Counted()
    call = face.wrap(cache(60, clock=clock), behaviour)
    assert call(1) == "v1"
    assert call(1) == "v1"
    assert call(2) == "v2"
    assert call(1, a=1, b=2) == "v3"
    assert call(1, b=2, a=1) == "v3"
    assert behaviour.calls == 3


def test_values_expire_after_ttl(face: Any) -> None:
    """A value is fresh for exactly ttl seconds of the injected clock."""
    clock = FakeClock()
    behaviour = Counted()
    call = face.wrap(cache(10, clock=clock), behaviour)
    assert call() == "v1"
    clock.advance(9.999)
    assert call() == "v1"
    clock.advance(0.001)
    assert call() == "v2"
    assert behaviour.calls == 2


def test_exceptions_are_not_cached(face: Any, clock: FakeClock) -> None:
    """A failing call raises, and the next call runs the function again."""
    behaviour = Counted()
    behaviour.fail = ConnectionError("down")
    call = face.wrap(cache(60, clock=clock), behaviour)
    with pytest.raises(ConnectionError, match="down"):
        call()
    behaviour.fail = None
    assert call() == "v2"
    assert behaviour.calls == 2


def test_maxsize_evicts_the_least_recently_used(face: Any, clock: FakeClock) -> None:
    """With maxsize=2, the least recently used key goes first."""
    behaviour = Counted()
    call = face.wrap(cache(60, maxsize=2, clock=clock), behaviour)
    assert call("a") == "v1"
    assert call("b") == "v2"
    assert call("a") == "v1"  # a is now more recent than b
    assert call("c") == "v3"  # evicts b
    assert call("a") == "v1"
    assert call("b") == "v4"  # b was evicted: called again
    assert behaviour.calls == 4


def test_typed_and_custom_keys(clock: FakeClock) -> None:
    """typed=True separates 1 and 1.0; key= decides what identifies a call."""
    plain, typed, custom = Counted(), Counted(), Counted()
    untyped_call = cache(60, clock=clock)(plain)
    typed_call = cache(60, typed=True, clock=clock)(typed)
    by_user = cache(60, key=lambda user, **_: user["id"], clock=clock)(custom)
    assert untyped_call(1) == untyped_call(1.0) == "v1"
    assert typed_call(1) == "v1"
    assert typed_call(1.0) == "v2"
    assert by_user({"id": 7}, verbose=True) == "v1"
    assert by_user({"id": 7, "name": "x"}) == "v1"  # dicts are fine: the key is the id
    assert by_user.invalidate({"id": 7})
    assert by_user({"id": 7}) == "v2"


def test_unhashable_arguments_raise_type_error(clock: FakeClock) -> None:
    """As with functools.lru_cache, unhashable arguments with the default key are a TypeError."""
    call = cache(60, clock=clock)(Counted())
    with pytest.raises(TypeError):
        call([1, 2])


def test_invalidate_clear_and_info(face: Any, clock: FakeClock) -> None:
    """invalidate() drops one key, clear() all of them; the counters add up."""
    behaviour = Counted()
    policy = cache(60, clock=clock)
    call = face.wrap(policy, behaviour)
    call(1)
    call(1)
    call(2)
    stats = policy.snapshot()
    assert (stats["hits"], stats["misses"], stats["size"]) == (1, 2, 2)
    assert policy.invalidate(1)
    assert not policy.invalidate(1)
    assert call(1) == "v3"
    assert call(2) == "v2"
    policy.clear()
    assert call(2) == "v4"


def test_function_controls(clock: FakeClock) -> None:
    """The decorated function has cache_info(), invalidate() and cache_clear() of its own."""
    decorated = cache(60, clock=clock)(Counted())
    decorated(1)
    decorated(1)
    decorated(2)
    assert decorated.cache_info() == CacheInfo(
        hits=1, misses=2, coalesced=0, stale=0, errors=0, refreshes=0, maxsize=1024, currsize=2
    )
    assert decorated.invalidate(1)
    assert not decorated.invalidate(1)
    assert decorated.cache_info().currsize == 1
    decorated.cache_clear()
    assert decorated.cache_info().currsize == 0


def test_decorated_function_keeps_its_metadata_and_controls(clock: FakeClock) -> None:
    """The wrapper keeps name and docstring and offers cache_clear/invalidate/cache_info."""

    @cache(60, clock=clock)
    async def fetch(url: str) -> str:
        """Fetch a URL."""
        return url

    assert fetch.__name__ == "fetch"
    assert fetch.__doc__ == "Fetch a URL."
    assert asyncio.run(fetch("u")) == "u"
    assert fetch.cache_info().currsize == 1
    assert fetch.invalidate("u")
    fetch.cache_clear()
    assert fetch.cache_info().currsize == 0


# -- request coalescing -----------------------------------------------------------------------


def test_a_thousand_concurrent_async_callers_cause_one_execution() -> None:
    """1,000 tasks asking for one missing key share one execution and its result."""
    calls = 0

    async def main() -> None:
        gate = asyncio.Event()

        @cache(60)
        async def load(key: str) -> dict[str, str]:
            nonlocal calls
            calls += 1
            await gate.wait()
            return {"key": key}

        tasks = [asyncio.ensure_future(load("k")) for _ in range(1000)]
        while load.cache_info().coalesced < 999:
            await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*tasks)
        assert all(result is results[0] for result in results)
        info = load.cache_info()
        assert (info.misses, info.coalesced, info.hits) == (1, 999, 0)

    asyncio.run(main())
    assert calls == 1


def test_sixteen_threads_cause_one_execution() -> None:
    """32 threads asking for one missing key share one execution and its result."""
    release = threading.Event()
    calls = 0

    @cache(60)
    def load(key: str) -> object:
        nonlocal calls
        calls += 1
        release.wait(10)
        return object()

    results: list[object] = []
    lock = threading.Lock()

    def worker() -> None:
        value = load("k")
        with lock:
            results.append(value)

    threads = [threading.Thread(target=worker) for _ in range(32)]
    for thread in threads:
        thread.start()
    wait_until(lambda: load.cache_info().coalesced == 31)
    release.set()
    for thread in threads:
        thread.join(10)
    assert calls == 1
    assert len(results) == 32
    assert all(result is results[0] for result in results)


def test_an_exception_is_shared_by_every_waiter_then_forgotten() -> None:
    """Concurrent callers all receive the one execution's exception; it is not cached."""
    calls = 0

    async def main() -> None:
        gate = asyncio.Event()

        @cache(60)
        async def load() -> str:
            nonlocal calls
            calls += 1
            await gate.wait()
            if calls == 1:
                raise ConnectionError("dependency down")
            return "ok"

        tasks = [asyncio.ensure_future(load()) for _ in range(10)]
        while load.cache_info().coalesced < 9:
            await asyncio.sleep(0)
        gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)
        assert all(outcome is outcomes[0] for outcome in outcomes)
        assert load.cache_info().errors == 1
        assert await load() == "ok"

    asyncio.run(main())
    assert calls == 2


def test_threads_share_an_exception() -> None:
    """Threads waiting on a failing execution all raise its exception."""
    release = threading.Event()
    calls = 0

    @cache(60)
    def load() -> str:
        nonlocal calls
        calls += 1
        release.wait(10)
        raise KeyError("missing")

    errors: list[BaseException] = []

    def worker() -> None:
        try:
            load()
        except KeyError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    wait_until(lambda: load.cache_info().coalesced == 15)
    release.set()
    for thread in threads:
        thread.join(10)
    assert calls == 1
    assert len(errors) == 16


# -- cancellation -----------------------------------------------------------------------------


def test_a_cancelled_waiter_does_not_cancel_the_shared_execution() -> None:
    """Cancelling one follower, or the caller who started the execution, leaves the rest served."""
    started = 0
    finished = 0

    async def main() -> None:
        nonlocal started, finished
        gate = asyncio.Event()

        @cache(60)
        async def load() -> str:
            nonlocal started, finished
            started += 1
            await gate.wait()
            finished += 1
            return "value"

        leader = asyncio.ensure_future(load())
        await asyncio.sleep(0)
        followers = [asyncio.ensure_future(load()) for _ in range(3)]
        await asyncio.sleep(0)
        leader.cancel()
        followers[0].cancel()
        await asyncio.sleep(0)
        gate.set()
        assert await asyncio.gather(*followers[1:]) == ["value", "value"]
        assert leader.cancelled()
        assert followers[0].cancelled()
        assert await load() == "value"  # stored: the execution completed

    asyncio.run(main())
    assert (started, finished) == (1, 1)


def test_when_every_waiter_leaves_the_execution_is_cancelled() -> None:
    """Nobody waiting: the execution is cancelled, and the next caller starts afresh."""
    cancelled = 0

    async def main() -> None:
        nonlocal cancelled
        gate = asyncio.Event()

        @cache(60)
        async def load() -> str:
            nonlocal cancelled
            try:
                await gate.wait()
            except asyncio.CancelledError:
                cancelled += 1
                raise
            return "value"

        waiters = [asyncio.ensure_future(load()) for _ in range(3)]
        await asyncio.sleep(0)
        for waiter in waiters:
            waiter.cancel()
        await settle()
        assert cancelled == 1
        policy_state = load.cache_info()
        assert policy_state.currsize == 0
        gate.set()
        assert await load() == "value"

    asyncio.run(main())


def test_an_execution_that_ends_cancelled_leaves_nobody_hanging() -> None:
    """If the shared execution itself is cancelled, the waiters start over and get a result."""
    calls = 0

    async def main() -> None:
        gate = asyncio.Event()

        @cache(60)
        async def load() -> str:
            nonlocal calls
            calls += 1
            await gate.wait()
            if calls == 1:
                raise asyncio.CancelledError  # e.g. the leader's work was cancelled under it
            return "second"

        waiters = [asyncio.ensure_future(load()) for _ in range(5)]
        while load.cache_info().coalesced < 4:
            await asyncio.sleep(0)
        gate.set()
        assert await asyncio.gather(*waiters) == ["second"] * 5

    asyncio.run(main())
    assert calls == 2


def test_an_interrupted_sync_leader_hands_over_to_a_waiter() -> None:
    """A leader thread hit by a BaseException re-raises it; a follower runs the function again."""

    class Interrupt(BaseException):
        pass

    release = threading.Event()
    calls = 0

    @cache(60)
    def load() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            release.wait(10)
            raise Interrupt
        return "recovered"

    outcomes: list[object] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            value: object = load()
        except Interrupt as exc:
            value = exc
        with lock:
            outcomes.append(value)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_until(lambda: load.cache_info().coalesced == 7)
    release.set()
    for thread in threads:
        thread.join(10)
    assert calls == 2
    assert sum(isinstance(outcome, Interrupt) for outcome in outcomes) == 1
    assert outcomes.count("recovered") == 7


def test_invalidating_during_an_execution_hands_out_but_does_not_store() -> None:
    """A value computed before an invalidation is returned to its waiters, never cached."""
    calls = 0

    async def main() -> None:
        gate = asyncio.Event()

        @cache(60)
        async def load() -> int:
            nonlocal calls
            calls += 1
            number = calls
            await gate.wait()
            return number

        first = asyncio.ensure_future(load())
        await asyncio.sleep(0)
        assert load.invalidate() is False  # nothing stored yet, but the execution is dropped
        second = asyncio.ensure_future(load())  # so this starts a new execution
        await asyncio.sleep(0)
        gate.set()
        assert await first == 1  # its waiters still get the first execution's value
        assert await second == 2
        assert await load() == 2  # only the second one was stored
        assert load.cache_info().currsize == 1

    asyncio.run(main())
    assert calls == 2


# -- serving stale values -----------------------------------------------------------------------


def test_stale_while_revalidate_async() -> None:
    """Inside the window an expired value is served at once while ONE refresh runs."""
    clock = FakeClock()
    behaviour = Counted()

    async def main() -> None:
        gate = asyncio.Event()
        gate.set()

        @cache(10, stale_while_revalidate=5, clock=clock)
        async def load() -> str:
            await gate.wait()
            return behaviour()

        assert await load() == "v1"
        clock.advance(12)
        gate.clear()
        with capture_events() as events:
            assert [await load() for _ in range(5)] == ["v1"] * 5  # no waiting
        assert sum(isinstance(event, CacheStaleServed) for event in events) == 5
        assert events[0].reason == "revalidating"  # type: ignore[attr-defined]
        gate.set()
        await settle()
        assert behaviour.calls == 2  # exactly one refresh
        assert await load() == "v2"
        info = load.cache_info()
        assert (info.stale, info.refreshes, info.misses) == (5, 1, 1)
        clock.advance(16)  # past ttl + window: a plain miss again
        assert await load() == "v3"

    asyncio.run(main())


def test_stale_while_revalidate_sync() -> None:
    """Sync callers get the stale value; the refresh runs on a background thread."""
    clock = FakeClock()
    behaviour = Counted()
    refresh_may_finish = threading.Event()
    refresh_may_finish.set()

    @cache(10, stale_while_revalidate=5, clock=clock)
    def load() -> str:
        refresh_may_finish.wait(10)
        return behaviour()

    assert load() == "v1"
    clock.advance(11)
    refresh_may_finish.clear()
    assert load() == "v1"
    assert load() == "v1"
    assert load.cache_info().refreshes == 1
    refresh_may_finish.set()
    join_refreshes()
    assert load() == "v2"
    assert behaviour.calls == 2


def test_a_failing_refresh_keeps_serving_stale_and_reports_it() -> None:
    """A failed background refresh emits CacheRefreshFailed; the stale value stays."""
    clock = FakeClock()
    behaviour = Counted()

    async def main() -> None:
        @cache(10, stale_while_revalidate=30, clock=clock, name="rates")
        async def load() -> str:
            return behaviour()

        assert await load() == "v1"
        clock.advance(15)
        behaviour.fail = ConnectionError("down")
        with capture_events() as events:
            assert await load() == "v1"
            await settle()
            assert await load() == "v1"  # still within the window; a new refresh starts
            await settle()
        failures = [event for event in events if isinstance(event, CacheRefreshFailed)]
        assert len(failures) == 2
        assert isinstance(failures[0].error, ConnectionError)
        state = buttress.state()["cache"]["rates"]
        assert (state["errors"], state["refreshes"], state["stale"]) == (2, 2, 2)
        behaviour.fail = None
        await load()
        await settle()
        assert await load() == "v4"

    asyncio.run(main())


def test_stale_if_error_serves_the_last_good_value_for_a_bounded_time(face: Any) -> None:
    """A failed load falls back to the expired value until ttl + stale_if_error."""
    clock = FakeClock()
    behaviour = Counted()
    call = face.wrap(cache(10, stale_if_error=60, clock=clock), behaviour)
    assert call() == "v1"
    behaviour.fail = ConnectionError("down")
    clock.advance(30)
    with capture_events() as events:
        assert call() == "v1"
    assert [event.reason for event in events if isinstance(event, CacheStaleServed)] == ["error"]
    clock.advance(39.9)  # 69.9 s old: still inside ttl + stale_if_error
    assert call() == "v1"
    clock.advance(0.1)
    with pytest.raises(ConnectionError):
        call()
    behaviour.fail = None
    assert call() == "v5"


def test_stale_if_error_is_shared_by_coalesced_waiters() -> None:
    """Every waiter of a failed execution gets the stale value, counted once each."""
    clock = FakeClock()

    async def main() -> None:
        gate = asyncio.Event()
        fail = False

        @cache(10, stale_if_error=60, clock=clock)
        async def load() -> str:
            await gate.wait()
            if fail:
                raise ConnectionError("down")
            return "good"

        gate.set()
        assert await load() == "good"
        gate.clear()
        fail = True
        clock.advance(20)
        tasks = [asyncio.ensure_future(load()) for _ in range(4)]
        while load.cache_info().coalesced < 3:
            await asyncio.sleep(0)
        gate.set()
        assert await asyncio.gather(*tasks) == ["good"] * 4
        info = load.cache_info()
        assert (info.stale, info.errors) == (4, 1)

    asyncio.run(main())


# -- composition, state, validation -----------------------------------------------------------


def test_cache_outside_a_retry_caches_the_recovered_value(clock: FakeClock, flaky: Any) -> None:
    """pipeline(cache, retry): a hit skips the retries; a miss retries, then stores."""
    behaviour = flaky(ConnectionError("1"), value="ok")
    call = pipeline(cache(60, clock=clock), retry(3, on=ConnectionError, clock=clock))(behaviour)
    assert call() == "ok"
    assert call() == "ok"
    assert behaviour.calls == 2


def test_cache_cannot_guard_a_block(clock: FakeClock) -> None:
    """A cache needs a function's result, so a pipeline with one cannot guard a block."""
    with pytest.raises(TypeError, match="cannot guard a block"), pipeline(cache(60, clock=clock)):
        pass


def test_named_cache_is_in_state(clock: FakeClock) -> None:
    """A named cache shows its configuration and counters in buttress.state()."""
    policy = cache(60, maxsize=10, stale_while_revalidate=5, name="users", clock=clock)
    call = policy(Counted())
    call(1)
    call(1)
    state = buttress.state()["cache"]["users"]
    json.dumps(state)
    assert state == {
        "kind": "cache",
        "name": "users",
        "ttl": 60.0,
        "maxsize": 10,
        "stale_while_revalidate": 5.0,
        "stale_if_error": None,
        "size": 1,
        "in_flight": 0,
        "hits": 1,
        "misses": 1,
        "coalesced": 0,
        "stale": 0,
        "errors": 0,
        "refreshes": 0,
    }
    assert buttress.health()["status"] == "pass"


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"ttl": 0}, ValueError, "ttl must be a finite number of seconds > 0, got 0"),
        ({"ttl": -1}, ValueError, "ttl must be"),
        ({"ttl": "60"}, TypeError, "ttl must be a number of seconds"),
        ({"ttl": 1, "maxsize": 0}, ValueError, "maxsize must be >= 1, got 0"),
        ({"ttl": 1, "maxsize": 1.5}, TypeError, "maxsize must be an integer"),
        ({"ttl": 1, "key": "id"}, TypeError, "key must be callable"),
        ({"ttl": 1, "typed": 1}, TypeError, "typed must be True or False"),
        ({"ttl": 1, "stale_while_revalidate": -5}, ValueError, "stale_while_revalidate must be"),
        ({"ttl": 1, "stale_if_error": float("nan")}, ValueError, "stale_if_error must be"),
    ],
)
def test_options_are_validated(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Bad options raise ConfigTypeError/ConfigValueError naming the parameter and value."""
    with pytest.raises(error, match=message) as info:
        cache(**options)
    assert isinstance(info.value, buttress.ConfigError)


def test_without_cachetools_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """import buttress works without cachetools; building a cache says which extra to install."""
    monkeypatch.setitem(sys.modules, "cachetools", None)
    with pytest.raises(MissingExtraError, match=r"buttress\[cache\]") as info:
        cache(60)
    assert isinstance(info.value, ImportError)
    assert isinstance(info.value, buttress.ButtressError)


def test_import_buttress_does_not_import_cachetools() -> None:
    """cachetools is imported lazily, by the first cache built."""
    import subprocess

    code = "import sys, buttress; assert 'cachetools' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("is_async", [False, True])
def test_a_shared_error_leaves_no_reference_cycle(is_async: bool) -> None:
    """After a failed call the cache is freed by reference counting alone (no gc needed)."""
    import gc
    import weakref

    policy = cache(60)

    def boom() -> None:
        raise KeyError("k")

    async def aboom() -> None:
        raise KeyError("k")

    gc.disable()
    try:
        decorated: Any = policy(aboom if is_async else boom)

        async def call_async(function: Any) -> None:
            with pytest.raises(KeyError):  # inside the task: asyncio keeps nothing
                await function()

        if is_async:
            asyncio.run(call_async(decorated))
        else:
            with pytest.raises(KeyError):
                decorated()
        ref = weakref.ref(policy)
        del policy, decorated
        assert ref() is None
    finally:
        gc.enable()


def test_methods_are_cached_per_instance_and_arguments(clock: FakeClock) -> None:
    """A cached method keys on self too; invalidate it through the class."""

    class Repo:
        def __init__(self, prefix: str) -> None:
            self.prefix = prefix
            self.calls = 0

        @cache(60, clock=clock)
        def find(self, key: int) -> str:
            self.calls += 1
            return f"{self.prefix}{key}"

    first, second = Repo("a"), Repo("b")
    assert first.find(1) == first.find(1) == "a1"
    assert second.find(1) == "b1"
    assert (first.calls, second.calls) == (1, 1)
    assert first.find.cache_info().currsize == 2
    assert Repo.find.invalidate(first, 1)
    assert first.find(1) == "a1"
    assert first.calls == 2
