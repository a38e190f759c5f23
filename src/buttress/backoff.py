"""Backoff schedules: iterables of delays in seconds.

A backoff is anything iterable that yields delays, so a list such as
``[0.1, 0.5, 2.0]`` works too. Each call being retried takes a fresh iterator.
When the schedule runs out, its last delay repeats.

Jitter spreads retries of many callers apart:

- ``"none"``: the delay as computed;
- ``"full"``: uniformly random between 0 and the delay (the default; best at breaking herds);
- ``"equal"``: half the delay plus a random half.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from ._validate import check_choice, check_number, require_seconds

__all__ = [
    "Constant",
    "Decorrelated",
    "Exponential",
    "Linear",
    "constant",
    "decorrelated",
    "exponential",
    "linear",
]

_JITTERS = ("none", "full", "equal")
_rand = random.random


def _jitter(delay: float, jitter: str) -> float:
    if jitter == "full":
        return delay * _rand()
    if jitter == "equal":
        return delay / 2 + delay / 2 * _rand()
    return delay


@dataclass(frozen=True, slots=True)
class Exponential:
    """``initial * multiplier ** n``, capped at ``max``, then jittered."""

    initial: float
    multiplier: float
    max: float
    jitter: str

    def __iter__(self) -> Iterator[float]:
        delay, cap, multiplier, jitter = self.initial, self.max, self.multiplier, self.jitter
        while True:
            yield _jitter(delay, jitter)
            if delay < cap:
                delay = min(delay * multiplier, cap)


@dataclass(frozen=True, slots=True)
class Constant:
    """The same delay every time."""

    delay: float

    def __iter__(self) -> Iterator[float]:
        delay = self.delay
        while True:
            yield delay


@dataclass(frozen=True, slots=True)
class Linear:
    """``initial + step * n``, capped at ``max``."""

    initial: float
    step: float
    max: float

    def __iter__(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay
            delay = min(delay + self.step, self.max)


@dataclass(frozen=True, slots=True)
class Decorrelated:
    """AWS "decorrelated jitter": ``min(max, uniform(initial, previous * 3))``."""

    initial: float
    max: float

    def __iter__(self) -> Iterator[float]:
        previous = self.initial
        while True:
            upper = max(previous * 3, self.initial)
            previous = min(self.max, self.initial + (upper - self.initial) * _rand())
            yield previous


def exponential(
    initial: float = 0.1, multiplier: float = 2.0, max: float = 10.0, jitter: str = "full"
) -> Exponential:
    """Exponential backoff.

    Args:
        initial: first delay in seconds (default 0.1), before jitter.
        multiplier: growth factor per retry (default 2.0, must be >= 1).
        max: cap on the delay in seconds (default 10.0, must be >= initial).
        jitter: ``"full"`` (default), ``"equal"`` or ``"none"``.
    """
    init = require_seconds("initial", initial, allow_zero=True)
    cap = require_seconds("max", max, allow_zero=True)
    if cap < init:
        raise _range_error("max", max, f"must be >= initial ({initial!r})")
    return Exponential(
        init,
        check_number("multiplier", multiplier, min_value=1.0),
        cap,
        check_choice("jitter", jitter, _JITTERS),
    )


def constant(delay: float) -> Constant:
    """The same ``delay`` seconds before every retry."""
    return Constant(require_seconds("delay", delay, allow_zero=True))


def linear(initial: float, step: float, max: float) -> Linear:
    """``initial``, ``initial + step``, ... up to ``max`` seconds."""
    init = require_seconds("initial", initial, allow_zero=True)
    inc = require_seconds("step", step, allow_zero=True)
    cap = require_seconds("max", max, allow_zero=True)
    if cap < init:
        raise _range_error("max", max, f"must be >= initial ({initial!r})")
    return Linear(init, inc, cap)


def decorrelated(initial: float, max: float) -> Decorrelated:
    """Decorrelated jitter between ``initial`` and ``max`` seconds."""
    init = require_seconds("initial", initial)
    cap = require_seconds("max", max)
    if cap < init:
        raise _range_error("max", max, f"must be >= initial ({initial!r})")
    return Decorrelated(init, cap)


def _range_error(name: str, value: object, rule: str) -> ValueError:
    from .exceptions import ConfigValueError

    return ConfigValueError(f"{name} {rule}, got {value!r}")
