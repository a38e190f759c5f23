"""Sagas under real load (issue 12): one storage rule on every store, inputs and keys
refused before anything runs, honest health, injectable wall time, sane defaults, an
event loop that is never blocked, and one loop per sync run."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from buttress import ButtressError, ConfigTypeError, ConfigValueError, Permanent, Saga, health
from buttress.backends import RunRecord
from buttress.backends.memory import MemoryStore
from buttress.backends.sqlite import SQLiteStore
from buttress.saga import Step, StoredError
from buttress.testing import FakeClock


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """One fresh store of each kind the runner ships."""
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "sqlite":
        made: Any = SQLiteStore(tmp_path / "runs.db")
    else:
        from buttress.backends.postgres import PostgresStore

        made = PostgresStore(
            request.getfixturevalue("postgres_url"),
            schema=request.getfixturevalue("postgres_schema"),
        )
    yield made
    made.close()


ODD_OUTPUTS: list[tuple[Any, Any]] = [
    (float("nan"), "nan"),
    (float("inf"), "inf"),
    (float("-inf"), "-inf"),
    ([1.0, float("nan")], "[1.0, nan]"),
    ({"a": float("inf")}, "{'a': inf}"),
    ({1, 2}, "{1, 2}"),
    ((1, "two"), [1, "two"]),
    ({1: "a"}, {"1": "a"}),
    ("nul\x00and\ud800", "nul\x00and\ud800"),
    (["\x00"], ["\x00"]),
]


@pytest.mark.parametrize(("output", "stored"), ODD_OUTPUTS)
def test_step_outputs_follow_one_rule_on_every_store(any_store, output, stored):
    """NaN, infinities and non-JSON outputs are stored the same way on every store and
    never fail a write after the step ran: the run completes, nothing is stranded."""
    saga = Saga("odd", store=any_store)
    saga.step("make", lambda ctx: output)
    result = saga.run({}, key="k")  # keyed: every store keeps the report
    assert result.status == "completed"
    assert result.output is output  # this process keeps the live value
    loaded = any_store.load(result.run_id)
    assert loaded is not None
    record, entries = loaded
    assert record.status == "completed"
    assert [e.output for e in entries if e.event == "completed"] == [stored]
    assert record.result is not None
    assert record.result["outputs"]["make"] == stored
    assert saga.recover() == []
    assert any_store.incomplete("odd") == []


def test_a_nan_output_on_postgres_is_not_stranded(postgres_url, postgres_schema):
    """The defect of issue 12: a NaN output once left the run running on PostgreSQL."""
    from buttress.backends.postgres import PostgresStore

    store = PostgresStore(postgres_url, schema=postgres_schema)
    effects: list[int] = []
    saga = Saga("nan", store=store)
    saga.step("pay", lambda ctx: effects.append(1) or float("nan"))
    saga.step("after", lambda ctx: ctx.results["pay"])
    try:
        result = saga.run({"order": 1}, key="k")
        assert result.status == "completed"
        assert saga.recover() == []
        assert saga.run({"order": 1}, key="k").replayed
        assert effects == [1]
    finally:
        store.close()


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        (object(), ConfigTypeError, "JSON-serialisable"),
        ({"x": {1, 2}}, ConfigTypeError, "JSON-serialisable"),
        (float("nan"), ConfigValueError, "strict JSON"),
        ({"total": float("inf")}, ConfigValueError, "strict JSON"),
    ],
)
def test_an_input_that_cannot_be_stored_is_refused_before_any_step(any_store, value, error, words):
    """The error names the saga and input; no step ran and no run was recorded."""
    ran: list[int] = []
    saga = Saga("orders", store=any_store)
    saga.step("one", lambda ctx: ran.append(1))
    with pytest.raises(error, match=words) as info:
        saga.run(value)
    assert "input of saga 'orders'" in str(info.value)
    with pytest.raises(error, match="input of saga 'orders'"):
        asyncio.run(saga.run_async(value))
    assert ran == []
    assert any_store.runs(saga="orders") == []


@pytest.mark.parametrize("key", ["a\x00b", "\ud800", "x\udfffy"])
def test_a_key_no_store_can_hold_is_refused_on_every_store(any_store, key):
    """NUL and lone surrogates in a key: ConfigValueError naming key, before anything."""
    ran: list[int] = []
    saga = Saga("keys", store=any_store)
    saga.step("one", lambda ctx: ran.append(1))
    with pytest.raises(ConfigValueError, match="key of saga 'keys'"):
        saga.run({}, key=key)
    assert ran == []
    assert any_store.runs(saga="keys") == []


def test_names_no_store_can_hold_are_refused():
    """A saga or step name with NUL or a lone surrogate is refused when built."""
    with pytest.raises(ConfigValueError, match="name must not contain NUL"):
        Saga("a\x00b")
    saga = Saga("fine")
    with pytest.raises(ConfigValueError, match="step name must not contain NUL"):
        saga.step("\ud800", lambda ctx: 1)


def test_error_texts_are_made_storable(any_store):
    """A step error whose message holds NUL or a lone surrogate is logged escaped."""
    saga = Saga("errors", store=any_store)

    def fail(ctx: Any) -> None:
        raise Permanent("bad\x00byte \ud800")

    saga.step("one", fail)
    result = saga.run({})
    assert result.status == "failed"
    loaded = any_store.load(result.run_id)
    assert loaded is not None
    failed = [e.error for e in loaded[1] if e.event == "failed"]
    assert failed == ["Permanent: bad\\x00byte \\ud800"]


def test_stored_error_is_a_buttress_error():
    """The stand-in for an exception read back from the log derives from ButtressError."""
    assert issubclass(StoredError, ButtressError)


# -- defaults ---------------------------------------------------------------------------------


def test_a_saga_with_no_steps_is_refused_when_run():
    """Running an empty saga is a configuration error, on both faces."""
    saga = Saga("empty")
    with pytest.raises(ConfigValueError, match="has no steps"):
        saga.run({})
    with pytest.raises(ConfigValueError, match="has no steps"):
        asyncio.run(saga.run_async({}))


def test_compensated_means_rolled_back():
    """compensated is False on a completed run, True on a fully compensated one."""
    saga = Saga("flags")
    saga.step("a", lambda ctx: 1, compensate=lambda ctx: None)
    saga.step("b", lambda ctx: ctx.input["fail"] and (_ for _ in ()).throw(Permanent("no")))
    assert saga.run({"fail": False}).compensated is False
    assert saga.run({"fail": True}).compensated is True


# -- time -------------------------------------------------------------------------------------


def test_lease_expiry_follows_the_saga_clock():
    """A run held by a live owner elsewhere is taken over once the fake clock passes its
    lease, with no real waiting."""
    clock = FakeClock(wall=1_000_000.0)
    store = MemoryStore()
    saga = Saga("leased", store=store, clock=clock, lease=30)
    saga.step("one", lambda ctx: "done")
    store.create_run(
        RunRecord(
            "r1",
            "leased",
            "running",
            {},
            created_at=clock.wall(),
            updated_at=clock.wall(),
            owner="elsewhere:1:x",
            lease_until=clock.wall() + 30,
        )
    )
    assert saga.recover() == []
    clock.advance(29)
    assert saga.recover() == []
    clock.advance(2)
    assert [r.run_id for r in saga.recover()] == ["r1"]


def test_log_times_and_key_ttls_use_the_saga_clock():
    """Log times come from clock.wall(); a keyed run's TTL expires on the fake clock."""
    clock = FakeClock(wall=5_000.0)
    store = MemoryStore()
    saga = Saga("ttl", store=store, clock=clock)
    ran: list[int] = []
    saga.step("one", lambda ctx: ran.append(1))
    first = saga.run({}, key="k", ttl=60)
    loaded = store.load(first.run_id)
    assert loaded is not None
    assert all(e.at == 5_000.0 for e in loaded[1])
    assert saga.run({}, key="k", ttl=60).replayed
    clock.advance(61)
    assert not saga.run({}, key="k", ttl=60).replayed
    assert ran == [1, 1]


