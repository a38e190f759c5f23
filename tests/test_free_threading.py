"""Many threads, forced interleavings: every primitive keeps exact counts and its limits.

Each test starts 16 threads at once (a barrier) and sets ``sys.setswitchinterval`` very
low, so the interpreter switches threads every few bytecodes and check-then-act races
show up. On a free-threaded interpreter (3.13t and later, ``sys._is_gil_enabled()`` false)
the threads really run in parallel; the same assertions must hold there.

Time is virtual wherever a result depends on it: a frozen ``FakeClock`` shared by all
threads, or :class:`ThreadClock`, whose time is per thread, so one thread's sleeps or
slow calls never shift another thread's timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from buttress import (
    AdaptiveBulkhead,
    Bulkhead,
    BulkheadFull,
    CircuitBreaker,
    CircuitOpenError,
    RateLimited,
    RateLimiter,
    TimeoutExceeded,
    debounce,
    fallback,
    hedge,
    pipeline,
    retry,
    throttle,
    timeout,
)
from buttress.testing import FakeClock, capture_events

THREADS = 16

pytestmark = pytest.mark.slow


class Boom(Exception):
    """A failure the primitives count."""


@pytest.fixture(autouse=True)
def _tiny_switch_interval() -> Iterator[None]:
    """Switch threads every microsecond (the default is 5 ms) to force interleavings."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def hammer(work: Callable[[int, int], None], per_thread: int, threads: int = THREADS) -> None:
    """Run ``work(thread_index, i)`` for ``i`` in ``range(per_thread)`` on every thread,
    all released at once; re-raise the first error any thread hit."""
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                work(index, i)
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(30)
        assert not thread.is_alive(), "a hammering thread hung"
    if errors:
        raise errors[0]


class Tally:
    """Named counters shared by threads (one lock: the test's own bookkeeping is exact)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def __getitem__(self, key: str) -> int:
        return self.counts.get(key, 0)


class Gauge:
    """Calls in flight right now, and the most ever seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0

    def enter(self) -> int:
        with self._lock:
            self.current += 1
            self.peak = max(self.peak, self.current)
            return self.current

    def leave(self) -> None:
        with self._lock:
            self.current -= 1


class ThreadClock:
    """A virtual clock per thread: sleeping advances only the sleeping thread's time."""

    def __init__(self) -> None:
        self._local = threading.local()

    def now(self) -> float:
        return getattr(self._local, "now", 0.0)  # type: ignore[no-any-return]

    def advance(self, seconds: float) -> None:
        self._local.now = self.now() + seconds

    def sleep(self, seconds: float) -> None:
        self.advance(max(seconds, 0.0))

    async def asleep(self, seconds: float) -> None:
        self.advance(max(seconds, 0.0))
        await asyncio.sleep(0)

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        return event.wait(timeout)

    async def wait_future(self, future: asyncio.Future[Any], timeout: float | None) -> bool:
        await asyncio.wait((future,), timeout=timeout)
        return future.done()

    def call_later(self, delay: float, callback: Callable[[], object]) -> Any:
        raise NotImplementedError("ThreadClock has no timers")


# -- retry -----------------------------------------------------------------------------------


def test_retry_counts_every_retry_exactly():
    """Calls failing 0-3 times under retry(3): retries, recoveries and give-ups add up."""
    clock = ThreadClock()
    policy = retry(3, on=Boom, clock=clock)
    tally = Tally()

    @policy
    def flaky(failures_left: list[int]) -> str:
        tally.add("attempts")
        if failures_left[0] > 0:
            failures_left[0] -= 1
            raise Boom
        return "ok"

    def work(_: int, i: int) -> None:
        failures = i % 4
        try:
            flaky([failures])
            tally.add("ok")
        except Boom:
            tally.add("gave_up")

    per_thread = 200
    hammer(work, per_thread)
    total = THREADS * per_thread
    quarter = total // 4
    snap = policy.snapshot()
    assert tally["ok"] == 3 * quarter and tally["gave_up"] == quarter
    assert snap["retries"] == quarter * (0 + 1 + 2 + 2)
    assert snap["recovered"] == 2 * quarter
    assert snap["gave_up"] == quarter
    assert tally["attempts"] == total + snap["retries"]


