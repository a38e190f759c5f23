"""Rate limiter: the GCRA bound, waiting, fail-fast, FIFO, cancellation, keys, threads."""

from __future__ import annotations

import asyncio
import threading
from bisect import bisect_left, bisect_right

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import buttress
from buttress import RateLimited, RateLimiter
from buttress.testing import FakeClock


def max_in_window(times: list[float], weights: list[int], length: float) -> int:
    """The most units admitted in any closed interval of ``length`` seconds."""
    best = 0
    for i, start in enumerate(times):
        j = bisect_right(times, start + length + 1e-12)
        best = max(best, sum(weights[i:j]))
    return best


@settings(max_examples=150, deadline=None)
@given(
    rate=st.integers(1, 50),
    per=st.sampled_from([0.5, 1.0, 2.0]),
    burst=st.integers(1, 8),
    steps=st.lists(st.tuples(st.floats(0, 0.3), st.integers(1, 8)), min_size=1, max_size=120),
)
def test_never_admits_more_than_the_gcra_bound(rate, per, burst, steps):
    """Property: any interval of t seconds admits at most burst + rate * t / per units."""
    clock = FakeClock()
    limiter = RateLimiter(rate=rate, per=per, burst=burst, clock=clock)
    times: list[float] = []
    weights: list[int] = []
    for gap, wanted in steps:
        clock.advance(gap)
        weight = min(wanted, burst)
        if limiter.try_acquire(weight):
            times.append(clock.now())
            weights.append(weight)
    for length in (0.0, per / rate, per / 2, per, 2 * per):
        assert max_in_window(times, weights, length) <= burst + rate * length / per + 1e-9


def test_admits_the_full_rate_under_demand():
    """When demand exceeds the rate, waiting callers get exactly the rate."""
    clock = FakeClock()
    limiter = RateLimiter(rate=10, burst=5, clock=clock)
    admitted = []
    for _ in range(105):
        limiter.acquire()
        admitted.append(clock.now())
    # 5 at once, then one every 0.1 s: the last of 105 at 10 s.
    assert admitted[4] == 0.0
    assert admitted[-1] == pytest.approx(10.0)
    assert limiter.snapshot()["admitted"] == 105


def test_acquire_waits_exactly_until_the_permit(face):
    """A waiting caller sleeps exactly until its request conforms."""
    clock = FakeClock()
    limiter = RateLimiter(rate=2, clock=clock)
    call = face.wrap(limiter, lambda: clock.now())
    assert call() == 0.0
    assert call() == pytest.approx(0.5)
    assert call() == pytest.approx(1.0)


def test_max_wait_rejects_at_once_with_retry_after(face):
    """If the wait would exceed max_wait, RateLimited is raised without waiting."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, per=10, max_wait=2, clock=clock)
    call = face.wrap(limiter, lambda: "ok")
    assert call() == "ok"
    with pytest.raises(RateLimited) as info:
        call()
    assert info.value.retry_after == pytest.approx(10.0)
    assert clock.now() == 0.0  # it did not wait in vain
    assert isinstance(info.value, buttress.RejectedError)
    clock.advance(8.5)
    assert call() == "ok"  # 1.5 s left: within max_wait
    assert clock.now() == pytest.approx(10.0)


def test_waiting_never_crosses_the_enclosing_deadline():
    """Inside a timeout, a wait longer than remaining() is rejected up front."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, clock=clock)
    limiter.acquire()
    with pytest.raises(RateLimited), buttress.timeout(0.5, clock=clock):
        limiter.acquire()
    assert clock.now() == 0.0


def test_try_acquire_never_jumps_the_queue():
    """With callers queued, try_acquire refuses even if a permit is due."""
    clock = FakeClock(autojump=False)
    limiter = RateLimiter(rate=1, clock=clock)

    async def main() -> None:
        assert limiter.try_acquire()  # (a blocking acquire() here would warn)
        waiter = asyncio.ensure_future(limiter.acquire_async())
        await asyncio.sleep(0)
        clock.advance(1.0)
        assert not limiter.try_acquire()  # the queued caller comes first
        await asyncio.wait_for(waiter, 1)
        assert not limiter.try_acquire()

    asyncio.run(main())


def test_weights_and_their_validation():
    """A weighted acquire takes that many units; weights beyond burst are refused."""
    clock = FakeClock()
    limiter = RateLimiter(rate=10, burst=5, clock=clock)
    assert limiter.try_acquire(5)
    assert not limiter.try_acquire(1)
    clock.advance(0.3)
    assert limiter.try_acquire(3)
    with pytest.raises(ValueError, match="weight must be between 1 and burst"):
        limiter.try_acquire(6)
    with pytest.raises(TypeError, match="weight must be an integer"):
        limiter.acquire(1.5)  # type: ignore[arg-type]


