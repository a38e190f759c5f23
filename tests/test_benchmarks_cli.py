"""`python -m benchmarks`: plug-in sections reach the console, the docs page, the charts
and the quick-mode verdict; absent or broken sections are skipped, not fatal.

Only stub sections run here (no timing loops), so these tests take well under a second
each; the real figures are the benchmark run's business, never a test's.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) leaves the root out
    sys.path.insert(0, str(ROOT))

from benchmarks import __main__ as bench  # noqa: E402


class StubReport:
    """A section's report, as the protocol in benchmarks/__main__.py describes it."""

    def __init__(self, quick: bool, failing: bool, mention_chart: bool) -> None:
        self.quick = quick
        self.failing = failing
        self.mention_chart = mention_chart
        self.factors: list[float] = []

    def console(self) -> str:
        return f"STUB TABLE (quick={self.quick})"

    def markdown(self) -> str:
        text = "## Stub section\n\nMeasured nothing, quickly.\n"
        if self.mention_chart:
            text += "\n![the stub's own link](img/benchmarks/stub.png)\n"
        return text

    def failures(self, factor: float) -> list[str]:
        self.factors.append(factor)
        return ["stub: 3.0x its target"] if self.failing else []

    def charts(self, directory: Path) -> list[Path]:
        path = directory / "stub.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n")  # the plumbing only cares about the file
        return [path]


def _stub_module(name: str, **options: Any) -> types.ModuleType:
    module = types.ModuleType(f"benchmarks.{name}")
    module.reports = []  # type: ignore[attr-defined]

    def measure(quick: bool) -> StubReport:
        report = StubReport(
            quick, options.get("failing", False), options.get("mention_chart", False)
        )
        module.reports.append(report)  # type: ignore[attr-defined]
        return report

    module.measure = measure  # type: ignore[attr-defined]
    return module


def _broken_module(name: str) -> types.ModuleType:
    module = types.ModuleType(f"benchmarks.{name}")

    def measure(quick: bool) -> StubReport:
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    module.measure = measure  # type: ignore[attr-defined]
    return module


@pytest.fixture
def docs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A docs folder of our own: the run writes its page and charts there."""
    folder = tmp_path / "docs"
    monkeypatch.setattr(bench, "DOCS", folder / "benchmarks.md")
    monkeypatch.setattr(bench, "IMAGES", folder / "img" / "benchmarks")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return folder


def _install(monkeypatch: pytest.MonkeyPatch, **modules: types.ModuleType) -> None:
    monkeypatch.setattr(bench, "PLUGINS", (*modules, "absent_section"))
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, f"benchmarks.{name}", module)


def test_plugin_section_reaches_console_docs_and_charts(
    docs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A present section's console(), markdown() and charts() all land; its chart is linked
    from the page although its Markdown does not mention it; stale charts are removed."""
    pytest.importorskip("matplotlib")
    stub = _stub_module("stub_section")
    _install(monkeypatch, stub_section=stub, broken_section=_broken_module("broken_section"))
    stale = docs / "img" / "benchmarks" / "gone.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")

    status = bench.main(["--only", "stub_section,broken_section,absent_section", "--write-docs"])

    out = capsys.readouterr().out
    assert status == 0
    assert stub.reports[0].quick is False
    assert "STUB TABLE (quick=False)" in out
    assert "skipped section absent_section: no benchmarks/absent_section.py" in out
    assert "skipped section broken_section: ConnectionError: Error 111" in out
    page = (docs / "benchmarks.md").read_text(encoding="utf-8")
    assert "## Stub section\n\nMeasured nothing, quickly." in page
    assert "](img/benchmarks/stub.png)" in page
    assert "`broken_section`: skipped (ConnectionError" in page
    assert "`absent_section`: skipped" in page
    assert (docs / "img" / "benchmarks" / "stub.png").is_file()
    assert not stale.exists()


