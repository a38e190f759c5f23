"""The store contract for durable waits, on every saga store (memory, SQLite, PostgreSQL;
sync and async faces): the waiting status, a run's version/deadline/parent, due(),
send_signal() and signals(), their concurrency with write(), and the in-place upgrade
of SQLite and PostgreSQL databases made by the previous schema version.

(Only the memory store drops finished runs, when it is full: the SQL stores keep every
run, its log and its signals until an operator deletes them.)
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from buttress.backends import (
    ACTIVE,
    CANCEL_SIGNAL,
    INCOMPLETE,
    WAITING,
    AsyncSagaStore,
    LogEntry,
    RunRecord,
    SagaStore,
    Signal,
    run_changes,
)
from buttress.backends.memory import MemoryStore
from buttress.backends.sqlite import SQLiteStore
from buttress.exceptions import BackendError

NOW = 2_000_000.0


class Face:
    """A store called through its sync methods or through its async twins, and a way to
    open another store on the same data (another connection, for the SQL stores)."""

    def __init__(self, store: Any, is_async: bool, reopen: Callable[[], Any]) -> None:
        self.store = store
        self.loop = asyncio.new_event_loop() if is_async else None
        self._reopen = reopen
        self._opened: list[Any] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if self.loop is None:
            return getattr(self.store, name)  # type: ignore[no-any-return]
        method = getattr(self.store, "a" + name)
        loop = self.loop
        return lambda *args, **kwargs: loop.run_until_complete(method(*args, **kwargs))

    def another(self) -> Any:
        """A second store (sync face) over the same runs."""
        made = self._reopen()
        if made is not self.store:
            self._opened.append(made)
        return made

    def close(self) -> None:
        if self.loop is not None:
            if hasattr(self.store, "aclose"):
                self.loop.run_until_complete(self.store.aclose())
            self.loop.close()
        for made in [*self._opened, self.store]:
            if hasattr(made, "close"):
                made.close()


def _postgres(request: pytest.FixtureRequest) -> Callable[[], Any]:
    from services import import_client

    import_client("psycopg", "postgres", "PostgreSQL")
    from buttress.backends.postgres import PostgresStore

    url = request.getfixturevalue("postgres_url")
    schema = request.getfixturevalue("postgres_schema")
    return lambda: PostgresStore(url, schema=schema)


KINDS = ["memory", "sqlite", "postgres"]


@pytest.fixture(params=[f"{k}-{face}" for k in KINDS for face in ("sync", "async")])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Face]:
    """A fresh store of each kind, through each of its faces."""
    kind, face = request.param.split("-")
    opener: Callable[[], Any]
    if kind == "memory":
        memory = MemoryStore()
        opener = lambda: memory  # noqa: E731 - one process, one store
    elif kind == "sqlite":
        opener = lambda: SQLiteStore(tmp_path / "runs.db")  # noqa: E731
    else:
        opener = _postgres(request)
    made = Face(opener(), face == "async", opener)
    yield made
    made.close()


def run(run_id: str = "r1", **changes: Any) -> RunRecord:
    fields: dict[str, Any] = {
        "run_id": run_id,
        "saga": "expense",
        "status": "running",
        "input": {"amount": 120},
        "created_at": NOW,
        "updated_at": NOW,
        "owner": "host:1:a",
        "lease_until": NOW + 30,
    }
    fields.update(changes)
    return RunRecord(**fields)


def park(store: Any, run_id: str, *, wake_at: float | None, waiting_for: str | None) -> None:
    store.write(
        run_id,
        [],
        lease_until=NOW + 30,
        status=WAITING,
        wake_at=wake_at,
        waiting_for=waiting_for,
    )


def fields(r: RunRecord) -> tuple[Any, ...]:
    return (r.status, r.lease_until, r.wake_at, r.waiting_for)


# -- the statuses ------------------------------------------------------------------------------


def test_waiting_is_incomplete_but_not_active():
    assert WAITING == "waiting"
    assert WAITING in INCOMPLETE
    assert WAITING not in ACTIVE
    assert set(ACTIVE) < set(INCOMPLETE)


def test_run_changes_for_the_sql_stores():
    """waiting records when and what and releases the lease; another status clears them;
    no status leaves them."""
    parked = run_changes(
        [],
        lease_until=5.0,
        status=WAITING,
        error=None,
        result=None,
        expires_at=None,
        wake_at=9.0,
        waiting_for="approve",
    )
    assert parked == {
        "lease_until": 0.0,
        "status": WAITING,
        "wake_at": 9.0,
        "waiting_for": "approve",
    }
    resumed = run_changes(
        [], lease_until=5.0, status="running", error=None, result=None, expires_at=None
    )
    assert resumed == {
        "lease_until": 5.0,
        "status": "running",
        "wake_at": None,
        "waiting_for": None,
    }
    done = run_changes(
        [], lease_until=None, status="completed", error=None, result={"a": 1}, expires_at=7.0
    )
    assert (done["wake_at"], done["waiting_for"], done["lease_until"]) == (None, None, 0.0)
    renewed = run_changes(
        [],
        lease_until=5.0,
        status=None,
        error=None,
        result=None,
        expires_at=None,
        wake_at=1.0,
        waiting_for="x",
    )
    assert renewed == {"lease_until": 5.0}


def test_every_store_meets_the_protocols(store):
    assert isinstance(store.store, SagaStore)
    assert isinstance(store.store, AsyncSagaStore)


# -- the new fields of a run -------------------------------------------------------------------


def test_version_deadline_and_parent_are_stored_and_read_back(store):
    store.create_run(run("child", version="v2", deadline=NOW + 86_400, parent="parent-1"))
    store.create_run(run("plain", created_at=NOW + 1))
    loaded = store.load("child")
    assert loaded is not None
    child = loaded[0]
    assert (child.version, child.deadline, child.parent) == ("v2", NOW + 86_400, "parent-1")
    assert (child.wake_at, child.waiting_for) == (None, None)
    plain = store.load("plain")[0]
    assert (plain.version, plain.deadline, plain.parent) == (None, None, None)
    listed = {r.run_id: r for r in store.runs()}
    assert (listed["child"].version, listed["child"].deadline, listed["child"].parent) == (
        "v2",
        NOW + 86_400,
        "parent-1",
    )
    park(store, "child", wake_at=NOW + 5, waiting_for="approve")
    assert (store.runs(status=WAITING)[0].wake_at, store.runs()[1].waiting_for) == (
        NOW + 5,
        "approve",
    )


def test_claim_key_stores_the_new_fields_and_returns_them(store):
    first = store.claim_key(
        run("k1", key="k", input_hash="h", version="v1", deadline=NOW + 9, parent="p"),
        now=NOW,
    )
    assert first.outcome == "new"
    assert (store.load("k1")[0].version, store.load("k1")[0].parent) == ("v1", "p")
    park(store, "k1", wake_at=NOW + 60, waiting_for="approve")
    # A parked run holds no lease: a claim of its key resumes it, and reads it back whole.
    again = store.claim_key(run("k2", key="k", input_hash="h", owner="other"), now=NOW + 1)
    assert (again.outcome, again.run_id) == ("resume", "k1")
    held = again.record
    assert (held.version, held.deadline, held.parent) == ("v1", NOW + 9, "p")
    assert (held.status, held.wake_at, held.waiting_for) == (WAITING, NOW + 60, "approve")
    assert store.load("k2") is None


# -- write() with the waiting status -----------------------------------------------------------


def test_a_waiting_write_parks_the_run_and_another_status_clears_it(store):
    store.create_run(run())
    entry = LogEntry(1, "approve", "waiting", at=NOW + 1)
    store.write(
        "r1",
        [entry],
        lease_until=NOW + 40,
        status=WAITING,
        wake_at=NOW + 100,
        waiting_for="approve",
    )
    parked, entries = store.load("r1")
    assert fields(parked) == (WAITING, 0.0, NOW + 100, "approve")
    assert parked.updated_at == NOW + 1 and [e.event for e in entries] == ["waiting"]

    store.write("r1", [], lease_until=NOW + 50)  # no status: the wait stays
    assert fields(store.load("r1")[0]) == (WAITING, NOW + 50, NOW + 100, "approve")

    store.write("r1", [], lease_until=NOW + 60, status="running")
    assert fields(store.load("r1")[0]) == ("running", NOW + 60, None, None)

    park(store, "r1", wake_at=None, waiting_for="approve")  # only a signal wakes it
    assert fields(store.load("r1")[0]) == (WAITING, 0.0, None, "approve")
    park(store, "r1", wake_at=NOW + 7, waiting_for=None)  # a sleep
    assert fields(store.load("r1")[0]) == (WAITING, 0.0, NOW + 7, None)

    store.write("r1", [], status="compensating", lease_until=NOW + 70)
    assert fields(store.load("r1")[0]) == ("compensating", NOW + 70, None, None)
    park(store, "r1", wake_at=NOW + 8, waiting_for="x")
    store.write("r1", [], status="completed", result={"ok": True}, expires_at=NOW + 99)
    done = store.load("r1")[0]
    assert fields(done) == ("completed", 0.0, None, None)
    assert (done.result, done.expires_at) == ({"ok": True}, NOW + 99)


def test_incomplete_leaves_waiting_runs_to_due(store):
    for n, status in enumerate(["running", "compensating", WAITING, WAITING, "completed"]):
        store.create_run(run(f"r{n}", created_at=NOW + n))
        if status == WAITING:
            park(store, f"r{n}", wake_at=NOW if n == 2 else None, waiting_for="go")
        elif status != "running":
            store.write(f"r{n}", [], status=status)
    assert store.incomplete("expense") == ["r0", "r1"]
    assert store.due("expense", now=NOW) == ["r2"]


def test_a_parked_run_can_be_claimed_at_once_and_a_final_one_cannot(store):
    """A waiting run holds no lease: the worker that finds it due takes it over."""
    store.create_run(run())
    park(store, "r1", wake_at=NOW, waiting_for=None)
    assert store.claim_run("r1", "worker", now=NOW, lease_until=NOW + 30)
    assert not store.claim_run("r1", "late", now=NOW + 1, lease_until=NOW + 30)
    taken = store.load("r1")[0]
    assert (taken.owner, taken.lease_until, taken.status) == ("worker", NOW + 30, WAITING)


# -- due() -------------------------------------------------------------------------------------


def test_due_lists_the_waiting_runs_that_are_due_earliest_first(store):
    wakes = {"a": NOW + 5, "b": NOW + 1, "c": NOW + 3, "d": NOW + 3, "e": NOW + 50}
    for run_id, wake_at in wakes.items():
        store.create_run(run(run_id))
        park(store, run_id, wake_at=wake_at, waiting_for=None)
    store.create_run(run("signal-only"))
    park(store, "signal-only", wake_at=None, waiting_for="go")
    store.create_run(run("other-saga", saga="billing"))
    park(store, "other-saga", wake_at=NOW, waiting_for=None)
    store.create_run(run("was-waiting"))
    park(store, "was-waiting", wake_at=NOW, waiting_for=None)
    store.write("was-waiting", [], status="running", lease_until=NOW + 30)
    store.create_run(run("running"))

    assert store.due("expense", now=NOW) == []
    assert store.due("expense", now=NOW + 1) == ["b"]  # wake_at == now is due
    assert store.due("expense", now=NOW + 5) == ["b", "c", "d", "a"]  # ties: by run id
    assert store.due("expense", now=NOW + 5, limit=2) == ["b", "c"]
    assert store.due("expense", now=NOW + 1000) == ["b", "c", "d", "a", "e"]
    assert store.due("billing", now=NOW) == ["other-saga"]
    assert store.due("nobody", now=NOW + 1000) == []


def test_due_honours_its_default_limit(store):
    if store.store.__class__.__name__ == "PostgresStore":
        pytest.skip("1001 runs through the network; the limit is a plain LIMIT")
    for n in range(1001):
        store.create_run(run(f"r{n:04}"))
        park(store, f"r{n:04}", wake_at=NOW + n, waiting_for=None)
    found = store.due("expense", now=NOW + 5000)
    assert len(found) == 1000 and found[0] == "r0000" and found[-1] == "r0999"


# -- send_signal() and signals() ---------------------------------------------------------------


def test_a_signal_for_no_run_is_not_stored(store):
    assert store.send_signal("ghost", "approve", {"ok": True}, at=NOW) is None
    assert store.signals("ghost") == []


def test_a_signal_wakes_the_run_that_waits_for_it(store):
    store.create_run(run())
    park(store, "r1", wake_at=None, waiting_for="approve")
    other = store.send_signal("r1", "comment", "looks fine", at=NOW + 1)
    assert (other.run_id, other.status, other.wake_at) == ("r1", WAITING, None)
    assert store.due("expense", now=NOW + 10**6) == []

    woken = store.send_signal("r1", "approve", {"by": "ann"}, at=NOW + 2)
    assert fields(woken) == (WAITING, 0.0, NOW + 2, "approve")
    assert store.load("r1")[0].wake_at == NOW + 2
    assert store.due("expense", now=NOW + 2) == ["r1"]
    later = store.send_signal("r1", "approve", {"by": "bob"}, at=NOW + 3)
    assert later.wake_at == NOW + 2  # already due earlier: stays

    sent = store.signals("r1")
    assert [(s.name, s.payload, s.sent_at) for s in sent] == [
        ("comment", "looks fine", NOW + 1),
        ("approve", {"by": "ann"}, NOW + 2),
        ("approve", {"by": "bob"}, NOW + 3),
    ]
    assert all(isinstance(s, Signal) for s in sent)
    assert [s.id for s in sent] == sorted({s.id for s in sent})


def test_a_signal_brings_a_timed_wait_forward_never_back(store):
    store.create_run(run("early"))
    park(store, "early", wake_at=NOW + 100, waiting_for="approve")
    assert store.send_signal("early", "approve", 1, at=NOW + 10).wake_at == NOW + 10
    store.create_run(run("late"))
    park(store, "late", wake_at=NOW + 100, waiting_for="approve")
    assert store.send_signal("late", "approve", 1, at=NOW + 500).wake_at == NOW + 100


def test_the_cancel_signal_wakes_any_waiting_run(store):
    store.create_run(run("sleeping"))
    park(store, "sleeping", wake_at=NOW + 3600, waiting_for=None)
    store.create_run(run("waiting"))
    park(store, "waiting", wake_at=None, waiting_for="approve")
    for run_id in ("sleeping", "waiting"):
        woken = store.send_signal(run_id, CANCEL_SIGNAL, {"reason": "user"}, at=NOW + 1)
        assert (woken.status, woken.wake_at) == (WAITING, NOW + 1)
        assert [s.name for s in store.signals(run_id)] == [CANCEL_SIGNAL]
    assert store.due("expense", now=NOW + 1) == ["sleeping", "waiting"]


def test_a_signal_to_a_run_that_is_not_waiting_is_kept_for_later(store):
    """Sent before the wait began (or after the run ended): stored, nothing woken."""
    store.create_run(run("busy"))
    kept = store.send_signal("busy", "approve", True, at=NOW + 1)
    assert (kept.status, kept.wake_at, kept.lease_until) == ("running", None, NOW + 30)
    store.create_run(run("done"))
    store.write("done", [], status="completed", result={})
    assert store.send_signal("done", CANCEL_SIGNAL, None, at=NOW + 2).wake_at is None
    assert [s.payload for s in store.signals("busy")] == [True]
    assert [s.payload for s in store.signals("done")] == [None]
    # Parking afterwards records what the write says (the saga reads the kept signal).
    park(store, "busy", wake_at=None, waiting_for="approve")
    assert store.load("busy")[0].wake_at is None


def test_signal_ids_increase_in_the_order_they_were_received(store):
    for run_id in ("a", "b"):
        store.create_run(run(run_id))
    for n in range(6):
        store.send_signal("ab"[n % 2], f"s{n}", n, at=NOW + n)
    ids = [s.id for r in ("a", "b") for s in store.signals(r)]
    by_order = sorted(ids)
    assert [s.payload for s in store.signals("a")] == [0, 2, 4]
    assert [s.payload for s in store.signals("b")] == [1, 3, 5]
    # Across runs too: the n-th signal received has the n-th smallest id.
    received = sorted(
        (s for r in ("a", "b") for s in store.signals(r)), key=lambda signal: signal.id
    )
    assert [s.payload for s in received] == [0, 1, 2, 3, 4, 5]
    assert len(set(by_order)) == 6


ODD_VALUES = [
    pytest.param({"nested": {"list": [1, [2, [3, {"deep": None}]]], "t": True}}, id="nested"),
    pytest.param(2**200, id="huge-int"),
    pytest.param(-(2**64) - 1, id="huge-negative"),
    pytest.param([0.1, 1e308, -0.0, 5e-324], id="floats"),
    pytest.param(
        "emoji \U0001f600 rtl \u05e9\u05dc\u05d5\u05dd e\u0301 \u2028\ufeff", id="unicode"
    ),
    pytest.param({"k\U0001f511": "nul\x00inside", "": [], "\u00e9": {}}, id="odd-keys-and-nul"),
    pytest.param("lone \ud800 surrogate", id="lone-surrogate"),
    pytest.param(None, id="null"),
    pytest.param("", id="empty"),
]


@pytest.mark.parametrize("payload", ODD_VALUES)
def test_payloads_come_back_equal(store, payload):
    store.create_run(run())
    store.send_signal("r1", "data", payload, at=NOW)
    assert store.signals("r1")[0].payload == payload


def test_names_and_texts_with_odd_unicode_come_back_equal(store):
    name = "approve \U0001f44d \u05d0 e\u0301 \u2028 \\ ' \" ; --"
    store.create_run(run(version="v \u00e9\U0001f600", parent="p\u2028 '\""))
    park(store, "r1", wake_at=None, waiting_for=name)
    woken = store.send_signal("r1", name, [name], at=NOW + 1)
    assert (woken.waiting_for, woken.wake_at) == (name, NOW + 1)
    signal = store.signals("r1")[0]
    assert (signal.name, signal.payload) == (name, [name])
    loaded = store.load("r1")[0]
    assert (loaded.version, loaded.parent) == ("v \u00e9\U0001f600", "p\u2028 '\"")


# -- concurrency: send_signal against write ---------------------------------------------------


def _together(*jobs: Callable[[], None]) -> None:
    barrier = threading.Barrier(len(jobs))
    errors: list[BaseException] = []

    def go(job: Callable[[], None]) -> None:
        barrier.wait()
        try:
            job()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_a_signal_racing_the_write_that_parks_the_run_is_never_lost(store):
    """One thread parks runs (waiting for "go"), another signals them at the same time,
    each through a store of its own: each signal lands wholly before the park (the run
    stays parked, the signal kept) or wholly after it (the run is due), and the record
    send_signal returns says which."""
    count = 40
    for n in range(count):
        store.create_run(run(f"c{n}"))
    parker, signaller = store.another(), store.another()
    answers: dict[int, RunRecord] = {}

    def park_all() -> None:
        for n in range(count):
            parker.write(
                f"c{n}",
                [LogEntry(1, "go", "waiting", at=NOW)],
                status=WAITING,
                wake_at=None,
                waiting_for="go",
            )

    def signal_all() -> None:
        for n in range(count):
            answers[n] = signaller.send_signal(f"c{n}", "go", n, at=NOW + n)

    _together(park_all, signal_all)
    due = set(store.due("expense", now=NOW + count))
    for n in range(count):
        final = store.load(f"c{n}")[0]
        assert final.status == WAITING and final.waiting_for == "go"
        assert [s.payload for s in store.signals(f"c{n}")] == [n]
        if answers[n].status == WAITING:  # signalled after the park: woken
            assert final.wake_at == NOW + n and f"c{n}" in due
        else:  # before it: kept, and the park recorded what it was told
            assert answers[n].status == "running"
            assert final.wake_at is None and f"c{n}" not in due


def test_a_signal_racing_the_write_that_resumes_the_run_never_wakes_a_running_run(store):
    """Parked runs resumed (their timeout fired) while signals arrive: whatever the order,
    a run that is not waiting keeps no wake_at (a signal never writes over a resume)."""
    count = 40
    for n in range(count):
        store.create_run(run(f"u{n}"))
        park(store, f"u{n}", wake_at=NOW + 1000, waiting_for="go")
    resumer, signaller = store.another(), store.another()

    def resume_all() -> None:
        for n in range(count):
            resumer.write(f"u{n}", [], lease_until=NOW + 30, status="running")

    def signal_all() -> None:
        for n in range(count):
            signaller.send_signal(f"u{n}", "go", n, at=NOW + n)

    _together(resume_all, signal_all)
    for n in range(count):
        final = store.load(f"u{n}")[0]
        assert fields(final) == ("running", NOW + 30, None, None)
        assert [s.payload for s in store.signals(f"u{n}")] == [n]
    assert store.due("expense", now=NOW + 10**6) == []


def test_concurrent_signals_to_one_run_are_all_kept_in_order(store):
    store.create_run(run())
    park(store, "r1", wake_at=None, waiting_for="go")
    senders = [store.another() for _ in range(4)]

    def send(index: int) -> Callable[[], None]:
        def job() -> None:
            for n in range(10):
                senders[index].send_signal("r1", "go", [index, n], at=NOW + 100 - index * 10 - n)

        return job

    renewer = store.another()

    def renew() -> None:  # heartbeats of the lease, no status: the wait stays
        for n in range(10):
            renewer.write("r1", [LogEntry(n + 1, "go", "heartbeat", at=NOW)], lease_until=NOW + n)

    _together(*(send(i) for i in range(4)), renew)
    sent = store.signals("r1")
    assert len(sent) == 40 and len({s.id for s in sent}) == 40
    assert [s.id for s in sent] == sorted(s.id for s in sent)
    for index in range(4):  # each sender's signals in the order it sent them
        mine = [s.payload[1] for s in sent if s.payload[0] == index]
        assert mine == list(range(10))
    final, entries = store.load("r1")
    assert (final.status, final.wake_at, final.lease_until) == (WAITING, NOW + 100 - 39, NOW + 9)
    assert len(entries) == 10


# -- pruning -----------------------------------------------------------------------------------


def test_the_memory_store_drops_the_signals_of_the_finished_runs_it_prunes():
    memory = MemoryStore(max_runs=2)
    memory.create_run(run("old"))
    memory.send_signal("old", "go", 1, at=NOW)
    memory.write("old", [], status="completed", result={})
    memory.create_run(run("parked"))
    park(memory, "parked", wake_at=None, waiting_for="go")
    memory.send_signal("parked", "early", 2, at=NOW)
    for n in range(3):
        memory.create_run(run(f"new{n}"))
    assert memory.load("old") is None and memory.signals("old") == []
    assert [s.payload for s in memory.signals("parked")] == [2]  # incomplete: kept
    assert memory.send_signal("old", "go", 3, at=NOW) is None


# -- PostgreSQL: waits through the batched async writes ----------------------------------------


def test_batched_async_writes_carry_the_wait_columns(request):
    """Concurrent awrite()s grouped into one statement park, unpark and finish runs."""
    from buttress.backends.postgres import PostgresStore

    pg = _postgres(request)()
    assert isinstance(pg, PostgresStore)
    pg.write_flushers = 1

    async def main() -> None:
        for n in range(24):
            await pg.acreate_run(run(f"b{n}"))
            if n % 3 != 0:
                await pg.awrite(f"b{n}", [], status=WAITING, wake_at=NOW + 1, waiting_for="a")

        async def write(n: int) -> None:
            entry = [LogEntry(1, "s", "x", at=NOW + n)]
            if n % 3 == 0:  # park
                await pg.awrite(
                    f"b{n}",
                    entry,
                    lease_until=NOW + 50,
                    status=WAITING,
                    wake_at=NOW + n,
                    waiting_for=f"w{n}",
                )
            elif n % 3 == 1:  # resume: the wait is cleared
                await pg.awrite(f"b{n}", entry, lease_until=NOW + 50, status="running")
            else:  # a lease only: the wait stays
                await pg.awrite(f"b{n}", entry, lease_until=NOW + 50)

        await asyncio.gather(*(write(n) for n in range(24)))
        await pg.aclose()

    asyncio.run(main())
    for n in range(24):
        got = pg.load(f"b{n}")[0]
        if n % 3 == 0:
            assert fields(got) == (WAITING, 0.0, NOW + n, f"w{n}")
        elif n % 3 == 1:
            assert fields(got) == ("running", NOW + 50, None, None)
        else:
            assert fields(got) == (WAITING, NOW + 50, NOW + 1, "a")
    pg.close()


# -- upgrading a database made by the previous version -----------------------------------------

SQLITE_V1 = """
CREATE TABLE buttress_runs (
    run_id      TEXT PRIMARY KEY,
    saga        TEXT NOT NULL,
    status      TEXT NOT NULL,
    input       TEXT,
    key         TEXT,
    input_hash  TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    owner       TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    error       TEXT,
    result      TEXT,
    expires_at  REAL,
    ttl         REAL
);
CREATE INDEX buttress_runs_saga_status ON buttress_runs (saga, status);
CREATE TABLE buttress_keys (
    saga   TEXT NOT NULL,
    key    TEXT NOT NULL,
    run_id TEXT NOT NULL,
    PRIMARY KEY (saga, key)
);
CREATE TABLE buttress_log (
    run_id   TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    step     TEXT NOT NULL,
    event    TEXT NOT NULL,
    attempt  INTEGER NOT NULL DEFAULT 0,
    at       REAL NOT NULL,
    duration REAL,
    output   TEXT,
    error    TEXT,
    PRIMARY KEY (run_id, seq)
);
INSERT INTO buttress_runs (run_id, saga, status, input, created_at, updated_at, owner,
    lease_until) VALUES ('old', 'expense', 'running', '{"amount": 5}', 1.0, 2.0, 'h:1:a', 3.0);
