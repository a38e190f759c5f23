"""PNG charts for docs/benchmarks.md (matplotlib, Agg backend, imported lazily).

One chart per primitive (sync and async panels): every candidate's time per call as a
multiple of the bare call measured in the same group, on a log scale, the bare call
being the 1x reference line. Plus a summary of buttress against its targets, the
rate-limiter accuracy runs against their bounds, and the saga runner's throughput.

Every figure carries a footer with the Python version, the machine and the versions of
the libraries it shows, so that a chart copied out of the page still says where it
came from.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ._harness import ALT, BARE, BUTTRESS, FLOOR, PART, PEER, STDLIB, Group, sum_of_parts, verdict
from .accuracy import RATE, WINDOWS, AccuracyRun

ROLE_COLOURS = {
    BARE: "#9e9e9e",
    BUTTRESS: "#3949ab",
    ALT: "#7986cb",
    PART: "#b0bec5",
    FLOOR: "#607d8b",
    STDLIB: "#26a69a",
    PEER: "#ef6c00",
}
ROLE_LEGEND = (
    (BUTTRESS, "buttress"),
    (ALT, "buttress, another form"),
    (PART, "buttress, one part of the pipeline"),
    (FLOOR, "floor: least code for the job"),
    (STDLIB, "standard library"),
    (PEER, "other library"),
)
PASS_COLOUR, MISS_COLOUR, TARGET_COLOUR = "#2e7d32", "#c62828", "#c62828"
GREY = "#616161"

# The overhead groups, gathered into one chart per primitive (key prefix -> title).
PRIMITIVES = {
    "retry": "Retry",
    "breaker": "Circuit breaker",
    "limiter": "Rate limiter",
    "bulkhead": "Bulkhead",
    "timeout": "Timeout",
    "pipeline": "Pipeline",
    "rejection": "Rejections and failures",
}


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (raises ImportError when not installed)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def primitive_of(group: Group) -> str:
    return group.key.rsplit("_", 1)[0]


class Footer:
    """Where the figures came from: Python, machine, date and library versions."""

    def __init__(
        self,
        machine: Sequence[tuple[str, str]],
        versions: Sequence[tuple[str, str]],
        mode: str,
        started: datetime.datetime,
        load: str = "unknown",
    ) -> None:
        facts = dict(machine)
        self.head = (
            f"{facts.get('Python', '?')} \u00b7 {facts.get('CPU', '?')}, "
            f"{facts.get('Logical CPUs', '?')} logical CPUs \u00b7 {facts.get('Platform', '?')}"
            f" \u00b7 {mode} run, {started:%Y-%m-%d}, load average {load}"
        )
        self.versions = dict(versions)

    def text(self, libraries: Iterable[str]) -> str:
        names = ["buttress", *sorted(set(libraries) - {"buttress"})]
        libs = ", ".join(f"{n} {self.versions.get(n, '?')}" for n in names)
        return f"{self.head}\n{libs}"


def _finish(fig: Any, footer: str, path: Path) -> Path:
    fig.supxlabel(footer, x=0.995, ha="right", fontsize=7, color=GREY, linespacing=1.4)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def _multiples(ax: Any) -> None:
    """Log-scale ticks at 1x, 2x, 5x, 10x, ... labelled as multiples."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ticks = [m * 10**e for e in range(4) for m in (1, 2, 5)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _us(value: float) -> str:
    return f"{value / 1000:,.2f} ms" if value >= 1000 else f"{value:,.1f} \u00b5s"


def _span(window: float) -> str:
    return f"{window * 1000:g} ms" if window < 1 else f"{window:g} s"


def _ns(value: float) -> str:
    if abs(value) >= 10_000:
        return f"{value / 1000:,.1f} \u00b5s"
    return f"{value:,.0f} ns"


# -- overhead -------------------------------------------------------------------------------


def _target_ns(group: Group) -> float | None:
    """The most overhead the group's buttress candidate may have, in ns (None: no target)."""
    target = group.target
    if target is None:
        return None
    if target.kind == "ns":
        return target.value
    if target.reference == "sum of parts":
        reference = sum_of_parts(group)
    else:
        ref = group.result(target.reference)
        reference = None if ref is None else ref.overhead
    if reference is None:
        return None
    return reference + target.value if target.kind == "delta" else target.value * reference


