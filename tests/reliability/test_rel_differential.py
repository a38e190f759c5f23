"""Differential tests: buttress against independent implementations.

- Circuit breaker vs pybreaker (consecutive-failure mode): over random sequences of
  successes, failures and clock jumps, with random thresholds and reset timeouts,
  both breakers admit, reject and change state identically, call by call, on both
  faces of ours. (``tests/test_circuit_breaker.py`` has one fixed-seed walk; this one
  lets hypothesis pick the configuration and the walk.)
- Rate limiter vs aiolimiter (a leaky bucket, the same bound as GCRA): on one arrival
  schedule in virtual time, with the same rate and burst, buttress never admits more
  than aiolimiter in any window; on a grid of exactly representable times the two
  make the same decision for every arrival.
"""

from __future__ import annotations

import asyncio
import datetime
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from reliability_support import examples

from buttress import CircuitBreaker, CircuitOpenError, RateLimiter
from buttress.testing import FakeClock

pybreaker = pytest.importorskip("pybreaker")
aiolimiter = pytest.importorskip("aiolimiter")


class Boom(Exception):
    pass


def behaviour(fail: bool) -> str:
    if fail:
        raise Boom("down")
    return "ok"


STEPS = st.lists(
    st.one_of(
        st.booleans().map(lambda fail: ("call", fail)),
        st.integers(1, 12).map(lambda seconds: ("jump", seconds)),
    ),
    min_size=1,
    max_size=120,
)


@examples(150, 3000)
@given(
    fail_max=st.integers(1, 5),
    reset_timeout=st.sampled_from([2, 5, 10]),
    steps=STEPS,
    face=st.sampled_from(["sync", "async"]),
)
def test_breaker_makes_the_same_transitions_as_pybreaker(fail_max, reset_timeout, steps, face):
    """Same admissions, rejections and states as pybreaker, call by call."""
    clock = FakeClock()
    ours = CircuitBreaker(failure_threshold=fail_max, reset_timeout=reset_timeout, clock=clock)
    theirs = pybreaker.CircuitBreaker(
        fail_max=fail_max, reset_timeout=reset_timeout, throw_new_error_on_trip=False
    )
    names = {"closed": "closed", "open": "open", "half-open": "half_open"}
    loop = asyncio.new_event_loop() if face == "async" else None
    if loop is None:
        protected: Any = ours(behaviour)
    else:

        async def async_behaviour(fail: bool) -> str:
            return behaviour(fail)

        wrapped = ours(async_behaviour)

        def protected(fail: bool) -> str:
            return loop.run_until_complete(wrapped(fail))

    def outcome(call: Any, *args: Any) -> str:
        try:
            call(*args)
        except Boom:
            return "failed"
        except (CircuitOpenError, pybreaker.CircuitBreakerError):
            return "rejected"
        return "ok"

    try:
        for kind, value in steps:
            if kind == "jump":
                # Whole seconds: pybreaker reads the wall clock, whose few real
                # milliseconds per example never reach the next second.
                clock.advance(value)
                storage = theirs._state_storage
                if storage.opened_at is not None:
                    storage.opened_at -= datetime.timedelta(seconds=value)
                continue
            assert outcome(protected, value) == outcome(theirs.call, behaviour, value)
            assert ours.state == names[theirs.current_state]
    finally:
        if loop is not None:
            loop.close()


class VirtualLoop:
    """Just enough of an event loop for aiolimiter's non-blocking path: virtual time."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def is_closed(self) -> bool:
        return False


def aiolimiter_admits(limiter: Any) -> bool:
    """aiolimiter's own decision: acquire now if it has capacity, else refuse."""
    if not limiter.has_capacity():
        return False
    coroutine = limiter.acquire()
    try:
        coroutine.send(None)
    except StopIteration:
        return True
    coroutine.close()  # pragma: no cover - it had capacity, so it never suspends
    raise AssertionError("aiolimiter suspended although it had capacity")


def run_both(rate: float, burst: int, arrivals: list[float]) -> tuple[list[bool], list[bool]]:
    clock = FakeClock()
    ours = RateLimiter(rate=rate, burst=burst, clock=clock)
    theirs = aiolimiter.AsyncLimiter(max_rate=burst, time_period=burst / rate)
    loop = VirtualLoop()
    theirs._event_loop = loop
    mine, other = [], []
    for when in arrivals:
        clock.advance(when - clock.now())
        loop.now = when
        mine.append(ours.try_acquire())
        other.append(aiolimiter_admits(theirs))
    return mine, other


def per_window(arrivals: list[float], admitted: list[bool], width: float) -> dict[int, int]:
    counts: dict[int, int] = {}
    for when, ok in zip(arrivals, admitted, strict=True):
        if ok:
            counts[math.floor(when / width)] = counts.get(math.floor(when / width), 0) + 1
    return counts


GRID = 1 / 64


@examples(200, 4000)
@given(
    rate=st.sampled_from([1, 2, 4, 8, 16, 32]),
    burst=st.integers(1, 8),
    gaps=st.lists(st.integers(0, 40), min_size=1, max_size=300),
)
def test_limiter_decides_like_aiolimiter_on_exact_times(rate, burst, gaps):
    """Arrivals on a 1/64 s grid, rates that are powers of two: identical decisions."""
    arrivals = []
    now = 0.0
    for gap in gaps:
        now += gap * GRID
        arrivals.append(now)
    mine, theirs = run_both(rate, burst, arrivals)
    assert mine == theirs


@examples(200, 4000)
@given(
    rate=st.floats(0.5, 200.0),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=300),
    width=st.sampled_from([0.1, 1.0, 5.0]),
)
def test_limiter_never_admits_more_than_aiolimiter_per_window(rate, burst, gaps, width):
    """Any rate, burst and arrival times: per window, never more than aiolimiter admits
    (one more at most, from float rounding at a boundary) nor more than the bound."""
    arrivals = []
    now = 0.0
    for gap in gaps:
        now += gap
        arrivals.append(now)
    mine, theirs = run_both(rate, burst, arrivals)
    ours_counts = per_window(arrivals, mine, width)
    their_counts = per_window(arrivals, theirs, width)
    for window, count in ours_counts.items():
        assert count <= their_counts.get(window, 0) + 1, (window, count, their_counts)
        assert count <= burst + rate * width + 1e-6
    assert abs(sum(mine) - sum(theirs)) <= 1
