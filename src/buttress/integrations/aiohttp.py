"""A resilient ``aiohttp.ClientSession``: a client middleware that retries with HTTP
semantics and applies policies per host.

``aiohttp.ClientSession(middlewares=(ResilientMiddleware(...),))`` (aiohttp 3.12 or later,
the first with client middlewares; importing this module with an older aiohttp raises
``ImportError``). Each attempt of a request passes, outermost first, through the host's
circuit breaker, the host's rate-limiter bucket and the host's bulkhead, then the rest
of the session's middleware chain and the connection; the retry loop runs around the
attempts, and ``timeout=`` around everything. The decisions are the httpx transports'
(one plan serves both, ``buttress.integrations._http``):

- Only the ``retry_methods`` are retried (by default the idempotent ones), on a
  connection error or timeout (``aiohttp.ClientConnectionError``, which covers
  ``ServerTimeoutError``, ``ServerDisconnectedError`` and ``ClientOSError``) or a
  ``retry_statuses`` response (429, 502, 503, 504). An error that proves the request
  never left (``ClientConnectorError``, ``ConnectionTimeoutError``) is retried whatever
  the method. A request whose body cannot be replayed (an async generator, a file) is
  never retried: only ``bytes``, ``str``, ``json=`` and URL-encoded form bodies are.
- ``Retry-After`` (delta-seconds or an HTTP-date, read against the response's ``Date``)
  sets the next wait, capped at ``max_retry_after``.
- When status retries run out, the last response is *returned*; when error retries run
  out, the last aiohttp exception is re-raised with its type (a timeout's message then
  names the ``ClientTimeout`` value that ran out).
- A 5xx response and any exception count as circuit-breaker failures.
- The session's ``ClientTimeout`` is the budget. aiohttp applies ``connect``,
  ``sock_connect`` and ``sock_read`` to every attempt, and ``total`` to all of them
  together (the middleware runs inside it); the middleware starts no wait (backoff,
  ``Retry-After``, limiter or bulkhead queue) that would end after ``total`` or an
  enclosing ``buttress.timeout``, and limiter and bulkhead waits are bounded by
  ``connect`` (the time aiohttp allows for getting a connection). The attempt in flight
  when the budget runs out is cancelled. aiohttp does not show middlewares a
  ``timeout=`` passed to one request: it still bounds that request, but the waits are
  planned against the session's timeout.
- A response that is retried is read (up to 64 KiB, so its connection can be reused)
  and released before the wait; a bulkhead slot is held until the returned response's
  connection is released (its whole body has arrived, or the response is released or
  closed).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import ClientRequest, ClientResponse, ClientTimeout
from multidict import CIMultiDictProxy

from buttress._drivers import pump_async
from buttress.bulkhead import BulkheadPermit
from buttress.exceptions import TimeoutExceeded

from ._http import (
    DRAIN_LIMIT,
    IDEMPOTENT_METHODS,
    RETRY_STATUSES,
    Exchange,
    Host,
    Resilience,
    TransportOptions,
    parse_retry_after,
    plan,
)

if TYPE_CHECKING:
    from aiohttp import ClientHandlerType
    from typing_extensions import Unpack

if not hasattr(aiohttp, "ClientMiddlewareType"):  # pragma: no cover - aiohttp < 3.12
    raise ImportError(
        "buttress.integrations.aiohttp needs aiohttp>=3.12 (the first with client "
        f"middlewares), found aiohttp {aiohttp.__version__}: pip install 'buttress[aiohttp]'"
    )

__all__ = [
    "IDEMPOTENT_METHODS",
    "RETRY_STATUSES",
    "ExchangeTimeout",
    "ResilientMiddleware",
    "parse_retry_after",
]

# Errors worth another attempt: the exchange broke in transit (timeouts included).
_RETRYABLE_ERRORS = (aiohttp.ClientConnectionError,)
# Errors that prove the request never reached the server: safe to retry for any method.
_NOT_SENT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
# Which ClientTimeout fields an aiohttp timeout error comes from.
_TIMEOUT_FIELDS: tuple[tuple[type[aiohttp.ServerTimeoutError], tuple[str, ...]], ...] = (
    (aiohttp.ConnectionTimeoutError, ("connect", "sock_connect")),
    (aiohttp.SocketTimeoutError, ("sock_read",)),
)


class ExchangeTimeout(aiohttp.ServerTimeoutError, TimeoutExceeded):
    """The middleware's ``timeout=`` ran out: an ``aiohttp.ServerTimeoutError`` (so an
    ``asyncio.TimeoutError`` and an ``aiohttp.ClientError``) that is also a
    :class:`buttress.TimeoutExceeded`, naming the timeout in its message."""

    def __init__(self, message: str, *, timeout: float | None = None) -> None:
        TimeoutExceeded.__init__(self, message, timeout=timeout)


def _host_key(url: Any) -> str:
    host = url.host or ""
    if ":" in host:
        host = f"[{host}]"
    return host if url.is_default_port() else f"{host}:{url.port}"


def _replayable(request: ClientRequest) -> bool:
    """Whether the body can be sent again: in memory (bytes, text, JSON, a form)."""
    body = request.body
    return body == b"" or isinstance(body, aiohttp.payload.BytesPayload)


class _Answer:
    """An attempt's response as the shared plan reads it (``status_code``, ``headers``)."""

    __slots__ = ("headers", "response", "status_code")

    def __init__(self, response: ClientResponse) -> None:
        self.response = response
        self.status_code: int = response.status
        self.headers: CIMultiDictProxy[str] = response.headers


