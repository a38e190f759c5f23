"""Timeouts, and the deadline they set for everything nested inside them.

Async: the awaited work is cancelled when the time is up and
:class:`TimeoutExceeded` is raised (a cancel scope, like ``asyncio.timeout``,
driven by the injectable clock). An outer cancellation that arrives at the same
time is never turned into a timeout. ``mode=`` is for sync code only: a coroutine
function (or ``async with``) under a ``"thread"`` or ``"signal"`` timeout is refused
with a ``ConfigTypeError``, since cancellation already hands control back.

Sync code has three modes, because Python cannot safely stop a running function
from the outside:

- ``"deadline"`` (the default): the timeout narrows ``buttress.remaining()`` for
  everything inside, so nested retries never start a sleep that would cross it and
  nested bulkheads and limiters never wait past it, and code that does I/O can pass
  ``remaining()`` on as its socket timeout. The function runs to completion in the
  caller's thread; if it returns after the deadline, its result is discarded and
  :class:`TimeoutExceeded` is raised. No second thread is started.
- ``"thread"``: the call runs in a worker thread from a pool the policy owns (the
  caller's context, deadline included, is copied into it); the caller gets
  :class:`TimeoutExceeded` at the deadline, and the call goes on in its worker,
  *abandoned*. Abandoned calls are bounded (``max_abandoned``: past it, new calls are
  rejected at once) and visible (``snapshot()``, ``health()``, an
  ``AbandonedCallCompleted`` event with their late outcome).
- ``"signal"``: a ``SIGALRM`` timer (``setitimer``) interrupts the function itself at
  the deadline, in the main thread on POSIX only; elsewhere the call is refused.
  Nested signal timeouts keep the earliest deadline, and the previous handler and
  timer are restored when the outermost one ends.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from contextvars import Context, Token, copy_context
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

from . import events as _events
from ._blocking import loop_running, warn_blocking
from ._counter import Counter
from ._deadline import remaining, reset_deadline, set_deadline
from ._generators import Session, wrap_async_generator, wrap_generator
from ._policy import ExcType, Policy, PolicyOptions, Traceback, cm_pop, cm_push
from ._validate import check_choice, check_int, require_seconds
from .clock import SystemClock, TimerHandle
from .exceptions import ConfigTypeError, ConfigValueError, RejectedError, TimeoutExceeded

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Timeout", "TimeoutMode", "timeout"]

TimeoutMode = Literal["deadline", "thread", "signal"]
"""How a sync timeout bounds a call: see :class:`Timeout`."""
_MODES: tuple[str, ...] = ("deadline", "thread", "signal")

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


# -- mode="thread": a bounded pool whose abandoned calls are counted --------------------------

_RUNNING, _FINISHED, _ABANDONED = 0, 1, 2
# Seconds an idle worker waits for its next call before its thread ends.
_IDLE_SECONDS = 10.0


class _Call:
    """One call handed to a worker: what to run, in which context, and how it ended."""

    __slots__ = ("args", "context", "done", "error", "fn", "kwargs", "result", "started", "state")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: Context,
        started: float,
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.context = context
        self.started = started
        self.done = threading.Event()
        self.state = _RUNNING
        self.result: Any = None
        self.error: BaseException | None = None


class _Pool:
    """Daemon worker threads, started on demand up to ``max_workers`` and ended after
    ``_IDLE_SECONDS`` without work. Calls are never queued: a call is handed to an idle
    worker or a new thread, or refused (every worker busy, or ``max_abandoned``
    abandoned calls still running), so nothing ever waits behind an abandoned call."""

    def __init__(
        self,
        max_workers: int,
        max_abandoned: int,
        thread_name: str,
        report: Callable[[_Call], None],
    ) -> None:
        self.max_workers = max_workers
        self.max_abandoned = max_abandoned
        self.thread_name = thread_name
        self.report = report  # sends an abandoned call's late outcome (holds no strong ref)
        self.lock = threading.Lock()
        self.idle: list[queue.SimpleQueue[_Call | None]] = []  # the inboxes of idle workers
        self.threads = 0  # live worker threads
        self.running = 0  # calls running for a caller that still waits
        self.abandoned = 0  # abandoned calls still running
        self.abandoned_total = 0
        self.late_results = 0
        self.late_errors = 0
        self.rejections = 0
        self.closed = False
        self.started = 0

    def submit(self, call: _Call) -> str | None:
        """Hand ``call`` to a worker; the reason it was refused, or ``None``."""
        with self.lock:
            if self.closed:
                reason = "timeout_closed"
            elif self.abandoned >= self.max_abandoned:
                reason = "timeout_abandoned"
            elif self.idle:
                self.running += 1
                self.idle.pop().put(call)
                return None
            elif self.threads < self.max_workers:
                self.threads += 1
                self.running += 1
                self.started += 1
                number = self.started
                reason = ""
            else:
                reason = "timeout_workers_busy"
            if reason:
                self.rejections += 1
                return reason
        try:
            thread = threading.Thread(
                target=self._work, args=(call,), name=f"{self.thread_name}-{number}", daemon=True
            )
            thread.start()
        except BaseException:
            with self.lock:
                self.threads -= 1
                self.running -= 1
            raise
        return None

    def abandon(self, call: _Call) -> bool:
        """Give up waiting for ``call``: ``True`` if it is still running (now abandoned),
        ``False`` if it has finished (its outcome is there to take)."""
        with self.lock:
            if call.state != _RUNNING:
                return False
            call.state = _ABANDONED
            self.running -= 1
            self.abandoned += 1
            self.abandoned_total += 1
            return True

    def _work(self, call: _Call | None) -> None:
        inbox: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        while call is not None:
            self._run(call)
            call = self._next(inbox)

    def _run(self, call: _Call) -> None:
        try:
            call.result = call.context.run(call.fn, *call.args, **call.kwargs)
        except BaseException as exc:  # handed to the caller, or reported if abandoned
            call.error = exc
        call.fn = call.context = None  # type: ignore[assignment]
        call.args, call.kwargs = (), {}
        with self.lock:
            late = call.state == _ABANDONED
            if not late:
                call.state = _FINISHED
                self.running -= 1
        if not late:
            call.done.set()
            return
        try:
            self.report(call)  # before the count drops: once it does, the event is out
        finally:
            with self.lock:
                self.abandoned -= 1
                if call.error is None:
                    self.late_results += 1
                else:
                    self.late_errors += 1
            call.result = call.error = None

    def _next(self, inbox: queue.SimpleQueue[_Call | None]) -> _Call | None:
        with self.lock:
            if self.closed:
                self.threads -= 1
                return None
            self.idle.append(inbox)
        try:
            return inbox.get(timeout=_IDLE_SECONDS)
        except queue.Empty:
            with self.lock:
                if inbox in self.idle:  # nobody handed this worker a call: it ends
                    self.idle.remove(inbox)
                    self.threads -= 1
                    return None
            return inbox.get()  # a call (or close()'s None) is on its way

    def close(self) -> None:
        """End the idle workers now, and every busy one when its call ends."""
        with self.lock:
            self.closed = True
            idle, self.idle = self.idle, []
            self.threads -= len(idle)
        for inbox in idle:
            inbox.put(None)

    def after_fork(self) -> None:
        """In a forked child no worker thread survives: start from nothing."""
        self.lock = threading.Lock()
        self.idle = []
        self.threads = self.running = self.abandoned = 0


_pools: weakref.WeakSet[_Pool] = weakref.WeakSet()


def _reset_pools_after_fork() -> None:
    for pool in list(_pools):
        pool.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pools_after_fork)


def _reporter(policy: Timeout) -> Callable[[_Call], None]:
    """The pool's way of reporting a late outcome, without keeping ``policy`` alive."""
    ref = weakref.ref(policy)

    def report(call: _Call) -> None:
        owner = ref()
        if owner is not None:
            owner.emit(
                _events.AbandonedCallCompleted,
                timeout=owner.seconds,
                elapsed=owner.clock.now() - call.started,
                error=call.error,
                result=call.result,
            )

    return report


