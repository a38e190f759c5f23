"""The permission protocol: breaker and bulkhead permits, store kinds, per-caller leases."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import buttress
from buttress import Bulkhead, BulkheadFull, CircuitBreaker, CircuitOpenError, RateLimiter
from buttress.backends import (
    BreakerStore,
    BulkheadStore,
    LimiterStore,
)
from buttress.backends.memory import MemoryBreakerStore, MemoryBulkheadStore, MemoryLimiterStore
from buttress.backends.redis import RedisBreakerStore, RedisBulkheadStore, RedisRateLimiterStore
from buttress.permit import Permit
from buttress.testing import FakeClock


class Boom(Exception):
    """A failure the breaker counts."""


class Ignored(Exception):
    """An error the breaker is told to ignore."""


# -- breaker permits --------------------------------------------------------------------------


def test_a_breaker_permit_settles_exactly_once(clock: FakeClock) -> None:
    """success, failure and release settle a permit; a second settlement raises."""
    breaker = CircuitBreaker(failure_threshold=2, clock=clock)
    for settle in (
        lambda p: p.success(),
        lambda p: p.failure(Boom()),
        lambda p: p.release(),
    ):
        permit = breaker.acquire()
        assert not permit.settled
        settle(permit)
        assert permit.settled
        for again in (permit.success, permit.release, permit.failure):
            with pytest.raises(RuntimeError, match="already settled"):
                again()
    snap = breaker.snapshot()
    assert (snap["successes"], snap["failures"], snap["neutral"]) == (1, 1, 1)
    assert breaker.state == "closed"  # the success between ended no streak of two


def test_failures_on_permits_open_the_circuit_and_rejections_raise(clock: FakeClock) -> None:
    """Permit failures count like decorated failures; an open circuit refuses acquire()."""
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=10, clock=clock)
    breaker.acquire().failure(Boom())
    breaker.acquire().failure()  # a failure without an exception (say, a 503 response)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError) as info:
        breaker.acquire()
    assert info.value.retry_after == pytest.approx(10)
    assert info.value.reason == "circuit_open"
    assert breaker.snapshot()["rejections"] == 1


def test_permit_classifies_errors_like_the_decorator(clock: FakeClock) -> None:
    """Excluded errors, predicates, rejections and cancellation are neutral on a permit too."""
    breaker = CircuitBreaker(
        failure_threshold=1,
        exclude=[Ignored, lambda e: getattr(e, "status", 500) < 500],
        clock=clock,
    )
    client_error = Boom()
    client_error.status = 404  # type: ignore[attr-defined]
    for neutral in (Ignored(), client_error, buttress.BulkheadFull("x"), asyncio.CancelledError()):
        breaker.acquire().failure(neutral)
    assert breaker.state == "closed"
    assert breaker.snapshot()["neutral"] == 4
    breaker.acquire().failure(Boom())
    assert breaker.state == "open"


def test_a_permit_as_context_manager_settles_from_the_block(clock: FakeClock) -> None:
    """with permit: a clean exit is a success, an error a failure; settling by hand wins."""
    breaker = CircuitBreaker(failure_threshold=1, clock=clock)
    with breaker.acquire():
        pass
    with breaker.acquire() as permit:
        permit.release()  # settled inside the block: the exit adds nothing
    with pytest.raises(Boom), breaker.acquire():
        raise Boom
    snap = breaker.snapshot()
    assert (snap["successes"], snap["neutral"], snap["failures"]) == (1, 1, 1)
    assert breaker.state == "open"


def test_slow_successes_on_permits_count_as_failures(clock: FakeClock) -> None:
    """duration= (or the time since acquisition) decides whether a success was slow."""
    breaker = CircuitBreaker(failure_threshold=2, slow_call_duration=1.0, clock=clock)
    breaker.acquire().success(duration=2.5)
    permit = breaker.acquire()
    clock.advance(1.5)
    permit.success()  # measured: 1.5 s since acquire()
    assert breaker.state == "open"
    assert breaker.snapshot()["slow_calls"] == 2
    with pytest.raises(ValueError, match="duration must be"):
        CircuitBreaker(clock=clock).acquire().success(duration=-1)


def test_outcomes_of_permits_taken_before_a_transition_never_move_the_state(
    clock: FakeClock,
) -> None:
    """Generation tokens: a late outcome only updates the counters."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, clock=clock)
    before = breaker.acquire()
    breaker.acquire().failure(Boom())
    clock.advance(5)
    probe = breaker.acquire()
    assert breaker.state == "half_open"
    before.success()  # admitted while closed, two generations ago
    assert breaker.state == "half_open"
    probe.success()
    assert breaker.state == "closed"
    late = breaker.acquire()
    breaker.open()
    late.failure(Boom())  # a generation behind the forced open: changes nothing
    breaker.close()
    assert breaker.state == "closed"