# -- circuit breaker -------------------------------------------------------------------------


def test_closed_breaker_counts_every_outcome():
    """A breaker that never opens (lock-free success path included) loses no count."""
    breaker = CircuitBreaker(failure_threshold=10**9)

    @breaker
    def call(fail: bool) -> None:
        if fail:
            raise Boom

    def work(_: int, i: int) -> None:
        with contextlib.suppress(Boom):
            call(i % 5 == 0)

    per_thread = 500
    hammer(work, per_thread)
    snap = breaker.snapshot()
    total = THREADS * per_thread
    assert snap["failures"] == total // 5
    assert snap["successes"] == total - total // 5
    assert snap["calls"] == total and snap["state"] == "closed"


def test_opening_breaker_stays_consistent():
    """Racing failures open the circuit exactly once; every call is accounted for."""
    clock = FakeClock(autojump=False)  # frozen: the circuit never half-opens here
    breaker = CircuitBreaker(failure_threshold=20, reset_timeout=60, clock=clock)
    tally = Tally()

    @breaker
    def call(fail: bool) -> None:
        tally.add("ran")
        if fail:
            raise Boom

    def work(_: int, i: int) -> None:
        try:
            call(i >= 50)  # successes first, then every thread fails until the circuit opens
        except Boom:
            tally.add("failed")
        except CircuitOpenError:
            tally.add("rejected")

    per_thread = 300
    with capture_events() as seen:
        hammer(work, per_thread)
    snap = breaker.snapshot()
    total = THREADS * per_thread
    assert snap["state"] == "open"
    assert snap["rejections"] == tally["rejected"]
    assert snap["failures"] == tally["failed"]
    assert snap["calls"] == tally["ran"] == total - tally["rejected"]
    assert snap["failures"] >= 20
    opened = [e for e in seen if e.kind == "circuit_state_changed"]
    assert [(e.old, e.new) for e in opened] == [("closed", "open")]


# -- bulkheads -------------------------------------------------------------------------------


@pytest.mark.parametrize("max_queue", [0, 4, 64])
def test_bulkhead_never_exceeds_its_limit(max_queue):
    """In flight never exceeds max_concurrent; accepted + rejected = attempts, exactly."""
    bulkhead = Bulkhead(max_concurrent=3, max_queue=max_queue)
    gauge = Gauge()
    tally = Tally()

    @bulkhead
    def call() -> None:
        gauge.enter()
        tally.add("ran")
        gauge.leave()

    def work(_: int, i: int) -> None:
        try:
            call()
        except BulkheadFull:
            tally.add("rejected")

    per_thread = 300
    hammer(work, per_thread)
    snap = bulkhead.snapshot()
    assert gauge.peak <= 3
    assert snap["accepted"] == tally["ran"]
    assert snap["rejected"] == tally["rejected"]
    assert tally["ran"] + tally["rejected"] == THREADS * per_thread
    assert (snap["in_flight"], snap["queued"]) == (0, 0)
    if max_queue == 64:
        assert tally["rejected"] == 0


def test_adaptive_bulkhead_keeps_exact_counts_and_its_limit():
    """Errors and successes move the limit; admissions never exceed it, nothing leaks."""
    bulkhead = AdaptiveBulkhead(initial=4, min=2, max=8, algorithm="aimd", max_queue=THREADS)
    gauge = Gauge()
    tally = Tally()
    violations: list[tuple[int, int]] = []

    @bulkhead
    def call(fail: bool) -> None:
        active = gauge.enter()
        limit = bulkhead.limit
        if active > 8:
            violations.append((active, limit))
        gauge.leave()
        if fail:
            raise Boom

    def work(_: int, i: int) -> None:
        try:
            call(i % 9 == 0)
            tally.add("ok")
        except Boom:
            tally.add("failed")

    per_thread = 200
    hammer(work, per_thread)
    snap = bulkhead.snapshot()
    total = THREADS * per_thread
    assert not violations and gauge.peak <= 8
    assert snap["accepted"] == total and snap["rejected"] == 0
    assert snap["successes"] == tally["ok"] and snap["errors"] == tally["failed"]
    assert snap["errors"] == THREADS * len(range(0, per_thread, 9))
    assert (snap["in_flight"], snap["queued"]) == (0, 0)
    assert 2 <= snap["limit"] <= 8


