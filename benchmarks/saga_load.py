"""Sagas under load (issue 12): event-loop lag beside 32 concurrent ``run_async`` sagas
on SQLite, and runs/s on PostgreSQL (and SQLite at ``synchronous=FULL``) at 1, 8 and 32
concurrent async sagas and 1 and 8 threads, beside DBOS Transact doing the same job.

The job: a 3-step workflow whose steps do nothing, every step recorded durably before
the next one starts. On PostgreSQL both buttress and DBOS make 5 WAL-flushing commits
per run (``synchronous_commit=on``): buttress the key claim and 4 log writes, DBOS the
workflow status, 3 step outputs and the final status. On SQLite both fsync every
commit (buttress ``synchronous=FULL``, DBOS's own default).

Run it on its own::

    python -m benchmarks.saga_load                 # everything (about 2 minutes)
    python -m benchmarks.saga_load --only lag      # lag, sqlite, postgres, dbos
    python -m benchmarks.saga_load --quick

DBOS runs in a child process per database (it is one global instance per process),
``python -m benchmarks.saga_load --dbos-child URL``, and is skipped with the reason when
``dbos`` is not installed. It also runs as a section of ``python -m benchmarks``
(``--only saga_load``); ``--quick`` measures only buttress, briefly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from buttress import Saga
from buttress.backends.sqlite import SQLiteStore
from buttress.testing import isolated_registry

POSTGRES_URL = os.environ.get("BUTTRESS_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
LAG_TARGET_MS = 5.0
SCALE_TARGET = 2.0  # 32 concurrent async runs/s over 1 concurrent, PostgreSQL
DBOS_TARGET = 10.0  # buttress over DBOS at 32 concurrent, PostgreSQL
CONCURRENCY = (("async", 1), ("async", 8), ("async", 32), ("threads", 1), ("threads", 8))


@dataclass
class LagRow:
    steps: str
    sagas: int
    runs_per_second: float
    ticks: int
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class RateRow:
    engine: str
    store: str
    mode: str
    concurrency: int
    runs_per_second: float


@dataclass
class LoadReport:
    lag: list[LagRow] = field(default_factory=list)
    rates: list[RateRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def rate(self, engine: str, store: str, mode: str, concurrency: int) -> float | None:
        for row in self.rates:
            if (row.engine, row.store, row.mode, row.concurrency) == (
                engine,
                store,
                mode,
                concurrency,
            ):
                return row.runs_per_second
        return None

    def failures(self, factor: float) -> list[str]:
        out = []
        for row in self.lag:
            if row.sagas >= 32 and row.p99_ms > LAG_TARGET_MS * factor:
                out.append(
                    f"saga loop lag ({row.steps} steps, {row.sagas} sagas, SQLite): p99 "
                    f"{row.p99_ms:.1f} ms, target {LAG_TARGET_MS:g} ms"
                )
        one = self.rate("buttress", "postgres", "async", 1)
        many = self.rate("buttress", "postgres", "async", 32)
        if one and many and many < one * SCALE_TARGET / factor:
            out.append(
                f"PostgreSQL sagas do not scale: {many:,.0f} runs/s at 32 concurrent, "
                f"{one:,.0f} at 1 (target {SCALE_TARGET:g}x)"
            )
        return out

    def table(self) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
        lag_head = ["steps", "sagas", "runs/s", "ticks", "lag p50", "lag p99", "lag max"]
        lag_rows = [
            [
                r.steps,
                str(r.sagas),
                f"{r.runs_per_second:,.0f}",
                str(r.ticks),
                f"{r.p50_ms:.2f} ms",
                f"{r.p99_ms:.2f} ms",
                f"{r.max_ms:.2f} ms",
            ]
            for r in self.lag
        ]
        rate_head = ["store", "face", "concurrency", "buttress runs/s", "DBOS runs/s", "ratio"]
        rate_rows = []
        seen: set[tuple[str, str, int]] = set()
        for r in self.rates:
            key = (r.store, r.mode, r.concurrency)
            if key in seen:
                continue
            seen.add(key)
            ours = self.rate("buttress", *key)
            theirs = self.rate("dbos", *key)
            rate_rows.append(
                [
                    r.store,
                    r.mode,
                    str(r.concurrency),
                    "-" if ours is None else f"{ours:,.0f}",
                    "-" if theirs is None else f"{theirs:,.0f}",
                    f"{ours / theirs:.1f}x" if ours and theirs else "-",
                ]
            )
        return lag_head, lag_rows, rate_head, rate_rows

    def console(self) -> str:
        lag_head, lag_rows, rate_head, rate_rows = self.table()
        lines = ["Sagas under load: loop lag beside 32 run_async sagas (SQLite)"]
        lines += _plain(lag_head, lag_rows)
        lines += ["", "Sagas under load: runs/s (3 no-op durable steps)"]
        lines += _plain(rate_head, rate_rows)
        lines += [f"skipped: {reason}" for reason in self.skipped]
        return "\n".join(lines)

    def markdown(self) -> str:
        lag_head, lag_rows, rate_head, rate_rows = self.table()
        parts = [
            "## Sagas under load",
            "",
            "A 1 ms ticker task beside concurrent `run_async()` sagas on one SQLite store; "
            "its lag is how late each tick woke up (target: p99 at most "
            f"{LAG_TARGET_MS:g} ms with 32 sagas).",
            "",
            _md(lag_head, lag_rows),
            "",
            "Runs per second of a 3-step saga (buttress) and a 3-step workflow (DBOS "
            "Transact), same machine, same server, same durability.",
            "",
            _md(rate_head, rate_rows),
        ]
        parts += [f"\nSkipped: {reason}" for reason in self.skipped]
        return "\n".join(parts) + "\n"


def _plain(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head)] + [fmt.format(*row) for row in rows]


def _md(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# -- the job ----------------------------------------------------------------------------------


def _noop(ctx: object) -> int:
    return 1


async def _anoop(ctx: object) -> int:
    return 1


def _saga(name: str, store: Any, is_async: bool) -> Saga:
    saga = Saga(name, store=store)
    for step in ("reserve", "charge", "email"):
        saga.step(step, _anoop if is_async else _noop)
    return saga


async def _async_rate(
    run: Callable[[int], Any], concurrency: int, seconds: float
) -> tuple[float, list[float]]:
    """Runs/s of ``concurrency`` tasks calling ``await run(i)`` for ``seconds``; with the
    ticker's lags (ms)."""
    stop = time.perf_counter() + seconds
    done = 0
    lags: list[float] = []

    async def worker(index: int) -> None:
        nonlocal done
        number = index
        while time.perf_counter() < stop:
            await run(number)
            number += concurrency
            done += 1

    async def ticker() -> None:
        while time.perf_counter() < stop:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - before - 0.001) * 1000)

    started = time.perf_counter()
    await asyncio.gather(ticker(), *(worker(i) for i in range(concurrency)))
    return done / (time.perf_counter() - started), lags