def test_async_permits_settle_like_sync_ones(clock: FakeClock) -> None:
    """acquire_async and the _async settlements, and async with, match the sync face."""
    breaker = CircuitBreaker(failure_threshold=2, clock=clock)

    async def main() -> None:
        permit = await breaker.acquire_async()
        await permit.success_async()
        with pytest.raises(RuntimeError, match="already settled"):
            await permit.release_async()
        await (await breaker.acquire_async()).failure_async(Boom())
        await (await breaker.acquire_async()).release_async()
        with pytest.raises(Boom):
            async with await breaker.acquire_async():
                raise Boom

    asyncio.run(main())
    snap = breaker.snapshot()
    assert (snap["successes"], snap["failures"], snap["neutral"]) == (1, 2, 1)
    assert breaker.state == "open"


def test_two_threads_cannot_both_settle_one_permit(clock: FakeClock) -> None:
    """Settling is atomic: of many racing settlements exactly one wins."""
    bulkhead = Bulkhead(max_concurrent=1, clock=clock)

    def settle(
        n: int,
        permit: Permit,
        barrier: threading.Barrier,
        wins: list[int],
        errors: list[BaseException],
    ) -> None:
        barrier.wait()
        try:
            permit.release()
            wins.append(n)
        except RuntimeError as exc:
            errors.append(exc)

    for _ in range(50):
        permit = bulkhead.acquire()
        wins: list[int] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)
        threads = [
            threading.Thread(target=settle, args=(n, permit, barrier, wins, errors))
            for n in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(wins) == 1 and len(errors) == 3
        assert bulkhead.in_flight == 0


# -- bulkhead permits: each caller frees its own lease ----------------------------------------


class RecordingBulkheadStore:
    """A bulkhead store whose leases are named, recording which lease each release frees."""

    def __init__(self) -> None:
        self.issued = 0
        self.released: list[str] = []
        self.held: set[str] = set()
        self.limit = 0

    def bind_bulkhead(self, bulkhead: Bulkhead) -> RecordingBulkheadStore:
        self.limit = bulkhead.max_concurrent
        return self

    def _take(self) -> str | None:
        if len(self.held) >= self.limit:
            return None
        self.issued += 1
        lease = f"lease-{self.issued}"
        self.held.add(lease)
        return lease

    def try_acquire(self) -> object | None:
        return self._take()

    def acquire(self, timeout: float | None) -> object:
        lease = self._take()
        if lease is None:
            raise BulkheadFull("full", reason="bulkhead_full")
        return lease

    async def acquire_async(self, timeout: float | None) -> object:
        return self.acquire(timeout)

    def release(self, lease: object) -> None:
        assert isinstance(lease, str)
        self.held.remove(lease)
        self.released.append(lease)

    async def release_async(self, lease: object) -> None:
        self.release(lease)

    def in_use(self) -> int | None:
        return len(self.held)

    def snapshot(self) -> dict[str, Any]:
        return {"held": sorted(self.held)}


def test_with_bulkhead_frees_the_lease_of_the_task_that_exits() -> None:
    """Two tasks inside `async with bulkhead`: the first to leave frees its own lease."""
    store = RecordingBulkheadStore()
    bulkhead = Bulkhead("pool", max_concurrent=2, store=store)
    first_in, second_in, first_may_leave = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def first() -> None:
        async with bulkhead:
            first_in.set()
            await first_may_leave.wait()

    async def second() -> None:
        await first_in.wait()
        async with bulkhead:
            second_in.set()
            await asyncio.sleep(0.01)

    async def main() -> None:
        tasks = [asyncio.ensure_future(first()), asyncio.ensure_future(second())]
        await second_in.wait()
        first_may_leave.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert store.released == ["lease-1", "lease-2"]  # the first task's lease first
    assert bulkhead.in_flight == 0


def test_threads_in_with_bulkhead_free_their_own_leases() -> None:
    """Threads that enter in one order and leave in another free exactly their leases."""
    store = RecordingBulkheadStore()
    bulkhead = Bulkhead("pool", max_concurrent=2, store=store)
    entered = threading.Barrier(2)
    leases: dict[int, str] = {}
    order = [threading.Event(), threading.Event()]

    def worker(n: int) -> None:
        with bulkhead:
            leases[n] = f"lease-{len(leases) + 1}"
            entered.wait()
            order[n].wait()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
    threads[0].start()
    while not leases:
        pass
    threads[1].start()
    while len(leases) < 2:
        pass
    order[1].set()
    threads[1].join()
    assert store.released == [leases[1]]  # the second thread left first, with its lease
    order[0].set()
    threads[0].join()
    assert store.released == [leases[1], leases[0]]


def test_a_permit_from_try_acquire_holds_the_slot_until_settled() -> None:
    """try_acquire gives a permit or None; any settlement frees the slot once."""
    bulkhead = Bulkhead(max_concurrent=1)
    permit = bulkhead.try_acquire()
    assert permit is not None and bulkhead.try_acquire() is None
    permit.failure(Boom())  # the bulkhead does not judge outcomes: the slot is free
    assert bulkhead.in_flight == 0
    with bulkhead.acquire(), pytest.raises(BulkheadFull) as info:
        bulkhead.acquire()
    assert info.value.reason == "bulkhead_full"
    assert bulkhead.snapshot()["rejected"] == 1


# -- store kinds, checked when built ----------------------------------------------------------


REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: CircuitBreaker("b", store=RedisRateLimiterStore(REDIS_URL)), "breaker store"),
        (lambda: CircuitBreaker("b", store=MemoryBulkheadStore()), "breaker store"),
        (lambda: RateLimiter("l", rate=1, store=RedisBreakerStore(REDIS_URL)), "limiter store"),
        (
            lambda: Bulkhead("h", max_concurrent=1, store=RedisRateLimiterStore(REDIS_URL)),
            "bulkhead store",
        ),
        (lambda: Bulkhead("h", max_concurrent=1, store="redis://x"), "bulkhead store"),
    ],
)
def test_a_store_of_the_wrong_kind_is_refused_when_the_primitive_is_built(
    build: Any, expected: str
) -> None:
    """store= must be a store of the primitive's kind: ConfigTypeError naming store=."""
    with pytest.raises(buttress.ConfigTypeError, match=f"store must be a .*{expected}"):
        build()


