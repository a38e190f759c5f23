"""httpx transports: HTTP retry semantics, Retry-After, budgets, breakers and limits per host.

Most behaviours are pinned twice: with ``httpx.MockTransport`` as the inner transport
and a ``FakeClock`` (exact waits, no sleeping), and against a real HTTP server on
127.0.0.1 that fails on demand (statuses, Retry-After, delays, dropped connections).
"""

from __future__ import annotations

import asyncio
import email.utils
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

import buttress
from buttress import (
    Bulkhead,
    BulkheadFull,
    ButtressError,
    CircuitBreaker,
    CircuitOpenError,
    RateLimited,
    RateLimiter,
    TimeoutExceeded,
    retry,
)
from buttress.circuit_breaker import LocalBreaker
from buttress.integrations.httpx import (
    IDEMPOTENT_METHODS,
    AsyncResilientTransport,
    ResilientTransport,
    TransportTimeout,
    parse_retry_after,
)
from buttress.testing import FakeClock
from http_server import Act, Server, fast, serving
from services import BindingStore

# -- a real server that fails on demand (tests/http_server.py) -----------------------------------

server = pytest.fixture(serving, name="server")
other_server = pytest.fixture(serving, name="other_server")  # another host:port


# -- a scripted inner transport for unit tests ---------------------------------------------------


class Tracked(httpx.ByteStream):
    """A response body that remembers being closed."""

    def __init__(self, body: bytes) -> None:
        super().__init__(body)
        self.closed = False

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


class Mock:
    """A MockTransport handler answering from a list (the last answer repeats)."""

    def __init__(self, *answers: int | tuple[int, dict[str, str]] | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.timeouts: list[object] = []  # each attempt's timeouts, as it saw them
        self.streams: list[Tracked] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.timeouts.append(request.extensions.get("timeout"))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        status, headers = (answer, {}) if isinstance(answer, int) else answer
        stream = Tracked(b"body")
        self.streams.append(stream)
        return httpx.Response(status, headers=headers, stream=stream)

    @property
    def calls(self) -> int:
        return len(self.requests)


def client(mock: Mock, **options: object) -> httpx.Client:
    transport = ResilientTransport(httpx.MockTransport(mock), **options)  # type: ignore[arg-type]
    return httpx.Client(transport=transport, base_url="http://api.example", timeout=60.0)


# -- which requests are retried ------------------------------------------------------------------


def test_idempotent_request_is_retried_on_retryable_statuses(clock):
    """GET answered 502, 503, 504 then 200: three retries with the backoff's waits."""
    mock = Mock(502, 503, 504, 200)
    with client(mock, retry=retry(4, backoff=[0.1, 0.2, 0.4], clock=clock), clock=clock) as http:
        response = http.get("/")
    assert response.status_code == 200
    assert mock.calls == 4
    assert clock.sleeps == [0.1, 0.2, 0.4]
    assert all(stream.closed for stream in mock.streams[:3])


def test_post_is_never_retried_unless_opted_in(clock):
    """POST answered 503 is returned at once; listing POST in retry_methods retries it."""
    mock = Mock(503, 200)
    with client(mock, retry=fast(), clock=clock) as http:
        assert http.post("/", content=b"x").status_code == 503
    assert mock.calls == 1
    mock = Mock(503, 200)
    methods = IDEMPOTENT_METHODS | {"POST"}
    with client(mock, retry=fast(), retry_methods=methods, clock=clock) as http:
        assert http.post("/", content=b"x").status_code == 200
    assert mock.calls == 2


@pytest.mark.parametrize("method", sorted(IDEMPOTENT_METHODS))
def test_every_idempotent_method_is_retried(method, clock):
    """GET, HEAD, OPTIONS, PUT, DELETE and TRACE are retried by default; PATCH is not."""
    mock = Mock(503, 200)
    with client(mock, retry=fast(), clock=clock) as http:
        assert http.request(method, "/").status_code == 200
    assert mock.calls == 2
    mock = Mock(503, 200)
    with client(mock, retry=fast(), clock=clock) as http:
        assert http.request("PATCH", "/").status_code == 503
    assert mock.calls == 1


@pytest.mark.parametrize("status", [400, 401, 404, 409, 500, 501])
def test_other_statuses_are_not_retried(status, clock):
    """Only 429, 502, 503 and 504 are retried by default."""
    mock = Mock(status, 200)
    with client(mock, retry=fast(), clock=clock) as http:
        assert http.get("/").status_code == status
    assert mock.calls == 1


def test_exhausted_status_retries_return_the_last_response(clock):
    """When attempts run out the last response is returned (open), earlier ones closed."""
    mock = Mock((503, {"x-attempt": "last"}))
    with client(mock, retry=fast(3), clock=clock) as http:
        response = http.get("/")
        assert response.status_code == 503
        assert response.text == "body"
        with pytest.raises(httpx.HTTPStatusError):
            response.raise_for_status()
    assert mock.calls == 3
    assert [stream.closed for stream in mock.streams] == [True, True, True]


def test_transport_errors_are_retried_and_the_last_is_reraised(clock):
    """Connect errors and timeouts are retried; the original httpx error ends the retries."""
    mock = Mock(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), 200)
    with client(mock, retry=fast(), clock=clock) as http:
        assert http.get("/").status_code == 200
    assert mock.calls == 3
    mock = Mock(httpx.ReadTimeout("slow"))
    with client(mock, retry=fast(3), clock=clock) as http, pytest.raises(httpx.ReadTimeout) as info:
        http.get("/")
    assert mock.calls == 3
    assert any("gave up after 3 attempt" in note for note in info.value.__notes__)


