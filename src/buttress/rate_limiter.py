"""Rate limiter: exact GCRA (the generic cell rate algorithm, a token bucket without a timer).

State is one number per bucket, the theoretical arrival time ``tat``. With the
emission interval ``T = per / rate`` and capacity ``burst``, a request of weight
``w`` at time ``now`` is admitted iff ``max(tat, now) + w*T - now <= burst*T``,
and then ``tat`` becomes ``max(tat, now) + w*T``. This admits at most
``burst + rate * t / per`` units in any interval of length ``t``, with no
boundary effects.

Two layers, one contract:

- :class:`LocalLimiter` holds the buckets (the unkeyed one and one per key). Waiting
  callers queue FIFO per bucket; only the head of a queue sleeps, until the exact time its
  request conforms. Because GCRA knows that time, a caller whose wait would exceed its
  budget is rejected at once instead of waiting in vain. Queued callers hold nothing, so a
  cancelled one leaks nothing. It is the in-process
  :class:`~buttress.backends.LimiterBinding`; a shared store (Redis) implements the same
  protocol across processes.
- :class:`RateLimiter` is the policy in front of it: it validates weights, sets each
  caller's wait budget (``max_wait`` and the enclosing deadline), counts and emits.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import events as _events
from ._blocking import loop_running, warn_blocking
from ._counter import Counter
from ._deadline import remaining
from ._drivers import Plan, pump_async, pump_sync
from ._generators import NO_SESSION, Session, wrap_async_generator, wrap_generator
from ._policy import ExcType, Policy, PolicyOptions, Traceback
from ._validate import check_int, check_number, check_seconds, require_seconds
from ._waiters import Waiter, WaiterQueue
from .backends import BindingBase, LimiterBinding, LimiterStore, check_store
from .clock import Clock
from .exceptions import ConfigTypeError, ConfigValueError, RateLimited

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["LocalLimiter", "RateLimiter"]

# Float slack when comparing times, far below any meaningful admission interval.
_EPS = 1e-9
# Keys at the front of the round looked at per new key (dropped if idle, else moved
# to the back): more than one, so that idle keys leave faster than new ones arrive.
_INSPECTED = 3
_new_error = BaseException.__new__


def _never() -> bool:
    return False


def _woken(clock: Clock, waiter: Waiter) -> None:
    assert waiter.event is not None
    clock.wait(waiter.event, None)
    waiter.event.clear()


async def _woken_async(clock: Clock, waiter: Waiter) -> None:
    assert waiter.loop is not None
    await waiter.waiting(clock, None)
    waiter.future = waiter.loop.create_future()


class _Bucket:
    """A bucket with its queue: the unkeyed one, and a key's while callers wait on it."""

    __slots__ = ("key", "tat", "waiters")

    def __init__(self, key: Hashable | None = None, tat: float = float("-inf")) -> None:
        self.key = key
        self.tat = tat
        self.waiters = WaiterQueue()


