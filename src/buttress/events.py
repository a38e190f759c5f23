"""Typed events that primitives emit, and the listeners that receive them.

Events are frozen, slotted dataclasses. A listener is any callable taking one
:class:`Event`. Listeners subscribe globally with :func:`subscribe` or per
primitive with the ``listeners=[...]`` option. A listener that raises is logged
(on the ``buttress.events`` logger) and never breaks the protected call.
Building an event costs nothing when nobody listens.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

__all__ = [
    "AbandonedCallCompleted",
    "AcquiredAfterWait",
    "BackendDegraded",
    "BackendRecovered",
    "CacheRefreshFailed",
    "CacheStaleServed",
    "CallCompleted",
    "CallRejected",
    "ChaosInjected",
    "ChildStarted",
    "CircuitStateChanged",
    "CompensationCompleted",
    "CompensationFailed",
    "CompensationStarted",
    "Event",
    "FallbackUsed",
    "HedgeLaunched",
    "ItemFailed",
    "LimitChanged",
    "Listener",
    "RecoverySkipped",
    "RetryGaveUp",
    "RetryRecovered",
    "RetryScheduled",
    "RunCancelled",
    "RunCompleted",
    "RunFailed",
    "RunParked",
    "RunReplayed",
    "RunStarted",
    "SagaEvent",
    "Severity",
    "SignalReceived",
    "SignalSent",
    "StepCompleted",
    "StepFailed",
    "StepHeartbeat",
    "StepRetrying",
    "StepStarted",
    "TimeoutFired",
    "WaitExpired",
    "subscribe",
]

_log = logging.getLogger("buttress.events")


class Severity(enum.IntEnum):
    """How much an event deserves attention (maps onto logging levels)."""

    DEBUG = logging.DEBUG
    INFO = logging.INFO
    WARNING = logging.WARNING
    ERROR = logging.ERROR


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event.

    Attributes:
        source: the kind of primitive that emitted it (``"retry"``, ``"circuit_breaker"``...).
        name: the primitive's name, or ``None`` when it has none.
        time: the primitive's clock reading (monotonic seconds) when it happened.
    """

    kind: ClassVar[str] = "event"
    severity: ClassVar[Severity] = Severity.INFO

    source: str
    name: str | None
    time: float

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready mapping (exceptions become ``"Type: message"`` strings)."""
        out: dict[str, object] = {"kind": self.kind, "severity": self.severity.name.lower()}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, BaseException):
                value = f"{type(value).__name__}: {value}"
            elif not isinstance(value, (str, int, float, bool, type(None))):
                value = repr(value)
            out[field.name] = value
        return out


# The three retry events carry ``elapsed`` (seconds since the call started), ``args`` and
# ``kwargs`` (the call's arguments) only from a policy built with ``event_details=True``:
# arguments may hold secrets, so they are never sent by default.


@dataclass(frozen=True, slots=True)
class RetryScheduled(Event):
    """An attempt failed (or returned a result to retry) and another one will follow."""

    kind: ClassVar[str] = "retry_scheduled"
    attempt: int
    delay: float
    error: BaseException | None
    result: object = None
    elapsed: float | None = None
    args: tuple[object, ...] | None = None
    kwargs: dict[str, object] | None = None


@dataclass(frozen=True, slots=True)
class RetryGaveUp(Event):
    """No further attempt: ``reason`` is ``"attempts"``, ``"deadline"`` or ``"budget"``."""

    kind: ClassVar[str] = "retry_gave_up"
    severity: ClassVar[Severity] = Severity.WARNING
    attempts: int
    reason: str
    error: BaseException | None
    result: object = None
    elapsed: float | None = None
    args: tuple[object, ...] | None = None
    kwargs: dict[str, object] | None = None


@dataclass(frozen=True, slots=True)
class RetryRecovered(Event):
    """A call succeeded after at least one retry."""

    kind: ClassVar[str] = "retry_recovered"
    attempts: int
    elapsed: float | None = None
    args: tuple[object, ...] | None = None
    kwargs: dict[str, object] | None = None


@dataclass(frozen=True, slots=True)
class CircuitStateChanged(Event):
    """The breaker moved from ``old`` to ``new`` (``"closed"``, ``"open"``, ``"half_open"``)."""

    kind: ClassVar[str] = "circuit_state_changed"
    severity: ClassVar[Severity] = Severity.WARNING
    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class CallCompleted(Event):
    """A call through a breaker built with ``call_events=True`` ended: ``outcome`` is
    ``"success"``, ``"failure"`` or ``"neutral"``, ``duration`` its seconds (0 when not
    timed), ``error`` its exception, if any."""

    kind: ClassVar[str] = "call_completed"
    severity: ClassVar[Severity] = Severity.DEBUG
    outcome: str
    duration: float
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class CallRejected(Event):
    """A call was refused before it ran (breaker open, bulkhead full, rate limited)."""

    kind: ClassVar[str] = "call_rejected"
    severity: ClassVar[Severity] = Severity.WARNING
    reason: str
    retry_after: float | None


@dataclass(frozen=True, slots=True)
class AcquiredAfterWait(Event):
    """A bulkhead slot or a rate-limit permit was obtained after ``waited`` seconds."""

    kind: ClassVar[str] = "acquired_after_wait"
    severity: ClassVar[Severity] = Severity.DEBUG
    waited: float


@dataclass(frozen=True, slots=True)
class TimeoutFired(Event):
    """A call ran past its timeout."""

    kind: ClassVar[str] = "timeout_fired"
    severity: ClassVar[Severity] = Severity.WARNING
    timeout: float


@dataclass(frozen=True, slots=True)
class AbandonedCallCompleted(Event):
    """A call that a ``mode="thread"`` timeout abandoned at its deadline ended in its
    worker thread, ``elapsed`` seconds after it started: with ``error`` (its exception)
    or with ``result`` (``error`` is ``None``). Nobody received the outcome: the caller
    got ``TimeoutExceeded`` at ``timeout`` seconds."""

    kind: ClassVar[str] = "abandoned_call_completed"
    severity: ClassVar[Severity] = Severity.WARNING
    timeout: float
    elapsed: float
    error: BaseException | None = None
    result: object = None


@dataclass(frozen=True, slots=True)
class FallbackUsed(Event):
    """A fallback value or handler replaced a failure."""

    kind: ClassVar[str] = "fallback_used"
    error: BaseException


@dataclass(frozen=True, slots=True)
class HedgeLaunched(Event):
    """A hedged (extra, concurrent) attempt was started."""

    kind: ClassVar[str] = "hedge_launched"
    severity: ClassVar[Severity] = Severity.DEBUG
    attempt: int


@dataclass(frozen=True, slots=True)
class BackendDegraded(Event):
    """A shared backend (Redis, PostgreSQL) failed: the primitive now runs in its
    ``on_backend_error`` mode (``"fail_closed"``, ``"fail_open"`` or ``"local"``)."""

    kind: ClassVar[str] = "backend_degraded"
    severity: ClassVar[Severity] = Severity.ERROR
    backend: str
    mode: str
    error: BaseException


@dataclass(frozen=True, slots=True)
class BackendRecovered(Event):
    """The backend answers again after ``downtime`` seconds; shared state is back in use."""

    kind: ClassVar[str] = "backend_recovered"
    severity: ClassVar[Severity] = Severity.WARNING
    backend: str
    downtime: float


@dataclass(frozen=True, slots=True)
class LimitChanged(Event):
    """An adaptive bulkhead's concurrency limit moved from ``old`` to ``new`` slots.

    ``reason`` is ``"increase"``, ``"latency"`` (queueing or a slow call) or ``"error"``.
    """

    kind: ClassVar[str] = "limit_changed"
    severity: ClassVar[Severity] = Severity.DEBUG
    old: int
    new: int
    reason: str


@dataclass(frozen=True, slots=True)
class CacheStaleServed(Event):
    """An expired value was served.

    ``reason`` is ``"revalidating"`` (inside the ``stale_while_revalidate`` window, a
    refresh is running) or ``"error"`` (loading a new value failed with ``error``).
    ``age`` is the seconds since the value was stored.
    """

    kind: ClassVar[str] = "cache_stale_served"
    severity: ClassVar[Severity] = Severity.DEBUG
    reason: str
    age: float
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class CacheRefreshFailed(Event):
    """A background refresh failed; the stale value stays until it is too old."""

    kind: ClassVar[str] = "cache_refresh_failed"
    severity: ClassVar[Severity] = Severity.WARNING
    error: BaseException


@dataclass(frozen=True, slots=True)
class ChaosInjected(Event):
    """A chaos policy injected ``mode`` (``"fault"``, ``"latency"`` or ``"result"``).

    ``error`` is the raised exception (faults), ``delay`` the added seconds (latency).
    """

    kind: ClassVar[str] = "chaos_injected"
    mode: str
    delay: float | None = None
    error: BaseException | None = None


Listener = Callable[[Event], object]


class _Hub:
    """Global listeners, kept as an immutable tuple so readers need no lock."""

    __slots__ = ("listeners", "lock")

    def __init__(self) -> None:
        self.listeners: tuple[Listener, ...] = ()
        self.lock = threading.Lock()


hub = _Hub()


def subscribe(listener: Listener) -> Callable[[], None]:
    """Send every event of every primitive to ``listener``; returns a function that unsubscribes."""
    candidate: object = listener
    if not callable(candidate):
        from .exceptions import ConfigTypeError

        raise ConfigTypeError(
            f"listener must be callable, got {listener!r} ({type(listener).__name__})"
        )
    with hub.lock:
        hub.listeners = (*hub.listeners, listener)

    def unsubscribe() -> None:
        with hub.lock:
            items = list(hub.listeners)
            if listener in items:
                items.remove(listener)
            hub.listeners = tuple(items)

    return unsubscribe


def check_listeners(listeners: Iterable[Listener] | None) -> tuple[Listener, ...]:
    from .exceptions import ConfigTypeError

    if listeners is None:
        return ()
    if callable(listeners) and not isinstance(listeners, (list, tuple)):
        raise ConfigTypeError(
            f"listeners must be a list of callables, got the single callable {listeners!r}"
        )
    try:
        items = tuple(listeners)
    except TypeError:
        raise ConfigTypeError(
            f"listeners must be a list of callables, got {listeners!r} ({type(listeners).__name__})"
        ) from None
    for item in items:
        if not callable(item):
            raise ConfigTypeError(
                f"listeners must contain only callables, got {item!r} ({type(item).__name__})"
            )
    return items


def deliver(listeners: tuple[Listener, ...], event: Event) -> None:
    """Deliver ``event`` to each of ``listeners``; one that raises is logged and skipped."""
    for listener in listeners:
        try:
            listener(event)
        except Exception:
            _log.exception("buttress event listener %r failed on %s", listener, event.kind)


def dispatch(local: tuple[Listener, ...], event: Event) -> None:
    """Deliver ``event`` to the primitive's own listeners, then the global ones."""
    shared = hub.listeners
    for listener in local + shared if local and shared else local or shared:
        try:
            listener(event)
        except Exception:
            _log.exception("buttress event listener %r failed on %s", listener, event.kind)


