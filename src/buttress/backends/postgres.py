"""A saga store on PostgreSQL (extra ``postgres``: psycopg 3), shared by any number of
processes and machines.

Durability: every write is one committed transaction before the call returns, so a
run survives its process, its machine and (with the server's default
``synchronous_commit=on``) a crash of the database server itself.

Several workers may share one schema: a key is bound in a transaction that locks its
row (``INSERT ... ON CONFLICT DO NOTHING``, then ``SELECT ... FOR UPDATE``), and a run
is taken over by one conditional ``UPDATE``, which waits (at most ``statement_timeout``)
for a row another transaction holds and re-checks it as committed, so exactly one
worker wins each key and each abandoned run, and a locked run is waited for (or
reported by ``recover()`` as skipped), never passed over silently.

The tables live in their own schema (``schema=``, default ``"buttress"``), created with
its tables on first use. The schema's version is recorded in its ``buttress_schema``
table: a store refuses a schema newer than it understands and upgrades an older one
in one locked transaction (or, with ``create_schema=False``, asks the operator to run
:meth:`PostgresStore.migrate`).

The store has sync methods (the :class:`~buttress.backends.SagaStore` protocol) and
``a``-prefixed async twins (:class:`~buttress.backends.AsyncSagaStore`), which
``Saga.run_async()`` awaits. Given ``conninfo``, each face draws its connections from a
``psycopg_pool`` pool of at most ``pool_size`` connections (default 10), opened on first
use, so concurrent sagas run their writes side by side; given a ``connect`` factory (or
``async_connect``), that face holds one connection behind a lock instead; given a
``pool`` (or ``async_pool``) of your own, it uses that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, TypeVar

try:
    import psycopg
    import psycopg_pool
    from psycopg import pq
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "buttress.backends.postgres needs psycopg 3 and psycopg_pool: "
        "pip install 'buttress[postgres]'"
    ) from exc

from buttress._validate import check_bool, check_int, require_seconds
from buttress.exceptions import BackendError, ConfigTypeError, ConfigValueError

from . import (
    ACTIVE,
    ANY_SIGNAL,
    CANCEL_SIGNAL,
    INCOMPLETE,
    WAITING,
    KeyClaim,
    LogEntry,
    RunRecord,
    Signal,
    run_changes,
    run_row,
)
from .memory import judge_claim

__all__ = ["SCHEMA_VERSION", "PostgresStore"]

# A batch that fails with one of these failed on some write's data or on a row another
# transaction holds: each write is retried alone, so the error reaches its own caller.
_DATA_ERRORS = (
    psycopg.DataError,
    psycopg.IntegrityError,
    psycopg.ProgrammingError,
    psycopg.errors.QueryCanceled,
    psycopg.errors.LockNotAvailable,
)

SCHEMA_VERSION = 2
"""The version of the tables this buttress reads and writes."""

T = TypeVar("T")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

# The version table, created (with the schema) before any migration runs.
_VERSION_TABLE = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.buttress_schema (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now(),
    note       text NOT NULL
)
"""

# MIGRATIONS[n] takes the tables from version n - 1 to version n. Each runs once, in
# order, in the transaction that records it; a release that changes the tables adds
# the next entry and bumps SCHEMA_VERSION.
MIGRATIONS: dict[int, tuple[str, str]] = {
    1: (
        "runs, log and idempotency keys",
        """
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
)
""",
    ),
    2: (
        "durable waits: run version, wake_at, waiting_for, deadline, parent; signals",
        """
ALTER TABLE {s}.buttress_runs
    ADD COLUMN version     text,
    ADD COLUMN wake_at     double precision,
    ADD COLUMN waiting_for text,
    ADD COLUMN deadline    double precision,
    ADD COLUMN parent      text;
CREATE INDEX buttress_runs_due ON {s}.buttress_runs (saga, wake_at, run_id)
    WHERE status = 'waiting';
CREATE TABLE {s}.buttress_signals (
    id      bigserial PRIMARY KEY,
    run_id  text NOT NULL,
    name    text NOT NULL,
    payload json,
    sent_at double precision NOT NULL
);
CREATE INDEX buttress_signals_run ON {s}.buttress_signals (run_id, id)
""",
    ),
}

_COLUMNS = (
    "run_id, saga, status, input, key, input_hash, created_at, updated_at, owner, "
    "lease_until, error, result, expires_at, ttl, version, wake_at, waiting_for, deadline, "
    "parent"
)
_N_COLUMNS = len(_COLUMNS.split(","))
_INCOMPLETE_SQL = "(" + ", ".join(f"'{status}'" for status in INCOMPLETE) + ")"
_ACTIVE_SQL = "(" + ", ".join(f"'{status}'" for status in ACTIVE) + ")"

