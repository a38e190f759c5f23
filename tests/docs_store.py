"""A store for all three primitives, written from docs/backends.md ("Writing a store for a
primitive") alone: dicts under one lock, shared by name. The contract suite runs on it to
show that the page says enough to write a store that passes."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Hashable
from typing import Any, Literal

from buttress import (
    Bulkhead,
    BulkheadFull,
    CircuitBreaker,
    CircuitOpenError,
    ConfigValueError,
    RateLimited,
    RateLimiter,
)
from buttress.backends import NO_REPORT, BreakerStatus, Outcome
from buttress.events import AcquiredAfterWait, CircuitStateChanged

_SLACK = 1e-9  # float slack when comparing times
_POLL = 0.005  # seconds between two looks of a waiting bulkhead caller


def _name(primitive: Any) -> str:
    if primitive.name is None:
        raise ConfigValueError(f"a {type(primitive).__name__} with a shared store needs a name")
    return str(primitive.name)


class DocsStore:
    """Breaker, bulkhead and limiter state in dicts: primitives bound under one name share it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.circuits: dict[str, _Circuit] = {}
        self.slots: dict[str, _Slots] = {}
        self.tats: dict[tuple[str, Hashable | None], float] = {}

    def bind_breaker(self, breaker: CircuitBreaker) -> DocsBreaker:
        with self.lock:
            circuit = self.circuits.setdefault(_name(breaker), _Circuit())
        return DocsBreaker(circuit, breaker)

    def bind_bulkhead(self, bulkhead: Bulkhead) -> DocsBulkhead:
        with self.lock:
            slots = self.slots.setdefault(_name(bulkhead), _Slots())
        return DocsBulkhead(self.lock, slots, bulkhead)

    def bind_limiter(self, limiter: RateLimiter) -> DocsLimiter:
        return DocsLimiter(self, _name(limiter), limiter)


# -- circuit breaker ------------------------------------------------------------------------


class _Circuit:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = "closed"
        self.generation = 0
        self.forced = False
        self.opened_until = 0.0
        self.probes = 0
        self.streak = 0
        self.window: deque[bool] = deque()  # True: a failure


class DocsBreaker:
    """The breaker binding of the page: tokens are generations."""

    def __init__(self, circuit: _Circuit, breaker: CircuitBreaker) -> None:
        self.c = circuit
        self.breaker = breaker
        self.clock = breaker.clock

    def _move(self, new: str, reason: str) -> tuple[str, str, str] | None:
        """Lock held: a transition (a new generation), or None when already there."""
        c = self.c
        if c.state == new:
            return None
        old, c.state = c.state, new
        c.generation += 1
        c.probes = 0
        if new == "open":
            c.opened_until = self.clock.now() + self.breaker.reset_timeout
        else:
            c.forced = False
        if new == "closed":
            c.streak = 0
            c.window.clear()
        return (old, new, reason)

    def _emit(self, change: tuple[str, str, str] | None) -> None:
        if change is not None:
            old, new, reason = change
            self.breaker.emit(CircuitStateChanged, old=old, new=new, reason=reason)

    def acquire(self) -> int:
        c, b = self.c, self.breaker
        change = None
        with c.lock:
            if c.state == "open":
                left = c.opened_until - self.clock.now()
                if c.forced or left > 0:
                    raise CircuitOpenError(
                        f"{b.label} is open",
                        retry_after=None if c.forced else left,
                        name=b.name,
                    )
                change = self._move("half_open", "reset timeout elapsed")
            token: int | None = c.generation
            if c.state == "half_open":
                if c.probes < b.half_open_max_calls:
                    c.probes += 1
                else:
                    token = None
        self._emit(change)
        if token is None:
            raise CircuitOpenError(f"{b.label} is half-open", retry_after=None, name=b.name)
        return token

    async def acquire_async(self) -> int:
        return self.acquire()

    def settle(self, token: int, outcome: Outcome) -> None:
        c, b = self.c, self.breaker
        if token == NO_REPORT:
            return
        change = None
        with c.lock:
            if token != c.generation or c.forced:
                return
            if outcome == "neutral":
                if c.state == "half_open" and c.probes > 0:
                    c.probes -= 1
                return
            failed = outcome == "failure"
            if c.state == "half_open":
                change = self._move(
                    *(("open", "probe failed") if failed else ("closed", "probe succeeded"))
                )
            elif c.state == "closed" and b.failure_rate is None:
                c.streak = c.streak + 1 if failed else 0
                if c.streak >= b.failure_threshold:
                    change = self._move("open", "failure threshold reached")
            elif c.state == "closed":
                c.window.append(failed)
                while len(c.window) > b.window:
                    c.window.popleft()
                failures = sum(c.window)
                if len(c.window) >= b.minimum_calls and failures >= b.failure_rate * len(c.window):
                    change = self._move("open", "failure rate reached")
        self._emit(change)

    async def settle_async(self, token: int, outcome: Outcome) -> None:
        self.settle(token, outcome)

    def status(self) -> BreakerStatus:
        c, b = self.c, self.breaker
        with c.lock:
            state, until = c.state, None
            if state == "open" and not c.forced:
                until = c.opened_until - self.clock.now()
                if until <= 0:
                    state, until = "half_open", None
            rate = b.failure_rate is not None
            return BreakerStatus(
                state=state,
                forced=c.forced,
                seconds_until_half_open=until,
                consecutive_failures=c.streak,
                window_calls=len(c.window) if rate else None,
                window_failures=sum(c.window) if rate else None,
                half_open_probes=c.probes,
            )

    def force(self, state: Literal["open", "closed"]) -> None:
        c = self.c
        with c.lock:
            if state == "open":
                change = self._move("open", "forced open")
                c.forced = True
            else:
                change = self._move("closed", "forced closed")
                c.forced = False
                c.streak = 0
                c.window.clear()
        self._emit(change)

    def snapshot(self) -> dict[str, Any]:
        return {"backend": "docs"}