# -- mode="signal": SIGALRM in the main thread ------------------------------------------------

_HAS_ALARM = hasattr(signal, "setitimer") and hasattr(signal, "SIGALRM")


class _Alarm(BaseException):
    """Raised by the SIGALRM handler in the interrupted function; the scope that set the
    timer turns it into :class:`TimeoutExceeded` (a ``BaseException``, so that
    ``except Exception:`` inside the function does not swallow the interruption)."""

    def __init__(self, scope: _SignalScope) -> None:
        super().__init__(f"interrupted by a timer signal {scope.seconds:g}s after the call began")
        self.scope = scope


class _SignalScope:
    __slots__ = ("deadline", "fired", "seconds", "started", "token")

    def __init__(self, seconds: float, token: Token[Any], now: float) -> None:
        self.seconds = seconds
        self.token = token
        self.started = now
        self.deadline = now + seconds
        self.fired = False


class _Alarms:
    """The main thread's open signal scopes (outermost first) and what the outermost
    one replaced: the SIGALRM handler, and a timer another party had set."""

    def __init__(self) -> None:
        self.stack: list[_SignalScope] = []
        self.saved_handler: Any = signal.SIG_DFL
        self.saved_timer: tuple[float, float] = (0.0, 0.0)
        self.saved_at = 0.0


