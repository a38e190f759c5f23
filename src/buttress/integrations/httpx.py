"""Resilient httpx transports: retries with HTTP semantics, and policies per host.

``ResilientTransport`` (for ``httpx.Client``) and ``AsyncResilientTransport`` (for
``httpx.AsyncClient``) wrap any inner transport. Each attempt of a request passes,
outermost first, through the host's circuit breaker, the host's rate-limiter bucket and
the host's bulkhead, then the inner transport; the retry loop runs around the attempts,
and ``timeout=`` around everything.

HTTP semantics:

- Only the ``retry_methods`` are retried (by default the idempotent ones: GET, HEAD,
  OPTIONS, PUT, DELETE, TRACE), on a retryable transport error (timeouts, connection
  errors, the server closing the connection) or a ``retry_statuses`` response (429, 502,
  503, 504). An error that proves the request never left (``ConnectError``,
  ``ConnectTimeout``, ``PoolTimeout``) is retried whatever the method, like urllib3 does.
  A request whose body cannot be replayed (a generator) is never retried.
- ``Retry-After`` (delta-seconds or an HTTP-date, read against the response's own
  ``Date`` header) sets the next wait, capped at ``max_retry_after``.
- When status retries run out, the last response is *returned* (call
  ``response.raise_for_status()``); when error retries run out, the last httpx exception
  is re-raised as is. Every other error is a :class:`buttress.ButtressError`.
- A 5xx response and any exception count as circuit-breaker failures; other responses
  (4xx included) count as successes.
- The request's read timeout is the budget for the whole exchange: no wait (backoff,
  ``Retry-After``, limiter or bulkhead queue) that would end after it is started, and
  each retry gets the time left as its socket timeouts. Queue waits are also bounded by
  the pool timeout, and an enclosing ``buttress.timeout`` narrows everything.
- Running out of time stays an httpx error: the client's own timeout raises httpx's
  ``ReadTimeout`` (and the like), noted with the budget that ran out; the transport's
  ``timeout=`` raises :class:`TransportTimeout`, both an ``httpx.TimeoutException`` and a
  :class:`buttress.TimeoutExceeded`, whose message names the configured seconds.
- A response that is retried is read (up to 64 KiB, so its connection can be reused)
  and closed before the wait, so retries never hold connections.

The sync and async transports share every decision, and so does the ``requests``
adapter: the plan of an exchange lives in ``buttress.integrations._http``; this module
adds only httpx's errors, timeouts and responses, and only the waiting and the I/O differ.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import httpx

from buttress._deadline import remaining
from buttress._drivers import pump_async, pump_sync
from buttress.bulkhead import BulkheadPermit
from buttress.exceptions import ConfigTypeError, TimeoutExceeded

from ._http import (
    DRAIN_LIMIT,
    IDEMPOTENT_METHODS,
    MIN_TIMEOUT,
    RETRY_STATUSES,
    Exchange,
    Host,
    Resilience,
    TransportOptions,
    parse_retry_after,
    plan,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "IDEMPOTENT_METHODS",
    "RETRY_STATUSES",
    "AsyncResilientTransport",
    "ResilientTransport",
    "TransportTimeout",
    "parse_retry_after",
]

# Errors worth another attempt: the exchange broke in transit.
_RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# Errors that prove the request never reached the server: safe to retry for any method.
_NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Socket timeouts within this much of the time left are not worth cutting.
_CLAMP_SLACK = 0.001

T = TypeVar("T", httpx.BaseTransport, httpx.AsyncBaseTransport)


class TransportTimeout(httpx.TimeoutException, TimeoutExceeded):
    """The transport's ``timeout=`` ran out before the exchange (retries and waits
    included) ended.

    An ``httpx.TimeoutException`` (so ``except httpx.TimeoutException``,
    ``except httpx.HTTPError`` and ``retry(on=httpx.HTTPError)`` catch it) and a
    :class:`buttress.TimeoutExceeded` (and the built-in ``TimeoutError``). ``timeout``
    is the configured seconds, ``request`` the request.
    """

    def __init__(
        self, message: str, *, request: httpx.Request | None = None, timeout: float | None = None
    ) -> None:
        httpx.TimeoutException.__init__(self, message, request=request)
        self.timeout = timeout


def _timeout_error(exchange: _Exchange, effective: float | None = None) -> TransportTimeout:
    """The error for the transport's ``timeout=`` running out, naming its seconds."""
    timeout = exchange.owner.timeout
    assert timeout is not None
    name = exchange.owner.name
    label = "httpx transport" if name is None else f"httpx transport {name!r}"
    request = exchange.request
    message = (
        f"{label}: {request.method} {request.url} ran out of its timeout="
        f"{timeout.seconds:g}s (retries and waits included)"
    )
    if effective is not None and effective < timeout.seconds - 1e-3:
        message += f", cut to {effective:g}s by an enclosing deadline"
    return TransportTimeout(message, request=request, timeout=timeout.seconds)


