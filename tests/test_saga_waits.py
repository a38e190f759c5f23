"""Durable waits: sleeps, signals with deadlines, child sagas, fan-out, heartbeats,
versions and cancellation, on every saga store, on both faces, in virtual time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from buttress import Registry, retry
from buttress import events as ev
from buttress.backends import WAITING
from buttress.backends.memory import MemoryStore
from buttress.exceptions import (
    ChildFailed,
    ConfigTypeError,
    ConfigValueError,
    RunCancelled,
    VersionMismatch,
    WaitTimedOut,
)
from buttress.saga import Saga, SagaResult
from buttress.testing import FakeClock

HOUR = 3600.0


class Crash(BaseException):
    """Stands for the process dying: nothing in the runner catches it."""


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """A factory of the store under test (every call: a new handle on the same data,
    as a restarted process would open)."""
    opened: list[Any] = []
    if request.param == "memory":
        shared = MemoryStore()

        def make() -> Any:
            return shared

    elif request.param == "sqlite":
        from buttress.backends.sqlite import SQLiteStore

        def make() -> Any:
            store = SQLiteStore(str(tmp_path / "runs.db"))
            opened.append(store)
            return store

    else:
        from buttress.backends.postgres import PostgresStore

        url = request.getfixturevalue("postgres_url")
        schema = request.getfixturevalue("postgres_schema")

        def make() -> Any:
            store = PostgresStore(url, schema=schema)
            opened.append(store)
            return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sync", "async"])
def face(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(saga: Saga, face: str, input: Any = None, **kw: Any) -> SagaResult:
    if face == "sync":
        return saga.run(input, **kw)
    return asyncio.run(saga.run_async(input, **kw))


def signal(saga: Saga, face: str, run_id: str, name: str, payload: Any = None, **kw: Any) -> Any:
    if face == "sync":
        return saga.signal(run_id, name, payload, **kw)
    return asyncio.run(saga.signal_async(run_id, name, payload, **kw))


def recover(saga: Saga, face: str) -> list[SagaResult]:
    if face == "sync":
        return list(saga.recover())
    return list(asyncio.run(saga.recover_async()))


def events_of(saga: Saga) -> list[ev.Event]:
    seen: list[ev.Event] = []
    saga._listeners = (seen.append,)
    return seen


def expense_saga(store: Any, clock: FakeClock, face: str, log: list[Any], **kw: Any) -> Saga:
    """Submit, wait up to 48 h for a decision, then pay (sync or async steps)."""
    saga = Saga("expense", store=store, clock=clock, registry=Registry(), **kw)
    if face == "sync":

        @saga.step("submit", compensate=lambda ctx: log.append("withdrawn"))
        def submit(ctx: Any) -> Any:
            log.append("submitted")
            return ctx.input

        @saga.step("decision")
        def decision(ctx: Any) -> Any:
            return ctx.wait_for("decision", timeout=timedelta(hours=48))

        @saga.step("pay")
        def pay(ctx: Any) -> Any:
            log.append(("paid", ctx.results["decision"]))
            return "paid"

    else:

        @saga.step("submit", compensate=lambda ctx: log.append("withdrawn"))
        async def submit(ctx: Any) -> Any:
            log.append("submitted")
            return ctx.input

        @saga.step("decision")
        async def decision(ctx: Any) -> Any:
            return await ctx.wait_for_async("decision", timeout=timedelta(hours=48))

        @saga.step("pay")
        async def pay(ctx: Any) -> Any:
            log.append(("paid", ctx.results["decision"]))
            return "paid"

    return saga


# -- signals ------------------------------------------------------------------------------


def test_a_long_wait_parks_the_run_holding_nothing(make_store, clock, face) -> None:
    log: list[Any] = []
    store = make_store()
    saga = expense_saga(store, clock, face, log)
    seen = events_of(saga)
    result = run(saga, face, {"amount": 120})
    assert result.status == WAITING and result.waiting and not result.ok
    assert result.step("decision").status == "waiting"
    record = store.load(result.run_id)[0]
    assert record.status == WAITING
    assert record.lease_until == 0.0
    assert record.waiting_for == "decision"
    assert record.wake_at == pytest.approx(clock.wall() + 48 * HOUR)
    assert saga.snapshot()["running"] == 0
    assert next(e for e in seen if isinstance(e, ev.RunParked)).waiting_for == "decision"


def test_a_signal_resumes_the_parked_run_where_it_is_sent(make_store, clock, face) -> None:
    log: list[Any] = []
    saga = expense_saga(make_store(), clock, face, log)
    seen = events_of(saga)
    first = run(saga, face, {"amount": 120})
    clock.advance(20 * HOUR)
    done = signal(saga, face, first.run_id, "decision", {"approved": True})
    assert done is not None and done.ok
    assert log == ["submitted", ("paid", {"approved": True})]  # submit did not run again
    assert done.outputs["decision"] == {"approved": True}
    kinds = [type(e).__name__ for e in seen]
    assert "SignalSent" in kinds and "SignalReceived" in kinds


def test_a_signal_without_resume_leaves_the_run_to_the_worker(make_store, clock, face) -> None:
    log: list[Any] = []
    saga = expense_saga(make_store(), clock, face, log)
    first = run(saga, face)
    assert signal(saga, face, first.run_id, "decision", "yes", resume=False) is None
    assert saga.store.load(first.run_id)[0].status == WAITING  # now due
    [done] = recover(saga, face)
    assert done.ok and done.outputs["decision"] == "yes"


def test_a_signal_from_another_process_handle_is_seen(make_store, clock, face) -> None:
    """Two processes share the store: the one that signals resumes the run."""
    log: list[Any] = []
    saga = expense_saga(make_store(), clock, face, log)
    first = run(saga, face)
    other = expense_saga(make_store(), clock, face, log)
    done = signal(other, face, first.run_id, "decision", 7)
    assert done is not None and done.ok and done.outputs["decision"] == 7


def test_a_signal_sent_before_the_wait_is_kept_and_consumed_once(make_store, clock, face) -> None:
    saga = Saga("twice", store=make_store(), clock=clock, registry=Registry())

    @saga.step("nap")
    def nap(ctx: Any) -> None:
        ctx.sleep(2 * HOUR)

    @saga.step("first")
    def first(ctx: Any) -> Any:
        return ctx.wait_for("go", timeout=HOUR * 100)

    @saga.step("second")
    def second(ctx: Any) -> Any:
        return ctx.wait_for("go", timeout=HOUR * 100)

    parked = run(saga, face)
    assert parked.step("nap").status == "waiting"
    signal(saga, face, parked.run_id, "go", "one")  # it sleeps: nothing to resume yet
    clock.advance(2 * HOUR)
    [again] = recover(saga, face)
    assert again.waiting and again.outputs["first"] == "one"  # second parks: consumed once
    done = signal(saga, face, parked.run_id, "go", "two")
    assert done is not None and done.ok
    assert done.outputs == {"nap": None, "first": "one", "second": "two"}


def test_a_wait_that_passes_its_deadline_compensates(make_store, clock, face) -> None:
    log: list[Any] = []
    saga = expense_saga(make_store(), clock, face, log)
    seen = events_of(saga)
    first = run(saga, face)
    clock.advance(47 * HOUR)
    assert recover(saga, face) == []  # not due yet
    clock.advance(HOUR + 1)
    [failed] = recover(saga, face)
    assert failed.status == "failed" and failed.compensated
    assert isinstance(failed.error, WaitTimedOut)
    assert failed.error.signal == "decision"
    assert log == ["submitted", "withdrawn"]
    assert any(isinstance(e, ev.WaitExpired) for e in seen)
    assert failed.step("decision").attempts == 1
    _ = first


def test_a_timed_out_wait_is_not_retried(make_store, clock) -> None:
    saga = Saga(
        "noretry",
        store=make_store(),
        clock=clock,
        registry=Registry(),
        park_after=None,
        poll_interval=5,
    )

    @saga.step("wait", retry=retry(5, backoff=[0]))
    def wait(ctx: Any) -> Any:
        return ctx.wait_for("never", timeout=10)

    result = saga.run()
    assert isinstance(result.error, WaitTimedOut)
    assert result.step("wait").attempts == 1


def test_timeout_counts_from_when_the_wait_first_began(make_store, clock) -> None:
    """A crash mid-wait: the resumed wait keeps the deadline it recorded."""
    store = make_store()
    calls = {"n": 0}

    class Dying:
        """The store of a process that dies during its third look for a signal."""

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def signals(self, run_id: str) -> Any:
            calls["n"] += 1
            if calls["n"] == 3:
                raise Crash
            return store.signals(run_id)

    saga = Saga(
        "crashy", store=Dying(), clock=clock, registry=Registry(), poll_interval=60, park_after=None
    )

    @saga.step("wait")
    def wait(ctx: Any) -> Any:
        return ctx.wait_for("go", timeout=600)

    began = clock.wall()
    with pytest.raises(Crash):
        saga.run()
    clock.advance(30)  # the lease expires (default 30 s)
    calls["n"] = 100
    again = Saga(
        "crashy",
        store=make_store(),
        clock=clock,
        registry=Registry(),
        park_after=None,
        poll_interval=60,
    )

    @again.step("wait")
    def wait_again(ctx: Any) -> Any:
        return ctx.wait_for("go", timeout=600)

    [failed] = again.recover()
    assert isinstance(failed.error, WaitTimedOut)
    assert failed.error.deadline == pytest.approx(began + 600)
    assert clock.wall() == pytest.approx(began + 600, abs=61)


def test_remind_then_wait_two_more_days(make_store, clock) -> None:
    sent: list[str] = []
    saga = Saga("review", store=make_store(), clock=clock, registry=Registry())

    @saga.step("first-wait")
    def first_wait(ctx: Any) -> Any:
        try:
            return ctx.wait_for("review", timeout=timedelta(days=7))
        except WaitTimedOut:
            return None

    @saga.step("remind")
    def remind(ctx: Any) -> None:
        if ctx.results["first-wait"] is None:
            sent.append("reminder")

    @saga.step("review")
    def review(ctx: Any) -> Any:
        return ctx.results["first-wait"] or ctx.wait_for("review", timeout=timedelta(days=2))

    first = saga.run()
    clock.advance(7 * 24 * HOUR + 1)
    [waiting] = saga.recover()
    assert waiting.waiting and sent == ["reminder"]
    clock.advance(24 * HOUR)
    done = saga.signal(first.run_id, "review", "looks good")
    assert done is not None and done.ok and done.output == "looks good"
    assert sent == ["reminder"]


def test_a_deadline_is_an_absolute_time(make_store, clock) -> None:
    saga = Saga("abs", store=make_store(), clock=clock, registry=Registry())
    due = datetime.fromtimestamp(clock.wall() + 5 * HOUR, tz=timezone.utc)

    @saga.step("wait")
    def wait(ctx: Any) -> Any:
        return ctx.wait_for("go", deadline=due)

    first = saga.run()
    assert saga.store.load(first.run_id)[0].wake_at == pytest.approx(due.timestamp())
    naive = Saga("naive", clock=clock, registry=Registry())
    naive.step("wait", lambda ctx: ctx.wait_for("go", deadline=datetime(2030, 1, 1)))
    refused = naive.run()
    assert isinstance(refused.error, ConfigValueError) and "aware" in str(refused.error)
    bad = Saga("bad-deadline", clock=clock, registry=Registry())
    bad.step("wait", lambda ctx: ctx.wait_for("go", deadline="tomorrow"))
    assert isinstance(bad.run().error, ConfigTypeError)


def test_a_short_wait_waits_in_process(make_store, clock, face) -> None:
    saga = Saga(
        "short",
        store=make_store(),
        clock=clock,
        registry=Registry(),
        park_after=120,
        poll_interval=20,
    )

    if face == "sync":

        @saga.step("wait")
        def wait(ctx: Any) -> Any:
            return ctx.wait_for("go", timeout=60)

    else:

        @saga.step("wait")
        async def wait(ctx: Any) -> Any:
            return await ctx.wait_for_async("go", timeout=60)

    result = run(saga, face)
    assert isinstance(result.error, WaitTimedOut)  # waited (in virtual time), never parked
    assert result.status == "failed"


def test_a_signal_from_another_thread_wakes_an_in_process_wait(make_store) -> None:
    clock = FakeClock(autojump=False)
    saga = Saga("threaded", store=make_store(), clock=clock, registry=Registry(), park_after=None)

    @saga.step("wait")
    def wait(ctx: Any) -> Any:
        return ctx.wait_for("go")

    results: list[SagaResult] = []
    worker = threading.Thread(target=lambda: results.append(saga.run()))
    worker.start()
    while not saga.store.runs(saga="threaded") or not saga._watchers:
        threading.Event().wait(0.001)
    run_id = saga.store.runs(saga="threaded")[0].run_id
    assert saga.signal(run_id, "go", [1, 2]) is None  # it is running: it wakes itself
    worker.join(10)
    assert results[0].ok and results[0].output == [1, 2]


def test_signal_refuses_what_it_cannot_deliver(make_store, clock) -> None:
    log: list[Any] = []
    saga = expense_saga(make_store(), clock, "sync", log)
    with pytest.raises(ConfigValueError, match="not in the store"):
        saga.signal("nope", "decision", 1)
    first = saga.run()
    with pytest.raises(ConfigValueError, match="reserved"):
        saga.signal(first.run_id, "buttress.cancel", 1)
    with pytest.raises(ConfigTypeError, match="name"):
        saga.signal(first.run_id, "", 1)
    with pytest.raises(ConfigValueError, match="strict JSON"):
        saga.signal(first.run_id, "decision", float("nan"))
    with pytest.raises(ConfigTypeError, match="JSON"):
        saga.signal(first.run_id, "decision", {1, 2})
    done = saga.signal(first.run_id, "decision", "ok")
    assert done is not None and done.ok
    with pytest.raises(ConfigValueError, match="has ended"):
        saga.signal(first.run_id, "decision", 1)


def test_a_signal_that_races_the_park_is_not_lost(make_store, clock) -> None:
    """The signal lands after the wait's last look but before the park is saved."""
    store = make_store()
    holder: dict[str, Saga] = {}

    class Racing:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def write(self, run_id: str, entries: Any, **kw: Any) -> None:
            if kw.get("status") == WAITING and not holder.get("sent"):
                holder["sent"] = holder["saga"]  # type: ignore[assignment]
                store.send_signal(run_id, "go", "raced", at=clock.wall())
            store.write(run_id, entries, **kw)

    saga = Saga("race", store=Racing(), clock=clock, registry=Registry())
    holder["saga"] = saga

    @saga.step("wait")
    def wait(ctx: Any) -> Any:
        return ctx.wait_for("go")

    result = saga.run()
    assert result.ok and result.output == "raced"