# -- health -----------------------------------------------------------------------------------


class CountingStore(SQLiteStore):
    """A SQLite store that counts the queries health makes and can be made to fail."""

    queries = 0
    down = False

    def counts(self, saga: str) -> dict[str, int]:
        type(self).queries += 1
        if self.down:
            raise ButtressError("the database is unreachable")
        return super().counts(saga)


def test_health_reports_a_store_that_is_down(tmp_path):
    """An unreachable store makes health fail with the error, not pass."""
    store = CountingStore(tmp_path / "runs.db")
    saga = Saga("down", store=store)
    saga.step("one", lambda ctx: 1)
    saga.refresh_health()
    assert saga.health_check()[0] == "pass"
    store.down = True
    saga.refresh_health()
    status, _, output = saga.health_check()
    assert status == "fail"
    assert "unreachable" in output
    assert health()["status"] == "warn"  # degraded: the saga is not critical=True
    assert health()["checks"]["down:saga"][0]["status"] == "fail"
    store.close()


def test_health_never_queries_the_store_itself(tmp_path):
    """health() reads a cached answer; a stale one is refreshed on a background thread."""
    clock = FakeClock()
    store = CountingStore(tmp_path / "runs.db")
    CountingStore.queries = 0
    saga = Saga("cached", store=store, clock=clock, health_interval=5)
    saga.step("one", lambda ctx: 1)
    saga.refresh_health()
    assert CountingStore.queries == 1
    main = threading.current_thread()
    seen: list[threading.Thread] = []
    original = CountingStore.counts

    def spy(self: CountingStore, saga: str) -> dict[str, int]:
        seen.append(threading.current_thread())
        return original(self, saga)

    CountingStore.counts = spy  # type: ignore[method-assign]
    try:
        for _ in range(100):
            assert saga.health_check()[0] == "pass"
        assert seen == []  # fresh: no query at all
        clock.advance(6)
        assert saga.health_check()[0] == "pass"  # stale: answered from the cache...
        for _ in range(200):
            if seen:
                break
            threading.Event().wait(0.01)
        assert seen and main not in seen  # ...and refreshed off the caller's thread
    finally:
        CountingStore.counts = original  # type: ignore[method-assign]
    store.close()