_alarms = _Alarms()
_TINY = 1e-6  # setitimer(0) disarms: "now" is a microsecond


def _rearm() -> None:
    """Arm the timer for the earliest deadline of the open scopes that have not fired."""
    if not _HAS_ALARM:  # pragma: no cover - guarded at construction
        return
    deadlines = [scope.deadline for scope in _alarms.stack if not scope.fired]
    if deadlines:
        signal.setitimer(signal.ITIMER_REAL, max(min(deadlines) - time.monotonic(), _TINY))
    else:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    now = time.monotonic()
    due = None
    for scope in _alarms.stack:  # the outermost expired scope claims the interruption
        if not scope.fired and scope.deadline <= now:
            due = scope
            break
    if due is None:  # early, or every scope is gone: wait for the next deadline
        _rearm()
        return
    if frame is not None and frame.f_code in _CRITICAL:
        # Never interrupt buttress's own bookkeeping (entering or leaving a scope):
        # try again in a moment, by which time the frame has moved on or the scope ended.
        signal.setitimer(signal.ITIMER_REAL, 0.001)
        return
    due.fired = True
    raise _Alarm(due)


def _checkpoint() -> None:
    """A Python call: a signal the C handler caught is run here, by our handler."""


def _signal_enter(seconds: float, clock: Any) -> _SignalScope:
    if threading.current_thread() is not threading.main_thread():
        raise ConfigValueError(
            f"a timeout with mode='signal' works only in the main thread (Python runs signal "
            f"handlers there), not in {threading.current_thread().name!r}: use mode='thread' "
            f"or mode='deadline' here"
        )
    effective, token = set_deadline(seconds, clock)
    scope = _SignalScope(effective, token, time.monotonic())
    if not _alarms.stack:
        previous = signal.getsignal(signal.SIGALRM)
        # Pause another party's timer first, so that it cannot fire into our handler.
        _alarms.saved_timer = signal.setitimer(signal.ITIMER_REAL, 0)
        _alarms.saved_at = time.monotonic()
        try:
            signal.signal(signal.SIGALRM, _on_alarm)
        except BaseException:  # pragma: no cover - e.g. not the main interpreter
            signal.setitimer(signal.ITIMER_REAL, *_alarms.saved_timer)
            reset_deadline(token)
            raise
        _alarms.saved_handler = signal.SIG_DFL if previous is None else previous
    _alarms.stack.append(scope)
    _rearm()
    return scope


def _signal_leave(scope: _SignalScope) -> None:
    stack = _alarms.stack
    if scope in stack:
        stack.remove(scope)
        if stack:
            _rearm()  # the enclosing scopes' earliest deadline
        else:
            signal.setitimer(signal.ITIMER_REAL, 0)
            _checkpoint()  # a signal already caught runs our handler, not the restored one
            signal.signal(signal.SIGALRM, _alarms.saved_handler)
            delay, interval = _alarms.saved_timer
            if delay > 0:  # someone else's timer, paused while we held SIGALRM
                left = delay - (time.monotonic() - _alarms.saved_at)
                signal.setitimer(signal.ITIMER_REAL, max(left, _TINY), interval)
    reset_deadline(scope.token)


def _leave_safely(scope: _SignalScope) -> _Alarm | None:
    """Leave ``scope`` even if an alarm lands as it leaves; that alarm, if any."""
    late = None
    while True:
        try:
            _signal_leave(scope)
            return late
        except _Alarm as alarm:  # pragma: no cover - needs a signal inside the handful of
            late = alarm  # bytecodes before _signal_leave's frame starts


def _settle_alarms(scope: _SignalScope, *alarms: _Alarm | None) -> bool:
    """After leaving ``scope``: re-raise an enclosing scope's alarm (it claims the
    expiry); ``True`` if this scope's own alarm fired."""
    own = False
    for alarm in alarms:
        if alarm is None:
            continue
        if alarm.scope is not scope:
            raise alarm
        own = True
    return own


