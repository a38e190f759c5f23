"""The PostgreSQL saga store, and the store contract every store keeps.

The contract tests run on MemoryStore, SQLiteStore and PostgresStore (sync and async
faces); the rest are PostgreSQL's own: schema on first use and its version, timeouts
and connection failures, pools and factories, and sagas run on the async face.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from buttress import Registry, Saga
from buttress.backends import (
    AsyncIdempotencyStore,
    AsyncSagaStore,
    IdempotencyStore,
    LogEntry,
    RunRecord,
    SagaStore,
)
from buttress.backends.memory import MemoryStore
from buttress.backends.sqlite import SQLiteStore
from buttress.exceptions import BackendError, ConfigTypeError, ConfigValueError
from services import import_client

# Outside CI a missing psycopg skips this module with the reason; under CI it fails.
psycopg = import_client("psycopg", "postgres", "PostgreSQL")

from buttress.backends.postgres import SCHEMA_VERSION, PostgresStore  # noqa: E402

NOW = 1_000_000.0


# -- the store contract: one set of tests, every store ------------------------------------------


class Face:
    """Calls a store's methods through its sync face or through its async twins."""

    def __init__(self, store: Any, is_async: bool) -> None:
        self.store = store
        self.is_async = is_async
        self.loop = asyncio.new_event_loop() if is_async else None

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if self.loop is None:
            return getattr(self.store, name)  # type: ignore[no-any-return]
        method = getattr(self.store, "a" + name)
        loop = self.loop
        return lambda *args, **kwargs: loop.run_until_complete(method(*args, **kwargs))

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()


