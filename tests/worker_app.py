"""A saga for the recovery-worker tests: ``python -m buttress runs --db DB worker
--app worker_app:build``. Each step appends ``<step> <run id> <pid>`` to the file named
by ``WORKER_EFFECTS`` (fsynced first) after sleeping ``WORKER_STEP_SECONDS``."""

from __future__ import annotations

import os
import time
from typing import Any

from buttress import Saga
from buttress.backends import SagaStore
from buttress.backends.sqlite import SQLiteStore

STEPS = ("reserve", "charge", "ship")


def effect(line: str) -> None:
    with open(os.environ["WORKER_EFFECTS"], "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def store_for(db: str, schema: str | None = None) -> SagaStore:
    if db.startswith("postgresql://"):
        from buttress.backends.postgres import PostgresStore

        return PostgresStore(db, schema=schema or "buttress")
    return SQLiteStore(db)


def build(db: str, schema: str | None = None) -> Saga:
    """The saga the worker recovers, on the store --db (and --schema) name."""
    saga = Saga("fulfil", store=store_for(db, schema), lease=60)
    pause = float(os.environ.get("WORKER_STEP_SECONDS", "0"))
    for name in STEPS:

        def step(ctx: Any, name: str = name) -> str:
            if pause:
                time.sleep(pause)
            effect(f"{name} {ctx.run_id} {os.getpid()}")
            return name

        saga.step(name, step)
    return saga
