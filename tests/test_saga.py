"""Sagas: forward runs, compensation, retries, timeouts, idempotency, groups, events."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest

import buttress
from buttress import IdempotencyConflict, Permanent, Saga, Step, retry
from buttress.backends.memory import MemoryStore
from buttress.testing import FakeClock, capture_events


class Declined(Exception):
    """The payment provider said no."""


_names = itertools.count()


def build(log: list[str], *, fail_charge: BaseException | None = None, **charge_options):
    """reserve -> charge -> email, each logging what it does and undoes."""
    saga = Saga(f"checkout-{next(_names)}")

    @saga.step("reserve", compensate=lambda ctx: log.append("release"))
    def reserve(ctx):
        log.append("reserve")
        return {"reservation": ctx.input["order"]}

    def charge(ctx):
        log.append(f"charge#{ctx.attempt}")
        if fail_charge is not None:
            raise fail_charge
        return {"paid": ctx.results["reserve"]["reservation"]}

    saga.step("charge", charge, compensate=lambda ctx: log.append("refund"), **charge_options)

    @saga.step("email")
    def email(ctx):
        log.append("email")
        return "sent"

    return saga


def run(face, saga, *args, **kwargs):
    if face.is_async:
        return face.run(lambda: saga.run_async(*args, **kwargs))
    return saga.run(*args, **kwargs)


def test_completed_run_reports_every_step(face):
    """A run that completes returns the last output and a full, JSON-ready report."""
    log: list[str] = []
    result = run(face, build(log), {"order": 7})
    assert result.status == "completed"
    assert result.output == "sent"
    assert result.outputs["charge"] == {"paid": 7}
    assert [step.status for step in result.steps] == ["completed"] * 3
    assert log == ["reserve", "charge#1", "email"]
    report = result.to_dict()
    json.dumps(report)
    assert report["steps"][1]["history"][0]["error"] is None
    assert result.step("charge").attempts == 1


def test_failure_compensates_completed_steps_in_reverse_after_retries(face):
    """The failed step is retried, then completed steps are undone newest first."""
    log: list[str] = []
    saga = Saga("trip")
    for name in ("flight", "hotel", "car"):
        saga.step(
            name,
            lambda ctx, n=name: log.append(n) or n,
            compensate=lambda ctx, n=name: log.append(f"undo {n}"),
        )

    def pay(ctx):
        log.append(f"pay#{ctx.attempt}")
        raise Declined("no funds")

    saga.step(
        "pay", pay, compensate=lambda ctx: log.append("undo pay"), retry=retry(3, backoff=[0.0])
    )
    result = run(face, saga, {})
    assert result.status == "failed"
    assert isinstance(result.error, Declined)
    assert result.compensated is True
    assert log == [
        "flight",
        "hotel",
        "car",
        "pay#1",
        "pay#2",
        "pay#3",
        "undo car",
        "undo hotel",
        "undo flight",
    ]
    assert [s.status for s in result.steps] == ["compensated"] * 3 + ["failed"]
    assert result.step("pay").attempts == 3
    assert [h.error for h in result.step("pay").history] == ["Declined: no funds"] * 3


def test_permanent_errors_are_not_retried(face):
    """Permanent (or a type listed as permanent) fails the step at once."""
    log: list[str] = []
    saga = build(log, fail_charge=Permanent("card blocked"), retry=retry(5, backoff=[0.0]))
    assert run(face, saga, {"order": 1}).status == "failed"
    assert log.count("charge#1") == 1 and "charge#2" not in log
    log.clear()
    saga = build(log, fail_charge=Declined("no"), retry=retry(5, backoff=[0.0]), permanent=Declined)
    result = run(face, saga, {"order": 1})
    assert "charge#2" not in log
    assert isinstance(result.error, Declined)  # the original error is reported


def test_failing_compensation_is_retried_then_reported_and_others_still_run(face):
    """A compensation that keeps failing leaves compensation_failed; the rest still run."""
    log: list[str] = []
    saga = Saga("ship")
    saga.step("a", lambda ctx: "a", compensate=lambda ctx: log.append("undo a"))

    def broken_undo(ctx):
        log.append(f"undo b#{ctx.attempt}")
        raise RuntimeError("warehouse down")

    saga.step(
        "b", lambda ctx: "b", compensate=broken_undo, compensate_retry=retry(2, backoff=[0.0])
    )
    saga.step("c", lambda ctx: (_ for _ in ()).throw(Declined("x")))
    result = run(face, saga, {})
    assert result.compensated is False
    assert log == ["undo b#1", "undo b#2", "undo a"]
    assert result.step("b").status == "compensation_failed"
    assert "warehouse down" in str(result.step("b").compensation_error)
    assert result.step("a").status == "compensated"
    assert buttress.health()["status"] == "warn"
    assert buttress.state()["saga"]["ship"]["stuck"] == 1


def test_step_timeout_stops_the_attempt_before_the_next_starts():
    """Async: each attempt is cancelled at its timeout; attempts never overlap."""
    clock = FakeClock()
    intervals: list[tuple[float, float]] = []
    saga = Saga("slow", clock=clock)

    async def slow(ctx):
        start = clock.now()
        try:
            await clock.asleep(10)
        finally:
            intervals.append((start, clock.now()))

    saga.step("slow", slow, timeout=1.0, retry=retry(3, backoff=[0.5], clock=clock))
    result = asyncio.run(saga.run_async({}))
    assert result.status == "failed"
    assert isinstance(result.error, buttress.TimeoutExceeded)
    assert result.step("slow").uncertain is True
    assert intervals == [(0.0, 1.0), (1.5, 2.5), (3.0, 4.0)]


def test_uncertain_steps_are_compensated_only_when_declared(face):
    """A timed-out step may have acted: compensate it if compensate_uncertain=True."""
    clock = FakeClock()
    log: list[str] = []
    for uncertain in (False, True):
        saga = Saga(f"u{uncertain}", clock=clock)

        def late(ctx):
            clock.advance(5)
            return "done late"

        saga.step(
            "late",
            late,
            timeout=1.0,
            compensate=lambda ctx: log.append("undo late"),
            compensate_uncertain=uncertain,
        )
        result = run(face, saga, {})
        assert result.status == "failed"
    assert log == ["undo late"]


def test_run_timeout_compensates():
    """Past the saga's timeout, the remaining steps do not run and the rest is undone."""
    clock = FakeClock()
    log: list[str] = []
    saga = Saga("deadline", timeout=2.0, clock=clock)
    saga.step("one", lambda ctx: clock.advance(3) or "one", compensate=lambda c: log.append("u1"))
    saga.step("two", lambda ctx: log.append("two"))
    result = saga.run({})
    assert isinstance(result.error, buttress.TimeoutExceeded)
    assert log == ["u1"]
    assert result.step("two").status == "not_run"


