"""The requests adapter: what ``ResilientAdapter`` costs per request on a real loopback.

A bare ``requests.Session`` (its default ``HTTPAdapter``) against the same session with
``ResilientAdapter`` mounted, both sending sequential ``GET``s to one local uvicorn server
(the trivial app of the integrations section, in a subprocess), measured request by
request in interleaved rounds: the overhead is the median over rounds of the ratio of
the two requests of a round. Target: < 5% for the default adapter (3 attempts). The
adapter's own cost, measured with urllib3 replaced by a canned response (no network,
no server), is shown beside it.
"""

from __future__ import annotations

import io
import time
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter

from buttress.integrations.requests import ResilientAdapter
from buttress.testing import isolated_registry

from .integrations import _VARIANTS as VARIANTS
from .integrations import TARGETED, ClientReport, _row, _Server
from .integrations import TRANSPORT_TARGET as TARGET  # < 5% for the default adapter


class RequestsReport(ClientReport):
    WHAT = "requests adapter"
    HEAD = ("adapter", "bare", "resilient", "overhead", "own cost", "target", "status")

    def headline(self) -> str:
        return (
            f"requests adapter: median time per request against local uvicorn, "
            f"{self.rounds} interleaved rounds"
        )

    def markdown(self) -> str:
        return f"""## requests adapter

Time per request through a `requests.Session` with `ResilientAdapter` mounted against the
same session with its default `HTTPAdapter`, sequential `GET`s to one local uvicorn server
(the trivial app of the integrations section, in its own process): {self.rounds} rounds in
which each session sends one request (who goes first rotates), timed one by one. The
times shown are medians; the overhead is the median over rounds of the ratio of the
requests of a round. *Retry only* is the default adapter (3 attempts) and carries the
target; *full* adds a per-host circuit breaker, rate-limiter bucket and bulkhead, shown
for information. *Own cost* is the same comparison with urllib3 replaced by a canned
response (no network, no server): what the adapter itself adds to each request, in
microseconds (the best of five runs).

{self.table()}
"""


def _sessions() -> dict[str, requests.Session]:
    sessions = {"bare": requests.Session()}
    for label, options in VARIANTS:
        session = requests.Session()
        adapter = ResilientAdapter(**options())  # type: ignore[arg-type]
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        sessions[label] = session
    return sessions


def _real(url: str, rounds: int, warmup: int) -> dict[str, list[float]]:
    sessions = _sessions()
    try:
        for session in sessions.values():  # warm up: connections, caches
            for _ in range(warmup):
                session.get(url, timeout=5)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        names = list(sessions)
        perf = time.perf_counter
        for n in range(rounds):
            for name in names[n % 3 :] + names[: n % 3]:  # rotate who goes first
                get = sessions[name].get
                started = perf()
                get(url, timeout=5)
                times[name].append(perf() - started)
    finally:
        for session in sessions.values():
            session.close()
    return times


def _canned(adapter: HTTPAdapter, request: requests.PreparedRequest, **kwargs: Any) -> Any:
    raw = urllib3.HTTPResponse(
        body=io.BytesIO(b"ok"), headers={"Content-Length": "2"}, status=200, preload_content=False
    )
    return adapter.build_response(request, raw)


def _own_cost(calls: int) -> dict[str, float]:
    """Per request, what each adapter adds with urllib3 replaced by a canned answer (the
    bare session's HTTPAdapter answers the same way)."""
    original = HTTPAdapter.send
    HTTPAdapter.send = _canned  # type: ignore[method-assign]
    try:
        sessions = _sessions()
        samples: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(5):
            for name, session in sessions.items():
                started = time.perf_counter()
                for _ in range(calls):
                    session.get("http://local.test/", timeout=5)
                samples[name].append((time.perf_counter() - started) / calls)
    finally:
        HTTPAdapter.send = original  # type: ignore[method-assign]
    bare = min(samples["bare"])
    return {label: min(samples[label]) - bare for label, _ in VARIANTS}


def measure(quick: bool) -> RequestsReport:
    report = RequestsReport(rounds=150 if quick else 4000)
    own_calls = 100 if quick else 3000
    warmup = 20 if quick else 50
    with isolated_registry():
        server = _Server("bare")
        try:
            server.wait_ready()
            for _attempt in range(2 if quick else 1):  # a guard does not fail on one noisy run
                times = _real(server.url, report.rounds, warmup)
                own = _own_cost(own_calls)
                report.rows = [_row("sync", label, times, own[label]) for label, _ in VARIANTS]
                if not any(r.label == TARGETED and r.overhead >= TARGET for r in report.rows):
                    break
        finally:
            server.close()
    return report


def canned_requests(variant: str, count: int) -> None:
    """Send ``count`` requests with urllib3 replaced by the canned answer, through a bare
    session (``"bare"``) or one with the adapter (``"retry only"``, ``"full"``): the
    workload whose instructions callgrind counts (run it with two counts and subtract)."""
    HTTPAdapter.send = _canned  # type: ignore[method-assign]
    session = _sessions()[variant]
    for _ in range(20 + count):
        session.get("http://local.test/", timeout=5)


if __name__ == "__main__":
    # python -m benchmarks.client_requests [--quick]: the section alone (full mode unless
    # --quick). python -m benchmarks.client_requests --canned VARIANT COUNT: the callgrind
    # workload, e.g. PYTHONHASHSEED=0 valgrind --tool=callgrind python -m
    # benchmarks.client_requests --canned "retry only" 300 (and 100; subtract).
    import sys

    args = sys.argv[1:]
    if args[:1] == ["--canned"]:
        canned_requests(args[1], int(args[2]))
        sys.exit()
    started = time.monotonic()
    result = measure(quick="--quick" in args)
    print(result.console())
    print(f"({time.monotonic() - started:.1f} s)")
