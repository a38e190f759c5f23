"""Where buttress gets its time from, and how it waits.

Every primitive takes ``clock=`` and never reads the time or sleeps any other way,
so tests can substitute :class:`buttress.testing.FakeClock` and never sleep for real.
:class:`SystemClock` is the default: ``time.monotonic`` for time, ``time.sleep`` and
``asyncio.sleep`` for sleeping, the running event loop's timers for async timers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock", "TimerHandle", "system_clock"]


@runtime_checkable
class TimerHandle(Protocol):
    """What :meth:`Clock.call_later` returns."""

    def cancel(self) -> None:
        """Stop the callback from running if it has not run yet."""


@runtime_checkable
class Clock(Protocol):
    """A source of monotonic time and of every kind of waiting the primitives do."""

    def now(self) -> float:
        """Monotonic time in seconds."""

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds``."""

    async def asleep(self, seconds: float) -> None:
        """Suspend the calling task for ``seconds``."""

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        """Block until ``event`` is set or ``timeout`` passes; return whether it is set."""

    async def wait_future(self, future: asyncio.Future[Any], timeout: float | None) -> bool:
        """Suspend until ``future`` is done or ``timeout`` passes; return whether it is done.

        Never cancels ``future``.
        """

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        """Run ``callback`` after ``delay`` seconds.

        Inside a running event loop the callback runs on that loop; elsewhere on a
        timer thread.
        """


class _ThreadTimer:
    __slots__ = ("_timer",)

    def __init__(self, delay: float, callback: Callable[[], object]) -> None:
        self._timer = threading.Timer(delay, callback)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()


class SystemClock:
    """The real clock: ``time.monotonic`` and the standard ways of waiting."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        # An instance attribute bound to the C function: calling ``clock.now()``
        # costs no Python frame on the hot paths.
        self.now: Callable[[], float] = time.monotonic

    def wall(self) -> float:
        """Wall-clock time in epoch seconds (``time.time``): what leases, TTLs and log
        times shared between processes are measured in. Not part of :class:`Clock`; a
        clock without it gets ``time.time``."""
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        return event.wait(timeout)

    async def wait_future(self, future: asyncio.Future[Any], timeout: float | None) -> bool:
        if future.done():
            return True
        if timeout is None:
            await asyncio.wait((future,))
        else:
            await asyncio.wait((future,), timeout=max(timeout, 0.0))
        return future.done()

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return _ThreadTimer(max(delay, 0.0), callback)
        return loop.call_later(max(delay, 0.0), callback)

    def __repr__(self) -> str:
        return "SystemClock()"


_SYSTEM_CLOCK = SystemClock()


def system_clock() -> SystemClock:
    """The shared :class:`SystemClock` instance (the default of every ``clock=``)."""
    return _SYSTEM_CLOCK


def resolve_clock(clock: object) -> Clock:
    """Validate a ``clock=`` option."""
    if clock is None:
        return _SYSTEM_CLOCK
    if not isinstance(clock, Clock):
        from .exceptions import ConfigTypeError

        raise ConfigTypeError(
            f"clock must implement buttress.Clock (now, sleep, asleep, wait, wait_future, "
            f"call_later), got {clock!r} ({type(clock).__name__})"
        )
    return clock
