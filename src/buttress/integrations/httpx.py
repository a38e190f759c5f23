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
- A response that is retried is read (up to 64 KiB, so its connection can be reused)
  and closed before the wait, so retries never hold connections.

The sync and async transports share every decision (:class:`_Exchange`); only the
waiting and the I/O differ.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextvars import Token
from datetime import timedelta, timezone
from typing import Any, ClassVar, Generic, Literal, TypeVar

import httpx

from buttress._deadline import remaining, reset_deadline, set_deadline
from buttress._drivers import Plan, pump_async, pump_sync
from buttress._validate import require_seconds
from buttress.backends import check_store
from buttress.bulkhead import Bulkhead, BulkheadPermit
from buttress.circuit_breaker import BreakerPermit, CircuitBreaker
from buttress.clock import Clock, resolve_clock
from buttress.exceptions import ConfigError, ConfigTypeError, ConfigValueError
from buttress.rate_limiter import RateLimiter
from buttress.registry import Registry, default_registry
from buttress.retry import Retry, RetryState
from buttress.timeout import Timeout

__all__ = [
    "IDEMPOTENT_METHODS",
    "RETRY_STATUSES",
    "AsyncResilientTransport",
    "ResilientTransport",
    "parse_retry_after",
]

IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
RETRY_STATUSES: frozenset[int] = frozenset({429, 502, 503, 504})

# Errors worth another attempt: the exchange broke in transit.
_RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# Errors that prove the request never reached the server: safe to retry for any method.
_NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# How much of a discarded response is read so that its connection can be reused.
_DRAIN_LIMIT = 65536
# The smallest socket timeout given to an attempt (0 would mean "non-blocking").
_MIN_TIMEOUT = 0.001
# Socket timeouts within this much of the time left are not worth cutting.
_CLAMP_SLACK = 0.001

_Deadline = Token[Any]
T = TypeVar("T", httpx.BaseTransport, httpx.AsyncBaseTransport)