def test_invalid_input_fails_before_any_step():
    """validate rejects the input before any side effect."""
    log: list[str] = []

    def check(value):
        if "order" not in value:
            raise ValueError("order is required")

    saga = Saga("validated", validate=check)
    saga.step("side-effect", lambda ctx: log.append("ran"))
    result = saga.run({})
    assert result.status == "failed"
    assert isinstance(result.error, ValueError)
    assert log == []
    assert [s.status for s in result.steps] == ["not_run"]


def test_idempotency_key_replays_conflicts_and_reruns_after_compensation(face):
    """Same key + input: stored result; other input: conflict; failed runs may rerun."""
    log: list[str] = []
    saga = build(log)
    first = run(face, saga, {"order": 1}, key="order-1", ttl=3600)
    again = run(face, saga, {"order": 1}, key="order-1")
    assert again.replayed and again.run_id == first.run_id and again.output == "sent"
    assert log.count("reserve") == 1
    with pytest.raises(IdempotencyConflict) as info:
        run(face, saga, {"order": 2}, key="order-1")
    assert info.value.run_id == first.run_id
    failing = build(log, fail_charge=Declined("no"))
    assert run(face, failing, {"order": 3}, key="order-3").status == "failed"
    assert run(face, failing, {"order": 3}, key="order-3").replayed is False