_SQL = {
    "version": "SELECT max(version) FROM {s}.buttress_schema",
    "exists": "SELECT to_regclass(%s) IS NOT NULL",
    "lock": "SELECT pg_advisory_xact_lock(hashtext(%s))",
    "insert_run": (
        "INSERT INTO {s}.buttress_runs (run_id, saga, status, input, key, input_hash, "
        "created_at, updated_at, owner, lease_until, ttl, version, deadline, parent) "
        "VALUES (%s, %s, %s, %s::json, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    ),
    "bind_key": (
        "INSERT INTO {s}.buttress_keys (saga, key, run_id) VALUES (%s, %s, %s) "
        "ON CONFLICT DO NOTHING"
    ),
    "holder": "SELECT run_id FROM {s}.buttress_keys WHERE saga = %s AND key = %s FOR UPDATE",
    "rebind_key": "UPDATE {s}.buttress_keys SET run_id = %s WHERE saga = %s AND key = %s",
    "record_for_update": f"SELECT {_COLUMNS} FROM {{s}}.buttress_runs WHERE run_id = %s FOR UPDATE",
    "hand_over": "UPDATE {s}.buttress_runs SET owner = %s, lease_until = %s WHERE run_id = %s",
    "entries": (
        "SELECT seq, step, event, attempt, at, duration, output, error "
        "FROM {s}.buttress_log WHERE run_id = %s ORDER BY seq"
    ),
    # The entries travel as one JSON array (one parameter, dumped by the json module in
    # C) rather than as eight typed arrays, which cost the client far more to adapt.
    # Each output rides in it as JSON *text*: json_to_recordset turns strings into text,
    # which cannot hold the \u0000 that a json value may.
    "insert_log": (
        "INSERT INTO {s}.buttress_log (run_id, seq, step, event, attempt, at, duration, "
        "output, error) SELECT %s, e.seq, e.step, e.event, e.attempt, e.at, e.duration, "
        "e.output::json, e.error FROM json_to_recordset(%s::json) AS e(seq integer, "
        "step text, event text, attempt integer, at double precision, "
        "duration double precision, output text, error text)"
    ),
    # Concurrent async writes of many runs in one statement (group commit): one round
    # trip and one WAL flush for the batch, each run's log lines and new state together,
    # as atomic as a single write. A column changes only where its flag says so; the
    # rows travel as one JSON array, like the log lines (see insert_log).
    "write_batch": (
        "WITH b AS (SELECT * FROM json_to_recordset(%s::json) AS b(run_id text, "
        "entries text, hu boolean, updated_at double precision, hl boolean, "
        "lease_until double precision, hs boolean, status text, fin boolean, error text, "
        "result text, expires_at double precision, hw boolean, wake_at double precision, "
        "waiting_for text)), "
        "log AS (INSERT INTO {s}.buttress_log (run_id, seq, step, event, attempt, at, "
        "duration, output, error) SELECT b.run_id, e.seq, e.step, e.event, e.attempt, e.at, "
        "e.duration, e.output::json, e.error FROM b, json_to_recordset(b.entries::json) "
        "AS e(seq integer, step text, event text, attempt integer, at double precision, "
        "duration double precision, output text, error text)) "
        "UPDATE {s}.buttress_runs r SET "
        "updated_at = CASE WHEN b.hu THEN b.updated_at ELSE r.updated_at END, "
        "lease_until = CASE WHEN b.hl THEN b.lease_until ELSE r.lease_until END, "
        "status = CASE WHEN b.hs THEN b.status ELSE r.status END, "
        "error = CASE WHEN b.fin THEN b.error ELSE r.error END, "
        "result = CASE WHEN b.fin THEN b.result::json ELSE r.result END, "
        "expires_at = CASE WHEN b.fin THEN b.expires_at ELSE r.expires_at END, "
        "wake_at = CASE WHEN b.hw THEN b.wake_at ELSE r.wake_at END, "
        "waiting_for = CASE WHEN b.hw THEN b.waiting_for ELSE r.waiting_for END "
        "FROM b WHERE r.run_id = b.run_id"
    ),
    # A plain conditional UPDATE: it waits for a row another transaction holds (bounded
    # by statement_timeout) and then re-checks the condition on the row as committed,
    # so exactly one claimant wins and a locked run is never skipped silently.
    "claim_run": (
        "UPDATE {s}.buttress_runs SET owner = %s, lease_until = %s WHERE run_id = %s "
        f"AND status IN {_INCOMPLETE_SQL} "
        "AND (lease_until <= %s OR (%s::text IS NOT NULL AND owner = %s))"
    ),
    # One statement, one snapshot: the record and its whole log.
    "load": (
        f"SELECT {_COLUMNS}, (SELECT coalesce(json_agg(json_build_array(seq, step, event, "
        "attempt, at, duration, output, error) ORDER BY seq), '[]') "
        "FROM {s}.buttress_log l WHERE l.run_id = r.run_id) "
        "FROM {s}.buttress_runs r WHERE run_id = %s"
    ),
    "incomplete": (
        "SELECT run_id FROM {s}.buttress_runs "
        f"WHERE saga = %s AND status IN {_ACTIVE_SQL} ORDER BY created_at"
    ),
    "counts": "SELECT status, count(*) FROM {s}.buttress_runs WHERE saga = %s GROUP BY status",
    "due": (
        "SELECT run_id FROM {s}.buttress_runs WHERE saga = %s AND status = %s "
        "AND wake_at <= %s ORDER BY wake_at, run_id LIMIT %s"
    ),
    # Locks the run's row (a concurrent write() of it waits, or is waited for) and, when
    # it waits for this signal (or the signal cancels), makes it due at the latest now.
    "signal_run": (
        "UPDATE {s}.buttress_runs SET wake_at = CASE WHEN status = %s "
        "AND (waiting_for IN (%s, %s) OR %s) THEN least(coalesce(wake_at, %s), %s) "
        f"ELSE wake_at END WHERE run_id = %s RETURNING {_COLUMNS}"
    ),
    "insert_signal": (
        "INSERT INTO {s}.buttress_signals (run_id, name, payload, sent_at) "
        "VALUES (%s, %s, %s::json, %s)"
    ),
    "signals": (
        "SELECT id, name, payload, sent_at FROM {s}.buttress_signals WHERE run_id = %s ORDER BY id"
    ),
}


@dataclass(slots=True)
class _Query:
    """One statement of an operation, and what to send back: ``"rows"``, ``"one"``
    (the first row or ``None``) or ``"count"`` (rows affected)."""

    sql: str
    params: tuple[Any, ...] = ()
    want: str = "count"


# An operation: a generator of statements that receives each one's answer and returns
# its result. The same operation runs on the sync and on the async connection.
_Op = Generator[_Query, Any, T]


class _Pool(Protocol):
    """What the store uses of a ``psycopg_pool.ConnectionPool``."""

    def connection(self) -> contextlib.AbstractContextManager[psycopg.Connection[Any]]: ...


class _AsyncPool(Protocol):
    """What the store uses of a ``psycopg_pool.AsyncConnectionPool``."""

    def connection(
        self,
    ) -> contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]: ...


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _entries_json(entries: list[LogEntry]) -> str:
    """Log lines as the JSON array that ``insert_log`` and ``write_batch`` read."""
    return json.dumps(
        [
            {
                "seq": e.seq,
                "step": e.step,
                "event": e.event,
                "attempt": e.attempt,
                "at": e.at,
                "duration": e.duration,
                "output": _dump(e.output),
                "error": e.error,
            }
            for e in entries
        ]
    )


