"""``python -m benchmarks``: run the whole suite in one process and print the tables.

Options:

- ``--quick``: fewer and shorter repeats, shorter accuracy, fairness and memory
  runs, and every section's quick mode (well under a minute in all). Exits with
  status 1 if any buttress primitive's overhead is more than twice its target (a
  group above that is re-measured (up to 3 times) first, so one noisy repeat cannot fail the
  build), or if a section reports a figure more than twice its target. Absolute
  targets were set on one machine: on a slower one (timed by a fixed calibration
  workload) they stretch in proportion, and a figure within twice its group's
  hand-written floor, measured in the same run, passes too.
- ``--write-docs``: after the run, rewrite ``docs/benchmarks.md`` and its charts
  (``docs/img/benchmarks/*.png``) from its figures.
- ``--charts DIR``: write the PNG charts into DIR (without touching the docs).
- ``--only overhead,accuracy,...``: run a subset (for development).

Section plug-ins: besides the built-in sections, a module ``benchmarks/<name>.py``
listed in ``PLUGINS`` runs as a section when it exists. It exposes
``measure(quick: bool) -> Report``, where the report has ``console() -> str``,
``markdown() -> str`` (starting with ``## Title``), ``failures(factor) -> list[str]``
and optionally ``charts(directory) -> list[Path]``. A chart the section's Markdown
does not mention by file name is appended to the end of its section. A module that
is absent, cannot be imported, or raises in ``measure`` (a service that is not
running, say) is reported as skipped; the rest of the run goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import accuracy, fairness, memory, overhead, report, sagas
from ._harness import Group, Settings, machine_slowdown, measure_async, measure_sync, verdict

FULL = Settings(repeats=7, seconds_per_repeat=0.05)
QUICK = Settings(repeats=5, seconds_per_repeat=0.01, collect_each=False)
CONFIRM = Settings(repeats=7, seconds_per_repeat=0.02, collect_each=False)

QUICK_FACTOR = 2.0  # --quick fails only above twice the target
CONFIRMATIONS = 3  # re-measurements of a group above the guard before it fails the run
QUICK_SECTION_BUDGET = 10.0  # seconds; a plug-in section slower in --quick is flagged
QUICK_TOTAL_BUDGET = 60.0
BUILTIN = ("overhead", "accuracy", "fairness", "memory", "sagas")
PLUGINS = (  # run when benchmarks/<name>.py exists
    "integrations",
    "client_aiohttp",
    "client_requests",
    "adaptive",
    "redis_backends",
    "saga_load",
    "client_grpc",
    "keyed_limiter",
    "contention",
    "scaling",  # last: it draws the series the sections before it measured
)
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
IMAGES = DOCS.parent / "img" / "benchmarks"


def all_sections() -> tuple[str, ...]:
    return BUILTIN + tuple(PLUGINS)


@dataclass
class PluginRun:
    """One plug-in section: its report, or why it was skipped."""

    name: str
    report: Any = None
    skipped: str | None = None
    seconds: float = 0.0
    charts: list[Path] = field(default_factory=list)

    def console(self) -> str:
        if self.report is None:
            return f"\n[{self.name}: skipped: {self.skipped}]"
        try:
            return "\n" + str(self.report.console()).rstrip()
        except Exception as exc:
            return f"\n[{self.name}: console() raised {_describe(exc)}]"

    def markdown(self, links: dict[Path, str]) -> str:
        if self.report is None:
            return ""
        try:
            text = str(self.report.markdown()).rstrip()
        except Exception as exc:
            return f"## {self.name}\n\n(markdown() raised {_describe(exc)})\n"
        extra = [
            f"![{self.name} chart{'' if chart.stem == self.name else ': ' + chart.stem}]"
            f"({links[chart]})\n"
            for chart in self.charts
            if chart in links and chart.name not in text
        ]
        return "\n\n".join([text, *extra]).rstrip() + "\n"

    def failures(self, factor: float) -> list[str]:
        if self.report is None:
            return []
        try:
            return [str(line) for line in self.report.failures(factor)]
        except Exception as exc:
            return [f"{self.name}: failures() raised {_describe(exc)}"]


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:160]


def gathered_series(plugins: list[PluginRun]) -> list[Any]:
    """The scaling points the sections measured (``scaling_series()`` on their reports)."""
    series: list[Any] = []
    for plugin in plugins:
        give = getattr(plugin.report, "scaling_series", None)
        if give is None:
            continue
        try:
            series.extend(give())
        except Exception as exc:
            print(f"[{plugin.name}: scaling_series() raised {_describe(exc)}]", file=sys.stderr)
    return series


def run_plugin(name: str, quick: bool, plugins: list[PluginRun] | None = None) -> PluginRun:
    """Import ``benchmarks.<name>`` lazily and measure it; never raises."""
    run = PluginRun(name)
    started = time.monotonic()
    module_name = f"{__package__ or 'benchmarks'}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            run.skipped = f"no benchmarks/{name}.py in this tree"
        else:
            run.skipped = f"cannot import it: {_describe(exc)}"
        return run
    except Exception as exc:
        run.skipped = f"cannot import it: {_describe(exc)}"
        return run
    measure = getattr(module, "measure", None)
    if not callable(measure):
        run.skipped = f"{module_name} has no measure(quick) function"
        return run
    try:
        if name == "scaling":
            run.report = measure(quick, gathered_series(plugins or []))
        else:
            run.report = measure(quick)
    except Exception as exc:
        run.skipped = _describe(exc)
        # The whole story on stderr, for whoever is working on that section.
        print(f"[{name}: measure() raised; skipped]", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
    run.seconds = time.monotonic() - started
    return run


def _measure(group: Group, settings: Settings) -> Group:
    if group.is_async:
        return asyncio.run(measure_async(group, settings))
    return measure_sync(group, settings)


def run_overhead(
    settings: Settings, quick: bool, slowdown: float = 1.0
) -> tuple[list[Group], list[str]]:
    groups = overhead.sync_groups() + overhead.async_groups()
    confirmed = []
    for group in groups:
        _measure(group, settings)
        if quick:
            # A regression is above the line every time; a noisy neighbour is not. A group
            # above it is measured again (at most CONFIRMATIONS times) before it can fail.
            for _ in range(CONFIRMATIONS):
                v = verdict(group)
                if v is None or v.within(QUICK_FACTOR, slowdown):
                    break
                print(
                    f"\n[{group.title}: {v.detail} is above {QUICK_FACTOR:g}x the target; "
                    "measuring again to confirm]"
                )
                _measure(group, CONFIRM)
                if group.title not in confirmed:
                    confirmed.append(group.title)
        report.print_group(group)
    return groups, confirmed


def parse(argv: list[str] | None) -> argparse.Namespace:
    sections = all_sections()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short run; CI regression guard")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help=f"rewrite {DOCS.relative_to(DOCS.parent.parent)} and its charts from this run",
    )
    parser.add_argument(
        "--charts", type=Path, default=None, metavar="DIR", help="write the PNG charts into DIR"
    )
    parser.add_argument(
        "--only",
        default=",".join(sections),
        help="comma-separated subset of: " + ", ".join(sections),
    )
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.sections) - set(sections)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    return args


def write_charts(data: report.RunData, plugins: list[PluginRun], directory: Path) -> list[Path]:
    """Every chart of the run into ``directory``; returns the files written."""
    from . import charts

    try:
        charts.pyplot()
    except ImportError:
        print("\n[charts skipped: matplotlib is not installed (pip install matplotlib)]")
        return []
    directory.mkdir(parents=True, exist_ok=True)
    footer = charts.Footer(
        report.machine(), report.versions(), data.mode, data.started, report.load_text(data)
    )
    written: dict[str, Path] = {}
    jobs: list[tuple[str, Any]] = [
        ("overhead", lambda: charts.overhead_charts(data.groups, directory, footer)),
        (
            "accuracy",
            lambda: {
                "accuracy": charts.accuracy_chart(data.accuracy, directory / "accuracy.png", footer)
            },
        ),
        (
            "sagas",
            lambda: {"sagas": charts.saga_chart(data.sagas, directory / "sagas.png", footer)},
        ),
    ]
    for what, job in jobs:
        try:
            made = job()
        except Exception as exc:
            print(f"[{what} charts failed: {_describe(exc)}]", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            continue
        written.update({k: v for k, v in made.items() if v is not None})
    data.charts = written
    files = list(written.values())
    for plugin in plugins:
        make = getattr(plugin.report, "charts", None)
        if make is None:
            continue
        try:
            plugin.charts = [Path(p) for p in make(directory)]
        except Exception as exc:
            print(f"[{plugin.name}: charts() raised {_describe(exc)}]", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            continue
        files += plugin.charts
    for path in files:
        print(f"chart: {path}")
    return files


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Sections that draw must never try to open a window.
    os.environ.setdefault("MPLBACKEND", "Agg")
    with warnings.catch_warnings():
        # Peers may warn (deprecations and the like); a benchmark run is not the place to fail.
        warnings.simplefilter("ignore")
        return run(args)


def run(args: argparse.Namespace) -> int:
    """The whole run for parsed ``args``; returns the exit status."""
    settings = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"
    started = time.monotonic()
    load_at_start = report.load_average()
    print(f"buttress benchmarks ({mode} run)")
    for key, value in report.machine():
        print(f"  {key}: {value}")
    print("  " + ", ".join(f"{name} {version}" for name, version in report.versions()))

    timings: dict[str, float] = {}

    def timed(name: str, since: float) -> None:
        timings[name] = time.monotonic() - since

    slowdown = 1.0
    if args.quick:
        # Absolute targets were set on one machine; a slower one gets proportional slack.
        slowdown = machine_slowdown()
        print(f"  machine speed: {slowdown:.2f}x the time of the machine the targets were set on")
    groups: list[Group] = []
    confirmed: list[str] = []
    if "overhead" in args.sections:
        t = time.monotonic()
        groups, confirmed = run_overhead(settings, args.quick, slowdown)
        timed("overhead", t)
    acc = []
    if "accuracy" in args.sections:
        t = time.monotonic()
        acc = accuracy.run_all(0.6 if args.quick else 2.0)
        report.print_accuracy(acc)
        timed("accuracy", t)
    fair = []
    if "fairness" in args.sections:
        t = time.monotonic()
        fair = fairness.run_all(0.6 if args.quick else 2.0)
        report.print_fairness(fair)
        timed("fairness", t)
    mem = None
    if "memory" in args.sections:
        t = time.monotonic()
        mem = memory.measure(20_000 if args.quick else 100_000)
        report.print_memory(mem)
        timed("memory", t)

    saga_report = None
    if "sagas" in args.sections:
        t = time.monotonic()
        saga_report = sagas.measure(args.quick)
        print("\nSaga runner (3 no-op steps per run)")
        print(report._plain_table(sagas.HEAD, sagas.rows(saga_report)))
        timed("sagas", t)

    plugins: list[PluginRun] = []
    for name in PLUGINS:
        if name in args.sections:
            plugin = run_plugin(name, args.quick, plugins)
            print(plugin.console())
            sys.stdout.flush()
            plugins.append(plugin)
            if plugin.report is not None:
                timings[name] = plugin.seconds

    data = report.RunData(mode, settings, groups, acc, fair, mem, confirmed=confirmed)
    data.sagas = saga_report
    data.seconds = time.monotonic() - started
    data.timings = timings
    data.load = (load_at_start, report.load_average())
    report.print_summary(data)
    print(
        "\nseconds per section: "
        + ", ".join(f"{name} {seconds:.1f}" for name, seconds in timings.items())
    )
    skipped = [p for p in plugins if p.report is None]
    for plugin in skipped:
        print(f"skipped section {plugin.name}: {plugin.skipped}")
    if args.quick:
        for plugin in plugins:
            name, seconds = plugin.name, plugin.seconds
            if plugin.report is not None and seconds > QUICK_SECTION_BUDGET:
                print(
                    f"SLOW: section {name} took {seconds:.1f} s in quick mode "
                    f"(budget {QUICK_SECTION_BUDGET:g} s)"
                )
    print(f"\nfinished in {data.seconds:.1f} s")
    if args.quick and data.seconds > QUICK_TOTAL_BUDGET:
        print(f"SLOW: the quick run took more than {QUICK_TOTAL_BUDGET:g} s")

    chart_dir = IMAGES if args.write_docs else args.charts
    if chart_dir is not None:
        written = write_charts(data, plugins, chart_dir)
        if args.write_docs:
            keep = {path.resolve() for path in written}
            for stale in IMAGES.glob("*.png"):
                if stale.resolve() not in keep:
                    stale.unlink()

    if args.write_docs:
        DOCS.parent.mkdir(parents=True, exist_ok=True)
        data.plugins = [(p.name, p.skipped, p.markdown(_links(p.charts))) for p in plugins]
        data.images = {key: _link(path) for key, path in data.charts.items()}
        DOCS.write_text(report.markdown(data, DOCS.parent), encoding="utf-8")
        print(f"wrote {DOCS}")

    status = 0
    over_bound = [r for r in acc if r.is_buttress and r.within() is False]
    for run in over_bound:
        print(f"NOTE: buttress admitted more than its GCRA bound ({run.driver})")
    if args.quick:
        failing = []
        for group in groups:
            if group.target is None:
                continue
            v = verdict(group)
            if v is None:
                failing.append(f"{group.title}: could not be measured (see the table above)")
            elif not v.within(QUICK_FACTOR, slowdown):
                failing.append(f"{group.title}: {v.detail}, target {group.target.describe()}")
        if saga_report is not None:
            failing += saga_report.failures(QUICK_FACTOR * slowdown)
        for plugin in plugins:
            failing += plugin.failures(QUICK_FACTOR)
        if failing:
            print(f"\nREGRESSION: above {QUICK_FACTOR:g}x the target:")
            for line in failing:
                print(f"  {line}")
            status = 1
        else:
            print(
                f"\nquick check passed: every buttress figure is within {QUICK_FACTOR:g}x "
                "its target"
            )
    return status


def _link(path: Path) -> str:
    """``path`` relative to the docs page, with forward slashes (a Markdown link)."""
    return Path(os.path.relpath(path.resolve(), DOCS.parent.resolve())).as_posix()


def _links(paths: list[Path]) -> dict[Path, str]:
    return {path: _link(path) for path in paths}


if __name__ == "__main__":
    sys.exit(main())