def parse_retry_after(
    value: str, *, date: str | None = None, now: float | None = None
) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header value, or ``None`` if invalid.

    Args:
        value: the header value: delta-seconds (``"120"``) or an HTTP-date
            (``"Wed, 21 Oct 2015 07:28:00 GMT"``).
        date: the response's ``Date`` header. An HTTP-date is read against it, so the
            wait does not depend on the skew between the client's and the server's clocks.
        now: the current Unix time, used when there is no valid ``date`` (default:
            ``time.time()``).

    A date in the past gives ``0.0``.
    """
    text = value.strip()
    if text.isdigit() and text.isascii():
        return float(int(text))
    moment = _http_date(text)
    if moment is None:
        return None
    reference = _http_date(date) if date is not None else None
    if reference is None:
        reference = time.time() if now is None else now
    return max(moment - reference, 0.0)


def _http_date(text: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def _host_key(url: httpx.URL) -> str:
    host = url.host
    if ":" in host:
        host = f"[{host}]"
    port = url.port  # None for the scheme's default port
    return host if port is None else f"{host}:{port}"


class _Host:
    """The policies of one host (``host`` or ``host:port``)."""

    __slots__ = ("breaker", "bulkhead", "limiter")

    def __init__(
        self,
        breaker: CircuitBreaker | None,
        limiter: RateLimiter | None,
        bulkhead: Bulkhead | None,
    ) -> None:
        self.breaker = breaker
        self.limiter = limiter
        self.bulkhead = bulkhead


def _options(
    what: Literal["breaker", "bulkhead", "limiter"],
    value: Mapping[str, Any],
    factory: type[Any],
    clock: Clock,
    name: str | None,
) -> dict[str, Any]:
    """Check a mapping of policy options by building an unregistered policy from it."""
    if not all(isinstance(key, str) for key in value):
        raise ConfigTypeError(f"{what} options must be keyword names, got {dict(value)!r}")
    for reserved in ("name", "registry"):
        if reserved in value:
            raise ConfigValueError(
                f"{what} options must not set {reserved!r} (the transport names and "
                f"registers its per-host {what}s), got {dict(value)!r}"
            )
    options = {"clock": clock, **value}
    store = options.pop("store", None)
    try:
        factory(**options)
    except ConfigError:
        raise
    except TypeError as exc:
        raise ConfigTypeError(f"{what} options {dict(value)!r} are invalid: {exc}") from None
    if store is not None:
        check_store(what, store)
        if name is None:
            raise ConfigValueError(
                f"{what} options with a store need the transport's name=: the per-host "
                f"{what}s are shared by name, got name=None"
            )
        options["store"] = store
    return options


P = TypeVar("P", CircuitBreaker, RateLimiter, Bulkhead)


def _per_host(
    what: Literal["breaker", "bulkhead", "limiter"],
    value: object,
    factory: type[P],
    clock: Clock,
    name: str | None,
) -> tuple[P | None, dict[str, Any] | None]:
    """A policy shared by every host, or the checked options of one policy per host."""
    if value is None or isinstance(value, factory):
        return value, None
    if isinstance(value, Mapping):
        return None, _options(what, value, factory, clock, name)
    kind = factory.__name__
    raise ConfigTypeError(
        f"{what} must be a {kind} (shared by every host), a mapping of {kind} options (one "
        f"{what} per host) or None, got {value!r}"
    )


class _Resilience(Generic[T]):
    """Configuration, per-host state and the plan of an exchange, shared by the sync and
    the async transport (they differ only in their inner transport and their pump)."""

    _inner: ClassVar[type[Any]]  # what the inner transport must be
    _default: ClassVar[type[Any]]  # the inner transport's class when none is given

    def __init__(
        self,
        transport: T | None = None,
        *,
        name: str | None = None,
        retry: Retry | int | None = 3,
        retry_methods: Iterable[str] = IDEMPOTENT_METHODS,
        retry_statuses: Iterable[int] = RETRY_STATUSES,
        max_retry_after: float | timedelta = 60.0,
        breaker: CircuitBreaker | Mapping[str, Any] | None = None,
        limiter: RateLimiter | Mapping[str, Any] | None = None,
        bulkhead: Bulkhead | Mapping[str, Any] | None = None,
        timeout: Timeout | float | timedelta | None = None,
        registry: Registry | None = None,
        clock: Clock | None = None,
    ) -> None:
        if transport is not None and not isinstance(transport, self._inner):
            raise ConfigTypeError(
                f"transport must be an httpx.{self._inner.__name__}, got {transport!r} "
                f"({type(transport).__name__})"
            )
        self.transport: T = transport if transport is not None else self._default()
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ConfigValueError(f"name must be a non-empty string or None, got {name!r}")
        self.name = name
        self._clock = resolve_clock(clock)
        if registry is not None and not isinstance(registry, Registry):
            raise ConfigTypeError(
                f"registry must be a buttress.Registry, got {registry!r} "
                f"({type(registry).__name__})"
            )
        self._registry = registry if registry is not None else default_registry()
        named: dict[str, Any] = {"registry": self._registry, "clock": self._clock}

        if retry is None or isinstance(retry, Retry):
            self.retry = retry
        elif isinstance(retry, int) and not isinstance(retry, bool):
            self.retry = Retry(retry, name=name, **named)
        else:
            raise ConfigTypeError(
                f"retry must be a buttress.retry(...) policy, a number of attempts or None, "
                f"got {retry!r} ({type(retry).__name__})"
            )
        if isinstance(retry_methods, str) or not isinstance(retry_methods, Iterable):
            raise ConfigTypeError(
                f"retry_methods must be a collection of HTTP methods, got {retry_methods!r}"
            )
        methods = []
        for method in retry_methods:
            if not isinstance(method, str) or not method.strip():
                raise ConfigTypeError(f"retry_methods must hold method names, got {method!r}")
            methods.append(method.strip().upper())
        self.retry_methods = frozenset(methods)
        if not isinstance(retry_statuses, Iterable):
            raise ConfigTypeError(
                f"retry_statuses must be a collection of status codes, got {retry_statuses!r}"
            )
        statuses = []
        for status in retry_statuses:
            if isinstance(status, bool) or not isinstance(status, int):
                raise ConfigTypeError(
                    f"retry_statuses must hold integer status codes, got {status!r}"
                )
            if not 100 <= status <= 599:
                raise ConfigValueError(f"retry_statuses must be within 100..599, got {status!r}")
            statuses.append(status)
        self.retry_statuses = frozenset(statuses)
        self.max_retry_after = require_seconds("max_retry_after", max_retry_after, allow_zero=True)

        self._breaker, self._breaker_options = _per_host(
            "breaker", breaker, CircuitBreaker, self._clock, name
        )
        shared, options = _per_host("limiter", limiter, RateLimiter, self._clock, name)
        # one limiter either way: each host gets its own bucket (for_key)
        self._limiter: RateLimiter | None = (
            shared
            if options is None
            else RateLimiter(name, **{**options, "registry": self._registry})
        )
        self._bulkhead, self._bulkhead_options = _per_host(
            "bulkhead", bulkhead, Bulkhead, self._clock, name
        )

        if timeout is None or isinstance(timeout, Timeout):
            self.timeout = timeout
        else:
            self.timeout = Timeout(timeout, name=name, **named)  # validates the seconds

        self._hosts: dict[str, _Host] = {}
        self._by_netloc: dict[bytes, _Host] = {}
        self._hosts_lock = threading.Lock()

    # -- per-host policies ------------------------------------------------------------------

    def _host(self, url: httpx.URL) -> _Host:
        host = self._by_netloc.get(url.netloc)
        if host is not None:
            return host
        key = _host_key(url)
        with self._hosts_lock:
            host = self._hosts.get(key)
            if host is None:
                host = self._hosts[key] = self._new_host(key)
            # Several spellings of a host (an explicit default port) share its policies.
            self._by_netloc[url.netloc] = host
        return host

    def _new_host(self, key: str) -> _Host:
        label = None if self.name is None else f"{self.name}:{key}"
        breaker = self._breaker
        if self._breaker_options is not None:
            breaker = self._named(CircuitBreaker, label, self._breaker_options)
        bulkhead = self._bulkhead
        if self._bulkhead_options is not None:
            bulkhead = self._named(Bulkhead, label, self._bulkhead_options)
        limiter = None if self._limiter is None else self._limiter.for_key(key)
        return _Host(breaker, limiter, bulkhead)

    def _named(self, factory: type[Any], label: str | None, options: dict[str, Any]) -> Any:
        if label is not None:
            # Transports sharing a name share their per-host policies.
            existing = self._registry.get(factory.kind, label)
            if isinstance(existing, factory):
                return existing
        return factory(label, **{**options, "registry": self._registry})

    # -- the plan of one exchange: every decision, with the I/O yielded as steps -----------

    def _plan(self, exchange: _Exchange) -> Plan[httpx.Response]:
        transport: Any = self.transport
        send: tuple[Callable[..., Any] | None, Callable[..., Any] | None] = (
            getattr(transport, "handle_request", None),
            _handle_async(transport),
        )
        host, request = exchange.host, exchange.request
        breaker = host.breaker
        clock = self.retry.clock if self.retry is not None else None
        while True:
            response: httpx.Response | None = None
            error: BaseException | None = None
            try:
                exchange.start_attempt()
                if breaker is not None:
                    exchange.permit = yield (breaker.acquire, breaker.acquire_async, ())
                if host.limiter is not None or host.bulkhead is not None:
                    yield from _queue(exchange)
                response = yield (*send, (request,))
            except BaseException as exc:
                error = exc
            try:
                yield from _settle(exchange.verdict(error, response))
            except BaseException:
                # Settling failed (a cancellation, a store error): free what the attempt
                # holds before the error goes on, so no slot or connection is left behind.
                if response is not None:
                    yield (_close, _aclose, (response,))
                slot = exchange.take_slot()
                if slot is not None:
                    yield (slot.release, slot.release_async, ())
                raise
            if error is not None:
                slot = exchange.take_slot()
                if slot is not None:
                    yield (slot.release, slot.release_async, ())
                delay = exchange.on_error(error)
                if delay is None:
                    raise error
            else:
                assert response is not None
                slot = exchange.hold(response)
                if slot is not None:
                    yield (slot.release, slot.release_async, ())
                delay = exchange.on_response(response)
                if delay is None:
                    return response
                yield (_discard, _adiscard, (response,))
            if delay > 0 and clock is not None:
                yield (clock.sleep, clock.asleep, (delay,))

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        """The circuit breaker of each host seen so far (``host`` or ``host:port``)."""
        with self._hosts_lock:
            return {k: h.breaker for k, h in self._hosts.items() if h.breaker is not None}

    @property
    def bulkheads(self) -> dict[str, Bulkhead]:
        """The bulkhead of each host seen so far."""
        with self._hosts_lock:
            return {k: h.bulkhead for k, h in self._hosts.items() if h.bulkhead is not None}

    @property
    def limiter(self) -> RateLimiter | None:
        """The rate limiter whose per-host buckets the transport uses."""
        return self._limiter

    def retry_after(self, response: httpx.Response) -> float | None:
        """The wait a response asks for (``Retry-After``), capped at ``max_retry_after``."""
        value = response.headers.get("retry-after")
        if value is None:
            return None
        seconds = parse_retry_after(value, date=response.headers.get("date"))
        if seconds is None:
            return None
        return min(seconds, self.max_retry_after)


class _Exchange:
    """The decisions for one request and its retries (no I/O, no waiting)."""

    __slots__ = (
        "breaker",
        "clock",
        "extensions",
        "host",
        "method_ok",
        "owner",
        "permit",
        "request",
        "slot",
        "state",
        "timeout_at",
        "timeouts",
        "tokens",
    )

    def __init__(self, owner: _Resilience[Any], request: httpx.Request) -> None:
        self.owner = owner
        self.request = request
        self.clock = owner._clock
        self.host = owner._host(request.url)
        self.breaker = self.host.breaker
        self.method_ok = request.method in owner.retry_methods
        retry = owner.retry
        self.state: RetryState | None = None
        if retry is not None and isinstance(request.stream, httpx.ByteStream):
            self.state = retry.start()
        self.extensions = request.extensions
        timeouts = self.extensions.get("timeout")
        self.timeouts: dict[str, float | None] | None = (
            timeouts if isinstance(timeouts, dict) else None
        )
        self.permit: BreakerPermit | None = None  # the attempt's, until it is settled
        self.slot: BulkheadPermit | None = None
        self.tokens: list[_Deadline] = []
        self.timeout_at: float | None = None

    # -- the budget -------------------------------------------------------------------------

    def enter(self, *, sync_timeout: bool) -> None:
        """Set the exchange's deadline: the read timeout, and ``timeout=`` in sync code."""
        timeouts = self.timeouts
        read = timeouts.get("read") if timeouts is not None else None
        if read is not None:
            self.tokens.append(set_deadline(max(read, 0.0), self.clock)[1])
        timeout = self.owner.timeout
        if timeout is not None:
            self.timeout_at = self.clock.now() + timeout.seconds
            if sync_timeout:
                self.tokens.append(set_deadline(timeout.seconds, timeout.clock)[1])

    def exit(self) -> None:
        while self.tokens:
            reset_deadline(self.tokens.pop())
        self.request.extensions = self.extensions

    def timed_out(self) -> bool:
        """Whether ``timeout=`` has run out."""
        return self.timeout_at is not None and self.clock.now() >= self.timeout_at

    def queue_deadline(self) -> _Deadline | None:
        """Bound a queue wait by the pool timeout (as if waiting for a pooled connection)."""
        timeouts = self.timeouts
        pool = timeouts.get("pool") if timeouts is not None else None
        if pool is None:
            return None
        return set_deadline(max(pool, 0.0), self.clock)[1]

    # -- one attempt ------------------------------------------------------------------------

    def start_attempt(self) -> None:
        """Give the attempt the time left as socket timeouts."""
        left = remaining()
        timeouts = self.timeouts
        if left is not None and timeouts is not None:
            left = max(left, _MIN_TIMEOUT)
            # The slack spares the first attempt a copy when its own read timeout set
            # the deadline a few microseconds ago.
            edge = left + _CLAMP_SLACK
            if any(value is None or value > edge for value in timeouts.values()):
                clamped = {
                    key: left if value is None or value > left else value
                    for key, value in timeouts.items()
                }
                self.request.extensions = {**self.extensions, "timeout": clamped}

    def verdict(
        self, exc: BaseException | None, response: httpx.Response | None
    ) -> tuple[BreakerPermit, BaseException | None] | None:
        """Take the attempt's breaker permit and what settles it: ``(permit, None)`` for a
        success, ``(permit, error)`` for a failure (an exception, or a 5xx response)."""
        permit = self.permit
        if permit is None:
            return None
        self.permit = None
        if exc is None and response is not None and response.status_code >= 500:
            exc = httpx.HTTPStatusError(
                f"server error {response.status_code}", request=self.request, response=response
            )
        return permit, exc

    def on_error(self, exc: BaseException) -> float | None:
        """The delay before the next attempt after a failed one, or ``None`` to raise."""
        state = self.state
        if (
            state is None
            or not isinstance(exc, _RETRYABLE_ERRORS)
            or not (self.method_ok or isinstance(exc, _NOT_SENT_ERRORS))
        ):
            return None
        return state.on_error(exc)

    def on_response(self, response: httpx.Response) -> float | None:
        """The delay before the next attempt after a response, or ``None`` to return it."""
        state = self.state
        if state is None:
            return None
        if response.status_code not in self.owner.retry_statuses or not self.method_ok:
            state.on_success()
            return None
        # The retry policy's schedule, attempts, budget and deadlines decide; the
        # response's Retry-After raises the wait to what the server asked for.
        return state.retry_result(response, retry_after=self.owner.retry_after(response))

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

    def take_slot(self) -> BulkheadPermit | None:
        """The attempt's bulkhead permit, for the driver to release (once)."""
        slot, self.slot = self.slot, None
        return slot