def test_adaptive_bulkhead_try_acquire_never_over_the_limit():
    """try_acquire and settled permits from many threads: in flight never exceeds the
    current limit."""
    bulkhead = AdaptiveBulkhead(initial=5, min=1, max=10, algorithm="gradient")
    lock = threading.Lock()
    over: list[tuple[int, int]] = []

    def work(_: int, i: int) -> None:
        permit = bulkhead.try_acquire()
        if permit is not None:
            with lock:
                in_flight, limit = bulkhead.in_flight, bulkhead.limit
            if in_flight > 10:
                over.append((in_flight, limit))
            latency = 0.01 * (1 + i % 3)
            if i % 13 == 0:
                permit.failure(None, latency)
            else:
                permit.success(latency)

    hammer(work, 300)
    snap = bulkhead.snapshot()
    assert not over
    assert snap["in_flight"] == 0
    assert snap["accepted"] == snap["successes"] + snap["errors"]
    assert 1 <= snap["limit"] <= 10


# -- rate limiter ----------------------------------------------------------------------------


def test_rate_limiter_admits_exactly_its_gcra_bound():
    """With time frozen, all threads together get exactly `burst`, then one per interval."""
    clock = FakeClock(autojump=False)
    limiter = RateLimiter(rate=100, per=1.0, burst=7, max_wait=0, clock=clock)
    tally = Tally()

    @limiter
    def call() -> None:
        tally.add("ran")

    def work(_: int, i: int) -> None:
        if i % 2:
            if limiter.try_acquire():
                tally.add("ran")
            return
        with contextlib.suppress(RateLimited):
            call()

    hammer(work, 200)
    assert tally["ran"] == 7
    clock.advance(0.05)  # five emission intervals of 10 ms
    hammer(work, 200)
    assert tally["ran"] == 12
    assert limiter.snapshot()["admitted"] == 12


def test_rate_limiter_for_key_keeps_each_budget():
    """Per-key limiters shared by all threads: each key admits exactly its bound."""
    clock = FakeClock(autojump=False)
    limiter = RateLimiter(rate=10, per=1.0, burst=3, max_wait=0, clock=clock)
    keys = [f"user-{n}" for n in range(6)]
    tally = Tally()

    def work(index: int, i: int) -> None:
        key = keys[(index + i) % len(keys)]
        if limiter.for_key(key).try_acquire():
            tally.add(key)

    hammer(work, 120)
    assert all(tally[key] == 3 for key in keys)
    clock.advance(0.1)  # one more emission interval per key
    hammer(work, 120)
    assert all(tally[key] == 4 for key in keys)
    assert limiter.snapshot()["admitted"] == 4 * len(keys)
    assert limiter.keys <= len(keys)


# -- timeout, debounce, throttle -------------------------------------------------------------


def test_sync_timeouts_are_counted_exactly():
    """A per-thread clock: exactly the calls that ran too long raise TimeoutExceeded."""
    clock = ThreadClock()
    limited = timeout(1.0, clock=clock)
    tally = Tally()

    @limited
    def call(seconds: float) -> str:
        clock.advance(seconds)
        return "done"

    def work(_: int, i: int) -> None:
        try:
            call(2.0 if i % 3 == 0 else 0.5)
            tally.add("ok")
        except TimeoutExceeded:
            tally.add("timed_out")

    per_thread = 150
    hammer(work, per_thread)
    expected = THREADS * len(range(0, per_thread, 3))
    assert tally["timed_out"] == expected
    assert limited.snapshot()["timeouts"] == expected
    assert tally["ok"] == THREADS * per_thread - expected


