"""The timing loop: per-call cost of a wrapped function, sync or async.

Every group of candidates is measured together and interleaved: for each repeat,
every candidate runs once (the order rotates from one repeat to the next), so slow
drifts of the machine (other processes, frequency scaling) hit all of them alike.
A candidate's figure is the median of its repeats; its overhead is that median
minus the median of the bare call measured in the same group.

Calls are made in segments of 1,000. Async segments yield to the event loop
(``await asyncio.sleep(0)``) every 100 calls, as real programs do; otherwise the
loop never runs its housekeeping (for instance, dropping cancelled timer handles).
A candidate may declare a hook that runs between segments, outside the timed
region (used to keep a moving-window log at a realistic population).
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

SEGMENT = 1000
YIELD_EVERY = 100

BARE = "bare"
BUTTRESS = "buttress"
ALT = "buttress-alt"  # another buttress form, shown for information only
PART = "part"  # a single primitive measured next to a pipeline
FLOOR = "floor"
STDLIB = "stdlib"
PEER = "peer"


@dataclass(frozen=True)
class Settings:
    repeats: int
    seconds_per_repeat: float
    min_segments: int = 2
    max_segments: int = 2000
    # gc.collect() before every candidate's repeat (True), or once per round of repeats
    # (False: a full collection costs tens of ms, which dominates a quick run's time).
    collect_each: bool = True


@dataclass
class Candidate:
    """One way of doing the job: builds the wrapped callable (``fn(1)`` must return 1)."""

    label: str
    role: str
    factory: Callable[[], Callable[..., Any]]
    library: str | None = None  # distribution name, for the version table
    between: Callable[[], None] | None = None
    note: str = ""


@dataclass
class Result:
    candidate: Candidate
    ns: float | None = None  # median ns per call
    samples: list[float] = field(default_factory=list)
    overhead: float | None = None
    skipped: str | None = None
    calls_per_repeat: int = 0

    @property
    def label(self) -> str:
        return self.candidate.label

    @property
    def role(self) -> str:
        return self.candidate.role


@dataclass(frozen=True)
class Target:
    """``kind="ns"``: overhead at or under ``value`` ns. ``kind="ratio"``: overhead at or
    under ``value`` times the reference (a candidate label, or ``"sum of parts"``).
    ``kind="delta"``: overhead at most ``value`` ns above the reference candidate's (what
    one feature adds to the same call, such as a listener)."""

    kind: str
    value: float
    reference: str = ""

    def describe(self) -> str:
        if self.kind == "ns":
            return f"<= {self.value:g} ns"
        if self.kind == "delta":
            return f"<= {self.reference} + {self.value:g} ns"
        return f"<= {self.value:g}x {self.reference}"


@dataclass
class Group:
    key: str
    title: str
    is_async: bool
    candidates: list[Candidate]
    target: Target | None = None
    note: str = ""
    results: list[Result] = field(default_factory=list)

    def result(self, label: str) -> Result | None:
        for res in self.results:
            if res.label == label:
                return res
        return None

    def by_role(self, role: str) -> list[Result]:
        return [r for r in self.results if r.role == role and r.skipped is None]


# -- the loops --------------------------------------------------------------------------------


def _run_sync(fn: Callable[[int], Any], segments: int, between: Callable[[], None] | None) -> float:
    perf = time.perf_counter_ns
    total = 0
    for _ in repeat(None, segments):
        if between is not None:
            between()
        start = perf()
        for _ in repeat(None, SEGMENT):
            fn(1)
        total += perf() - start
    return total / (segments * SEGMENT)


async def _run_async(
    fn: Callable[[int], Awaitable[Any]], segments: int, between: Callable[[], None] | None
) -> float:
    perf = time.perf_counter_ns
    sleep = asyncio.sleep
    total = 0
    for _ in repeat(None, segments):
        if between is not None:
            between()
        start = perf()
        for _ in repeat(None, SEGMENT // YIELD_EVERY):
            for _ in repeat(None, YIELD_EVERY):
                await fn(1)
            await sleep(0)
        total += perf() - start
    return total / (segments * SEGMENT)


def _segments_for(per_call_ns: float, settings: Settings) -> int:
    wanted = settings.seconds_per_repeat * 1e9 / max(per_call_ns, 1.0) / SEGMENT
    return int(min(max(round(wanted), settings.min_segments), settings.max_segments))


def _describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:120]


def _finish(group: Group, live: list[tuple[Result, Callable[..., Any], int]]) -> None:
    for res, _, _ in live:
        res.ns = statistics.median(res.samples)
    bares = group.by_role(BARE)
    bare = bares[0] if bares else None
    if bare is not None and bare.ns is not None:
        for res, _, _ in live:
            assert res.ns is not None
            res.overhead = res.ns - bare.ns


def _check_value(value: object) -> str | None:
    return None if value == 1 else f"unexpected result {value!r} (expected 1)"


def measure_sync(group: Group, settings: Settings) -> Group:
    """Measure every candidate of a sync group; candidates that fail are skipped."""
    group.results = []
    live: list[tuple[Result, Callable[..., Any], int]] = []
    for cand in group.candidates:
        res = Result(cand)
        group.results.append(res)
        try:
            fn = cand.factory()
            res.skipped = _check_value(fn(1))
            if res.skipped is None:
                per_call = _run_sync(fn, 2, cand.between)  # warm-up and calibration
                segments = _segments_for(per_call, settings)
                res.calls_per_repeat = segments * SEGMENT
                live.append((res, fn, segments))
        except Exception as exc:
            res.skipped = _describe_error(exc)
    for index in range(settings.repeats):
        shift = index % max(len(live), 1)
        gc.collect()
        for res, fn, segments in live[shift:] + live[:shift]:
            if settings.collect_each:
                gc.collect()
            res.samples.append(_run_sync(fn, segments, res.candidate.between))
    _finish(group, live)
    return group


async def measure_async(group: Group, settings: Settings) -> Group:
    """Async twin of :func:`measure_sync` (factories run inside the event loop)."""
    group.results = []
    live: list[tuple[Result, Callable[..., Any], int]] = []
    for cand in group.candidates:
        res = Result(cand)
        group.results.append(res)
        try:
            fn = cand.factory()
            res.skipped = _check_value(await fn(1))
            if res.skipped is None:
                per_call = await _run_async(fn, 2, cand.between)
                segments = _segments_for(per_call, settings)
                res.calls_per_repeat = segments * SEGMENT
                live.append((res, fn, segments))
        except Exception as exc:
            res.skipped = _describe_error(exc)
    for index in range(settings.repeats):
        shift = index % max(len(live), 1)
        gc.collect()
        for res, fn, segments in live[shift:] + live[:shift]:
            if settings.collect_each:
                gc.collect()
            res.samples.append(await _run_async(fn, segments, res.candidate.between))
    _finish(group, live)
    return group


# -- targets ----------------------------------------------------------------------------------


@dataclass
class Verdict:
    group: Group
    value: float  # ns (kind "ns") or a ratio (kind "ratio")
    limit: float
    detail: str
    # The hand-written floor measured in the same run (kind "ns" only). Absolute targets
    # were set on one machine; the floor tells how fast *this* machine is.
    floor: float | None = None

    @property
    def passed(self) -> bool:
        return self.value <= self.limit

    def within(self, factor: float, slowdown: float = 1.0) -> bool:
        """Within ``factor`` times the target. A nanosecond target was set on one machine,
        so on a slower one it stretches by ``slowdown`` (see :func:`machine_slowdown`), and a
        figure within ``factor`` times the floor measured in the same run passes too."""
        kind = None if self.group.target is None else self.group.target.kind
        if kind == "delta":
            # "+N ns over the reference" is a nanosecond budget set on the same machine as
            # the absolute targets: it stretches with the machine too.
            return self.value <= self.limit * factor * max(slowdown, 1.0)
        if kind != "ns":
            return self.value <= self.limit * factor
        if self.value <= self.limit * factor * max(slowdown, 1.0):
            return True
        return self.floor is not None and self.floor > 0 and self.value <= self.floor * factor


def sum_of_parts(group: Group) -> float | None:
    parts = group.by_role(PART)
    if not parts or any(p.overhead is None for p in parts):
        return None
    return sum(p.overhead for p in parts if p.overhead is not None)


def verdict(group: Group) -> Verdict | None:
    """Evaluate the group's buttress candidate against its target (None if no target)."""
    target = group.target
    if target is None:
        return None
    mine = group.by_role(BUTTRESS)
    if not mine or mine[0].overhead is None:
        return None
    overhead = mine[0].overhead
    if target.kind == "ns":
        floors = [f.overhead for f in group.by_role(FLOOR) if f.overhead is not None]
        floor = floors[0] if floors else None
        detail = f"{overhead:.0f} ns" + (f" (floor {floor:.0f} ns)" if floor is not None else "")
        return Verdict(group, overhead, target.value, detail, floor)
    if target.reference == "sum of parts":
        reference = sum_of_parts(group)
    else:
        ref = group.result(target.reference)
        reference = None if ref is None or ref.skipped else ref.overhead
    if target.kind == "delta":
        if reference is None:
            return None
        added = overhead - reference
        return Verdict(
            group,
            added,
            target.value,
            f"{overhead:.0f} ns vs {reference:.0f} ns (+{added:.0f} ns)",
        )
    if reference is None or reference <= 0:
        return None
    ratio = overhead / reference
    return Verdict(
        group,
        ratio,
        target.value,
        f"{overhead:.0f} ns vs {reference:.0f} ns ({ratio:.2f}x)",
    )


