"""Sagas under faults that are not crashes: a compensation that never succeeds, and
clocks that jump.

- A compensation that fails forever ends the run ``compensation_failed`` after a
  bounded number of attempts (the other compensations still run), recovery leaves it
  alone (it is final, not incomplete: nothing loops), its idempotency key refuses to run
  until an operator resolves it, and ``resolve`` frees the key.
- Wall-clock jumps (leases are wall-clock times, shared between processes): a jump
  backwards never lets a live holder's run be taken over, it only delays the take-over
  of a run whose holder vanished on another host, and a holder known dead on this host
  is recovered at once whatever the clock says. The saga timeout and every duration
  come from the monotonic clock, so wall-clock jumps in the middle of a run neither cut
  it short nor make a duration negative.
- A monotonic clock that (wrongly) goes backwards makes the saga timeout later, never
  earlier, and the run still ends.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from buttress import IdempotencyConflict, Permanent, Saga, health, retry
from buttress.backends import RunRecord
from buttress.backends.memory import MemoryStore
from buttress.backends.sqlite import SQLiteStore
from buttress.testing import FakeClock, capture_events


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "memory":
        return MemoryStore()
    return SQLiteStore(tmp_path / "runs.db")


class WallClock(FakeClock):
    """A fake clock whose wall-clock reading is the real time plus a skew (leases are
    read from the saga clock's ``wall()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.skew = 0.0

    def wall(self) -> float:
        return time.time() + self.skew


@pytest.fixture
def wall() -> WallClock:
    return WallClock()


def test_a_compensation_that_always_fails_stops_and_waits_for_an_operator(store, figures):
    """Bounded attempts, the other compensations still run, recovery leaves the run
    alone, the key is blocked until resolve()."""
    clock = FakeClock()
    attempts: list[str] = []
    saga = Saga("stuck", store=store, clock=clock)
    saga.step("a", lambda ctx: "a", compensate=lambda ctx: attempts.append("undo a"))

    def broken(ctx: Any) -> None:
        attempts.append("undo b")
        raise RuntimeError("the refund API is gone")

    saga.step("b", lambda ctx: "b", compensate=broken)
    saga.step("c", lambda ctx: (_ for _ in ()).throw(Permanent("declined")))
    with capture_events() as events:
        result = saga.run({"order": 1}, key="order-1")
    assert result.status == "failed" and not result.compensated
    assert result.step("b").status == "compensation_failed"
    assert result.step("a").status == "compensated"
    # Five attempts (the default compensation retry), then a, in reverse order.
    assert attempts == ["undo b"] * 5 + ["undo a"]
    assert sum(clock.sleeps) < 10, "backoff between compensation attempts is bounded"
    loaded = store.load(result.run_id)
    assert loaded is not None and loaded[0].status == "compensation_failed"
    assert [type(e).__name__ for e in events].count("CompensationFailed") == 1
    for _ in range(3):
        assert saga.recover() == []  # final, not incomplete: recovery never retries it
    assert attempts.count("undo b") == 5
    saga.refresh_health()  # what a recovery worker does on each pass
    assert health()["status"] == "warn"
    with pytest.raises(IdempotencyConflict, match="operator"):
        saga.run({"order": 1}, key="order-1")
    saga.resolve(result.run_id)
    loaded = store.load(result.run_id)
    assert loaded is not None and loaded[0].status == "failed"
    saga.refresh_health()
    assert health()["status"] == "pass"
    with pytest.raises(ValueError, match="compensation_failed"):
        saga.resolve(result.run_id)  # resolving twice is refused, not looped on
    again = saga.run({"order": 1}, key="order-1")
    assert again.run_id != result.run_id
    figures.add("saga_compensation_fails_forever", runs=2, compensation_attempts=len(attempts))


def make_counting_saga(
    store: Any, clock: FakeClock, name: str = "leases"
) -> tuple[Saga, list[str]]:
    calls: list[str] = []
    saga = Saga(name, store=store, lease=30, clock=clock)
    for step in ("one", "two"):
        saga.step(step, lambda ctx, step=step: calls.append(step) or step)
    return saga, calls


def held(store: Any, run_id: str, owner: str, lease_until: float, saga: str = "leases") -> None:
    now = time.time()
    store.create_run(
        RunRecord(
            run_id,
            saga,
            "running",
            {},
            created_at=now,
            updated_at=now,
            owner=owner,
            lease_until=lease_until,
        )
    )


def test_a_backward_jump_never_lets_a_live_lease_be_taken(store, wall):
    """A holder elsewhere with a live lease keeps its run when the clock jumps back; a
    lease that expired before the jump is taken over only once time passes it again."""
    now = time.time()
    held(store, "live", "elsewhere:1:x", now + 30)
    held(store, "expired", "elsewhere:2:y", now - 5)
    saga, calls = make_counting_saga(store, wall)
    wall.skew = -3600.0  # the wall clock jumps an hour back
    assert saga.recover() == []  # neither: the expired lease looks live again
    assert calls == []
    wall.skew = 0.0  # time catches up: only the expired lease is taken over
    assert [r.run_id for r in saga.recover()] == ["expired"]
    wall.skew = 60.0  # and once the live one's lease has passed too
    assert [r.run_id for r in saga.recover()] == ["live"]
    assert calls == ["one", "two", "one", "two"]


def test_a_dead_holder_on_this_host_is_recovered_whatever_the_clock_says(store, wall):
    """A holder known dead (its pid is gone) is taken over at once, even if its lease,
    written before a backward jump, lies an hour in the future."""
    from buttress.saga._runner import new_owner

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    host = new_owner().split(":")[0]
    held(store, "orphan", f"{host}:{gone.stdout.strip()}:dead", time.time() + 3600)
    saga, calls = make_counting_saga(store, wall)
    wall.skew = -3600.0
    assert [r.run_id for r in saga.recover()] == ["orphan"]
    assert calls == ["one", "two"]


@pytest.mark.parametrize("jump", [-3600.0, 3600.0])
def test_wall_clock_jumps_do_not_touch_timeouts_or_durations(store, wall, jump):
    """The saga timeout and durations run on the monotonic clock: a wall-clock jump in
    the middle of a step neither times the run out nor makes a duration negative."""
    clock = wall
    saga = Saga("jumpy", store=store, timeout=10, clock=clock)

    def step_one(ctx: Any) -> str:
        wall.skew = jump
        clock.advance(1)
        return "one"

    saga.step("one", step_one)
    saga.step("two", lambda ctx: clock.advance(1) or "two")
    result = saga.run({})
    assert result.status == "completed"
    assert result.duration == pytest.approx(2.0)
    assert all(step.duration is not None and step.duration >= 0 for step in result.steps)


class BackwardsClock(FakeClock):
    """A broken monotonic clock: it can be set back."""

    def set(self, value: float) -> None:
        self._now = value


def test_a_monotonic_clock_going_backwards_only_delays_the_timeout(store):
    """A clock set back mid-run makes the timeout later, never earlier; the run ends."""
    clock = BackwardsClock(start=1000.0)
    saga = Saga("backwards", store=store, timeout=5, clock=clock, lease=30)
    ran: list[str] = []

    def step(name: str, move: float | None) -> Any:
        def run(ctx: Any) -> str:
            ran.append(name)
            if move is not None:
                clock.set(clock.now() + move)
            return name

        return run

    saga.step("a", step("a", -100.0), retry=retry(2, backoff=[0.0]))
    saga.step("b", step("b", 4.0))
    saga.step("c", step("c", 4.0))
    saga.step("d", step("d", 100.0))
    saga.step("e", step("e", None))
    result = saga.run({})
    # After "a" the clock read 900: "b" and "c" (900 -> 908) are within the 5 s budget
    # measured from 1000; "d" starts at 908 < 1005; "e" starts at 1008 and is refused.
    assert ran == ["a", "b", "c", "d"]
    assert result.status == "failed"
    assert result.step("e").status == "not_run"
