"""Waiting: the waiter queue's order and lazy removal, and async waits on the system clock
(the waiter's own future awaited directly, a loop timer for the timeout)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from buttress import Bulkhead, BulkheadFull, RateLimiter
from buttress._waiters import _COMPACT_AT, Waiter, WaiterQueue

# -- the queue ---------------------------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 3)),
        st.tuples(st.just("popleft"), st.just(0)),
        st.tuples(st.just("remove"), st.integers(0, 10_000)),
    ),
    max_size=300,
)


@given(_ops)
def test_queue_agrees_with_a_list(ops: list[tuple[str, int]]) -> None:
    """Any mix of appends, pops and removals from anywhere: the same order, length, head
    and weight as a plain list, the head always a queued waiter, and dead entries never
    more than about as many as the live ones."""
    queue, model = WaiterQueue(), []
    for op, arg in ops:
        if op == "append":
            waiter = Waiter(arg)
            queue.append(waiter)
            model.append(waiter)
        elif op == "popleft" and model:
            assert queue.popleft() is model.pop(0)
        elif op == "remove" and model:
            waiter = model.pop(arg % len(model))
            assert queue.remove(waiter) is True
            assert queue.remove(waiter) is False  # already gone
        assert len(queue) == len(model)
        assert bool(queue) == bool(queue.items) == bool(model)
        assert queue.head() is (model[0] if model else None)
        assert queue.weight == sum(w.weight for w in model)
        assert [w for w in queue.items if w.queued] == model
        assert queue.dead <= max(_COMPACT_AT, len(model)) + 1
    if not model:
        assert len(queue.items) == 0  # an empty queue holds nothing


def test_removing_most_of_a_long_queue_compacts_it() -> None:
    """10,000 waiters leaving from the middle: the deque keeps about as many dead entries as
    live ones, and the survivors keep their order."""
    queue = WaiterQueue()
    waiters = [Waiter() for _ in range(10_000)]
    for waiter in waiters:
        queue.append(waiter)
    for waiter in waiters[1:-1]:
        queue.remove(waiter)
    assert len(queue) == 2
    assert len(queue.items) <= 2 + _COMPACT_AT + 1
    assert queue.popleft() is waiters[0]
    assert queue.popleft() is waiters[-1]
    assert not queue.items


def test_grant_oldest_marks_and_wakes_in_order() -> None:
    """grant_oldest() hands out in FIFO order, skipping waiters that left."""
    queue = WaiterQueue()
    first, gone, second = Waiter(), Waiter(), Waiter()
    for waiter in (first, gone, second):
        queue.append(waiter)
    queue.remove(gone)
    assert queue.grant_oldest() is first and first.granted and first.event.is_set()
    assert queue.grant_oldest() is second and second.granted
    assert not gone.granted and not queue


# -- async waits on the system clock -----------------------------------------------------------


def _recording_timers(loop: asyncio.AbstractEventLoop) -> list[tuple[asyncio.TimerHandle, Any]]:
    """Wrap ``loop.call_later`` so the test sees every timer a wait arms."""
    armed: list[tuple[asyncio.TimerHandle, Any]] = []
    original = loop.call_later

    def call_later(delay: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        handle = original(delay, callback, *args, **kwargs)
        armed.append((handle, (callback, args)))
        return handle

    loop.call_later = call_later  # type: ignore[method-assign]
    return armed


def test_a_bounded_wait_times_out_on_the_system_clock() -> None:
    """max_wait on the real clock: the waiter gives up, leaves the queue, and is counted."""
    bulkhead = Bulkhead(max_concurrent=1, max_queue=1, max_wait=0.01)

    async def main() -> None:
        held = await bulkhead.acquire_async()
        with pytest.raises(BulkheadFull, match="in time"):
            await bulkhead.acquire_async()
        assert bulkhead.queued == 0 and bulkhead.in_flight == 1
        held.release()

    asyncio.run(main())
    assert bulkhead.in_flight == 0
    assert bulkhead.snapshot()["timed_out"] == 1


def test_a_granted_wait_cancels_its_timer() -> None:
    """A waiter granted before its max_wait leaves no timer armed behind it."""
    bulkhead = Bulkhead(max_concurrent=1, max_queue=1, max_wait=30)

    async def main() -> None:
        armed = _recording_timers(asyncio.get_running_loop())
        held = await bulkhead.acquire_async()
        waiting = asyncio.ensure_future(bulkhead.acquire_async())
        await asyncio.sleep(0)
        assert len(armed) == 1 and not armed[0][0].cancelled()
        held.release()
        permit = await waiting
        assert armed[0][0].cancelled()
        permit.release()

    asyncio.run(main())
    assert bulkhead.in_flight == 0 and bulkhead.queued == 0


def test_a_cancelled_wait_cancels_its_timer() -> None:
    """A waiter cancelled while queued leaves the queue and its timer."""
    bulkhead = Bulkhead(max_concurrent=1, max_queue=1, max_wait=30)

    async def main() -> None:
        armed = _recording_timers(asyncio.get_running_loop())
        held = await bulkhead.acquire_async()
        waiting = asyncio.ensure_future(bulkhead.acquire_async())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert armed[0][0].cancelled()
        assert bulkhead.queued == 0
        held.release()

    asyncio.run(main())
    assert bulkhead.in_flight == 0


@pytest.mark.parametrize("released", [True, False])
def test_a_grant_racing_the_timeout_is_decided_under_the_lock(released: bool) -> None:
    """The timer fires, and in the same turn of the loop a slot is released (or not): the
    waiter gets the slot exactly when it was granted first, and nothing leaks either way."""
    bulkhead = Bulkhead(max_concurrent=1, max_queue=1, max_wait=30)

    async def main() -> None:
        armed = _recording_timers(asyncio.get_running_loop())
        held = await bulkhead.acquire_async()
        waiting = asyncio.ensure_future(bulkhead.acquire_async())
        await asyncio.sleep(0)
        callback, args = armed[0][1]
        callback(*args)  # the timeout fires: the waiter is woken, not granted
        if released:
            held.release()  # ...and a slot is handed to it before it runs
            permit = await waiting
            assert bulkhead.in_flight == 1
            permit.release()
        else:
            with pytest.raises(BulkheadFull, match="in time"):
                await waiting
            held.release()

    asyncio.run(main())
    assert bulkhead.in_flight == 0 and bulkhead.queued == 0
    assert bulkhead.snapshot()["timed_out"] == (0 if released else 1)


def test_fifo_holds_for_a_thousand_contending_tasks() -> None:
    """1,000 tasks through a decorated coroutine with 3 slots: served in arrival order, the
    limit never exceeded, nothing held or queued at the end."""
    bulkhead = Bulkhead(max_concurrent=3, max_queue=1_000)
    order: list[int] = []
    running = peak = 0

    @bulkhead
    async def work(n: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        order.append(n)
        await asyncio.sleep(0)
        running -= 1

    async def main() -> None:
        await asyncio.gather(*(work(n) for n in range(1_000)))

    asyncio.run(main())
    assert order == list(range(1_000))
    assert peak == 3
    assert bulkhead.in_flight == 0 and bulkhead.queued == 0
    assert bulkhead.snapshot()["accepted"] == 1_000


def test_cancelled_limiter_waiters_leave_nothing_behind() -> None:
    """Async limiter waiters (the same waiting, no timer) cancelled mid-queue leave it empty."""
    limiter = RateLimiter(rate=1.0, per=3600.0)

    async def main() -> None:
        await limiter.acquire_async()
        waiting = [asyncio.ensure_future(limiter.acquire_async()) for _ in range(1_000)]
        await asyncio.sleep(0)
        assert limiter.snapshot()["waiting"] == 1_000
        for task in waiting[1:]:
            task.cancel()
        await asyncio.gather(*waiting[1:], return_exceptions=True)
        assert limiter.snapshot()["waiting"] == 1
        waiting[0].cancel()
        await asyncio.gather(waiting[0], return_exceptions=True)

    asyncio.run(main())
    assert limiter.snapshot()["waiting"] == 0