def _thread_rate(run: Callable[[int], Any], threads: int, seconds: float) -> float:
    stop = time.perf_counter() + seconds
    counts = [0] * threads

    def worker(index: int) -> None:
        number = index
        while time.perf_counter() < stop:
            run(number)
            number += threads
            counts[index] += 1

    started = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- buttress ---------------------------------------------------------------------------------


def measure_lag(
    report: LoadReport, seconds: float, folder: str, counts: tuple[int, ...] = (8, 32)
) -> None:
    for steps in ("async", "sync"):
        for sagas in counts:
            store = SQLiteStore(os.path.join(folder, f"lag-{steps}-{sagas}.db"))
            saga = _saga(f"lag-{steps}-{sagas}", store, steps == "async")
            rate, lags = asyncio.run(
                _async_rate(lambda i, s=saga: s.run_async({"n": i}), sagas, seconds)
            )
            store.close()
            report.lag.append(
                LagRow(
                    steps,
                    sagas,
                    rate,
                    len(lags),
                    statistics.median(lags) if lags else float("nan"),
                    _percentile(lags, 0.99),
                    max(lags, default=float("nan")),
                )
            )


@contextlib.contextmanager
def _postgres_store() -> Iterator[Any]:
    import psycopg

    from buttress.backends.postgres import PostgresStore

    psycopg.connect(POSTGRES_URL, connect_timeout=1).close()
    schema = f"buttress_load_{uuid.uuid4().hex[:8]}"
    store = PostgresStore(POSTGRES_URL, schema=schema)
    try:
        yield store
    finally:
        store.close()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _rates(
    report: LoadReport,
    *,
    engine: str,
    store_name: str,
    make: Callable[[bool], tuple[Callable[[int], Any], Callable[[], None]]],
    seconds: float,
    rows: tuple[tuple[str, int], ...],
) -> None:
    for mode, concurrency in rows:
        run, close = make(mode == "async")
        try:
            if mode == "async":
                rate, _ = asyncio.run(_async_rate(run, concurrency, seconds))
            else:
                rate = _thread_rate(run, concurrency, seconds)
        finally:
            close()
        report.rates.append(RateRow(engine, store_name, mode, concurrency, rate))


def measure_buttress(
    report: LoadReport,
    seconds: float,
    folder: str,
    rows: tuple[tuple[str, int], ...],
    stores: tuple[str, ...],
) -> None:
    counter = iter(range(1_000_000))
    if "postgres" in stores:
        _buttress_postgres(report, seconds, rows, counter)
    if "sqlite" not in stores:
        return

    def make_sqlite(is_async: bool) -> tuple[Callable[[int], Any], Callable[[], None]]:
        path = os.path.join(folder, f"rate-{next(counter)}.db")
        store = SQLiteStore(path, synchronous="FULL")
        saga = _saga(f"sqlite-{next(counter)}", store, is_async)
        if is_async:
            return (lambda i: saga.run_async({"n": i})), store.close
        return (lambda i: saga.run({"n": i})), store.close

    _rates(
        report,
        engine="buttress",
        store_name="sqlite (FULL)",
        make=make_sqlite,
        seconds=seconds,
        rows=rows,
    )


