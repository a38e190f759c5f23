"""Sagas under fault injection: SIGKILL at random points, then recovery.

Each trial starts a real child process (``saga_child.py``) that runs one to three
sagas of four steps, with random plans: a step that fails for good (so the run
compensates), steps and compensations that fail once (retried), compensations that
always fail. The child SIGKILLs itself at a random checkpoint (before or after any
store write or side effect) or after a random delay (anywhere at all, inside a store
transaction included), half of each. In 40% of the killed trials the recovery is itself
run in a child (``recover()``, or one pass of a ``RecoveryWorker``) that is killed the
same way. Then this process recovers whatever is left, and checks:

- every run is finished: completed, failed and fully compensated, or (only when a
  compensation is broken for good) ``compensation_failed``; nothing is left running;
- the status is the one the plan dictates;
- no step's effect is applied again once its completion was logged, and no
  compensation once its end was logged: a step (or compensation) runs twice only when
  a kill fell between its side effect and the log write recording it (at-least-once),
  and never twice in one process;
- compensations ran in reverse order of the steps, and only after every step;
- a completed keyed run, asked again with its key, replays the stored result without
  running anything, and one stuck in ``compensation_failed`` refuses until an operator
  resolves it.

Parametrized on the store: SQLite, and PostgreSQL when ``buttress.backends.postgres``
exists and a server is reachable.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import saga_child
from reliability_support import LONG, scaled

from buttress import IdempotencyConflict
from buttress.testing import isolated_registry

HERE = Path(__file__).resolve().parent
KILLS = scaled(60, 500)  # in long mode: at random times, beside the checkpoint kills
STEPS = saga_child.STEPS
HAS_POSTGRES = importlib.util.find_spec("buttress.backends.postgres") is not None


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param(
            "postgres",
            marks=pytest.mark.skipif(
                not HAS_POSTGRES, reason="buttress.backends.postgres is not there yet"
            ),
        ),
    ]
)
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Where the runs live: one store per test, one saga name per trial."""
    if request.param == "sqlite":
        return {"kind": "sqlite", "path": str(tmp_path / "runs.db")}
    url = request.getfixturevalue("postgres_url")
    schema = request.getfixturevalue("postgres_schema")
    return {"kind": "postgres", "url": url, "schema": schema}