def test_post_is_retried_only_when_the_request_never_left(clock):
    """A connect error proves the POST was not sent (retried); a read timeout does not."""
    mock = Mock(httpx.ConnectError("refused"), 200)
    with client(mock, retry=fast(), clock=clock) as http:
        assert http.post("/", content=b"x").status_code == 200
    assert mock.calls == 2
    mock = Mock(httpx.ReadTimeout("slow"), 200)
    with client(mock, retry=fast(), clock=clock) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/", content=b"x")
    assert mock.calls == 1


def test_non_transport_errors_are_not_retried(clock):
    """A local protocol error or a bug in the inner transport is raised at once."""
    mock = Mock(httpx.LocalProtocolError("bad header"), 200)
    with client(mock, retry=fast(), clock=clock) as http, pytest.raises(httpx.LocalProtocolError):
        http.get("/")
    assert mock.calls == 1


def test_a_body_that_cannot_be_replayed_is_never_retried(clock):
    """A generator body is consumed by the first attempt, so it is not retried."""
    mock = Mock(503, 200)

    def chunks() -> Iterator[bytes]:
        yield b"part"

    methods = IDEMPOTENT_METHODS | {"POST"}
    with client(mock, retry=fast(), retry_methods=methods, clock=clock) as http:
        assert http.put("/", content=chunks()).status_code == 503
    assert mock.calls == 1


