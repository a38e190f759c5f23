"""Circuit breaker: stop calling a dependency that keeps failing, probe it, recover.

The state machine is one lock-guarded object with a permission protocol:
``_acquire()`` returns a token (the generation of the state that admitted the
call) or raises :class:`CircuitOpenError`; ``_on_success(token, duration)`` and
``_on_failure(token, exc, duration)`` report the outcome. The decorator's sync
and async wrappers and the context managers are thin drivers over those three
calls. An outcome whose token belongs to an older generation (the state moved
on while the call ran) updates the counters but never moves the state.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from . import events as _events
from ._counter import GIL_ENABLED, Counter
from ._deadline import remaining
from ._policy import Policy, cm_pop, cm_push
from ._validate import (
    check_exception_types,
    check_int,
    check_number,
    check_seconds,
    require_seconds,
)
from .clock import Clock
from .exceptions import CircuitOpenError, ConfigTypeError, ConfigValueError, RejectedError
from .registry import Registry

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "CircuitBreaker"]


def _deadline_expired() -> bool:
    left = remaining()
    return left is not None and left <= 0.0


CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker(Policy):
    """A circuit breaker.

    Args:
        name: registers the breaker (``state()``, ``health()``).
        failure_threshold: consecutive failures that open the circuit (default 5), used
            when ``failure_rate`` is ``None``.
        reset_timeout: seconds the circuit stays open before half-open probes (default 30).
        half_open_max_calls: concurrent probes allowed while half-open (default 1).
        failure_rate: if given (0 < rate <= 1), open when the failure rate over the last
            ``window`` calls reaches it, once ``minimum_calls`` calls were recorded.
        window: number of most recent calls in the failure-rate window (default 100).
        minimum_calls: calls needed before the failure rate is judged (default 10).
        slow_call_duration: if given, a success slower than this (seconds) counts as a failure.
        exclude: exceptions that pass through as neutral (neither success nor failure).
        include: exceptions that count as failures (default ``Exception``); others are neutral.
            Rejections by other buttress primitives (:class:`RejectedError`) and
            cancellation are always neutral: those calls never reached the dependency.
        store: shared state backend, e.g. a
            :class:`~buttress.backends.redis.RedisBreakerStore` (the breaker then needs a
            name); ``None`` (default) keeps the state in this process.
        listeners: event listeners for this breaker only.
        registry: registry to join instead of the default one.
        clock: time source (default: the system clock).
    """

    kind = "circuit_breaker"

    def __init__(
        self,
        name: str | None = None,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 30.0,
        half_open_max_calls: int = 1,
        failure_rate: float | None = None,
        window: int = 100,
        minimum_calls: int = 10,
        slow_call_duration: float | None = None,
        exclude: type[BaseException] | tuple[type[BaseException], ...] = (),
        include: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        store: object = None,
        listeners: Iterable[_events.Listener] | None = None,
        registry: Registry | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(name=name, listeners=listeners, registry=registry, clock=clock)
        self.failure_threshold = check_int("failure_threshold", failure_threshold)
        seconds = require_seconds("reset_timeout", reset_timeout)
        self.reset_timeout = seconds
        self.half_open_max_calls = check_int("half_open_max_calls", half_open_max_calls)
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
        self.exclude = check_exception_types("exclude", exclude, allow_empty=True)
        self.include = check_exception_types("include", include)
        self._lock = threading.Lock()
        self._state = CLOSED
        self._gen = 0
        # The generation while closed, else None: the one attribute the hot path reads.
        self._closed_token: int | None = 0
        self._forced = False
        self._half_open_at = 0.0
        self._probes = 0
        self._consecutive = 0
        self._ring = bytearray(self.window) if self.failure_rate is not None else bytearray()
        self._ring_pos = 0
        self._ring_len = 0
        self._ring_failures = 0
        self._successes = 0  # successes recorded under the lock
        self._fast_successes = Counter()  # successes recorded lock-free on the hot path
        self._failures = 0
        self._slow_calls = 0
        self._neutral = 0
        self._rejections = 0
        self._timed = self.slow_call_duration is not None
        # A closed, consecutive-mode breaker with no failure streak records a success with
        # one atomic increment and no lock (see _counter); anything else takes the lock.
        self._lock_free_success = GIL_ENABLED and not self._ring and not self._timed
        self._shared: Any = None
        if store is not None:
            bind = getattr(store, "bind", None)
            if not callable(bind) or not hasattr(store, "backend"):
                raise ConfigTypeError(
                    f"store must be a breaker store such as "
                    f"buttress.backends.redis.RedisBreakerStore, got {store!r}"
                )
            self._shared = bind(self)
        self._register()

    # -- the permission protocol -----------------------------------------------------------

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` (an expired open reads as half-open).

        With a shared store this reads the shared state (one round trip)."""
        shared = self._shared
        if shared is not None and not shared.gate.degraded:
            shared.refresh()
            expired = shared.open_until <= self._clock.now()
            if shared.state == OPEN and not shared.forced and expired:
                return HALF_OPEN
            return str(shared.state)
        with self._lock:
            if self._state == OPEN and not self._forced and self._clock.now() >= self._half_open_at:
                return HALF_OPEN
            return self._state

    def _acquire(self) -> int:
        token = self._closed_token
        if token is not None:
            return token
        changed = None
        with self._lock:
            if self._state == OPEN:
                left = self._half_open_at - self._clock.now()
                if self._forced or left > 0:
                    self._rejections += 1
                    retry_after = None if self._forced else left
                    reject = CircuitOpenError(
                        f"{self._label()} is open",
                        retry_after=retry_after,
                        name=self.name,
                    )
                else:
                    changed = self._transition(HALF_OPEN, "reset timeout elapsed")
                    reject = None
            else:
                reject = None
            if reject is None:
                if self._state == CLOSED:
                    token = self._gen
                elif self._probes < self.half_open_max_calls:
                    self._probes += 1
                    token = self._gen
                else:
                    self._rejections += 1
                    reject = CircuitOpenError(
                        f"{self._label()} is half-open and its probe slots are taken",
                        retry_after=None,
                        name=self.name,
                    )
        if changed is not None:
            self.emit(_events.CircuitStateChanged, **changed)
        if reject is not None:
            self.emit(_events.CallRejected, reason="circuit_open", retry_after=reject.retry_after)
            raise reject
        assert token is not None
        return token

    def _label(self) -> str:
        return "circuit breaker" if self.name is None else f"circuit breaker {self.name!r}"

    def _on_success(self, token: int, duration: float = 0.0) -> None:
        if self._timed and duration >= self.slow_call_duration:  # type: ignore[operator]
            self._on_failure(token, None, duration)
            return
        with self._lock:
            self._successes += 1
            if token == self._closed_token and not self._ring:
                self._consecutive = 0
                return
            # Failure-rate mode, half-open probes and stale tokens: a success can still
            # open the circuit when it brings the window up to minimum_calls.
            changed = self._settle(token, failed=False)
        if changed is not None:
            self.emit(_events.CircuitStateChanged, **changed)

    def _on_failure(self, token: int, exc: BaseException | None, duration: float = 0.0) -> None:
        if isinstance(exc, asyncio.CancelledError) and _deadline_expired():
            # Cancelled by an enclosing timeout whose deadline passed: the dependency was
            # too slow, which is a failure (with `timeout` outermost in a pipeline, a
            # hanging dependency must still open the circuit). Any other cancellation
            # is the caller's business and stays neutral.
            exc = None
        if exc is not None and self._is_neutral(exc):
            # Neutral: cancellation, excluded and non-included errors are neither outcome,
            # and so is a rejection by another primitive (an inner bulkhead or limiter):
            # that call never reached the dependency. A half-open probe gives its slot back.
            with self._lock:
                self._neutral += 1
                if self._state == HALF_OPEN and token == self._gen and self._probes > 0:
                    self._probes -= 1
            return
        with self._lock:
            self._failures += 1
            if exc is None:  # a slow success, or a call cut off by an expired deadline
                self._slow_calls += 1
            changed = self._settle(token, failed=True)
        if changed is not None:
            self.emit(_events.CircuitStateChanged, **changed)

    def _is_neutral(self, exc: BaseException) -> bool:
        return (
            not isinstance(exc, self.include)
            or isinstance(exc, self.exclude)
            or not isinstance(exc, Exception)
            or isinstance(exc, RejectedError)
        )

    def _outcome(self, exc: BaseException | None, duration: float) -> str:
        """Classify a finished call: ``"s"`` success, ``"f"`` failure, ``"n"`` neutral.

        Books this process's counters; the shared store decides what the outcome does."""
        if exc is None:
            if self._timed and duration >= self.slow_call_duration:  # type: ignore[operator]
                with self._lock:
                    self._failures += 1
                    self._slow_calls += 1
                return "f"
            return "s"
        if isinstance(exc, asyncio.CancelledError) and _deadline_expired():
            with self._lock:
                self._failures += 1
                self._slow_calls += 1
            return "f"
        neutral = self._is_neutral(exc)
        with self._lock:
            if neutral:
                self._neutral += 1
            else:
                self._failures += 1
        return "n" if neutral else "f"

    # -- shared state (a store) -------------------------------------------------------------

    def _shared_done(self, token: int, exc: BaseException | None, duration: float) -> Any:
        """Report an outcome to the shared store; returns script arguments still to send."""
        shared = self._shared
        local = shared._local(token)
        if local is not None:  # admitted by the in-process fallback ("local" mode)
            if exc is None:
                self._on_success(local, duration)
            else:
                self._on_failure(local, exc, duration)
            return None
        outcome = self._outcome(exc, duration)
        if outcome == "s":
            return shared.success(token)
        return shared.failure(token, outcome)

    def _wrap_shared_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        shared, done, now = self._shared, self._shared_done, self._clock.now

        def guarded(*args: Any, **kwargs: Any) -> Any:
            token = shared.acquire()
            started = now()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                pending = done(token, exc, now() - started)
                if pending is not None:
                    shared.send(pending)
                raise
            pending = done(token, None, now() - started)
            if pending is not None:
                shared.send(pending)
            return result

        return guarded

    def _wrap_shared_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        shared, done, now = self._shared, self._shared_done, self._clock.now

        async def guarded(*args: Any, **kwargs: Any) -> Any:
            token = await shared.acquire_async()
            started = now()
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                pending = done(token, exc, now() - started)
                if pending is not None:
                    await shared.asend(pending)
                raise
            pending = done(token, None, now() - started)
            if pending is not None:
                await shared.asend(pending)
            return result

        return guarded

    # -- state machine internals (called with the lock held) ------------------------------

    def _record(self, failed: int) -> bool:
        """Add an outcome to the failure-rate window; True if the circuit should open."""
        ring = self._ring
        pos = self._ring_pos
        if self._ring_len == self.window:
            self._ring_failures -= ring[pos]
        else:
            self._ring_len += 1
        ring[pos] = failed
        self._ring_failures += failed
        self._ring_pos = (pos + 1) % self.window
        return (
            self._ring_len >= self.minimum_calls
            and self._ring_failures >= self.failure_rate * self._ring_len  # type: ignore[operator]
        )

    def _settle(self, token: int, *, failed: bool) -> dict[str, str] | None:
        if token != self._gen or self._forced:
            return None  # the state moved on while this call ran
        if self._state == CLOSED:
            if self._ring:
                if self._record(1 if failed else 0):
                    return self._transition(OPEN, "failure rate reached")
                return None
            if failed:
                self._consecutive += 1
                if self._consecutive >= self.failure_threshold:
                    return self._transition(OPEN, "failure threshold reached")
            else:
                self._consecutive = 0
            return None
        if self._state == HALF_OPEN:
            if failed:
                return self._transition(OPEN, "probe failed")
            return self._transition(CLOSED, "probe succeeded")
        return None

    def _transition(self, new: str, reason: str) -> dict[str, str] | None:
        old = self._state
        if old == new:
            return None
        self._state = new
        self._gen += 1
        self._probes = 0
        if new == OPEN:
            # The deadline itself, not "now - opened_at >= reset_timeout": that difference
            # can round to just below reset_timeout when the clock reads exactly the deadline.
            self._half_open_at = self._clock.now() + self.reset_timeout
        if new == CLOSED:
            self._consecutive = 0
            self._ring_pos = self._ring_len = self._ring_failures = 0
            self._forced = False
        self._closed_token = self._gen if new == CLOSED else None
        return {"old": old, "new": new, "reason": reason}

    # -- operator controls ------------------------------------------------------------------

    def open(self) -> None:
        """Force the circuit open until :meth:`close` or :meth:`reset` (no half-open probes).

        With a shared store, every process sees it."""
        if self._shared is not None:
            self._shared.control("open")
        with self._lock:
            changed = self._transition(OPEN, "forced open")
            self._forced = True
        if changed is not None:
            self.emit(_events.CircuitStateChanged, **changed)

    def close(self) -> None:
        """Close the circuit and forget the recent outcomes (in every process, with a store)."""
        if self._shared is not None:
            self._shared.control("close")
        with self._lock:
            self._forced = False
            changed = self._transition(CLOSED, "forced closed")
            # already closed: no transition, but the streak and window are still forgotten
            self._consecutive = 0
            self._ring_pos = self._ring_len = self._ring_failures = 0
        if changed is not None:
            self.emit(_events.CircuitStateChanged, **changed)

    def reset(self) -> None:
        """Close the circuit and zero every counter."""
        self.close()
        with self._lock:
            self._successes = self._failures = self._slow_calls = 0
            self._neutral = self._rejections = 0
            self._fast_successes.reset()

    # -- drivers ----------------------------------------------------------------------------

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self._shared is not None:
            return self._wrap_shared_sync(fn)
        acquire, on_success, on_failure = self._acquire, self._on_success, self._on_failure
        if self._lock_free_success:
            count = self._fast_successes.incr

            def guarded_fast(*args: Any, **kwargs: Any) -> Any:
                token = self._closed_token
                if token is None:
                    token = acquire()
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    on_failure(token, exc)
                    raise
                # Reading the streak without the lock is safe: a success racing with a
                # failure may be ordered before it, which is a valid interleaving.
                if token == self._closed_token and not self._consecutive:
                    count()
                else:
                    on_success(token)
                return result

            return guarded_fast
        if self._timed:
            now = self._clock.now

            def timed(*args: Any, **kwargs: Any) -> Any:
                token = acquire()
                started = now()
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    on_failure(token, exc, now() - started)
                    raise
                on_success(token, now() - started)
                return result

            return timed

        def guarded(*args: Any, **kwargs: Any) -> Any:
            token = acquire()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                on_failure(token, exc)
                raise
            on_success(token)
            return result

        return guarded

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self._shared is not None:
            return self._wrap_shared_async(fn)
        acquire, on_success, on_failure = self._acquire, self._on_success, self._on_failure
        if self._lock_free_success:
            count = self._fast_successes.incr

            async def guarded_fast(*args: Any, **kwargs: Any) -> Any:
                token = self._closed_token
                if token is None:
                    token = acquire()
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    on_failure(token, exc)
                    raise
                if token == self._closed_token and not self._consecutive:
                    count()
                else:
                    on_success(token)
                return result

            return guarded_fast
        now = self._clock.now
        timed = self._timed

        async def guarded(*args: Any, **kwargs: Any) -> Any:
            token = acquire()
            started = now() if timed else 0.0
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                on_failure(token, exc, now() - started if timed else 0.0)
                raise
            on_success(token, now() - started if timed else 0.0)
            return result

        return guarded

    def __enter__(self) -> CircuitBreaker:
        token = self._shared.acquire() if self._shared is not None else self._acquire()
        cm_push(self, (token, self._clock.now()))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, started = cm_pop(self)
        duration = self._clock.now() - started
        if self._shared is not None:
            pending = self._shared_done(token, exc, duration)
            if pending is not None:
                self._shared.send(pending)
            return
        if exc is None:
            self._on_success(token, duration)
        else:
            self._on_failure(token, exc, duration)

    async def __aenter__(self) -> CircuitBreaker:
        if self._shared is None:
            return self.__enter__()
        token = await self._shared.acquire_async()
        cm_push(self, (token, self._clock.now()))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._shared is None:
            self.__exit__(exc_type, exc, tb)
            return
        token, started = cm_pop(self)
        pending = self._shared_done(token, exc, self._clock.now() - started)
        if pending is not None:
            await self._shared.asend(pending)

    # -- state views ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        if self._shared is not None:
            return self._shared_snapshot()
        return self._local_snapshot()

    def _shared_snapshot(self) -> dict[str, Any]:
        shared = self._shared
        out = self._local_snapshot()
        if not shared.gate.degraded:
            shared.refresh()
            out.update(
                {k: v for k, v in shared.last.items() if k not in ("generation",)},
            )
            out["state"] = self.state
            out["seconds_until_half_open"] = (
                max(shared.open_until - self._clock.now(), 0.0)
                if shared.state == OPEN and not shared.forced
                else None
            )
        out["store"] = shared.snapshot()
        return out

    def _local_snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = self._clock.now()
            state = self._state
            until: float | None = None
            if state == OPEN and not self._forced:
                until = max(self._half_open_at - now, 0.0)
                if until == 0.0:
                    state = HALF_OPEN
            successes = self._successes + self._fast_successes.value
            rate = self._ring_failures / self._ring_len if self._ring and self._ring_len else None
            return {
                "kind": self.kind,
                "name": self.name,
                "state": state,
                "forced": self._forced,
                "mode": "failure_rate" if self._ring else "consecutive",
                "consecutive_failures": self._consecutive,
                "failure_rate": rate,
                "window_calls": self._ring_len if self._ring else None,
                "calls": successes + self._failures + self._neutral,
                "successes": successes,
                "failures": self._failures,
                "slow_calls": self._slow_calls,
                "neutral": self._neutral,
                "rejections": self._rejections,
                "half_open_probes": self._probes,
                "seconds_until_half_open": until,
            }

    def health_check(self) -> tuple[str, Any, str]:
        state = self.state
        if state == OPEN:
            return "fail", state, "circuit open: calls are rejected"
        if state == HALF_OPEN:
            return "warn", state, "circuit half-open: probing"
        return "pass", state, ""
