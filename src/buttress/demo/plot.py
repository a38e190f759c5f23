"""``--plot``: the run drawn as a timeline chart with matplotlib (an optional extra)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

from buttress.demo.scenario import (
    ATTEMPT_TIMEOUT,
    ATTEMPTS,
    MAX_CONCURRENT,
    MAX_QUEUE,
    PHASES,
    RATE,
    TOTAL_TIMEOUT,
    Demo,
    Transition,
)
from buttress.demo.view import percentile

# -- the timeline chart (``--plot``) --------------------------------------------------------

MATPLOTLIB_MISSING = (
    "--plot draws with matplotlib, which is not installed: "
    "pip install matplotlib  (or pip install 'buttress[bench]')"
)

# Colours of the chart (hex, as matplotlib takes them).
C_OK, C_WARN, C_BAD, C_INFO = "#2e7d32", "#f9a825", "#c62828", "#1565c0"
C_PURPLE, C_BROWN, C_GREY = "#6a1b9a", "#8d6e63", "#757575"
CHART_STATE = {"closed": "#a5d6a7", "half_open": "#ffe082", "open": "#ef9a9a"}
CHART_PHASE = {
    "healthy": "#c8e6c9",
    "degraded": "#fff59d",
    "outage": "#ffab91",
    "recovering": "#b3e5fc",
}
REJECTION_STYLE = (  # reason, label, colour
    ("circuit_open", "circuit open", C_BAD),
    ("rate_limited", "rate limited", C_PURPLE),
    ("bulkhead_full", "bulkhead full", C_BROWN),
    ("bulkhead_wait_timeout", "bulkhead wait timed out", "#bcaaa4"),
)


def plot_path_problem(path: str) -> str | None:
    """Why ``--plot path`` cannot work, in one line, or ``None``: checked before the run,
    so that a bad path never costs a whole run and ends in a traceback."""
    import os

    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    if suffix not in formats:
        known = ", ".join(sorted(formats))
        shown = f"'.{suffix}'" if suffix else "no extension"
        return f"--plot {path}: {shown} is not an image format matplotlib writes ({known})"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"--plot {path}: the directory {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"--plot {path}: the directory {folder} is not writable"
    if os.path.isdir(path):
        return f"--plot {path}: that is a directory; give a file name such as timeline.png"
    return None


def matplotlib_available() -> bool:
    """Whether ``--plot`` can work (matplotlib is an optional, benchmark-only dependency)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def breaker_spans(transitions: Sequence[Transition], end: float) -> list[tuple[float, float, str]]:
    """The breaker's states as ``(start, stop, state)`` spans from 0 to ``end`` seconds."""
    spans: list[tuple[float, float, str]] = []
    state, since = "closed", 0.0
    for tr in transitions:
        at = min(max(tr.at, 0.0), end)
        if at > since:
            spans.append((since, at, state))
        state, since = tr.new, max(at, since)
    if end > since:
        spans.append((since, end, state))
    return spans


