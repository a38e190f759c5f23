"""gRPC: resilient client calls and load shedding at the server, for ``grpc`` and ``grpc.aio``.

Client side, :class:`ClientInterceptor` (for ``grpc.intercept_channel``) and
:class:`AsyncClientInterceptor` (for ``grpc.aio.*_channel(interceptors=[...])``) guard the
**unary-unary** calls of one target. Each attempt passes, outermost first, the target's
circuit breaker, rate-limiter bucket and bulkhead, then the channel; the retry loop runs
around the attempts. Calls of the other kinds (streams) are not intercepted.

- **Budget.** The call's ``timeout=``, the interceptor's ``timeout=`` and any enclosing
  ``buttress.timeout`` bound the whole call, retries and waits included (gRPC's retry
  design: the deadline applies across all attempts). Each attempt is sent with the time
  left as its own timeout, and no wait (backoff, pushback, limiter or bulkhead queue)
  that would end after the deadline is started.
- **Retries** happen only on the ``retry_codes`` (default :data:`RETRY_CODES`:
  ``UNAVAILABLE`` and ``RESOURCE_EXHAUSTED``). A ``grpc-retry-pushback-ms`` trailer on
  such a failure is honoured as the gRPC retry design says: a non-negative value is the
  least wait before the next attempt (capped at ``max_pushback``), a negative or
  unparseable one means "do not retry"; without the trailer the backoff decides.
- **Errors stay gRPC errors.** A failed call raises the last attempt's
  ``grpc.RpcError`` (``grpc.aio.AioRpcError`` under ``grpc.aio``) as is. When the
  budget runs out, the error is a :class:`DeadlineExceeded`: a ``grpc.RpcError`` (and an
  ``AioRpcError``) whose ``code()`` is ``DEADLINE_EXCEEDED``, and also a
  :class:`buttress.TimeoutExceeded`, whose message names the timeout that was
  configured. A call the breaker, limiter or bulkhead refuses raises their
  :class:`buttress.RejectedError` without reaching the network.
- **Breaker outcomes.** ``OK`` is a success; the ``failure_codes`` (default
  :data:`FAILURE_CODES`) are failures; ``CANCELLED`` is neutral; any other code is a
  success (the server answered: ``NOT_FOUND`` says nothing about its health).

Server side, :class:`ServerInterceptor` (``grpc.server(..., interceptors=[...])``) and
:class:`AsyncServerInterceptor` (``grpc.aio.server(interceptors=[...])``) put a rate
limiter and a bulkhead in front of every method (all four kinds): a call that is not
admitted ends with ``RESOURCE_EXHAUSTED`` before the handler runs, with a
``grpc-retry-pushback-ms`` trailer saying when to come back where that is known.

The sync and the async interceptors share every decision (one plan each side, pumped by
``pump_sync`` or ``pump_async``); only the waiting differs.
"""

from __future__ import annotations

import collections
import inspect
import math
import types
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
)
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import grpc
import grpc.aio

from buttress._deadline import remaining, reset_deadline, set_deadline
from buttress._drivers import Plan, pump_async, pump_sync
from buttress._policy import PolicyOptions
from buttress._validate import check_bool, check_seconds, require_seconds
from buttress.bulkhead import Bulkhead, BulkheadPermit
from buttress.circuit_breaker import BreakerPermit, CircuitBreaker
from buttress.clock import resolve_clock
from buttress.exceptions import (
    BulkheadFull,
    ConfigTypeError,
    ConfigValueError,
    RateLimited,
    TimeoutExceeded,
)
from buttress.rate_limiter import RateLimiter
from buttress.registry import Registry, default_registry
from buttress.retry import Retry, RetryState
from buttress.timeout import Timeout

from . import _http

if TYPE_CHECKING:
    from typing_extensions import Unpack

    # The stubs make these generic (request, response); the runtime classes are not.
    _SyncClientBase = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _SyncServerBase = grpc.ServerInterceptor[Any, Any]
    _AsyncClientBase = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _AsyncServerBase = grpc.aio.ServerInterceptor[Any, Any]
    _FutureBase = grpc.Future[Any]
else:
    _SyncClientBase = grpc.UnaryUnaryClientInterceptor
    _SyncServerBase = grpc.ServerInterceptor
    _AsyncClientBase = grpc.aio.UnaryUnaryClientInterceptor
    _AsyncServerBase = grpc.aio.ServerInterceptor
    _FutureBase = grpc.Future

