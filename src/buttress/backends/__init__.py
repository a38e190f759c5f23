"""Where sagas keep their run log and idempotency keys.

A store is any object implementing :class:`SagaStore` (and, optionally, the async
twins of :class:`AsyncSagaStore`). buttress ships
:class:`~buttress.backends.memory.MemoryStore` (the default: in-process, bounded),
:class:`~buttress.backends.sqlite.SQLiteStore` (durable, one machine) and
:class:`~buttress.backends.postgres.PostgresStore` (durable, shared by machines).
Every write returns only once the record is stored: the runner never moves on
before its log says where it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from buttress.exceptions import BackendError

__all__ = [
    "AsyncIdempotencyStore",
    "AsyncSagaStore",
    "BackendError",
    "IdempotencyStore",
    "KeyClaim",
    "LogEntry",
    "RunRecord",
    "SagaStore",
]

# Run statuses. "running" and "compensating" are incomplete (recoverable);
# the other three are final.
RUNNING = "running"
COMPENSATING = "compensating"
COMPLETED = "completed"
FAILED = "failed"
COMPENSATION_FAILED = "compensation_failed"
INCOMPLETE = (RUNNING, COMPENSATING)


@dataclass
class RunRecord:
    """One run, as stored."""

    run_id: str
    saga: str
    status: str
    input: Any
    key: str | None = None
    input_hash: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    owner: str | None = None
    lease_until: float = 0.0
    error: str | None = None
    result: dict[str, Any] | None = None
    expires_at: float | None = None
    ttl: float | None = None  # seconds a completed keyed run is remembered


@dataclass(slots=True)
class LogEntry:
    """One line of a run's log: a step (or compensation) event."""

    seq: int
    step: str
    event: str
    attempt: int = 0
    at: float = 0.0
    duration: float | None = None
    output: Any = None
    error: str | None = None


@dataclass
class KeyClaim:
    """The answer to claiming an idempotency key.

    ``outcome`` is ``"new"`` (run it as ``run_id``), ``"done"`` (``record`` holds the
    stored result), ``"resume"`` (the holder's lease expired: recover ``run_id``),
    ``"busy"`` (another live holder runs it), ``"conflict"`` (a different input) or
    ``"blocked"`` (its run is stuck in ``compensation_failed``).
    """

    outcome: str
    run_id: str
    record: RunRecord | None = None
    entries: list[LogEntry] = field(default_factory=list)


def run_row(r: RunRecord) -> tuple[Any, ...]:
    """A new run's columns, in the order the SQL stores insert them: run_id, saga, status,
    input (JSON), key, input_hash, created_at, updated_at, owner, lease_until, ttl."""
    return (
        r.run_id,
        r.saga,
        r.status,
        json.dumps(r.input),
        r.key,
        r.input_hash,
        r.created_at,
        r.updated_at,
        r.owner,
        r.lease_until,
        r.ttl,
    )


def run_changes(
    entries: list[LogEntry],
    *,
    lease_until: float | None,
    status: str | None,
    error: str | None,
    result: dict[str, Any] | None,
    expires_at: float | None,
) -> dict[str, Any]:
    """The columns of a run that one ``write()`` changes, by name (for the SQL stores).

    A final status also records the outcome and releases the lease."""
    changes: dict[str, Any] = {}
    if entries:
        changes["updated_at"] = entries[-1].at
    if lease_until is not None:
        changes["lease_until"] = lease_until
    if status is not None:
        changes["status"] = status
        if status not in INCOMPLETE:
            changes.update(error=error, result=result, expires_at=expires_at, lease_until=0.0)
    return changes


@runtime_checkable
class SagaStore(Protocol):
    """The run log and idempotency store the saga runner needs."""

    def create_run(self, record: RunRecord) -> None:
        """Store a new run."""

    def claim_key(self, record: RunRecord, *, now: float) -> KeyClaim:
        """Atomically bind ``record.key`` to ``record`` unless a run already holds it."""

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
    ) -> None:
        """Durably add log entries and, optionally, extend the lease or set the status
        (with the final report), all in one write."""

    def load(self, run_id: str) -> tuple[RunRecord, list[LogEntry]] | None:
        """A run and its log, or ``None``."""

    def claim_run(
        self,
        run_id: str,
        owner: str,
        *,
        now: float,
        lease_until: float,
        expected_owner: str | None = None,
    ) -> bool:
        """Take over an incomplete run whose lease expired (or still held by
        ``expected_owner``, known to be dead); False if someone else holds it."""

    def incomplete(self, saga: str) -> list[str]:
        """Ids of the saga's runs that are still running or compensating."""

    def runs(
        self, *, saga: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[RunRecord]:
        """The most recent runs, newest first."""


@runtime_checkable
class IdempotencyStore(Protocol):
    """What the saga runner needs from ``Saga(idempotency=...)``: binding a key to a run,
    and learning the run's lease and how it ended.

    Every :class:`SagaStore` is one; so is
    :class:`~buttress.backends.redis.RedisIdempotencyStore`, which is *only* one (it
    keeps no run log, so it cannot be a saga's ``store=``).
    """

    def claim_key(self, record: RunRecord, *, now: float) -> KeyClaim:
        """Atomically bind ``record.key`` to ``record`` unless a run already holds it."""

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
    ) -> None:
        """Record the lease of ``run_id`` and, with a final status, its outcome (the
        runner passes no ``entries``: the log lives in the saga's ``store``)."""


@runtime_checkable
class AsyncIdempotencyStore(Protocol):
    """The async twins an :class:`IdempotencyStore` may also offer."""

    async def aclaim_key(self, record: RunRecord, *, now: float) -> KeyClaim:
        """Async :meth:`IdempotencyStore.claim_key`."""

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
    ) -> None:
        """Async :meth:`IdempotencyStore.write`."""


@runtime_checkable
class AsyncSagaStore(Protocol):
    """The async twins a :class:`SagaStore` may also offer (``a`` + the method name,
    same arguments). ``Saga.run_async()`` and ``recover_async()`` await them instead of
    calling the sync methods on the event loop."""

    async def acreate_run(self, record: RunRecord) -> None:
        """Async :meth:`SagaStore.create_run`."""

    async def aclaim_key(self, record: RunRecord, *, now: float) -> KeyClaim:
        """Async :meth:`SagaStore.claim_key`."""

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
    ) -> None:
        """Async :meth:`SagaStore.write`."""

    async def aload(self, run_id: str) -> tuple[RunRecord, list[LogEntry]] | None:
        """Async :meth:`SagaStore.load`."""

    async def aclaim_run(
        self,
        run_id: str,
        owner: str,
        *,
        now: float,
        lease_until: float,
        expected_owner: str | None = None,
    ) -> bool:
        """Async :meth:`SagaStore.claim_run`."""

    async def aincomplete(self, saga: str) -> list[str]:
        """Async :meth:`SagaStore.incomplete`."""

    async def aruns(
        self, *, saga: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[RunRecord]:
        """Async :meth:`SagaStore.runs`."""
