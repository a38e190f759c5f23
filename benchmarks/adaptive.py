"""Adaptive concurrency: AdaptiveBulkhead against fixed bulkheads on a dependency whose
capacity changes over time.

The dependency is a queueing model: ``capacity`` servers (20, then 60, then 10), a FIFO
queue in front of them, and a service time of ``FLOOR`` +-20% that grows with the
queue (each request waiting inside the dependency slows every server by
``PENALTY / capacity`` of the floor: context switches, memory, lock contention), so
letting too many calls in costs latency first and throughput next. ``CLIENTS``
closed-loop clients, far more than the largest capacity, call it through one bulkhead
(queueing in the bulkhead, which costs the dependency nothing).

Everything runs on an asyncio event loop whose clock is virtual: when every task is
blocked, time jumps to the next timer. A run is deterministic (seeded jitter) and takes
a fraction of the simulated time. The bulkheads under test are the real ones.
"""

from __future__ import annotations

import asyncio
import random
import selectors
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buttress import AdaptiveBulkhead, Bulkhead
from buttress.adaptive import AIMD
from buttress.testing import isolated_registry

FLOOR = 0.020  # seconds: the dependency's service time when nothing queues inside it
JITTER = 0.2  # service time is FLOOR x uniform(1 - JITTER, 1 + JITTER)
PENALTY = 1.0  # extra service time per request queued inside, as a share of the floor/capacity
CAPACITIES = (20, 60, 10)
CLIENTS = 150
SAMPLE_EVERY = 0.05  # seconds between limit samples for the chart

# Quick-mode guard for the default AdaptiveBulkhead, per phase (after the first quarter
# of the phase, which is the transition): admitted throughput at least this share of
# capacity, median latency at most this multiple of the floor.
TARGET_THROUGHPUT = 0.85
TARGET_P50 = 1.6


# -- virtual time ----------------------------------------------------------------------------