def _sender(handler: ClientHandlerType) -> Any:
    async def send(request: ClientRequest) -> _Answer:
        return _Answer(await handler(request))

    return send


async def _aclose(answer: _Answer) -> None:
    answer.response.close()


async def _adiscard(answer: _Answer) -> None:
    """Read a little of a discarded response (so its connection is reused), release it;
    close it instead when reading fails or is cancelled."""
    response = answer.response
    drained = False
    try:
        read = 0
        while read <= DRAIN_LIMIT:
            chunk = await response.content.readany()
            if not chunk:
                break
            read += len(chunk)
        drained = True
    except Exception:  # the response is being thrown away either way
        pass
    finally:
        if drained:
            response.release()  # an unfinished body closes the connection instead
        else:
            response.close()


class _SlotReturn:
    """A connection callback that gives a bulkhead slot back when the connection of the
    response that holds it is released (a store-backed slot in a task: its release is
    I/O, and the callback runs on the loop)."""

    __slots__ = ("local", "slot")
    _pending: set[asyncio.Task[Any]] = set()  # noqa: RUF012 - keeps the tasks alive

    def __init__(self, slot: BulkheadPermit, *, local: bool) -> None:
        self.slot = slot
        self.local = local

    def __call__(self) -> None:
        slot = self.slot
        if self.local:
            slot.release()
            return
        task = asyncio.get_running_loop().create_task(slot.release_async())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


class _AiohttpExchange(Exchange[_Answer]):
    """The shared decisions, with aiohttp's errors, timeouts and responses: the session's
    ClientTimeout is the budget."""

    __slots__ = ("client_timeout",)

    RETRYABLE = _RETRYABLE_ERRORS
    CLOSE = (None, _aclose)
    DISCARD = (None, _adiscard)

    def __init__(
        self, owner: ResilientMiddleware, request: ClientRequest, handler: ClientHandlerType
    ) -> None:
        super().__init__(owner, owner._host(request.url), request.method, _replayable(request))
        self.send = (None, _sender(handler), (request,))
        self.client_timeout: ClientTimeout = request.session.timeout
        # A limiter or bulkhead wait is bounded like aiohttp's wait for a connection.
        self.pool = self.client_timeout.connect

    def never_sent(self, exc: BaseException) -> bool:
        return isinstance(exc, _NOT_SENT_ERRORS)

    def server_error(self, answer: _Answer) -> BaseException:
        response = answer.response
        return aiohttp.ClientResponseError(
            response.request_info,
            response.history,
            status=response.status,
            message=f"server error {response.status}",
            headers=response.headers,
        )

    def hold(self, answer: _Answer) -> BulkheadPermit | None:
        """Keep the bulkhead slot until the response's connection is released."""
        slot = self.slot
        if slot is None:
            return None
        self.slot = None
        connection = answer.response.connection
        if connection is None:  # the body is in and the connection given back already
            return slot
        bulkhead = self.host.bulkhead
        local = bulkhead is None or bulkhead.store is None
        connection.add_callback(_SlotReturn(slot, local=local))
        return None

    def explain(self, exc: aiohttp.ServerTimeoutError) -> aiohttp.ServerTimeoutError:
        """An error of ``exc``'s type whose message names the ``ClientTimeout`` value
        that ran out (``exc``, with the retry's notes, becomes its cause)."""
        timeout = self.client_timeout
        for kind, fields in _TIMEOUT_FIELDS:
            if isinstance(exc, kind):
                named = [f"{f}={getattr(timeout, f):g}s" for f in fields if getattr(timeout, f)]
                if not named or len(exc.args) > 1:
                    return exc
                label = " and ".join(named)
                try:
                    explained = type(exc)(f"{exc} (the session's ClientTimeout {label})")
                except TypeError:  # a subclass with a constructor of its own
                    return exc
                return explained
        return exc


