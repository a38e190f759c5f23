"""Type-checked (mypy --strict), not run: the gRPC interceptors as users wire them."""

from __future__ import annotations

from concurrent import futures
from datetime import timedelta
from typing import Any, cast

import grpc
import grpc.aio
from typing_extensions import assert_type

from buttress import Bulkhead, CircuitBreaker, RateLimiter, TimeoutExceeded, retry
from buttress.integrations.grpc import (
    RETRY_CODES,
    AsyncClientInterceptor,
    AsyncServerInterceptor,
    ClientInterceptor,
    DeadlineExceeded,
    ServerInterceptor,
    parse_pushback,
)


def sync_client() -> bytes:
    interceptor = ClientInterceptor(
        "localhost:50051",
        name="users",
        retry=retry(4),
        retry_codes=RETRY_CODES | {grpc.StatusCode.ABORTED},
        max_pushback=timedelta(seconds=5),
        breaker={"failure_threshold": 5},
        limiter=RateLimiter(rate=100),
        timeout=timedelta(seconds=2),
    )
    channel = grpc.intercept_channel(grpc.insecure_channel("localhost:50051"), interceptor)
    echo = channel.unary_unary("/svc/Echo", None, None)  # raw bytes: no serializers
    try:
        response: bytes = echo(b"hi", timeout=1.0)
    except DeadlineExceeded as exc:
        assert_type(exc.code(), grpc.StatusCode)
        assert_type(exc.timeout, float | None)
        raise
    except grpc.RpcError:
        raise
    return response


async def aio_client() -> object:
    interceptor = AsyncClientInterceptor("localhost:50051", breaker=CircuitBreaker(), retry=3)
    # grpc-stubs leaves grpc.aio's interceptor list as a placeholder type: cast it.
    interceptors = [cast(Any, interceptor)]
    async with grpc.aio.insecure_channel("localhost:50051", interceptors=interceptors) as channel:
        try:
            return await channel.unary_unary("/svc/Echo", None, None)(b"hi", timeout=1.0)
        except TimeoutExceeded:
            return None


def servers() -> None:
    shed = ServerInterceptor(
        limiter=RateLimiter(rate=50), key="metadata:tenant", bulkhead=Bulkhead(max_concurrent=8)
    )
    grpc.server(futures.ThreadPoolExecutor(4), interceptors=[shed])
    grpc.aio.server(interceptors=[AsyncServerInterceptor(busy_pushback=0.5, max_wait=None)])


assert_type(parse_pushback("250"), float | None)
