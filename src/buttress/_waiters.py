"""Waiters shared by the bulkhead and the rate limiter.

A waiter is queued under the primitive's lock and woken, still under that lock,
by whoever hands it what it waits for. Sync waiters block on a threading.Event;
async waiters await a future of their own loop, woken thread-safely when the
waker runs on another thread. The primitive's lock-protected ``granted`` flag,
never the future, is the truth about whether a waiter got what it waited for.

On the system clock an async waiter awaits its future directly, and a timeout is a
loop timer that merely wakes it (cancelled when the wait ends): no helper task, no
``asyncio.wait`` set, no extra future per wait. The future is the waiter's own, so a
cancelled wait may cancel it; the caller then reads ``granted`` under the lock and
hands back a grant that raced with the cancellation. Any other clock waits through
:meth:`~buttress.Clock.wait_future`, so a fake clock keeps deciding how time passes.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Awaitable

from .clock import Clock, SystemClock

__all__ = ["Waiter", "WaiterQueue"]

# Dead entries a queue tolerates before it considers compacting (then only when they
# outnumber the live ones): small queues never pay for a compaction.
_COMPACT_AT = 32


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Waiter:
    """One queued caller: ``granted`` (set under the primitive's lock) says whether it got
    what it waited for; ``queued`` whether it is still in its queue; ``timer`` is the
    loop timer bounding an async wait, if any."""

    __slots__ = ("event", "future", "granted", "loop", "queued", "thread", "timer", "weight")

    def __init__(self, weight: int = 1, is_async: bool = False) -> None:
        self.weight = weight
        self.granted = False
        self.queued = False  # in a WaiterQueue (which sets and clears it)
        self.timer: asyncio.TimerHandle | None = None
        if is_async:
            loop = asyncio.get_running_loop()
            self.loop: asyncio.AbstractEventLoop | None = loop
            self.future: asyncio.Future[None] | None = loop.create_future()
            self.thread = threading.get_ident()
            self.event: threading.Event | None = None
        else:
            self.loop = None
            self.future = None
            self.thread = 0
            self.event = threading.Event()

    def wake(self) -> None:
        """Wake the waiter (callable from any thread)."""
        future = self.future
        if future is None:
            assert self.event is not None
            self.event.set()
        elif threading.get_ident() == self.thread:
            if not future.done():  # a cancelled or timed-out wait is done already
                future.set_result(None)
        else:
            assert self.loop is not None
            if not self.loop.is_closed():
                self.loop.call_soon_threadsafe(_resolve, future)

    def waiting(self, clock: Clock, timeout: float | None) -> Awaitable[object]:
        """What an async waiter awaits: done when woken or after ``timeout`` seconds.

        Says nothing about the outcome: the caller reads :attr:`granted` (under its lock
        unless it is already true) and, whatever happened, calls :meth:`stop_timer`.
        Awaiting it raises :class:`asyncio.CancelledError` when the waiting task is
        cancelled, even if a grant raced with the cancellation (the caller hands it back).
        """
        future = self.future
        assert future is not None
        if type(clock) is not SystemClock:  # a substitute clock decides how time passes
            return clock.wait_future(future, timeout)
        if timeout is not None:
            assert self.loop is not None
            self.timer = self.loop.call_later(timeout if timeout > 0.0 else 0.0, _resolve, future)
        return future

    def stop_timer(self) -> None:
        """The wait is over: its timer, if any, never fires."""
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()


class WaiterQueue:
    """A FIFO of waiters, with removal from anywhere in amortised O(1).

    A deque, not an ordered dict (appending and popping the oldest cost a tenth as
    much): a waiter that leaves from the middle (cancelled, timed out) is only marked
    and left in place, and marked waiters are dropped as soon as they reach the head,
    so the head is always a waiter still queued. When marked waiters outnumber the
    queued ones, the deque is compacted in place: a storm of cancellations keeps at
    most about as many dead entries as live ones, and an empty queue holds nothing.

    Attributes:
        items: the deque, oldest first; true exactly when a waiter is queued, which
            hot paths test directly (a C-level check, no Python call).
        dead: entries of ``items`` whose waiter has left.
        weight: the summed weight of the queued waiters.
    """

    __slots__ = ("dead", "items", "weight")

    def __init__(self) -> None:
        self.items: deque[Waiter] = deque()
        self.dead = 0
        self.weight = 0

    def __len__(self) -> int:
        return len(self.items) - self.dead

    def __bool__(self) -> bool:
        return bool(self.items)

    def append(self, waiter: Waiter) -> None:
        waiter.queued = True
        self.items.append(waiter)
        self.weight += waiter.weight

    def head(self) -> Waiter | None:
        items = self.items
        return items[0] if items else None

    def popleft(self) -> Waiter:
        waiter = self.items.popleft()
        waiter.queued = False
        self.weight -= waiter.weight
        if self.dead:
            self._drop_dead_heads()
        return waiter

    def grant_oldest(self) -> Waiter:
        """Pop the oldest waiter, mark it granted and wake it (under the primitive's lock).

        The hand-over of a bulkhead slot: :meth:`popleft` and :meth:`Waiter.wake` in one
        call, with the common wake (an async waiter on this very thread) inlined.
        """
        waiter = self.items.popleft()
        waiter.queued = False
        self.weight -= waiter.weight
        if self.dead:
            self._drop_dead_heads()
        waiter.granted = True
        future = waiter.future
        if future is not None and waiter.thread == threading.get_ident():
            if not future.done():  # a cancelled or timed-out wait is done already
                future.set_result(None)
        else:
            waiter.wake()
        return waiter

    def remove(self, waiter: Waiter) -> bool:
        """Take ``waiter`` out of the queue; ``False`` if it was not queued."""
        if not waiter.queued:
            return False
        waiter.queued = False
        self.weight -= waiter.weight
        items = self.items
        if items[0] is waiter:
            items.popleft()
            if self.dead:
                self._drop_dead_heads()
        else:
            self.dead += 1
            if self.dead > _COMPACT_AT and self.dead * 2 > len(items):
                self._compact()
        return True

    def _drop_dead_heads(self) -> None:
        items = self.items
        while items and not items[0].queued:
            items.popleft()
            self.dead -= 1

    def _compact(self) -> None:
        """Drop every dead entry, in place (hot paths hold a reference to ``items``)."""
        items = self.items
        for _ in range(len(items)):
            waiter = items.popleft()
            if waiter.queued:
                items.append(waiter)
        self.dead = 0
