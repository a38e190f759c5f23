"""requests adapter: HTTP retry semantics, Retry-After, budgets, breakers and limits per host.

As for httpx, most behaviours are pinned twice: with urllib3 replaced by a scripted stub
(``HTTPAdapter.send`` answering from a list, a ``FakeClock``: exact waits, no sleeping),
and against a real HTTP server on 127.0.0.1 that fails on demand.
"""

from __future__ import annotations

import io
import pickle
import socket
import threading
import time
from typing import Any

import pytest
import requests
import urllib3
from hypothesis import given
from hypothesis import strategies as st
from requests.adapters import HTTPAdapter

import buttress
from buttress import (
    BulkheadFull,
    ButtressError,
    CircuitOpenError,
    ConfigTypeError,
    ConfigValueError,
    RateLimited,
    RejectedError,
    TimeoutExceeded,
    retry,
)
from buttress.integrations.requests import (
    IDEMPOTENT_METHODS,
    ConnectTimeoutExceeded,
    ReadTimeoutExceeded,
    RequestTimeoutExceeded,
    ResilientAdapter,
)
from buttress.testing import FakeClock
from http_server import Act, fast, serving

server = pytest.fixture(serving, name="server")
other_server = pytest.fixture(serving, name="other_server")  # another host:port


def session(**options: Any) -> tuple[requests.Session, ResilientAdapter]:
    """A session with the adapter mounted for http:// and https://."""
    adapter = ResilientAdapter(**options)
    http = requests.Session()
    http.mount("http://", adapter)
    http.mount("https://", adapter)
    return http, adapter


# -- urllib3 replaced by a script, for exact unit tests -------------------------------------------


