"""Soak: a full pipeline under 1,000 concurrent async callers and 16 threads, with faults.

The pipeline is ``fallback -> timeout -> retry -> breaker -> bulkhead -> limiter`` and the
protected dependency fails on purpose: transient errors (retried), fatal errors (not
retried), latency spikes, hangs (cut off by the timeout), storms of failures (which
open the circuit), and callers cancelled mid-call. The async callers and the threads
share the same primitives. Real time is used here, and only here: the point is the
interleavings a real event loop and real threads produce. The run is two halves;
after each, every caller has finished and the process is measured.

What must hold afterwards:

- every call ended in a result, the fallback value or a documented error (the
  injected errors themselves, ``TimeoutExceeded``, ``CircuitOpenError``,
  ``BulkheadFull``, ``RateLimited``, or ``CancelledError`` for a call we cancelled);
  any other exception type fails the test;
- nothing leaked: no bulkhead slot in flight or queued, no limiter waiter, no
  half-open probe slot, no task left on the loop, no thread beyond the baseline, no
  unretrieved task exception, and the memory traced by ``tracemalloc`` does not grow
  from the end of the first half to the end of the second;
- the books balance: every permit the limiter granted was used by exactly one call of
  the dependency.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import random
import threading
import time
import tracemalloc
from typing import Any

import pytest
from reliability_support import LONG, scaled

from buttress import (
    Bulkhead,
    BulkheadFull,
    CircuitBreaker,
    RateLimiter,
    backoff,
    fallback,
    pipeline,
    retry,
    timeout,
)

SECONDS = scaled(10, 60)
ASYNC_CALLERS = 1000
THREADS = 16
# Each caller pauses up to this long (uniformly) between calls: 1,000 callers then offer
# a few thousand calls per second, enough to keep the bulkhead's queue busy without
# starving the event loop (a starved loop only measures itself).
THINK = 0.3
# Memory the second half may add over the first (allocator and interpreter noise:
# free lists, interned strings, the event loop's own structures). A leak of even a
# few bytes per call would exceed it: each half makes tens of thousands of calls.
GROWTH_LIMIT = 512 * 1024


class InjectedTransient(ConnectionError):
    """An injected transient error (retried)."""


class InjectedFatal(ValueError):
    """An injected error that is not retried."""


DOCUMENTED = {
    "ok",
    "fallback",
    "InjectedTransient",
    "InjectedFatal",
    "TimeoutExceeded",
    "CircuitOpenError",
    "RateLimited",
    "CancelledError",  # only for a call the caller itself cancelled
}


class Dependency:
    """The protected call: draws a fault per attempt; counts what it was asked to do."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries = 0
        self.faults: collections.Counter[str] = collections.Counter()
        self.storm_until = 0.0

    def draw(self, rng: random.Random) -> str:
        with self.lock:
            self.entries += 1
        if time.monotonic() < self.storm_until and rng.random() < 0.9:
            fault = "storm"
        else:
            roll = rng.random()
            if roll < 0.80:
                return "ok"
            fault = (
                "transient"
                if roll < 0.90
                else "fatal"
                if roll < 0.93
                else "latency"
                if roll < 0.99
                else "hang"
            )
        with self.lock:
            self.faults[fault] += 1
        return fault

    async def call_async(self, rng: random.Random) -> str:
        fault = self.draw(rng)
        if fault == "ok":
            await asyncio.sleep(rng.random() * 0.002)
            return "ok"
        if fault in ("transient", "storm"):
            raise InjectedTransient(fault)
        if fault == "fatal":
            raise InjectedFatal(fault)
        await asyncio.sleep(0.02 + rng.random() * 0.04 if fault == "latency" else 3600)
        return "ok"

    def call_sync(self, rng: random.Random) -> str:
        fault = self.draw(rng)
        if fault == "ok":
            time.sleep(rng.random() * 0.001)
            return "ok"
        if fault in ("transient", "storm"):
            raise InjectedTransient(fault)
        if fault == "fatal":
            raise InjectedFatal(fault)
        # A sync call cannot be interrupted: a "hang" is a call that outlives the deadline.
        time.sleep(0.02 + rng.random() * 0.04 if fault == "latency" else 0.6)
        return "ok"


def outcome_of(call: Any) -> str:
    try:
        result = call()
    except BaseException as exc:  # every outcome is tallied, then judged
        return type(exc).__name__
    return str(result)


async def outcome_of_async(call: Any) -> str:
    try:
        result = await call()
    except BaseException as exc:
        return type(exc).__name__
    return str(result)


