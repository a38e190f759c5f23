"""The saga runner: one flow of decisions, two thin drivers.

``_Run.flow()`` is a generator holding every decision of a run: which steps go
next, what the log records and when it is saved, when to compensate and in
which order. It yields instructions (save the log and run these steps; save the
log and compensate that step; save the final report; call the store) and
receives their outcomes. ``drive_sync`` and ``drive_async`` execute the
instructions, each in its own way of waiting; they decide nothing. Store I/O is
one of those instructions, so an async store (one with the ``a``-prefixed twins
of :class:`~buttress.backends.AsyncSagaStore`) is awaited by ``drive_async``
while ``drive_sync`` calls the plain methods.

The log is written before every side effect: the entries gathered since the last
save (a step's completion, the next step's start) go to the store in one write
right before the next step or compensation is invoked, and the final status with
the report at the end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import socket
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from buttress import events as _events
from buttress._deadline import reset_deadline, set_deadline
from buttress.backends import (
    ANY_SIGNAL,
    CANCEL_SIGNAL,
    COMPENSATING,
    COMPENSATION_FAILED,
    COMPLETED,
    FAILED,
    RUNNING,
    WAITING,
    LogEntry,
)
from buttress.exceptions import (
    ChildFailed,
    ConfigTypeError,
    Permanent,
    TimeoutExceeded,
    WaitTimedOut,
)
from buttress.timeout import Timeout

from . import _waits
from ._calls import ASYNC, INLINE, THREAD, Call, Failed, store_call
from ._model import (
    AttemptRecord,
    Context,
    SagaResult,
    Step,
    StepResult,
    StoredError,
    describe,
    jsonable,
)

if TYPE_CHECKING:
    from ._saga import Saga

__all__ = [
    "ASYNC",
    "INLINE",
    "THREAD",
    "Call",
    "Failed",
    "Sleep",
    "drive_async",
    "drive_sync",
    "new_owner",
    "owner_is_dead",
]

_HOST = socket.gethostname()


_owner: tuple[int, str] = (0, "")


def new_owner() -> str:
    """This process's identity as a lease holder: host, process id and a random suffix
    (made once per process, and anew after a fork)."""
    global _owner
    pid = os.getpid()
    if _owner[0] != pid:
        _owner = (pid, f"{_HOST}:{pid}:{uuid.uuid4().hex[:8]}")
    return _owner[1]


def owner_is_dead(owner: str | None) -> bool:
    """True if ``owner`` was a process on this host that no longer exists."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != _HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(slots=True)
class _Outcome:
    step: Step
    value: Any = None
    error: BaseException | None = None
    history: list[AttemptRecord] = field(default_factory=list)
    started_at: float = 0.0
    duration: float = 0.0
    park: _waits.Park | None = None  # the step parked the run (a durable wait)

    @property
    def ok(self) -> bool:
        return self.error is None and self.park is None

    @property
    def uncertain(self) -> bool:
        return isinstance(self.error, (TimeoutExceeded, asyncio.CancelledError))


@dataclass(slots=True)
class _Save:
    """Instruction: write the log entries gathered since the last save, the lease and,
    at the end, the final status (``final``: the status, error, result and expiry)."""

    run: _Run
    entries: list[LogEntry]
    lease_until: float | None
    final: dict[str, Any]


@dataclass(slots=True)
class _Forward(_Save):
    """Instruction: save, then run these steps (one, or a parallel group) forward."""

    steps: list[Step]
    ctx: Context
    deadline: float | None


@dataclass(slots=True)
class _Undo(_Save):
    """Instruction: save, then compensate this step."""

    step: Step
    ctx: Context


# The ``final`` of the saves before the last (never mutated).
_NOT_FINAL: dict[str, Any] = {}
_COMPENSATING: dict[str, Any] = {"status": COMPENSATING}
_RUNNING: dict[str, Any] = {"status": RUNNING}  # the first save of a run woken from waiting


@dataclass(slots=True)
class Sleep:
    """Instruction: wait this many seconds (another holder is running the key)."""

    seconds: float


Instruction = _Forward | _Undo | _Save | Call | Sleep

# Log events that a durable wait or a fan-out step writes while its step runs.
_MARKS = frozenset({"sleep", "wait", "received", "wait_expired", "child"})
_FANOUT = frozenset({"items", "item", "item_compensated", "item_compensation_failed"})
T = TypeVar("T")
Flow = Generator[Instruction, Any, T]