# -- sleeps -------------------------------------------------------------------------------


def test_a_long_sleep_parks_and_wakes_when_due(make_store, clock, face) -> None:
    saga = Saga("nap", store=make_store(), clock=clock, registry=Registry())
    ran: list[str] = []

    if face == "sync":

        @saga.step("nap")
        def nap(ctx: Any) -> str:
            ran.append("nap")
            ctx.sleep(timedelta(hours=24))
            return "rested"

    else:

        @saga.step("nap")
        async def nap(ctx: Any) -> str:
            ran.append("nap")
            await ctx.sleep_async(timedelta(hours=24))
            return "rested"

    first = run(saga, face)
    assert first.waiting
    record = saga.store.load(first.run_id)[0]
    assert record.wake_at == pytest.approx(clock.wall() + 24 * HOUR)
    assert record.waiting_for is None
    clock.advance(23 * HOUR)
    assert recover(saga, face) == []
    clock.advance(HOUR)
    before = clock.now()
    [done] = recover(saga, face)
    assert done.ok and done.output == "rested"
    assert clock.now() == before  # it woke at the recorded time: no second sleep
    assert ran == ["nap", "nap"]


def test_a_short_sleep_sleeps_in_process_and_keeps_its_lease(make_store, clock) -> None:
    saga = Saga("short-nap", store=make_store(), clock=clock, registry=Registry(), lease=5)
    leases: list[float] = []

    @saga.step("nap")
    def nap(ctx: Any) -> None:
        ctx.sleep(50)
        leases.append(saga.store.load(ctx.run_id)[0].lease_until)

    start = clock.wall()
    result = saga.run()
    assert result.ok
    assert clock.wall() == pytest.approx(start + 50)
    assert leases[0] >= start + 50  # the sleep's write covered it with the lease


