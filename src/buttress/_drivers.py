"""The thin drivers every policy shares: how a call is run around a policy's hooks.

A policy that guards a call (a breaker's permit, a bulkhead's slot, a metric's timer)
supplies two hooks: ``enter()`` before the call, returning whatever the policy needs to
remember, and ``leave(state, exc)`` after it, with the call's exception or ``None``. The
drivers are the only place that knows how to run a call around them, sync or async; only
the waiting differs. Hot paths that inline their hooks (the in-process breaker and
bulkhead) are the documented exceptions.

Two more shapes: :func:`substitute_sync`/:func:`substitute_async` answer a failed call
with a replacement (fallback), and :func:`intercept_sync`/:func:`intercept_async` let a
policy delay, answer or fail a call before it is made (chaos).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Protocol, TypeVar

__all__ = [
    "Answer",
    "Gate",
    "Plan",
    "Step",
    "guard_async",
    "guard_async_io",
    "guard_sync",
    "intercept_async",
    "intercept_sync",
    "pump_async",
    "pump_sync",
    "substitute_async",
    "substitute_sync",
]

S = TypeVar("S")
R = TypeVar("R")


def guard_sync(
    fn: Callable[..., Any],
    enter: Callable[[], S],
    leave: Callable[[S, BaseException | None], object],
) -> Callable[..., Any]:
    """``fn`` (sync) run between ``enter()`` and ``leave(state, exc)``."""

    def guarded(*args: Any, **kwargs: Any) -> Any:
        state = enter()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            leave(state, exc)
            raise
        leave(state, None)
        return result

    return guarded


def guard_async(
    fn: Callable[..., Awaitable[Any]],
    enter: Callable[[], S],
    leave: Callable[[S, BaseException | None], object],
) -> Callable[..., Awaitable[Any]]:
    """``fn`` (async) run between sync hooks: they do no I/O, so no coroutine per call."""

    async def guarded(*args: Any, **kwargs: Any) -> Any:
        state = enter()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            leave(state, exc)
            raise
        leave(state, None)
        return result

    return guarded


def guard_async_io(
    fn: Callable[..., Awaitable[Any]],
    enter: Callable[[], Awaitable[S]],
    leave: Callable[[S, BaseException | None], Awaitable[object]],
) -> Callable[..., Awaitable[Any]]:
    """``fn`` (async) run between awaited hooks (a shared store's I/O)."""

    async def guarded(*args: Any, **kwargs: Any) -> Any:
        state = await enter()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            await leave(state, exc)
            raise
        await leave(state, None)
        return result

    return guarded


def substitute_sync(
    fn: Callable[..., Any],
    matches: Callable[[BaseException], bool],
    replacement: Callable[[BaseException], Any],
) -> Callable[..., Any]:
    """``fn`` (sync), answering an exception that ``matches`` with ``replacement(exc)``."""

    def substituted(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            if not matches(exc):
                raise
            return replacement(exc)

    return substituted


def substitute_async(
    fn: Callable[..., Awaitable[Any]],
    matches: Callable[[BaseException], bool],
    replacement: Callable[[BaseException], Any],
) -> Callable[..., Awaitable[Any]]:
    """:func:`substitute_sync` for async ``fn``; an awaitable replacement is awaited."""

    async def substituted(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except BaseException as exc:
            if not matches(exc):
                raise
            value = replacement(exc)
            if inspect.isawaitable(value):
                value = await value
            return value

    return substituted


class Answer:
    """What an intercepting ``decide()`` returns to answer a call with ``value`` unmade."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class Gate(Protocol):
    """Whether an interceptor is to be asked at all: one attribute read per call."""

    @property
    def armed(self) -> bool: ...


# What ``decide()`` says: ``None``, make the call; seconds, wait that long and make it; an
# Answer, return its value without making it. (It may also raise instead of the call.)
Decision = float | Answer | None


def intercept_sync(
    fn: Callable[..., Any],
    gate: Gate,
    decide: Callable[[], Decision],
    sleep: Callable[[float], object],
) -> Callable[..., Any]:
    """``fn`` (sync), with ``decide()`` asked first whenever ``gate.armed``."""

    def intercepted(*args: Any, **kwargs: Any) -> Any:
        if gate.armed:
            decision = decide()
            if decision is not None:
                if isinstance(decision, Answer):
                    return decision.value
                sleep(decision)
        return fn(*args, **kwargs)

    return intercepted


def intercept_async(
    fn: Callable[..., Awaitable[Any]],
    gate: Gate,
    decide: Callable[[], Decision],
    sleep: Callable[[float], Awaitable[object]],
) -> Callable[..., Awaitable[Any]]:
    """:func:`intercept_sync` for async ``fn``: the wait is awaited."""

    async def intercepted(*args: Any, **kwargs: Any) -> Any:
        if gate.armed:
            decision = decide()
            if decision is not None:
                if isinstance(decision, Answer):
                    return decision.value
                await sleep(decision)
        return await fn(*args, **kwargs)

    return intercepted


# -- sans-I/O plans -------------------------------------------------------------------------

Step = tuple[Callable[..., Any] | None, Callable[..., Awaitable[Any]] | None, tuple[Any, ...]]
"""One I/O step of a plan: ``(sync_call, async_call, args)``. The sync pump calls the first,
the async pump awaits the second; the step's result (or exception) goes back into the plan."""

Plan = Generator[Step, Any, R]
"""A generator that makes every decision and yields its I/O as steps (httpx's ``auth_flow``
idea): one plan serves both faces."""


def pump_sync(plan: Plan[R]) -> R:
    """Run a plan with blocking calls; its return value is the result."""
    try:
        step = next(plan)
        while True:
            call, _, args = step
            assert call is not None
            try:
                result = call(*args)
            except BaseException as exc:
                step = plan.throw(exc)
            else:
                step = plan.send(result)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def pump_async(plan: Plan[R]) -> R:
    """Run a plan on the event loop, awaiting each step."""
    try:
        step = next(plan)
        while True:
            _, call, args = step
            assert call is not None
            try:
                result = await call(*args)
            except BaseException as exc:
                step = plan.throw(exc)
            else:
                step = plan.send(result)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