@pytest.fixture(params=["memory", "sqlite", "postgres", "postgres-async"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Face]:
    """A fresh, empty store of each kind (PostgreSQL through both of its faces)."""
    kind = request.param
    made: Any
    if kind == "memory":
        made = MemoryStore()
    elif kind == "sqlite":
        made = SQLiteStore(tmp_path / "runs.db")
    else:
        made = PostgresStore(
            request.getfixturevalue("postgres_url"),
            schema=request.getfixturevalue("postgres_schema"),
        )
    face = Face(made, is_async=kind == "postgres-async")
    yield face
    if face.loop is not None:
        face.loop.run_until_complete(made.aclose())
    face.close()
    if hasattr(made, "close"):
        made.close()


def record(run_id: str = "r1", **changes: Any) -> RunRecord:
    fields: dict[str, Any] = {
        "run_id": run_id,
        "saga": "order",
        "status": "running",
        "input": {"sku": "A-1", "qty": 2, "tags": ["x", None]},
        "created_at": NOW,
        "updated_at": NOW,
        "owner": "me:1:a",
        "lease_until": NOW + 30,
    }
    fields.update(changes)
    return RunRecord(**fields)


def keyed(run_id: str, key: str = "k", input_hash: str = "h", **changes: Any) -> RunRecord:
    return record(run_id, key=key, input_hash=input_hash, **changes)


def test_a_stored_run_reads_back_as_it_was_written(store):
    """create_run, write and load: fields, JSON values and the log in seq order."""
    store.create_run(record(ttl=60.0))
    store.write("r1", [LogEntry(1, "reserve", "started", at=NOW + 1)], lease_until=NOW + 40)
    store.write(
        "r1",
        [
            LogEntry(
                2, "reserve", "completed", attempt=2, at=NOW + 2, duration=0.5, output={"id": 7}
            ),
            LogEntry(3, "charge", "started", at=NOW + 3),
        ],
        lease_until=NOW + 50,
    )
    loaded = store.load("r1")
    assert loaded is not None
    run, entries = loaded
    assert (run.saga, run.status, run.owner, run.ttl) == ("order", "running", "me:1:a", 60.0)
    assert run.input == {"sku": "A-1", "qty": 2, "tags": ["x", None]}
    assert (run.created_at, run.updated_at, run.lease_until) == (NOW, NOW + 3, NOW + 50)
    assert [(e.seq, e.step, e.event) for e in entries] == [
        (1, "reserve", "started"),
        (2, "reserve", "completed"),
        (3, "charge", "started"),
    ]
    assert (entries[1].attempt, entries[1].duration, entries[1].output) == (2, 0.5, {"id": 7})
    assert store.load("missing") is None


def test_a_final_write_stores_the_report_and_ends_the_lease(store):
    """A final status sets error, result and expiry, and the lease drops to 0."""
    store.create_run(record())
    store.write(
        "r1",
        [LogEntry(1, "", "compensating", at=NOW + 1, error="boom")],
        lease_until=NOW + 40,
        status="compensating",
    )
    assert store.load("r1")[0].status == "compensating"
    report = {"status": "failed", "outputs": {"a": [1, 2]}, "compensated": True}
    store.write(
        "r1",
        [LogEntry(2, "a", "compensated", at=NOW + 2)],
        status="failed",
        error="boom",
        result=report,
        expires_at=NOW + 99,
    )
    run, entries = store.load("r1")
    assert (run.status, run.error, run.result, run.expires_at) == (
        "failed",
        "boom",
        report,
        NOW + 99,
    )
    assert run.lease_until == 0
    assert len(entries) == 2
    store.write("r1", [], lease_until=NOW + 5)  # nothing but a lease: still one write
    assert store.load("r1")[0].lease_until == NOW + 5


def test_incomplete_and_runs_list_what_they_should(store):
    """incomplete() lists running and compensating runs; runs() is newest first, filtered."""
    for n, status in enumerate(["running", "compensating", "completed", "failed"]):
        store.create_run(record(f"r{n}", created_at=NOW + n))
        if status != "running":
            store.write(f"r{n}", [], status=status)
    store.create_run(record("other", saga="billing", created_at=NOW + 9))
    assert store.incomplete("order") == ["r0", "r1"]
    assert [r.run_id for r in store.runs()] == ["other", "r3", "r2", "r1", "r0"]
    assert [r.run_id for r in store.runs(saga="order", limit=2)] == ["r3", "r2"]
    assert [r.run_id for r in store.runs(status="completed")] == ["r2"]
    assert store.runs(saga="nobody") == []


def test_claim_run_hands_an_expired_run_to_exactly_one_owner(store):
    """Live leases are respected unless the holder is the expected (dead) one; final runs
    and unknown runs are never claimed."""
    store.create_run(record("r1", lease_until=NOW + 30))
    assert not store.claim_run("r1", "thief", now=NOW, lease_until=NOW + 60)
    assert store.claim_run("r1", "heir", now=NOW + 31, lease_until=NOW + 90)
    assert not store.claim_run("r1", "late", now=NOW + 31, lease_until=NOW + 90)
    assert store.load("r1")[0].owner == "heir"
    assert store.claim_run(
        "r1", "undertaker", now=NOW + 32, lease_until=NOW + 120, expected_owner="heir"
    )
    assert not store.claim_run(
        "r1", "other", now=NOW + 33, lease_until=NOW + 120, expected_owner="heir"
    )
    store.write("r1", [], status="completed")
    assert not store.claim_run("r1", "x", now=NOW + 999, lease_until=NOW + 1999)
    assert not store.claim_run("nope", "x", now=NOW, lease_until=NOW + 1)


def test_claim_key_judges_the_holder(store):
    """new, busy, resume, conflict, done, blocked, and rerun after a clean failure."""
    first = store.claim_key(keyed("r1"), now=NOW)
    assert (first.outcome, first.run_id) == ("new", "r1")
    assert store.load("r1")[0].key == "k"
    busy = store.claim_key(keyed("r2"), now=NOW + 1)
    assert (busy.outcome, busy.run_id, busy.record.owner) == ("busy", "r1", "me:1:a")
    assert store.claim_key(keyed("r2", input_hash="other"), now=NOW).outcome == "conflict"
    store.write("r1", [LogEntry(1, "a", "started", at=NOW)])
    resumed = store.claim_key(keyed("r3", owner="new:2:b", lease_until=NOW + 99), now=NOW + 31)
    assert (resumed.outcome, resumed.run_id) == ("resume", "r1")
    assert [e.event for e in resumed.entries] == ["started"]
    assert (store.load("r1")[0].owner, store.load("r1")[0].lease_until) == ("new:2:b", NOW + 99)
    assert store.load("r3") is None  # a resumed key stores no new run

    store.write("r1", [], status="completed", result={"output": 1}, expires_at=NOW + 100)
    done = store.claim_key(keyed("r4"), now=NOW + 50)
    assert (done.outcome, done.run_id, done.record.result) == ("done", "r1", {"output": 1})
    expired = store.claim_key(keyed("r5"), now=NOW + 101)
    assert (expired.outcome, expired.run_id) == ("new", "r5")

    store.write("r5", [], status="compensation_failed", error="stuck")
    assert store.claim_key(keyed("r6"), now=NOW + 102).outcome == "blocked"
    store.write("r5", [], status="failed", error="resolved")
    again = store.claim_key(keyed("r7"), now=NOW + 103)
    assert (again.outcome, again.run_id) == ("new", "r7")
    assert store.claim_key(keyed("r8", key="other-key"), now=NOW).outcome == "new"
    assert store.claim_key(keyed("r9", saga="billing"), now=NOW).outcome == "new"


def test_every_store_meets_the_protocols(store):
    """Every shipped store is a SagaStore and an IdempotencyStore, with the async twins."""
    assert isinstance(store.store, SagaStore)
    assert isinstance(store.store, IdempotencyStore)
    assert isinstance(store.store, AsyncSagaStore)
    assert isinstance(store.store, AsyncIdempotencyStore)


# -- PostgreSQL: the schema -------------------------------------------------------------------


@pytest.fixture
def pg(postgres_url: str, postgres_schema: str) -> Iterator[PostgresStore]:
    """A PostgresStore in a schema of this test's own."""
    made = PostgresStore(postgres_url, schema=postgres_schema)
    yield made
    made.close()


def sql(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params or None)
        return cursor.fetchall() if cursor.description else []


def test_the_schema_is_created_on_first_use(postgres_url, postgres_schema, pg):
    """Building the store touches nothing; the first call creates schema, tables and
    version; later stores (even many at once) find it and add nothing."""
    exists = "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s"
    assert sql(postgres_url, exists, postgres_schema) == [(0,)]
    assert pg.runs() == []
    assert sql(postgres_url, exists, postgres_schema) == [(1,)]
    tables = sql(
        postgres_url,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
        "ORDER BY table_name",
        postgres_schema,
    )
    assert [t for (t,) in tables] == [
        "buttress_keys",
        "buttress_log",
        "buttress_runs",
        "buttress_schema",
        "buttress_signals",
    ]
    assert pg.schema_version() == SCHEMA_VERSION == 2

    others = [PostgresStore(postgres_url, schema=postgres_schema) for _ in range(4)]
    racing = [threading.Thread(target=other.runs) for other in others]
    for thread in racing:
        thread.start()
    for thread in racing:
        thread.join()
    for other in others:
        other.close()
    versions = sql(
        postgres_url,
        f'SELECT version FROM "{postgres_schema}".buttress_schema ORDER BY version',
    )
    assert versions == [(1,), (2,)]


def test_many_stores_creating_a_schema_at_once_take_turns(postgres_url, postgres_schema):
    """First use by several stores at the same moment: one creates, none fails."""
    stores = [PostgresStore(postgres_url, schema=postgres_schema) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def first_use(store: PostgresStore) -> None:
        barrier.wait()
        try:
            store.create_run(record(f"r-{id(store)}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for made in stores:
        made.close()
    assert errors == []
    assert sql(postgres_url, f'SELECT count(*) FROM "{postgres_schema}".buttress_runs') == [(4,)]


def test_a_schema_from_the_future_is_refused(postgres_url, postgres_schema, pg):
    """A schema recorded at a newer version is not touched: every call raises."""
    pg.migrate()
    sql(
        postgres_url,
        f'INSERT INTO "{postgres_schema}".buttress_schema (version, note) VALUES (99, %s)',
        "from the future",
    )
    newcomer = PostgresStore(postgres_url, schema=postgres_schema)
    with pytest.raises(BackendError, match="schema version 99, newer than this buttress"):
        newcomer.create_run(record())
    with pytest.raises(BackendError, match="schema version 99"):
        newcomer.migrate()
    newcomer.close()
    assert sql(postgres_url, f'SELECT count(*) FROM "{postgres_schema}".buttress_runs') == [(0,)]


def test_without_create_schema_the_operator_migrates(postgres_url, postgres_schema):
    """create_schema=False never runs DDL: it names migrate(), which does the work once."""
    strict = PostgresStore(postgres_url, schema=postgres_schema, create_schema=False)
    with pytest.raises(BackendError, match=r"no buttress tables.*migrate\(\)"):
        strict.runs()
    assert strict.schema_version() is None
    operator = PostgresStore(postgres_url, schema=postgres_schema)
    assert operator.migrate() == SCHEMA_VERSION
    assert operator.migrate() == SCHEMA_VERSION  # running it again changes nothing
    operator.close()
    assert strict.runs() == []
    strict.close()


def test_an_older_schema_is_upgraded_or_refused(postgres_url, postgres_schema, monkeypatch):
    """A schema one version behind: create_schema=False refuses it, the default upgrades
    it with the pending migration, recorded in the version table."""
    from buttress.backends import postgres as module

    first = PostgresStore(postgres_url, schema=postgres_schema)
    first.migrate()
    first.close()
    upgrade = ("a test column", "ALTER TABLE {s}.buttress_runs ADD COLUMN note text")
    next_version = SCHEMA_VERSION + 1
    monkeypatch.setattr(module, "SCHEMA_VERSION", next_version)
    monkeypatch.setitem(module.MIGRATIONS, next_version, upgrade)
    strict = PostgresStore(postgres_url, schema=postgres_schema, create_schema=False)
    with pytest.raises(
        BackendError,
        match=f"schema version {SCHEMA_VERSION}; this buttress needs version {next_version}",
    ):
        strict.runs()
    strict.close()
    upgrading = PostgresStore(postgres_url, schema=postgres_schema)
    assert upgrading.runs() == []
    assert upgrading.schema_version() == next_version
    upgrading.close()
    columns = sql(
        postgres_url,
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = 'buttress_runs' AND column_name = 'note'",
        postgres_schema,
    )
    assert columns == [("note",)]


def claim_at_once(
    barrier: threading.Barrier, outcomes: list[str], store: PostgresStore, key: str, n: int
) -> None:
    barrier.wait()
    outcomes.append(store.claim_key(keyed(f"{key}-{n}", key=key), now=NOW).outcome)


def test_workers_claiming_one_key_at_once_get_one_new(postgres_url, postgres_schema, pg):
    """Eight stores (eight connections) claim the same key at the same moment, twice
    over: exactly one gets "new", the others see it busy."""
    pg.migrate()
    stores = [PostgresStore(postgres_url, schema=postgres_schema) for _ in range(8)]
    for key in ("k1", "k2"):
        barrier = threading.Barrier(len(stores))
        outcomes: list[str] = []
        threads = [
            threading.Thread(target=claim_at_once, args=(barrier, outcomes, s, key, n))
            for n, s in enumerate(stores)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["busy"] * 7 + ["new"]
    for made in stores:
        made.close()
    assert len(pg.runs()) == 2


# -- PostgreSQL: failures ---------------------------------------------------------------------


def test_a_statement_past_its_timeout_raises_backend_error(postgres_url, postgres_schema):
    """A call stuck behind another transaction's lock is cancelled by statement_timeout
    and raised as BackendError; the store works again right after."""
    store = PostgresStore(postgres_url, schema=postgres_schema, statement_timeout=0.2)
    store.claim_key(keyed("r1"), now=NOW)
    with psycopg.connect(postgres_url) as blocker:
        blocker.execute(
            f'SELECT * FROM "{postgres_schema}".buttress_keys WHERE key = %s FOR UPDATE', ("k",)
        )
        with pytest.raises(BackendError, match="statement timeout") as caught:
            store.claim_key(keyed("r2"), now=NOW)
        assert isinstance(caught.value.__cause__, psycopg.errors.QueryCanceled)
        blocker.rollback()
    assert store.claim_key(keyed("r2"), now=NOW).outcome == "busy"
    store.close()


def test_an_unreachable_server_raises_backend_error():
    """Connection failures are BackendError too, with psycopg's error as the cause."""
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test", connect_timeout=1)
    with pytest.raises(BackendError, match="PostgreSQL store") as caught:
        store.runs()
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)

    async def async_face() -> None:
        with pytest.raises(BackendError):
            await store.aruns()

    asyncio.run(async_face())
    store.close()


def test_a_lost_connection_is_replaced_on_the_next_call(postgres_url, pg):
    """The server drops the pool's connection: that call fails, the next reconnects."""
    pg.create_run(record())
    assert pg._own_pool is not None
    with pg._own_pool.connection() as conn:  # the pool's one idle connection
        pid = conn.info.backend_pid
    sql(postgres_url, "SELECT pg_terminate_backend(%s)", pid)
    for _ in range(200):  # the server ends the backend asynchronously
        if not sql(postgres_url, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", pid):
            break
        time.sleep(0.01)
    failures = 0
    for _ in range(pg._own_pool.get_stats()["pool_size"] + 1):
        try:
            assert pg.load("r1") is not None
        except BackendError:  # only the call that meets the dead connection fails
            failures += 1
    assert failures <= 1
    assert pg.load("r1") is not None


def test_the_default_pool_runs_concurrent_calls_side_by_side(postgres_url, postgres_schema):
    """With conninfo, concurrent async calls use up to pool_size connections at once."""
    store = PostgresStore(postgres_url, schema=postgres_schema, pool_size=4)
    store.migrate()

    async def main() -> set[int]:
        pids: set[int] = set()

        async def one(i: int) -> None:
            await store.acreate_run(record(f"c{i}"))
            found = await store.aload(f"c{i}")
            assert found is not None

        async def held() -> None:
            pool = await store._async_pool_now()
            assert pool is not None
            async with pool.connection() as conn:
                pids.add(conn.info.backend_pid)
                await asyncio.sleep(0.05)

        await asyncio.gather(*(one(i) for i in range(16)), *(held() for _ in range(4)))
        await store.aclose()
        return pids

    assert len(asyncio.run(main())) == 4
    assert len(store.runs(limit=100)) == 16
    store.close()
    with pytest.raises(ConfigValueError, match="pool_size"):
        PostgresStore(postgres_url, pool_size=0)


# -- PostgreSQL: connections ------------------------------------------------------------------


class TinyPool:
    """The part of psycopg_pool.ConnectionPool the store uses: connection() lends one."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.idle: list[Any] = []
        self.lent = 0

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        conn = self.idle.pop() if self.idle else psycopg.connect(self.url)
        self.lent += 1
        try:
            yield conn
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            self.idle.append(conn)

    def close(self) -> None:
        for conn in self.idle:
            conn.close()


class TinyAsyncPool:
    """The async twin of TinyPool."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.idle: list[Any] = []
        self.lent = 0

    @contextlib.asynccontextmanager
    async def connection(self) -> Any:
        conn = self.idle.pop() if self.idle else await psycopg.AsyncConnection.connect(self.url)
        self.lent += 1
        try:
            yield conn
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
        finally:
            self.idle.append(conn)

    async def close(self) -> None:
        for conn in self.idle:
            await conn.close()


def test_a_pool_lends_the_connections(postgres_url, postgres_schema):
    """With pool= and async_pool=, every call borrows from them (non-autocommit
    connections included) and the statement timeout is set on each connection."""
    pool, apool = TinyPool(postgres_url), TinyAsyncPool(postgres_url)
    store = PostgresStore(schema=postgres_schema, pool=pool, async_pool=apool)
    saga = Saga("pooled", store=store, registry=Registry())
    saga.step("one", lambda ctx: ctx.input + 1)
    assert saga.run(1, key="a").output == 2
    assert saga.run(1, key="a").replayed
    assert pool.lent >= 3

    async def async_face() -> None:
        assert (await saga.run_async(5, key="b")).output == 6
        assert apool.lent >= 3
        timeout = await (await apool.idle[0].execute("SHOW statement_timeout")).fetchone()
        assert timeout == ("5s",)
        await apool.close()

    asyncio.run(async_face())
    assert pool.idle[0].execute("SHOW statement_timeout").fetchone() == ("5s",)
    assert store._conn is None
    pool.close()


def test_connection_factories(postgres_url, postgres_schema):
    """connect= and async_connect= make the store's own connections."""
    made: list[str] = []

    def connect() -> Any:
        made.append("sync")
        return psycopg.connect(postgres_url)

    async def async_connect() -> Any:
        made.append("async")
        return await psycopg.AsyncConnection.connect(postgres_url)

    store = PostgresStore(schema=postgres_schema, connect=connect, async_connect=async_connect)
    store.create_run(record("r1"))
    store.create_run(record("r2"))

    async def async_face() -> list[str]:
        return await store.aincomplete("order")

    assert asyncio.run(async_face()) == ["r1", "r2"]
    assert made == ["sync", "async"]
    store.close()


def test_a_store_without_an_async_source_runs_its_async_face_on_a_thread(
    postgres_url, postgres_schema
):
    """Given only a sync factory, the async twins still work (on a worker thread)."""
    store = PostgresStore(schema=postgres_schema, connect=lambda: psycopg.connect(postgres_url))

    async def async_face() -> Any:
        await store.acreate_run(record())
        return await store.aload("r1")

    assert asyncio.run(async_face())[0].run_id == "r1"
    assert store._aconn is None
    store.close()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({}, ConfigValueError, "needs somewhere to connect"),
        ({"conninfo": 5}, ConfigTypeError, "conninfo must be"),
        ({"conninfo": "x", "schema": "bad-name"}, ConfigValueError, "schema must be a plain"),
        ({"conninfo": "x", "schema": 3}, ConfigTypeError, "schema must be a string"),
        ({"conninfo": "x", "pool": TinyPool("x")}, ConfigValueError, "only one of"),
        ({"pool": object()}, ConfigTypeError, "pool must be a connection pool"),
        ({"connect": 5}, ConfigTypeError, "connect must be callable"),
        ({"conninfo": "x", "statement_timeout": 0}, ConfigValueError, "statement_timeout"),
        ({"conninfo": "x", "connect_timeout": -1}, ConfigValueError, "connect_timeout"),
        ({"conninfo": "x", "create_schema": "yes"}, ConfigTypeError, "create_schema"),
    ],
)
def test_bad_options_are_refused(options, error, message):
    """Options are checked when the store is built, naming the option."""
    with pytest.raises(error, match=message):
        PostgresStore(**options)


# -- sagas on PostgreSQL ----------------------------------------------------------------------


def order_saga(store: Any, effects: list[str], *, fail: bool = False) -> Saga:
    saga = Saga("order", store=store, registry=Registry(), lease=30)

    async def reserve(ctx: Any) -> str:
        effects.append(f"reserve {ctx.input}")
        return "R1"

    def charge(ctx: Any) -> str:
        if fail:
            raise RuntimeError("declined")
        effects.append("charge")
        return "C1"

    async def release(ctx: Any) -> None:
        effects.append(f"release {ctx.results['reserve']}")

    saga.step("reserve", reserve, compensate=release)
    saga.step("charge", charge)
    return saga


def test_run_async_awaits_the_async_store_end_to_end(postgres_url, postgres_schema, pg):
    """run_async, replays, compensation and resolve_async go through the async
    connection only; the sync face then sees the same runs."""
    effects: list[str] = []
    saga = order_saga(pg, effects)
    failing = order_saga(pg, effects, fail=True)

    async def main() -> None:
        done = await saga.run_async(1, key="o-1")
        assert (done.status, done.output) == ("completed", "C1")
        replay = await saga.run_async(1, key="o-1")
        assert replay.replayed and replay.run_id == done.run_id
        failed = await failing.run_async(2)
        assert failed.status == "failed" and failed.compensated
        assert effects == ["reserve 1", "charge", "reserve 2", "release R1"]

    asyncio.run(main())
    assert pg._conn is None  # nothing went through the sync connection
    stored = {r.status for r in pg.runs(saga="order")}
    assert stored == {"completed", "failed"}


def test_recover_async_finishes_abandoned_runs(pg):
    """An abandoned run (expired lease) is claimed and completed by recover_async."""
    pg.create_run(record("lost", input=7, lease_until=NOW))
    pg.write("lost", [LogEntry(1, "reserve", "started", at=NOW)])
    effects: list[str] = []
    saga = order_saga(pg, effects)

    async def main() -> list[Any]:
        return await saga.recover_async()

    [result] = asyncio.run(main())
    assert (result.run_id, result.status) == ("lost", "completed")
    assert effects == ["reserve 7", "charge"]
    assert pg.incomplete("order") == []


def test_resolve_async_clears_a_stuck_run(pg):
    """resolve_async marks a compensation_failed run as failed, so its key runs again."""
    saga = Saga("stuck", store=pg, registry=Registry())

    def refuse(ctx: Any) -> None:
        raise RuntimeError("cannot undo")

    saga.step("a", lambda ctx: 1, compensate=refuse, compensate_retry=None)
    saga.step("b", lambda ctx: 1 / 0)

    async def main() -> None:
        first = await saga.run_async(0, key="s")
        assert pg.load(first.run_id)[0].status == "compensation_failed"
        await saga.resolve_async(first.run_id)
        assert pg.load(first.run_id)[0].status == "failed"

    asyncio.run(main())


def test_cancelling_run_async_on_postgres_compensates_then_reraises(pg):
    """Cancelled mid-step: the async store records the compensation before the
    cancellation reaches the caller."""
    saga = Saga("slow", store=pg, registry=Registry())
    undone: list[str] = []
    started = asyncio.Event()

    async def first(ctx: Any) -> int:
        return 1

    async def hang(ctx: Any) -> None:
        started.set()
        await asyncio.sleep(30)

    async def undo(ctx: Any) -> None:
        undone.append("first")

    saga.step("first", first, compensate=undo)
    saga.step("hang", hang)

    async def main() -> None:
        task = asyncio.ensure_future(saga.run_async(None))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert undone == ["first"]
    [run] = pg.runs(saga="slow")
    assert run.status == "failed"


# -- the async face of the runner, without a server -------------------------------------------


class AsyncMemoryStore(MemoryStore):
    """A MemoryStore with async twins that record each time they are awaited."""

    def __init__(self) -> None:
        super().__init__()
        self.awaited: list[str] = []

    async def _twin(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.awaited.append("a" + name)
        await asyncio.sleep(0)
        return getattr(self, name)(*args, **kwargs)

    async def acreate_run(self, *args: Any, **kwargs: Any) -> Any:
        return await self._twin("create_run", *args, **kwargs)

    async def aclaim_key(self, *args: Any, **kwargs: Any) -> Any:
        return await self._twin("claim_key", *args, **kwargs)

    async def awrite(self, *args: Any, **kwargs: Any) -> Any:
        return await self._twin("write", *args, **kwargs)

    async def aload(self, *args: Any, **kwargs: Any) -> Any:
        return await self._twin("load", *args, **kwargs)

    async def aclaim_run(self, *args: Any, **kwargs: Any) -> Any:
        return await self._twin("claim_run", *args, **kwargs)

    async def aincomplete(self, *args: Any, **kwargs: Any) -> Any:
        return await self._twin("incomplete", *args, **kwargs)

    async def aruns(self, *args: Any, **kwargs: Any) -> Any:
        return await self._twin("runs", *args, **kwargs)

    async def adue(self, *args: Any, **kwargs: Any) -> Any:
        return await self._twin("due", *args, **kwargs)

    async def asend_signal(self, *args: Any, **kwargs: Any) -> Any:
        return await self._twin("send_signal", *args, **kwargs)

    async def asignals(self, *args: Any, **kwargs: Any) -> Any:
        return await self._twin("signals", *args, **kwargs)


def test_the_async_driver_awaits_async_twins_and_calls_sync_stores_directly():
    """With an AsyncSagaStore, run_async awaits every store call (the sync face calls
    the plain methods); a separate sync idempotency store is called directly."""
    store = AsyncMemoryStore()
    assert isinstance(store, AsyncSagaStore)
    keys = MemoryStore()
    saga = Saga("mixed", store=store, idempotency=keys, registry=Registry())
    saga.step("a", lambda ctx: "A")
    saga.step("b", lambda ctx: "B")

    async def main() -> None:
        result = await saga.run_async(None, key="k1")
        assert result.output == "B"
        assert (await saga.run_async(None, key="k1")).replayed

    asyncio.run(main())
    # create_run, then a write before each step and one at the end
    assert store.awaited == ["acreate_run", "awrite", "awrite", "awrite"]
    assert keys.runs()[0].status == "completed"  # the key store learned the outcome
    store.awaited.clear()
    assert saga.run(None, key="k2").output == "B"
    assert store.awaited == []


# -- group commit: concurrent async writes share statements ------------------------------------


def _count_statements(store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the store's calls to the server (one per statement or short transaction)."""
    calls = [0]
    real = store._run_async

    async def counting(op: Any, *, tx: bool) -> Any:
        calls[0] += 1
        return await real(op, tx=tx)

    monkeypatch.setattr(store, "_run_async", counting)
    return calls


def test_concurrent_async_writes_are_grouped_and_each_lands_whole(pg, monkeypatch):
    """Forty runs writing at once, with one flusher: far fewer statements than writes,
    and every run's log lines and new state are stored exactly as written."""
    pg.write_flushers = 1

    async def main() -> int:
        for index in range(40):
            await pg.acreate_run(record(f"g{index}"))
        calls = _count_statements(pg, monkeypatch)

        async def write(index: int) -> None:
            run_id = f"g{index}"
            entry = LogEntry(1, "reserve", "started", at=NOW + index)
            if index % 4 == 0:  # a final write: report, error and expiry
                await pg.awrite(
                    run_id,
                    [entry],
                    status="compensated",
                    error=f"boom {index}",
                    result={"n": index, "text": "a\u0000b"},
                    expires_at=NOW + 99,
                )
            elif index % 4 == 1:  # the lease only
                await pg.awrite(run_id, [], lease_until=NOW + index)
            else:
                await pg.awrite(run_id, [entry], lease_until=NOW + 100 + index)

        await asyncio.gather(*(write(i) for i in range(40)))
        return calls[0]

    statements = asyncio.run(main())
    assert statements < 20
    for index in range(40):
        loaded = pg.load(f"g{index}")
        assert loaded is not None
        run, entries = loaded
        if index % 4 == 0:
            assert (run.status, run.error, run.lease_until) == ("compensated", f"boom {index}", 0.0)
            assert run.result == {"n": index, "text": "a\u0000b"}
            assert run.expires_at == NOW + 99 and run.updated_at == NOW + index
        elif index % 4 == 1:
            assert (run.status, run.lease_until, entries) == ("running", NOW + index, [])
            assert run.updated_at == NOW
        else:
            assert (run.status, run.lease_until) == ("running", NOW + 100 + index)
            assert [(e.seq, e.step, e.at) for e in entries] == [(1, "reserve", NOW + index)]


def test_a_bad_write_in_a_batch_fails_alone(pg):
    """A write whose log line clashes with a stored one fails with BackendError; the
    writes batched beside it land."""
    pg.write_flushers = 1

    async def main() -> list[BaseException | None]:
        for index in range(10):
            await pg.acreate_run(record(f"b{index}"))
        await pg.awrite("b3", [LogEntry(1, "a", "started", at=NOW)])
        results = await asyncio.gather(
            *(
                pg.awrite(f"b{index}", [LogEntry(1, "a", "started", at=NOW)], lease_until=NOW)
                for index in range(10)
            ),
            return_exceptions=True,
        )
        return list(results)

    results = asyncio.run(main())
    assert isinstance(results[3], BackendError)
    assert isinstance(results[3].__cause__, psycopg.IntegrityError)
    assert [r for i, r in enumerate(results) if i != 3] == [None] * 9
    for index in range(10):
        loaded = pg.load(f"b{index}")
        assert loaded is not None and len(loaded[1]) == 1


def test_a_cancelled_writer_never_cancels_the_writes_batched_with_it(pg):
    """Cancelling one waiting caller leaves the statement that carries the others alone."""
    pg.write_flushers = 1

    async def main() -> None:
        for index in range(8):
            await pg.acreate_run(record(f"c{index}"))
        tasks = [
            asyncio.ensure_future(
                pg.awrite(f"c{index}", [LogEntry(1, "a", "started", at=NOW)], lease_until=NOW)
            )
            for index in range(8)
        ]
        await asyncio.sleep(0)  # every write is queued or in flight
        tasks[5].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[5], asyncio.CancelledError)
        assert [d for i, d in enumerate(done) if i != 5] == [None] * 7

    asyncio.run(main())
    for index in range(8):
        if index != 5:
            loaded = pg.load(f"c{index}")
            assert loaded is not None and len(loaded[1]) == 1


def test_a_dead_server_fails_every_batched_write_with_backend_error():
    """Writes batched against an unreachable server each get BackendError, once."""
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test", connect_timeout=1)
    store.write_flushers = 1

    async def main() -> list[BaseException | None]:
        return list(
            await asyncio.gather(
                *(store.awrite(f"d{i}", [], lease_until=NOW) for i in range(5)),
                return_exceptions=True,
            )
        )

    results = asyncio.run(main())
    assert all(isinstance(r, BackendError) for r in results)
    store.close()
