"""ASGI middleware and apps, driven over real HTTP: uvicorn on 127.0.0.1 (port 0), httpx.

Proves that the middleware sheds with the right status and Retry-After, that a slot or a
permit never leaks, and that the health and state apps answer with the right status and
content type, served alone and mounted in Starlette and FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import uvicorn

import buttress
from buttress import Bulkhead, ButtressError, CircuitBreaker, RateLimiter
from buttress.circuit_breaker import LocalBreaker
from buttress.integrations.asgi import (
    LoadSheddingMiddleware,
    Receive,
    Scope,
    Send,
    _retry_after_seconds,
    client_ip,
    health_app,
    liveness_app,
    readiness_app,
    state_app,
)
from buttress.testing import FakeClock
from services import BindingStore


@contextlib.contextmanager
def serve(app: Any, *, lifespan: str = "off") -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on 127.0.0.1, port 0; yield its base URL."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan=lifespan,
        ws="none",
        http="h11",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn failed to start"
        assert time.monotonic() < deadline, "uvicorn did not start in time"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class Hello:
    """A trivial ASGI app; ``/slow`` waits until ``gate`` is set."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.calls += 1
        if scope["path"] == "/slow":
            while not self.gate.is_set():
                await asyncio.sleep(0.005)
        if scope["path"] == "/boom":
            raise RuntimeError("application error")
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}
        )
        await send({"type": "http.response.body", "body": b"hello"})


# -- rate limiting -----------------------------------------------------------------------------


def test_over_the_rate_gets_429_with_the_limiter_retry_after():
    """Third request in a burst of 2 (1 per 10 s): 429, Retry-After 10; later 7 after 3.5 s."""
    clock = FakeClock()
    limiter = RateLimiter("door", rate=1, per=10, burst=2, clock=clock)
    app = Hello()
    with serve(LoadSheddingMiddleware(app, limiter=limiter)) as url, httpx.Client() as http:
        assert http.get(url).status_code == 200
        assert http.get(url).status_code == 200
        shed = http.get(url)
        assert shed.status_code == 429
        assert shed.headers["retry-after"] == "10"
        clock.advance(3.5)
        assert http.get(url).headers["retry-after"] == "7"  # 6.5 s rounded up
        clock.advance(6.5)
        assert http.get(url).status_code == 200
    assert app.calls == 3
    assert buttress.state()["rate_limiter"]["door"]["rejected"] == 2


def test_keys_by_header_with_client_ip_fallback():
    """Each API key has its own bucket; requests without the header share the client's."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, per=60, clock=clock)
    middleware = LoadSheddingMiddleware(Hello(), limiter=limiter, key="header:X-API-Key")
    with serve(middleware) as url, httpx.Client() as http:
        assert http.get(url, headers={"x-api-key": "a"}).status_code == 200
        assert http.get(url, headers={"x-api-key": "a"}).status_code == 429
        assert http.get(url, headers={"x-api-key": "b"}).status_code == 200
        assert http.get(url).status_code == 200  # keyed by 127.0.0.1
        assert http.get(url).status_code == 429
    assert limiter.keys == 3


def test_key_function_none_means_unlimited():
    """A key function returning None lets the request through unlimited."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, per=60, clock=clock)

    def key(scope: Scope) -> str | None:
        return None if scope["path"].startswith("/internal") else client_ip(scope)

    middleware = LoadSheddingMiddleware(Hello(), limiter=limiter, key=key)
    with serve(middleware) as url, httpx.Client(base_url=url) as http:
        assert [http.get("/internal").status_code for _ in range(3)] == [200] * 3
        assert [http.get("/").status_code for _ in range(2)] == [200, 429]


def test_max_wait_queues_instead_of_shedding():
    """With max_wait, a request over the rate waits for its permit and is served."""
    limiter = RateLimiter(rate=20, burst=1)  # one permit every 50 ms
    middleware = LoadSheddingMiddleware(Hello(), limiter=limiter, max_wait=1.0)
    with serve(middleware) as url, httpx.Client() as http:
        started = time.monotonic()
        assert [http.get(url).status_code for _ in range(4)] == [200] * 4
        assert time.monotonic() - started >= 0.14


def test_exempt_paths_are_never_shed():
    """Paths under an exempt prefix bypass the limiter."""
    limiter = RateLimiter(rate=1, per=60, clock=FakeClock())
    middleware = LoadSheddingMiddleware(Hello(), limiter=limiter, exempt=("/health",))
    with serve(middleware) as url, httpx.Client(base_url=url) as http:
        assert http.get("/").status_code == 200
        assert http.get("/").status_code == 429
        assert [http.get("/health/live").status_code for _ in range(3)] == [200] * 3


def test_retry_after_rounding():
    """Rounded up to whole seconds, at least 1, without float noise adding a second."""
    assert _retry_after_seconds(0.001) == 1
    assert _retry_after_seconds(1.0) == 1
    assert _retry_after_seconds(1.2) == 2
    assert _retry_after_seconds(2.0000000001) == 2
    assert _retry_after_seconds(None) == 1
    assert _retry_after_seconds(0.0) == 1


