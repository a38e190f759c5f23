"""Retry with backoff, jitter, a deadline and a shared retry budget.

One decision object, :class:`RetryState`, says for each failed attempt either
"sleep this long, then try again" or "give up". The decorator's sync and async
wrappers, the ``attempts()`` loop and the integrations (the httpx transport) are
thin drivers over it; only the way they sleep differs. ``Retry.start()`` hands
one out for code that runs its own loop.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypedDict

from . import events as _events
from ._config import config
from ._counter import Counter
from ._deadline import ambient, remaining
from ._generators import NO_SESSION, NOTHING, Session, async_driver, delegate
from ._policy import ExcType, Policy, PolicyOptions, Traceback
from ._validate import (
    ExceptionFilter,
    ExceptionSpec,
    check_bool,
    check_callable,
    check_exception_filter,
    check_int,
    check_number,
    check_seconds,
    require_seconds,
)
from .backoff import exponential
from .clock import Clock, resolve_clock
from .exceptions import (
    CircuitOpenError,
    ConfigTypeError,
    ConfigValueError,
    Permanent,
    RejectedError,
    RetryExhausted,
    TryAgain,
)
from .registry import Registry

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Attempt", "Retry", "RetryBudget", "RetryOptions", "RetryState", "retry"]

_DEFAULT_BACKOFF = exponential()


def _add_note_310(exc: BaseException, note: str) -> None:  # pragma: no cover - Python 3.10
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
        exc.__notes__ = notes  # type: ignore[attr-defined]
    notes.append(note)


if sys.version_info >= (3, 11):
    _add_note = BaseException.add_note
else:  # pragma: no cover - Python 3.10
    _add_note = _add_note_310
# How a give-up note names what ran out.
_EXHAUSTED = {"attempts": "attempts", "deadline": "deadline", "budget": "retry budget"}
# The give-up notes already made, by (attempts, reason): one is added per failed call.
_NOTES: dict[tuple[int, str], str] = {}


def _gave_up_note(attempts: int, reason: str) -> str:
    return f"buttress: gave up after {attempts} attempt(s) ({_EXHAUSTED[reason]} exhausted)"


# At most this many exception classes' verdicts are kept per policy (see on_error).
_VERDICTS = 64
# Errors that `on=` alone does not decide (see RetryState.on_error).
_SPECIAL = (TryAgain, Permanent, CircuitOpenError)


class RetryBudget:
    """A shared cap on retries: at most ``ratio`` retries per call over a sliding ``window``.

    Many callers retrying a failing dependency at once multiply its load (a retry storm).
    A budget shared by those callers lets retries through while they stay a small
    fraction of the traffic, plus a floor of ``min_per_second`` so that low-traffic
    callers can still retry.

    Args:
        ratio: retries allowed per call made, over the window (default 0.2, in [0, 1000]).
        window: the sliding window in seconds (default 10.0).
        min_per_second: retries always allowed per second regardless of traffic (default 10).
        clock: time source (default: the system clock).
    """

    _BUCKETS = 10

    def __init__(
        self,
        ratio: float = 0.2,
        *,
        window: float | timedelta = 10.0,
        min_per_second: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        self.ratio = check_number("ratio", ratio, min_value=0.0, max_value=1000.0)
        seconds = require_seconds("window", window)
        self.window = seconds
        self.min_per_second = check_number("min_per_second", min_per_second, min_value=0.0)
        self._clock = resolve_clock(clock)
        self._width = self.window / self._BUCKETS
        if not self._width > 0:
            raise ConfigValueError(f"window is too small to measure, got {window!r}")
        self._calls = [0] * self._BUCKETS
        self._retries = [0] * self._BUCKETS
        self._epoch = int(self._clock.now() / self._width)
        self._lock = threading.Lock()
        self.rejected = 0

    def _roll(self) -> int:
        """Zero the buckets that slid out of the window; return the current bucket index."""
        epoch = int(self._clock.now() / self._width)
        gap = epoch - self._epoch
        if gap > 0:
            for step in range(1, min(gap, self._BUCKETS) + 1):
                index = (self._epoch + step) % self._BUCKETS
                self._calls[index] = 0
                self._retries[index] = 0
            self._epoch = epoch
        return self._epoch % self._BUCKETS

    def deposit(self) -> None:
        """Record one call."""
        with self._lock:
            self._calls[self._roll()] += 1

    def try_withdraw(self) -> bool:
        """Record one retry if the budget allows it; return whether it does."""
        with self._lock:
            index = self._roll()
            allowed = self.min_per_second * self.window + self.ratio * sum(self._calls)
            if sum(self._retries) + 1 > allowed:
                self.rejected += 1
                return False
            self._retries[index] += 1
            return True

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self._roll()
            calls, retries = sum(self._calls), sum(self._retries)
        return {
            "ratio": self.ratio,
            "window": self.window,
            "min_per_second": self.min_per_second,
            "calls_in_window": calls,
            "retries_in_window": retries,
            "rejected": self.rejected,
        }


class RetryState:
    """The decisions for one call being retried: get it from :meth:`Retry.start`.

    A driver runs an attempt, then reports its outcome: :meth:`on_error` for an
    exception, :meth:`on_result` or :meth:`retry_result` for a returned value,
    :meth:`on_success` when the call ended well. Each answer is the delay in seconds
    to wait before the next attempt, or ``None`` when there is no next attempt. The
    state never sleeps and never calls anything: the waiting is the driver's.

    It is also the call's statistics, its own and no other call's (the
    ``before_attempt`` and ``after_call`` hooks receive it).

    Attributes:
        attempt: the attempt under way (1 for the first, 2 for the first retry...).
        waited: seconds of backoff handed out so far (the sum of the delays returned).
        started: the policy clock's reading when the call started.
        settled: whether the call ended well (:meth:`on_success` ran).
    """

    __slots__ = (
        "attempt",
        "call",
        "delays",
        "last_delay",
        "peeked",
        "policy",
        "settled",
        "started",
        "waited",
    )

    def __init__(self, policy: Retry, started: float | None = None) -> None:
        self.policy = policy
        self.attempt = 1
        self.started = started
        self.delays: Iterator[float] | None = None
        self.last_delay = 0.0
        self.settled = False
        self.waited = 0.0
        self.peeked: float | None = None
        # (args, kwargs) of the call, kept for the events of an event_details policy only
        self.call: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    def details(self) -> dict[str, Any]:
        """The events' optional fields: empty unless the policy has ``event_details``."""
        if not self.policy.event_details:
            return {}
        args, kwargs = self.call if self.call is not None else ((), {})
        return {"elapsed": self.elapsed, "args": args, "kwargs": dict(kwargs)}

    @property
    def elapsed(self) -> float:
        """Seconds since the call started, on the policy's clock (0 if its start is unknown)."""
        return 0.0 if self.started is None else self.policy._clock.now() - self.started

    def next_delay(self) -> float | None:
        """The backoff delay before the next attempt should the current one fail, or
        ``None`` when the current attempt is the last one. It is drawn now (jitter
        included) and kept, so the wait that follows a failure is this one, unless
        a ``retry_after`` hint lengthens it or the deadline or budget ends the call."""
        if self.attempt >= self._max_attempts():
            return None
        if config.testing:
            return 0.0
        if self.peeked is None:
            self.peeked = self._draw()
        return self.peeked

    def _max_attempts(self) -> int:
        attempts = self.policy.max_attempts
        if attempts is None:  # no limit: the deadline bounds the call
            attempts = sys.maxsize
        if config.testing and config.testing_attempts is not None:
            # The testing switch caps attempts, it never raises them: a policy built
            # with attempts=1 (a call that must not be repeated) stays at one.
            attempts = min(attempts, config.testing_attempts)
        return attempts

    def _draw(self) -> float:
        delay = self.policy._constant_delay
        if delay is not None:
            return delay
        if self.delays is None:
            self.delays = iter(self.policy.backoff)
        delay = next(self.delays, None)
        if delay is None:  # a finite schedule ran out: its last delay repeats
            delay = self.last_delay
        self.last_delay = delay
        return delay

    def on_error(self, exc: BaseException) -> float | None:
        """The attempt raised ``exc``: the delay before the next attempt, or ``None``
        when ``exc`` must be re-raised (not retryable, or attempts, deadline or budget
        exhausted; a note on ``exc`` and a ``RetryGaveUp`` event say which)."""
        policy = self.policy
        # Cancellation, KeyboardInterrupt and SystemExit are never retried, whatever `on`
        # says, and neither is an error its raiser declared Permanent. TryAgain always is:
        # the function asked for another attempt. The common case (an ordinary error) is
        # answered by one isinstance against `on`'s classes.
        # Without predicates in `on`, the answer depends on the error's class alone: it is
        # kept per class (a few classes fail in practice; the table is bounded).
        verdicts = policy._verdicts
        retryable = None if verdicts is None else verdicts.get(type(exc))
        if retryable is None:
            if not isinstance(exc, Exception):
                retryable = False
            elif isinstance(exc, _SPECIAL):
                retryable = isinstance(exc, TryAgain) or (
                    not isinstance(exc, Permanent) and policy._retryable(exc)
                )
            else:
                on = policy.on
                retryable = isinstance(exc, on.types) or (bool(on.predicates) and on(exc))
            if verdicts is not None and len(verdicts) < _VERDICTS:
                verdicts[type(exc)] = retryable
        if not retryable:
            if self.attempt > 1:
                _add_note(exc, f"buttress: not retryable, raised on attempt {self.attempt}")
            return None
        retry_after = getattr(exc, "retry_after", None)
        if (
            retry_after is not None
            or config.testing
            or policy.deadline is not None
            or policy.budget is not None
        ):
            return self._next(exc, None, retry_after)
        # What _next() does, specialised for the common case (no retry_after hint, no
        # deadline or budget of the policy's own, no testing switch) and kept in this one
        # frame: during an outage every attempt of every call comes through here.
        attempts = policy.max_attempts
        local = policy._listeners
        if attempts is not None and self.attempt >= attempts:
            if self.attempt == attempts and not (local or _events.hub.listeners):
                # _give_up("attempts", ...) when there is no event to send.
                policy._gave_up.incr()
                _add_note(exc, policy._exhausted_note)
            else:
                self._give_up("attempts", exc, None)
            return None
        delay = self.peeked
        if delay is not None:
            self.peeked = None
        else:  # _draw(), inlined
            delay = policy._constant_delay
            if delay is None:
                delays = self.delays
                if delays is None:
                    delays = self.delays = iter(policy.backoff)
                delay = next(delays, None)
                if delay is None:  # a finite schedule ran out: its last delay repeats
                    delay = self.last_delay
                self.last_delay = delay
        outer = ambient()  # an enclosing timeout's deadline: remaining(), inlined
        if outer is not None and delay >= max(outer[0] - outer[1].now(), 0.0):
            self._give_up("deadline", exc, None)
            return None
        policy._retries.incr()
        if local or _events.hub.listeners:
            if policy.event_details:
                policy._report_retry(self, delay, exc, None)
            else:
                _events.dispatch(
                    local,
                    _events.RetryScheduled(
                        policy.kind, policy.name, policy._clock.now(), self.attempt, delay, exc
                    ),
                )
        self.attempt += 1
        self.waited += delay
        return delay

    def on_result(self, result: object) -> float | None:
        """The attempt returned ``result``; the policy's ``retry_if_result`` judges it.

        ``None``: accept the result (the call ended well, as :meth:`on_success`). A
        delay: try again after it. Raises :class:`RetryExhausted` (carrying ``result``)
        when the result is rejected and the policy gives up.
        """
        check = self.policy.retry_if_result
        if check is None or not check(result):
            self.on_success()
            return None
        return self._rejected(result)

    def retry_result(self, result: object, *, retry_after: float | None = None) -> float | None:
        """The caller judged ``result`` worth another attempt (an HTTP 503, say).

        Returns the delay before the next attempt, at least ``retry_after`` seconds when
        given, or ``None`` when attempts, deadline or budget are exhausted (a
        ``RetryGaveUp`` event is emitted; nothing is raised: the caller keeps ``result``).
        """
        return self._next(None, result, retry_after)

    def on_success(self) -> None:
        """The call ended well (``RetryRecovered`` after a retry); later calls do nothing."""
        if self.settled:
            return
        self.settled = True
        if self.attempt > 1:
            policy = self.policy
            policy._recovered.incr()
            if policy._listeners or _events.hub.listeners:
                policy.emit(_events.RetryRecovered, attempts=self.attempt, **self.details())

    def _rejected(self, result: object) -> float:
        """``retry_if_result`` rejected ``result``: the delay, or RetryExhausted."""
        hint = self.policy.retry_after
        delay = self._next(None, result, None if hint is None else hint(result))
        if delay is None:
            raise RetryExhausted(
                f"result {result!r} still rejected by retry_if_result after "
                f"{self.attempt} attempt(s)",
                result=result,
                attempts=self.attempt,
            )
        return delay

    def _next(
        self, error: BaseException | None, result: object, retry_after: object
    ) -> float | None:
        policy = self.policy
        # _max_attempts(), inlined: this runs once per failed attempt.
        attempts = policy.max_attempts
        testing = config.testing
        if attempts is None:
            attempts = sys.maxsize
        if testing and config.testing_attempts is not None:
            attempts = min(attempts, config.testing_attempts)
        if self.attempt >= attempts:
            self._give_up("attempts", error, result)
            return None
        delay = self.peeked
        if delay is not None:
            self.peeked = None
        else:  # _draw(), inlined
            delay = policy._constant_delay
            if delay is None:
                delays = self.delays
                if delays is None:
                    delays = self.delays = iter(policy.backoff)
                delay = next(delays, None)
                if delay is None:  # a finite schedule ran out: its last delay repeats
                    delay = self.last_delay
                self.last_delay = delay
        if retry_after is not None:
            if isinstance(retry_after, timedelta):
                retry_after = retry_after.total_seconds()
            if (
                isinstance(retry_after, (int, float))
                and not isinstance(retry_after, bool)
                and not math.isnan(retry_after)
            ):
                delay = max(delay, float(retry_after))
        if testing:
            delay = 0.0
        left = remaining()
        if policy.deadline is not None and self.started is not None:
            own = policy.deadline - (policy._clock.now() - self.started)
            left = own if left is None else min(left, own)
        if left is not None and delay >= left:
            self._give_up("deadline", error, result)
            return None
        budget = policy.budget
        if budget is not None and not budget.try_withdraw():
            self._give_up("budget", error, result)
            return None
        policy._retries.incr()
        if policy._listeners or _events.hub.listeners:
            policy._report_retry(self, delay, error, result)
        self.attempt += 1
        self.waited += delay
        return delay

    def _give_up(self, reason: str, error: BaseException | None, result: object) -> None:
        policy = self.policy
        policy._gave_up.incr()
        if error is not None:
            note: str | None
            if reason == "attempts" and self.attempt == policy.max_attempts:
                note = policy._exhausted_note  # the usual note, made once per policy
            else:
                key = (self.attempt, reason)
                note = _NOTES.get(key)
            if note is None:
                note = _gave_up_note(self.attempt, reason)
                if len(_NOTES) < 1024:
                    _NOTES[self.attempt, reason] = note
            _add_note(error, note)
        if policy._listeners or _events.hub.listeners:
            if policy.event_details:
                policy.emit(
                    _events.RetryGaveUp,
                    attempts=self.attempt,
                    reason=reason,
                    error=error,
                    result=result,
                    **self.details(),
                )
            else:
                _events.dispatch(
                    policy._listeners,
                    _events.RetryGaveUp(
                        policy.kind,
                        policy.name,
                        policy._clock.now(),
                        self.attempt,
                        reason,
                        error,
                        result,
                    ),
                )

    def __repr__(self) -> str:
        return f"<RetryState attempt={self.attempt} of {self.policy!r}>"


