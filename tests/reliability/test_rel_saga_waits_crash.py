"""Durable waits under SIGKILL: runs killed while sleeping, waiting, receiving a signal
and running a child saga.

Each trial starts one or two runs in a child process (``saga_waits_child.py``). A run
reserves, sleeps (parked), waits for an ``approve`` signal (parked), runs a child saga
that sleeps too (parked), checks the decision and notifies; a ``"reject"`` decision
fails it after the child completed, so everything is compensated. Then child processes
take turns: one sends the signals (and resumes the runs it signals), one makes a pass
of the recovery worker. Any of them may be SIGKILLed at a random checkpoint (before or
after every store write and side effect) or at a random moment. This process then
finishes what is left and checks:

- every run and child run ended: completed when approved, failed and fully
  compensated when rejected; nothing is left running or waiting;
- no step's effect is applied again once its completion was logged, nor a
  compensation once its end was logged;
- every stored signal was consumed exactly once, by the wait it was sent to, and no
  run received a signal twice.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import saga_child
import saga_waits_child
from reliability_support import scaled

from buttress.backends import INCOMPLETE
from buttress.testing import isolated_registry

HERE = Path(__file__).resolve().parent
TRIALS = scaled(10, 100)


@pytest.fixture(params=["sqlite", "postgres"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"kind": "sqlite", "path": str(tmp_path / "runs.db")}
    url = request.getfixturevalue("postgres_url")
    schema = request.getfixturevalue("postgres_schema")
    return {"kind": "postgres", "url": url, "schema": schema}


def child(spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, str(HERE / "saga_waits_child.py"), json.dumps(spec)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def random_kill(rng: random.Random) -> dict[str, Any]:
    roll = rng.random()
    if roll < 0.25:
        return {}
    if roll < 0.7:
        return {"at": rng.randint(1, 12)}
    return {"after": rng.uniform(0.0, 0.6)}


def logged(store: Any, run_ids: list[str]) -> dict[str, tuple[set[str], set[str]]]:
    out = {}
    for run_id in run_ids:
        loaded = store.load(run_id)
        if loaded is None:
            continue
        _, entries = loaded
        done = {e.step for e in entries if e.event == "completed"}
        undone = {e.step for e in entries if e.event in ("compensated", "compensation_failed")}
        out[run_id] = (done, undone)
    return out


def signals_to_send(store: Any, saga: str, decisions: dict[int, str]) -> list[list[Any]]:
    """One ``approve`` per run, sent until one is stored (a kill may cut a send)."""
    wanted = []
    for record in store.runs(saga=saga, limit=100):
        if record.status in INCOMPLETE and not any(
            s.name == "approve" for s in store.signals(record.run_id)
        ):
            wanted.append([record.run_id, decisions[record.input["n"]]])
    return wanted


def trial(rng: random.Random, number: int, spec: dict[str, Any], tmp: Path, tally: Any) -> None:
    name = f"waits{number}"
    path = tmp / f"journal-{number}.log"
    decisions = {i: rng.choice(["approve", "reject"]) for i in range(rng.randint(1, 2))}
    base = {"store": spec, "saga": name, "journal": str(path)}
    store = saga_child.open_store(spec)
    boundaries: list[tuple[int, dict[str, tuple[set[str], set[str]]]]] = []

    def lines() -> list[dict[str, Any]]:
        text = path.read_text() if path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line]

    def all_ids() -> list[str]:
        parents = [r.run_id for r in store.runs(saga=name, limit=100)]
        return parents + [f"{run_id}/ship" for run_id in parents]

    def step(mode: str, **extra: Any) -> None:
        kill = random_kill(rng)
        done = child({**base, "mode": mode, "kill": kill, **extra})
        if done.returncode != 0:
            assert done.returncode == -signal.SIGKILL, done.stderr
            tally["kills"] += 1
            tally[f"killed_{mode}"] += 1
            boundaries.append((len(lines()), logged(store, all_ids())))

    try:
        step("start", runs=[{"n": n} for n in decisions])
        for _ in range(rng.randint(2, 5)):
            time.sleep(saga_waits_child.NAP)
            if rng.random() < 0.6:
                step("signal", signals=signals_to_send(store, name, decisions))
            else:
                step("worker")
        # Finish cleanly here: resend what a kill cut, and recover until nothing is left.
        with isolated_registry():
            saga = saga_waits_child.make_sagas(name, store, str(path))
            started = {r.input["n"] for r in store.runs(saga=name, limit=100)}
            for n in decisions:  # a kill before the run was stored: its client asks again
                if n not in started:
                    saga.run({"n": n}, key=f"n{n}")
            for _ in range(40):
                for run_id, payload in signals_to_send(store, name, decisions):
                    saga.signal(run_id, "approve", payload, resume=False)
                for each in (saga, *saga.children):
                    each.recover()
                if not any(
                    r.status in INCOMPLETE
                    for each in (name, f"{name}-ship")
                    for r in store.runs(saga=each, limit=100)
                ):
                    break
                time.sleep(saga_waits_child.NAP)
        check(store, name, decisions, lines(), boundaries=boundaries, tally=tally)
    finally:
        saga_child.close_store(store)


def check(
    store: Any,
    name: str,
    decisions: dict[int, str],
    lines: list[dict[str, Any]],
    *,
    boundaries: list[tuple[int, dict[str, tuple[set[str], set[str]]]]],
    tally: Any,
) -> None:
    parents = store.runs(saga=name, limit=100)
    assert sorted(r.input["n"] for r in parents) == sorted(decisions), "a run was lost"
    by_run: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for position, line in enumerate(lines):
        by_run[line["run"]].append({**line, "position": position})
    for record in parents:
        decision = decisions[record.input["n"]]
        child_id = f"{record.run_id}/ship"
        loaded_child = store.load(child_id)
        assert loaded_child is not None, "the child run was never started"
        child_record = loaded_child[0]
        tally["runs"] += 1
        tally[decision] += 1
        if decision == "approve":
            assert record.status == "completed", (record.status, record.error)
            assert child_record.status == "completed"
        else:
            assert record.status == "failed" and record.result["compensated"], record.error
            assert child_record.status == "failed", child_record.status
        # Signals: exactly one approve stored and consumed once, by the approval wait.
        _, entries = store.load(record.run_id)
        received = [e for e in entries if e.event == "received"]
        stored = [s for s in store.signals(record.run_id) if s.name == "approve"]
        assert len(stored) == 1, stored
        assert len({e.output["id"] for e in received}) == 1, received
        assert received[0].output["id"] == stored[0].id
        assert received[0].output["payload"] == decision
        # Effects: each once per run, again only when a kill cut it before its log line.
        for run_id in (record.run_id, child_id):
            effects = by_run[run_id]
            for position, snapshot in boundaries:
                done, undone = snapshot.get(run_id, (set(), set()))
                for e in effects:
                    if e["position"] < position:
                        continue
                    if e["kind"] == "do":
                        assert e["step"] not in done, f"{e['step']} ran after it was logged"
                    else:
                        assert e["step"] not in undone, f"undo {e['step']} ran after it was logged"
            counts = collections.Counter((e["kind"], e["step"]) for e in effects)
            tally["reruns"] += sum(n - 1 for n in counts.values() if n > 1)
        kinds = {(e["kind"], e["step"]) for e in by_run[record.run_id] + by_run[child_id]}
        expected = {("do", "reserve"), ("do", "label")}
        if decision == "approve":
            expected.add(("do", "notify"))
        else:
            expected |= {("undo", "reserve"), ("undo", "label")}
        assert kinds == expected, (decision, kinds)


@pytest.mark.slow
@pytest.mark.timeout(scaled(300, 7200))
def test_sigkill_while_sleeping_waiting_signalled_or_in_a_child(store_spec, tmp_path, figures):
    seed = int(os.environ.get("BUTTRESS_RELIABILITY_SEED", "20240611"))
    rng = random.Random(f"{seed}-waits-{store_spec['kind']}")
    tally: collections.Counter[str] = collections.Counter()
    for number in range(TRIALS):
        trial(rng, number, store_spec, tmp_path, tally)
    assert tally["kills"] > 0
    figures.add(f"saga_waits_sigkill_{store_spec['kind']}", trials=TRIALS, **dict(tally))