def child(spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, str(HERE / "saga_child.py"), json.dumps(spec)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def plan_run(rng: random.Random, index: int) -> dict[str, Any]:
    fail_at = rng.choice([None, None, 0, 1, 2, 3])
    plan: dict[str, Any] = {
        "n": index,
        "fail_at": fail_at,
        "flaky": [s for s in STEPS if rng.random() < 0.2],
        "flaky_undo": [s for s in STEPS if rng.random() < 0.2],
        "broken_undo": [rng.choice(STEPS)] if rng.random() < 0.1 else [],
    }
    return {"input": plan, "key": f"key-{index}" if rng.random() < 0.5 else None}


def expected_status(plan: dict[str, Any]) -> str:
    fail_at = plan["fail_at"]
    if fail_at is None:
        return "completed"
    if set(plan["broken_undo"]) & set(STEPS[:fail_at]):
        return "compensation_failed"
    return "failed"


@dataclass
class Journal:
    path: Path
    lines: list[dict[str, Any]] = field(default_factory=list)

    def read(self) -> list[dict[str, Any]]:
        text = self.path.read_text() if self.path.exists() else ""
        self.lines = [json.loads(line) for line in text.splitlines() if line]
        return self.lines


def logged(store: Any, saga: str) -> dict[str, tuple[set[str], set[str]]]:
    """Per run: the steps whose completion, and the compensations whose end, are logged."""
    out = {}
    for record in store.runs(saga=saga, limit=1000):
        loaded = store.load(record.run_id)
        assert loaded is not None
        _, entries = loaded
        done = {e.step for e in entries if e.event == "completed"}
        undone = {e.step for e in entries if e.event in ("compensated", "compensation_failed")}
        out[record.run_id] = (done, undone)
    return out


@dataclass
class Tally:
    trials: int = 0
    kills: int = 0
    killed_recoveries: int = 0
    not_killed: int = 0
    runs_checked: int = 0
    reexecuted_after_crash: int = 0
    compensations: int = 0
    random_time_kills: int = 0
    checkpoint_kills: int = 0
    killed_worker_recoveries: int = 0
    per_run: float = 0.02  # seconds a child takes per run (measured as trials go)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)


def trial(rng: random.Random, number: int, spec: dict[str, Any], tmp: Path, tally: Tally) -> None:
    saga_name = f"crash{number}"
    journal = Journal(tmp / f"journal-{number}.log")
    runs = [plan_run(rng, i) for i in range(rng.randint(1, 3))]
    base = {"store": spec, "saga": saga_name, "journal": str(journal.path)}
    kill = random_kill(rng, checkpoints=6 + 18 * len(runs), seconds=tally.per_run * len(runs))
    first = child({**base, "mode": "run", "runs": runs, "kill": kill})
    tally.trials += 1
    store = saga_child.open_store(spec)
    boundaries: list[tuple[int, dict[str, tuple[set[str], set[str]]]]] = []
    try:
        if first.returncode == 0:
            tally.not_killed += 1
            # How long a child's runs take here: random kills are drawn within that.
            took = json.loads(first.stdout.strip().splitlines()[-1])["seconds"]
            tally.per_run = 0.8 * tally.per_run + 0.2 * took / len(runs)
        else:
            assert first.returncode == -signal.SIGKILL, first.stderr
            count_kill(tally, kill)
            boundaries.append((len(journal.read()), logged(store, saga_name)))
            if rng.random() < 0.4:
                # Recovery crashes too (by recover() or by a worker's pass); the next
                # recovery picks up after it.
                mode = rng.choice(["recover", "worker"])
                again = random_kill(rng, checkpoints=12, seconds=tally.per_run * len(runs))
                second = child({**base, "mode": mode, "kill": again})
                if second.returncode != 0:
                    assert second.returncode == -signal.SIGKILL, second.stderr
                    count_kill(tally, again)
                    tally.killed_recoveries += 1
                    tally.killed_worker_recoveries += mode == "worker"
                    boundaries.append((len(journal.read()), logged(store, saga_name)))
            with isolated_registry():
                saga = saga_child.make_saga(saga_name, store, str(journal.path))
                saga.recover()
        check(
            store,
            saga_name=saga_name,
            runs=runs,
            journal=journal,
            boundaries=boundaries,
            tally=tally,
        )
    finally:
        saga_child.close_store(store)


def random_kill(rng: random.Random, *, checkpoints: int, seconds: float) -> dict[str, Any]:
    """Half the kills at a checkpoint (a store write or side effect boundary), half at a
    random moment (inside a store transaction, between two bytecodes...)."""
    if rng.random() < 0.5:
        return {"at": rng.randint(1, checkpoints)}
    return {"after": rng.uniform(0.0, seconds)}


def count_kill(tally: Tally, kill: dict[str, Any]) -> None:
    tally.kills += 1
    if "after" in kill:
        tally.random_time_kills += 1
    else:
        tally.checkpoint_kills += 1


def check(
    store: Any,
    *,
    saga_name: str,
    runs: list[dict[str, Any]],
    journal: Journal,
    boundaries: list[tuple[int, dict[str, tuple[set[str], set[str]]]]],
    tally: Tally,
) -> None:
    assert store.incomplete(saga_name) == [], "a run was left unfinished"
    records = store.runs(saga=saga_name, limit=1000)
    lines = journal.read()
    by_run: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for position, line in enumerate(lines):
        by_run[line["run"]].append({**line, "position": position})
    plans = {run["input"]["n"]: run for run in runs}
    seen_inputs = set()
    for record in records:
        plan = record.input
        seen_inputs.add(plan["n"])
        tally.runs_checked += 1
        tally.statuses[record.status] += 1
        status = expected_status(plan)
        assert record.status == status, (record.status, plan)
        if status == "failed":
            assert record.result is not None and record.result["compensated"] is True
        effects = by_run[record.run_id]
        do = [e for e in effects if e["kind"] == "do"]
        undo = [e for e in effects if e["kind"] == "undo"]
        tally.compensations += len(undo)
        # Never twice in one process.
        per_process = collections.Counter((e["pid"], e["kind"], e["step"]) for e in effects)
        assert max(per_process.values(), default=1) == 1, per_process
        # Never again once the log recorded it.
        for position, snapshot in boundaries:
            done, undone = snapshot.get(record.run_id, (set(), set()))
            for e in effects:
                if e["position"] < position:
                    continue
                if e["kind"] == "do":
                    assert e["step"] not in done, f"{e['step']} ran after its completion was logged"
                else:
                    assert e["step"] not in undone, f"undo {e['step']} ran after being logged"
        counts = collections.Counter((e["kind"], e["step"]) for e in effects)
        tally.reexecuted_after_crash += sum(n - 1 for n in counts.values() if n > 1)
        fail_at = plan["fail_at"]
        ran = STEPS if fail_at is None else STEPS[:fail_at]
        assert {e["step"] for e in do} == set(ran), (plan, do)
        if fail_at is None:
            assert not undo
            continue
        to_undo = [s for s in reversed(ran) if s not in plan["broken_undo"]]
        assert {e["step"] for e in undo} == set(to_undo), (plan, undo)
        # Reverse order, after every step: a compensation may repeat (crash between its
        # effect and its log entry) but never goes back to a later step.
        order = [STEPS.index(e["step"]) for e in undo]
        assert order == sorted(order, reverse=True), order
        if do and undo:
            assert max(e["position"] for e in do) < min(e["position"] for e in undo)
    # A run the child created is never lost: runs recorded equal runs that left a trace.
    traced = {line["run"] for line in lines}
    assert traced <= {record.run_id for record in records}
    # Keys: asked again, a finished keyed run replays; a stuck one waits for an operator.
    with isolated_registry():
        saga = saga_child.make_saga(saga_name, store, str(journal.path))
        before = len(lines)
        for record in records:
            if record.key is None:
                continue
            if record.status == "compensation_failed":
                with pytest.raises(IdempotencyConflict, match="operator"):
                    saga.run(plans[record.input["n"]]["input"], key=record.key)
                saga.resolve(record.run_id)
                resolved = store.load(record.run_id)
                assert resolved is not None and resolved[0].status == "failed"
            elif record.status == "completed":
                replay = saga.run(plans[record.input["n"]]["input"], key=record.key)
                assert replay.replayed and replay.run_id == record.run_id
                assert replay.status == "completed"
            # (A run that failed and was fully compensated frees its key, as documented.)
        assert saga.recover() == []
        assert len(journal.read()) == before, "a replay or a recovery ran a step again"


@pytest.mark.slow
@pytest.mark.timeout(scaled(240, 7200))
def test_sigkill_at_random_points_then_recover(store_spec, tmp_path, figures):
    """Hundreds of random kill points (60 in bounded mode): recovery always ends clean."""
    seed = int(os.environ.get("BUTTRESS_RELIABILITY_SEED", "20240611"))
    rng = random.Random(f"{seed}-{store_spec['kind']}")
    tally = Tally()
    attempts = 0
    # Long mode: at least KILLS kills at random moments (and the checkpoint kills beside).
    while (tally.random_time_kills if LONG else tally.kills) < KILLS:
        attempts += 1
        assert attempts < KILLS * 6, "the children were too seldom killed"
        trial(rng, attempts, store_spec, tmp_path, tally)
    figures.add(
        f"saga_sigkill_{store_spec['kind']}",
        mode="long" if LONG else "bounded",
        seed=seed,
        trials=tally.trials,
        kills_survived=tally.kills,
        killed_recoveries=tally.killed_recoveries,
        killed_worker_recoveries=tally.killed_worker_recoveries,
        random_time_kills=tally.random_time_kills,
        checkpoint_kills=tally.checkpoint_kills,
        trials_not_killed=tally.not_killed,
        runs_checked=tally.runs_checked,
        steps_rerun_after_crash=tally.reexecuted_after_crash,
        compensations_run=tally.compensations,
        statuses=dict(tally.statuses),
        leaks_found=0,
    )
