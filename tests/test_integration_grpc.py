"""gRPC interceptors against a real local gRPC server (127.0.0.1, an ephemeral port).

The service is defined here without protoc: generic handlers with raw-bytes messages
(no serializers), so no generated code is needed. The server answers from a script
(fail with a code and trailers, wait, block until released) and records every attempt.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from buttress import (
    Bulkhead,
    BulkheadFull,
    CircuitBreaker,
    CircuitOpenError,
    ConfigError,
    RateLimited,
    RateLimiter,
    TimeoutExceeded,
    retry,
    timeout,
)
from buttress.backoff import constant
from buttress.integrations.grpc import (
    PUSHBACK_KEY,
    AsyncClientInterceptor,
    AsyncServerInterceptor,
    ClientInterceptor,
    DeadlineExceeded,
    ServerInterceptor,
    parse_pushback,
)
from buttress.testing import FakeClock

SERVICE = "buttress.test.Echo"
ECHO = f"/{SERVICE}/Echo"
COUNT = f"/{SERVICE}/Count"  # unary-stream: answers the request, then `n` more chunks
NO_WAIT = retry(3, backoff=constant(0.0))

# -- a real server that fails on demand ---------------------------------------------------------


@dataclass(frozen=True)
class Act:
    """One answer of the test server."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    trailers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    block: bool = False  # wait until the test opens the gate
    hold: bool = False  # a stream waits for the gate after its first chunk


@dataclass
class Seen:
    """What the server saw of one attempt."""

    at: float
    time_remaining: float | None
    metadata: dict[str, str]


@dataclass
class Script:
    """The answers to give in order (the last one repeats); every attempt is recorded."""

    acts: list[Act] = field(default_factory=lambda: [Act()])
    seen: list[Seen] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def play(self, *acts: Act) -> None:
        with self.lock:
            self.acts = list(acts)

    def next(self, context: grpc.ServicerContext) -> Act:
        metadata = {key: str(value) for key, value in context.invocation_metadata()}
        with self.lock:
            self.seen.append(Seen(time.monotonic(), context.time_remaining(), metadata))
            return self.acts.pop(0) if len(self.acts) > 1 else self.acts[0]

    @property
    def attempts(self) -> int:
        with self.lock:
            return len(self.seen)


def _answer(script: Script, request: bytes, context: grpc.ServicerContext) -> bytes:
    act = script.next(context)
    if act.block:
        script.entered.set()
        script.gate.wait(10)
    if act.delay:
        script.gate.wait(act.delay)  # the gate also ends delays at teardown
    if act.code != grpc.StatusCode.OK:
        if act.trailers:
            context.set_trailing_metadata(act.trailers)
        context.abort(act.code, f"scripted {act.code.name}")
    return request


def _handler(script: Script) -> grpc.GenericRpcHandler:
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return _answer(script, request, context)

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        held = script.acts[0].hold
        yield _answer(script, request, context)
        if held:
            script.gate.wait(10)
        for index in range(int(request or b"0")):
            yield str(index).encode()

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        },
    )


@dataclass
class Server:
    """A running server: its target and script."""

    target: str
    script: Script
    server: grpc.Server


