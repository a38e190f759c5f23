"""Helpers for testing code that uses buttress, and buttress itself.

- :class:`FakeClock`: virtual time for every primitive (``clock=FakeClock()``); tests
  advance it by hand or let sleeps jump it forward, and never sleep for real.
- :func:`set_testing`: turn every retry backoff into zero (and optionally cap attempts)
  for an application's own test suite.
- :func:`capture_events`: collect the events primitives emit.
- :func:`isolated_registry`: a fresh default registry, so names never clash across tests.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from . import events as _events
from ._config import config
from ._validate import check_int, check_number
from .registry import Registry, set_default_registry

__all__ = ["FakeClock", "capture_events", "is_testing", "isolated_registry", "set_testing"]


class _FakeTimer:
    __slots__ = ("callback", "cancelled", "loop", "when")

    def __init__(
        self,
        when: float,
        callback: Callable[[], object],
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.when = when
        self.callback = callback
        self.loop = loop
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        """Run the callback: inline for sync timers, on its loop for async ones.

        An event loop never runs a timer callback in the middle of a task; firing
        async timers through the loop keeps that true under a fake clock too.
        """
        loop = self.loop
        if loop is None:
            self.callback()
        elif loop.is_closed():
            return
        else:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                loop.call_soon(self._run)
            else:
                loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        if not self.cancelled:
            self.callback()


class FakeClock:
    """A clock whose time moves only when told to (or when something sleeps on it).

    Args:
        start: the initial reading in seconds (default 0.0).
        autojump: when True (the default), a sleep moves time forward by its duration at
            once, and a wait with a timeout that nobody satisfies jumps to that timeout
            (async: after the other ready tasks have run; sync: after ``grace`` real
            seconds). When False, time moves only through :meth:`advance`.
        grace: real seconds a sync waiter gives other threads before jumping (default 0.05).
        wall: the :meth:`wall` reading (epoch seconds) at ``start`` (default: the real
            time when the clock is made).

    Timers scheduled with :meth:`call_later` fire, in order, while time moves. A timer
    scheduled from a running event loop fires on that loop (as soon as it gets control,
    like a real timer); one scheduled elsewhere runs inside :meth:`advance`.

    Attributes:
        sleeps: every duration passed to ``sleep``/``asleep``, in order.
    """

    def __init__(
        self,
        start: float = 0.0,
        *,
        autojump: bool = True,
        grace: float = 0.05,
        wall: float | None = None,
    ) -> None:
        self._now = check_number("start", start)
        # The wall-clock reading at ``start``: it moves with the fake time.
        self._wall_offset = (
            time.time() if wall is None else check_number("wall", wall)
        ) - self._now
        self.autojump = autojump
        self.grace = check_number("grace", grace, min_value=0.0)
        self._timers: list[tuple[float, int, _FakeTimer]] = []
        self._seq = itertools.count()
        self._lock = threading.RLock()
        # Bumped by every jump and every new timer: autojump waits until a whole round of
        # yields passes with no activity, i.e. until every task is blocked.
        self._epoch = 0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        """The same reading as :meth:`now` (the fake clock has one timeline)."""
        return self._now

    def wall(self) -> float:
        """Wall-clock time (epoch seconds): ``wall`` (default: the real time when the
        clock was made) plus the fake time elapsed since. Sagas read leases and TTLs
        from it, so lease expiry is tested by advancing the clock."""
        return self._wall_offset + self._now

    # -- moving time ------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, firing due timers in order."""
        check_number("seconds", seconds, min_value=0.0)
        target = self._now + seconds
        while True:
            timer = self._pop_due(target)
            if timer is None:
                break
            timer.fire()
        with self._lock:
            self._now = max(self._now, target)

    def _pop_due(self, target: float) -> _FakeTimer | None:
        with self._lock:
            while self._timers and self._timers[0][0] <= target:
                _, _, timer = heapq.heappop(self._timers)
                if timer.cancelled:
                    continue
                self._now = max(self._now, timer.when)
                return timer
            return None

    def _jump_next(self) -> bool:
        """Jump to the next live timer and fire it; False if there is none."""
        with self._lock:
            while self._timers and self._timers[0][2].cancelled:
                heapq.heappop(self._timers)
            if not self._timers:
                return False
            target = self._timers[0][0]
            self._epoch += 1
        self.advance(max(target - self._now, 0.0))
        return True

    @property
    def pending_timers(self) -> int:
        """Timers scheduled and not yet fired or cancelled."""
        with self._lock:
            return sum(1 for _, _, timer in self._timers if not timer.cancelled)

    # -- the Clock protocol -----------------------------------------------------------------

    def call_later(self, delay: float, callback: Callable[[], object]) -> _FakeTimer:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._epoch += 1
            timer = _FakeTimer(self._now + max(delay, 0.0), callback, loop)
            heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if seconds <= 0:
            return
        if self.autojump:
            self.advance(seconds)
            return
        event = threading.Event()
        self.call_later(seconds, event.set)
        event.wait()

    async def asleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        timer = self.call_later(seconds, wake)
        try:
            await self._await(future)
        finally:
            timer.cancel()

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        if event.is_set():
            return True
        if timeout is None:
            event.wait()
            return True
        timer = self.call_later(timeout, event.set)
        try:
            if self.autojump and not event.wait(self.grace):
                while not event.is_set() and self._jump_next():
                    pass
            event.wait()
        finally:
            timer.cancel()
        return event.is_set()

    async def wait_future(self, future: asyncio.Future[Any], timeout: float | None) -> bool:
        if future.done():
            return True
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()

        def on_done(_: object = None) -> None:
            if not wake.done():
                wake.set_result(None)

        future.add_done_callback(on_done)
        timer = self.call_later(timeout, on_done) if timeout is not None else None
        try:
            await self._await(wake, jump=timeout is not None)
        finally:
            future.remove_done_callback(on_done)
            if timer is not None:
                timer.cancel()
        return future.done()

    async def _await(self, future: asyncio.Future[Any], *, jump: bool = True) -> None:
        if self.autojump and jump:
            quiet = 0
            epoch = self._epoch
            while not future.done():
                # Let every task that is ready run first: it may resolve the future or
                # schedule an earlier timer. Time jumps only after a whole round of yields
                # in which nobody scheduled a timer or jumped: every task is blocked.
                await asyncio.sleep(0)
                if self._epoch != epoch:
                    epoch, quiet = self._epoch, 0
                    continue
                quiet += 1
                if quiet >= 16:
                    if not self._jump_next():
                        break
                    epoch, quiet = self._epoch, 0
        await future

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r})"