def test_a_crash_during_a_sleep_wakes_at_the_recorded_time(make_store, clock) -> None:
    store = make_store()
    saga = Saga("crash-nap", store=store, clock=clock, registry=Registry(), park_after=None)
    state = {"crash": True}

    @saga.step("nap")
    def nap(ctx: Any) -> None:
        ctx.sleep(100)
        if state["crash"]:
            raise Crash

    start = clock.wall()
    with pytest.raises(Crash):
        saga.run()
    assert clock.wall() == pytest.approx(start + 100)
    state["crash"] = False
    clock.advance(30)  # the lease (wake + 30 s) runs out
    [done] = saga.recover()
    assert done.ok
    assert clock.wall() == pytest.approx(start + 130)  # no second 100 s sleep


def test_waits_are_refused_in_compensations(make_store, clock) -> None:
    saga = Saga("undo-wait", store=make_store(), clock=clock, registry=Registry())
    errors: list[BaseException] = []

    def undo(ctx: Any) -> None:
        try:
            ctx.sleep(1)
        except ConfigValueError as exc:
            errors.append(exc)

    saga.step("a", lambda ctx: 1, compensate=undo)
    saga.step("b", lambda ctx: 1 / 0)
    assert saga.run().compensated
    assert "forward steps" in str(errors[0])