class _Run:
    """The state of one run, and the flow that advances it."""

    def __init__(
        self,
        saga: Saga,
        run_id: str,
        raw_input: Any,
        value: Any,
        *,
        key: str | None,
        ttl: float | None,
        owner: str,
        deadline: float | None = None,
        parent: str | None = None,
    ) -> None:
        self.saga = saga
        self.run_id = run_id
        self.raw_input = raw_input
        self.key = key
        self.ttl = ttl
        self.owner = owner
        self.outputs: dict[str, Any] = {}
        self.ctx = Context(value, run_id, self.outputs, self)
        self.results: dict[str, StepResult] = {
            s.name: StepResult(s.name, group=s.group) for s in saga.all_steps
        }
        self.done: list[str] = []  # completion order: the compensation stack
        self.compensated: set[str] = set()
        self.compensation_ok = True
        self.failure: BaseException | None = None
        self.compensating = False
        self.resumed = False
        self.abort: BaseException | None = None  # set by a driver whose caller was cancelled
        self.pending: list[LogEntry] = []
        self._seq = itertools.count(1)  # thread-safe: steps of a group log from threads
        self.started = saga.clock.now()
        self.open = True  # counted among the saga's running runs
        # Durable waits: what each (step, index) wait recorded, the signals consumed.
        self.marks: dict[tuple[str, int], dict[str, Any]] = {}
        self.consumed: set[int] = set()
        self.seen_signal = 0  # the newest signal id a wait of this process has looked at
        self.woken = False  # resumed from "waiting": the first save says "running"
        self.parent = parent
        self.children: dict[str, Any] = {}  # step -> the child run's SagaResult
        # A fan-out step's recorded items, outputs by index, compensated indexes.
        self.fanout: dict[str, dict[str, Any]] = {}
        if deadline is None and saga.timeout is not None:
            deadline = saga.wall() + saga.timeout
        self.deadline_wall = deadline  # the run's absolute deadline (epoch seconds)

    # -- the log ----------------------------------------------------------------------------

    def note(self, step: str, event: str, **fields: Any) -> None:
        self.pending.append(LogEntry(next(self._seq), step, event, at=self.saga.wall(), **fields))

    def entry(self, step: str, event: str, **fields: Any) -> LogEntry:
        """A log entry to write at once (by a wait or a heartbeat, while a step runs)."""
        return LogEntry(next(self._seq), step, event, at=self.saga.wall(), **fields)

    def deadline_error(self) -> TimeoutExceeded:
        """The error of a run past its deadline."""
        saga = self.saga
        timeout = saga.timeout
        shown = f"its {timeout:g}s timeout" if timeout is not None else "its deadline"
        return TimeoutExceeded(f"saga {saga.name!r} ran out of {shown}", timeout=timeout)

    # -- durable waits (what a step's Context calls) --------------------------------------------

    def _sync_face(self, what: str) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        raise ConfigTypeError(
            f"ctx.{what}() would block the event loop of this async step: use "
            f"`await ctx.{what}_async(...)`"
        )

    def sleep(self, ctx: Context, seconds: Any) -> None:
        self._sync_face("sleep")
        _waits.pump_sync(self, _waits.sleep_flow(self, ctx, seconds))

    async def sleep_async(self, ctx: Context, seconds: Any) -> None:
        await _waits.pump_async(self, _waits.sleep_flow(self, ctx, seconds))

    def wait_for(self, ctx: Context, name: str, timeout: Any, deadline: Any) -> Any:
        self._sync_face("wait_for")
        return _waits.pump_sync(self, _waits.wait_flow(self, ctx, name, timeout, deadline))

    async def wait_for_async(self, ctx: Context, name: str, timeout: Any, deadline: Any) -> Any:
        flow = _waits.wait_flow(self, ctx, name, timeout, deadline)
        return await _waits.pump_async(self, flow)

    def heartbeat(self, ctx: Context, details: Any) -> None:
        self._sync_face("heartbeat")
        _waits.pump_sync(self, _waits.heartbeat_flow(self, ctx, details))

    async def heartbeat_async(self, ctx: Context, details: Any) -> None:
        await _waits.pump_async(self, _waits.heartbeat_flow(self, ctx, details))

    def save(self, **final: Any) -> _Save:
        """The final write: everything noted since the last save, with how the run ended
        (performed by the driver)."""
        entries, self.pending = self.pending, []
        return _Save(self, entries, None, final)

    def replay(self, entries: list[LogEntry], status: str, error: str | None) -> None:
        """Rebuild the state of a run from its log (crash recovery)."""
        self.resumed = True
        self.woken = status == WAITING
        by_name = self.saga.step_by_name
        last = 0
        for entry in entries:
            last = max(last, entry.seq)
            result = self.results.get(entry.step)
            if entry.event == "compensating":
                self.compensating = True
            if entry.event in _MARKS:
                self._mark(entry)
                continue
            if entry.event in _FANOUT:
                self._fanout_mark(entry)
                continue
            if result is None:
                continue
            if entry.event == "started":
                result.started_at = entry.at
            elif entry.event == "completed":
                result.status = "completed"
                result.output = entry.output
                result.attempts = entry.attempt
                result.duration = entry.duration
                self.outputs[entry.step] = entry.output
                self.done.append(entry.step)
            elif entry.event in ("failed", "uncertain"):
                result.status = "failed"
                result.error = StoredError(entry.error or "failed")
                result.attempts = entry.attempt
                if entry.event == "uncertain":
                    result.uncertain = True
                    if by_name[entry.step].compensate_uncertain:
                        self.done.append(entry.step)
                if self.failure is None:
                    self.failure = result.error
            elif entry.event == "compensated":
                result.status = "compensated"
                self.compensated.add(entry.step)
            elif entry.event == "compensation_failed":
                result.status = "compensation_failed"
                result.compensation_error = StoredError(entry.error or "failed")
                self.compensated.add(entry.step)
                self.compensation_ok = False
        self._seq = itertools.count(last + 1)
        if status == COMPENSATING:
            self.compensating = True
        if self.compensating and self.failure is None:
            self.failure = StoredError(error or "the run was compensating when it was interrupted")

    def _mark(self, entry: LogEntry) -> None:
        """Replay what a durable wait recorded (see :mod:`._waits`)."""
        data = entry.output if isinstance(entry.output, dict) else {}
        index = data.get("index")
        if entry.event == "child":
            self.marks[(entry.step, -1)] = data  # the child's run id
            return
        if not isinstance(index, int):
            return
        mark = self.marks.setdefault((entry.step, index), {"index": index})
        mark.update(data)
        if entry.event == "received" and isinstance(data.get("id"), int):
            self.consumed.add(data["id"])
        elif entry.event == "wait_expired":
            mark["expired"] = True

    def _fanout_mark(self, entry: LogEntry) -> None:
        data = entry.output if isinstance(entry.output, dict) else {}
        state = self.fanout.setdefault(entry.step, {"items": None, "done": {}, "undone": set()})
        if entry.event == "items":
            state["items"] = data.get("items")
        elif entry.event == "item" and isinstance(data.get("index"), int):
            state["done"][data["index"]] = data.get("output")
        elif isinstance(data.get("index"), int):
            state["undone"].add(data["index"])
            if entry.event == "item_compensation_failed":
                self.compensation_ok = False

    def cancel_from(self, signals: list[Any]) -> None:
        """A cancellation was asked while the run was away: it compensates now."""
        if not self.compensating:
            _waits.cancel_requested(self, signals)

    # -- the flow -----------------------------------------------------------------------------

    def flow(self) -> Flow[SagaResult]:
        """The run, from where its log says it is to its final save."""
        try:
            return (yield from self._flow())
        finally:
            # The context points back at this run for its durable waits: break the
            # cycle, so that a finished run (and its saga) is freed without the GC.
            self.ctx._run = None
            if self.open:  # ended by an exception (a store error, a cancellation...)
                self.open = False
                self.saga.finished_run(None, self.run_id)

    def _flow(self) -> Flow[SagaResult]:
        saga = self.saga
        # The hot events are built only when someone listens (the check emit makes,
        # done here to skip the call and its arguments on the common path).
        if saga.listening:
            saga.emit(_events.RunStarted, run_id=self.run_id, resumed=self.resumed)
        deadline = None
        if self.deadline_wall is not None:
            deadline = saga.clock.now() + (self.deadline_wall - saga.wall())
        status = None
        if not self.compensating:
            for unit in saga.units:
                todo = [step for step in unit if step.name not in self.outputs]
                if not todo:
                    continue
                if self.abort is not None:
                    self.failure = self.abort
                    break
                if deadline is not None and saga.clock.now() >= deadline:
                    self.failure = self.deadline_error()
                    for step in todo:
                        self.results[step.name].status = "not_run"
                    break
                for step in todo:
                    self.note(step.name, "started")
                    if saga.listening:
                        saga.emit(_events.StepStarted, run_id=self.run_id, step=step.name)
                entries, self.pending = self.pending, []
                lease = saga.lease
                for step in todo:
                    if step.heartbeat_timeout is not None:
                        lease = min(lease, step.heartbeat_timeout)
                outcomes: list[_Outcome] = yield _Forward(
                    self,
                    entries,
                    saga.wall() + lease,
                    _RUNNING if self.woken else _NOT_FINAL,
                    todo,
                    self.ctx,
                    deadline,
                )
                self.woken = False
                parked = []
                for outcome in outcomes:
                    if outcome.park is None:
                        self._record(outcome)
                    else:
                        parked.append(outcome)
                failed = [o for o in outcomes if o.error is not None and o.park is None]
                if failed:
                    self.failure = failed[0].error
                    for outcome in parked:  # a member parked beside one that failed
                        self.results[outcome.step.name].status = "not_run"
                    break
                if parked:
                    return (yield from self._park(parked))
                aborted = self._aborted()  # a driver may have set it while we yielded
                if aborted is not None:
                    self.failure = aborted
                    break
            if self.failure is None:
                status = COMPLETED
            else:
                self.compensating = True
                self.note("", "compensating", error=describe(self.failure))
        for name in reversed(self.done) if status is None else ():
            step = saga.step_by_name[name]
            if name in self.compensated or step.compensate is None:
                continue
            self.note(name, "compensation_started")
            saga.emit(_events.CompensationStarted, run_id=self.run_id, step=name)
            entries, self.pending = self.pending, []
            undone: _Outcome = yield _Undo(
                self, entries, saga.wall() + saga.lease, _COMPENSATING, step, self.ctx
            )
            result = self.results[name]
            self.compensated.add(name)
            if undone.ok:
                result.status = "compensated"
                self.note(name, "compensated", attempt=len(undone.history))
                saga.emit(_events.CompensationCompleted, run_id=self.run_id, step=name)
            else:
                result.status = "compensation_failed"
                result.compensation_error = undone.error
                self.compensation_ok = False
                self.note(name, "compensation_failed", error=describe(undone.error))
                saga.emit(
                    _events.CompensationFailed,
                    run_id=self.run_id,
                    step=name,
                    error=describe(undone.error),
                )
        if status is None:
            status = FAILED if self.compensation_ok else COMPENSATION_FAILED
        report, final = self._conclude(status)
        yield final
        self._announce(status, report)
        if self.parent is not None:
            # A parent parked on this child learns that it ended (a failed call leaves
            # the parent to its deadline or an operator: the child's outcome is stored).
            yield Call(
                saga.store,
                saga.store_face,
                "send_signal",
                (self.parent, _waits.CHILD_SIGNAL, self.run_id),
                {"at": saga.wall()},
                True,
            )
        return report

    def _park(self, parked: list[_Outcome]) -> Flow[SagaResult]:
        """Park the run on the waits of ``parked``: saved as "waiting", due at the
        earliest wake-up, holding no lease; a signal that arrived meanwhile takes it
        again at once."""
        saga = self.saga
        wakes = [o.park.wake_at for o in parked if o.park is not None and o.park.wake_at]
        names = {o.park.waiting_for for o in parked if o.park is not None and o.park.waiting_for}
        wake_at = min(wakes) if wakes else None
        # One signal wakes it when it waits for one; several: any signal does, and the
        # steps park again if it was not theirs. A sleep alone waits for none.
        waiting_for = None if not names else names.pop() if len(names) == 1 else ANY_SIGNAL
        awaited = {o.park.waiting_for for o in parked if o.park is not None} | {CANCEL_SIGNAL}
        first = parked[0].step.name
        for outcome in parked:
            self.results[outcome.step.name].status = "waiting"
        self.note(first, "parked", output={"wake_at": wake_at, "waiting_for": waiting_for})
        report = SagaResult(
            saga=saga.name,
            status=WAITING,
            run_id=self.run_id,
            key=self.key,
            outputs=dict(self.outputs),
            duration=saga.clock.now() - self.started,
            compensated=False,
            steps=[self.results[s.name] for s in saga.all_steps],
        )
        yield self.save(status=WAITING, wake_at=wake_at, waiting_for=waiting_for)
        self.open = False
        saga.finished_run("parked", self.run_id)
        saga.emit(
            _events.RunParked,
            run_id=self.run_id,
            step=first,
            wake_at=wake_at,
            waiting_for=waiting_for,
        )
        # A signal stored after our last look and before the park was saved found the
        # run still running, so nobody woke it: look once more.
        signals = yield Call(saga.store, saga.store_face, "signals", (self.run_id,), {})
        any_name = ANY_SIGNAL in awaited
        if any(s.id > self.seen_signal and (any_name or s.name in awaited) for s in signals):
            taken: SagaResult = yield from saga.take_parked(self.run_id, report)
            return taken
        return report

    def _aborted(self) -> BaseException | None:
        return self.abort

    def _record(self, outcome: _Outcome) -> None:
        step = outcome.step
        result = self.results[step.name]
        result.history = outcome.history
        result.attempts = len(outcome.history)
        result.child = self.children.get(step.name)
        result.started_at = outcome.started_at
        result.duration = outcome.duration
        if outcome.ok:
            result.status = "completed"
            result.output = outcome.value
            self.outputs[step.name] = outcome.value
            self.done.append(step.name)
            self.note(
                step.name,
                "completed",
                attempt=result.attempts,
                duration=outcome.duration,
                output=jsonable(outcome.value),
            )
            saga = self.saga
            if saga.listening:
                saga.emit(
                    _events.StepCompleted,
                    run_id=self.run_id,
                    step=step.name,
                    attempts=result.attempts,
                )
            return
        error = outcome.error
        if isinstance(error, Permanent) and error.error is not None:
            error = outcome.error = error.error  # report what the step raised
        result.status = "failed"
        result.error = error
        result.uncertain = outcome.uncertain
        if outcome.uncertain and step.compensate_uncertain:
            self.done.append(step.name)
        self.note(
            step.name,
            "uncertain" if outcome.uncertain else "failed",
            attempt=result.attempts,
            duration=outcome.duration,
            error=describe(error),
        )
        self.saga.emit(
            _events.StepFailed,
            run_id=self.run_id,
            step=step.name,
            error=describe(error),
            uncertain=outcome.uncertain,
        )

    def _conclude(self, status: str) -> tuple[SagaResult, _Save]:
        """The run's report, and the final save that stores it."""
        saga = self.saga
        last = saga.all_steps[-1].name if saga.all_steps else None
        report = SagaResult(
            saga=saga.name,
            status=COMPLETED if status == COMPLETED else FAILED,
            run_id=self.run_id,
            key=self.key,
            output=self.outputs.get(last) if last is not None else None,
            outputs=dict(self.outputs),
            error=self.failure,
            duration=saga.clock.now() - self.started,
            # "The run was rolled back": compensations ran and all of them succeeded (a
            # completed run compensated nothing, so it is False there).
            compensated=status != COMPLETED and self.compensation_ok,
            steps=[self.results[s.name] for s in saga.all_steps],
        )
        expires = None if self.ttl is None else saga.wall() + self.ttl
        # The stored report is read back by idempotent replays and by operators of a
        # durable store; an unkeyed run in memory has no reader, so it skips the cost.
        keep = self.key is not None or not saga.store_is_ephemeral or self.parent is not None
        return report, self.save(
            status=status,
            error=describe(self.failure),
            result=report.to_dict() if keep else None,
            expires_at=expires,
        )

    def _announce(self, status: str, report: SagaResult) -> None:
        saga = self.saga
        self.open = False
        saga.finished_run(status, self.run_id)
        if status == COMPLETED:
            if saga.listening:
                saga.emit(_events.RunCompleted, run_id=self.run_id, duration=report.duration)
        else:
            saga.emit(
                _events.RunFailed,
                run_id=self.run_id,
                error=describe(self.failure),
                compensated=self.compensation_ok,
            )


