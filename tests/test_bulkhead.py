"""Bulkhead: concurrency and queue limits, FIFO, waits, deadlines, threads, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import buttress
from buttress import Bulkhead, BulkheadFull
from buttress.testing import FakeClock


def test_rejects_at_once_when_full_and_no_queue(face):
    """With max_queue=0, a call beyond max_concurrent raises BulkheadFull immediately."""
    bulkhead = Bulkhead(max_concurrent=1)
    inner = face.wrap(bulkhead, lambda: "inner ran")

    def outer() -> str:
        with pytest.raises(BulkheadFull) as info:
            inner()
        assert isinstance(info.value, buttress.RejectedError)
        return "outer ok"

    # The outer call holds the only slot while it tries the inner one.
    if face.is_async:
        permit = bulkhead.try_acquire()
        assert permit is not None
        outer()
        permit.release()
    else:
        assert face.wrap(bulkhead, outer)() == "outer ok"
    assert bulkhead.in_flight == 0
    assert bulkhead.snapshot()["rejected"] == 1


def test_try_acquire_and_release_pair():
    """try_acquire never waits; its permit hands the slot back once; settling twice fails."""
    bulkhead = Bulkhead(max_concurrent=2)
    first, second = bulkhead.try_acquire(), bulkhead.try_acquire()
    assert first is not None and second is not None
    assert bulkhead.try_acquire() is None
    first.release()
    second.success()
    assert bulkhead.in_flight == 0
    with pytest.raises(RuntimeError, match="already settled"):
        first.release()
    with pytest.raises(RuntimeError, match="already settled"):
        second.failure(ValueError())
    assert bulkhead.in_flight == 0


def test_async_waiters_are_served_in_fifo_order():
    """Queued async callers get slots in arrival order."""
    bulkhead = Bulkhead(max_concurrent=1, max_queue=10)
    order: list[int] = []

    async def worker(n: int) -> None:
        async with bulkhead:
            order.append(n)
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(*(worker(n) for n in range(10)))

    asyncio.run(main())
    assert order == list(range(10))
    assert bulkhead.snapshot()["in_flight"] == 0


def test_queue_limit_rejects_the_extra_waiter():
    """At most max_queue callers wait; the next one is rejected."""
    bulkhead = Bulkhead(max_concurrent=1, max_queue=2)

    async def main() -> list[object]:
        held = await bulkhead.acquire_async()
        waiters = [asyncio.ensure_future(bulkhead.acquire_async()) for _ in range(3)]
        await asyncio.sleep(0)
        assert waiters[2].done() and isinstance(waiters[2].exception(), BulkheadFull)
        assert bulkhead.queued == 2
        held.release()
        (await waiters[0]).release()
        (await waiters[1]).release()
        return [w.done() for w in waiters]

    assert asyncio.run(main()) == [True, True, True]
    assert bulkhead.in_flight == 0 and bulkhead.queued == 0


def test_max_wait_expires_on_the_fake_clock():
    """A queued async caller gives up after max_wait of (fake) time."""
    clock = FakeClock()
    bulkhead = Bulkhead(max_concurrent=1, max_queue=1, max_wait=2.0, clock=clock)

    async def main() -> None:
        await bulkhead.acquire_async()
        started = clock.now()
        with pytest.raises(BulkheadFull, match="in time"):
            await bulkhead.acquire_async()
        assert clock.now() - started == pytest.approx(2.0)

    asyncio.run(main())
    assert bulkhead.queued == 0
    assert bulkhead.snapshot()["timed_out"] == 1


def test_sync_max_wait_expires_on_the_fake_clock():
    """A queued sync caller gives up after max_wait; nothing is left queued."""
    clock = FakeClock(grace=0.0)
    bulkhead = Bulkhead(max_concurrent=1, max_queue=1, max_wait=1.5, clock=clock)
    bulkhead.acquire()
    with pytest.raises(BulkheadFull):
        bulkhead.acquire()
    assert clock.now() == pytest.approx(1.5)
    assert bulkhead.queued == 0 and bulkhead.in_flight == 1


def test_waiting_is_bounded_by_the_enclosing_deadline():
    """Inside a timeout, a queued caller never waits past the deadline."""
    clock = FakeClock()
    bulkhead = Bulkhead(max_concurrent=1, max_queue=5, clock=clock)

    async def main() -> None:
        await bulkhead.acquire_async()
        with pytest.raises(buttress.TimeoutExceeded):
            async with buttress.timeout(3, clock=clock):
                await bulkhead.acquire_async()
        assert clock.now() == pytest.approx(3.0)
        assert bulkhead.queued == 0
        await asyncio.sleep(0)  # no stray cancellation is left behind

    asyncio.run(main())


def test_slot_goes_to_a_waiting_thread():
    """A sync waiter in another thread gets the slot released by this one."""
    bulkhead = Bulkhead(max_concurrent=1, max_queue=1)
    held = bulkhead.acquire()
    got = threading.Event()

    def waiter() -> None:
        with bulkhead.acquire():
            got.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    while bulkhead.queued == 0:
        time.sleep(0.001)
    held.release()
    thread.join(5)
    assert got.is_set()
    assert bulkhead.in_flight == 0


def test_thread_releases_to_an_async_waiter():
    """A slot released from a thread wakes an async waiter on its loop."""
    bulkhead = Bulkhead(max_concurrent=1, max_queue=1)
    held = bulkhead.acquire()

    async def main() -> None:
        threading.Timer(0.01, held.release).start()
        async with await asyncio.wait_for(bulkhead.acquire_async(), 5):
            assert bulkhead.in_flight == 1

    asyncio.run(main())
    assert bulkhead.in_flight == 0


def test_threads_never_exceed_max_concurrent():
    """16 threads hammering one bulkhead: in-flight never exceeds the limit."""
    bulkhead = Bulkhead(max_concurrent=3, max_queue=16)
    lock = threading.Lock()
    current = peak = 0
    completed = 0

    @bulkhead
    def work() -> None:
        nonlocal current, peak, completed
        with lock:
            current += 1
            peak = max(peak, current)
        time.sleep(0.0002)
        with lock:
            current -= 1
            completed += 1

    def run() -> None:
        for _ in range(200):
            work()

    threads = [threading.Thread(target=run) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak <= 3
    assert completed == 16 * 200
    snap = bulkhead.snapshot()
    assert snap["in_flight"] == 0 and snap["queued"] == 0
    assert snap["accepted"] == 16 * 200


def test_storm_of_cancelled_waiters_leaves_the_bulkhead_idle():
    """10,000 queued async callers cancelled: nothing held, nothing queued afterwards."""
    bulkhead = Bulkhead(max_concurrent=2, max_queue=20_000)

    async def main() -> None:
        first = await bulkhead.acquire_async()
        second = await bulkhead.acquire_async()
        waiters = [asyncio.ensure_future(bulkhead.acquire_async()) for _ in range(10_000)]
        await asyncio.sleep(0)
        assert bulkhead.queued == 10_000
        # Release a slot, then cancel everyone: the granted waiter must pass it on.
        first.release()
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        second.release()

    asyncio.run(main())
    snap = bulkhead.snapshot()
    assert snap["in_flight"] == 0
    assert snap["queued"] == 0


def test_a_granted_but_cancelled_waiter_passes_its_slot_on():
    """Cancellation after the slot was handed over gives it to the next waiter."""
    bulkhead = Bulkhead(max_concurrent=1, max_queue=5)

    async def main() -> None:
        held = await bulkhead.acquire_async()
        first = asyncio.ensure_future(bulkhead.acquire_async())
        second = asyncio.ensure_future(bulkhead.acquire_async())
        await asyncio.sleep(0)
        held.release()  # granted to `first`, not yet woken
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        permit = await asyncio.wait_for(second, 5)
        assert bulkhead.in_flight == 1
        permit.release()

    asyncio.run(main())
    assert bulkhead.in_flight == 0


def test_health_warns_when_saturated():
    """A bulkhead with every slot busy makes health() warn."""
    bulkhead = Bulkhead("pool", max_concurrent=1)
    assert buttress.health()["status"] == "pass"
    permit = bulkhead.acquire()
    assert buttress.health()["status"] == "warn"
    permit.release()
    assert buttress.state()["bulkhead"]["pool"]["in_flight"] == 0