def test_retry_policy_filter_and_no_retry(clock):
    """The retry policy's `on` narrows the errors retried; retry=None never retries."""
    mock = Mock(httpx.ReadTimeout("slow"), 200)
    with (
        client(mock, retry=fast(on=httpx.ConnectError), clock=clock) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.get("/")
    mock = Mock(503, 200)
    with client(mock, retry=None, clock=clock) as http:
        assert http.get("/").status_code == 503
    assert mock.calls == 1


# -- Retry-After -----------------------------------------------------------------------------


def test_retry_after_seconds_sets_the_wait(clock):
    """Retry-After: 7 on a 429 makes the next wait 7 seconds (not the 0.1 s backoff)."""
    mock = Mock((429, {"Retry-After": "7"}), 200)
    with client(mock, retry=retry(3, backoff=[0.1], clock=clock), clock=clock) as http:
        assert http.get("/").status_code == 200
    assert clock.sleeps == [7.0]


def test_retry_after_http_date_is_read_against_the_date_header(clock):
    """An HTTP-date Retry-After waits until that date, counted from the response's Date."""
    date = "Wed, 21 Oct 2015 07:28:00 GMT"  # far in the past: the local clock must not matter
    headers = {"Date": date, "Retry-After": "Wed, 21 Oct 2015 07:28:05 GMT"}
    mock = Mock((503, headers), 200)
    with client(mock, retry=retry(3, backoff=[0.1], clock=clock), clock=clock) as http:
        assert http.get("/").status_code == 200
    assert clock.sleeps == [5.0]


def test_retry_after_is_capped(clock):
    """A Retry-After beyond max_retry_after waits max_retry_after."""
    mock = Mock((503, {"Retry-After": "3600"}), 200)
    with client(
        mock, retry=retry(3, backoff=[0.1], clock=clock), max_retry_after=2.5, clock=clock
    ) as http:
        assert http.get("/").status_code == 200
    assert clock.sleeps == [2.5]


def test_invalid_retry_after_falls_back_to_the_backoff(clock):
    """A Retry-After that is neither delta-seconds nor a date is ignored."""
    mock = Mock((503, {"Retry-After": "soon"}), (503, {"Retry-After": "-3"}), 200)
    with client(mock, retry=retry(3, backoff=[0.1], clock=clock), clock=clock) as http:
        assert http.get("/").status_code == 200
    assert clock.sleeps == [0.1, 0.1]


def test_parse_retry_after():
    """Delta-seconds, HTTP-dates against Date or the local time, and junk."""
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert parse_retry_after("Wed, 21 Oct 2015 07:29:00 GMT", date=date) == 60.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", date=date) == 0.0
    stamp = email.utils.parsedate_to_datetime(date).timestamp()
    assert parse_retry_after(date, now=stamp - 30) == 30.0
    assert parse_retry_after(date, date="garbage", now=stamp - 1) == 1.0
    for junk in ("", "soon", "-1", "1.5", "١٢"):
        assert parse_retry_after(junk) is None


@given(st.integers(min_value=0, max_value=10**9))
def test_parse_retry_after_delta_seconds_roundtrip(seconds):
    """Any delta-seconds value parses to itself."""
    assert parse_retry_after(str(seconds)) == float(seconds)


# -- the request's timeout is the budget -------------------------------------------------------


def test_never_sleeps_past_the_request_timeout(clock):
    """With a 1 s request timeout, a Retry-After of 5 s is not waited: the 503 is returned."""
    mock = Mock((503, {"Retry-After": "5"}), 200)
    with client(mock, retry=fast(), clock=clock, timeout=None) as http:
        response = http.get("/", timeout=1.0)
    assert response.status_code == 503
    assert clock.sleeps == []
    assert mock.calls == 1


def test_backoff_stops_before_the_request_timeout(clock):
    """Waits of 0.4 s within a 1 s budget: two retries, then the third wait would cross it."""
    mock = Mock(503)
    with client(mock, retry=retry(10, backoff=[0.4], clock=clock), clock=clock) as http:
        assert http.get("/", timeout=1.0).status_code == 503
    assert clock.sleeps == [0.4, 0.4]
    assert mock.calls == 3


def test_each_retry_gets_the_time_left_as_its_timeouts(clock):
    """After a 0.4 s wait in a 1 s budget, the retry's socket timeouts are 0.6 s."""
    mock = Mock(503, 200)
    with client(mock, retry=retry(3, backoff=[0.4], clock=clock), clock=clock) as http:
        http.get("/", timeout=httpx.Timeout(1.0, connect=0.25))
    first, second = mock.timeouts
    assert first == {"connect": 0.25, "read": 1.0, "write": 1.0, "pool": 1.0}
    assert second == {"connect": 0.25, "read": pytest.approx(0.6), "write": pytest.approx(0.6),
                      "pool": pytest.approx(0.6)}  # fmt: skip


def test_an_enclosing_buttress_timeout_narrows_the_budget(clock):
    """Inside `with buttress.timeout(0.5)`, a 0.4 s wait is taken once, not twice."""
    mock = Mock(503)
    policy = retry(10, backoff=[0.4], clock=clock)
    with client(mock, retry=policy, clock=clock) as http, buttress.timeout(0.5, clock=clock):
        assert http.get("/", timeout=10.0).status_code == 503
    assert clock.sleeps == [0.4]


def test_no_read_timeout_means_no_budget(clock):
    """timeout=None on the request: the retry policy alone bounds the waits."""
    mock = Mock((503, {"Retry-After": "30"}), 200)
    with client(mock, retry=retry(3, clock=clock), clock=clock) as http:
        assert http.get("/", timeout=None).status_code == 200
    assert clock.sleeps == [30.0]


def test_timeout_option_bounds_the_whole_exchange(clock):
    """timeout= cuts the retries short and raises TimeoutExceeded once it has run out."""
    mock = Mock(httpx.ConnectError("refused"))

    def slow_failure(request: httpx.Request) -> httpx.Response:
        clock.advance(0.3)
        return mock(request)

    transport = ResilientTransport(
        httpx.MockTransport(slow_failure),
        retry=retry(10, backoff=[0.1], clock=clock),
        timeout=1.0,
        clock=clock,
    )
    with httpx.Client(transport=transport) as http, pytest.raises(httpx.ConnectError):
        http.get("http://api.example/", timeout=None)
    assert mock.calls == 3  # 0.3 + 0.1 + 0.3 + 0.1 + 0.3: the next wait would cross 1 s

    def slow_answer(request: httpx.Request) -> httpx.Response:
        clock.advance(2.0)
        return httpx.Response(200)

    transport = ResilientTransport(httpx.MockTransport(slow_answer), timeout=1.0, clock=clock)
    with httpx.Client(transport=transport) as http, pytest.raises(TimeoutExceeded) as info:
        http.get("http://api.example/")
    assert isinstance(info.value, ButtressError) and isinstance(info.value, TimeoutError)


# -- circuit breakers per host -----------------------------------------------------------------


def test_4xx_do_not_count_and_5xx_open_the_circuit(clock):
    """Ten 404s leave the host's breaker closed; two 500s open it; then calls fail fast."""
    mock = Mock(404)
    breaker = {"failure_threshold": 2, "reset_timeout": 30}
    with client(mock, name="api", retry=None, breaker=breaker, clock=clock) as http:
        for _ in range(10):
            assert http.get("/").status_code == 404
        assert buttress.state()["circuit_breaker"]["api:api.example"]["state"] == "closed"
        mock.answers = [500]
        http.get("/")
        http.get("/")
        with pytest.raises(CircuitOpenError) as info:
            http.get("/")
        assert isinstance(info.value, ButtressError)
        assert mock.calls == 12
        assert buttress.health()["checks"]["api:api.example:circuit_breaker"][0]["status"] == "fail"


def test_breakers_are_per_host(clock):
    """A failing host opens its own breaker only; another host keeps working."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503 if request.url.host == "down.example" else 200)

    transport = ResilientTransport(
        httpx.MockTransport(handler),
        name="svc",
        retry=None,
        breaker={"failure_threshold": 1},
        clock=clock,
    )
    with httpx.Client(transport=transport) as http:
        http.get("http://down.example/")
        with pytest.raises(CircuitOpenError):
            http.get("http://down.example/")
        assert http.get("http://up.example:8080/").status_code == 200
    assert {k: b.state for k, b in transport.breakers.items()} == {
        "down.example": "open",
        "up.example:8080": "closed",
    }
    assert set(buttress.state()["circuit_breaker"]) == {"svc:down.example", "svc:up.example:8080"}


def test_breaker_failures_count_per_attempt_and_open_circuit_stops_retries(clock):
    """Each retried 503 is a failure; once the circuit opens the retries stop."""
    mock = Mock(503)
    breaker = {"failure_threshold": 2}
    with (
        client(mock, retry=fast(5), breaker=breaker, clock=clock) as http,
        pytest.raises(CircuitOpenError),
    ):
        http.get("/")
    assert mock.calls == 2


def test_transport_errors_count_as_breaker_failures(clock):
    """Connection errors are failures for the breaker."""
    mock = Mock(httpx.ConnectError("refused"))
    with client(mock, retry=None, breaker={"failure_threshold": 2}, clock=clock) as http:
        for _ in range(2):
            with pytest.raises(httpx.ConnectError):
                http.get("/")
        with pytest.raises(CircuitOpenError):
            http.get("/")


def test_shared_breaker_object_and_shared_names(clock):
    """A CircuitBreaker object guards every host; transports with one name share breakers."""
    shared = buttress.CircuitBreaker(failure_threshold=1, clock=clock)
    mock = Mock(500)
    with client(mock, retry=None, breaker=shared, clock=clock) as http:
        http.get("http://a.example/")
        with pytest.raises(CircuitOpenError):
            http.get("http://b.example/")
    one = ResilientTransport(httpx.MockTransport(Mock(500)), name="x", breaker={}, retry=None)
    two = ResilientTransport(httpx.MockTransport(Mock(500)), name="x", breaker={}, retry=None)
    with httpx.Client(transport=one) as a, httpx.Client(transport=two) as b:
        a.get("http://h.example/")
        b.get("http://h.example/")
    assert one.breakers["h.example"] is two.breakers["h.example"]


# -- limiters and bulkheads per host ----------------------------------------------------------


def test_rate_limit_is_per_host(clock):
    """Each host has its own bucket; an exhausted one raises RateLimited with retry_after."""
    mock = Mock(200)
    limiter = {"rate": 1, "per": 10, "max_wait": 0}
    with client(mock, name="api", limiter=limiter, clock=clock) as http:
        assert http.get("http://a.example/").status_code == 200
        with pytest.raises(RateLimited) as info:
            http.get("http://a.example/")
        assert info.value.retry_after == pytest.approx(10.0)
        assert http.get("http://b.example/").status_code == 200
    assert mock.calls == 2


def test_rate_limiter_wait_is_bounded_by_the_pool_timeout(clock):
    """A permit 10 s away is not waited for with a 2 s pool timeout (read timeout 60 s)."""
    limiter = RateLimiter(rate=1, per=10, clock=clock)
    mock = Mock(200)
    with client(mock, limiter=limiter, clock=clock) as http:
        http.get("/")
        with pytest.raises(RateLimited):
            http.get("/", timeout=httpx.Timeout(60.0, pool=2.0))
        clock.advance(9.0)
        assert http.get("/", timeout=httpx.Timeout(60.0, pool=2.0)).status_code == 200
    assert clock.now() == pytest.approx(10.0)  # waited the last second for the permit


def test_bulkhead_slot_is_held_until_the_response_is_closed(clock):
    """A streamed response keeps its slot; closing it lets the next request in."""
    mock = Mock(200)
    with client(mock, name="api", bulkhead={"max_concurrent": 1}, clock=clock) as http:
        with http.stream("GET", "/") as response:
            assert transport_of(http).bulkheads["api.example"].in_flight == 1
            with pytest.raises(BulkheadFull):
                http.get("/")
            response.read()
        assert http.get("/").status_code == 200
        assert transport_of(http).bulkheads["api.example"].in_flight == 0
    assert buttress.state()["bulkhead"]["api:api.example"]["rejected"] == 1


def test_bulkhead_slot_is_released_on_errors_and_retries(clock):
    """Slots come back when an attempt fails and when a response is discarded."""
    bulkhead = Bulkhead(max_concurrent=1, clock=clock)
    mock = Mock(httpx.ConnectError("refused"), 503, 200)
    with client(mock, retry=fast(), bulkhead=bulkhead, clock=clock) as http:
        assert http.get("/").status_code == 200
    assert bulkhead.in_flight == 0


def test_bulkhead_slot_of_a_response_already_in_memory(clock):
    """A response built from bytes (already read and closed) gives its slot back at once."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"in memory")

    bulkhead = Bulkhead(max_concurrent=1, clock=clock)
    transport = ResilientTransport(httpx.MockTransport(handler), bulkhead=bulkhead, clock=clock)
    with httpx.Client(transport=transport) as http:
        for _ in range(3):
            assert http.get("http://a.example/").text == "in memory"
    assert bulkhead.in_flight == 0


def transport_of(http: httpx.Client) -> ResilientTransport:
    transport = http._transport
    assert isinstance(transport, ResilientTransport)
    return transport


# -- async ----------------------------------------------------------------------------------


def test_async_transport_shares_the_semantics(clock):
    """The async transport retries, honours Retry-After, skips POST, returns the last 503."""

    async def main() -> None:
        mock = Mock((503, {"Retry-After": "3"}), 200)
        transport = AsyncResilientTransport(
            httpx.MockTransport(mock), retry=retry(3, backoff=[0.1], clock=clock), clock=clock
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://a.example") as http:
            assert (await http.get("/")).status_code == 200
            assert clock.sleeps == [3.0]
            mock.answers = [503]
            assert (await http.post("/", content=b"x")).status_code == 503
            assert mock.calls == 3
            assert (await http.get("/", timeout=1.0)).status_code == 503
            assert mock.streams[0].closed and mock.streams[3].closed

    asyncio.run(main())


def test_async_timeout_cancels_the_exchange():
    """With timeout=, a hanging async request is cancelled and TimeoutExceeded raised."""

    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return httpx.Response(200)

    async def main() -> None:
        transport = AsyncResilientTransport(httpx.MockTransport(hang), timeout=0.05)
        async with httpx.AsyncClient(transport=transport) as http:
            started = time.monotonic()
            with pytest.raises(TimeoutExceeded):
                await http.get("http://a.example/", timeout=None)
            assert time.monotonic() - started < 2.0

    asyncio.run(main())


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"retry": "3"}, TypeError, "retry must be"),
        ({"retry_methods": "GET"}, TypeError, "retry_methods must be"),
        ({"retry_methods": [1]}, TypeError, "retry_methods must hold"),
        ({"retry_statuses": [700]}, ValueError, "retry_statuses must be within"),
        ({"retry_statuses": ["503"]}, TypeError, "retry_statuses must hold"),
        ({"max_retry_after": -1}, ValueError, "max_retry_after"),
        ({"breaker": 5}, TypeError, "breaker must be"),
        ({"breaker": {"failure_threshold": 0}}, ValueError, "failure_threshold"),
        ({"breaker": {"bogus": 1}}, TypeError, "breaker options"),
        ({"breaker": {"name": "x"}}, ValueError, "must not set 'name'"),
        ({"limiter": {"burst": 2}}, TypeError, "limiter options"),
        ({"limiter": "fast"}, TypeError, "limiter must be"),
        ({"bulkhead": {"max_concurrent": -1}}, ValueError, "max_concurrent"),
        ({"bulkhead": []}, TypeError, "bulkhead must be"),
        ({"timeout": -1}, ValueError, "seconds"),
        ({"name": ""}, ValueError, "name must be"),
        ({"registry": {}}, TypeError, "registry must be"),
    ],
)
def test_options_are_validated(options, error, message):
    """Bad options raise the library's config errors, naming the parameter."""
    with pytest.raises(error, match=message) as info:
        ResilientTransport(httpx.MockTransport(Mock(200)), **options)
    assert isinstance(info.value, ButtressError)