@dataclass(frozen=True, slots=True)
class SagaEvent(Event):
    """Base of saga events: ``name`` is the saga's name, ``run_id`` the run's."""

    kind: ClassVar[str] = "saga_event"
    run_id: str


@dataclass(frozen=True, slots=True)
class RunStarted(SagaEvent):
    """A saga run started (or resumed after a crash)."""

    kind: ClassVar[str] = "run_started"
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class RunReplayed(SagaEvent):
    """An idempotency key returned a stored result: no step ran."""

    kind: ClassVar[str] = "run_replayed"
    key: str = ""
    status: str = ""


@dataclass(frozen=True, slots=True)
class RecoverySkipped(SagaEvent):
    """``recover()`` could not take an incomplete run (its row stayed locked past the
    store's bounded wait, or the store failed on it): it is left for the next pass."""

    kind: ClassVar[str] = "recovery_skipped"
    severity: ClassVar[Severity] = Severity.WARNING
    error: str = ""


@dataclass(frozen=True, slots=True)
class RunCompleted(SagaEvent):
    """Every step of the run completed."""

    kind: ClassVar[str] = "run_completed"
    duration: float = 0.0


@dataclass(frozen=True, slots=True)
class RunFailed(SagaEvent):
    """The run failed; ``compensated`` says whether every compensation succeeded."""

    kind: ClassVar[str] = "run_failed"
    severity: ClassVar[Severity] = Severity.WARNING
    error: str | None = None
    compensated: bool = True