def test_expired_key_runs_again():
    """After ttl the key is free again."""
    log: list[str] = []
    saga = build(log)
    saga.run({"order": 1}, key="k", ttl=1e-9)
    assert saga.run({"order": 1}, key="k").replayed is False
    assert log.count("reserve") == 2


def test_concurrent_runs_with_one_key_execute_once():
    """Two concurrent runs with the same key: the second joins the first."""
    executions = []
    saga = Saga("join")

    async def slow(ctx):
        executions.append(1)
        await asyncio.sleep(0.05)
        return "value"

    saga.step("slow", slow)

    async def main():
        return await asyncio.gather(
            saga.run_async({"x": 1}, key="same"), saga.run_async({"x": 1}, key="same")
        )

    first, second = asyncio.run(main())
    assert executions == [1]
    assert first.output == second.output == "value"
    assert {first.replayed, second.replayed} == {False, True}


def test_compensation_failed_key_is_blocked_until_resolved():
    """A key whose run needs an operator refuses to run until resolve()."""
    saga = Saga("blocked")
    saga.step("a", lambda ctx: "a", compensate=lambda ctx: 1 / 0, compensate_retry=retry(1))
    saga.step("b", lambda ctx: (_ for _ in ()).throw(Declined()))
    stuck = saga.run({}, key="k")
    with pytest.raises(IdempotencyConflict, match="operator"):
        saga.run({}, key="k")
    saga.resolve(stuck.run_id)
    assert saga.run({}, key="k").run_id != stuck.run_id


def test_parallel_group_completes_together_and_compensates_its_members(face):
    """Members run concurrently; if one fails, completed members are undone too."""
    log: list[str] = []
    saga = Saga("fanout")
    saga.step("prepare", lambda ctx: "ready", compensate=lambda ctx: log.append("undo prepare"))
    saga.parallel(
        "notify",
        Step("email", lambda ctx: "emailed", compensate=lambda ctx: log.append("undo email")),
        Step("sms", lambda ctx: (_ for _ in ()).throw(Declined("sms down"))),
    )
    result = run(face, saga, {})
    assert result.status == "failed"
    assert result.step("email").status == "compensated"
    assert result.step("sms").status == "failed"
    assert log == ["undo email", "undo prepare"]


def test_mixed_sync_and_async_steps(face):
    """Sync and async steps and compensations mix in one saga."""
    log: list[str] = []
    saga = Saga("mixed")

    async def fetch(ctx):
        await asyncio.sleep(0)
        return 21

    async def undo(ctx):
        log.append("async undo")

    saga.step("fetch", fetch, compensate=undo)
    saga.step("double", lambda ctx: ctx.results["fetch"] * 2)
    assert run(face, saga, {}).output == 42
    saga.step("fail", lambda ctx: (_ for _ in ()).throw(Declined()))
    assert run(face, saga, {}).status == "failed"
    assert log == ["async undo"]


def test_cancelling_run_async_compensates_then_reraises():
    """Cancellation undoes what completed and propagates CancelledError."""
    log: list[str] = []
    saga = Saga("cancel")
    saga.step("done", lambda ctx: "done", compensate=lambda ctx: log.append("undo done"))

    async def hang(ctx):
        await asyncio.sleep(10)

    saga.step("hang", hang, compensate=lambda ctx: log.append("undo hang"))

    async def main():
        task = asyncio.ensure_future(saga.run_async({}))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert log == ["undo done"]
    assert saga.store.incomplete("cancel") == []