def test_async_waiters_are_served_fifo_and_fairly():
    """200 tasks that yield between calls: served in turn, Jain fairness >= 0.99."""
    clock = FakeClock()
    limiter = RateLimiter(rate=100, clock=clock)
    counts = [0] * 200
    order: list[int] = []

    async def worker(n: int) -> None:
        while clock.now() < 20:
            await limiter.acquire_async()
            counts[n] += 1
            order.append(n)
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(*(worker(n) for n in range(200)))

    asyncio.run(main())
    jain = sum(counts) ** 2 / (len(counts) * sum(c * c for c in counts))
    assert jain >= 0.99
    # Once everyone is queued, service goes round-robin: nobody is served twice in a row
    # while others wait.
    steady = order[200:1800]
    assert all(steady[i] != steady[i + 1] for i in range(len(steady) - 1))


def test_storm_of_cancelled_waiters_leaves_the_limiter_idle():
    """10,000 waiters cancelled: none was admitted, none is queued, the bucket refills."""
    clock = FakeClock(autojump=False)
    limiter = RateLimiter(rate=1, clock=clock)

    async def main() -> None:
        assert limiter.try_acquire()
        waiters = [asyncio.ensure_future(limiter.acquire_async()) for _ in range(10_000)]
        await asyncio.sleep(0)
        assert limiter.snapshot()["waiting"] == 10_000
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)

    asyncio.run(main())
    snap = limiter.snapshot()
    assert snap["waiting"] == 0
    assert snap["admitted"] == 1
    clock.advance(1.0)
    assert limiter.tokens() == pytest.approx(1.0)
    assert limiter.try_acquire()


def test_cancelling_the_head_wakes_the_next_waiter():
    """When the head of the queue is cancelled, the next waiter takes its turn."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, clock=clock)

    async def main() -> None:
        assert limiter.try_acquire()
        head = asyncio.ensure_future(limiter.acquire_async())
        second = asyncio.ensure_future(limiter.acquire_async())
        await asyncio.sleep(0)
        head.cancel()
        await asyncio.wait_for(second, 5)
        assert clock.now() == pytest.approx(1.0)

    asyncio.run(main())


def test_threads_never_over_admit():
    """8 threads calling try_acquire against real time never beat the GCRA bound."""
    limiter = RateLimiter(rate=2000, burst=10)
    times: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            if limiter.try_acquire():
                now = limiter.clock.now()
                with lock:
                    times.append(now)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    threading.Event().wait(0.3)
    stop.set()
    for thread in threads:
        thread.join()
    times.sort()
    assert len(times) == limiter.snapshot()["admitted"]
    # The timestamps are read after admission, so allow for scheduling jitter on them
    # by checking the total against the bound over the whole run.
    span = times[-1] - times[0]
    assert len(times) <= 10 + 2000 * span + 1


def test_keys_have_independent_budgets():
    """for_key gives each key its own bucket with the same settings."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, clock=clock)
    alice, bob = limiter.for_key("alice"), limiter.for_key("bob")
    assert alice.try_acquire() and bob.try_acquire()
    assert not alice.try_acquire()
    assert limiter.for_key("alice") is alice
    assert limiter.try_acquire()  # the parent's own budget is separate


def test_the_one_lock_keyed_path_matches_for_key_try_acquire():
    """try_acquire(key=) (the ASGI middleware's hot path) shares budgets, counts and queues with
    for_key(); an unhashable key gets for_key()'s error."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, burst=2, max_wait=5, clock=clock)
    assert limiter.try_acquire(key="alice") and limiter.try_acquire(key="alice")
    assert not limiter.try_acquire(key="alice")
    assert not limiter.for_key("alice").try_acquire()  # one budget for both paths
    assert limiter.try_acquire(key="bob")
    clock.advance(1.0)
    assert limiter.for_key("alice").try_acquire()
    assert not limiter.try_acquire(key="alice")
    snapshot = limiter.snapshot()
    assert snapshot["admitted"] == 4

    async def queued() -> None:
        assert limiter.try_acquire(key="bob") and limiter.try_acquire(key="bob")  # bob is drained
        waiter = asyncio.ensure_future(limiter.for_key("bob").acquire_async())
        await asyncio.sleep(0)  # queued, sleeping until its unit conforms
        clock.advance(2.0)  # its unit conforms now, but the waiter has not run yet
        assert not limiter.try_acquire(key="bob")  # a newcomer does not jump the queue
        await waiter

    asyncio.run(queued())
    assert limiter.snapshot()["admitted"] == 7
    with pytest.raises(TypeError, match="key must be hashable"):
        limiter.try_acquire(key=["not", "hashable"])


def test_idle_keys_are_dropped_without_changing_behaviour():
    """Buckets that refilled are dropped; a dropped key behaves like a fresh one."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, per=1, clock=clock)
    held = limiter.for_key("k0")
    assert held.try_acquire()
    for n in range(1, 200):
        limiter.for_key(f"k{n}").try_acquire()
    clock.advance(2.0)
    for n in range(200, 400):
        limiter.for_key(f"k{n}").try_acquire()
    assert limiter.keys < 300  # the idle first batch was swept
    # A view held across the sweep still shares its key's budget.
    assert held.try_acquire()
    assert not limiter.for_key("k0").try_acquire()


