"""In-process stores: nothing to set up, nothing survives the process.

:class:`MemoryStore` is the default saga store. It keeps every incomplete run and at
most ``max_runs`` finished ones (the oldest finished runs go first). It survives
nothing: use :mod:`buttress.backends.sqlite` when runs must survive a crash.

:class:`MemoryBreakerStore`, :class:`MemoryBulkheadStore` and :class:`MemoryLimiterStore`
are the in-process reference implementations of the primitive store contracts: every
primitive bound to one of them under the same name shares one state (one circuit, one set
of slots, one set of buckets), exactly as processes sharing a Redis store do. A primitive
built without a store holds the same state privately.
"""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from buttress._validate import check_int
from buttress.exceptions import ConfigValueError

from . import (
    ACTIVE,
    ANY_SIGNAL,
    CANCEL_SIGNAL,
    COMPENSATION_FAILED,
    COMPLETED,
    INCOMPLETE,
    WAITING,
    KeyClaim,
    LogEntry,
    RunRecord,
    Signal,
)

if TYPE_CHECKING:
    from buttress.bulkhead import Bulkhead, LocalBulkhead
    from buttress.circuit_breaker import CircuitBreaker, LocalBreaker
    from buttress.rate_limiter import LocalLimiter, RateLimiter

__all__ = ["MemoryBreakerStore", "MemoryBulkheadStore", "MemoryLimiterStore", "MemoryStore"]


