"""Timeout: async cancellation, the sync modes (deadline, thread, signal), propagation
through remaining(), and loud misuse on a running event loop."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import importlib
import signal
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

import buttress
from buttress import (
    Bulkhead,
    LoopBlockingWarning,
    RateLimiter,
    RejectedError,
    Timeout,
    TimeoutExceeded,
    events,
    remaining,
    timeout,
)
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


# -- mode="thread": control comes back at the deadline; abandoned work is bounded ----------

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def _pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("buttress-timeout")]


@pytest.fixture
def no_leaked_threads() -> Iterator[list[Timeout]]:
    """Policies appended to the list are closed after the test; their threads must end."""
    policies: list[Timeout] = []
    before = set(_pool_threads())
    yield policies
    for policy in policies:
        policy.close()
    for thread in set(_pool_threads()) - before:
        thread.join(5)
        assert not thread.is_alive(), f"{thread.name} outlived its policy"


def test_thread_mode_returns_the_result_and_carries_the_context(no_leaked_threads):
    """In time: the result comes back; remaining() and contextvars reach the worker."""
    clock = FakeClock(grace=10)  # an in-time call never waits long enough for a jump
    policy = timeout(2, mode="thread", clock=clock)
    no_leaked_threads.append(policy)
    seen = []

    @policy
    def work(x: int) -> int:
        seen.append((remaining(), request_id.get(), threading.current_thread().name))
        request_id.set("changed in the worker")  # stays in the worker's copy
        return x * 2

    token = request_id.set("req-42")
    try:
        assert work(21) == 42
        assert request_id.get() == "req-42"
    finally:
        request_id.reset(token)
    ((left, rid, thread),) = seen
    assert left == pytest.approx(2.0)
    assert rid == "req-42"
    assert thread.startswith("buttress-timeout")
    assert remaining() is None
    assert policy.snapshot()["abandoned"] == 0
    assert work.__name__ == "work"


def test_thread_mode_errors_in_time_propagate_unchanged(no_leaked_threads):
    """The function's own exception reaches the caller as itself."""
    policy = timeout(2, mode="thread", clock=FakeClock(grace=10))
    no_leaked_threads.append(policy)

    @policy
    def broken() -> None:
        raise KeyError("own error")

    with pytest.raises(KeyError, match="own error"):
        broken()
    assert policy.snapshot()["timeouts"] == 0


def test_thread_mode_hands_control_back_at_the_deadline(no_leaked_threads):
    """@timeout(0.05, mode="thread") around a call that blocks: back within 0.1 s."""
    release = threading.Event()
    policy = timeout(0.05, mode="thread")
    no_leaked_threads.append(policy)

    @policy
    def legacy_sdk_call() -> str:
        release.wait(5)  # a call that takes no timeout, stuck
        return "late answer"

    with capture_events() as seen:
        started = time.perf_counter()
        with pytest.raises(TimeoutExceeded) as info:
            legacy_sdk_call()
        took = time.perf_counter() - started
        assert took < 0.1, took
        assert info.value.timeout == 0.05
        assert "goes on in its worker thread" in str(info.value)
        assert policy.snapshot()["abandoned"] == 1
        release.set()
        _until(lambda: policy.snapshot()["abandoned"] == 0)
    late = [e for e in seen if isinstance(e, events.AbandonedCallCompleted)]
    assert [(e.result, e.error, e.timeout) for e in late] == [("late answer", None, 0.05)]
    assert late[0].elapsed >= 0.05
    assert policy.snapshot()["late_results"] == 1


