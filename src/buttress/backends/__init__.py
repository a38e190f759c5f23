"""Where sagas keep their run log and idempotency keys.

A store is any object implementing :class:`SagaStore`. buttress ships
:class:`~buttress.backends.memory.MemoryStore` (the default: in-process, bounded)
and :class:`~buttress.backends.sqlite.SQLiteStore` (durable, one machine).
Every write returns only once the record is stored: the runner never moves on
before its log says where it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from buttress.exceptions import BackendError

__all__ = ["BackendError", "KeyClaim", "LogEntry", "RunRecord", "SagaStore"]

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