Hook = Callable[[RetryState], object]
"""A retry hook: called with the call's :class:`RetryState`."""


class RetryOptions(TypedDict, total=False):
    """The options of :class:`Retry`, as :meth:`Retry.retry_with` takes them."""

    attempts: int | None
    on: ExceptionSpec
    retry_if_result: Callable[[Any], bool] | None
    retry_after: Callable[[Any], float | timedelta | None] | None
    backoff: Iterable[float] | None
    deadline: float | timedelta | None
    budget: RetryBudget | None
    before_attempt: Hook | None
    after_call: Hook | None
    event_details: bool
    name: str | None
    listeners: Iterable[_events.Listener] | None
    registry: Registry | None
    clock: Clock | None


class Retry(Policy):
    """Retry a call that fails with a transient error (``retry(...)`` builds one).

    Args:
        attempts: total attempts including the first (default 3, >= 1), or ``None`` for
            no limit when a ``deadline`` bounds the call.
        on: what to retry: an exception class, a predicate ``exc -> bool``, or a tuple or
            list mixing them (default ``Exception``); an error is retried when it is an
            instance of one of the classes or a predicate returns true for it.
            ``CancelledError``, ``KeyboardInterrupt`` and ``SystemExit`` are never retried.
            A :class:`CircuitOpenError` ends the retries at once (fail fast) unless ``on``
            names it (or :class:`RejectedError`) by class; predicates are not asked about
            it. When named, the wait honours its ``retry_after``.
        retry_if_result: predicate on a returned value; true means "retry". On the last
            attempt a rejected result raises :class:`RetryExhausted` carrying it.
        retry_after: for a result that ``retry_if_result`` rejected, the least wait in
            seconds before the next attempt, read from the result (a 429 response's
            Retry-After header, say), or ``None`` for the backoff's delay alone.
        backoff: iterable of delays in seconds, at least one (default
            ``backoff.exponential(0.1, 2.0, 10.0, "full")``); its last delay repeats.
        deadline: total seconds for all attempts and sleeps; no sleep crosses it.
        budget: a shared :class:`RetryBudget`.
        before_attempt: called before every attempt with the call's :class:`RetryState`
            (its attempt number, ``waited`` and ``elapsed``: per-call statistics).
        after_call: called once when the call ends, whichever way, with its
            :class:`RetryState`. The hooks run in the caller's thread or task; an
            exception they raise propagates. Without hooks, nothing is built for them.
        event_details: the retry events also carry ``elapsed`` (seconds since the call
            started) and the call's ``args`` and ``kwargs`` (default ``False``: arguments
            may hold secrets).
        name: registers the policy for ``state()``.
        **options: ``listeners``, ``registry`` and ``clock``, as for every policy
            (:class:`~buttress.Policy`).
    """

    kind = "retry"

    def __init__(
        self,
        attempts: int | None = 3,
        *,
        on: ExceptionSpec = Exception,
        retry_if_result: Callable[[Any], bool] | None = None,
        retry_after: Callable[[Any], float | timedelta | None] | None = None,
        backoff: Iterable[float] | None = None,
        deadline: float | timedelta | None = None,
        budget: RetryBudget | None = None,
        before_attempt: Hook | None = None,
        after_call: Hook | None = None,
        event_details: bool = False,
        name: str | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(name=name, **options)
        # What retry_with() starts from (the name is not inherited: names are unique).
        self._given: dict[str, Any] = {
            "attempts": attempts,
            "on": on,
            "retry_if_result": retry_if_result,
            "retry_after": retry_after,
            "backoff": backoff,
            "deadline": deadline,
            "budget": budget,
            "before_attempt": before_attempt,
            "after_call": after_call,
            "event_details": event_details,
            **options,
        }
        self.max_attempts: int | None = (
            None if attempts is None else check_int("attempts", attempts)
        )
        if attempts is None and deadline is None:
            raise ConfigValueError(
                "attempts=None (no attempt limit) needs a deadline to bound the call, "
                "got attempts=None and deadline=None"
            )
        self.on: ExceptionFilter = check_exception_filter("on", on)
        # Whether each class of error is retried, learnt as they come (see on_error);
        # None when `on` has predicates: then the answer depends on the instance.
        self._verdicts: dict[type[BaseException], bool] | None = None if self.on.predicates else {}
        # An open circuit is retried only when on= names CircuitOpenError or RejectedError
        # by class (not a broader class such as Exception, and not a predicate).
        self._retries_open_circuit = any(
            issubclass(CircuitOpenError, t) and issubclass(t, RejectedError) for t in self.on.types
        )
        self.retry_if_result = check_callable("retry_if_result", retry_if_result, allow_none=True)
        self.retry_after: Callable[[Any], float | timedelta | None] | None = check_callable(
            "retry_after", retry_after, allow_none=True
        )
        if retry_after is not None and retry_if_result is None:
            raise ConfigValueError(
                f"retry_after reads the wait from a rejected result, so it needs "
                f"retry_if_result, got retry_after={retry_after!r} and retry_if_result=None"
            )
        self.before_attempt: Hook | None = check_callable(
            "before_attempt", before_attempt, allow_none=True
        )
        self.after_call: Hook | None = check_callable("after_call", after_call, allow_none=True)
        self.event_details = check_bool("event_details", event_details)
        # Hooks and event details need the call's state (and start time) from the outset.
        self._hooked = (
            self.before_attempt is not None or self.after_call is not None or self.event_details
        )
        if backoff is None:
            backoff = _DEFAULT_BACKOFF
        elif not isinstance(backoff, Iterable) or isinstance(backoff, (str, bytes)):
            raise ConfigTypeError(
                f"backoff must be an iterable of delays in seconds, "
                f"got {backoff!r} ({type(backoff).__name__})"
            )
        elif iter(backoff) is backoff:
            raise ConfigTypeError(
                f"backoff must be re-iterable (a list, a tuple or a backoff.* schedule), "
                f"not a one-shot iterator such as a generator, got {backoff!r}"
            )
        elif isinstance(backoff, (list, tuple)):
            backoff = tuple(
                require_seconds(f"backoff[{i}]", d, allow_zero=True) for i, d in enumerate(backoff)
            )
        if next(iter(backoff), None) is None:
            raise ConfigValueError(
                f"backoff must hold at least one delay (use [0] for no pause), got {backoff!r}"
            )
        self.backoff: Iterable[float] = backoff
        # A one-delay schedule ([0], say) is that delay every time: no iterator per call.
        self._constant_delay: float | None = (
            backoff[0] if isinstance(backoff, tuple) and len(backoff) == 1 else None
        )
        self.deadline = check_seconds("deadline", deadline, allow_none=True)
        if budget is not None and not isinstance(budget, RetryBudget):
            raise ConfigTypeError(
                f"budget must be a buttress.RetryBudget, got {budget!r} ({type(budget).__name__})"
            )
        self.budget = budget
        self._exhausted_note = (
            "" if self.max_attempts is None else _gave_up_note(self.max_attempts, "attempts")
        )
        # Atomic counters, no lock: a failing dependency makes these the hot path.
        self._retries = Counter()
        self._gave_up = Counter()
        self._recovered = Counter()
        self._register()

    # -- decisions shared by every driver ----------------------------------------------------

    def _retryable(self, exc: Exception) -> bool:
        if isinstance(exc, CircuitOpenError):
            # An open circuit is the opposite of a transient error: fail fast, unless
            # the caller explicitly asked to wait for it to half-open.
            return self._retries_open_circuit
        return self.on(exc)

    def _report_retry(
        self, state: RetryState, delay: float, error: BaseException | None, result: object
    ) -> None:
        if self.event_details:
            self.emit(
                _events.RetryScheduled,
                attempt=state.attempt,
                delay=delay,
                error=error,
                result=result,
                **state.details(),
            )
        else:
            _events.dispatch(
                self._listeners,
                _events.RetryScheduled(
                    self.kind, self.name, self._clock.now(), state.attempt, delay, error, result
                ),
            )

    def start(self) -> RetryState:
        """Begin one call: its :class:`RetryState` (deposits into the budget and starts
        the deadline clock). For drivers that run their own loop, as the httpx
        transport does; the decorators and ``attempts()`` use it internally."""
        return self._start() or RetryState(self, self._clock.now())

    def retry_with(self, **changes: Unpack[RetryOptions]) -> Retry:
        """A new policy with this one's options, except ``changes``.

        ``policy.retry_with(attempts=5)`` keeps ``on``, the backoff, the hooks, the
        listeners, the budget (the same shared object) and the clock. The name is not
        inherited (names are unique per kind): pass ``name=`` to register the new one.
        """
        unknown = sorted(set(changes) - set(RetryOptions.__annotations__))
        if unknown:
            raise ConfigTypeError(
                f"retry_with() takes Retry's options, got unknown option(s) "
                f"{', '.join(unknown)} (valid: {', '.join(RetryOptions.__annotations__)})"
            )
        return Retry(**{**self._given, **changes})

    def _start(self) -> RetryState | None:
        """Per-call setup; ``None`` means "build the state lazily on the first failure"
        (the decorators' fast path: nothing is allocated for a call that succeeds)."""
        if self.budget is not None:
            self.budget.deposit()
        if self.deadline is not None:
            return RetryState(self, self._clock.now())
        return None

    # -- the two drivers --------------------------------------------------------------------

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self._hooked:
            return self._wrap_sync_hooked(fn)
        start, sleep, check = self._start, self._clock.sleep, self.retry_if_result

        def retrying(*args: Any, **kwargs: Any) -> Any:
            # _start() only when it has work (a budget or a deadline): a call saved.
            state = None if self.budget is None and self.deadline is None else start()
            while True:
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    if state is None:
                        state = RetryState(self)
                    delay = state.on_error(exc)
                    if delay is None:
                        raise
                else:
                    if check is None or not check(result):
                        if state is not None:
                            state.on_success()
                        return result
                    if state is None:
                        state = RetryState(self)
                    delay = state._rejected(result)
                if delay > 0:
                    sleep(delay)

        return retrying

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self._hooked:
            return self._wrap_async_hooked(fn)
        start, check = self._start, self.retry_if_result
        asleep = self._clock.asleep

        async def retrying(*args: Any, **kwargs: Any) -> Any:
            state = None if self.budget is None and self.deadline is None else start()
            while True:
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    if state is None:
                        state = RetryState(self)
                    delay = state.on_error(exc)
                    if delay is None:
                        raise
                else:
                    if check is None or not check(result):
                        if state is not None:
                            state.on_success()
                        return result
                    if state is None:
                        state = RetryState(self)
                    delay = state._rejected(result)
                if delay > 0:
                    await asleep(delay)

        return retrying

    # The hooked drivers: picked at decoration time when a hook is set, so that the
    # plain ones above stay as lean as they were (no state built for a call that works).

    def _wrap_sync_hooked(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        sleep, check = self._clock.sleep, self.retry_if_result
        before, after, details = self.before_attempt, self.after_call, self.event_details

        def retrying(*args: Any, **kwargs: Any) -> Any:
            state = self.start()
            if details:
                state.call = (args, kwargs)
            try:
                while True:
                    if before is not None:
                        before(state)
                    try:
                        result = fn(*args, **kwargs)
                    except BaseException as exc:
                        delay = state.on_error(exc)
                        if delay is None:
                            raise
                    else:
                        if check is None or not check(result):
                            state.on_success()
                            return result
                        delay = state._rejected(result)
                    if delay > 0:
                        sleep(delay)
            finally:
                if after is not None:
                    after(state)

        return retrying

    def _wrap_async_hooked(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        asleep, check = self._clock.asleep, self.retry_if_result
        before, after, details = self.before_attempt, self.after_call, self.event_details

        async def retrying(*args: Any, **kwargs: Any) -> Any:
            state = self.start()
            if details:
                state.call = (args, kwargs)
            try:
                while True:
                    if before is not None:
                        before(state)
                    try:
                        result = await fn(*args, **kwargs)
                    except BaseException as exc:
                        delay = state.on_error(exc)
                        if delay is None:
                            raise
                    else:
                        if check is None or not check(result):
                            state.on_success()
                            return result
                        delay = state._rejected(result)
                    if delay > 0:
                        await asleep(delay)
            finally:
                if after is not None:
                    after(state)

        return retrying

    # Generator functions: retried until the first item arrives; after it, an error
    # reaches the consumer (the items it already has cannot be taken back).

    def _check_generator(self, fn: Callable[..., Any]) -> None:
        if self.retry_if_result is not None:
            raise ConfigTypeError(
                f"retry_if_result cannot apply to the generator function {fn!r}: a "
                f"generator's items are not a result (retry on exceptions instead)"
            )

    def _wrap_generator(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        self._check_generator(fn)
        sleep = self._clock.sleep
        before, after = self.before_attempt, self.after_call

        def retrying(*args: Any, **kwargs: Any) -> Any:
            state = self.start()
            try:
                while True:
                    if before is not None:
                        before(state)
                    gen = fn(*args, **kwargs)
                    try:
                        first = next(gen)
                    except StopIteration as stop:
                        state.on_success()
                        return stop.value
                    except BaseException as exc:
                        delay = state.on_error(exc)
                        if delay is None:
                            raise
                    else:
                        state.on_success()
                        break
                    if delay > 0:
                        sleep(delay)
            finally:
                if after is not None:
                    after(state)
            return (yield from delegate(gen, NO_SESSION, first))

        return retrying

    def _wrap_async_generator(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        self._check_generator(fn)
        asleep = self._clock.asleep
        before, after = self.before_attempt, self.after_call

        async def first_item(
            args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[Any, Session, Any]:
            state = self.start()
            try:
                while True:
                    if before is not None:
                        before(state)
                    agen = fn(*args, **kwargs)
                    try:
                        first = await agen.__anext__()
                    except StopAsyncIteration:
                        state.on_success()
                        return None, NO_SESSION, NOTHING
                    except BaseException as exc:
                        delay = state.on_error(exc)
                        if delay is None:
                            raise
                    else:
                        state.on_success()
                        return agen, NO_SESSION, first
                    if delay > 0:
                        await asleep(delay)
            finally:
                if after is not None:
                    after(state)

        return async_driver(first_item)

    def attempts(self) -> _Attempts:
        """The loop form, for blocks of code rather than functions.

        ``for attempt in policy.attempts(): with attempt: ...`` in sync code and
        ``async for attempt in policy.attempts(): async with attempt: ...`` (or
        ``with attempt:``) in async code. The hooks run as in the decorators.
        """
        return _Attempts(self)

    def snapshot(self) -> dict[str, Any]:
        counts = {
            "retries": self._retries.value,
            "gave_up": self._gave_up.value,
            "recovered": self._recovered.value,
        }
        out: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "attempts": self.max_attempts,
            "deadline": self.deadline,
            **counts,
        }
        if self.budget is not None:
            out["budget"] = self.budget.snapshot()
        return out


class Attempt:
    """One attempt of the ``attempts()`` loop; use it as ``with attempt: ...``.

    Attributes:
        number: 1 for the first attempt, 2 for the first retry, ...
    """

    __slots__ = ("_loop", "number")

    @property
    def next_wait(self) -> float | None:
        """Seconds the loop will wait before the next attempt if this one fails, or
        ``None`` if this is the last attempt (see :meth:`RetryState.next_delay`)."""
        return self._loop._state.next_delay()

    def __init__(self, loop: _Attempts, number: int) -> None:
        self._loop = loop
        self.number = number

    def __enter__(self) -> Attempt:
        self._loop._entered = True
        return self

    def __exit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> bool:
        loop = self._loop
        if exc is None:
            loop._finished = True
            loop._state.on_success()
            loop._after()
            return False
        delay = loop._state.on_error(exc)
        if delay is None:
            loop._finished = True
            loop._after()
            return False
        loop._pending = delay
        return True

    # ``async with attempt:`` does the same: entering and leaving an attempt never waits
    # (the loop's ``__anext__`` does the sleeping).
    async def __aenter__(self) -> Attempt:
        return self.__enter__()

    async def __aexit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> bool:
        return self.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"<Attempt {self.number}>"


class _Attempts:
    """The iterator behind ``for attempt in r.attempts()`` and ``async for``."""

    __slots__ = ("_entered", "_finished", "_pending", "_policy", "_state")

    def __init__(self, policy: Retry) -> None:
        self._policy = policy
        self._state = policy.start()
        self._pending: float | None = None
        self._finished = False
        self._entered = True  # so that the first __next__ proceeds

    def _advance(self) -> Attempt:
        if self._finished or not self._entered:
            raise StopIteration
        self._entered = False
        before = self._policy.before_attempt
        if before is not None:
            before(self._state)
        return Attempt(self, self._state.attempt)

    def _after(self) -> None:
        after = self._policy.after_call
        if after is not None:
            after(self._state)

    def __iter__(self) -> Iterator[Attempt]:
        return self

    def __next__(self) -> Attempt:
        if self._pending is not None:
            delay, self._pending = self._pending, None
            if delay > 0:
                self._policy._clock.sleep(delay)
        return self._advance()

    def __aiter__(self) -> _Attempts:
        return self

    async def __anext__(self) -> Attempt:
        if self._pending is not None:
            delay, self._pending = self._pending, None
            if delay > 0:
                await self._policy._clock.asleep(delay)
        try:
            return self._advance()
        except StopIteration:
            raise StopAsyncIteration from None


retry = Retry
"""Build a retry policy: ``retry(3, on=ConnectionError)`` (the same as :class:`Retry`)."""
