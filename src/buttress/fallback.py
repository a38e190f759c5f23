"""Fallback: answer with a value (or a handler's answer) instead of raising.

Only exceptions matching ``on`` are replaced. Cancellation, ``KeyboardInterrupt``
and ``SystemExit`` are never swallowed, whatever ``on`` says.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import events as _events
from ._drivers import substitute_async, substitute_sync
from ._policy import ExcType, Policy, PolicyOptions, Traceback, cm_pop, cm_push
from ._validate import ExceptionFilter, check_callable, check_exception_filter
from .exceptions import ConfigValueError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Fallback", "FallbackOutcome", "fallback"]

_MISSING: Any = object()

# What on= accepts, as for retry: an exception class, a predicate, or a tuple or list mixing them.
_Matcher = type[BaseException] | Callable[[BaseException], object]
_ExceptionSpec = _Matcher | tuple[_Matcher, ...] | list[_Matcher]


class FallbackOutcome:
    """What ``with fallback(...) as outcome:`` yields: set ``outcome.value`` inside the block.

    If the block raises a matching exception, ``value`` becomes the fallback value
    and ``error`` holds the exception.
    """

    __slots__ = ("error", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None


class Fallback(Policy):
    """Return ``value`` (or ``handler(exc)``) instead of raising an exception matching ``on``.

    Args:
        value: the replacement value.
        handler: instead of ``value``, a function of the exception; for async functions
            it may be async too.
        on: what to replace: an exception class, a predicate ``exc -> bool``, or a tuple
            or list mixing them, as retry's ``on`` (default ``Exception``).

    It also takes the options every primitive takes: ``name``, ``listeners``,
    ``registry`` and ``clock`` (see "Every primitive" on the options page).
    """

    kind = "fallback"

    def __init__(
        self,
        value: Any = _MISSING,
        *,
        handler: Callable[[BaseException], Any] | None = None,
        on: _ExceptionSpec = Exception,
        name: str | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(name=name, **options)
        if (value is _MISSING) == (handler is None):
            raise ConfigValueError(
                f"fallback needs exactly one of value= or handler=, got value={value!r} "
                f"and handler={handler!r}"
                if value is not _MISSING
                else "fallback needs exactly one of value= or handler=, got neither"
            )
        self.value = None if value is _MISSING else value
        self.handler = check_callable("handler", handler, allow_none=True)
        self.on: ExceptionFilter = check_exception_filter("on", on)
        self._used = 0
        self._lock = threading.Lock()
        self._register()

    def _matches(self, exc: BaseException) -> bool:
        return isinstance(exc, Exception) and self.on(exc)

    def _replacement(self, exc: BaseException) -> Any:
        with self._lock:
            self._used += 1
        self.emit(_events.FallbackUsed, error=exc)
        if self.handler is None:
            return self.value
        return self.handler(exc)

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return substitute_sync(fn, self._matches, self._replacement)

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return substitute_async(fn, self._matches, self._replacement)

    def __enter__(self) -> FallbackOutcome:
        outcome = FallbackOutcome()
        cm_push(self, outcome)
        return outcome

    def __exit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> bool:
        outcome: FallbackOutcome = cm_pop(self)
        if exc is None or not self._matches(exc):
            return False
        outcome.error = exc
        outcome.value = self._replacement(exc)
        return True

    async def __aenter__(self) -> FallbackOutcome:
        return self.__enter__()

    async def __aexit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> bool:
        return self.__exit__(exc_type, exc, tb)

    def snapshot(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "used": self._used}


fallback = Fallback
"""``fallback(value)`` or ``fallback(handler=...)``: the same as :class:`Fallback`."""
