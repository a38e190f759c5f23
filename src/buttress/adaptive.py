"""Adaptive bulkhead: a concurrency limit that finds itself from latency and errors.

:class:`AdaptiveBulkhead` is a :class:`~buttress.Bulkhead` whose ``max_concurrent``
is not configured but estimated. Every call that reaches the dependency produces a
*sample* (its round-trip time, the concurrency it started under, whether it failed);
a limit algorithm turns the samples into a new limit. The waiting machinery (FIFO
hand-off, bounded queue, ``max_wait``, deadlines, cancellation) is the bulkhead's own;
only the release path changes: a freed slot is handed on only while the number in
flight is under the *current* limit, and a limit that grows admits the queue's head
at once.

Two algorithms are built in (both keep the limit a float within ``[min, max]``; the
number of slots is its integer part):

- :class:`AIMD`: additive increase by ``increase`` per round trip of successful calls,
  multiplicative decrease by ``backoff`` on an error (or a call slower than
  ``latency_threshold``), at most once per round trip.
- :class:`Gradient`: compares each call's round-trip time with the no-load
  round-trip time (the fastest seen). Without queueing (``rtt <= tolerance x
  rtt_noload``) the limit grows by a queue allowance (``sqrt(limit)`` by default)
  per round trip; with queueing it moves towards ``concurrency x rtt_noload x
  tolerance / rtt`` (never less than half the concurrency that produced the sample),
  smoothed. An error counts as the steepest gradient (one half).

The arithmetic lives in the algorithms, which are pure functions of the sample and
the estimates; all state changes happen under the bulkhead's lock, in the same
critical section that releases the slot.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from ._deadline import remaining
from ._drivers import guard_async_io, guard_sync
from ._policy import PolicyOptions
from ._validate import (
    ExceptionSpec,
    check_bool,
    check_exception_filter,
    check_int,
    check_number,
    check_seconds,
)
from .bulkhead import Bulkhead, BulkheadPermit, LocalBulkhead
from .events import LimitChanged  # defined in buttress.events; importable here too
from .exceptions import ConfigTypeError, ConfigValueError, RejectedError

__all__ = ["AIMD", "AdaptiveBulkhead", "AdaptivePermit", "Gradient", "LimitChanged", "Sample"]

if TYPE_CHECKING:
    from typing_extensions import Unpack


# -- events --------------------------------------------------------------------------------


# -- samples and estimates -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One call's outcome as the limit algorithm sees it.

    Attributes:
        rtt: seconds the call took (from admission to completion).
        in_flight: calls in flight when it was admitted (itself included).
        dropped: the call failed (an error, or a timeout that counts as one).
        stale: the call was admitted before the last decrease of the limit, so the
            congestion it reports has already been reacted to.
    """

    rtt: float
    in_flight: int
    dropped: bool
    stale: bool = False


class Estimates:
    """Latency estimates kept per bulkhead (mutated under its lock only)."""

    __slots__ = ("rtt_avg", "rtt_last", "rtt_noload")

    def __init__(self) -> None:
        self.rtt_noload: float | None = None
        self.rtt_avg: float | None = None
        self.rtt_last: float | None = None

    def observe(self, sample: Sample) -> None:
        rtt = sample.rtt
        self.rtt_last = rtt
        self.rtt_avg = rtt if self.rtt_avg is None else self.rtt_avg + 0.1 * (rtt - self.rtt_avg)
        # A failed call may have failed fast: it says nothing about the no-load latency.
        if not sample.dropped and (self.rtt_noload is None or rtt < self.rtt_noload):
            self.rtt_noload = rtt


# -- algorithms ----------------------------------------------------------------------------

# What an algorithm returns besides the new limit: why it moved (for the event).
INCREASE, HOLD, LATENCY, ERROR = "increase", "hold", "latency", "error"