def test_inner_transport_type_is_checked():
    """A sync transport for the async face (and vice versa) is refused."""
    with pytest.raises(TypeError, match="AsyncBaseTransport"):
        AsyncResilientTransport(httpx.HTTPTransport())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="BaseTransport"):
        ResilientTransport(httpx.AsyncHTTPTransport())  # type: ignore[arg-type]


def test_default_inner_transport_and_close():
    """Without a transport a real HTTPTransport is used, and closing closes it."""
    transport = ResilientTransport()
    assert isinstance(transport.transport, httpx.HTTPTransport)
    with httpx.Client(transport=transport):
        pass

    async def main() -> None:
        inner = AsyncResilientTransport()
        assert isinstance(inner.transport, httpx.AsyncHTTPTransport)
        async with httpx.AsyncClient(transport=inner):
            pass

    asyncio.run(main())


# -- against a real server on 127.0.0.1 ------------------------------------------------------


def real(server: Server, **options: object) -> httpx.Client:
    transport = ResilientTransport(**options)  # type: ignore[arg-type]
    return httpx.Client(transport=transport, base_url=server.url, timeout=5.0)


def test_real_server_get_retried_post_not(server):
    """GET on 503 then 200 hits the server twice; POST hits it once unless opted in."""
    server.script.on("/get", Act(503), Act(200, body=b"fine"))
    server.script.on("/post", Act(503), Act(200))
    server.script.on("/post-ok", Act(503), Act(200))
    with real(server, retry=fast()) as http:
        assert http.get("/get").text == "fine"
        assert http.post("/post", json={"a": 1}).status_code == 503
    with real(server, retry=fast(), retry_methods={"GET", "POST"}) as http:
        assert http.post("/post-ok", json={"a": 1}).status_code == 200
    hits = server.script.hits
    assert hits["GET", "/get"] == 2
    assert hits["POST", "/post"] == 1
    assert hits["POST", "/post-ok"] == 2


