"""Store contracts: where primitives keep shared state and sagas keep their run log.

**Primitive stores.** A primitive's ``store=`` takes an object implementing one of
:class:`BreakerStore`, :class:`BulkheadStore` or :class:`LimiterStore`. When the
primitive is built it calls the store's ``bind_*`` method with itself, and from then on
asks the returned *binding* (:class:`BreakerBinding`, :class:`BulkheadBinding`,
:class:`LimiterBinding`) for every decision. A binding reads the primitive's public
settings (``breaker.failure_threshold``, ``limiter.rate``...), uses its ``clock`` for
every wait and reports through its ``emit``. The primitive keeps this process's counters,
emits rejections and classifies outcomes; the binding decides. The in-process state of a
primitive built without a store is the reference implementation of the same contract
(:mod:`buttress.backends.memory` exposes it as stores that share state by name), and the
Redis stores implement it across processes.

**Saga stores.** A saga's run log is any object implementing :class:`SagaStore` (and,
optionally, the async twins of :class:`AsyncSagaStore`). buttress ships
:class:`~buttress.backends.memory.MemoryStore` (the default: in-process, bounded),
:class:`~buttress.backends.sqlite.SQLiteStore` (durable, one machine) and
:class:`~buttress.backends.postgres.PostgresStore` (durable, shared by machines).
Every write returns only once the record is stored: the runner never moves on
before its log says where it is.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from buttress.exceptions import BackendError, ConfigTypeError

if TYPE_CHECKING:
    from buttress.bulkhead import Bulkhead
    from buttress.circuit_breaker import CircuitBreaker
    from buttress.rate_limiter import RateLimiter

__all__ = [
    "ACTIVE",
    "ANY_SIGNAL",
    "CANCEL_SIGNAL",
    "NO_REPORT",
    "AsyncIdempotencyStore",
    "AsyncSagaStore",
    "BackendError",
    "BindingBase",
    "BreakerBinding",
    "BreakerStatus",
    "BreakerStore",
    "BulkheadBinding",
    "BulkheadStore",
    "IdempotencyStore",
    "KeyClaim",
    "LimiterBinding",
    "LimiterStore",
    "LogEntry",
    "Outcome",
    "RunRecord",
    "SagaStore",
    "Signal",
    "check_store",
]

# -- primitive stores -------------------------------------------------------------------------

Outcome = Literal["success", "failure", "neutral"]
"""What a call admitted by a breaker came to, as its binding hears it."""

NO_REPORT = -1
"""The token of a call a breaker binding let through without wanting its outcome (for
instance a store that fails open while its server is down): settling it does nothing."""


class BindingBase:
    """What a binding usually keeps of its primitive (an optional base for your own).

    Attributes:
        name: the primitive's name (a shared store finds the state by it).
        label: how messages name the primitive (``circuit breaker 'payments'``).
        clock: the primitive's clock: every wait and every timestamp uses it.
        now: ``clock.now``, bound once.
        emit: the primitive's :meth:`~buttress.Policy.emit`, for the events a binding
            reports itself (transitions, ``AcquiredAfterWait``, backend degradation).
    """

    __slots__ = ("clock", "emit", "label", "name", "now")

    def __init__(self, policy: CircuitBreaker | Bulkhead | RateLimiter) -> None:
        self.name = policy.name
        self.label = policy.label
        self.clock = policy.clock
        self.now = policy.clock.now
        self.emit = policy.emit


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """What a breaker binding knows of the circuit right now.

    Attributes:
        state: ``"closed"``, ``"open"`` or ``"half_open"`` (an open circuit whose reset
            timeout has passed reads as half-open).
        forced: opened by ``open()`` and kept open until ``close()``.
        seconds_until_half_open: for an open, unforced circuit, the seconds until probes
            are allowed; else ``None``.
        consecutive_failures: the current failure streak (consecutive mode).
        window_calls: outcomes in the failure-rate window (``None`` in consecutive mode).
        window_failures: failures among them (``None`` in consecutive mode).
        half_open_probes: probes in flight while half-open.
    """

    state: str
    forced: bool = False
    seconds_until_half_open: float | None = None
    consecutive_failures: int = 0
    window_calls: int | None = None
    window_failures: int | None = None
    half_open_probes: int = 0


@runtime_checkable
class BreakerBinding(Protocol):
    """The state machine of one circuit breaker, as a store keeps it.

    Tokens are the generation of the state that admitted a call: an outcome settled with a
    token older than the current generation updates nothing, so a call admitted before a
    transition never moves the new state.
    """

    def acquire(self) -> int:
        """Permission for one call: its token (``>= 0``, or :data:`NO_REPORT`). Raises
        :class:`~buttress.CircuitOpenError` when the circuit is open or every half-open
        probe slot is taken."""

    async def acquire_async(self) -> int:
        """:meth:`acquire` for async code (awaits the store's async I/O)."""

    def settle(self, token: int, outcome: Outcome) -> None:
        """Report the outcome of the call admitted with ``token``. ``"neutral"`` counts as
        neither success nor failure (a half-open probe gives its slot back)."""

    async def settle_async(self, token: int, outcome: Outcome) -> None:
        """:meth:`settle` for async code."""

    def status(self) -> BreakerStatus:
        """The current state (a store may read it from its server)."""

    def force(self, state: Literal["open", "closed", "half_open"]) -> None:
        """``"open"``: open the circuit until forced closed (no probes). ``"closed"``:
        close it and forget the failure streak and window. ``"half_open"``: let probes
        through now, as if the reset timeout had elapsed. Seen by every sharer."""

    def snapshot(self) -> dict[str, Any]:
        """Facts about the store for ``state()`` (backend, key...); may be empty."""


@runtime_checkable
class BreakerStore(Protocol):
    """A store that keeps circuit-breaker state (``CircuitBreaker(store=...)``)."""

    def bind_breaker(self, breaker: CircuitBreaker) -> BreakerBinding:
        """The binding that holds ``breaker``'s state (called once, when it is built)."""


@runtime_checkable
class BulkheadBinding(Protocol):
    """The slots of one bulkhead, as a store keeps them.

    A lease is whatever the binding needs to give exactly one slot back (a token, a
    row id); the bulkhead hands each caller its own, so no caller can free another's.
    """

    def try_acquire(self) -> object | None:
        """A lease if a slot is free now (and nobody queued before us), else ``None``."""

    def acquire(self, timeout: float | None) -> object:
        """A lease, waiting up to ``timeout`` seconds (``None``: no limit; ``0``: never
        wait) and within the bulkhead's ``max_queue``. Raises
        :class:`~buttress.BulkheadFull` (``reason`` ``"bulkhead_full"`` or
        ``"bulkhead_wait_timeout"``). A caller interrupted while waiting takes nothing."""

    async def acquire_async(self, timeout: float | None) -> object:
        """:meth:`acquire` for async code; a cancelled waiter takes nothing."""

    def release(self, lease: object) -> None:
        """Give back the slot of ``lease``."""

    async def release_async(self, lease: object) -> None:
        """:meth:`release` for async code."""

    def in_use(self) -> int | None:
        """Slots taken across every sharer, or ``None`` when unknown."""

    def snapshot(self) -> dict[str, Any]:
        """Facts about the store for ``state()``; may be empty."""


@runtime_checkable
class BulkheadStore(Protocol):
    """A store that keeps bulkhead slots (``Bulkhead(store=...)``)."""

    def bind_bulkhead(self, bulkhead: Bulkhead) -> BulkheadBinding:
        """The binding that holds ``bulkhead``'s slots (called once, when it is built)."""


@runtime_checkable
class LimiterBinding(Protocol):
    """The GCRA buckets of one rate limiter (the unkeyed one is ``key=None``)."""

    def try_acquire(self, key: Hashable | None, weight: int) -> bool:
        """Admit ``weight`` units of ``key``'s bucket now if they conform; never waits."""

    def acquire(self, key: Hashable | None, weight: int, max_wait: float | None) -> float | None:
        """Admit ``weight`` units, waiting at most ``max_wait`` seconds (``None``: no
        limit). Returns ``None`` when the units were admitted at once, else the seconds
        the caller waited for its turn (the primitive counts it as having waited).
        Raises :class:`~buttress.RateLimited` at once, with ``retry_after``, when the
        units cannot conform within ``max_wait``. A waiter interrupted before its turn
        must never let the bucket admit more than its rate."""

    async def acquire_async(
        self, key: Hashable | None, weight: int, max_wait: float | None
    ) -> float | None:
        """:meth:`acquire` for async code."""

    def tokens(self, key: Hashable | None) -> float | None:
        """Units admissible now (fractional while refilling), or ``None`` when unknown."""

    def snapshot(self) -> dict[str, Any]:
        """Facts about the store for ``state()``; may be empty."""


@runtime_checkable
class LimiterStore(Protocol):
    """A store that keeps rate-limiter buckets (``RateLimiter(store=...)``)."""

    def bind_limiter(self, limiter: RateLimiter) -> LimiterBinding:
        """The binding that holds ``limiter``'s buckets (called once, when it is built)."""


_STORE_KINDS: dict[str, tuple[str, str, str]] = {
    # kind: (the binding method, what the message calls it, the shipped example)
    "breaker": ("bind_breaker", "a breaker store (BreakerStore)", "RedisBreakerStore"),
    "bulkhead": ("bind_bulkhead", "a bulkhead store (BulkheadStore)", "RedisBulkheadStore"),
    "limiter": ("bind_limiter", "a rate-limiter store (LimiterStore)", "RedisRateLimiterStore"),
}


def check_store(kind: Literal["breaker", "bulkhead", "limiter"], store: object) -> Any:
    """``store`` if it is a store of ``kind``, else :class:`~buttress.ConfigTypeError`
    naming ``store=`` and the kind expected."""
    method, expected, example = _STORE_KINDS[kind]
    if isinstance(store, type):
        raise ConfigTypeError(
            f"store must be a store instance, got the class {store.__name__}: "
            f"build it first, e.g. store={store.__name__}(...)"
        )
    if not callable(getattr(store, method, None)):
        offers = [
            name for name, (m, _, _) in _STORE_KINDS.items() if callable(getattr(store, m, None))
        ]
        found = f"; it is a {offers[0]} store" if offers else ""
        raise ConfigTypeError(
            f"store must be {expected} such as buttress.backends.redis.{example}, "
            f"got {store!r} ({type(store).__name__}){found}"
        )
    return store


# -- saga stores ----------------------------------------------------------------------------

# Run statuses. "running", "compensating" and "waiting" are incomplete (recoverable);
# the other three are final. A waiting run is parked: it holds no lease and no thread,
# and is taken again when it is due (``wake_at``) or signalled.
RUNNING = "running"
COMPENSATING = "compensating"
WAITING = "waiting"
COMPLETED = "completed"
FAILED = "failed"
COMPENSATION_FAILED = "compensation_failed"
INCOMPLETE = (RUNNING, COMPENSATING, WAITING)
ACTIVE = (RUNNING, COMPENSATING)
"""The incomplete statuses of a run that some process is (or was) driving: what
:meth:`SagaStore.incomplete` returns. A waiting run is found by :meth:`SagaStore.due`."""

CANCEL_SIGNAL = "buttress.cancel"
"""The name of the signal that asks a run to cancel (``Saga.cancel``); it wakes a
waiting run whatever the run waits for."""

ANY_SIGNAL = "buttress.any"
"""The ``waiting_for`` of a run parked on waits for several signals: any signal wakes
it (its steps park again if the signal was not theirs)."""


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
    version: str | None = None  # the version of the saga definition it started under
    wake_at: float | None = None  # a waiting run: when it is due (None: a signal wakes it)
    waiting_for: str | None = None  # a waiting run: the signal it waits for, if any
    deadline: float | None = None  # the run's absolute deadline (epoch seconds), if any
    parent: str | None = None  # the run id of the parent run, for a child saga's run


@dataclass(frozen=True, slots=True)
class Signal:
    """A payload sent to a run (``Saga.signal``), as stored.

    Attributes:
        id: its number, increasing in the order the store received signals.
        name: what the run waits for (``ctx.wait_for(name)``).
        payload: the JSON value sent (stored with the same rule as step outputs).
        sent_at: when the store received it (epoch seconds).
    """

    id: int
    name: str
    payload: Any
    sent_at: float


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
    input (JSON), key, input_hash, created_at, updated_at, owner, lease_until, ttl,
    version, deadline, parent."""
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
        r.version,
        r.deadline,
        r.parent,
    )


def run_changes(
    entries: list[LogEntry],
    *,
    lease_until: float | None,
    status: str | None,
    error: str | None,
    result: dict[str, Any] | None,
    expires_at: float | None,
    wake_at: float | None = None,
    waiting_for: str | None = None,
) -> dict[str, Any]:
    """The columns of a run that one ``write()`` changes, by name (for the SQL stores).

    A final status also records the outcome and releases the lease; ``"waiting"``
    records when the run is due and what it waits for, and releases the lease; any
    other status clears those two."""
    changes: dict[str, Any] = {}
    if entries:
        changes["updated_at"] = entries[-1].at
    if lease_until is not None:
        changes["lease_until"] = lease_until
    if status is not None:
        changes["status"] = status
        if status == WAITING:
            changes.update(wake_at=wake_at, waiting_for=waiting_for, lease_until=0.0)
        else:
            changes.update(wake_at=None, waiting_for=None)
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
        wake_at: float | None = None,
        waiting_for: str | None = None,
    ) -> None:
        """Durably add log entries and, optionally, extend the lease or set the status
        (with the final report), all in one write. With ``status="waiting"`` the run
        is parked: ``wake_at`` (when it is due, ``None``: only a signal wakes it) and
        ``waiting_for`` (the signal it waits for) are recorded and the lease is
        released; another status clears them (see :func:`run_changes`)."""

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
        """Ids of the saga's runs that are still running or compensating (not the
        waiting ones: see :meth:`due`)."""

    def runs(
        self, *, saga: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[RunRecord]:
        """The most recent runs, newest first."""

    def due(self, saga: str, *, now: float, limit: int = 1000) -> list[str]:
        """Ids of the saga's waiting runs whose ``wake_at`` is at or before ``now``,
        the earliest first."""

    def counts(self, saga: str) -> dict[str, int]:
        """How many runs of the saga the store holds, by status (statuses with none
        may be left out): what ``state()`` and ``health()`` report, in one query."""

    def send_signal(self, run_id: str, name: str, payload: Any, *, at: float) -> RunRecord | None:
        """Durably store a signal for ``run_id`` and, in the same write, make the run
        due at ``at`` if it is waiting for ``name`` (or for :data:`ANY_SIGNAL`, or
        ``name`` is :data:`CANCEL_SIGNAL`). Returns the run as it is after the write, or ``None``
        (and stores nothing) when there is no such run."""

    def signals(self, run_id: str) -> list[Signal]:
        """Every signal sent to ``run_id``, in the order they were received."""


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
        wake_at: float | None = None,
        waiting_for: str | None = None,
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
        wake_at: float | None = None,
        waiting_for: str | None = None,
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
        wake_at: float | None = None,
        waiting_for: str | None = None,
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

    async def adue(self, saga: str, *, now: float, limit: int = 1000) -> list[str]:
        """Async :meth:`SagaStore.due`."""

    async def acounts(self, saga: str) -> dict[str, int]:
        """Async :meth:`SagaStore.counts`."""

    async def asend_signal(
        self, run_id: str, name: str, payload: Any, *, at: float
    ) -> RunRecord | None:
        """Async :meth:`SagaStore.send_signal`."""

    async def asignals(self, run_id: str) -> list[Signal]:
        """Async :meth:`SagaStore.signals`."""
