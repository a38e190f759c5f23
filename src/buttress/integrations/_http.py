"""The request policy that every HTTP client integration shares, whatever the client.

One exchange (a request and its retries) is a sans-I/O plan (:data:`buttress._drivers.Plan`):
every decision is made here (which errors and statuses are retried, which method may be,
``Retry-After``, the budget, the per-host breaker, limiter bucket and bulkhead, what
becomes of a discarded response), and the I/O is yielded as steps, which the client's
face runs with ``pump_sync`` or ``pump_async``. A face (``integrations/httpx.py``,
``integrations/requests.py``) adds only what its client spells differently: how a request
is sent, how a response is closed, which of its exceptions mean what, and how its
timeouts are given to an attempt. Nothing here imports an HTTP client.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Iterable, Mapping
from contextvars import Token
from datetime import timedelta, timezone
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypedDict, TypeVar

from buttress._deadline import remaining, reset_deadline, set_deadline
from buttress._drivers import Plan, Step
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

if TYPE_CHECKING:
    pass

__all__ = [
    "DRAIN_LIMIT",
    "IDEMPOTENT_METHODS",
    "MIN_TIMEOUT",
    "RETRY_STATUSES",
    "Exchange",
    "Host",
    "Resilience",
    "Response",
    "TransportOptions",
    "parse_retry_after",
    "plan",
]

IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
RETRY_STATUSES: frozenset[int] = frozenset({429, 502, 503, 504})

# How much of a discarded response is read so that its connection can be reused.
DRAIN_LIMIT = 65536
# The smallest socket timeout given to an attempt (0 would mean "non-blocking").
MIN_TIMEOUT = 0.001

_Deadline = Token[Any]


class Response(Protocol):
    """What the shared plan reads of a client's response."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Any: ...


Resp = TypeVar("Resp", bound=Response)


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


class Host:
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


def checked_options(
    what: Literal["breaker", "bulkhead", "limiter"],
    value: Mapping[str, Any],
    factory: type[Any],
    name: str | None,
    common: Mapping[str, Any],
    *,
    owner: str = "transport",
    scope: str = "per-host",
) -> dict[str, Any]:
    """Check a mapping of policy options by building an unregistered policy from it
    (``common`` first, then ``value``); the options to build the real ones with.

    ``owner`` and ``scope`` name, in the messages, what builds the policies and for what
    (the HTTP transports per host, the gRPC interceptors per target)."""
    if not all(isinstance(key, str) for key in value):
        raise ConfigTypeError(f"{what} options must be keyword names, got {dict(value)!r}")
    for reserved in ("name", "registry"):
        if reserved in value:
            raise ConfigValueError(
                f"{what} options must not set {reserved!r} (the {owner} names and "
                f"registers its {scope} {what}s), got {dict(value)!r}"
            )
    options = {**common, **value}
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
                f"{what} options with a store need the {owner}'s name=: the {scope} "
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
        return None, checked_options(what, value, factory, name, {"clock": clock})
    kind = factory.__name__
    raise ConfigTypeError(
        f"{what} must be a {kind} (shared by every host), a mapping of {kind} options (one "
        f"{what} per host) or None, got {value!r}"
    )


class TransportOptions(TypedDict, total=False):
    """The options every client face takes (``**options`` in their signatures); the
    defaults are :class:`Resilience`'s."""

    name: str | None
    retry: Retry | int | None
    retry_methods: Iterable[str]
    retry_statuses: Iterable[int]
    max_retry_after: float | timedelta
    breaker: CircuitBreaker | Mapping[str, Any] | None
    limiter: RateLimiter | Mapping[str, Any] | None
    bulkhead: Bulkhead | Mapping[str, Any] | None
    timeout: Timeout | float | timedelta | None
    registry: Registry | None
    clock: Clock | None