def _buttress_postgres(
    report: LoadReport, seconds: float, rows: tuple[tuple[str, int], ...], counter: Iterator[int]
) -> None:
    try:
        with _postgres_store() as pg:

            def make_pg(is_async: bool) -> tuple[Callable[[int], Any], Callable[[], None]]:
                saga = _saga(f"pg-{next(counter)}", pg, is_async)
                saga.run({"n": -1})  # the schema and a first connection
                if is_async:
                    return (lambda i: saga.run_async({"n": i})), lambda: None
                return (lambda i: saga.run({"n": i})), lambda: None

            _rates(
                report,
                engine="buttress",
                store_name="postgres",
                make=make_pg,
                seconds=seconds,
                rows=rows,
            )
    except Exception as exc:
        report.skipped.append(f"buttress on PostgreSQL: {type(exc).__name__}: {exc}")


# -- DBOS -------------------------------------------------------------------------------------


def measure_dbos(
    report: LoadReport,
    seconds: float,
    folder: str,
    rows: tuple[tuple[str, int], ...],
    stores: tuple[str, ...] = ("postgres", "sqlite"),
) -> None:
    try:
        import dbos  # noqa: F401
    except ImportError:
        report.skipped.append("DBOS: the dbos package is not installed (pip install .[bench])")
        return
    base = POSTGRES_URL.rsplit("/", 1)[0]
    targets = [
        ("postgres", f"{base}/buttress_dbos_{uuid.uuid4().hex[:8]}"),
        ("sqlite (FULL)", f"sqlite:///{os.path.join(folder, 'dbos.sqlite')}"),
    ]
    for store_name, url in targets:
        if store_name.split()[0] not in stores:
            continue
        spec = {"url": url, "seconds": seconds, "rows": rows}
        try:
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.saga_load", "--dbos-child", json.dumps(spec)],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                report.skipped.append(f"DBOS on {store_name}: {tail}")
                continue
            for mode, concurrency, rate in json.loads(done.stdout.strip().splitlines()[-1]):
                report.rates.append(RateRow("dbos", store_name, mode, concurrency, rate))
        finally:
            if url.startswith("postgresql"):
                _drop_database(url)


def _drop_database(url: str) -> None:
    try:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception:
        pass


def dbos_child(spec: dict[str, Any]) -> None:
    """In a child process: the same job as a DBOS workflow; prints the rates as JSON."""
    import logging

    from dbos import DBOS

    DBOS(config={"name": "buttress-bench", "system_database_url": spec["url"]})
    logging.getLogger("dbos").setLevel(logging.WARNING)

    @DBOS.step()
    def reserve(n: int) -> int:
        return 1

    @DBOS.step()
    def charge(n: int) -> int:
        return 1

    @DBOS.step()
    def email(n: int) -> int:
        return 1

    @DBOS.workflow()
    def job(n: int) -> int:
        reserve(n)
        charge(n)
        email(n)
        return n

    @DBOS.step()
    async def areserve(n: int) -> int:
        return 1

    @DBOS.step()
    async def acharge(n: int) -> int:
        return 1

    @DBOS.step()
    async def aemail(n: int) -> int:
        return 1

    @DBOS.workflow()
    async def ajob(n: int) -> int:
        await areserve(n)
        await acharge(n)
        await aemail(n)
        return n

    DBOS.launch()
    out = []
    offset = 0
    for mode, concurrency in spec["rows"]:
        offset += 10_000_000

        def run(i: int, base: int = offset) -> int:
            return job(base + i)

        async def arun(i: int, base: int = offset) -> int:
            return await ajob(base + i)

        if mode == "async":
            rate, _ = asyncio.run(_async_rate(arun, concurrency, spec["seconds"]))
        else:
            rate = _thread_rate(run, concurrency, spec["seconds"])
        out.append((mode, concurrency, rate))
    DBOS.destroy()
    print(json.dumps(out))


# -- entry points -----------------------------------------------------------------------------


def measure(
    quick: bool, only: tuple[str, ...] = ("lag", "sqlite", "postgres", "dbos")
) -> LoadReport:
    """The section for ``python -m benchmarks`` (``--quick``: buttress only, briefly)."""
    report = LoadReport()
    folder = tempfile.mkdtemp(prefix="buttress-load-")
    seconds = 1.0 if quick else 4.0
    rows = (("async", 1), ("async", 32)) if quick else CONCURRENCY
    with isolated_registry():
        if "lag" in only:
            measure_lag(report, 1.0 if quick else 5.0, folder, (32,) if quick else (8, 32))
        stores = tuple(s for s in ("postgres", "sqlite") if s in only)
        measure_buttress(report, seconds, folder, rows, stores)
    if "dbos" in only and not quick:
        measure_dbos(report, seconds, folder, rows, stores)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.saga_load", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="lag,sqlite,postgres,dbos")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--dbos-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dbos_child is not None:
        dbos_child(json.loads(args.dbos_child))
        return 0
    report = measure(args.quick, tuple(s.strip() for s in args.only.split(",")))
    print(report.console())
    if args.json:
        print(
            json.dumps(
                {
                    "lag": [vars(r) for r in report.lag],
                    "rates": [vars(r) for r in report.rates],
                    "skipped": report.skipped,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