def _explain(exchange: _Exchange, error: httpx.TimeoutException, entered: float) -> None:
    """Note on the client's own timeout error that its read timeout, the exchange's
    budget, ran out (its message names no value)."""
    read = exchange.read
    add = getattr(error, "add_note", None)  # Python 3.11+
    if read is None or add is None or exchange.clock.now() - entered < read - 1e-3:
        return
    note = (
        f"buttress: the request's read timeout ({read:g}s) is the budget of the whole "
        f"exchange, retries and waits included, and it ran out"
    )
    if note not in getattr(error, "__notes__", ()):
        add(note)


def _host_key(url: httpx.URL) -> str:
    host = url.host
    if ":" in host:
        host = f"[{host}]"
    port = url.port  # None for the scheme's default port
    return host if port is None else f"{host}:{port}"


class _Resilience(Resilience, Generic[T]):
    """The shared options and per-host policies, with the inner transport (the sync and
    the async transport differ only in their inner transport and their pump)."""

    _inner: ClassVar[type[Any]]  # what the inner transport must be
    _default: ClassVar[type[Any]]  # the inner transport's class when none is given

    def __init__(self, transport: T | None = None, **options: Unpack[TransportOptions]) -> None:
        if transport is not None and not isinstance(transport, self._inner):
            raise ConfigTypeError(
                f"transport must be an httpx.{self._inner.__name__}, got {transport!r} "
                f"({type(transport).__name__})"
            )
        self.transport: T = transport if transport is not None else self._default()
        super().__init__(**options)
        self._by_netloc: dict[bytes, Host] = {}

    def _host(self, url: httpx.URL) -> Host:
        host = self._by_netloc.get(url.netloc)
        if host is None:
            host = self.host_for(_host_key(url))
            # Several spellings of a host (an explicit default port) share its policies.
            self._by_netloc[url.netloc] = host
        return host