def test_a_run_deadline_bounds_its_waits(make_store, clock) -> None:
    saga = Saga("bounded", store=make_store(), clock=clock, registry=Registry(), timeout=HOUR)

    @saga.step("wait")
    def wait(ctx: Any) -> Any:
        return ctx.wait_for("go", timeout=48 * HOUR)

    first = saga.run()
    assert saga.store.load(first.run_id)[0].wake_at == pytest.approx(clock.wall() + HOUR)
    clock.advance(HOUR)
    [failed] = saga.recover()
    assert failed.status == "failed"
    assert "timeout" in str(failed.error)


# -- heartbeats ---------------------------------------------------------------------------


def test_a_heartbeat_renews_the_lease_and_records_progress(make_store, clock, face) -> None:
    saga = Saga("beat", store=make_store(), clock=clock, registry=Registry())
    seen = events_of(saga)
    leases: list[float] = []

    if face == "sync":

        @saga.step("long", heartbeat_timeout=10)
        def long(ctx: Any) -> None:
            for done in range(3):
                clock.advance(8)
                ctx.heartbeat({"done": done})
                leases.append(saga.store.load(ctx.run_id)[0].lease_until)

    else:

        @saga.step("long", heartbeat_timeout=10)
        async def long(ctx: Any) -> None:
            for done in range(3):
                clock.advance(8)
                await ctx.heartbeat_async({"done": done})
                leases.append(saga.store.load(ctx.run_id)[0].lease_until)

    result = run(saga, face)
    assert result.ok
    assert leases == [pytest.approx(b) for b in sorted(leases)] and leases[0] < leases[-1]
    _, entries = saga.store.load(result.run_id)
    beats = [e.output for e in entries if e.event == "heartbeat"]
    assert beats == [{"details": {"done": n}} for n in range(3)]
    assert sum(isinstance(e, ev.StepHeartbeat) for e in seen) == 3