def test_real_server_retry_after_seconds_and_date(server):
    """The waits asked for by Retry-After (delta-seconds and HTTP-date) are the waits taken."""
    clock = FakeClock()
    server.script.on("/seconds", Act(429, {"Retry-After": "2"}), Act(200))
    server.script.on("/date", Act(503, retry_after_date=3), Act(200))
    server.script.on("/cap", Act(503, {"Retry-After": "3600"}), Act(200))
    with real(
        server, retry=retry(3, backoff=[0.01], clock=clock), max_retry_after=4, clock=clock
    ) as http:
        assert http.get("/seconds").status_code == 200
        assert http.get("/date").status_code == 200
        assert http.get("/cap").status_code == 200
    assert clock.sleeps == [2.0, 3.0, 4.0]


def test_real_server_never_sleeps_past_the_request_timeout(server):
    """Retry-After: 5 under a 0.5 s timeout returns the 503 at once; backoff stops in time."""
    server.script.on("/later", Act(503, {"Retry-After": "5"}))
    server.script.on("/busy", Act(503))
    with real(server, retry=retry(20, backoff=[0.2])) as http:
        started = time.monotonic()
        assert http.get("/later", timeout=0.5).status_code == 503
        assert time.monotonic() - started < 0.4
        started = time.monotonic()
        assert http.get("/busy", timeout=0.5).status_code == 503
        elapsed = time.monotonic() - started
    assert elapsed < 0.5
    assert server.script.hits["GET", "/later"] == 1
    assert 2 <= server.script.hits["GET", "/busy"] <= 3


