"""The Redis stores, against the real Redis server (never a mock): shared limits, breaker
state, bulkhead leases and saga idempotency across instances and across OS processes, the
round trips they cost, and what happens when Redis goes away and comes back."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from hypothesis import given
from hypothesis import strategies as st

import buttress
from buttress import (
    BackendUnavailable,
    Bulkhead,
    BulkheadFull,
    CircuitBreaker,
    CircuitOpenError,
    RateLimited,
    RateLimiter,
    Registry,
    Saga,
    pipeline,
    retry,
)
from buttress.backends import IdempotencyStore, SagaStore
from buttress.backends.redis import (
    RedisBreakerStore,
    RedisBulkheadStore,
    RedisIdempotencyStore,
    RedisRateLimiterStore,
)
from buttress.testing import capture_events
from services import Stores

HERE = Path(__file__).resolve().parent


@pytest.fixture
def stores(redis_url: str, redis_prefix: str) -> Iterator[Stores]:
    made = Stores(redis_url, redis_prefix)
    yield made
    made.close()


class Counting:
    """A redis.Redis stand-in that counts commands (each one is a round trip)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.commands: list[str] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(str(args[0]))
        return self.client.execute_command(*args, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def count_round_trips(store: Any) -> Counting:
    counting = Counting(store._conn.sync())
    store._conn._client = counting
    return counting


def other_process(*, registry: bool = True) -> dict[str, Any]:
    """Options that make a second primitive of the same name, as another process would."""
    return {"registry": Registry()} if registry else {}


# -- rate limiter -----------------------------------------------------------------------------


def test_limiter_shares_one_budget_between_instances(stores: Stores) -> None:
    a = RateLimiter("api", rate=10, burst=5, max_wait=0, store=stores(RedisRateLimiterStore))
    b = RateLimiter(
        "api", rate=10, burst=5, max_wait=0, store=stores(RedisRateLimiterStore), **other_process()
    )
    admitted = 0
    for limiter in (a, b) * 5:
        if limiter.try_acquire():
            admitted += 1
    assert admitted == 5  # the burst, shared: not 5 each
    with pytest.raises(RateLimited) as caught:
        b.acquire()
    assert 0 < caught.value.retry_after <= 0.1 + 1e-3
    assert a.snapshot()["store"]["key"] == f"{stores.prefix}{{rl:api}}"


def test_limiter_acquire_is_exactly_one_round_trip(stores: Stores) -> None:
    store = stores(RedisRateLimiterStore)
    limiter = RateLimiter("api", rate=1000, burst=1000, store=store)
    limiter.acquire()  # loads the script once
    counting = count_round_trips(store)
    for _ in range(50):
        limiter.acquire()
    assert counting.commands == ["EVALSHA"] * 50


def test_limiter_reserves_and_waits_for_its_slot(stores: Stores) -> None:
    limiter = RateLimiter("api", rate=20, burst=1, store=stores(RedisRateLimiterStore))
    started = time.monotonic()
    for _ in range(5):
        limiter.acquire()
    elapsed = time.monotonic() - started
    assert 0.19 <= elapsed < 1.0  # 4 intervals of 50 ms after the first admission
    assert limiter.snapshot()["waited"] >= 3


def test_limiter_rejects_at_once_when_the_wait_exceeds_max_wait(stores: Stores) -> None:
    limiter = RateLimiter("api", rate=1, burst=1, max_wait=0.5, store=stores(RedisRateLimiterStore))
    limiter.acquire()
    started = time.monotonic()
    with pytest.raises(RateLimited) as caught:
        limiter.acquire()
    assert time.monotonic() - started < 0.2  # no pointless wait
    assert 0.9 < caught.value.retry_after <= 1.0


def test_limiter_weights_and_keys(stores: Stores) -> None:
    limiter = RateLimiter("api", rate=10, burst=10, max_wait=0, store=stores(RedisRateLimiterStore))
    alice, bob = limiter.for_key("alice"), limiter.for_key("bob")
    alice.acquire(7)
    assert not alice.try_acquire(4)
    assert alice.try_acquire(3)
    assert bob.try_acquire(10)  # bob's budget is his own
    other = RateLimiter(
        "api", rate=10, burst=10, max_wait=0, store=stores(RedisRateLimiterStore), **other_process()
    )
    assert not other.for_key("alice").try_acquire(1)
    assert alice.snapshot()["store"]["key"] == f"{stores.prefix}{{rl:api}}"
    assert 0 <= alice.tokens() < 1


def test_limiter_async_face_and_cancelled_waiter_gives_its_slot_back(stores: Stores) -> None:
    store = stores(RedisRateLimiterStore)
    limiter = RateLimiter("api", rate=2, burst=1, store=store)

    async def main() -> None:
        await limiter.acquire_async()
        waiter = asyncio.create_task(limiter.acquire_async())  # reserves the slot at +0.5 s
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        # the reservation was the last one, so it was given back: the next caller gets
        # the +0.5 s slot, not the +1.0 s one
        started = time.monotonic()
        await limiter.acquire_async()
        assert time.monotonic() - started < 0.6
        await store.aclose()

    asyncio.run(main())


def test_limiter_decorates_sync_and_async_functions(stores: Stores) -> None:
    store = stores(RedisRateLimiterStore)
    limiter = RateLimiter("api", rate=1000, burst=3, max_wait=0, store=store)

    @limiter
    def ping() -> str:
        return "pong"

    @limiter
    async def aping() -> str:
        return "pong"

    async def amain() -> str:
        try:
            return await aping()
        finally:
            await store.aclose()

    assert ping() == "pong"
    assert asyncio.run(amain()) == "pong"
    assert buttress.state()["rate_limiter"]["api"]["admitted"] == 2


def test_limiter_needs_a_name_with_a_store(stores: Stores) -> None:
    with pytest.raises(ValueError, match="needs a name"):
        RateLimiter(rate=1, store=stores(RedisRateLimiterStore))


def _windows_over(
    admissions: list[tuple[float, float]], rate: float, burst: int, width: float
) -> int:
    """Worst excess over the GCRA bound in any window of ``width`` seconds, counting only
    admissions that certainly fell inside it (their whole (before, after) interval)."""
    admissions = sorted(admissions)
    bound = burst + rate * width
    worst = float("-inf")
    j = 0
    for i, (start, _) in enumerate(admissions):
        # admissions whose interval lies within [start, start + width]
        while j < len(admissions) and admissions[j][0] < start:
            j += 1
        inside = sum(
            1 for before, after in admissions[i:] if before >= start and after <= start + width
        )
        worst = max(worst, inside - bound)
    return int(worst) if worst != float("-inf") else 0


@pytest.mark.slow
def test_four_processes_never_exceed_the_shared_rate(redis_url: str, redis_prefix: str) -> None:
    rate, burst, seconds = 200.0, 10, 3.0
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 1.5  # let the processes start
    import redis_workers

    with ctx.Pool(4) as pool:
        parts = pool.starmap(
            redis_workers.limiter_worker,
            [(redis_url, redis_prefix, rate, burst, seconds, start)] * 4,
        )
    admissions = sorted(a for part in parts for a in part)
    assert all(part for part in parts), "every process got admissions"
    for width in (0.05, 0.25, 1.0):
        assert _windows_over(admissions, rate, burst, width) <= 0, f"over the bound in {width}s"
    # a loaded machine may start the processes late: count from the first admission
    span = start + seconds - max(start, admissions[0][0])
    allowed = burst + rate * span
    assert len(admissions) >= 0.95 * allowed, (len(admissions), allowed)
    assert len(admissions) <= burst + rate * seconds


# -- circuit breaker -------------------------------------------------------------------------


def _fail() -> None:
    raise ConnectionError("down")


def _call(breaker: CircuitBreaker, fn: Callable[[], Any]) -> Any:
    return breaker(fn)()


def test_a_transition_in_one_process_is_seen_by_the_others(stores: Stores) -> None:
    a = CircuitBreaker(
        "dep", failure_threshold=3, reset_timeout=60, store=stores(RedisBreakerStore)
    )
    b = CircuitBreaker(
        "dep",
        failure_threshold=3,
        reset_timeout=60,
        store=stores(RedisBreakerStore),
        **other_process(),
    )
    for _ in range(3):
        with pytest.raises(ConnectionError):
            _call(a, _fail)
    with pytest.raises(CircuitOpenError) as caught:
        _call(b, lambda: "never runs")
    assert 59 < caught.value.retry_after <= 60
    assert b.state == "open"
    assert a.snapshot()["state"] == "open"
    b.close()  # operator control reaches every process
    assert _call(a, lambda: "ok") == "ok"


def test_forcing_a_shared_breaker_emits_each_transition_once(stores: Stores) -> None:
    """open() and close() each emit one transition, none from the in-process fallback."""
    breaker = CircuitBreaker("forced", store=stores(RedisBreakerStore))
    with capture_events() as events:
        breaker.open()
        breaker.close()
    moves = [(e.old, e.new) for e in events if isinstance(e, buttress.events.CircuitStateChanged)]
    assert moves == [("closed", "open"), ("open", "closed")]


def test_failures_from_several_processes_add_up(stores: Stores) -> None:
    breakers = [
        CircuitBreaker(
            "dep",
            failure_threshold=4,
            reset_timeout=60,
            store=stores(RedisBreakerStore),
            **other_process(),
        )
        for _ in range(4)
    ]
    for breaker in breakers:
        with pytest.raises(ConnectionError):
            _call(breaker, _fail)
    assert all(breaker.state == "open" for breaker in breakers)


def test_half_open_probe_slots_are_global(stores: Stores) -> None:
    options = {"failure_threshold": 1, "reset_timeout": 0.2, "half_open_max_calls": 1}
    a = CircuitBreaker("dep", store=stores(RedisBreakerStore), **options)
    b = CircuitBreaker("dep", store=stores(RedisBreakerStore), **options, **other_process())
    with pytest.raises(ConnectionError):
        _call(a, _fail)
    time.sleep(0.25)
    # a takes the only probe slot, so b may not probe as well
    with a, pytest.raises(CircuitOpenError, match="probe slots are taken"), b:
        pass
    assert b.state == "closed"  # a's probe succeeded and closed it for everyone


def test_probe_slots_of_a_dead_process_are_granted_again_after_the_lease(stores: Stores) -> None:
    options = {"failure_threshold": 1, "reset_timeout": 0.1}
    a = CircuitBreaker("dep", store=stores(RedisBreakerStore, probe_lease=0.3), **options)
    b = CircuitBreaker(
        "dep", store=stores(RedisBreakerStore, probe_lease=0.3), **options, **other_process()
    )
    with pytest.raises(ConnectionError):
        _call(a, _fail)
    time.sleep(0.15)
    a.__enter__()  # takes the probe and never reports back (its process "dies")
    with pytest.raises(CircuitOpenError):
        _call(b, lambda: "ok")
    time.sleep(0.35)
    assert _call(b, lambda: "ok") == "ok"
    assert b.state == "closed"


def test_failure_rate_mode_is_shared(stores: Stores) -> None:
    options = {"failure_rate": 0.5, "window": 10, "minimum_calls": 4, "reset_timeout": 60}
    a = CircuitBreaker("dep", store=stores(RedisBreakerStore), **options)
    b = CircuitBreaker("dep", store=stores(RedisBreakerStore), **options, **other_process())
    assert _call(a, lambda: 1) == 1
    assert _call(b, lambda: 1) == 1
    with pytest.raises(ConnectionError):
        _call(a, _fail)
    assert a.state == "closed"  # 1 failure in 3 calls (below minimum_calls anyway)
    with pytest.raises(ConnectionError):
        _call(b, _fail)
    assert a.state == "open"  # 2 of 4 calls across both processes
    assert a.snapshot()["failure_rate"] == 0.5


def test_closed_breaker_call_is_one_round_trip(stores: Stores) -> None:
    store = stores(RedisBreakerStore)
    breaker = CircuitBreaker("dep", failure_rate=0.5, store=store)
    _call(breaker, lambda: 1)  # loads the script
    counting = count_round_trips(store)
    protected = breaker(lambda: 1)
    for _ in range(20):
        protected()
    assert counting.commands == ["EVALSHA"] * 20
    breaker.snapshot()  # reports the buffered successes
    assert breaker.snapshot()["window_calls"] == 21


def test_bounded_staleness_makes_closed_calls_free(stores: Stores) -> None:
    store = stores(RedisBreakerStore, max_staleness=0.2)
    breaker = CircuitBreaker("dep", failure_threshold=2, reset_timeout=60, store=store)
    other = CircuitBreaker(
        "dep",
        failure_threshold=2,
        reset_timeout=60,
        store=stores(RedisBreakerStore),
        **other_process(),
    )
    protected = breaker(lambda: 1)
    protected()
    counting = count_round_trips(store)
    for _ in range(100):
        protected()
    assert counting.commands == []  # zero round trips within the staleness bound
    for _ in range(2):
        with pytest.raises(ConnectionError):
            _call(other, _fail)
    time.sleep(0.25)  # past the bound, this process sees the other's transition
    with pytest.raises(CircuitOpenError):
        protected()


def test_async_face_of_the_shared_breaker(stores: Stores) -> None:
    store = stores(RedisBreakerStore)
    breaker = CircuitBreaker("dep", failure_threshold=2, reset_timeout=60, store=store)

    @breaker
    async def call(fail: bool) -> str:
        if fail:
            raise ConnectionError("down")
        return "ok"

    async def main() -> None:
        assert await call(False) == "ok"
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await call(True)
        with pytest.raises(CircuitOpenError):
            await call(False)
        with pytest.raises(CircuitOpenError):
            async with breaker:
                pass
        await store.aclose()

    asyncio.run(main())


def test_rejections_of_inner_primitives_stay_neutral(stores: Stores) -> None:
    breaker = CircuitBreaker("dep", failure_threshold=1, store=stores(RedisBreakerStore))
    limiter = RateLimiter("inner", rate=1, max_wait=0)
    protected = pipeline(breaker, limiter)(lambda: 1)
    protected()
    with pytest.raises(RateLimited):
        protected()
    assert breaker.state == "closed"


@pytest.mark.slow
def test_four_processes_send_no_more_than_the_probe_budget(
    redis_url: str, redis_prefix: str
) -> None:
    seconds = 2.0
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 1.5
    import redis_workers

    with ctx.Pool(4) as pool:
        parts = pool.starmap(
            redis_workers.breaker_worker, [(redis_url, redis_prefix, seconds, start)] * 4
        )
    client = redis.Redis.from_url(redis_url)
    try:
        stamps = sorted(float(x) for x in client.lrange(f"{redis_prefix}calls", 0, -1))
    finally:
        client.close()
    calls = sum(made for made, _ in parts)
    assert calls == len(stamps)
    assert sum(rejected for _, rejected in parts) > 100
    # 3 failures open it; then at most one probe per 0.5 s reset period (4 in 2 s, plus
    # one for timing slack) and the calls already in flight when it opened (3 others)
    assert calls <= 3 + 3 + (seconds / 0.5 + 1), stamps
    opened = stamps[2]
    after_open = [s for s in stamps if s > opened + 0.01]
    periods = [int((s - opened) / 0.5) for s in after_open]
    assert len(periods) == len(set(periods)), "at most one probe per half-open period"


# -- bulkhead --------------------------------------------------------------------------------


def test_bulkhead_slots_are_shared(stores: Stores) -> None:
    a = Bulkhead("db", max_concurrent=2, store=stores(RedisBulkheadStore))
    b = Bulkhead("db", max_concurrent=2, store=stores(RedisBulkheadStore), **other_process())
    with a, b:
        with pytest.raises(BulkheadFull):
            a.acquire()
        assert a.snapshot()["shared_in_flight"] == 2
        assert a.in_flight == 1
    assert a.snapshot()["shared_in_flight"] == 0
    assert a.in_flight == b.in_flight == 0


def test_bulkhead_try_acquire_takes_a_shared_slot_or_nothing(stores: Stores) -> None:
    a = Bulkhead("db", max_concurrent=1, max_queue=5, store=stores(RedisBulkheadStore))
    b = Bulkhead("db", max_concurrent=1, store=stores(RedisBulkheadStore), **other_process())
    held = a.try_acquire()
    assert held is not None
    assert b.try_acquire() is None
    assert a.try_acquire() is None  # never waits, even with room to queue
    held.release()
    theirs = b.try_acquire()
    assert theirs is not None
    theirs.release()
    assert a.snapshot()["shared_in_flight"] == 0


def test_bulkhead_waits_for_a_slot_freed_by_another_process(stores: Stores) -> None:
    a = Bulkhead("db", max_concurrent=1, store=stores(RedisBulkheadStore))
    b = Bulkhead(
        "db",
        max_concurrent=1,
        max_queue=10,
        max_wait=2.0,
        store=stores(RedisBulkheadStore),
        **other_process(),
    )
    held = a.acquire()

    async def main() -> float:
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, held.release)
        started = time.monotonic()
        try:
            async with b:
                return time.monotonic() - started
        finally:
            await b_store.aclose()

    b_store = b.store
    assert 0.09 < asyncio.run(main()) < 1.0