class LocalLimiter(BindingBase):
    """The in-process GCRA buckets of one limiter: the reference
    :class:`~buttress.backends.LimiterBinding`.

    A key's whole state is its theoretical arrival time, one float in a dict; a key gets
    a queue of its own only while callers wait on it, and such a key is never dropped.
    Keys also stand in a round (a deque, in the order they joined). Each new key looks
    at a few keys at the front of the round: idle ones (refilled: their arrival time
    has passed) are dropped, which changes nothing since a new bucket starts full, and
    the others go to the back. So idle keys leave in amortised O(1), with no scan and
    no background task, and an admission of a known key touches the dict alone. At
    ``max_keys`` a new key is always admitted: if none of those keys was idle, the most
    refilled of them makes room. That key alone may then admit up to ``burst`` units
    more than exact GCRA (its debt at eviction), once, until its old state would have
    refilled; :attr:`evicted_early` counts such evictions.
    """

    __slots__ = (
        "burst",
        "evicted_early",
        "interval",
        "limit",
        "lock",
        "max_keys",
        "queued",
        "ring",
        "tats",
        "tolerance",
        "unkeyed",
    )

    def __init__(self, limiter: RateLimiter) -> None:
        super().__init__(limiter)
        self.interval = limiter.interval
        self.burst = limiter.burst
        self.tolerance = limiter.burst * self.interval
        self.limit = self.tolerance + _EPS
        self.max_keys = limiter.max_keys
        self.lock = threading.Lock()
        self.unkeyed = _Bucket()
        self.tats: dict[Hashable, float] = {}  # key -> theoretical arrival time
        # The clock hand's round: keys in the order they joined (or came back from the
        # end of the round). An entry whose key has left the table is skipped and
        # dropped when the hand reaches it.
        self.ring: deque[Hashable] = deque()
        self.queued: dict[Hashable, _Bucket] = {}  # keys with callers waiting
        self.evicted_early = 0

    # -- keys (lock held) -------------------------------------------------------------------

    def _insert(self, key: Hashable, tat: float, now: float) -> None:
        """Add a new key. Like a clock hand, it first looks at the keys at the front of
        the round: idle ones (refilled) are dropped, the others go to the back
        (amortised O(1) per new key). At ``max_keys`` with none idle, the most
        refilled of those makes room: a new key is never refused."""
        tats, ring = self.tats, self.ring
        idle = now + _EPS
        full = len(tats) + len(self.queued) >= self.max_keys
        victim: Hashable = None
        victim_tat = float("inf")
        budget = _INSPECTED
        # Past the budget, only while the table is full and no key to evict was seen
        # (entries of keys that already left cost one step each, once).
        while ring and (budget > 0 or (full and victim_tat == float("inf"))):
            budget -= 1
            oldest = ring.popleft()
            old_tat = tats.get(oldest)
            if old_tat is None:
                continue  # left already
            if old_tat <= idle:
                del tats[oldest]
                full = len(tats) + len(self.queued) >= self.max_keys
                continue
            ring.append(oldest)
            if old_tat < victim_tat:
                victim, victim_tat = oldest, old_tat
        if full and victim_tat < float("inf"):
            del tats[victim]  # its entry at the end of the round is skipped later
            self.evicted_early += 1
        tats[key] = tat
        ring.append(key)
        if len(ring) > 2 * len(tats) + 1024:
            # Keys evicted (or queued on) and back within one round left duplicate
            # entries: start the round afresh (linear, after as many insertions).
            self.ring = deque(tats)

    def _queue_for(self, key: Hashable) -> _Bucket:
        """The bucket of a key callers are about to wait on (taken out of the table, so
        that it is never evicted while anyone waits)."""
        bucket = self.queued.get(key)
        if bucket is None:
            tat = self.tats.pop(key, float("-inf"))
            bucket = self.queued[key] = _Bucket(key, tat)
        return bucket

    def _settle(self, bucket: _Bucket) -> None:
        """A key's queue emptied: its state goes back to the table, as most recent."""
        if bucket.key is not None and not bucket.waiters:
            del self.queued[bucket.key]
            self.tats[bucket.key] = bucket.tat
            self.ring.append(bucket.key)

    def _conform(self, bucket: _Bucket, now: float, weight: int) -> float:
        """Admit ``weight`` now and return 0.0, or return the seconds until it would conform."""
        tat = bucket.tat if bucket.tat > now else now
        new_tat = tat + weight * self.interval
        excess = new_tat - now - self.tolerance
        if excess <= _EPS:
            bucket.tat = new_tat
            return 0.0
        return excess

    def _take(self, key: Hashable, weight: int, now: float) -> float:
        """Admit ``weight`` units of a key with nobody queued now and return 0.0, or
        return the seconds until they would conform."""
        tats = self.tats
        tat = tats.get(key)
        start = now if tat is None or tat < now else tat
        new_tat = start + weight * self.interval
        excess = new_tat - now - self.tolerance
        if excess > _EPS:
            return excess
        if tat is None:
            self._insert(key, new_tat, now)
        else:
            tats[key] = new_tat
        return 0.0

    def _too_late(self, wait: float) -> RateLimited:
        return self._limited(wait if wait > 0.0 else 0.0)

    def _admit_or_queue(
        self, bucket: _Bucket, weight: int, max_wait: float | None, is_async: bool
    ) -> Waiter | None:
        """``None``: admitted; else the queued waiter. Raises when it cannot be in time."""
        now = self.now()
        if not bucket.waiters and self._conform(bucket, now, weight) == 0.0:
            return None
        # When would this request conform if everyone queued ahead of it is served first?
        start = bucket.tat if bucket.tat > now else now
        wait = start + (bucket.waiters.weight + weight) * self.interval - self.tolerance - now
        if max_wait is not None and wait > max_wait + _EPS:
            raise self._too_late(wait)
        waiter = Waiter(weight, is_async=is_async)
        bucket.waiters.append(waiter)
        return waiter

    def _enter(
        self, key: Hashable | None, weight: int, max_wait: float | None, is_async: bool
    ) -> tuple[_Bucket, Waiter | None]:
        """Admit now (no waiter) or queue on the key's bucket (lock held)."""
        if key is None:
            return self.unkeyed, self._admit_or_queue(self.unkeyed, weight, max_wait, is_async)
        bucket = self.queued.get(key) if self.queued else None
        if bucket is not None:
            return bucket, self._admit_or_queue(bucket, weight, max_wait, is_async)
        wait = self._take(key, weight, self.now())
        if wait == 0.0:
            return self.unkeyed, None
        if max_wait is not None and wait > max_wait + _EPS:
            raise self._too_late(wait)
        bucket = self._queue_for(key)
        waiter = Waiter(weight, is_async=is_async)
        bucket.waiters.append(waiter)
        return bucket, waiter

    def _head_step(self, bucket: _Bucket, waiter: Waiter) -> float | None:
        """If ``waiter`` heads its queue, admit it (``0.0``) or say how long to sleep;
        ``None`` means "not the head yet: wait to be woken"."""
        if bucket.waiters.head() is not waiter:
            return None
        wait = self._conform(bucket, self.now(), waiter.weight)
        if wait == 0.0:
            bucket.waiters.popleft()
            waiter.granted = True
            following = bucket.waiters.head()
            if following is not None:
                following.wake()
            else:
                self._settle(bucket)
        return wait

    def _leave(self, bucket: _Bucket, waiter: Waiter) -> None:
        """An interrupted waiter leaves the queue (it holds nothing)."""
        if waiter.granted:
            return
        was_head = bucket.waiters.head() is waiter
        bucket.waiters.remove(waiter)
        if was_head:
            following = bucket.waiters.head()
            if following is not None:
                following.wake()
        if not bucket.waiters:
            self._settle(bucket)

    def _limited(self, retry_after: float) -> RateLimited:
        # What RateLimited(message, retry_after=..., name=...) builds, without the
        # Python-level __init__ (see RejectedError): rejections are an outage's hot path.
        error = _new_error(
            RateLimited,
            f"{self.label}: no permit within the allowed wait (next in {retry_after:.3f}s)",
        )
        error.retry_after = retry_after
        error.name = self.name
        return error

    def refused(self) -> RateLimited:
        """The error for one unit of the unkeyed bucket refused by the fast path (see
        :meth:`make_fast`) to a caller that may not wait. Read without the lock: the
        refusal is already decided, and ``retry_after`` is advice."""
        now = self.now()
        bucket = self.unkeyed
        start = bucket.tat if bucket.tat > now else now
        wait = start + (bucket.waiters.weight + 1) * self.interval - self.tolerance - now
        return self._limited(wait if wait > 0.0 else 0.0)

    # -- the binding protocol ---------------------------------------------------------------

    def make_fast(self, count: Callable[[], object]) -> Callable[[], bool]:
        """The hot path, built once: admit one unit of the unkeyed bucket with nobody
        queued, calling ``count`` on admission.

        The closure holds everything it needs in locals (no attribute lookups per call).
        The clock is read inside the lock, so a reading is never older than the state
        it is compared with; ``try/finally`` keeps the lock safe from async signals.
        """
        now_fn, bucket, queue = self.now, self.unkeyed, self.unkeyed.waiters.items
        lock_acquire, lock_release = self.lock.acquire, self.lock.release
        interval, limit = self.interval, self.limit

        def fast() -> bool:
            lock_acquire()
            try:
                now = now_fn()
                tat = bucket.tat
                if tat < now:  # not max(): a call costs ~70 ns on this path
                    tat = now
                tat += interval
                admitted = tat - now <= limit and not queue
                if admitted:
                    bucket.tat = tat
            finally:
                lock_release()
            if admitted:
                count()
            return admitted

        return fast

    def try_acquire(self, key: Hashable | None, weight: int) -> bool:
        with self.lock:
            if key is None:
                bucket = self.unkeyed
                return not bucket.waiters and self._conform(bucket, self.now(), weight) == 0.0
            # A known key with nobody queued, inline: one lookup, one update.
            now = self.now()
            tats = self.tats
            tat = tats.get(key)
            if tat is None:
                if self.queued and key in self.queued:
                    return False  # never ahead of queued callers
                return self._take(key, weight, now) == 0.0
            if tat < now:
                tat = now
            tat += weight * self.interval
            if tat - now > self.limit:
                return False
            tats[key] = tat
            return True

    def acquire(self, key: Hashable | None, weight: int, max_wait: float | None) -> float | None:
        with self.lock:
            bucket, waiter = self._enter(key, weight, max_wait, False)
        return None if waiter is None else pump_sync(self._wait(bucket, waiter))

    async def acquire_async(
        self, key: Hashable | None, weight: int, max_wait: float | None
    ) -> float | None:
        with self.lock:
            bucket, waiter = self._enter(key, weight, max_wait, True)
        return None if waiter is None else await pump_async(self._wait(bucket, waiter))

    def _wait(self, bucket: _Bucket, waiter: Waiter) -> Plan[float]:
        """A queued waiter's turn: woken when it heads the queue, asleep until its units
        conform; the seconds waited. An interrupted waiter leaves the queue."""
        lock, clock = self.lock, self.clock
        started = self.now()
        try:
            while True:
                with lock:
                    step = self._head_step(bucket, waiter)
                if step is None:
                    yield (_woken, _woken_async, (clock, waiter))
                elif step == 0.0:
                    return self.now() - started
                else:
                    yield (clock.sleep, clock.asleep, (step,))
        except BaseException:
            with lock:
                self._leave(bucket, waiter)
            raise

    def tokens(self, key: Hashable | None) -> float:
        if key is None:  # one attribute read, atomic: no lock (health() reads it per limiter)
            debt = self.unkeyed.tat - self.now()
        else:
            with self.lock:
                bucket = self.queued.get(key)
                tat = self.tats.get(key, float("-inf")) if bucket is None else bucket.tat
                debt = tat - self.now()
        if debt <= 0:  # refilled: exactly the burst (tolerance / interval may be off by an ulp)
            return float(self.burst)
        return max(self.tolerance - debt, 0.0) / self.interval

    def waiting(self, key: Hashable | None) -> int:
        """Callers queued for ``key``'s bucket."""
        if key is None and not self.unkeyed.waiters.items:  # nobody queued: no lock
            return 0
        with self.lock:
            bucket = self.unkeyed if key is None else self.queued.get(key)
            return 0 if bucket is None else len(bucket.waiters)

    def keys(self) -> int:
        """Live keyed buckets (two lengths, each read atomically: no lock)."""
        return len(self.tats) + len(self.queued)

    def snapshot(self) -> dict[str, Any]:
        return {}