INSERT INTO buttress_runs (run_id, saga, status, input, created_at, updated_at, lease_until,
    result) VALUES ('done', 'expense', 'completed', 'null', 1.0, 2.0, 0, '{"ok": true}');
INSERT INTO buttress_log (run_id, seq, step, event, at, output)
    VALUES ('old', 1, 'reserve', 'completed', 2.0, '{"id": 7}');
PRAGMA user_version = 1;
"""


def _check_upgraded(store: Any) -> None:
    old, entries = store.load("old")
    assert (old.status, old.input, old.owner, old.lease_until) == (
        "running",
        {"amount": 5},
        "h:1:a",
        3.0,
    )
    assert (old.version, old.wake_at, old.waiting_for, old.deadline, old.parent) == (None,) * 5
    assert [(e.step, e.output) for e in entries] == [("reserve", {"id": 7})]
    assert store.load("done")[0].result == {"ok": True}
    assert store.incomplete("expense") == ["old"]
    # The new contract works on the old runs and on new ones.
    park(store, "old", wake_at=None, waiting_for="approve")
    assert store.send_signal("old", "approve", {"by": "ann"}, at=5.0).wake_at == 5.0
    assert store.due("expense", now=5.0) == ["old"]
    store.create_run(run("new", version="v2", parent="old"))
    assert store.load("new")[0].parent == "old"


def test_an_sqlite_database_of_schema_version_1_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(SQLITE_V1)
    db.close()
    store = SQLiteStore(path)
    _check_upgraded(store)
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        columns = {row[1] for row in db.execute("PRAGMA table_info(buttress_runs)")}
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    assert {"version", "wake_at", "waiting_for", "deadline", "parent"} <= columns
    assert {"buttress_signals", "buttress_runs_due", "buttress_signals_run"} <= tables
    again = SQLiteStore(path)  # opening it again changes nothing
    assert [s.payload for s in again.signals("old")] == [{"by": "ann"}]
    again.close()


def test_stores_opening_an_old_sqlite_database_at_once_upgrade_it_once(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(SQLITE_V1)
    db.close()
    opened: list[SQLiteStore] = []
    lock = threading.Lock()

    def open_one() -> None:
        made = SQLiteStore(path)
        with lock:
            opened.append(made)

    _together(*(open_one for _ in range(4)))
    assert len(opened) == 4
    _check_upgraded(opened[0])
    for made in opened:
        made.close()


def test_an_sqlite_database_from_the_future_is_refused(tmp_path):
    path = tmp_path / "new.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 3")
    db.close()
    with pytest.raises(BackendError, match="schema version 3, newer than this buttress"):
        SQLiteStore(path)


PG_V1 = """
CREATE SCHEMA {s};
CREATE TABLE {s}.buttress_schema (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now(),
    note       text NOT NULL
);
INSERT INTO {s}.buttress_schema (version, note) VALUES (1, 'runs, log and idempotency keys');
CREATE TABLE {s}.buttress_runs (
    run_id      text PRIMARY KEY,
    saga        text NOT NULL,
    status      text NOT NULL,
    input       json,
    key         text,
    input_hash  text,
    created_at  double precision NOT NULL,
    updated_at  double precision NOT NULL,
    owner       text,
    lease_until double precision NOT NULL DEFAULT 0,
    error       text,
    result      json,
    expires_at  double precision,
    ttl         double precision
);
CREATE INDEX buttress_runs_listing ON {s}.buttress_runs (saga, status, created_at);
CREATE INDEX buttress_runs_created ON {s}.buttress_runs (created_at);
CREATE TABLE {s}.buttress_keys (
    saga   text NOT NULL,
    key    text NOT NULL,
    run_id text NOT NULL,
    PRIMARY KEY (saga, key)
);
CREATE TABLE {s}.buttress_log (
    run_id   text NOT NULL,
    seq      integer NOT NULL,
    step     text NOT NULL,
    event    text NOT NULL,
    attempt  integer NOT NULL DEFAULT 0,
    at       double precision NOT NULL,
    duration double precision,
    output   json,
    error    text,
    PRIMARY KEY (run_id, seq)
);
INSERT INTO {s}.buttress_runs (run_id, saga, status, input, created_at, updated_at, owner,
    lease_until) VALUES ('old', 'expense', 'running', '{{"amount": 5}}', 1.0, 2.0, 'h:1:a', 3.0);