def _batch_row(run_id: str, entries: list[LogEntry], changes: dict[str, Any]) -> dict[str, Any]:
    """One write as a row of ``write_batch`` (``changes``: from ``run_changes``)."""
    final = "error" in changes
    return {
        "run_id": run_id,
        "entries": _entries_json(entries),
        "hu": "updated_at" in changes,
        "updated_at": changes.get("updated_at"),
        "hl": "lease_until" in changes,
        "lease_until": changes.get("lease_until"),
        "hs": "status" in changes,
        "status": changes.get("status"),
        "fin": final,
        "error": changes.get("error"),
        "result": _dump(changes.get("result")),
        "expires_at": changes.get("expires_at"),
        "hw": "wake_at" in changes,
        "wake_at": changes.get("wake_at"),
        "waiting_for": changes.get("waiting_for"),
    }


class _WriteBatcher:
    """Group commit for one event loop's async writes.

    A write that finds a flusher free and nothing queued runs its own statement at once,
    as it would without batching; writes that arrive while every flusher is busy queue,
    and the next flusher to finish takes them all (up to ``MAX_BATCH``) in one
    ``write_batch`` statement. Batches run in tasks of their own, so a caller cancelled
    while it waits never cancels the statement that carries other runs' writes (a write
    cancelled before its batch left is dropped; one already sent may still land: as
    after a crash, the log says where the run stands). If a batch fails on its data,
    each write is retried alone, so an error reaches only the write that caused it; if
    it fails on the connection, every write in it gets that error.
    """

    MAX_BATCH = 64

    def __init__(self, store: PostgresStore, flushers: int) -> None:
        self.store = store
        self.flushers = flushers
        self.in_flight = 0
        self.pending: list[tuple[str, list[LogEntry], dict[str, Any], asyncio.Future[None]]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def write(self, run_id: str, entries: list[LogEntry], changes: dict[str, Any]) -> None:
        store = self.store
        if self.in_flight < self.flushers and not self.pending:
            # Nothing to group with: this caller's own statement, as without batching.
            self.in_flight += 1
            try:
                await store._run_async(store._write_op(run_id, entries, changes), tx=False)
            finally:
                self.in_flight -= 1
                self._kick()
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((run_id, entries, changes, future))
        self._kick()
        await future

    def _kick(self) -> None:
        """Start a flush for the queued writes if a flusher is free."""
        if self.pending and self.in_flight < self.flushers:
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._flush())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _flush(self) -> None:
        try:
            while self.pending:
                batch = self._take()
                await self._execute(batch)
        finally:
            self.in_flight -= 1

    def _take(self) -> list[tuple[str, list[LogEntry], dict[str, Any], asyncio.Future[None]]]:
        """The next batch: at most MAX_BATCH writes, at most one per run (a run's next
        write waits for its previous one, so a second write of one run here is rare)."""
        batch: list[tuple[str, list[LogEntry], dict[str, Any], asyncio.Future[None]]] = []
        rest: list[tuple[str, list[LogEntry], dict[str, Any], asyncio.Future[None]]] = []
        seen: set[str] = set()
        for item in self.pending:
            if len(batch) < self.MAX_BATCH and item[0] not in seen:
                seen.add(item[0])
                batch.append(item)
            else:
                rest.append(item)
        self.pending = rest
        return batch

    async def _execute(
        self, batch: list[tuple[str, list[LogEntry], dict[str, Any], asyncio.Future[None]]]
    ) -> None:
        store = self.store
        live = [item for item in batch if not item[3].done()]
        if not live:
            return
        rows = json.dumps([_batch_row(run_id, entries, ch) for run_id, entries, ch, _ in live])
        try:
            await store._run_async(_single(_Query(store._sql["write_batch"], (rows,))), tx=False)
        except BackendError as exc:
            if len(live) == 1 or not isinstance(exc.__cause__, _DATA_ERRORS):
                for *_, future in live:
                    if not future.done():
                        future.set_exception(exc)
                return
            for run_id, entries, changes, future in live:  # find the write at fault
                try:
                    await store._run_async(store._write_op(run_id, entries, changes), tx=False)
                except BaseException as alone:
                    if not future.done():
                        future.set_exception(alone)
                else:
                    if not future.done():
                        future.set_result(None)
            return
        except BaseException as exc:
            for *_, future in live:
                if not future.done():
                    future.set_exception(exc)
            raise
        for *_, future in live:
            if not future.done():
                future.set_result(None)


def _single(query: _Query) -> Generator[_Query, Any, None]:
    yield query


def _record(row: tuple[Any, ...] | Any) -> RunRecord:
    return RunRecord(
        run_id=row[0],
        saga=row[1],
        status=row[2],
        input=row[3],
        key=row[4],
        input_hash=row[5],
        created_at=row[6],
        updated_at=row[7],
        owner=row[8],
        lease_until=row[9],
        error=row[10],
        result=row[11],
        expires_at=row[12],
        ttl=row[13],
        version=row[14],
        wake_at=row[15],
        waiting_for=row[16],
        deadline=row[17],
        parent=row[18],
    )


