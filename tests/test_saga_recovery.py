"""Crash recovery: a real child process is SIGKILLed at many points of a run.

Afterwards recovery must end every run completed or fully compensated, never run
a step twice once its completion was recorded, and lose no run.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from buttress.backends.sqlite import SQLiteStore

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import saga_app  # noqa: E402

FORWARD = [f"{step}:{when}" for step in saga_app.STEPS for when in ("before", "after")]
# Compensation points are reached when "charge" fails: reserve is the one to undo.
BACKWARD = ["undo-reserve:before", "undo-reserve:after"]


def run_child(tmp: Path, kill_at: str, payload: dict, key: str | None = None):
    env = {**os.environ, "KILL_AT": kill_at, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [
        sys.executable,
        str(HERE / "saga_app.py"),
        str(tmp / "runs.db"),
        str(tmp / "effects.log"),
        json.dumps(payload),
    ]
    if key is not None:
        args.append(key)
    return subprocess.run(args, check=False, env=env, capture_output=True, text=True, timeout=60)


def effects(tmp: Path) -> collections.Counter[str]:
    path = tmp / "effects.log"
    lines = path.read_text().split("\n") if path.exists() else []
    return collections.Counter(line.split()[0] for line in lines if line)


def check_outcome(tmp: Path, kill_at: str, failing: bool) -> None:
    store = SQLiteStore(tmp / "runs.db")
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
    store.close()


@pytest.mark.parametrize("kill_at", FORWARD)
def test_recover_after_sigkill_completes_the_run(tmp_path, kill_at):
    """Killed going forward: recover() resumes and completes the run."""
    child = run_child(tmp_path, kill_at, {"fail": False})
    assert child.returncode == -signal.SIGKILL, child.stderr
    from buttress.testing import isolated_registry

    with isolated_registry():
        saga = saga_app.make_saga(str(tmp_path / "runs.db"), str(tmp_path / "effects.log"))
        results = saga.recover()
    assert [r.status for r in results] == ["completed"]
    check_outcome(tmp_path, kill_at, failing=False)


@pytest.mark.parametrize("kill_at", ["reserve:before", "reserve:after", *BACKWARD])
def test_recover_after_sigkill_finishes_compensation(tmp_path, kill_at):
    """Killed in a failing run (forward or while compensating): it ends fully compensated."""
    child = run_child(tmp_path, kill_at, {"fail": True})
    assert child.returncode == -signal.SIGKILL, child.stderr
    from buttress.testing import isolated_registry

    with isolated_registry():
        saga = saga_app.make_saga(str(tmp_path / "runs.db"), str(tmp_path / "effects.log"))
        results = saga.recover()
    assert [r.status for r in results] == ["failed"]
    assert results[0].compensated
    check_outcome(tmp_path, kill_at, failing=True)


@pytest.mark.parametrize("kill_at", ["charge:before", "charge:after", "ship:after"])
def test_running_again_with_the_same_key_resumes(tmp_path, kill_at):
    """After a crash, running again with the same key resumes the run instead of
    starting over, and a third run just replays the stored result."""
    child = run_child(tmp_path, kill_at, {"fail": False}, key="order-42")
    assert child.returncode == -signal.SIGKILL, child.stderr
    from buttress.testing import isolated_registry

    with isolated_registry():
        saga = saga_app.make_saga(str(tmp_path / "runs.db"), str(tmp_path / "effects.log"))
        resumed = saga.run({"fail": False}, key="order-42")
        replayed = saga.run({"fail": False}, key="order-42")
    assert resumed.status == "completed" and not resumed.replayed
    assert replayed.replayed and replayed.run_id == resumed.run_id
    check_outcome(tmp_path, kill_at, failing=False)


def test_a_run_that_was_not_killed_needs_no_recovery(tmp_path):
    """Control: an uninterrupted child run completes and leaves nothing to recover."""
    child = run_child(tmp_path, "never", {"fail": False})
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "completed"
    check_outcome(tmp_path, "never", failing=False)


def test_two_recoverers_racing_never_recover_a_run_twice(tmp_path):
    """Two workers recovering the same log at once: every run is finished exactly once."""
    import threading

    from buttress import Registry
    from buttress.backends import RunRecord

    db = tmp_path / "runs.db"
    store = SQLiteStore(db)
    for n in range(40):
        store.create_run(
            RunRecord(f"run-{n}", "order", "running", {"fail": False}, owner="elsewhere:1:x")
        )
    store.close()
    recovered: list[list[str]] = []
    barrier = threading.Barrier(2)

    def worker() -> None:
        # Each worker has its own registry (isolated_registry swaps a process-wide one).
        saga = saga_app.make_saga(str(db), str(tmp_path / "effects.log"), Registry())
        barrier.wait()
        recovered.append([r.run_id for r in saga.recover()])

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = recovered[0] + recovered[1]
    assert sorted(ids) == sorted(f"run-{n}" for n in range(40))
    assert len(ids) == len(set(ids))
    counts = effects(tmp_path)
    assert counts["reserve"] == counts["charge"] == counts["ship"] == 40


def test_schema_from_the_future_is_refused(tmp_path):
    """A run log written by a newer schema is not silently relabelled."""
    import sqlite3

    from buttress.exceptions import BackendError

    db = tmp_path / "future.db"
    connection = sqlite3.connect(db)
    connection.execute("PRAGMA user_version = 99")
    connection.close()
    with pytest.raises(BackendError, match="schema version 99"):
        SQLiteStore(db)
