"""Keyed rate limiter at scale: idle keys dropped without a scan, new keys always admitted
past ``max_keys``, eviction's accuracy cost bounded, light ``for_key()`` views, threads."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buttress import RateLimited, RateLimiter
from buttress.events import CallRejected, Event
from buttress.testing import FakeClock


class ExactGCRA:
    """An unbounded keyed GCRA that never forgets a key: the reference."""

    def __init__(self, rate: float, per: float, burst: int, clock: FakeClock) -> None:
        self.interval = per / rate
        self.tolerance = burst * self.interval
        self.clock = clock
        self.tats: dict[Hashable, float] = {}

    def try_acquire(self, key: Hashable, weight: int = 1) -> bool:
        now = self.clock.now()
        tat = max(self.tats.get(key, now), now) + weight * self.interval
        if tat - now > self.tolerance + 1e-9:
            return False
        self.tats[key] = tat
        return True


traffic = st.lists(
    st.tuples(st.floats(0, 0.5), st.integers(0, 30), st.integers(1, 3)),
    min_size=1,
    max_size=200,
)


@settings(max_examples=150, deadline=None)
@given(rate=st.integers(1, 20), burst=st.integers(3, 6), steps=traffic)
def test_dropping_idle_keys_never_changes_a_decision(rate, burst, steps):
    """Property: while max_keys holds every key in use, every decision equals the exact,
    unbounded GCRA's (only refilled keys are dropped, and they carry no state)."""
    clock = FakeClock()
    limiter = RateLimiter(rate=rate, burst=burst, max_keys=31, clock=clock)
    exact = ExactGCRA(rate, 1.0, burst, clock)
    for gap, key, weight in steps:
        clock.advance(gap)
        assert limiter.try_acquire(weight, key=key) == exact.try_acquire(key, weight)
    assert limiter.evicted_early == 0


@settings(max_examples=150, deadline=None)
@given(
    rate=st.integers(1, 20),
    burst=st.integers(1, 6),
    max_keys=st.integers(1, 8),
    steps=st.lists(st.tuples(st.floats(0, 0.5), st.integers(0, 30)), min_size=1, max_size=200),
)
def test_early_evictions_cost_at_most_burst_each(rate, burst, max_keys, steps):
    """Property: with more keys than max_keys, buttress admits at most ``burst`` more than
    the exact GCRA per key evicted before it refilled, and identically when none was."""
    clock = FakeClock()
    limiter = RateLimiter(rate=rate, burst=burst, max_keys=max_keys, clock=clock)
    exact = ExactGCRA(rate, 1.0, burst, clock)
    ours = theirs = 0
    same = True
    for gap, key in steps:
        clock.advance(gap)
        mine, reference = limiter.try_acquire(key=key), exact.try_acquire(key)
        ours += mine
        theirs += reference
        same = same and mine == reference
        assert limiter.keys <= max_keys
        table = limiter.binding
        assert set(table.tats) <= set(table.ring)  # every live key is in the round
    assert 0 <= ours - theirs <= burst * limiter.evicted_early
    if limiter.evicted_early == 0:
        assert same


def test_new_keys_are_admitted_past_max_keys():
    """A table full of keys that have not refilled never makes a new key wait or fail."""
    clock = FakeClock()  # frozen: nothing refills
    limiter = RateLimiter(rate=1, per=60, max_keys=100, clock=clock)
    for key in range(100):
        assert limiter.try_acquire(key=key)
    assert all(limiter.try_acquire(key=f"new-{n}") for n in range(1000))
    limiter.acquire(key="newest")  # the waiting face admits at once too
    assert limiter.keys == 100
    assert limiter.evicted_early == 1001
    assert limiter.snapshot()["evicted_early"] == 1001


def test_refilled_keys_make_room_before_live_ones():
    """At max_keys, keys that refilled are dropped first; a drained key keeps its state."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, per=60, max_keys=3, clock=clock)
    assert limiter.try_acquire(key="b")
    assert limiter.try_acquire(key="c")
    clock.advance(60)  # b and c refilled
    assert limiter.try_acquire(key="a")  # a is drained for the next 60 s
    assert limiter.try_acquire(key="d")  # the table is full: b and c make room
    assert limiter.keys == 2
    assert not limiter.try_acquire(key="a")  # a's state survived
    assert limiter.evicted_early == 0
    assert limiter.for_key("a").tokens() == 0.0


def test_idle_keys_leave_as_new_keys_arrive():
    """Each new key drops idle keys from the old end: the table follows the live set."""
    clock = FakeClock()
    limiter = RateLimiter(rate=10, burst=2, clock=clock)
    for key in range(3000):
        limiter.try_acquire(key=key)
    assert limiter.keys == 3000
    clock.advance(1.0)  # all refilled
    for key in range(3000, 4000):
        limiter.try_acquire(key=key)
    assert limiter.keys == 1000  # the 3,000 idle ones went, three per new key
    assert limiter.evicted_early == 0


def test_the_round_stays_bounded_under_thrashing():
    """Keys cycling through a table too small for them (each evicted and back within a
    round) never grow the round past twice the table plus a constant."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, per=60, max_keys=2000, clock=clock)
    table = limiter.binding
    longest = 0
    for _ in range(10):
        for key in range(6000):
            limiter.try_acquire(key=key)
            longest = max(longest, len(table.ring))
    assert limiter.keys == 2000
    assert longest <= 2 * 2000 + 1024
    assert set(table.tats) <= set(table.ring)


