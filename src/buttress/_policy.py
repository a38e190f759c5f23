"""What every primitive shares: decoration, naming, events and snapshots.

A policy turns a function into a protected function *at decoration time*:
``__call__`` checks the target once, picks the sync or the async wrapper once,
and the wrapper does only the primitive's own work per call. A pipeline nests
the same wrappers, so composing policies costs the sum of their parts.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from types import FunctionType, TracebackType
from typing import Any, ClassVar, ParamSpec, TypedDict, TypeVar

from . import events as _events
from ._validate import check_bool, check_decoratable, check_name
from .clock import Clock, resolve_clock
from .exceptions import ConfigTypeError, ConfigValueError
from .registry import Registry, default_registry

__all__ = ["ExcType", "Policy", "PolicyOptions", "Traceback", "is_async_callable"]

ExcType = type[BaseException] | None
"""The first argument of ``__exit__``: the block's exception type, or ``None``."""
Traceback = TracebackType | None
"""The third argument of ``__exit__``: the block's traceback, or ``None``."""

P = ParamSpec("P")
R = TypeVar("R")


def is_async_callable(obj: object) -> bool:
    """True for coroutine functions, including partials and objects with an async ``__call__``."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    if inspect.iscoroutinefunction(obj):
        return True
    call = getattr(obj, "__call__", None)  # noqa: B004 - we want the method itself
    return call is not None and not inspect.isfunction(obj) and inspect.iscoroutinefunction(call)


# Guards the rare changes to a policy's listeners. Emitting reads the tuple without it:
# a change replaces the tuple whole, so an event goes to the old or the new listeners.
_listeners_lock = threading.Lock()


class PolicyOptions(TypedDict, total=False):
    """The keyword options every policy takes besides its own (``**options`` in their
    signatures): see :class:`Policy`."""

    listeners: Iterable[_events.Listener] | None
    registry: Registry | None
    clock: Clock | None
    critical: bool


class Policy:
    """Base of every primitive: usable as a decorator and as part of a pipeline.

    Every policy takes these keyword options besides its own:

    Args:
        name: registers the policy in ``registry`` under its kind and this name, so that
            ``health()`` and ``state()`` report it (default ``None``: not registered).
        listeners: event listeners for this policy only (the global ones, added with
            ``buttress.events.subscribe``, hear every policy).
        registry: the :class:`~buttress.Registry` to join instead of the default one.
        clock: the time source (default: the system clock; ``buttress.testing.FakeClock``
            in tests).
        critical: whether this policy's failing health check takes the process out of
            rotation: it fails :func:`~buttress.readiness` and makes :func:`~buttress.health`
            ``"fail"``. Default ``False``: a failing check (an open breaker, say) only
            degrades health to ``"warn"``. Needs ``name=`` (only named policies are
            registered).
    """

    kind: ClassVar[str] = "policy"

    def __init__(
        self,
        *,
        name: str | None = None,
        listeners: Iterable[_events.Listener] | None = None,
        registry: Registry | None = None,
        clock: Clock | None = None,
        critical: bool = False,
    ) -> None:
        self.name: str | None = None if name is None else check_name(name)
        self._critical = check_bool("critical", critical)
        if critical and self.name is None:
            raise ConfigValueError(
                f"critical=True needs name=: readiness reads the registry, and only named "
                f"{self.kind} policies join one"
            )
        self._listeners: tuple[_events.Listener, ...] = (
            () if listeners is None else _events.check_listeners(listeners)
        )
        self._clock: Clock = resolve_clock(clock)
        if registry is not None and not isinstance(registry, Registry):
            raise ConfigTypeError(
                f"registry must be a buttress.Registry, got {registry!r} "
                f"({type(registry).__name__})"
            )
        self._registry: Registry | None = None
        if self.name is not None:
            self._registry = registry if registry is not None else default_registry()

    def _register(self) -> None:
        """Join the registry; subclasses call this once they are fully built."""
        if self._registry is not None:
            self._registry.register(self)

    @property
    def critical(self) -> bool:
        """Whether this policy's failing health check fails readiness (``critical=``)."""
        return self._critical

    @property
    def clock(self) -> Clock:
        """The time source this policy reads and waits on (``clock=``; the system clock by
        default)."""
        return self._clock

    @property
    def registry(self) -> Registry | None:
        """The registry this policy joined (``None`` for an unnamed policy)."""
        return self._registry

    # -- decoration -------------------------------------------------------------------------

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` (sync or async, or a generator function where the policy
        supports one); the wrapper keeps its signature."""
        if inspect.isgeneratorfunction(fn):
            wrapper = self._wrap_generator(fn)
        elif inspect.isasyncgenfunction(fn):
            wrapper = self._wrap_async_generator(fn)
        else:
            check_decoratable(fn)
            wrapper = self._wrap_async(fn) if is_async_callable(fn) else self._wrap_sync(fn)
        return self.wraps(wrapper, fn)

    @staticmethod
    def wraps(wrapper: Callable[..., Any], fn: Callable[..., Any]) -> Callable[..., Any]:
        """Give ``wrapper`` the identity of ``fn`` and return it: what ``functools.wraps``
        copies (name, doc, module, ``__dict__``, ``__wrapped__``), and the default values
        (``__defaults__``, ``__kwdefaults__``), which it leaves behind, so that tools that
        read them (``click``, test frameworks, documentation) see the decorated function's.

        Every policy's decorator uses it; a decorator of your own can too.
        """
        functools.update_wrapper(wrapper, fn)
        if isinstance(wrapper, FunctionType):
            # The wrappers take (*args, **kwargs) only, so these values are informational
            # there: Python applies defaults to named parameters, and a wrapper has none.
            wrapper.__defaults__ = getattr(fn, "__defaults__", None)
            wrapper.__kwdefaults__ = getattr(fn, "__kwdefaults__", None)
        return wrapper

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        raise ConfigTypeError(f"{type(self).__name__} cannot protect the sync function {fn!r}")

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        raise ConfigTypeError(f"{type(self).__name__} cannot protect the async function {fn!r}")

    def _wrap_generator(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        raise ConfigTypeError(
            f"{type(self).__name__} cannot decorate the generator function {fn!r}: retry, "
            f"CircuitBreaker, Bulkhead, RateLimiter and timeout can (see the generators "
            f"section of their guides); otherwise wrap the code that consumes the generator"
        )

    def _wrap_async_generator(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return self._wrap_generator(fn)

    # -- events -----------------------------------------------------------------------------

    def add_listener(self, listener: _events.Listener) -> None:
        """Send this policy's events to ``listener`` too, from now on (once, however many
        times it is added)."""
        if not callable(listener):
            raise ConfigTypeError(
                f"listener must be callable, got {listener!r} ({type(listener).__name__})"
            )
        with _listeners_lock:
            if listener not in self._listeners:
                self._listeners = (*self._listeners, listener)

    def remove_listener(self, listener: _events.Listener) -> bool:
        """Stop sending this policy's events to ``listener``; ``False`` if it was not one
        of this policy's listeners (a global one is removed with the function that
        ``buttress.events.subscribe`` returned)."""
        with _listeners_lock:
            kept = tuple(item for item in self._listeners if item != listener)
            removed = len(kept) != len(self._listeners)
            self._listeners = kept
        return removed

    @property
    def listening(self) -> bool:
        """Whether an event emitted now would reach a listener (this policy's or a global
        one): callers that must gather costly fields for an event can check it first."""
        return bool(self._listeners or _events.hub.listeners)

    def emit(self, event_type: type[_events.Event], **fields: Any) -> None:
        """Send an event of ``event_type`` to this policy's listeners and the global ones.

        The event's ``source``, ``name`` and ``time`` come from the policy; ``fields`` are
        the rest of the event's fields. Nothing is built when nobody listens, and a failing
        listener never reaches the caller. Stores and integrations report what they do on
        behalf of a policy through this method.
        """
        if self._listeners or _events.hub.listeners:
            # source, name and time lead every event's fields: passed by position, the
            # cheaper call (an event is built per rejection while anyone listens).
            event = event_type(self.kind, self.name, self._clock.now(), **fields)
            _events.dispatch(self._listeners, event)

    def _deliver(self, event: _events.Event) -> None:
        """Send an event already built (by position, the cheaper call) to this policy's
        listeners and the global ones: what :meth:`emit` does once it has built one. The
        rejection and retry paths use it after checking that someone listens."""
        local, shared = self._listeners, _events.hub.listeners
        if local and shared:
            _events.dispatch(local, event)
        else:
            _events.deliver(local or shared, event)

    # -- state ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """A JSON-serialisable view of this primitive's configuration and counters."""
        return {"kind": self.kind, "name": self.name}

    def health_check(self) -> tuple[str, Any, str]:
        """``(status, observed value, output)`` with status ``"pass"``, ``"warn"`` or ``"fail"``."""
        return "pass", None, ""

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name is not None else ""
        return f"<{type(self).__name__}{label}>"


_cm_entries: ContextVar[tuple[tuple[object, Any, object], ...]] = ContextVar(
    "buttress_cm_entries", default=()
)


def cm_push(owner: object, value: Any) -> None:
    """Remember ``value`` for ``owner``'s ``__exit__`` in the current task or thread.

    Call it from ``__enter__`` / ``__aenter__`` directly. A shared policy may be entered
    concurrently by many threads and tasks and nested in itself; each entry lives in its
    own context and remembers the frame of its ``with`` statement, so that entries that
    do not nest (two generators inside ``with bulkhead:``, interleaved in one thread)
    still get their own value back. All policies share one ContextVar: a variable per
    policy would grow every task's context by one entry per policy ever entered
    (``async with timeout(5)`` builds a new policy each time).
    """
    _cm_entries.set((*_cm_entries.get(), (owner, value, sys._getframe(2))))


def cm_pop(owner: object) -> Any:
    """The value of ``owner``'s innermost open entry made by the same ``with`` statement's
    frame (or, failing that, its innermost open entry), forgotten. Call it from
    ``__exit__`` / ``__aexit__`` directly."""
    entries = _cm_entries.get()
    frame = sys._getframe(2)
    found = -1
    for index in range(len(entries) - 1, -1, -1):
        if entries[index][0] is owner:
            if entries[index][2] is frame:
                found = index
                break
            if found < 0:
                found = index
    if found < 0:
        raise RuntimeError("context manager exited without being entered")
    _cm_entries.set(entries[:found] + entries[found + 1 :])
    return entries[found][1]
