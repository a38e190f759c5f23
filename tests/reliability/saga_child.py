"""A saga app for the crash tests of the reliability suite, run as a child process.

``python saga_child.py SPEC_JSON`` where the spec says:

- ``store``: ``{"kind": "sqlite", "path": ...}`` or
  ``{"kind": "postgres", "url": ..., "schema": ...}``;
- ``saga``: the saga's name (one per trial, so trials can share a store);
- ``journal``: a file every side effect appends one JSON line to (fsynced first);
- ``mode``: ``"run"`` (run ``runs``, a list of ``{"input": ..., "key": ...}``),
  ``"recover"`` (``saga.recover()``) or ``"worker"`` (one pass of a
  :class:`~buttress.saga.RecoveryWorker`, the code a ``runs worker`` sidecar runs);
- ``kill``: ``{"at": N}`` to SIGKILL itself at the N-th checkpoint, ``{"after": S}`` to
  SIGKILL itself S seconds after it starts working (anywhere: inside a store write,
  between two bytecodes of the runner), or ``{}`` never.

Checkpoints are the moments before and after every store write and every side effect.
A run's input says which step fails for good (``fail_at``: its index), which steps
and compensations fail on their first attempt (``flaky``, ``flaky_undo``) and which
compensations always fail (``broken_undo``). Steps fail *before* their side effect, as
a declined payment would. On a normal exit the child prints how many checkpoints it
passed and how many seconds its work took.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

from buttress import Permanent, Registry, Saga, retry
from buttress.backends import KeyClaim, LogEntry, RunRecord, SagaStore
from buttress.backends.sqlite import SQLiteStore
from buttress.saga import RecoveryWorker
from buttress.testing import isolated_registry

STEPS = ("reserve", "charge", "ship", "notify")


class Killer:
    """Counts checkpoints; SIGKILLs this process at the chosen one."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.hits = 0

    def __call__(self, label: str) -> None:
        self.hits += 1
        if self.hits == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


checkpoint = Killer()


def open_store(spec: dict[str, Any]) -> Any:
    if spec["kind"] == "sqlite":
        return SQLiteStore(spec["path"])
    from buttress.backends.postgres import PostgresStore

    return PostgresStore(spec["url"], schema=spec["schema"])


def close_store(store: Any) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        close()


class CrashingStore:
    """A store that passes a checkpoint before and after each of its writes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_run(self, record: RunRecord) -> None:
        checkpoint("create_run:before")
        self.inner.create_run(record)
        checkpoint("create_run:after")

    def claim_key(self, record: RunRecord, *, now: float) -> KeyClaim:
        checkpoint("claim_key:before")
        claim: KeyClaim = self.inner.claim_key(record, now=now)
        checkpoint("claim_key:after")
        return claim

    def write(self, run_id: str, entries: list[LogEntry], **fields: Any) -> None:
        checkpoint("write:before")
        self.inner.write(run_id, entries, **fields)
        checkpoint("write:after")

    def load(self, run_id: str) -> tuple[RunRecord, list[LogEntry]] | None:
        loaded: tuple[RunRecord, list[LogEntry]] | None = self.inner.load(run_id)
        return loaded

    def claim_run(self, run_id: str, owner: str, **fields: Any) -> bool:
        checkpoint("claim_run:before")
        won: bool = self.inner.claim_run(run_id, owner, **fields)
        checkpoint("claim_run:after")
        return won

    def incomplete(self, saga: str) -> list[str]:
        ids: list[str] = self.inner.incomplete(saga)
        return ids

    def runs(self, **query: Any) -> list[RunRecord]:
        found: list[RunRecord] = self.inner.runs(**query)
        return found

    def due(self, saga: str, **query: Any) -> list[str]:
        ids: list[str] = self.inner.due(saga, **query)
        return ids

    def counts(self, saga: str) -> dict[str, int]:
        found: dict[str, int] = self.inner.counts(saga)
        return found

    def send_signal(self, run_id: str, name: str, payload: Any, *, at: float) -> Any:
        checkpoint("send_signal:before")
        stored = self.inner.send_signal(run_id, name, payload, at=at)
        checkpoint("send_signal:after")
        return stored

    def signals(self, run_id: str) -> list[Any]:
        found: list[Any] = self.inner.signals(run_id)
        return found


def journal(path: str, **fields: Any) -> None:
    line = json.dumps({"pid": os.getpid(), **fields})
    with open(path, "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def make_saga(name: str, store: Any, journal_path: str, registry: Registry | None = None) -> Saga:
    """The saga under test; ``store`` may be a real store or a :class:`CrashingStore`."""
    assert isinstance(store, SagaStore)
    saga = Saga(name, store=store, lease=60, registry=registry)
    for index, step in enumerate(STEPS):

        def forward(ctx: Any, step: str = step, index: int = index) -> dict[str, str]:
            plan = ctx.input
            checkpoint(f"{step}:before")
            if plan.get("fail_at") == index:
                raise Permanent(f"{step} declined")
            if step in plan.get("flaky", ()) and ctx.attempt == 1:
                raise ConnectionError(f"{step} flaked")
            journal(journal_path, run=ctx.run_id, step=step, kind="do", attempt=ctx.attempt)
            checkpoint(f"{step}:after")
            return {"done": step}

        def undo(ctx: Any, step: str = step) -> None:
            plan = ctx.input
            checkpoint(f"undo-{step}:before")
            if step in plan.get("broken_undo", ()):
                raise RuntimeError(f"undoing {step} is broken")
            if step in plan.get("flaky_undo", ()) and ctx.attempt == 1:
                raise ConnectionError(f"undoing {step} flaked")
            journal(journal_path, run=ctx.run_id, step=step, kind="undo", attempt=ctx.attempt)
            checkpoint(f"undo-{step}:after")

        saga.step(
            step,
            forward,
            compensate=undo,
            retry=retry(3, on=ConnectionError, backoff=[0.0]),
            compensate_retry=retry(3, backoff=[0.0]),
        )
    return saga


def main(spec: dict[str, Any]) -> None:
    kill = spec.get("kill", {})
    checkpoint.at = kill.get("at")
    with isolated_registry():
        store = open_store(spec["store"])
        saga = make_saga(spec["saga"], CrashingStore(store), spec["journal"])
        if "after" in kill:
            timer = threading.Timer(kill["after"], os.kill, (os.getpid(), signal.SIGKILL))
            timer.daemon = True
            timer.start()
        started = time.perf_counter()
        if spec["mode"] == "recover":
            saga.recover()
        elif spec["mode"] == "worker":
            RecoveryWorker(saga, interval=1).run_once()
        else:
            for run in spec["runs"]:
                saga.run(run["input"], key=run.get("key"))
        close_store(store)
    print(json.dumps({"checkpoints": checkpoint.hits, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
