"""A resilient transport adapter for ``requests``: retries with HTTP semantics, policies per host.

Mount :class:`ResilientAdapter` on a ``requests.Session`` (``session.mount("https://",
adapter)``). Each attempt of a request passes, outermost first, through the host's
circuit breaker, the host's rate-limiter bucket and the host's bulkhead, then urllib3;
the retry loop runs around the attempts. The decisions are the httpx transports' own
(the same shared plan), spelled in ``requests`` terms:

- Only the ``retry_methods`` are retried (by default the idempotent ones), on a
  ``requests.Timeout``, a ``requests.ConnectionError`` or a ``ChunkedEncodingError``, or
  on a ``retry_statuses`` response (429, 502, 503, 504). An error that proves the request
  never left (a ``ConnectTimeout``, or a connection that could not be opened at all) is
  retried whatever the method. A body that cannot be replayed (a file, a generator) is
  never retried.
- ``Retry-After`` (delta-seconds or an HTTP-date, read against the response's ``Date``)
  sets the next wait, capped at ``max_retry_after``.
- When status retries run out, the last response is *returned*; when error retries run
  out, the last exception is raised. A request that runs out of time raises a
  :class:`ConnectTimeoutExceeded` or :class:`ReadTimeoutExceeded`: a
  ``requests.ConnectTimeout`` / ``requests.ReadTimeout`` *and* a
  :class:`buttress.TimeoutExceeded`, whose message names the timeout that was configured.
  Breaker, limiter and bulkhead rejections are :class:`buttress.RejectedError` errors.
- A 5xx response and any exception count as circuit-breaker failures.
- The request's read timeout (``timeout=`` of ``session.get``) is the budget of the
  whole exchange, retries and waits included; an enclosing :func:`buttress.timeout`
  narrows it, and so does the adapter's own ``timeout=``. Every attempt gets the time
  left as its connect and read timeouts.
- Without ``stream=True`` the body is read inside the attempt, so a body that breaks
  off is retried like any other broken exchange (and a read timeout while reading it is
  a ``ReadTimeout``, where bare ``requests`` raises a ``ConnectionError``). With
  ``stream=True`` the bulkhead slot is held until the response is closed or read to
  the end. A response that is retried is read (up to 64 KiB, so its connection is
  reused) and closed before the wait.

urllib3's own retries stay off (``max_retries=0``): retrying is this adapter's job.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
from requests.adapters import DEFAULT_POOLBLOCK, DEFAULT_POOLSIZE, HTTPAdapter
from urllib3.exceptions import MaxRetryError, NewConnectionError, ReadTimeoutError
from urllib3.util import Timeout as Urllib3Timeout

from buttress._deadline import remaining
from buttress._drivers import pump_sync
from buttress.bulkhead import BulkheadPermit
from buttress.exceptions import TimeoutExceeded

from . import _http
from ._http import IDEMPOTENT_METHODS, RETRY_STATUSES, parse_retry_after

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "IDEMPOTENT_METHODS",
    "RETRY_STATUSES",
    "ConnectTimeoutExceeded",
    "ReadTimeoutExceeded",
    "RequestTimeoutExceeded",
    "ResilientAdapter",
    "parse_retry_after",
]

_RETRYABLE_ERRORS = (
    requests.exceptions.Timeout,
    requests.exceptions.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
# A socket timeout within this much of the configured one was not cut by the budget.
_SLACK = 0.001

Timeouts = tuple[float | None, float | None]


class RequestTimeoutExceeded(requests.exceptions.Timeout, TimeoutExceeded):
    """A request through :class:`ResilientAdapter` ran out of time.

    Both a ``requests.Timeout`` and a :class:`buttress.TimeoutExceeded`: ``except
    requests.Timeout`` and ``retry(on=requests.RequestException)`` keep working.

    Attributes:
        timeout: the configured seconds that ran out (the request's connect or read
            timeout, the budget an enclosing deadline left, or the adapter's ``timeout=``).
        request: the ``requests.PreparedRequest``.
    """

    def __init__(
        self,
        message: str,
        *,
        timeout: float | None = None,
        request: requests.PreparedRequest | None = None,
    ) -> None:
        requests.exceptions.Timeout.__init__(self, message, request=request)
        self.timeout = timeout


class ConnectTimeoutExceeded(requests.exceptions.ConnectTimeout, RequestTimeoutExceeded):
    """The connection could not be opened in time (also a ``requests.ConnectTimeout``)."""


class ReadTimeoutExceeded(requests.exceptions.ReadTimeout, RequestTimeoutExceeded):
    """The server did not answer in time (also a ``requests.ReadTimeout``)."""


def _seconds(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"timeout must be seconds, a (connect, read) tuple or None, got {value!r}")
    return float(value)


def _split(timeout: object) -> Timeouts:
    """``(connect, read)`` seconds of a ``requests`` timeout (``None``: no limit)."""
    if isinstance(timeout, tuple):
        if len(timeout) != 2:
            raise ValueError(f"timeout must be a (connect, read) tuple, got {timeout!r}")
        return _seconds(timeout[0]), _seconds(timeout[1])
    if isinstance(timeout, Urllib3Timeout):
        total = timeout.total
        connect = timeout.connect_timeout
        read = total if total is not None else timeout.read_timeout
        number = (int, float)
        return (
            float(connect) if isinstance(connect, number) else None,
            float(read) if isinstance(read, number) else None,
        )
    seconds = _seconds(timeout)
    return seconds, seconds


def _host_key(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is None or port == _DEFAULT_PORTS.get(parts.scheme.lower()):
        return host
    return f"{host}:{port}"


def _netloc(url: str) -> str:
    """The scheme and authority of a prepared URL (always followed by a path)."""
    start = url.find("//") + 2
    end = url.find("/", start)
    return url if end < 0 else url[:end]


def _never_sent(exc: BaseException) -> bool:
    """Whether a ``requests`` error proves the request never left: the connection timed
    out or could not be opened at all (refused, unresolvable)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if not isinstance(exc, requests.exceptions.ConnectionError) or not exc.args:
        return False
    reason = exc.args[0]
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    return isinstance(reason, NewConnectionError)


def _close(response: requests.Response) -> None:
    response.close()


def _discard(response: requests.Response) -> None:
    """Read a little of a discarded response (so its connection is reused), then close it.
    A body read already (``stream=False``) gives nothing more to read."""
    try:
        read = 0
        for chunk in response.raw.stream(8192, decode_content=False):
            read += len(chunk)
            if read > _http.DRAIN_LIMIT:
                break
    except Exception:  # the response is being thrown away either way
        pass
    finally:
        response.close()


def _releasing(release_conn: Callable[[], None], slot: BulkheadPermit) -> Callable[[], None]:
    """urllib3's ``release_conn``, also giving the bulkhead slot back (once): urllib3
    calls it when the body is read to the end, ``Response.close()`` calls it too."""
    lock = threading.Lock()
    held = [slot]

    def release() -> None:
        try:
            release_conn()
        finally:
            with lock:
                taken = held.pop() if held else None
            if taken is not None:
                taken.release()

    return release


class _Exchange(_http.Exchange[requests.Response]):
    """The shared decisions, with requests' errors, timeouts and responses."""

    __slots__ = ("attempt_timeout", "connect", "cut", "given", "read", "request", "stream")

    RETRYABLE = _RETRYABLE_ERRORS
    CLOSE = (_close, None)
    DISCARD = (_discard, None)

    def __init__(
        self,
        owner: ResilientAdapter,
        request: requests.PreparedRequest,
        *,
        stream: bool,
        timeout: object,
        send: Callable[..., requests.Response],
        kwargs: Mapping[str, Any],
    ) -> None:
        self.connect, self.read = _split(timeout)  # a bad timeout fails before anything starts
        body = request.body
        replayable = body is None or isinstance(body, (bytes, str))
        super().__init__(owner, owner._host(request.url or ""), request.method or "", replayable)
        self.request = request
        self.stream = stream
        self.given = timeout
        self.attempt_timeout: Timeouts = (self.connect, self.read)
        # whether the attempt's (connect, read) timeouts were cut to the time left
        self.cut = (False, False)
        self.send = (send, None, (request, stream, self, kwargs))

    def start_attempt(self) -> None:
        """Give the attempt the time left as its connect and read timeouts."""
        left = remaining()
        connect, read = self.connect, self.read
        if left is None:
            self.attempt_timeout, self.cut = (connect, read), (False, False)
            return
        left = max(left, _http.MIN_TIMEOUT)
        edge = left + _SLACK
        self.cut = (connect is None or connect > edge, read is None or read > edge)
        self.attempt_timeout = (
            left if connect is None or connect > left else connect,
            left if read is None or read > left else read,
        )

    def never_sent(self, exc: BaseException) -> bool:
        return _never_sent(exc)

    def server_error(self, response: requests.Response) -> BaseException:
        return requests.exceptions.HTTPError(
            f"server error {response.status_code}", request=self.request, response=response
        )

    def hold(self, response: requests.Response) -> BulkheadPermit | None:
        """Keep the bulkhead slot of a streamed response until it is closed or read to
        the end; a body read already gives the slot back at once."""
        slot = self.take_slot()
        if slot is None or not self.stream:
            return slot
        raw = response.raw
        raw.release_conn = _releasing(raw.release_conn, slot)  # type: ignore[method-assign]
        return None

    # -- running out of time ------------------------------------------------------------------

    def timeout_error(self, exc: BaseException | None) -> RequestTimeoutExceeded:
        """The error for a request that ran out of time, naming the timeout that did."""
        kind: type[RequestTimeoutExceeded] = RequestTimeoutExceeded
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            kind = ConnectTimeoutExceeded
        elif isinstance(exc, requests.exceptions.ReadTimeout):
            kind = ReadTimeoutExceeded
        connecting = kind is ConnectTimeoutExceeded
        phase, configured = ("connect", self.connect) if connecting else ("read", self.read)
        policy = self.owner.timeout
        seconds: float | None
        if policy is not None and self.timed_out():
            expired = policy.expired(exc)  # counted and reported as the policy's expiry
            what, seconds = str(expired), expired.timeout
        elif configured is not None and not self.cut[0 if connecting else 1]:
            seconds = configured
            what = f"{phase} timeout of {seconds:g}s exceeded"
        elif self.read is not None and (self.budget or 0.0) >= self.read - _SLACK:
            seconds = self.read
            what = f"read timeout of {seconds:g}s (the budget of the whole exchange) exceeded"
        else:
            seconds = self.budget
            what = (
                f"the enclosing deadline ran out ({seconds or 0.0:.3g}s were left when the "
                "request started)"
            )
        attempts = 1 if self.state is None else self.state.attempt
        detail = f"{what} (timeout={self.given!r}, {attempts} attempt(s))"
        if exc is not None:
            detail = f"{detail}: {exc}"
        error = kind(detail, timeout=seconds, request=self.request)
        error.__cause__ = exc
        return error


class ResilientAdapter(_http.Resilience, HTTPAdapter):
    """A ``requests`` transport adapter that retries, breaks circuits and limits, per host.

    ``session.mount("https://", ResilientAdapter(...))`` (and ``"http://"``). See the
    module documentation for the HTTP semantics.

    Args:
        pool_connections, pool_maxsize, pool_block: as for ``requests.adapters.HTTPAdapter``.
        name: names the policies the adapter builds: per-host circuit breakers and
            bulkheads are registered as ``"<name>:<host>"`` (``host`` or ``host:port``),
            the retry, limiter and timeout as ``"<name>"``. Adapters sharing a name share
            their per-host policies. ``None`` (the default) registers nothing.
        retry: a :func:`buttress.retry` policy, a number of attempts with the default
            backoff, or ``None`` for no retries (default 3 attempts).
        retry_methods: methods that may be retried (default :data:`IDEMPOTENT_METHODS`;
            add ``"POST"`` only for endpoints that are safe to repeat).
        retry_statuses: response statuses that are retried (default
            :data:`RETRY_STATUSES`: 429, 502, 503, 504).
        max_retry_after: the longest wait a ``Retry-After`` header may ask for, in
            seconds (default 60).
        breaker: a mapping of :class:`~buttress.CircuitBreaker` options (one breaker per
            host), a ``CircuitBreaker`` shared by every host, or ``None`` (the default).
        limiter: a :class:`~buttress.RateLimiter` or a mapping of its options; each host
            gets its own bucket (``limiter.for_key(host)``). Default ``None``.
        bulkhead: a mapping of :class:`~buttress.Bulkhead` options (one per host), a
            ``Bulkhead`` shared by every host, or ``None`` (the default).
        timeout: seconds (or a :func:`buttress.timeout` policy) for the whole exchange,
            retries and waits included. Default ``None``: the request's own timeout is
            the budget.
        registry: the registry named policies join (default: the default registry).
        clock: time source for the policies built here and the budget.
    """

    def __init__(
        self,
        *,
        pool_connections: int = DEFAULT_POOLSIZE,
        pool_maxsize: int = DEFAULT_POOLSIZE,
        pool_block: bool = DEFAULT_POOLBLOCK,
        **options: Unpack[_http.TransportOptions],
    ) -> None:
        _http.Resilience.__init__(self, **options)
        HTTPAdapter.__init__(
            self,
            pool_connections=pool_connections,
            pool_maxsize=pool_maxsize,
            max_retries=0,
            pool_block=pool_block,
        )
        self._by_netloc: dict[str, _http.Host] = {}

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(f"{type(self).__name__} holds live policies and cannot be pickled")

    def _host(self, url: str) -> _http.Host:
        netloc = _netloc(url)
        host = self._by_netloc.get(netloc)
        if host is None:
            host = self.host_for(_host_key(netloc))
            self._by_netloc[netloc] = host
        return host

    def _attempt(
        self,
        request: requests.PreparedRequest,
        stream: bool,
        exchange: _Exchange,
        kwargs: Mapping[str, Any],
    ) -> requests.Response:
        """One attempt: urllib3 with the attempt's timeouts; the body too unless streamed."""
        timeout: Any = exchange.attempt_timeout  # None stands for "no limit" on either side
        response = HTTPAdapter.send(self, request, stream=stream, timeout=timeout, **kwargs)
        if stream:
            return response
        try:
            response.content  # noqa: B018 - read the body inside the attempt
        except requests.exceptions.ConnectionError as exc:
            response.close()
            reason = exc.args[0] if exc.args else None
            if isinstance(reason, ReadTimeoutError):  # requests' spelling of a body timeout
                raise requests.exceptions.ReadTimeout(reason, request=request) from exc
            raise
        except BaseException:
            response.close()
            raise
        return response

    def send(  # noqa: PLR0917 - requests' own signature
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float | None, float | None] | Urllib3Timeout | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        """Send a prepared request with retries, per-host policies and the budget."""
        kwargs = {"verify": verify, "cert": cert, "proxies": proxies}
        exchange = _Exchange(
            self, request, stream=stream, timeout=timeout, send=self._attempt, kwargs=kwargs
        )
        exchange.enter(exchange.read, sync_timeout=True)
        try:
            response = pump_sync(_http.plan(exchange))
        except requests.exceptions.Timeout as exc:
            raise exchange.timeout_error(exc) from exc
        finally:
            exchange.exit()
        if self.timeout is not None and exchange.timed_out():
            # Sync code cannot be interrupted: a late answer is dropped, never acted on.
            response.close()
            raise exchange.timeout_error(None)
        return response