def test_real_server_slow_answers_stay_within_the_budget(server):
    """A server slower than the budget: each retry's read timeout shrinks to the time left."""
    server.script.on("/slow", Act(200, delay=0.4))
    with real(server, retry=retry(10, backoff=[0.05])) as http:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            http.get("/slow", timeout=0.3)
        elapsed = time.monotonic() - started
    assert elapsed < 0.6
    assert server.script.hits["GET", "/slow"] <= 3


def test_real_server_4xx_not_counted_5xx_open(server):
    """404s leave the breaker closed; 500s open it and later calls never reach the server."""
    server.script.on("/missing", Act(404))
    server.script.on("/broken", Act(500))
    breaker = {"failure_threshold": 3, "reset_timeout": 60}
    with real(server, name="real", retry=None, breaker=breaker) as http:
        for _ in range(6):
            assert http.get("/missing").status_code == 404
        host = f"127.0.0.1:{server.server_address[1]}"
        assert http._transport.breakers[host].state == "closed"  # type: ignore[attr-defined]
        for _ in range(3):
            assert http.get("/broken").status_code == 500
        with pytest.raises(CircuitOpenError):
            http.get("/missing")
    assert server.script.hits["GET", "/broken"] == 3
    assert server.script.hits["GET", "/missing"] == 6
    checks = buttress.health()["checks"]
    assert checks[f"real:{host}:circuit_breaker"][0]["status"] == "fail"


def test_real_servers_per_host_isolation(server, other_server):
    """One server failing opens its own breaker; the other server is still reachable."""
    server.script.on("/", Act(503))
    other_server.script.on("/", Act(200))
    transport = ResilientTransport(name="iso", retry=None, breaker={"failure_threshold": 2})
    with httpx.Client(transport=transport) as http:
        for _ in range(2):
            http.get(server.url + "/")
        with pytest.raises(CircuitOpenError):
            http.get(server.url + "/")
        for _ in range(3):
            assert http.get(other_server.url + "/").status_code == 200
    assert server.script.hits["GET", "/"] == 2
    assert other_server.script.hits["GET", "/"] == 3


def test_real_server_rate_limit_per_host(server, other_server):
    """Each server has its own bucket."""
    limiter = {"rate": 1, "per": 60, "max_wait": 0}
    with httpx.Client(transport=ResilientTransport(limiter=limiter)) as http:
        http.get(server.url + "/")
        with pytest.raises(RateLimited):
            http.get(server.url + "/")
        http.get(other_server.url + "/")
    assert server.script.hits["GET", "/"] == 1