# -- executing one step ----------------------------------------------------------------------


def attempt_sync(
    run: _Run, step: Step, ctx: Context, history: list[AttemptRecord], undo: bool = False
) -> Any:
    """One attempt of a sync step (or, with ``undo``, of its compensation): the innermost
    layer under the step's policies, recording the attempt in ``history``."""
    call = _begin_attempt(run, step, ctx, history, undo) or step.call_sync
    started, t0 = run.saga.wall(), run.saga.clock.now()
    try:
        value = call(ctx)
    except _waits.Park:
        raise
    except BaseException as exc:
        permanent = _failed_attempt(run, step, history, exc, started=started, t0=t0, undo=undo)
        if permanent is not None:
            raise permanent from exc
        raise
    history.append(AttemptRecord(started, run.saga.clock.now() - t0))
    return value


async def attempt_async(
    run: _Run, step: Step, ctx: Context, history: list[AttemptRecord], undo: bool = False
) -> Any:
    """Async twin of :func:`attempt_sync`."""
    call = _begin_attempt(run, step, ctx, history, undo) or step.call_async
    started, t0 = run.saga.wall(), run.saga.clock.now()
    try:
        value = await call(ctx)
    except _waits.Park:
        raise
    except BaseException as exc:
        permanent = _failed_attempt(run, step, history, exc, started=started, t0=t0, undo=undo)
        if permanent is not None:
            raise permanent from exc
        raise
    history.append(AttemptRecord(started, run.saga.clock.now() - t0))
    return value