def test_bulkhead_wait_gives_up_at_max_wait(stores: Stores) -> None:
    a = Bulkhead("db", max_concurrent=1, store=stores(RedisBulkheadStore))
    b = Bulkhead(
        "db",
        max_concurrent=1,
        max_queue=1,
        max_wait=0.1,
        store=stores(RedisBulkheadStore),
        **other_process(),
    )
    with a:
        started = time.monotonic()
        with pytest.raises(BulkheadFull, match="no slot freed up in time"):
            b.acquire()
        assert time.monotonic() - started < 0.5
    assert b.snapshot()["shared_in_flight"] == 0


def test_long_calls_keep_their_slot_by_renewing_the_lease(stores: Stores) -> None:
    store = stores(RedisBulkheadStore, lease=0.3)
    a = Bulkhead("db", max_concurrent=1, store=store)
    b = Bulkhead(
        "db", max_concurrent=1, store=stores(RedisBulkheadStore, lease=0.3), **other_process()
    )
    with a:
        time.sleep(0.7)  # more than twice the lease
        with pytest.raises(BulkheadFull):
            b.acquire()


@pytest.mark.slow
def test_slots_of_a_killed_process_come_back_after_the_lease(stores: Stores) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "redis_workers.py"),
            "bulkhead",
            stores.url,
            stores.prefix,
            "1.0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held"
        bulkhead = Bulkhead("shared", max_concurrent=2, store=stores(RedisBulkheadStore))
        with pytest.raises(BulkheadFull):
            bulkhead.acquire()
        child.send_signal(signal.SIGKILL)
        child.wait()
        killed = time.monotonic()
        while True:
            try:
                bulkhead.acquire()
                break
            except BulkheadFull:
                assert time.monotonic() - killed < 2.0, "the slots never came back"
                time.sleep(0.05)
        both = bulkhead.acquire()
        assert bulkhead.snapshot()["shared_in_flight"] == 2
        both.release()
        assert bulkhead.snapshot()["shared_in_flight"] == 1
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        assert child.stdout is not None
        child.stdout.close()


