"""Chaos injection: faults, latency and substitute results, to prove resilience works.

``chaos.fault(0.3, ConnectionError)`` raises ``ConnectionError`` instead of calling
the function in 30 % of calls; ``chaos.latency(0.1, 2.0)`` sleeps two seconds (on the
policy's clock) before 10 % of calls; ``chaos.result(0.05, None)`` returns ``None``
instead of calling the function in 5 % of calls. They decorate functions and go in
pipelines like every other policy, innermost (next to the function), so that the
retries, breakers and timeouts around them see the injected trouble.

**Off unless switched on.** A chaos policy injects nothing, ever, until chaos is
enabled for the process, either in code::

    with chaos.enable(seed=42):   # or chaos.enable(seed=42) ... chaos.disable()
        ...

or from the environment: ``BUTTRESS_CHAOS=1`` (``true``, ``yes`` and ``on`` work too;
any other value, or none, means off), with an optional ``BUTTRESS_CHAOS_SEED``, read
when this module is imported (:func:`read_environment` reads them again).
``chaos.disable()`` forces it off even when the environment says on. So a chaos
policy left in a pipeline by mistake costs one switch check per call and does
nothing in production. While chaos is on, every named chaos policy reports
``"warn"`` in ``buttress.health()``, and ``enable()`` logs a warning on the
``buttress.chaos`` logger.

**Deterministic under a seed.** Each policy draws from its own random stream, seeded
from the enable seed and the policy's name (or, unnamed, its mode and options), and
restarted by every ``enable()``: the same seed and the same sequence of calls inject
at the same positions, run after run. Without a seed one is chosen at random and
reported by :func:`current_seed` and in ``snapshot()``, so a failing run can be
replayed.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import secrets
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from ._drivers import Answer, Decision, intercept_async, intercept_sync
from ._policy import ExcType, Policy, PolicyOptions, Traceback
from ._validate import check_number, require_seconds
from .events import ChaosInjected  # defined in buttress.events; importable here too
from .exceptions import ButtressError, ConfigTypeError, ConfigValueError

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

__all__ = [
    "ENV_SEED",
    "ENV_SWITCH",
    "Chaos",
    "ChaosInjected",
    "ChaosSwitch",
    "Fault",
    "InjectedFault",
    "Latency",
    "Result",
    "current_seed",
    "disable",
    "enable",
    "fault",
    "is_enabled",
    "latency",
    "read_environment",
    "result",
]

ENV_SWITCH = "BUTTRESS_CHAOS"
ENV_SEED = "BUTTRESS_CHAOS_SEED"
_TRUE = frozenset({"1", "true", "yes", "on"})

_log = logging.getLogger("buttress.chaos")

Seed = int | str


class InjectedFault(ButtressError, ConnectionError):
    """The default fault of :class:`Fault`: a ``ConnectionError`` that buttress raised."""


# -- the process-wide switch ----------------------------------------------------------------------

# An epoch identifies one enabling: a policy restarts its random stream when the epoch
# changes, so each enable(seed=...) replays the same injections.
_Epoch = tuple[str, int, Seed]


class _Switch:
    __slots__ = ("_arming", "_env", "_state", "armed", "generation", "lock")

    def __init__(self) -> None:
        # None: the environment decides. False: forced off. An epoch: on.
        self._state: _Epoch | Literal[False] | None = None
        # What the environment says (see read_environment).
        self._env: _Epoch | None = None
        # Whether either says anything: the one attribute the wrappers read per call,
        # recomputed under its own lock so that racing writes cannot leave it stale.
        self.armed = False
        self._arming = threading.Lock()
        self.generation = 0
        self.lock = threading.Lock()

    @property
    def state(self) -> _Epoch | Literal[False] | None:
        return self._state

    @state.setter
    def state(self, value: _Epoch | Literal[False] | None) -> None:
        with self._arming:
            self._state = value
            self.armed = value is not None or self._env is not None

    @property
    def env(self) -> _Epoch | None:
        return self._env

    @env.setter
    def env(self, value: _Epoch | None) -> None:
        with self._arming:
            self._env = value
            self.armed = self._state is not None or value is not None


_switch = _Switch()


def _parse_seed(text: str) -> Seed:
    try:
        return int(text)
    except ValueError:
        return text


def _epoch() -> _Epoch | None:
    """The current enabling, or None when chaos is off.

    The wrappers skip even this call in the usual production case, where neither
    ``enable()``/``disable()`` nor the environment ever said anything: they read
    ``_switch.armed`` alone. (The slots, not the properties: this runs on every call
    while chaos is armed.)
    """
    state = _switch._state
    if state is None:
        return _switch._env
    if state is False:
        return None
    return state


def read_environment() -> bool:
    """Read ``BUTTRESS_CHAOS`` and ``BUTTRESS_CHAOS_SEED`` again; True if they enable chaos.

    They are read once when ``buttress.chaos`` is imported (so the per-call check is an
    attribute read, not an environment lookup); call this after changing them. It
    restarts the random streams, and matters only while no :func:`enable` or
    :func:`disable` is in force.
    """
    value = os.environ.get(ENV_SWITCH)
    epoch: _Epoch | None = None
    if value is not None and value.strip().lower() in _TRUE:
        seed_text = os.environ.get(ENV_SEED)
        seed = secrets.randbits(32) if seed_text is None else _parse_seed(seed_text.strip())
        with _switch.lock:
            _switch.generation += 1
            epoch = ("env", _switch.generation, seed)
    _switch.env = epoch
    if epoch is not None:
        _log.warning("buttress chaos injection enabled by %s (seed=%r)", ENV_SWITCH, epoch[2])
    return epoch is not None


class ChaosSwitch:
    """Returned by :func:`enable` and :func:`disable`: a context manager restoring the old state."""

    __slots__ = ("_previous",)

    def __init__(self, previous: _Epoch | Literal[False] | None) -> None:
        self._previous = previous

    def __enter__(self) -> ChaosSwitch:
        return self

    def __exit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        with _switch.lock:
            _switch.state = self._previous

    def __repr__(self) -> str:
        return f"<ChaosSwitch enabled={is_enabled()} seed={current_seed()!r}>"


def enable(seed: Seed | None = None) -> ChaosSwitch:
    """Switch chaos injection on for the whole process, at once.

    Args:
        seed: makes injections reproducible (an int or a str). Without one a random
            seed is chosen; :func:`current_seed` reports it.

    Returns:
        A context manager: ``with chaos.enable(seed=1): ...`` switches chaos back to
        its previous state (usually off) when the block ends.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, str))):
        raise ConfigTypeError(
            f"seed must be an int, a str or None, got {seed!r} ({type(seed).__name__})"
        )
    chosen: Seed = secrets.randbits(32) if seed is None else seed
    with _switch.lock:
        previous = _switch.state
        _switch.generation += 1
        _switch.state = ("enable", _switch.generation, chosen)
    _log.warning("buttress chaos injection enabled (seed=%r)", chosen)
    return ChaosSwitch(previous)


