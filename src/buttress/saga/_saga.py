"""The Saga: named steps with compensations, idempotency keys and a durable log."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, Protocol, TypeVar, overload

from buttress import events as _events
from buttress._policy import Policy
from buttress._validate import check_callable, check_name, check_seconds
from buttress.backends import (
    ANY_SIGNAL,
    CANCEL_SIGNAL,
    COMPENSATION_FAILED,
    FAILED,
    INCOMPLETE,
    RUNNING,
    WAITING,
    AsyncIdempotencyStore,
    AsyncSagaStore,
    IdempotencyStore,
    LogEntry,
    RunRecord,
    SagaStore,
)
from buttress.backends.memory import MemoryStore
from buttress.clock import Clock
from buttress.events import RecoverySkipped
from buttress.exceptions import (
    ConfigTypeError,
    ConfigValueError,
    IdempotencyConflict,
    RunCancelled,
    SagaClosed,
    VersionMismatch,
)
from buttress.registry import Registry
from buttress.retry import Retry

from ._model import (
    Context,
    RecoveryReport,
    SagaResult,
    Step,
    StepFn,
    StepResult,
    _policies,
    check_input,
    check_key,
    check_storable_name,
    describe,
    jsonable,
    wall_clock,
)
from ._runner import (
    ASYNC,
    INLINE,
    THREAD,
    Call,
    Failed,
    Flow,
    Sleep,
    _Run,
    attempt_async,
    attempt_sync,
    drive_async,
    drive_sync,
    new_owner,
    owner_is_dead,
)

__all__ = ["Saga"]

# The decorator form returns the function it is given, with its exact type.
StepF = TypeVar("StepF", bound=StepFn)


class ModelClass(Protocol):
    """A pydantic model class (anything with a ``model_validate`` class method), as
    ``Saga(validate=...)`` takes it."""

    def model_validate(self, obj: Any, /) -> Any: ...


def _face(store: object, protocol: type) -> str:
    if type(store) is MemoryStore:  # a subclass may give its twins real work
        return INLINE
    return ASYNC if isinstance(store, protocol) else THREAD


class _Busy:
    """Another live holder is running the key: wait for ``run_id`` to finish."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id


def _check_run_id(run_id: object) -> None:
    if not isinstance(run_id, str):
        raise ConfigTypeError(f"run_id must be a str, got {run_id!r} ({type(run_id).__name__})")


def _fingerprint(steps: list[Step]) -> str:
    """The default version: a hash of what the steps are, in order (a change inside a
    step's function does not change it: pass ``version=`` to mark one)."""
    text = "\n".join(f"{step.kind}:{step.group or ''}:{step.name}" for step in steps)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _check_signal_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigTypeError(f"name must be a non-empty str, got {name!r}")
    if name.startswith("buttress."):
        raise ConfigValueError(f"signal names starting with 'buttress.' are reserved, got {name!r}")
    return check_storable_name("signal name", name)


