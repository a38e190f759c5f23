"""Rate-limiter accuracy in real time: does it ever admit more than it promises?

Each limiter is configured for 200 admissions per second and driven with more
demand than that for a couple of seconds; every admission's time is recorded
right after the limiter lets the caller through. Then, for windows of one period
(1 s) and of 100 ms, we find the most admissions inside any window of that length
(closed windows, every admission taken as a window start) and compare it with
what the limiter promises:

- GCRA (buttress; pyrate-limiter's GCRA bucket; aiolimiter, a leaky bucket of
  capacity ``max_rate``, is the same shape): at most ``burst + rate * t / per`` in
  any window of length ``t``.
- sliding log (limits MovingWindow, pyrate-limiter's list bucket): at most ``limit``
  in any window of one period (so also in any shorter one).
- fixed window (limits FixedWindow): at most ``limit`` per calendar window, hence up
  to ``2 * limit`` in a sliding window that straddles a boundary.

Drivers: async tasks awaiting the limiter (recorded times are exact: nothing is
awaited between the admission and the recording), threads blocking on it, or one
thread spinning on the non-blocking form (the most adversarial: it asks again
within a microsecond of every refusal).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import buttress

RATE = 200.0
PER = 1.0
WINDOWS = (1.0, 0.1)


@dataclass
class AccuracyRun:
    label: str
    algorithm: str
    driver: str
    bound: Callable[[float], float] | None = None
    is_buttress: bool = False
    stamps: list[float] = field(default_factory=list)
    duration: float = 0.0
    skipped: str | None = None

    def admitted(self) -> int:
        return len(self.stamps)

    def max_in(self, window: float) -> int:
        return max_in_window(self.stamps, window)

    def limit(self, window: float) -> int | None:
        if self.bound is None:
            return None
        return math.floor(self.bound(window) + 1e-6)

    def within(self) -> bool | None:
        if self.skipped is not None or self.bound is None:
            return None
        return all(self.max_in(w) <= (self.limit(w) or 0) for w in WINDOWS)

    def per_second(self) -> float:
        """Admissions per second over the whole run (initial burst included)."""
        return len(self.stamps) / self.duration if self.duration else 0.0


def max_in_window(stamps: list[float], window: float) -> int:
    """The most stamps inside any closed interval of length ``window``."""
    ordered = sorted(stamps)
    best = 0
    low = 0
    for high, stamp in enumerate(ordered):
        while stamp - ordered[low] > window:
            low += 1
        best = max(best, high - low + 1)
    return best


def gcra_bound(burst: float, rate: float = RATE, per: float = PER) -> Callable[[float], float]:
    return lambda t: burst + rate * t / per


def log_bound(limit: float) -> Callable[[float], float]:
    return lambda t: limit * max(1, math.ceil(t / PER - 1e-9))


def fixed_bound(limit: float) -> Callable[[float], float]:
    return lambda t: 2 * limit * max(1, math.ceil(t / PER - 1e-9))


# -- drivers ----------------------------------------------------------------------------------


async def _drive_tasks(
    acquire: Callable[[], Awaitable[object]], tasks: int, duration: float
) -> list[float]:
    stamps: list[float] = []
    now = time.monotonic
    end = now() + duration

    async def worker() -> None:
        while now() < end:
            await acquire()
            stamps.append(now())

    running = [asyncio.create_task(worker()) for _ in range(tasks)]
    await asyncio.sleep(duration)
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    return [s for s in stamps if s <= end]


def _drive_threads(acquire: Callable[[], object], threads: int, duration: float) -> list[float]:
    stamps: list[float] = []
    now = time.monotonic
    end = now() + duration

    def worker() -> None:
        while now() < end:
            acquire()
            stamps.append(now())

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(duration + 5.0)
    return [s for s in stamps if s <= end]


def _drive_spin(try_acquire: Callable[[], bool], duration: float) -> list[float]:
    stamps: list[float] = []
    now = time.monotonic
    end = now() + duration
    while now() < end:
        if try_acquire():
            stamps.append(now())
    return stamps


# -- the runs ---------------------------------------------------------------------------------


def _buttress(burst: int) -> buttress.RateLimiter:
    return buttress.RateLimiter(rate=RATE, per=PER, burst=burst)


def _run_buttress_async(burst: int, duration: float) -> list[float]:
    async def main() -> list[float]:
        return await _drive_tasks(_buttress(burst).acquire_async, 20, duration)

    return asyncio.run(main())


def _run_buttress_threads(duration: float) -> list[float]:
    return _drive_threads(_buttress(1).acquire, 4, duration)


def _run_buttress_spin(duration: float) -> list[float]:
    return _drive_spin(_buttress(1).try_acquire, duration)


def _run_aiolimiter(duration: float) -> list[float]:
    from aiolimiter import AsyncLimiter

    async def main() -> list[float]:
        return await _drive_tasks(AsyncLimiter(RATE, PER).acquire, 20, duration)

    return asyncio.run(main())


def _run_limits(strategy_name: str, duration: float) -> list[float]:
    from limits import RateLimitItemPerSecond, storage, strategies

    strategy = getattr(strategies, strategy_name)(storage.MemoryStorage())
    item = RateLimitItemPerSecond(int(RATE))
    return _drive_spin(lambda: strategy.hit(item, "accuracy"), duration)


def _run_pyrate(algorithm: str, duration: float, buffer_ms: int = 50) -> list[float]:
    from pyrate_limiter import Duration, Limiter, Rate, StateBucket

    if algorithm == "gcra":
        bucket = StateBucket([Rate(int(RATE), Duration.SECOND, burst=1)])
        limiter = Limiter(bucket, buffer_ms=buffer_ms)
    else:
        limiter = Limiter(Rate(int(RATE), Duration.SECOND), buffer_ms=buffer_ms)

    async def acquire() -> None:
        if not await limiter.try_acquire_async("accuracy"):
            raise RuntimeError("pyrate-limiter refused a blocking acquire")

    async def main() -> list[float]:
        return await _drive_tasks(acquire, 20, duration)

    try:
        return asyncio.run(main())
    finally:
        limiter.close()


def run_all(duration: float) -> list[AccuracyRun]:
    plan: list[tuple[AccuracyRun, Callable[[], list[float]]]] = [
        (
            AccuracyRun(
                "buttress", "GCRA, burst=1", "20 tasks, acquire_async()", gcra_bound(1), True
            ),
            lambda: _run_buttress_async(1, duration),
        ),
        (
            AccuracyRun(
                "buttress", "GCRA, burst=200", "20 tasks, acquire_async()", gcra_bound(200), True
            ),
            lambda: _run_buttress_async(200, duration),
        ),
        (
            AccuracyRun("buttress", "GCRA, burst=1", "4 threads, acquire()", gcra_bound(1), True),
            lambda: _run_buttress_threads(duration),
        ),
        (
            AccuracyRun(
                "buttress",
                "GCRA, burst=1",
                "1 thread spinning on try_acquire()",
                gcra_bound(1),
                True,
            ),
            lambda: _run_buttress_spin(duration),
        ),
        (
            AccuracyRun(
                "aiolimiter", "leaky bucket, capacity 200", "20 tasks, acquire()", gcra_bound(RATE)
            ),
            lambda: _run_aiolimiter(duration),
        ),
        (
            AccuracyRun(
                "limits",
                "MovingWindow (sliding log)",
                "1 thread spinning on hit()",
                log_bound(RATE),
            ),
            lambda: _run_limits("MovingWindowRateLimiter", duration),
        ),
        (
            AccuracyRun("limits", "FixedWindow", "1 thread spinning on hit()", fixed_bound(RATE)),
            lambda: _run_limits("FixedWindowRateLimiter", duration),
        ),
        (
            AccuracyRun(
                "pyrate-limiter",
                "list bucket (sliding log)",
                "20 tasks, try_acquire_async()",
                log_bound(RATE),
            ),
            lambda: _run_pyrate("log", duration),
        ),
        (
            AccuracyRun(
                "pyrate-limiter",
                "GCRA bucket, burst=1",
                "20 tasks, try_acquire_async() (default buffer_ms=50)",
                gcra_bound(1),
            ),
            lambda: _run_pyrate("gcra", duration),
        ),
        (
            AccuracyRun(
                "pyrate-limiter",
                "GCRA bucket, burst=1",
                "20 tasks, try_acquire_async(), buffer_ms=0",
                gcra_bound(1),
            ),
            lambda: _run_pyrate("gcra", duration, buffer_ms=0),
        ),
    ]
    runs = []
    for run, go in plan:
        run.duration = duration
        try:
            run.stamps = go()
        except Exception as exc:
            run.skipped = f"{type(exc).__name__}: {exc}"[:120]
        runs.append(run)
    return runs