def _has_parts(group: Group) -> int:
    return 1 if group.by_role(PART) else 0


def overhead_chart(title: str, groups: Sequence[Group], path: Path, footer: Footer) -> Path | None:
    """One primitive: a panel per group (sync, async), bars from the bare call (1x)."""
    plt = pyplot()
    panels = []
    for group in groups:
        bares = group.by_role(BARE)
        if bares and bares[0].ns:
            panels.append((group, bares[0].ns))
    if not panels:
        return None
    ratios = [
        res.ns / bare
        for group, bare in panels
        for res in group.results
        if res.ns is not None and res.skipped is None
    ]
    top = max([*ratios, 2.0])
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(11, 1.6 + sum(0.36 * len(g.results) + 0.8 for g, _ in panels)),
        sharex=True,
        gridspec_kw={"height_ratios": [len(g.results) + 1.2 + _has_parts(g) for g, _ in panels]},
        layout="constrained",
        squeeze=False,
    )
    libraries: set[str] = set()
    roles: set[str] = set()
    for ax, (group, bare) in zip(axes[:, 0], panels, strict=True):
        labels: list[str] = []
        rows: list[Any] = list(reversed(group.results))  # first candidate on top
        for y, res in enumerate(rows):
            labels.append(res.label)
            if res.candidate.library:
                libraries.add(res.candidate.library)
            if res.role == BARE:
                ax.annotate(
                    f"the reference: {_ns(bare)} per call",
                    (1.0, y),
                    xytext=(6, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=8,
                    color=GREY,
                )
                continue
            if res.skipped is not None or res.ns is None:
                ax.annotate(
                    f"skipped: {res.skipped}"[:110],
                    (1.0, y),
                    xytext=(6, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=7.5,
                    color=GREY,
                    style="italic",
                )
                continue
            roles.add(res.role)
            ratio = res.ns / bare
            ax.barh(y, ratio - 1.0, left=1.0, height=0.62, color=ROLE_COLOURS[res.role])
            ax.annotate(
                f"{ratio:.1f}x   {_ns(res.ns)}  (+{_ns(res.overhead or 0.0)})",
                (max(ratio, 1.0), y),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
                fontweight="bold" if res.role == BUTTRESS else "normal",
            )
        parts = sum_of_parts(group)
        if parts is not None and group.by_role(PART):
            # The pipeline's reference: its parts' overheads added up, below them.
            rows.insert(0, None)
            labels.insert(0, "sum of the parts")
            ax.barh(
                -1, parts / bare, left=1.0, height=0.62, color="white", edgecolor=GREY, hatch="///"
            )
            ax.annotate(
                f"{(bare + parts) / bare:.1f}x   (+{_ns(parts)})",
                ((bare + parts) / bare, -1),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        base = -1 if rows and rows[0] is None else 0
        ax.set_yticks(range(base, base + len(rows)), labels, fontsize=8.5)
        for tick, res in zip(ax.get_yticklabels(), rows, strict=True):
            if res is not None and res.role == BUTTRESS:
                tick.set_fontweight("bold")
        ax.set_ylim(base - 0.6, base + len(rows) - 0.4)
        ax.axvline(1.0, color="black", lw=1.2)
        limit = _target_ns(group)
        if limit is not None:
            x = (bare + limit) / bare
            ax.axvline(x, color=TARGET_COLOUR, lw=1.1, ls="--")
            ax.annotate(
                f"buttress target: +{_ns(limit)}",
                (x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -2),
                textcoords="offset points",
                va="top",
                fontsize=7.5,
                color=TARGET_COLOUR,
            )
        ax.set_title(group.title, loc="left", fontsize=10, fontweight="bold")
        ax.grid(axis="x", which="both", alpha=0.25)
    ax = axes[-1, 0]
    ax.set_xscale("log")
    ax.set_xlim(0.9, top * 4.5)  # room for the labels right of the longest bar
    _multiples(ax)
    ax.set_xlabel("time per call as a multiple of a bare call (log scale; 1x = the bare call)")
    from matplotlib.patches import Patch

    handles = [Patch(color=ROLE_COLOURS[r], label=name) for r, name in ROLE_LEGEND if r in roles]
    fig.legend(handles=handles, loc="outside upper right", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(
        f"{title}: cost of a call on the happy path",
        fontsize=12,
        fontweight="bold",
        x=0.01,
        ha="left",
    )
    return _finish(fig, footer.text(libraries), path)


def summary_chart(groups: Sequence[Group], path: Path, footer: Footer) -> Path | None:
    """buttress's overhead in each group next to its target."""
    plt = pyplot()
    rows = []
    for group in groups:
        mine = group.by_role(BUTTRESS)
        limit = _target_ns(group)
        if not mine or mine[0].overhead is None or limit is None:
            continue
        v = verdict(group)
        rows.append((group.title, max(mine[0].overhead, 1.0), limit, v is None or v.passed))
    if not rows:
        return None
    rows.reverse()
    fig, ax = plt.subplots(figsize=(11, 1.8 + 0.42 * len(rows)), layout="constrained")
    for y, (_, overhead, limit, passed) in enumerate(rows):
        ax.barh(y, overhead, height=0.6, color=PASS_COLOUR if passed else MISS_COLOUR, alpha=0.85)
        ax.plot([limit, limit], [y - 0.38, y + 0.38], color="black", lw=2.2)
        ax.annotate(
            f"{_ns(overhead)}  (target {_ns(limit)})",
            (max(overhead, limit), y),
            xytext=(5, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8.5)
    ax.set_xscale("log")
    ax.set_xlim(min(r[1] for r in rows) / 2, max(max(r[1], r[2]) for r in rows) * 4)
    ax.set_xlabel("overhead per call above a bare call (log scale)")
    ax.grid(axis="x", which="both", alpha=0.25)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(
        FuncFormatter(lambda v, _: _ns(v) if v < 1000 else f"{v / 1000:g} \u00b5s")
    )
    ax.xaxis.set_minor_formatter(NullFormatter())
    fig.legend(
        handles=[
            Patch(color=PASS_COLOUR, label="within target"),
            Patch(color=MISS_COLOUR, label="above target"),
            Line2D([], [], color="black", lw=2.2, label="target"),
        ],
        loc="outside upper right",
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(
        "buttress overhead per primitive against its target",
        fontsize=12,
        fontweight="bold",
        x=0.01,
        ha="left",
    )
    return _finish(fig, footer.text(["buttress"]), path)


# -- accuracy -------------------------------------------------------------------------------

ACCURACY_LIBRARIES = {"buttress", "aiolimiter", "limits", "pyrate-limiter"}


def accuracy_chart(runs: Sequence[AccuracyRun], path: Path, footer: Footer) -> Path | None:
    """Most admissions in any sliding window, per run, against the configured rate and the
    algorithm's own bound."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    live = [r for r in runs if r.skipped is None and r.stamps]
    if not live:
        return None
    live.reverse()
    fig, axes = plt.subplots(
        1,
        len(WINDOWS),
        figsize=(12, 1.8 + 0.5 * len(live)),
        sharey=True,
        layout="constrained",
        squeeze=False,
    )
    labels = [f"{r.label}: {r.algorithm}\n{r.driver}" for r in live]
    for ax, window in zip(axes[0], WINDOWS, strict=True):
        configured = RATE * window
        for y, run in enumerate(live):
            most = run.max_in(window)
            bound = run.limit(window)
            over = bound is not None and most > bound
            colour = ROLE_COLOURS[BUTTRESS if run.is_buttress else PEER]
            ax.barh(
                y,
                most,
                height=0.6,
                color=colour,
                edgecolor=MISS_COLOUR if over else "none",
                lw=2,
            )
            if bound is not None:
                ax.plot([bound, bound], [y - 0.4, y + 0.4], color="black", lw=2)
            ax.annotate(
                f"{most}" + (f" (bound {bound})" if bound is not None else ""),
                (max(most, bound or 0), y),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
                color=MISS_COLOUR if over else "black",
            )
        ax.axvline(configured, color=TARGET_COLOUR, ls="--", lw=1.2)
        ax.annotate(
            f"configured: {configured:g} per {_span(window)}",
            (configured, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -2),
            textcoords="offset points",
            va="top",
            fontsize=7.5,
            color=TARGET_COLOUR,
        )
        top = max(max(r.max_in(window), r.limit(window) or 0) for r in live)
        ax.set_xscale("log")
        ax.set_xlim(1, top * 6)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(
            f"any {_span(window)} window",
            loc="left",
            fontsize=10,
            fontweight="bold",
        )
        ax.set_xlabel("most admissions inside one sliding window (log scale)")
        ax.grid(axis="x", which="both", alpha=0.25)
    axes[0][0].set_yticks(range(len(live)), labels, fontsize=8)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig.legend(
        handles=[
            Patch(color=ROLE_COLOURS[BUTTRESS], label="buttress"),
            Patch(color=ROLE_COLOURS[PEER], label="other library"),
            Line2D([], [], color="black", lw=2, label="what the algorithm promises"),
            Patch(facecolor="white", edgecolor=MISS_COLOUR, lw=2, label="above its promise"),
        ],
        loc="outside upper right",
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(
        f"Rate-limiter accuracy: {RATE:g} per second, demand above the rate",
        fontsize=12,
        fontweight="bold",
        x=0.01,
        ha="left",
    )
    return _finish(fig, footer.text(ACCURACY_LIBRARIES), path)


# -- sagas ----------------------------------------------------------------------------------


def saga_chart(report: Any, path: Path, footer: Footer) -> Path | None:
    """Runs per second of a 3-step no-op saga, per store and face (log scale)."""
    plt = pyplot()
    rows = list(getattr(report, "rows", []))
    if not rows:
        return None
    rows.reverse()
    fig, ax = plt.subplots(figsize=(11, 1.9 + 0.45 * len(rows)), layout="constrained")
    for y, row in enumerate(rows):
        colour = ROLE_COLOURS[BUTTRESS] if row.store == "memory" else ROLE_COLOURS[ALT]
        ax.barh(y, row.runs_per_second, height=0.6, color=colour)
        ax.annotate(
            f"{row.runs_per_second:,.0f} runs/s  ({_us(row.overhead_per_step_us)} per step)",
            (row.runs_per_second, y),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(range(len(rows)), [f"{r.store}, {r.face}" for r in rows], fontsize=8.5)
    ax.set_xscale("log")
    most = max(r.runs_per_second for r in rows)
    ax.set_xlim(min(r.runs_per_second for r in rows) / 3, most * 8)
    ax.axvline(1000, color=TARGET_COLOUR, ls="--", lw=1.1)
    ax.annotate(
        "SQLite target: 1,000 runs/s",
        (1000, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(3, -2),
        textcoords="offset points",
        va="top",
        fontsize=7.5,
        color=TARGET_COLOUR,
    )
    direct = float(getattr(report, "direct_ns", 0.0)) * 1e-9
    step_target = float(getattr(sagas_module(), "STEP_TARGET_US", 10.0))
    memory_target = 1 / (3 * step_target * 1e-6 + direct)
    ax.axvline(memory_target, color=TARGET_COLOUR, ls=":", lw=1.1)
    ax.annotate(
        f"memory target: {step_target:g} \u00b5s per step \u2248 {memory_target:,.0f} runs/s",
        (memory_target, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(-3, -2),
        textcoords="offset points",
        ha="right",
        va="top",
        fontsize=7.5,
        color=TARGET_COLOUR,
    )
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("3-step saga runs per second, one caller (log scale)")
    ax.grid(axis="x", which="both", alpha=0.25)
    fig.suptitle("Saga runner throughput", fontsize=12, fontweight="bold", x=0.01, ha="left")
    return _finish(fig, footer.text(["buttress"]), path)


def sagas_module() -> Any:
    from . import sagas

    return sagas


# -- all of them ----------------------------------------------------------------------------


def overhead_charts(groups: Sequence[Group], directory: Path, footer: Footer) -> dict[str, Path]:
    """One chart per primitive (keys: ``overhead-<primitive>``) and the summary."""
    out: dict[str, Path] = {}
    by_primitive: dict[str, list[Group]] = {}
    for group in groups:
        by_primitive.setdefault(primitive_of(group), []).append(group)
    for primitive, members in by_primitive.items():
        title = PRIMITIVES.get(primitive, primitive)
        chart = overhead_chart(title, members, directory / f"overhead-{primitive}.png", footer)
        if chart is not None:
            out[f"overhead-{primitive}"] = chart
    summary = summary_chart(groups, directory / "overhead-summary.png", footer)
    if summary is not None:
        out["overhead-summary"] = summary
    return out
