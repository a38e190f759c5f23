"""``python -m buttress runs``: list, show and recover a SQLite or PostgreSQL run log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from buttress import Saga
from buttress.backends import RunRecord
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


def test_show_json(tmp_path):
    """show --json prints the record, the whole log and the stored report."""
    db = tmp_path / "runs.db"
    with isolated_registry():
        saga = Saga("orders", store=SQLiteStore(db))
        saga.step("reserve", lambda ctx: {"reserved": ctx.input["n"]})
        done = saga.run({"n": 3})
        saga.store.close()
    shown = cli("--db", str(db), "show", done.run_id, "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["run_id"] == done.run_id and data["status"] == "completed"
    assert [(e["step"], e["event"]) for e in data["log"]] == [
        ("reserve", "started"),
        ("reserve", "completed"),
    ]
    assert data["log"][1]["output"] == {"reserved": 3}
    assert data["result"]["status"] == "completed"


def test_schema_needs_a_postgres_url(tmp_path):
    """--schema with a SQLite path is a usage error, before anything is opened."""
    db = tmp_path / "runs.db"
    result = cli("--db", str(db), "--schema", "shop", "list", cwd=tmp_path)
    assert result.returncode == 2
    assert "--schema only applies" in result.stderr
    assert not db.exists()


# -- PostgreSQL ---------------------------------------------------------------------------

PG_APP = """
from buttress import Saga
from buttress.backends.postgres import PostgresStore


def make(url, schema):
    saga = Saga("orders", store=PostgresStore(url, schema=schema))
    saga.step("reserve", lambda ctx: {"reserved": ctx.input["n"]},
              compensate=lambda ctx: None)
    saga.step("charge", lambda ctx: "paid")
    return saga


def make_fixed(url):
    return Saga("orders", store=PostgresStore(url, schema="somewhere_else"))
