"""The call-level hook (:class:`Measured`) and the handle every ``install()`` returns.

Events say what the primitives decided; only a policy around the whole call can say
how the call ended and how long it took. :class:`Measured` is that policy: put it
outermost in a pipeline and each call is timed and reported to every installed
metrics backend. ``otel.traced`` extends it with a span per call.

Whatever telemetry does, the protected call behaves exactly as without it: the hook
re-raises the call's own exception object, and a failure inside the hook (a broken
backend, a broken exporter) is logged on the ``buttress.telemetry`` logger and
swallowed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from buttress._drivers import guard_async, guard_sync
from buttress._policy import ExcType, Policy, Traceback, cm_pop, cm_push
from buttress._validate import check_name
from buttress.clock import Clock
from buttress.exceptions import ConfigTypeError, RejectedError

from . import _metrics

__all__ = ["Installation", "Measured", "measured", "outcome_of"]

_log = logging.getLogger("buttress.telemetry")


class Installation:
    """What ``install()``/``instrument()`` return: undo it with :meth:`uninstall`.

    Also a context manager (uninstalls on exit) and a callable (calling it uninstalls),
    like the function :func:`buttress.events.subscribe` returns.
    """

    __slots__ = ("_close", "_label", "_lock")

    def __init__(self, close: Callable[[], None], label: str) -> None:
        self._close: Callable[[], None] | None = close
        self._label = label
        self._lock = threading.Lock()

    @property
    def installed(self) -> bool:
        """False once uninstalled."""
        return self._close is not None

    def uninstall(self) -> None:
        """Stop sending telemetry; calling it again does nothing."""
        with self._lock:
            close, self._close = self._close, None
        if close is not None:
            close()

    def __call__(self) -> None:
        self.uninstall()

    def __enter__(self) -> Installation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    def __repr__(self) -> str:
        state = "installed" if self.installed else "uninstalled"
        return f"<Installation {self._label} ({state})>"


def outcome_of(error: BaseException | None) -> str:
    """``"success"``, ``"rejected"`` (the call never ran), ``"failure"`` or ``"cancelled"``."""
    if error is None:
        return "success"
    if isinstance(error, RejectedError):
        return "rejected"
    if isinstance(error, Exception):
        return "failure"
    return "cancelled"  # CancelledError, KeyboardInterrupt, SystemExit


class Measured(Policy):
    """Time each call and report it to the installed metrics backends.

    Build it with :func:`measured`. Subclasses extend :meth:`_begin` and :meth:`_end`,
    which never raise.
    """

    kind = "measured"

    def __init__(self, name: str, *, clock: Clock | None = None) -> None:
        checked = check_name(name)
        if checked is None:
            raise ConfigTypeError(f"{type(self).__name__} needs a name, got None")
        # The name labels the metrics (and names the span); it does not register the
        # policy: a measured call is not a primitive with state of its own.
        super().__init__(clock=clock)
        self.name: str = checked

    # -- the hook -----------------------------------------------------------------------------

    def _begin(self) -> Any:
        """Called before the call; returns what :meth:`_end` gets back."""
        if not _metrics.sinks.items:
            return None
        try:
            return self._clock.now()
        except Exception:
            _log.exception("buttress telemetry: %r could not start measuring", self)
            return None

    def _end(self, state: Any, error: BaseException | None) -> None:
        """Called after the call, with its exception (``None`` when it returned)."""
        if state is None:
            return
        try:
            duration = max(self._clock.now() - state, 0.0)
            measurements = _metrics.call_measurements(self.name, outcome_of(error), duration, error)
        except Exception:
            _log.exception("buttress telemetry: %r could not finish measuring", self)
            return
        _metrics.deliver(measurements)

    # -- decoration ---------------------------------------------------------------------------

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return guard_sync(fn, self._begin, self._end)

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return guard_async(fn, self._begin, self._end)

    # -- guarding a block ---------------------------------------------------------------------

    def __enter__(self) -> Measured:
        cm_push(self, self._begin())
        return self

    def __exit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        self._end(cm_pop(self), exc)

    async def __aenter__(self) -> Measured:
        return self.__enter__()

    async def __aexit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        self.__exit__(exc_type, exc, tb)

    def snapshot(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name}


def measured(name: str, *, clock: Clock | None = None) -> Measured:
    """Report each call's outcome and duration to the installed metrics backends.

    Put it outermost in a pipeline (``pipeline(measured("payments"), retry(...), ...)``)
    so the duration covers retries and waits. Metrics flow once a backend is installed
    (``buttress.telemetry.otel.instrument()``, ``buttress.telemetry.prometheus.instrument()``);
    until then the policy only costs a check per call.

    Args:
        name: the ``name`` label of the ``buttress.calls``, ``buttress.failures`` and
            ``buttress.call.duration`` metrics.
        clock: time source for durations (default: the system clock).
    """
    return Measured(name, clock=clock)