def _begin_attempt(
    run: _Run, step: Step, ctx: Context, history: list[AttemptRecord], undo: bool
) -> Callable[[Context], Any] | None:
    """Number the attempt; the compensation to call when undoing, else ``None``."""
    ctx.attempt = len(history) + 1
    ctx._waits = 0
    if undo:
        assert step.compensate is not None
        return step.compensate
    if history:
        run.saga.emit(
            _events.StepRetrying,
            run_id=run.run_id,
            step=step.name,
            attempt=ctx.attempt,
            error=history[-1].error,
        )
    return None


def _failed_attempt(
    run: _Run,
    step: Step,
    history: list[AttemptRecord],
    exc: BaseException,
    *,
    started: float,
    t0: float,
    undo: bool,
) -> Permanent | None:
    """Record a failed attempt; a step error listed as permanent comes back wrapped."""
    history.append(AttemptRecord(started, run.saga.clock.now() - t0, describe(exc)))
    if not undo and (
        isinstance(exc, (WaitTimedOut, ChildFailed))
        or (step.permanent and isinstance(exc, step.permanent))
    ):
        # A passed deadline passes again on every attempt: the step fails at once.
        return Permanent(str(exc), error=exc)
    return None


# -- the sync driver ---------------------------------------------------------------------------


def _forward_one_sync(
    run: _Run,
    step: Step,
    ctx: Context,
    deadline: float | None,
    loop: asyncio.AbstractEventLoop | None,
) -> _Outcome:
    history: list[AttemptRecord] = []
    outcome = _Outcome(step, history=history, started_at=run.saga.wall())
    t0 = run.saga.clock.now()
    token = None
    if deadline is not None:
        _, token = set_deadline(max(deadline - t0, 0.0), run.saga.clock)
    try:
        if step.is_async:
            own_loop = loop or asyncio.new_event_loop()
            try:
                call = step.run_async
                if deadline is not None:
                    call = Timeout(max(deadline - t0, 1e-9), clock=run.saga.clock)(call)
                outcome.value = own_loop.run_until_complete(call(run, step, ctx, history))
            finally:
                if loop is None:
                    own_loop.close()
        else:
            outcome.value = step.run_sync(run, step, ctx, history)
    except _waits.Park as park:
        outcome.park = park
    except Exception as exc:
        outcome.error = exc
    finally:
        if token is not None:
            reset_deadline(token)
    outcome.duration = run.saga.clock.now() - t0
    return outcome


