"""`python -m buttress demo`: runs end to end, plain off a terminal, live on one."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from buttress.demo import Settings, colour_wanted
from buttress.demo.shop import Checkout
from buttress.registry import Registry

TOOK = r"[\d.]+m?s"  # a duration as the demo prints it: 41ms, 1.20s
DEMO = [sys.executable, "-m", "buttress", "demo", "--seconds", "1.5", "--seed", "7"]


def _env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the demo's saga keeps its run log (instead of the system's temp directory)."""
    return tmp_path_factory.mktemp("demo")


def _tmp_env(tmp: Path) -> dict[str, str]:
    return {"TMPDIR": str(tmp), "TEMP": str(tmp), "TMP": str(tmp)}


@pytest.fixture(scope="module")
def plain(tmp: Path) -> subprocess.CompletedProcess[str]:
    """One plain run of the demo, shared by the tests that read its output."""
    return subprocess.run(
        [*DEMO, "--no-color"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=30,
        env=_env(NO_COLOR=None, PYTHONIOENCODING="utf-8", **_tmp_env(tmp)),
        check=False,
    )


def _json_after(output: str, title: str) -> dict[str, Any]:
    start = output.index("{", output.index(title))
    value, _ = json.JSONDecoder().raw_decode(output, start)
    assert isinstance(value, dict)
    return value


def _summary(output: str) -> str:
    """The final summary: from its header ("finished in") to the saga section."""
    start = output.rindex("\n", 0, output.index("finished in"))
    return output[start : _saga_start(output)]


def _saga_start(output: str) -> int:
    """Where the saga section starts (its title line)."""
    match = re.search(r"^\S{3} payment saga \S{3}$", output, re.M)
    assert match is not None, "no saga section"
    return match.start()


def _saga_runs(output: str) -> dict[int, str]:
    """The saga section's runs: the lines of each, by number."""
    section = output[_saga_start(output) : output.index("registry.health()")]
    section = section[: section.index("\nSERVICES")]
    parts = re.split(r"^RUN (\d) ", section, flags=re.M)
    return {int(number): text for number, text in zip(parts[1::2], parts[2::2], strict=True)}


def _run_id(run: str) -> str:
    match = re.search(r"^\s+run_id=([0-9a-f]{32})\b", run, re.M)
    assert match is not None, run
    return match[1]


def _count(summary: str, pattern: str) -> int:
    match = re.search(pattern, summary)
    assert match is not None, f"{pattern!r} not in the summary"
    return int(match[1].replace(",", ""))


def test_plain_run_exits_cleanly_without_escape_codes(
    plain: subprocess.CompletedProcess[str],
) -> None:
    """Off a terminal the demo exits 0 and prints no ANSI escape codes at all."""
    assert plain.returncode == 0, plain.stderr
    assert plain.stderr == ""
    assert "\x1b" not in plain.stdout


def test_plain_run_prints_a_progress_line_per_second(
    plain: subprocess.CompletedProcess[str],
) -> None:
    """Off a terminal the live view is one plain progress line per second."""
    progress = re.findall(r"^\[\s*\d+\.\ds\] \w+\s+\| checkouts \d+", plain.stdout, re.M)
    assert 1 <= len(progress) <= 3


def test_summary_shows_every_section(plain: subprocess.CompletedProcess[str]) -> None:
    """The summary has the checkout, retry, breaker, bulkhead, limiter and rejection sections."""
    for section in (
        "CHECKOUTS",
        "RETRY",
        "BREAKER",
        "BULKHEAD",
        "LIMITER",
        "REJECTIONS",
        "TIMEOUTS",
        "HEALTH",
        "TIMELINE",
        "SAGA",
        "SERVICES",
        "RUN LOG",
        "registry.health()",
        "registry.state()",
    ):
        assert section in plain.stdout


def test_summary_numbers_add_up(plain: subprocess.CompletedProcess[str]) -> None:
    """Every checkout ends one way, and the outage opens the breaker at least once."""
    out = _summary(plain.stdout)
    started = _count(out, r"CHECKOUTS\s+started ([\d,]+)")
    line = re.search(
        r"^\s+ok ([\d,]+) \S declined ([\d,]+) \S fallback ([\d,]+) \S failed ([\d,]+)", out, re.M
    )
    assert line is not None
    outcomes = [int(n.replace(",", "")) for n in line.groups()]
    assert started > 0
    assert sum(outcomes) == started
    assert outcomes[0] > 0
    assert _count(out, r"in progress ([\d,]+)") == 0
    assert _count(out, r"opened ([\d,]+)") >= 1
    assert re.search(r"closed\s+(→|->)\s+open\s+failure rate reached", out)
    assert _count(out, r"retries ([\d,]+)") > 0


def test_listener_counts_match_state(plain: subprocess.CompletedProcess[str]) -> None:
    """The counts the listener gathered from events agree with registry.state()."""
    out = _summary(plain.stdout)
    state = _json_after(plain.stdout, "registry.state()")
    breaker = state["circuit_breaker"]["payments"]
    bulkhead = state["bulkhead"]["payments"]
    limiter = state["rate_limiter"]["payments"]
    assert breaker["calls"] > 0
    assert breaker["rejections"] == _count(out, r"circuit open ([\d,]+)") > 0
    assert limiter["rejected"] == _count(out, r"rate limited ([\d,]+)")
    assert bulkhead["rejected"] == _count(out, r"bulkhead full ([\d,]+)") + _count(
        out, r"bulkhead wait ([\d,]+)"
    )
    assert state["retry"]["payments"]["retries"] == _count(out, r"retries ([\d,]+)")
    assert state["fallback"]["payments"]["used"] == _count(out, r"fallback ([\d,]+)")
    assert state["timeout"]["attempt"]["timeouts"] == _count(out, r"attempt [\d.]+s ([\d,]+)")
    assert bulkhead["in_flight"] == bulkhead["queued"] == 0


def test_health_is_printed_as_json(plain: subprocess.CompletedProcess[str]) -> None:
    """The run ends with the registry's health report, one check per named primitive."""
    health = _json_after(plain.stdout, "registry.health()")
    assert health["status"] in {"pass", "warn", "fail"}
    assert {
        "payments:circuit_breaker",
        "payments:bulkhead",
        "payments:rate_limiter",
        "payments:retry",
    } <= set(health["checks"])


def test_saga_runs_complete_compensate_and_replay(
    plain: subprocess.CompletedProcess[str],
) -> None:
    """The saga section shows three runs: completed; declined and compensated; replayed."""
    runs = _saga_runs(plain.stdout)
    assert sorted(runs) == [1, 2, 3]
    step = rf"^\s+\+\s*{TOOK}\s+{{name}}\s+{TOOK}\s+{{status}}\s+{{attempts}} attempts?\b"

    first = runs[1]
    assert re.search(r"^\s+\S completed \S compensated=False \S replayed=False\b", first, re.M)
    for name in ("reserve-stock", "charge-card", "send-email"):
        assert re.search(step.format(name=name, status="completed", attempts=r"\d"), first, re.M)
    # The gateway answered 503 first: charge-card took several attempts, each shown.
    assert re.search(
        step.format(name="charge-card", status="completed", attempts="[23]"), first, re.M
    )
    assert re.search(rf"^\s+\+\s*{TOOK}\s+attempt 1\s+{TOOK}\s+GatewayError: 503", first, re.M)
    assert not re.search(r"^\s+error ", first, re.M)

    second = runs[2]
    assert re.search(r"^\s+\S failed \S compensated=True \S replayed=False\b", second, re.M)
    assert re.search(
        step.format(name="reserve-stock", status="compensated", attempts="1"), second, re.M
    )
    assert re.search(
        step.format(name="charge-card", status="failed", attempts=r"\d") + r".*CardDeclined",
        second,
        re.M,
    )
    assert re.search(r"^\s+send-email\s+not run$", second, re.M)
    assert re.search(rf"^\s+\+\s*{TOOK}\s+\S+ release-stock\s+{TOOK}\s+compensated\b", second, re.M)
    assert "refund" not in second  # the charge never went through: nothing to refund
    assert re.search(r"^\s+error CardDeclined: ", second, re.M)
    assert _run_id(second) != _run_id(first)

    third = runs[3]
    assert re.search(r"^\s+\S completed \S compensated=False \S replayed=True$", third, re.M)
    assert _run_id(third) == _run_id(first)
    assert "(same as run 1)" in third
    assert "no step ran" in third
    assert "(0 calls to the services" in third
    assert not re.search(rf"^\s+\+\s*{TOOK}", third, re.M)  # no step timeline: nothing ran


def test_saga_state_and_health_include_the_saga(
    plain: subprocess.CompletedProcess[str],
) -> None:
    """The saga joined the demo's registry: state() counts its runs, health() checks it."""
    saga = _json_after(plain.stdout, "registry.state()")["saga"]["checkout"]
    assert saga["steps"] == ["reserve-stock", "charge-card", "send-email"]
    assert saga["store"] == "SQLiteStore"
    assert (saga["completed"], saga["failed"], saga["running"], saga["stuck"]) == (1, 1, 0, 0)
    health = _json_after(plain.stdout, "registry.health()")
    assert health["checks"]["checkout:saga"][0]["status"] == "pass"


def test_saga_run_log_is_kept_and_inspectable(
    plain: subprocess.CompletedProcess[str], tmp: Path
) -> None:
    """The SQLite run log stays where the demo says, and `runs list` reads it."""
    commands = re.findall(r"python -m buttress runs --db (\S+) list", plain.stdout)
    assert commands, "no `runs ... list` command printed"
    db = Path(commands[-1])
    assert db.is_file()
    assert db.parent.parent == tmp  # in a temporary directory of its own
    listing = subprocess.run(
        [sys.executable, "-m", "buttress", "runs", "--db", str(db), "list", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    runs = json.loads(listing.stdout)
    assert sorted(run["status"] for run in runs) == ["completed", "failed"]  # no third: a replay
    runs_by_status = {run["status"]: run["run_id"] for run in runs}
    printed = _saga_runs(plain.stdout)
    assert runs_by_status["completed"] == _run_id(printed[1])
    assert runs_by_status["failed"] == _run_id(printed[2])


def test_saga_orders_follow_the_seed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The same --seed makes the same orders and the same gateway trouble; another differs."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def plan(seed: int) -> list[Any]:
        checkout = Checkout(Settings(seed=seed), Registry())
        try:
            return [(run.order, run.key) for run in checkout.runs] + [checkout.shop.outages]
        finally:
            checkout.close()

    assert plan(7) == plan(7)
    assert plan(7) != plan(8)


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX only")
def test_terminal_run_redraws_in_colour(tmp: Path) -> None:
    """On a terminal the view is coloured, redrawn in place, and the cursor comes back."""
    import pty

    primary, secondary = pty.openpty()
    env = _env(NO_COLOR=None, TERM="xterm-256color", COLUMNS="100", LINES="40", **_tmp_env(tmp))
    with subprocess.Popen(DEMO, stdout=secondary, stderr=subprocess.PIPE, env=env) as proc:
        os.close(secondary)
        chunks = []
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:  # the demo closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.stderr is not None
        stderr = proc.stderr.read()
    os.close(primary)
    output = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, stderr
    assert "\x1b[?25l" in output  # cursor hidden while redrawing...
    assert "\x1b[?25h" in output  # ...and shown again
    assert re.search(r"\x1b\[\d+A", output)  # back up over the previous frame
    assert "\x1b[32m" in output
    assert "registry.state()" in output
    plain_output = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    assert "payment saga" in plain_output
    assert "replayed=True" in plain_output
    assert "\x1b[1;31m\u25cf failed\x1b[0m" in output  # the declined run, in red
    assert not re.search(r"^\[\s*\d+\.\ds\] ", output, re.M)  # no plain progress lines


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_and_never_with_no_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Colour needs a terminal, and NO_COLOR, --no-color or TERM=dumb turn it off."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("WT_SESSION", "1")
    assert colour_wanted(_Tty(), no_color=False)
    assert not colour_wanted(io.StringIO(), no_color=False)
    assert not colour_wanted(_Tty(), no_color=True)
    monkeypatch.setenv("NO_COLOR", "1")
    assert not colour_wanted(_Tty(), no_color=False)
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    assert not colour_wanted(_Tty(), no_color=False)


def test_no_command_prints_help_and_exits_2() -> None:
    """`python -m buttress` with no command prints the help and exits 2."""
    result = subprocess.run(
        [sys.executable, "-m", "buttress"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert "demo" in result.stderr
    assert "usage:" in result.stderr


def test_demo_help_works() -> None:
    """`python -m buttress demo --help` describes the options and exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "buttress", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    for option in ("--seconds", "--callers", "--seed", "--no-color"):
        assert option in result.stdout


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "soon"])
def test_bad_seconds_are_refused(seconds: str) -> None:
    """A --seconds that is not a sensible duration is a usage error (exit 2)."""
    from buttress.__main__ import main

    with pytest.raises(SystemExit) as exc_info:
        main(["demo", "--seconds", seconds])
    assert exc_info.value.code == 2


# -- the timeline chart (--plot) -----------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_png_of_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``demo --plot FILE`` runs the demo as usual and also writes a PNG timeline there."""
    pytest.importorskip("matplotlib")
    from buttress.__main__ import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    chart = tmp_path / "timeline.png"
    status = main(["demo", "--seconds", "1", "--seed", "3", "--no-color", "--plot", str(chart)])
    out = capsys.readouterr().out
    assert status == 0
    assert f"timeline chart written to {chart}" in out
    data = chart.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 1000 and height > 800  # a full figure, not an empty canvas
    assert "registry.health()" in out  # the rest of the demo still ran


def test_plot_without_matplotlib_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without matplotlib, ``--plot`` fails at once (exit 2) and says what to install."""
    from buttress.__main__ import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    chart = tmp_path / "timeline.png"
    status = main(["demo", "--seconds", "1", "--no-color", "--plot", str(chart)])
    captured = capsys.readouterr()
    assert status == 2
    assert "pip install matplotlib" in captured.err
    assert captured.out == ""  # refused before the demo started
    assert not chart.exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("bad.txt", "'.txt' is not an image format"),
        ("chart", "no extension is not an image format"),
        ("missing/timeline.png", "does not exist"),
    ],
)
def test_a_bad_plot_path_is_refused_before_the_run(
    name: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A format matplotlib cannot write or a folder that does not exist fails at once
    with one line (exit 2), before the demo starts: no traceback after a whole run."""
    pytest.importorskip("matplotlib")
    from buttress.__main__ import main

    status = main(["demo", "--seconds", "1", "--no-color", "--plot", str(tmp_path / name)])
    captured = capsys.readouterr()
    assert status == 2
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == ""


def test_breaker_spans_cover_the_run_in_order() -> None:
    """The chart's breaker bands follow the transitions and cover 0..end without gaps."""
    from buttress.demo.plot import breaker_spans
    from buttress.demo.scenario import Transition

    transitions = [
        Transition(1.0, "closed", "open", "failure_rate"),
        Transition(1.5, "open", "half_open", "reset_timeout"),
        Transition(1.6, "half_open", "closed", "probes_succeeded"),
    ]
    spans = breaker_spans(transitions, 3.0)
    assert spans == [
        (0.0, 1.0, "closed"),
        (1.0, 1.5, "open"),
        (1.5, 1.6, "half_open"),
        (1.6, 3.0, "closed"),
    ]
    assert breaker_spans([], 2.0) == [(0.0, 2.0, "closed")]


def test_per_second_counts_each_bin() -> None:
    """Event times become a rate per bin; times outside the bins are ignored."""
    from buttress.demo.plot import per_second

    edges = [0.0, 0.5, 1.0]
    assert per_second([0.1, 0.2, 0.7, 5.0, -1.0], edges) == [4.0, 2.0]
