"""Recovery that never skips silently, the recovery worker (API and ``runs worker``),
and graceful shutdown of a saga (issue 12, points 4-6)."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import worker_app
from buttress import BackendError, Saga, health
from buttress.backends import RunRecord
from buttress.backends.memory import MemoryStore
from buttress.backends.sqlite import SQLiteStore
from buttress.saga import RecoverySkipped, RecoveryWorker, SagaClosed
from buttress.testing import FakeClock, capture_events

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def abandon(store: Any, run_id: str, saga: str = "fulfil", lease_until: float = 0.0) -> None:
    """A run whose holder vanished on another host (its lease ran out)."""
    store.create_run(
        RunRecord(
            run_id,
            saga,
            "running",
            {},
            created_at=time.time(),
            updated_at=time.time(),
            owner="elsewhere:1:gone",
            lease_until=lease_until,
        )
    )


class FlakyClaims(MemoryStore):
    """A memory store whose take-over of one run fails (as a lock that never clears)."""

    def __init__(self, failing: str) -> None:
        super().__init__()
        self.failing: str | None = failing

    def claim_run(self, run_id: str, owner: str, **fields: Any) -> bool:
        if run_id == self.failing:
            raise BackendError("canceling statement due to statement timeout")
        return super().claim_run(run_id, owner, **fields)


def counting_saga(store: Any, clock: FakeClock | None = None) -> tuple[Saga, list[str]]:
    calls: list[str] = []
    saga = Saga("fulfil", store=store, lease=30, clock=clock)
    saga.step("one", lambda ctx: calls.append(ctx.run_id))
    return saga, calls


# -- recover() never skips silently -----------------------------------------------------------


def test_a_run_that_cannot_be_taken_is_reported_and_taken_next_time():
    """A take-over that fails is in .skipped and a RecoverySkipped event; the other runs
    are recovered, and the next recover() takes the skipped one."""
    store = FlakyClaims("r2")
    for run_id in ("r1", "r2", "r3"):
        abandon(store, run_id)
    saga, calls = counting_saga(store)
    with capture_events() as events:
        report = saga.recover()
    assert sorted(r.run_id for r in report) == ["r1", "r3"]
    assert list(report.skipped) == ["r2"]
    assert "statement timeout" in report.skipped["r2"]
    skipped = [e for e in events if isinstance(e, RecoverySkipped)]
    assert [(e.run_id, e.name) for e in skipped] == [("r2", "fulfil")]
    store.failing = None
    again = saga.recover()
    assert [r.run_id for r in again] == ["r2"]
    assert not again.skipped
    assert sorted(calls) == ["r1", "r2", "r3"]


def test_a_run_held_by_a_live_owner_is_held_not_skipped():
    """A current lease elsewhere is reported in .held, without an event."""
    clock = FakeClock(wall=1000.0)
    store = MemoryStore()
    abandon(store, "live", lease_until=1030.0)
    saga, calls = counting_saga(store, clock)
    with capture_events() as events:
        report = saga.recover()
    assert report == [] and report.held == ["live"] and not report.skipped
    assert not [e for e in events if isinstance(e, RecoverySkipped)]
    assert calls == []


def test_postgres_waits_for_a_locked_run_then_takes_it(postgres_url, postgres_schema):
    """A row locked by another transaction is waited for (bounded), then taken."""
    import psycopg

    from buttress.backends.postgres import PostgresStore

    store = PostgresStore(postgres_url, schema=postgres_schema)
    abandon(store, "locked")
    saga, calls = counting_saga(store)
    table = f'"{postgres_schema}".buttress_runs'
    with psycopg.connect(postgres_url) as holder:
        holder.execute(f"SELECT 1 FROM {table} WHERE run_id = 'locked' FOR UPDATE")
        releaser = threading.Timer(0.3, holder.commit)
        releaser.start()
        report = saga.recover()
        releaser.join()
    assert [r.run_id for r in report] == ["locked"]
    assert calls == ["locked"]
    store.close()


def test_postgres_reports_a_run_locked_past_the_bound(postgres_url, postgres_schema):
    """A row that stays locked past statement_timeout is skipped, and said so."""
    import psycopg

    from buttress.backends.postgres import PostgresStore

    store = PostgresStore(postgres_url, schema=postgres_schema, statement_timeout=0.2)
    abandon(store, "stuck")
    saga, _ = counting_saga(store)
    table = f'"{postgres_schema}".buttress_runs'
    with psycopg.connect(postgres_url) as holder:
        holder.execute(f"SELECT 1 FROM {table} WHERE run_id = 'stuck' FOR UPDATE")
        report = saga.recover()
        holder.rollback()
    assert report == [] and list(report.skipped) == ["stuck"]
    assert [r.run_id for r in saga.recover()] == ["stuck"]
    store.close()


# -- the worker API ---------------------------------------------------------------------------


def test_a_worker_pass_recovers_and_reports_health():
    """run_once finishes abandoned runs, counts them, and its health passes."""
    clock = FakeClock()
    store = MemoryStore()
    abandon(store, "r1")
    saga, calls = counting_saga(store)
    worker = RecoveryWorker(saga, interval=5, clock=clock)
    assert worker.health_check()[0] == "warn"  # no pass yet
    assert worker.run_once() == 1
    assert calls == ["r1"]
    assert worker.snapshot()["recovered"] == 1
    assert worker.health_check()[0] == "pass"
    clock.advance(60)
    assert worker.health_check()[0] == "warn"  # no pass for a long time
    assert health()["checks"]["fulfil-recovery:saga_worker"][0]["status"] == "warn"


def test_a_worker_reports_a_store_that_is_down(tmp_path):
    """A pass whose store fails makes the worker's health fail with the error."""
    store = SQLiteStore(tmp_path / "runs.db")
    saga, _ = counting_saga(store)
    worker = RecoveryWorker(saga)
    store.close()
    assert worker.run_once() == 0
    status, _, output = worker.health_check()
    assert status == "fail" and "fulfil" in output
    assert saga.health_check()[0] == "fail"


