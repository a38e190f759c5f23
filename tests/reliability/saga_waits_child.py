"""A saga app with durable waits, for the crash tests, run as a child process.

``python saga_waits_child.py SPEC_JSON`` where the spec says (as in ``saga_child.py``):

- ``store``, ``journal``, ``kill``: the store, the side-effect journal, when to SIGKILL;
- ``saga``: the parent saga's name (its child saga is ``<saga>-ship``);
- ``mode``: ``"start"`` (start ``runs``, a list of inputs), ``"signal"`` (send each of
  ``signals``, ``[run_id, payload]`` pairs, the ``approve`` signal, resuming the run
  here) or ``"worker"`` (one pass of a :class:`~buttress.saga.RecoveryWorker`).

Every run sleeps (parked), waits for ``approve`` (parked), runs a child saga that
sleeps too (parked), then checks the decision: ``"reject"`` fails the run there, after
the child completed, so the child is compensated with the rest.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

from saga_child import CrashingStore, checkpoint, close_store, journal, open_store

from buttress import Permanent, Registry, Saga, retry
from buttress.saga import RecoveryWorker
from buttress.testing import isolated_registry

STEPS = ("reserve", "nap", "approval", "ship", "check", "notify")
CHILD_STEPS = ("label", "settle")
NAP = 0.2  # seconds: every sleep parks (park_after=0), and is due after this


def effect(path: str, ctx: Any, step: str, kind: str) -> None:
    checkpoint(f"{step}:{kind}:before")
    journal(path, run=ctx.run_id, step=step, kind=kind, attempt=ctx.attempt)
    checkpoint(f"{step}:{kind}:after")


def make_sagas(name: str, store: Any, path: str, registry: Registry | None = None) -> Saga:
    """The parent saga (its child is reachable as ``saga.children[0]``)."""
    options: dict[str, Any] = {"store": store, "lease": 60, "park_after": 0, "registry": registry}
    fast = {"retry": retry(3, on=ConnectionError, backoff=[0.0])}
    undo = {"compensate_retry": retry(3, backoff=[0.0])}
    ship = Saga(f"{name}-ship", **options)
    ship.step(
        "label",
        lambda ctx: effect(path, ctx, "label", "do"),
        compensate=lambda ctx: effect(path, ctx, "label", "undo"),
        **fast,
        **undo,
    )
    ship.step("settle", lambda ctx: ctx.sleep(NAP))

    saga = Saga(name, **options)
    saga.step(
        "reserve",
        lambda ctx: effect(path, ctx, "reserve", "do"),
        compensate=lambda ctx: effect(path, ctx, "reserve", "undo"),
        **fast,
        **undo,
    )
    saga.step("nap", lambda ctx: ctx.sleep(NAP))
    saga.step("approval", lambda ctx: ctx.wait_for("approve", timeout=600))
    saga.child("ship", ship)

    def check(ctx: Any) -> None:
        if ctx.results["approval"] == "reject":
            raise Permanent("rejected")

    saga.step("check", check)
    saga.step("notify", lambda ctx: effect(path, ctx, "notify", "do"), **fast)
    return saga


def main(spec: dict[str, Any]) -> None:
    kill = spec.get("kill", {})
    checkpoint.at = kill.get("at")
    with isolated_registry():
        store = open_store(spec["store"])
        saga = make_sagas(spec["saga"], CrashingStore(store), spec["journal"])
        if "after" in kill:
            timer = threading.Timer(kill["after"], os.kill, (os.getpid(), signal.SIGKILL))
            timer.daemon = True
            timer.start()
        if spec["mode"] == "start":
            for run in spec["runs"]:
                saga.run(run, key=f"n{run['n']}")
        elif spec["mode"] == "signal":
            for run_id, payload in spec["signals"]:
                saga.signal(run_id, "approve", payload)
        else:
            RecoveryWorker(saga, interval=1).run_once()
        close_store(store)
    print(json.dumps({"checkpoints": checkpoint.hits}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