class _Selector:
    """Wraps the loop's selector: a wait of N seconds moves virtual time by N, instantly."""

    def __init__(self, real: selectors.BaseSelector, loop: VirtualLoop) -> None:
        self._real = real
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise RuntimeError("simulation deadlock: every task waits and no timer is set")
        if timeout > 0:
            self._loop.virtual_now += timeout
        return self._real.select(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is virtual and never waits for real."""

    def __init__(self) -> None:
        super().__init__()
        self.virtual_now = 0.0
        real: selectors.BaseSelector = self._selector  # type: ignore[has-type]
        self._selector = _Selector(real, self)

    def time(self) -> float:
        return self.virtual_now


class VirtualClock:
    """A buttress Clock reading the virtual loop's time (async use only)."""

    def __init__(self, loop: VirtualLoop) -> None:
        self._loop = loop

    def now(self) -> float:
        return self._loop.virtual_now

    def sleep(self, seconds: float) -> None:
        raise RuntimeError("the simulation is async only")

    async def asleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def wait(self, event: Any, timeout: float | None) -> bool:
        raise RuntimeError("the simulation is async only")

    async def wait_future(self, future: asyncio.Future[Any], timeout: float | None) -> bool:
        if not future.done():
            await asyncio.wait((future,), timeout=timeout)
        return future.done()

    def call_later(self, delay: float, callback: Callable[[], object]) -> Any:
        return self._loop.call_later(delay, callback)


# -- the dependency --------------------------------------------------------------------------


class Dependency:
    """``capacity(t)`` servers behind a FIFO queue; queueing inside slows every server."""

    def __init__(self, loop: VirtualLoop, phase: float, seed: int) -> None:
        self.loop = loop
        self.phase = phase
        self.rng = random.Random(seed)
        self.busy = 0
        self.inside = 0
        self.queue: deque[asyncio.Future[None]] = deque()
        for n in range(1, len(CAPACITIES)):
            loop.call_at(n * phase, self._dispatch)  # capacity grew: start queued requests

    def capacity(self) -> int:
        index = min(int(self.loop.time() / self.phase), len(CAPACITIES) - 1)
        return CAPACITIES[index]

    def _dispatch(self) -> None:
        capacity = self.capacity()
        while self.queue and self.busy < capacity:
            future = self.queue.popleft()
            self.busy += 1
            future.set_result(None)

    async def call(self) -> None:
        self.inside += 1
        try:
            if self.queue or self.busy >= self.capacity():
                future = self.loop.create_future()
                self.queue.append(future)
                await future
            else:
                self.busy += 1
            capacity = self.capacity()
            queued = max(self.inside - capacity, 0)
            service = FLOOR * self.rng.uniform(1 - JITTER, 1 + JITTER)
            service *= 1 + PENALTY * queued / capacity
            try:
                await asyncio.sleep(service)
            finally:
                self.busy -= 1
                self._dispatch()
        finally:
            self.inside -= 1


# -- one run ---------------------------------------------------------------------------------


@dataclass
class Phase:
    capacity: int
    completed: int = 0
    latencies: list[float] = field(default_factory=list)  # inside the dependency
    waits: list[float] = field(default_factory=list)  # in the bulkhead's queue

    def throughput(self, seconds: float) -> float:
        return self.completed / seconds

    def capacity_rate(self) -> float:
        return self.capacity / FLOOR

    def p(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


@dataclass
class Run:
    label: str
    detail: str
    is_buttress: bool
    adaptive: bool
    phase_seconds: float
    settle: float
    phases: list[Phase] = field(default_factory=list)
    series: list[tuple[float, int, int]] = field(default_factory=list)  # (t, limit, capacity)
    calls: int = 0


def _simulate(run: Run, make: Callable[[VirtualClock], Bulkhead], seed: int) -> Run:
    loop = VirtualLoop()
    try:
        clock = VirtualClock(loop)
        dependency = Dependency(loop, run.phase_seconds, seed)
        bulkhead = make(clock)
        end = run.phase_seconds * len(CAPACITIES)
        run.phases = [Phase(capacity) for capacity in CAPACITIES]

        @bulkhead
        async def guarded() -> float:
            started = loop.time()
            await dependency.call()
            return started

        async def client() -> None:
            while loop.time() < end:
                asked = loop.time()
                started = await guarded()
                done = loop.time()
                if done >= end:
                    return
                index = int(done / run.phase_seconds)
                # The first `settle` seconds of a phase are its transition; not measured.
                if done - index * run.phase_seconds < run.settle:
                    continue
                phase = run.phases[index]
                phase.completed += 1
                phase.latencies.append(done - started)
                phase.waits.append(started - asked)

        async def sampler() -> None:
            while loop.time() < end:
                run.series.append((loop.time(), bulkhead.max_concurrent, dependency.capacity()))
                await asyncio.sleep(SAMPLE_EVERY)

        async def main() -> None:
            await asyncio.gather(sampler(), *(client() for _ in range(CLIENTS)))

        loop.run_until_complete(main())
        run.calls = bulkhead.snapshot()["accepted"]
    finally:
        loop.close()
    return run


def _candidates() -> list[tuple[str, str, bool, bool, Callable[[VirtualClock], Bulkhead]]]:
    queue = CLIENTS
    return [
        (
            "AdaptiveBulkhead (gradient)",
            "defaults: initial 10, min 1, max 200, Gradient(tolerance=1.5)",
            True,
            True,
            lambda clock: AdaptiveBulkhead(max_queue=queue, clock=clock),
        ),
        (
            "AdaptiveBulkhead (aimd)",
            f"AIMD(latency_threshold={2 * FLOOR:g}), i.e. 2x the floor",
            True,
            True,
            lambda clock: AdaptiveBulkhead(
                algorithm=AIMD(latency_threshold=2 * FLOOR), max_queue=queue, clock=clock
            ),
        ),
        (
            "Bulkhead(15) too small",
            "fixed max_concurrent=15",
            False,
            False,
            lambda clock: Bulkhead(max_concurrent=15, max_queue=queue, clock=clock),
        ),
        (
            "Bulkhead(100) too large",
            "fixed max_concurrent=100",
            False,
            False,
            lambda clock: Bulkhead(max_concurrent=100, max_queue=queue, clock=clock),
        ),
    ]


# -- the report ------------------------------------------------------------------------------


@dataclass
class AdaptiveReport:
    phase_seconds: float
    settle: float
    runs: list[Run] = field(default_factory=list)

    def measured_seconds(self) -> float:
        return self.phase_seconds - self.settle

    def _rows(self) -> list[list[str]]:
        seconds = self.measured_seconds()
        rows = []
        for run in self.runs:
            for number, phase in enumerate(run.phases, 1):
                share = phase.throughput(seconds) / phase.capacity_rate()
                rows.append(
                    [
                        run.label if number == 1 else "",
                        f"{number}: capacity {phase.capacity}",
                        f"{phase.throughput(seconds):,.0f}/s ({share:.0%})",
                        f"{phase.p(0.5) / FLOOR:.2f}x",
                        f"{phase.p(0.99) / FLOOR:.2f}x",
                        _limit_text(run, number - 1, self.phase_seconds, self.settle),
                    ]
                )
        return rows

    HEAD: tuple[str, ...] = (
        "bulkhead",
        "phase",
        "admitted (share of capacity)",
        "p50 latency / floor",
        "p99 latency / floor",
        "limit (median in phase)",
    )

    def console(self) -> str:
        from .report import _plain_table

        lines = [
            f"Adaptive concurrency: capacity {' -> '.join(map(str, CAPACITIES))} servers, "
            f"floor {FLOOR * 1000:g} ms, {CLIENTS} clients, {self.phase_seconds:g} s per phase "
            f"(virtual; first {self.settle:g} s of each phase not measured)",
            _plain_table(list(self.HEAD), self._rows()),
        ]
        return "\n".join(lines)

    def markdown(self) -> str:
        head = "| " + " | ".join(self.HEAD) + " |"
        rule = "| " + " | ".join("---" for _ in self.HEAD) + " |"
        body = "\n".join("| " + " | ".join(c or " " for c in row) + " |" for row in self._rows())
        return f"""## Adaptive concurrency

How close does `AdaptiveBulkhead` get to a dependency's real capacity, and what does it
cost in latency, compared with a fixed `Bulkhead` set too small or too large?

**The dependency** is a queueing model: {CAPACITIES[0]}, then {CAPACITIES[1]}, then
{CAPACITIES[2]} servers ({self.phase_seconds:g} s each) behind a FIFO queue. A request
is served in {FLOOR * 1000:g} ms +-{JITTER:.0%} (the *floor*) when nothing queues inside
the dependency; each request queued inside adds {PENALTY:g} / capacity of the floor to
every service time (contention), so past capacity latency rises first and throughput
then falls. **The load** is {CLIENTS} closed-loop clients (each calls again as soon as
its call returns): always more demand than capacity. Each client goes through the
bulkhead under test, which queues callers it cannot admit (`max_queue={CLIENTS}`).

The simulation runs on an asyncio event loop with a virtual clock (time jumps to the
next timer whenever every task waits), so a run is exact, repeatable (seeded jitter)
and takes a fraction of the simulated time; the bulkheads are the real ones. The first
{self.settle:g} s of each phase are the transition and are left out of the figures.
*Admitted* is completed calls per second, and its share of the capacity
(`servers / floor`); latency is the time spent inside the dependency, as a multiple of
the floor (time waiting in the bulkhead's own queue is not included: it is where the
excess demand waits either way).

{head}
{rule}
{body}

A bulkhead that is too small leaves capacity unused whenever the dependency could do
more; one that is too large lets every caller in, and the queue then forms inside the
dependency, where it slows everybody down (and, with contention, lowers throughput).
The gradient algorithm settles at roughly `tolerance x capacity` (1.5x by default):
it accepts latency up to 1.5 times the fastest call before it backs off, so the p50
sits a little above the floor while nearly all the capacity is used; AIMD with a
latency threshold of twice the floor behaves similarly, with a sawtooth around the
threshold. The chart shows each bulkhead's limit against the capacity over time.
"""

    def failures(self, factor: float) -> list[str]:
        out = []
        seconds = self.measured_seconds()
        for run in self.runs:
            if not run.is_buttress or "gradient" not in run.label:
                continue
            for number, phase in enumerate(run.phases, 1):
                share = phase.throughput(seconds) / phase.capacity_rate()
                if share < TARGET_THROUGHPUT / factor:
                    out.append(
                        f"adaptive ({run.label}, phase {number}): admitted {share:.0%} of "
                        f"capacity, target >= {TARGET_THROUGHPUT:.0%}"
                    )
                p50 = phase.p(0.5) / FLOOR
                if not p50 <= TARGET_P50 * factor:
                    out.append(
                        f"adaptive ({run.label}, phase {number}): p50 latency {p50:.2f}x the "
                        f"floor, target <= {TARGET_P50:g}x"
                    )
        return out

    def charts(self, directory: Path) -> list[Path]:
        from .charts import pyplot

        plt = pyplot()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "adaptive.png"
        fig, ax = plt.subplots(figsize=(9, 5))
        first = self.runs[0]
        times = [t for t, _, _ in first.series]
        ax.step(
            times,
            [c for _, _, c in first.series],
            where="post",
            color="black",
            linewidth=2.5,
            label="dependency capacity (servers)",
        )
        styles = ["-", "--", ":", "-."]
        for run, style in zip(self.runs, styles, strict=False):
            ax.plot(
                [t for t, _, _ in run.series],
                [limit for _, limit, _ in run.series],
                style,
                label=run.label,
            )
        ax.set_xlabel("virtual time (s)")
        ax.set_ylabel("concurrency limit")
        ax.set_ylim(0, 110)
        ax.set_title("Concurrency limit vs dependency capacity")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize="small")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return [path]


def _limit_text(run: Run, index: int, phase_seconds: float, settle: float) -> str:
    start, stop = index * phase_seconds + settle, (index + 1) * phase_seconds
    limits = [limit for t, limit, _ in run.series if start <= t < stop]
    if not limits:
        return "-"
    return f"{statistics.median(limits):g}"


def measure(quick: bool) -> AdaptiveReport:
    phase_seconds = 2.0 if quick else 6.0
    settle = 0.75 if quick else 1.0
    report = AdaptiveReport(phase_seconds=phase_seconds, settle=settle)
    with isolated_registry():
        for seed, (label, detail, is_buttress, adaptive, make) in enumerate(_candidates()):
            run = Run(label, detail, is_buttress, adaptive, phase_seconds, settle)
            report.runs.append(_simulate(run, make, seed=seed + 1))
    return report


if __name__ == "__main__":
    import sys
    import time

    started = time.perf_counter()
    result = measure("--full" not in sys.argv)
    print(result.console())
    print(f"\n{time.perf_counter() - started:.1f} s real")
    for line in result.failures(1.0):
        print("MISS:", line)