class ResilientMiddleware(Resilience):
    """An aiohttp client middleware that retries, breaks circuits and limits, per host.

    ``aiohttp.ClientSession(middlewares=(ResilientMiddleware(...),))``, or for one
    request ``session.get(url, middlewares=(...,))``. See the module documentation for
    the HTTP semantics. With ``timeout=``, the exchange is cancelled when the time is up
    and :class:`ExchangeTimeout` is raised.

    Args:
        name: names the policies the middleware builds: per-host circuit breakers and
            bulkheads are registered as ``"<name>:<host>"`` (``host`` or ``host:port``),
            the retry, limiter and timeout as ``"<name>"``. Middlewares (and httpx
            transports) sharing a name share their per-host policies. ``None`` (the
            default) registers nothing.
        retry: a :func:`buttress.retry` policy, a number of attempts with the default
            backoff, or ``None`` for no retries (default 3 attempts).
        retry_methods: methods that may be retried (default :data:`IDEMPOTENT_METHODS`).
        retry_statuses: response statuses that are retried (default 429, 502, 503, 504).
        max_retry_after: the longest wait a ``Retry-After`` header may ask for, in
            seconds (default 60).
        breaker: a mapping of :class:`~buttress.CircuitBreaker` options (one breaker per
            host), a ``CircuitBreaker`` shared by every host, or ``None`` (the default).
        limiter: a :class:`~buttress.RateLimiter` or a mapping of its options; each host
            gets its own bucket (``limiter.for_key(host)``). Default ``None``.
        bulkhead: a mapping of :class:`~buttress.Bulkhead` options (one per host), a
            ``Bulkhead`` shared by every host, or ``None``. A slot is held until the
            response's connection is released.
        timeout: seconds (or a :func:`buttress.timeout` policy) for the whole exchange
            up to the response's headers, retries and waits included. Default ``None``:
            the session's ``ClientTimeout`` is the only budget.
        registry: the registry named policies join (default: the default registry).
        clock: time source for the policies built here and the budget.
    """

    def __init__(self, **options: Unpack[TransportOptions]) -> None:
        super().__init__(**options)
        self._by_origin: dict[tuple[str | None, int | None], Host] = {}

    def _host(self, url: Any) -> Host:
        alias = (url.raw_host, url.port)
        host = self._by_origin.get(alias)
        if host is None:
            host = self._by_origin[alias] = self.host_for(_host_key(url))
        return host

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        exchange = _AiohttpExchange(self, request, handler)
        # aiohttp enforces the total across all attempts; the plan starts no wait past it.
        exchange.enter(exchange.client_timeout.total, sync_timeout=False)
        timeout = self.timeout
        try:
            if timeout is None:
                return (await pump_async(plan(exchange))).response
            async with timeout:  # cancels the exchange when the time is up
                return (await pump_async(plan(exchange))).response
        except aiohttp.ServerTimeoutError as exc:
            explained = exchange.explain(exc)
            if explained is exc:
                raise
            raise explained from exc
        except TimeoutExceeded as exc:
            if timeout is not None and exchange.timed_out():
                raise ExchangeTimeout(str(exc), timeout=exc.timeout) from exc
            raise
        finally:
            exchange.exit()
