"""Write buttress events to the standard :mod:`logging` module.

Each event becomes one record on the ``buttress`` logger (or the one you give), with a
readable message and structured ``extra`` fields, all prefixed ``buttress_``:

- ``buttress_event``: the event kind (``"retry_scheduled"``, ``"call_rejected"``...);
- ``buttress_primitive`` and ``buttress_name``: the primitive's kind and name;
- every field of the event (``buttress_attempt``, ``buttress_delay``,
  ``buttress_error``, ``buttress_reason``, ``buttress_run_id``, ``buttress_step``...),
  JSON-ready as :meth:`buttress.events.Event.to_dict` makes them; a circuit breaker's
  ``old``/``new`` states are ``buttress_previous_state``/``buttress_state``.

Levels follow each event's :class:`~buttress.events.Severity` (rejections, state
changes, timeouts and failed steps WARNING; retries INFO; waits and saga step
progress DEBUG; failed compensations ERROR), except that a retry giving up is ERROR:
the call failed for good. ``levels=`` overrides any of them by event kind.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from buttress import events as _events
from buttress._validate import check_int
from buttress.exceptions import ConfigTypeError

from ._core import Installation

__all__ = ["DEFAULT_LEVELS", "LoggingListener", "install"]

#: Levels that differ from the event's own severity.
DEFAULT_LEVELS: Mapping[str, int] = {"retry_gave_up": logging.ERROR}

_RENAMED = {"old": "previous_state", "new": "state"}
_SKIPPED = frozenset({"kind", "severity", "source", "name", "time"})

_MESSAGES: dict[str, str] = {
    "retry_scheduled": "attempt {attempt} failed ({error}); retrying in {delay:.3g}s",
    "retry_gave_up": "gave up after {attempts} attempt(s) ({reason} exhausted): {error}",
    "retry_recovered": "succeeded after {attempts} attempts",
    "circuit_state_changed": "circuit {old} -> {new} ({reason})",
    "call_completed": "call ended: {outcome} in {duration:.3g}s",
    "call_rejected": "call rejected ({reason})",
    "acquired_after_wait": "acquired after waiting {waited:.3g}s",
    "timeout_fired": "timed out after {timeout:g}s",
    "abandoned_call_completed": (
        "a call abandoned at its {timeout:g}s timeout ended after {elapsed:.3g}s (error: {error})"
    ),
    "fallback_used": "fallback replaced {error}",
    "hedge_launched": "hedged attempt {attempt} started",
    "backend_degraded": "backend {backend} failed ({error}); running {mode}",
    "backend_recovered": "backend {backend} recovered after {downtime:.3g}s",
    "cache_stale_served": "served a value {age:.3g}s old ({reason})",
    "cache_refresh_failed": "background refresh failed: {error}",
    "chaos_injected": "chaos injected a {mode}",
    "limit_changed": "limit {old} -> {new} ({reason})",
    "run_started": "run {run_id} started",
    "run_replayed": "run {run_id} replayed for key {key!r} ({status})",
    "recovery_skipped": "run {run_id} left for the next recovery: {error}",
    "run_completed": "run {run_id} completed in {duration:.3g}s",
    "run_failed": "run {run_id} failed: {error}",
    "step_started": "run {run_id}: step {step!r} started",
    "step_completed": "run {run_id}: step {step!r} completed after {attempts} attempt(s)",
    "step_retrying": "run {run_id}: step {step!r} attempt {attempt} after: {error}",
    "step_failed": "run {run_id}: step {step!r} failed: {error}",
    "compensation_started": "run {run_id}: compensating step {step!r}",
    "compensation_completed": "run {run_id}: step {step!r} compensated",
    "compensation_failed": "run {run_id}: compensating step {step!r} failed: {error}",
    "run_parked": "run {run_id} parked at step {step!r} (waiting for {waiting_for}, due {wake_at})",
    "signal_sent": "signal {signal!r} sent to run {run_id}",
    "signal_received": "run {run_id}: step {step!r} received signal {signal!r}",
    "wait_expired": "run {run_id}: step {step!r} waited for signal {signal!r} past its deadline",
    "step_heartbeat": "run {run_id}: step {step!r} heartbeat",
    "child_started": "run {run_id}: step {step!r} runs child run {child_run_id}",
    "item_failed": "run {run_id}: item {index} of step {step!r} failed: {error}",
    "run_cancelled": "run {run_id} cancelled: {reason}",
}


def _message(event: _events.Event, fields: Mapping[str, Any]) -> str:
    label = event.source if event.name is None else f"{event.source} {event.name!r}"
    template = _MESSAGES.get(event.kind)
    if template is not None:
        try:
            return f"{label}: {template.format(**fields)}"
        except (KeyError, ValueError, TypeError, IndexError):
            pass  # an event shaped unlike its template (a subclass): fall back
    return f"{label}: {event.kind}"


class LoggingListener:
    """An event listener that logs each event; pass it to ``listeners=`` or ``subscribe``.

    Args:
        logger: a :class:`logging.Logger`, or a logger name (default ``"buttress"``).
        levels: level per event kind, overriding the event's severity and
            :data:`DEFAULT_LEVELS` (e.g. ``{"retry_gave_up": logging.WARNING}``).
        prefix: prefix of the ``extra`` keys (default ``"buttress_"``; it keeps them
            clear of the attributes of :class:`logging.LogRecord`).
    """

    __slots__ = ("levels", "logger", "prefix")

    def __init__(
        self,
        logger: logging.Logger | str | None = None,
        *,
        levels: Mapping[str, int] | None = None,
        prefix: str = "buttress_",
    ) -> None:
        if logger is None or isinstance(logger, str):
            logger = logging.getLogger(logger or "buttress")
        elif not isinstance(logger, logging.Logger):
            # Not a LoggerAdapter either: before Python 3.13 an adapter replaces the
            # record's `extra` with its own, which would drop every structured field.
            raise ConfigTypeError(
                f"logger must be a logging.Logger or a logger name, "
                f"got {logger!r} ({type(logger).__name__})"
            )
        if not isinstance(prefix, str):
            raise ConfigTypeError(f"prefix must be a string, got {prefix!r}")
        merged = dict(DEFAULT_LEVELS)
        if levels is not None:
            if not isinstance(levels, Mapping):
                raise ConfigTypeError(
                    f"levels must be a mapping of event kind to logging level, got {levels!r}"
                )
            for kind, level in levels.items():
                merged[str(kind)] = check_int(f"levels[{kind!r}]", level, min_value=0)
        self.logger = logger
        self.levels: Mapping[str, int] = merged
        self.prefix = prefix

    def level_of(self, event: _events.Event) -> int:
        """The level ``event`` is logged at."""
        return self.levels.get(event.kind, int(event.severity))

    def extra(
        self, event: _events.Event, fields: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The structured fields of ``event``, as passed to ``extra=``."""
        prefix = self.prefix
        if fields is None:
            fields = event.to_dict()
        out: dict[str, Any] = {
            f"{prefix}event": event.kind,
            f"{prefix}primitive": event.source,
            f"{prefix}name": event.name,
        }
        for key, value in fields.items():
            if key not in _SKIPPED:
                out[prefix + _RENAMED.get(key, key)] = value
        return out

    def __call__(self, event: _events.Event) -> None:
        level = self.level_of(event)
        if not self.logger.isEnabledFor(level):
            return  # nothing is built for a level nobody logs
        fields = event.to_dict()
        self.logger.log(level, "%s", _message(event, fields), extra=self.extra(event, fields))

    def __repr__(self) -> str:
        return f"<LoggingListener to {self.logger.name!r}>"


def install(
    logger: logging.Logger | str | None = None,
    *,
    levels: Mapping[str, int] | None = None,
    prefix: str = "buttress_",
) -> Installation:
    """Log every event of every primitive; returns the handle that stops it.

    Takes the arguments of :class:`LoggingListener`::

        handle = buttress.telemetry.logging.install(logging.getLogger("myapp.resilience"))
        ...
        handle.uninstall()  # or use it as a context manager
    """
    listener = LoggingListener(logger, levels=levels, prefix=prefix)
    return Installation(_events.subscribe(listener), f"logging {listener!r}")