class _ByName:
    """Bindings by primitive name; one name binds one set of settings."""

    kind = "primitive"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bound: dict[str, tuple[tuple[Any, ...], Any]] = {}

    def _bind(self, name: str | None, settings: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        if name is None:
            raise ConfigValueError(
                f"a {self.kind} with a shared store needs a name: its sharers find its state "
                f"by name"
            )
        with self._lock:
            held = self._bound.get(name)
            if held is None:
                binding = build()
                self._bound[name] = (settings, binding)
                return binding
            if held[0] != settings:
                raise ConfigValueError(
                    f"store= already holds a {self.kind} named {name!r} with other settings "
                    f"({held[0]!r}), got {settings!r}"
                )
            return held[1]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {sorted(self._bound)!r}>"


class MemoryBreakerStore(_ByName):
    """Circuit-breaker state shared by name within this process: a
    :class:`~buttress.backends.BreakerStore`.

    Breakers built with the same store and name share one circuit; their settings must be
    equal. Transitions are emitted through the first breaker bound under the name.
    """

    kind = "CircuitBreaker"

    def bind_breaker(self, breaker: CircuitBreaker) -> LocalBreaker:
        from buttress.circuit_breaker import LocalBreaker

        settings = (
            breaker.failure_threshold,
            breaker.reset_timeout,
            breaker.half_open_max_calls,
            breaker.success_threshold,
            breaker.failure_rate,
            breaker.window,
            breaker.minimum_calls,
        )
        return self._bind(breaker.name, settings, lambda: LocalBreaker(breaker))  # type: ignore[no-any-return]


class MemoryBulkheadStore(_ByName):
    """Bulkhead slots shared by name within this process: a
    :class:`~buttress.backends.BulkheadStore`."""

    kind = "Bulkhead"

    def bind_bulkhead(self, bulkhead: Bulkhead) -> LocalBulkhead:
        from buttress.bulkhead import LocalBulkhead

        settings = (bulkhead.max_concurrent, bulkhead.max_queue)
        return self._bind(bulkhead.name, settings, lambda: LocalBulkhead(bulkhead))  # type: ignore[no-any-return]


class MemoryLimiterStore(_ByName):
    """Rate-limiter buckets shared by name within this process: a
    :class:`~buttress.backends.LimiterStore`."""

    kind = "RateLimiter"

    def bind_limiter(self, limiter: RateLimiter) -> LocalLimiter:
        from buttress.rate_limiter import LocalLimiter

        settings = (limiter.interval, limiter.burst, limiter.max_keys)
        return self._bind(limiter.name, settings, lambda: LocalLimiter(limiter))  # type: ignore[no-any-return]


class MemoryStore:
    """An in-process :class:`~buttress.backends.SagaStore`.

    Args:
        max_runs: finished runs kept for inspection and idempotent replay (default 10,000).
    """

    def __init__(self, *, max_runs: int = 10_000) -> None:
        self.max_runs = check_int("max_runs", max_runs)
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, RunRecord] = OrderedDict()
        self._logs: dict[str, list[LogEntry]] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._signals: dict[str, list[Signal]] = {}
        self._signal_ids = 0

    def _prune(self) -> None:
        excess = len(self._runs) - self.max_runs
        if excess <= 0:
            return
        # Drop a batch of the oldest finished runs, so that a full store is not scanned
        # on every insert.
        excess += self.max_runs // 10
        victims = []
        for run_id, rec in self._runs.items():
            if rec.status not in INCOMPLETE:
                victims.append(run_id)
                if len(victims) >= excess:
                    break
        for run_id in victims:
            record = self._runs.pop(run_id)
            self._logs.pop(run_id, None)
            self._signals.pop(run_id, None)
            if record.key is not None and self._keys.get((record.saga, record.key)) == run_id:
                del self._keys[(record.saga, record.key)]

    def create_run(self, record: RunRecord) -> None:
        with self._lock:
            self._runs[record.run_id] = copy.copy(record)
            self._logs[record.run_id] = []
            self._prune()

    def claim_key(self, record: RunRecord, *, now: float) -> KeyClaim:
        assert record.key is not None
        with self._lock:
            held = self._keys.get((record.saga, record.key))
            existing = self._runs.get(held) if held is not None else None
            if existing is not None:
                claim = _judge(existing, record, now)
                if claim is not None:
                    if claim.outcome == "resume":
                        existing.owner = record.owner
                        existing.lease_until = record.lease_until
                    claim.entries = list(self._logs.get(existing.run_id, []))
                    # A deep copy: a caller changing a replayed result must not change
                    # what later replays return.
                    claim.record = copy.deepcopy(existing)
                    return claim
            self._runs[record.run_id] = copy.copy(record)
            self._logs[record.run_id] = []
            self._keys[(record.saga, record.key)] = record.run_id
            self._prune()
            return KeyClaim("new", record.run_id)

    def write(
        self,
        run_id: str,
        entries: list[LogEntry],
        *,
        lease_until: float | None = None,
        status: str | None = None,
        error: str | None = None,
        result: dict[str, Any] | None = None,
        expires_at: float | None = None,
        wake_at: float | None = None,
        waiting_for: str | None = None,
    ) -> None:
        with self._lock:
            self._logs.setdefault(run_id, []).extend(entries)
            record = self._runs.get(run_id)
            if record is None:
                return
            # The same rules as backends.run_changes(), set directly: this is the default
            # store's hot path, and building that dict costs ~0.6 us per saga step.
            if entries:
                record.updated_at = entries[-1].at
            if lease_until is not None:
                record.lease_until = lease_until
            if status is not None:
                record.status = status
                if status == WAITING:
                    record.wake_at, record.waiting_for = wake_at, waiting_for
                    record.lease_until = 0.0
                elif record.wake_at is not None or record.waiting_for is not None:
                    record.wake_at = record.waiting_for = None
                if status not in INCOMPLETE:
                    record.error = error
                    record.result = result
                    record.expires_at = expires_at
                    record.lease_until = 0.0
                    self._runs.move_to_end(run_id)

    def load(self, run_id: str) -> tuple[RunRecord, list[LogEntry]] | None:
        with self._lock:
            record = self._runs.get(run_id)
            if record is None:
                return None
            return copy.copy(record), list(self._logs.get(run_id, []))

    def claim_run(
        self,
        run_id: str,
        owner: str,
        *,
        now: float,
        lease_until: float,
        expected_owner: str | None = None,
    ) -> bool:
        with self._lock:
            record = self._runs.get(run_id)
            if record is None or record.status not in INCOMPLETE:
                return False
            if record.lease_until > now and (
                expected_owner is None or record.owner != expected_owner
            ):
                return False
            record.owner = owner
            record.lease_until = lease_until
            return True

    def incomplete(self, saga: str) -> list[str]:
        with self._lock:
            return [r.run_id for r in self._runs.values() if r.saga == saga and r.status in ACTIVE]

    def due(self, saga: str, *, now: float, limit: int = 1000) -> list[str]:
        with self._lock:
            found = [
                (r.wake_at, r.run_id)
                for r in self._runs.values()
                if r.saga == saga
                and r.status == WAITING
                and r.wake_at is not None
                and r.wake_at <= now
            ]
        found.sort()
        return [run_id for _, run_id in found[:limit]]

    def counts(self, saga: str) -> dict[str, int]:
        found: dict[str, int] = {}
        with self._lock:
            for record in self._runs.values():
                if record.saga == saga:
                    found[record.status] = found.get(record.status, 0) + 1
        return found

    def send_signal(self, run_id: str, name: str, payload: Any, *, at: float) -> RunRecord | None:
        stored = _stored_json(payload)
        with self._lock:
            record = self._runs.get(run_id)
            if record is None:
                return None
            self._signal_ids += 1
            self._signals.setdefault(run_id, []).append(Signal(self._signal_ids, name, stored, at))
            if record.status == WAITING and (
                record.waiting_for in (name, ANY_SIGNAL) or name == CANCEL_SIGNAL
            ):
                record.wake_at = at if record.wake_at is None else min(record.wake_at, at)
            return copy.copy(record)

    def signals(self, run_id: str) -> list[Signal]:
        with self._lock:
            return list(self._signals.get(run_id, ()))

    def runs(
        self, *, saga: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[RunRecord]:
        with self._lock:
            found = [
                copy.copy(r)
                for r in reversed(self._runs.values())
                if (saga is None or r.saga == saga) and (status is None or r.status == status)
            ]
        return found[:limit]

    # -- the async face: the same methods, called on the loop (they wait on no I/O and
    # hold the lock for microseconds)

    async def acreate_run(self, record: RunRecord) -> None:
        self.create_run(record)

    async def aclaim_key(self, record: RunRecord, *, now: float) -> KeyClaim:
        return self.claim_key(record, now=now)

    async def awrite(
        self,
        run_id: str,
        entries: list[LogEntry],
        *,
        lease_until: float | None = None,
        status: str | None = None,
        error: str | None = None,
        result: dict[str, Any] | None = None,
        expires_at: float | None = None,
        wake_at: float | None = None,
        waiting_for: str | None = None,
    ) -> None:
        self.write(
            run_id,
            entries,
            lease_until=lease_until,
            status=status,
            error=error,
            result=result,
            expires_at=expires_at,
            wake_at=wake_at,
            waiting_for=waiting_for,
        )

    async def aload(self, run_id: str) -> tuple[RunRecord, list[LogEntry]] | None:
        return self.load(run_id)

    async def aclaim_run(
        self,
        run_id: str,
        owner: str,
        *,
        now: float,
        lease_until: float,
        expected_owner: str | None = None,
    ) -> bool:
        return self.claim_run(
            run_id, owner, now=now, lease_until=lease_until, expected_owner=expected_owner
        )

    async def aincomplete(self, saga: str) -> list[str]:
        return self.incomplete(saga)

    async def aruns(
        self, *, saga: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[RunRecord]:
        return self.runs(saga=saga, status=status, limit=limit)

    async def adue(self, saga: str, *, now: float, limit: int = 1000) -> list[str]:
        return self.due(saga, now=now, limit=limit)

    async def acounts(self, saga: str) -> dict[str, int]:
        return self.counts(saga)

    async def asend_signal(
        self, run_id: str, name: str, payload: Any, *, at: float
    ) -> RunRecord | None:
        return self.send_signal(run_id, name, payload, at=at)

    async def asignals(self, run_id: str) -> list[Signal]:
        return self.signals(run_id)


def _stored_json(value: Any) -> Any:
    """What a SQL store reads back of a JSON value it stored (the memory store keeps the
    same, so that every store gives back equal payloads)."""
    return json.loads(json.dumps(value))


def _judge(existing: RunRecord, wanted: RunRecord, now: float) -> KeyClaim | None:
    """What an existing run holding the key means for a new claim (``None``: run anew)."""
    if existing.input_hash != wanted.input_hash:
        return KeyClaim("conflict", existing.run_id)
    if existing.status == COMPLETED:
        if existing.expires_at is None or existing.expires_at > now:
            return KeyClaim("done", existing.run_id)
        return None
    if existing.status == COMPENSATION_FAILED:
        return KeyClaim("blocked", existing.run_id)
    if existing.status in INCOMPLETE:
        if existing.lease_until > now:
            return KeyClaim("busy", existing.run_id)
        return KeyClaim("resume", existing.run_id)
    return None  # failed and fully compensated: the key may run again


judge_claim = _judge
