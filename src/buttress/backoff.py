"""Backoff schedules: iterables of delays in seconds.

A backoff is anything iterable that yields delays, so a list such as
``[0.1, 0.5, 2.0]`` works too. Each call being retried takes a fresh iterator.
When the schedule runs out, its last delay repeats.

Jitter spreads retries of many callers apart:

- ``"none"``: the delay as computed;
- ``"full"``: uniformly random between 0 and the delay (the default; best at breaking herds);
- ``"equal"``: half the delay plus a random half.

A floor (``min=``) keeps jittered delays from falling near zero: the jitter then
applies to the part of each delay above the floor. Schedules add up: ``a + b`` waits
the sum of their delays, step by step (``backoff.constant(1) + backoff.random(0, 0.5)``).
"""

from __future__ import annotations

import random as _random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

from ._validate import check_choice, check_number, require_seconds

__all__ = [
    "Constant",
    "Decorrelated",
    "Exponential",
    "Fibonacci",
    "Linear",
    "Random",
    "Schedule",
    "Sum",
    "constant",
    "decorrelated",
    "exponential",
    "fibonacci",
    "linear",
    "random",
]

_JITTERS = ("none", "full", "equal")
_rand = _random.random


def _jitter(delay: float, jitter: str, floor: float = 0.0) -> float:
    """``delay`` jittered above ``floor`` (which it never goes below)."""
    if jitter == "full":
        return floor + (delay - floor) * _rand()
    if jitter == "equal":
        half = (delay - floor) / 2
        return floor + half + half * _rand()
    return delay


class Schedule:
    """Base of the backoff schedules: iterable delays in seconds that add up with ``+``.

    ``a + b`` is a :class:`Sum`: its n-th delay is the n-th delay of ``a`` plus the
    n-th of ``b`` (a finite operand's last delay repeats, as it does for ``retry``).
    The other operand may be a schedule, a list or tuple of delays, or a number of
    seconds (a constant offset).
    """

    __slots__ = ()

    def __iter__(self) -> Iterator[float]:  # pragma: no cover - every schedule overrides it
        raise NotImplementedError

    def __add__(self, other: Iterable[float] | float | timedelta) -> Sum:
        return Sum((self, _operand(other)))

    def __radd__(self, other: Iterable[float] | float | timedelta) -> Sum:
        return Sum((_operand(other), self))


def _operand(other: object) -> Iterable[float]:
    if isinstance(other, Schedule):
        return other
    if isinstance(other, (list, tuple)):
        if not other:
            raise _range_error(
                "a list of delays added to a schedule", other, "must hold at least one"
            )
        return tuple(
            require_seconds(f"delay[{i}]", d, allow_zero=True) for i, d in enumerate(other)
        )
    if isinstance(other, (int, float, timedelta)) and not isinstance(other, bool):
        return Constant(require_seconds("delay", other, allow_zero=True))
    raise _type_error(
        f"a backoff schedule adds up with another schedule, a list or tuple of delays or a "
        f"number of seconds, got {other!r} ({type(other).__name__})"
    )


@dataclass(frozen=True, slots=True)
class Sum(Schedule):
    """The step-by-step sum of several schedules (build it with ``a + b``)."""

    parts: tuple[Iterable[float], ...]

    def __add__(self, other: Iterable[float] | float | timedelta) -> Sum:
        return Sum((*self.parts, _operand(other)))

    def __iter__(self) -> Iterator[float]:
        iterators = [iter(part) for part in self.parts]
        last = [0.0] * len(iterators)
        while True:
            total = 0.0
            for index, iterator in enumerate(iterators):
                delay = next(iterator, None)
                if delay is None:  # a finite part ran out: its last delay repeats
                    delay = last[index]
                last[index] = delay
                total += delay
            yield total


@dataclass(frozen=True, slots=True)
class Exponential(Schedule):
    """``initial * multiplier ** n``, capped at ``max``, then jittered above ``min``."""

    initial: float
    multiplier: float
    max: float
    jitter: str
    min: float = 0.0

    def __iter__(self) -> Iterator[float]:
        delay, cap, multiplier, jitter = self.initial, self.max, self.multiplier, self.jitter
        floor = self.min
        while True:
            yield _jitter(delay, jitter, floor)
            if delay < cap:
                delay = min(delay * multiplier, cap)


@dataclass(frozen=True, slots=True)
class Fibonacci(Schedule):
    """``initial`` times the Fibonacci numbers (1, 1, 2, 3, 5...), capped at ``max``,
    then jittered above ``min``."""

    initial: float
    max: float
    jitter: str
    min: float = 0.0

    def __iter__(self) -> Iterator[float]:
        previous, delay, cap, jitter, floor = 0.0, self.initial, self.max, self.jitter, self.min
        while True:
            yield _jitter(delay, jitter, floor)
            if delay < cap:
                previous, delay = delay, min(previous + delay, cap)