def test_real_server_dropped_connections(server):
    """A dropped connection is retried for GET; for POST the error is raised after one try."""
    server.script.on("/drop", Act(drop=True), Act(200))
    server.script.on("/drop-post", Act(drop=True), Act(200))
    with real(server, retry=fast()) as http:
        assert http.get("/drop").status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            http.post("/drop-post", content=b"x")
    assert server.script.hits["GET", "/drop"] == 2
    assert server.script.hits["POST", "/drop-post"] == 1


def test_real_server_connect_errors_are_retried_and_reraised():
    """Nothing listening: ConnectError is retried, then re-raised as itself."""
    with Server() as probe:
        url = probe.url  # a port that was free a moment ago
    with (
        httpx.Client(transport=ResilientTransport(retry=fast(3))) as http,
        pytest.raises(httpx.ConnectError) as info,
    ):
        http.get(url)
    assert any("3 attempt" in note for note in info.value.__notes__)


def _pool_is_clean(transport: ResilientTransport | AsyncResilientTransport, limit: int) -> None:
    pool = transport.transport._pool  # type: ignore[attr-defined]
    connections = pool.connections
    assert len(connections) <= limit
    assert all(connection.is_idle() for connection in connections)
    assert not pool._requests


def test_real_server_no_leaked_connections(server):
    """Hundreds of retried responses (small and large bodies) through a 2-connection pool."""
    big = b"x" * 200_000  # too big to drain: its connection is closed instead
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
    transport = ResilientTransport(httpx.HTTPTransport(limits=limits), retry=fast(3))
    with httpx.Client(transport=transport, base_url=server.url, timeout=2.0) as http:
        for n in range(60):
            server.script.on(f"/r{n}", Act(503, body=big if n % 3 == 0 else b"no"), Act(200))
            assert http.get(f"/r{n}").status_code == 200
            _pool_is_clean(transport, 2)
        # Exhausted retries: the caller gets the last response and closes it.
        server.script.on("/always", Act(503))
        for _ in range(10):
            assert http.get("/always").status_code == 503
        _pool_is_clean(transport, 2)
    assert server.script.hits["GET", "/always"] == 30


def test_real_server_async_transport(server):
    """The async transport against the real server: retries, POST skipped, no leaks."""
    server.script.on("/a", Act(503, {"Retry-After": "1"}), Act(200))
    server.script.on("/p", Act(503), Act(200))
    clock = FakeClock()
    limits = httpx.Limits(max_connections=2)

    async def main() -> AsyncResilientTransport:
        transport = AsyncResilientTransport(
            httpx.AsyncHTTPTransport(limits=limits),
            retry=retry(3, backoff=[0.01], clock=clock),
            clock=clock,
        )
        async with httpx.AsyncClient(transport=transport, base_url=server.url) as http:
            assert (await http.get("/a")).status_code == 200
            assert (await http.post("/p", content=b"x")).status_code == 503
            for n in range(20):
                server.script.on(f"/m{n}", Act(502), Act(504), Act(200))
            answers = await asyncio.gather(*(http.get(f"/m{n}") for n in range(20)))
            assert [a.status_code for a in answers] == [200] * 20
            _pool_is_clean(transport, 2)
        return transport

    asyncio.run(main())
    assert clock.sleeps[0] == 1.0
    assert server.script.hits["GET", "/a"] == 2
    assert server.script.hits["POST", "/p"] == 1


def test_real_server_sync_timeout_option(server):
    """timeout= on the sync transport: a slow server ends in TimeoutExceeded in time."""
    server.script.on("/slow", Act(200, delay=1.0))
    with real(server, timeout=0.3) as http:
        started = time.monotonic()
        with pytest.raises(TimeoutExceeded):
            http.get("/slow")
        assert time.monotonic() - started < 0.9


# -- running out of time stays an httpx error --------------------------------------------------


def test_real_server_async_client_timeout_is_httpx_read_timeout(server):
    """timeout=0.6 on the transport, 0.2 on the client, a hanging server: httpx.ReadTimeout
    (not a TimeoutExceeded naming a value nobody set), noted with the budget that ran out."""
    server.script.on("/hang", *[Act(200, delay=1.0)] * 3)

    async def main() -> None:
        transport = AsyncResilientTransport(timeout=0.6, name="upstream")
        async with httpx.AsyncClient(transport=transport, base_url=server.url, timeout=0.2) as http:
            started = time.monotonic()
            with pytest.raises(httpx.TimeoutException) as info:
                await http.get("/hang")
            assert time.monotonic() - started < 0.55
        assert type(info.value) is httpx.ReadTimeout
        assert not isinstance(info.value, TimeoutExceeded)
        if sys.version_info >= (3, 11):
            assert "read timeout (0.2s)" in info.value.__notes__[-1]

    asyncio.run(main())