# -- bulkhead ----------------------------------------------------------------------------------


def test_saturated_bulkhead_answers_503_and_frees_its_slot():
    """While one slow request holds the only slot, the next gets 503; then it is served."""
    app = Hello()
    bulkhead = Bulkhead("door", max_concurrent=1)
    with (
        serve(LoadSheddingMiddleware(app, bulkhead=bulkhead)) as url,
        httpx.Client(base_url=url) as http,
        ThreadPoolExecutor(1) as pool,
    ):
        slow = pool.submit(http.get, "/slow")
        while bulkhead.in_flight == 0:
            time.sleep(0.005)
        busy = http.get("/")
        assert busy.status_code == 503
        assert "retry-after" not in busy.headers
        app.gate.set()
        assert slow.result(5).status_code == 200
        assert http.get("/").status_code == 200
    assert bulkhead.in_flight == 0
    assert buttress.state()["bulkhead"]["door"]["rejected"] == 1


def test_busy_retry_after_and_slot_released_on_app_errors():
    """busy_retry_after adds Retry-After to 503s; an app that raises gives its slot back."""
    app = Hello()
    bulkhead = Bulkhead(max_concurrent=1)
    middleware = LoadSheddingMiddleware(app, bulkhead=bulkhead, busy_retry_after=2.5)
    with (
        serve(middleware) as url,
        httpx.Client(base_url=url) as http,
        ThreadPoolExecutor(1) as pool,
    ):
        assert http.get("/boom").status_code == 500
        assert bulkhead.in_flight == 0
        slow = pool.submit(http.get, "/slow")
        while bulkhead.in_flight == 0:
            time.sleep(0.005)
        assert http.get("/").headers["retry-after"] == "3"
        app.gate.set()
        slow.result(5)
    assert bulkhead.in_flight == 0


def test_bulkhead_queue_with_max_wait():
    """With max_wait=None the bulkhead's own queue applies: a queued request is served."""
    app = Hello()
    bulkhead = Bulkhead(max_concurrent=1, max_queue=1)
    middleware = LoadSheddingMiddleware(app, bulkhead=bulkhead, max_wait=None)
    with (
        serve(middleware) as url,
        httpx.Client(base_url=url) as http,
        ThreadPoolExecutor(2) as pool,
    ):
        first = pool.submit(http.get, "/slow")
        while bulkhead.in_flight == 0:
            time.sleep(0.005)
        second = pool.submit(http.get, "/")
        while bulkhead.queued == 0:
            time.sleep(0.005)
        assert http.get("/").status_code == 503  # no room left in the queue
        app.gate.set()
        assert first.result(5).status_code == 200
        assert second.result(5).status_code == 200
    assert bulkhead.in_flight == 0


