"""Timeouts, and the deadline they set for everything nested inside them.

Async: the awaited work is cancelled when the time is up and
:class:`TimeoutExceeded` is raised (a cancel scope, like ``asyncio.timeout``,
driven by the injectable clock). An outer cancellation that arrives at the same
time is never turned into a timeout.

Sync: Python cannot safely stop a running function from the outside (killing a
thread is impossible, and signals work only in the main thread and corrupt
whatever state they interrupt). So a sync timeout is a *deadline*: it narrows
``buttress.remaining()`` for everything inside, so nested retries never start a
sleep that would cross it and nested bulkheads and limiters never wait past it,
and code that does I/O can pass ``remaining()`` on as its socket timeout. The
function itself runs to completion in the caller's thread; if it returns after
the deadline, its result is discarded and :class:`TimeoutExceeded` is raised, so
the caller never acts on a late answer. No second thread is started, so two
attempts of one operation can never overlap.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Iterable
from contextvars import Token
from types import TracebackType
from typing import Any

from . import events as _events
from ._counter import Counter
from ._deadline import reset_deadline, set_deadline
from ._policy import Policy, cm_pop, cm_push
from ._validate import require_seconds
from .clock import Clock, TimerHandle
from .exceptions import TimeoutExceeded
from .registry import Registry

__all__ = ["Timeout", "timeout"]

_COUNTER_LOCK = threading.Lock()


class _NoTimer:
    def cancel(self) -> None:
        return None


_NO_TIMER = _NoTimer()


class _Scope:
    """One async entry into a timeout: the timer that cancels the task, and its outcome."""

    __slots__ = ("fired", "handle", "seconds", "task", "token")

    def __init__(
        self, task: asyncio.Task[Any], seconds: float, token: Token[Any], handle: TimerHandle
    ) -> None:
        self.task = task
        self.seconds = seconds
        self.token = token
        self.handle = handle
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        self.task.cancel()


class Timeout(Policy):
    """A time limit for a call or a block. Build it with :func:`timeout`."""

    kind = "timeout"

    def __init__(
        self,
        seconds: float,
        *,
        name: str | None = None,
        listeners: Iterable[_events.Listener] | None = None,
        registry: Registry | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(name=name, listeners=listeners, registry=registry, clock=clock)
        value = require_seconds("seconds", seconds)
        self.seconds = value
        # Most timeouts never expire (and `async with timeout(5)` builds one per use),
        # so the expiry counter is created on the first expiry.
        self._timeouts: Counter | None = None
        self._register()

    def _expired(self, seconds: float, cause: BaseException | None = None) -> TimeoutExceeded:
        with _COUNTER_LOCK:
            if self._timeouts is None:
                self._timeouts = Counter()
        self._timeouts.incr()
        self.emit(_events.TimeoutFired, timeout=seconds)
        label = "timeout" if self.name is None else f"timeout {self.name!r}"
        error = TimeoutExceeded(f"{label}: exceeded {seconds:g}s", timeout=seconds)
        error.__cause__ = cause
        return error

    # -- async: a cancel scope --------------------------------------------------------------

    def _enter_async(self) -> _Scope:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("an async timeout must run inside an asyncio task")
        seconds, token = set_deadline(self.seconds, self._clock)
        scope = _Scope(task, seconds, token, _NO_TIMER)
        scope.handle = self._clock.call_later(seconds, scope.fire)
        return scope

    def _exit_async(self, scope: _Scope, exc: BaseException | None) -> TimeoutExceeded | None:
        scope.handle.cancel()
        reset_deadline(scope.token)
        if not scope.fired:
            return None
        # Our timer cancelled the task. Undo our cancel request; if another one is still
        # pending (the caller was cancelled too), the CancelledError is theirs to keep.
        outer_cancel = False
        if sys.version_info >= (3, 11):
            outer_cancel = scope.task.uncancel() > 0
        if isinstance(exc, asyncio.CancelledError) and not outer_cancel:
            return self._expired(scope.seconds, exc)
        return None

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        enter, leave = self._enter_async, self._exit_async

        async def limited(*args: Any, **kwargs: Any) -> Any:
            scope = enter()
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                error = leave(scope, exc)
                if error is not None:
                    raise error from exc
                raise
            leave(scope, None)
            return result

        return limited

    async def __aenter__(self) -> Timeout:
        cm_push(self, self._enter_async())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        error = self._exit_async(cm_pop(self), exc)
        if error is not None:
            raise error from exc

    # -- sync: a propagated deadline --------------------------------------------------------

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock, limit = self._clock, self.seconds
        now = clock.now

        def limited(*args: Any, **kwargs: Any) -> Any:
            seconds, token = set_deadline(limit, clock)
            started = now()
            try:
                result = fn(*args, **kwargs)
            finally:
                reset_deadline(token)
            if now() - started > seconds:
                raise self._expired(seconds)
            return result

        return limited

    def __enter__(self) -> Timeout:
        seconds, token = set_deadline(self.seconds, self._clock)
        cm_push(self, (seconds, token, self._clock.now()))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        seconds, token, started = cm_pop(self)
        reset_deadline(token)
        if exc is None and self._clock.now() - started > seconds:
            raise self._expired(seconds)

    def snapshot(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "seconds": self.seconds,
            "timeouts": 0 if self._timeouts is None else self._timeouts.value,
        }


def timeout(
    seconds: float,
    *,
    name: str | None = None,
    listeners: Iterable[_events.Listener] | None = None,
    registry: Registry | None = None,
    clock: Clock | None = None,
) -> Timeout:
    """Limit a call (decorator) or a block (``with`` / ``async with``) to ``seconds``.

    Args:
        seconds: the time limit (> 0, an int, float or timedelta).
        name: registers the policy for ``state()``.
        listeners: event listeners for this policy only.
        registry: registry to join instead of the default one.
        clock: time source (default: the system clock).
    """
    return Timeout(seconds, name=name, listeners=listeners, registry=registry, clock=clock)
