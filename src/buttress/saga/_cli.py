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

from buttress.backends import INCOMPLETE, LogEntry, RunRecord, Signal
from buttress.exceptions import BackendError, ConfigError, SagaError
from buttress.saga._saga import Saga

__all__ = ["add_runs_parser", "run_runs"]

_STATUSES = ("running", "compensating", "waiting", "completed", "failed", "compensation_failed")
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
    send = actions.add_parser(
        "signal",
        help="send a signal (a JSON payload) to a run's ctx.wait_for(NAME)",
        description=(
            "Store a signal for a run: its ctx.wait_for(NAME) receives the payload. "
            "With --app, a run parked waiting for it is resumed here; without, the run "
            "is made due and a recovery worker resumes it on its next pass."
        ),
    )
    send.add_argument("run_id", help="a run id (or a unique prefix of one)")
    send.add_argument("name", help="the signal's name")
    send.add_argument("payload", nargs="?", default="null", help="a JSON value (default null)")
    send.add_argument("--app", help="where the saga is defined (as for recover), to resume it")
    cancel = actions.add_parser(
        "cancel",
        help="cancel a run: it compensates what it completed, its child runs first",
    )
    cancel.add_argument("run_id", help="a run id (or a unique prefix of one)")
    cancel.add_argument("--app", required=True, help="where the saga is defined (as for recover)")
    cancel.add_argument("--reason", default="cancelled by an operator", help="recorded with it")
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
        "version": record.version,
        "wake_at": record.wake_at,
        "waiting_for": record.waiting_for,
        "deadline": record.deadline,
        "parent": record.parent,
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
    rows = [["RUN", "SAGA", "VERSION", "STATUS", "KEY", "STARTED", "TOOK", "ERROR"]]
    for r in records:
        took = f"{r.updated_at - r.created_at:.3f}s" if r.updated_at else "-"
        status = r.status
        if r.status == "waiting":
            status += f" ({_waiting(r)})"
        rows.append(
            [
                r.run_id[:12]
                if r.parent is None
                else r.run_id[:12] + "/" + r.run_id.rsplit("/")[-1],
                r.saga,
                r.version or "-",
                status,
                r.key or "-",
                _when(r.created_at),
                took,
                (r.error or "")[:60],
            ]
        )
    _table(rows, out)
    return 0


def _waiting(record: RunRecord) -> str:
    """What a waiting run waits for, in a few words."""
    parts = []
    if record.waiting_for == "buttress.child":
        parts.append("for a child run")
    elif record.waiting_for == "buttress.any":
        parts.append("for signals")
    elif record.waiting_for:
        parts.append(f"for {record.waiting_for!r}")
    if record.wake_at:
        parts.append(f"until {_when(record.wake_at)}")
    return " ".join(parts) or "for a signal"


def _detail(entry: LogEntry, store: Any) -> str:
    """The DETAIL column of one log line: what a durable wait recorded, readably."""
    data = entry.output if isinstance(entry.output, dict) else {}
    if entry.event == "sleep":
        return f"until {_when(data.get('wake_at'))}"
    if entry.event == "wait":
        until = data.get("deadline")
        return f"for {data.get('signal')!r}" + (f" until {_when(until)}" if until else "")
    if entry.event == "received":
        return f"{data.get('signal')!r} #{data.get('id')}: {json.dumps(data.get('payload'))}"
    if entry.event == "wait_expired":
        return f"no {data.get('signal')!r} by {_when(data.get('deadline'))}"
    if entry.event == "parked":
        record = RunRecord("", "", "waiting", None, wake_at=data.get("wake_at"))
        record.waiting_for = data.get("waiting_for")
        return _waiting(record)
    if entry.event == "heartbeat":
        return json.dumps(data.get("details"))
    if entry.event == "child":
        child = store.load(str(data.get("run_id")))
        status = child[0].status if child is not None else "not started"
        return f"{data.get('run_id')} ({status})"
    return entry.error or ("" if entry.output is None else json.dumps(entry.output))


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
    signals: list[Signal] = store.signals(record.run_id)
    consumed = {
        e.output.get("id") for e in entries if e.event == "received" and isinstance(e.output, dict)
    }
    if args.json:
        data = _record_json(record)
        data["log"] = [dataclasses.asdict(entry) for entry in entries]
        data["signals"] = [
            {**dataclasses.asdict(s), "state": _signal_state(s, consumed)} for s in signals
        ]
        data["children"] = [
            e.output.get("run_id")
            for e in entries
            if e.event == "child" and isinstance(e.output, dict)
        ]
        data["result"] = record.result
        json.dump(data, out, indent=2, default=repr)
        out.write("\n")
        return 0
    out.write(f"run      {record.run_id}\n")
    out.write(f"saga     {record.saga}\n")
    out.write(f"version  {record.version or '-'}\n")
    status = record.status
    if record.status == "waiting":
        status += f" ({_waiting(record)})"
    out.write(f"status   {status}\n")
    out.write(f"key      {record.key or '-'}\n")
    out.write(f"input    {json.dumps(record.input)}\n")
    out.write(f"started  {_when(record.created_at)}\n")
    if record.deadline:
        out.write(f"deadline {_when(record.deadline)}\n")
    if record.parent:
        out.write(f"parent   {record.parent}\n")
    if record.error:
        out.write(f"error    {record.error}\n")
    out.write("\n")
    rows = [["+TIME", "STEP", "EVENT", "ATTEMPTS", "TOOK", "DETAIL"]]
    for e in entries:
        detail = _detail(e, store)
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
    if signals:
        out.write("\n")
        rows = [["SIGNAL", "NAME", "SENT", "STATE", "PAYLOAD"]]
        for s in signals:
            state = _signal_state(s, consumed)
            rows.append([f"#{s.id}", s.name, _when(s.sent_at), state, json.dumps(s.payload)[:60]])
        _table(rows, out)
    return 0


