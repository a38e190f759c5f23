"""``python -m buttress runs``: inspect and recover a saga run log.

``--db`` names the log: a SQLite file path, or a ``postgresql://`` (``postgres://``)
URL whose ``--schema`` holds the tables of a
:class:`~buttress.backends.postgres.PostgresStore`. The store is chosen from that
argument; listing, showing and recovering are the same for both.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from buttress.backends import LogEntry, RunRecord
from buttress.exceptions import BackendError, ConfigError
from buttress.saga._saga import Saga

__all__ = ["add_runs_parser", "run_runs"]

_STATUSES = ("running", "compensating", "completed", "failed", "compensation_failed")
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_DEFAULT_SCHEMA = "buttress"


def _is_postgres(db: str) -> bool:
    return db.lower().startswith(_POSTGRES_SCHEMES)


def add_runs_parser(commands: Any) -> None:
    """Add the ``runs`` command to an argparse subparsers object."""
    runs = commands.add_parser(
        "runs",
        help="inspect or recover the saga runs in a SQLite or PostgreSQL run log",
        description=(
            "Inspect or recover the saga runs recorded in a run log: a SQLite file "
            "(SQLiteStore) or a PostgreSQL schema (PostgresStore)."
        ),
    )
    runs.add_argument(
        "--db",
        required=True,
        metavar="PATH_OR_URL",
        help="the run log: a SQLite file path, or a postgresql:// (postgres://) URL",
    )
    runs.add_argument(
        "--schema",
        default=None,
        metavar="NAME",
        help=f"the PostgreSQL schema holding the tables (default {_DEFAULT_SCHEMA!r}); "
        "only with a postgresql:// --db",
    )
    actions = runs.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="a table of recent runs")
    listing.add_argument("--status", choices=_STATUSES, help="only runs with this status")
    listing.add_argument("--saga", help="only runs of this saga")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show = actions.add_parser("show", help="the step-by-step timeline of one run")
    show.add_argument("run_id", help="a run id (or a unique prefix of one)")
    show.add_argument("--json", action="store_true", help="print JSON instead of a timeline")
    recover = actions.add_parser("recover", help="finish the incomplete runs of a saga")
    recover.add_argument(
        "--app",
        required=True,
        help="where the saga is defined, as module:attribute: a function returning the "
        "Saga when called with the --db path or URL (and schema=NAME, for PostgreSQL, "
        "when it takes a schema parameter), or a Saga object (which then uses its own "
        "store, not --db)",
    )
    worker = actions.add_parser(
        "worker",
        help="keep recovering the saga's abandoned runs until SIGTERM/SIGINT",
        description=(
            "Every --interval seconds, take the saga's incomplete runs whose lease has "
            "expired (on any host) or whose process is gone (on this host) and finish "
            "them. On SIGTERM or SIGINT it claims nothing more, gives the recovery in "
            "progress --grace seconds, and exits; a run it did not finish keeps its log "
            "for the next worker. Any number of workers may share one store."
        ),
    )
    worker.add_argument("--app", required=True, help="as for recover")
    worker.add_argument(
        "--interval", type=float, default=5.0, help="seconds between passes (default 5)"
    )
    worker.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds a recovery in progress gets to finish after a stop signal (default 30)",
    )
    worker.add_argument(
        "--once", action="store_true", help="make one pass and exit (for cron or a test)"
    )
    runs.set_defaults(handler=run_runs)


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write(line.rstrip() + "\n")
        if index == 0:
            out.write("  ".join("-" * width for width in widths) + "\n")


def _record_json(record: RunRecord) -> dict[str, Any]:
    return {
        "run_id": record.run_id,
        "saga": record.saga,
        "status": record.status,
        "key": record.key,
        "input": record.input,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "error": record.error,
    }


def _list(store: Any, args: argparse.Namespace, out: TextIO) -> int:
    records: list[RunRecord] = store.runs(saga=args.saga, status=args.status, limit=args.limit)
    if args.json:
        json.dump([_record_json(r) for r in records], out, indent=2)
        out.write("\n")
        return 0
    if not records:
        out.write("no runs\n")
        return 0
    rows = [["RUN", "SAGA", "STATUS", "KEY", "STARTED", "TOOK", "ERROR"]]
    for r in records:
        took = f"{r.updated_at - r.created_at:.3f}s" if r.updated_at else "-"
        rows.append(
            [
                r.run_id[:12],
                r.saga,
                r.status,
                r.key or "-",
                _when(r.created_at),
                took,
                (r.error or "")[:60],
            ]
        )
    _table(rows, out)
    return 0


def _find(store: Any, run_id: str) -> tuple[RunRecord, list[LogEntry]] | None:
    loaded = store.load(run_id)
    if loaded is not None:
        return loaded  # type: ignore[no-any-return]
    matches = [r for r in store.runs(limit=100_000) if r.run_id.startswith(run_id)]
    if len(matches) == 1:
        return store.load(matches[0].run_id)  # type: ignore[no-any-return]
    return None


def _show(store: Any, args: argparse.Namespace, out: TextIO) -> int:
    found = _find(store, args.run_id)
    if found is None:
        sys.stderr.write(f"no single run matches {args.run_id!r}\n")
        return 1
    record, entries = found
    if args.json:
        data = _record_json(record)
        data["log"] = [dataclasses.asdict(entry) for entry in entries]
        data["result"] = record.result
        json.dump(data, out, indent=2, default=repr)
        out.write("\n")
        return 0
    out.write(f"run      {record.run_id}\n")
    out.write(f"saga     {record.saga}\n")
    out.write(f"status   {record.status}\n")
    out.write(f"key      {record.key or '-'}\n")
    out.write(f"input    {json.dumps(record.input)}\n")
    out.write(f"started  {_when(record.created_at)}\n")
    if record.error:
        out.write(f"error    {record.error}\n")
    out.write("\n")
    rows = [["+TIME", "STEP", "EVENT", "ATTEMPTS", "TOOK", "DETAIL"]]
    for e in entries:
        detail = e.error or ("" if e.output is None else json.dumps(e.output))
        rows.append(
            [
                f"{e.at - record.created_at:8.3f}s",
                e.step or "(run)",
                e.event,
                str(e.attempt or ""),
                "" if e.duration is None else f"{e.duration:.3f}s",
                detail[:70],
            ]
        )
    _table(rows, out)
    return 0


def _build(target: Any, db: str, schema: str | None) -> Any:
    """Call an ``--app`` factory: with the ``--db`` value, plus ``schema=`` for a
    PostgreSQL log when the factory takes it."""
    if schema is not None:
        try:
            inspect.signature(target).bind(db, schema=schema)
        except (TypeError, ValueError):  # no such parameter, or no signature to read
            pass
        else:
            return target(db, schema=schema)
    return target(db)


def _load_saga(db: str, schema: str | None, args: argparse.Namespace) -> Saga | int:
    """The saga ``--app`` names (built on ``--db``), or an exit status after saying why."""
    module_name, _, attribute = args.app.partition(":")
    if not module_name or not attribute:
        sys.stderr.write(f"--app must look like module:attribute, got {args.app!r}\n")
        return 2
    sys.path.insert(0, ".")
    target: Any = getattr(importlib.import_module(module_name), attribute)
    saga = target if isinstance(target, Saga) else _build(target, db, schema)
    if not isinstance(saga, Saga):
        sys.stderr.write(f"{args.app} is not a Saga (nor returns one)\n")
        return 2
    used = getattr(saga.store, "schema", None)
    if target is not saga and schema is not None and used not in (None, schema):
        # The factory ignored the schema asked for: recovering another one would
        # silently leave the runs the operator meant untouched.
        sys.stderr.write(
            f"{args.app} built a saga on schema {used!r}, not {schema!r}: "
            "give --schema the schema it uses, or let it take a schema parameter\n"
        )
        return 2
    return saga


def _recover(db: str, schema: str | None, args: argparse.Namespace, out: TextIO) -> int:
    saga = _load_saga(db, schema, args)
    if not isinstance(saga, Saga):
        return saga
    results = saga.recover()
    for result in results:
        out.write(f"{result.run_id}  {result.status}  compensated={result.compensated}\n")
    for run_id, why in results.skipped.items():
        out.write(f"{run_id}  skipped  {why}\n")
    out.write(f"recovered {len(results)} run(s) of saga {saga.name!r}")
    if results.skipped:
        out.write(f", skipped {len(results.skipped)} (try again)")
    out.write("\n")
    return 0 if not results.skipped else 3


def _worker(db: str, schema: str | None, args: argparse.Namespace, out: TextIO) -> int:
    from ._worker import RecoveryWorker

    saga = _load_saga(db, schema, args)
    if not isinstance(saga, Saga):
        return saga
    worker = RecoveryWorker(saga, interval=args.interval, grace=args.grace)
    if args.once:
        done = worker.run_once()
        out.write(f"recovered {done} run(s) of saga {saga.name!r}\n")
        return 0 if worker.last_error is None else 1
    stop_signal: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stop_signal.append(signum)
        worker.stop(wait=False)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    out.write(f"worker for saga {saga.name!r}: a pass every {args.interval:g}s\n")
    out.flush()
    thread = worker.start()
    try:
        while thread.is_alive() and not stop_signal:
            thread.join(0.2)
        deadline = time.monotonic() + args.grace
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    left = "" if not thread.is_alive() else " (a recovery was still going: left to the next worker)"
    out.write(
        f"worker stopped after {worker.passes} pass(es): recovered {worker.recovered} "
        f"run(s), skipped {worker.skipped}{left}\n"
    )
    out.flush()
    return 0


def _open(db: str, schema: str | None) -> Any:
    """The store ``--db`` names, or ``None`` (after saying so) when there is no log.

    The command only reads: a PostgreSQL store is opened with ``create_schema=False``,
    so a missing or older schema is reported instead of created or migrated.
    """
    if schema is not None:
        from buttress.backends.postgres import PostgresStore

        store = PostgresStore(db, schema=schema, create_schema=False)
        if store.schema_version() is None:
            store.close()
            sys.stderr.write(f"no run log in schema {schema!r} of that PostgreSQL database\n")
            return None
        return store
    from buttress.backends.sqlite import SQLiteStore

    if not Path(db).exists():
        sys.stderr.write(f"no run log at {db!r}\n")
        return None
    return SQLiteStore(db)


def _dispatch(args: argparse.Namespace, out: TextIO) -> int:
    schema: str | None = args.schema
    if _is_postgres(args.db):
        schema = _DEFAULT_SCHEMA if schema is None else schema
    elif schema is not None:
        sys.stderr.write("--schema only applies to a PostgreSQL --db (postgresql://...)\n")
        return 2
    if args.action == "recover":
        return _recover(args.db, schema, args, out)
    if args.action == "worker":
        return _worker(args.db, schema, args, out)
    store = _open(args.db, schema)
    if store is None:
        return 1
    try:
        if args.action == "list":
            return _list(store, args, out)
        return _show(store, args, out)
    finally:
        store.close()


def run_runs(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Execute ``python -m buttress runs ...``."""
    stream = out if out is not None else sys.stdout
    try:
        return _dispatch(args, stream)
    except ConfigError as exc:  # a bad --schema, say
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except ImportError as exc:  # the optional driver is not installed
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except BackendError as exc:  # unreachable server, schema to migrate, unreadable file
        sys.stderr.write(f"error: {exc}\n")
        return 1