def test_a_key_with_waiters_is_never_evicted():
    """A key callers queue on keeps its bucket through any flood of new keys."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, per=10, max_keys=5, clock=clock)
    assert limiter.try_acquire(key="busy")

    async def main() -> None:
        waiter = asyncio.ensure_future(limiter.acquire_async(key="busy"))
        await asyncio.sleep(0)
        assert limiter.for_key("busy").snapshot()["waiting"] == 1
        for n in range(100):
            assert limiter.try_acquire(key=n)
        assert not limiter.try_acquire(key="busy")  # nobody jumps the queue
        assert limiter.for_key("busy").snapshot()["waiting"] == 1
        await waiter  # served once its unit conforms (the fake clock jumps there)

    asyncio.run(main())
    assert clock.now() == pytest.approx(10.0)
    # Back in the table, drained by the waiter's admission, counted once.
    assert not limiter.try_acquire(key="busy")
    assert limiter.for_key("busy").snapshot()["waiting"] == 0
    assert limiter.keys <= 5


def test_a_waiter_that_gives_up_returns_the_key_to_the_table():
    """A cancelled waiter leaves; its key's state goes back unchanged and is still live."""
    clock = FakeClock(autojump=False)
    limiter = RateLimiter(rate=1, per=10, clock=clock)
    assert limiter.try_acquire(key="k")

    async def main() -> None:
        waiter = asyncio.ensure_future(limiter.acquire_async(key="k"))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)

    asyncio.run(main())
    assert limiter.keys == 1
    assert limiter.for_key("k").tokens() == 0.0
    assert not limiter.try_acquire(key="k")
    clock.advance(10)
    assert limiter.try_acquire(key="k")


def test_a_rejected_wait_leaves_no_queue_behind():
    """A keyed acquire that cannot be in time raises at once and changes nothing."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, per=10, max_wait=1.0, clock=clock)
    assert limiter.try_acquire(key="k")
    with pytest.raises(RateLimited) as caught:
        limiter.acquire(key="k")
    assert caught.value.retry_after == pytest.approx(10.0)
    assert limiter.keys == 1
    assert limiter.for_key("k").snapshot()["waiting"] == 0


def test_threads_past_max_keys_admit_every_new_key():
    """Threads flooding new keys past max_keys: every first use is admitted, the table
    stays bounded, counters add up."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, per=60, max_keys=100, clock=clock)
    threads, per_thread = 8, 500
    admitted = [0] * threads
    barrier = threading.Barrier(threads)

    def run(index: int) -> None:
        barrier.wait()
        for n in range(per_thread):
            admitted[index] += limiter.try_acquire(key=(index, n))
            assert limiter.keys <= 100

    pool = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert sum(admitted) == threads * per_thread
    assert limiter.snapshot()["admitted"] == threads * per_thread
    assert limiter.keys == 100


def test_views_are_light_and_read_through():
    """A view holds a few slots, not a copy of its limiter; it sees later changes."""
    clock = FakeClock()
    limiter = RateLimiter("light", rate=1, per=60, max_wait=0, clock=clock)
    view = limiter.for_key("alice")
    assert isinstance(view, RateLimiter)
    assert sys.getsizeof(view) < 200
    assert view.key == "alice"
    assert view.name is None
    assert (view.rate, view.per, view.burst, view.interval) == (1, 60, 1, 60)
    assert view.clock is clock
    heard: list[Event] = []
    limiter.add_listener(heard.append)  # added after the view was made
    assert view.try_acquire()
    with pytest.raises(RateLimited):
        view.acquire()
    assert [type(e) for e in heard] == [CallRejected]
    assert limiter.for_key("alice") is view
    assert view.for_key("bob") is limiter.for_key("bob")


def test_views_of_a_subclass_are_instances_of_it():
    """A subclass's views keep its overrides."""

    class Tagged(RateLimiter):
        def tag(self) -> str:
            return f"tagged {self.key!r}"

    limiter = Tagged(rate=1, clock=FakeClock())
    view = limiter.for_key("k")
    assert isinstance(view, Tagged)
    assert view.tag() == "tagged 'k'"
    assert type(limiter.for_key("j")) is type(view)
