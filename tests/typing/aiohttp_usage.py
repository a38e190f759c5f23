"""Typed usage of the aiohttp integration, checked by ``mypy --strict src tests/typing``."""

from __future__ import annotations

from datetime import timedelta

import aiohttp
from typing_extensions import assert_type

import buttress
from buttress.integrations.aiohttp import ExchangeTimeout, ResilientMiddleware


async def middleware_usage() -> None:
    middleware = ResilientMiddleware(
        name="api",
        retry=buttress.retry(3, backoff=[0.1]),
        breaker={"failure_threshold": 3},
        limiter=buttress.RateLimiter(rate=10),
        bulkhead={"max_concurrent": 8},
        max_retry_after=timedelta(seconds=30),
        timeout=timedelta(seconds=5),
    )
    # the middleware is what ClientSession(middlewares=...) and a request's middlewares= take
    chain: tuple[aiohttp.ClientMiddlewareType, ...] = (middleware,)
    async with (
        aiohttp.ClientSession(middlewares=chain) as session,
        session.get("http://127.0.0.1:1/", middlewares=(middleware,)) as response,
    ):
        assert_type(response.status, int)
    assert_type(middleware.breakers, dict[str, buttress.CircuitBreaker])
    assert_type(middleware.bulkheads, dict[str, buttress.Bulkhead])
    assert_type(middleware.limiter, buttress.RateLimiter | None)


def timeout_error_usage(exc: ExchangeTimeout) -> None:
    assert_type(exc.timeout, float | None)
    error: aiohttp.ServerTimeoutError = exc  # an aiohttp error...
    exceeded: buttress.TimeoutExceeded = exc  # ...and a buttress one
    del error, exceeded