# -- the event loop ---------------------------------------------------------------------------


def test_run_async_runs_sync_steps_off_the_loop(tmp_path):
    """A sync step that waits for the loop to do something gets it: it is not on the loop
    thread (nor is its compensation, nor a store without async twins)."""
    store = SQLiteStore(tmp_path / "runs.db")

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        seen: list[str] = []

        def needs_the_loop(label: str) -> None:
            done = threading.Event()
            loop.call_soon_threadsafe(done.set)
            assert done.wait(5), f"{label} ran on the loop thread"
            seen.append(label)

        saga = Saga("offloop", store=store)
        saga.step(
            "a",
            lambda ctx: needs_the_loop("a"),
            compensate=lambda ctx: needs_the_loop("undo a"),
        )
        saga.step("b", lambda ctx: (_ for _ in ()).throw(Permanent("no")))
        result = await saga.run_async({})
        assert result.status == "failed" and result.compensated
        return seen

    assert asyncio.run(main()) == ["a", "undo a"]
    store.close()


def test_a_cancelled_run_async_waits_for_its_sync_step_then_compensates():
    """Cancelled while a sync step runs on its thread: the step's real outcome is
    recorded, the run compensates it, and CancelledError surfaces afterwards."""
    started, release = threading.Event(), threading.Event()
    undone: list[str] = []
    saga = Saga("cancel-sync")

    def slow(ctx: Any) -> str:
        started.set()
        release.wait(5)
        return "charged"

    saga.step("charge", slow, compensate=lambda ctx: undone.append(ctx.results["charge"]))

    async def main() -> None:
        task = asyncio.ensure_future(saga.run_async({}))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        await asyncio.sleep(0)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert undone == ["charged"]


def test_run_uses_one_loop_for_every_async_step_and_compensation():
    """Under run(), forward steps, parallel members and compensations share one loop."""
    loops: list[int] = []

    async def note(ctx: Any) -> str:
        loops.append(id(asyncio.get_running_loop()))
        return ctx.step

    saga = Saga("one-loop")
    saga.step("a", note, compensate=note)
    saga.parallel("group", Step("b", note, compensate=note), Step("c", note))
    saga.step("fail", lambda ctx: (_ for _ in ()).throw(Permanent("no")))
    result = saga.run({})
    assert result.status == "failed" and result.compensated
    assert len(loops) == 5  # a, b, c forward; b, a compensated
    assert len(set(loops)) == 1


def test_sqlite_group_commit_isolates_a_failing_call(tmp_path):
    """Concurrent async calls share a transaction; a failing one fails alone, the others
    are committed (seen from a second connection) before their callers resume."""
    store = SQLiteStore(tmp_path / "runs.db")

    def record(run_id: str) -> RunRecord:
        return RunRecord(run_id, "group", "running", {}, created_at=1.0, updated_at=1.0)

    async def main() -> list[Any]:
        store.create_run(record("taken"))
        calls = [store.acreate_run(record(f"r{i}")) for i in range(20)]
        calls.insert(7, store.acreate_run(record("taken")))  # a duplicate primary key
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert [type(o).__name__ for o in outcomes].count("BackendError") == 1
    assert isinstance(outcomes[7], ButtressError)
    other = SQLiteStore(tmp_path / "runs.db")
    assert len(other.runs(saga="group", limit=100)) == 21
    other.close()
    store.close()
    with pytest.raises(ButtressError, match="closed"):
        asyncio.run(store.aload("r1"))