def test_rate_limit_then_bulkhead_in_one_middleware():
    """Both guards together: a 429 never takes a bulkhead slot."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, per=60, clock=clock)
    bulkhead = Bulkhead(max_concurrent=5)
    middleware = LoadSheddingMiddleware(Hello(), limiter=limiter, bulkhead=bulkhead)
    with serve(middleware) as url, httpx.Client() as http:
        assert http.get(url).status_code == 200
        assert http.get(url).status_code == 429
    assert bulkhead.snapshot()["accepted"] == 1
    assert bulkhead.in_flight == 0


def test_middleware_validation():
    """Bad options raise the library's config errors."""
    with pytest.raises(ValueError, match="key must be"):
        LoadSheddingMiddleware(Hello(), key="cookie:x")
    with pytest.raises(TypeError, match="limiter must be"):
        LoadSheddingMiddleware(Hello(), limiter=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bulkhead must be"):
        LoadSheddingMiddleware(Hello(), bulkhead=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_wait"):
        LoadSheddingMiddleware(Hello(), max_wait=-1)
    with pytest.raises(TypeError, match="exempt must be"):
        LoadSheddingMiddleware(Hello(), exempt="/health")
    with pytest.raises(TypeError, match="app must be") as info:
        LoadSheddingMiddleware(None)  # type: ignore[arg-type]
    assert isinstance(info.value, ButtressError)


# -- health and state apps --------------------------------------------------------------------


def test_health_app_200_then_503_with_health_json():
    """Served alone by uvicorn (lifespan on): pass -> 200, an open breaker that is not
    critical -> 200 warn (degraded), an open critical breaker -> 503 fail."""
    clock = FakeClock()
    breaker = CircuitBreaker("payments", failure_threshold=1, clock=clock, critical=True)
    optional = CircuitBreaker("recommendations", clock=clock)
    with serve(health_app(), lifespan="on") as url, httpx.Client() as http:
        ok = http.get(url + "/anything")
        assert ok.status_code == 200
        assert ok.headers["content-type"] == "application/health+json"
        assert ok.json()["status"] == "pass"
        optional.open()
        degraded = http.get(url)
        assert degraded.status_code == 200
        assert degraded.json()["status"] == "warn"
        assert degraded.json()["checks"]["recommendations:circuit_breaker"][0]["status"] == "fail"
        breaker.open()
        failing = http.get(url)
        assert failing.status_code == 503
        assert failing.headers["content-type"] == "application/health+json"
        report = failing.json()
        assert report["status"] == "fail"
        assert report["checks"]["payments:circuit_breaker"][0]["observedValue"] == "open"
        head = http.head(url)
        assert head.status_code == 503 and head.content == b""
        post = http.post(url)
        assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"


def test_state_app_serves_state_as_json():
    """state_app returns buttress.state() as application/json."""
    search = RateLimiter("search", rate=5, clock=FakeClock())  # registered while alive
    with serve(state_app(), lifespan="on") as url, httpx.Client() as http:
        response = http.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == json.loads(json.dumps(buttress.state()))
    assert response.json()["rate_limiter"]["search"]["rate"] == search.rate == 5


def test_apps_report_on_a_given_registry():
    """registry= pins the apps to one registry instead of the default one."""
    registry = buttress.Registry()
    breaker = CircuitBreaker("private", registry=registry, critical=True)
    breaker.open()

    async def main() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=health_app(registry))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            mine = await http.get("/")
        transport = httpx.ASGITransport(app=health_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            default = await http.get("/")
        return mine, default

    mine, default = asyncio.run(main())
    assert mine.status_code == 503
    assert default.status_code == 200
    with pytest.raises(TypeError, match="registry must be"):
        health_app({})  # type: ignore[arg-type]


# -- mounted in frameworks --------------------------------------------------------------------


def test_mounted_in_fastapi_over_http():
    """FastAPI: the middleware sheds /api, the health route is exempt and reports."""
    from fastapi import FastAPI

    clock = FakeClock()
    app = FastAPI()

    @app.get("/api/items")
    async def items() -> dict[str, list[int]]:
        return {"items": [1, 2]}

    app.add_route("/health", health_app())
    app.add_route("/state", state_app())
    app.add_middleware(
        LoadSheddingMiddleware,
        limiter=RateLimiter("api", rate=1, per=30, clock=clock),
        exempt=("/health", "/state"),
    )
    with serve(app, lifespan="on") as url, httpx.Client(base_url=url) as http:
        assert http.get("/api/items").json() == {"items": [1, 2]}
        shed = http.get("/api/items")
        assert shed.status_code == 429 and shed.headers["retry-after"] == "30"
        for _ in range(3):
            health = http.get("/health")
            assert health.status_code == 200
            assert health.headers["content-type"] == "application/health+json"
        assert http.get("/state").json()["rate_limiter"]["api"]["rejected"] == 1


def test_mounted_in_starlette_over_http():
    """Starlette: Route and Mount both serve the apps; the middleware wraps the app."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def home(request: object) -> PlainTextResponse:
        return PlainTextResponse("home")

    bulkhead = Bulkhead("web", max_concurrent=10)
    app = Starlette(
        routes=[
            Route("/", home),
            Route("/health", health_app()),
            Route("/livez", liveness_app()),
            Route("/readyz", readiness_app()),
            Mount("/ops", routes=[Mount("/state", state_app())]),
        ],
        middleware=[Middleware(LoadSheddingMiddleware, bulkhead=bulkhead)],
    )
    breaker = CircuitBreaker("db", failure_threshold=1, critical=True)
    with serve(app, lifespan="on") as url, httpx.Client(base_url=url) as http:
        assert http.get("/").text == "home"
        assert http.get("/health").status_code == 200
        assert http.get("/readyz").status_code == 200
        breaker.open()
        assert http.get("/health").status_code == 503
        assert http.get("/readyz").status_code == 503
        assert http.get("/livez").status_code == 200
        state = http.get("/ops/state/")
        assert state.headers["content-type"] == "application/json"
        assert state.json()["circuit_breaker"]["db"]["state"] == "open"
    assert bulkhead.in_flight == 0


class _SlowStatus(LocalBreaker):
    """A breaker binding whose status() takes a blocking round trip (a hung server)."""

    def status(self) -> Any:
        time.sleep(0.2)
        return super().status()


def test_the_health_app_never_blocks_the_event_loop_on_a_slow_store():
    """A report that waits on a store is built off the loop: a 1 ms ticker keeps ticking."""
    registry = buttress.Registry()
    CircuitBreaker("slow-store", store=BindingStore(_SlowStatus), registry=registry)

    async def main() -> float:
        worst = 0.0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal worst
            while not stop.is_set():
                started = time.perf_counter()
                await asyncio.sleep(0.001)
                worst = max(worst, time.perf_counter() - started)

        ticking = asyncio.ensure_future(ticker())
        transport = httpx.ASGITransport(app=health_app(registry))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.get("/")).status_code == 200
        stop.set()
        await ticking
        return worst

    assert asyncio.run(main()) < 0.1  # the report took 0.2 s, on another thread
