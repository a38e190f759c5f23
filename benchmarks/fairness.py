"""Fairness: many async tasks sharing one limiter.

200 tasks loop ``await acquire(); await asyncio.sleep(0)`` against a limiter of
1,000 per second (burst 10) for a couple of seconds. A fair limiter serves them
round-robin: every task gets the same number of admissions (Jain's fairness index
``(sum x)^2 / (n * sum x^2)`` is 1.0 for equal shares, 1/n when one task gets
everything), and no task waits much longer than its fair share of the time,
``tasks / rate`` seconds per admission.

Only limiters whose callers wait in line can take part: limits only answers
yes/no, and hyx's token bucket raises instead of waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import buttress

TASKS = 200
RATE = 1000.0
BURST = 10


@dataclass
class FairnessRun:
    label: str
    detail: str
    is_buttress: bool = False
    counts: list[int] = field(default_factory=list)
    max_waits: list[float] = field(default_factory=list)
    duration: float = 0.0
    skipped: str | None = None

    @property
    def fair_share(self) -> float:
        """Seconds between two admissions of one task when everybody is served in turn."""
        return TASKS / RATE

    def jain(self) -> float:
        total = sum(self.counts)
        squares = sum(c * c for c in self.counts)
        return (total * total) / (len(self.counts) * squares) if squares else 0.0

    def max_wait(self) -> float:
        return max(self.max_waits) if self.max_waits else 0.0

    def median_max_wait(self) -> float:
        ordered = sorted(self.max_waits)
        return ordered[len(ordered) // 2] if ordered else 0.0

    def admitted(self) -> int:
        return sum(self.counts)


async def _drive(
    acquire: Callable[[], Awaitable[object]], duration: float
) -> tuple[list[int], list[float]]:
    counts = [0] * TASKS
    waits = [0.0] * TASKS
    now = time.monotonic
    end = now() + duration

    async def worker(index: int) -> None:
        while True:
            started = now()
            await acquire()
            admitted = now()
            if admitted > end:
                return
            counts[index] += 1
            waits[index] = max(waits[index], admitted - started)
            await asyncio.sleep(0)

    running = [asyncio.create_task(worker(i)) for i in range(TASKS)]
    await asyncio.sleep(duration)
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    return counts, waits


def _buttress_acquire() -> Callable[[], Awaitable[object]]:
    return buttress.RateLimiter(rate=RATE, per=1.0, burst=BURST).acquire_async


def _aiolimiter_acquire() -> Callable[[], Awaitable[object]]:
    from aiolimiter import AsyncLimiter

    # aiolimiter's capacity is max_rate per time_period: 10 per 10 ms is 1,000/s, burst 10.
    return AsyncLimiter(BURST, BURST / RATE).acquire


def _pyrate_acquire() -> Callable[[], Awaitable[object]]:
    from pyrate_limiter import Duration, Limiter, Rate, StateBucket

    # buffer_ms=0: the default adds 50 ms to every wait, far more than the 1 ms interval.
    limiter = Limiter(StateBucket([Rate(int(RATE), Duration.SECOND, burst=BURST)]), buffer_ms=0)

    async def acquire() -> None:
        if not await limiter.try_acquire_async("fairness"):
            raise RuntimeError("pyrate-limiter refused a blocking acquire")

    return acquire


def _unavailable(reason: str) -> Callable[[], Callable[[], Awaitable[object]]]:
    def make() -> Callable[[], Awaitable[object]]:
        raise RuntimeError(reason)

    return make


def run_all(duration: float) -> list[FairnessRun]:
    plan = [
        (FairnessRun("buttress", "RateLimiter, acquire_async()", True), _buttress_acquire),
        (FairnessRun("aiolimiter", "AsyncLimiter(10, 0.01), acquire()"), _aiolimiter_acquire),
        (
            FairnessRun("pyrate-limiter", "GCRA bucket, buffer_ms=0, try_acquire_async()"),
            _pyrate_acquire,
        ),
        (
            FairnessRun("limits", "-"),
            _unavailable("non-blocking only (hit() returns a bool); there is no line to wait in"),
        ),
        (
            FairnessRun("hyx", "tokenbucket"),
            _unavailable("raises RateLimitExceeded instead of waiting"),
        ),
    ]
    runs = []
    for run, make in plan:
        run.duration = duration
        try:

            async def main(
                make: Callable[[], Callable[[], Awaitable[object]]] = make,
            ) -> tuple[list[int], list[float]]:
                return await _drive(make(), duration)

            run.counts, run.max_waits = asyncio.run(main())
        except Exception as exc:
            run.skipped = f"{type(exc).__name__}: {exc}"[:120]
        runs.append(run)
    return runs