# -- bulkhead --------------------------------------------------------------------------------


class _Slots:
    def __init__(self) -> None:
        self.held: set[int] = set()
        self.waiting = 0


class DocsBulkhead:
    """The bulkhead binding of the page: a lease is a number; waiters poll."""

    _leases = itertools.count(1)

    def __init__(self, lock: threading.Lock, slots: _Slots, bulkhead: Bulkhead) -> None:
        self.lock = lock
        self.slots = slots
        self.bulkhead = bulkhead
        self.clock = bulkhead.clock

    def try_acquire(self) -> object | None:
        with self.lock:
            if len(self.slots.held) >= self.bulkhead.max_concurrent:
                return None
            lease = next(self._leases)
            self.slots.held.add(lease)
            return lease

    def _start(self, timeout: float | None) -> object | None:
        """A lease now, or None after joining the waiters; raises when it may not wait."""
        lease = self.try_acquire()
        if lease is not None:
            return lease
        b = self.bulkhead
        with self.lock:
            if (timeout is not None and timeout <= 0) or self.slots.waiting >= b.max_queue:
                raise BulkheadFull(f"{b.label} is full", name=b.name, reason="bulkhead_full")
            self.slots.waiting += 1
        return None

    def _pause(self, started: float, timeout: float | None) -> float:
        if timeout is None:
            return _POLL
        left = timeout - (self.clock.now() - started)
        if left <= 0:
            b = self.bulkhead
            raise BulkheadFull(
                f"{b.label}: no slot in time", name=b.name, reason="bulkhead_wait_timeout"
            )
        return min(_POLL, left)

    def _got(self, lease: object, started: float) -> object:
        self.bulkhead.emit(AcquiredAfterWait, waited=self.clock.now() - started)
        return lease

    def _leave(self) -> None:
        with self.lock:
            self.slots.waiting -= 1

    def acquire(self, timeout: float | None) -> object:
        lease = self._start(timeout)
        if lease is not None:
            return lease
        started = self.clock.now()
        try:
            while (lease := self.try_acquire()) is None:
                self.clock.sleep(self._pause(started, timeout))
        finally:
            self._leave()
        return self._got(lease, started)

    async def acquire_async(self, timeout: float | None) -> object:
        lease = self._start(timeout)
        if lease is not None:
            return lease
        started = self.clock.now()
        try:
            while (lease := self.try_acquire()) is None:
                await self.clock.asleep(self._pause(started, timeout))
        finally:
            self._leave()
        return self._got(lease, started)

    def release(self, lease: object) -> None:
        with self.lock:
            self.slots.held.discard(lease)  # type: ignore[arg-type]

    async def release_async(self, lease: object) -> None:
        self.release(lease)

    def in_use(self) -> int | None:
        with self.lock:
            return len(self.slots.held)

    def snapshot(self) -> dict[str, Any]:
        return {"backend": "docs"}


# -- rate limiter ---------------------------------------------------------------------------


class DocsLimiter:
    """The limiter binding of the page: GCRA; a waiter reserves its turn, then sleeps."""

    def __init__(self, store: DocsStore, name: str, limiter: RateLimiter) -> None:
        self.store = store
        self.name = name
        self.limiter = limiter
        self.clock = limiter.clock
        self.interval = limiter.interval
        self.tolerance = limiter.burst * limiter.interval

    def _reserve(self, key: Hashable | None, weight: int, max_wait: float | None) -> float:
        with self.store.lock:
            now = self.clock.now()
            tat = max(self.store.tats.get((self.name, key), now), now)
            wait = tat + weight * self.interval - now - self.tolerance
            wait = 0.0 if wait <= _SLACK else wait
            if max_wait is not None and wait > max_wait + _SLACK:
                raise RateLimited(
                    f"{self.limiter.label}: no permit in time", retry_after=wait, name=self.name
                )
            self.store.tats[(self.name, key)] = tat + weight * self.interval
            return wait

    def try_acquire(self, key: Hashable | None, weight: int) -> bool:
        try:
            self._reserve(key, weight, 0.0)
        except RateLimited:
            return False
        return True

    def acquire(self, key: Hashable | None, weight: int, max_wait: float | None) -> float | None:
        wait = self._reserve(key, weight, max_wait)
        if not wait:
            return None  # admitted at once
        self.clock.sleep(wait)
        return wait

    async def acquire_async(
        self, key: Hashable | None, weight: int, max_wait: float | None
    ) -> float | None:
        wait = self._reserve(key, weight, max_wait)
        if not wait:
            return None
        await self.clock.asleep(wait)
        return wait

    def tokens(self, key: Hashable | None) -> float | None:
        with self.store.lock:
            now = self.clock.now()
            debt = max(self.store.tats.get((self.name, key), now) - now, 0.0)
        return max(self.tolerance - debt, 0.0) / self.interval

    def snapshot(self) -> dict[str, Any]:
        return {"backend": "docs"}