def test_cancelled_async_waiter_leaves_no_slot_behind(stores: Stores) -> None:
    a = Bulkhead("db", max_concurrent=1, store=stores(RedisBulkheadStore))
    store = stores(RedisBulkheadStore)
    b = Bulkhead("db", max_concurrent=1, max_queue=5, store=store, **other_process())
    held = a.acquire()

    async def main() -> None:
        waiters = [asyncio.create_task(b.acquire_async()) for _ in range(5)]
        await asyncio.sleep(0.05)
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        await store.aclose()

    asyncio.run(main())
    held.release()
    assert a.snapshot()["shared_in_flight"] == 0


class SwallowsCancellation(redis.asyncio.Redis):
    """An asyncio client that, as redis-py's asyncio cluster client sometimes does,
    swallows a cancellation landing during a command and returns the command's reply."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        command = asyncio.ensure_future(super().execute_command(*args, **options))
        try:
            return await asyncio.shield(command)
        except asyncio.CancelledError:
            return await command


async def _cancel_during_first_command(acquire: Callable[[], Any]) -> asyncio.Task[Any]:
    """Start ``acquire()``, cancel it while its first command is in flight, let it end."""
    task = asyncio.ensure_future(acquire())
    await asyncio.sleep(0)  # it is inside its first command now
    task.cancel()
    await asyncio.wait([task], timeout=2)
    if not task.done():  # still polling, as if never cancelled: stop it for the assertion
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise AssertionError("the cancelled caller went on waiting")
    return task


swallowing = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Task.cancelling() (Python 3.11) tells a swallowed cancel"
)


@swallowing
def test_a_cancel_the_client_swallows_still_stops_the_bulkhead_waiter(
    redis_url: str, stores: Stores
) -> None:
    """A waiter whose cancellation the client swallowed stops, and holds no slot."""
    a = Bulkhead("swallowed", max_concurrent=1, store=stores(RedisBulkheadStore))
    held = a.acquire()  # off the loop: a blocking acquire() there would warn

    async def main() -> None:
        client = SwallowsCancellation.from_url(redis_url)
        store = stores(RedisBulkheadStore, async_client=client)
        b = Bulkhead("swallowed", max_concurrent=1, max_queue=1, store=store, **other_process())
        assert (await _cancel_during_first_command(b.acquire_async)).cancelled()
        held.release()
        assert (await _cancel_during_first_command(b.acquire_async)).cancelled()  # granted
        assert b.binding.in_use() == 0
        await client.aclose()

    asyncio.run(main())


@swallowing
def test_a_cancel_the_client_swallows_still_stops_the_limiter_caller(
    redis_url: str, stores: Stores
) -> None:
    """A caller whose cancellation the client swallowed is not admitted: its unit is refunded."""

    async def main() -> None:
        client = SwallowsCancellation.from_url(redis_url)
        store = stores(RedisRateLimiterStore, async_client=client)
        limiter = RateLimiter("swallowed", rate=1, per=60, store=store)
        assert (await _cancel_during_first_command(limiter.acquire_async)).cancelled()
        await client.aclose()
        assert limiter.try_acquire()  # the unit the cancelled caller was granted came back

    asyncio.run(main())


@swallowing
def test_a_cancel_the_client_swallows_gives_the_probe_slot_back(
    redis_url: str, stores: Stores
) -> None:
    """A probe whose cancellation the client swallowed gives its half-open slot back."""
    settings: dict[str, Any] = {"failure_threshold": 1, "reset_timeout": 0.05}
    here = CircuitBreaker("swallowed", store=stores(RedisBreakerStore), **settings)
    with pytest.raises(ConnectionError), here:
        raise ConnectionError("down")
    time.sleep(0.08)  # half-open now

    async def main() -> None:
        client = SwallowsCancellation.from_url(redis_url)
        store = stores(RedisBreakerStore, async_client=client)
        there = CircuitBreaker("swallowed", store=store, **settings, **other_process())
        assert (await _cancel_during_first_command(there.acquire_async)).cancelled()
        await client.aclose()

    asyncio.run(main())
    here.acquire().success()  # the probe slot was free: this probe closes the circuit
    assert here.state == "closed"


@swallowing
def test_a_cancel_the_client_swallows_during_settle_still_stops_the_caller(
    redis_url: str, stores: Stores
) -> None:
    """Cancelled while its outcome goes back to Redis, a worker still stops (and the
    outcome was recorded); a bulkhead release never waits for Redis, so there is nothing
    to cancel: it is done at once and the slot is back by the next call."""

    async def main() -> None:
        client = SwallowsCancellation.from_url(redis_url)
        breaker = CircuitBreaker(
            "settle-swallowed",
            failure_threshold=1000,
            store=stores(RedisBreakerStore, async_client=client),
        )
        bulkhead = Bulkhead(
            "release-swallowed",
            max_concurrent=1,
            store=stores(RedisBulkheadStore, async_client=client),
        )
        permit = await breaker.acquire_async()
        task = asyncio.ensure_future(permit.failure_async(ConnectionError()))
        await asyncio.sleep(0)  # inside its command now
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        slot = await bulkhead.acquire_async()
        release = asyncio.ensure_future(slot.release_async())
        await asyncio.sleep(0)
        release.cancel()
        await asyncio.gather(release, return_exceptions=True)
        assert release.done() and not release.cancelled()
        assert bulkhead.binding.in_use() == 0
        assert breaker.snapshot()["store"]["consecutive_failures"] == 1
        await client.aclose()

    asyncio.run(main())


# -- saga idempotency ------------------------------------------------------------------------


def test_idempotency_key_replays_the_stored_result(stores: Stores) -> None:
    runs = []
    saga = Saga("orders", idempotency=stores(RedisIdempotencyStore))

    @saga.step("charge")
    def charge(ctx: Any) -> int:
        runs.append(ctx.input)
        return 42

    first = saga.run({"order": 1}, key="order-1", ttl=60)
    again = saga.run({"order": 1}, key="order-1", ttl=60)
    assert first.status == again.status == "completed"
    assert again.outputs == {"charge": 42}
    assert runs == [{"order": 1}]
    with pytest.raises(buttress.IdempotencyConflict):
        saga.run({"order": 2}, key="order-1")


def test_idempotency_keys_work_under_run_async(stores: Stores) -> None:
    """run_async calls the sync-only Redis key store off the loop, with the same result."""
    runs = []
    saga = Saga("orders-async", idempotency=stores(RedisIdempotencyStore))

    @saga.step("charge")
    async def charge(ctx: Any) -> int:
        runs.append(ctx.input)
        return 42

    async def main() -> None:
        first = await saga.run_async({"order": 1}, key="order-1", ttl=60)
        again = await saga.run_async({"order": 1}, key="order-1", ttl=60)
        assert first.status == again.status == "completed"
        assert again.replayed and again.outputs == {"charge": 42}

    asyncio.run(main())
    assert runs == [{"order": 1}]


def test_failed_run_frees_its_key(stores: Stores) -> None:
    attempts = []
    saga = Saga("orders", idempotency=stores(RedisIdempotencyStore))

    @saga.step("charge")
    def charge(ctx: Any) -> int:
        attempts.append(1)
        if len(attempts) == 1:
            raise buttress.Permanent("declined")
        return 1

    assert saga.run(None, key="k").status == "failed"
    assert saga.run(None, key="k").status == "completed"
    assert len(attempts) == 2


def test_idempotency_store_is_not_a_run_log(stores: Stores) -> None:
    """RedisIdempotencyStore is refused as store= when the Saga is built, kept as
    idempotency=, and is an IdempotencyStore but not a SagaStore."""
    keys = stores(RedisIdempotencyStore)
    assert isinstance(keys, IdempotencyStore)
    assert not isinstance(keys, SagaStore)
    with pytest.raises(buttress.ConfigTypeError, match=r"store= must be a saga run log") as info:
        Saga("orders", store=keys)  # type: ignore[arg-type]
    assert "pass it as idempotency=" in str(info.value)
    saga = Saga("orders-ok", idempotency=keys)
    saga.step("noop")(lambda ctx: None)
    assert saga.run(None, key="k").status == "completed"


@pytest.mark.slow
def test_two_processes_with_one_key_execute_the_steps_once(
    redis_url: str, redis_prefix: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 1.5
    import redis_workers

    with ctx.Pool(3) as pool:
        results = pool.starmap(
            redis_workers.saga_worker, [(redis_url, redis_prefix, "order-7", start)] * 3
        )
    client = redis.Redis.from_url(redis_url)
    try:
        assert int(client.get(f"{redis_prefix}executions") or 0) == 1
    finally:
        client.close()
    assert results == ["completed:42"] * 3


# -- Redis going away ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A redis-server of the test's own, on a spare loopback port, that it can stop."""

    def __init__(self, tmp: Path) -> None:
        self.binary = shutil.which("redis-server")
        self.port = _free_port()
        self.tmp = tmp
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.binary is not None
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
            finally:
                client.close()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def server(tmp_path: Path, redis_url: str) -> Iterator[Server]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not on PATH (needed to stop a server mid-run)")
        pytest.skip("redis-server is not on PATH (needed to stop a server mid-run)")
    own = Server(tmp_path)
    own.start()
    yield own
    own.stop()