def _input_hash(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class Saga(Policy):
    """A sequence of named steps; when one fails, the completed ones are compensated.

    Args:
        name: the saga's name (registers it for ``state()`` and ``health()``).
        store: the run log (default: :class:`~buttress.backends.memory.MemoryStore`);
            use :class:`~buttress.backends.sqlite.SQLiteStore` to survive crashes, or
            :class:`~buttress.backends.postgres.PostgresStore` to share runs between
            machines (a store with async twins is awaited by ``run_async``).
        idempotency: where idempotency keys live (default: the ``store``).
        validate: applied to the input before any step runs: a callable (raising on bad
            input, returning the value to use or ``None`` to keep the input) or a pydantic
            model class.
        timeout: seconds for the forward part of a run; past it, the run compensates.
        listeners: event listeners for this saga only.
        lease: seconds a process holds a run or key without writing to the log before
            another process may take it over (default 30; longer than your slowest step).
        registry: registry to join instead of the default one.
        clock: time source for durations and timeouts and, through its ``wall()``
            reading, for leases, TTLs and log times (default: the system clock;
            :class:`~buttress.testing.FakeClock` drives both).
        health_interval: seconds a ``health()`` answer about a durable store may be
            old (default 5): the store is queried at most that often, on a background
            thread (or by a recovery worker), never inside ``health()``.
        version: the version of this definition, recorded by each run (default: a
            fingerprint of the steps: their kinds, names and order). A run recorded
            under another version is resumed only by the definition of that version.
        previous: older definitions of this saga (same name and store, other versions)
            whose runs may still be in flight: each run continues under its own.
        park_after: a durable sleep or wait that may last longer than this many
            seconds parks the run (status ``"waiting"``, no lease, thread or task held)
            instead of waiting in this process (default 60; ``0``: always park;
            ``None``: never park).
        poll_interval: seconds between two looks at the store by a wait in this
            process (a signal sent from this process wakes it at once; default 1).
        critical: whether an unreachable store fails readiness (default ``False``: it
            degrades ``health()`` to ``"warn"``), as for every policy.
    """

    kind = "saga"

    def __init__(
        self,
        name: str,
        *,
        store: SagaStore | None = None,
        idempotency: SagaStore | None = None,
        validate: Callable[[Any], Any] | type[ModelClass] | ModelClass | None = None,
        timeout: float | timedelta | None = None,
        listeners: Iterable[_events.Listener] = (),
        lease: float | timedelta = 30.0,
        registry: Registry | None = None,
        clock: Clock | None = None,
        health_interval: float | timedelta = 5.0,
        version: str | None = None,
        previous: Iterable[Saga] = (),
        park_after: float | timedelta | None = 60.0,
        poll_interval: float | timedelta = 1.0,
        critical: bool = False,
    ) -> None:
        if check_name(name) is None:
            raise ConfigTypeError("a saga needs a name, got None")
        check_storable_name("name", name)
        super().__init__(
            name=name, listeners=listeners, registry=registry, clock=clock, critical=critical
        )
        self.name: str = name
        if store is not None and not isinstance(store, SagaStore):
            raise ConfigTypeError(
                f"store= must be a saga run log (a buttress.backends.SagaStore: create_run, "
                f"claim_key, write, load, claim_run, incomplete, runs; e.g. MemoryStore, "
                f"SQLiteStore, PostgresStore), got {store!r} ({type(store).__name__})"
                + (
                    "; it keeps idempotency keys only: pass it as idempotency="
                    if isinstance(store, IdempotencyStore)
                    else ""
                )
            )
        if idempotency is not None and not isinstance(idempotency, IdempotencyStore):
            raise ConfigTypeError(
                f"idempotency= must be an idempotency store (a "
                f"buttress.backends.IdempotencyStore: claim_key, write; e.g. "
                f"RedisIdempotencyStore or any saga store), got {idempotency!r} "
                f"({type(idempotency).__name__})"
            )
        self.store: SagaStore = store if store is not None else MemoryStore()
        self.keys: IdempotencyStore = idempotency if idempotency is not None else self.store
        self.store_is_ephemeral = isinstance(self.store, MemoryStore)
        # Stores with async twins (a<method>) are awaited by the async face; the calls of
        # the others run on a worker thread, never on the event loop.
        # How the async face calls each store: awaiting its async twins, inline (the
        # in-memory store waits on no I/O, and a coroutine per call would only add
        # cost), or on a worker thread (a store without async twins).
        self.store_face = _face(self.store, AsyncSagaStore)
        self.keys_face = _face(self.keys, AsyncIdempotencyStore)
        self.wall = wall_clock(self.clock)
        interval = check_seconds("health_interval", health_interval)
        assert interval is not None
        self.health_interval = interval
        self._health: tuple[float, int, str | None] | None = None  # (checked at, stuck, error)
        self._health_refreshing = False
        self._waiting = 0  # runs parked in the store, as the last health refresh counted
        self.validate = check_callable("validate", validate, allow_none=True)
        self.timeout = check_seconds("timeout", timeout, allow_none=True)
        lease_value = check_seconds("lease", lease)
        assert lease_value is not None
        self.lease = lease_value
        self.units: list[list[Step]] = []
        self.all_steps: list[Step] = []
        self.step_by_name: dict[str, Step] = {}
        self._counts = {
            "completed": 0,
            "failed": 0,
            "compensation_failed": 0,
            "replayed": 0,
            "parked": 0,
        }
        self._running = 0
        self._count_lock = threading.Lock()
        self._closed = False  # shutdown() was called: no new run starts
        self._idle = threading.Event()  # set when closed and no run is active
        park = check_seconds("park_after", park_after, allow_none=True, allow_zero=True)
        if park is not None and park < 0:
            raise ConfigValueError(f"park_after must be >= 0 or None, got {park_after!r}")
        self.park_after = park
        poll = check_seconds("poll_interval", poll_interval)
        assert poll is not None
        if poll <= 0:
            raise ConfigValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        self.poll_interval = poll
        if version is not None:
            if not isinstance(version, str) or not version:
                raise ConfigTypeError(f"version must be a non-empty str, got {version!r}")
            check_storable_name("version", version)
        self._version = version
        self._fingerprint = _fingerprint([])
        self.children: list[Saga] = []  # the sagas run as steps of this one
        self._active: dict[str, Any] = {}  # run id -> the run this process drives
        self._watchers: dict[str, list[Callable[[], None]]] = {}
        self._watch_lock = threading.Lock()
        self.previous: list[Saga] = self._check_previous(previous)
        self._register()

    def _check_previous(self, previous: Iterable[Saga]) -> list[Saga]:
        older = list(previous)
        for index, item in enumerate(older):
            if not isinstance(item, Saga):
                raise ConfigTypeError(f"previous[{index}] must be a Saga, got {item!r}")
            if item.name != self.name or item.store is not self.store:
                raise ConfigValueError(
                    f"previous[{index}] must be an older definition of saga {self.name!r} "
                    f"on the same store, got saga {item.name!r} on {item.store!r}"
                )
            # The newest definition stands for the saga in state() and health().
            if item.registry is not None:
                item.registry.unregister(item)
        return older

    @property
    def version(self) -> str:
        """The version runs of this definition record (explicit, or the fingerprint)."""
        return self._version if self._version is not None else self._fingerprint

    def definition_for(self, record: RunRecord) -> Saga:
        """The definition a stored run continues under: this one, or the ``previous``
        one of its version. Raises :class:`~buttress.VersionMismatch` when the run's
        version is not defined here."""
        recorded = record.version
        if recorded is None or recorded == self.version:
            return self
        for older in self.previous:
            if older.version == recorded:
                return older
        versions = (self.version, *(older.version for older in self.previous))
        raise VersionMismatch(
            f"run {record.run_id} of saga {self.name!r} started under version "
            f"{recorded!r}, but this code defines version {self.version!r}"
            + (f" (and {', '.join(map(repr, versions[1:]))})" if len(versions) > 1 else "")
            + ": keep that definition registered (Saga(..., previous=[...])) until its "
            "runs end, or cancel the run",
            run_id=record.run_id,
            run_version=recorded,
            versions=versions,
        )

    def watch(self, run_id: str, wake: Callable[[], None]) -> None:
        """Call ``wake`` when this process signals ``run_id`` (a wait in progress)."""
        with self._watch_lock:
            self._watchers.setdefault(run_id, []).append(wake)

    def unwatch(self, run_id: str, wake: Callable[[], None]) -> None:
        """Stop calling ``wake`` for ``run_id``."""
        with self._watch_lock:
            wakes = self._watchers.get(run_id)
            if wakes is not None and wake in wakes:
                wakes.remove(wake)
                if not wakes:
                    del self._watchers[run_id]

    def _notify(self, run_id: str) -> None:
        with self._watch_lock:
            wakes = list(self._watchers.get(run_id, ()))
        for wake in wakes:
            wake()

    # -- building -----------------------------------------------------------------------------

    def _add(self, steps: list[Step]) -> None:
        for step in steps:
            if step.name in self.step_by_name:
                raise ConfigValueError(
                    f"step names must be unique in a saga, got {step.name!r} twice"
                )
        for step in steps:
            step.build(self.clock)
            # Each policy is applied through its public decorator, which picks the sync or
            # the async wrapper from the function it is given.
            inner, outer = step.attempt_policy, step.retry_policy
            step.call_sync = inner(step.fn) if inner and not step.is_async else step.fn
            step.call_async = inner(step.fn) if inner and step.is_async else step.fn
            step.run_sync = outer(attempt_sync) if outer else attempt_sync
            step.run_async = outer(attempt_async) if outer else attempt_async
            assert step.compensate_policy is not None
            # Compensations go through the same attempt recorder (called with undo=True).
            step.undo_sync = step.compensate_policy(attempt_sync)
            step.undo_async = step.compensate_policy(attempt_async)
            self.step_by_name[step.name] = step
            self.all_steps.append(step)
        self.units.append(steps)
        self._fingerprint = _fingerprint(self.all_steps)

    @overload
    def step(
        self,
        name: str,
        fn: None = None,
        *,
        compensate: StepFn | None = None,
        retry: Retry | None = None,
        timeout: float | timedelta | None = None,
        policy: Policy | None = None,
        compensate_uncertain: bool = False,
        permanent: type[BaseException] | tuple[type[BaseException], ...] = (),
        compensate_retry: Retry | None = None,
        heartbeat_timeout: float | timedelta | None = None,
    ) -> Callable[[StepF], StepF]: ...

    @overload
    def step(
        self,
        name: str,
        fn: StepFn,
        *,
        compensate: StepFn | None = None,
        retry: Retry | None = None,
        timeout: float | timedelta | None = None,
        policy: Policy | None = None,
        compensate_uncertain: bool = False,
        permanent: type[BaseException] | tuple[type[BaseException], ...] = (),
        compensate_retry: Retry | None = None,
        heartbeat_timeout: float | timedelta | None = None,
    ) -> Step: ...

    def step(
        self,
        name: str,
        fn: StepFn | None = None,
        *,
        compensate: StepFn | None = None,
        retry: Retry | None = None,
        timeout: float | timedelta | None = None,
        policy: Policy | None = None,
        compensate_uncertain: bool = False,
        permanent: type[BaseException] | tuple[type[BaseException], ...] = (),
        compensate_retry: Retry | None = None,
        heartbeat_timeout: float | timedelta | None = None,
    ) -> Step | Callable[[StepF], StepF]:
        """Add a step (see :class:`Step` for the options).

        Called with ``fn``, it adds the step and returns the :class:`Step`; without,
        it returns a decorator that adds the decorated function and returns it unchanged.
        """
        options: dict[str, Any] = {
            "compensate": compensate,
            "retry": retry,
            "timeout": timeout,
            "policy": policy,
            "compensate_uncertain": compensate_uncertain,
            "permanent": permanent,
            "compensate_retry": compensate_retry,
            "heartbeat_timeout": heartbeat_timeout,
        }
        if fn is None:

            def decorator(function: StepF) -> StepF:
                self._add([Step(name, function, **options)])
                return function

            return decorator
        step = Step(name, fn, **options)
        self._add([step])
        return step

    def child(
        self,
        name: str,
        saga: Saga,
        *,
        input: Any = None,
        timeout: float | timedelta | None = None,
        policy: Policy | None = None,
    ) -> Step:
        """Add a step that runs another saga as a child run.

        The child's run id is ``"<parent run id>/<name>"``, so a resumed parent never
        starts a second child: it resumes the child, or reads back how it ended. The
        child's report is nested in the parent's (``StepResult.child``); its output is
        this step's output. A child that fails (and compensates itself) fails this step
        with :class:`~buttress.ChildFailed`; when a later step fails, the completed child
        is compensated, its steps last first. Cancelling the parent cancels the child,
        and the parent's deadline bounds the child's. A child that parks (a durable
        wait) parks the parent until it ends.

        Args:
            name: the step's name.
            saga: the child saga; it must use this saga's store.
            input: the child's input: a function of the parent's context, a value, or
                ``None`` for the parent's own input.
            timeout: seconds for the child run (the parent's deadline applies too).
            policy: any other policy (a breaker, a limiter...) around the child run.
        """
        from ._compose import ChildRunner

        if not isinstance(saga, Saga):
            raise ConfigTypeError(f"saga must be a buttress Saga, got {saga!r}")
        if saga is self:
            raise ConfigValueError(f"saga {self.name!r} cannot be a child of itself")
        if saga.store is not self.store:
            raise ConfigValueError(
                f"child saga {saga.name!r} must use the store of its parent {self.name!r} "
                f"(a child run and its parent wake each other through it)"
            )
        runner = ChildRunner(saga, input)
        step = Step(name, runner, compensate=runner.compensate, timeout=timeout, policy=policy)
        step.kind = "child"
        step.child_saga = saga
        self._add([step])
        self.children.append(saga)
        return step

    def map(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        items: Callable[[Context], Iterable[Any]],
        compensate: Callable[..., Any] | None = None,
        concurrency: int = 8,
        retry: Retry | None = None,
        timeout: float | timedelta | None = None,
        policy: Policy | None = None,
    ) -> Step:
        """Add a step that calls ``fn(ctx, item)`` for each item of a collection
        computed when the step runs (``items(ctx)``), at most ``concurrency`` at a time.

        The items are recorded in the log the first time (a resume uses the same
        ones), and each item's outcome as it ends: a resumed step runs only the items
        that have no outcome. When an item fails, no new item starts, the completed
        ones are undone with ``compensate(ctx, item, output)`` (last index first) and
        the step fails with the first error; when a later step fails, every item is
        undone the same way. The step's output is the list of item outputs.
        ``retry``, ``timeout`` and ``policy`` apply to each item's call.
        """
        from ._compose import FanOut, fan_out_step_options

        check_callable("fn", fn)
        check_callable("items", items)
        bound, undo = fan_out_step_options(concurrency, compensate, self.clock)
        item_policy = _policies(
            retry, check_seconds("timeout", timeout, allow_none=True), policy, self.clock
        )
        fanout = FanOut(
            items, fn, compensate=compensate, concurrency=bound, call=item_policy, undo=undo
        )
        if fanout.is_async:
            step = Step(
                name,
                fanout.run_async,
                compensate=fanout.compensate_async if compensate is not None else None,
            )
        else:
            step = Step(
                name,
                fanout.run_sync,
                compensate=fanout.compensate_sync if compensate is not None else None,
            )
        step.kind = "map"
        self._add([step])
        return step

    def parallel(self, name: str, *steps: Step) -> None:
        """Add a group of steps that run concurrently; it completes when all of them do.

        If a member fails, the members that completed are compensated with the rest.
        """
        if check_name(name) is None:
            raise ConfigTypeError("a parallel group needs a name, got None")
        if not steps:
            raise ConfigValueError(f"parallel group {name!r} needs at least one step, got none")
        for index, item in enumerate(steps):
            if not isinstance(item, Step):
                raise ConfigTypeError(
                    f"steps[{index}] of parallel group {name!r} must be a buttress.Step, "
                    f"got {item!r}"
                )
            item.group = name
        self._add(list(steps))

    # -- starting a run -------------------------------------------------------------------------

    def _check_input(self, value: Any) -> tuple[Any, BaseException | None]:
        if self.validate is None:
            return value, None
        checker: Any = self.validate
        try:
            if isinstance(checker, type) and hasattr(checker, "model_validate"):
                return checker.model_validate(value), None  # a pydantic model
            checked = checker(value)
        except Exception as exc:
            return value, exc
        return (value if checked is None else checked), None

    def _store(self, method: str, *args: Any, **kwargs: Any) -> Call:
        return Call(self.store, self.store_face, method, args, kwargs)

    def _keys(self, method: str, *args: Any, **kwargs: Any) -> Call:
        return Call(self.keys, self.keys_face, method, args, kwargs)

    def _begin(
        self, raw: Any, key: str | None, ttl: float | None, owner: str
    ) -> Flow[_Run | SagaResult | _Busy]:
        value, invalid = self._check_input(raw)
        now = self.wall()
        record = RunRecord(
            ttl=ttl,
            run_id=os.urandom(16).hex(),
            saga=self.name,
            status=RUNNING,
            input=raw,
            key=key,
            input_hash=None if key is None else _input_hash(raw),
            created_at=now,
            updated_at=now,
            owner=owner,
            lease_until=now + self.lease,
            version=self.version,
            deadline=None if self.timeout is None else now + self.timeout,
        )
        if key is None:
            yield Call(self.store, self.store_face, "create_run", (record,), {})
        else:
            claim = yield self._keys("claim_key", record, now=now)
            if claim.outcome == "busy" and claim.record is not None:
                if owner_is_dead(claim.record.owner) and (
                    yield self._store(
                        "claim_run",
                        claim.run_id,
                        owner,
                        now=now,
                        lease_until=now + self.lease,
                        expected_owner=claim.record.owner,
                    )
                ):
                    return (yield from self._resume(claim.run_id, owner))
                return _Busy(claim.run_id)
            if claim.outcome == "done":
                assert claim.record is not None
                assert claim.record.result is not None
                return self._replayed(SagaResult.from_dict(claim.record.result))
            if claim.outcome == "conflict":
                raise IdempotencyConflict(
                    f"idempotency key {key!r} of saga {self.name!r} was used with a different "
                    f"input (run {claim.run_id})",
                    key=key,
                    run_id=claim.run_id,
                )
            if claim.outcome == "blocked":
                raise IdempotencyConflict(
                    f"idempotency key {key!r} of saga {self.name!r} belongs to run "
                    f"{claim.run_id}, stuck in compensation_failed: an operator must resolve "
                    f"it (Saga.resolve) before the key can run again",
                    key=key,
                    run_id=claim.run_id,
                )
            if claim.outcome == "resume":
                return (yield from self._resume(claim.run_id, owner))
            if self.keys is not self.store:
                yield self._store("create_run", record)
        run = _Run(
            self, record.run_id, raw, value, key=key, ttl=ttl, owner=owner, deadline=record.deadline
        )
        if invalid is not None:
            return (yield from self._reject_input(run, invalid))
        self._track(run)
        return run

    def _track(self, run: _Run) -> None:
        with self._count_lock:
            self._running += 1
            self._active[run.run_id] = run

    def _reject_input(self, run: _Run, error: BaseException) -> Flow[SagaResult]:
        self.emit(_events.RunStarted, run_id=run.run_id, resumed=False)
        with self._count_lock:
            self._counts["failed"] += 1
        run.failure = error
        run.note("", "invalid_input", error=describe(error))
        report = SagaResult(
            saga=self.name,
            status=FAILED,
            run_id=run.run_id,
            key=run.key,
            error=error,
            steps=[StepResult(step.name, group=step.group) for step in self.all_steps],
        )
        yield run.save(
            status=FAILED, error=describe(error), result=report.to_dict(), expires_at=None
        )
        self.emit(_events.RunFailed, run_id=run.run_id, error=describe(error), compensated=True)
        return report

    def _resume(self, run_id: str, owner: str) -> Flow[_Run]:
        loaded = yield self._store("load", run_id)
        if loaded is None:
            raise ConfigValueError(f"run {run_id!r} is not in the store of saga {self.name!r}")
        record, entries = loaded
        definition = self.definition_for(record)
        signals = yield self._store("signals", run_id)
        value, _ = definition._check_input(record.input)
        run = _Run(
            definition,
            run_id,
            record.input,
            value,
            key=record.key,
            ttl=record.ttl,
            owner=owner,
            deadline=record.deadline,
            parent=record.parent,
        )
        run.replay(entries, record.status, record.error)
        run.cancel_from(signals)
        definition._track(run)
        return run

    def take_parked(self, run_id: str, report: SagaResult | None) -> Flow[Any]:
        """Take a parked run (or one whose holder is gone) and drive it on; ``report``
        when another process took it first."""
        owner = new_owner()
        now = self.wall()
        won = yield self._store("claim_run", run_id, owner, now=now, lease_until=now + self.lease)
        if not won:
            return report
        run = yield from self._resume(run_id, owner)
        return (yield from run.flow())

    @property
    def _needs_loop(self) -> bool:
        return any(step.is_async or step.compensate_is_async for step in self.all_steps)

    @property
    def listening(self) -> bool:
        """Someone listens to this saga's events: its own listeners or global ones (the
        runner builds its hot events only then)."""
        return bool(self._listeners or _events.hub.listeners)

    def finished_run(self, status: str | None, run_id: str | None = None) -> None:
        """A run of this process ended (``status=None``: cut off by an exception; its log
        stays where it was, for recovery; ``"parked"``: it waits, holding nothing)."""
        with self._count_lock:
            self._running -= 1
            if run_id is not None:
                self._active.pop(run_id, None)
            if status is not None:
                self._counts[status if status in self._counts else "failed"] += 1
            if self._closed and self._running <= 0:
                self._idle.set()

    def _replayed(self, result: SagaResult) -> SagaResult:
        with self._count_lock:
            self._counts["replayed"] += 1
        self.emit(
            _events.RunReplayed, run_id=result.run_id, key=result.key or "", status=result.status
        )
        return result

    def _final_result(self, run_id: str) -> Flow[SagaResult | None]:
        loaded = yield self._store("load", run_id)
        if loaded is None:
            return None
        record, _ = loaded
        if record.status in INCOMPLETE or record.result is None:
            return None
        return self._replayed(SagaResult.from_dict(record.result))

    # -- running --------------------------------------------------------------------------------

    def _open(self, raw: Any, key: str | None, ttl: float | None) -> Flow[_Run | SagaResult]:
        """The start of one ``run()``: the run to drive, once its key is claimed (waiting
        while another holder runs it), or the result that makes running unnecessary."""
        owner = new_owner()
        delay = 0.005
        while True:
            begun = yield from self._begin(raw, key, ttl, owner)
            if not isinstance(begun, _Busy):
                return begun
            result = yield from self._final_result(begun.run_id)
            if result is not None:
                return result
            yield Sleep(delay)
            delay = min(delay * 2, 0.2)

    def _check_run(
        self, raw: Any, key: str | None, ttl: float | None
    ) -> tuple[str | None, float | None]:
        """Refuse, before anything runs or is stored, what a run cannot start with."""
        if not self.all_steps:
            raise ConfigValueError(f"saga {self.name!r} has no steps: add one with saga.step()")
        if self._closed:
            raise SagaClosed(f"saga {self.name!r} is shutting down: it starts no new run")
        key = check_key(self.name, key)
        ttl = check_seconds("ttl", ttl, allow_none=True)
        check_input(self.name, raw)
        return key, ttl

    def run(
        self, input: Any = None, *, key: str | None = None, ttl: float | None = None
    ) -> SagaResult:
        """Run the saga from sync code (async steps run on a private event loop).

        Args:
            input: the run's input (``ctx.input``); JSON-serialisable for durable stores.
            key: an idempotency key: a completed run with this key (within ``ttl``) is
                returned without running any step; a concurrent run with it is joined.
            ttl: seconds a completed keyed run is remembered (default: forever).
        """
        key, ttl = self._check_run(input, key, ttl)
        if self._needs_loop:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                raise RuntimeError(
                    f"saga {self.name!r} has async steps and an event loop is running in this "
                    f"thread: use `await saga.run_async(...)`"
                )
        begun = drive_sync(self._open(input, key, ttl))
        if isinstance(begun, SagaResult):
            return begun
        return drive_sync(begun.flow())

    async def run_async(
        self, input: Any = None, *, key: str | None = None, ttl: float | None = None
    ) -> SagaResult:
        """Run the saga from async code. It never blocks the event loop: sync steps,
        sync compensations (with their retry backoffs) and the calls of a store without
        async twins run on worker threads; an async store is awaited."""
        key, ttl = self._check_run(input, key, ttl)
        begun = await drive_async(self._open(input, key, ttl))
        if isinstance(begun, SagaResult):
            return begun
        return await drive_async(begun.flow())

    # -- recovery and operators -----------------------------------------------------------------

    def _recover(self, owner: str, stop: Callable[[], bool] | None) -> Flow[RecoveryReport]:
        """Take the incomplete runs one at a time (so that several recoverers share
        them, and one told to stop claims nothing more) and finish each."""
        report = RecoveryReport()
        due = yield self._store("due", self.name, now=self.wall())
        for run_id in [*(yield self._store("incomplete", self.name)), *due]:
            if stop is not None and stop():
                break
            loaded = yield Call(self.store, self.store_face, "load", (run_id,), {}, True)
            if isinstance(loaded, Failed):
                self._skip(report, run_id, loaded.error)
                continue
            if loaded is None:
                continue
            record, _ = loaded
            try:
                self.definition_for(record)
            except VersionMismatch as exc:
                self._skip(report, run_id, exc)
                continue
            now = self.wall()
            dead = owner_is_dead(record.owner)
            claim = {
                "now": now,
                "lease_until": now + self.lease,
                "expected_owner": record.owner if dead else None,
            }
            won = yield Call(self.store, self.store_face, "claim_run", (run_id, owner), claim, True)
            if isinstance(won, Failed):  # e.g. its row stayed locked past the bounded wait
                self._skip(report, run_id, won.error)
                continue
            if not won:
                report.held.append(run_id)
                continue
            run = yield from self._resume(run_id, owner)
            report.append((yield from run.flow()))
        return report

    def _skip(self, report: RecoveryReport, run_id: str, error: Exception) -> None:
        text = describe(error) or ""
        report.skipped[run_id] = text
        self.emit(RecoverySkipped, run_id=run_id, error=text)

    def recover(self, *, stop: Callable[[], bool] | None = None) -> RecoveryReport:
        """Finish every incomplete run whose holder is gone (crashed, or its lease expired).

        A run that was going forward resumes at the first step not recorded as completed
        (a step that started but did not record its completion runs again: steps are
        at-least-once); a run that was compensating finishes its compensation. Runs are
        taken one at a time; ``stop`` (checked before each) ends the pass early.

        Returns the results, as a list, with ``.skipped`` (runs it could not take: a
        row lock that did not clear within the store's bounded wait, a store error;
        each also emits :class:`RecoverySkipped`) and ``.held`` (runs a live holder
        is running).
        """
        return drive_sync(self._recover(new_owner(), stop))

    async def recover_async(self, *, stop: Callable[[], bool] | None = None) -> RecoveryReport:
        """Async twin of :meth:`recover` (an async store is awaited)."""
        return await drive_async(self._recover(new_owner(), stop))

    # -- signals and cancellation ---------------------------------------------------------------

    def _load_live(self, run_id: str, what: str) -> Flow[tuple[RunRecord, list[LogEntry], Saga]]:
        loaded = yield self._store("load", run_id)
        if loaded is None:
            raise ConfigValueError(f"run {run_id!r} is not in the store of saga {self.name!r}")
        record, entries = loaded
        if record.saga != self.name:
            raise ConfigValueError(
                f"run {run_id!r} is a run of saga {record.saga!r}, not of {self.name!r}"
            )
        definition = self.definition_for(record)  # refuses a version not defined here
        if record.status not in INCOMPLETE:
            raise ConfigValueError(
                f"run {run_id!r} of saga {self.name!r} has ended ({record.status}): "
                f"there is nothing to {what}"
            )
        return record, entries, definition

    def _signal(self, run_id: str, name: str, payload: Any, resume: bool) -> Flow[Any]:
        _, _, definition = yield from self._load_live(run_id, "signal")
        stored = yield self._store("send_signal", run_id, name, jsonable(payload), at=self.wall())
        if stored is None:
            raise ConfigValueError(f"run {run_id!r} is not in the store of saga {self.name!r}")
        self.emit(_events.SignalSent, run_id=run_id, signal=name)
        self._notify(run_id)  # a wait of this process wakes at once
        if resume and stored.status == WAITING and stored.waiting_for in (name, ANY_SIGNAL):
            return (yield from definition.take_parked(run_id, None))
        return None

    def signal(
        self, run_id: str, name: str, payload: Any = None, *, resume: bool = True
    ) -> SagaResult | None:
        """Send ``payload`` to the run's ``ctx.wait_for(name)``: durably, from any process
        sharing the store; kept if the wait has not begun, consumed once.

        With ``resume`` (the default), a run parked waiting for ``name`` is taken and
        driven on right here, and its report (completed, failed, or waiting again) is
        returned; else ``None`` (the run goes on where it is waiting, or a recovery
        worker takes it on its next pass). Raises ``ConfigValueError`` for an unknown
        or finished run and :class:`~buttress.VersionMismatch` for a run of a version
        this code does not define.
        """
        _check_run_id(run_id)
        name = _check_signal_name(name)
        check_input(self.name, payload, what="signal payload")
        result: SagaResult | None = drive_sync(self._signal(run_id, name, payload, resume))
        return result

    async def signal_async(
        self, run_id: str, name: str, payload: Any = None, *, resume: bool = True
    ) -> SagaResult | None:
        """Async twin of :meth:`signal`."""
        _check_run_id(run_id)
        name = _check_signal_name(name)
        check_input(self.name, payload, what="signal payload")
        result: SagaResult | None = await drive_async(self._signal(run_id, name, payload, resume))
        return result

    def _cancel(self, run_id: str, reason: str) -> Flow[Any]:
        record, entries, definition = yield from self._load_live(run_id, "cancel")
        yield self._store("send_signal", run_id, CANCEL_SIGNAL, reason, at=self.wall())
        self.emit(_events.RunCancelled, run_id=run_id, reason=reason)
        # Children first: each compensates what it completed, then the parent does.
        for entry in entries:
            if entry.event != "child" or not isinstance(entry.output, dict):
                continue
            step = definition.step_by_name.get(entry.step)
            child = getattr(step, "child_saga", None)
            if isinstance(child, Saga):
                with contextlib.suppress(ConfigValueError):  # it has ended already
                    yield from child._cancel(
                        str(entry.output.get("run_id")), f"its parent run {run_id} was cancelled"
                    )
        error = RunCancelled(f"run {run_id} was cancelled: {reason}")
        active = definition._active.get(run_id)
        if active is not None:  # this process drives it: it stops at its next step or wait
            active.abort = error
            self._notify(run_id)
            return None
        now = self.wall()
        won = yield self._store(
            "claim_run",
            run_id,
            new_owner(),
            now=now,
            lease_until=now + self.lease,
            expected_owner=record.owner if owner_is_dead(record.owner) else None,
        )
        if not won:  # a live process elsewhere holds it: it sees the request at its next
            return None  # wait, sleep, heartbeat or resume
        run = yield from definition._resume(run_id, new_owner())
        return (yield from run.flow())

    def cancel(self, run_id: str, *, reason: str = "cancelled by an operator") -> SagaResult | None:
        """Cancel an unfinished run: it compensates what it completed (its children
        first), and its report is returned when this process could take it at once (a
        waiting run, or one whose holder is gone). A run that this process is driving
        stops at its next step, wait or heartbeat; one that another live process holds
        sees the request at its next wait, sleep, heartbeat or resume (``None``)."""
        _check_run_id(run_id)
        result: SagaResult | None = drive_sync(self._cancel(run_id, str(reason)))
        return result

    async def cancel_async(
        self, run_id: str, *, reason: str = "cancelled by an operator"
    ) -> SagaResult | None:
        """Async twin of :meth:`cancel`."""
        _check_run_id(run_id)
        result: SagaResult | None = await drive_async(self._cancel(run_id, str(reason)))
        return result

    # -- shutting down --------------------------------------------------------------------------

    def shutdown(self, timeout: float | timedelta = 30.0) -> int:
        """Stop starting runs and wait up to ``timeout`` seconds for the active ones.

        From now on ``run()``/``run_async()`` raise :class:`SagaClosed` (a
        :class:`~buttress.RejectedError`: nothing ran). Returns how many runs of this
        process were still active when the time was up (0: all finished). Those keep
        their log where it is: once this process exits, a recovery worker (or
        ``recover()``) finishes them after their lease (at once on the same host).
        """
        seconds = check_seconds("timeout", timeout)
        assert seconds is not None
        with self._count_lock:
            self._closed = True
            if self._running <= 0:
                self._idle.set()
        self.clock.wait(self._idle, seconds)
        with self._count_lock:
            return max(self._running, 0)

    async def shutdown_async(self, timeout: float | timedelta = 30.0) -> int:
        """Async twin of :meth:`shutdown` (the waiting happens off the loop)."""
        return await asyncio.to_thread(self.shutdown, timeout)

    @property
    def closed(self) -> bool:
        """``shutdown()`` was called: the saga starts no new run."""
        return self._closed

    def _resolve(self, run_id: str, note: str) -> Flow[None]:
        loaded = yield self._store("load", run_id)
        if loaded is None or loaded[0].status != COMPENSATION_FAILED:
            raise ConfigValueError(f"run {run_id!r} is not in compensation_failed")
        record, entries = loaded
        seq = max((e.seq for e in entries), default=0) + 1
        yield self._store(
            "write",
            run_id,
            [LogEntry(seq, "", "resolved", at=self.wall(), error=note)],
            status=FAILED,
            error=record.error,
            result=record.result,
            expires_at=record.expires_at,
        )
        if self.keys is not self.store:
            yield self._keys(
                "write", run_id, [], status=FAILED, error=record.error, result=record.result
            )

    def resolve(self, run_id: str, *, note: str = "resolved by an operator") -> None:
        """Mark a run stuck in ``compensation_failed`` as dealt with (``failed``), so its
        idempotency key may run again."""
        _check_run_id(run_id)
        drive_sync(self._resolve(run_id, note))

    async def resolve_async(self, run_id: str, *, note: str = "resolved by an operator") -> None:
        """Async twin of :meth:`resolve`."""
        _check_run_id(run_id)
        await drive_async(self._resolve(run_id, note))

    # -- state ----------------------------------------------------------------------------------

    def _probe(self) -> Flow[tuple[int, int]]:
        counts = yield self._store("counts", self.name)
        return counts.get(COMPENSATION_FAILED, 0), counts.get(WAITING, 0)

    def refresh_health(self) -> None:
        """Query the store now for what ``health()`` reports (runs stuck in
        ``compensation_failed``, or the store's error). A recovery worker calls it on
        every pass; ``health()`` itself only reads the answer."""
        stuck, waiting, error = 0, 0, None
        try:
            stuck, waiting = drive_sync(self._probe())
        except Exception as exc:
            error = describe(exc)
        finally:
            self._health_refreshing = False
        self._health = (self.clock.now(), stuck, error)
        self._waiting = waiting

    async def refresh_health_async(self) -> None:
        """Async twin of :meth:`refresh_health` (off the loop for a sync store)."""
        stuck, waiting, error = 0, 0, None
        try:
            stuck, waiting = await drive_async(self._probe())
        except Exception as exc:
            error = describe(exc)
        finally:
            self._health_refreshing = False
        self._health = (self.clock.now(), stuck, error)
        self._waiting = waiting

    def _cached_health(self) -> tuple[int, str | None] | None:
        """The last answer; a stale or missing one is refreshed in the background (an
        in-memory store, which does no I/O, is asked at once)."""
        if self.store_is_ephemeral:
            self.refresh_health()
        cached = self._health
        stale = cached is None or self.clock.now() - cached[0] >= self.health_interval
        if stale and not self._health_refreshing:
            self._health_refreshing = True
            threading.Thread(
                target=self.refresh_health, name=f"buttress-health-{self.name}", daemon=True
            ).start()
        return None if cached is None else (cached[1], cached[2])

    def snapshot(self) -> dict[str, Any]:
        with self._count_lock:
            counts = dict(self._counts)
            running = self._running
        cached = self._cached_health()
        return {
            "kind": self.kind,
            "name": self.name,
            "steps": [step.name for step in self.all_steps],
            "running": running,
            **counts,
            "stuck": None if cached is None else cached[0],
            "waiting": None if cached is None else self._waiting,
            "version": self.version,
            "store": type(self.store).__name__,
            "store_error": None if cached is None else cached[1],
        }

    def health_check(self) -> tuple[str, Any, str]:
        cached = self._cached_health()
        if cached is None:
            return "warn", None, "the store has not been checked yet (a check is running)"
        stuck, error = cached
        if error is not None:
            return "fail", None, f"the store is unreachable: {error}"
        if stuck:
            return "warn", stuck, f"{stuck} run(s) stuck in compensation_failed"
        return "pass", 0, ""

    def __call__(self, fn: Any) -> Any:
        raise ConfigTypeError(
            "a Saga is not a decorator; add steps with @saga.step(name) and run it with "
            "saga.run(input)"
        )