class Raw(urllib3.HTTPResponse):
    """A urllib3 response over bytes that remembers being closed (or its connection
    released: what ``Response.close()`` does once the body is read)."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(
            body=io.BytesIO(body), headers=headers, status=status, preload_content=False
        )
        self.was_closed = False

    def close(self) -> None:
        self.was_closed = True
        super().close()

    def release_conn(self) -> None:
        self.was_closed = True
        super().release_conn()


Answer = int | tuple[int, dict[str, str]] | BaseException


class Stub:
    """Stands in for urllib3 (``HTTPAdapter.send``): answers from a list (the last one
    repeats) and records every attempt's timeout."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[requests.PreparedRequest] = []
        self.timeouts: list[object] = []
        self.raws: list[Raw] = []
        self.before: Any = None  # called before each answer (to move a fake clock)

    def __call__(
        self, adapter: HTTPAdapter, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        self.requests.append(request)
        self.timeouts.append(kwargs.get("timeout"))
        if self.before is not None:
            self.before()
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        status, headers = (answer, {}) if isinstance(answer, int) else answer
        raw = Raw(status, headers, b"body")
        self.raws.append(raw)
        return adapter.build_response(request, raw)

    @property
    def calls(self) -> int:
        return len(self.requests)


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Stub:
    """urllib3 replaced by a script answering 200 (set ``stub.answers``)."""
    script = Stub(200)
    monkeypatch.setattr(HTTPAdapter, "send", script)
    return script


def refused() -> requests.ConnectionError:
    """What requests raises when nothing listens on the port: the request never left."""
    reason = urllib3.exceptions.NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
    return requests.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/", reason))  # type: ignore[arg-type]


def dropped() -> requests.ConnectionError:
    """What requests raises when the server closes the connection without answering."""
    return requests.ConnectionError(urllib3.exceptions.ProtocolError("Connection aborted."))


URL = "http://api.example/"

# -- which requests are retried -------------------------------------------------------------------


def test_idempotent_request_is_retried_on_retryable_statuses(stub, clock):
    """A GET answered 503, 502, 429 is retried until it gets a 200."""
    stub.answers = [503, 502, 429, 200]
    http, _ = session(retry=fast(5, clock=clock), clock=clock)
    response = http.get(URL, timeout=60)
    assert response.status_code == 200
    assert response.text == "body"
    assert stub.calls == 4


def test_post_is_never_retried_unless_opted_in(stub, clock):
    """POST is not idempotent: one attempt, unless retry_methods says otherwise."""
    stub.answers = [503, 200]
    http, _ = session(retry=fast(clock=clock), clock=clock)
    assert http.post(URL, data=b"x").status_code == 503
    assert stub.calls == 1
    stub.answers = [503, 200]
    http, _ = session(retry=fast(clock=clock), retry_methods={"post"}, clock=clock)
    assert http.post(URL, data=b"x").status_code == 200
    assert stub.calls == 3


@pytest.mark.parametrize("method", sorted(IDEMPOTENT_METHODS))
def test_every_idempotent_method_is_retried(method, stub, clock):
    """GET, HEAD, OPTIONS, PUT, DELETE and TRACE are retried by default."""
    stub.answers = [503, 200]
    http, _ = session(retry=fast(clock=clock), clock=clock)
    assert http.request(method, URL).status_code == 200
    assert stub.calls == 2


@pytest.mark.parametrize("status", [400, 401, 404, 409, 500, 501])
def test_other_statuses_are_not_retried(status, stub, clock):
    """Client errors and non-transient server errors are returned at once."""
    stub.answers = [status]
    http, _ = session(retry=fast(clock=clock), clock=clock)
    assert http.get(URL).status_code == status
    assert stub.calls == 1


def test_exhausted_status_retries_return_the_last_response_and_close_the_others(stub, clock):
    """When the attempts run out the last 503 is returned; every discarded one is closed."""
    stub.answers = [503]
    http, _ = session(retry=fast(3, clock=clock), clock=clock)
    response = http.get(URL)
    assert response.status_code == 503
    assert stub.calls == 3
    assert [raw.was_closed for raw in stub.raws] == [True, True, False]
    with pytest.raises(requests.HTTPError):
        response.raise_for_status()


def test_transport_errors_are_retried_and_the_last_is_reraised(stub, clock):
    """Dropped connections are retried; when attempts run out the requests error is raised."""
    stub.answers = [dropped()]
    http, _ = session(retry=fast(3, clock=clock), clock=clock)
    with pytest.raises(requests.ConnectionError) as info:
        http.get(URL)
    assert not isinstance(info.value, ButtressError)
    assert stub.calls == 3
    stub.answers = [dropped(), requests.exceptions.ChunkedEncodingError("cut"), 200]
    assert http.get(URL).status_code == 200


def test_post_is_retried_only_when_the_request_never_left(stub, clock):
    """A refused connection or a connect timeout proves nothing was sent: POST is retried.
    A dropped connection may have delivered the request: POST is not retried."""
    stub.answers = [refused(), requests.ConnectTimeout("connect timed out"), 200]
    http, _ = session(retry=fast(3, clock=clock), clock=clock)
    assert http.post(URL, data=b"x").status_code == 200
    assert stub.calls == 3
    stub.answers = [dropped(), 200]
    with pytest.raises(requests.ConnectionError):
        http.post(URL, data=b"x")
    assert stub.calls == 4


def test_non_transport_errors_are_not_retried(stub, clock):
    """A bad URL or a programming error is raised at once."""
    stub.answers = [requests.exceptions.InvalidHeader("bad"), 200]
    http, _ = session(retry=fast(clock=clock), clock=clock)
    with pytest.raises(requests.exceptions.InvalidHeader):
        http.get(URL)
    assert stub.calls == 1


def test_a_body_that_cannot_be_replayed_is_never_retried(stub, clock):
    """A generator body is sent once: a retry could not send it again."""
    stub.answers = [503, 200]
    http, _ = session(retry=fast(clock=clock), clock=clock)
    assert http.put(URL, data=iter([b"a", b"b"])).status_code == 503
    assert stub.calls == 1
    assert http.put(URL, data=b"ab").status_code == 200  # bytes replay


def test_retry_policy_filter_and_no_retry(stub, clock):
    """The retry policy's on= filter applies; retry=None sends once."""
    stub.answers = [dropped(), 200]
    http, _ = session(retry=fast(clock=clock, on=requests.Timeout), clock=clock)
    with pytest.raises(requests.ConnectionError):
        http.get(URL)
    stub.answers = [503, 200]
    http, _ = session(retry=None, clock=clock)
    assert http.get(URL).status_code == 503


# -- Retry-After ----------------------------------------------------------------------------------


def test_retry_after_seconds_sets_the_wait(stub, clock):
    """Retry-After: 7 makes the next wait 7 seconds."""
    stub.answers = [(503, {"Retry-After": "7"}), 200]
    http, _ = session(retry=fast(clock=clock), clock=clock)
    assert http.get(URL).status_code == 200
    assert clock.sleeps == [7.0]


def test_retry_after_http_date_is_read_against_the_date_header(stub, clock):
    """An HTTP-date is read against the response's Date, whatever the local clock says."""
    headers = {
        "Date": "Wed, 21 Oct 2015 07:28:00 GMT",
        "Retry-After": "Wed, 21 Oct 2015 07:28:12 GMT",
    }
    stub.answers = [(429, headers), 200]
    http, _ = session(retry=fast(clock=clock), clock=clock)
    assert http.get(URL).status_code == 200
    assert clock.sleeps == [12.0]


def test_retry_after_is_capped_and_invalid_values_fall_back(stub, clock):
    """max_retry_after cuts a long Retry-After; an unreadable one leaves the backoff."""
    stub.answers = [(503, {"Retry-After": "3600"}), (503, {"Retry-After": "soon"}), 200]
    http, _ = session(retry=fast(clock=clock), max_retry_after=5, clock=clock)
    assert http.get(URL).status_code == 200
    assert clock.sleeps == [5.0, 0.001]


def test_retry_after_past_the_budget_returns_the_response_at_once(stub, clock):
    """A wait that would end after the request's timeout is not started."""
    stub.answers = [(503, {"Retry-After": "30"}), 200]
    http, _ = session(retry=fast(clock=clock), clock=clock)
    assert http.get(URL, timeout=10).status_code == 503
    assert clock.sleeps == []
    assert stub.calls == 1


# -- the budget -----------------------------------------------------------------------------------


def test_each_retry_gets_the_time_left_as_its_timeouts(stub, clock):
    """The read timeout is the exchange's budget: each attempt gets what is left of it as
    its connect and read timeouts (never more than configured)."""
    stub.answers = [503, 503, 200]
    stub.before = lambda: clock.advance(1.0)
    http, _ = session(retry=retry(3, backoff=[0.5], clock=clock), clock=clock)
    assert http.get(URL, timeout=(2.0, 4.0)).status_code == 200
    assert stub.timeouts == [(2.0, 4.0), (2.0, 2.5), (1.0, 1.0)]


def test_a_float_timeout_bounds_both_and_none_means_no_budget(stub, clock):
    """timeout=3 is (3, 3); timeout=None leaves the attempts unbounded and the waits too."""
    stub.answers = [(503, {"Retry-After": "30"}), 200]
    http, _ = session(retry=fast(clock=clock), clock=clock)
    assert http.get(URL).status_code == 200
    assert stub.timeouts == [(None, None), (None, None)]
    assert clock.sleeps == [30.0]
    stub.answers = [200]
    http.get(URL, timeout=3)
    assert stub.timeouts[-1] == (3.0, 3.0)
    stub.answers = [200]
    http.get(URL, timeout=urllib3.Timeout(connect=1, read=2))
    assert stub.timeouts[-1] == (1.0, 2.0)


def test_an_enclosing_buttress_timeout_narrows_the_budget(stub, clock):
    """Inside `with buttress.timeout(1.5)`, a request with timeout=10 gets 1.5 s."""
    http, _ = session(retry=fast(clock=clock), clock=clock)
    with buttress.timeout(1.5, clock=clock):
        http.get(URL, timeout=10)
        http.get(URL)
    assert stub.timeouts == [(1.5, 1.5), (1.5, 1.5)]


def test_a_timeout_names_the_configured_timeout(stub, clock):
    """A read timeout becomes a ReadTimeoutExceeded: a requests.ReadTimeout and a
    TimeoutExceeded, naming the configured read timeout, not the attempt's cut one."""
    stub.answers = [requests.ReadTimeout("Read timed out. (read timeout=0.25)")]
    http, _ = session(retry=fast(clock=clock), clock=clock)
    with pytest.raises(requests.ReadTimeout) as info:
        http.get(URL, timeout=(1.0, 0.25))
    error = info.value
    assert isinstance(error, ReadTimeoutExceeded)
    assert isinstance(error, TimeoutExceeded) and isinstance(error, requests.Timeout)
    assert isinstance(error, TimeoutError) and isinstance(error, ButtressError)
    assert error.timeout == 0.25
    assert "read timeout of 0.25s" in str(error) and "timeout=(1.0, 0.25)" in str(error)
    assert error.request is not None and error.request.url == URL
    assert isinstance(error.__cause__, requests.ReadTimeout)


def test_a_connect_timeout_names_the_connect_timeout(stub, clock):
    """A connect timeout after its retries is a ConnectTimeoutExceeded naming 0.5 s."""
    stub.answers = [requests.ConnectTimeout("connect timed out")]
    http, _ = session(retry=fast(2, clock=clock), clock=clock)
    with pytest.raises(requests.ConnectTimeout) as info:
        http.post(URL, data=b"x", timeout=(0.5, 30))
    assert isinstance(info.value, ConnectTimeoutExceeded)
    assert isinstance(info.value, requests.ConnectionError)  # as requests' own ConnectTimeout
    assert info.value.timeout == 0.5
    assert "connect timeout of 0.5s" in str(info.value) and "2 attempt(s)" in str(info.value)
    assert stub.calls == 2  # retried although POST: it never left


def test_a_timeout_cut_by_the_budget_names_the_budget(stub, clock):
    """A retry whose timeouts were cut to the time left names what ran out: the read
    timeout as the exchange's budget, or the enclosing deadline."""
    stub.answers = [503, requests.ReadTimeout("Read timed out.")]
    stub.before = lambda: clock.advance(0.5)
    http, _ = session(retry=retry(3, backoff=[0.1], clock=clock), clock=clock)
    with pytest.raises(ReadTimeoutExceeded) as info:
        http.get(URL, timeout=2.0)
    assert "read timeout of 2s (the budget of the whole exchange)" in str(info.value)
    assert info.value.timeout == 2.0
    stub.answers = [requests.ReadTimeout("Read timed out.")]
    stub.before = None
    with pytest.raises(ReadTimeoutExceeded) as info, buttress.timeout(0.8, clock=clock):
        http.get(URL, timeout=30)
    assert "enclosing deadline ran out (0.8s were left" in str(info.value)
    assert info.value.timeout == pytest.approx(0.8)


def test_timeout_option_bounds_the_whole_exchange(stub, clock):
    """The adapter's timeout= cuts the retries short; running out raises a requests
    Timeout that is the policy's expiry (counted in its snapshot)."""
    stub.answers = [refused()]
    stub.before = lambda: clock.advance(0.3)
    policy = buttress.timeout(1.0, name="upstream", clock=clock)
    http, _ = session(retry=retry(10, backoff=[0.1], clock=clock), timeout=policy, clock=clock)
    with pytest.raises(requests.ConnectionError):
        http.get(URL)
    assert stub.calls == 3  # 0.3 + 0.1 + 0.3 + 0.1 + 0.3: the next wait would cross 1 s

    stub.answers = [200]
    stub.before = lambda: clock.advance(2.0)  # a late answer is dropped
    with pytest.raises(requests.Timeout) as info:
        http.get(URL)
    assert isinstance(info.value, RequestTimeoutExceeded)
    assert "timeout 'upstream': exceeded 1s" in str(info.value)
    assert stub.raws[-1].was_closed
    stub.answers = [requests.ReadTimeout("Read timed out.")]
    with pytest.raises(ReadTimeoutExceeded) as info:
        http.get(URL)
    assert "timeout 'upstream': exceeded 1s" in str(info.value)
    assert policy.snapshot()["timeouts"] == 2


def test_invalid_request_timeouts_are_refused(stub):
    """A timeout that is neither seconds nor a (connect, read) pair raises ValueError."""
    http, _ = session()
    for bad in [(1, 2, 3), "1", (1, "2")]:
        with pytest.raises(ValueError, match="timeout"):
            http.get(URL, timeout=bad)
    assert stub.calls == 0


@given(
    connect=st.none() | st.floats(0.01, 100),
    read=st.none() | st.floats(0.01, 100),
    left=st.floats(0.01, 100),
)
def test_attempt_timeouts_never_exceed_the_configured_ones_nor_the_time_left(connect, read, left):
    """Whatever is configured and whatever is left, an attempt's timeouts are the smaller."""
    seen: list[object] = []
    clock = FakeClock()

    def record(adapter: HTTPAdapter, request: requests.PreparedRequest, **kwargs: Any) -> Any:
        seen.append(kwargs["timeout"])
        return adapter.build_response(request, Raw(200, {}, b""))

    original = HTTPAdapter.send
    HTTPAdapter.send = record  # type: ignore[method-assign]
    try:
        http, _ = session(clock=clock)
        with buttress.timeout(left, clock=clock):
            http.get(URL, timeout=(connect, read))
    finally:
        HTTPAdapter.send = original  # type: ignore[method-assign]
    budget = left if read is None else min(left, read)
    got_connect, got_read = seen[0]  # type: ignore[misc]
    assert got_connect == pytest.approx(budget if connect is None else min(connect, budget))
    assert got_read == pytest.approx(budget)


# -- circuit breakers, limiters and bulkheads per host --------------------------------------------


def test_4xx_do_not_count_and_5xx_open_the_circuit(stub, clock):
    """Ten 404s leave the host's breaker closed; two 500s open it; then calls fail fast."""
    stub.answers = [404]
    breaker = {"failure_threshold": 2, "reset_timeout": 30}
    http, _ = session(name="api", retry=None, breaker=breaker, clock=clock)
    for _ in range(10):
        assert http.get(URL).status_code == 404
    assert buttress.state()["circuit_breaker"]["api:api.example"]["state"] == "closed"
    stub.answers = [500]
    http.get(URL)
    http.get(URL)
    with pytest.raises(CircuitOpenError) as info:
        http.get(URL)
    assert isinstance(info.value, RejectedError)
    assert stub.calls == 12


def test_breakers_are_per_host_and_errors_count(stub, clock):
    """A failing host opens its own breaker only; connection errors count as failures."""
    http, adapter = session(name="svc", retry=None, breaker={"failure_threshold": 1}, clock=clock)
    stub.answers = [dropped()]
    with pytest.raises(requests.ConnectionError):
        http.get("http://down.example/")
    with pytest.raises(CircuitOpenError):
        http.get("http://down.example/")
    stub.answers = [200]
    assert http.get("http://up.example:8080/").status_code == 200
    assert http.get("https://up.example:443/").status_code == 200  # the default port
    assert {k: b.state for k, b in adapter.breakers.items()} == {
        "down.example": "open",
        "up.example:8080": "closed",
        "up.example": "closed",
    }


def test_breaker_failures_count_per_attempt_and_open_circuit_stops_retries(stub, clock):
    """Each retried 503 is a failure; once the circuit opens the retries stop."""
    stub.answers = [503]
    http, _ = session(retry=fast(5, clock=clock), breaker={"failure_threshold": 2}, clock=clock)
    with pytest.raises(CircuitOpenError):
        http.get(URL)
    assert stub.calls == 2


def test_adapters_sharing_a_name_share_their_per_host_policies(stub):
    """Two adapters named alike guard a host with one breaker."""
    _, one = session(name="x", breaker={}, retry=None)
    two_http, two = session(name="x", breaker={}, retry=None)
    one.send(requests.Request("GET", "http://h.example/").prepare())
    two_http.get("http://h.example/")
    assert one.breakers["h.example"] is two.breakers["h.example"]


def test_rate_limit_is_per_host(stub, clock):
    """Each host has its own bucket; an exhausted one raises RateLimited with retry_after."""
    limiter = {"rate": 1, "per": 10, "max_wait": 0}
    http, adapter = session(name="api", limiter=limiter, clock=clock)
    assert http.get("http://a.example/").status_code == 200
    with pytest.raises(RateLimited) as info:
        http.get("http://a.example/")
    assert info.value.retry_after == pytest.approx(10.0)
    assert http.get("http://b.example/").status_code == 200
    assert stub.calls == 2
    assert adapter.limiter is not None and adapter.limiter.name == "api"


def test_bulkhead_slot_is_held_until_a_streamed_response_is_closed(stub, clock):
    """With stream=True the slot is kept until close(); without it, it is free at once."""
    http, adapter = session(bulkhead={"max_concurrent": 1}, clock=clock)
    assert http.get(URL).status_code == 200
    bulkhead = adapter.bulkheads["api.example"]
    assert bulkhead.snapshot()["in_flight"] == 0
    response = http.get(URL, stream=True)
    assert bulkhead.snapshot()["in_flight"] == 1
    with pytest.raises(BulkheadFull):
        http.get(URL)
    response.close()
    response.close()  # a second close gives nothing back twice
    assert bulkhead.snapshot()["in_flight"] == 0


def test_bulkhead_slot_is_released_on_errors_and_retries(stub, clock):
    """Failed and retried attempts give their slot back before the next one."""
    stub.answers = [dropped(), 503, 200]
    http, adapter = session(retry=fast(clock=clock), bulkhead={"max_concurrent": 1}, clock=clock)
    assert http.get(URL, stream=True).status_code == 200
    stub.answers = [dropped()]
    with pytest.raises(requests.ConnectionError):
        http.get("http://other.example/")
    assert adapter.bulkheads["other.example"].snapshot()["in_flight"] == 0


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"retry": "3"}, ConfigTypeError, "retry must be"),
        ({"retry_methods": "GET"}, ConfigTypeError, "retry_methods"),
        ({"retry_statuses": [700]}, ConfigValueError, "retry_statuses"),
        ({"max_retry_after": -1}, ConfigValueError, "max_retry_after"),
        ({"breaker": 5}, ConfigTypeError, "breaker must be"),
        ({"bulkhead": {"name": "x"}}, ConfigValueError, "must not set 'name'"),
        ({"limiter": {"rate": -1}}, ConfigValueError, "rate"),
        ({"timeout": 0}, ConfigValueError, "seconds"),
        ({"name": ""}, ConfigValueError, "name"),
    ],
)
def test_options_are_validated(options, error, message):
    """Bad options fail at construction with the parameter's name."""
    with pytest.raises(error, match=message):
        ResilientAdapter(**options)