def test_a_silent_step_is_taken_as_dead_after_its_heartbeat_timeout(make_store, clock) -> None:
    store = make_store()
    saga = Saga("silent", store=store, clock=clock, registry=Registry(), lease=300)
    state = {"crash": True}

    @saga.step("long", heartbeat_timeout=10)
    def long(ctx: Any) -> str:
        ctx.heartbeat("started")
        if state["crash"]:
            raise Crash  # the worker dies: no more heartbeats
        return "done"

    with pytest.raises(Crash):
        saga.run()
    state["crash"] = False
    # Another host (it cannot see that the process died): the lease decides.
    other = Saga("silent", store=make_store(), clock=clock, registry=Registry(), lease=300)
    other.step("long", long, heartbeat_timeout=10)
    clock.advance(5)
    assert list(other.recover()) == []  # still within the heartbeat timeout
    clock.advance(6)
    [done] = other.recover()  # 11 s, not the 300 s lease
    assert done.ok


# -- child sagas --------------------------------------------------------------------------


def order_sagas(store: Any, clock: FakeClock, log: list[Any]) -> tuple[Saga, Saga]:
    registry = Registry()
    ship = Saga("ship", store=store, clock=clock, registry=registry)
    ship.step(
        "label",
        lambda ctx: log.append(("label", ctx.input)) or "L1",
        compensate=lambda ctx: log.append("void label"),
    )

    @ship.step("pickup")
    def pickup(ctx: Any) -> Any:
        return ctx.wait_for("picked-up", timeout=24 * HOUR)

    order = Saga("order", store=store, clock=clock, registry=registry)
    order.step(
        "pay", lambda ctx: log.append("paid") or "P", compensate=lambda ctx: log.append("refund")
    )
    order.child("ship", ship, input=lambda ctx: {"order": ctx.input})

    @order.step("confirm")
    def confirm(ctx: Any) -> str:
        if ctx.input == "bad":
            raise ValueError("cannot confirm")
        return f"confirmed {ctx.results['ship']}"

    return order, ship