"""


def _declined(ctx):
    raise RuntimeError("declined")


@pytest.fixture
def pg_log(postgres_url, postgres_schema):
    """A PostgreSQL run log holding one completed and one failed run of "orders"."""
    from buttress.backends.postgres import PostgresStore

    store = PostgresStore(postgres_url, schema=postgres_schema)
    with isolated_registry():
        good = Saga("orders", store=store)
        good.step("reserve", lambda ctx: {"reserved": ctx.input["n"]})
        completed = good.run({"n": 1}, key="order-1")
    with isolated_registry():
        bad = Saga("orders", store=store)
        bad.step("reserve", lambda ctx: {"reserved": ctx.input["n"]})
        bad.step("charge", _declined)
        failed = bad.run({"n": 2}, key="order-2")
    yield store, completed, failed
    store.close()


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_postgres_list_and_show(tmp_path, postgres_url, postgres_schema, pg_log, scheme):
    """A postgresql:// (or postgres://) --db with --schema lists and shows its runs."""
    _, completed, failed = pg_log
    url = scheme + "://" + postgres_url.split("://", 1)[1]
    db = ("--db", url, "--schema", postgres_schema)
    listing = cli(*db, "list", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "order-1" in listing.stdout and "order-2" in listing.stdout
    assert "completed" in listing.stdout and "failed" in listing.stdout
    as_json = json.loads(cli(*db, "list", "--json", "--status", "failed", cwd=tmp_path).stdout)
    assert [r["run_id"] for r in as_json] == [failed.run_id]
    assert as_json[0]["input"] == {"n": 2} and as_json[0]["key"] == "order-2"
    shown = cli(*db, "show", failed.run_id[:8], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for event in ("started", "completed", "failed", "compensating"):
        assert event in shown.stdout
    assert "RuntimeError: declined" in shown.stdout
    data = json.loads(cli(*db, "show", completed.run_id, "--json", cwd=tmp_path).stdout)
    assert data["status"] == "completed" and data["log"][-1]["output"] == {"reserved": 1}
    assert cli(*db, "show", "nope", cwd=tmp_path).returncode == 1


def test_postgres_missing_schema_is_not_created(tmp_path, postgres_url, postgres_schema):
    """Listing a schema without buttress tables says so and creates nothing."""
    from buttress.backends.postgres import PostgresStore

    result = cli("--db", postgres_url, "--schema", postgres_schema, "list", cwd=tmp_path)
    assert result.returncode == 1
    assert f"no run log in schema {postgres_schema!r}" in result.stderr
    probe = PostgresStore(postgres_url, schema=postgres_schema, create_schema=False)
    try:
        assert probe.schema_version() is None
    finally:
        probe.close()
    bad = cli("--db", postgres_url, "--schema", "no-such; schema", "list", cwd=tmp_path)
    assert bad.returncode == 2 and "schema must be a plain identifier" in bad.stderr


def test_postgres_unreachable(tmp_path):
    """A server that does not answer is an error message, not a traceback."""
    result = cli("--db", "postgresql://postgres@127.0.0.1:1/test", "list", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: PostgreSQL store")
    assert "Traceback" not in result.stderr


def test_postgres_recover(tmp_path, postgres_url, postgres_schema, pg_log):
    """recover hands the factory the URL and schema=, and finishes the abandoned runs."""
    store, _, _ = pg_log
    (tmp_path / "pgapp.py").write_text(PG_APP)
    store.create_run(RunRecord("dead-run", "orders", "running", {"n": 3}, owner="gone:1:x"))
    db = ("--db", postgres_url, "--schema", postgres_schema)
    recovered = cli(*db, "recover", "--app", "pgapp:make", cwd=tmp_path)
    assert recovered.returncode == 0, recovered.stderr
    assert "dead-run  completed" in recovered.stdout
    assert "recovered 1 run(s) of saga 'orders'" in recovered.stdout
    loaded = store.load("dead-run")
    assert loaded is not None and loaded[0].status == "completed"
    # A factory that ignores --schema is refused rather than recovering another schema.
    wrong = cli(*db, "recover", "--app", "pgapp:make_fixed", cwd=tmp_path)
    assert wrong.returncode == 2
    assert "'somewhere_else'" in wrong.stderr


def test_version_flag_prints_the_installed_version() -> None:
    """`python -m buttress --version` and `buttress.__version__` agree with the metadata."""
    import subprocess
    import sys
    from importlib.metadata import version

    import buttress

    shown = subprocess.run(
        [sys.executable, "-m", "buttress", "--version"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert shown == f"buttress {version('buttress')}" == f"buttress {buttress.__version__}"


WAITS_APP = """
from buttress import Saga
from buttress.backends.sqlite import SQLiteStore


def make(db):
    store = SQLiteStore(db)
    ship = Saga("ship", store=store, version="s1")
    ship.step("label", lambda ctx: "L", compensate=lambda ctx: print("label voided"))
    saga = Saga("expense", store=store, version="v1")
    saga.step("submit", lambda ctx: "sent", compensate=lambda ctx: print("withdrawn"))
    saga.step("nap", lambda ctx: ctx.sleep(0))
    saga.step("decision", lambda ctx: ctx.wait_for("decision", timeout=3600))
    saga.child("ship", ship)
    saga.step("beat", lambda ctx: ctx.heartbeat({"done": 1}))
    saga.step("wait-again", lambda ctx: ctx.wait_for("final"))
    return saga
"""


def test_signal_show_list_and_cancel_waiting_runs(tmp_path):
    """runs signal resumes (with --app) or makes due (without); show displays the waits,
    signals, heartbeats and children; list shows versions; cancel compensates."""
    db = tmp_path / "runs.db"
    (tmp_path / "waitsapp.py").write_text(WAITS_APP)
    sys.path.insert(0, str(tmp_path))
    try:
        import waitsapp
    finally:
        sys.path.remove(str(tmp_path))
    with isolated_registry():
        saga = waitsapp.make(str(db))
        first = saga.run()
        second = saga.run()
        saga.store.close()
    assert first.waiting and second.waiting
    listing = cli("--db", str(db), "list", "--status", "waiting", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "v1" in listing.stdout and "for 'decision'" in listing.stdout
    # Without --app the signal is stored and the run made due.
    sent = cli(
        "--db", str(db), "signal", first.run_id[:10], "decision", '{"ok": true}', cwd=tmp_path
    )
    assert sent.returncode == 0, sent.stderr
    assert "due now" in sent.stdout
    # With --app the run is resumed here, up to its next wait.
    resumed = cli(
        "--db",
        str(db),
        "signal",
        second.run_id,
        "decision",
        "1",
        "--app",
        "waitsapp:make",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "is now waiting" in resumed.stdout
    shown = cli("--db", str(db), "show", second.run_id, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for text in (
        "version  v1",
        "sleep",
        "wait",
        "received",
        "'decision' #",
        "heartbeat",
        '{"done": 1}',
        f"{second.run_id}/ship (completed)",
        "parked",
        "consumed",
    ):
        assert text in shown.stdout, text
    as_json = json.loads(cli("--db", str(db), "show", second.run_id, "--json", cwd=tmp_path).stdout)
    assert as_json["version"] == "v1" and as_json["waiting_for"] == "final"
    assert as_json["children"] == [f"{second.run_id}/ship"]
    assert [s["state"] for s in as_json["signals"]] == ["consumed", "child ended"]
    # Bad input is refused.
    assert (
        cli("--db", str(db), "signal", second.run_id, "decision", "{oops", cwd=tmp_path).returncode
        == 2
    )
    assert cli("--db", str(db), "signal", "nope", "decision", cwd=tmp_path).returncode == 1
    reserved = cli("--db", str(db), "signal", second.run_id, "buttress.cancel", cwd=tmp_path)
    assert reserved.returncode == 2
    # Cancel: the child first, then the parent's completed steps.
    cancelled = cli(
        "--db", str(db), "cancel", second.run_id, "--app", "waitsapp:make", cwd=tmp_path
    )
    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancelled: failed, compensated=True" in cancelled.stdout
    assert cancelled.stdout.index("label voided") < cancelled.stdout.index("withdrawn")
    again = cli("--db", str(db), "cancel", second.run_id, "--app", "waitsapp:make", cwd=tmp_path)
    assert again.returncode == 2 and "has ended" in again.stderr
