"""aiohttp middleware: HTTP retry semantics, Retry-After, budgets, breakers and limits per host.

Every test runs a real ``aiohttp.ClientSession`` against a real ``aiohttp.web`` server on
127.0.0.1 (an ephemeral port) that fails on demand: statuses, Retry-After, delays,
dropped connections. Waits go to a ``FakeClock`` where a test pins their lengths.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import aiohttp
import pytest
from aiohttp import web

import buttress
from buttress import (
    Bulkhead,
    BulkheadFull,
    CircuitOpenError,
    ConfigTypeError,
    RateLimited,
    TimeoutExceeded,
    retry,
)
from buttress.bulkhead import LocalBulkhead
from buttress.integrations.aiohttp import ExchangeTimeout, ResilientMiddleware
from buttress.testing import FakeClock
from http_server import Act  # the same scripted answers as the httpx and requests tests

# -- a real aiohttp.web server that fails on demand ---------------------------------------------


class Server:
    """Per path, the answers to give in order (the last one repeats); counts every hit
    and every client connection."""

    def __init__(self) -> None:
        self.routes: dict[str, list[Act]] = {}
        self.hits: Counter[tuple[str, str]] = Counter()
        self.peers: set[object] = set()
        self.url = ""
        self.gate = asyncio.Event()  # "/gated" bodies end when it is set

    def on(self, path: str, *acts: Act) -> str:
        self.routes[path] = list(acts)
        return self.url + path

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[(request.method, request.path)] += 1
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        await request.read()
        if request.path == "/trickle":  # a 503 whose body never ends
            response = web.StreamResponse(status=503)
            await response.prepare(request)
            await response.write(b"x")
            await asyncio.sleep(5)
            return response
        if request.path == "/gated":  # a 200 whose body ends when the test says so
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"first ")
            await self.gate.wait()
            await response.write(b"last")
            return response
        acts = self.routes.get(request.path) or [Act()]
        act = acts.pop(0) if len(acts) > 1 else acts[0]
        if act.delay:
            await asyncio.sleep(act.delay)
        if act.drop:
            request.transport.close()
            raise asyncio.CancelledError  # the connection is gone: nothing to answer
        headers = dict(act.headers)
        if act.retry_after_date is not None:
            headers["Retry-After"] = email.utils.formatdate(
                time.time() + act.retry_after_date, usegmt=True
            )
        return web.Response(status=act.status, body=act.body, headers=headers)


@asynccontextmanager
async def serving() -> AsyncIterator[Server]:
    server = Server()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


def run(main: Callable[[Server], Awaitable[Any]]) -> Any:
    """``main(server)`` on a fresh loop, with a server for the test."""

    async def outer() -> Any:
        async with serving() as server:
            return await main(server)

    return asyncio.run(outer())


def session(
    middleware: ResilientMiddleware, timeout: aiohttp.ClientTimeout | None = None
) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        middlewares=(middleware,), timeout=timeout or aiohttp.ClientTimeout(total=10)
    )


# -- what is retried ----------------------------------------------------------------------------


def test_retry_after_seconds_sets_the_wait(clock: FakeClock) -> None:
    """A 503 with ``Retry-After: 2`` is retried after 2 s (not the 0.1 s backoff)."""

    async def main(server: Server) -> tuple[int, str]:
        url = server.on("/items", Act(503, {"Retry-After": "2"}), Act(200, body=b"apples"))
        mw = ResilientMiddleware(retry=retry(3, backoff=[0.1], clock=clock), clock=clock)
        async with session(mw) as client, client.get(url) as response:
            return response.status, await response.text()

    assert run(main) == (200, "apples")
    assert clock.sleeps == [2.0]


def test_retry_after_http_date_is_read_against_the_server_date(clock: FakeClock) -> None:
    """``Retry-After`` as an HTTP-date waits until that date by the response's ``Date``."""

    async def main(server: Server) -> int:
        url = server.on("/d", Act(503, retry_after_date=3.0), Act(200))
        mw = ResilientMiddleware(retry=retry(3, backoff=[0.0], clock=clock), clock=clock)
        async with session(mw) as client, client.get(url) as response:
            return response.status

    assert run(main) == 200
    (wait,) = clock.sleeps
    assert 1.5 <= wait <= 4.0  # HTTP-dates have whole seconds