def test_real_server_async_transport_timeout_is_an_httpx_timeout_too(server):
    """The transport's timeout= running out: a TransportTimeout, both httpx's and ours,
    whose message names the configured seconds."""
    server.script.on("/hang", *[Act(200, delay=1.0)] * 3)

    async def main() -> None:
        transport = AsyncResilientTransport(timeout=0.2, name="upstream")
        async with httpx.AsyncClient(transport=transport, base_url=server.url, timeout=5.0) as http:
            with pytest.raises(httpx.TimeoutException) as info:
                await http.get("/hang")
        error = info.value
        assert isinstance(error, TransportTimeout)
        assert isinstance(error, TimeoutExceeded) and isinstance(error, httpx.HTTPError)
        assert error.timeout == 0.2
        assert "timeout=0.2s" in str(error) and "'upstream'" in str(error)
        assert error.request.url.path == "/hang"
        assert buttress.state()["timeout"]["upstream"]["timeouts"] == 1

    asyncio.run(main())


def test_real_server_sync_timeouts_stay_httpx_errors(server):
    """Sync: the client's read timeout is httpx.ReadTimeout; the transport's is a
    TransportTimeout naming its seconds."""
    server.script.on("/hang", *[Act(200, delay=1.0)] * 6)
    transport = ResilientTransport(timeout=0.6)
    with httpx.Client(transport=transport, base_url=server.url, timeout=0.2) as http:
        with pytest.raises(httpx.ReadTimeout) as read:
            http.get("/hang")
        assert not isinstance(read.value, TimeoutExceeded)
    transport = ResilientTransport(timeout=0.2)
    with (
        httpx.Client(transport=transport, base_url=server.url, timeout=5.0) as http,
        pytest.raises(httpx.TimeoutException) as info,
    ):
        http.get("/hang")
    assert isinstance(info.value, TransportTimeout)
    assert "httpx transport: GET" in str(info.value) and "timeout=0.2s" in str(info.value)


def test_an_outer_retry_on_httpx_errors_retries_a_transport_timeout(clock):
    """retry(on=httpx.HTTPError) around the client sees the transport's timeout."""
    calls = []

    def slow_answer(request: httpx.Request) -> httpx.Response:
        calls.append(clock.now())
        clock.advance(2.0 if len(calls) == 1 else 0.1)
        return httpx.Response(200)

    transport = ResilientTransport(httpx.MockTransport(slow_answer), timeout=1.0, clock=clock)

    @retry(2, on=httpx.HTTPError, backoff=[0.0], clock=clock)
    def fetch() -> int:
        with httpx.Client(transport=transport) as http:
            return http.get("http://api.example/").status_code

    assert fetch() == 200
    assert len(calls) == 2


def test_a_transport_timeout_survives_pickling():
    """TransportTimeout round-trips like every buttress error."""
    import pickle

    error = TransportTimeout("ran out", timeout=1.5)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is TransportTimeout
    assert (str(copy), copy.timeout) == ("ran out", 1.5)


# -- a breaker store that fails while settling: nothing the attempt holds is left behind ----


class _SettleFails(LocalBreaker):
    """A breaker binding whose settlement fails (a store error)."""

    def settle(self, token: int, outcome: Any) -> None:
        raise buttress.BackendError("the store is down")

    async def settle_async(self, token: int, outcome: Any) -> None:
        raise buttress.BackendError("the store is down")


class _SettleHangs(_SettleFails):
    """... or hangs first (a slow round trip, cut off by the transport's timeout)."""

    async def settle_async(self, token: int, outcome: Any) -> None:
        await asyncio.sleep(10)
        await super().settle_async(token, outcome)


def test_a_failing_breaker_settlement_frees_the_bulkhead_slot() -> None:
    """A store error while settling the breaker still gives the bulkhead slot back."""
    bulkhead = Bulkhead(max_concurrent=1)
    transport = ResilientTransport(
        httpx.MockTransport(lambda request: httpx.Response(500)),
        retry=None,
        breaker=CircuitBreaker(
            "settle-fails", store=BindingStore(_SettleFails), registry=buttress.Registry()
        ),
        bulkhead=bulkhead,
    )
    with httpx.Client(transport=transport) as client:
        for _ in range(3):
            with pytest.raises(buttress.BackendError):
                client.get("http://partner.test/")
            assert bulkhead.in_flight == 0


def test_a_timeout_during_an_async_settlement_frees_the_bulkhead_slot() -> None:
    """The transport's timeout landing while the breaker's outcome is sent frees the slot."""
    bulkhead = Bulkhead(max_concurrent=1)
    breaker = CircuitBreaker(
        "settle-hangs", store=BindingStore(_SettleHangs), registry=buttress.Registry()
    )

    async def main() -> None:
        transport = AsyncResilientTransport(
            httpx.MockTransport(lambda request: httpx.Response(500)),
            retry=None,
            breaker=breaker,
            bulkhead=bulkhead,
            timeout=0.05,
        )
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(2):
                with pytest.raises(buttress.TimeoutExceeded):
                    await client.get("http://partner.test/")
                assert bulkhead.in_flight == 0

    asyncio.run(main())