class _ReleasingStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that gives its bulkhead slot back when closed (once)."""

    def __init__(
        self, stream: httpx.SyncByteStream | httpx.AsyncByteStream, slot: BulkheadPermit
    ) -> None:
        self._stream = stream
        self._slot: BulkheadPermit | None = slot
        self._lock = threading.Lock()

    def _take(self) -> BulkheadPermit | None:
        with self._lock:
            slot, self._slot = self._slot, None
        return slot

    def __iter__(self) -> Iterator[bytes]:
        assert isinstance(self._stream, httpx.SyncByteStream)
        yield from self._stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert isinstance(self._stream, httpx.AsyncByteStream)
        async for chunk in self._stream:
            yield chunk

    def close(self) -> None:
        """Close the wrapped transport."""
        try:
            assert isinstance(self._stream, httpx.SyncByteStream)
            self._stream.close()
        finally:
            slot = self._take()
            if slot is not None:
                slot.release()

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        try:
            assert isinstance(self._stream, httpx.AsyncByteStream)
            await self._stream.aclose()
        finally:
            slot = self._take()
            if slot is not None:
                await slot.release_async()


def _close(response: httpx.Response) -> None:
    response.close()


async def _aclose(response: httpx.Response) -> None:
    await response.aclose()


def _discard(response: httpx.Response) -> None:
    """Read a little of a discarded response (so its connection is reused), then close it."""
    stream = response.stream
    try:
        assert isinstance(stream, httpx.SyncByteStream)
        read = 0
        for chunk in stream:
            read += len(chunk)
            if read > DRAIN_LIMIT:
                break
    except Exception:  # the response is being thrown away either way
        pass
    finally:
        response.close()


async def _adiscard(response: httpx.Response) -> None:
    stream = response.stream
    try:
        assert isinstance(stream, httpx.AsyncByteStream)
        read = 0
        async for chunk in stream:
            read += len(chunk)
            if read > DRAIN_LIMIT:
                break
    except Exception:  # the response is being thrown away either way
        pass
    finally:
        await response.aclose()


class _Exchange(Exchange[httpx.Response]):
    """The shared decisions, with httpx's errors, timeouts and responses."""

    __slots__ = ("extensions", "read", "request", "timeouts")

    RETRYABLE = _RETRYABLE_ERRORS
    CLOSE = (_close, _aclose)
    DISCARD = (_discard, _adiscard)

    def __init__(self, owner: _Resilience[Any], request: httpx.Request) -> None:
        replayable = isinstance(request.stream, httpx.ByteStream)
        super().__init__(owner, owner._host(request.url), request.method, replayable)
        self.request = request
        transport: Any = owner.transport
        self.send = (
            getattr(transport, "handle_request", None),
            getattr(transport, "handle_async_request", None),
            (request,),
        )
        self.extensions = request.extensions
        timeouts = self.extensions.get("timeout")
        self.timeouts: dict[str, float | None] | None = (
            timeouts if isinstance(timeouts, dict) else None
        )
        self.read = self.timeouts.get("read") if self.timeouts is not None else None
        self.pool = self.timeouts.get("pool") if self.timeouts is not None else None

    def exit(self) -> None:
        super().exit()
        self.request.extensions = self.extensions

    def start_attempt(self) -> None:
        """Give the attempt the time left as socket timeouts."""
        left = remaining()
        timeouts = self.timeouts
        if left is not None and timeouts is not None:
            left = max(left, MIN_TIMEOUT)
            # The slack spares the first attempt a copy when its own read timeout set
            # the deadline a few microseconds ago.
            edge = left + _CLAMP_SLACK
            if any(value is None or value > edge for value in timeouts.values()):
                clamped = {
                    key: left if value is None or value > left else value
                    for key, value in timeouts.items()
                }
                self.request.extensions = {**self.extensions, "timeout": clamped}

    def never_sent(self, exc: BaseException) -> bool:
        return isinstance(exc, _NOT_SENT_ERRORS)

    def server_error(self, response: httpx.Response) -> BaseException:
        return httpx.HTTPStatusError(
            f"server error {response.status_code}", request=self.request, response=response
        )

    def hold(self, response: httpx.Response) -> BulkheadPermit | None:
        """Keep the bulkhead slot until the response is closed; returns the slot when the
        response is closed already (its body is in memory), for the driver to release."""
        slot = self.slot
        if slot is None:
            return None
        self.slot = None
        if response.is_closed:  # the body is already in memory (built from content=)
            return slot
        response.stream = _ReleasingStream(response.stream, slot)
        return None


_OPTIONS_DOC = """
    Args:
        transport: the transport that sends each attempt (default: a new
            ``httpx.{sync}HTTPTransport()``). Closing this transport closes it.
        name: names the policies the transport builds: per-host circuit breakers and
            bulkheads are registered as ``"<name>:<host>"`` (``host`` or ``host:port``),
            the retry, limiter and timeout as ``"<name>"``. Transports sharing a name
            share their per-host policies. ``None`` (the default) registers nothing.
        retry: a :func:`buttress.retry` policy (its attempts, backoff, deadline, budget
            and ``on`` filter apply), a number of attempts with the default backoff, or
            ``None`` for no retries (default 3 attempts).
        retry_methods: methods that may be retried (default :data:`IDEMPOTENT_METHODS`;
            add ``"POST"`` only for endpoints that are safe to repeat).
        retry_statuses: response statuses that are retried (default
            :data:`RETRY_STATUSES`: 429, 502, 503, 504).
        max_retry_after: the longest wait a ``Retry-After`` header may ask for, in
            seconds (default 60); longer requests are cut to it.
        breaker: a mapping of :class:`~buttress.CircuitBreaker` options, for one breaker
            per host built on first use; or a ``CircuitBreaker`` shared by every host;
            or ``None`` (the default).
        limiter: a :class:`~buttress.RateLimiter` or a mapping of its options; each host
            gets its own bucket (``limiter.for_key(host)``). Default ``None``.
        bulkhead: a mapping of :class:`~buttress.Bulkhead` options (one per host), a
            ``Bulkhead`` shared by every host, or ``None`` (the default). A slot is held
            until the response is closed.
        timeout: seconds (or a :func:`buttress.timeout` policy) for the whole exchange,
            retries and waits included; running out raises :class:`TransportTimeout`
            (an ``httpx.TimeoutException`` and a :class:`~buttress.TimeoutExceeded`).
            Default ``None``: the request's own
            timeout is the only budget.
        registry: the registry named policies join (default: the default registry).
        clock: time source for the policies built here and the budget (default: the
            system clock).
"""