def _handle_async(transport: Any) -> Callable[..., Any] | None:
    return getattr(transport, "handle_async_request", None)


def _settle(verdict: tuple[BreakerPermit, BaseException | None] | None) -> Plan[None]:
    """Settle the attempt's breaker permit: a success, or a failure with its error."""
    if verdict is not None:
        permit, error = verdict
        if error is None:
            yield (permit.success, permit.success_async, ())
        else:
            yield (permit.failure, permit.failure_async, (error,))


def _queue(exchange: _Exchange) -> Plan[None]:
    """Pass the host's limiter and bulkhead, bounded by the pool timeout when they wait."""
    host = exchange.host
    limiter, bulkhead = host.limiter, host.bulkhead
    if limiter is not None and limiter.store is None and limiter.try_acquire():
        limiter = None  # admitted without waiting: no deadline to set up
        if bulkhead is None:
            return
    # A bulkhead without a queue never waits: only a wait needs the deadline.
    waits = limiter is not None or (bulkhead is not None and bulkhead.max_queue > 0)
    token = exchange.queue_deadline() if waits else None
    try:
        if limiter is not None:
            yield (limiter.acquire, limiter.acquire_async, ())
        if bulkhead is not None:
            exchange.slot = yield (bulkhead.acquire, bulkhead.acquire_async, ())
    finally:
        if token is not None:
            reset_deadline(token)


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
            if read > _DRAIN_LIMIT:
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
            if read > _DRAIN_LIMIT:
                break
    except Exception:  # the response is being thrown away either way
        pass
    finally:
        await response.aclose()


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
            retries and waits included; running out raises
            :class:`~buttress.TimeoutExceeded`. Default ``None``: the request's own
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
        exchange.enter(sync_timeout=True)
        timeout = self.timeout
        try:
            response = pump_sync(self._plan(exchange))
        except httpx.TimeoutException as exc:
            if timeout is not None and exchange.timed_out():
                raise timeout.expired(exc) from exc
            raise
        finally:
            exchange.exit()
        if timeout is not None and exchange.timed_out():
            # Sync code cannot be interrupted: a late answer is dropped, never acted on.
            response.close()
            raise timeout.expired()
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
        exchange.enter(sync_timeout=False)
        timeout = self.timeout
        try:
            if timeout is None:
                return await pump_async(self._plan(exchange))
            try:
                async with timeout:  # cancels the exchange when the time is up
                    return await pump_async(self._plan(exchange))
            except httpx.TimeoutException as exc:
                if exchange.timed_out():
                    raise timeout.expired(exc) from exc
                raise
        finally:
            exchange.exit()

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.transport.aclose()