def test_retry_after_is_capped(clock: FakeClock) -> None:
    """A ``Retry-After`` longer than ``max_retry_after`` is cut to it."""

    async def main(server: Server) -> int:
        url = server.on("/c", Act(429, {"Retry-After": "3600"}), Act(200))
        mw = ResilientMiddleware(
            retry=retry(3, backoff=[0.0], clock=clock), max_retry_after=5, clock=clock
        )
        async with session(mw) as client, client.get(url) as response:
            return response.status

    assert run(main) == 200
    assert clock.sleeps == [5.0]


def test_statuses_that_run_out_return_the_last_response(clock: FakeClock) -> None:
    """When status retries run out the last response is returned, not raised."""

    async def main(server: Server) -> tuple[int, int]:
        url = server.on("/down", Act(503))
        mw = ResilientMiddleware(retry=retry(3, backoff=[0.0], clock=clock), clock=clock)
        async with session(mw) as client, client.get(url) as response:
            return response.status, server.hits[("GET", "/down")]

    assert run(main) == (503, 3)


def test_post_is_not_retried_on_a_status(clock: FakeClock) -> None:
    """POST is not idempotent: a 503 answer is returned after one attempt."""

    async def main(server: Server) -> tuple[int, int]:
        url = server.on("/orders", Act(503), Act(200))
        mw = ResilientMiddleware(retry=retry(3, backoff=[0.0], clock=clock), clock=clock)
        async with session(mw) as client, client.post(url, data=b"{}") as response:
            return response.status, server.hits[("POST", "/orders")]

    assert run(main) == (503, 1)


def test_post_is_retried_when_it_provably_never_left(clock: FakeClock) -> None:
    """A refused connection proves the POST was never sent: it is retried anyway."""

    async def main(server: Server) -> None:
        mw = ResilientMiddleware(retry=retry(3, backoff=[0.5], clock=clock), clock=clock)
        async with session(mw) as client:
            # a port nobody listens on (the server's own port, once it is gone, is not
            # safe to reuse: bind one and close it)
            probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
            port = probe.sockets[0].getsockname()[1]
            probe.close()
            await probe.wait_closed()
            await client.post(f"http://127.0.0.1:{port}/x", data=b"{}")

    with pytest.raises(aiohttp.ClientConnectorError):
        run(main)
    assert clock.sleeps == [0.5, 0.5]


def test_post_timeout_is_not_retried_and_names_the_timeout(clock: FakeClock) -> None:
    """A POST whose answer times out may have been processed: it is not retried, and the
    aiohttp timeout error says which ClientTimeout value ran out."""

    async def main(server: Server) -> None:
        url = server.on("/slow", Act(delay=1.0))
        mw = ResilientMiddleware(retry=retry(3, backoff=[0.0], clock=clock), clock=clock)
        timeout = aiohttp.ClientTimeout(total=10, sock_read=0.2)
        async with session(mw, timeout) as client:
            await client.post(url, data=b"{}")

    with pytest.raises(aiohttp.SocketTimeoutError, match=r"sock_read=0\.2s") as caught:
        run(main)
    assert isinstance(caught.value, asyncio.TimeoutError)
    assert clock.sleeps == []


def test_get_timeout_is_retried_then_raised_as_aiohttp_timeout(clock: FakeClock) -> None:
    """A GET whose answer times out is retried; the last timeout keeps aiohttp's type."""
    hits: list[int] = []

    async def main(server: Server) -> None:
        url = server.on("/slow", Act(delay=1.0))
        mw = ResilientMiddleware(retry=retry(3, backoff=[0.0], clock=clock), clock=clock)
        timeout = aiohttp.ClientTimeout(total=10, sock_read=0.2)
        try:
            async with session(mw, timeout) as client:
                await client.get(url)
        finally:
            hits.append(server.hits[("GET", "/slow")])

    with pytest.raises(aiohttp.ServerTimeoutError, match=r"sock_read=0\.2s"):
        run(main)
    assert hits == [3]


