"""Bulkhead: cap the calls in flight to a dependency, with a bounded FIFO queue.

One lock-guarded pair of counters serves sync callers on any thread and async
callers on an event loop alike. A released slot passes straight to the oldest
waiter (no barging), so waiters are served in order. A waiter holds nothing until
it is granted a slot; a waiter cancelled or timed out after being granted passes
the slot on, so nothing leaks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from . import events as _events
from ._deadline import remaining
from ._policy import Policy
from ._validate import check_int, check_seconds
from ._waiters import Waiter, WaiterQueue
from .clock import Clock
from .exceptions import BulkheadFull, ConfigTypeError
from .registry import Registry

__all__ = ["Bulkhead"]


class Bulkhead(Policy):
    """At most ``max_concurrent`` calls in flight, at most ``max_queue`` waiting.

    Args:
        name: registers the bulkhead (``state()``, ``health()``).
        max_concurrent: calls allowed in flight at once (>= 1).
        max_queue: callers allowed to wait for a slot, served first come first served
            (default 0: reject at once when every slot is taken).
        max_wait: seconds a queued caller waits at most (default ``None``: as long as it
            takes, but never past an enclosing ``timeout``'s deadline).
        store: shared slots, e.g. a :class:`~buttress.backends.redis.RedisBulkheadStore`
            (the bulkhead then needs a name and ``max_concurrent`` holds across every
            process); ``None`` (default) keeps the slots in this process.
        listeners: event listeners for this bulkhead only.
        registry: registry to join instead of the default one.
        clock: time source (default: the system clock).
    """

    kind = "bulkhead"

    def __init__(
        self,
        name: str | None = None,
        *,
        max_concurrent: int,
        max_queue: int = 0,
        max_wait: float | None = None,
        store: object = None,
        listeners: Iterable[_events.Listener] | None = None,
        registry: Registry | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(name=name, listeners=listeners, registry=registry, clock=clock)
        self.max_concurrent = check_int("max_concurrent", max_concurrent)
        self.max_queue = check_int("max_queue", max_queue, min_value=0)
        self.max_wait = check_seconds("max_wait", max_wait, allow_zero=True, allow_none=True)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._waiters = WaiterQueue()
        self._accepted = 0
        self._rejected = 0
        self._timed_out = 0
        self._shared: Any = None
        self._held: list[str | None] = []  # shared-slot tokens taken by acquire()
        if store is not None:
            bind = getattr(store, "bind", None)
            if not callable(bind) or not hasattr(store, "backend"):
                raise ConfigTypeError(
                    f"store must be a bulkhead store such as "
                    f"buttress.backends.redis.RedisBulkheadStore, got {store!r}"
                )
            self._shared = bind(self)
        self._register()

    # -- the shared core ---------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Take a slot if one is free right now (and nobody is queued); never waits."""
        if self._shared is not None:
            try:
                token = self._shared.acquire(wait=False)
            except BulkheadFull:
                return False
            if token is None and not self._try_acquire_local():  # the local fallback
                return False
            self._held.append(token)
            return True
        return self._try_acquire_local()

    def _try_acquire_local(self) -> bool:
        with self._lock:
            if self._in_flight < self.max_concurrent and not self._waiters:
                self._in_flight += 1
                self._accepted += 1
                return True
            return False

    def _enqueue(self, is_async: bool) -> tuple[Waiter | None, float | None]:
        """Queue a waiter (lock held); ``(None, _)`` means "no slot and no room: reject"."""
        if len(self._waiters) >= self.max_queue:
            return None, None
        timeout = self.max_wait
        left = remaining()
        if left is not None and (timeout is None or left < timeout):
            timeout = left
        if timeout is not None and timeout <= 0:
            return None, None
        waiter = Waiter(is_async=is_async)
        self._waiters.append(waiter)
        return waiter, timeout

    def _label(self) -> str:
        return "bulkhead" if self.name is None else f"bulkhead {self.name!r}"

    def _reject(self, reason: str) -> BulkheadFull:
        self.emit(_events.CallRejected, reason=reason, retry_after=None)
        label = self._label()
        detail = {
            "bulkhead_full": f"all {self.max_concurrent} slots busy and "
            f"{len(self._waiters)}/{self.max_queue} queued",
            "bulkhead_wait_timeout": "no slot freed up in time",
        }[reason]
        return BulkheadFull(f"{label} is full: {detail}", name=self.name)

    def _settle(self, waiter: Waiter) -> bool:
        """After a wait: True if granted, else leave the queue (lock taken here)."""
        with self._lock:
            if waiter.granted:
                self._accepted += 1
                return True
            self._waiters.remove(waiter)
            self._timed_out += 1
            self._rejected += 1
            return False

    def _abandon(self, waiter: Waiter) -> None:
        """The waiter was interrupted: give back whatever it holds."""
        with self._lock:
            if waiter.granted:
                self._accepted += 1
                self._release_locked()
            else:
                self._waiters.remove(waiter)

    def _release_locked(self) -> None:
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.granted = True
            waiter.wake()
        else:
            self._in_flight -= 1

    def release(self) -> None:
        """Give a slot back (to the oldest waiter if there is one)."""
        if self._shared is not None:
            try:
                token = self._held.pop()
            except IndexError:
                raise RuntimeError("Bulkhead.release() called more times than acquire()") from None
            self._shared_give(token)
            return
        self._release_local()

    def _release_local(self) -> None:
        with self._lock:
            if self._in_flight <= 0:
                raise RuntimeError("Bulkhead.release() called more times than acquire()")
            self._release_locked()

    def acquire(self) -> None:
        """Take a slot, waiting in the queue if allowed; raises :class:`BulkheadFull`."""
        if self._shared is not None:
            self._held.append(self._shared_take())
            return
        self._acquire_local()

    def _acquire_local(self) -> None:
        with self._lock:
            if self._in_flight < self.max_concurrent and not self._waiters:
                self._in_flight += 1
                self._accepted += 1
                return
            waiter, timeout = self._enqueue(False)
            if waiter is None:
                self._rejected += 1
        if waiter is None:
            raise self._reject("bulkhead_full")
        started = self._clock.now()
        assert waiter.event is not None
        try:
            self._clock.wait(waiter.event, timeout)
        except BaseException:
            self._abandon(waiter)
            raise
        if not self._settle(waiter):
            raise self._reject("bulkhead_wait_timeout")
        self.emit(_events.AcquiredAfterWait, waited=self._clock.now() - started)

    async def acquire_async(self) -> None:
        """Async twin of :meth:`acquire`; a cancelled waiter takes nothing."""
        if self._shared is not None:
            self._held.append(await self._shared_take_async())
            return
        await self._acquire_local_async()

    async def _acquire_local_async(self) -> None:
        with self._lock:
            if self._in_flight < self.max_concurrent and not self._waiters:
                self._in_flight += 1
                self._accepted += 1
                return
            waiter, timeout = self._enqueue(True)
            if waiter is None:
                self._rejected += 1
        if waiter is None:
            raise self._reject("bulkhead_full")
        started = self._clock.now()
        assert waiter.future is not None
        try:
            await self._clock.wait_future(waiter.future, timeout)
        except BaseException:
            self._abandon(waiter)
            raise
        if not self._settle(waiter):
            raise self._reject("bulkhead_wait_timeout")
        self.emit(_events.AcquiredAfterWait, waited=self._clock.now() - started)

    # -- shared slots (a store) -------------------------------------------------------------

    def _count_shared(self, *, accepted: bool) -> None:
        with self._lock:
            if accepted:
                self._accepted += 1
                self._in_flight += 1
            else:
                self._rejected += 1

    def _shared_take(self) -> str | None:
        """A shared slot's token; ``None`` when the local fallback gave the slot."""
        token = self._shared.acquire()
        if token is None:
            self._acquire_local()
        return token  # type: ignore[no-any-return]

    async def _shared_take_async(self) -> str | None:
        token = await self._shared.acquire_async()
        if token is None:
            await self._acquire_local_async()
        return token  # type: ignore[no-any-return]

    def _shared_give(self, token: str | None) -> None:
        if token is None:
            self._release_local()
            return
        with self._lock:
            if token:  # "" marks a call let through by fail_open: it took no slot
                self._in_flight -= 1
        self._shared.release(token)

    async def _shared_give_async(self, token: str | None) -> None:
        if token is None:
            self._release_local()
            return
        with self._lock:
            if token:
                self._in_flight -= 1
        await self._shared.release_async(token)

    def _wrap_shared(self, fn: Callable[..., Any], is_async: bool) -> Callable[..., Any]:
        take, take_async, give = self._shared_take, self._shared_take_async, self._shared_give
        give_async = self._shared_give_async
        if is_async:

            async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                token = await take_async()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    await give_async(token)

            return guarded_async

        def guarded(*args: Any, **kwargs: Any) -> Any:
            token = take()
            try:
                return fn(*args, **kwargs)
            finally:
                give(token)

        return guarded

    # -- drivers ----------------------------------------------------------------------------

    # The wrappers inline the uncontended paths of acquire() and release(): bound
    # lock methods instead of `with`, and no Python call inside the critical section.

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self._shared is not None:
            return self._wrap_shared(fn, is_async=False)
        acquire, release = self.acquire, self.release
        lock_acquire, lock_release = self._lock.acquire, self._lock.release
        queue, limit = self._waiters.items, self.max_concurrent

        def guarded(*args: Any, **kwargs: Any) -> Any:
            lock_acquire()
            if self._in_flight < limit and not queue:
                self._in_flight += 1
                self._accepted += 1
                lock_release()
            else:
                lock_release()
                acquire()
            try:
                return fn(*args, **kwargs)
            finally:
                lock_acquire()
                if queue:
                    lock_release()
                    release()
                else:
                    self._in_flight -= 1
                    lock_release()

        return guarded

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self._shared is not None:
            return self._wrap_shared(fn, is_async=True)
        acquire, release = self.acquire_async, self.release
        lock_acquire, lock_release = self._lock.acquire, self._lock.release
        queue, limit = self._waiters.items, self.max_concurrent

        async def guarded(*args: Any, **kwargs: Any) -> Any:
            lock_acquire()
            if self._in_flight < limit and not queue:
                self._in_flight += 1
                self._accepted += 1
                lock_release()
            else:
                lock_release()
                await acquire()
            try:
                return await fn(*args, **kwargs)
            finally:
                lock_acquire()
                if queue:
                    lock_release()
                    release()
                else:
                    self._in_flight -= 1
                    lock_release()

        return guarded

    def __enter__(self) -> Bulkhead:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> Bulkhead:
        await self.acquire_async()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._shared is not None:
            try:
                token = self._held.pop()
            except IndexError:
                raise RuntimeError("Bulkhead exited more times than it was entered") from None
            await self._shared_give_async(token)
            return
        self.release()

    # -- state views ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {
                "kind": self.kind,
                "name": self.name,
                "max_concurrent": self.max_concurrent,
                "max_queue": self.max_queue,
                "max_wait": self.max_wait,
                "in_flight": self._in_flight,
                "queued": len(self._waiters),
                "available": self.max_concurrent - self._in_flight,
                "accepted": self._accepted,
                "rejected": self._rejected,
                "timed_out": self._timed_out,
            }
            if self._shared is not None:
                out["store"] = self._shared.snapshot()
                out["shared_in_flight"] = self._shared.in_flight()
            return out

    def health_check(self) -> tuple[str, Any, str]:
        with self._lock:
            in_flight, queued = self._in_flight, len(self._waiters)
        observed = {"in_flight": in_flight, "queued": queued}
        if in_flight >= self.max_concurrent:
            return "warn", observed, "bulkhead saturated: every slot is busy"
        return "pass", observed, ""