class Timeout(Policy):
    """A time limit for a call (decorator) or a block (``with`` / ``async with``).

    Args:
        seconds: the time limit (> 0, an int, float or timedelta).
        mode: how a sync call is bounded (coroutines are always cancelled; a mode other
            than ``"deadline"`` refuses them): ``"deadline"`` (default: the function runs
            to completion, a late result is discarded), ``"thread"`` (the call runs in
            a worker thread and the caller gets ``TimeoutExceeded`` at the deadline; a
            decorator only) or ``"signal"`` (``SIGALRM`` interrupts the function; main
            thread, POSIX, system clock).
        max_workers: ``mode="thread"`` only: the most worker threads, running or
            abandoned calls alike (default 32); a call finding every worker busy is
            rejected with ``RejectedError`` (reason ``"timeout_workers_busy"``).
        max_abandoned: ``mode="thread"`` only: the most abandoned calls still running
            (default ``max_workers // 4``, at least 1; at most ``max_workers``); past it
            new calls are rejected at once (reason ``"timeout_abandoned"``).
        name: registers the policy for ``state()`` and ``health()``.
        **options: ``listeners``, ``registry`` and ``clock``, as for every policy
            (:class:`~buttress.Policy`).
    """

    kind = "timeout"

    def __init__(
        self,
        seconds: float | timedelta,
        *,
        mode: TimeoutMode = "deadline",
        max_workers: int | None = None,
        max_abandoned: int | None = None,
        name: str | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(name=name, **options)
        value = require_seconds("seconds", seconds)
        self.seconds = value
        self.mode: TimeoutMode = check_choice("mode", mode, _MODES)  # type: ignore[assignment]
        self.max_workers: int | None = None
        self.max_abandoned: int | None = None
        self._pool: _Pool | None = None
        if self.mode == "thread":
            workers = 32 if max_workers is None else check_int("max_workers", max_workers)
            cap = (
                max(1, workers // 4)
                if max_abandoned is None
                else check_int("max_abandoned", max_abandoned)
            )
            if cap > workers:
                raise ConfigValueError(
                    f"max_abandoned must be <= max_workers ({workers}), got {max_abandoned!r}"
                )
            self.max_workers, self.max_abandoned = workers, cap
            thread_name = (
                "buttress-timeout" if self.name is None else f"buttress-timeout-{self.name}"
            )
            self._pool = _Pool(workers, cap, thread_name, _reporter(self))
            _pools.add(self._pool)
            weakref.finalize(self, self._pool.close)
        else:
            for option, given in (("max_workers", max_workers), ("max_abandoned", max_abandoned)):
                if given is not None:
                    raise ConfigValueError(
                        f"{option} applies to mode='thread' only, got {option}={given!r} "
                        f"with mode={self.mode!r}"
                    )
        if self.mode == "signal":
            if not _HAS_ALARM:
                raise ConfigValueError(
                    "mode='signal' needs SIGALRM and setitimer, which this platform lacks "
                    f"({sys.platform}): use mode='thread' or mode='deadline'"
                )
            if not isinstance(self._clock, SystemClock):
                raise ConfigValueError(
                    f"mode='signal' interrupts with a real timer signal, so it needs the "
                    f"system clock, got clock={self._clock!r}"
                )
        # Most timeouts never expire (and `async with timeout(5)` builds one per use),
        # so the expiry counter is created on the first expiry.
        self._timeouts: Counter | None = None
        self._register()

    def close(self) -> None:
        """``mode="thread"``: end the idle worker threads now and each busy one when its
        call ends; later calls are rejected (reason ``"timeout_closed"``). Called when
        the policy is garbage collected; a no-op in the other modes."""
        if self._pool is not None:
            self._pool.close()

    def expired(
        self, cause: BaseException | None = None, *, error: TimeoutExceeded | None = None
    ) -> TimeoutExceeded:
        """Count and report an expiry of this timeout; the error for the caller to raise.

        For drivers that enforce the time limit themselves (the httpx transport maps
        its client's own timeout to this policy): ``raise t.expired(exc) from exc``.
        The expiry is counted in ``snapshot()["timeouts"]`` and emits ``TimeoutFired``
        with ``seconds``; ``cause``, when given, becomes the error's ``__cause__``.
        ``error``, when given, is the error returned instead of a plain
        :class:`TimeoutExceeded`: a subclass that is also the client library's own
        timeout error, so that its ``except`` clauses keep working.
        """
        built = self._expired(self.seconds, cause)
        if error is None:
            return built
        error.__cause__ = cause
        return error

    def _expired(
        self, seconds: float, cause: BaseException | None = None, *, abandoned: bool = False
    ) -> TimeoutExceeded:
        with _COUNTER_LOCK:
            if self._timeouts is None:
                self._timeouts = Counter()
        self._timeouts.incr()
        self.emit(_events.TimeoutFired, timeout=seconds)
        label = "timeout" if self.name is None else f"timeout {self.name!r}"
        message = f"{label}: exceeded {seconds:g}s"
        if abandoned:
            message += (
                " (mode='thread': the call goes on in its worker thread, abandoned; its "
                "outcome is reported as an AbandonedCallCompleted event)"
            )
        error = TimeoutExceeded(message, timeout=seconds)
        error.__cause__ = cause
        return error

    # -- async: a cancel scope --------------------------------------------------------------

    def _refuse_async(self, what: str) -> ConfigTypeError:
        return ConfigTypeError(
            f"a timeout with mode={self.mode!r} bounds sync code, got {what}: a coroutine is "
            f"cancelled at the deadline already, so use the default mode='deadline'"
        )

    def _enter_async(self) -> _Scope:
        if self.mode != "deadline":
            raise self._refuse_async("`async with`")
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
        if self.mode != "deadline":
            raise self._refuse_async(f"the coroutine function {fn!r}")
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

    # -- sync: a propagated deadline, a worker thread or a timer signal ---------------------

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self.mode == "thread":
            return self._wrap_thread(fn)
        if self.mode == "signal":
            return _signal_wrapper(self, fn)
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

    def _wrap_thread(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock, limit, pool = self._clock, self.seconds, self._pool
        assert pool is not None
        now = clock.now

        def limited(*args: Any, **kwargs: Any) -> Any:
            if loop_running() is not None:
                warn_blocking(
                    f"{self._label}: a mode='thread' call on a thread whose event loop is "
                    f"running blocks the loop until it ends (await a coroutine under an async "
                    f"timeout, or run it in an executor)"
                )
            seconds, token = set_deadline(limit, clock)
            try:
                context = copy_context()  # remaining() and every contextvar go along
            finally:
                reset_deadline(token)
            if seconds <= 0.0:  # an enclosing deadline has passed: start nothing to abandon
                raise self._expired(seconds)
            call = _Call(fn, args, kwargs, context, now())
            reason = pool.submit(call)
            if reason is not None:
                raise self._rejected(reason)
            try:
                clock.wait(call.done, seconds)
            except BaseException:  # the caller was interrupted: the call goes on without it
                pool.abandon(call)
                raise
            if pool.abandon(call):
                raise self._expired(seconds, abandoned=True)
            failure = call.error
            if failure is not None:
                call.error = None
                try:
                    raise failure
                finally:
                    del failure
            if now() - call.started > seconds:
                raise self._expired(seconds)  # finished just as the wait gave up
            return call.result

        return limited

    @property
    def _label(self) -> str:
        return "timeout" if self.name is None else f"timeout {self.name!r}"

    def _rejected(self, reason: str) -> RejectedError:
        pool = self._pool
        assert pool is not None
        if reason == "timeout_abandoned":
            detail = (
                f"{pool.abandoned} abandoned calls are still running (max_abandoned="
                f"{pool.max_abandoned}): new calls are rejected until some end"
            )
        elif reason == "timeout_workers_busy":
            detail = f"all {pool.max_workers} worker threads are busy (max_workers)"
        else:
            detail = "the policy was closed"
        self.emit(_events.CallRejected, reason=reason, retry_after=None)
        return RejectedError(f"{self._label}: {detail}", name=self.name, reason=reason)

    def __enter__(self) -> Timeout:
        if loop_running() is not None:
            warn_blocking(
                f"{self._label}: a sync `with timeout(...)` block on a thread whose event loop "
                f"is running cancels nothing: use `async with timeout(...)`"
            )
        mode = self.mode
        if mode == "deadline":
            seconds, token = set_deadline(self.seconds, self._clock)
            cm_push(self, (seconds, token, self._clock.now()))
        elif mode == "signal":
            cm_push(self, _signal_enter(self.seconds, self._clock))
        else:
            raise ConfigTypeError(
                "a timeout with mode='thread' runs a function in a worker thread, so it "
                "decorates functions; a `with` block cannot move to another thread (use "
                "mode='signal' or mode='deadline' for a block)"
            )
        return self

    def __exit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        entry = cm_pop(self)
        if isinstance(entry, _SignalScope):
            alarm = exc if isinstance(exc, _Alarm) else None
            if _settle_alarms(entry, alarm, _leave_safely(entry)):
                raise self._expired(entry.seconds) from exc
            if exc is None and time.monotonic() - entry.started > entry.seconds:
                raise self._expired(entry.seconds)
            return
        seconds, token, started = entry
        reset_deadline(token)
        if exc is None and self._clock.now() - started > seconds:
            raise self._expired(seconds)

    # -- generator functions: one deadline for the whole iteration ---------------------------

    def _wrap_generator(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self.mode != "deadline":
            raise ConfigTypeError(
                f"a timeout with mode={self.mode!r} bounds a call, got the generator "
                f"function {fn!r}: its items are produced in the caller's thread between "
                f"calls, so use the default mode='deadline'"
            )
        return wrap_generator(fn, lambda: _DeadlineSession(self))

    def _wrap_async_generator(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self.mode != "deadline":
            raise self._refuse_async(f"the async generator function {fn!r}")

        async def open_session() -> Session:
            return _ScopeSession(self)

        return wrap_async_generator(fn, open_session)

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "seconds": self.seconds,
            "mode": self.mode,
            "timeouts": 0 if self._timeouts is None else self._timeouts.value,
        }
        pool = self._pool
        if pool is not None:
            with pool.lock:
                out.update(
                    max_workers=pool.max_workers,
                    max_abandoned=pool.max_abandoned,
                    workers=pool.threads,
                    running=pool.running,
                    abandoned=pool.abandoned,
                    abandoned_total=pool.abandoned_total,
                    late_results=pool.late_results,
                    late_errors=pool.late_errors,
                    rejections=pool.rejections,
                )
        return out

    def health_check(self) -> tuple[str, Any, str]:
        pool = self._pool
        if pool is None:
            return "pass", None, ""
        with pool.lock:
            abandoned, cap = pool.abandoned, pool.max_abandoned
        if abandoned >= cap:
            return (
                "fail",
                abandoned,
                (
                    f"{abandoned} abandoned calls still running (max_abandoned={cap}): "
                    f"new calls are rejected"
                ),
            )
        if abandoned:
            return "warn", abandoned, f"{abandoned} abandoned calls still running"
        return "pass", abandoned, ""


def _signal_wrapper(policy: Timeout, fn: Callable[..., Any]) -> Callable[..., Any]:
    limit, clock = policy.seconds, policy.clock

    def limited(*args: Any, **kwargs: Any) -> Any:
        if loop_running() is not None:
            warn_blocking(
                f"{policy._label}: a mode='signal' call on a thread whose event loop is "
                f"running blocks the loop until it ends"
            )
        scope = _signal_enter(limit, clock)
        try:
            result = fn(*args, **kwargs)
        except _Alarm as alarm:
            if _settle_alarms(scope, alarm, _leave_safely(scope)):
                raise policy._expired(scope.seconds) from alarm
            raise  # pragma: no cover - _settle_alarms re-raises an enclosing scope's alarm
        except BaseException:
            _settle_alarms(scope, _leave_safely(scope))
            raise
        if _settle_alarms(scope, _leave_safely(scope)) or (
            time.monotonic() - scope.started > scope.seconds
        ):
            raise policy._expired(scope.seconds)
        return result

    return limited


def _codes() -> frozenset[Any]:
    """The code objects a SIGALRM must not interrupt (see _on_alarm)."""
    from ._policy import cm_pop as pop
    from ._policy import cm_push as push

    functions: list[Any] = [
        _signal_enter,
        _signal_leave,
        _leave_safely,
        _settle_alarms,
        _rearm,
        _checkpoint,
        _on_alarm,
        set_deadline,
        reset_deadline,
        push,
        pop,
        Timeout.__enter__,
        Timeout.__exit__,
    ]
    for name in ("signal", "getsignal", "_enum_to_int", "_int_to_enum"):
        functions.append(getattr(signal, name, None))
    return frozenset(
        code for code in (getattr(function, "__code__", None) for function in functions) if code
    )


_CRITICAL = _codes()


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