def test_live_keys_are_bounded_by_max_keys():
    """At most max_keys buckets are held, however many keys are used."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, per=3600, max_keys=100, clock=clock)
    for n in range(5000):
        limiter.for_key(n).try_acquire()
    assert limiter.keys <= 200


def test_snapshot_and_health():
    """Tokens, waiting and counters are reported; queued callers make health warn."""
    clock = FakeClock(autojump=False)
    limiter = RateLimiter("api", rate=10, burst=2, clock=clock)
    assert buttress.health()["status"] == "pass"
    limiter.try_acquire(2)
    # An empty bucket alone is normal between admissions: still passing.
    assert buttress.health()["status"] == "pass"
    snap = buttress.state()["rate_limiter"]["api"]
    assert snap["tokens"] == 0.0
    assert snap["admitted"] == 1

    async def main() -> None:
        waiter = asyncio.ensure_future(limiter.acquire_async())
        await asyncio.sleep(0)
        health = buttress.health()
        assert health["status"] == "warn"
        assert health["checks"]["api:rate_limiter"][0]["observedValue"]["waiting"] == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)

    asyncio.run(main())
    clock.advance(0.1)
    assert limiter.tokens() == pytest.approx(1.0)


def test_evicting_live_keys_costs_at_most_burst_per_early_eviction():
    """Past max_keys, every key is still served; each key evicted before it refilled may
    admit up to burst more, once (the cyclic worst case: every return is a new key)."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, per=60, max_keys=100, clock=clock)
    admitted = 0
    for _ in range(5):
        for key in range(300):
            admitted += limiter.for_key(key).try_acquire()
    # 300 keys, each allowed one admission per 60 s of frozen time, plus the bound.
    assert 300 <= admitted <= 300 + limiter.burst * limiter.evicted_early
    assert limiter.keys <= 100


def test_context_manager_forms():
    """`with limiter:` and `async with limiter:` take one permit."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, clock=clock)
    with limiter:
        pass

    async def main() -> None:
        async with limiter:
            pass

    asyncio.run(main())
    assert clock.now() == pytest.approx(1.0)


def test_window_helper_is_right():
    """The helper used by the property test counts closed windows correctly."""
    assert max_in_window([0.0, 0.5, 1.0, 1.5], [1, 1, 1, 1], 1.0) == 3
    assert bisect_left([1.0], 1.0) == 0


def test_blocking_acquire_from_many_threads_is_exact():
    """8 threads blocking in acquire(): every admission counted, spacing never beaten."""
    limiter = RateLimiter(rate=2000, burst=1)
    stamps: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(50):
            limiter.acquire()
            with lock:
                stamps.append(limiter.clock.now())

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert limiter.snapshot()["admitted"] == 400
    assert limiter.snapshot()["waiting"] == 0
    stamps.sort()
    # 400 admissions at 2000/s with burst 1 take at least 399 intervals.
    assert stamps[-1] - stamps[0] >= 399 / 2000 - 0.01


def test_keyed_view_snapshot_reports_the_parent_counters_and_its_key():
    """A view's snapshot shows its own bucket and key, and the shared counters."""
    clock = FakeClock()
    limiter = RateLimiter("per-user", rate=1, clock=clock)
    view = limiter.for_key("alice")
    assert view.try_acquire()
    snap = view.snapshot()
    assert snap["key"] == "'alice'"
    assert snap["tokens"] == 0.0
    assert snap["admitted"] == 1
    assert snap["name"] == "per-user"
    assert limiter.snapshot()["keys"] == 1
