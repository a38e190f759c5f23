"""Memory of a per-key limiter, and the sweeping of idle keys.

``limiter.for_key(key)`` keeps one bucket per key. A bucket that has refilled
(nobody waiting, its theoretical arrival time in the past) carries no
information, since a new bucket starts full, so buttress drops idle buckets when
new keys arrive, and caps live buckets at ``max_keys``. All of this runs on a
``FakeClock``: time moves only when the benchmark says so.

For scale, the same measurement on the peers' in-memory logs: a sliding-window
log keeps one entry per admitted call for a whole period.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field

import buttress
from buttress.testing import FakeClock

RATE = 10.0  # per key, per second: one admission refills after 0.1 s
BURST = 5


@dataclass
class MemoryReport:
    keys: int = 0
    bytes_per_key: float = 0.0
    live_after_fill: int = 0
    sweep_batches: list[tuple[int, int]] = field(default_factory=list)  # (new keys, live keys)
    steady_steps: int = 0
    steady_new_per_step: int = 0
    steady_step_seconds: float = 0.0
    steady_active_max: int = 0
    steady_live_max: int = 0
    steady_live_last: int = 0
    cap: int = 0
    cap_touched: int = 0
    cap_live_max: int = 0
    peers: list[tuple[str, str, float | None, str]] = field(default_factory=list)


def traced(action: Callable[[], object]) -> int:
    """Bytes still allocated after ``action`` ran (traced by tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        keep = action()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del keep
    return after - before


def _limiter(clock: FakeClock, max_keys: int) -> buttress.RateLimiter:
    return buttress.RateLimiter(rate=RATE, per=1.0, burst=BURST, clock=clock, max_keys=max_keys)


def _fill_and_sweep(report: MemoryReport, keys: int) -> None:
    # 1. Bytes per live key: `keys` distinct keys, each admitted once, clock frozen.
    clock = FakeClock()
    lim = _limiter(clock, max_keys=keys * 10)
    names = [f"user-{i}" for i in range(keys)]  # allocated before tracing starts

    def fill() -> None:
        for name in names:
            lim.for_key(name).try_acquire()

    grown = traced(fill)
    report.live_after_fill = lim.keys
    report.bytes_per_key = grown / max(report.live_after_fill, 1)

    # 2. Move past the refill time: every old bucket is idle. New keys sweep them away.
    clock.advance(BURST / RATE + 0.1)
    fresh = [f"visitor-{i}" for i in range(keys)]
    batch = max(keys // 10, 1)
    for start in range(0, keys, batch):
        for name in fresh[start : start + batch]:
            lim.for_key(name).try_acquire()
        report.sweep_batches.append((start + batch, lim.keys))


def measure(keys: int) -> MemoryReport:
    report = MemoryReport(keys=keys)

    _fill_and_sweep(report, keys)
    gc.collect()

    # 3. Steady state: new keys keep arriving while time moves on.
    clock = FakeClock()
    lim = _limiter(clock, max_keys=keys * 10)
    report.steady_new_per_step = max(keys // 100, 10)
    report.steady_step_seconds = 0.02
    report.steady_steps = 200
    per_key_busy = 1.0 / RATE  # one admission keeps a bucket non-idle this long
    recent: list[float] = []
    serial = 0
    for _ in range(report.steady_steps):
        for _ in range(report.steady_new_per_step):
            lim.for_key(serial).try_acquire()
            serial += 1
        recent.append(clock.now())
        busy_since = clock.now() - per_key_busy
        active = sum(1 for t in recent if t > busy_since) * report.steady_new_per_step
        report.steady_active_max = max(report.steady_active_max, active)
        report.steady_live_max = max(report.steady_live_max, lim.keys)
        clock.advance(report.steady_step_seconds)
    report.steady_live_last = lim.keys
    del lim
    gc.collect()

    # 4. The max_keys cap, clock frozen (nothing ever goes idle).
    clock = FakeClock()
    report.cap = max(keys // 10, 100)
    lim = _limiter(clock, max_keys=report.cap)
    report.cap_touched = keys
    for index in range(keys):
        lim.for_key(index).try_acquire()
        report.cap_live_max = max(report.cap_live_max, lim.keys)
    del lim
    gc.collect()

    report.peers = _peers(min(keys, 50_000))
    return report


def _peers(calls: int) -> list[tuple[str, str, float | None, str]]:
    """Bytes per admitted call held by the peers' in-memory logs (one key)."""
    rows: list[tuple[str, str, float | None, str]] = []

    def buttress_one_key() -> object:
        lim = buttress.RateLimiter(rate=1e9, per=3600.0, burst=10**9, clock=FakeClock())
        for _ in range(calls):
            lim.try_acquire()
        return lim

    total = traced(buttress_one_key)
    rows.append(
        (
            "buttress",
            "GCRA (one float per key)",
            total / calls,
            f"constant: {total:,} bytes for the whole limiter, whatever the traffic",
        )
    )

    try:
        from pyrate_limiter import Duration, Limiter, Rate

        limiter = Limiter(Rate(10**9, Duration.HOUR))

        def pyrate() -> object:
            for _ in range(calls):
                limiter.try_acquire("memory")
            return None

        rows.append(
            (
                "pyrate-limiter",
                "list bucket (sliding log)",
                traced(pyrate) / calls,
                "one RateItem per call, kept for the period",
            )
        )
        limiter.close()
    except Exception as exc:
        rows.append(("pyrate-limiter", "list bucket", None, f"skipped: {exc}"[:100]))

    try:
        from limits import RateLimitItemPerHour, storage, strategies

        strategy = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
        item = RateLimitItemPerHour(10**9)

        def limits_moving() -> object:
            for _ in range(calls):
                strategy.hit(item, "memory")
            return None

        rows.append(
            (
                "limits",
                "MovingWindow (sliding log)",
                traced(limits_moving) / calls,
                "one Entry per call, kept for the period",
            )
        )
    except Exception as exc:
        rows.append(("limits", "MovingWindow", None, f"skipped: {exc}"[:100]))
    return rows
