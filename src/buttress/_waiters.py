"""Waiters shared by the bulkhead and the rate limiter.

A waiter is queued under the primitive's lock and woken, still under that lock,
by whoever hands it what it waits for. Sync waiters block on a threading.Event;
async waiters await a future of their own loop, woken thread-safely when the
waker runs on another thread. The primitive's lock-protected ``granted`` flag,
never the future, is the truth about whether a waiter got what it waited for.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict

__all__ = ["Waiter", "WaiterQueue"]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Waiter:
    __slots__ = ("event", "future", "granted", "loop", "thread", "weight")

    def __init__(self, weight: int = 1, *, is_async: bool = False) -> None:
        self.weight = weight
        self.granted = False
        if is_async:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self.future: asyncio.Future[None] | None = self.loop.create_future()
            self.thread = threading.get_ident()
            self.event: threading.Event | None = None
        else:
            self.loop = None
            self.future = None
            self.thread = 0
            self.event = threading.Event()

    def wake(self) -> None:
        """Wake the waiter (callable from any thread)."""
        if self.event is not None:
            self.event.set()
            return
        assert self.future is not None
        assert self.loop is not None
        if threading.get_ident() == self.thread:
            _resolve(self.future)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(_resolve, self.future)


class WaiterQueue:
    """A FIFO of waiters with O(1) removal from anywhere (cancelled waiters leave at once)."""

    __slots__ = ("_items", "weight")

    def __init__(self) -> None:
        self._items: OrderedDict[Waiter, None] = OrderedDict()
        self.weight = 0

    @property
    def items(self) -> OrderedDict[Waiter, None]:
        """The underlying mapping; hot paths test its truthiness (a C-level length check)."""
        return self._items

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def append(self, waiter: Waiter) -> None:
        self._items[waiter] = None
        self.weight += waiter.weight

    def head(self) -> Waiter | None:
        for waiter in self._items:
            return waiter
        return None

    def popleft(self) -> Waiter:
        waiter, _ = self._items.popitem(last=False)
        self.weight -= waiter.weight
        return waiter

    def remove(self, waiter: Waiter) -> bool:
        if self._items.pop(waiter, False) is None:
            self.weight -= waiter.weight
            return True
        return False