def test_a_connect_timeout_is_retried_for_post_and_names_the_timeout(clock: FakeClock) -> None:
    """A connect timeout proves the request never left: a POST is retried too, and the
    error that ends the retries names the connect timeouts that were configured."""
    attempts: list[str] = []

    async def unreachable(request: aiohttp.ClientRequest, handler: Any) -> aiohttp.ClientResponse:
        attempts.append(request.method)  # stands in for a host that never accepts
        raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {request.url}")

    async def main(server: Server) -> None:
        mw = ResilientMiddleware(retry=retry(3, backoff=[0.0], clock=clock), clock=clock)
        timeout = aiohttp.ClientTimeout(total=10, connect=2, sock_connect=1)
        async with aiohttp.ClientSession(middlewares=(mw, unreachable), timeout=timeout) as client:
            await client.post(server.on("/never"), data=b"{}")

    with pytest.raises(aiohttp.ConnectionTimeoutError, match=r"connect=2s and sock_connect=1s"):
        run(main)
    assert attempts == ["POST", "POST", "POST"]


def test_a_dropped_connection_is_retried(clock: FakeClock) -> None:
    """The server closing the connection without an answer is retried (GET)."""

    async def main(server: Server) -> tuple[int, int]:
        url = server.on("/flaky", Act(drop=True), Act(200))
        mw = ResilientMiddleware(retry=retry(3, backoff=[0.0], clock=clock), clock=clock)
        async with session(mw) as client, client.get(url) as response:
            return response.status, server.hits[("GET", "/flaky")]

    assert run(main) == (200, 2)


def test_a_body_that_cannot_be_replayed_is_never_retried(clock: FakeClock) -> None:
    """A streamed (async generator) body is sent once, whatever ``retry_methods`` say."""

    async def body() -> AsyncIterator[bytes]:
        yield b"part"

    async def main(server: Server) -> tuple[int, int]:
        url = server.on("/upload", Act(503), Act(200))
        mw = ResilientMiddleware(
            retry=retry(3, backoff=[0.0], clock=clock), retry_methods={"PUT"}, clock=clock
        )
        async with session(mw) as client, client.put(url, data=body()) as response:
            return response.status, server.hits[("PUT", "/upload")]

    assert run(main) == (503, 1)


def test_discarded_responses_are_released_so_the_connection_is_reused(clock: FakeClock) -> None:
    """Retried responses are read and released: the attempts share one connection."""

    async def main(server: Server) -> tuple[int, int]:
        url = server.on("/r", Act(503, body=b"x" * 1000), Act(502, body=b"y" * 1000), Act(200))
        mw = ResilientMiddleware(retry=retry(3, backoff=[0.0], clock=clock), clock=clock)
        async with session(mw) as client, client.get(url) as response:
            return response.status, len(server.peers)

    assert run(main) == (200, 1)


def test_a_large_discarded_response_is_closed_not_drained(clock: FakeClock) -> None:
    """A retried response bigger than the drain limit is closed (a new connection)."""

    async def main(server: Server) -> tuple[int, int]:
        url = server.on("/big", Act(503, body=b"x" * 1_000_000), Act(200))
        mw = ResilientMiddleware(retry=retry(3, backoff=[0.0], clock=clock), clock=clock)
        async with session(mw) as client, client.get(url) as response:
            return response.status, len(server.peers)

    assert run(main) == (200, 2)


# -- budgets and timeouts -----------------------------------------------------------------------


def test_no_wait_past_the_sessions_total_timeout(clock: FakeClock) -> None:
    """A Retry-After longer than the time left in ``ClientTimeout.total`` is not waited
    for: the 503 is returned at once."""

    async def main(server: Server) -> int:
        url = server.on("/later", Act(503, {"Retry-After": "5"}), Act(200))
        mw = ResilientMiddleware(retry=retry(3, backoff=[0.0], clock=clock), clock=clock)
        async with (
            session(mw, aiohttp.ClientTimeout(total=2)) as client,
            client.get(url) as response,
        ):
            return response.status

    assert run(main) == 503
    assert clock.sleeps == []


def test_an_enclosing_buttress_timeout_bounds_every_attempt() -> None:
    """An enclosing ``buttress.timeout`` cuts the attempt in flight and plans no retry
    past it; the caller gets its ``TimeoutExceeded`` (an ``asyncio.TimeoutError``)."""

    async def main(server: Server) -> float:
        url = server.on("/hang", Act(delay=5.0))
        mw = ResilientMiddleware(retry=retry(5, backoff=[0.01]))
        started = time.monotonic()
        async with session(mw) as client:
            with pytest.raises(TimeoutExceeded, match=r"0\.3s") as caught:
                async with buttress.timeout(0.3):
                    await client.get(url)
        assert isinstance(caught.value, TimeoutError)
        return time.monotonic() - started

    assert run(main) < 2.0


