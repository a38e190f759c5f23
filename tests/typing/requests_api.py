"""Type-checked (mypy --strict), not run: the requests adapter's typed surface."""

from __future__ import annotations

from datetime import timedelta

import requests
from typing_extensions import assert_type

import buttress
from buttress.integrations.requests import (
    ConnectTimeoutExceeded,
    ReadTimeoutExceeded,
    RequestTimeoutExceeded,
    ResilientAdapter,
)


def mounted() -> None:
    adapter = ResilientAdapter(
        name="api",
        retry=buttress.retry(3, backoff=[0.1]),
        breaker={"failure_threshold": 3},
        limiter=buttress.RateLimiter(rate=10),
        bulkhead={"max_concurrent": 4},
        timeout=timedelta(seconds=5),
        max_retry_after=timedelta(minutes=1),
        pool_maxsize=20,
    )
    session = requests.Session()
    session.mount("https://", adapter)
    assert_type(adapter.breakers, dict[str, buttress.CircuitBreaker])
    assert_type(adapter.bulkheads, dict[str, buttress.Bulkhead])
    assert_type(adapter.limiter, buttress.RateLimiter | None)
    response = session.get("https://api.example/", timeout=(3.05, 10))
    assert_type(adapter.retry_after(response), float | None)
    request = requests.Request("GET", "https://api.example/").prepare()
    assert_type(adapter.send(request, timeout=2.5), requests.Response)


def errors(exc: Exception) -> None:
    if isinstance(exc, ReadTimeoutExceeded):
        assert_type(exc.timeout, float | None)
        timed_out: requests.Timeout = exc
        exceeded: buttress.TimeoutExceeded = exc
        print(timed_out, exceeded)
    if isinstance(exc, ConnectTimeoutExceeded):
        connect: requests.ConnectTimeout = exc
        base: RequestTimeoutExceeded = exc
        print(connect, base)