def test_a_child_saga_runs_as_a_step_and_nests_its_report(make_store, clock, face) -> None:
    log: list[Any] = []
    order, ship = order_sagas(make_store(), clock, log)
    seen = events_of(order)
    first = run(order, face, "A-1")
    assert first.waiting and first.step("ship").status == "waiting"
    child_id = f"{first.run_id}/ship"
    assert order.store.load(child_id)[0].parent == first.run_id
    child_done = signal(ship, face, child_id, "picked-up", "truck 7")
    assert child_done is not None and child_done.ok
    [done] = recover(order, face)  # the child woke its parent
    assert done.ok and done.output == "confirmed truck 7"
    nested = done.step("ship").child
    assert nested is not None and nested.run_id == child_id and nested.ok
    assert done.to_dict()["steps"][1]["child"]["run_id"] == child_id
    assert log == ["paid", ("label", {"order": "A-1"})]  # nothing ran twice
    assert any(isinstance(e, ev.ChildStarted) for e in seen)
    assert len(order.store.runs(saga="ship")) == 1  # one child, whatever the resumes


def test_the_parents_compensation_compensates_a_completed_child(make_store, clock) -> None:
    log: list[Any] = []
    order, ship = order_sagas(make_store(), clock, log)
    first = order.run("bad")
    ship.signal(f"{first.run_id}/ship", "picked-up", "x")
    [failed] = order.recover()
    assert failed.status == "failed" and failed.compensated
    assert log == ["paid", ("label", {"order": "bad"}), "void label", "refund"]
    child = order.store.load(f"{first.run_id}/ship")[0]
    assert child.status == "failed"


def test_a_failed_child_fails_its_step(make_store, clock) -> None:
    log: list[Any] = []
    order, ship = order_sagas(make_store(), clock, log)
    first = order.run("A")
    clock.advance(24 * HOUR + 1)
    ship.recover()  # the child's wait expires: it compensates, and wakes the parent
    [failed] = order.recover()
    assert isinstance(failed.error, ChildFailed)
    assert failed.error.result.run_id == f"{first.run_id}/ship"
    assert log == ["paid", ("label", {"order": "A"}), "void label", "refund"]


def test_cancelling_a_parent_cascades_into_its_child(make_store, clock, face) -> None:
    log: list[Any] = []
    order, _ = order_sagas(make_store(), clock, log)
    seen = events_of(order)
    first = run(order, face, "A")
    if face == "sync":
        cancelled = order.cancel(first.run_id, reason="customer changed their mind")
    else:
        cancelled = asyncio.run(order.cancel_async(first.run_id, reason="customer changed mind"))
    assert cancelled is not None and cancelled.status == "failed" and cancelled.compensated
    assert isinstance(cancelled.error, RunCancelled)
    assert order.store.load(f"{first.run_id}/ship")[0].status == "failed"
    assert log == ["paid", ("label", {"order": "A"}), "void label", "refund"]
    assert any(isinstance(e, ev.RunCancelled) for e in seen)
    with pytest.raises(ConfigValueError, match="has ended"):
        order.cancel(first.run_id)


def test_the_parents_deadline_bounds_the_child(make_store, clock) -> None:
    log: list[Any] = []
    order, _ = order_sagas(make_store(), clock, log)
    order.timeout = HOUR
    first = order.run("A")
    parent = order.store.load(first.run_id)[0]
    child = order.store.load(f"{first.run_id}/ship")[0]
    assert child.deadline == pytest.approx(parent.deadline)