def test_the_middleware_timeout_raises_an_aiohttp_timeout() -> None:
    """``timeout=`` running out raises ``ExchangeTimeout``: an aiohttp ServerTimeoutError,
    an asyncio.TimeoutError and a TimeoutExceeded, naming the configured seconds."""

    async def main(server: Server) -> BaseException:
        url = server.on("/hang", Act(delay=5.0))
        mw = ResilientMiddleware(name="upstream", retry=retry(5, backoff=[0.01]), timeout=0.3)
        async with session(mw) as client:
            try:
                await client.get(url)
            except aiohttp.ClientError as exc:
                return exc
        raise AssertionError("no timeout")

    error = run(main)
    assert isinstance(error, ExchangeTimeout)
    assert isinstance(error, aiohttp.ServerTimeoutError)
    assert isinstance(error, asyncio.TimeoutError)
    assert isinstance(error, TimeoutExceeded)
    assert "'upstream'" in str(error)
    assert "0.3s" in str(error)
    assert error.timeout == 0.3


def test_aiohttps_own_total_timeout_still_applies() -> None:
    """The session's ``total`` bounds all attempts together (aiohttp enforces it)."""

    async def main(server: Server) -> float:
        url = server.on("/hang", Act(delay=5.0))
        mw = ResilientMiddleware(retry=retry(5, backoff=[0.01]))
        started = time.monotonic()
        async with session(mw, aiohttp.ClientTimeout(total=0.3)) as client:
            with pytest.raises(asyncio.TimeoutError):
                await client.get(url)
        return time.monotonic() - started

    assert run(main) < 2.0


# -- per-host policies --------------------------------------------------------------------------


def test_breakers_are_per_host(clock: FakeClock) -> None:
    """5xx answers open the failing host's breaker only; 4xx count as successes."""

    async def main(server: Server) -> None:
        async with serving() as other:
            bad = server.on("/x", Act(500))
            good = other.on("/y", Act(404))
            mw = ResilientMiddleware(
                name="api", retry=None, breaker={"failure_threshold": 2}, clock=clock
            )
            async with session(mw) as client:
                for _ in range(2):
                    async with client.get(bad) as response:
                        assert response.status == 500
                with pytest.raises(CircuitOpenError):
                    await client.get(bad)
                for _ in range(3):
                    async with client.get(good) as response:
                        assert response.status == 404
            assert server.hits[("GET", "/x")] == 2
            states = {key: b.state for key, b in mw.breakers.items()}
            bad_host, good_host = server.url.removeprefix("http://"), other.url[len("http://") :]
            assert states == {bad_host: "open", good_host: "closed"}
            assert buttress.state()["circuit_breaker"][f"api:{bad_host}"]["state"] == "open"

    run(main)


def test_the_limiter_has_a_bucket_per_host(clock: FakeClock) -> None:
    """A limiter mapping gives each host its own bucket: one host's exhaustion does not
    limit another."""

    async def main(server: Server) -> None:
        async with serving() as other:
            mw = ResilientMiddleware(
                retry=None, limiter={"rate": 1, "per": 60, "max_wait": 0}, clock=clock
            )
            async with session(mw) as client:
                async with client.get(server.on("/a")) as response:
                    assert response.status == 200
                with pytest.raises(RateLimited):
                    await client.get(server.on("/a"))
                async with client.get(other.on("/b")) as response:
                    assert response.status == 200

    run(main)


def test_a_bulkhead_slot_is_held_until_the_response_is_released() -> None:
    """The host's bulkhead slot is held while the response's body is still coming and
    given back once the connection is released (the body is in, or the response is
    released)."""

    async def main(server: Server) -> None:
        mw = ResilientMiddleware(retry=None, bulkhead={"max_concurrent": 1})
        async with session(mw) as client:
            first = await client.get(server.url + "/gated")
            (bulkhead,) = mw.bulkheads.values()
            assert bulkhead.snapshot()["in_flight"] == 1
            with pytest.raises(BulkheadFull):
                await client.get(server.url + "/gated")
            server.gate.set()
            assert await first.read() == b"first last"
            assert bulkhead.snapshot()["in_flight"] == 0
            server.gate.clear()
            second = await client.get(server.url + "/gated")
            assert bulkhead.snapshot()["in_flight"] == 1
            second.release()  # given up unread: the connection is closed, the slot freed
            assert bulkhead.snapshot()["in_flight"] == 0

    run(main)