INSERT INTO {s}.buttress_runs (run_id, saga, status, input, created_at, updated_at, lease_until,
    result) VALUES ('done', 'expense', 'completed', 'null', 1.0, 2.0, 0, '{{"ok": true}}');
INSERT INTO {s}.buttress_log (run_id, seq, step, event, at, output)
    VALUES ('old', 1, 'reserve', 'completed', 2.0, '{{"id": 7}}')
"""


def test_a_postgres_schema_of_version_1_is_upgraded_in_place(request):
    from services import import_client

    psycopg = import_client("psycopg", "postgres", "PostgreSQL")
    from buttress.backends.postgres import SCHEMA_VERSION, PostgresStore

    url = request.getfixturevalue("postgres_url")
    schema = request.getfixturevalue("postgres_schema")
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in PG_V1.format(s=f'"{schema}"').split(";"):
            conn.execute(statement)

    strict = PostgresStore(url, schema=schema, create_schema=False)
    with pytest.raises(BackendError, match=r"schema version 1; this buttress needs version 2"):
        strict.load("old")
    assert strict.schema_version() == 1

    store = PostgresStore(url, schema=schema)
    _check_upgraded(store)
    assert store.schema_version() == SCHEMA_VERSION == 2
    store.close()
    assert [s.payload for s in strict.signals("old")] == [{"by": "ann"}]  # now it may
    strict.close()
    with psycopg.connect(url, autocommit=True) as conn:
        versions = conn.execute(
            f'SELECT version FROM "{schema}".buttress_schema ORDER BY version'
        ).fetchall()
        indexes = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,)
        ).fetchall()
    assert versions == [(1,), (2,)]
    assert {"buttress_runs_due", "buttress_signals_run"} <= {name for (name,) in indexes}