def _undo_sync(
    run: _Run, step: Step, ctx: Context, loop: asyncio.AbstractEventLoop | None
) -> _Outcome:
    history: list[AttemptRecord] = []
    t0 = run.saga.clock.now()
    outcome = _Outcome(step, history=history, started_at=run.saga.wall())
    try:
        if step.compensate_is_async:
            assert loop is not None
            outcome.value = loop.run_until_complete(
                step.undo_async(run, step, ctx, history, undo=True)
            )
        else:
            outcome.value = step.undo_sync(run, step, ctx, history, undo=True)
    except Exception as exc:
        outcome.error = exc
    outcome.duration = run.saga.clock.now() - t0
    return outcome


def _save_sync(save: _Save) -> None:
    run = save.run
    saga = run.saga
    saga.store.write(run.run_id, save.entries, lease_until=save.lease_until, **save.final)
    if saga.keys is not saga.store and run.key is not None:
        # A separate idempotency store must learn the lease and how the run ended.
        saga.keys.write(run.run_id, [], lease_until=save.lease_until, **save.final)


def drive_sync(flow: Flow[T]) -> T:
    """Execute a flow in this thread (sync members of parallel groups on a thread pool).

    One event loop, made when the first async step or compensation needs it, serves
    every async step and compensation of the flow (so loop-bound clients keep working
    from a step to its compensation), and is closed at the end.
    """
    loop: asyncio.AbstractEventLoop | None = None
    try:
        instruction = next(flow)
        while True:
            result: Any
            if type(instruction) is _Forward:
                _save_sync(instruction)
                run = instruction.run
                steps = instruction.steps
                if any(step.is_async for step in steps) and loop is None:
                    loop = asyncio.new_event_loop()
                if len(steps) == 1:
                    step = steps[0]
                    result = [
                        _forward_one_sync(
                            run,
                            step,
                            instruction.ctx.for_step(step.name),
                            instruction.deadline,
                            loop,
                        )
                    ]
                elif loop is not None:
                    # A group with async members: the async driver's group, on this
                    # run's loop (async members as tasks, sync ones on threads).
                    result, _ = loop.run_until_complete(_forward_group_async(run, instruction))
                else:
                    with concurrent.futures.ThreadPoolExecutor(len(steps)) as pool:
                        futures = [
                            pool.submit(
                                _forward_one_sync,
                                run,
                                step,
                                instruction.ctx.for_step(step.name),
                                instruction.deadline,
                                None,
                            )
                            for step in steps
                        ]
                        result = [f.result() for f in concurrent.futures.as_completed(futures)]
            elif type(instruction) is Call:
                try:
                    result = getattr(instruction.store, instruction.method)(
                        *instruction.args, **instruction.kwargs
                    )
                except Exception as exc:
                    if not instruction.catch:
                        raise
                    result = Failed(exc)
            elif type(instruction) is _Save:
                _save_sync(instruction)
                result = None
            elif type(instruction) is _Undo:
                _save_sync(instruction)
                step = instruction.step
                if step.compensate_is_async and loop is None:
                    loop = asyncio.new_event_loop()
                result = _undo_sync(
                    instruction.run, step, instruction.ctx.for_step(step.name), loop
                )
            else:
                time.sleep(cast("Sleep", instruction).seconds)
                result = None
            instruction = flow.send(result)
    except StopIteration as stop:
        done: T = stop.value
        return done
    finally:
        if loop is not None:
            loop.close()