class Resilience:
    """The validated options and the per-host policies of a transport (or adapter)."""

    def __init__(
        self,
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

        self._hosts: dict[str, Host] = {}
        self._hosts_lock = threading.Lock()

    # -- per-host policies ------------------------------------------------------------------

    def host_for(self, key: str) -> Host:
        """The policies of the host ``key`` (``host`` or ``host:port``), built on first use."""
        with self._hosts_lock:
            host = self._hosts.get(key)
            if host is None:
                host = self._hosts[key] = self._new_host(key)
        return host

    def _new_host(self, key: str) -> Host:
        label = None if self.name is None else f"{self.name}:{key}"
        breaker = self._breaker
        if self._breaker_options is not None:
            breaker = self._named(CircuitBreaker, label, self._breaker_options)
        bulkhead = self._bulkhead
        if self._bulkhead_options is not None:
            bulkhead = self._named(Bulkhead, label, self._bulkhead_options)
        limiter = None if self._limiter is None else self._limiter.for_key(key)
        return Host(breaker, limiter, bulkhead)

    def _named(self, factory: type[Any], label: str | None, options: dict[str, Any]) -> Any:
        if label is not None:
            # Transports sharing a name share their per-host policies.
            existing = self._registry.get(factory.kind, label)
            if isinstance(existing, factory):
                return existing
        return factory(label, **{**options, "registry": self._registry})

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

    def retry_after(self, response: Response) -> float | None:
        """The wait a response asks for (``Retry-After``), capped at ``max_retry_after``."""
        headers = response.headers
        value = headers.get("retry-after")
        if value is None:
            return None
        seconds = parse_retry_after(value, date=headers.get("date"))
        if seconds is None:
            return None
        return min(seconds, self.max_retry_after)


class Exchange(Generic[Resp]):
    """The decisions for one request and its retries (no I/O, no waiting).

    A face subclasses it and fills in what its client spells differently: the steps
    ``send`` (set per exchange), ``CLOSE`` and ``DISCARD`` (the sync and async ways to
    close a response, or to read a little of it first), the ``RETRYABLE`` errors, and
    the hooks :meth:`never_sent`, :meth:`server_error`, :meth:`start_attempt` and
    :meth:`hold`. A response is anything with ``status_code`` and ``headers``.
    """

    __slots__ = (
        "breaker",
        "budget",
        "clock",
        "host",
        "method_ok",
        "owner",
        "permit",
        "pool",
        "send",
        "slot",
        "state",
        "timeout_at",
        "tokens",
    )

    # Errors worth another attempt: the exchange broke in transit.
    RETRYABLE: ClassVar[tuple[type[BaseException], ...]] = ()
    CLOSE: ClassVar[tuple[Any, Any]]  # (close, aclose) of a response
    DISCARD: ClassVar[tuple[Any, Any]]  # (discard, adiscard): drain a little, then close

    def __init__(self, owner: Resilience, host: Host, method: str, replayable: bool) -> None:
        self.owner = owner
        self.clock = owner._clock
        self.host = host
        self.breaker = host.breaker
        self.method_ok = method in owner.retry_methods
        retry = owner.retry
        self.state: RetryState | None = None
        if retry is not None and replayable:
            self.state = retry.start()
        self.send: Step = (None, None, ())  # the face's step sending one attempt
        self.pool: float | None = None  # the bound of a queue wait, if the client has one
        self.budget: float | None = None  # the seconds the exchange had when it began
        self.permit: BreakerPermit | None = None  # the attempt's, until it is settled
        self.slot: BulkheadPermit | None = None
        self.tokens: list[_Deadline] = []
        self.timeout_at: float | None = None

    # -- what a face fills in -----------------------------------------------------------------

    def start_attempt(self) -> None:
        """Give the attempt the time left (:func:`remaining`) as its socket timeouts."""

    def never_sent(self, exc: BaseException) -> bool:
        """Whether ``exc`` proves the request never reached the server (any method may then
        be retried, as urllib3 does)."""
        return False

    def server_error(self, response: Resp) -> BaseException:
        """The error a 5xx response settles the breaker with."""
        return RuntimeError(f"server error {response.status_code}")

    def hold(self, response: Resp) -> BulkheadPermit | None:
        """Keep the bulkhead slot until the response is closed; returns the slot when the
        response is done with it already, for the driver to release."""
        return self.take_slot()

    # -- the budget -------------------------------------------------------------------------

    def enter(self, read: float | None, *, sync_timeout: bool) -> None:
        """Set the exchange's deadline: ``read`` (the client's read timeout) and, in sync
        code, the transport's ``timeout=``; an enclosing deadline narrows both."""
        if read is not None:
            seconds, token = set_deadline(max(read, 0.0), self.clock)
            self.tokens.append(token)
            self.budget = seconds
        timeout = self.owner.timeout
        if timeout is not None:
            self.timeout_at = self.clock.now() + timeout.seconds
            if sync_timeout:
                self.tokens.append(set_deadline(timeout.seconds, timeout.clock)[1])
        if self.budget is None or timeout is not None:
            self.budget = remaining()

    def exit(self) -> None:
        while self.tokens:
            reset_deadline(self.tokens.pop())

    def timed_out(self) -> bool:
        """Whether ``timeout=`` has run out."""
        return self.timeout_at is not None and self.clock.now() >= self.timeout_at

    def queue_deadline(self) -> _Deadline | None:
        """Bound a queue wait by the pool timeout (as if waiting for a pooled connection)."""
        pool = self.pool
        if pool is None:
            return None
        return set_deadline(max(pool, 0.0), self.clock)[1]

    # -- one attempt ------------------------------------------------------------------------

    def verdict(
        self, exc: BaseException | None, response: Resp | None
    ) -> tuple[BreakerPermit, BaseException | None] | None:
        """Take the attempt's breaker permit and what settles it: ``(permit, None)`` for a
        success, ``(permit, error)`` for a failure (an exception, or a 5xx response)."""
        permit = self.permit
        if permit is None:
            return None
        self.permit = None
        if exc is None and response is not None and response.status_code >= 500:
            exc = self.server_error(response)
        return permit, exc

    def on_error(self, exc: BaseException) -> float | None:
        """The delay before the next attempt after a failed one, or ``None`` to raise."""
        state = self.state
        if (
            state is None
            or not isinstance(exc, self.RETRYABLE)
            or not (self.method_ok or self.never_sent(exc))
        ):
            return None
        return state.on_error(exc)

    def on_response(self, response: Resp) -> float | None:
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

    def take_slot(self) -> BulkheadPermit | None:
        """The attempt's bulkhead permit, for the driver to release (once)."""
        slot, self.slot = self.slot, None
        return slot


def _settle(verdict: tuple[BreakerPermit, BaseException | None] | None) -> Plan[None]:
    """Settle the attempt's breaker permit: a success, or a failure with its error."""
    if verdict is not None:
        permit, error = verdict
        if error is None:
            yield (permit.success, permit.success_async, ())
        else:
            yield (permit.failure, permit.failure_async, (error,))


def _queue(exchange: Exchange[Any]) -> Plan[None]:
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


def plan(exchange: Exchange[Resp]) -> Plan[Resp]:
    """The whole exchange: each attempt through the host's breaker, limiter bucket and
    bulkhead, then the client; the retry decisions and waits between attempts."""
    host = exchange.host
    breaker = host.breaker
    owner_retry = exchange.owner.retry
    clock = owner_retry.clock if owner_retry is not None else None
    close, discard = exchange.CLOSE, exchange.DISCARD
    while True:
        response: Resp | None = None
        error: BaseException | None = None
        try:
            exchange.start_attempt()
            if breaker is not None:
                exchange.permit = yield (breaker.acquire, breaker.acquire_async, ())
            if host.limiter is not None or host.bulkhead is not None:
                yield from _queue(exchange)
            response = yield exchange.send
        except BaseException as exc:
            error = exc
        try:
            yield from _settle(exchange.verdict(error, response))
        except BaseException:
            # Settling failed (a cancellation, a store error): free what the attempt
            # holds before the error goes on, so no slot or connection is left behind.
            if response is not None:
                yield (*close, (response,))
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
            yield (*discard, (response,))
        if delay > 0 and clock is not None:
            yield (clock.sleep, clock.asleep, (delay,))