def test_a_chart_the_section_links_itself_is_not_linked_twice(
    docs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """When the section's Markdown already shows its chart, the page does not add it again."""
    pytest.importorskip("matplotlib")
    _install(monkeypatch, stub_section=_stub_module("stub_section", mention_chart=True))
    assert bench.main(["--only", "stub_section", "--write-docs"]) == 0
    page = (docs / "benchmarks.md").read_text(encoding="utf-8")
    assert page.count("stub.png") == 1


def test_quick_mode_fails_on_a_section_regression(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quick asks each section for failures at twice the target and exits 1 on any."""
    stub = _stub_module("stub_section", failing=True)
    _install(monkeypatch, stub_section=stub)
    assert bench.main(["--quick", "--only", "stub_section"]) == 1
    out = capsys.readouterr().out
    assert stub.reports[0].quick is True
    assert stub.reports[0].factors == [bench.QUICK_FACTOR]
    assert "REGRESSION: above 2x the target:\n  stub: 3.0x its target" in out


def test_quick_mode_passes_and_skips_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fine section passes; an absent module or a section whose service is down does not
    fail the quick run (they are reported as skipped)."""
    _install(
        monkeypatch,
        stub_section=_stub_module("stub_section"),
        broken_section=_broken_module("broken_section"),
    )
    status = bench.main(["--quick", "--only", "stub_section,broken_section,absent_section"])
    captured = capsys.readouterr()
    assert status == 0
    assert "quick check passed" in captured.out
    assert "skipped section broken_section" in captured.out
    assert "ConnectionError" in captured.err  # the traceback, for whoever owns the section


def test_a_module_that_cannot_import_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A section whose optional dependency is missing is skipped with the import error."""
    import benchmarks

    (tmp_path / "needs_redis.py").write_text("import not_installed_anywhere_xyz\n")
    monkeypatch.setattr(benchmarks, "__path__", [*benchmarks.__path__, str(tmp_path)])
    monkeypatch.setattr(bench, "PLUGINS", ("needs_redis",))
    assert bench.main(["--quick", "--only", "needs_redis"]) == 0
    out = capsys.readouterr().out
    assert (
        "skipped section needs_redis: cannot import it: ModuleNotFoundError: "
        "No module named 'not_installed_anywhere_xyz'" in out
    )


def test_unknown_section_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """--only names sections: built-in ones and the plug-ins; anything else is an error."""
    monkeypatch.setattr(bench, "PLUGINS", ("stub_section",))
    assert bench.parse(["--only", "overhead,stub_section"]).sections == [
        "overhead",
        "stub_section",
    ]
    with pytest.raises(SystemExit) as exc:
        bench.parse(["--only", "nonsense"])
    assert exc.value.code == 2


def _group_with(buttress_ns: float, floor_ns: float | None) -> Any:
    from benchmarks._harness import BUTTRESS, FLOOR, Candidate, Group, Result, Target

    def make() -> Any:
        return lambda x: x

    group = Group("g", "stub (sync)", False, [], target=Target("ns", 200))
    group.results.append(Result(Candidate("mine", BUTTRESS, make), overhead=buttress_ns))
    if floor_ns is not None:
        group.results.append(Result(Candidate("floor", FLOOR, make), overhead=floor_ns))
    return group


@pytest.mark.parametrize(
    ("buttress_ns", "floor_ns", "within"),
    [
        (390, 100, True),  # within twice the target
        (410, 100, False),  # twice the target, on a machine as fast as the reference
        (410, None, False),  # no floor to scale by
        (590, 620, True),  # a slow machine: the floor itself is above the target
        (1300, 620, False),  # a slow machine and a real regression
    ],
)
def test_the_guard_scales_a_nanosecond_target_by_the_floor_of_the_run(
    buttress_ns: float, floor_ns: float | None, within: bool
) -> None:
    from benchmarks._harness import verdict

    v = verdict(_group_with(buttress_ns, floor_ns))
    assert v is not None
    assert v.within(2.0) is within
    assert v.passed is False  # the report's PASS/MISS still uses the target alone


def test_a_slower_machine_stretches_nanosecond_targets_but_not_ratios() -> None:
    from benchmarks._harness import BUTTRESS, PART, Candidate, Group, Result, Target, verdict

    v = verdict(_group_with(600, None))
    assert v is not None
    assert not v.within(2.0)
    assert v.within(2.0, slowdown=1.5)
    assert not v.within(2.0, slowdown=0.5)  # a faster machine never tightens the guard

    def make() -> Any:
        return lambda x: x

    ratio = Group("p", "pipeline", False, [], target=Target("ratio", 1.1, "sum of parts"))
    ratio.results += [
        Result(Candidate("mine", BUTTRESS, make), overhead=300),
        Result(Candidate("part", PART, make), overhead=100),
    ]
    rv = verdict(ratio)
    assert rv is not None
    assert not rv.within(2.0, slowdown=5.0)  # a ratio is measured on one machine already


def test_machine_slowdown_is_never_below_one() -> None:
    from benchmarks._harness import machine_slowdown

    assert machine_slowdown() >= 1.0
