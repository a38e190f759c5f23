"""aiohttp: what ``ResilientMiddleware`` costs per request against a bare ``ClientSession``.

Three sessions in one event loop send sequential ``GET`` requests to the same local
``aiohttp.web`` server (in a subprocess, so the server's work does not share the
client's loop): a bare session, one with the default middleware (3 attempts, "retry
only", which carries the target) and one with a per-host breaker, limiter bucket and
bulkhead as well ("full", for information). Each round sends one request per session
(who goes first rotates), timed one by one; the overhead is the median over rounds of
the per-round ratio, so a slow spell of the machine falls on all three alike. Target:
< 5% per request.

*Own cost* is the middleware alone, no network: the middleware called with a handler
that answers at once, against calling that handler directly (best of five runs).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from buttress.integrations.aiohttp import ResilientMiddleware
from buttress.testing import isolated_registry

# The same variants, and the same per-round statistics, as the httpx transport's rows.
from .integrations import _VARIANTS, ClientReport, TransportRow, _row, spawn, stop

TARGET = 0.05  # extra time per request, at most
TARGETED = "retry only"

SERVER = r"""
import asyncio, socket
from aiohttp import web

async def ok(request):
    return web.Response(body=b"ok", content_type="text/plain")

async def main():
    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@dataclass
class AiohttpReport(ClientReport):
    version: str = aiohttp.__version__

    WHAT = "aiohttp middleware"
    HEAD = ("session", "bare", "with middleware", "overhead", "own cost", "target", "status")

    def headline(self) -> str:
        return (
            f"aiohttp {self.version} middleware: median time per request against a local "
            f"aiohttp.web server, {self.rounds} interleaved rounds"
        )

    def markdown(self) -> str:
        return f"""## aiohttp middleware

Time per request through `ResilientMiddleware` against a bare `aiohttp.ClientSession`
(aiohttp {self.version}), sequential `GET`s to the same local `aiohttp.web` server (in
its own process), in the same run: {self.rounds} rounds in which each session sends one
request (who goes first rotates), timed one by one. The times are medians; the overhead
is the median over rounds of the ratio of requests that ran back to back. *Retry only* is
the default middleware (3 attempts) and carries the target; *full* adds a per-host
circuit breaker, rate-limiter bucket and bulkhead, for information. *Own cost* is the
middleware alone, called with a handler that answers at once (no network), in
microseconds.

{self.table()}
"""


class _Server:
    """The aiohttp.web server in a subprocess."""

    def __init__(self) -> None:
        self.process, port = spawn([sys.executable, "-c", SERVER], "aiohttp.web")
        self.url = f"http://127.0.0.1:{port}/"

    def close(self) -> None:
        stop(self.process)


async def _timed_rounds(url: str, rounds: int) -> dict[str, list[float]]:
    sessions = {"bare": aiohttp.ClientSession()}
    for label, options in _VARIANTS:
        sessions[label] = aiohttp.ClientSession(middlewares=(ResilientMiddleware(**options()),))
    try:
        for session in sessions.values():  # warm up: connections, caches
            for _ in range(50):
                async with session.get(url) as response:
                    await response.read()
        times: dict[str, list[float]] = {name: [] for name in sessions}
        names = list(sessions)
        perf = time.perf_counter
        for n in range(rounds):
            for name in names[n % 3 :] + names[: n % 3]:  # rotate who goes first
                get = sessions[name].get
                started = perf()
                async with get(url) as response:
                    await response.read()
                times[name].append(perf() - started)
    finally:
        for session in sessions.values():
            await session.close()
    return times


class _Answer:
    """What the stand-in handler returns: an answered response with its connection back."""

    status = 200
    headers: dict[str, str] = {}  # noqa: RUF012 - read only
    connection = None


class _Request:
    """The parts of a ClientRequest the middleware reads."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.url = URL("http://local.test/")
        self.method = "GET"
        self.body = b""
        self.session = session


async def _own_cost(calls: int) -> dict[str, float]:
    answer = _Answer()

    async def handler(request: Any) -> Any:
        return answer

    async with aiohttp.ClientSession() as session:
        request: Any = _Request(session)
        runs: dict[str, Callable[[], Awaitable[Any]]] = {"bare": lambda: handler(request)}
        for label, options in _VARIANTS:
            middleware = ResilientMiddleware(**options())
            runs[label] = lambda m=middleware: m(request, handler)  # type: ignore[misc]
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(5):
            for name, run in runs.items():
                started = time.perf_counter()
                for _ in range(calls):
                    await run()
                samples[name].append((time.perf_counter() - started) / calls)
    base = min(samples["bare"])
    return {label: min(samples[label]) - base for label, _ in _VARIANTS}


def _measure(url: str, rounds: int, own_calls: int) -> list[TransportRow]:
    times = asyncio.run(_timed_rounds(url, rounds))
    own = asyncio.run(_own_cost(own_calls))
    return [_row("async", label, times, own[label]) for label, _ in _VARIANTS]


def measure(quick: bool) -> AiohttpReport:
    report = AiohttpReport(rounds=300 if quick else 4000)
    own_calls = 500 if quick else 5000
    with isolated_registry():
        server = _Server()
        try:
            report.rows = _measure(server.url, report.rounds, own_calls)
            if quick and report.failures(1.0):
                # A guard must not fail on one noisy run: measure once more, keep that.
                report.rows = _measure(server.url, report.rounds, own_calls)
        finally:
            server.close()
    return report


if __name__ == "__main__":
    started = time.monotonic()
    result = measure(quick="--quick" in sys.argv)
    print(result.console())
    print(f"({time.monotonic() - started:.1f} s)")
    for line in result.failures(1.0):
        print("MISS:", line)
