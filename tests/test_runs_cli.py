"""``python -m buttress runs``: list, show and recover a SQLite run log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from buttress import Saga
from buttress.backends.sqlite import SQLiteStore
from buttress.testing import isolated_registry

APP = """
from buttress import Saga
from buttress.backends.sqlite import SQLiteStore


def make(db):
    saga = Saga("orders", store=SQLiteStore(db))
    saga.step("reserve", lambda ctx: {"reserved": ctx.input["n"]},
              compensate=lambda ctx: None)
    saga.step("charge", lambda ctx: "paid")
    return saga
"""


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "buttress", "runs", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_list_show_and_recover(tmp_path):
    """list shows runs, show prints a timeline, recover finishes incomplete runs."""
    db = tmp_path / "runs.db"
    (tmp_path / "ordersapp.py").write_text(APP)
    with isolated_registry():
        saga = Saga("orders", store=SQLiteStore(db))
        saga.step("reserve", lambda ctx: {"reserved": ctx.input["n"]})
        saga.step("charge", lambda ctx: (_ for _ in ()).throw(RuntimeError("declined")))
        failed = saga.run({"n": 1}, key="order-1")
    listing = cli("--db", str(db), "list", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "orders" in listing.stdout and "failed" in listing.stdout
    assert "order-1" in listing.stdout
    as_json = json.loads(cli("--db", str(db), "list", "--json", cwd=tmp_path).stdout)
    assert as_json[0]["run_id"] == failed.run_id
    shown = cli("--db", str(db), "show", failed.run_id[:8], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for event in ("started", "completed", "failed", "compensating"):
        assert event in shown.stdout
    assert "RuntimeError: declined" in shown.stdout
    assert cli("--db", str(db), "show", "nope", cwd=tmp_path).returncode == 1
    # An incomplete run (a process that died after creating it) is recovered.
    store = SQLiteStore(db)
    from buttress.backends import RunRecord

    store.create_run(RunRecord("dead-run", "orders", "running", {"n": 2}, owner="gone:1:x"))
    store.close()
    recovered = cli("--db", str(db), "recover", "--app", "ordersapp:make", cwd=tmp_path)
    assert recovered.returncode == 0, recovered.stderr
    assert "dead-run  completed" in recovered.stdout
    status = cli("--db", str(db), "list", "--status", "completed", cwd=tmp_path)
    assert "dead-run"[:8] in status.stdout


def test_empty_log_and_bad_app(tmp_path):
    """An empty log says so; a malformed --app is a usage error."""
    db = tmp_path / "empty.db"
    assert cli("--db", str(db), "list", cwd=tmp_path).returncode == 1  # no such file
    SQLiteStore(db).close()
    assert cli("--db", str(db), "list", cwd=tmp_path).stdout.strip() == "no runs"
    assert cli("--db", str(db), "recover", "--app", "nocolon", cwd=tmp_path).returncode == 2