def test_the_store_protocols_recognise_the_shipped_stores() -> None:
    """The runtime-checkable Protocols match the stores buttress ships, and only those."""
    assert isinstance(RedisBreakerStore(REDIS_URL), BreakerStore)
    assert isinstance(MemoryBreakerStore(), BreakerStore)
    assert isinstance(RedisBulkheadStore(REDIS_URL), BulkheadStore)
    assert isinstance(MemoryBulkheadStore(), BulkheadStore)
    assert isinstance(RedisRateLimiterStore(REDIS_URL), LimiterStore)
    assert isinstance(MemoryLimiterStore(), LimiterStore)
    assert not isinstance(RedisRateLimiterStore(REDIS_URL), BreakerStore)
    assert isinstance(RecordingBulkheadStore(), BulkheadStore)


@pytest.mark.parametrize(
    "url",
    [
        "not-a-url",
        "http://127.0.0.1:6379/0",
        "redis://127.0.0.1:notaport/0",
        "redis://127.0.0.1:70000/0",
        "redis://127.0.0.1:6379/db",
        "unix://",
    ],
)
def test_a_malformed_redis_url_is_refused_when_the_store_is_built(url: str) -> None:
    """ConfigValueError naming url, before any call (never redis-py's bare ValueError later)."""
    for kind in (RedisBreakerStore, RedisBulkheadStore, RedisRateLimiterStore):
        with pytest.raises(buttress.ConfigValueError, match="url must"):
            kind(url)
    with pytest.raises(buttress.ConfigTypeError, match="url must"):
        RedisBreakerStore(6379)  # type: ignore[arg-type]