def _until(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll ``condition`` (a worker thread is finishing) for up to ``limit`` real seconds."""
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, "condition never became true"
        time.sleep(0.005)


def test_abandoned_calls_are_capped_counted_and_reported(no_leaked_threads):
    """Past max_abandoned, calls are rejected at once without running; health says so."""
    clock = FakeClock()
    policy = timeout(1, mode="thread", max_workers=4, max_abandoned=2, name="sdk", clock=clock)
    no_leaked_threads.append(policy)
    gates = [threading.Event(), threading.Event()]
    started = []

    @policy
    def stuck(i: int) -> str:
        started.append(i)
        gates[i].wait(5)
        if i == 1:
            raise ConnectionError("gave up late")
        return f"result {i}"

    with capture_events() as seen:
        for i in (0, 1):
            with pytest.raises(TimeoutExceeded):
                stuck(i)  # the fake clock jumps to the deadline once the caller waits
        snap = policy.snapshot()
        assert (snap["abandoned"], snap["abandoned_total"], snap["timeouts"]) == (2, 2, 2)
        assert buttress.health()["checks"]["sdk:timeout"][0]["status"] == "fail"
        assert buttress.health()["checks"]["sdk:timeout"][0]["observedValue"] == 2

        with pytest.raises(RejectedError) as info:
            stuck(0)
        assert info.value.reason == "timeout_abandoned"
        assert info.value.name == "sdk"
        assert "max_abandoned=2" in str(info.value)
        assert started == [0, 1]  # the rejected call never ran
        assert policy.snapshot()["rejections"] == 1

        gates[0].set()
        _until(lambda: policy.snapshot()["abandoned"] == 1)
        assert buttress.health()["checks"]["sdk:timeout"][0]["status"] == "warn"
        gates[1].set()
        _until(lambda: policy.snapshot()["abandoned"] == 0)
        assert buttress.health()["checks"]["sdk:timeout"][0]["status"] == "pass"

    rejected = [e for e in seen if isinstance(e, events.CallRejected)]
    assert [e.reason for e in rejected] == ["timeout_abandoned"]
    late = sorted(
        (e for e in seen if isinstance(e, events.AbandonedCallCompleted)),
        key=lambda e: e.result is None,
    )
    assert late[0].result == "result 0"
    assert late[0].error is None
    assert isinstance(late[1].error, ConnectionError)
    snap = policy.snapshot()
    assert (snap["late_results"], snap["late_errors"]) == (1, 1)
    clock.grace = 10  # an in-time call: no jump to the deadline while it runs
    assert stuck(0) == "result 0"  # below the cap again: admitted


def test_every_worker_busy_rejects_at_once(no_leaked_threads):
    """With max_workers calls running, the next call is refused, never queued."""
    policy = timeout(5, mode="thread", max_workers=1, max_abandoned=1)
    no_leaked_threads.append(policy)
    inside, release = threading.Event(), threading.Event()

    @policy
    def hold() -> str:
        inside.set()
        release.wait(5)
        return "done"

    results: list[str] = []
    caller = threading.Thread(target=lambda: results.append(hold()))
    caller.start()
    try:
        assert inside.wait(5)
        started = time.perf_counter()
        with pytest.raises(RejectedError) as info:
            hold()
        assert time.perf_counter() - started < 1.0
        assert info.value.reason == "timeout_workers_busy"
        assert policy.snapshot()["running"] == 1
    finally:
        release.set()
        caller.join(5)
    assert results == ["done"]


def test_thread_mode_starts_nothing_once_an_enclosing_deadline_has_passed(no_leaked_threads):
    """Inside an expired deadline the call is not started (nothing to abandon)."""
    clock = FakeClock()
    policy = timeout(5, mode="thread", clock=clock)
    no_leaked_threads.append(policy)
    ran = []
    work = policy(lambda: ran.append(1))
    with pytest.raises(TimeoutExceeded), timeout(1, clock=clock):
        clock.advance(2)
        work()
    assert ran == []
    assert policy.snapshot()["abandoned_total"] == 0


def test_thread_mode_validation():
    """Pool size and cap are validated by name; they belong to mode='thread' only."""
    with pytest.raises(ValueError, match="max_workers must be >= 1, got 0"):
        timeout(1, mode="thread", max_workers=0)
    with pytest.raises(TypeError, match="max_workers must be an integer"):
        timeout(1, mode="thread", max_workers=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_abandoned must be >= 1, got 0"):
        timeout(1, mode="thread", max_abandoned=0)
    with pytest.raises(ValueError, match=r"max_abandoned must be <= max_workers \(4\), got 5"):
        timeout(1, mode="thread", max_workers=4, max_abandoned=5)
    with pytest.raises(ValueError, match="max_workers applies to mode='thread' only"):
        timeout(1, max_workers=4)
    with pytest.raises(ValueError, match="max_abandoned applies to mode='thread' only"):
        timeout(1, mode="signal", max_abandoned=4)
    with pytest.raises(ValueError, match="mode must be one of"):
        timeout(1, mode="walk-away")  # type: ignore[arg-type]
    policy = timeout(1, mode="thread", max_workers=10)
    assert (policy.max_workers, policy.max_abandoned) == (10, 2)
    assert (timeout(1, mode="thread").max_workers, timeout(1).max_workers) == (32, None)


def test_modes_other_than_deadline_refuse_coroutines_and_thread_mode_refuses_blocks():
    """mode= is about sync code: coroutines and `async with` are refused, loudly."""
    for mode in ("thread", "signal"):
        policy = timeout(1, mode=mode)  # type: ignore[arg-type]

        async def coro() -> None:
            pass

        with pytest.raises(TypeError, match="cancelled at the deadline already"):
            policy(coro)

        async def block(policy: Timeout = policy) -> None:
            async with policy:
                pass

        with pytest.raises(TypeError, match="async with"):
            asyncio.run(block())
    with pytest.raises(TypeError, match="cannot move to another thread"), timeout(1, mode="thread"):
        pass

    def numbers() -> Iterator[int]:
        yield 1

    async def async_numbers() -> AsyncIterator[int]:
        yield 1

    for mode in ("thread", "signal"):
        with pytest.raises(TypeError, match="generator function"):
            timeout(1, mode=mode)(numbers)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="async generator function"):
            timeout(1, mode=mode)(async_numbers)  # type: ignore[arg-type]


def test_a_closed_or_collected_policy_ends_its_threads():
    """close() ends idle workers and refuses later calls; garbage collection closes too."""
    policy = timeout(1, mode="thread", clock=FakeClock(grace=10))
    run = policy(lambda: threading.current_thread())
    worker = run()
    assert worker.is_alive()
    policy.close()
    worker.join(5)
    assert not worker.is_alive()
    with pytest.raises(RejectedError) as info:
        run()
    assert info.value.reason == "timeout_closed"

    collected = timeout(1, mode="thread", clock=FakeClock(grace=10))
    worker = collected(lambda: threading.current_thread())()
    del collected
    gc.collect()
    worker.join(5)
    assert not worker.is_alive()


def test_snapshot_names_the_mode():
    """Every timeout's snapshot says its mode; the deadline mode's health always passes."""
    assert timeout(1).snapshot()["mode"] == "deadline"
    assert timeout(1).health_check() == ("pass", None, "")


# -- mode="signal": SIGALRM interrupts the function (main thread, POSIX) -----------------------

posix_only = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")


@pytest.fixture
def alarm_state() -> Iterator[None]:
    """The SIGALRM handler and timer (pytest-timeout's, when it uses signals) are the
    same after the test as before, the timer having run on meanwhile."""
    handler = signal.getsignal(signal.SIGALRM)
    before, interval = signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()
    yield
    left, after_interval = signal.getitimer(signal.ITIMER_REAL)
    assert signal.getsignal(signal.SIGALRM) == handler
    assert after_interval == interval
    if before == 0:
        assert left == 0
    else:
        expected = before - (time.monotonic() - started)
        assert expected - 0.05 <= left <= expected + 0.05


@posix_only
def test_signal_mode_interrupts_a_blocking_call(alarm_state):
    """time.sleep is interrupted at the deadline; except Exception does not swallow it."""
    swallowed = []

    @timeout(0.03, mode="signal")
    def stuck() -> None:
        try:
            time.sleep(5)
        except Exception as exc:  # the interruption is not an Exception
            swallowed.append(exc)

    started = time.perf_counter()
    with pytest.raises(TimeoutExceeded) as info:
        stuck()
    assert time.perf_counter() - started < 1.0
    assert info.value.timeout == 0.03
    assert swallowed == []
    assert "interrupted by a timer signal" in str(info.value.__cause__)


@posix_only
def test_a_breaker_inside_a_signal_timeout_counts_the_interruption(alarm_state):
    """Interrupted at the deadline: a failure of the dependency, in deadline_failures."""
    breaker = buttress.CircuitBreaker(failure_threshold=1)

    @timeout(0.02, mode="signal")
    @breaker
    def hangs() -> None:
        time.sleep(5)

    with pytest.raises(TimeoutExceeded):
        hangs()
    assert breaker.state == "open"
    assert breaker.snapshot()["deadline_failures"] == 1


@posix_only
def test_signal_mode_in_time_and_its_errors(alarm_state):
    """A call that ends in time returns; its own error propagates; no timer is left."""

    @timeout(1, mode="signal")
    def quick(x: int) -> int:
        assert remaining() is not None
        return x + 1

    @timeout(1, mode="signal")
    def broken() -> None:
        raise KeyError("own")

    assert quick(1) == 2
    with pytest.raises(KeyError):
        broken()


@posix_only
def test_signal_mode_nests_and_restores_the_previous_handler(alarm_state):
    """Nested: the earliest deadline fires and the scope that set it claims it; the
    handler that was there before comes back."""
    received = []

    def own_handler(signum: int, frame: object) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGALRM, own_handler)
    try:
        with (
            pytest.raises(TimeoutExceeded) as outer,
            timeout(0.03, mode="signal"),
            timeout(5, mode="signal"),
        ):
            time.sleep(5)
        assert outer.value.timeout == 0.03

        with timeout(5, mode="signal") as block:
            with pytest.raises(TimeoutExceeded) as inner, timeout(0.02, mode="signal"):
                time.sleep(5)
            assert inner.value.timeout == 0.02
            assert block.mode == "signal"
            time.sleep(0.03)  # the outer scope goes on, its own timer re-armed
        assert signal.getsignal(signal.SIGALRM) is own_handler
        assert received == []
    finally:
        signal.signal(signal.SIGALRM, previous)


@posix_only
def test_signal_mode_pauses_and_rearms_a_foreign_timer(alarm_state):
    """A SIGALRM timer someone else set survives the timeout with its remaining time."""
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    saved = signal.setitimer(signal.ITIMER_REAL, 30)
    saved_at = time.monotonic()
    try:
        with timeout(1, mode="signal"):
            time.sleep(0.01)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 29.5 < left < 30
    finally:
        delay, interval = saved
        if delay:
            delay = max(delay - (time.monotonic() - saved_at), 1e-6)
        signal.setitimer(signal.ITIMER_REAL, delay, interval)
        signal.signal(signal.SIGALRM, previous)


@posix_only
def test_signal_mode_refuses_where_it_cannot_work(alarm_state):
    """Outside the main thread the call is refused; a fake clock is refused at once."""
    with pytest.raises(ValueError, match="needs the system clock"):
        timeout(1, mode="signal", clock=FakeClock())
    policy = timeout(1, mode="signal")
    called = []
    run = policy(lambda: called.append(1))
    errors: list[BaseException] = []

    def in_worker() -> None:
        try:
            run()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=in_worker)
    worker.start()
    worker.join(5)
    assert called == []
    (error,) = errors
    assert isinstance(error, buttress.ConfigValueError)
    assert "only in the main thread" in str(error)


@pytest.mark.skipif(hasattr(signal, "setitimer"), reason="a platform without setitimer")
def test_signal_mode_refused_without_setitimer():  # pragma: no cover - POSIX CI
    """Where there is no SIGALRM, mode='signal' is refused when it is built."""
    with pytest.raises(ValueError, match="lacks"):
        timeout(1, mode="signal")


# -- misuse on a running event loop is loud -----------------------------------------------------


def _warned(body: Callable[[], object]) -> warnings.WarningMessage:
    """Run ``body`` inside a coroutine; the one LoopBlockingWarning it raised."""

    async def main() -> None:
        body()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
    (warning,) = [w for w in caught if issubclass(w.category, LoopBlockingWarning)]
    return warning


def _line_of(marker: str) -> int:
    """The line of this file that holds ``marker``."""
    with open(__file__) as source:
        for number, line in enumerate(source, 1):
            if marker in line and "_line_of" not in line:
                return number
    raise AssertionError(marker)


def test_a_sync_timeout_block_on_a_running_loop_warns_at_the_users_line():
    """`with timeout(...)` inside a coroutine warns, pointing at the with statement."""

    def body() -> None:
        with timeout(1):  # marker: sync-with
            pass

    warning = _warned(body)
    assert warning.filename == __file__
    assert warning.lineno == _line_of("# marker: sync-with")
    assert "cancels nothing" in str(warning.message)


def test_a_blocking_acquire_on_a_running_loop_warns_at_the_users_line():
    """limiter.acquire(), `with limiter:` and bulkhead.acquire() on the loop thread warn."""
    limiter = RateLimiter(rate=100, clock=FakeClock())
    bulkhead = Bulkhead(max_concurrent=2, clock=FakeClock())

    def acquire() -> None:
        limiter.acquire()  # marker: limiter-acquire

    def enter() -> None:
        with limiter:  # marker: limiter-with
            pass

    def slot() -> None:
        bulkhead.acquire().release()  # marker: bulkhead-acquire

    for body, marker in (
        (acquire, "limiter-acquire"),
        (enter, "limiter-with"),
        (slot, "bulkhead-acquire"),
    ):
        warning = _warned(body)
        assert (warning.filename, warning.lineno) == (__file__, _line_of(f"# marker: {marker}"))
        assert "acquire_async" in str(warning.message)


def test_the_warning_can_be_made_an_error_and_then_is_a_buttress_error():
    """simplefilter('error', LoopBlockingWarning) turns misuse into a ButtressError."""

    async def main() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error", LoopBlockingWarning)
            with pytest.raises(buttress.ButtressError), timeout(1):
                pass

    asyncio.run(main())


def test_no_warning_off_the_loop_or_in_async_code():
    """Sync code on a plain thread and async code on the loop stay silent."""
    limiter = RateLimiter(rate=100, clock=FakeClock())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        limiter.acquire()
        with timeout(1):
            pass

        async def main() -> None:
            await limiter.acquire_async()
            async with timeout(1):
                pass

        asyncio.run(main())