def test_a_child_must_share_the_parents_store(clock) -> None:
    ship = Saga("ship2", store=MemoryStore(), registry=Registry())
    ship.step("a", lambda ctx: 1)
    order = Saga("order2", store=MemoryStore(), registry=Registry())
    with pytest.raises(ConfigValueError, match="store"):
        order.child("ship", ship)
    with pytest.raises(ConfigTypeError):
        order.child("ship", "not a saga")  # type: ignore[arg-type]


# -- fan-out ------------------------------------------------------------------------------


def test_a_fan_out_runs_every_item_within_its_bound(make_store, clock, face) -> None:
    saga = Saga("fan", store=make_store(), clock=clock, registry=Registry())
    live = {"now": 0, "most": 0}
    lock = threading.Lock()

    if face == "sync":

        def notify(ctx: Any, item: str) -> str:
            with lock:
                live["now"] += 1
                live["most"] = max(live["most"], live["now"])
            threading.Event().wait(0.01)
            with lock:
                live["now"] -= 1
            return item.upper()

    else:

        async def notify(ctx: Any, item: str) -> str:
            live["now"] += 1
            live["most"] = max(live["most"], live["now"])
            await asyncio.sleep(0.005)
            live["now"] -= 1
            return item.upper()

    saga.map("notify", notify, items=lambda ctx: ctx.input, concurrency=3)
    result = run(saga, face, list("abcdefgh"))
    assert result.ok and result.output == list("ABCDEFGH")
    assert 1 <= live["most"] <= 3
    _, entries = saga.store.load(result.run_id)
    assert sorted(e.output["index"] for e in entries if e.event == "item") == list(range(8))


def test_a_failed_item_compensates_the_completed_ones(make_store, clock) -> None:
    saga = Saga("fan-fail", store=make_store(), clock=clock, registry=Registry())
    seen = events_of(saga)
    undone: list[int] = []

    def charge(ctx: Any, item: int) -> int:
        if item == 3:
            raise RuntimeError("card declined")
        return item * 10

    saga.step("before", lambda ctx: "b", compensate=lambda ctx: undone.append(-1))
    saga.map(
        "charge",
        charge,
        items=lambda ctx: [1, 2, 3],
        compensate=lambda ctx, item, output: undone.append(output),
        concurrency=1,
    )
    result = saga.run()
    assert result.status == "failed" and result.compensated
    assert str(result.error) == "card declined"
    assert undone == [20, 10, -1]
    assert any(isinstance(e, ev.ItemFailed) and e.index == 2 for e in seen)


def test_a_later_failure_compensates_every_item(make_store, clock) -> None:
    saga = Saga("fan-later", store=make_store(), clock=clock, registry=Registry())
    undone: list[str] = []
    saga.map(
        "send",
        lambda ctx, item: item,
        items=lambda ctx: ["x", "y"],
        compensate=lambda ctx, item, output: undone.append(item),
    )
    saga.step("boom", lambda ctx: 1 / 0)
    result = saga.run()
    assert result.compensated and sorted(undone) == ["x", "y"] and undone[0] == "y"


def test_a_resumed_fan_out_runs_only_the_items_without_an_outcome(make_store, clock) -> None:
    store = make_store()
    calls: list[int] = []
    state = {"crash": True}

    def work(ctx: Any, item: int) -> int:
        if item == 2 and state["crash"]:
            raise Crash
        calls.append(item)
        return item

    def build() -> Saga:
        saga = Saga("fan-crash", store=make_store(), clock=clock, registry=Registry())
        saga.map("work", work, items=lambda ctx: [0, 1, 2, 3], concurrency=1)
        return saga

    with pytest.raises(Crash):
        build().run()
    state["crash"] = False
    clock.advance(31)
    [done] = build().recover()
    assert done.ok and done.output == [0, 1, 2, 3]
    assert sorted(calls) == [0, 1, 2, 3]  # no item ran twice
    _ = store


def test_fan_out_items_must_be_json(clock) -> None:
    saga = Saga("fan-json", clock=clock, registry=Registry())
    saga.map("x", lambda ctx, item: item, items=lambda ctx: [object()])
    result = saga.run()
    assert isinstance(result.error, ConfigTypeError)
    with pytest.raises(ConfigValueError, match="concurrency"):
        saga.map("y", lambda ctx, item: item, items=lambda ctx: [], concurrency=0)


# -- versions -----------------------------------------------------------------------------