@dataclass(frozen=True, slots=True)
class AIMD:
    """Additive increase, multiplicative decrease (the TCP congestion-avoidance rule).

    Args:
        increase: slots added per round trip of successful calls (default 1.0, > 0);
            each sample adds ``increase / limit``.
        backoff: factor applied to the limit on an error (default 0.5, as in TCP; 0 < backoff
            < 1). The limit decreases at most once per round trip, so a halving is one
            reaction to one window of failing calls.
        latency_threshold: if given, a call slower than this many seconds counts as an
            error (default ``None``: only errors decrease the limit).
    """

    name: ClassVar[str] = "aimd"

    increase: float = 1.0
    backoff: float = 0.5
    latency_threshold: float | None = None

    def __post_init__(self) -> None:
        check_number("increase", self.increase, min_value=0.0, min_inclusive=False)
        check_number(
            "backoff",
            self.backoff,
            min_value=0.0,
            max_value=1.0,
            min_inclusive=False,
            max_inclusive=False,
        )
        check_seconds("latency_threshold", self.latency_threshold, allow_none=True)

    def next_limit(self, limit: float, sample: Sample, estimates: Estimates) -> tuple[float, str]:
        """The new (unclamped) limit after ``sample``, and why it moved."""
        threshold = self.latency_threshold
        slow = threshold is not None and sample.rtt > threshold
        if sample.dropped or slow:
            if sample.stale:
                return limit, HOLD
            return limit * self.backoff, ERROR if sample.dropped else LATENCY
        if sample.in_flight * 2 < limit:
            return limit, HOLD  # the callers do not use the limit: no evidence it can grow
        return limit + self.increase / limit, INCREASE


@dataclass(frozen=True, slots=True)
class Gradient:
    """Track the no-load latency and keep queueing at the dependency small.

    Args:
        tolerance: how much slower than the no-load round trip a call may be before it
            counts as queueing (default 1.5, >= 1).
        smoothing: share of the gap to the target closed per queueing sample (default
            0.2, 0 < smoothing <= 1); one outlier costs at most ``smoothing / 2`` of the limit.
        queue_allowance: slots added per round trip without queueing (default ``None``:
            ``sqrt(limit)``, so small limits grow cautiously and big ones quickly).
    """

    name: ClassVar[str] = "gradient"

    tolerance: float = 1.5
    smoothing: float = 0.2
    queue_allowance: float | None = None

    def __post_init__(self) -> None:
        check_number("tolerance", self.tolerance, min_value=1.0)
        check_number("smoothing", self.smoothing, min_value=0.0, max_value=1.0, min_inclusive=False)
        if self.queue_allowance is not None:
            check_number("queue_allowance", self.queue_allowance, min_value=0.0)

    def next_limit(self, limit: float, sample: Sample, estimates: Estimates) -> tuple[float, str]:
        """The new (unclamped) limit after ``sample``, and why it moved."""
        noload = estimates.rtt_noload
        if sample.dropped:
            gradient = 0.5
        elif noload is None or sample.rtt <= 0.0:
            gradient = 1.0
        else:
            gradient = min(max(self.tolerance * noload / sample.rtt, 0.5), 1.0)
        if gradient < 1.0:
            # The sample queued: the concurrency it ran under was too high by `gradient`.
            # Aim below that concurrency (not below the current limit), so the calls that
            # were admitted under an old, higher limit do not push the limit down again.
            target = sample.in_flight * gradient
            if target >= limit:
                return limit, HOLD
            return limit + self.smoothing * (target - limit), ERROR if sample.dropped else LATENCY
        if sample.in_flight * 2 < limit:
            return limit, HOLD
        allowance = math.sqrt(limit) if self.queue_allowance is None else self.queue_allowance
        return limit + allowance / limit, INCREASE

    def rebaseline(self, estimates: Estimates, sample: Sample) -> None:
        """The limit is at its floor and calls still queue: the floor moved, follow it.

        With as few calls in flight as allowed, what is measured *is* the no-load
        latency; a dependency that got slower for good is accepted this way instead of
        pinning the limit at ``min`` forever.
        """
        noload = estimates.rtt_noload
        if noload is not None and not sample.dropped and sample.rtt > noload:
            estimates.rtt_noload = noload + self.smoothing * (sample.rtt - noload)