def test_limiter_modes_when_redis_stops_and_recovery(server: Server) -> None:
    made = {
        mode: RedisRateLimiterStore(
            server.url, prefix="t:", on_backend_error=mode, retry_interval=0.05, timeout=0.2
        )
        for mode in ("fail_closed", "fail_open", "local")
    }
    limiters = {
        mode: RateLimiter(f"api-{mode}", rate=1, burst=1, max_wait=0, store=store)
        for mode, store in made.items()
    }
    try:
        for limiter in limiters.values():
            limiter.acquire()  # the shared budget is spent
        with capture_events() as events:
            server.stop()
            with pytest.raises(BackendUnavailable) as caught:
                limiters["fail_closed"].acquire()
            assert isinstance(caught.value, buttress.RejectedError)
            limiters["fail_open"].acquire()
            limiters["fail_open"].acquire()  # no limit at all while down
            limiters["local"].acquire()  # the in-process bucket is full...
            with pytest.raises(RateLimited):
                limiters["local"].acquire()  # ...and then enforced locally
            degraded = [e for e in events if e.kind == "backend_degraded"]
            assert {e.name for e in degraded} == {f"api-{m}" for m in made}
            server.start()  # an empty server: the budgets start full again
            time.sleep(0.06)
            for limiter in limiters.values():
                limiter.acquire()
                with pytest.raises(RateLimited):
                    limiter.acquire()
            recovered = [e for e in events if e.kind == "backend_recovered"]
            assert {e.name for e in recovered} == {f"api-{m}" for m in made}
            assert all(not lim.snapshot()["store"]["degraded"] for lim in limiters.values())
    finally:
        for store in made.values():
            store.close()