def _signal_state(signal: Signal, consumed: set[Any]) -> str:
    """``consumed`` or ``pending`` for a user's signal; what buttress's own are."""
    if signal.name == "buttress.child":
        return "child ended"
    if signal.name == "buttress.cancel":
        return "cancel request"
    return "consumed" if signal.id in consumed else "pending"


def _payload(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"the payload must be JSON, got {text!r}: {exc}") from None


def _signal(db: str, schema: str | None, args: argparse.Namespace, out: TextIO) -> int:
    payload = _payload(args.payload)
    if args.app:
        saga = _load_saga(db, schema, args)
        if not isinstance(saga, Saga):
            return saga
        found = _find(saga.store, args.run_id)
        if found is None:
            sys.stderr.write(f"no single run matches {args.run_id!r}\n")
            return 1
        result = saga.signal(found[0].run_id, args.name, payload)
        if result is None:
            out.write(f"signal {args.name!r} sent to run {found[0].run_id}\n")
        else:
            out.write(f"signal {args.name!r} sent; run {result.run_id} is now {result.status}\n")
        return 0
    store = _open(db, schema)
    if store is None:
        return 1
    try:
        found = _find(store, args.run_id)
        if found is None:
            sys.stderr.write(f"no single run matches {args.run_id!r}\n")
            return 1
        record = found[0]
        if record.status not in INCOMPLETE:
            sys.stderr.write(f"run {record.run_id} has ended ({record.status})\n")
            return 1
        if not args.name or args.name.startswith("buttress."):
            sys.stderr.write(
                f"error: signal names starting with 'buttress.' are reserved, got {args.name!r}\n"
            )
            return 2
        stored = store.send_signal(record.run_id, args.name, payload, at=time.time())
        woke = stored is not None and stored.status == "waiting" and stored.wake_at is not None
        out.write(
            f"signal {args.name!r} sent to run {record.run_id}"
            + (" (due now: a recovery worker resumes it)" if woke else "")
            + "\n"
        )
        return 0
    finally:
        store.close()


def _cancel(db: str, schema: str | None, args: argparse.Namespace, out: TextIO) -> int:
    saga = _load_saga(db, schema, args)
    if not isinstance(saga, Saga):
        return saga
    found = _find(saga.store, args.run_id)
    if found is None:
        sys.stderr.write(f"no single run matches {args.run_id!r}\n")
        return 1
    result = saga.cancel(found[0].run_id, reason=args.reason)
    if result is None:
        out.write(
            f"run {found[0].run_id} is asked to cancel: the process holding it stops at its "
            "next wait, heartbeat or resume\n"
        )
    else:
        out.write(
            f"run {result.run_id} cancelled: {result.status}, compensated={result.compensated}\n"
        )
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
    if args.action == "signal":
        return _signal(args.db, schema, args, out)
    if args.action == "cancel":
        return _cancel(args.db, schema, args, out)
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
    except SagaError as exc:  # a version this code does not define
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except ImportError as exc:  # the optional driver is not installed
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except BackendError as exc:  # unreachable server, schema to migrate, unreadable file
        sys.stderr.write(f"error: {exc}\n")
        return 1
