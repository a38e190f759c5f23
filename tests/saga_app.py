"""A saga for the crash-recovery tests, run in a child process that SIGKILLs itself.

``python saga_app.py DB EFFECTS INPUT_JSON [KEY]`` with ``KILL_AT=<label>`` in the
environment: the process kills itself (SIGKILL, no cleanup) when it reaches that
point. Every side effect appends a line to EFFECTS and fsyncs it first.

``python saga_app.py recover DB EFFECTS`` recovers the saga's runs and prints the ids
of the runs it finished, as JSON.

DB is a SQLite file path, or ``postgresql://...#SCHEMA`` for a PostgreSQL store.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from buttress import Permanent, Registry, Saga, retry
from buttress.backends import SagaStore
from buttress.backends.sqlite import SQLiteStore
from buttress.testing import isolated_registry

STEPS = ("reserve", "charge", "ship")


def kill_point(label: str) -> None:
    if os.environ.get("KILL_AT") == label:
        os.kill(os.getpid(), signal.SIGKILL)


def effect(path: str, line: str) -> None:
    with open(path, "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def make_store(db: str) -> SagaStore:
    """The store a DB argument names (see the module docstring)."""
    if db.startswith("postgresql://"):
        from buttress.backends.postgres import PostgresStore

        url, _, schema = db.partition("#")
        return PostgresStore(url, schema=schema)
    return SQLiteStore(db)


def close_store(store: object) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        close()


def make_saga(db: str, effects: str, registry: Registry | None = None) -> Saga:
    saga = Saga("order", store=make_store(db), lease=60, registry=registry)

    def forward(name: str):
        def run(ctx):
            kill_point(f"{name}:before")
            if name == "charge" and ctx.input.get("fail"):
                raise Permanent("card declined")
            effect(effects, f"{name} {ctx.run_id}")
            kill_point(f"{name}:after")
            return {"done": name}

        return run

    def backward(name: str):
        def undo(ctx):
            kill_point(f"undo-{name}:before")
            effect(effects, f"undo-{name} {ctx.run_id}")
            kill_point(f"undo-{name}:after")

        return undo

    for name in STEPS:
        saga.step(
            name, forward(name), compensate=backward(name), compensate_retry=retry(2, backoff=[0.0])
        )
    return saga


if __name__ == "__main__":
    if sys.argv[1] == "recover":
        db_path, effects_path = sys.argv[2:4]
        with isolated_registry():
            saga = make_saga(db_path, effects_path)
            print(json.dumps([r.run_id for r in saga.recover()]))
            close_store(saga.store)
        sys.exit(0)
    db_path, effects_path, raw = sys.argv[1:4]
    key = sys.argv[4] if len(sys.argv) > 4 else None
    with isolated_registry():
        saga = make_saga(db_path, effects_path)
        result = saga.run(json.loads(raw), key=key)
        close_store(saga.store)
    print(result.status, result.run_id, "replayed" if result.replayed else "ran")