def test_breaker_and_bulkhead_modes_when_redis_stops(server: Server) -> None:
    def store(kind: type[Any], mode: str) -> Any:
        return kind(
            server.url, prefix="t:", on_backend_error=mode, retry_interval=0.05, timeout=0.2
        )

    made = []
    breakers = {}
    bulkheads = {}
    for mode in ("fail_closed", "fail_open", "local"):
        made.append(store(RedisBreakerStore, mode))
        breakers[mode] = CircuitBreaker(f"dep-{mode}", failure_threshold=1, store=made[-1])
        made.append(store(RedisBulkheadStore, mode))
        bulkheads[mode] = Bulkhead(f"pool-{mode}", max_concurrent=1, store=made[-1])
    try:
        server.stop()
        with pytest.raises(BackendUnavailable):
            _call(breakers["fail_closed"], lambda: 1)
        with pytest.raises(BackendUnavailable):
            bulkheads["fail_closed"].acquire()
        assert _call(breakers["fail_open"], lambda: 1) == 1
        with pytest.raises(ConnectionError):
            _call(breakers["fail_open"], _fail)
        assert _call(breakers["fail_open"], lambda: 1) == 1  # fail_open never opens
        with pytest.raises(ConnectionError):
            _call(breakers["local"], _fail)
        with pytest.raises(CircuitOpenError):  # the local breaker opened
            _call(breakers["local"], lambda: 1)
        with bulkheads["fail_open"], bulkheads["fail_open"]:
            pass  # no limit while down
        with bulkheads["local"], pytest.raises(BulkheadFull):
            bulkheads["local"].acquire()
        server.start()
        time.sleep(0.06)
        assert _call(breakers["fail_closed"], lambda: 1) == 1
        with bulkheads["fail_closed"]:
            assert bulkheads["fail_closed"].snapshot()["shared_in_flight"] == 1
        breakers["local"].close()
        assert _call(breakers["local"], lambda: 1) == 1
        assert breakers["local"].snapshot()["store"]["degraded"] is False
    finally:
        for item in made:
            item.close()


def test_a_hung_server_costs_one_timeout_then_the_fallback_is_immediate(server: Server) -> None:
    store = RedisRateLimiterStore(
        server.url, prefix="t:", on_backend_error="fail_open", retry_interval=5, timeout=0.2
    )
    limiter = RateLimiter("api", rate=1, store=store)
    try:
        limiter.acquire()
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)  # hangs: connections stay open
        try:
            started = time.monotonic()
            limiter.acquire()
            first = time.monotonic() - started
            started = time.monotonic()
            for _ in range(100):
                limiter.acquire()
            rest = time.monotonic() - started
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert 0.15 < first < 1.0  # the socket timeout
        assert rest < 0.1  # no further timeouts: the gate waits retry_interval
    finally:
        store.close()


def test_store_options_are_validated(redis_url: str) -> None:
    with pytest.raises(ValueError, match="on_backend_error"):
        RedisRateLimiterStore(redis_url, on_backend_error="maybe")
    with pytest.raises(TypeError, match="prefix"):
        RedisRateLimiterStore(redis_url, prefix=3)
    with pytest.raises(ValueError, match="braces"):
        RedisRateLimiterStore(redis_url, prefix="{x}")
    with pytest.raises(ValueError, match="timeout"):
        RedisBreakerStore(redis_url, timeout=0)
    with pytest.raises(ValueError, match="lease"):
        RedisBulkheadStore(redis_url, lease=-1)
    with pytest.raises(ValueError, match="url=, client= or async_client="):
        RedisRateLimiterStore()
    with pytest.raises(TypeError, match=r"client must be a redis\.Redis"):
        RedisRateLimiterStore(client="redis://")
    store = RedisBreakerStore(redis_url)
    assert store.key("cb", "payments") == "buttress:{cb:payments}"
    assert "buttress:" in repr(store)


def test_retry_waits_out_a_shared_limit(stores: Stores) -> None:
    limiter = RateLimiter("api", rate=20, burst=1, max_wait=0, store=stores(RedisRateLimiterStore))
    protected = pipeline(retry(5, on=RateLimited), limiter)(lambda: "ok")
    assert [protected() for _ in range(3)] == ["ok"] * 3


def test_idempotency_modes_when_redis_stops(server: Server) -> None:
    made: list[RedisIdempotencyStore] = []
    ran: dict[str, list[int]] = {}

    def saga_with(mode: str) -> Saga:
        store = RedisIdempotencyStore(
            server.url, prefix="t:", on_backend_error=mode, retry_interval=0.05, timeout=0.2
        )
        made.append(store)
        runs = ran[mode] = []
        saga = Saga(f"orders-{mode}", idempotency=store)
        saga.step("charge")(lambda ctx: runs.append(1) or len(runs))
        return saga

    closed, opened, local = (saga_with(m) for m in ("fail_closed", "fail_open", "local"))
    try:
        server.stop()
        with pytest.raises(BackendUnavailable):
            closed.run(None, key="k")
        assert ran["fail_closed"] == []
        assert opened.run(None, key="k").status == "completed"
        assert opened.run(None, key="k").status == "completed"
        assert ran["fail_open"] == [1, 1]  # no guarantee while down: that is fail_open
        assert local.run(None, key="k").status == "completed"
        assert local.run(None, key="k").outputs == {"charge": 1}  # replayed in this process
        assert ran["local"] == [1]
        server.start()
        time.sleep(0.06)
        assert closed.run(None, key="k").status == "completed"
        assert ran["fail_closed"] == [1]
    finally:
        for store in made:
            store.close()


def test_backend_unavailable_names_the_primitive(server: Server) -> None:
    store = RedisRateLimiterStore(server.url, prefix="t:", timeout=0.2)
    limiter = RateLimiter("api", rate=1, store=store)
    try:
        server.stop()
        with pytest.raises(BackendUnavailable) as caught:
            limiter.acquire()
        assert caught.value.name == "api"
        assert caught.value.retry_after is not None
    finally:
        store.close()


def test_bulkhead_store_needs_a_sync_client_for_its_leases(redis_url: str) -> None:
    async_only = redis.asyncio.Redis.from_url(redis_url)
    store = RedisBulkheadStore(async_client=async_only)
    with pytest.raises(TypeError, match="leases are renewed from a thread"):
        Bulkhead("db", max_concurrent=1, store=store)
    asyncio.run(async_only.aclose())


# -- the httpx transports on shared state -----------------------------------------------------


