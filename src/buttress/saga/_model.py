"""The saga's data: steps, the context they receive, and the execution report."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from buttress import backoff
from buttress._policy import Policy, is_async_callable
from buttress._validate import (
    check_bool,
    check_callable,
    check_exception_types,
    check_name,
    check_seconds,
)
from buttress.clock import Clock, SystemClock
from buttress.exceptions import ButtressError, ConfigTypeError, ConfigValueError
from buttress.pipeline import Pipeline
from buttress.retry import Retry, retry
from buttress.timeout import Timeout, timeout

__all__ = [
    "AttemptRecord",
    "Context",
    "RecoveryReport",
    "SagaResult",
    "Step",
    "StepResult",
]


COMPENSATION_ATTEMPTS = 5
"""Attempts of the default compensation retry."""


def default_compensation_retry(clock: Clock | None) -> Retry:
    """A compensation that raises is retried with this unless the step names its own.

    Five attempts, waiting 0.5, 1, 2 and 4 s between them (each with "equal" jitter: half
    of the delay fixed, half random), so the attempts span about 4 to 7.5 seconds: long
    enough to ride out a restarting upstream or a brief network partition, where the
    old 50 ms schedule spent all its attempts within a few tens of milliseconds.
    """
    return retry(
        COMPENSATION_ATTEMPTS, backoff=backoff.exponential(0.5, 2.0, 4.0, "equal"), clock=clock
    )


class Context:
    """What every step and compensation receives.

    Attributes:
        input: the run's input.
        results: outputs of the completed steps, by step name.
        run_id: the run's id (stable across crash recovery: use it for idempotent calls).
        step: the name of the step (or compensation) being run.
        attempt: 1 for the first attempt of this step, 2 for its first retry, ...

    A forward step can also wait durably: :meth:`sleep`, :meth:`wait_for` (and their
    ``_async`` twins) record what they wait for in the run log, so a run resumed after a
    crash, a deploy or a long park waits only for what is left. Each call is numbered
    within its step: when the step runs again (a resume, a retry) its n-th wait finds
    what the n-th wait recorded. Code before a wait runs again on a resume, like any
    step (steps are at-least-once): put side effects that must happen once in their own
    step.
    """

    __slots__ = ("_run", "_waits", "attempt", "input", "results", "run_id", "step")

    def __init__(self, input: Any, run_id: str, results: dict[str, Any], run: Any = None) -> None:
        self.input = input
        self.run_id = run_id
        self.results = results
        self.step = ""
        self.attempt = 0
        self._run = run  # the runner's run (None for a context made by hand)
        self._waits = 0  # waits made by this attempt so far: the index of the next

    def for_step(self, name: str) -> Context:
        """A copy for one step (parallel steps each get their own ``step``/``attempt``)."""
        ctx = Context(self.input, self.run_id, self.results, self._run)
        ctx.step = name
        return ctx

    def _durable(self) -> Any:
        if self._run is None:
            raise ConfigValueError(
                "this Context is not part of a saga run: durable waits and heartbeats "
                "need one (they are recorded in the run log)"
            )
        return self._run

    def sleep(self, seconds: float | timedelta) -> None:
        """Sleep durably: the wake-up time is recorded, so a resumed run wakes at it.

        A sleep longer than the saga's ``park_after`` parks the run (status
        ``"waiting"``, no lease or thread held); the recovery worker resumes it when it
        is due, on any host.
        """
        self._durable().sleep(self, seconds)

    async def sleep_async(self, seconds: float | timedelta) -> None:
        """Async twin of :meth:`sleep`."""
        await self._durable().sleep_async(self, seconds)

    def wait_for(
        self,
        name: str,
        *,
        timeout: float | timedelta | None = None,
        deadline: float | datetime | None = None,
    ) -> Any:
        """Wait for the signal ``name`` (``Saga.signal(run_id, name, payload)``) and
        return its payload.

        Args:
            name: the signal's name.
            timeout: seconds from when this wait *first* began (a resume does not
                restart it).
            deadline: an absolute time (epoch seconds or an aware ``datetime``).

        A signal sent before the wait began is kept and consumed here, once. Past the
        earlier of ``timeout`` and ``deadline`` it raises
        :class:`~buttress.WaitTimedOut`: uncaught, the step fails (without retrying)
        and the saga compensates; caught, the step decides (remind, then wait again).
        A wait that may last longer than the saga's ``park_after`` parks the run.
        """
        return self._durable().wait_for(self, name, timeout, deadline)

    async def wait_for_async(
        self,
        name: str,
        *,
        timeout: float | timedelta | None = None,
        deadline: float | datetime | None = None,
    ) -> Any:
        """Async twin of :meth:`wait_for`."""
        return await self._durable().wait_for_async(self, name, timeout, deadline)

    def heartbeat(self, details: Any = None) -> None:
        """Report progress: renews the run's lease and records ``details`` in the log.

        A step with ``heartbeat_timeout=`` that stays silent longer is taken as dead by
        recovery (instead of after the whole lease). Each call is one store write.
        """
        self._durable().heartbeat(self, details)

    async def heartbeat_async(self, details: Any = None) -> None:
        """Async twin of :meth:`heartbeat`."""
        await self._durable().heartbeat_async(self, details)

    def __repr__(self) -> str:
        return f"Context(run_id={self.run_id!r}, step={self.step!r}, attempt={self.attempt})"


StepFn = Callable[[Context], Any]


def _policies(
    retry_policy: Retry | None,
    step_timeout: float | None,
    policy: Policy | None,
    clock: Clock | None = None,
) -> Pipeline | None:
    """retry outermost, then a per-attempt timeout, then the user's policy."""
    chain: list[Policy] = []
    if retry_policy is not None:
        if not isinstance(retry_policy, Retry):
            raise ConfigTypeError(
                f"retry must be a buttress retry policy (buttress.retry(...)), got {retry_policy!r}"
            )
        chain.append(retry_policy)
    if step_timeout is not None:
        chain.append(
            step_timeout
            if isinstance(step_timeout, Timeout)
            else timeout(step_timeout, clock=clock)
        )
    if policy is not None:
        if not isinstance(policy, Policy):
            raise ConfigTypeError(
                f"policy must be a buttress policy or pipeline, got {policy!r} "
                f"({type(policy).__name__})"
            )
        chain.append(policy)
    return Pipeline(*chain) if chain else None


