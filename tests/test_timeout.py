"""Timeout: async cancellation, the sync deadline, propagation through remaining()."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import buttress
from buttress import TimeoutExceeded, remaining, timeout
from buttress.testing import FakeClock, capture_events


def test_async_timeout_cancels_the_work_and_raises():
    """The awaited work is cancelled; TimeoutExceeded is both ButtressError and TimeoutError."""
    clock = FakeClock()
    cancelled = []

    @timeout(2, clock=clock)
    async def slow() -> None:
        try:
            await clock.asleep(10)
        except asyncio.CancelledError:
            cancelled.append(clock.now())
            raise

    with pytest.raises(TimeoutExceeded) as info:
        asyncio.run(slow())
    assert cancelled == [2.0]
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, buttress.ButtressError)
    assert info.value.timeout == 2
    assert isinstance(info.value.__cause__, asyncio.CancelledError)


def test_async_timeout_returns_the_result_in_time():
    """A call that finishes in time returns its result and leaves no timer behind."""
    clock = FakeClock()

    @timeout(2, clock=clock)
    async def quick() -> str:
        await clock.asleep(1)
        return "done"

    assert asyncio.run(quick()) == "done"
    assert clock.pending_timers == 0


def test_async_context_manager():
    """`async with timeout(...)` bounds a block the same way."""
    clock = FakeClock()

    async def main() -> None:
        with pytest.raises(TimeoutExceeded):
            async with timeout(1, clock=clock):
                await clock.asleep(5)
        async with timeout(1, clock=clock):
            await clock.asleep(0.5)

    asyncio.run(main())


def test_outer_cancellation_is_not_turned_into_a_timeout():
    """Cancelling the caller propagates CancelledError, never TimeoutExceeded."""

    async def main() -> None:
        async def guarded() -> None:
            async with timeout(10):
                await asyncio.sleep(10)

        task = asyncio.ensure_future(guarded())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_remaining_reports_the_innermost_deadline():
    """remaining() is None outside, the tighter deadline inside nested timeouts."""
    clock = FakeClock()
    assert remaining() is None

    async def main() -> None:
        async with timeout(10, clock=clock):
            assert remaining() == pytest.approx(10)
            await clock.asleep(4)
            async with timeout(20, clock=clock):  # cannot widen the outer deadline
                assert remaining() == pytest.approx(6)
            async with timeout(1, clock=clock):
                assert remaining() == pytest.approx(1)
            assert remaining() == pytest.approx(6)
        assert remaining() is None

    asyncio.run(main())


def test_sync_timeout_sets_a_deadline_and_discards_a_late_result():
    """Sync: the function runs to completion, but a late result raises TimeoutExceeded."""
    clock = FakeClock()
    seen = []

    @timeout(1, clock=clock)
    def work(duration: float) -> str:
        seen.append(remaining())
        clock.advance(duration)
        return "result"

    assert work(0.5) == "result"
    with pytest.raises(TimeoutExceeded):
        work(1.5)
    assert seen == [pytest.approx(1), pytest.approx(1)]


def test_sync_context_manager_and_errors_pass_through():
    """`with timeout(...)` works in sync code; the block's own errors are not replaced."""
    clock = FakeClock()
    with pytest.raises(KeyError), timeout(1, clock=clock):
        clock.advance(2)
        raise KeyError("own error")
    with pytest.raises(TimeoutExceeded), timeout(1, clock=clock):
        clock.advance(2)


def test_pipeline_timeout_bounds_retries_as_people_expect():
    """pipeline(timeout(2), retry(...)): retries stop when the deadline leaves no room."""
    clock = FakeClock()
    calls = []

    @buttress.pipeline(timeout(2, clock=clock), buttress.retry(10, backoff=[0.5], clock=clock))
    async def flaky() -> None:
        calls.append(clock.now())
        await clock.asleep(0.2)
        raise ConnectionError

    with pytest.raises(ConnectionError):
        asyncio.run(flaky())
    # Attempts at 0, 0.7, 1.4; a fourth would start its sleep at 1.6 + 0.5 > 2.
    assert calls == [0, pytest.approx(0.7), pytest.approx(1.4)]


def test_timeout_events_and_snapshot():
    """An expiry emits TimeoutFired and is counted."""
    clock = FakeClock()
    policy = timeout(1, name="db", clock=clock)

    @policy
    async def slow() -> None:
        await clock.asleep(3)

    with capture_events() as captured, pytest.raises(TimeoutExceeded):
        asyncio.run(slow())
    assert [event.kind for event in captured] == ["timeout_fired"]
    assert buttress.state()["timeout"]["db"]["timeouts"] == 1


def test_real_clock_timeout():
    """With the system clock, a real asyncio.sleep is cancelled on time."""

    @timeout(0.01)
    async def slow() -> None:
        await asyncio.sleep(5)

    with pytest.raises(TimeoutExceeded):
        asyncio.run(slow())


# -- Timeout.expired(): for drivers that enforce the limit themselves ---------------------------


def test_expired_counts_emits_and_returns_the_error():
    """expired(cause) counts the expiry, emits TimeoutFired and chains the cause."""
    clock = FakeClock()
    policy = timeout(2.5, name="upstream", clock=clock)
    cause = OSError("read timed out")
    with capture_events() as seen:
        error = policy.expired(cause)
    assert isinstance(error, TimeoutExceeded)
    assert error.timeout == 2.5
    assert error.__cause__ is cause
    assert "timeout 'upstream': exceeded 2.5s" in str(error)
    assert [(type(e).__name__, e.timeout) for e in seen] == [("TimeoutFired", 2.5)]
    assert policy.snapshot()["timeouts"] == 1
    assert policy.expired().__cause__ is None
    assert policy.snapshot()["timeouts"] == 2


