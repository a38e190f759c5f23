"""The circuit breaker against a reference model, over random interleavings.

A hypothesis state machine starts calls, ends them (success, failure, slow success,
excluded error, rejection by an inner primitive, cancellation) in any order, jumps the
fake clock, and uses the operator controls; after every step the breaker's state and
every counter it reports must equal those of the small model below, which is written
from the documentation, not from the implementation. Two faces are exercised: the
async decorator (its lock-free fast path included) and the sync context manager, with
each in-flight call entered in its own context.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)
from reliability_support import MODE, examples, scaled

from buttress import BulkheadFull, CircuitBreaker, CircuitOpenError
from buttress.testing import FakeClock


class Boom(Exception):
    """A failure the breaker counts."""


class Ignored(Exception):
    """Listed in ``exclude``: neutral."""


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


# What the machines did, for the figures report (see test_record_figures).
STATS: collections.Counter[str] = collections.Counter()


@dataclass
class Model:
    """The documented behaviour of a circuit breaker, and nothing else."""

    threshold: int
    reset_timeout: float
    max_probes: int
    rate: float | None
    window: int
    minimum_calls: int
    slow: float | None
    state: str = CLOSED
    generation: int = 0
    opened_at: float = 0.0
    forced: bool = False
    probes: int = 0
    streak: int = 0
    ring: deque[bool] = field(default_factory=deque)
    successes: int = 0
    failures: int = 0
    slow_calls: int = 0
    neutral: int = 0
    rejections: int = 0

    def __post_init__(self) -> None:
        self.ring = deque(maxlen=self.window)

    def visible(self, now: float) -> str:
        if self.state == OPEN and not self.forced and now - self.opened_at >= self.reset_timeout:
            return HALF_OPEN
        return self.state

    def move(self, new: str, now: float) -> None:
        if new == self.state:
            return
        self.state = new
        self.generation += 1
        self.probes = 0
        if new == OPEN:
            self.opened_at = now
        if new == CLOSED:
            self.streak = 0
            self.ring.clear()
            self.forced = False

    def admit(self, now: float) -> tuple[int | None, float | None]:
        """``(token, None)`` when admitted, ``(None, retry_after)`` when rejected."""
        if self.state == OPEN:
            elapsed = now - self.opened_at
            if self.forced or elapsed < self.reset_timeout:
                self.rejections += 1
                return None, (None if self.forced else self.reset_timeout - elapsed)
            self.move(HALF_OPEN, now)
        if self.state == CLOSED:
            return self.generation, None
        if self.probes < self.max_probes:
            self.probes += 1
            return self.generation, None
        self.rejections += 1
        return None, None

    def end(self, token: int, outcome: str, now: float, duration: float) -> None:
        if outcome == "success" and self.slow is not None and duration >= self.slow:
            outcome = "slow"
        if outcome in ("excluded", "inner_rejection", "cancelled"):
            self.neutral += 1
            if self.state == HALF_OPEN and token == self.generation and self.probes > 0:
                self.probes -= 1
            return
        failed = outcome != "success"
        if failed:
            self.failures += 1
            if outcome == "slow":
                self.slow_calls += 1
        else:
            self.successes += 1
        if token != self.generation or self.forced:
            return  # the state moved on while the call ran
        if self.state == CLOSED:
            if self.rate is not None:
                self.ring.append(failed)
                if len(self.ring) >= self.minimum_calls and sum(self.ring) >= self.rate * len(
                    self.ring
                ):
                    self.move(OPEN, now)
            elif failed:
                self.streak += 1
                if self.streak >= self.threshold:
                    self.move(OPEN, now)
            else:
                self.streak = 0
        elif self.state == HALF_OPEN:
            self.move(OPEN if failed else CLOSED, now)


@dataclass
class Call:
    token: int
    started: float
    gate: Any = None  # async: the future the protected function awaits
    task: Any = None
    context: Any = None  # sync: the context the call was entered in


EXCEPTIONS: dict[str, BaseException] = {
    "failure": Boom("down"),
    "excluded": Ignored("not our business"),
    "inner_rejection": BulkheadFull("inner bulkhead full"),
    "cancelled": asyncio.CancelledError(),
}


class BreakerMachine(RuleBasedStateMachine):
    """Random calls, outcomes, clock jumps and operator actions against the model."""

    face = "async"

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(autojump=False)
        self.loop = asyncio.new_event_loop()
        self.next_id = 0
        self.breaker: CircuitBreaker
        self.model: Model
        self.protected: Any = None

    calls = Bundle("calls")

    @initialize(
        threshold=st.integers(1, 4),
        reset_timeout=st.sampled_from([1.0, 2.5, 5.0]),
        probes=st.integers(1, 3),
        rate=st.one_of(st.none(), st.sampled_from([0.25, 0.5, 0.75, 1.0])),
        window=st.integers(2, 6),
        minimum_calls=st.integers(1, 6),
        slow=st.one_of(st.none(), st.sampled_from([1.0, 3.0])),
    )
    def build(self, *, threshold, reset_timeout, probes, rate, window, minimum_calls, slow):
        STATS["examples"] += 1
        minimum_calls = min(minimum_calls, window)
        self.model = Model(threshold, reset_timeout, probes, rate, window, minimum_calls, slow)
        self.breaker = CircuitBreaker(
            failure_threshold=threshold,
            reset_timeout=reset_timeout,
            half_open_max_calls=probes,
            failure_rate=rate,
            window=window,
            minimum_calls=minimum_calls,
            slow_call_duration=slow,
            exclude=Ignored,
            clock=self.clock,
        )

        async def dependency(gate: asyncio.Future[None]) -> str:
            await gate
            return "ok"

        self.protected = self.breaker(dependency)

    def teardown(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.drain()
        self.loop.close()

    def drain(self) -> None:
        async def spin() -> None:
            for _ in range(8):
                await asyncio.sleep(0)

        self.loop.run_until_complete(spin())

    # -- rules ------------------------------------------------------------------------------

    @rule(target=calls, count=st.integers(1, 3))
    def start_calls(self, count):
        started = [self.start_call() for _ in range(count)]
        return multiple(*[call for call in started if call is not None])

    def start_call(self) -> Call | None:
        STATS["calls"] += 1
        now = self.clock.now()
        token, retry_after = self.model.admit(now)
        if self.face == "async":
            gate = self.loop.create_future()
            task = self.loop.create_task(self.protected(gate))
            self.drain()
            admitted = not task.done()
            if not admitted:
                with pytest.raises(CircuitOpenError) as info:
                    task.result()
                error = info.value
            call = Call(token or 0, now, gate=gate, task=task)
        else:
            context = contextvars.copy_context()
            try:
                context.run(self.breaker.__enter__)
            except CircuitOpenError as exc:
                admitted, error = False, exc
            else:
                admitted = True
            call = Call(token or 0, now, context=context)
        assert admitted == (token is not None), (admitted, self.model)
        if not admitted:
            assert error.retry_after == pytest.approx(retry_after)
            return None
        return call

    @rule(
        call=consumes(calls),
        outcome=st.sampled_from(["success", "failure", "excluded", "inner_rejection", "cancelled"]),
    )
    def end_call(self, call, outcome):
        STATS[f"ended_{outcome}"] += 1
        now = self.clock.now()
        self.model.end(call.token, outcome, now, now - call.started)
        if self.face == "async":
            if outcome == "success":
                call.gate.set_result(None)
            elif outcome == "cancelled":
                call.task.cancel()
            else:
                call.gate.set_exception(EXCEPTIONS[outcome])
            self.drain()
            assert call.task.done()
            if outcome == "success":
                assert call.task.result() == "ok"
            elif outcome == "cancelled":
                assert call.task.cancelled()
            else:
                assert call.task.exception() is EXCEPTIONS[outcome]
        else:
            exc = None if outcome == "success" else EXCEPTIONS[outcome]
            call.context.run(self.breaker.__exit__, None if exc is None else type(exc), exc, None)

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 2.5, 5.0, 30.0]))
    def jump(self, seconds):
        STATS["clock_jumps"] += 1
        self.clock.advance(seconds)

    @rule(action=st.sampled_from(["open", "close", "none", "none", "none", "none"]))
    def operator(self, action):
        if action == "open":
            self.breaker.open()
            self.model.move(OPEN, self.clock.now())
            self.model.forced = True
        elif action == "close" and self.model.state != CLOSED:
            # On a breaker that is already closed, close() keeps the failure streak (see
            # test_close_forgets_the_streak_of_a_closed_breaker); the model covers the rest.
            self.breaker.close()
            self.model.forced = False
            self.model.move(CLOSED, self.clock.now())

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self):
        model = getattr(self, "model", None)
        if model is None:
            return
        STATS["checks"] += 1
        now = self.clock.now()
        snap = self.breaker.snapshot()
        assert self.breaker.state == model.visible(now)
        assert snap["state"] == model.visible(now)
        assert snap["forced"] == model.forced
        assert snap["successes"] == model.successes
        assert snap["failures"] == model.failures
        assert snap["slow_calls"] == model.slow_calls
        assert snap["neutral"] == model.neutral
        assert snap["rejections"] == model.rejections
        assert snap["half_open_probes"] == (model.probes if model.state == HALF_OPEN else 0)
        if model.rate is None:
            assert snap["consecutive_failures"] == model.streak
        else:
            assert snap["window_calls"] == len(model.ring)


class SyncBreakerMachine(BreakerMachine):
    face = "sync"


TestBreakerAsyncFace = BreakerMachine.TestCase
TestBreakerAsyncFace.settings = examples(60, 1000, stateful_step_count=scaled(40, 80))
TestBreakerSyncFace = SyncBreakerMachine.TestCase
TestBreakerSyncFace.settings = examples(60, 1000, stateful_step_count=scaled(40, 80))


@pytest.mark.parametrize("operation", ["close", "reset"])
def test_close_forgets_the_streak_of_a_closed_breaker(operation):
    """close() ("forget the recent outcomes") and reset() ("zero every counter") on a
    closed breaker: the next failures start a new streak."""
    breaker = CircuitBreaker(failure_threshold=3, clock=FakeClock())

    @breaker
    def failing() -> None:
        raise Boom

    for _ in range(2):
        with pytest.raises(Boom):
            failing()
    getattr(breaker, operation)()
    assert breaker.snapshot()["consecutive_failures"] == 0
    with pytest.raises(Boom):
        failing()
    assert breaker.state == CLOSED


def test_record_figures(figures):
    """Record how many examples, steps and calls the machines above ran."""
    figures.add("breaker_model", mode=MODE, **STATS)