_NO_KEY: Any = object()


class RateLimiter(Policy):
    """Admit at most ``rate`` calls per ``per`` seconds (GCRA, exact).

    Args:
        name: registers the limiter (``state()``, ``health()``).
        rate: admissions per period (> 0).
        per: the period in seconds (default 1.0).
        burst: how many admissions may happen back to back (default 1: admissions are
            spaced evenly, ``per / rate`` apart). Any interval of ``t`` seconds admits
            at most ``burst + rate * t / per``.
        max_wait: seconds a caller may wait for a permit (default ``None``: as long as
            needed, but never past an enclosing ``timeout``'s deadline; 0: never wait).
        store: where the buckets live: a :class:`~buttress.backends.LimiterStore` such as
            :class:`~buttress.backends.redis.RedisRateLimiterStore` (the limiter then
            needs a name); ``None`` (default) keeps them in this limiter.
        max_keys: live per-key buckets kept in memory (default 100,000). Past it a new
            key is still admitted: the most refilled of a few old keys makes room
            (see :attr:`evicted_early`).
        **options: ``listeners``, ``registry`` and ``clock``, as for every policy
            (:class:`~buttress.Policy`).

    Every bucket of a limiter has the same settings: the unkeyed one (``key=None``) and
    one per key (``try_acquire(key=client_ip)``, or the view ``for_key(client_ip)``).
    """

    kind = "rate_limiter"

    def __init__(
        self,
        name: str | None = None,
        *,
        rate: float,
        per: float | timedelta = 1.0,
        burst: int | None = None,
        max_wait: float | timedelta | None = None,
        store: object = None,
        max_keys: int = 100_000,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(name=name, **options)
        self.rate = check_number("rate", rate, min_value=0.0, min_inclusive=False)
        self.per = require_seconds("per", per)
        self.burst = 1 if burst is None else check_int("burst", burst)
        self.max_wait = check_seconds("max_wait", max_wait, allow_zero=True, allow_none=True)
        self.max_keys = check_int("max_keys", max_keys)
        interval = self.per / self.rate
        if not 0 < interval * self.burst < float("inf"):
            raise ConfigValueError(
                f"rate={rate!r} per per={per!r} seconds gives an emission interval out of range"
            )
        self._interval = interval
        self._lock = threading.Lock()  # the counters'
        self._key: Hashable | None = None  # a keyed view's key
        self._owner: RateLimiter = self
        self._views: weakref.WeakValueDictionary[Hashable, RateLimiter] = (
            weakref.WeakValueDictionary()
        )
        self._admitted = Counter()
        self._rejected = Counter()
        self._waited = 0
        self.store: LimiterStore | None = None if store is None else check_store("limiter", store)
        self.binding: LimiterBinding = (
            LocalLimiter(self) if self.store is None else self.store.bind_limiter(self)
        )
        # The hot path inlines LocalLimiter's unkeyed bucket: only the class itself
        # qualifies, never a subclass that overrides try_acquire() or acquire().
        self._local = self.binding if type(self.binding) is LocalLimiter else None
        self._fast: Callable[[], bool] = (
            _never if self._local is None else self._local.make_fast(self._admitted.incr)
        )
        # A limiter that never waits refuses what the fast path refused at once.
        self._instant: Callable[[], RateLimited] | None = (
            self._local.refused if self._local is not None and self.max_wait == 0 else None
        )
        self._register()

    @property
    def interval(self) -> float:
        """The emission interval: seconds between admissions at the steady rate
        (``per / rate``); a full bucket holds ``burst * interval`` seconds of credit."""
        return self._interval

    @property
    def label(self) -> str:
        """How messages name this limiter: ``rate limiter 'name'``."""
        name = self._owner.name
        return "rate limiter" if name is None else f"rate limiter {name!r}"

    @property
    def key(self) -> Hashable | None:
        """The bucket this limiter uses: ``None`` for the unkeyed one, else a view's key."""
        return self._key

    # -- admission ---------------------------------------------------------------------------

    def _check_weight(self, weight: int) -> int:
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ConfigTypeError(f"weight must be an integer, got {weight!r}")
        if weight < 1 or weight > self.burst:
            raise ConfigValueError(
                f"weight must be between 1 and burst ({self.burst}), got {weight!r}"
            )
        return weight

    def _bucket_key(self, key: Hashable | None) -> Hashable | None:
        if key is None:
            return self._key
        try:
            hash(key)
        except TypeError:
            raise ConfigTypeError(
                f"key must be hashable, got {key!r} ({type(key).__name__})"
            ) from None
        return key

    def try_acquire(self, weight: int = 1, *, key: Hashable | None = None) -> bool:
        """Admit ``weight`` units now if possible; never waits, never jumps the queue.

        ``key`` picks a per-key bucket (``None``: this limiter's own)."""
        if weight != 1:
            self._check_weight(weight)
        if key is None:
            key = self._key
        else:  # what _bucket_key() checks, inline: this is the keyed hot path
            try:
                hash(key)
            except TypeError:
                self._bucket_key(key)  # raises the ConfigTypeError naming the key
        admitted = self.binding.try_acquire(key, weight)
        if admitted:
            self._owner._admitted.incr()
        return admitted

    def acquire(self, weight: int = 1, *, key: Hashable | None = None) -> None:
        """Admit ``weight`` units, waiting up to ``max_wait`` (and never past the enclosing
        deadline); raises :class:`RateLimited` at once when that is not enough."""
        if loop_running() is not None:
            warn_blocking(
                f"{self!r}: acquire() on a thread whose event loop is running blocks every "
                f"task of the loop while it waits: await acquire_async() there"
            )
        if weight == 1 and key is None:
            if self._fast():
                return
            if self._instant is not None:
                raise self._count_rejection(self._instant())
        self._acquire_slow(weight, key)

    async def acquire_async(self, weight: int = 1, *, key: Hashable | None = None) -> None:
        """Async twin of :meth:`acquire`; a cancelled waiter takes nothing."""
        if weight == 1 and key is None:
            if self._fast():
                return
            if self._instant is not None:
                raise self._count_rejection(self._instant())
        await self._acquire_slow_async(weight, key)

    def _wait_budget(self) -> float | None:
        """Seconds a caller may wait: ``max_wait`` or the enclosing deadline, the smaller."""
        limit = self.max_wait
        left = remaining()
        if left is not None and (limit is None or left < limit):
            limit = max(left, 0.0)
        return limit

    def _acquire_slow(self, weight: int, key: Hashable | None) -> None:
        if weight != 1:
            self._check_weight(weight)
        try:
            waited = self.binding.acquire(self._bucket_key(key), weight, self._wait_budget())
        except RateLimited as exc:
            raise self._count_rejection(exc) from None
        self._admitted_after(waited)

    async def _acquire_slow_async(self, weight: int, key: Hashable | None) -> None:
        if weight != 1:
            self._check_weight(weight)
        try:
            waited = await self.binding.acquire_async(
                self._bucket_key(key), weight, self._wait_budget()
            )
        except RateLimited as exc:
            raise self._count_rejection(exc) from None
        self._admitted_after(waited)

    def _admitted_after(self, waited: float | None) -> None:
        owner = self._owner
        owner._admitted.incr()
        if waited is not None:
            with owner._lock:
                owner._waited += 1
            self.emit(_events.AcquiredAfterWait, waited=waited)

    def _count_rejection(self, exc: RateLimited) -> RateLimited:
        self._owner._rejected.incr()
        if self._listeners or _events.hub.listeners:
            self._deliver(
                _events.CallRejected(
                    self.kind, self.name, self._clock.now(), exc.reason, exc.retry_after
                )
            )
        return exc

    # -- per-key limiters -------------------------------------------------------------------

    def for_key(self, key: Hashable) -> RateLimiter:
        """A limiter with the same settings whose budget belongs to ``key`` alone: the same
        bucket as ``try_acquire(key=key)``, as an object to decorate or pass around.

        While a view is referenced, ``for_key(key)`` returns that same object."""
        owner = self._owner
        if owner is not self:
            return owner.for_key(key)
        self._bucket_key(key)  # hashable?
        with self._lock:
            view = self._views.get(key)
            if view is None:
                view = self._views[key] = self._make_view(key)
            return view

    def _make_view(self, key: Hashable) -> RateLimiter:
        # A light object: the few attributes it differs by (or reads on its paths) in
        # slots, everything else read through from the owner; nothing copied per key.
        view: Any = object.__new__(_view_class(type(self)))
        view._owner = self
        view._key = key
        view.binding = self.binding
        view._local = self._local
        view.burst = self.burst
        view.max_wait = self.max_wait
        return view  # type: ignore[no-any-return]

    @property
    def evicted_early(self) -> int:
        """Keys evicted at ``max_keys`` before they had refilled (in process): each may
        have admitted up to ``burst`` units more than exact GCRA, once."""
        local = self._local
        return 0 if local is None else local.evicted_early

    @property
    def keys(self) -> int:
        """Live per-key buckets held in memory (in process)."""
        local = self._local
        return 0 if local is None else local.keys()

    # -- drivers ----------------------------------------------------------------------------

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        slow, fast = self._acquire_slow, self._fast
        instant, rejected = self._instant, self._count_rejection

        def limited(*args: Any, **kwargs: Any) -> Any:
            if not fast():
                if instant is not None:
                    raise rejected(instant())
                slow(1, None)
            return fn(*args, **kwargs)

        return limited

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        slow, fast = self._acquire_slow_async, self._fast
        instant, rejected = self._instant, self._count_rejection

        async def limited(*args: Any, **kwargs: Any) -> Any:
            if not fast():
                if instant is not None:
                    raise rejected(instant())
                await slow(1, None)
            return await fn(*args, **kwargs)

        return limited

    # A decorated generator function takes one unit when its first item is asked for.

    def _wrap_generator(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def open_session() -> Session:
            self.acquire()
            return NO_SESSION

        return wrap_generator(fn, open_session)

    def _wrap_async_generator(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def open_session() -> Session:
            await self.acquire_async()
            return NO_SESSION

        return wrap_async_generator(fn, open_session)

    def __enter__(self) -> RateLimiter:
        self.acquire()
        return self

    def __exit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        return None

    async def __aenter__(self) -> RateLimiter:
        await self.acquire_async()
        return self

    async def __aexit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        return None

    # -- state views ------------------------------------------------------------------------

    def tokens(self) -> float:
        """Units that could be admitted right now (fractional while refilling); read from
        the shared store when there is one and it answers."""
        tokens = self.binding.tokens(self._key)
        if tokens is None:  # the store cannot tell: say what this process would admit
            return float(self.burst) if self._local is None else self._local.tokens(self._key)
        return float(tokens)

    def _waiting(self) -> int:
        local = self._local
        return 0 if local is None else local.waiting(self._key)

    def snapshot(self) -> dict[str, Any]:
        """Settings, tokens and counters (a keyed view reports its own key and bucket)."""
        tokens = self.tokens()
        owner = self._owner
        out: dict[str, Any] = {
            "kind": self.kind,
            "name": owner.name,
            "rate": self.rate,
            "per": self.per,
            "burst": self.burst,
            "max_wait": self.max_wait,
            "tokens": _rounded(tokens),
            "waiting": self._waiting(),
            "admitted": owner._admitted.value,
            "rejected": owner._rejected.value,  # counters: atomic reads, no lock
            "waited": owner._waited,
            "keys": owner.keys,
            "evicted_early": owner.evicted_early,
        }
        if self._key is not None:
            out["key"] = repr(self._key)
        if self._local is None:
            out["store"] = self.binding.snapshot()
        return out

    def health_check(self) -> tuple[str, Any, str]:
        local, key = self._local, self._key
        if local is not None:  # in process: the bucket's own readings, two calls fewer
            tokens, waiting = local.tokens(key), local.waiting(key)
        else:
            tokens, waiting = self.tokens(), 0
        observed = {"tokens": _rounded(tokens), "waiting": waiting}
        # Saturated means demand exceeds the rate: callers are queued. An empty bucket
        # alone is normal between evenly spaced admissions (burst=1).
        if waiting:
            return "warn", observed, "rate limiter saturated: callers are queued"
        return "pass", observed, ""


def _rounded(tokens: float) -> float:
    """``tokens`` to 6 decimals for a report; a whole number (a full bucket) as it is,
    since ``round`` with digits formats the float: the costliest step of a check."""
    return tokens if tokens.is_integer() else round(tokens, 6)


def _read_through(self: Any, attr: str) -> Any:
    """A keyed view's ``__getattr__``: what it does not hold, its owner does."""
    if attr == "_owner":  # not set yet: no recursion
        raise AttributeError(attr)
    return getattr(self._owner, attr)


_VIEW_CLASSES: dict[type[RateLimiter], type[RateLimiter]] = {}
_VIEW_SLOTS = ("_owner", "_key", "binding", "_local", "burst", "max_wait")


def _view_class(cls: type[RateLimiter]) -> type[RateLimiter]:
    """The class of ``cls``'s keyed views: a slotted subclass (so ``isinstance`` and any
    overridden method still hold) that reads the owner's attributes through."""
    view_class = _VIEW_CLASSES.get(cls)
    if view_class is None:
        namespace = {
            "__slots__": _VIEW_SLOTS,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__getattr__": _read_through,
            "name": None,
            "_registry": None,
            "_fast": staticmethod(_never),
            # The owner's never-wait refusal judges the unkeyed bucket: a view has none.
            "_instant": None,
        }
        view_class = _VIEW_CLASSES.setdefault(cls, type(cls.__name__, (cls,), namespace))
    return view_class
