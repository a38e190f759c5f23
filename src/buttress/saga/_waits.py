"""Durable waits: sleeps, signals and heartbeats, as the run log records them.

Each wait is a small flow (a generator) that decides everything: what to record,
whether the wait is over, when to park the run. It yields store calls and naps; a
sync pump and an async pump execute them, each in its own way of waiting, the way
``drive_sync`` and ``drive_async`` execute a run.

A wait is numbered within its step (``ctx._waits``): the n-th wait of a step finds, in
the run's ``marks``, what the n-th wait recorded before a crash, a park or a retry,
so it waits only for what is left, and a signal is consumed once.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Generator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from buttress import events as _events
from buttress._validate import check_seconds
from buttress.backends import CANCEL_SIGNAL, LogEntry
from buttress.exceptions import (
    ConfigTypeError,
    ConfigValueError,
    RunCancelled,
    WaitTimedOut,
)

from ._calls import Call, store_call
from ._model import Context, check_storable_name, jsonable

if TYPE_CHECKING:
    from ._runner import _Run

__all__ = [
    "CHILD_SIGNAL",
    "Nap",
    "Park",
    "cancel_requested",
    "check_deadline",
    "heartbeat_flow",
    "pump_async",
    "pump_sync",
    "sleep_flow",
    "wait_flow",
]

CHILD_SIGNAL = "buttress.child"
"""The signal a child run sends its parent when it ends (it wakes a parked parent)."""


class Park(BaseException):
    """Raised through a step by a wait that parks the run (a ``BaseException``, so that
    no retry, breaker or ``except Exception`` in the step takes it for a failure)."""

    def __init__(self, step: str, wake_at: float | None, waiting_for: str | None) -> None:
        super().__init__(step)
        self.step = step
        self.wake_at = wake_at
        self.waiting_for = waiting_for


@dataclass(slots=True)
class Nap:
    """Wait this many seconds (``signalled``: or until a signal for the run arrives in
    this process)."""

    seconds: float
    signalled: bool = False


T = TypeVar("T")
WaitFlow = Generator[Call | Nap, Any, T]


def check_deadline(deadline: object) -> float | None:
    """An absolute deadline as epoch seconds (a number, or an aware ``datetime``)."""
    if deadline is None:
        return None
    if isinstance(deadline, datetime):
        if deadline.tzinfo is None:
            raise ConfigValueError(
                f"deadline must be an aware datetime (with a tzinfo), got {deadline!r}"
            )
        return deadline.timestamp()
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
        raise ConfigTypeError(
            f"deadline must be epoch seconds or an aware datetime, got {deadline!r} "
            f"({type(deadline).__name__})"
        )
    if not math.isfinite(deadline):
        raise ConfigValueError(f"deadline must be finite, got {deadline!r}")
    return float(deadline)


# -- the flows -----------------------------------------------------------------------------


def _forward_only(run: _Run, ctx: Context, what: str) -> None:
    if run.compensating:
        raise ConfigValueError(
            f"{what} is for forward steps; compensation {ctx.step!r} of run {run.run_id} "
            f"cannot wait durably"
        )


def _write(run: _Run, entries: list[LogEntry], lease_until: float | None) -> Call:
    saga = run.saga
    return Call(
        saga.store, saga.store_face, "write", (run.run_id, entries), {"lease_until": lease_until}
    )


def cancel_requested(run: _Run, signals: list[Any]) -> BaseException | None:
    if run.abort is not None:
        return run.abort
    for signal in signals:
        if signal.name == CANCEL_SIGNAL:
            reason = signal.payload if isinstance(signal.payload, str) else "cancelled"
            run.abort = RunCancelled(f"run {run.run_id} was cancelled: {reason}")
            return run.abort
    return None


def sleep_flow(run: _Run, ctx: Context, seconds: float | timedelta) -> WaitFlow[None]:
    """``ctx.sleep(seconds)``: record the wake-up time once, then wait for it (parking
    the run when what is left is longer than the saga's ``park_after``)."""
    _forward_only(run, ctx, "ctx.sleep")
    span = check_seconds("seconds", seconds, allow_zero=True)
    assert span is not None
    saga = run.saga
    index = ctx._waits
    ctx._waits += 1
    key = (ctx.step, index)
    now = saga.wall()
    mark = run.marks.get(key)
    if mark is None:
        wake = now + span
        mark = run.marks[key] = {"index": index, "wake_at": wake}
        entry = run.entry(ctx.step, "sleep", output=dict(mark))
        remaining = wake - now
        parks = saga.park_after is not None and remaining > saga.park_after
        yield _write(run, [entry], None if parks else wake + saga.lease)
    else:
        wake = mark["wake_at"]
        remaining = wake - now
        parks = saga.park_after is not None and remaining > saga.park_after
        if remaining > 0 and not parks:
            yield _write(run, [], wake + saga.lease)
    limit = run.deadline_wall
    if remaining <= 0:
        return
    if limit is not None and wake > limit:
        # The run's deadline comes first: wake then, and fail the step.
        if parks:
            raise Park(ctx.step, limit, None)
        yield Nap(max(limit - now, 0.0), signalled=True)
        raise run.deadline_error()
    if parks:
        raise Park(ctx.step, wake, None)
    while True:
        yield Nap(remaining, signalled=True)
        if run.abort is not None:
            raise run.abort
        remaining = wake - saga.wall()
        if remaining <= 0:
            return


def wait_flow(
    run: _Run,
    ctx: Context,
    name: str,
    timeout: float | timedelta | None,
    deadline: float | datetime | None,
) -> WaitFlow[Any]:
    """``ctx.wait_for(name)``: the payload of the first signal ``name`` this run has not
    consumed, recording its consumption; :class:`WaitTimedOut` past the deadline."""
    _forward_only(run, ctx, "ctx.wait_for")
    if not isinstance(name, str) or not name:
        raise ConfigTypeError(f"name must be a non-empty str, got {name!r}")
    check_storable_name("signal name", name)
    span = check_seconds("timeout", timeout, allow_none=True)
    until = check_deadline(deadline)
    saga = run.saga
    index = ctx._waits
    ctx._waits += 1
    key = (ctx.step, index)
    mark = run.marks.get(key)
    if mark is not None and "id" in mark:
        return mark["payload"]  # consumed before: the same payload again
    if mark is not None and mark.get("expired"):
        raise _expired(run, ctx, mark, emit=False)
    now = saga.wall()
    pending: list[LogEntry] = []
    if mark is None:
        limits = [t for t in (until, None if span is None else now + span) if t is not None]
        mark = run.marks[key] = {
            "index": index,
            "signal": name,
            "began": now,
            "deadline": min(limits) if limits else None,
        }
        pending.append(run.entry(ctx.step, "wait", output=dict(mark)))
    limit: float | None = mark["deadline"]
    ends = min((t for t in (limit, run.deadline_wall) if t is not None), default=None)
    while True:
        if pending:
            yield _write(run, pending, None)
            pending = []
        signals = yield Call(saga.store, saga.store_face, "signals", (run.run_id,), {})
        if signals:
            run.seen_signal = max(run.seen_signal, signals[-1].id)
        cancel = cancel_requested(run, signals)
        if cancel is not None:
            raise cancel
        for signal in signals:
            if signal.name == name and signal.id not in run.consumed:
                run.consumed.add(signal.id)
                mark.update(id=signal.id, payload=signal.payload)
                yield _write(
                    run,
                    [
                        run.entry(
                            ctx.step,
                            "received",
                            output={
                                "index": index,
                                "signal": name,
                                "id": signal.id,
                                "payload": signal.payload,
                            },
                        )
                    ],
                    None,
                )
                if saga.listening:
                    saga.emit(_events.SignalReceived, run_id=run.run_id, step=ctx.step, signal=name)
                return signal.payload
        now = saga.wall()
        if limit is not None and now >= limit:
            mark["expired"] = True
            yield _write(run, [run.entry(ctx.step, "wait_expired", output=dict(mark))], None)
            raise _expired(run, ctx, mark, emit=True)
        if run.deadline_wall is not None and now >= run.deadline_wall:
            raise run.deadline_error()
        remaining = math.inf if ends is None else ends - now
        if saga.park_after is not None and remaining > saga.park_after:
            raise Park(ctx.step, ends, name)
        nap = min(remaining, saga.poll_interval)
        yield _write(run, [], now + nap + saga.lease)
        yield Nap(nap, signalled=True)


def _expired(run: _Run, ctx: Context, mark: dict[str, Any], *, emit: bool) -> WaitTimedOut:
    name = mark["signal"]
    if emit:
        run.saga.emit(_events.WaitExpired, run_id=run.run_id, step=ctx.step, signal=name)
    return WaitTimedOut(
        f"step {ctx.step!r} of run {run.run_id} waited for signal {name!r} past its deadline",
        signal=name,
        deadline=mark["deadline"],
    )


def heartbeat_flow(run: _Run, ctx: Context, details: Any) -> WaitFlow[None]:
    """``ctx.heartbeat(details)``: one write of the progress, renewing the lease."""
    saga = run.saga
    step = saga.step_by_name.get(ctx.step)
    span = saga.lease
    if step is not None and step.heartbeat_timeout is not None:
        span = step.heartbeat_timeout
    now = saga.wall()
    entry = run.entry(ctx.step, "heartbeat", output={"details": jsonable(details)})
    yield _write(run, [entry], now + span)
    if saga.listening:
        saga.emit(_events.StepHeartbeat, run_id=run.run_id, step=ctx.step)
    if run.abort is not None:
        raise run.abort


# -- the pumps -----------------------------------------------------------------------------


def pump_sync(run: _Run, flow: WaitFlow[T]) -> T:
    """Execute a wait flow in this thread (the store's sync methods, the saga's clock)."""
    clock = run.saga.clock
    result: Any = None
    try:
        while True:
            instruction = flow.send(result)
            if type(instruction) is Call:
                result = getattr(instruction.store, instruction.method)(
                    *instruction.args, **instruction.kwargs
                )
            else:
                assert isinstance(instruction, Nap)
                if instruction.signalled:
                    event = threading.Event()
                    run.saga.watch(run.run_id, event.set)
                    try:
                        clock.wait(event, instruction.seconds)
                    finally:
                        run.saga.unwatch(run.run_id, event.set)
                else:
                    clock.sleep(instruction.seconds)
                result = None
    except StopIteration as stop:
        done: T = stop.value
        return done


async def pump_async(run: _Run, flow: WaitFlow[T]) -> T:
    """Async twin of :func:`pump_sync` (an async store is awaited)."""
    clock = run.saga.clock
    result: Any = None
    try:
        while True:
            instruction = flow.send(result)
            if type(instruction) is Call:
                result = await store_call(
                    instruction.store,
                    instruction.face,
                    instruction.method,
                    *instruction.args,
                    **instruction.kwargs,
                )
            else:
                assert isinstance(instruction, Nap)
                if instruction.signalled:
                    loop = asyncio.get_running_loop()
                    future: asyncio.Future[None] = loop.create_future()

                    def wake(
                        future: asyncio.Future[None] = future,
                        loop: asyncio.AbstractEventLoop = loop,
                    ) -> None:
                        loop.call_soon_threadsafe(_resolve, future)

                    run.saga.watch(run.run_id, wake)
                    try:
                        await clock.wait_future(future, instruction.seconds)
                    finally:
                        run.saga.unwatch(run.run_id, wake)
                else:
                    await clock.asleep(instruction.seconds)
                result = None
    except StopIteration as stop:
        done: T = stop.value
        return done


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
