"""Scaling: how costs grow with live keys, concurrent callers and saga length.

Other sections measure the points (the keyed limiter at 10^3..10^6 keys, contended
waits at 1..1,000 tasks and threads, Redis-backed primitives at 1..64 async callers);
their reports hand them over as :class:`Series` through a ``scaling_series()`` method,
and this section draws one chart per axis from all of them, buttress beside the peers
and floors measured in the same run. It measures one axis itself: saga runs against
their number of steps, buttress beside DBOS Transact, both on SQLite with every commit
fsynced (``synchronous=FULL``, DBOS's own default), one caller.

``python -m benchmarks`` runs it last (``--only scaling`` runs only its own axis).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._harness import BUTTRESS, FLOOR, PEER

__all__ = ["CHARTS", "ScalingReport", "Series", "measure"]


@dataclass
class Series:
    """One line of a scaling chart: ``ys[i]`` measured at ``xs[i]``."""

    chart: str  # a key of CHARTS
    label: str
    role: str  # BUTTRESS, PEER or FLOOR (the colours of the other charts)
    xs: list[float]
    ys: list[float]


# chart key -> (title, x axis, y axis)
CHARTS: dict[str, tuple[str, str, str]] = {
    "keys": ("Keyed rate limiter against live keys", "live keys", "µs per acquire"),
    "tasks": ("Contended async waits against tasks", "concurrent tasks", "CPU µs per call"),
    "threads": ("Contended sync waits against threads", "concurrent threads", "µs per call"),
    "redis": (
        "Redis-backed primitives against concurrent callers",
        "concurrent async callers",
        "calls per second",
    ),
    "saga_steps": ("Saga runs against their length", "steps per run", "ms per run"),
}

STEPS = (1, 3, 10, 30)
QUICK_STEPS = (1, 10)


def _buttress_saga_ms(steps: int, runs: int, folder: str) -> float:
    from buttress import Saga
    from buttress.backends.sqlite import SQLiteStore
    from buttress.testing import isolated_registry

    with isolated_registry():
        store = SQLiteStore(os.path.join(folder, f"steps-{steps}.db"), synchronous="FULL")
        saga = Saga(f"steps-{steps}", store=store)
        for index in range(steps):
            saga.step(f"s{index}", lambda ctx: 1)
        saga.run({"n": -1})  # schema and connection
        started = time.perf_counter()
        for n in range(runs):
            saga.run({"n": n})
        elapsed = time.perf_counter() - started
        store.close()
    return elapsed / runs * 1000


def _dbos_saga_ms(folder: str, steps: tuple[int, ...], runs: int) -> list[float] | str:
    """DBOS in a child process (one global instance per process): ms per run per length,
    or why it could not run."""
    try:
        import dbos  # noqa: F401
    except ImportError:
        return "the dbos package is not installed (pip install .[bench])"
    spec = {"url": f"sqlite:///{os.path.join(folder, 'dbos.sqlite')}", "steps": steps, "runs": runs}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.scaling", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["no output"])[-1]
    return [float(v) for v in json.loads(done.stdout.strip().splitlines()[-1])]


def _dbos_child(spec: dict[str, Any]) -> None:
    import logging

    from dbos import DBOS

    DBOS(config={"name": "buttress-scaling", "system_database_url": spec["url"]})
    logging.getLogger("dbos").setLevel(logging.WARNING)

    @DBOS.step()
    def one(n: int) -> int:
        return 1

    @DBOS.workflow()
    def job(n: int, steps: int) -> int:
        for _ in range(steps):
            one(n)
        return n

    DBOS.launch()
    out = []
    base = 0
    for steps in spec["steps"]:
        base += 10_000_000
        job(base - 1, steps)  # warm up
        started = time.perf_counter()
        for n in range(spec["runs"]):
            job(base + n, steps)
        out.append((time.perf_counter() - started) / spec["runs"] * 1000)
    DBOS.destroy()
    print(json.dumps(out))


@dataclass
class ScalingReport:
    series: list[Series] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def console(self) -> str:
        lines = ["Scaling (one line per series: x -> y)"]
        for chart, (title, x_label, y_label) in CHARTS.items():
            mine = [s for s in self.series if s.chart == chart]
            if not mine:
                continue
            lines.append(f"  {title} ({x_label} -> {y_label})")
            for s in mine:
                points = ", ".join(f"{x:g}: {y:.3g}" for x, y in zip(s.xs, s.ys, strict=True))
                lines.append(f"    {s.label}: {points}")
        lines += [f"  skipped: {why}" for why in self.skipped]
        return "\n".join(lines)

    def markdown(self) -> str:
        parts = [
            "## Scaling",
            "How the costs grow with live keys, with concurrent callers (tasks, threads, "
            "Redis callers) and with the length of a saga, buttress beside the peers and "
            "floors that do the same job, all measured in this run (both axes are "
            "logarithmic). The sections above give the same figures in tables, with their "
            "targets; the saga-length figures are this section's own.",
        ]
        for chart, (title, x_label, y_label) in CHARTS.items():
            mine = [s for s in self.series if s.chart == chart]
            if not mine:
                continue
            parts += [
                f"### {title}",
                f"![{title}: {y_label} against {x_label}]"
                f"(img/benchmarks/scaling-{chart.replace('_', '-')}.png)",
                self._growth(mine, x_label),
            ]
            if chart == "saga_steps":
                parts.append(self._table(mine, x_label))
        if self.skipped:
            parts.append("Not measured: " + "; ".join(self.skipped) + ".")
        return "\n\n".join(parts) + "\n"

    @staticmethod
    def _number(value: float) -> str:
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:,.3g}"

    def _growth(self, series: list[Series], x_label: str) -> str:
        """One sentence per line: its first and last points and the growth between."""
        lines = []
        for s in series:
            if len(s.xs) < 2 or not s.ys[0]:
                continue
            first, last = s.ys[0], s.ys[-1]
            lines.append(
                f"{s.label}: {self._number(first)} at {s.xs[0]:,.0f} {x_label}, "
                f"{self._number(last)} at {s.xs[-1]:,.0f} ({last / first:.2f}x)"
            )
        return "\n".join(f"- {line}" for line in lines)

    def _table(self, series: list[Series], x_label: str) -> str:
        xs = sorted({x for s in series for x in s.xs})
        head = f"| {x_label} | " + " | ".join(s.label for s in series) + " |"
        rule = "|---:|" + "---:|" * len(series)
        rows = []
        for x in xs:
            cells = []
            for s in series:
                found = [y for sx, y in zip(s.xs, s.ys, strict=True) if sx == x]
                cells.append(self._number(found[0]) if found else "")
            rows.append(f"| {x:,.0f} | " + " | ".join(cells) + " |")
        return "\n".join([head, rule, *rows])

    def failures(self, factor: float) -> list[str]:
        return []  # the targets live in the sections that measured the points

    def charts(self, directory: Path) -> list[Path]:
        from .charts import ROLE_COLOURS, pyplot

        plt = pyplot()
        written = []
        for chart, (title, x_label, y_label) in CHARTS.items():
            mine = [s for s in self.series if s.chart == chart]
            if not mine:
                continue
            fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
            styles = {BUTTRESS: "-", PEER: "--", FLOOR: ":"}
            peers = 0
            for s in mine:
                colour = ROLE_COLOURS.get(s.role, "#616161")
                if s.role == PEER:  # several peers: vary the shade
                    colour = ("#ef6c00", "#8d6e63", "#c2185b", "#00897b")[peers % 4]
                    peers += 1
                ax.plot(
                    s.xs,
                    s.ys,
                    styles.get(s.role, "-"),
                    marker="o",
                    ms=3.5,
                    lw=1.6,
                    color=colour,
                    label=s.label,
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.set_title(title, loc="left", fontsize=11)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=8, frameon=False)
            path = directory / f"scaling-{chart.replace('_', '-')}.png"
            fig.tight_layout()
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
        return written


def measure(quick: bool, gathered: list[Series] | None = None) -> ScalingReport:
    """The section: the series other sections measured, plus saga runs against steps."""
    report = ScalingReport(series=list(gathered or ()))
    steps = QUICK_STEPS if quick else STEPS
    runs = 20 if quick else 150
    folder = tempfile.mkdtemp(prefix="buttress-scaling-")
    report.series.append(
        Series(
            "saga_steps",
            "buttress Saga (SQLite, FULL)",
            BUTTRESS,
            [float(s) for s in steps],
            [_buttress_saga_ms(s, runs, folder) for s in steps],
        )
    )
    if not quick:
        dbos = _dbos_saga_ms(folder, steps, runs)
        if isinstance(dbos, str):
            report.skipped.append(f"DBOS: {dbos}")
        else:
            report.series.append(
                Series(
                    "saga_steps",
                    "DBOS workflow (SQLite, FULL)",
                    PEER,
                    [float(s) for s in steps],
                    dbos,
                )
            )
    return report


if __name__ == "__main__":  # the DBOS child: python -m benchmarks.scaling SPEC
    _dbos_child(json.loads(sys.argv[1]))