def test_each_run_records_its_version(make_store, clock) -> None:
    saga = Saga("v", store=make_store(), clock=clock, registry=Registry())
    saga.step("a", lambda ctx: 1)
    fingerprint = saga.version
    saga.step("b", lambda ctx: 2)
    assert saga.version != fingerprint and len(saga.version) == 12
    result = saga.run()
    assert saga.store.load(result.run_id)[0].version == saga.version
    pinned = Saga("v2", version="2024-06", clock=clock, registry=Registry())
    assert pinned.version == "2024-06"


def test_a_run_of_an_unknown_version_is_refused(make_store, clock) -> None:
    log: list[Any] = []
    old = expense_saga(make_store(), clock, "sync", log, version="1")
    first = old.run()
    new = expense_saga(make_store(), clock, "sync", log, version="2")
    with pytest.raises(VersionMismatch, match=r"'1'.*'2'") as caught:
        new.signal(first.run_id, "decision", "ok")
    assert caught.value.run_version == "1" and caught.value.versions == ("2",)
    seen = events_of(new)
    clock.advance(49 * HOUR)
    report = new.recover()
    assert list(report) == [] and first.run_id in report.skipped
    assert "version" in report.skipped[first.run_id]
    assert any(isinstance(e, ev.RecoverySkipped) for e in seen)


def test_an_older_version_kept_registered_continues_its_runs(make_store, clock) -> None:
    log: list[Any] = []
    store = make_store()
    v1 = expense_saga(store, clock, "sync", log, version="1")
    first = v1.run()
    v1_again = expense_saga(store, clock, "sync", log, version="1")
    v2 = Saga(
        "expense",
        store=store,
        clock=clock,
        registry=v1_again.registry,
        version="2",
        previous=[v1_again],
    )
    v2.step("only", lambda ctx: "v2")
    done = v2.signal(first.run_id, "decision", "yes")
    assert done is not None and done.ok and done.output == "paid"  # v1's steps
    assert v2.run().output == "v2"  # new runs: v2
    with pytest.raises(ConfigValueError, match="older definition"):
        Saga("other", store=store, registry=Registry(), previous=[v2])


# -- operating ----------------------------------------------------------------------------


def test_state_counts_waiting_runs(make_store, clock) -> None:
    log: list[Any] = []
    saga = expense_saga(make_store(), clock, "sync", log)
    for _ in range(3):
        saga.run()
    saga.refresh_health()
    snapshot = saga.snapshot()
    assert snapshot["waiting"] == 3 and snapshot["parked"] == 3
    assert snapshot["version"] == saga.version


def test_cancel_stops_a_run_this_process_drives(make_store) -> None:
    clock = FakeClock(autojump=False)
    saga = Saga("stop-me", store=make_store(), clock=clock, registry=Registry(), park_after=None)
    undone: list[str] = []
    saga.step("a", lambda ctx: "a", compensate=lambda ctx: undone.append("a"))

    @saga.step("wait")
    def wait(ctx: Any) -> Any:
        return ctx.wait_for("never")

    results: list[SagaResult] = []
    worker = threading.Thread(target=lambda: results.append(saga.run()))
    worker.start()
    while not saga._watchers:
        threading.Event().wait(0.001)
    run_id = next(iter(saga._watchers))
    assert saga.cancel(run_id) is None  # this process drives it: it stops itself
    worker.join(10)
    assert isinstance(results[0].error, RunCancelled) and undone == ["a"]


def test_a_heartbeat_sees_a_cancellation(make_store, clock) -> None:
    saga = Saga("beat-cancel", store=make_store(), clock=clock, registry=Registry())
    undone: list[str] = []
    saga.step("a", lambda ctx: "a", compensate=lambda ctx: undone.append("a"))

    @saga.step("long")
    def long(ctx: Any) -> None:
        saga.cancel(ctx.run_id)
        ctx.heartbeat()

    result = saga.run()
    assert isinstance(result.error, RunCancelled) and undone == ["a"]


def test_the_sync_faces_refuse_to_block_an_async_step(clock) -> None:
    saga = Saga("blocking", clock=clock, registry=Registry())

    @saga.step("wait")
    async def wait(ctx: Any) -> Any:
        return ctx.wait_for("go")

    result = asyncio.run(saga.run_async())
    assert isinstance(result.error, ConfigTypeError)
    assert "wait_for_async" in str(result.error)
