"""Saga runner throughput and overhead (issue targets: <= 10 us per step in memory,
>= 1,000 three-step runs per second on SQLite with every step durable). PostgreSQL rows
(no target) are measured when the server at ``BUTTRESS_POSTGRES_URL`` (default: the
loopback one) answers, in a schema of their own that is dropped afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from buttress import Saga
from buttress.backends.memory import MemoryStore
from buttress.backends.sqlite import SQLiteStore
from buttress.testing import isolated_registry

STEP_TARGET_US = 10.0
SQLITE_TARGET_RUNS = 1000.0
POSTGRES_URL = os.environ.get("BUTTRESS_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass
class SagaRow:
    store: str
    face: str
    runs_per_second: float
    overhead_per_step_us: float


@dataclass
class SagaReport:
    rows: list[SagaRow] = field(default_factory=list)
    direct_ns: float = 0.0
    durability: str = (
        "SQLite in WAL mode with synchronous=NORMAL: every step start and completion is "
        "committed before the runner moves on (one commit right before each side effect, "
        "4 commits for a 3-step run), which survives the process being killed at any "
        "point; synchronous=FULL adds an fsync per commit against power loss. "
        "PostgreSQL (loopback server): one committed statement per write, the same 4 "
        "writes per run plus the create; with the default synchronous_commit=on each "
        "commit waits for the server's WAL flush (an fdatasync: its cost is the disk's), "
        "the 'async commit' rows run with synchronous_commit=off to show the store's own "
        "cost."
    )
    postgres_skipped: str | None = None

    def failures(self, factor: float) -> list[str]:
        out = []
        for row in self.rows:
            if row.store == "memory" and row.overhead_per_step_us > STEP_TARGET_US * factor:
                out.append(
                    f"saga runner ({row.face}, memory): {row.overhead_per_step_us:.1f} us per "
                    f"step, target {STEP_TARGET_US:g} us"
                )
            if row.store.startswith("sqlite (NORMAL)") and (
                row.runs_per_second < SQLITE_TARGET_RUNS / factor
            ):
                out.append(
                    f"saga runner ({row.face}, sqlite): {row.runs_per_second:,.0f} runs/s, "
                    f"target {SQLITE_TARGET_RUNS:,.0f}"
                )
        return out


def _noop(ctx: object) -> int:
    return 1


async def _anoop(ctx: object) -> int:
    return 1


def _saga(name: str, store: object, is_async: bool) -> Saga:
    saga = Saga(name, store=store)  # type: ignore[arg-type]
    for step in ("reserve", "charge", "email"):
        saga.step(step, _anoop if is_async else _noop)
    return saga


def _median_run_seconds(saga: Saga, runs: int, repeats: int, is_async: bool) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        if is_async:

            async def many() -> None:
                for _ in range(runs):
                    await saga.run_async({"order": 1})

            asyncio.run(many())
        else:
            for _ in range(runs):
                saga.run({"order": 1})
        samples.append((time.perf_counter() - started) / runs)
    return statistics.median(samples)


def _direct_seconds(calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        _noop(None)
        _noop(None)
        _noop(None)
    return (time.perf_counter() - started) / calls


@contextlib.contextmanager
def _postgres_store(durable: bool = True) -> Iterator[object | None]:
    """A PostgresStore in a fresh schema (dropped afterwards), or None without a server;
    with ``durable=False`` its sessions run with ``synchronous_commit=off`` (no wait for
    the server's WAL flush: what is left is the store's and the driver's own cost)."""
    try:
        import psycopg

        from buttress.backends.postgres import PostgresStore
    except ImportError:
        yield None
        return
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=1).close()
    except psycopg.Error:
        yield None
        return
    schema = f"buttress_bench_{uuid.uuid4().hex[:8]}"
    if durable:
        store = PostgresStore(POSTGRES_URL, schema=schema)
    else:
        options = "-c synchronous_commit=off"

        def connect() -> psycopg.Connection[object]:
            return psycopg.connect(POSTGRES_URL, options=options)

        async def async_connect() -> psycopg.AsyncConnection[object]:
            return await psycopg.AsyncConnection.connect(POSTGRES_URL, options=options)

        store = PostgresStore(schema=schema, connect=connect, async_connect=async_connect)
    try:
        yield store
    finally:
        store.close()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def measure(quick: bool) -> SagaReport:
    report = SagaReport()
    runs = 1000 if quick else 5000
    durable_runs = 300 if quick else 2000
    repeats = 3 if quick else 5
    direct = _direct_seconds(50_000)
    report.direct_ns = direct * 1e9
    folder = tempfile.mkdtemp(prefix="buttress-bench-")
    with isolated_registry():
        for store_name in ("memory", "sqlite (NORMAL)", "sqlite (FULL)"):
            for is_async in (False, True):
                if store_name == "sqlite (FULL)" and (quick or is_async):
                    continue
                tag = f"{store_name.split()[0]}-{'async' if is_async else 'sync'}"
                if store_name == "memory":
                    store: object = MemoryStore(max_runs=2000)
                    count = runs
                else:
                    sync = "FULL" if "FULL" in store_name else "NORMAL"
                    store = SQLiteStore(os.path.join(folder, f"{tag}-{sync}.db"), synchronous=sync)
                    count = durable_runs if sync == "NORMAL" else max(durable_runs // 5, 50)
                saga = _saga(f"bench-{tag}-{len(report.rows)}", store, is_async)
                per_run = _median_run_seconds(saga, count, repeats, is_async)
                report.rows.append(
                    SagaRow(
                        store=store_name,
                        face="async" if is_async else "sync",
                        runs_per_second=1 / per_run,
                        overhead_per_step_us=(per_run - direct) / 3 * 1e6,
                    )
                )
        for durable in (True, False):
            with _postgres_store(durable) as pg:
                if pg is None:
                    report.postgres_skipped = f"no PostgreSQL server at {POSTGRES_URL}"
                    break
                store_name = "postgres" if durable else "postgres (async commit)"
                count = (10 if durable else 50) if quick else (200 if durable else 1000)
                for is_async in (False, True):
                    saga = _saga(f"bench-{store_name}-{is_async}", pg, is_async)
                    saga.run({"order": 0})  # connect and create the schema first
                    per_run = _median_run_seconds(saga, count, repeats, is_async)
                    report.rows.append(
                        SagaRow(
                            store=store_name,
                            face="async" if is_async else "sync",
                            runs_per_second=1 / per_run,
                            overhead_per_step_us=(per_run - direct) / 3 * 1e6,
                        )
                    )
    return report


def rows(report: SagaReport) -> list[list[str]]:
    out = []
    for row in report.rows:
        if row.store == "memory":
            target = f"<= {STEP_TARGET_US:g} us/step"
            ok = row.overhead_per_step_us <= STEP_TARGET_US
        elif row.store == "sqlite (NORMAL)":
            target = f">= {SQLITE_TARGET_RUNS:,.0f} runs/s"
            ok = row.runs_per_second >= SQLITE_TARGET_RUNS
        else:
            target, ok = "-", None
        out.append(
            [
                row.store,
                row.face,
                f"{row.runs_per_second:,.0f}",
                f"{row.overhead_per_step_us:.1f} us",
                target,
                "n/a" if ok is None else ("PASS" if ok else "MISS"),
            ]
        )
    if report.postgres_skipped is not None:
        out.append(["postgres", "-", "skipped", "-", "-", report.postgres_skipped])
    return out


HEAD = ["store", "face", "runs/s (3 no-op steps)", "runner overhead per step", "target", "status"]