# -- an outer cancellation landing as the timer fires ------------------------------------------
#
# Python 3.11 tells the two apart with Task.uncancel(); 3.10 has no such counter and uses
# the ledger in buttress.timeout. The `branch` fixture runs each scenario on both code
# paths: "3.10" forces the ledger on whatever Python runs the tests (its mechanics,
# _must_cancel and _cancel_message, are the same on 3.11 and 3.12).


# `buttress.timeout` the attribute is the timeout() function; this is the module.
timeout_module = importlib.import_module("buttress.timeout")


@pytest.fixture(params=["native", "3.10"])
def branch(request, monkeypatch):
    """Run the test on this Python's own path, and on the 3.10 path."""
    if request.param == "3.10":
        monkeypatch.setattr(timeout_module, "_UNCANCEL", False)
    return request.param


def _race(order: str, *, nested: bool = False) -> BaseException | None:
    """Start a guarded task, fire its timer and cancel it from outside in one loop tick;
    return what the task raised (None: it returned)."""
    clock = FakeClock(autojump=False)
    outcome: list[BaseException | None] = []

    async def guarded() -> None:
        if nested:
            async with timeout(5, clock=clock), timeout(5, clock=clock):
                await asyncio.sleep(10)
        else:
            async with timeout(5, clock=clock):
                await asyncio.sleep(10)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(guarded())
        await asyncio.sleep(0)  # the task now waits inside the timeout
        if order == "outer-first":
            loop.call_soon(task.cancel)
            clock.advance(5)  # the timer's callback runs right after the cancel
        elif order == "timer-first":
            clock.advance(5)
            loop.call_soon(task.cancel)  # before the task resumes
        elif order == "timer-only":
            clock.advance(5)
        try:
            await task
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    asyncio.run(main())
    return outcome[0]


def _raised(start: Callable[[asyncio.AbstractEventLoop], Awaitable[asyncio.Task[Any]]]) -> object:
    """Run ``start`` (which returns a task it set up) and return what the task raised."""

    async def main() -> object:
        task = await start(asyncio.get_running_loop())
        try:
            await task
        except BaseException as exc:
            return exc
        return None

    return asyncio.run(main())


@pytest.mark.parametrize("order", ["outer-first", "timer-first"])
def test_outer_cancel_as_the_timer_fires_stays_a_cancellation(branch, order):
    """Whichever comes first in the same tick, the caller's cancellation wins."""
    outcome = _race(order)
    assert isinstance(outcome, asyncio.CancelledError), outcome


def test_a_timer_alone_is_still_a_timeout(branch):
    """Without an outer cancellation the expiry is a TimeoutExceeded."""
    assert isinstance(_race("timer-only"), TimeoutExceeded)


def test_nested_timeouts_firing_together_report_the_outer_one(branch):
    """Two buttress timers firing at once: the enclosing timeout claims the expiry."""
    outcome = _race("timer-only", nested=True)
    assert isinstance(outcome, TimeoutExceeded)
    assert outcome.timeout == 5


@pytest.mark.parametrize("order", ["outer-first", "timer-first"])
def test_nested_timeouts_and_an_outer_cancel_stay_a_cancellation(branch, order):
    """Both timers and the caller in one tick: still the caller's cancellation."""
    assert isinstance(_race(order, nested=True), asyncio.CancelledError)


def test_an_outer_cancel_when_the_task_is_ready_to_run_stays_a_cancellation(branch):
    """The task's awaited future is done (it is about to resume) when both requests land."""
    clock = FakeClock(autojump=False)

    async def start(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any]:
        gate: asyncio.Future[None] = loop.create_future()

        async def guarded() -> None:
            async with timeout(5, clock=clock):
                await gate

        task = loop.create_task(guarded())
        await asyncio.sleep(0)

        def resolve_and_cancel() -> None:
            gate.set_result(None)  # the task is now scheduled to resume...
            task.cancel()  # ...and is cancelled before it does

        loop.call_soon(resolve_and_cancel)
        clock.advance(5)
        return task

    assert isinstance(_raised(start), asyncio.CancelledError)


def test_a_cancel_interrupted_by_the_timer_stays_a_cancellation(branch):
    """The caller's CancelledError is being handled (an await in cleanup) when the timer fires."""
    clock = FakeClock(autojump=False)

    async def start(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any]:
        cleaning = asyncio.Event()

        async def guarded() -> None:
            async with timeout(5, clock=clock):
                try:
                    await asyncio.sleep(10)
                finally:
                    cleaning.set()
                    await asyncio.sleep(10)  # cleanup that the timer interrupts

        task = loop.create_task(guarded())
        await asyncio.sleep(0)
        task.cancel()
        await cleaning.wait()
        clock.advance(5)
        return task

    assert isinstance(_raised(start), asyncio.CancelledError)


def test_the_310_path_leaves_the_task_as_it_found_it(monkeypatch):
    """After a claimed expiry the ledger is gone and the task's cancel message restored."""
    monkeypatch.setattr(timeout_module, "_UNCANCEL", False)
    clock = FakeClock(autojump=False)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def guarded() -> str:
            with pytest.raises(TimeoutExceeded):
                async with timeout(5, clock=clock):
                    await asyncio.sleep(10)
            task = asyncio.current_task()
            assert task is not None
            assert task not in timeout_module._ledgers
            assert task._cancel_message is None  # type: ignore[attr-defined]
            return "went on"

        task = loop.create_task(guarded())
        await asyncio.sleep(0)
        clock.advance(5)
        assert await task == "went on"

    asyncio.run(main())
