"""Worker processes for the Redis backend tests (run with multiprocessing's spawn)."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import redis

from buttress import Bulkhead, CircuitBreaker, CircuitOpenError, RateLimited, RateLimiter, Saga
from buttress.backends.redis import (
    RedisBreakerStore,
    RedisBulkheadStore,
    RedisIdempotencyStore,
    RedisRateLimiterStore,
)


def limiter_worker(  # noqa: PLR0917 - Pool.starmap passes arguments by position
    url: str, prefix: str, rate: float, burst: int, seconds: float, start: float
) -> list[tuple[float, float]]:
    """Hammer one shared limiter; return each admission as (before, after) wall times."""
    store = RedisRateLimiterStore(url, prefix=prefix)
    limiter = RateLimiter("shared", rate=rate, burst=burst, max_wait=0, store=store)
    admitted: list[tuple[float, float]] = []
    while time.time() < start:
        time.sleep(0.001)
    end = start + seconds
    while True:
        before = time.time()
        if before >= end:
            break
        try:
            limiter.acquire()
        except RateLimited as exc:
            # sleep until the next slot conforms (the server said when), then race for it
            time.sleep(exc.retry_after or 0.0)
            continue
        admitted.append((before, time.time()))
    store.close()
    return admitted


def breaker_worker(url: str, prefix: str, seconds: float, start: float) -> tuple[int, int]:
    """Call a dependency that is down through a shared breaker; return (calls made, rejected)."""
    store = RedisBreakerStore(url, prefix=prefix)
    breaker = CircuitBreaker("shared", failure_threshold=3, reset_timeout=0.5, store=store)
    counter = redis.Redis.from_url(url)
    calls = rejected = 0

    @breaker
    def dependency() -> None:
        nonlocal calls
        calls += 1
        counter.rpush(f"{prefix}calls", repr(time.time()))
        time.sleep(0.002)
        raise ConnectionError("down")

    while time.time() < start:
        time.sleep(0.001)
    while time.time() < start + seconds:
        try:
            dependency()
        except ConnectionError:
            pass
        except CircuitOpenError:
            rejected += 1
            time.sleep(0.001)
    counter.close()
    store.close()
    return calls, rejected


def bulkhead_holder(url: str, prefix: str, lease: float) -> None:  # pragma: no cover - killed
    """Take both slots of a shared bulkhead, say so on stdout, and hang until killed."""
    store = RedisBulkheadStore(url, prefix=prefix, lease=lease)
    bulkhead = Bulkhead("shared", max_concurrent=2, store=store)
    bulkhead.acquire()
    bulkhead.acquire()
    print("held", flush=True)
    while True:
        time.sleep(1)


def saga_worker(url: str, prefix: str, key: str, start: float) -> str:
    """Run a saga with a shared idempotency key; its step counts executions in Redis."""
    counter = redis.Redis.from_url(url)
    saga = Saga("orders", idempotency=RedisIdempotencyStore(url, prefix=prefix))

    @saga.step("charge")
    def charge(ctx: Any) -> int:
        counter.incr(f"{prefix}executions")
        time.sleep(0.2)
        return 42

    while time.time() < start:
        time.sleep(0.001)
    result = saga.run({"order": 1}, key=key)
    counter.close()
    return f"{result.status}:{result.outputs.get('charge')}"


def httpx_worker(url: str, prefix: str) -> list[int]:
    """Another process's httpx client: its transport shares breaker and limiter state through
    Redis. Two 503s from the partner open the shared circuit; returns the statuses seen."""
    import httpx

    from buttress.integrations.httpx import ResilientTransport

    transport = ResilientTransport(
        httpx.MockTransport(lambda request: httpx.Response(503)),
        name="partner",
        retry=None,
        breaker={
            "failure_threshold": 2,
            "reset_timeout": 60,
            "store": RedisBreakerStore(url, prefix=prefix),
        },
        limiter={
            "rate": 1,
            "per": 60,
            "burst": 3,
            "max_wait": 0,
            "store": RedisRateLimiterStore(url, prefix=prefix),
        },
    )
    with httpx.Client(transport=transport) as client:
        return [client.get("http://partner.test/quote").status_code for _ in range(2)]


if __name__ == "__main__":  # python redis_workers.py bulkhead URL PREFIX LEASE
    if sys.argv[1] == "bulkhead":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        bulkhead_holder(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    os._exit(2)