def disable() -> ChaosSwitch:
    """Switch chaos injection off, even if ``BUTTRESS_CHAOS`` says on.

    Returns a context manager restoring the previous state when its block ends.
    """
    with _switch.lock:
        previous = _switch.state
        _switch.state = False
    return ChaosSwitch(previous)


def is_enabled() -> bool:
    """Whether chaos policies inject right now."""
    return _epoch() is not None


def current_seed() -> Seed | None:
    """The seed of the current enabling, or ``None`` while chaos is off."""
    epoch = _epoch()
    return None if epoch is None else epoch[2]


# -- the policies ---------------------------------------------------------------------------------


class Chaos(Policy):
    """Base of the chaos policies: decides, per call, whether to inject.

    A chaos policy's ``name`` also names its random stream (see the module docstring).
    """

    kind = "chaos"
    mode: ClassVar[str] = "chaos"

    def __init__(
        self,
        rate: float,
        *,
        name: str | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(name=name, **options)
        self.rate = check_number("rate", rate, min_value=0.0, max_value=1.0)
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._epoch: _Epoch | None = None
        self._calls = 0
        self._injected = 0

    def _salt(self) -> str:
        """What tells this policy's stream apart from others' under the same seed."""
        if self.name is not None:
            return self.name
        return f"{self.mode}:{self.rate!r}:{self._detail()}"

    def _detail(self) -> str:
        return ""

    def _decide(self) -> Decision:
        """What this call gets (see :func:`intercept_sync`); called only while armed."""
        raise NotImplementedError

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return intercept_sync(fn, _switch, self._decide, self._clock.sleep)

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return intercept_async(fn, _switch, self._decide, self._clock.asleep)

    def _draw(self) -> random.Random | None:
        """The random stream if this call is to be injected, else None (thread-safe)."""
        epoch = _epoch()
        if epoch is None:
            return None
        with self._lock:
            if epoch != self._epoch:
                self._epoch = epoch
                self._rng = random.Random(f"{epoch[2]!r}/{self._salt()}")
                self._calls = self._injected = 0
            self._calls += 1
            if self._rng.random() < self.rate:
                self._injected += 1
                return self._rng
            return None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            calls, injected = self._calls, self._injected
        return {
            "kind": self.kind,
            "name": self.name,
            "mode": self.mode,
            "rate": self.rate,
            "enabled": is_enabled(),
            "seed": current_seed(),
            "calls": calls,
            "injected": injected,
        }

    def health_check(self) -> tuple[str, Any, str]:
        if is_enabled():
            return "warn", self.snapshot()["injected"], "chaos injection is enabled"
        return "pass", None, ""


class _BlockChaos(Chaos):
    """A chaos policy that also guards a block: ``with`` / ``async with`` inject on entry."""

    def _decide(self) -> float | None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        delay = self._decide()
        if delay is not None:
            self._clock.sleep(delay)
        return self

    def __exit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        return None

    async def __aenter__(self) -> Self:
        delay = self._decide()
        if delay is not None:
            await self._clock.asleep(delay)
        return self

    async def __aexit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        return None


class Fault(_BlockChaos):
    """While chaos is enabled, raise ``exc`` instead of calling the function in ``rate`` of calls.

    Args:
        rate: the fraction of calls to fail, from 0 to 1.
        exc: an exception class (built with a message saying it was injected), an
            instance (a fresh copy is raised each time) or a function returning one.
            Default: :class:`InjectedFault`, a ``ConnectionError``.

    It also takes the options every primitive takes: ``name``, ``listeners``,
    ``registry`` and ``clock`` (see "Every primitive" on the options page).
    """

    mode = "fault"

    def __init__(
        self,
        rate: float,
        exc: type[BaseException] | BaseException | Callable[[], BaseException] = InjectedFault,
        *,
        name: str | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(rate, name=name, **options)
        self.exc = exc
        self._pending = threading.local()
        self._make: Callable[[], BaseException]
        if isinstance(exc, type) and issubclass(exc, BaseException):
            message = f"injected by buttress.chaos.fault({self.rate:g})"
            try:
                exc(message)
            except Exception as error:
                raise ConfigTypeError(
                    f"exc {exc.__name__} cannot be built from a message ({error}); pass an "
                    f"instance or a function returning one instead"
                ) from None
            self._make = lambda: exc(message)
            self._label = exc.__qualname__
        elif isinstance(exc, BaseException):
            template = exc
            self._make = lambda: _fresh(template)
            self._label = type(exc).__qualname__
        elif callable(exc):
            self._make = cast("Callable[[], BaseException]", exc)
            self._label = getattr(exc, "__qualname__", type(exc).__qualname__)
        else:
            raise ConfigTypeError(
                f"exc must be an exception class, an exception instance or a function "
                f"returning one, got {exc!r} ({type(exc).__name__})"
            )
        self._register()

    def _detail(self) -> str:
        return self._label

    def _decide(self) -> None:
        """Raise the injected exception if this call is to fail."""
        if self._draw() is None:
            return
        error = self._make()
        if not isinstance(error, BaseException):
            raise ConfigTypeError(
                f"the exc function of a chaos fault must return an exception, got {error!r}"
            )
        self.emit(ChaosInjected, mode=self.mode, error=error)
        self._pending.error = error
        del error  # no frame of the traceback may hold it: see _raise_injected
        _raise_injected(self)

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "exc": self._label}


def _raise_injected(policy: Fault) -> None:
    """Raise the exception ``policy._decide()`` just made.

    No frame keeps it in a local variable: a raised exception held by a frame of its own
    traceback is a reference cycle that would keep the policy alive until the next
    garbage collection.
    """
    pending = policy._pending
    try:
        raise pending.error
    finally:
        pending.error = None


def _fresh(template: BaseException) -> BaseException:
    """A copy of ``template`` without a traceback, so repeated raises never pile frames up."""
    try:
        error = copy.copy(template)
    except Exception:
        error = template
    return error.with_traceback(None)


class Latency(_BlockChaos):
    """While chaos is enabled, sleep ``seconds`` (on the policy's clock) before ``rate`` of calls.

    Args:
        rate: the fraction of calls to slow down, from 0 to 1.
        seconds: the added delay, or a ``(low, high)`` pair to draw it uniformly from.
            Sync calls sleep with ``clock.sleep``, async calls with ``await clock.asleep``.

    It also takes the options every primitive takes: ``name``, ``listeners``,
    ``registry`` and ``clock`` (see "Every primitive" on the options page).
    """

    mode = "latency"

    def __init__(
        self,
        rate: float,
        seconds: float | tuple[float, float],
        *,
        name: str | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(rate, name=name, **options)
        if isinstance(seconds, tuple):
            if len(seconds) != 2:
                raise ConfigValueError(
                    f"seconds must be a number or a (low, high) pair, got {seconds!r}"
                )
            low = require_seconds("seconds[0]", seconds[0], allow_zero=True)
            high = require_seconds("seconds[1]", seconds[1], allow_zero=True)
            if high < low:
                raise ConfigValueError(
                    f"seconds must be (low, high) with low <= high, got {seconds!r}"
                )
            self.seconds: tuple[float, float] = (low, high)
        else:
            value = require_seconds("seconds", seconds)
            self.seconds = (value, value)
        self._register()

    def _detail(self) -> str:
        return repr(self.seconds)

    def _decide(self) -> float | None:
        rng = self._draw()
        if rng is None:
            return None
        low, high = self.seconds
        delay = low if low == high else rng.uniform(low, high)
        self.emit(ChaosInjected, mode=self.mode, delay=delay)
        return delay

    def snapshot(self) -> dict[str, Any]:
        low, high = self.seconds
        return {**super().snapshot(), "seconds": low if low == high else [low, high]}


class Result(Chaos):
    """While chaos is enabled, return ``value`` in ``rate`` of calls, skipping the function.

    Decorator only: a block of code has no return value to replace.

    Args:
        rate: the fraction of calls to answer with ``value``, from 0 to 1.
        value: the substitute result (an empty list, ``None``, a degraded answer...).

    It also takes the options every primitive takes: ``name``, ``listeners``,
    ``registry`` and ``clock`` (see "Every primitive" on the options page).
    """

    mode = "result"

    def __init__(
        self,
        rate: float,
        value: Any,
        *,
        name: str | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(rate, name=name, **options)
        self.value = value
        self._register()

    def _detail(self) -> str:
        return type(self.value).__qualname__

    def _decide(self) -> Answer | None:
        if self._draw() is None:
            return None
        self.emit(ChaosInjected, mode=self.mode)
        return Answer(self.value)

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "value": repr(self.value)}


# -- builders: the classes themselves, under the names the docs use -------------------------

fault = Fault
"""``chaos.fault(rate, exc=InjectedFault)``: the same as :class:`Fault`."""

latency = Latency
"""``chaos.latency(rate, seconds)``: the same as :class:`Latency`."""

result = Result
"""``chaos.result(rate, value)``: the same as :class:`Result`."""


read_environment()