Algorithm = AIMD | Gradient

_ALGORITHMS: dict[str, Callable[[], Algorithm]] = {"aimd": AIMD, "gradient": Gradient}


def _check_algorithm(value: object) -> Algorithm:
    if isinstance(value, (AIMD, Gradient)):
        return value
    if isinstance(value, str):
        factory = _ALGORITHMS.get(value)
        if factory is None:
            raise ConfigValueError(
                f"algorithm must be one of {tuple(_ALGORITHMS)!r} or an AIMD/Gradient "
                f"instance, got {value!r}"
            )
        return factory()
    raise ConfigTypeError(
        f"algorithm must be 'aimd', 'gradient' or an AIMD/Gradient instance, "
        f"got {value!r} ({type(value).__name__})"
    )


# -- the bulkhead --------------------------------------------------------------------------

# What a running call remembers: when it was admitted, the decrease epoch then, and the
# number in flight then (itself included).
_Token = tuple[float, int, int]

_SUCCESS, _DROPPED, _NEUTRAL, _TIMEOUT = 0, 1, 2, 3


class _AdaptiveSlots(LocalBulkhead):
    """In-process slots under a limit that moves (``max_concurrent`` is set under the lock)."""

    __slots__ = ()

    def release_locked(self) -> None:
        # Unlike a fixed bulkhead, a freed slot is not always passed on: after a decrease,
        # more calls may be in flight than the limit allows, and the queue waits for them.
        # After an increase, one release may admit several waiters.
        self.in_flight -= 1
        waiters = self.waiters
        while waiters and self.in_flight < self.max_concurrent:
            waiter = waiters.popleft()
            waiter.granted = True
            waiter.wake()
            self.in_flight += 1


class AdaptivePermit(BulkheadPermit):
    """A slot of an :class:`AdaptiveBulkhead`: how it is settled feeds the algorithm
    (``success(duration)`` a latency sample, ``failure(exc)`` an error unless ``exc`` is
    neutral, ``release()`` nothing)."""

    __slots__ = ()

    def _settle(self, exc: BaseException | None, duration: float | None, *, failed: bool) -> None:
        bulkhead = self.bulkhead
        assert isinstance(bulkhead, AdaptiveBulkhead)
        bulkhead._finish(self.lease, exc, duration=duration, failed=failed)  # type: ignore[arg-type]

    async def _settle_async(
        self, exc: BaseException | None, duration: float | None, *, failed: bool
    ) -> None:
        self._settle(exc, duration, failed=failed)


