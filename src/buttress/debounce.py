"""Debounce and throttle: collapse bursts of calls into fewer executions.

``debounce(wait)``: calls closer than ``wait`` seconds to each other collapse
into one execution with the latest arguments, run once the calls stop for
``wait`` seconds (trailing edge), or on the first call (``leading=True``).
``max_wait`` bounds how long a steady stream of calls can postpone execution.

``throttle(interval)``: at most one execution per ``interval``; the first call
runs at once (``leading``), calls during the interval collapse into one run at
its end with the latest arguments (``trailing``).

Async: every caller awaits, and receives the result (or exception) of, the
execution that served it. Sync: a caller never blocks for others; a leading
execution runs in the caller's thread and returns its result, while collapsed
calls return the result of the latest finished execution (``None`` before the
first) and the trailing execution runs on the clock's timer thread. Errors of a
sync trailing execution are logged on the ``buttress.debounce`` logger.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import weakref
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, ParamSpec, TypeVar, overload

from ._policy import Policy, PolicyOptions, is_async_callable
from ._validate import check_bool, check_decoratable, check_seconds, require_seconds
from .clock import Clock, TimerHandle
from .exceptions import ConfigValueError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Debounce", "Throttle", "debounce", "throttle"]

P = ParamSpec("P")
R = TypeVar("R")

_log = logging.getLogger("buttress.debounce")
_EPS = 1e-9


class _Gate:
    """The collapsing state machine of one decorated function."""

    def __init__(self, policy: Debounce, fn: Callable[..., Any], is_async: bool) -> None:
        self.policy = policy
        self.fn = fn
        self.is_async = is_async
        self.clock: Clock = policy.clock
        self.lock = threading.Lock()
        self.timer: TimerHandle | None = None
        self.first_call = 0.0
        self.last_call = 0.0
        self.last_exec = float("-inf")
        self.pending = False
        self.args: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
        self.serving: asyncio.Future[Any] | None = None  # the trailing run callers wait for
        self.current: asyncio.Future[Any] | None = None  # the latest started run
        self.last_result: Any = None
        self.executions = 0
        self.calls = 0

    # -- decisions (lock held) --------------------------------------------------------------

    def _on_call(self, now: float) -> str:
        """``"run"``: execute now (leading); ``"wait"``: collapse into the trailing run;
        ``"join"``: receive the current run's result."""
        p = self.policy
        self.calls += 1
        self.last_call = now
        if p.throttle:
            if self.timer is None and p.leading and now - self.last_exec >= p.wait - _EPS:
                self.last_exec = now
                self._arm(p.wait)
                return "run"
            if p.trailing:
                self.pending = True
                if self.timer is None:
                    self._arm(max(self.last_exec + p.wait - now, 0.0))
                return "wait"
            return "join"
        if self.timer is None:
            self.first_call = now
            self._arm(self._next_delay(now))
            if p.leading:
                self.last_exec = now
                return "run"
            self.pending = True
            return "wait"
        if p.trailing:
            self.pending = True
            return "wait"
        return "join"

    def _next_delay(self, now: float) -> float:
        p = self.policy
        due = self.last_call + p.wait
        if p.max_wait is not None:
            due = min(due, self.first_call + p.max_wait)
        return max(due - now, 0.0)

    def _arm(self, delay: float) -> None:
        self.timer = self.clock.call_later(delay, self._fire)

    def _on_timer(self, now: float) -> bool:
        """True if the trailing execution should run now."""
        p = self.policy
        self.timer = None
        if p.throttle:
            if self.pending:
                self.pending = False
                self.last_exec = now
                self._arm(p.wait)  # a new interval starts with this execution
                return True
            return False
        quiet = now - self.last_call >= p.wait - _EPS
        maxed = p.max_wait is not None and now - self.first_call >= p.max_wait - _EPS
        if not (quiet or maxed):
            self._arm(self._next_delay(now))
            return False
        run = self.pending and p.trailing
        self.pending = False
        if run:
            self.last_exec = now
        if not quiet:  # max_wait forced a run while calls keep coming: a new window begins
            self.first_call = now
            self._arm(self._next_delay(now))
        return run

    # -- sync face --------------------------------------------------------------------------

    def call_sync(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self.lock:
            self.args = (args, kwargs)
            decision = self._on_call(self.clock.now())
            last = self.last_result
        if decision == "run":
            return self._execute_sync(args, kwargs)
        return last

    def _execute_sync(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        result = self.fn(*args, **kwargs)
        with self.lock:
            self.executions += 1
            self.last_result = result
        return result

    # -- async face -------------------------------------------------------------------------

    async def call_async(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] | None
        with self.lock:
            self.args = (args, kwargs)
            decision = self._on_call(self.clock.now())
            if decision == "run":
                future = self._start_async(loop, args, kwargs)
            elif decision == "wait":
                if self.serving is None:
                    self.serving = loop.create_future()
                    self.serving.add_done_callback(_consume)
                future = self.serving
            else:
                future = self.current
        if future is None:  # nothing has run yet in this window and no trailing run is owed
            with self.lock:
                return self.last_result
        return await asyncio.shield(future)

    def _start_async(
        self,
        loop: asyncio.AbstractEventLoop,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        future: asyncio.Future[Any] | None = None,
    ) -> asyncio.Future[Any]:
        if future is None:
            future = loop.create_future()
            future.add_done_callback(_consume)
        self.current = future
        task = loop.create_task(self.fn(*args, **kwargs))
        task.add_done_callback(functools.partial(self._finished, future))
        return future

    def _finished(self, future: asyncio.Future[Any], task: asyncio.Task[Any]) -> None:
        with self.lock:
            self.executions += 1
        if future.done():
            return
        if task.cancelled():
            future.cancel()
        elif task.exception() is not None:
            future.set_exception(task.exception())  # type: ignore[arg-type]
        else:
            with self.lock:
                self.last_result = task.result()
            future.set_result(task.result())

    # -- the timer ----------------------------------------------------------------------------

    def _fire(self) -> None:
        with self.lock:
            sync_call = self._start_trailing() if self._on_timer(self.clock.now()) else None
        self._run_sync(sync_call)

    def _start_trailing(self) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Lock held: start the trailing execution with the latest arguments. Async: as a
        task serving the waiting callers; sync: returns the arguments to run it with."""
        args, kwargs = self.args
        serving, self.serving = self.serving, None
        if self.is_async:
            self._start_async(asyncio.get_running_loop(), args, kwargs, serving)
            return None
        return args, kwargs

    def _run_sync(self, call: tuple[tuple[Any, ...], dict[str, Any]] | None) -> None:
        """Run a sync trailing execution outside the lock (on the timer's thread)."""
        if call is None:
            return
        try:
            self._execute_sync(*call)
        except Exception:
            _log.exception("debounced call %r failed", self.fn)

    def flush(self) -> None:
        """Run the owed trailing execution now, if any."""
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            owed = self.pending and self.policy.trailing
            self.pending = False
        if owed:
            self.clock.call_later(0.0, self._flush_run)

    def _flush_run(self) -> None:
        with self.lock:
            self.last_exec = self.clock.now()
            sync_call = self._start_trailing()
        self._run_sync(sync_call)

    def cancel(self) -> None:
        """Drop the owed trailing execution; async callers waiting for it are cancelled."""
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.pending = False
            serving, self.serving = self.serving, None
        if serving is not None and not serving.done():
            serving.get_loop().call_soon_threadsafe(serving.cancel)


def _consume(future: asyncio.Future[Any]) -> None:
    # Mark the exception as retrieved: callers may all have been cancelled.
    if not future.cancelled():
        future.exception()


class Debounce(Policy):
    """Collapse calls closer than ``wait`` seconds into one execution with the latest arguments.

    ``debounce(...)`` builds one (a :class:`Throttle` with ``throttle(...)``). Each
    decorated function gets its own state; :meth:`flush` and :meth:`cancel` act on every
    function this policy decorated. Like every policy it takes ``name=`` (and then appears
    in ``buttress.state()``), ``listeners=``, ``registry=`` and ``clock=``, and it can be
    part of a :func:`~buttress.pipeline`.

    Args:
        wait: quiet time in seconds that ends a burst (> 0).
        max_wait: longest a burst may postpone an execution (default: unbounded).
        leading: run on the first call of a burst (default False).
        trailing: run after the burst with the latest arguments (default True).
    """

    kind: ClassVar[str] = "debounce"
    throttle: ClassVar[bool] = False

    def __init__(
        self,
        wait: float | timedelta,
        *,
        max_wait: float | timedelta | None = None,
        leading: bool = False,
        trailing: bool = True,
        name: str | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(name=name, **options)
        label = "interval" if self.throttle else "wait"
        self.wait = require_seconds(label, wait)
        self.max_wait = check_seconds("max_wait", max_wait, allow_none=True)
        if self.max_wait is not None and self.max_wait < self.wait:
            raise ConfigValueError(f"max_wait must be >= wait ({wait!r}), got {max_wait!r}")
        self.leading = check_bool("leading", leading)
        self.trailing = check_bool("trailing", trailing)
        if not (self.leading or self.trailing):
            raise ConfigValueError(
                "at least one of leading or trailing must be True, got leading=False and "
                "trailing=False (nothing would ever run)"
            )
        self._gates: weakref.WeakSet[_Gate] = weakref.WeakSet()
        self._gates_lock = threading.Lock()  # a WeakSet is not safe to change while iterated
        self._register()

    # A sync debounced call may return None (collapsed before any execution finished), so
    # the sync overload is wider than Policy.__call__'s; the async one is the same.
    @overload  # type: ignore[override]
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R | None]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        check_decoratable(fn)
        wrapper = self._wrap_async(fn) if is_async_callable(fn) else self._wrap_sync(fn)
        gate = wrapper.__buttress_gate__  # type: ignore[attr-defined]
        self.wraps(wrapper, fn)
        # wraps() copied fn's __dict__: an already debounced fn brought its own gate.
        wrapper.__buttress_gate__ = gate  # type: ignore[attr-defined]
        return wrapper

    def _gate(self, fn: Callable[..., Any], is_async: bool) -> _Gate:
        gate = _Gate(self, fn, is_async)
        with self._gates_lock:
            self._gates.add(gate)
        return gate

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        gate = self._gate(fn, is_async=False)

        def debounced(*args: Any, **kwargs: Any) -> Any:
            return gate.call_sync(args, kwargs)

        debounced.__buttress_gate__ = gate  # type: ignore[attr-defined]
        return debounced

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        gate = self._gate(fn, is_async=True)

        async def debounced_async(*args: Any, **kwargs: Any) -> Any:
            return await gate.call_async(args, kwargs)

        debounced_async.__buttress_gate__ = gate  # type: ignore[attr-defined]
        return debounced_async

    def flush(self) -> None:
        """Run every owed trailing execution now (async ones on their loop)."""
        for gate in self._all_gates():
            gate.flush()

    def cancel(self) -> None:
        """Drop every owed trailing execution."""
        for gate in self._all_gates():
            gate.cancel()

    def _all_gates(self) -> list[_Gate]:
        with self._gates_lock:
            return list(self._gates)

    def snapshot(self) -> dict[str, Any]:
        """Options and counters over every decorated function (``pending``: functions
        that owe a trailing execution)."""
        gates = self._all_gates()
        calls = executions = pending = 0
        for gate in gates:
            with gate.lock:
                calls += gate.calls
                executions += gate.executions
                pending += bool(gate.pending and self.trailing)
        out: dict[str, Any] = {"kind": self.kind, "name": self.name}
        if self.throttle:
            out["interval"] = self.wait
        else:
            out["wait"] = self.wait
            out["max_wait"] = self.max_wait
        out.update(
            leading=self.leading,
            trailing=self.trailing,
            calls=calls,
            executions=executions,
            pending=pending,
        )
        return out


class Throttle(Debounce):
    """Run at most once per ``interval`` seconds (``throttle(...)`` builds one).

    Args:
        interval: minimum seconds between executions (> 0).
        leading: run the first call at once (default True).
        trailing: run once more at the end of the interval with the latest arguments if
            calls arrived during it (default True).

    It also takes the options every primitive takes: ``name``, ``listeners``,
    ``registry`` and ``clock`` (see "Every primitive" on the options page).
    """

    kind: ClassVar[str] = "throttle"
    throttle: ClassVar[bool] = True

    def __init__(
        self,
        interval: float | timedelta,
        *,
        leading: bool = True,
        trailing: bool = True,
        name: str | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(interval, leading=leading, trailing=trailing, name=name, **options)

    @property
    def interval(self) -> float:
        """Minimum seconds between executions."""
        return self.wait


debounce = Debounce
"""``debounce(wait, max_wait=None, leading=False, trailing=True)``: as :class:`Debounce`."""

throttle = Throttle
"""``throttle(interval, leading=True, trailing=True)``: the same as :class:`Throttle`."""