def _start(interceptors: tuple[Any, ...] = ()) -> Server:
    script = Script()
    executor = futures.ThreadPoolExecutor(max_workers=8)
    server = grpc.server(executor, interceptors=interceptors)
    server.add_generic_rpc_handlers((_handler(script),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return Server(f"127.0.0.1:{port}", script, server)


def _stop(server: Server) -> None:
    server.script.gate.set()
    server.server.stop(None).wait()


@pytest.fixture
def served() -> Iterator[Server]:
    """A plain server (no interceptor), stopped at teardown."""
    server = _start()
    try:
        yield server
    finally:
        _stop(server)


class Client:
    """A sync channel through a ClientInterceptor, closed at teardown."""

    def __init__(self, server: Server, **options: Any) -> None:
        self.interceptor = ClientInterceptor(server.target, **options)
        self.raw = grpc.insecure_channel(server.target)
        self.channel = grpc.intercept_channel(self.raw, self.interceptor)
        self.echo = self.channel.unary_unary(ECHO)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def client(served: Server) -> Iterator[Any]:
    """A factory of intercepted sync clients of ``served``."""
    made: list[Client] = []

    def make(**options: Any) -> Client:
        made.append(Client(served, **options))
        return made[-1]

    yield make
    for item in made:
        item.close()


def _fail(code: grpc.StatusCode, *trailers: tuple[str, str]) -> Act:
    return Act(code=code, trailers=tuple(trailers))


UNAVAILABLE = _fail(grpc.StatusCode.UNAVAILABLE)


# -- pushback parsing ---------------------------------------------------------------------------


@given(st.integers(min_value=-(2**31), max_value=2**31 - 1))
def test_pushback_integers(milliseconds: int) -> None:
    """A non-negative value is milliseconds to wait; a negative one means do not retry."""
    expected = None if milliseconds < 0 else milliseconds / 1000
    assert parse_pushback(str(milliseconds)) == expected
    assert parse_pushback(str(milliseconds).encode()) == expected


@given(st.text().filter(lambda text: not text.strip().lstrip("-").isdigit()))
def test_pushback_unparseable_means_do_not_retry(text: str) -> None:
    """Anything that is not a decimal integer asks the client not to retry."""
    assert parse_pushback(text) is None


def test_pushback_out_of_32_bits_means_do_not_retry() -> None:
    """The value is a signed 32-bit integer: beyond it, it cannot be parsed."""
    assert parse_pushback(str(2**31)) is None
    assert parse_pushback("٣") is None  # a digit, but not an ASCII one


# -- sync client ---------------------------------------------------------------------------------


def test_success_passes_through(client: Any, served: Server) -> None:
    """An answered call returns the response and its call, with one attempt."""
    c = client()
    response, call = c.echo.with_call(b"hello", timeout=5)
    assert response == b"hello"
    assert call.code() == grpc.StatusCode.OK
    assert served.script.attempts == 1


def test_unavailable_is_retried(client: Any, served: Server) -> None:
    """UNAVAILABLE is retried until the server answers."""
    served.script.play(UNAVAILABLE, UNAVAILABLE, Act())
    assert client(retry=NO_WAIT).echo(b"x", timeout=5) == b"x"
    assert served.script.attempts == 3


def test_other_codes_are_not_retried(client: Any, served: Server) -> None:
    """A code outside retry_codes is the caller's at once, as the channel's own RpcError."""
    served.script.play(_fail(grpc.StatusCode.INVALID_ARGUMENT))
    with pytest.raises(grpc.RpcError) as caught:
        client(retry=NO_WAIT).echo(b"x", timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not isinstance(caught.value, TimeoutExceeded)
    assert served.script.attempts == 1


def test_retries_run_out_with_the_last_error(client: Any, served: Server) -> None:
    """When attempts run out, the last attempt's RpcError is raised, with a note."""
    served.script.play(UNAVAILABLE)
    with pytest.raises(grpc.RpcError) as caught:
        client(retry=NO_WAIT).echo(b"x", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert served.script.attempts == 3


def test_retry_codes_are_configurable(client: Any, served: Server) -> None:
    """retry_codes replaces the default set."""
    served.script.play(UNAVAILABLE, Act())
    c = client(retry=NO_WAIT, retry_codes={grpc.StatusCode.ABORTED})
    with pytest.raises(grpc.RpcError):
        c.echo(b"x", timeout=5)
    assert served.script.attempts == 1
    served.script.play(_fail(grpc.StatusCode.ABORTED), Act())
    assert c.echo(b"y", timeout=5) == b"y"


def test_pushback_sets_the_wait(client: Any, served: Server) -> None:
    """RESOURCE_EXHAUSTED with a pushback of 200 ms: the retry comes at least 200 ms later."""
    served.script.play(_fail(grpc.StatusCode.RESOURCE_EXHAUSTED, (PUSHBACK_KEY, "200")), Act())
    assert client(retry=NO_WAIT).echo(b"x", timeout=5) == b"x"
    first, second = served.script.seen
    assert second.at - first.at >= 0.2


def test_pushback_is_capped(client: Any, served: Server) -> None:
    """A pushback longer than max_pushback is cut to it."""
    served.script.play(_fail(grpc.StatusCode.UNAVAILABLE, (PUSHBACK_KEY, "60000")), Act())
    started = time.monotonic()
    assert client(retry=NO_WAIT, max_pushback=0.05).echo(b"x", timeout=5) == b"x"
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("value", ["-1", "soon", "1.5"])
def test_pushback_saying_no_stops_retries(client: Any, served: Server, value: str) -> None:
    """A negative or unparseable pushback ends the retries: the server's error is raised."""
    served.script.play(_fail(grpc.StatusCode.RESOURCE_EXHAUSTED, (PUSHBACK_KEY, value)), Act())
    with pytest.raises(grpc.RpcError) as caught:
        client(retry=NO_WAIT).echo(b"x", timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served.script.attempts == 1


def test_pushback_past_the_deadline_gives_up_at_once(client: Any, served: Server) -> None:
    """A pushback that would end after the call's deadline is not waited for."""
    served.script.play(_fail(grpc.StatusCode.UNAVAILABLE, (PUSHBACK_KEY, "5000")), Act())
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        client(retry=NO_WAIT).echo(b"x", timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 0.5
    assert served.script.attempts == 1


def test_call_timeout_is_the_budget_of_every_attempt(client: Any, served: Server) -> None:
    """The call's timeout spans its retries: a later attempt gets only the time left."""
    served.script.play(UNAVAILABLE, Act())
    c = client(retry=retry(2, backoff=constant(0.3)))
    assert c.echo(b"x", timeout=1.0) == b"x"
    first, second = served.script.seen
    assert first.time_remaining is not None and second.time_remaining is not None
    assert first.time_remaining <= 1.05  # the grpc-timeout header rounds up
    assert second.time_remaining <= 0.75


def test_deadline_error_is_a_grpc_error_naming_the_timeout(client: Any, served: Server) -> None:
    """Running out of time raises an RpcError with DEADLINE_EXCEEDED that is also a
    TimeoutExceeded, naming the call's timeout."""
    served.script.play(Act(delay=3))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        client().echo(b"x", timeout=0.2)
    assert time.monotonic() - started < 1.5
    error = caught.value
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(error, TimeoutExceeded) and isinstance(error, DeadlineExceeded)
    assert isinstance(error, grpc.aio.AioRpcError)
    assert "0.2s" in str(error) and "0.2s" in error.details()
    assert error.timeout == pytest.approx(0.2)
    assert isinstance(error.__cause__, grpc.RpcError)


def test_interceptor_timeout_is_counted_and_named(client: Any, served: Server) -> None:
    """timeout= bounds calls without their own timeout; its expiry is counted."""
    served.script.play(Act(delay=3))
    c = client(name="users", timeout=0.2)
    with pytest.raises(TimeoutExceeded) as caught:
        c.echo(b"x")
    assert isinstance(caught.value, grpc.RpcError)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"timeout 'users:{served.target}': exceeded 0.2s" in str(caught.value)
    assert c.interceptor.snapshot()["timeout"]["timeouts"] == 1


def test_shorter_call_timeout_wins_over_the_interceptor_timeout(
    client: Any, served: Server
) -> None:
    """The smaller of the call's timeout and timeout= is the budget, and is the one named."""
    served.script.play(Act(delay=3))
    with pytest.raises(DeadlineExceeded) as caught:
        client(timeout=5).echo(b"x", timeout=0.2)
    assert "the call's timeout of 0.2s" in str(caught.value)


def test_enclosing_timeout_narrows_the_budget(client: Any, served: Server) -> None:
    """An enclosing buttress.timeout gives the attempt only the time it has left."""
    served.script.play(Act(delay=3))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught, timeout(0.2):
        client().echo(b"x", timeout=5)
    assert time.monotonic() - started < 1.5
    assert "enclosing buttress.timeout" in str(caught.value)


def test_server_deadline_exceeded_is_not_the_budget(client: Any, served: Server) -> None:
    """A DEADLINE_EXCEEDED the server sends with time left stays the server's error."""
    served.script.play(_fail(grpc.StatusCode.DEADLINE_EXCEEDED))
    with pytest.raises(grpc.RpcError) as caught:
        client().echo(b"x", timeout=5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not isinstance(caught.value, TimeoutExceeded)


def test_breaker_opens_on_failure_codes_only(client: Any, served: Server) -> None:
    """Failure codes open the target's breaker; then calls fail fast without the network."""
    c = client(retry=None, name="svc", breaker={"failure_threshold": 2, "reset_timeout": 60})
    served.script.play(_fail(grpc.StatusCode.NOT_FOUND))
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            c.echo(b"x", timeout=5)
    assert c.interceptor.breaker is not None
    assert c.interceptor.breaker.state == "closed"  # NOT_FOUND is an answer
    served.script.play(UNAVAILABLE)
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            c.echo(b"x", timeout=5)
    before = served.script.attempts
    with pytest.raises(CircuitOpenError):
        c.echo(b"x", timeout=5)
    assert served.script.attempts == before
    assert c.interceptor.breaker.name == f"svc:{served.target}"


def test_cancelled_is_neutral_for_the_breaker(client: Any, served: Server) -> None:
    """CANCELLED says nothing about the target: the breaker counts it as neutral."""
    c = client(retry=None, breaker={"failure_threshold": 1})
    served.script.play(_fail(grpc.StatusCode.CANCELLED))
    with pytest.raises(grpc.RpcError):
        c.echo(b"x", timeout=5)
    assert c.interceptor.breaker.state == "closed"
    assert c.interceptor.breaker.snapshot()["neutral"] == 1


def test_interceptors_sharing_a_name_share_the_target_policies(client: Any, served: Server) -> None:
    """Two interceptors with one name and target get the same breaker and limiter bucket."""
    first = client(name="shared", breaker={}, limiter={"rate": 1, "per": 60, "max_wait": 0})
    second = client(name="shared", breaker={}, limiter={"rate": 1, "per": 60, "max_wait": 0})
    assert first.interceptor.breaker is second.interceptor.breaker
    assert first.echo(b"x", timeout=5) == b"x"
    with pytest.raises(RateLimited):
        second.echo(b"x", timeout=5)


def test_limiter_rejects_without_reaching_the_server(client: Any, served: Server) -> None:
    """A call over the target's rate raises RateLimited and is never sent."""
    c = client(limiter=RateLimiter(rate=1, per=60, max_wait=0))
    assert c.echo(b"x", timeout=5) == b"x"
    with pytest.raises(RateLimited):
        c.echo(b"x", timeout=5)
    assert served.script.attempts == 1


def test_bulkhead_bounds_attempts_in_flight(client: Any, served: Server) -> None:
    """With one slot, a second concurrent call is rejected; the slot comes back after."""
    bulkhead = Bulkhead(max_concurrent=1)
    c = client(bulkhead=bulkhead)
    served.script.play(Act(block=True), Act())
    with futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(c.echo, b"a", timeout=10)
        assert served.script.entered.wait(5)
        with pytest.raises(BulkheadFull):
            c.echo(b"b", timeout=5)
        served.script.gate.set()
        assert first.result(5) == b"a"
    assert bulkhead.in_flight == 0
    assert c.echo(b"c", timeout=5) == b"c"


def test_future_calls_finish_with_the_outcome(client: Any, served: Server) -> None:
    """future(): the retries run, and the future holds the response or the error."""
    served.script.play(UNAVAILABLE, Act())
    c = client(retry=NO_WAIT)
    assert c.echo.future(b"x", timeout=5).result() == b"x"
    served.script.play(_fail(grpc.StatusCode.PERMISSION_DENIED))
    failed = c.echo.future(b"x", timeout=5)
    assert failed.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError):
        failed.result()


def test_streams_pass_through_untouched(client: Any, served: Server) -> None:
    """Unary-stream calls are not intercepted: they reach the server as they are."""
    c = client(limiter=RateLimiter(rate=1, per=60, max_wait=0))
    count = c.channel.unary_stream(COUNT)
    assert list(count(b"2", timeout=5)) == [b"2", b"0", b"1"]
    assert list(count(b"0", timeout=5)) == [b"0"]  # the limiter saw neither


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"retry_codes": [1]}, TypeError),
        ({"retry_codes": grpc.StatusCode.UNAVAILABLE}, TypeError),
        ({"retry_codes": [grpc.StatusCode.OK]}, ValueError),
        ({"failure_codes": "UNAVAILABLE"}, TypeError),
        ({"retry": "3"}, TypeError),
        ({"max_pushback": -1}, ValueError),
        ({"breaker": 5}, TypeError),
        ({"breaker": {"name": "x"}}, ValueError),
        ({"breaker": {"failure_threshold": 0}}, ValueError),
        ({"limiter": {"rate": 1, "colour": "red"}}, TypeError),
        ({"timeout": 0}, ValueError),
        ({"name": " "}, ValueError),
        ({"registry": object()}, TypeError),
        ({"bogus": 1}, TypeError),
    ],
)
def test_options_are_validated(options: dict[str, Any], error: type[Exception]) -> None:
    """Bad options fail at construction with a ConfigError naming the problem."""
    with pytest.raises(error) as caught:
        ClientInterceptor("127.0.0.1:1", **options)
    assert isinstance(caught.value, ConfigError)


def test_target_is_required() -> None:
    """The target keys the per-target policies: it must be a non-empty string."""
    with pytest.raises(TypeError, match="target"):
        ClientInterceptor("")
    assert "127.0.0.1:1" in repr(ClientInterceptor("127.0.0.1:1"))


# -- aio client ----------------------------------------------------------------------------------


def _aio(served: Server, coro: Any, **options: Any) -> Any:
    async def main() -> Any:
        interceptor = AsyncClientInterceptor(served.target, **options)
        async with grpc.aio.insecure_channel(served.target, interceptors=[interceptor]) as channel:
            return await coro(channel.unary_unary(ECHO), interceptor)

    return asyncio.run(main())


def test_aio_success_and_retry(served: Server) -> None:
    """grpc.aio: UNAVAILABLE is retried, and the call's status and metadata are there."""
    served.script.play(UNAVAILABLE, Act())

    async def scenario(echo: Any, interceptor: Any) -> Any:
        call = echo(b"x", timeout=5)
        response = await call
        return response, await call.code()

    response, code = _aio(served, scenario, retry=NO_WAIT)
    assert (response, code) == (b"x", grpc.StatusCode.OK)
    assert served.script.attempts == 2


def test_aio_deadline_error(served: Server) -> None:
    """grpc.aio: out of time is an AioRpcError with DEADLINE_EXCEEDED and a TimeoutExceeded."""
    served.script.play(Act(delay=3))

    async def scenario(echo: Any, interceptor: Any) -> Any:
        call = echo(b"x", timeout=0.2)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        return caught.value

    started = time.monotonic()
    error = _aio(served, scenario)
    assert time.monotonic() - started < 1.5
    assert isinstance(error, TimeoutExceeded)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "0.2s" in str(error)


def test_aio_enclosing_timeout(served: Server) -> None:
    """grpc.aio: an enclosing async buttress.timeout narrows the call's deadline."""
    served.script.play(Act(delay=3))

    async def scenario(echo: Any, interceptor: Any) -> Any:
        with pytest.raises(TimeoutExceeded):
            async with timeout(0.2):
                await echo(b"x", timeout=5)

    started = time.monotonic()
    _aio(served, scenario)
    assert time.monotonic() - started < 1.5


def test_aio_pushback_and_breaker(served: Server) -> None:
    """grpc.aio: a "do not retry" pushback ends retries; failures open the breaker."""
    served.script.play(_fail(grpc.StatusCode.UNAVAILABLE, (PUSHBACK_KEY, "-1")))

    async def scenario(echo: Any, interceptor: Any) -> Any:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await echo(b"x", timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(CircuitOpenError):
            await echo(b"x", timeout=5)

    _aio(served, scenario, retry=NO_WAIT, breaker=CircuitBreaker(failure_threshold=1))
    assert served.script.attempts == 1


def test_aio_pushback_wait(served: Server) -> None:
    """grpc.aio: a pushback of 200 ms delays the next attempt by at least that."""
    served.script.play(_fail(grpc.StatusCode.RESOURCE_EXHAUSTED, (PUSHBACK_KEY, "200")), Act())

    async def scenario(echo: Any, interceptor: Any) -> Any:
        return await echo(b"x", timeout=5)

    assert _aio(served, scenario, retry=NO_WAIT) == b"x"
    first, second = served.script.seen
    assert second.at - first.at >= 0.2


# -- sync server ---------------------------------------------------------------------------------


@pytest.fixture
def shedding() -> Iterator[Any]:
    """A factory of servers behind a ServerInterceptor, stopped at teardown."""
    made: list[tuple[Server, grpc.Channel]] = []

    def make(**options: Any) -> tuple[Server, grpc.Channel]:
        server = _start((ServerInterceptor(**options),))
        made.append((server, grpc.insecure_channel(server.target)))
        return made[-1]

    yield make
    for server, channel in made:
        channel.close()
        _stop(server)


def _trailer(error: grpc.RpcError) -> str | None:
    for key, value in error.trailing_metadata() or ():
        if key == PUSHBACK_KEY:
            return str(value)
    return None


def test_server_sheds_over_the_rate_with_pushback(shedding: Any) -> None:
    """Over the rate: RESOURCE_EXHAUSTED with the limiter's wait as pushback; no handler."""
    server, channel = shedding(limiter=RateLimiter(rate=1, per=60))
    echo = channel.unary_unary(ECHO)
    assert echo(b"x", timeout=5) == b"x"
    with pytest.raises(grpc.RpcError) as caught:
        echo(b"x", timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    pushback = _trailer(caught.value)
    assert pushback is not None and 59_000 <= int(pushback) <= 60_000
    assert server.script.attempts == 1


def test_server_keys_and_exemptions(shedding: Any) -> None:
    """A key per metadata value gives each caller its own bucket; exempt methods pass."""
    _, channel = shedding(
        limiter=RateLimiter(rate=1, per=60), key="metadata:tenant", exempt=(f"/{SERVICE}/C",)
    )
    echo = channel.unary_unary(ECHO)
    assert echo(b"a", metadata=[("tenant", "a")], timeout=5) == b"a"
    assert echo(b"b", metadata=[("tenant", "b")], timeout=5) == b"b"
    with pytest.raises(grpc.RpcError):
        echo(b"a", metadata=[("tenant", "a")], timeout=5)
    count = channel.unary_stream(COUNT)
    for _ in range(3):
        assert list(count(b"1", timeout=5)) == [b"1", b"0"]


def test_server_bulkhead_sheds_and_holds_slots_for_streams(shedding: Any) -> None:
    """A full bulkhead sheds with the configured pushback; a stream holds its slot to the end."""
    bulkhead = Bulkhead(max_concurrent=1)
    server, channel = shedding(bulkhead=bulkhead, busy_pushback=0.5)
    server.script.play(Act(block=True), Act())
    echo = channel.unary_unary(ECHO)
    with futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(echo, b"a", timeout=10)
        assert server.script.entered.wait(5)
        with pytest.raises(grpc.RpcError) as caught:
            echo(b"b", timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _trailer(caught.value) == "500"
        server.script.gate.set()
        assert first.result(5) == b"a"
    server.script.gate.clear()
    server.script.play(Act(hold=True))
    stream = channel.unary_stream(COUNT)(b"3", timeout=5)
    assert next(stream) == b"3"
    assert bulkhead.in_flight == 1  # the stream is still open
    server.script.gate.set()
    assert list(stream) == [b"0", b"1", b"2"]
    deadline = time.monotonic() + 5
    while bulkhead.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bulkhead.in_flight == 0


def test_client_honours_the_server_pushback() -> None:
    """End to end: the shedding server's pushback paces the client's retry."""
    server = _start((ServerInterceptor(limiter=RateLimiter(rate=5, per=1)),))
    channel = grpc.intercept_channel(
        grpc.insecure_channel(server.target), ClientInterceptor(server.target, retry=NO_WAIT)
    )
    try:
        echo = channel.unary_unary(ECHO)
        assert echo(b"a", timeout=5) == b"a"
        assert echo(b"b", timeout=5) == b"b"  # shed once, retried after ~200 ms
        first, second = server.script.seen
        assert second.at - first.at >= 0.15
    finally:
        channel.close()
        _stop(server)


def test_server_options_are_validated() -> None:
    """Bad server options fail at construction."""
    with pytest.raises(TypeError):
        ServerInterceptor(limiter=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ServerInterceptor(bulkhead=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        ServerInterceptor(key="client")
    with pytest.raises(ValueError):
        ServerInterceptor(max_wait=-1)
    with pytest.raises(TypeError):
        ServerInterceptor(exempt="/x")


# -- aio server ----------------------------------------------------------------------------------


def test_aio_server_sheds() -> None:
    """grpc.aio server: over the rate is RESOURCE_EXHAUSTED with pushback, for both kinds."""

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def count(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for index in range(int(request)):
            yield str(index).encode()

    async def main() -> None:
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Echo": grpc.unary_unary_rpc_method_handler(echo),
                "Count": grpc.unary_stream_rpc_method_handler(count),
            },
        )
        limiter = RateLimiter(rate=2, per=60, burst=2)
        server = grpc.aio.server(interceptors=[AsyncServerInterceptor(limiter=limiter)])
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert await channel.unary_unary(ECHO)(b"x", timeout=5) == b"x"
                chunks = [item async for item in channel.unary_stream(COUNT)(b"2", timeout=5)]
                assert chunks == [b"0", b"1"]
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await channel.unary_unary(ECHO)(b"x", timeout=5)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert _trailer(caught.value) is not None
        finally:
            await server.stop(None)

    asyncio.run(main())


# -- leaks, cancellation, pickling -------------------------------------------------------------


def test_aio_cancelled_call_gives_back_its_slot_and_permit(served: Server) -> None:
    """A grpc.aio call cancelled mid-attempt frees its bulkhead slot; the breaker permit is
    settled as neutral (the caller left, the target did nothing wrong)."""
    served.script.play(Act(block=True))
    bulkhead = Bulkhead(max_concurrent=1)
    breaker = CircuitBreaker(failure_threshold=1)

    async def scenario(echo: Any, interceptor: Any) -> None:
        call = echo(b"x", timeout=10)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, served.script.entered.wait, 5)
        assert bulkhead.in_flight == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0)

    _aio(served, scenario, bulkhead=bulkhead, breaker=breaker)
    assert bulkhead.in_flight == 0
    assert breaker.state == "closed"
    assert breaker.snapshot()["neutral"] == 1


def test_aio_limiter_and_bulkhead_reject_before_the_network(served: Server) -> None:
    """grpc.aio: the target's limiter rejects at once with RateLimited, never sent."""

    async def scenario(echo: Any, interceptor: Any) -> None:
        assert await echo(b"x", timeout=5) == b"x"
        with pytest.raises(RateLimited):
            await echo(b"x", timeout=5)

    _aio(served, scenario, limiter={"rate": 1, "per": 60, "max_wait": 0})
    assert served.script.attempts == 1


def test_deadline_error_survives_pickling(client: Any, served: Server) -> None:
    """Like every buttress error, DeadlineExceeded survives a pickle round-trip."""
    import pickle

    served.script.play(Act(delay=3))
    with pytest.raises(DeadlineExceeded) as caught:
        client().echo(b"x", timeout=0.1)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert isinstance(copy, DeadlineExceeded) and str(copy) == str(caught.value)
    assert copy.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert copy.timeout == caught.value.timeout


def test_server_waits_up_to_max_wait(shedding: Any) -> None:
    """With max_wait, a call over the rate waits for its permit instead of being shed."""
    server, channel = shedding(limiter=RateLimiter(rate=5), max_wait=1.0)
    echo = channel.unary_unary(ECHO)
    started = time.monotonic()
    assert echo(b"a", timeout=5) == b"a"
    assert echo(b"b", timeout=5) == b"b"
    assert time.monotonic() - started >= 0.15
    assert server.script.attempts == 2


def test_server_key_function_none_means_unlimited(shedding: Any) -> None:
    """A key function returning None lets that call through; "method" keys per method."""
    _, channel = shedding(
        limiter=RateLimiter(rate=1, per=60),
        key=lambda details: None if details.method == COUNT else details.method,
    )
    echo, count = channel.unary_unary(ECHO), channel.unary_stream(COUNT)
    assert echo(b"x", timeout=5) == b"x"
    for _ in range(3):
        assert list(count(b"0", timeout=5)) == [b"0"]
    with pytest.raises(grpc.RpcError) as caught:
        echo(b"x", timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_server_without_pushback(shedding: Any) -> None:
    """pushback=False sheds without the trailer."""
    _, channel = shedding(limiter=RateLimiter(rate=1, per=60), key="method", pushback=False)
    echo = channel.unary_unary(ECHO)
    echo(b"x", timeout=5)
    with pytest.raises(grpc.RpcError) as caught:
        echo(b"x", timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _trailer(caught.value) is None


def test_spent_budget_sends_nothing(client: Any, served: Server) -> None:
    """A call made after the enclosing deadline has passed fails at once, unsent, and the
    breaker permit it took is given back as neutral."""
    clock = FakeClock()
    c = client(breaker={"failure_threshold": 1})
    with pytest.raises(DeadlineExceeded) as caught, timeout(1, clock=clock):
        clock.advance(2)
        c.echo(b"x", timeout=5)
    assert "enclosing buttress.timeout" in str(caught.value)
    assert served.script.attempts == 0
    assert c.interceptor.breaker.snapshot()["neutral"] == 1


def test_server_wait_never_outlasts_the_client_deadline(shedding: Any) -> None:
    """A call whose permit would come after its own deadline is shed at once."""
    _, channel = shedding(limiter=RateLimiter(rate=1, per=60), max_wait=None)
    echo = channel.unary_unary(ECHO)
    echo(b"x", timeout=5)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        echo(b"x", timeout=2)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - started < 1.0


def test_concurrent_sync_calls_share_the_bulkhead(client: Any, served: Server) -> None:
    """Many threads through one interceptor: every call is answered, never more than the
    bulkhead's slots are in flight, and every slot comes back."""
    bulkhead = Bulkhead(max_concurrent=3, max_queue=100)
    c = client(bulkhead=bulkhead)
    served.script.play(Act(delay=0.005))
    peak = 0
    lock = threading.Lock()

    def one(n: int) -> bytes:
        nonlocal peak
        with lock:
            peak = max(peak, bulkhead.in_flight)
        return c.echo(str(n).encode(), timeout=10)

    with futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(60)))
    assert answers == [str(n).encode() for n in range(60)]
    assert peak <= 3
    assert bulkhead.in_flight == 0 and bulkhead.queued == 0


def test_concurrent_aio_calls_share_the_bulkhead(served: Server) -> None:
    """Many tasks through one aio interceptor: all answered, every slot given back."""
    bulkhead = Bulkhead(max_concurrent=3, max_queue=100)

    async def scenario(echo: Any, interceptor: Any) -> list[bytes]:
        return list(await asyncio.gather(*(echo(str(n).encode(), timeout=10) for n in range(40))))

    answers = _aio(served, scenario, bulkhead=bulkhead)
    assert answers == [str(n).encode() for n in range(40)]
    assert bulkhead.in_flight == 0 and bulkhead.queued == 0