def test_events_trace_the_run(face):
    """Run, step and compensation events flow through the event system."""
    log: list[str] = []
    saga = build(log, fail_charge=Declined("no"), retry=retry(2, backoff=[0.0]))
    with capture_events() as captured:
        run(face, saga, {"order": 1})
    kinds = [e.kind for e in captured if isinstance(e, buttress.events.SagaEvent)]
    assert kinds == [
        "run_started",
        "step_started",
        "step_completed",
        "step_started",
        "step_retrying",
        "step_failed",
        "compensation_started",
        "compensation_completed",
        "run_failed",
    ]


def test_context_and_store_defaults():
    """Steps see input, results, run id and attempt; the default store is in memory."""
    seen = {}
    saga = Saga("ctx")
    saga.step("first", lambda ctx: "one")

    def second(ctx):
        seen.update(
            input=ctx.input,
            results=dict(ctx.results),
            run_id=ctx.run_id,
            step=ctx.step,
            attempt=ctx.attempt,
        )

    saga.step("second", second)
    result = saga.run({"k": "v"})
    assert seen == {
        "input": {"k": "v"},
        "results": {"first": "one"},
        "run_id": result.run_id,
        "step": "second",
        "attempt": 1,
    }
    assert isinstance(saga.store, MemoryStore)


@pytest.mark.parametrize(
    ("build_it", "message"),
    [
        (lambda: Saga(None), "needs a name"),  # type: ignore[arg-type]
        (lambda: Saga("s", store=object()), "store= must be a saga run log"),  # type: ignore[arg-type]
        (lambda: Saga("s", timeout=-1), "timeout must be"),
        (lambda: Step("a/b", lambda ctx: 1), "must not contain '/'"),
        (lambda: Step("a", 42), "fn must be callable"),  # type: ignore[arg-type]
        (lambda: Step("a", lambda c: 1, retry=3), "retry must be a buttress retry"),  # type: ignore[arg-type]
    ],
)
def test_bad_saga_options(build_it, message):
    """Saga and Step options are validated when built."""
    with pytest.raises((TypeError, ValueError), match=message):
        build_it()


def test_duplicate_step_names_are_refused():
    """Step names are unique within a saga."""
    saga = Saga("dup")
    saga.step("a", lambda ctx: 1)
    with pytest.raises(ValueError, match="unique"):
        saga.step("a", lambda ctx: 2)


def test_validate_accepts_a_pydantic_model():
    """A pydantic model class validates (and converts) the input before any step."""
    pydantic = pytest.importorskip("pydantic")

    class Order(pydantic.BaseModel):
        order: int
        amount: float

    seen = []
    saga = Saga("typed", validate=Order)
    saga.step("use", lambda ctx: seen.append(ctx.input) or ctx.input.amount)
    result = saga.run({"order": "7", "amount": 9.5})
    assert result.output == 9.5
    assert isinstance(seen[0], Order) and seen[0].order == 7
    bad = saga.run({"order": "seven"})
    assert bad.status == "failed"
    assert isinstance(bad.error, pydantic.ValidationError)
    assert len(seen) == 1


def test_a_separate_idempotency_store_learns_how_runs_end():
    """With idempotency= apart from store=, replays and ttl still work."""
    keys = MemoryStore()
    saga = Saga("separate", idempotency=keys, lease=0.01)
    saga.step("a", lambda ctx: 1)
    first = saga.run({"x": 1}, key="k")
    assert keys.load(first.run_id)[0].status == "completed"
    again = saga.run({"x": 1}, key="k")
    assert again.replayed and again.run_id == first.run_id


def test_history_records_timeouts_and_run_waits_for_async_steps_with_a_deadline():
    """A timed-out attempt is recorded as such; run() with a saga timeout awaits properly."""
    clock = FakeClock()
    saga = Saga("histories", timeout=50, clock=clock)

    async def slow(ctx):
        await clock.asleep(10)

    saga.step("slow", slow, timeout=1.0, retry=retry(2, backoff=[0.0], clock=clock))
    result = saga.run({})  # no "never awaited" warning (warnings are errors here)
    history = result.step("slow").history
    assert len(history) == 2
    assert all(h.error.startswith("TimeoutExceeded") for h in history)