def test_the_adapter_and_its_errors_pickle_as_they_can():
    """The adapter holds live policies and refuses to pickle; its errors round-trip."""
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(ResilientAdapter())
    error = ReadTimeoutExceeded("read timeout of 1s exceeded", timeout=1.0)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ReadTimeoutExceeded and copy.timeout == 1.0 and str(copy) == str(error)


# -- against a real server ------------------------------------------------------------------------


@pytest.fixture
def count_sends(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Start counting urllib3 attempts (the real ``HTTPAdapter.send``): returns the list
    that gets a 1 per attempt."""
    original = HTTPAdapter.send

    def start() -> list[int]:
        sends: list[int] = []

        def counting(adapter: HTTPAdapter, *args: Any, **kwargs: Any) -> requests.Response:
            sends.append(1)
            return original(adapter, *args, **kwargs)

        monkeypatch.setattr(HTTPAdapter, "send", counting)
        return sends

    return start


def real(**options: Any) -> tuple[requests.Session, ResilientAdapter]:
    """A session whose adapter retries fast."""
    options.setdefault("retry", fast())
    return session(**options)


def test_real_server_get_retried_post_not(server):
    """A GET through 503s gets its 200; a POST gets the first 503."""
    path = server.script.on("/flaky", Act(503), Act(502), Act(200, body=b"done"))
    http, _ = real()
    response = http.get(server.url + path, timeout=5)
    assert (response.status_code, response.text) == (200, "done")
    assert server.script.hits[("GET", path)] == 3
    path = server.script.on("/post", Act(503), Act(200))
    assert http.post(server.url + path, data=b"x", timeout=5).status_code == 503
    assert server.script.hits[("POST", path)] == 1


def test_real_server_retry_after_seconds_and_date(server):
    """Retry-After in both forms makes the adapter wait (a second, whole seconds ahead)."""
    path = server.script.on("/later", Act(503, {"Retry-After": "1"}), Act(200))
    http, _ = real()
    started = time.monotonic()
    assert http.get(server.url + path, timeout=5).status_code == 200
    assert 0.9 <= time.monotonic() - started < 3
    path = server.script.on("/date", Act(429, retry_after_date=1), Act(200))
    started = time.monotonic()
    assert http.get(server.url + path, timeout=5).status_code == 200
    assert 0.9 <= time.monotonic() - started < 3


def test_real_server_never_waits_past_the_request_timeout(server):
    """Retry-After: 30 with timeout=1: the 503 comes back at once."""
    path = server.script.on("/busy", Act(503, {"Retry-After": "30"}), Act(200))
    http, _ = real()
    started = time.monotonic()
    assert http.get(server.url + path, timeout=1).status_code == 503
    assert time.monotonic() - started < 0.5


def test_real_server_hanging_answer_raises_a_requests_read_timeout(server):
    """A hanging server with timeout=(1, 0.2): a ReadTimeout naming 0.2 s, on time."""
    path = server.script.on("/hang", Act(delay=2.0))
    http, _ = real()
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout) as info:
        http.get(server.url + path, timeout=(1, 0.2))
    assert time.monotonic() - started < 0.8
    assert isinstance(info.value, TimeoutExceeded)
    assert info.value.timeout == 0.2 and "read timeout of 0.2s" in str(info.value)


def test_real_server_enclosing_timeout_bounds_the_request(server):
    """Inside `with buttress.timeout(0.3)` a request with timeout=10 gives up after 0.3 s."""
    path = server.script.on("/hang", Act(delay=2.0))
    http, _ = real()
    started = time.monotonic()
    with pytest.raises(requests.Timeout) as info, buttress.timeout(0.3):
        http.get(server.url + path, timeout=10)
    assert time.monotonic() - started < 0.9
    assert "enclosing deadline" in str(info.value)


def test_real_server_body_is_read_inside_the_attempt(server):
    """A body that stalls after the headers is a ReadTimeout (bare requests says
    ConnectionError); a body cut short is retried like any broken exchange."""
    path = server.script.on("/stall", Act(body_delay=2.0))
    http, _ = real()
    started = time.monotonic()
    with pytest.raises(requests.ReadTimeout) as info:
        http.get(server.url + path, timeout=0.2)
    assert time.monotonic() - started < 0.8
    assert isinstance(info.value, ReadTimeoutExceeded)
    path = server.script.on("/short", Act(short=True), Act(body=b"fine"))
    assert http.get(server.url + path, timeout=5).text == "fine"
    assert server.script.hits[("GET", path)] == 2
    path = server.script.on("/short-post", Act(short=True), Act(body=b"fine"))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        http.post(server.url + path, data=b"x", timeout=5)  # it was sent: not retried


def test_real_server_streamed_response_holds_its_slot_until_read_or_closed(server):
    """stream=True keeps the bulkhead slot until the body is read to the end or closed."""
    path = server.script.on("/stream", Act(body=b"streamed"))
    http, adapter = real(bulkhead={"max_concurrent": 1})
    response = http.get(server.url + path, stream=True, timeout=5)
    bulkhead = next(iter(adapter.bulkheads.values()))
    assert bulkhead.snapshot()["in_flight"] == 1
    with pytest.raises(BulkheadFull):
        http.get(server.url + path, timeout=5)
    assert response.content == b"streamed"  # read to the end: the connection goes back
    assert bulkhead.snapshot()["in_flight"] == 0
    with http.get(server.url + path, stream=True, timeout=5):
        assert bulkhead.snapshot()["in_flight"] == 1
    assert bulkhead.snapshot()["in_flight"] == 0


def test_real_server_dropped_connections(server):
    """Dropped connections are retried for GET and raised after the attempts."""
    path = server.script.on("/drop", Act(drop=True), Act(200))
    http, _ = real()
    assert http.get(server.url + path, timeout=5).status_code == 200
    path = server.script.on("/gone", Act(drop=True))
    with pytest.raises(requests.ConnectionError):
        http.get(server.url + path, timeout=5)
    assert server.script.hits[("GET", path)] == 3


def test_real_refused_connections_are_retried_even_for_post(count_sends):
    """Nothing listens on the port: the POST never left, so it is retried, then raised."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    attempts = count_sends()
    http, _ = real(retry=fast(3))
    with pytest.raises(requests.ConnectionError) as info:
        http.post(f"http://127.0.0.1:{port}/", data=b"x", timeout=2)
    assert not isinstance(info.value, requests.Timeout)
    assert attempts == [1, 1, 1]


def test_real_servers_per_host_breakers_and_limiter(server, other_server):
    """One host failing opens its breaker; the other host and its bucket are untouched."""
    bad = server.script.on("/bad", Act(500))
    good = other_server.script.on("/good", Act(200))
    limiter = {"rate": 1, "per": 60, "burst": 3, "max_wait": 0}
    http, adapter = real(retry=None, breaker={"failure_threshold": 2}, limiter=limiter)
    for _ in range(2):
        assert http.get(server.url + bad, timeout=5).status_code == 500
    with pytest.raises(CircuitOpenError):
        http.get(server.url + bad, timeout=5)
    for _ in range(3):
        assert http.get(other_server.url + good, timeout=5).status_code == 200
    with pytest.raises(RateLimited):
        http.get(other_server.url + good, timeout=5)
    assert server.script.hits[("GET", bad)] == 2
    states = {key: breaker.state for key, breaker in adapter.breakers.items()}
    assert sorted(states.values()) == ["closed", "open"]


def test_real_server_discarded_responses_free_their_connections(server):
    """Retried responses are drained and closed: the pool reuses one connection."""
    path = server.script.on("/again", Act(503, body=b"x" * 5000), Act(200))
    http, adapter = real(bulkhead={"max_concurrent": 1})
    for _ in range(10):
        server.script.on(path, Act(503, body=b"x" * 5000), Act(200))
        assert http.get(server.url + path, timeout=5).status_code == 200
    pools = adapter.poolmanager.pools
    # (the container refuses plain iteration)
    assert sum(pools[key].num_connections for key in pools.keys()) == 1  # noqa: SIM118
    assert next(iter(adapter.bulkheads.values())).snapshot()["in_flight"] == 0


def test_real_server_concurrent_requests_respect_the_bulkhead(server):
    """Eight threads through a two-slot bulkhead with a queue: never more than two at the
    server, every request answered."""
    lock = threading.Lock()
    active = [0, 0]  # now, most

    path = server.script.on("/work", Act(delay=0.02))
    original = HTTPAdapter.send

    def counting(adapter: HTTPAdapter, *args: Any, **kwargs: Any) -> requests.Response:
        with lock:
            active[0] += 1
            active[1] = max(active)
        try:
            return original(adapter, *args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    http, _ = real(bulkhead={"max_concurrent": 2, "max_queue": 16})
    statuses: list[int] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HTTPAdapter, "send", counting)

        def worker() -> None:
            for _ in range(3):
                status = http.get(server.url + path, timeout=10).status_code
                with lock:
                    statuses.append(status)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert statuses == [200] * 24
    assert active[1] <= 2