def test_throttle_runs_once_per_interval():
    """Leading-edge throttle: one run per interval no matter how many threads call."""
    clock = FakeClock(autojump=False)
    tally = Tally()

    @throttle(1.0, trailing=False, clock=clock)
    def refresh(n: int) -> int:
        tally.add("ran")
        return n

    def work(index: int, i: int) -> None:
        refresh(index * 1000 + i)

    hammer(work, 100)
    assert tally["ran"] == 1
    clock.advance(1.0)
    hammer(work, 100)
    assert tally["ran"] == 2


def test_debounce_collapses_a_storm_into_one_trailing_run():
    """Thousands of calls from 16 threads, then quiet: exactly one run, with a real argument."""
    clock = FakeClock(autojump=False)
    seen: list[int] = []

    @debounce(0.5, clock=clock)
    def save(n: int) -> None:
        seen.append(n)

    def work(index: int, i: int) -> None:
        save(index * 1000 + i)

    hammer(work, 100)
    assert seen == []
    clock.advance(0.5)
    assert len(seen) == 1
    assert seen[0] % 1000 == 99  # the latest call of whichever thread called last
    clock.advance(5.0)
    assert len(seen) == 1


# -- fallback, hedge, pipeline ---------------------------------------------------------------


def test_fallback_counts_every_replacement():
    """Failures replaced by the fallback value are counted exactly."""
    policy = fallback(-1, on=Boom)
    tally = Tally()

    @policy
    def call(i: int) -> int:
        if i % 4 == 0:
            raise Boom
        return i

    def work(_: int, i: int) -> None:
        tally.add("fallback" if call(i) == -1 else "ok")

    per_thread = 300
    hammer(work, per_thread)
    expected = THREADS * len(range(0, per_thread, 4))
    assert tally["fallback"] == expected
    assert policy.snapshot()["used"] == expected


def test_hedge_shared_by_threads_with_their_own_loops():
    """One Hedge used from 16 threads' event loops: launches and wins add up exactly."""
    policy = hedge(60.0, max_hedged=1)

    @policy
    async def fetch(state: list[int]) -> str:
        state[0] += 1
        if state[0] == 1:
            raise Boom  # the first attempt fails at once: the hedge launches immediately
        return "second"

    calls_per_thread = 40

    def work(_: int, i: int) -> None:
        async def many() -> None:
            for _ in range(calls_per_thread):
                assert await fetch([0]) == "second"

        asyncio.run(many())

    hammer(work, 1)
    snap = policy.snapshot()
    total = THREADS * calls_per_thread
    assert snap["hedges_launched"] == total
    assert snap["hedges_won"] == total


def test_pipeline_parts_agree_on_the_counts():
    """retry -> breaker -> bulkhead: each part's counts match what the others saw."""
    clock = ThreadClock()
    policy_retry = retry(2, on=Boom, clock=clock)
    breaker = CircuitBreaker(failure_threshold=10**9)
    bulkhead = Bulkhead(max_concurrent=4, max_queue=THREADS)
    gauge = Gauge()
    tally = Tally()

    @pipeline(policy_retry, breaker, bulkhead)
    def call(state: list[int]) -> str:
        gauge.enter()
        tally.add("attempts")
        gauge.leave()
        if state[0] > 0:
            state[0] -= 1
            raise Boom
        return "ok"

    def work(_: int, i: int) -> None:
        assert call([i % 2]) == "ok"

    per_thread = 150
    hammer(work, per_thread)
    total = THREADS * per_thread
    first_failures = total // 2
    assert gauge.peak <= 4
    assert tally["attempts"] == total + first_failures
    assert policy_retry.snapshot()["retries"] == first_failures
    snap = breaker.snapshot()
    assert snap["failures"] == first_failures and snap["successes"] == total
    assert bulkhead.snapshot()["accepted"] == total + first_failures
    assert bulkhead.snapshot()["in_flight"] == 0