__all__ = [
    "FAILURE_CODES",
    "PUSHBACK_KEY",
    "RETRY_CODES",
    "AsyncClientInterceptor",
    "AsyncServerInterceptor",
    "ClientInterceptor",
    "DeadlineExceeded",
    "ServerInterceptor",
    "parse_pushback",
]

StatusCode = grpc.StatusCode

RETRY_CODES: frozenset[grpc.StatusCode] = frozenset(
    {StatusCode.UNAVAILABLE, StatusCode.RESOURCE_EXHAUSTED}
)
"""Codes retried by default: the server did not process the call, or asked to slow down."""

FAILURE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {
        StatusCode.UNAVAILABLE,
        StatusCode.DEADLINE_EXCEEDED,
        StatusCode.INTERNAL,
        StatusCode.UNKNOWN,
        StatusCode.DATA_LOSS,
        StatusCode.RESOURCE_EXHAUSTED,
    }
)
"""Codes a circuit breaker counts as failures by default: the target is down, slow or
overloaded (an answer such as ``NOT_FOUND`` or ``INVALID_ARGUMENT`` is a success)."""

PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""The trailer by which a server tells its clients when to retry (gRPC's retry design)."""

# The smallest timeout given to an attempt (a deadline in the past is for the budget to see).
_MIN_TIMEOUT = 0.001
# A DEADLINE_EXCEEDED that arrives with less than this left of the budget is the budget's.
_BUDGET_SLACK = 0.005
# The pushback is a signed 32-bit integer of milliseconds.
_PUSHBACK_MAX_MS = 2**31 - 1


def parse_pushback(value: str | bytes) -> float | None:
    """Seconds to wait according to a ``grpc-retry-pushback-ms`` value, or ``None`` for
    "do not retry".

    The value is a decimal signed 32-bit integer of milliseconds; a negative or
    unparseable value means the server asks the client not to retry at all.
    """
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    text = value.strip()
    digits = text[1:] if text.startswith("-") else text
    if not (digits.isdigit() and digits.isascii()):
        return None
    milliseconds = int(text)
    if milliseconds < 0 or milliseconds > _PUSHBACK_MAX_MS:
        return None
    return milliseconds / 1000.0


_ABSENT = -1.0


def _pushback(trailers: Any) -> float | None:
    """The pushback of a failed attempt: seconds, ``None`` (do not retry) or ``_ABSENT``."""
    if trailers:
        for key, value in trailers:
            if key == PUSHBACK_KEY:
                return parse_pushback(value)
    return _ABSENT


def _add_note(exc: BaseException, note: str) -> None:
    add = getattr(exc, "add_note", None)  # Python 3.11+
    if add is not None:
        add(note)


class DeadlineExceeded(TimeoutExceeded, grpc.aio.AioRpcError, grpc.Call, _FutureBase):  # type: ignore[misc]
    """A call's budget ran out: ``DEADLINE_EXCEEDED`` as gRPC reports it, and a
    :class:`buttress.TimeoutExceeded`.

    It is a ``grpc.RpcError`` and a ``grpc.aio.AioRpcError`` (``except`` clauses written
    for either keep working), and a finished ``grpc.Call`` / ``grpc.Future`` (what a sync
    interceptor hands back to the channel). Its message (``str()`` and ``details()``)
    names the timeout that was configured; ``timeout`` holds its seconds and
    ``__cause__`` the last attempt's own error.
    """

    def __init__(
        self,
        message: str,
        *,
        timeout: float | None,
        trailing_metadata: Any = None,
        initial_metadata: Any = None,
    ) -> None:
        # AioRpcError's constructor resets the exception's args: it goes first.
        grpc.aio.AioRpcError.__init__(
            self,
            StatusCode.DEADLINE_EXCEEDED,
            initial_metadata,
            trailing_metadata,
            message,
            None,
        )
        TimeoutExceeded.__init__(self, message, timeout=timeout)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"DeadlineExceeded({self.message!r})"

    # -- a finished grpc.Call ---------------------------------------------------------------

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> Any:
        return None

    def add_callback(self, callback: Any) -> bool:
        return False

    # -- a finished grpc.Future -------------------------------------------------------------

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> Exception | None:
        return self

    def traceback(self, timeout: float | None = None) -> types.TracebackType | None:
        return self.__traceback__

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        fn(self)


# -- per-target policies ----------------------------------------------------------------------

P = TypeVar("P", CircuitBreaker, RateLimiter, Bulkhead)
Q = TypeVar("Q", Retry, Timeout)


def _policy(
    what: Literal["breaker", "bulkhead", "limiter"],
    value: object,
    factory: type[P],
    *,
    label: str | None,
    name: str | None,
    common: dict[str, Any],
    registry: Registry,
) -> P | None:
    """The policy given, or one built from a mapping of options (shared by ``label``)."""
    if value is None or isinstance(value, factory):
        return value
    if not isinstance(value, Mapping):
        kind = factory.__name__
        raise ConfigTypeError(
            f"{what} must be a {kind}, a mapping of {kind} options or None, got {value!r}"
        )
    options = _http.checked_options(
        what, value, factory, name, common, owner="interceptor", scope="per-target"
    )
    if label is not None:
        # Interceptors sharing a name share their per-target policies.
        existing = registry.get(factory.kind, label)
        if isinstance(existing, factory):
            return existing
    return factory(label, **{**options, "registry": registry})


def _codes(name: str, value: object) -> frozenset[grpc.StatusCode]:
    if isinstance(value, (str, grpc.StatusCode)) or not isinstance(value, Iterable):
        raise ConfigTypeError(f"{name} must be a collection of grpc.StatusCode, got {value!r}")
    codes = frozenset(value)
    for code in codes:
        if not isinstance(code, grpc.StatusCode):
            raise ConfigTypeError(f"{name} must hold grpc.StatusCode members, got {code!r}")
    if StatusCode.OK in codes:
        raise ConfigValueError(f"{name} must not hold StatusCode.OK, got {value!r}")
    return codes


# -- client ---------------------------------------------------------------------------------


def _send_sync(continuation: Any, details: Any, request: Any) -> Any:
    """One sync attempt: the channel's outcome, raised when it is an error."""
    outcome = continuation(details, request)
    if outcome.code() != StatusCode.OK:  # waits for a future's end
        raise outcome
    return outcome


async def _send_async(continuation: Any, details: Any, request: Any) -> Any:
    """One aio attempt: the finished call (awaiting it again gives the response)."""
    call = await continuation(details, request)
    await call  # raises AioRpcError for a failed attempt
    return call


class _Budget:
    """What bounds one call: the deadline's seconds, where they come from, its token."""

    __slots__ = ("policy", "seconds", "source", "token")

    def __init__(self) -> None:
        self.seconds: float | None = None
        self.source = ""  # "call" (the call's timeout) or "enclosing"; "" with a policy
        self.policy: Timeout | None = None
        self.token: Any = None


class _Interceptor:
    """Configuration, the target's policies and the plan of one call, shared by the sync
    and the async client interceptor (they differ only in their I/O steps)."""

    _send = (_send_sync, _send_async)

    def __init__(
        self,
        target: str,
        *,
        name: str | None = None,
        retry: Retry | int | None = 3,
        retry_codes: Iterable[grpc.StatusCode] = RETRY_CODES,
        failure_codes: Iterable[grpc.StatusCode] = FAILURE_CODES,
        max_pushback: float | timedelta = 60.0,
        breaker: CircuitBreaker | Mapping[str, Any] | None = None,
        limiter: RateLimiter | Mapping[str, Any] | None = None,
        bulkhead: Bulkhead | Mapping[str, Any] | None = None,
        timeout: Timeout | float | timedelta | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        if not isinstance(target, str) or not target.strip():
            raise ConfigTypeError(f"target must be a non-empty string, got {target!r}")
        self.target = target
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ConfigValueError(f"name must be a non-empty string or None, got {name!r}")
        self.name = name
        unknown = set(options) - set(PolicyOptions.__annotations__)
        if unknown:
            raise ConfigTypeError(f"unexpected option(s) {sorted(unknown)!r}")
        clock = resolve_clock(options.get("clock"))
        self.clock = clock
        registry = options.get("registry")
        if registry is not None and not isinstance(registry, Registry):
            raise ConfigTypeError(
                f"registry must be a buttress.Registry, got {registry!r} "
                f"({type(registry).__name__})"
            )
        self.registry = registry if registry is not None else default_registry()
        common: dict[str, Any] = {"clock": clock, "listeners": options.get("listeners")}
        named = {**common, "registry": self.registry}

        label = None if name is None else f"{name}:{target}"
        if retry is None or isinstance(retry, Retry):
            self.retry = retry
        elif isinstance(retry, int) and not isinstance(retry, bool):
            self.retry = self._shared(Retry, label, lambda: Retry(retry, name=label, **named))
        else:
            raise ConfigTypeError(
                f"retry must be a buttress.retry(...) policy, a number of attempts or None, "
                f"got {retry!r} ({type(retry).__name__})"
            )
        self.retry_codes = _codes("retry_codes", retry_codes)
        self.failure_codes = _codes("failure_codes", failure_codes)
        self.max_pushback = require_seconds("max_pushback", max_pushback, allow_zero=True)

        reg = self.registry
        self.breaker = _policy(
            "breaker", breaker, CircuitBreaker, label=label, name=name, common=common, registry=reg
        )
        self.bulkhead = _policy(
            "bulkhead", bulkhead, Bulkhead, label=label, name=name, common=common, registry=reg
        )
        shared = _policy(
            "limiter", limiter, RateLimiter, label=name, name=name, common=common, registry=reg
        )
        # the target's own bucket of the limiter (shared with other targets' buckets)
        self.limiter = None if shared is None else shared.for_key(target)

        if timeout is None or isinstance(timeout, Timeout):
            self.timeout = timeout
        else:
            seconds = timeout  # validated by Timeout
            self.timeout = self._shared(
                Timeout, label, lambda: Timeout(seconds, name=label, **named)
            )

    def _shared(self, factory: type[Q], label: str | None, build: Callable[[], Q]) -> Q:
        """The policy of that kind registered under ``label`` already, or a new one."""
        if label is not None:
            existing = self.registry.get(factory.kind, label)
            if isinstance(existing, factory):
                return existing
        return build()

    # -- the budget -------------------------------------------------------------------------

    def _enter(self, call_timeout: float | None) -> _Budget:
        budget = _Budget()
        seconds: float | None = None
        if call_timeout is not None:
            seconds = float(call_timeout) if call_timeout > 0 else 0.0
            budget.source = "call"
        policy = self.timeout
        if policy is not None and (seconds is None or policy.seconds < seconds):
            seconds = policy.seconds
            budget.policy = policy
        if seconds is None:
            left = remaining()
            if left is not None:
                budget.seconds = left
                budget.source = "enclosing"
            return budget
        effective, budget.token = set_deadline(seconds, self.clock)
        if effective < seconds:
            budget.policy = None
            budget.source = "enclosing"
        budget.seconds = effective if budget.policy is None else seconds
        return budget

    def _expired(self, budget: _Budget, cause: BaseException | None) -> DeadlineExceeded:
        """The error for a call whose budget ran out (counted by a ``timeout=`` policy)."""
        if budget.policy is not None:
            message = str(budget.policy.expired(cause))
            seconds: float | None = budget.policy.seconds
        else:
            # (the message is built only now: most calls never need it)
            seconds = budget.seconds
            if budget.source == "call":
                what = f"the call's timeout of {seconds:g}s"
            else:
                what = f"the enclosing buttress.timeout ({seconds:g}s left)"
            message = f"deadline exceeded: {what} ran out calling {self.target}"
        trailers = initial = None
        if isinstance(cause, (grpc.Call, grpc.aio.AioRpcError)):
            try:
                trailers = cause.trailing_metadata()
                initial = cause.initial_metadata()
            except Exception:  # metadata is a courtesy here
                trailers = initial = None
        error = DeadlineExceeded(
            message, timeout=seconds, trailing_metadata=trailers, initial_metadata=initial
        )
        error.__cause__ = cause
        return error

    # -- the plan of one call ---------------------------------------------------------------

    def _plan(
        self,
        send: tuple[Callable[..., Any], Callable[..., Awaitable[Any]]],
        continuation: Any,
        details: Any,
        request: Any,
        rebuild: Callable[[Any, float | None], Any],
    ) -> Plan[Any]:
        breaker, limiter, bulkhead = self.breaker, self.limiter, self.bulkhead
        retry = self.retry
        state: RetryState | None = None if retry is None else retry.start()
        budget = self._enter(details.timeout)
        try:
            while True:
                permit: BreakerPermit | None = None
                slot: BulkheadPermit | None = None
                outcome: Any = None
                error: grpc.RpcError | None = None
                try:
                    if breaker is not None:
                        permit = yield (breaker.acquire, breaker.acquire_async, ())
                    waits = limiter is not None and (
                        limiter.store is not None or not limiter.try_acquire()
                    )
                    if waits:
                        assert limiter is not None
                        yield (limiter.acquire, limiter.acquire_async, ())
                    if bulkhead is not None:
                        slot = bulkhead.try_acquire() if bulkhead.store is None else None
                        if slot is None:
                            slot = yield (bulkhead.acquire, bulkhead.acquire_async, ())
                    left = remaining()
                    if left is None:
                        outcome = yield (*send, (continuation, details, request))
                    elif left > 0.0:
                        attempt = rebuild(details, left if left > _MIN_TIMEOUT else _MIN_TIMEOUT)
                        outcome = yield (*send, (continuation, attempt, request))
                    # else the budget is spent already: nothing is sent
                except grpc.RpcError as exc:
                    error = exc
                finally:
                    # Any other exception (a rejection, a cancellation) leaves here: what
                    # the attempt holds is given back first, the permit as neutral.
                    if slot is not None:
                        yield (slot.release, slot.release_async, ())
                    if permit is not None and error is None and outcome is None:
                        yield (permit.release, permit.release_async, ())
                        permit = None
                if outcome is None and error is None:
                    raise self._expired(budget, None)
                if permit is not None:
                    yield from self._settle(permit, error)
                if error is None:
                    if state is not None:
                        state.on_success()
                    return outcome
                delay = self._on_error(state, error)
                if delay is None:
                    if error.code() == StatusCode.DEADLINE_EXCEEDED and budget.seconds is not None:
                        left = remaining()
                        if left is not None and left <= _BUDGET_SLACK:
                            raise self._expired(budget, error)
                    raise error
                if delay > 0 and retry is not None:
                    clock = retry.clock
                    yield (clock.sleep, clock.asleep, (delay,))
        finally:
            if budget.token is not None:
                reset_deadline(budget.token)

    def _settle(self, permit: BreakerPermit, error: grpc.RpcError | None) -> Plan[None]:
        """Settle the attempt's breaker permit by the attempt's status code."""
        code = StatusCode.OK if error is None else error.code()
        if code in self.failure_codes:
            yield (permit.failure, permit.failure_async, (error,))
        elif code == StatusCode.CANCELLED:
            yield (permit.release, permit.release_async, ())
        else:
            yield (permit.success, permit.success_async, ())

    def _on_error(self, state: RetryState | None, error: grpc.RpcError) -> float | None:
        """The delay before the next attempt after a failed one, or ``None`` to raise."""
        if state is None or error.code() not in self.retry_codes:
            return None
        seconds = _pushback(error.trailing_metadata())
        if seconds is None:
            _add_note(error, f"buttress: not retried: the server's {PUSHBACK_KEY} said not to")
            return None
        if seconds != _ABSENT:
            # The retry policy reads the least wait from the error (as from a rejection).
            error.retry_after = min(seconds, self.max_pushback)  # type: ignore[attr-defined]
        return state.on_error(error)

    def snapshot(self) -> dict[str, Any]:
        """The interceptor's target and the state of its policies (JSON-ready)."""
        return {
            "target": self.target,
            "name": self.name,
            "retry": None if self.retry is None else self.retry.snapshot(),
            "breaker": None if self.breaker is None else self.breaker.snapshot(),
            "limiter": None if self.limiter is None else self.limiter.snapshot(),
            "bulkhead": None if self.bulkhead is None else self.bulkhead.snapshot(),
            "timeout": None if self.timeout is None else self.timeout.snapshot(),
        }

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name is not None else ""
        return f"<{type(self).__name__}{label} {self.target}>"


class _Details(
    collections.namedtuple(
        "_Details",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """The details of one attempt of a sync call (its own timeout)."""


def _sync_details(details: Any, timeout: float | None) -> Any:
    return _Details(
        details.method,
        timeout,
        details.metadata,
        details.credentials,
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )


def _aio_details(details: Any, timeout: float | None) -> Any:
    return grpc.aio.ClientCallDetails(
        details.method, timeout, details.metadata, details.credentials, details.wait_for_ready
    )


_OPTIONS_DOC = """
    Args:
        target: the target the channel connects to (``"host:port"``): it keys the
            per-target policies and names them.
        name: names the policies the interceptor builds: the breaker and bulkhead are
            registered as ``"<name>:<target>"``, and so are the retry and timeout built
            from numbers; the limiter is ``"<name>"`` (a bucket per target).
            Interceptors sharing a name and a target share their policies.
            ``None`` (the default) registers nothing.
        retry: a :func:`buttress.retry` policy (its attempts, backoff, deadline, budget
            and ``on`` filter apply), a number of attempts with the default backoff, or
            ``None`` for no retries (default 3 attempts).
        retry_codes: status codes that are retried (default :data:`RETRY_CODES`). Add
            others only for methods that are safe to repeat.
        failure_codes: status codes the breaker counts as failures (default
            :data:`FAILURE_CODES`).
        max_pushback: the longest wait a ``grpc-retry-pushback-ms`` trailer may ask for,
            in seconds (default 60); longer requests are cut to it.
        breaker: a :class:`~buttress.CircuitBreaker`, or a mapping of its options to
            build one for this target; ``None`` (the default) for none.
        limiter: a :class:`~buttress.RateLimiter` or a mapping of its options; the
            target gets its own bucket (``limiter.for_key(target)``). Default ``None``.
        bulkhead: a :class:`~buttress.Bulkhead` or a mapping of its options, bounding
            this target's attempts in flight. Default ``None``.
        timeout: seconds (or a :func:`buttress.timeout` policy) for the whole call,
            retries and waits included, when the call's own ``timeout=`` is longer or
            absent. Default ``None``.
        listeners, registry, clock: as for every policy (:class:`~buttress.Policy`):
            given to the policies built here; the clock also measures the budget.
"""


class ClientInterceptor(_Interceptor, _SyncClientBase):
    """Retries, deadlines, a breaker, a limiter and a bulkhead for a sync channel's
    unary-unary calls: ``grpc.intercept_channel(channel, ClientInterceptor(target))``.

    A call's ``.future()`` runs its retries in the calling thread and returns a finished
    future. See the module documentation for the semantics.
    """

    __doc__ = (__doc__ or "") + _OPTIONS_DOC

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        try:
            return pump_sync(
                self._plan(self._send, continuation, client_call_details, request, _sync_details)
            )
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Future):
                # Handed back as the call's outcome: the channel raises it from
                # result(), and a future(...) call gets a finished future with its code.
                return exc
            raise


class AsyncClientInterceptor(_Interceptor, _AsyncClientBase):
    """Retries, deadlines, a breaker, a limiter and a bulkhead for a ``grpc.aio``
    channel's unary-unary calls:
    ``grpc.aio.insecure_channel(target, interceptors=[AsyncClientInterceptor(target)])``.

    See the module documentation for the semantics.
    """

    __doc__ = (__doc__ or "") + _OPTIONS_DOC

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await pump_async(
            self._plan(self._send, continuation, client_call_details, request, _aio_details)
        )


# -- server ---------------------------------------------------------------------------------

KeyFunction = Callable[[grpc.HandlerCallDetails], Hashable | None]


class _Whole:
    """The key of a limiter without ``key=``: its own bucket, shared by every call."""


_WHOLE: Hashable = _Whole()


def _method_key(details: grpc.HandlerCallDetails) -> Hashable:
    return details.method


def _metadata_key(name: str) -> KeyFunction:
    wanted = name.lower()

    def key(details: grpc.HandlerCallDetails) -> Hashable | None:
        for item, value in details.invocation_metadata or ():
            if item == wanted:
                return value
        return _WHOLE

    return key


def _key_function(key: object) -> KeyFunction:
    if key is None:
        return lambda details: _WHOLE
    if key == "method":
        return _method_key
    if isinstance(key, str) and key.startswith("metadata:") and key[9:].strip():
        return _metadata_key(key[9:].strip())
    if callable(key):
        return key
    raise ConfigValueError(
        f'key must be None, "method", "metadata:<name>" or a function of the '
        f"grpc.HandlerCallDetails, got {key!r}"
    )


class _Rejection(Exception):
    """A call not admitted: the status details and the pushback trailer to send."""

    def __init__(self, details: str, pushback: float | None) -> None:
        super().__init__(details)
        self.details = details
        self.pushback = pushback

    def trailers(self) -> tuple[tuple[str, str], ...]:
        if self.pushback is None:
            return ()
        milliseconds = min(max(1, math.ceil(self.pushback * 1000 - 1e-6)), _PUSHBACK_MAX_MS)
        return ((PUSHBACK_KEY, str(milliseconds)),)


class _Shedding:
    """The admission decisions shared by the sync and the aio server interceptor."""

    def __init__(
        self,
        *,
        limiter: RateLimiter | None = None,
        key: str | KeyFunction | None = None,
        bulkhead: Bulkhead | None = None,
        max_wait: float | timedelta | None = 0.0,
        pushback: bool = True,
        busy_pushback: float | timedelta | None = None,
        exempt: Iterable[str] = (),
    ) -> None:
        if limiter is not None and not isinstance(limiter, RateLimiter):
            raise ConfigTypeError(f"limiter must be a buttress.RateLimiter, got {limiter!r}")
        if bulkhead is not None and not isinstance(bulkhead, Bulkhead):
            raise ConfigTypeError(f"bulkhead must be a buttress.Bulkhead, got {bulkhead!r}")
        self.limiter = limiter
        self.key = _key_function(key)
        self.bulkhead = bulkhead
        self.max_wait = check_seconds("max_wait", max_wait, allow_zero=True, allow_none=True)
        self.pushback = check_bool("pushback", pushback)
        self.busy_pushback = check_seconds(
            "busy_pushback", busy_pushback, allow_zero=True, allow_none=True
        )
        if isinstance(exempt, str) or not all(isinstance(p, str) for p in exempt):
            raise ConfigTypeError(f"exempt must be a collection of method prefixes, got {exempt!r}")
        self.exempt = tuple(exempt)

    def _exempt(self, details: grpc.HandlerCallDetails) -> bool:
        return bool(self.exempt) and details.method.startswith(self.exempt)

    def _wait_limit(self, context: Any) -> float | None:
        """Seconds a call may wait at the door: ``max_wait``, cut to the client's deadline
        (a permit that comes after the client gave up is wasted)."""
        limit = self.max_wait
        left = context.time_remaining()
        if left is not None and (limit is None or left < limit):
            limit = left if left > 0.0 else 0.0
        return limit

    def _admit(self, key: Hashable | None, limit: float | None) -> Plan[BulkheadPermit | None]:
        """Admit one call: its bulkhead slot (or ``None``), or :class:`_Rejection`. A wait
        is bounded by ``limit`` seconds."""
        limiter, bulkhead = self.limiter, self.bulkhead
        bucket = None
        if limiter is not None and key is not None:
            bucket = limiter if key is _WHOLE else limiter.for_key(key)
            if bucket.store is None and bucket.try_acquire():
                bucket = None  # admitted without waiting
        slot = None
        if bucket is None and bulkhead is not None and bulkhead.store is None:
            slot = bulkhead.try_acquire()  # the uncontended case: no deadline, no wait
        if bucket is None and (bulkhead is None or slot is not None):
            return slot
        token = None if limit is None else set_deadline(limit, self._clock())[1]
        try:
            if bucket is not None:
                try:
                    yield (bucket.acquire, bucket.acquire_async, ())
                except RateLimited as exc:
                    pushback = exc.retry_after if self.pushback else None
                    raise _Rejection(f"rate limited: {exc}", pushback) from None
            if bulkhead is not None and slot is None:
                try:
                    slot = yield (bulkhead.acquire, bulkhead.acquire_async, ())
                except BulkheadFull as exc:
                    raise _Rejection(f"overloaded: {exc}", self.busy_pushback) from None
        finally:
            if token is not None:
                reset_deadline(token)
        return slot

    def _clock(self) -> Any:
        policy = self.limiter if self.limiter is not None else self.bulkhead
        assert policy is not None
        return policy.clock


_HANDLERS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def _rewrap(handler: Any, wrap: Callable[[Callable[..., Any], bool], Callable[..., Any]]) -> Any:
    """The handler with its behaviour wrapped (``wrap(behaviour, streams_out)``)."""
    for kind, build in _HANDLERS:
        behaviour = getattr(handler, kind, None)
        if behaviour is not None:
            return build(
                wrap(behaviour, kind.endswith("stream")),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


_LIMITS_DOC = """
    Args:
        limiter: a :class:`~buttress.RateLimiter`. Over the rate: ``RESOURCE_EXHAUSTED``
            with a ``grpc-retry-pushback-ms`` trailer (the limiter's ``retry_after``).
        key: what a bucket belongs to: ``None`` (the default: the limiter's own bucket,
            shared by every call), ``"method"`` (one bucket per full method name),
            ``"metadata:<name>"`` (that request metadata's value, or the shared bucket
            when it is missing) or a function of the ``grpc.HandlerCallDetails``; a
            function returning ``None`` lets that call through unlimited.
        bulkhead: a :class:`~buttress.Bulkhead` bounding the calls in the handlers at
            once (a slot is held until the handler returns or its response stream
            ends). Saturated: ``RESOURCE_EXHAUSTED``.
        max_wait: seconds a call may wait at the door for a permit or a slot (default
            0: shed at once). ``None`` defers to the limiter's and bulkhead's own
            ``max_wait`` and ``max_queue``. A wait never outlasts the client's deadline:
            a call that cannot be admitted in time is shed at once.
        pushback: send the limiter's ``retry_after`` as ``grpc-retry-pushback-ms``
            (default ``True``).
        busy_pushback: pushback seconds to send when the bulkhead is full (default
            ``None``: no trailer, since a bulkhead cannot know when a slot frees up).
        exempt: method prefixes that are never shed (say ``("/grpc.health.v1.Health/",)``).
"""


class ServerInterceptor(_Shedding, _SyncServerBase):
    """Shed load at a sync ``grpc.server`` with ``RESOURCE_EXHAUSTED`` before a handler runs:
    ``grpc.server(executor, interceptors=[ServerInterceptor(limiter=..., bulkhead=...)])``.
    """

    __doc__ = (__doc__ or "") + _LIMITS_DOC

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or self._exempt(handler_call_details):
            return handler
        key = self.key(handler_call_details)
        return _rewrap(handler, lambda behaviour, streams: self._wrap(behaviour, streams, key))

    def _enter(self, key: Hashable | None, context: grpc.ServicerContext) -> BulkheadPermit | None:
        try:
            return pump_sync(self._admit(key, self._wait_limit(context)))
        except _Rejection as rejection:
            trailers = rejection.trailers()
            if trailers:
                context.set_trailing_metadata(trailers)
            context.abort(StatusCode.RESOURCE_EXHAUSTED, rejection.details)
            raise  # pragma: no cover - abort() raises

    def _wrap(
        self, behaviour: Callable[..., Any], streams: bool, key: Hashable | None
    ) -> Callable[..., Any]:
        enter = self._enter
        if streams:

            def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                slot = enter(key, context)
                try:
                    yield from behaviour(request, context)
                finally:
                    if slot is not None:
                        slot.release()

            return streaming

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            slot = enter(key, context)
            try:
                return behaviour(request, context)
            finally:
                if slot is not None:
                    slot.release()

        return unary


class AsyncServerInterceptor(_Shedding, _AsyncServerBase):
    """Shed load at a ``grpc.aio.server`` with ``RESOURCE_EXHAUSTED`` before a handler runs:
    ``grpc.aio.server(interceptors=[AsyncServerInterceptor(limiter=..., bulkhead=...)])``.

    The handlers are coroutine functions (or async generators for streamed responses),
    as ``grpc.aio`` servers expect; the admission never blocks the event loop (a shared
    store is awaited).
    """

    __doc__ = (__doc__ or "") + _LIMITS_DOC

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or self._exempt(handler_call_details):
            return handler
        key = self.key(handler_call_details)
        return _rewrap(handler, lambda behaviour, streams: self._wrap(behaviour, streams, key))

    async def _enter(self, key: Hashable | None, context: Any) -> BulkheadPermit | None:
        try:
            return await pump_async(self._admit(key, self._wait_limit(context)))
        except _Rejection as rejection:
            trailers = rejection.trailers()
            if trailers:
                context.set_trailing_metadata(trailers)
            await context.abort(StatusCode.RESOURCE_EXHAUSTED, rejection.details)
            raise  # pragma: no cover - abort() raises

    def _wrap(
        self, behaviour: Callable[..., Any], streams: bool, key: Hashable | None
    ) -> Callable[..., Any]:
        enter = self._enter
        if streams and inspect.isasyncgenfunction(behaviour):

            async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
                slot = await enter(key, context)
                try:
                    async for item in behaviour(request, context):
                        yield item
                finally:
                    if slot is not None:
                        await slot.release_async()

            return streaming

        async def unary(request: Any, context: Any) -> Any:
            slot = await enter(key, context)
            try:
                result = behaviour(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result
            finally:
                if slot is not None:
                    await slot.release_async()

        return unary
