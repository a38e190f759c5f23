"""Timeout: async cancellation, the sync deadline, propagation through remaining()."""

from __future__ import annotations

import asyncio

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