@dataclass(frozen=True, slots=True)
class StepStarted(SagaEvent):
    """A step started."""

    kind: ClassVar[str] = "step_started"
    severity: ClassVar[Severity] = Severity.DEBUG
    step: str = ""


@dataclass(frozen=True, slots=True)
class StepCompleted(SagaEvent):
    """A step completed."""

    kind: ClassVar[str] = "step_completed"
    severity: ClassVar[Severity] = Severity.DEBUG
    step: str = ""
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class StepRetrying(SagaEvent):
    """A step's attempt failed and another attempt starts."""

    kind: ClassVar[str] = "step_retrying"
    step: str = ""
    attempt: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StepFailed(SagaEvent):
    """A step failed after its retries."""

    kind: ClassVar[str] = "step_failed"
    severity: ClassVar[Severity] = Severity.WARNING
    step: str = ""
    error: str | None = None
    uncertain: bool = False


@dataclass(frozen=True, slots=True)
class CompensationStarted(SagaEvent):
    """A completed step is being compensated."""

    kind: ClassVar[str] = "compensation_started"
    step: str = ""


@dataclass(frozen=True, slots=True)
class CompensationCompleted(SagaEvent):
    """A compensation succeeded."""

    kind: ClassVar[str] = "compensation_completed"
    step: str = ""