def test_group_compensation_follows_completion_order_in_both_faces(face):
    """Members are undone newest first, by completion, under run() and run_async()."""
    import time as _time

    log: list[str] = []
    saga = Saga("order-of-undo")

    def slow(ctx):
        _time.sleep(0.05)
        return "slow"

    saga.parallel(
        "pair",
        Step("slow", slow, compensate=lambda ctx: log.append("undo slow")),
        Step("fast", lambda ctx: "fast", compensate=lambda ctx: log.append("undo fast")),
    )
    saga.step("fail", lambda ctx: (_ for _ in ()).throw(Declined()))
    result = run(face, saga, {})
    assert log == ["undo slow", "undo fast"]
    assert result.step("fast").group == "pair"


def test_sync_group_members_run_concurrently_under_run_async():
    """Sync members of a group run on threads under run_async, not one after another."""
    import time as _time

    saga = Saga("threads")
    saga.parallel(
        "two",
        Step("a", lambda ctx: _time.sleep(0.2)),
        Step("b", lambda ctx: _time.sleep(0.2)),
    )
    started = _time.monotonic()
    asyncio.run(saga.run_async({}))
    assert _time.monotonic() - started < 0.35


def test_run_inside_a_running_loop_says_what_to_do():
    """run() with async steps inside an event loop points to run_async."""
    saga = Saga("in-loop")

    async def step(ctx):
        return 1

    saga.step("a", step)

    async def main():
        with pytest.raises(RuntimeError, match="run_async"):
            saga.run({})

    asyncio.run(main())


def test_invalid_input_is_counted_and_announced():
    """A rejected input counts as a failed run and emits RunStarted then RunFailed."""

    def check(value):
        raise ValueError("bad")

    saga = Saga("counted", validate=check)
    saga.step("a", lambda ctx: 1)
    with capture_events() as captured:
        saga.run({})
    assert [e.kind for e in captured] == ["run_started", "run_failed"]
    assert saga.snapshot()["failed"] == 1


def test_replays_do_not_share_objects_with_the_stored_result():
    """Changing a replayed result does not change later replays."""
    saga = Saga("copies")
    saga.step("a", lambda ctx: {"items": [1]})
    saga.run({}, key="k")
    first = saga.run({}, key="k")
    first.output["items"].append(2)
    assert saga.run({}, key="k").output == {"items": [1]}


def test_default_compensation_retry_uses_the_saga_clock():
    """A failing compensation backs off on the saga's clock (no real sleeping)."""
    clock = FakeClock()
    saga = Saga("undo-clock", clock=clock)
    saga.step("a", lambda ctx: 1, compensate=lambda ctx: 1 / 0)
    saga.step("b", lambda ctx: (_ for _ in ()).throw(Declined()))
    result = saga.run({})
    assert result.compensated is False
    # five attempts, four backoff sleeps, all virtual, spread over seconds (issue 12)
    assert len(clock.sleeps) == 4
    bounds = zip(clock.sleeps, [0.25, 0.5, 1, 2], [0.5, 1, 2, 4], strict=True)
    assert all(low <= slept <= high for slept, low, high in bounds)
    assert sum(clock.sleeps) >= 3.75


def test_replays_are_announced_and_counted():
    """A replayed key emits RunReplayed and counts in the snapshot."""
    saga = Saga("visible")
    saga.step("a", lambda ctx: 1)
    saga.run({}, key="k")
    with capture_events() as captured:
        saga.run({}, key="k")
    assert [e.kind for e in captured] == ["run_replayed"]
    assert saga.snapshot()["replayed"] == 1