@dataclass(frozen=True, slots=True)
class Random(Schedule):
    """Uniformly random delays between ``min`` and ``max``."""

    min: float
    max: float

    def __iter__(self) -> Iterator[float]:
        low, span = self.min, self.max - self.min
        while True:
            yield low + span * _rand()


@dataclass(frozen=True, slots=True)
class Constant(Schedule):
    """The same delay every time."""

    delay: float

    def __iter__(self) -> Iterator[float]:
        delay = self.delay
        while True:
            yield delay


@dataclass(frozen=True, slots=True)
class Linear(Schedule):
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
class Decorrelated(Schedule):
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
    initial: float | timedelta = 0.1,
    multiplier: float = 2.0,
    max: float | timedelta = 10.0,
    jitter: str = "full",
    *,
    min: float | timedelta = 0.0,
) -> Exponential:
    """Exponential backoff.

    Args:
        initial: first delay in seconds (default 0.1), before jitter.
        multiplier: growth factor per retry (default 2.0, must be >= 1).
        max: cap on the delay in seconds (default 10.0, must be >= initial).
        jitter: ``"full"`` (default), ``"equal"`` or ``"none"``.
        min: floor in seconds that jitter never goes below (default 0, at most
            ``initial``): full jitter draws from ``[min, delay]``.
    """
    init, cap, floor = _bounds(initial, max, min)
    return Exponential(
        init,
        check_number("multiplier", multiplier, min_value=1.0),
        cap,
        check_choice("jitter", jitter, _JITTERS),
        floor,
    )


def fibonacci(
    initial: float | timedelta = 0.1,
    max: float | timedelta = 10.0,
    jitter: str = "full",
    *,
    min: float | timedelta = 0.0,
) -> Fibonacci:
    """Fibonacci backoff: ``initial``, ``initial``, ``2 * initial``, ``3 * initial``,
    ``5 * initial``... (gentler growth than doubling).

    Args:
        initial: first delay in seconds (default 0.1), before jitter.
        max: cap on the delay in seconds (default 10.0, must be >= initial).
        jitter: ``"full"`` (default), ``"equal"`` or ``"none"``.
        min: floor in seconds that jitter never goes below (default 0, at most ``initial``).
    """
    init, cap, floor = _bounds(initial, max, min)
    return Fibonacci(init, cap, check_choice("jitter", jitter, _JITTERS), floor)


def random(min: float | timedelta, max: float | timedelta) -> Random:
    """Uniformly random delays between ``min`` and ``max`` seconds (``max >= min``)."""
    low = require_seconds("min", min, allow_zero=True)
    high = require_seconds("max", max, allow_zero=True)
    if high < low:
        raise _range_error("max", max, f"must be >= min ({min!r})")
    return Random(low, high)


def _bounds(
    initial: float | timedelta, max: float | timedelta, min: float | timedelta
) -> tuple[float, float, float]:
    init = require_seconds("initial", initial, allow_zero=True)
    cap = require_seconds("max", max, allow_zero=True)
    floor = require_seconds("min", min, allow_zero=True)
    if cap < init:
        raise _range_error("max", max, f"must be >= initial ({initial!r})")
    if floor > init:
        raise _range_error("min", min, f"must be <= initial ({initial!r})")
    return init, cap, floor


def constant(delay: float | timedelta) -> Constant:
    """The same ``delay`` seconds before every retry."""
    return Constant(require_seconds("delay", delay, allow_zero=True))


def linear(initial: float | timedelta, step: float | timedelta, max: float | timedelta) -> Linear:
    """``initial``, ``initial + step``, ... up to ``max`` seconds."""
    init = require_seconds("initial", initial, allow_zero=True)
    inc = require_seconds("step", step, allow_zero=True)
    cap = require_seconds("max", max, allow_zero=True)
    if cap < init:
        raise _range_error("max", max, f"must be >= initial ({initial!r})")
    return Linear(init, inc, cap)


def decorrelated(initial: float | timedelta, max: float | timedelta) -> Decorrelated:
    """Decorrelated jitter between ``initial`` and ``max`` seconds."""
    init = require_seconds("initial", initial)
    cap = require_seconds("max", max)
    if cap < init:
        raise _range_error("max", max, f"must be >= initial ({initial!r})")
    return Decorrelated(init, cap)


def _range_error(name: str, value: object, rule: str) -> ValueError:
    from .exceptions import ConfigValueError

    return ConfigValueError(f"{name} {rule}, got {value!r}")


def _type_error(message: str) -> TypeError:
    from .exceptions import ConfigTypeError

    return ConfigTypeError(message)