def test_memory_stores_share_state_by_name_and_refuse_other_settings() -> None:
    """Two breakers bound to one memory store by name share a circuit; settings must match."""
    store = MemoryBreakerStore()
    here = CircuitBreaker("dep", failure_threshold=1, store=store, registry=buttress.Registry())
    there = CircuitBreaker("dep", failure_threshold=1, store=store, registry=buttress.Registry())
    here.acquire().failure(Boom())
    assert there.state == "open"
    with pytest.raises(CircuitOpenError):
        there.acquire()
    with pytest.raises(buttress.ConfigValueError, match="other settings"):
        CircuitBreaker("dep", failure_threshold=3, store=store, registry=buttress.Registry())
    with pytest.raises(buttress.ConfigValueError, match="needs a name"):
        CircuitBreaker(store=store)


def test_a_predicate_that_raises_does_not_match_and_leaks_no_probe(clock: FakeClock) -> None:
    """exclude=[lambda e: e.status < 500] given an error without status: not excluded, so
    the probe fails and reopens the circuit instead of holding its slot for good."""
    breaker = CircuitBreaker(
        failure_threshold=1,
        reset_timeout=5,
        exclude=[lambda e: e.status < 500],  # type: ignore[attr-defined]
        clock=clock,
    )
    breaker.acquire().failure(ConnectionError("down"))
    assert breaker.state == "open"
    clock.advance(5)
    with pytest.raises(ConnectionError), breaker:
        raise ConnectionError("still down")
    assert breaker.state == "open"  # the probe counted as a failure
    clock.advance(5)
    breaker.acquire().success()  # a new probe is admitted: nothing was left holding one
    assert breaker.state == "closed"


def test_with_bulkhead_in_interleaved_generators_frees_each_ones_own_lease() -> None:
    """Two generators inside `with bulkhead:`, advanced in turn in one thread: the first to
    finish frees its own lease, not the other's."""
    store = RecordingBulkheadStore()
    bulkhead = Bulkhead("pool", max_concurrent=2, store=store)

    def stream() -> Iterator[int]:
        with bulkhead:
            yield 1
            yield 2

    first, second = stream(), stream()
    next(first)  # takes lease-1
    next(second)  # takes lease-2
    assert list(first) == [2]  # first leaves its block
    assert store.released == ["lease-1"]
    assert list(second) == [2]
    assert store.released == ["lease-1", "lease-2"]


def test_a_store_class_instead_of_a_store_is_refused_naming_store() -> None:
    """store=RedisBreakerStore (the class, not built) is a ConfigTypeError naming store=."""
    with pytest.raises(buttress.ConfigTypeError, match="store must be a store instance"):
        CircuitBreaker("x", store=RedisBreakerStore)
    with pytest.raises(buttress.ConfigTypeError, match="MemoryLimiterStore"):
        RateLimiter("y", rate=1, store=MemoryLimiterStore)


def test_a_subclass_of_the_in_process_breaker_hears_every_outcome() -> None:
    """The lock-free path (which skips settle() on a plain success) is LocalBreaker's own:
    a binding that subclasses it to add behaviour is settled on every call."""
    from buttress.circuit_breaker import LocalBreaker
    from services import BindingStore

    heard: list[str] = []

    class Recording(LocalBreaker):
        def settle(self, token: int, outcome: Any) -> None:
            heard.append(outcome)
            super().settle(token, outcome)

    breaker = CircuitBreaker(
        "recorded", store=BindingStore(Recording), registry=buttress.Registry()
    )
    guarded = breaker(lambda: "ok")
    assert [guarded() for _ in range(3)] == ["ok"] * 3
    assert heard == ["success"] * 3