def test_httpx_transports_in_two_processes_share_breaker_and_limiter(
    redis_url: str, redis_prefix: str
) -> None:
    """A circuit opened by another process's transport is open here; its limiter units count."""
    import httpx

    from buttress.integrations.httpx import AsyncResilientTransport, ResilientTransport

    ctx = multiprocessing.get_context("spawn")
    import redis_workers

    with ctx.Pool(1) as pool:
        statuses = pool.apply(redis_workers.httpx_worker, (redis_url, redis_prefix))
    assert statuses == [503, 503]  # the other process's calls failed and opened the circuit

    sent: list[httpx.Request] = []

    def partner(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    registry = Registry()
    breaker_store = RedisBreakerStore(redis_url, prefix=redis_prefix)
    limiter_store = RedisRateLimiterStore(redis_url, prefix=redis_prefix)
    options: dict[str, Any] = {
        "name": "partner",
        "retry": None,
        "registry": registry,
        "breaker": {"failure_threshold": 2, "reset_timeout": 60, "store": breaker_store},
        "limiter": {"rate": 1, "per": 60, "burst": 3, "max_wait": 0, "store": limiter_store},
    }
    try:
        transport = ResilientTransport(httpx.MockTransport(partner), **options)
        with httpx.Client(transport=transport) as client, pytest.raises(CircuitOpenError):
            client.get("http://partner.test/quote")
        breaker = transport.breakers["partner.test"]
        assert breaker.snapshot()["store"]["key"].startswith(redis_prefix)
        breaker.close()  # for every process
        with httpx.Client(transport=transport) as client:
            assert client.get("http://partner.test/quote").status_code == 200
            with pytest.raises(RateLimited):  # 2 units spent there, 1 here: burst 3
                client.get("http://partner.test/quote")
        assert len(sent) == 1

        async def async_client() -> None:
            transport = AsyncResilientTransport(
                httpx.MockTransport(partner), **{**options, "registry": Registry()}
            )
            async with httpx.AsyncClient(transport=transport) as client:
                with pytest.raises(RateLimited):
                    await client.get("http://partner.test/quote")
            await breaker_store.aclose()
            await limiter_store.aclose()

        asyncio.run(async_client())
    finally:
        breaker_store.close()
        limiter_store.close()


def test_async_paths_never_make_a_blocking_redis_call(stores: Stores) -> None:
    """Acquire, wait, cancel, settle and release on the async faces use the asyncio client
    only: the sync client would block the event loop."""
    limiter_store = stores(RedisRateLimiterStore)
    breaker_store = stores(RedisBreakerStore)
    bulkhead_store = stores(RedisBulkheadStore, poll_interval=0.005)
    limiter = RateLimiter("no-block", rate=20, burst=1, store=limiter_store)
    breaker = CircuitBreaker("no-block", failure_threshold=2, store=breaker_store)
    holder = Bulkhead("no-block", max_concurrent=1, store=bulkhead_store)
    waiting = Bulkhead(
        "no-block", max_concurrent=1, max_queue=5, store=bulkhead_store, **other_process()
    )
    held = holder.acquire()  # set up from sync code, before the loop runs

    def blocking(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a blocking Redis call on the event loop: {args[:1]}")

    async def main() -> None:
        for store in (limiter_store, breaker_store, bulkhead_store):
            store._conn.run = blocking  # every sync round trip goes through run()
        await limiter.acquire_async()
        sleeper = asyncio.ensure_future(limiter.acquire_async())  # reserves, then sleeps
        await asyncio.sleep(0.01)
        sleeper.cancel()  # the refund goes through the async client
        await asyncio.gather(sleeper, return_exceptions=True)
        for _ in range(2):
            with pytest.raises(ConnectionError):
                async with breaker:
                    raise ConnectionError("down")
        with pytest.raises(CircuitOpenError):
            await breaker.acquire_async()
        poller = asyncio.ensure_future(waiting.acquire_async())  # polls the shared slots
        await asyncio.sleep(0.03)
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
        # Cancelled while its acquire script is in flight (it may have granted the slot):
        # the slot is given back through the async client too.
        # The release is posted to the loop's pipeliner (fire and forget), never sent
        # from sync code.
        real_arun, real_post, in_flight = (
            bulkhead_store._conn.arun,
            bulkhead_store._conn.post,
            asyncio.Event(),
        )
        released: list[str] = []

        async def slow_arun(script: str, key: str, *args: Any) -> Any:
            if args and args[0] == "acquire":
                in_flight.set()
                await asyncio.sleep(10)
            return await real_arun(script, key, *args)

        def post(script: str, key: str, *args: Any, **options: Any) -> Any:
            if args and args[0] == "release":
                released.append(args[-1])
            return real_post(script, key, *args, **options)

        bulkhead_store._conn.arun = slow_arun
        bulkhead_store._conn.post = post
        stuck = asyncio.ensure_future(waiting.acquire_async())
        await in_flight.wait()
        stuck.cancel()
        await asyncio.gather(stuck, return_exceptions=True)
        await asyncio.sleep(0.01)  # the shielded give-back runs to its end
        assert len(released) == 1
        del bulkhead_store._conn.arun
        del bulkhead_store._conn.post
        for store in (limiter_store, breaker_store, bulkhead_store):
            await store.aclose()

    try:
        asyncio.run(main())
    finally:
        for store in (limiter_store, breaker_store, bulkhead_store):
            del store._conn.run  # back to the class's method
    held.release()
    assert holder.snapshot()["shared_in_flight"] == 0


def test_success_threshold_above_one_is_refused_with_a_redis_store(stores: Stores) -> None:
    """The shared Lua state machine closes on one probe: success_threshold=2 is refused."""
    with pytest.raises(buttress.ConfigValueError, match="success_threshold must be 1"):
        CircuitBreaker("dep", store=stores(RedisBreakerStore), success_threshold=2)
    CircuitBreaker("dep", store=stores(RedisBreakerStore), success_threshold=1)


def test_half_open_by_hand_reaches_every_process(stores: Stores) -> None:
    """half_open() in one process lets the shared circuit probe in all of them."""
    options = {"failure_threshold": 1, "reset_timeout": 60}
    a = CircuitBreaker("dep", store=stores(RedisBreakerStore), **options)
    b = CircuitBreaker("dep", store=stores(RedisBreakerStore), **options, **other_process())
    with pytest.raises(ConnectionError):
        _call(a, _fail)
    assert b.state == "open"
    a.open()
    b.half_open()
    assert a.state == "half_open"
    assert _call(a, lambda: "ok") == "ok"
    assert b.state == "closed"


def test_an_interval_that_is_not_whole_microseconds_admits_an_idle_bucket(stores: Stores) -> None:
    """rate=3/s (333,333.3 us apart): a fresh bucket admits at once, with no wait counted."""
    for rate in (3, 7):
        limiter = RateLimiter(f"thirds-{rate}", rate=rate, store=stores(RedisRateLimiterStore))
        assert limiter.try_acquire()
        assert not limiter.try_acquire()
        other = RateLimiter(
            f"thirds-{rate}-b", rate=rate, max_wait=0, store=stores(RedisRateLimiterStore)
        )
        other.acquire()  # max_wait=0: no wait allowed, and none needed
        assert other.snapshot()["waited"] == 0


# -- pipelining, fire-and-forget releases, limiter batch mode ---------------------------------


def _connections(raw: redis.Redis, name: str) -> int:
    """Connections open on the server under client name ``name``."""
    return sum(1 for client in raw.client_list() if client.get("name") == name)


def test_concurrent_async_callers_share_round_trips_and_one_connection(
    redis_url: str, stores: Stores
) -> None:
    """64 concurrent acquires go out in a few pipelines over one connection, not 64
    round trips over 64 connections; every caller gets its own verdict."""
    name = f"buttress-pipe-{os.getpid()}-{time.monotonic_ns()}"
    raw = redis.Redis.from_url(redis_url)

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, client_name=name)
        store = stores(RedisRateLimiterStore, async_client=client)
        limiter = RateLimiter("pipelined", rate=1, per=60, burst=40, max_wait=0, store=store)
        batcher = store._conn.batcher()
        results = await asyncio.gather(
            *(limiter.acquire_async() for _ in range(64)), return_exceptions=True
        )
        assert sum(r is None for r in results) == 40  # the burst, no more
        assert sum(isinstance(r, RateLimited) for r in results) == 24
        assert batcher.calls == 64
        assert batcher.round_trips <= 3  # one alone, then the rest together
        assert _connections(raw, name) == 1
        await store.aclose()
        await client.aclose()

    try:
        asyncio.run(main())
    finally:
        raw.close()


def test_a_lone_async_caller_goes_out_at_once_without_a_batch(stores: Stores) -> None:
    """Nothing in flight: the command is sent alone, no drain task is started."""

    async def main() -> None:
        store = stores(RedisRateLimiterStore)
        limiter = RateLimiter("alone", rate=1000, store=store)
        for _ in range(5):
            await limiter.acquire_async()
        batcher = store._conn.batcher()
        assert (batcher.calls, batcher.round_trips, batcher.task) == (5, 5, None)
        await store.aclose()

    asyncio.run(main())


def test_each_pipelined_caller_gets_its_own_reply_or_error(stores: Stores) -> None:
    """A command that fails inside a pipeline fails its own caller only."""

    async def main() -> None:
        store = stores(RedisRateLimiterStore)
        conn = store._conn
        key = store.key("pipe", "errors")
        script = (
            "if ARGV[1] == 'bad' then return redis.error_reply('bad argument') end return ARGV[1]"
        )
        calls = [conn.arun(script, key, arg) for arg in ("a", "bad", "b", "bad", "c")]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert results[0::2] == [b"a", b"b", b"c"]
        assert all(isinstance(r, redis.ResponseError) for r in results[1::2])
        await store.aclose()

    asyncio.run(main())


def test_a_script_the_server_lacks_is_loaded_and_the_pipeline_sent_again(stores: Stores) -> None:
    """NOSCRIPT inside a pipeline: the script is loaded and those commands sent again."""

    async def main() -> None:
        store = stores(RedisRateLimiterStore)
        conn = store._conn
        script = f"return '{os.urandom(8).hex()}' .. ARGV[1]"  # never loaded before
        key = store.key("pipe", "noscript")
        results = await asyncio.gather(*(conn.arun(script, key, str(i)) for i in range(10)))
        assert [r[-1:] for r in results] == [str(i).encode() for i in range(10)]
        await store.aclose()

    asyncio.run(main())


def test_a_queued_caller_cancelled_before_its_reply_gives_the_granted_slot_back(
    redis_url: str, stores: Stores
) -> None:
    """The acquire of a caller cancelled while queued still runs; its slot is released."""
    raw = redis.Redis.from_url(redis_url)

    async def main() -> None:
        store = stores(RedisBulkheadStore)
        bulkhead = Bulkhead("queued-cancel", max_concurrent=5, store=store)
        first = asyncio.ensure_future(bulkhead.acquire_async())
        second = asyncio.ensure_future(bulkhead.acquire_async())
        await asyncio.sleep(0)  # first is in flight alone, second is queued
        second.cancel()
        lease = await first
        await asyncio.gather(second, return_exceptions=True)
        assert second.cancelled()
        await store.aclose()  # flushes the give-back
        assert raw.zcard(bulkhead.binding.key) == 1  # only the first caller's slot
        await lease.release_async()
        await store.aclose()
        assert raw.zcard(bulkhead.binding.key) == 0

    try:
        asyncio.run(main())
    finally:
        raw.close()


def test_an_async_release_costs_no_round_trip_and_aclose_flushes_it(
    redis_url: str, stores: Stores
) -> None:
    """release_async() returns before Redis is told; aclose() waits until it is."""
    raw = redis.Redis.from_url(redis_url)

    async def main() -> None:
        store = stores(RedisBulkheadStore)
        bulkhead = Bulkhead("posted-release", max_concurrent=1, store=store)
        lease = await bulkhead.acquire_async()
        trips = store._conn.batcher().round_trips
        await lease.release_async()
        assert store._conn.batcher().round_trips == trips  # nothing waited for
        assert raw.zcard(bulkhead.binding.key) == 1  # not sent yet
        again = await bulkhead.acquire_async()  # max_concurrent=1: the release went first
        await again.release_async()
        await store.aclose()
        assert raw.zcard(bulkhead.binding.key) == 0

    try:
        asyncio.run(main())
    finally:
        raw.close()


def test_releases_posted_to_one_pipeline_go_out_as_one_command_not_carried_by_acquires(
    redis_url: str, stores: Stores
) -> None:
    """64 concurrent callers: every release posted to a pipeline goes out as one command,
    and the loop's own acquires (queued after them) carry none of them; nothing leaks."""
    raw = redis.Redis.from_url(redis_url)

    async def main() -> None:
        store = stores(RedisBulkheadStore)
        bulkhead = Bulkhead("merged-releases", max_concurrent=100, store=store)
        await (await bulkhead.acquire_async()).release_async()
        batcher = store._conn.batcher()
        real = batcher.client
        batches: list[list[tuple[Any, ...]]] = []

        class Recording:  # a pipeline that notes each script call's arguments
            def __init__(self, pipe: Any) -> None:
                self.pipe, self.calls = pipe, []

            def execute_command(self, *args: Any) -> None:
                self.calls.append(args[4:])  # EVALSHA sha 1 key, then the script's
                self.pipe.execute_command(*args)

            async def execute(self, raise_on_error: bool = True) -> Any:
                batches.append(self.calls)
                return await self.pipe.execute(raise_on_error=raise_on_error)

        class Client:
            def pipeline(self, transaction: bool = True) -> Recording:
                return Recording(real.pipeline(transaction=transaction))

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        batcher.client = Client()

        async def caller() -> None:
            for _ in range(10):
                async with bulkhead:
                    await asyncio.sleep(0)

        await asyncio.gather(*(caller() for _ in range(64)))
        await batcher.flush()
        assert raw.zcard(bulkhead.binding.key) == 0
        acquires = [args for batch in batches for args in batch if args[0] == "acquire"]
        assert acquires
        assert all(len(args) == 4 for args in acquires), "an acquire carried a posted release"
        releases = [[args for args in batch if args[0] == "release"] for batch in batches]
        assert all(len(found) <= 1 for found in releases)
        assert max(len(found[0]) - 3 for found in releases if found) > 1  # several merged
        batcher.client = real
        await store.aclose()

    try:
        asyncio.run(main())
    finally:
        raw.close()


def test_a_posted_release_is_still_carried_by_sync_calls_and_merges_at_most_256(
    redis_url: str, stores: Stores
) -> None:
    """Before its pipeline goes out, a posted release is carried by a call from outside
    the loop's pipeliner (here the sync face); one merged command holds 256 releases at
    most."""
    raw = redis.Redis.from_url(redis_url)

    async def main() -> None:
        store = stores(RedisBulkheadStore)
        bulkhead = Bulkhead("carried-releases", max_concurrent=300, store=store)
        leases = [await bulkhead.acquire_async() for _ in range(300)]
        for lease in leases:  # no await in between: all posted to the same pipeline
            await lease.release_async()
        batcher = store._conn.batcher()
        queued = [args for _, _, args, *_ in batcher.queue if args[0] == "release"]
        assert sorted(len(args) - 3 for args in queued) == [44, 256]
        assert raw.zcard(bulkhead.binding.key) == 300  # nothing sent yet
        assert bulkhead.binding.in_use() == 0  # the sync call carried all 300
        await batcher.flush()
        assert raw.zcard(bulkhead.binding.key) == 0
        await store.aclose()

    try:
        asyncio.run(main())
    finally:
        raw.close()


def test_a_failed_async_release_is_reported_and_carried_by_the_next_call(
    redis_url: str, stores: Stores
) -> None:
    """A posted release that fails emits the backend's degradation; the token stays
    unsent and the next script call for the bulkhead removes it."""
    raw = redis.Redis.from_url(redis_url)

    async def main() -> None:
        store = stores(RedisBulkheadStore, on_backend_error="fail_open")
        bulkhead = Bulkhead("failed-release", max_concurrent=1, store=store)
        lease = await bulkhead.acquire_async()
        batcher = store._conn.batcher()
        real = batcher.client

        class Broken:
            def execute_command(self, *args: Any) -> None:
                pass

            async def execute(self, raise_on_error: bool = True) -> Any:
                raise redis.ConnectionError("down for this pipeline")

        class Down:
            def pipeline(self, transaction: bool = True) -> Broken:
                return Broken()

        batcher.client = Down()
        with capture_events() as events:
            await lease.release_async()
            await batcher.flush()
        batcher.client = real
        assert any(type(e).__name__ == "BackendDegraded" for e in events), events
        assert raw.zcard(bulkhead.binding.key) == 1
        # no longer posted: the loop's own calls carry it again, like every other call
        args, _ = bulkhead.binding._script("acquire", "t", batcher.serial)
        assert len(args) == 5
        assert bulkhead.binding.in_use() == 0  # carried by this call
        await store.aclose()

    try:
        asyncio.run(main())
    finally:
        raw.close()


def test_a_sync_bulkhead_call_waits_for_one_round_trip_only(redis_url: str, stores: Stores) -> None:
    """Acquire is one round trip; release is sent by the lease thread, not the caller;
    the caller's next acquire carries any release still unsent."""
    raw = redis.Redis.from_url(redis_url)
    store = stores(RedisBulkheadStore)
    bulkhead = Bulkhead("sync-release", max_concurrent=1, store=store)
    bulkhead.acquire().release()  # the lease thread is running now
    me = __import__("threading").get_ident()
    mine: list[str] = []
    client = store._conn.sync()
    real = client.execute_command

    def counting(*args: Any, **options: Any) -> Any:
        if __import__("threading").get_ident() == me:
            mine.append(str(args[3] if len(args) > 3 else args[0]))
        return real(*args, **options)

    client.execute_command = counting
    try:
        for _ in range(20):
            with bulkhead:
                pass
        assert len(mine) == 20  # one per call: the acquire
        deadline = time.monotonic() + 2
        while raw.zcard(bulkhead.binding.key) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert raw.zcard(bulkhead.binding.key) == 0  # the lease thread sent the last one
    finally:
        del client.execute_command
        raw.close()


def test_limiter_batch_mode_spends_units_locally(stores: Stores) -> None:
    """batch=10: one round trip serves up to ten acquires; snapshot reports the ratio."""
    limiter = RateLimiter(
        "batched", rate=100, burst=100, store=stores(RedisRateLimiterStore, batch=10)
    )
    for _ in range(50):
        limiter.acquire()
    store_view = limiter.snapshot()["store"]
    assert store_view["batch"] == 10
    assert store_view["acquires"] == 50
    assert store_view["round_trips"] <= 10
    assert store_view["round_trips_per_acquire"] == store_view["round_trips"] / 50

    async def main() -> None:
        store = stores(RedisRateLimiterStore, batch=8)
        shared = RateLimiter("batched-async", rate=100, burst=100, store=store)
        for _ in range(40):
            await shared.acquire_async()
        assert shared.snapshot()["store"]["round_trips"] <= 10
        # 56 at once: one refill in flight at a time (never more than one batch
        # reserved); who it leaves short waits for the next one
        await asyncio.gather(*(shared.acquire_async() for _ in range(56)))
        view = shared.snapshot()["store"]
        assert view["acquires"] == 96
        assert view["round_trips"] <= 10 + 16, view
        await store.aclose()

    asyncio.run(main())


def test_limiter_batch_mode_never_exceeds_the_shared_bound(stores: Stores) -> None:
    """Two batching limiters of one name together admit at most burst + rate * t."""
    rate, burst = 40.0, 4
    a, b = (
        RateLimiter(
            "batched-bound",
            rate=rate,
            burst=burst,
            max_wait=0,
            store=stores(RedisRateLimiterStore, batch=5),
            **other_process(registry=i == 1),
        )
        for i in range(2)
    )
    admitted: list[float] = []
    end = time.monotonic() + 0.6
    while time.monotonic() < end:
        for limiter in (a, b):
            if limiter.try_acquire():
                admitted.append(time.monotonic())
    span = admitted[-1] - admitted[0]
    assert len(admitted) <= burst + rate * span + 1, (len(admitted), span)
    assert len(admitted) >= burst  # and it admits


def test_limiter_batch_is_validated(redis_url: str) -> None:
    """batch must be an integer >= 1; the message names it."""
    with pytest.raises(buttress.ConfigValueError, match="batch must be >= 1"):
        RedisRateLimiterStore(redis_url, batch=0)
    for bad in (2.0, True, "4"):
        with pytest.raises(buttress.ConfigTypeError, match="batch must be an integer"):
            RedisRateLimiterStore(redis_url, batch=bad)  # type: ignore[arg-type]


@given(
    start=st.floats(0, 1),
    interval=st.floats(1e-4, 0.1),
    granted=st.integers(2, 50),
    taken=st.integers(1, 3),
    steps=st.lists(st.tuples(st.floats(0, 0.05), st.integers(1, 4)), max_size=60),
)
def test_a_batched_unit_is_never_spent_after_its_gcra_slot_starts(
    start: float,
    interval: float,
    granted: int,
    taken: int,
    steps: list[tuple[float, int]],
) -> None:
    """Whatever the spending pattern, every unit spent from a batch is spent no later
    than the start of its slot (so the shared GCRA bound holds), each at most once."""
    from buttress.backends.redis import _Stock

    taken = min(taken, granted)
    stock = _Stock(start, interval, taken, granted)
    now = start
    spent: list[int] = []
    for dt, weight in steps:
        now += dt
        before = stock.next
        if stock.take(weight, now):
            first = stock.next - weight
            assert first >= before
            assert now <= start + first * interval + 1e-9
            spent.extend(range(first, stock.next))
    assert len(spent) == len(set(spent))
    assert all(taken <= unit < granted for unit in spent)


def test_queued_callers_cancelled_before_their_reply_give_back_probe_slots_and_units(
    stores: Stores,
) -> None:
    """A half-open probe slot or a limiter reservation granted to a caller cancelled
    while its call was queued goes back (in the next pipeline)."""
    settings: dict[str, Any] = {"failure_threshold": 1, "reset_timeout": 0.05}
    here = CircuitBreaker("orphan-probe", store=stores(RedisBreakerStore), **settings)
    with pytest.raises(ConnectionError), here:
        raise ConnectionError("down")
    time.sleep(0.08)  # half-open now: one probe slot

    async def probe() -> None:
        store = stores(RedisBreakerStore)
        there = CircuitBreaker("orphan-probe", store=store, **settings, **other_process())
        limiter_store = stores(RedisRateLimiterStore)
        limiter = RateLimiter("orphan-units", rate=1, per=60, burst=1, store=limiter_store)
        # a first call in flight alone, so that the second one is queued behind it
        first = asyncio.ensure_future(store._conn.arun("return 1", store.key("x", "y")))
        second = asyncio.ensure_future(there.acquire_async())
        await asyncio.sleep(0)
        second.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        assert second.cancelled()
        await store.aclose()  # the neutral outcome goes out
        first = asyncio.ensure_future(limiter_store._conn.arun("return 1", "k{x}"))
        queued = asyncio.ensure_future(limiter.acquire_async())
        await asyncio.sleep(0)
        queued.cancel()
        await asyncio.gather(first, queued, return_exceptions=True)
        assert queued.cancelled()
        await limiter_store.aclose()  # the refund goes out
        assert limiter.try_acquire()  # the unit came back

    asyncio.run(probe())
    here.acquire().success()  # the probe slot was free: this probe closes the circuit
    assert here.state == "closed"
