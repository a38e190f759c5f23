"""The bulkhead against a reference model, over random interleavings.

Async callers arrive, finish, are cancelled while running or while queued, sync callers
take and give back slots with ``try_acquire``/``release``, and the fake clock jumps so
that queued callers time out. After every step the slots in flight, the queue and the
counters must equal the model's; after every example, once everything is cancelled and
released, the bulkhead must be empty (no slot or queue entry leaked).
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

from buttress import Bulkhead, BulkheadFull
from buttress.bulkhead import BulkheadPermit
from buttress.testing import FakeClock

# What the machines did, for the figures report (see test_record_figures).
STATS: collections.Counter[str] = collections.Counter()


@dataclass
class Model:
    """FIFO slots: at most ``slots`` running, at most ``room`` queued for ``max_wait``."""

    slots: int
    room: int
    max_wait: float | None
    running: set[int] = field(default_factory=set)
    held: int = 0  # slots taken with try_acquire
    queue: list[tuple[int, float | None]] = field(default_factory=list)
    accepted: int = 0
    rejected: int = 0
    timed_out: int = 0

    @property
    def in_flight(self) -> int:
        return len(self.running) + self.held

    def arrive(self, call: int, now: float) -> str:
        if self.in_flight < self.slots and not self.queue:
            self.running.add(call)
            self.accepted += 1
            return "running"
        if len(self.queue) >= self.room or self.max_wait == 0:
            self.rejected += 1
            return "rejected"
        deadline = None if self.max_wait is None else now + self.max_wait
        self.queue.append((call, deadline))
        return "queued"

    def release(self) -> int | None:
        """A slot is given back: to the oldest waiter (returned) if there is one."""
        if self.queue:
            call, _ = self.queue.pop(0)
            self.running.add(call)
            self.accepted += 1
            return call
        return None

    def expire(self, now: float) -> list[int]:
        gone = [call for call, deadline in self.queue if deadline is not None and deadline <= now]
        self.queue = [(c, d) for c, d in self.queue if c not in gone]
        self.rejected += len(gone)
        self.timed_out += len(gone)
        return gone


class BulkheadMachine(RuleBasedStateMachine):
    """Random arrivals, completions, cancellations and clock jumps against the model."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(autojump=False)
        self.loop = asyncio.new_event_loop()
        self.tasks: dict[int, asyncio.Task[Any]] = {}
        self.gates: dict[int, asyncio.Future[None]] = {}
        self.entered: set[int] = set()
        self.status: dict[int, str] = {}
        self.next_id = 0
        self.model: Model | None = None
        self.bulkhead: Bulkhead
        self.permits: list[BulkheadPermit] = []  # slots held by hand (try_acquire)

    @initialize(
        slots=st.integers(1, 4),
        room=st.integers(0, 4),
        max_wait=st.sampled_from([None, 0.0, 0.5, 2.0]),
    )
    def build(self, slots, room, max_wait):
        STATS["examples"] += 1
        self.model = Model(slots, room, max_wait)
        self.bulkhead = Bulkhead(
            max_concurrent=slots, max_queue=room, max_wait=max_wait, clock=self.clock
        )

        @self.bulkhead
        async def work(call: int, gate: asyncio.Future[None]) -> int:
            self.entered.add(call)
            await gate
            return call

        self.work = work

    def drain(self) -> None:
        async def spin() -> None:
            for _ in range(8):
                await asyncio.sleep(0)

        self.loop.run_until_complete(spin())

    def teardown(self) -> None:
        if self.model is not None:
            for task in self.tasks.values():
                task.cancel()
            self.drain()
            for permit in self.permits:
                permit.release()
            # Nothing leaked: every slot and every queue entry was given back.
            assert self.bulkhead.in_flight == 0
            assert self.bulkhead.queued == 0
        self.loop.close()

    def live(self, status: str) -> list[int]:
        return sorted(call for call, state in self.status.items() if state == status)

    # -- rules ------------------------------------------------------------------------------

    @rule(count=st.integers(1, 3))
    def arrive(self, count):
        assert self.model is not None
        for _ in range(count):
            STATS["calls"] += 1
            call = self.next_id
            self.next_id += 1
            self.status[call] = self.model.arrive(call, self.clock.now())
            self.gates[call] = self.loop.create_future()
            self.tasks[call] = self.loop.create_task(self.work(call, self.gates[call]))
            self.drain()
            if self.status[call] == "rejected":
                with pytest.raises(BulkheadFull, match="full"):
                    self.tasks.pop(call).result()
                del self.status[call]

    def _released(self) -> None:
        assert self.model is not None
        granted = self.model.release()
        if granted is not None:
            self.status[granted] = "running"

    @precondition(lambda self: any(s == "running" for s in self.status.values()))
    @rule(data=st.data(), cancel=st.booleans())
    def finish(self, data, cancel):
        call = data.draw(st.sampled_from(self.live("running")))
        STATS["cancelled_running" if cancel else "finished"] += 1
        if cancel:
            self.tasks[call].cancel()
        else:
            self.gates[call].set_result(None)
        assert self.model is not None
        self.model.running.discard(call)
        self._released()
        del self.status[call]
        self.drain()
        task = self.tasks.pop(call)
        assert task.cancelled() if cancel else task.result() == call

    @precondition(lambda self: any(s == "queued" for s in self.status.values()))
    @rule(data=st.data())
    def cancel_queued(self, data):
        assert self.model is not None
        call = data.draw(st.sampled_from(self.live("queued")))
        STATS["cancelled_queued"] += 1
        self.tasks[call].cancel()
        self.model.queue = [(c, d) for c, d in self.model.queue if c != call]
        del self.status[call]
        self.drain()
        assert self.tasks.pop(call).cancelled()
        assert call not in self.entered

    @rule()
    def try_acquire(self):
        assert self.model is not None
        expected = self.model.in_flight < self.model.slots and not self.model.queue
        permit = self.bulkhead.try_acquire()
        assert (permit is not None) == expected
        if permit is not None:
            self.permits.append(permit)
            self.model.held += 1
            self.model.accepted += 1

    @precondition(lambda self: self.model is not None and self.model.held > 0)
    @rule()
    def release(self):
        assert self.model is not None
        self.permits.pop(0).release()
        self.model.held -= 1
        self._released()
        self.drain()

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 3.0]))
    def jump(self, seconds):
        assert self.model is not None
        self.clock.advance(seconds)
        self.drain()
        for call in self.model.expire(self.clock.now()):
            STATS["timed_out"] += 1
            del self.status[call]
            with pytest.raises(BulkheadFull, match="no slot freed up in time"):
                self.tasks.pop(call).result()

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self):
        model = self.model
        if model is None:
            return
        snap = self.bulkhead.snapshot()
        assert self.bulkhead.in_flight == model.in_flight <= model.slots
        assert self.bulkhead.queued == len(model.queue) <= model.room
        assert snap["accepted"] == model.accepted
        assert snap["rejected"] == model.rejected
        assert snap["timed_out"] == model.timed_out
        # Exactly the calls holding a slot have entered the function, and are still in it.
        for call, state in self.status.items():
            assert (call in self.entered) == (state == "running"), (call, state)
            assert not self.tasks[call].done()


TestBulkheadModel = BulkheadMachine.TestCase
TestBulkheadModel.settings = examples(80, 1500, stateful_step_count=scaled(40, 80))


def test_record_figures(figures):
    """Record how many examples, steps and calls the machines above ran."""
    figures.add("bulkhead_model", mode=MODE, **STATS)
