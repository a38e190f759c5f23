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
import weakref
from collections.abc import Callable
from contextvars import Token
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import events as _events
from ._counter import Counter
from ._deadline import remaining, reset_deadline, set_deadline
from ._generators import Session, wrap_async_generator, wrap_generator
from ._policy import ExcType, Policy, PolicyOptions, Traceback, cm_pop, cm_push
from ._validate import require_seconds
from .clock import TimerHandle
from .exceptions import TimeoutExceeded

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Timeout", "timeout"]

_COUNTER_LOCK = threading.Lock()


class _NoTimer:
    def cancel(self) -> None:
        return None


_NO_TIMER = _NoTimer()

# Python 3.11 counts a task's cancel requests (Task.cancelling/uncancel), so a scope can
# tell whether someone else asked for a cancellation too. 3.10 does not: see _Ledger.
_UNCANCEL = sys.version_info >= (3, 11)


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
        if _UNCANCEL:
            self.task.cancel()
        else:
            _request_cancel(self)

    def settle(self, exc: BaseException | None) -> bool:
        """After the timer fired: whether ``exc`` is this scope's own cancellation
        (to become TimeoutExceeded) rather than one someone else asked for too."""
        if _UNCANCEL and sys.version_info >= (3, 11):
            # Undo our cancel request; if another one is still pending (the caller was
            # cancelled too), the CancelledError is theirs to keep.
            outer_cancel = self.task.uncancel() > 0
            return isinstance(exc, asyncio.CancelledError) and not outer_cancel
        return _settle_cancel(self, exc)


# -- Python 3.10: telling our cancel requests from everyone else's ----------------------------
#
# On 3.10, two cancel requests that reach a task before it resumes arrive as ONE
# CancelledError: the first cancels the future the task waits on (carrying its message),
# every later one only sets the task's `_must_cancel` flag and `_cancel_message`, and the
# flag is dropped when the task resumes with the first one's error. So a timer firing as
# the caller is cancelled could not tell "my timeout" from "my caller's cancellation",
# and used to turn the caller's into a TimeoutExceeded.
#
# The ledger keeps, per task, the cancel requests buttress timeouts made. Each carries a
# message object of its own; after making one, the scope stores that message as the
# task's `_cancel_message`, so any later cancel() (which overwrites it) leaves a trace.
# A request already pending when the timer fires is someone else's. At exit a scope
# claims the CancelledError only if it carries a message of ours, nothing else touched
# the task, no other buttress request is still open (an enclosing timeout that fired in
# the same instant wins, as it does with 3.11's counters), and no foreign CancelledError
# is in the exception's context (a cancellation interrupted by our timer).


class _Message(str):
    """A cancel message; each is a distinct object, compared by identity."""

    __slots__ = ()


class _Ledger:
    __slots__ = ("blind", "external", "issued", "last", "open", "saved")

    def __init__(self, saved: object) -> None:
        self.saved = saved  # the task's _cancel_message before our first request
        self.last: object = None  # the message of our latest request
        self.issued: list[_Message] = []
        self.open: list[_Scope] = []
        self.external = False  # a cancel request that is not ours was seen
        self.blind = False  # the task does not expose _cancel_message (not asyncio's Task)


_ledgers: weakref.WeakKeyDictionary[asyncio.Task[Any], _Ledger] = weakref.WeakKeyDictionary()


def _cancel_pending(task: asyncio.Task[Any]) -> bool:
    if getattr(task, "_must_cancel", False):
        return True
    waiter = getattr(task, "_fut_waiter", None)
    return waiter is not None and bool(waiter.cancelled())


def _request_cancel(scope: _Scope) -> None:
    task = scope.task
    ledger = _ledgers.get(task)
    if ledger is None:
        ledger = _ledgers[task] = _Ledger(getattr(task, "_cancel_message", None))
    if _cancel_pending(task) and (
        not ledger.open or getattr(task, "_cancel_message", None) is not ledger.last
    ):
        ledger.external = True
    message = _Message(f"buttress: timeout of {scope.seconds:g}s expired")
    task.cancel(message)
    ledger.issued.append(message)
    ledger.open.append(scope)
    ledger.last = message
    try:
        task._cancel_message = message  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # pragma: no cover - a Task without the attribute
        ledger.blind = True


def _ours(exc: BaseException, issued: list[_Message]) -> bool:
    """``exc`` is a CancelledError of ours, and no foreign one is in its context."""
    seen: set[int] = set()
    current: BaseException | None = exc
    first = True
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, asyncio.CancelledError):
            args = current.args
            if not (args and any(args[0] is message for message in issued)):
                return False
        elif first:
            return False
        first = False
        current = current.__context__
    return True


