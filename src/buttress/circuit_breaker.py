"""Circuit breaker: stop calling a dependency that keeps failing, probe it, recover.

Two layers, one contract:

- :class:`LocalBreaker` is the state machine (closed, open, half-open; a failure streak or
  a failure-rate window; generations; probe slots). It is the in-process
  :class:`~buttress.backends.BreakerBinding`, and a shared store (Redis) implements the
  same protocol across processes.
- :class:`CircuitBreaker` is the policy in front of it: it classifies outcomes (included,
  excluded and neutral errors, slow calls), keeps this process's counters, emits the
  rejections, and hands out :class:`BreakerPermit` objects from :meth:`~CircuitBreaker.acquire`.
  Its decorator, its context manager, pipelines and integrations are thin drivers over
  that one permission protocol.

An outcome whose token belongs to an older generation (the state moved on while the call
ran) updates the counters but never moves the state.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

from . import events as _events
from ._counter import GIL_ENABLED, Counter
from ._deadline import remaining
from ._drivers import guard_async, guard_async_io, guard_sync
from ._policy import Policy, PolicyOptions, is_async_callable
from ._validate import (
    ExceptionFilter,
    ExceptionSpec,
    check_bool,
    check_exception_filter,
    check_int,
    check_number,
    check_seconds,
    require_seconds,
)
from .backends import (
    NO_REPORT,
    BindingBase,
    BreakerBinding,
    BreakerStatus,
    BreakerStore,
    Outcome,
    check_store,
)
from .exceptions import CircuitOpenError, ConfigTypeError, ConfigValueError, RejectedError
from .permit import Permit, PermitGuard

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "BreakerPermit", "CircuitBreaker", "LocalBreaker"]

P = ParamSpec("P")
R = TypeVar("R")

CLOSED = "closed"
OPEN = "open"
_new_error = BaseException.__new__
HALF_OPEN = "half_open"


def _deadline_expired() -> bool:
    left = remaining()
    return left is not None and left <= 0.0


class LocalBreaker(BindingBase):
    """The in-process state machine of one breaker: the reference
    :class:`~buttress.backends.BreakerBinding`.

    Built from a breaker's public settings; transitions are reported through the
    breaker's ``emit``. Every method is thread-safe; none waits.
    """

    __slots__ = (
        "closed_token",
        "consecutive",
        "failure_rate",
        "failure_threshold",
        "forced",
        "gen",
        "half_open_at",
        "half_open_max_calls",
        "half_open_successes",
        "lock",
        "minimum_calls",
        "open_message",
        "probes",
        "reset_timeout",
        "ring",
        "ring_failures",
        "ring_len",
        "ring_pos",
        "state",
        "success_threshold",
        "window",
    )

    def __init__(self, breaker: CircuitBreaker) -> None:
        super().__init__(breaker)
        self.failure_threshold = breaker.failure_threshold
        self.reset_timeout = breaker.reset_timeout
        self.half_open_max_calls = breaker.half_open_max_calls
        self.success_threshold = breaker.success_threshold
        self.half_open_successes = 0
        self.failure_rate = breaker.failure_rate
        self.window = breaker.window
        self.minimum_calls = breaker.minimum_calls
        self.lock = threading.Lock()
        self.state = CLOSED
        self.gen = 0
        # The generation while closed, else None: the one attribute the hot path reads.
        self.closed_token: int | None = 0
        self.forced = False
        self.half_open_at = 0.0
        self.probes = 0
        self.consecutive = 0
        self.ring = bytearray(self.window) if self.failure_rate is not None else bytearray()
        self.ring_pos = 0
        self.ring_len = 0
        self.ring_failures = 0
        self.open_message = f"{self.label} is open"

    # -- the binding protocol ---------------------------------------------------------------

    def refusal(self) -> CircuitOpenError | None:
        """The error for a call that the open circuit refuses right now, decided without
        the lock, or ``None`` when it is not open or its probes are due (then
        :meth:`acquire` decides under the lock).

        A rejection during an outage is the path that runs most, so it takes no lock.
        That is safe: a transition to open writes ``half_open_at`` (and ``forced``) before
        ``state``, so a reader that sees ``"open"`` sees that circuit's deadline, and one
        that reads a state being left was right at the moment it read it.
        """
        if self.state != OPEN:
            return None
        if self.forced:
            left = None
        else:
            left = self.half_open_at - self.now()
            if left <= 0:
                return None
        # What CircuitOpenError(message, retry_after=left, name=name) builds, without the
        # Python-level __init__ (see RejectedError): a third of a rejection's cost.
        error = _new_error(CircuitOpenError, self.open_message)
        error.retry_after = left
        error.name = self.name
        return error

    def acquire(self) -> int:
        token = self.closed_token
        if token is not None:
            return token
        refused = self.refusal()
        if refused is not None:
            raise refused
        changed = None
        with self.lock:
            if self.state == OPEN:
                left = self.half_open_at - self.now()
                if self.forced or left > 0:
                    raise CircuitOpenError(
                        self.open_message,
                        retry_after=None if self.forced else left,
                        name=self.name,
                    )
                changed = self._transition(HALF_OPEN, "reset timeout elapsed")
            if self.state == CLOSED:
                token = self.gen
            elif self.probes < self.half_open_max_calls:
                self.probes += 1
                token = self.gen
            else:
                token = None
        if changed is not None:
            self._report(changed)
        if token is None:
            raise CircuitOpenError(
                f"{self.label} is half-open and its probe slots are taken",
                retry_after=None,
                name=self.name,
            )
        return token

    async def acquire_async(self) -> int:
        return self.acquire()

    def settle(self, token: int, outcome: Outcome) -> None:
        if token == NO_REPORT:
            return
        if outcome == "neutral":
            with self.lock:
                if self.state == HALF_OPEN and token == self.gen and self.probes > 0:
                    self.probes -= 1
            return
        failed = outcome == "failure"
        with self.lock:
            if not failed and token == self.closed_token and not self.ring:
                self.consecutive = 0
                return
            changed = self._settle(token, failed=failed)
        if changed is not None:
            self._report(changed)

    async def settle_async(self, token: int, outcome: Outcome) -> None:
        self.settle(token, outcome)

    def status(self) -> BreakerStatus:
        return BreakerStatus(*self.reading())

    def reading(self) -> tuple[str, bool, float | None, int, int | None, int | None, int]:
        """What :meth:`status` reports, as a plain tuple in the field order of
        :class:`~buttress.backends.BreakerStatus` (``snapshot()`` reads it per breaker
        without building the frozen object)."""
        with self.lock:
            state, forced, probes = self.state, self.forced, self.probes
            consecutive, half_open_at = self.consecutive, self.half_open_at
            calls, failed = (self.ring_len, self.ring_failures) if self.ring else (None, None)
        until: float | None = None
        if state == OPEN and not forced:
            until = half_open_at - self.now()
            if until <= 0.0:
                state, until = HALF_OPEN, None
        return state, forced, until, consecutive, calls, failed, probes

    def current_state(self) -> str:
        """The state as :meth:`status` reads it, without the lock: one attribute read
        (an open circuit's deadline is written before its state, see :meth:`refusal`)."""
        state = self.state
        if state == OPEN and not self.forced and self.half_open_at <= self.now():
            return HALF_OPEN
        return state

    def force(self, state: Literal["open", "closed", "half_open"]) -> None:
        with self.lock:
            if state == "half_open":
                self.forced = False
                changed = self._transition(HALF_OPEN, "forced half-open")
            elif state == "open":
                self.forced = True  # before the state: see refusal()
                changed = self._transition(OPEN, "forced open")
            else:
                self.forced = False
                changed = self._transition(CLOSED, "forced closed")
                # already closed: no transition, but the streak and window are still forgotten
                self.consecutive = 0
                self.ring_pos = self.ring_len = self.ring_failures = 0
        if changed is not None:
            self._report(changed)

    def snapshot(self) -> dict[str, Any]:
        return {}

    def _report(self, changed: tuple[str, str, str]) -> None:
        self.emit(_events.CircuitStateChanged, old=changed[0], new=changed[1], reason=changed[2])

    # -- internals (lock held) --------------------------------------------------------------

    def _record(self, failed: int) -> bool:
        """Add an outcome to the failure-rate window; True if the circuit should open."""
        ring = self.ring
        pos = self.ring_pos
        if self.ring_len == self.window:
            self.ring_failures -= ring[pos]
        else:
            self.ring_len += 1
        ring[pos] = failed
        self.ring_failures += failed
        self.ring_pos = (pos + 1) % self.window
        return (
            self.ring_len >= self.minimum_calls
            and self.ring_failures >= self.failure_rate * self.ring_len  # type: ignore[operator]
        )

    def _settle(self, token: int, *, failed: bool) -> tuple[str, str, str] | None:
        if token != self.gen or self.forced:
            return None  # the state moved on while this call ran
        if self.state == CLOSED:
            if self.ring:
                if self._record(1 if failed else 0):
                    return self._transition(OPEN, "failure rate reached")
                return None
            if failed:
                self.consecutive += 1
                if self.consecutive >= self.failure_threshold:
                    return self._transition(OPEN, "failure threshold reached")
            else:
                self.consecutive = 0
            return None
        if self.state == HALF_OPEN:
            if failed:
                return self._transition(OPEN, "probe failed")
            self.half_open_successes += 1
            if self.half_open_successes < self.success_threshold:
                # Not enough successful probes yet: free this probe's slot for the next one.
                if self.probes > 0:
                    self.probes -= 1
                return None
            return self._transition(CLOSED, "probe succeeded")
        return None

    def _transition(self, new: str, reason: str) -> tuple[str, str, str] | None:
        old = self.state
        if old == new:
            return None
        if new == OPEN:
            # The deadline itself, not "now - opened_at >= reset_timeout": that difference
            # can round to just below reset_timeout when the clock reads exactly the deadline.
            # Written before the state: refusal() reads them without the lock.
            self.half_open_at = self.now() + self.reset_timeout
        self.state = new
        self.gen += 1
        self.probes = 0
        self.half_open_successes = 0
        if new == CLOSED:
            self.consecutive = 0
            self.ring_pos = self.ring_len = self.ring_failures = 0
            self.forced = False
        self.closed_token = self.gen if new == CLOSED else None
        return old, new, reason


class BreakerPermit(Permit):
    """Permission for one call through a :class:`CircuitBreaker` (see :mod:`buttress.permit`).

    Attributes:
        token: the generation of the state that admitted the call.
        started: the breaker clock's reading when the permit was granted.
    """

    __slots__ = ("breaker", "started", "token")

    def __init__(self, breaker: CircuitBreaker, token: int, started: float) -> None:
        super().__init__()
        self.breaker = breaker
        self.token = token
        self.started = started

    def _settle(self, exc: BaseException | None, duration: float | None, *, failed: bool) -> None:
        breaker = self.breaker
        if duration is None:
            duration = breaker.clock.now() - self.started
        breaker.binding.settle(self.token, breaker.outcome(exc, duration, failed=failed))

    async def _settle_async(
        self, exc: BaseException | None, duration: float | None, *, failed: bool
    ) -> None:
        breaker = self.breaker
        if duration is None:
            duration = breaker.clock.now() - self.started
        await breaker.binding.settle_async(
            self.token, breaker.outcome(exc, duration, failed=failed)
        )

    def __repr__(self) -> str:
        return f"<BreakerPermit {self.breaker.label} token={self.token}>"


class CircuitBreaker(PermitGuard, Policy):
    """A circuit breaker.

    Args:
        name: registers the breaker (``state()``, ``health()``).
        failure_threshold: consecutive failures that open the circuit (default 5), used
            when ``failure_rate`` is ``None``.
        reset_timeout: seconds the circuit stays open before half-open probes (default 30).
        half_open_max_calls: concurrent probes allowed while half-open (default 1).
        success_threshold: successful probes needed to close a half-open circuit
            (default 1); any failed probe opens it again. A breaker with a Redis store
            supports only 1 (``ConfigValueError`` otherwise).
        failure_rate: if given (0 < rate <= 1), open when the failure rate over the last
            ``window`` calls reaches it, once ``minimum_calls`` calls were recorded.
        window: number of most recent calls in the failure-rate window (default 100).
        minimum_calls: calls needed before the failure rate is judged (default 10).
        slow_call_duration: if given, a success slower than this (seconds) counts as a failure.
        exclude: errors that pass through as neutral (neither success nor failure):
            exception classes, predicates ``exc -> bool``, or a tuple or list of them.
        include: errors that count as failures (default ``Exception``; same forms as
            ``exclude``); others are neutral. Rejections by other buttress primitives
            (:class:`RejectedError`) and cancellation are always neutral: those calls
            never reached the dependency.
        call_events: emit a :class:`~buttress.events.CallCompleted` event for every call
            (its outcome, duration and error; default ``False``: a breaker without it
            does no per-call work for events).
        store: where the state lives: a :class:`~buttress.backends.BreakerStore` such as
            :class:`~buttress.backends.redis.RedisBreakerStore` (the breaker then needs a
            name); ``None`` (default) keeps it in this breaker.
        **options: ``listeners``, ``registry`` and ``clock``, as for every policy
            (:class:`~buttress.Policy`).
    """

    kind = "circuit_breaker"

    def __init__(
        self,
        name: str | None = None,
        *,
        failure_threshold: int = 5,
        reset_timeout: float | timedelta = 30.0,
        half_open_max_calls: int = 1,
        success_threshold: int = 1,
        failure_rate: float | None = None,
        window: int = 100,
        minimum_calls: int = 10,
        slow_call_duration: float | timedelta | None = None,
        exclude: ExceptionSpec = (),
        include: ExceptionSpec = Exception,
        call_events: bool = False,
        store: object = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(name=name, **options)
        self.failure_threshold = check_int("failure_threshold", failure_threshold)
        self.reset_timeout = require_seconds("reset_timeout", reset_timeout)
        self.half_open_max_calls = check_int("half_open_max_calls", half_open_max_calls)
        self.success_threshold = check_int("success_threshold", success_threshold)
        self.failure_rate = (
            None
            if failure_rate is None
            else check_number(
                "failure_rate", failure_rate, min_value=0.0, max_value=1.0, min_inclusive=False
            )
        )
        self.window = check_int("window", window)
        self.minimum_calls = check_int("minimum_calls", minimum_calls)
        if self.failure_rate is not None and self.minimum_calls > self.window:
            raise ConfigValueError(
                f"minimum_calls must be <= window ({self.window}), got {minimum_calls!r}"
            )
        self.slow_call_duration = check_seconds(
            "slow_call_duration", slow_call_duration, allow_none=True
        )
        self.exclude: ExceptionFilter = check_exception_filter("exclude", exclude, allow_empty=True)
        self.include: ExceptionFilter = check_exception_filter("include", include)
        self.call_events = check_bool("call_events", call_events)
        if self.call_events:
            # Only such a breaker pays for the per-call event: the others keep the plain
            # classification (and the lock-free success path below).
            self.outcome = self._outcome_reported  # type: ignore[method-assign]
        self._lock = threading.Lock()
        self._fast_successes = Counter()  # successes: one atomic increment each, no lock
        self._failures = 0
        self._slow_calls = 0
        self._deadline_failures = 0
        self._neutral = 0
        self._rejections = Counter()  # one atomic increment per rejection, no lock
        self._timed = self.slow_call_duration is not None
        self._count_success = self._fast_successes.incr
        self.store: BreakerStore | None = None if store is None else check_store("breaker", store)
        self.binding: BreakerBinding = (
            LocalBreaker(self) if self.store is None else self.store.bind_breaker(self)
        )
        # The fast paths inline LocalBreaker's own state (and skip settle() on a plain
        # success): only the class itself qualifies, never a subclass that overrides it.
        self._local = self.binding if type(self.binding) is LocalBreaker else None
        # A closed, consecutive-mode local breaker with no failure streak records a success
        # with one atomic increment and no lock (see _counter); anything else takes the lock.
        self._lock_free_success = (
            GIL_ENABLED
            and self._local is not None
            and self.failure_rate is None
            and not self._timed
            and not self.call_events
        )
        self._register()

    @property
    def label(self) -> str:
        """How messages name this breaker: ``circuit breaker 'name'``."""
        return "circuit breaker" if self.name is None else f"circuit breaker {self.name!r}"

    # -- the permission protocol -----------------------------------------------------------

    def acquire(self) -> BreakerPermit:
        """Permission for one call, or :class:`CircuitOpenError`; settle the permit once."""
        return BreakerPermit(self, self._admit(), self._clock.now())

    async def acquire_async(self) -> BreakerPermit:
        """:meth:`acquire` for async code (awaits an async store instead of blocking)."""
        return BreakerPermit(self, await self._admit_async(), self._clock.now())

    def _admit(self) -> int:
        try:
            return self.binding.acquire()
        except RejectedError as exc:
            raise self._count_rejection(exc) from None

    async def _admit_async(self) -> int:
        try:
            return await self.binding.acquire_async()
        except RejectedError as exc:
            raise self._count_rejection(exc) from None

    def _count_rejection(self, exc: RejectedError) -> RejectedError:
        if isinstance(exc, CircuitOpenError):  # not a store's BackendUnavailable
            self._count_open(exc)
        return exc

    def _count_open(self, exc: CircuitOpenError) -> CircuitOpenError:
        """Count a call the open circuit refused (and report it, if anyone listens)."""
        self._rejections.incr()
        if self._listeners or _events.hub.listeners:
            self._report_open(exc)
        return exc

    def _report_open(self, exc: CircuitOpenError) -> None:
        self._deliver(
            _events.CallRejected(
                self.kind, self.name, self._clock.now(), exc.reason, exc.retry_after
            )
        )

    def is_neutral(self, exc: BaseException) -> bool:
        """Whether ``exc`` ends a call as neither success nor failure: not included,
        excluded, not an ``Exception`` (cancellation) or a rejection by another primitive."""
        return (
            not self.include(exc)
            or self.exclude(exc)
            or not isinstance(exc, Exception)
            or isinstance(exc, RejectedError)
        )

    def outcome(
        self, exc: BaseException | None, duration: float = 0.0, *, failed: bool | None = None
    ) -> Outcome:
        """Classify a finished call and count it in this breaker's counters.

        ``exc`` is the call's exception (``None`` if it returned); ``failed=True`` with no
        exception marks a failure without one (a bad response). A success slower than
        ``slow_call_duration`` is a failure (counted in ``slow_calls`` too), and so is a
        call cancelled by an expired enclosing deadline (counted in ``deadline_failures``
        too)."""
        if exc is None:
            if failed or (self._timed and duration >= self.slow_call_duration):  # type: ignore[operator]
                with self._lock:
                    self._failures += 1
                    if not failed:
                        self._slow_calls += 1
                return "failure"
            self._count_success()
            return "success"
        if exc is Permit.NEUTRAL:
            with self._lock:
                self._neutral += 1
            return "neutral"
        if not isinstance(exc, Exception) and _deadline_expired():
            # Cancelled (or, by a mode="signal" timeout, interrupted) by an enclosing
            # timeout whose deadline passed: the dependency was too slow, which is a
            # failure (with `timeout` outermost in a pipeline, a hanging dependency must
            # still open the circuit). Any other cancellation is the caller's business
            # and stays neutral.
            with self._lock:
                self._failures += 1
                self._deadline_failures += 1
            return "failure"
        if self.is_neutral(exc):
            with self._lock:
                self._neutral += 1
            return "neutral"
        with self._lock:
            self._failures += 1
        return "failure"

    # -- calling through the breaker ----------------------------------------------------------

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` through the breaker, as the decorator would: its
        result, or :class:`CircuitOpenError` without calling it. For a coroutine
        function, use :meth:`call_async`."""
        if is_async_callable(fn):
            raise ConfigTypeError(
                f"call() runs sync functions; await breaker.call_async() for the coroutine "
                f"function {fn!r}"
            )
        with self.acquire():
            return fn(*args, **kwargs)

    async def call_async(
        self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Await ``fn(*args, **kwargs)`` through the breaker, as the decorator would."""
        async with await self.acquire_async():
            return await fn(*args, **kwargs)

    def _outcome_reported(
        self, exc: BaseException | None, duration: float = 0.0, *, failed: bool | None = None
    ) -> Outcome:
        verdict = CircuitBreaker.outcome(self, exc, duration, failed=failed)
        self.emit(
            _events.CallCompleted,
            outcome=verdict,
            duration=duration,
            error=None if exc is Permit.NEUTRAL else exc,
        )
        return verdict

    # -- operator controls ------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` (an expired open reads as half-open).

        With a shared store this reads the shared state (one round trip)."""
        return self.binding.status().state

    def open(self) -> None:
        """Force the circuit open until :meth:`close` or :meth:`reset` (no half-open probes).

        With a shared store, every process sees it."""
        self.binding.force("open")

    def close(self) -> None:
        """Close the circuit and forget the recent outcomes (in every process, with a store)."""
        self.binding.force("closed")

    def half_open(self) -> None:
        """Let probes through now, as if the reset timeout had elapsed (also ends a forced
        open): the next ``half_open_max_calls`` calls are probes, whose outcomes close or
        re-open the circuit. In every process, with a shared store."""
        self.binding.force("half_open")

    def reset(self) -> None:
        """Close the circuit and zero every counter."""
        self.close()
        with self._lock:
            self._failures = self._slow_calls = self._deadline_failures = 0
            self._neutral = 0
            self._rejections.reset()
            self._fast_successes.reset()

    # -- drivers ----------------------------------------------------------------------------

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self._lock_free_success:
            return self._wrap_fast_sync(fn)
        return guard_sync(fn, self._enter, self._leave)

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self._lock_free_success:
            return self._wrap_fast_async(fn)
        if self._local is not None:  # nothing to await: no coroutine per admission
            return guard_async(fn, self._enter, self._leave)
        return guard_async_io(fn, self._enter_async, self._leave_async)

    # The hooks of the shared drivers: the same permission protocol, without a permit object.

    def _enter(self) -> tuple[int, float]:
        return self._admit(), self._clock.now()

    def _leave(self, entry: tuple[int, float], exc: BaseException | None) -> None:
        token, started = entry
        self.binding.settle(token, self.outcome(exc, self._clock.now() - started))

    async def _enter_async(self) -> tuple[int, float]:
        return await self._admit_async(), self._clock.now()

    async def _leave_async(self, entry: tuple[int, float], exc: BaseException | None) -> None:
        token, started = entry
        await self.binding.settle_async(token, self.outcome(exc, self._clock.now() - started))

    # The fast paths: a local, consecutive-mode breaker without slow-call timing. A closed
    # circuit admits by reading one attribute, and a success that ends no failure streak
    # is one atomic increment. Reading the streak without the lock is safe: a success
    # racing with a failure may be ordered before it, which is a valid interleaving.

    def _wrap_fast_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        core = self._local
        assert core is not None
        admit, outcome, settle = self._admit, self.outcome, core.settle
        refusal, rejected, hub = core.refusal, self._rejections.incr, _events.hub
        count = self._fast_successes.incr

        def guarded_fast(*args: Any, **kwargs: Any) -> Any:
            token = core.closed_token
            if token is None:
                error = refusal()
                if error is not None:  # _count_open(), inlined: the path of an outage
                    rejected()
                    if self._listeners or hub.listeners:
                        self._report_open(error)
                    raise error
                token = admit()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                settle(token, outcome(exc))
                raise
            if token == core.closed_token and not core.consecutive:
                count()
            else:
                settle(token, outcome(None))
            return result

        return guarded_fast

    def _wrap_fast_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        core = self._local
        assert core is not None
        admit, outcome, settle = self._admit, self.outcome, core.settle
        refusal, rejected, hub = core.refusal, self._rejections.incr, _events.hub
        count = self._fast_successes.incr

        async def guarded_fast(*args: Any, **kwargs: Any) -> Any:
            token = core.closed_token
            if token is None:
                error = refusal()
                if error is not None:  # _count_open(), inlined: the path of an outage
                    rejected()
                    if self._listeners or hub.listeners:
                        self._report_open(error)
                    raise error
                token = admit()
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                settle(token, outcome(exc))
                raise
            if token == core.closed_token and not core.consecutive:
                count()
            else:
                settle(token, outcome(None))
            return result

        return guarded_fast

    # -- state views ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        core = self._local
        if core is not None:  # in process: a plain tuple, no status object per call
            state, forced, until, consecutive, window, failed, probes = core.reading()
        else:
            status = self.binding.status()
            state, forced, until = status.state, status.forced, status.seconds_until_half_open
            consecutive, probes = status.consecutive_failures, status.half_open_probes
            window, failed = status.window_calls, status.window_failures
        # Counters: each an atomic read, so no lock (a snapshot taken during calls is a
        # moment's reading either way).
        successes = self._fast_successes.value
        failures, neutral = self._failures, self._neutral
        out: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "state": state,
            "forced": forced,
            "mode": "consecutive" if self.failure_rate is None else "failure_rate",
            "consecutive_failures": consecutive,
            "failure_rate": failed / window if window and failed is not None else None,
            "window_calls": window,
            "calls": successes + failures + neutral,
            "successes": successes,
            "failures": failures,
            "slow_calls": self._slow_calls,
            "deadline_failures": self._deadline_failures,
            "neutral": neutral,
            "rejections": self._rejections.value,
            "half_open_probes": probes,
            "seconds_until_half_open": until,
        }
        if core is None:
            out["store"] = self.binding.snapshot()
        return out

    def health_check(self) -> tuple[str, Any, str]:
        core = self._local  # health() calls this per breaker: no lock, no status object
        state = core.current_state() if core is not None else self.state
        if state == OPEN:
            return "fail", state, "circuit open: calls are rejected"
        if state == HALF_OPEN:
            return "warn", state, "circuit half-open: probing"
        return "pass", state, ""
