"""The rate limiter against a reference model, over random interleavings.

Async callers of random weights queue, are admitted as the fake clock jumps, are
cancelled at the head or in the middle of the queue, and sync callers ``try_acquire``
between them. The model is a plain token bucket written from the documentation
(GCRA: admit ``w`` at ``now`` iff ``max(tat, now) + w*T - now <= burst*T``; FIFO
queue; reject at once when the wait would exceed ``max_wait``). Rates and jumps are
powers of two so that both sides compute exactly. After every step the admissions,
the queue and the counters agree; after every example no interval of length ``t``
saw more than ``burst + t / T`` units admitted, and once every caller is cancelled
the queue is empty.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from reliability_support import MODE, examples, scaled

from buttress import RateLimited, RateLimiter
from buttress.testing import FakeClock

EPS = 1e-9


# What the machines did, for the figures report (see test_record_figures).
STATS: collections.Counter[str] = collections.Counter()


@dataclass
class Model:
    interval: float
    burst: int
    max_wait: float | None
    tat: float = float("-inf")
    queue: list[tuple[int, int]] = field(default_factory=list)  # (call, weight)
    admitted: int = 0
    rejected: int = 0
    waited: int = 0
    history: list[tuple[float, int]] = field(default_factory=list)

    @property
    def tolerance(self) -> float:
        return self.burst * self.interval

    def conform(self, now: float, weight: int) -> bool:
        new_tat = max(self.tat, now) + weight * self.interval
        if new_tat - now - self.tolerance <= EPS:
            self.tat = new_tat
            self.admitted += 1
            self.history.append((now, weight))
            return True
        return False

    def try_acquire(self, now: float, weight: int) -> bool:
        return not self.queue and self.conform(now, weight)

    def arrive(self, call: int, now: float, weight: int) -> tuple[str, float]:
        if not self.queue and self.conform(now, weight):
            return "admitted", 0.0
        queued = sum(w for _, w in self.queue)
        wait = max(self.tat, now) + (queued + weight) * self.interval - self.tolerance - now
        if self.max_wait is not None and wait > self.max_wait + EPS:
            self.rejected += 1
            return "rejected", max(wait, 0.0)
        self.queue.append((call, weight))
        return "queued", wait

    def serve(self, now: float) -> list[int]:
        """Admit queued callers from the head while they conform."""
        served = []
        while self.queue and self.conform(now, self.queue[0][1]):
            served.append(self.queue.pop(0)[0])
            self.waited += 1
        return served


class LimiterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(autojump=False)
        self.loop = asyncio.new_event_loop()
        self.tasks: dict[int, asyncio.Task[Any]] = {}
        self.queued: set[int] = set()
        self.next_id = 0
        self.model: Model | None = None
        self.limiter: RateLimiter

    @initialize(
        rate=st.sampled_from([1, 2, 4, 8]),
        per=st.sampled_from([0.5, 1.0, 2.0]),
        burst=st.integers(1, 4),
        max_wait=st.sampled_from([None, 0.0, 0.5, 2.0]),
    )
    def build(self, rate, per, burst, max_wait):
        STATS["examples"] += 1
        self.model = Model(per / rate, burst, max_wait)
        self.limiter = RateLimiter(
            rate=rate, per=per, burst=burst, max_wait=max_wait, clock=self.clock
        )

    def drain(self) -> None:
        async def spin() -> None:
            for _ in range(12):
                await asyncio.sleep(0)

        self.loop.run_until_complete(spin())

    def teardown(self) -> None:
        if self.model is not None:
            for task in self.tasks.values():
                task.cancel()
            self.drain()
            assert self.limiter.snapshot()["waiting"] == 0  # no waiter leaked
            # GCRA's bound holds over every interval of the history.
            history = self.model.history
            for i, (start, _) in enumerate(history):
                total = 0
                for end, weight in history[i:]:
                    total += weight
                    bound = self.model.burst + (end - start) / self.model.interval
                    assert total <= bound + 1e-6, (start, end, total, bound)
        self.loop.close()

    def check_served(self, served: list[int]) -> None:
        for call in served:
            STATS["served_after_wait"] += 1
            self.queued.discard(call)
            task = self.tasks.pop(call)
            assert task.done() and task.result() is None

    # -- rules ------------------------------------------------------------------------------

    @rule(data=st.data())
    def arrive(self, data):
        model = self.model
        assert model is not None
        weight = data.draw(st.integers(1, model.burst))
        call = self.next_id
        self.next_id += 1
        outcome, wait = model.arrive(call, self.clock.now(), weight)
        STATS[f"calls_{outcome}"] += 1
        task = self.loop.create_task(self.limiter.acquire_async(weight))
        self.drain()
        if outcome == "admitted":
            assert task.done() and task.result() is None
        elif outcome == "rejected":
            with pytest.raises(RateLimited) as info:
                task.result()
            assert info.value.retry_after == pytest.approx(wait)
        else:
            assert not task.done()
            self.tasks[call] = task
            self.queued.add(call)
            self.check_served(model.serve(self.clock.now()))

    @rule(data=st.data())
    def try_acquire(self, data):
        model = self.model
        assert model is not None
        weight = data.draw(st.integers(1, model.burst))
        expected = model.try_acquire(self.clock.now(), weight)
        assert self.limiter.try_acquire(weight) == expected

    @precondition(lambda self: bool(self.queued))
    @rule(data=st.data())
    def cancel_waiter(self, data):
        model = self.model
        assert model is not None
        call = data.draw(st.sampled_from(sorted(self.queued)))
        STATS["cancelled_waiters"] += 1
        self.tasks.pop(call).cancel()
        self.queued.discard(call)
        model.queue = [(c, w) for c, w in model.queue if c != call]
        self.drain()
        self.check_served(model.serve(self.clock.now()))

    @rule(seconds=st.sampled_from([0.0625, 0.125, 0.25, 0.5, 1.0, 4.0]))
    def jump(self, seconds):
        model = self.model
        assert model is not None
        self.clock.advance(seconds)
        self.drain()
        self.check_served(model.serve(self.clock.now()))

    @precondition(lambda self: bool(self.queued))
    @rule()
    def jump_to_the_head(self):
        """Jump to the exact instant the head of the queue conforms."""
        model = self.model
        assert model is not None
        now = self.clock.now()
        weight = model.queue[0][1]
        self.clock.advance(
            max(max(model.tat, now) + weight * model.interval - model.tolerance - now, 0.0)
        )
        self.drain()
        served = model.serve(self.clock.now())
        assert served, "the head conforms at this instant"
        self.check_served(served)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self):
        model = self.model
        if model is None:
            return
        snap = self.limiter.snapshot()
        assert snap["waiting"] == len(model.queue)
        assert snap["admitted"] == model.admitted
        assert snap["rejected"] == model.rejected
        assert snap["waited"] == model.waited
        debt = max(model.tat - self.clock.now(), 0.0)
        tokens = max(model.tolerance - debt, 0.0) / model.interval
        assert self.limiter.tokens() == pytest.approx(tokens)
        for call in self.queued:
            assert not self.tasks[call].done()


TestLimiterModel = LimiterMachine.TestCase
TestLimiterModel.settings = examples(80, 1500, stateful_step_count=scaled(40, 80))


def test_record_figures(figures):
    """Record how many examples, steps and calls the machines above ran."""
    figures.add("limiter_model", mode=MODE, **STATS)