class _Restore:
    """Returned by :func:`set_testing`: restores the previous settings on ``__exit__``."""

    def __init__(self, previous: tuple[bool, int | None]) -> None:
        self._previous = previous

    def __enter__(self) -> _Restore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        config.testing, config.testing_attempts = self._previous


def set_testing(testing: bool = True, *, attempts: int | None = None) -> _Restore:
    """Turn every retry backoff wait into zero (and cap attempts, if given).

    Takes effect at once; the returned object is also a context manager that restores
    the previous settings::

        with set_testing(True, attempts=1):
            ...
    """
    value: object = testing
    if not isinstance(value, bool):
        from .exceptions import ConfigTypeError

        raise ConfigTypeError(f"testing must be True or False, got {testing!r}")
    if attempts is not None:
        check_int("attempts", attempts)
    previous = (config.testing, config.testing_attempts)
    config.testing = testing
    config.testing_attempts = attempts if testing else None
    return _Restore(previous)


def is_testing() -> bool:
    """Whether :func:`set_testing` has turned testing mode on (retry waits are zero)."""
    return config.testing


@contextmanager
def capture_events() -> Iterator[list[_events.Event]]:
    """Collect every event emitted inside the block into a list."""
    captured: list[_events.Event] = []
    unsubscribe = _events.subscribe(captured.append)
    try:
        yield captured
    finally:
        unsubscribe()


@contextmanager
def isolated_registry() -> Iterator[Registry]:
    """Use a fresh default registry inside the block."""
    registry = Registry()
    previous = set_default_registry(registry)
    try:
        yield registry
    finally:
        set_default_registry(previous)