def per_second(times: Iterable[float], edges: Sequence[float]) -> list[float]:
    """How many of ``times`` fall in each bin between ``edges``, per second."""
    counts = [0] * (len(edges) - 1)
    first, width = edges[0], edges[1] - edges[0]
    for at in times:
        index = int((at - first) // width)
        if 0 <= index < len(counts):
            counts[index] += 1
    return [n / width for n in counts]


def _sampled_rate(log: Sequence[tuple[float, int]], edges: Sequence[float]) -> list[float]:
    """Rates per bin from a cumulative counter sampled now and then (step interpolation)."""
    values, index, last = [], 0, 0
    for edge in edges:
        while index < len(log) and log[index][0] <= edge:
            last = log[index][1]
            index += 1
        values.append(last)
    width = edges[1] - edges[0]
    return [(b - a) / width for a, b in itertools.pairwise(values)]


def _rolling(
    points: Sequence[tuple[float, float]], edges: Sequence[float], q: float
) -> list[float]:
    """The ``q`` quantile of the values in each bin (NaN where a bin is empty)."""
    bins: list[list[float]] = [[] for _ in range(len(edges) - 1)]
    first, width = edges[0], edges[1] - edges[0]
    for at, value in points:
        index = int((at - first) // width)
        if 0 <= index < len(bins):
            bins[index].append(value)
    return [percentile(b, q) or math.nan for b in bins]


def _level(
    ax: Any, y: float, label: str, color: str, *, ls: str, rise: float, alpha: float | None = None
) -> None:
    """A horizontal reference line across ``ax`` at ``y``, labelled at its left end."""
    ax.axhline(y, color=color, lw=1, ls=ls, alpha=alpha)
    ax.annotate(
        label,
        (0.0, y),
        xytext=(4, rise),
        textcoords="offset points",
        color=color,
        fontsize=8,
        va="bottom",
    )


def plot_timeline(demo: Demo, path: str) -> None:
    """Draw one run of the demo as a PNG timeline: gateway and breaker state, throughput,
    retries and rejections, latency. Needs matplotlib (imported here, not before)."""
    import platform

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    settings, tally = demo.settings, demo.tally
    end = max([settings.seconds, *(at for at, _, _ in demo.finished)])
    width = max(settings.seconds / 40, 0.1)
    edges = [i * width for i in range(math.ceil(end / width) + 1)]
    mids = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    spans = breaker_spans(tally.transitions, end)

    fig, axes = plt.subplots(
        4,
        1,
        figsize=(12, 9.6),
        sharex=True,
        gridspec_kw={"height_ratios": [0.75, 2, 1.6, 2]},
        layout="constrained",
    )
    strip, flow, trouble, latency = axes
    story = " \u2192 ".join(dict.fromkeys(p.name for p in PHASES))
    fig.suptitle(
        f"buttress demo: {settings.callers} callers check out against a payment gateway "
        f"that degrades, goes down and recovers\n"
        f"gateway {story}; {settings.seconds:g} s, seed {settings.seed}",
        fontsize=13,
        fontweight="bold",
    )

    # Gateway phases (the scenario) over breaker states (what buttress did about it).
    start = 0.0
    for phase in PHASES:
        stop = phase.until * settings.seconds
        strip.axvspan(start, stop, 0.52, 1.0, color=CHART_PHASE[phase.name], lw=0)
        strip.text(
            (start + stop) / 2,
            1.5,
            f"{phase.name}\n{phase.failing:.0%} fail",
            ha="center",
            va="center",
            fontsize=8.5,
        )
        start = stop
    strip.axvspan(settings.seconds, end, 0.52, 1.0, color="#eeeeee", lw=0)
    for left, right, state in spans:
        strip.axvspan(left, right, 0.0, 0.48, color=CHART_STATE[state], lw=0)
    opened = sum(1 for tr in tally.transitions if tr.new == "open")
    strip.set_ylim(0, 2)
    strip.set_yticks([0.5, 1.5], ["breaker", "gateway"])
    strip.tick_params(axis="y", length=0)
    strip.set_title(
        f"The gateway's health, and the circuit breaker's state (opened {opened} times: at "
        f"{demo.breaker.failure_rate:.0%} failures; probes after {demo.breaker.reset_timeout:g} s)",
        loc="left",
        fontsize=10,
    )
    strip.legend(
        handles=[
            Patch(color=CHART_STATE["closed"], label="closed"),
            Patch(color=CHART_STATE["half_open"], label="half-open"),
            Patch(color=CHART_STATE["open"], label="open"),
        ],
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncol=3,
        fontsize=8,
        frameon=False,
    )

    # The breaker's open and half-open spells, faintly, behind every other panel.
    for ax in (flow, trouble, latency):
        for left, right, state in spans:
            if state != "closed":
                ax.axvspan(left, right, color=CHART_STATE[state], alpha=0.35, lw=0)
        ax.axvline(settings.seconds, color=C_GREY, lw=1, ls=":")
        ax.grid(axis="y", alpha=0.3)
    latency.text(
        settings.seconds,
        0.02,
        "callers stop ",
        transform=latency.get_xaxis_transform(),
        fontsize=7.5,
        color=C_GREY,
        ha="right",
        va="bottom",
    )

    # Throughput.
    by_outcome: dict[str, list[float]] = {}
    for at, _, outcome in demo.finished:
        by_outcome.setdefault(outcome, []).append(at)
    flow.plot(
        mids,
        _sampled_rate(demo.admission_log, edges),
        color=C_INFO,
        lw=1.8,
        label="gateway calls admitted by the rate limiter",
    )
    flow.plot(
        mids,
        per_second(by_outcome.get("ok", []) + by_outcome.get("declined", []), edges),
        color=C_OK,
        lw=1.8,
        label="checkouts answered (charged or declined)",
    )
    flow.plot(
        mids,
        per_second(by_outcome.get("fallback", []), edges),
        color=C_WARN,
        lw=1.8,
        label="checkouts deferred by the fallback",
    )
    failed = by_outcome.get("failed", [])
    if failed:
        flow.plot(mids, per_second(failed, edges), color=C_BAD, lw=1.5, label="checkouts failed")
    _level(flow, RATE, f"limiter rate {RATE:g}/s", C_INFO, ls="--", alpha=0.7, rise=3)
    flow.set_ylabel("per second")
    flow.set_ylim(bottom=0)
    flow.set_title("Throughput", loc="left", fontsize=10)
    flow.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=2, frameon=False)

    # Retries, timeouts and rejections.
    kinds: dict[str, list[float]] = {}
    for at, what in tally.marks:
        kinds.setdefault(what, []).append(at)
    bottom = [0.0] * len(mids)
    for reason, label, colour in REJECTION_STYLE:
        rates = per_second(kinds.get(f"rejected:{reason}", []), edges)
        if any(rates):
            total = len(kinds.get(f"rejected:{reason}", []))
            trouble.bar(
                mids,
                rates,
                width * 0.9,
                bottom=bottom,
                color=colour,
                alpha=0.75,
                label=f"rejected: {label} ({total:,})",
            )
            bottom = [b + r for b, r in zip(bottom, rates, strict=True)]
    trouble.plot(
        mids,
        per_second(kinds.get("retry", []), edges),
        color=C_INFO,
        lw=1.8,
        label=f"retries ({len(kinds.get('retry', [])):,})",
    )
    timeouts = kinds.get("timeout:attempt", [])
    trouble.plot(
        mids,
        per_second(timeouts, edges),
        color="black",
        lw=1.2,
        ls="--",
        label=f"attempts timed out after {ATTEMPT_TIMEOUT:g} s ({len(timeouts):,})",
    )
    trouble.set_ylabel("per second")
    trouble.set_ylim(bottom=0)
    trouble.set_title("Retries, timeouts and rejections", loc="left", fontsize=10)
    trouble.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=3, frameon=False)

    # Latency of the checkouts, as the callers saw it.
    colours = {"ok": C_OK, "declined": C_OK, "fallback": C_WARN, "failed": C_BAD}
    for outcome, label in (
        ("ok", "answered"),
        ("fallback", "deferred by the fallback"),
        ("failed", "failed"),
    ):
        points = [
            (at, took * 1000) for at, took, o in demo.finished if colours[o] == colours[outcome]
        ]
        if points:
            latency.scatter(
                [at for at, _ in points],
                [took for _, took in points],
                s=6,
                color=colours[outcome],
                alpha=0.35,
                lw=0,
                label=label,
            )
    answered = [(at, took * 1000) for at, took, o in demo.finished if o in ("ok", "declined")]
    latency.plot(mids, _rolling(answered, edges, 0.5), color="black", lw=1.6, label="p50 answered")
    latency.plot(
        mids, _rolling(answered, edges, 0.95), color="black", lw=1.2, ls="--", label="p95 answered"
    )
    limit_ms = TOTAL_TIMEOUT * 1000
    _level(latency, limit_ms, f"checkout timeout {limit_ms:.0f} ms", C_BAD, ls=":", rise=2)
    latency.set_yscale("log")
    latency.set_ylim(top=TOTAL_TIMEOUT * 1000 * 4)
    latency.set_ylabel("checkout latency (ms, log scale)")
    latency.set_title("Checkout latency", loc="left", fontsize=10)
    legend = latency.legend(
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        ncol=5,
        frameon=False,
        markerscale=2.5,
    )
    for handle in legend.legend_handles:
        if handle is not None:
            handle.set_alpha(1.0)
    fast = [at for at, took, o in demo.finished if o == "fallback" and took < 0.005]
    if fast:
        latency.text(
            sum(fast) / len(fast),
            0.02,
            "the open breaker fails fast: the fallback answers in well under a millisecond",
            transform=latency.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="#8a6d00",
        )
    latency.set_xlim(0, end)
    latency.set_xlabel("seconds into the run")

    from buttress import __version__

    fig.supxlabel(
        f"buttress {__version__}, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.system()} {platform.machine()}; pipeline: "
        f"fallback \u2192 timeout {TOTAL_TIMEOUT:g} s \u2192 retry x{ATTEMPTS} \u2192 breaker "
        f"\u2192 bulkhead {MAX_CONCURRENT}+{MAX_QUEUE} \u2192 limiter {RATE:g}/s \u2192 "
        f"timeout {ATTEMPT_TIMEOUT:g} s \u2192 gateway",
        x=0.995,
        ha="right",
        fontsize=7.5,
        color=C_GREY,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