@dataclass(frozen=True, slots=True)
class CompensationFailed(SagaEvent):
    """A compensation still failed after its retries: an operator must look."""

    kind: ClassVar[str] = "compensation_failed"
    severity: ClassVar[Severity] = Severity.ERROR
    step: str = ""
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RunParked(SagaEvent):
    """A run parked on a durable sleep or wait: it holds no lease and no thread until it
    is due (``wake_at``, epoch seconds; ``None``: only a signal wakes it) or signalled."""

    kind: ClassVar[str] = "run_parked"
    step: str = ""
    wake_at: float | None = None
    waiting_for: str | None = None


@dataclass(frozen=True, slots=True)
class SignalSent(SagaEvent):
    """A signal was stored for a run (``Saga.signal``)."""

    kind: ClassVar[str] = "signal_sent"
    signal: str = ""


@dataclass(frozen=True, slots=True)
class SignalReceived(SagaEvent):
    """A step's ``ctx.wait_for`` consumed a signal."""

    kind: ClassVar[str] = "signal_received"
    step: str = ""
    signal: str = ""


@dataclass(frozen=True, slots=True)
class WaitExpired(SagaEvent):
    """A step's ``ctx.wait_for`` passed its deadline (it raises ``WaitTimedOut``)."""

    kind: ClassVar[str] = "wait_expired"
    severity: ClassVar[Severity] = Severity.WARNING
    step: str = ""
    signal: str = ""


@dataclass(frozen=True, slots=True)
class StepHeartbeat(SagaEvent):
    """A long step reported progress (``ctx.heartbeat``) and renewed the run's lease."""

    kind: ClassVar[str] = "step_heartbeat"
    severity: ClassVar[Severity] = Severity.DEBUG
    step: str = ""


@dataclass(frozen=True, slots=True)
class ChildStarted(SagaEvent):
    """A step started (or resumed) the run of a child saga."""

    kind: ClassVar[str] = "child_started"
    step: str = ""
    child_run_id: str = ""


@dataclass(frozen=True, slots=True)
class ItemFailed(SagaEvent):
    """One item of a fan-out step failed (the completed items are compensated)."""

    kind: ClassVar[str] = "item_failed"
    severity: ClassVar[Severity] = Severity.WARNING
    step: str = ""
    index: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RunCancelled(SagaEvent):
    """A run was asked to cancel; it compensates what completed."""

    kind: ClassVar[str] = "run_cancelled"
    severity: ClassVar[Severity] = Severity.WARNING
    reason: str = ""


def _cheap_init(cls: type[Event]) -> None:
    """Give a frozen event class a cheaper ``__init__`` with the same signature.

    A frozen class refuses attribute stores (its ``__setattr__`` raises), so the
    dataclass ``__init__`` stores each field through ``object.__setattr__``: one slow
    call per field, most of what building an event costs, and an event is built for
    every rejection, retry and transition while anyone listens. This one makes the new
    instance, for the time of ``__init__``, an instance of a mutable twin of ``cls``
    (a subclass adding no slots, so the memory layout is the same), stores the fields
    with plain attribute stores, and gives it back its class: two slow calls instead
    of one per field. Only the instance being built is ever seen as the twin. A
    subclass of the event class (whose instances must keep their own class) gets the
    fields stored through the slots' descriptors instead.
    """
    mutable = type(
        cls.__name__,
        (cls,),
        {
            "__slots__": (),
            "__setattr__": object.__setattr__,
            "__delattr__": object.__delattr__,
            "__module__": cls.__module__,
            "__qualname__": f"{cls.__qualname__}.<mutable while built>",
        },
    )
    env: dict[str, object] = {"_cls": cls, "_mutable": mutable, "_osa": object.__setattr__}
    params: list[str] = []
    plain: list[str] = []
    slow: list[str] = []
    for field in fields(cls):
        env[f"_set_{field.name}"] = getattr(cls, field.name).__set__
        if field.default is MISSING:
            params.append(field.name)
        else:
            env[f"_default_{field.name}"] = field.default
            params.append(f"{field.name}=_default_{field.name}")
        plain.append(f"            self.{field.name} = {field.name}")
        slow.append(f"            _set_{field.name}(self, {field.name})")
    source = (
        f"def _make({', '.join(env)}):\n"
        f"    def __init__(self, {', '.join(params)}):\n"
        "        if type(self) is _cls:\n"
        "            _osa(self, '__class__', _mutable)\n"
        + "\n".join(plain)
        + "\n            self.__class__ = _cls\n"
        "        else:\n" + "\n".join(slow) + "\n"
        "    return __init__\n"
    )
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # built from the class's own field names only
    init = namespace["_make"](**env)
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__annotations__ = dict(cls.__init__.__annotations__)
    cls.__init__ = init  # type: ignore[method-assign]


for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, Event):
        _cheap_init(_cls)
del _cls