@pytest.mark.slow
@pytest.mark.timeout(SECONDS * 3 + 60)
def test_soak_full_pipeline_leaks_nothing_and_fails_only_as_documented(figures):
    """1,000 async callers and 16 threads through a faulty pipeline; then no leaks."""
    breaker = CircuitBreaker(
        "soak", failure_threshold=25, reset_timeout=0.25, half_open_max_calls=4
    )
    bulkhead = Bulkhead("soak", max_concurrent=200, max_queue=400, max_wait=0.1)
    limiter = RateLimiter("soak", rate=40_000, burst=400, max_wait=0.02)
    policies = pipeline(
        fallback("fallback", on=BulkheadFull),
        timeout(0.5),
        retry(3, on=ConnectionError, backoff=backoff.exponential(0.001, 2.0, 0.01)),
        breaker,
        bulkhead,
        limiter,
    )
    dependency = Dependency()

    @policies
    async def call_async(rng: random.Random) -> str:
        return await dependency.call_async(rng)

    @policies
    def call_sync(rng: random.Random) -> str:
        return dependency.call_sync(rng)

    outcomes: collections.Counter[str] = collections.Counter()
    outcomes_lock = threading.Lock()
    cancelled_by_us = 0
    loop_errors: list[dict[str, Any]] = []
    thread_errors: list[BaseException] = []
    storms = 0

    def thread_caller(seed: int, stop: float) -> None:
        rng = random.Random(seed)
        local: collections.Counter[str] = collections.Counter()
        try:
            while time.monotonic() < stop:
                local[outcome_of(lambda: call_sync(rng))] += 1
                time.sleep(rng.random() * THINK)
        except BaseException as exc:  # pragma: no cover - reported below
            thread_errors.append(exc)
        with outcomes_lock:
            outcomes.update(local)

    async def async_caller(seed: int, stop: float) -> None:
        nonlocal cancelled_by_us
        rng = random.Random(seed)
        local: collections.Counter[str] = collections.Counter()
        while time.monotonic() < stop:
            if rng.random() < 0.02:
                # Cancel this call from outside after a random delay.
                task = asyncio.ensure_future(call_async(rng))
                await asyncio.sleep(rng.random() * 0.03)
                ours = not task.done()
                if ours:
                    task.cancel()
                    cancelled_by_us += 1
                outcome = await outcome_of_async(lambda t=task: t)
                if outcome == "CancelledError" and not ours:
                    outcome = "CancelledError (not by the caller)"
                local[outcome] += 1
            else:
                outcome = await outcome_of_async(lambda: call_async(rng))
                if outcome == "CancelledError":
                    outcome = "CancelledError (not by the caller)"
                local[outcome] += 1
            await asyncio.sleep(rng.random() * THINK)
        with outcomes_lock:
            outcomes.update(local)

    async def weather(stop: float) -> None:
        """Every 1.5 s, a 0.1 s storm of failures: the circuit opens and recovers."""
        nonlocal storms
        while time.monotonic() + 1.5 < stop:
            await asyncio.sleep(1.5)
            dependency.storm_until = time.monotonic() + 0.1
            storms += 1

    async def half(seed: int, seconds: float) -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
        stop = time.monotonic() + seconds
        threads = [
            threading.Thread(target=thread_caller, args=(seed * 100 + n, stop), daemon=True)
            for n in range(THREADS)
        ]
        for thread in threads:
            thread.start()
        await asyncio.gather(
            weather(stop), *(async_caller(seed * 10_000 + n, stop) for n in range(ASYNC_CALLERS))
        )
        await asyncio.to_thread(lambda: [thread.join() for thread in threads])
        assert asyncio.all_tasks() == {asyncio.current_task()}, "tasks left behind"

    def quiet_memory() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    baseline_threads = threading.active_count()
    tracemalloc.start()
    try:
        asyncio.run(half(1, SECONDS / 2))
        first = quiet_memory()
        calls_first = sum(outcomes.values())
        asyncio.run(half(2, SECONDS / 2))
        second = quiet_memory()
    finally:
        tracemalloc.stop()
    growth = second - first

    calls = sum(outcomes.values())
    leaks = {
        "bulkhead_in_flight": bulkhead.in_flight,
        "bulkhead_queued": bulkhead.queued,
        "limiter_waiting": limiter.snapshot()["waiting"],
        "half_open_probes": breaker.snapshot()["half_open_probes"],
        "extra_threads": max(threading.active_count() - baseline_threads, 0),
        "loop_errors": len(loop_errors),
        "thread_errors": len(thread_errors),
        "memory_growth_over_limit": int(growth > GROWTH_LIMIT),
    }
    figures.add(
        "soak",
        mode="long" if LONG else "bounded",
        seconds=SECONDS,
        async_callers=ASYNC_CALLERS,
        threads=THREADS,
        calls=calls,
        calls_per_half=[calls_first, calls - calls_first],
        attempts=dependency.entries,
        faults_injected=sum(dependency.faults.values()) + cancelled_by_us,
        faults=dict(dependency.faults) | {"cancelled_by_caller": cancelled_by_us},
        storms=storms,
        outcomes=dict(outcomes),
        breaker=breaker.snapshot(),
        memory_growth_bytes=growth,
        leaks=leaks,
        leaks_found=sum(leaks.values()),
    )
    undocumented = set(outcomes) - DOCUMENTED
    assert not undocumented, f"undocumented outcomes: { {k: outcomes[k] for k in undocumented} }"
    assert not thread_errors, thread_errors
    assert not loop_errors, loop_errors[:3]
    assert outcomes["CancelledError"] <= cancelled_by_us
    assert leaks == dict.fromkeys(leaks, 0), leaks
    # Every permit the limiter granted went to exactly one call of the dependency.
    assert limiter.snapshot()["admitted"] == dependency.entries
    # The faults really happened, and so did every kind of outcome they cause.
    assert calls > 2_000
    for kind in ("ok", "fallback", "InjectedFatal", "TimeoutExceeded", "CircuitOpenError"):
        assert outcomes[kind] > 0, (kind, outcomes)
    assert breaker.snapshot()["failures"] > 0