class _CountingSlots(LocalBulkhead):
    """In-process slots standing in for a shared store: counts how slots come back."""

    released: ClassVar[list[str]] = []

    def release(self, lease: object) -> None:
        self.released.append("sync")
        super().release(lease)

    async def release_async(self, lease: object) -> None:
        self.released.append("async")
        LocalBulkhead.release(self, lease)


class _SlotStore:
    def bind_bulkhead(self, bulkhead: Bulkhead) -> _CountingSlots:
        return _CountingSlots(bulkhead)


def test_a_store_backed_slot_is_released_without_blocking_the_loop() -> None:
    """A bulkhead slot from a store comes back through its async release (a task), never
    through a blocking call on the loop, when the response's connection is released."""
    _CountingSlots.released.clear()

    async def main(server: Server) -> None:
        bulkhead = Bulkhead(max_concurrent=1, store=_SlotStore())
        mw = ResilientMiddleware(retry=None, bulkhead=bulkhead)
        async with session(mw) as client:
            slots = bulkhead.binding
            assert isinstance(slots, _CountingSlots)
            response = await client.get(server.url + "/gated")
            assert slots.in_flight == 1
            server.gate.set()
            await response.read()
            for _ in range(10):
                await asyncio.sleep(0)
            assert slots.in_flight == 0

    run(main)
    assert _CountingSlots.released == ["async"]


def test_a_shared_bulkhead_is_released_on_errors_and_cancellation() -> None:
    """A failed or cancelled attempt gives its slot back: nothing leaks."""

    async def main(server: Server) -> None:
        bulkhead = Bulkhead(max_concurrent=1)
        mw = ResilientMiddleware(retry=None, bulkhead=bulkhead)
        async with session(mw) as client:
            task = asyncio.ensure_future(client.get(server.on("/hang", Act(delay=5.0))))
            while not server.hits:
                await asyncio.sleep(0.01)
            assert bulkhead.snapshot()["in_flight"] == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert bulkhead.snapshot()["in_flight"] == 0
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await client.get(server.on("/drop", Act(drop=True)))
            assert bulkhead.snapshot()["in_flight"] == 0

    run(main)


def test_cancelling_while_a_retried_response_is_drained_closes_it() -> None:
    """A cancellation while a discarded response is being read closes that response: its
    connection (and the bulkhead slot it holds) is given back."""

    async def main(server: Server) -> None:
        bulkhead = Bulkhead(max_concurrent=1)
        mw = ResilientMiddleware(retry=retry(3, backoff=[0.0]), bulkhead=bulkhead)
        async with session(mw) as client:
            task = asyncio.ensure_future(client.get(server.url + "/trickle"))
            while not server.hits:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the 503 is in: the middleware is draining it
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert bulkhead.snapshot()["in_flight"] == 0
            assert server.hits[("GET", "/trickle")] == 1

    run(main)


def test_a_per_request_middleware_works_too(clock: FakeClock) -> None:
    """The middleware can be given to one request instead of the whole session."""

    async def main(server: Server) -> int:
        url = server.on("/one", Act(502), Act(200))
        mw = ResilientMiddleware(retry=retry(2, backoff=[0.0], clock=clock), clock=clock)
        async with (
            aiohttp.ClientSession() as client,
            client.get(url, middlewares=(mw,)) as response,
        ):
            return response.status

    assert run(main) == 200


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry": "3"}, "retry must be"),
        ({"retry_methods": "GET"}, "retry_methods must be"),
        ({"breaker": 5}, "breaker must be a CircuitBreaker"),
        ({"limiter": {"rate": 1, "name": "x"}}, "must not set 'name'"),
    ],
)
def test_bad_options_are_rejected_at_construction(options: dict[str, Any], message: str) -> None:
    """Options are validated when the middleware is built, naming the option."""
    with pytest.raises((ConfigTypeError, buttress.ConfigValueError), match=message):
        ResilientMiddleware(**options)