def test_a_stopped_worker_claims_nothing_more():
    """After stop(), a pass takes no run; start() runs passes on a thread until stop()."""
    store = MemoryStore()
    abandon(store, "r1")
    saga, calls = counting_saga(store)
    worker = RecoveryWorker(saga, interval=0.01)
    worker.stop()
    assert worker.run_once() == 0 and calls == []
    thread = worker.start()
    for _ in range(500):
        if calls:
            break
        time.sleep(0.01)
    assert worker.stop() is True
    assert not thread.is_alive()
    assert calls == ["r1"]


def test_worker_options_are_validated():
    """Bad worker options are refused when built."""
    saga, _ = counting_saga(MemoryStore())
    with pytest.raises(ValueError, match="interval"):
        RecoveryWorker(saga, interval=0)
    with pytest.raises(TypeError, match="sagas"):
        RecoveryWorker([object()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="sagas"):
        RecoveryWorker([])


# -- graceful shutdown ------------------------------------------------------------------------


def test_shutdown_refuses_new_runs_and_waits_for_active_ones():
    """shutdown() stops new runs and returns 0 once the active run finished."""
    started, release = threading.Event(), threading.Event()
    saga = Saga("service")
    saga.step("slow", lambda ctx: started.wait(5) and release.wait(5))
    runner = threading.Thread(target=saga.run, args=({},))
    runner.start()
    started.set()
    threading.Timer(0.1, release.set).start()
    assert saga.shutdown(timeout=10) == 0
    runner.join()
    assert saga.closed
    with pytest.raises(SagaClosed, match="shutting down"):
        saga.run({})


def test_a_run_cut_off_by_shutdown_keeps_its_log_for_recovery(tmp_path):
    """A run still going when the bound passes is counted, and stays running in the log
    (a worker finishes it later)."""
    clock = FakeClock()
    store = SQLiteStore(tmp_path / "runs.db")
    release = threading.Event()
    saga = Saga("cutoff", store=store, clock=clock)
    saga.step("stuck", lambda ctx: release.wait(10))
    runner = threading.Thread(target=saga.run, args=({},))
    runner.start()
    for _ in range(500):
        if store.incomplete("cutoff"):
            break
        time.sleep(0.01)
    assert saga.shutdown(timeout=1) == 1  # the fake clock jumps over the bound
    assert len(store.incomplete("cutoff")) == 1
    release.set()
    runner.join()
    store.close()


# -- python -m buttress runs worker -----------------------------------------------------------


def start_worker(db: str, effects: Path, *extra: str, **env: str) -> subprocess.Popen[str]:
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT / "src")]),
        "WORKER_EFFECTS": str(effects),
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "buttress", "runs", "--db", db, *extra],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(HERE),
    )


def effects_of(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_a_sigterm_lets_the_recovery_in_progress_finish(tmp_path):
    """SIGTERM: the worker finishes the run it is on, claims nothing more, exits 0."""
    db = str(tmp_path / "runs.db")
    effects = tmp_path / "effects.log"
    store = SQLiteStore(db)
    for index in range(4):
        abandon(store, f"run{index}")
    worker = start_worker(
        db, effects, "worker", "--app", "worker_app:build", WORKER_STEP_SECONDS="0.2"
    )
    for _ in range(1000):
        if effects_of(effects):
            break
        time.sleep(0.01)
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    assert "worker stopped" in out
    done = effects_of(effects)
    first = done[0][1]
    assert [line[0] for line in done if line[1] == first] == list(worker_app.STEPS)
    assert {line[1] for line in done} == {first}  # nothing else was claimed
    assert len(store.incomplete("fulfil")) == 3
    finish = start_worker(db, effects, "worker", "--app", "worker_app:build", "--once")
    assert finish.communicate(timeout=60)[0].startswith("recovered 3 run(s)")
    assert store.incomplete("fulfil") == []
    store.close()


@pytest.mark.slow
def test_three_workers_on_one_postgres_store_never_recover_a_run_twice(
    tmp_path, postgres_url, postgres_schema
):
    """Three worker processes share 30 abandoned runs: each run's steps run once."""
    from buttress.backends.postgres import PostgresStore

    store = PostgresStore(postgres_url, schema=postgres_schema)
    store.migrate()
    runs = [f"run{index:02d}" for index in range(30)]
    for run_id in runs:
        abandon(store, run_id)
    effects = tmp_path / "effects.log"
    args = ("--schema", postgres_schema, "worker", "--app", "worker_app:build", "--interval", "0.2")
    workers = [
        start_worker(postgres_url, effects, *args, WORKER_STEP_SECONDS="0.01") for _ in range(3)
    ]
    try:
        for _ in range(3000):
            if not store.incomplete("fulfil"):
                break
            time.sleep(0.02)
        assert store.incomplete("fulfil") == []
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        outputs = [worker.communicate(timeout=60) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0, 0], outputs
    done = effects_of(effects)
    per_run = collections.Counter((line[0], line[1]) for line in done)
    assert set(per_run.values()) == {1}, "a step ran twice"
    assert {run for _, run in per_run} == set(runs)
    assert len({line[2] for line in done}) >= 2, "the work was shared"
    assert all(record.status == "completed" for record in store.runs(limit=100))
    store.close()