class AdaptiveBulkhead(Bulkhead):
    """A bulkhead whose concurrency limit adapts to the dependency's latency and errors.

    Args:
        name: registers the bulkhead (``state()``, ``health()``).
        initial: the limit to start with (default 10; ``min <= initial <= max``).
        min: the limit never goes below this (default 1, >= 1).
        max: the limit never goes above this (default 200).
        algorithm: ``"gradient"`` (default), ``"aimd"``, or a configured :class:`Gradient`
            or :class:`AIMD`.
        max_queue: callers allowed to wait for a slot, served first come first served
            (default 0: reject at once when every slot is taken).
        max_wait: seconds a queued caller waits at most (default ``None``: as long as it
            takes, but never past an enclosing ``timeout``'s deadline).
        include: errors that count as errors and decrease the limit (default
            ``Exception``): exception classes, predicates ``exc -> bool``, or a tuple or
            list of them; others are neutral.
        exclude: errors that are neutral (neither a success nor an error), in the same
            forms as ``include``.
            Rejections by other buttress primitives (:class:`RejectedError`) and
            cancellation are always neutral: those calls never got an answer from the
            dependency, so they say nothing about it.
        timeouts_are_errors: a call that times out (``TimeoutError``, including
            :class:`~buttress.TimeoutExceeded`, or cancellation by an expired enclosing
            deadline) counts as an error (default ``True``); with ``False`` it counts as
            a latency sample of the time it took.
        **options: ``listeners``, ``registry`` and ``clock``, as for every policy
            (:class:`~buttress.Policy`).
    """

    kind = "adaptive_bulkhead"

    def __init__(
        self,
        name: str | None = None,
        *,
        initial: int = 10,
        min: int = 1,
        max: int = 200,
        algorithm: str | AIMD | Gradient = "gradient",
        max_queue: int = 0,
        max_wait: float | timedelta | None = None,
        include: ExceptionSpec = Exception,
        exclude: ExceptionSpec = (),
        timeouts_are_errors: bool = True,
        **options: Unpack[PolicyOptions],
    ) -> None:
        lowest = check_int("min", min)
        highest = check_int("max", max)
        if highest < lowest:
            raise ConfigValueError(f"max must be >= min ({lowest}), got {max!r}")
        start = check_int("initial", initial)
        if not lowest <= start <= highest:
            raise ConfigValueError(
                f"initial must be between min ({lowest}) and max ({highest}), got {initial!r}"
            )
        self.min_limit = lowest
        self.max_limit = highest
        self.algorithm: Algorithm = _check_algorithm(algorithm)
        self.include = check_exception_filter("include", include)
        self.exclude = check_exception_filter("exclude", exclude, allow_empty=True)
        self.timeouts_are_errors = check_bool("timeouts_are_errors", timeouts_are_errors)
        self._limit_estimate = float(start)
        self._limit_now = start
        self._epoch = 0  # bumped by every decrease
        self._estimates = Estimates()
        self._successes = 0
        self._errors = 0
        self._neutral = 0
        self._increases = 0
        self._decreases = 0
        self._built = False
        # Validates max_queue and max_wait, builds the lock, the queue and the counters,
        # and registers; the limit arrives through the max_concurrent setter below.
        super().__init__(
            name,
            max_concurrent=start,
            max_queue=max_queue,
            max_wait=max_wait,
            **options,
        )
        self._built = True

    # -- the limit --------------------------------------------------------------------------

    @property
    def max_concurrent(self) -> int:
        """The current limit (what the bulkhead's admission checks compare against)."""
        return self._limit_now

    @max_concurrent.setter
    def max_concurrent(self, value: int) -> None:
        if self._built:
            raise AttributeError(
                "an AdaptiveBulkhead's limit is set by its algorithm; read `limit` instead"
            )
        self._limit_now = value

    @property
    def limit(self) -> int:
        """Calls allowed in flight right now."""
        return self._limit_now

    def _local_slots(self) -> LocalBulkhead:
        return _AdaptiveSlots(self)

    def _permit(self, lease: object) -> BulkheadPermit:
        return AdaptivePermit(self, self._admitted())

    def _sample_locked(self, sample: Sample) -> tuple[int, int, str] | None:
        """Feed one sample to the algorithm (lock held); ``(old, new, reason)`` on a change."""
        self._estimates.observe(sample)
        if sample.dropped:
            self._errors += 1
        else:
            self._successes += 1
        old_estimate = self._limit_estimate
        estimate, reason = self.algorithm.next_limit(old_estimate, sample, self._estimates)
        lowest, highest = self.min_limit, self.max_limit
        if estimate < lowest:
            estimate = float(lowest)
        elif estimate > highest:
            estimate = float(highest)
        if estimate < old_estimate:
            self._epoch += 1
            self._decreases += 1
        elif estimate > old_estimate:
            self._increases += 1
        if isinstance(self.algorithm, Gradient) and estimate <= lowest:
            self.algorithm.rebaseline(self._estimates, sample)
        self._limit_estimate = estimate
        old, new = self._limit_now, int(estimate)
        if new == old:
            return None
        self._limit_now = new
        core = self._local
        assert core is not None
        core.max_concurrent = new
        return old, new, reason

    # -- outcomes ---------------------------------------------------------------------------

    def _classify(self, exc: BaseException | None) -> int:
        if exc is None:
            return _SUCCESS
        if isinstance(exc, asyncio.CancelledError):
            left = remaining()
            # Cancelled by an enclosing timeout whose deadline passed: a timeout. Any
            # other cancellation is the caller's business.
            return _TIMEOUT if left is not None and left <= 0.0 else _NEUTRAL
        if not isinstance(exc, Exception) or isinstance(exc, RejectedError):
            return _NEUTRAL
        if isinstance(exc, TimeoutError):
            return _TIMEOUT
        if self.exclude(exc) or not self.include(exc):
            return _NEUTRAL
        return _DROPPED

    def _admitted(self) -> _Token:
        """What a call remembers once admitted (read right after acquiring)."""
        return self._clock.now(), self._epoch, self.in_flight

    def _finish(
        self,
        token: _Token,
        exc: BaseException | None,
        *,
        duration: float | None = None,
        failed: bool = False,
    ) -> None:
        """Record the call's outcome and give its slot back, in one critical section."""
        started, epoch, in_flight = token
        outcome = _DROPPED if failed and exc is None else self._classify(exc)
        if outcome == _TIMEOUT:
            outcome = _DROPPED if self.timeouts_are_errors else _SUCCESS
        rtt = self._clock.now() - started if duration is None else duration
        changed = None
        core = self._local
        assert core is not None
        with self._lock:
            if outcome == _NEUTRAL:
                self._neutral += 1
            else:
                sample = Sample(
                    rtt=rtt if rtt > 0.0 else 0.0,
                    in_flight=in_flight,
                    dropped=outcome == _DROPPED,
                    stale=epoch < self._epoch,
                )
                changed = self._sample_locked(sample)
            # Releasing after the update lets a grown limit admit several waiters at once.
            core.release_locked()
        if changed is not None:
            old, new, reason = changed
            self.emit(LimitChanged, old=old, new=new, reason=reason)

    # -- drivers ----------------------------------------------------------------------------

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return guard_sync(fn, self._enter, self._finish)

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return guard_async_io(fn, self._enter_async, self._finish_async)

    def _enter(self) -> _Token:
        self._take()
        return self._admitted()

    async def _enter_async(self) -> _Token:
        await self._take_async()
        return self._admitted()

    async def _finish_async(self, token: _Token, exc: BaseException | None) -> None:
        self._finish(token, exc)

    # -- state views ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            estimates = self._estimates
            return {
                "kind": self.kind,
                "name": self.name,
                "algorithm": self.algorithm.name,
                "limit": self._limit_now,
                "limit_estimate": self._limit_estimate,
                "min": self.min_limit,
                "max": self.max_limit,
                "max_queue": self.max_queue,
                "max_wait": self.max_wait,
                "in_flight": self.in_flight,
                "queued": self.queued,
                "available": max(self._limit_now - self.in_flight, 0),
                "accepted": self._accepted,
                "rejected": self._rejected,
                "timed_out": self._timed_out,
                "successes": self._successes,
                "errors": self._errors,
                "neutral": self._neutral,
                "increases": self._increases,
                "decreases": self._decreases,
                "rtt_noload": estimates.rtt_noload,
                "rtt_avg": estimates.rtt_avg,
                "rtt_last": estimates.rtt_last,
            }

    def health_check(self) -> tuple[str, Any, str]:
        with self._lock:
            in_flight, queued, limit = self.in_flight, self.queued, self._limit_now
        observed = {"in_flight": in_flight, "queued": queued, "limit": limit}
        if in_flight >= limit:
            return "warn", observed, "adaptive bulkhead saturated: every slot is busy"
        return "pass", observed, ""

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name is not None else ""
        return f"<AdaptiveBulkhead{label} limit={self._limit_now} in_flight={self.in_flight}>"
