"""Bulkhead: cap the calls in flight to a dependency, with a bounded FIFO queue.

Two layers, one contract:

- :class:`LocalBulkhead` holds the slots: one lock-guarded counter and a FIFO of waiters,
  serving sync callers on any thread and async callers on an event loop alike. A released
  slot passes straight to the oldest waiter (no barging). A waiter holds nothing until it
  is granted a slot; a waiter cancelled or timed out after being granted passes the slot
  on, so nothing leaks. It is the in-process
  :class:`~buttress.backends.BulkheadBinding`; a shared store (Redis) implements the same
  protocol across processes.
- :class:`Bulkhead` is the policy in front of it: it sets each caller's wait budget
  (``max_wait`` and the enclosing deadline), counts, emits rejections, and hands each
  caller a :class:`BulkheadPermit` that frees exactly that caller's slot (and, with a
  store, exactly its lease).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import events as _events
from ._blocking import loop_running, warn_blocking
from ._counter import Counter
from ._deadline import remaining
from ._drivers import guard_async_io, guard_sync
from ._policy import Policy, PolicyOptions
from ._validate import check_int, check_seconds
from ._waiters import Waiter, WaiterQueue
from .backends import BindingBase, BulkheadBinding, BulkheadStore, check_store
from .exceptions import BulkheadFull
from .permit import Permit, PermitGuard

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Bulkhead", "BulkheadPermit", "LocalBulkhead"]

_SLOT = "slot"  # the lease of an in-process slot: slots are counted, not named
_new_error = BaseException.__new__


class LocalBulkhead(BindingBase):
    """The in-process slots of one bulkhead: the reference
    :class:`~buttress.backends.BulkheadBinding`."""

    __slots__ = ("full_message", "in_flight", "lock", "max_concurrent", "max_queue", "waiters")

    def __init__(self, bulkhead: Bulkhead) -> None:
        super().__init__(bulkhead)
        self.max_concurrent = bulkhead.max_concurrent
        self.max_queue = bulkhead.max_queue
        self.lock = threading.Lock()
        self.in_flight = 0
        self.waiters = WaiterQueue()
        self.full_message = self._full_message(self.max_queue)

    def _full_message(self, queued: int) -> str:
        return (
            f"{self.label} is full: all {self.max_concurrent} slots busy and "
            f"{queued}/{self.max_queue} queued"
        )

    def full(self) -> BulkheadFull:
        """The error for a call refused because every slot is busy and the queue is full:
        what a bulkhead raises most during an outage, so it is built cheaply (the message
        is made once, and RejectedError's __init__ is skipped for what it would set)."""
        error = _new_error(BulkheadFull, self.full_message)
        error.retry_after = None
        error.name = self.name
        return error

    def try_acquire(self) -> object | None:
        with self.lock:
            if self.in_flight < self.max_concurrent and not self.waiters:
                self.in_flight += 1
                return _SLOT
            return None

    def _enqueue(self, timeout: float | None, is_async: bool) -> Waiter | None:
        """Lock held: queue a waiter, or ``None`` when it was admitted at once; raises
        :class:`BulkheadFull` when there is no slot and no room or no time to wait."""
        if self.in_flight < self.max_concurrent and not self.waiters:
            self.in_flight += 1
            return None
        queued = len(self.waiters)
        if queued >= self.max_queue:
            raise self.full()
        if timeout is not None and timeout <= 0:
            raise BulkheadFull(self._full_message(queued), name=self.name)
        waiter = Waiter(1, is_async)
        self.waiters.append(waiter)
        return waiter

    def _granted(self, waiter: Waiter, started: float) -> object:
        """After a wait: the slot if granted, else leave the queue and raise."""
        if waiter.timer is not None:
            waiter.stop_timer()
        # ``granted`` turns true once, under the lock, before the waiter is woken: read
        # true it is final; read false it needs the lock (a grant may be racing a timeout).
        granted = waiter.granted
        if not granted:
            with self.lock:
                granted = waiter.granted
                if not granted:
                    self.waiters.remove(waiter)
        if not granted:
            raise BulkheadFull(
                f"{self.label} is full: no slot freed up in time",
                name=self.name,
                reason="bulkhead_wait_timeout",
            )
        self.emit(_events.AcquiredAfterWait, waited=self.now() - started)
        return _SLOT

    def _abandon(self, waiter: Waiter) -> None:
        """The waiter was interrupted: give back whatever it holds."""
        waiter.stop_timer()
        with self.lock:
            if waiter.granted:
                self.release_locked()
            else:
                self.waiters.remove(waiter)

    def acquire(self, timeout: float | None) -> object:
        with self.lock:
            waiter = self._enqueue(timeout, False)
        if waiter is None:
            return _SLOT
        started = self.now()
        assert waiter.event is not None
        try:
            self.clock.wait(waiter.event, timeout)
        except BaseException:
            self._abandon(waiter)
            raise
        return self._granted(waiter, started)

    async def acquire_async(self, timeout: float | None) -> object:
        # The contended async path: bound lock calls rather than ``with``, and the
        # common outcome (granted, no timer to stop) settled here, not in _granted.
        lock = self.lock
        lock.acquire()
        try:
            waiter = self._enqueue(timeout, True)
        finally:
            lock.release()
        if waiter is None:
            return _SLOT
        started = self.now()
        try:
            await waiter.waiting(self.clock, timeout)
        except BaseException:
            self._abandon(waiter)
            raise
        if waiter.granted and waiter.timer is None:
            self.emit(_events.AcquiredAfterWait, waited=self.now() - started)
            return _SLOT
        return self._granted(waiter, started)

    def release_locked(self) -> None:
        """Give a slot back, with :attr:`lock` held: to the oldest waiter if there is one."""
        if self.waiters.items:
            self.waiters.grant_oldest()
        else:
            self.in_flight -= 1

    def release(self, lease: object) -> None:
        with self.lock:
            if self.in_flight <= 0:
                raise RuntimeError(f"{self.label}: a slot was released that was never taken")
            self.release_locked()

    async def release_async(self, lease: object) -> None:
        self.release(lease)

    def in_use(self) -> int:
        return self.in_flight

    def snapshot(self) -> dict[str, Any]:
        return {}


class BulkheadPermit(Permit):
    """One caller's slot in a :class:`Bulkhead` (see :mod:`buttress.permit`): every way of
    settling it gives that slot back, once.

    Attributes:
        lease: what the bulkhead's binding needs to free exactly this slot.
    """

    __slots__ = ("bulkhead", "lease")

    def __init__(self, bulkhead: Bulkhead, lease: object) -> None:
        super().__init__()
        self.bulkhead = bulkhead
        self.lease = lease

    def _settle(self, exc: BaseException | None, duration: float | None, *, failed: bool) -> None:
        self.bulkhead.give_back(self.lease)

    async def _settle_async(
        self, exc: BaseException | None, duration: float | None, *, failed: bool
    ) -> None:
        await self.bulkhead.give_back_async(self.lease)

    def __repr__(self) -> str:
        return f"<BulkheadPermit {self.bulkhead.label} lease={self.lease!r}>"


class Bulkhead(PermitGuard, Policy):
    """At most ``max_concurrent`` calls in flight, at most ``max_queue`` waiting.

    Args:
        name: registers the bulkhead (``state()``, ``health()``).
        max_concurrent: calls allowed in flight at once (>= 1).
        max_queue: callers allowed to wait for a slot, served first come first served
            (default 0: reject at once when every slot is taken).
        max_wait: seconds a queued caller waits at most (default ``None``: as long as it
            takes, but never past an enclosing ``timeout``'s deadline).
        store: where the slots live: a :class:`~buttress.backends.BulkheadStore` such as
            :class:`~buttress.backends.redis.RedisBulkheadStore` (the bulkhead then needs
            a name and ``max_concurrent`` holds across every process); ``None`` (default)
            keeps them in this bulkhead.
        **options: ``listeners``, ``registry`` and ``clock``, as for every policy
            (:class:`~buttress.Policy`).
    """

    kind = "bulkhead"

    def __init__(
        self,
        name: str | None = None,
        *,
        max_concurrent: int,
        max_queue: int = 0,
        max_wait: float | timedelta | None = None,
        store: object = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(name=name, **options)
        self.max_concurrent = check_int("max_concurrent", max_concurrent)
        self.max_queue = check_int("max_queue", max_queue, min_value=0)
        self.max_wait = check_seconds("max_wait", max_wait, allow_zero=True, allow_none=True)
        self._accepted = 0
        # Admissions after a wait in an async wrapper: a lock-free counter, read only
        # once such a wrapper exists (reading it costs more than reading an int).
        self._accepted_after_wait = Counter()
        self._wrapped_async = False
        self._rejected = 0
        self._timed_out = 0
        self._in_flight = 0  # slots held in this process, with a store
        self.store: BulkheadStore | None = None if store is None else check_store("bulkhead", store)
        self.binding: BulkheadBinding = (
            self._local_slots() if self.store is None else self.store.bind_bulkhead(self)
        )
        self._local = self.binding if isinstance(self.binding, LocalBulkhead) else None
        # One lock for the counters and, in process, the slots: the hot path takes it once.
        self._lock = self._local.lock if self._local is not None else threading.Lock()
        self._register()

    def _local_slots(self) -> LocalBulkhead:
        """The in-process slots of a bulkhead built without a store."""
        return LocalBulkhead(self)

    @property
    def label(self) -> str:
        """How messages name this bulkhead: ``bulkhead 'name'``."""
        return "bulkhead" if self.name is None else f"bulkhead {self.name!r}"

    def _permit(self, lease: object) -> BulkheadPermit:
        return BulkheadPermit(self, lease)

    # -- the permission protocol -----------------------------------------------------------

    def try_acquire(self) -> BulkheadPermit | None:
        """A permit if a slot is free right now (and nobody is queued); never waits."""
        lease = self.binding.try_acquire()
        if lease is None:
            return None
        self._count_accepted()
        return self._permit(lease)

    def acquire(self) -> BulkheadPermit:
        """A permit for one slot, waiting in the queue if allowed; raises
        :class:`BulkheadFull`. Settle the permit (``release()``) to free the slot."""
        if loop_running() is not None:
            warn_blocking(
                f"{self!r}: acquire() on a thread whose event loop is running blocks every "
                f"task of the loop while it waits: await acquire_async() there"
            )
        return self._permit(self._take())

    async def acquire_async(self) -> BulkheadPermit:
        """:meth:`acquire` for async code; a cancelled waiter takes nothing."""
        return self._permit(await self._take_async())

    def _budget(self) -> float | None:
        """Seconds a caller may wait: ``max_wait`` or the enclosing deadline, the smaller."""
        limit = self.max_wait
        left = remaining()
        if left is not None and (limit is None or left < limit):
            limit = left
        return limit

    def _take(self) -> object:
        try:
            lease = self.binding.acquire(self._budget())
        except BulkheadFull as exc:
            raise self._count_rejection(exc) from None
        self._count_accepted()
        return lease

    async def _take_async(self) -> object:
        try:
            lease = await self.binding.acquire_async(self._budget())
        except BulkheadFull as exc:
            raise self._count_rejection(exc) from None
        self._count_accepted()
        return lease

    def _count_accepted(self) -> None:
        with self._lock:
            self._accepted += 1
            if self._local is None:
                self._in_flight += 1

    def _count_rejection(self, exc: BulkheadFull) -> BulkheadFull:
        with self._lock:
            self._rejected += 1
            if exc.reason == "bulkhead_wait_timeout":
                self._timed_out += 1
        if self._listeners or _events.hub.listeners:
            self._report(exc)
        return exc

    def _report(self, exc: BulkheadFull) -> None:
        self._deliver(
            _events.CallRejected(
                self.kind, self.name, self._clock.now(), exc.reason, exc.retry_after
            )
        )

    def give_back(self, lease: object) -> None:
        """Free the slot of ``lease`` (what settling a :class:`BulkheadPermit` does)."""
        if self._local is None:
            with self._lock:
                self._in_flight -= 1
        self.binding.release(lease)

    async def give_back_async(self, lease: object) -> None:
        """:meth:`give_back` for async code."""
        if self._local is None:
            with self._lock:
                self._in_flight -= 1
        await self.binding.release_async(lease)

    # -- drivers ----------------------------------------------------------------------------

    def _give_hook(self, lease: object, exc: BaseException | None) -> None:
        self.give_back(lease)

    async def _give_hook_async(self, lease: object, exc: BaseException | None) -> None:
        await self.give_back_async(lease)

    # The in-process wrappers inline the uncontended paths of acquire and release: bound
    # lock methods instead of `with`, and no Python call inside the critical section.

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        core = self._local
        if core is None:
            return guard_sync(fn, self._take, self._give_hook)
        take, release = self._take, core.release
        lock_acquire, lock_release = core.lock.acquire, core.lock.release
        queue, limit, room = core.waiters.items, self.max_concurrent, self.max_queue
        waiters = core.waiters  # its len(): live waiters (cancelled ones may linger in items)
        full, hub = core.full, _events.hub

        def guarded(*args: Any, **kwargs: Any) -> Any:
            lock_acquire()
            if core.in_flight < limit and not queue:
                core.in_flight += 1
                self._accepted += 1
                lock_release()
            elif len(waiters) >= room:  # no slot, no room to queue: refused at once
                self._rejected += 1
                lock_release()
                error = full()
                if self._listeners or hub.listeners:
                    self._report(error)
                raise error
            else:
                lock_release()
                take()
            try:
                return fn(*args, **kwargs)
            finally:
                lock_acquire()
                if queue:
                    lock_release()
                    release(_SLOT)
                else:
                    core.in_flight -= 1
                    lock_release()

        return guarded

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        core = self._local
        if core is None:
            return guard_async_io(fn, self._take_async, self._give_hook_async)
        wait, budget, hand_over = core.acquire_async, self._budget, core.release_locked
        count_waited = self._accepted_after_wait.incr
        self._wrapped_async = True
        lock_acquire, lock_release = core.lock.acquire, core.lock.release
        queue, limit, room = core.waiters.items, self.max_concurrent, self.max_queue
        waiters = core.waiters  # its len(): live waiters (cancelled ones may linger in items)
        full, hub = core.full, _events.hub

        async def guarded(*args: Any, **kwargs: Any) -> Any:
            lock_acquire()
            if core.in_flight < limit and not queue:
                core.in_flight += 1
                self._accepted += 1
                lock_release()
            elif len(waiters) >= room:  # no slot, no room to queue: refused at once
                self._rejected += 1
                lock_release()
                error = full()
                if self._listeners or hub.listeners:
                    self._report(error)
                raise error
            else:
                lock_release()
                # _take_async(), inlined: one coroutine less on the contended path, and
                # the admission counted without taking the lock once more.
                try:
                    await wait(budget())
                except BulkheadFull as exc:
                    raise self._count_rejection(exc) from None
                count_waited()
            try:
                return await fn(*args, **kwargs)
            finally:
                lock_acquire()
                if queue:
                    try:  # this call holds a slot: hand it straight to the oldest waiter
                        hand_over()
                    finally:
                        lock_release()
                else:
                    core.in_flight -= 1
                    lock_release()

        return guarded

    # -- state views ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Calls holding a slot in this process."""
        core = self._local
        return core.in_flight if core is not None else self._in_flight

    @property
    def queued(self) -> int:
        """Callers waiting for a slot in this process."""
        core = self._local
        return len(core.waiters) if core is not None else 0

    def _accepted_count(self) -> int:
        if self._wrapped_async:
            return self._accepted + self._accepted_after_wait.value
        return self._accepted

    def snapshot(self) -> dict[str, Any]:
        # Each reading is atomic on its own; a snapshot taken during calls is a moment's
        # reading either way, so no lock (state() takes one snapshot per primitive).
        core = self._local
        if core is not None and not core.waiters.items:
            in_flight, queued = core.in_flight, 0
        else:
            in_flight, queued = self.in_flight, self.queued
        out: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "max_concurrent": self.max_concurrent,
            "max_queue": self.max_queue,
            "max_wait": self.max_wait,
            "in_flight": in_flight,
            "queued": queued,
            "available": self.max_concurrent - in_flight,
            "accepted": self._accepted_count(),
            "rejected": self._rejected,
            "timed_out": self._timed_out,
        }
        if self._local is None:
            out["store"] = self.binding.snapshot()
            out["shared_in_flight"] = self.binding.in_use()
        return out

    def health_check(self) -> tuple[str, Any, str]:
        core = self._local  # the two properties, inlined: health() calls this per bulkhead
        if core is not None and not core.waiters.items:  # nobody queued: no lock
            in_flight, queued = core.in_flight, 0
        else:
            with self._lock:
                if core is None:
                    in_flight, queued = self._in_flight, 0
                else:
                    in_flight, queued = core.in_flight, len(core.waiters)
        observed = {"in_flight": in_flight, "queued": queued}
        if in_flight >= self.max_concurrent:
            return "warn", observed, "bulkhead saturated: every slot is busy"
        return "pass", observed, ""