class Step:
    """One named step: a function of the :class:`Context`, and how to undo it.

    Args:
        name: unique within its saga; the key of its output in ``ctx.results``.
        fn: the step function (sync or async), taking the context.
        compensate: undoes the step (sync or async), taking the context; its
            ``ctx.results[name]`` holds the step's output.
        retry: a :func:`buttress.retry` policy deciding which errors are transient.
        timeout: seconds for each attempt.
        policy: any other policy or pipeline (breaker, limiter, bulkhead...).
        compensate_uncertain: also compensate this step when its outcome is unknown
            (it timed out or was cancelled, so its side effect may have happened).
        permanent: exception types that fail the step at once, without retrying.
        compensate_retry: the policy for the compensation (default: 5 attempts, 0.5 s,
            1 s, 2 s and 4 s apart, with jitter).
        heartbeat_timeout: seconds the step may stay silent (no ``ctx.heartbeat()``)
            before recovery takes its run as dead: while it runs, the run's lease is
            this long, and each heartbeat renews it.
    """

    kind = "step"  # "child" for a child saga, "map" for a fan-out (part of the version)
    child_saga: Any = None  # the Saga a "child" step runs

    def __init__(
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
    ) -> None:
        checked = check_name(name)
        if checked is None:
            raise ConfigTypeError("step name must be a string, got None")
        if "/" in checked:
            raise ConfigValueError(f"step name must not contain '/', got {name!r}")
        self.name = check_storable_name("step name", checked)
        self.fn: StepFn = check_callable("fn", fn)
        self.compensate: StepFn | None = check_callable("compensate", compensate, allow_none=True)
        self.compensate_uncertain = check_bool("compensate_uncertain", compensate_uncertain)
        self.permanent = check_exception_types("permanent", permanent, allow_empty=True)
        self.is_async = is_async_callable(fn)
        self.compensate_is_async = compensate is not None and is_async_callable(compensate)
        self.timeout = check_seconds("timeout", timeout, allow_none=True)
        self.heartbeat_timeout = check_seconds(
            "heartbeat_timeout", heartbeat_timeout, allow_none=True
        )
        if self.heartbeat_timeout is not None and self.heartbeat_timeout <= 0:
            raise ConfigValueError(f"heartbeat_timeout must be > 0, got {heartbeat_timeout!r}")
        self._retry, self._policy = retry, policy
        self._compensate_retry = compensate_retry
        _policies(retry, self.timeout, policy)  # validates the options now
        self.group: str | None = None  # the parallel group this step belongs to

    # Compiled once when the step joins a saga (see build() and Saga._add).
    retry_policy: Pipeline | None
    attempt_policy: Pipeline | None
    compensate_policy: Pipeline | None
    call_sync: Callable[..., Any]
    call_async: Callable[..., Any]
    run_sync: Callable[..., Any]
    run_async: Callable[..., Any]
    undo_sync: Callable[..., Any]
    undo_async: Callable[..., Any]

    def build(self, clock: Clock) -> None:
        """Compile the policies on the saga's clock (once, when the step joins a saga).

        The retry goes outside the attempt recorder and the per-attempt timeout and
        other policies inside it, so the history sees each attempt's real outcome,
        timeouts included.
        """
        self.retry_policy = _policies(self._retry, None, None, clock)
        self.attempt_policy = _policies(None, self.timeout, self._policy, clock)
        self.compensate_policy = _policies(
            self._compensate_retry
            if self._compensate_retry is not None
            else default_compensation_retry(clock),
            None,
            None,
        )

    def __repr__(self) -> str:
        return f"Step({self.name!r})"