class ResilientTransport(_Resilience[httpx.BaseTransport], httpx.BaseTransport):
    """An ``httpx.Client`` transport that retries, breaks circuits and limits, per host.

    ``httpx.Client(transport=ResilientTransport(...))``. See the module documentation
    for the HTTP semantics.
    """

    __doc__ = (__doc__ or "") + _OPTIONS_DOC.format(sync="")
    _inner = httpx.BaseTransport
    _default = httpx.HTTPTransport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        exchange = _Exchange(self, request)
        entered = exchange.clock.now()
        exchange.enter(exchange.read, sync_timeout=True)
        timeout = self.timeout
        try:
            response = pump_sync(plan(exchange))
        except httpx.TimeoutException as exc:
            if timeout is not None and exchange.timed_out():
                raise timeout.expired(exc, error=_timeout_error(exchange)) from exc
            _explain(exchange, exc, entered)
            raise
        finally:
            exchange.exit()
        if timeout is not None and exchange.timed_out():
            # Sync code cannot be interrupted: a late answer is dropped, never acted on.
            response.close()
            raise timeout.expired(error=_timeout_error(exchange))
        return response

    def close(self) -> None:
        """Close the wrapped transport."""
        self.transport.close()


class AsyncResilientTransport(_Resilience[httpx.AsyncBaseTransport], httpx.AsyncBaseTransport):
    """An ``httpx.AsyncClient`` transport that retries, breaks circuits and limits, per host.

    ``httpx.AsyncClient(transport=AsyncResilientTransport(...))`` (asyncio). With
    ``timeout=``, the exchange is cancelled when the time is up.
    """

    __doc__ = (__doc__ or "") + _OPTIONS_DOC.format(sync="Async")
    _inner = httpx.AsyncBaseTransport
    _default = httpx.AsyncHTTPTransport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the policies (httpx calls this; see the class)."""
        exchange = _Exchange(self, request)
        entered = exchange.clock.now()
        timeout = self.timeout
        if timeout is None:
            exchange.enter(exchange.read, sync_timeout=False)
            try:
                return await pump_async(plan(exchange))
            except httpx.TimeoutException as exc:
                _explain(exchange, exc, entered)
                raise
            finally:
                exchange.exit()
        try:
            # The scope is entered before the read timeout's deadline is set, so that it
            # ends at its own time: a shorter read timeout ends in httpx's own error.
            async with timeout:  # cancels the exchange when the time is up
                exchange.enter(exchange.read, sync_timeout=False)
                try:
                    return await pump_async(plan(exchange))
                finally:
                    exchange.exit()
        except httpx.TimeoutException as exc:
            if exchange.timed_out() and not isinstance(exc, TransportTimeout):
                raise timeout.expired(exc, error=_timeout_error(exchange)) from exc
            _explain(exchange, exc, entered)
            raise
        except TimeoutExceeded as exc:
            if type(exc) is not TimeoutExceeded:  # pragma: no cover - not the scope's own
                raise
            # The scope's own expiry (counted and reported already), as an httpx error.
            raise _timeout_error(exchange, exc.timeout) from exc

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.transport.aclose()