def _settle_cancel(scope: _Scope, exc: BaseException | None) -> bool:
    task = scope.task
    ledger = _ledgers.get(task)
    if ledger is None or scope not in ledger.open:  # pragma: no cover - settled twice
        return False
    if not ledger.blind and getattr(task, "_cancel_message", None) is not ledger.last:
        ledger.external = True  # someone called cancel() after our latest request
    ledger.open.remove(scope)
    claimed = (
        exc is not None and not ledger.external and not ledger.open and _ours(exc, ledger.issued)
    )
    if not ledger.open:
        del _ledgers[task]
        if not ledger.external and not ledger.blind:
            task._cancel_message = ledger.saved  # type: ignore[attr-defined]
    return claimed


class Timeout(Policy):
    """A time limit for a call (decorator) or a block (``with`` / ``async with``).

    Args:
        seconds: the time limit (> 0, an int, float or timedelta).
        name: registers the policy for ``state()``.
        **options: ``listeners``, ``registry`` and ``clock``, as for every policy
            (:class:`~buttress.Policy`).
    """

    kind = "timeout"

    def __init__(
        self,
        seconds: float | timedelta,
        *,
        name: str | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(name=name, **options)
        value = require_seconds("seconds", seconds)
        self.seconds = value
        # Most timeouts never expire (and `async with timeout(5)` builds one per use),
        # so the expiry counter is created on the first expiry.
        self._timeouts: Counter | None = None
        self._register()

    def expired(self, cause: BaseException | None = None) -> TimeoutExceeded:
        """Count and report an expiry of this timeout; the error for the caller to raise.

        For drivers that enforce the time limit themselves (the httpx transport maps
        its client's own timeout to this policy): ``raise t.expired(exc) from exc``.
        The expiry is counted in ``snapshot()["timeouts"]`` and emits ``TimeoutFired``
        with ``seconds``; ``cause``, when given, becomes the error's ``__cause__``.
        """
        return self._expired(self.seconds, cause)

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
        # Our timer cancelled the task: the error is a timeout only if the cancellation
        # was ours alone (an outer cancellation at the same moment stays a cancellation).
        if scope.settle(exc):
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

    async def __aexit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> None:
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

    def __exit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        seconds, token, started = cm_pop(self)
        reset_deadline(token)
        if exc is None and self._clock.now() - started > seconds:
            raise self._expired(seconds)

    # -- generator functions: one deadline for the whole iteration ---------------------------

    def _wrap_generator(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return wrap_generator(fn, lambda: _DeadlineSession(self))

    def _wrap_async_generator(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def open_session() -> Session:
            return _ScopeSession(self)

        return wrap_async_generator(fn, open_session)

    def snapshot(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "seconds": self.seconds,
            "timeouts": 0 if self._timeouts is None else self._timeouts.value,
        }


class _DeadlineSession(Session):
    """A decorated sync generator's deadline: set when its first item is asked for, in
    force (``remaining()``) while its code runs, checked after each item (a late item is
    discarded, as a late result is)."""

    __slots__ = ("clock", "deadline", "policy")

    def __init__(self, policy: Timeout) -> None:
        self.policy = policy
        self.clock = policy.clock
        seconds = policy.seconds
        left = remaining()
        if left is not None and left < seconds:
            seconds = left
        self.deadline = self.clock.now() + seconds

    def _left(self) -> float:
        left = self.deadline - self.clock.now()
        if left <= 0.0:
            raise self.policy.expired()
        return left

    def before(self) -> object:
        return set_deadline(self._left(), self.clock)[1]

    def after(self, token: object, exc: BaseException | None) -> BaseException | None:
        reset_deadline(token)  # type: ignore[arg-type]
        if exc is None and self.clock.now() > self.deadline:
            return self.policy.expired()
        return None


class _ScopeSession(_DeadlineSession):
    """The async twin: each resumption runs under a cancel scope that ends at the deadline."""

    __slots__ = ()

    def before(self) -> object:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("an async timeout must run inside an asyncio task")
        seconds, token = set_deadline(self._left(), self.clock)
        scope = _Scope(task, seconds, token, _NO_TIMER)
        scope.handle = self.clock.call_later(seconds, scope.fire)
        return scope

    def after(self, token: object, exc: BaseException | None) -> BaseException | None:
        scope: _Scope = token  # type: ignore[assignment]
        scope.handle.cancel()
        reset_deadline(scope.token)
        if scope.fired and scope.settle(exc):
            return self.policy.expired(exc)
        return None


timeout = Timeout
"""Limit a call (decorator) or a block (``with`` / ``async with``): the same as
:class:`Timeout`."""
