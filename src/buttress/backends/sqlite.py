"""A durable saga store on SQLite (standard library only).

Durability: the database runs in WAL mode with ``synchronous=NORMAL`` by default.
Every write is committed before the runner moves on, so a run survives its
process being killed at any point (the committed WAL lives in the OS page
cache and reaches the file). What ``NORMAL`` gives up is the last commits before
a *power failure or OS crash*; pass ``synchronous="FULL"`` to fsync every commit
when that matters more than throughput.

Several processes may share one database file: key claims and run take-overs run
in ``BEGIN IMMEDIATE`` transactions, so exactly one process wins each.

The async face (``acreate_run``, ``awrite``...: :class:`~buttress.backends.AsyncSagaStore`)
runs the same sync methods on one writer thread the store owns. ``sqlite3`` has no
non-blocking API, and SQLite admits one writer at a time anyway, so a single thread
per store loses nothing: the event loop only waits for a future, and concurrent
sagas queue on that thread instead of filling the loop's default executor with
threads that wait on the same lock. The writer runs everything queued so far in one
transaction (a group commit, each call in its own savepoint) and answers each caller
only once that transaction committed: every write is as durable as on the sync face,
and with ``synchronous="FULL"`` concurrent sagas share each fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buttress._validate import check_choice, require_seconds
from buttress.exceptions import BackendError, ConfigTypeError

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

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

_ACTIVE_SQL = "(" + ", ".join(f"'{status}'" for status in ACTIVE) + ")"
_INCOMPLETE_SQL = "(" + ", ".join(f"'{status}'" for status in INCOMPLETE) + ")"

SCHEMA = """
CREATE TABLE IF NOT EXISTS buttress_runs (
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
    ttl         REAL,
    version     TEXT,
    wake_at     REAL,
    waiting_for TEXT,
    deadline    REAL,
    parent      TEXT
);
CREATE TABLE IF NOT EXISTS buttress_keys (
    saga   TEXT NOT NULL,
    key    TEXT NOT NULL,
    run_id TEXT NOT NULL,
    PRIMARY KEY (saga, key)
);
CREATE TABLE IF NOT EXISTS buttress_log (
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
CREATE TABLE IF NOT EXISTS buttress_signals (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id  TEXT NOT NULL,
    name    TEXT NOT NULL,
    payload TEXT,
    sent_at REAL NOT NULL
)
"""
# The columns version 2 added to buttress_runs: an older database gains them in place.
_ADDED_COLUMNS = {
    "version": "TEXT",
    "wake_at": "REAL",
    "waiting_for": "TEXT",
    "deadline": "REAL",
    "parent": "TEXT",
}
# Made once the columns exist (an upgraded database has them only then).
_INDEXES = """
CREATE INDEX IF NOT EXISTS buttress_runs_saga_status ON buttress_runs (saga, status);
CREATE INDEX IF NOT EXISTS buttress_runs_due ON buttress_runs (saga, wake_at, run_id)
    WHERE status = 'waiting';
CREATE INDEX IF NOT EXISTS buttress_signals_run ON buttress_signals (run_id, id)
"""
SCHEMA_VERSION = 2
"""The version of the tables this buttress reads and writes (``PRAGMA user_version``):
1 had no waits; 2 added the run's version, wake_at, waiting_for, deadline and parent,
and the signals table."""

_BATCH = 256  # requests of the async face committed together, at most
_SLICE = 0.001  # seconds of work the writer thread does before it lets the loop in
_PAUSE = 0.00005  # and how long it steps aside then


@dataclass(slots=True)
class _Request:
    """One call of the async face, waiting for the writer thread."""

    call: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


def _settle(answers: list[tuple[_Request, bool, Any]]) -> None:
    """On the caller's loop: hand each request its result (a cancelled waiter is gone)."""
    for request, ok, value in answers:
        if request.future.done():
            continue
        if ok:
            request.future.set_result(value)
        else:
            request.future.set_exception(value)


class SQLiteStore:
    """A :class:`~buttress.backends.SagaStore` in one SQLite file.

    Args:
        path: the database file (created with its schema on first use).
        synchronous: ``"NORMAL"`` (default: safe against process crashes) or ``"FULL"``
            (also against power loss, slower).
        timeout: seconds to wait for another process's write lock (default 5).
    """

    def __init__(
        self, path: str | Path, *, synchronous: str = "NORMAL", timeout: float = 5.0
    ) -> None:
        if not isinstance(path, (str, Path)):
            raise ConfigTypeError(f"path must be a str or Path, got {path!r}")
        self.path = str(path)
        self.synchronous = check_choice("synchronous", synchronous, ("NORMAL", "FULL"))
        self.timeout = require_seconds("timeout", timeout)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={self.synchronous}")
            if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self._migrate()
        except sqlite3.Error as exc:
            raise BackendError(f"cannot open the SQLite store at {self.path!r}: {exc}") from exc

        # The async face: requests queued for the store's writer thread (see _drain).
        self._pending: list[_Request] = []
        self._wake = threading.Condition(threading.Lock())
        self._writer: threading.Thread | None = None
        self._closing = False
        self._local = threading.local()  # .batch: this thread is inside a group commit

    def _migrate(self) -> None:
        """Create the tables, or bring an older database to SCHEMA_VERSION in place, in one
        IMMEDIATE transaction (so that processes opening it at once take turns)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise BackendError(
                    f"the SQLite store at {self.path!r} has schema version {version}, newer "
                    f"than this buttress understands ({SCHEMA_VERSION}): upgrade buttress"
                )
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            present = {row[1] for row in db.execute("PRAGMA table_info(buttress_runs)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in present:
                    db.execute(f"ALTER TABLE buttress_runs ADD COLUMN {column} {kind}")
            for statement in _INDEXES.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close the store's connections and stop its writer thread; later calls reopen."""
        with self._wake:
            self._closing = True
            writer = self._writer
            self._wake.notify_all()
        if writer is not None and writer is not threading.current_thread():
            writer.join()
        with self._lock:
            self._db.close()

    async def aclose(self) -> None:
        """Async twin of :meth:`close` (waits for the store's thread off the loop)."""
        await asyncio.to_thread(self.close)

    async def _off_loop(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Queue a sync method for the store's writer thread and await its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._wake:
            if self._closing:
                raise BackendError(f"SQLite store {self.path!r} is closed")
            self._pending.append(_Request(functools.partial(fn, *args, **kwargs), loop, future))
            if self._writer is None or not self._writer.is_alive():  # first use, or a fork
                self._writer = threading.Thread(
                    target=self._drain, name="buttress-sqlite-writer", daemon=True
                )
                self._writer.start()
            self._wake.notify()
        return await future

    def _drain(self) -> None:
        """The writer thread: runs the queued requests, everything queued so far in one
        transaction (a group commit: each request in its own savepoint, so a failing
        one is rolled back alone), then hands every result back to its loop. A request
        is answered only after the transaction holding it committed."""
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending[:_BATCH], self._pending[_BATCH:]
            outcomes: list[tuple[bool, Any]] = []
            with self._lock:
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._local.batch = True
                    try:
                        mark = time.perf_counter()
                        for request in batch:
                            try:
                                outcomes.append((True, request.call()))
                            except Exception as exc:
                                outcomes.append((False, exc))
                            if time.perf_counter() - mark > _SLICE:
                                # CPython hands the GIL to a waiting thread (the event
                                # loop) only after its switch interval, 5 ms, unless the
                                # holder blocks: block briefly after every slice of work
                                # so that the loop is never starved for longer.
                                time.sleep(_PAUSE)
                                mark = time.perf_counter()
                    finally:
                        self._local.batch = False
                    self._db.execute("COMMIT")
                except sqlite3.Error as exc:
                    if self._db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    failure = BackendError(f"SQLite store {self.path!r} failed: {exc}")
                    outcomes = [(False, failure)] * len(batch)
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, bool, Any]]] = {}
            for request, (ok, value) in zip(batch, outcomes, strict=True):
                by_loop.setdefault(request.loop, []).append((request, ok, value))
            for loop, answers in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, answers)

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    @contextmanager
    def _tx(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        if getattr(self._local, "batch", False):
            # Inside the writer thread's group commit: a savepoint of its transaction.
            try:
                self._db.execute("SAVEPOINT buttress_op")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK TO buttress_op")
                    self._db.execute("RELEASE buttress_op")
                    raise
                self._db.execute("RELEASE buttress_op")
            except sqlite3.Error as exc:
                raise BackendError(f"SQLite store {self.path!r} failed: {exc}") from exc
            return
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise BackendError(f"SQLite store {self.path!r} failed: {exc}") from exc

    # -- writes -----------------------------------------------------------------------------

    @staticmethod
    def _insert_run(db: sqlite3.Connection, r: RunRecord) -> None:
        db.execute(
            "INSERT INTO buttress_runs (run_id, saga, status, input, key, input_hash, "
            "created_at, updated_at, owner, lease_until, ttl, version, deadline, parent) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            run_row(r),
        )

    def create_run(self, record: RunRecord) -> None:
        with self._tx() as db:
            self._insert_run(db, record)

    def claim_key(self, record: RunRecord, *, now: float) -> KeyClaim:
        assert record.key is not None
        with self._tx(immediate=True) as db:
            row = db.execute(
                "SELECT run_id FROM buttress_keys WHERE saga=? AND key=?",
                (record.saga, record.key),
            ).fetchone()
            if row is not None:
                existing = self._record(db, row[0])
                if existing is not None:
                    claim = judge_claim(existing, record, now)
                    if claim is not None:
                        if claim.outcome == "resume":
                            db.execute(
                                "UPDATE buttress_runs SET owner=?, lease_until=? WHERE run_id=?",
                                (record.owner, record.lease_until, existing.run_id),
                            )
                        claim.record = existing
                        claim.entries = self._entries(db, existing.run_id)
                        return claim
            self._insert_run(db, record)
            db.execute(
                "INSERT OR REPLACE INTO buttress_keys (saga, key, run_id) VALUES (?,?,?)",
                (record.saga, record.key, record.run_id),
            )
            return KeyClaim("new", record.run_id)

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
        with self._tx() as db:
            if entries:
                db.executemany(
                    "INSERT INTO buttress_log (run_id, seq, step, event, attempt, at, duration, "
                    "output, error) VALUES (?,?,?,?,?,?,?,?,?)",
                    [
                        (
                            run_id,
                            e.seq,
                            e.step,
                            e.event,
                            e.attempt,
                            e.at,
                            e.duration,
                            None if e.output is None else json.dumps(e.output),
                            e.error,
                        )
                        for e in entries
                    ],
                )
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
            if "result" in changes and changes["result"] is not None:
                changes["result"] = json.dumps(changes["result"])
            if changes:
                db.execute(
                    f"UPDATE buttress_runs SET {', '.join(f'{c}=?' for c in changes)} "
                    "WHERE run_id=?",
                    (*changes.values(), run_id),
                )

    def claim_run(
        self,
        run_id: str,
        owner: str,
        *,
        now: float,
        lease_until: float,
        expected_owner: str | None = None,
    ) -> bool:
        with self._tx(immediate=True) as db:
            cursor = db.execute(
                "UPDATE buttress_runs SET owner=?, lease_until=? WHERE run_id=? "
                f"AND status IN {_INCOMPLETE_SQL} "
                "AND (lease_until <= ? OR owner IS ?)",
                (owner, lease_until, run_id, now, expected_owner),
            )
            return cursor.rowcount == 1

    # -- reads ------------------------------------------------------------------------------

    @staticmethod
    def _from_row(row: tuple[Any, ...]) -> RunRecord:
        return RunRecord(
            run_id=row[0],
            saga=row[1],
            status=row[2],
            input=None if row[3] is None else json.loads(row[3]),
            key=row[4],
            input_hash=row[5],
            created_at=row[6],
            updated_at=row[7],
            owner=row[8],
            lease_until=row[9],
            error=row[10],
            result=None if row[11] is None else json.loads(row[11]),
            expires_at=row[12],
            ttl=row[13],
            version=row[14],
            wake_at=row[15],
            waiting_for=row[16],
            deadline=row[17],
            parent=row[18],
        )

    _COLUMNS = (
        "run_id, saga, status, input, key, input_hash, created_at, updated_at, owner, "
        "lease_until, error, result, expires_at, ttl, version, wake_at, waiting_for, "
        "deadline, parent"
    )

    def _record(self, db: sqlite3.Connection, run_id: str) -> RunRecord | None:
        row = db.execute(
            f"SELECT {self._COLUMNS} FROM buttress_runs WHERE run_id=?", (run_id,)
        ).fetchone()
        return None if row is None else self._from_row(row)

    @staticmethod
    def _entries(db: sqlite3.Connection, run_id: str) -> list[LogEntry]:
        rows = db.execute(
            "SELECT seq, step, event, attempt, at, duration, output, error FROM buttress_log "
            "WHERE run_id=? ORDER BY seq",
            (run_id,),
        ).fetchall()
        return [
            LogEntry(
                seq=r[0],
                step=r[1],
                event=r[2],
                attempt=r[3],
                at=r[4],
                duration=r[5],
                output=None if r[6] is None else json.loads(r[6]),
                error=r[7],
            )
            for r in rows
        ]

    def load(self, run_id: str) -> tuple[RunRecord, list[LogEntry]] | None:
        with self._tx() as db:
            record = self._record(db, run_id)
            if record is None:
                return None
            return record, self._entries(db, run_id)

    def incomplete(self, saga: str) -> list[str]:
        with self._tx() as db:
            rows = db.execute(
                f"SELECT run_id FROM buttress_runs WHERE saga=? AND status IN {_ACTIVE_SQL} "
                "ORDER BY created_at",
                (saga,),
            ).fetchall()
        return [row[0] for row in rows]

    def runs(
        self, *, saga: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[RunRecord]:
        where: list[str] = []
        args: list[Any] = []
        if saga is not None:
            where.append("saga=?")
            args.append(saga)
        if status is not None:
            where.append("status=?")
            args.append(status)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {self._COLUMNS} FROM buttress_runs {clause} "
                "ORDER BY created_at DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [self._from_row(row) for row in rows]

    def counts(self, saga: str) -> dict[str, int]:
        with self._tx() as db:
            rows = db.execute(
                "SELECT status, count(*) FROM buttress_runs WHERE saga=? GROUP BY status",
                (saga,),
            ).fetchall()
        return dict(rows)

    def due(self, saga: str, *, now: float, limit: int = 1000) -> list[str]:
        with self._tx() as db:
            rows = db.execute(
                "SELECT run_id FROM buttress_runs WHERE saga=? AND status=? "
                "AND wake_at IS NOT NULL AND wake_at<=? ORDER BY wake_at, run_id LIMIT ?",
                (saga, WAITING, now, limit),
            ).fetchall()
        return [row[0] for row in rows]

    def send_signal(self, run_id: str, name: str, payload: Any, *, at: float) -> RunRecord | None:
        stored = json.dumps(payload)
        # IMMEDIATE: the run is read and changed under the write lock, so a write() of
        # the same run (from any process) lands wholly before or after the signal.
        with self._tx(immediate=True) as db:
            row = db.execute(
                "SELECT status, waiting_for FROM buttress_runs WHERE run_id=?", (run_id,)
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "INSERT INTO buttress_signals (run_id, name, payload, sent_at) VALUES (?,?,?,?)",
                (run_id, name, stored, at),
            )
            if row[0] == WAITING and (row[1] in (name, ANY_SIGNAL) or name == CANCEL_SIGNAL):
                db.execute(
                    "UPDATE buttress_runs SET wake_at=CASE WHEN wake_at IS NULL THEN ? "
                    "ELSE min(wake_at, ?) END WHERE run_id=?",
                    (at, at, run_id),
                )
            return self._record(db, run_id)

    def signals(self, run_id: str) -> list[Signal]:
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, name, payload, sent_at FROM buttress_signals WHERE run_id=? "
                "ORDER BY id",
                (run_id,),
            ).fetchall()
        return [Signal(r[0], r[1], None if r[2] is None else json.loads(r[2]), r[3]) for r in rows]

    # -- the async face: the sync methods on the store's own thread -------------------------

    async def acreate_run(self, record: RunRecord) -> None:
        await self._off_loop(self.create_run, record)

    async def aclaim_key(self, record: RunRecord, *, now: float) -> KeyClaim:
        claim: KeyClaim = await self._off_loop(self.claim_key, record, now=now)
        return claim

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
        await self._off_loop(
            self.write,
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

    async def aload(self, run_id: str) -> tuple[RunRecord, list[LogEntry]] | None:
        loaded: tuple[RunRecord, list[LogEntry]] | None = await self._off_loop(self.load, run_id)
        return loaded

    async def aclaim_run(
        self,
        run_id: str,
        owner: str,
        *,
        now: float,
        lease_until: float,
        expected_owner: str | None = None,
    ) -> bool:
        won: bool = await self._off_loop(
            self.claim_run,
            run_id,
            owner,
            now=now,
            lease_until=lease_until,
            expected_owner=expected_owner,
        )
        return won

    async def aincomplete(self, saga: str) -> list[str]:
        ids: list[str] = await self._off_loop(self.incomplete, saga)
        return ids

    async def aruns(
        self, *, saga: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[RunRecord]:
        found: list[RunRecord] = await self._off_loop(
            self.runs, saga=saga, status=status, limit=limit
        )
        return found

    async def acounts(self, saga: str) -> dict[str, int]:
        found: dict[str, int] = await self._off_loop(self.counts, saga)
        return found

    async def adue(self, saga: str, *, now: float, limit: int = 1000) -> list[str]:
        ids: list[str] = await self._off_loop(self.due, saga, now=now, limit=limit)
        return ids

    async def asend_signal(
        self, run_id: str, name: str, payload: Any, *, at: float
    ) -> RunRecord | None:
        found: RunRecord | None = await self._off_loop(
            self.send_signal, run_id, name, payload, at=at
        )
        return found

    async def asignals(self, run_id: str) -> list[Signal]:
        found: list[Signal] = await self._off_loop(self.signals, run_id)
        return found
