"""Retry and timeout against small reference models, on a fake clock.

Retry: for any attempt count, backoff list, deadline and sequence of outcomes (results,
results rejected by ``retry_if_result``, retryable errors with or without
``retry_after``, fatal errors, each taking some time), the number of attempts, the
exact sleeps, the time spent and the final outcome equal the model's, on both faces.

Timeout: nested timeouts report the right ``remaining()`` and a call either returns
before its deadline or ends in ``TimeoutExceeded`` at it (async: cut off exactly at
the deadline; sync: the late result is discarded).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from reliability_support import examples

import buttress
from buttress import RetryExhausted, TimeoutExceeded, backoff, retry, timeout
from buttress.testing import FakeClock

DELAYS = st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0])
DURATIONS = st.sampled_from([0.0, 0.25, 1.0])


class Transient(ConnectionError):
    def __init__(self, retry_after: float | None) -> None:
        super().__init__("transient")
        self.retry_after = retry_after


class Fatal(KeyError):
    pass


@dataclass(frozen=True)
class Outcome:
    kind: str  # "ok", "again" (rejected result), "transient", "fatal"
    duration: float
    retry_after: float | None = None


OUTCOMES = st.builds(
    Outcome,
    kind=st.sampled_from(["ok", "again", "transient", "transient", "fatal"]),
    duration=DURATIONS,
    retry_after=st.one_of(st.none(), st.sampled_from([0.5, 3.0])),
)


def model(
    attempts: int, delays: list[float], deadline: float | None, outcomes: list[Outcome]
) -> tuple[str, int, list[float], float]:
    """``(final kind, attempts made, non-zero sleeps, time spent)``."""
    now, attempt, sleeps, schedule, last = 0.0, 1, [], iter(delays), 0.0
    while True:
        outcome = outcomes[attempt - 1] if attempt <= len(outcomes) else Outcome("ok", 0.0)
        now += outcome.duration
        if outcome.kind in ("ok", "fatal") or attempt >= attempts:
            return outcome.kind, attempt, sleeps, now
        delay = next(schedule, last)
        last = delay
        if outcome.kind == "transient" and outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
        if deadline is not None and delay >= deadline - now:
            return outcome.kind, attempt, sleeps, now
        if delay > 0:
            sleeps.append(delay)
        now += delay
        attempt += 1


@examples(300, 5000)
@given(
    attempts=st.integers(1, 6),
    delays=st.lists(DELAYS, min_size=1, max_size=4),
    deadline=st.one_of(st.none(), st.sampled_from([0.75, 2.0, 5.0])),
    outcomes=st.lists(OUTCOMES, max_size=7),
    face=st.sampled_from(["sync", "async"]),
)
def test_retry_matches_the_model(attempts, delays, deadline, outcomes, face):
    """Attempts, sleeps, elapsed time and outcome are exactly the model's."""
    clock = FakeClock()
    policy = retry(
        attempts,
        on=ConnectionError,
        backoff=delays,
        deadline=deadline,
        retry_if_result=lambda result: result == "again",
        clock=clock,
    )
    made = 0

    def behave() -> str:
        nonlocal made
        made += 1
        outcome = outcomes[made - 1] if made <= len(outcomes) else Outcome("ok", 0.0)
        clock.advance(outcome.duration)
        if outcome.kind == "transient":
            raise Transient(outcome.retry_after)
        if outcome.kind == "fatal":
            raise Fatal("fatal")
        return outcome.kind

    if face == "sync":
        call = policy(behave)
    else:

        async def async_behave() -> str:
            return behave()

        protected = policy(async_behave)

        def call() -> str:
            return asyncio.run(protected())

    kind, expected_attempts, sleeps, spent = model(attempts, delays, deadline, outcomes)
    expected: dict[str, Any] = {
        "ok": None,
        "again": RetryExhausted,
        "transient": Transient,
        "fatal": Fatal,
    }
    if kind == "ok":
        assert call() == "ok"
    else:
        with pytest.raises(expected[kind]) as info:
            call()
        if kind == "again":
            assert info.value.attempts == expected_attempts
    assert made == expected_attempts
    assert clock.sleeps == sleeps
    assert clock.now() == pytest.approx(spent)


@examples(100, 2000)
@given(
    initial=st.sampled_from([0.0, 0.125, 0.5, 1.0]),
    multiplier=st.sampled_from([1.0, 1.5, 2.0, 3.0]),
    cap=st.sampled_from([1.0, 4.0, 10.0]),
    attempts=st.integers(1, 10),
)
def test_exponential_schedule_without_jitter_matches_the_formula(
    initial, multiplier, cap, attempts
):
    """Every sleep is ``min(initial * multiplier**n, cap)``."""
    clock = FakeClock()
    policy = retry(
        attempts,
        backoff=backoff.exponential(initial, multiplier, max(cap, initial), "none"),
        clock=clock,
    )
    with pytest.raises(ConnectionError):
        policy(lambda: (_ for _ in ()).throw(ConnectionError()))()
    expected = [min(initial * multiplier**n, max(cap, initial)) for n in range(attempts - 1)]
    assert clock.sleeps == pytest.approx([d for d in expected if d > 0])


@examples(150, 3000)
@given(
    outer=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    inner=st.sampled_from([0.25, 1.5, 3.0]),
    work=st.sampled_from([0.125, 0.75, 1.25, 2.5, 3.5, 5.0]),
)
def test_nested_async_timeouts_cut_at_the_nearest_deadline(outer, inner, work):
    """The call ends at min(outer, inner, work), with TimeoutExceeded unless work won."""
    clock = FakeClock()
    seen: list[float | None] = []

    async def main() -> str:
        async with timeout(outer, clock=clock), timeout(inner, clock=clock):
            seen.append(buttress.remaining())
            await clock.asleep(work)
            return "done"

    limit = min(outer, inner)
    if work < limit:
        assert asyncio.run(main()) == "done"
        assert clock.now() == work
    else:
        with pytest.raises(TimeoutExceeded):
            asyncio.run(main())
        assert clock.now() == limit
    assert seen == [limit]


@examples(100, 2000)
@given(limit=st.sampled_from([0.5, 1.0, 2.0]), work=st.sampled_from([0.25, 1.0, 1.5, 3.0]))
def test_sync_timeout_discards_a_late_result(limit, work):
    """Sync: the call runs to completion; a result later than the deadline is discarded."""
    clock = FakeClock()

    @timeout(limit, clock=clock)
    def slow() -> str:
        assert buttress.remaining() == limit
        clock.advance(work)
        return "late" if work > limit else "in time"

    if work > limit:
        with pytest.raises(TimeoutExceeded):
            slow()
    else:
        assert slow() == "in time"
    assert buttress.remaining() is None