# -- machine speed ----------------------------------------------------------------------------

# ns per iteration of _calibration_workload on the machine the absolute targets were set on
# (the 2-core VM named in docs/benchmarks.md), best of the repeats of a quiet run.
REFERENCE_CALIBRATION_NS = 2200.0


class _Box:
    __slots__ = ("count", "items")

    def __init__(self) -> None:
        self.count = 0
        self.items: dict[int, int] = {}


def _calibration_step(box: _Box, lock: threading.Lock, i: int) -> int:
    with lock:
        box.count += 1
        box.items[i & 63] = box.count
    return box.items.get(i & 31, 0)


def _calibration_workload(n: int) -> None:
    box = _Box()
    lock = threading.Lock()
    step = _calibration_step
    for i in range(n):
        step(box, lock, i)
        step(box, lock, i + 1)
        step(box, lock, i + 2)
        step(box, lock, i + 3)
        step(box, lock, i + 4)
        step(box, lock, i + 5)
        step(box, lock, i + 6)
        step(box, lock, i + 7)


def calibration_ns(repeats: int = 7, n: int = 2_000) -> float:
    """ns per iteration of a fixed pure-Python workload (calls, attributes, a dict, a lock),
    best of ``repeats``: how fast this interpreter on this machine runs code like ours."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter_ns()
        _calibration_workload(n)
        best = min(best, (time.perf_counter_ns() - started) / n)
    return best


def machine_slowdown() -> float:
    """How much slower than the reference machine this one runs (never below 1.0): the
    slack a regression guard gives an absolute target on a slower machine."""
    return max(1.0, calibration_ns() / REFERENCE_CALIBRATION_NS)
