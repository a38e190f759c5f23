"""Crash recovery: a real child process is SIGKILLed at many points of a run.

Afterwards recovery must end every run completed or fully compensated, never run
a step twice once its completion was recorded, and lose no run. Every test runs on
SQLite and on PostgreSQL; recovery is done by two workers racing each other.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from buttress import Registry, SagaResult
from buttress.backends import RunRecord

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import saga_app  # noqa: E402

FORWARD = [f"{step}:{when}" for step in saga_app.STEPS for when in ("before", "after")]
# Compensation points are reached when "charge" fails: reserve is the one to undo.
BACKWARD = ["undo-reserve:before", "undo-reserve:after"]


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the run log lives: a SQLite file, or a PostgreSQL schema of this test's own."""
    if request.param == "sqlite":
        return str(tmp_path / "runs.db")
    url = request.getfixturevalue("postgres_url")
    schema = request.getfixturevalue("postgres_schema")
    return f"{url}#{schema}"


def child(args: list[str], kill_at: str = "never") -> subprocess.Popen[str]:
    env = {**os.environ, "KILL_AT": kill_at, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, str(HERE / "saga_app.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_child(
    db: str, tmp: Path, kill_at: str, payload: dict, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    args = [db, str(tmp / "effects.log"), json.dumps(payload)]
    if key is not None:
        args.append(key)
    process = child(args, kill_at)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def effects(tmp: Path) -> collections.Counter[str]:
    path = tmp / "effects.log"
    lines = path.read_text().split("\n") if path.exists() else []
    return collections.Counter(line.split()[0] for line in lines if line)


def racing(workers: int, work: Callable[[Registry], list[SagaResult]]) -> list[list[SagaResult]]:
    """Run ``work`` in several threads at once, each with its own registry."""
    barrier = threading.Barrier(workers)
    done: list[list[SagaResult]] = []
    failures: list[BaseException] = []

    def worker() -> None:
        registry = Registry()
        barrier.wait()
        try:
            done.append(work(registry))
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    return done


def recover_racing(db: str, tmp: Path, workers: int = 2) -> list[SagaResult]:
    """Two workers (each with its own store) recover at once; their results, together."""

    def work(registry: Registry) -> list[SagaResult]:
        saga = saga_app.make_saga(db, str(tmp / "effects.log"), registry)
        try:
            return saga.recover()
        finally:
            saga_app.close_store(saga.store)

    return [result for results in racing(workers, work) for result in results]


def check_outcome(db: str, tmp: Path, kill_at: str, failing: bool) -> None:
    store = saga_app.make_store(db)
    assert store.incomplete("order") == [], "a run was left incomplete"
    runs = store.runs(saga="order")
    assert len(runs) == 1, "a run was lost or duplicated"
    record = runs[0]
    done = effects(tmp)
    killed_after = kill_at.rsplit(":", 1)[0] if kill_at.endswith(":after") else None
    for step in ("reserve", "charge", "ship", "undo-reserve"):
        # At-least-once: a step runs twice only if the crash fell between its side
        # effect and the record of its completion; never otherwise.
        allowed = 2 if step == killed_after else 1
        assert done[step] <= allowed, f"{step} ran {done[step]} times ({kill_at})"
    if failing:
        assert record.status == "failed", record.status
        assert record.result is not None
        assert record.result["compensated"] is True
        assert done["reserve"] >= 1 and done["undo-reserve"] >= 1
        assert done["charge"] == 0 and done["ship"] == 0
    else:
        assert record.status == "completed", record.status
        assert all(done[step] >= 1 for step in saga_app.STEPS)
        assert done["undo-reserve"] == 0
    saga_app.close_store(store)


@pytest.mark.parametrize("kill_at", FORWARD)
def test_recover_after_sigkill_completes_the_run(db, tmp_path, kill_at):
    """Killed going forward: one of two racing recoverers resumes and completes the run."""
    killed = run_child(db, tmp_path, kill_at, {"fail": False})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    results = recover_racing(db, tmp_path)
    assert [r.status for r in results] == ["completed"]
    check_outcome(db, tmp_path, kill_at, failing=False)


@pytest.mark.parametrize("kill_at", ["reserve:before", "reserve:after", *BACKWARD])
def test_recover_after_sigkill_finishes_compensation(db, tmp_path, kill_at):
    """Killed in a failing run (forward or while compensating): it ends fully compensated."""
    killed = run_child(db, tmp_path, kill_at, {"fail": True})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    results = recover_racing(db, tmp_path)
    assert [r.status for r in results] == ["failed"]
    assert results[0].compensated
    check_outcome(db, tmp_path, kill_at, failing=True)


@pytest.mark.parametrize("kill_at", ["charge:before", "charge:after", "ship:after"])
def test_running_again_with_the_same_key_resumes(db, tmp_path, kill_at):
    """After a crash, running again with the same key resumes the run instead of
    starting over, and a third run just replays the stored result."""
    killed = run_child(db, tmp_path, kill_at, {"fail": False}, key="order-42")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    saga = saga_app.make_saga(db, str(tmp_path / "effects.log"))
    resumed = saga.run({"fail": False}, key="order-42")
    replayed = saga.run({"fail": False}, key="order-42")
    saga_app.close_store(saga.store)
    assert resumed.status == "completed" and not resumed.replayed
    assert replayed.replayed and replayed.run_id == resumed.run_id
    check_outcome(db, tmp_path, kill_at, failing=False)


def test_a_run_that_was_not_killed_needs_no_recovery(db, tmp_path):
    """Control: an uninterrupted child run completes and leaves nothing to recover."""
    finished = run_child(db, tmp_path, "never", {"fail": False})
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.split()[0] == "completed"
    check_outcome(db, tmp_path, "never", failing=False)


def abandon(db: str, count: int) -> list[str]:
    """Store ``count`` runs left running by a holder on another host (lease expired)."""
    store = saga_app.make_store(db)
    ids = [f"run-{n}" for n in range(count)]
    for run_id in ids:
        store.create_run(RunRecord(run_id, "order", "running", {"fail": False}, owner="far:1:x"))
    saga_app.close_store(store)
    return ids


def test_two_recoverers_racing_never_recover_a_run_twice(db, tmp_path):
    """Two workers recovering the same log at once: every run is finished exactly once."""
    ids = abandon(db, 40)
    recovered = [r.run_id for r in recover_racing(db, tmp_path)]
    assert sorted(recovered) == sorted(ids)
    assert len(recovered) == len(set(recovered))
    counts = effects(tmp_path)
    assert counts["reserve"] == counts["charge"] == counts["ship"] == 40


def test_recovering_processes_racing_never_recover_a_run_twice(db, tmp_path):
    """The same race between three recovering processes."""
    ids = abandon(db, 30)
    workers = [child(["recover", db, str(tmp_path / "effects.log")]) for _ in range(3)]
    recovered: list[str] = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 0, stderr
        recovered += json.loads(stdout)
    assert sorted(recovered) == sorted(ids)
    counts = effects(tmp_path)
    assert counts["reserve"] == counts["charge"] == counts["ship"] == 30


def test_processes_sharing_a_key_run_it_once(db, tmp_path):
    """Four processes started together with one idempotency key: the steps run once,
    and every process reports that one run (the others join or replay it)."""
    args = [db, str(tmp_path / "effects.log"), json.dumps({"fail": False}), "shared-key"]
    # Create the store (and, on PostgreSQL, its schema) first, as a deployed app has.
    store = saga_app.make_store(db)
    store.runs(limit=1)
    saga_app.close_store(store)
    processes = [child(args) for _ in range(4)]
    reports = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        reports.append(stdout.split())
    assert {status for status, _, _ in reports} == {"completed"}
    assert len({run_id for _, run_id, _ in reports}) == 1
    assert [how for _, _, how in reports].count("ran") == 1
    counts = effects(tmp_path)
    assert counts["reserve"] == counts["charge"] == counts["ship"] == 1


def test_schema_from_the_future_is_refused(tmp_path):
    """A run log written by a newer schema is not silently relabelled."""
    import sqlite3

    from buttress.backends.sqlite import SQLiteStore
    from buttress.exceptions import BackendError

    db = tmp_path / "future.db"
    connection = sqlite3.connect(db)
    connection.execute("PRAGMA user_version = 99")
    connection.close()
    with pytest.raises(BackendError, match="schema version 99"):
        SQLiteStore(db)