@dataclass(slots=True)
class AttemptRecord:
    """One attempt of a step: when it started (epoch seconds), how long, what failed."""

    started_at: float
    duration: float
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of this record (what the report's ``to_dict()`` nests)."""
        return {"started_at": self.started_at, "duration": self.duration, "error": self.error}


def storable_text(text: str) -> str:
    """``text`` with what no store can hold escaped: NUL characters become ``\\x00`` and
    lone surrogates ``\\udxxx`` (PostgreSQL text cannot hold either)."""
    if text.isascii():
        return text if "\x00" not in text else text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def describe(error: BaseException | None) -> str | None:
    """An error as the log keeps it: ``"Type: message"``, storable on every store."""
    if error is None:
        return None
    try:
        text = f"{type(error).__name__}: {error}"
    except Exception:  # an exception whose __str__ raises
        text = f"{type(error).__name__}: <unprintable>"
    return storable_text(text)


@dataclass
class StepResult:
    """What happened to one step.

    ``status`` is ``"completed"``, ``"failed"``, ``"compensated"``,
    ``"compensation_failed"`` or ``"not_run"``.
    """

    name: str
    status: str = "not_run"
    attempts: int = 0
    error: BaseException | None = None
    started_at: float | None = None
    duration: float | None = None
    output: Any = None
    history: list[AttemptRecord] = field(default_factory=list)
    compensation_error: BaseException | None = None
    uncertain: bool = False
    group: str | None = None
    child: SagaResult | None = None  # the report of a child saga's run

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of this record (what the report's ``to_dict()`` nests)."""
        return {
            "name": self.name,
            "group": self.group,
            "status": self.status,
            "attempts": self.attempts,
            "error": describe(self.error),
            "started_at": self.started_at,
            "duration": self.duration,
            "output": jsonable(self.output),
            "history": [record.to_dict() for record in self.history],
            "compensation_error": describe(self.compensation_error),
            "uncertain": self.uncertain,
            "child": None if self.child is None else self.child.to_dict(),
        }


@dataclass
class SagaResult:
    """The report of one run.

    Attributes:
        status: ``"completed"``, ``"failed"`` or ``"waiting"`` (the run parked on a
            durable sleep or wait: it goes on when it is due or signalled).
        run_id: the run's id.
        output: the last step's output.
        outputs: every completed step's output, by name.
        error: the exception that failed the run (``None`` when completed).
        duration: seconds the run took (this process's part of it).
        compensated: the run was rolled back: it failed, and every compensation that had
            to run succeeded (``False`` on a completed run, which compensated nothing, and
            when a compensation failed).
        steps: one :class:`StepResult` per step, in definition order.
        replayed: True when an idempotency key returned a stored result.
    """

    saga: str
    status: str
    run_id: str
    output: Any = None
    outputs: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    duration: float = 0.0
    compensated: bool = True
    steps: list[StepResult] = field(default_factory=list)
    replayed: bool = False
    key: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the run completed (every step succeeded or was replayed)."""
        return self.status == "completed"

    @property
    def waiting(self) -> bool:
        """Whether the run parked on a durable sleep or wait (it is not over)."""
        return self.status == "waiting"

    def step(self, name: str) -> StepResult:
        """The result of the step called ``name``."""
        for result in self.steps:
            if result.name == name:
                return result
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable report (errors become ``"Type: message"`` strings)."""
        return {
            "saga": self.saga,
            "status": self.status,
            "run_id": self.run_id,
            "key": self.key,
            "output": jsonable(self.output),
            "outputs": {name: jsonable(value) for name, value in self.outputs.items()},
            "error": describe(self.error),
            "duration": self.duration,
            "compensated": self.compensated,
            "replayed": self.replayed,
            "steps": [step.to_dict() for step in self.steps],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SagaResult:
        """Rebuild a report stored by :meth:`to_dict` (errors come back as strings in a
        :class:`StoredError`)."""
        steps = [
            StepResult(
                name=s["name"],
                status=s["status"],
                attempts=s["attempts"],
                error=StoredError(s["error"]) if s.get("error") else None,
                started_at=s.get("started_at"),
                duration=s.get("duration"),
                output=s.get("output"),
                history=[AttemptRecord(**h) for h in s.get("history", [])],
                compensation_error=StoredError(s["compensation_error"])
                if s.get("compensation_error")
                else None,
                uncertain=s.get("uncertain", False),
                group=s.get("group"),
                child=SagaResult.from_dict(s["child"]) if s.get("child") else None,
            )
            for s in data.get("steps", [])
        ]
        return cls(
            saga=data["saga"],
            status=data["status"],
            run_id=data["run_id"],
            key=data.get("key"),
            output=data.get("output"),
            outputs=dict(data.get("outputs", {})),
            error=StoredError(data["error"]) if data.get("error") else None,
            duration=data.get("duration", 0.0),
            compensated=data.get("compensated", data.get("status") != "completed"),
            steps=steps,
            replayed=True,
        )


class RecoveryReport(list[SagaResult]):
    """What ``recover()`` returns: the results of the runs it finished (it is a list of
    them), plus the runs it had to leave.

    Attributes:
        skipped: run id -> why it could not be taken (a lock that did not clear in
            time, a store error); each was also announced as :class:`RecoverySkipped`.
            The next ``recover()`` (or the recovery worker's next pass) tries again.
        held: ids of runs another live holder is running (their lease is current).
    """

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, str] = {}
        self.held: list[str] = []


class StoredError(ButtressError):
    """An error recorded by an earlier run, as its ``"Type: message"`` text.

    .. versionchanged:: 0.2 derives from :class:`~buttress.ButtressError`.
    """


def _strict_json(value: Any) -> str | None:
    """``value`` as strict JSON text (RFC 8259: no NaN or infinities), else ``None``."""
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None


def jsonable(value: Any) -> Any:
    """What the log stores of a step's output: the one rule of every store.

    A value strict JSON can hold (``None``, booleans, integers, finite floats, strings,
    lists and dicts of those) is stored as its JSON form, i.e. what a JSON round trip
    gives back (tuples become lists, dict keys strings). Anything else (NaN, infinities,
    sets, other objects, or a container holding one) is stored as its ``repr()`` string.
    The memory store keeps exactly what the SQL stores read back.
    """
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else repr(value)
    text = _strict_json(value)
    if text is not None:
        return json.loads(text)
    try:
        shown = repr(value)
    except Exception:
        shown = f"<{type(value).__name__} object>"
    return storable_text(shown)


def check_input(saga: str, value: Any, *, what: str = "input") -> None:
    """Refuse a run input (or a signal payload) that the log could not store (before
    any step runs)."""
    if value is None or _strict_json(value) is not None:
        return
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, RecursionError) as exc:
        raise ConfigTypeError(
            f"{what} of saga {saga!r} must be JSON-serialisable (it is stored in the run "
            f"log), got {_short(value)} ({type(value).__name__}): {exc}"
        ) from None
    except ValueError as exc:
        raise ConfigValueError(
            f"{what} of saga {saga!r} must be strict JSON (no NaN or infinity), got "
            f"{_short(value)}: {exc}"
        ) from None


def check_key(saga: str, key: object) -> str | None:
    """Validate an idempotency key: a string every store can hold (or ``None``)."""
    if key is None:
        return None
    if not isinstance(key, str):
        raise ConfigTypeError(f"key must be a string, got {key!r} ({type(key).__name__})")
    if "\x00" in key:
        raise ConfigValueError(f"key of saga {saga!r} must not contain NUL, got {key!r}")
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigValueError(
                f"key of saga {saga!r} must be valid Unicode (no lone surrogates), got {key!r}"
            ) from None
    return key


def check_storable_name(label: str, name: str) -> str:
    """A saga or step name every store can hold (no NUL, no lone surrogate)."""
    if "\x00" in name or storable_text(name) != name:
        raise ConfigValueError(
            f"{label} must not contain NUL characters or lone surrogates, got {name!r}"
        )
    return name


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


def wall_clock(clock: Clock) -> Callable[[], float]:
    """The wall-clock reading of ``clock`` (epoch seconds): its ``wall()`` method when
    it has one (:class:`~buttress.clock.SystemClock`, :class:`~buttress.testing.FakeClock`),
    else ``time.time``. Leases, TTLs and log times use it, so a fake clock drives them."""
    if type(clock) is SystemClock:
        return time.time  # the C function itself: no Python frame on the hot path
    wall = getattr(clock, "wall", None)
    return wall if callable(wall) else time.time