def _entry(row: Any) -> LogEntry:
    return LogEntry(
        seq=row[0],
        step=row[1],
        event=row[2],
        attempt=row[3],
        at=row[4],
        duration=row[5],
        output=row[6],
        error=row[7],
    )


class PostgresStore:
    """A :class:`~buttress.backends.SagaStore` (and
    :class:`~buttress.backends.AsyncSagaStore`) in a PostgreSQL schema.

    Give it where to connect: ``conninfo`` (a ``postgresql://`` URL or a libpq
    ``key=value`` string), a ``connect`` factory returning a new
    ``psycopg.Connection``, or a ``pool`` (a ``psycopg_pool.ConnectionPool`` or any
    object whose ``connection()`` lends one). The async methods use ``async_connect``
    or ``async_pool`` when given, else an ``AsyncConnection`` to ``conninfo``, else the
    sync connection on a worker thread.

    Args:
        conninfo: where to connect.
        schema: the schema holding the tables (default ``"buttress"``), created on
            first use.
        create_schema: create or upgrade the schema on first use (default); with
            ``False`` a missing or older schema raises ``BackendError`` until an
            operator runs :meth:`migrate`.
        statement_timeout: seconds any statement may run (or wait for a lock) before
            the server cancels it (default 5).
        connect_timeout: seconds to wait for a new connection (default 5).
        connect: a factory for the sync connection (instead of ``conninfo``).
        pool: a pool lending sync connections (instead of ``conninfo``).
        async_connect: an async factory for the async connection.
        async_pool: a pool lending async connections.
        pool_size: the most connections each face's own pool opens (default 10; with
            ``conninfo`` only). Concurrent sagas beyond it wait for a connection; the
            server needs ``max_connections`` above the sum over every process.
    """

    def __init__(
        self,
        conninfo: str | None = None,
        *,
        schema: str = "buttress",
        create_schema: bool = True,
        statement_timeout: float | timedelta = 5.0,
        connect_timeout: float | timedelta = 5.0,
        connect: Callable[[], psycopg.Connection[Any]] | None = None,
        pool: _Pool | None = None,
        async_connect: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]] | None = None,
        async_pool: _AsyncPool | None = None,
        pool_size: int = 10,
    ) -> None:
        if conninfo is not None and not isinstance(conninfo, str):
            raise ConfigTypeError(
                f"conninfo must be a postgresql:// URL or a libpq conninfo string, got {conninfo!r}"
            )
        if not isinstance(schema, str):
            raise ConfigTypeError(f"schema must be a string, got {schema!r}")
        if not _IDENTIFIER.fullmatch(schema):
            raise ConfigValueError(
                f"schema must be a plain identifier (letters, digits, _; at most 63), "
                f"got {schema!r}"
            )
        sources = [s for s in (conninfo, connect, pool) if s is not None]
        if len(sources) > 1:
            raise ConfigValueError("give only one of conninfo, connect and pool")
        if not sources and async_connect is None and async_pool is None:
            raise ConfigValueError(
                "PostgresStore needs somewhere to connect: conninfo, connect, pool, "
                "async_connect or async_pool"
            )
        if async_connect is not None and async_pool is not None:
            raise ConfigValueError("give only one of async_connect and async_pool")
        for label, factory in (("connect", connect), ("async_connect", async_connect)):
            if factory is not None and not callable(factory):
                raise ConfigTypeError(f"{label} must be callable, got {factory!r}")
        for label, lender in (("pool", pool), ("async_pool", async_pool)):
            if lender is not None and not callable(getattr(lender, "connection", None)):
                raise ConfigTypeError(
                    f"{label} must be a connection pool (with a connection() method), "
                    f"got {lender!r}"
                )
        self.conninfo = conninfo
        self.schema = schema
        self.create_schema = check_bool("create_schema", create_schema)
        self.statement_timeout = require_seconds("statement_timeout", statement_timeout)
        self.connect_timeout = require_seconds("connect_timeout", connect_timeout)
        self.pool_size = check_int("pool_size", pool_size)
        # Concurrent group-commit flushes of the async face (see _WriteBatcher).
        self.write_flushers = max(1, self.pool_size // 2)
        self._connect = connect
        self._pool = pool
        self._async_connect = async_connect
        self._async_pool = async_pool
        quoted = f'"{schema}"'
        self._sql = {name: text.format(s=quoted) for name, text in _SQL.items()}
        self._version_table = _VERSION_TABLE.format(s=quoted)
        self._ready = False  # the schema was checked (and made) once
        self._lock = threading.Lock()  # the sync connection
        self._conn: psycopg.Connection[Any] | None = None
        self._state = threading.Lock()  # swapping the async connection between loops
        self._aconn: psycopg.AsyncConnection[Any] | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._alock: asyncio.Lock | None = None
        self._configured: weakref.WeakSet[Any] = weakref.WeakSet()  # pooled connections
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _WriteBatcher] = (
            weakref.WeakKeyDictionary()
        )
        self._own_pool: psycopg_pool.ConnectionPool[Any] | None = None
        # The async face's own pools, one per event loop using the store.
        self._own_apools: dict[
            asyncio.AbstractEventLoop,
            tuple[psycopg_pool.AsyncConnectionPool[Any], asyncio.Future[None], asyncio.Task[None]],
        ] = {}

    def __repr__(self) -> str:
        return f"PostgresStore(schema={self.schema!r})"

    # -- connections ------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"schema {self.schema!r}"

    def _wrap(self, exc: BaseException) -> BackendError:
        return BackendError(f"PostgreSQL store ({self._where}) failed: {exc}".rstrip())

    def _setup_sql(self) -> tuple[str, tuple[Any, ...]]:
        milliseconds = str(max(1, math.ceil(self.statement_timeout * 1000)))
        return "SELECT set_config('statement_timeout', %s, false)", (milliseconds,)

    def _connect_kwargs(self) -> dict[str, Any]:
        # libpq takes whole seconds (and treats 1 as 2).
        return {"autocommit": True, "connect_timeout": max(1, math.ceil(self.connect_timeout))}

    def _open_sync(self) -> psycopg.Connection[Any]:
        if self._connect is not None:
            conn = self._connect()
            if not isinstance(conn, psycopg.Connection):
                raise ConfigTypeError(f"connect must return a psycopg.Connection, got {conn!r}")
            if conn.info.transaction_status == pq.TransactionStatus.IDLE:
                conn.autocommit = True
        elif self.conninfo is not None:
            conn = psycopg.Connection.connect(self.conninfo, **self._connect_kwargs())
        else:
            raise BackendError(
                f"PostgreSQL store ({self._where}) has only async connections: "
                "use the saga's async face (run_async, recover_async)"
            )
        try:
            conn.execute(*self._setup_sql())
        except BaseException:
            conn.close()
            raise
        return conn

    def _pool_kwargs(self) -> dict[str, Any]:
        return {
            "conninfo": self.conninfo,
            "min_size": 1,
            "max_size": self.pool_size,
            "kwargs": self._connect_kwargs(),
            "timeout": self.connect_timeout,
            "name": f"buttress-{self.schema}",
        }

    def _sync_pool(self) -> _Pool | None:
        """The pool the sync face draws from: the one given, or the store's own (made on
        first use from ``conninfo``); ``None`` for a ``connect`` factory."""
        if self._pool is not None:
            return self._pool
        if self._connect is not None or self.conninfo is None:
            return None
        pool = self._own_pool
        if pool is None:
            with self._lock:
                if self._own_pool is None:
                    # One direct connection first: an unreachable server fails the call
                    # at once (a pool would retry in the background until its timeout).
                    psycopg.Connection.connect(self.conninfo, **self._connect_kwargs()).close()
                    self._own_pool = psycopg_pool.ConnectionPool(**self._pool_kwargs(), open=True)
                pool = self._own_pool
        return pool

    @contextlib.contextmanager
    def _sync_connection(self) -> Iterator[psycopg.Connection[Any]]:
        lender = self._sync_pool()
        if lender is not None:
            with lender.connection() as conn:
                fresh = conn not in self._configured
                if fresh:
                    conn.execute(*self._setup_sql())
                yield conn
            if fresh:  # the setting is kept once the pool committed it
                self._configured.add(conn)
            return
        with self._lock:
            current = self._conn
            if current is None or current.closed or current.broken:
                current = self._conn = self._open_sync()
            conn = current
            try:
                yield conn
            except BaseException:
                if conn.broken or conn.info.transaction_status != pq.TransactionStatus.IDLE:
                    self._conn = None
                    conn.close()
                raise

    async def _open_async(self) -> psycopg.AsyncConnection[Any]:
        if self._async_connect is not None:
            conn = await self._async_connect()
            if not isinstance(conn, psycopg.AsyncConnection):
                raise ConfigTypeError(
                    f"async_connect must return a psycopg.AsyncConnection, got {conn!r}"
                )
            if conn.info.transaction_status == pq.TransactionStatus.IDLE:
                await conn.set_autocommit(True)
        else:
            assert self.conninfo is not None
            conn = await psycopg.AsyncConnection.connect(self.conninfo, **self._connect_kwargs())
        try:
            await conn.execute(*self._setup_sql())
        except BaseException:
            await conn.close()
            raise
        return conn

    def _loop_state(self) -> asyncio.Lock:
        """The async lock of the running loop; a connection opened on another loop
        (one that ``asyncio.run`` closed, say) is dropped."""
        loop = asyncio.get_running_loop()
        with self._state:
            if self._aloop is not loop or self._alock is None:
                old, self._aconn = self._aconn, None
                self._aloop, self._alock = loop, asyncio.Lock()
                if old is not None and not old.closed:
                    old.pgconn.finish()  # its loop may be gone: close without awaiting
            return self._alock

    async def _async_pool_now(self) -> _AsyncPool | None:
        """The pool the async face draws from: the one given, or the store's own for
        the running loop (made and opened on first use; it closes when its loop shuts
        down); ``None`` for an ``async_connect`` factory."""
        if self._async_pool is not None:
            return self._async_pool
        if self._async_connect is not None:
            return None
        loop = asyncio.get_running_loop()
        found = self._own_apools.get(loop)
        if found is None:
            # As for the sync pool: an unreachable server fails the first call at once.
            assert self.conninfo is not None
            probe = await psycopg.AsyncConnection.connect(self.conninfo, **self._connect_kwargs())
            await probe.close()
            with self._state:
                found = self._own_apools.get(loop)
                if found is None:
                    made = psycopg_pool.AsyncConnectionPool(**self._pool_kwargs(), open=False)
                    found = self._own_apools[loop] = (
                        made,
                        asyncio.ensure_future(made.open()),
                        loop.create_task(self._close_with_loop(loop, made)),
                    )
        await asyncio.shield(found[1])
        return found[0]

    async def _close_with_loop(
        self, loop: asyncio.AbstractEventLoop, pool: psycopg_pool.AsyncConnectionPool[Any]
    ) -> None:
        """Keep a loop's pool open as long as the loop runs: ``asyncio.run`` cancels this
        task at the end, and the pool closes its connections then (not left to a dead
        loop)."""
        try:
            await asyncio.Event().wait()
        finally:
            with self._state:
                if self._own_apools.get(loop, (None,))[0] is pool:
                    del self._own_apools[loop]
            await pool.close()

    @contextlib.asynccontextmanager
    async def _async_connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        lender = await self._async_pool_now()
        if lender is not None:
            async with lender.connection() as conn:
                fresh = conn not in self._configured
                if fresh:
                    await conn.execute(*self._setup_sql())
                yield conn
            if fresh:  # the setting is kept once the pool committed it
                self._configured.add(conn)
            return
        async with self._loop_state():
            current = self._aconn
            if current is None or current.closed or current.broken:
                current = self._aconn = await self._open_async()
            conn = current
            try:
                yield conn
            except BaseException:
                if conn.broken or conn.info.transaction_status != pq.TransactionStatus.IDLE:
                    self._aconn = None
                    await conn.close()
                raise

    @property
    def _async_native(self) -> bool:
        return (
            self._async_pool is not None
            or self._async_connect is not None
            or (self.conninfo is not None)
        )

    def close(self) -> None:
        """Close the store's own connections and pools (a pool given to it stays open;
        the async pool of a running loop closes with :meth:`aclose` or its loop)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            pool, self._own_pool = self._own_pool, None
        if pool is not None:
            pool.close()
        with self._state:
            if self._aconn is not None and not self._aconn.closed:
                self._aconn.pgconn.finish()
            self._aconn = None

    async def aclose(self) -> None:
        """Async twin of :meth:`close`; also closes the async pool of this loop."""
        loop = asyncio.get_running_loop()
        with self._state:
            found = self._own_apools.pop(loop, None)
        if found is not None:
            pool, _, guard = found
            await pool.close()
            guard.cancel()
        await asyncio.to_thread(self.close)

    # -- running operations -----------------------------------------------------------------

    def _run_sync(self, op: _Op[T], *, tx: bool) -> T:
        try:
            with self._sync_connection() as conn:
                if not self._ready:
                    self._ensure_sync(conn)
                return self._pump_sync(conn, op, tx)
        except psycopg.Error as exc:
            raise self._wrap(exc) from exc

    @staticmethod
    def _pump_sync(conn: psycopg.Connection[Any], op: _Op[T], tx: bool) -> T:
        with conn.transaction() if tx else contextlib.nullcontext(), conn.cursor() as cursor:
            query = next(op)
            while True:
                cursor.execute(query.sql, query.params or None)
                if query.want == "count":
                    answer: Any = cursor.rowcount
                elif query.want == "rows":
                    answer = cursor.fetchall()
                else:
                    answer = cursor.fetchone()
                try:
                    query = op.send(answer)
                except StopIteration as stop:
                    done: T = stop.value
                    return done

    async def _run_async(self, op: _Op[T], *, tx: bool) -> T:
        if not self._async_native:
            return await asyncio.to_thread(self._run_sync, op, tx=tx)
        try:
            async with self._async_connection() as conn:
                if not self._ready:
                    await self._ensure_async(conn)
                return await self._pump_async(conn, op, tx)
        except psycopg.Error as exc:
            raise self._wrap(exc) from exc

    @staticmethod
    async def _pump_async(conn: psycopg.AsyncConnection[Any], op: _Op[T], tx: bool) -> T:
        async with (
            conn.transaction() if tx else contextlib.nullcontext(),
            conn.cursor() as cursor,
        ):
            query = next(op)
            while True:
                await cursor.execute(query.sql, query.params or None)
                if query.want == "count":
                    answer: Any = cursor.rowcount
                elif query.want == "rows":
                    answer = await cursor.fetchall()
                else:
                    answer = await cursor.fetchone()
                try:
                    query = op.send(answer)
                except StopIteration as stop:
                    done: T = stop.value
                    return done

    # -- the schema -------------------------------------------------------------------------

    def _installed(self) -> _Op[int | None]:
        """The schema's version, or ``None`` when there are no tables yet."""
        found = yield _Query(self._sql["exists"], (f'"{self.schema}".buttress_schema',), "one")
        if not found[0]:
            return None
        row = yield _Query(self._sql["version"], (), "one")
        return None if row[0] is None else int(row[0])

    def _judge_version(self, version: int | None) -> bool:
        """True when the schema must be created or upgraded; raises when it cannot be."""
        if version is not None and version > SCHEMA_VERSION:
            raise BackendError(
                f"the PostgreSQL store in schema {self.schema!r} has schema version "
                f"{version}, newer than this buttress understands ({SCHEMA_VERSION}): "
                "upgrade buttress"
            )
        if version == SCHEMA_VERSION:
            return False
        if not self.create_schema:
            found = "no buttress tables" if version is None else f"schema version {version}"
            raise BackendError(
                f"the PostgreSQL store in schema {self.schema!r} has {found}; this "
                f"buttress needs version {SCHEMA_VERSION}: run PostgresStore(...).migrate() "
                "(create_schema=False stops the store doing it on first use)"
            )
        return True

    def _migrate(self) -> _Op[int]:
        # The advisory lock makes concurrent first uses take turns; the version is read
        # again under it, so each migration runs exactly once.
        yield _Query(self._sql["lock"], (f"buttress-schema:{self.schema}",), "one")
        for statement in self._version_table.split(";"):
            if statement.strip():
                yield _Query(statement)
        row = yield _Query(self._sql["version"], (), "one")
        version = 0 if row[0] is None else int(row[0])
        if version > SCHEMA_VERSION:
            self._judge_version(version)
        for target in range(version + 1, SCHEMA_VERSION + 1):
            note, ddl = MIGRATIONS[target]
            for statement in ddl.format(s=f'"{self.schema}"').split(";"):
                if statement.strip():
                    yield _Query(statement)
            yield _Query(
                f'INSERT INTO "{self.schema}".buttress_schema (version, note) VALUES (%s, %s)',
                (target, note),
            )
        return max(version, SCHEMA_VERSION)

    def _ensure_sync(self, conn: psycopg.Connection[Any]) -> None:
        version = self._pump_sync(conn, self._installed(), False)
        if self._judge_version(version):
            self._pump_sync(conn, self._migrate(), True)
        self._ready = True

    async def _ensure_async(self, conn: psycopg.AsyncConnection[Any]) -> None:
        version = await self._pump_async(conn, self._installed(), False)
        if self._judge_version(version):
            await self._pump_async(conn, self._migrate(), True)
        self._ready = True

    def migrate(self) -> int:
        """Create the schema and its tables, or bring them to this buttress's version;
        return the version. Safe to run at any time, from any number of processes."""
        try:
            with self._sync_connection() as conn:
                version = self._pump_sync(conn, self._installed(), False)
                if version is not None and version > SCHEMA_VERSION:
                    self._judge_version(version)
                if version != SCHEMA_VERSION:
                    version = self._pump_sync(conn, self._migrate(), True)
        except psycopg.Error as exc:
            raise self._wrap(exc) from exc
        self._ready = True
        return SCHEMA_VERSION if version is None else version

    def schema_version(self) -> int | None:
        """The version recorded in the schema (``None``: no tables yet); creates nothing."""
        try:
            with self._sync_connection() as conn:
                return self._pump_sync(conn, self._installed(), False)
        except psycopg.Error as exc:
            raise self._wrap(exc) from exc

    # -- operations (shared by both faces) --------------------------------------------------

    def _insert_run(self, r: RunRecord) -> _Query:
        return _Query(self._sql["insert_run"], run_row(r))

    def _create_run(self, record: RunRecord) -> _Op[None]:
        yield self._insert_run(record)

    def _claim_key(self, record: RunRecord, now: float) -> _Op[KeyClaim]:
        assert record.key is not None
        bound = yield _Query(self._sql["bind_key"], (record.saga, record.key, record.run_id))
        if bound == 1:
            yield self._insert_run(record)
            return KeyClaim("new", record.run_id)
        # The key is held: lock its row, then the holder's, and judge the holder.
        held = yield _Query(self._sql["holder"], (record.saga, record.key), "one")
        row = None
        if held is not None:
            row = yield _Query(self._sql["record_for_update"], (held[0],), "one")
        if row is not None:
            existing = _record(row)
            claim = judge_claim(existing, record, now)
            if claim is not None:
                if claim.outcome == "resume":
                    yield _Query(
                        self._sql["hand_over"],
                        (record.owner, record.lease_until, existing.run_id),
                    )
                rows = yield _Query(self._sql["entries"], (existing.run_id,), "rows")
                claim.record = existing
                claim.entries = [_entry(r) for r in rows]
                return claim
        # No holder, or one that may be replaced (failed and compensated, or expired).
        yield self._insert_run(record)
        if held is None:
            yield _Query(self._sql["bind_key"], (record.saga, record.key, record.run_id))
        else:
            yield _Query(self._sql["rebind_key"], (record.run_id, record.saga, record.key))
        return KeyClaim("new", record.run_id)

    def _write(
        self,
        run_id: str,
        entries: list[LogEntry],
        *,
        lease_until: float | None,
        status: str | None,
        error: str | None,
        result: dict[str, Any] | None,
        expires_at: float | None,
        wake_at: float | None,
        waiting_for: str | None,
    ) -> _Op[None]:
        changes = run_changes(
            entries,
            lease_until=lease_until,
            status=status,
            error=error,
            result=result,
            expires_at=expires_at,
            wake_at=wake_at,
            waiting_for=waiting_for,
        )
        return self._write_op(run_id, entries, changes)

    def _write_op(self, run_id: str, entries: list[LogEntry], changes: dict[str, Any]) -> _Op[None]:
        sets = [f"{c} = %s::json" if c == "result" else f"{c} = %s" for c in changes]
        args = [_dump(v) if c == "result" else v for c, v in changes.items()]
        update = (
            f'UPDATE "{self.schema}".buttress_runs SET {", ".join(sets)} WHERE run_id = %s'
            if sets
            else ""
        )
        if not entries:
            if update:
                yield _Query(update, (*args, run_id))
            return
        log = (run_id, _entries_json(entries))
        if not update:
            yield _Query(self._sql["insert_log"], log)
            return
        # One statement, so one round trip and atomic without a transaction block.
        yield _Query(f"WITH log AS ({self._sql['insert_log']}) {update}", (*log, *args, run_id))

    def _load(self, run_id: str) -> _Op[tuple[RunRecord, list[LogEntry]] | None]:
        row = yield _Query(self._sql["load"], (run_id,), "one")
        if row is None:
            return None
        return _record(row), [_entry(item) for item in row[_N_COLUMNS]]

    def _claim_run(
        self,
        run_id: str,
        owner: str,
        now: float,
        lease_until: float,
        expected_owner: str | None,
    ) -> _Op[bool]:
        count = yield _Query(
            self._sql["claim_run"],
            (owner, lease_until, run_id, now, expected_owner, expected_owner),
        )
        return bool(count == 1)

    def _incomplete(self, saga: str) -> _Op[list[str]]:
        rows = yield _Query(self._sql["incomplete"], (saga,), "rows")
        return [row[0] for row in rows]

    def _runs(self, saga: str | None, status: str | None, limit: int) -> _Op[list[RunRecord]]:
        where: list[str] = []
        args: list[Any] = []
        if saga is not None:
            where.append("saga = %s")
            args.append(saga)
        if status is not None:
            where.append("status = %s")
            args.append(status)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = yield _Query(
            f'SELECT {_COLUMNS} FROM "{self.schema}".buttress_runs {clause} '
            "ORDER BY created_at DESC LIMIT %s",
            (*args, limit),
            "rows",
        )
        return [_record(row) for row in rows]

    def _counts(self, saga: str) -> _Op[dict[str, int]]:
        rows = yield _Query(self._sql["counts"], (saga,), "rows")
        return {row[0]: int(row[1]) for row in rows}

    def _due(self, saga: str, now: float, limit: int) -> _Op[list[str]]:
        rows = yield _Query(self._sql["due"], (saga, WAITING, now, limit), "rows")
        return [row[0] for row in rows]

    def _send_signal(
        self, run_id: str, name: str, payload: Any, at: float
    ) -> _Op[RunRecord | None]:
        # Run in a transaction: the run's row is locked first, so signals of one run get
        # increasing ids in the order they commit, and no signal of a missing run stays.
        row = yield _Query(
            self._sql["signal_run"],
            (WAITING, name, ANY_SIGNAL, name == CANCEL_SIGNAL, at, at, run_id),
            "one",
        )
        if row is None:
            return None
        yield _Query(self._sql["insert_signal"], (run_id, name, json.dumps(payload), at))
        return _record(row)

    def _signals(self, run_id: str) -> _Op[list[Signal]]:
        rows = yield _Query(self._sql["signals"], (run_id,), "rows")
        return [Signal(r[0], r[1], r[2], r[3]) for r in rows]

    # -- the sync face ----------------------------------------------------------------------

    def create_run(self, record: RunRecord) -> None:
        self._run_sync(self._create_run(record), tx=False)

    def claim_key(self, record: RunRecord, *, now: float) -> KeyClaim:
        return self._run_sync(self._claim_key(record, now), tx=True)

    def write(
        self,
        run_id: str,
        entries: list[LogEntry],
        *,
        lease_until: float | None = None,
        status: str | None = None,
        error: str | None = None,
        result: dict[str, Any] | None = None,
        expires_at: float | None = None,
        wake_at: float | None = None,
        waiting_for: str | None = None,
    ) -> None:
        op = self._write(
            run_id,
            entries,
            lease_until=lease_until,
            status=status,
            error=error,
            result=result,
            expires_at=expires_at,
            wake_at=wake_at,
            waiting_for=waiting_for,
        )
        self._run_sync(op, tx=False)

    def load(self, run_id: str) -> tuple[RunRecord, list[LogEntry]] | None:
        return self._run_sync(self._load(run_id), tx=False)

    def claim_run(
        self,
        run_id: str,
        owner: str,
        *,
        now: float,
        lease_until: float,
        expected_owner: str | None = None,
    ) -> bool:
        op = self._claim_run(run_id, owner, now, lease_until, expected_owner)
        return self._run_sync(op, tx=False)

    def incomplete(self, saga: str) -> list[str]:
        return self._run_sync(self._incomplete(saga), tx=False)

    def runs(
        self, *, saga: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[RunRecord]:
        return self._run_sync(self._runs(saga, status, limit), tx=False)

    def counts(self, saga: str) -> dict[str, int]:
        return self._run_sync(self._counts(saga), tx=False)

    def due(self, saga: str, *, now: float, limit: int = 1000) -> list[str]:
        return self._run_sync(self._due(saga, now, limit), tx=False)

    def send_signal(self, run_id: str, name: str, payload: Any, *, at: float) -> RunRecord | None:
        return self._run_sync(self._send_signal(run_id, name, payload, at), tx=True)

    def signals(self, run_id: str) -> list[Signal]:
        return self._run_sync(self._signals(run_id), tx=False)

    # -- the async face ---------------------------------------------------------------------

    async def acreate_run(self, record: RunRecord) -> None:
        await self._run_async(self._create_run(record), tx=False)

    async def aclaim_key(self, record: RunRecord, *, now: float) -> KeyClaim:
        return await self._run_async(self._claim_key(record, now), tx=True)

    async def awrite(
        self,
        run_id: str,
        entries: list[LogEntry],
        *,
        lease_until: float | None = None,
        status: str | None = None,
        error: str | None = None,
        result: dict[str, Any] | None = None,
        expires_at: float | None = None,
        wake_at: float | None = None,
        waiting_for: str | None = None,
    ) -> None:
        changes = run_changes(
            entries,
            lease_until=lease_until,
            status=status,
            error=error,
            result=result,
            expires_at=expires_at,
            wake_at=wake_at,
            waiting_for=waiting_for,
        )
        if not self._async_native or not changes or not self.write_flushers:
            await self._run_async(self._write_op(run_id, entries, changes), tx=False)
            return
        await self._batcher().write(run_id, entries, changes)

    def _batcher(self) -> _WriteBatcher:
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is None:
            batcher = self._batchers[loop] = _WriteBatcher(self, self.write_flushers)
        return batcher

    async def aload(self, run_id: str) -> tuple[RunRecord, list[LogEntry]] | None:
        return await self._run_async(self._load(run_id), tx=False)

    async def aclaim_run(
        self,
        run_id: str,
        owner: str,
        *,
        now: float,
        lease_until: float,
        expected_owner: str | None = None,
    ) -> bool:
        op = self._claim_run(run_id, owner, now, lease_until, expected_owner)
        return await self._run_async(op, tx=False)

    async def aincomplete(self, saga: str) -> list[str]:
        return await self._run_async(self._incomplete(saga), tx=False)

    async def aruns(
        self, *, saga: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[RunRecord]:
        return await self._run_async(self._runs(saga, status, limit), tx=False)

    async def acounts(self, saga: str) -> dict[str, int]:
        return await self._run_async(self._counts(saga), tx=False)

    async def adue(self, saga: str, *, now: float, limit: int = 1000) -> list[str]:
        return await self._run_async(self._due(saga, now, limit), tx=False)

    async def asend_signal(
        self, run_id: str, name: str, payload: Any, *, at: float
    ) -> RunRecord | None:
        return await self._run_async(self._send_signal(run_id, name, payload, at), tx=True)

    async def asignals(self, run_id: str) -> list[Signal]:
        return await self._run_async(self._signals(run_id), tx=False)