# -- the async driver --------------------------------------------------------------------------


async def _forward_one_async(
    run: _Run, step: Step, ctx: Context, deadline: float | None
) -> _Outcome:
    history: list[AttemptRecord] = []
    t0 = run.saga.clock.now()
    outcome = _Outcome(step, history=history, started_at=run.saga.wall())
    try:
        call = step.run_async
        if deadline is not None:
            call = Timeout(max(deadline - t0, 1e-9), clock=run.saga.clock)(call)
        outcome.value = await call(run, step, ctx, history)
    except _waits.Park as park:
        outcome.park = park
    except (Exception, asyncio.CancelledError) as exc:
        outcome.error = exc
    outcome.duration = run.saga.clock.now() - t0
    return outcome


async def _in_thread(fn: Callable[..., T], *args: Any) -> tuple[T, asyncio.CancelledError | None]:
    """Run sync code on a worker thread (never on the loop); a cancellation of the
    caller waits for the thread, which cannot be stopped, and is handed back with its
    real result."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    interrupted: asyncio.CancelledError | None = None
    while True:
        try:
            return await asyncio.shield(future), interrupted
        except asyncio.CancelledError as exc:
            if future.cancelled():
                raise
            interrupted = exc


async def _undo_async(
    run: _Run, step: Step, ctx: Context
) -> tuple[_Outcome, asyncio.CancelledError | None]:
    if not step.compensate_is_async:
        return await _in_thread(_undo_sync, run, step, ctx, None)
    history: list[AttemptRecord] = []
    t0 = run.saga.clock.now()
    outcome = _Outcome(step, history=history, started_at=run.saga.wall())
    try:
        outcome.value = await step.undo_async(run, step, ctx, history, undo=True)
    except Exception as exc:
        outcome.error = exc
    outcome.duration = run.saga.clock.now() - t0
    return outcome, None


async def _save_async(save: _Save) -> None:
    run = save.run
    saga = run.saga
    await store_call(
        saga.store,
        saga.store_face,
        "write",
        run.run_id,
        save.entries,
        lease_until=save.lease_until,
        **save.final,
    )
    if saga.keys is not saga.store and run.key is not None:
        await store_call(
            saga.keys,
            saga.keys_face,
            "write",
            run.run_id,
            [],
            lease_until=save.lease_until,
            **save.final,
        )


async def _call_async(call: Call) -> Any:
    try:
        return await store_call(call.store, call.face, call.method, *call.args, **call.kwargs)
    except Exception as exc:
        if not call.catch:
            raise
        return Failed(exc)


async def drive_async(flow: Flow[T]) -> T:
    """Execute a flow on the running event loop.

    If the caller is cancelled mid-step, the step's outcome is uncertain, the
    completed steps are compensated, and ``CancelledError`` is raised afterwards.
    A cancellation that arrives while the store is being written stops the run
    where its log says it is, as a crash would: ``recover()`` finishes it.
    """
    cancelled: asyncio.CancelledError | None = None
    instruction = next(flow)
    while True:
        result: Any
        if type(instruction) is _Forward:
            await _save_async(instruction)
            run = instruction.run
            if len(instruction.steps) == 1:
                # One step: await it here (no task). A cancellation of the caller reaches
                # the step, which reports it as its (uncertain) outcome; the run then
                # compensates.
                step = instruction.steps[0]
                ctx = instruction.ctx.for_step(step.name)
                if step.is_async:
                    single = await _forward_one_async(run, step, ctx, instruction.deadline)
                    interrupted = (
                        single.error if isinstance(single.error, asyncio.CancelledError) else None
                    )
                else:
                    # A sync step (its retry backoff included) runs on a worker thread;
                    # a cancellation waits for its real outcome, then compensates.
                    single, interrupted = await _in_thread(
                        _forward_one_sync, run, step, ctx, instruction.deadline, None
                    )
                if interrupted is not None:
                    cancelled = interrupted
                    run.abort = interrupted
                result = [single]
            else:
                result, group_cancelled = await _forward_group_async(run, instruction)
                if group_cancelled is not None:
                    cancelled = group_cancelled
        elif type(instruction) is Call:
            result = await _call_async(instruction)
        elif type(instruction) is _Save:
            await _save_async(instruction)
            result = None
        elif type(instruction) is _Undo:
            await _save_async(instruction)
            result, interrupted = await _undo_async(
                instruction.run,
                instruction.step,
                instruction.ctx.for_step(instruction.step.name),
            )
            if interrupted is not None:
                cancelled = interrupted
        else:
            await asyncio.sleep(cast("Sleep", instruction).seconds)
            result = None
        try:
            instruction = flow.send(result)
        except StopIteration as stop:
            done: T = stop.value
            break
    if cancelled is not None:
        raise cancelled
    return done


async def _forward_group_async(
    run: _Run, instruction: _Forward
) -> tuple[list[_Outcome], asyncio.CancelledError | None]:
    """A group: async members as tasks, sync members on threads, so that they really
    run at the same time; outcomes are taken in completion order."""
    finished: list[asyncio.Future[_Outcome]] = []
    tasks: list[asyncio.Future[_Outcome]] = []
    for step in instruction.steps:
        ctx = instruction.ctx.for_step(step.name)
        task: asyncio.Future[_Outcome]
        if step.is_async:
            task = asyncio.ensure_future(_forward_one_async(run, step, ctx, instruction.deadline))
        else:  # on a thread, so that it really runs beside the others
            task = asyncio.ensure_future(
                asyncio.to_thread(_forward_one_sync, run, step, ctx, instruction.deadline, None)
            )
        task.add_done_callback(finished.append)
        tasks.append(task)
    try:
        await asyncio.gather(*tasks)
    except asyncio.CancelledError as exc:
        for task in tasks:
            task.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        # Each step reports its real outcome (a step cut short reports the cancellation,
        # so it counts as uncertain); the run then stops and compensates, even if every
        # step of this unit had finished.
        run.abort = exc
        return [
            item if isinstance(item, _Outcome) else _Outcome(step, error=exc)
            for step, item in zip(instruction.steps, done, strict=True)
        ], exc
    return [done.result() for done in finished], None
