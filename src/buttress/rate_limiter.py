"""Rate limiter: exact GCRA (the generic cell rate algorithm, a token bucket without a timer).

State is one number per bucket, the theoretical arrival time ``tat``. With the
emission interval ``T = per / rate`` and capacity ``burst``, a request of weight
``w`` at time ``now`` is admitted iff ``max(tat, now) + w*T - now <= burst*T``,
and then ``tat`` becomes ``max(tat, now) + w*T``. This admits at most
``burst + rate * t / per`` units in any interval of length ``t``, with no
boundary effects.

Waiting callers queue FIFO; only the head of the queue sleeps, until the exact
time its request conforms. Because GCRA knows that time, a caller whose wait
would exceed ``max_wait`` or the enclosing deadline is rejected at once instead
of waiting in vain. Queued callers hold nothing, so a cancelled one leaks nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from types import TracebackType
from typing import Any

from . import events as _events
from ._counter import Counter
from ._deadline import remaining
from ._policy import Policy
from ._validate import check_int, check_number, check_seconds, require_seconds
from ._waiters import Waiter, WaiterQueue
from .clock import Clock
from .exceptions import ConfigTypeError, ConfigValueError, RateLimited
from .registry import Registry

__all__ = ["RateLimiter"]

# Float slack when comparing times, far below any meaningful admission interval.
_EPS = 1e-9


def _never() -> bool:
    return False


class _Bucket:
    __slots__ = ("dropped", "key", "tat", "view", "waiters")

    def __init__(self, key: Hashable = None) -> None:
        self.tat = float("-inf")
        self.waiters = WaiterQueue()
        self.dropped = False
        self.key = key
        self.view: RateLimiter | None = None


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
        store: shared state backend, e.g. a
            :class:`~buttress.backends.redis.RedisRateLimiterStore` (the limiter then needs
            a name); ``None`` (default) keeps the state in this process.
        max_keys: live per-key buckets kept by :meth:`for_key` (default 100,000).
        listeners: event listeners for this limiter only.
        registry: registry to join instead of the default one.
        clock: time source (default: the system clock).
    """

    kind = "rate_limiter"

    def __init__(
        self,
        name: str | None = None,
        *,
        rate: float,
        per: float = 1.0,
        burst: int | None = None,
        max_wait: float | None = None,
        store: object = None,
        max_keys: int = 100_000,
        listeners: Iterable[_events.Listener] | None = None,
        registry: Registry | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(name=name, listeners=listeners, registry=registry, clock=clock)
        self.rate = check_number("rate", rate, min_value=0.0, min_inclusive=False)
        seconds = require_seconds("per", per)
        self.per = seconds
        self.burst = 1 if burst is None else check_int("burst", burst)
        self.max_wait = check_seconds("max_wait", max_wait, allow_zero=True, allow_none=True)
        self.max_keys = check_int("max_keys", max_keys)
        self._interval = self.per / self.rate
        if not 0 < self._interval * self.burst < float("inf"):
            raise ConfigValueError(
                f"rate={rate!r} per per={per!r} seconds gives an emission interval out of range"
            )
        self._tolerance = self.burst * self._interval
        self._limit = self._tolerance + _EPS
        self._now = self._clock.now
        self._lock = threading.Lock()
        self._bucket = _Bucket()
        self._buckets: dict[Hashable, _Bucket] = {}
        self._parent: RateLimiter | None = None
        self._created_since_sweep = 0
        self._admitted = 0
        self._fast_admitted = Counter()  # admissions on the lock-free-counted hot path
        self._rejected = 0
        self._waited = 0
        self._evicted_horizon = float("-inf")
        self._shared: Any = None
        if store is not None:
            bind = getattr(store, "bind", None)
            if not callable(bind) or not hasattr(store, "backend"):
                raise ConfigTypeError(
                    f"store must be a rate limiter store such as "
                    f"buttress.backends.redis.RedisRateLimiterStore, got {store!r}"
                )
            self._shared = bind(self)
        self._fast: Callable[[], bool] = _never if self._shared else self._make_fast()
        self._register()

    # -- GCRA (lock held) -------------------------------------------------------------------

    def _live_bucket(self) -> _Bucket:
        bucket = self._bucket
        if bucket.dropped:  # a keyed view whose idle bucket was dropped: take the live one
            assert self._parent is not None
            bucket = self._bucket = self._parent._key_bucket(bucket.key)
        return bucket

    def _conform(self, bucket: _Bucket, now: float, weight: int) -> float:
        """Admit ``weight`` now and return 0.0, or return the seconds until it would conform."""
        tat = bucket.tat if bucket.tat > now else now
        new_tat = tat + weight * self._interval
        excess = new_tat - now - self._tolerance
        if excess <= _EPS:
            bucket.tat = new_tat
            return 0.0
        return excess

    def _check_weight(self, weight: int) -> int:
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ConfigTypeError(f"weight must be an integer, got {weight!r}")
        if weight < 1 or weight > self.burst:
            raise ConfigValueError(
                f"weight must be between 1 and burst ({self.burst}), got {weight!r}"
            )
        return weight

    # -- non-blocking ------------------------------------------------------------------------

    def _make_fast(self) -> Callable[[], bool]:
        """Build the hot path once: admit one unit of an unkeyed limiter with nobody queued.

        The closure holds everything it needs in locals (no attribute lookups per call).
        The clock is read inside the lock, so a reading is never older than the state
        it is compared with; ``try/finally`` keeps the lock safe from async signals.
        """
        now_fn, bucket, queue = self._now, self._bucket, self._bucket.waiters.items
        lock_acquire, lock_release = self._lock.acquire, self._lock.release
        interval, limit = self._interval, self._limit
        count = self._fast_admitted.incr

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

    def try_acquire(self, weight: int = 1) -> bool:
        """Admit ``weight`` units now if possible; never waits, never jumps the queue."""
        if weight != 1:
            self._check_weight(weight)
        if self._shared is not None:
            try:
                if not self._shared.acquire(self._bucket.key, weight, 0.0):
                    return True
            except RateLimited:
                return False
        lock = self._lock_of()
        with lock:
            bucket = self._live_bucket()
            if not bucket.waiters and self._conform(bucket, self._clock.now(), weight) == 0.0:
                self._count("admitted")
                return True
            return False

    def _try_key(self, key: Hashable) -> bool:
        """``for_key(key).try_acquire()`` in one hold of the lock and without the view: the
        hot path of a keyed limiter in front of every request (the ASGI middleware)."""
        if self._shared is not None or self._parent is not None:
            return self.for_key(key).try_acquire()
        with self._lock:
            try:
                bucket = self._buckets.get(key)
            except TypeError:
                bucket = None  # unhashable: for_key() below says so
            else:
                if bucket is None:
                    bucket = self._key_bucket(key)
                if not bucket.waiters and self._conform(bucket, self._now(), 1) == 0.0:
                    self._admitted += 1
                    return True
                return False
        return self.for_key(key).try_acquire()

    # -- blocking ----------------------------------------------------------------------------

    def _count(self, what: str) -> None:
        owner = self._parent if self._parent is not None else self
        if what == "admitted":
            owner._admitted += 1
        elif what == "rejected":
            owner._rejected += 1
        else:
            owner._waited += 1

    def _admit_or_queue(self, weight: int, is_async: bool) -> Waiter | float | None:
        """Lock held. ``None``: admitted. A float: rejected, retry after it. Else queued."""
        bucket = self._live_bucket()
        now = self._clock.now()
        if not bucket.waiters:
            wait = self._conform(bucket, now, weight)
            if wait == 0.0:
                self._count("admitted")
                return None
        # When would this request conform if everyone queued ahead of it is served first?
        start = bucket.tat if bucket.tat > now else now
        wait = start + (bucket.waiters.weight + weight) * self._interval - self._tolerance - now
        limit = self.max_wait
        left = remaining()
        if left is not None and (limit is None or left < limit):
            limit = left
        if limit is not None and wait > limit + _EPS:
            self._count("rejected")
            return max(wait, 0.0)
        waiter = Waiter(weight, is_async=is_async)
        bucket.waiters.append(waiter)
        return waiter

    def _head_step(self, waiter: Waiter) -> float | None:
        """Lock held. If ``waiter`` heads its queue, admit it (``0.0``) or say how long to sleep;
        ``None`` means "not the head yet: wait to be woken"."""
        bucket = self._live_bucket()
        if bucket.waiters.head() is not waiter:
            return None
        wait = self._conform(bucket, self._clock.now(), waiter.weight)
        if wait == 0.0:
            bucket.waiters.popleft()
            waiter.granted = True
            self._count("admitted")
            self._count("waited")
            following = bucket.waiters.head()
            if following is not None:
                following.wake()
        return wait

    def _leave(self, waiter: Waiter) -> None:
        """Lock held. An interrupted waiter leaves the queue (it holds nothing)."""
        bucket = self._live_bucket()
        was_head = bucket.waiters.head() is waiter
        bucket.waiters.remove(waiter)
        if was_head:
            following = bucket.waiters.head()
            if following is not None:
                following.wake()

    def _label(self) -> str:
        owner = self._parent if self._parent is not None else self
        return "rate limiter" if owner.name is None else f"rate limiter {owner.name!r}"

    def _wait_budget(self) -> float | None:
        """Seconds a caller may wait: ``max_wait`` or the enclosing deadline, the smaller."""
        limit = self.max_wait
        left = remaining()
        if left is not None and (limit is None or left < limit):
            limit = max(left, 0.0)
        return limit

    def _rate_limited(self, retry_after: float) -> RateLimited:
        self.emit(_events.CallRejected, reason="rate_limited", retry_after=retry_after)
        return RateLimited(
            f"{self._label()}: no permit within the allowed wait (next in {retry_after:.3f}s)",
            retry_after=retry_after,
            name=self.name,
        )

    def _lock_of(self) -> threading.Lock:
        return self._parent._lock if self._parent is not None else self._lock

    def acquire(self, weight: int = 1) -> None:
        """Admit ``weight`` units, waiting up to ``max_wait``; raises :class:`RateLimited`."""
        if weight == 1 and self._fast():
            return
        self._acquire_sync(weight)

    def _acquire_sync(self, weight: int) -> None:
        if weight != 1:
            self._check_weight(weight)
        shared = self._shared
        if shared is not None and not shared.acquire(self._bucket.key, weight, self._wait_budget()):
            return
        lock = self._lock_of()
        with lock:
            outcome = self._admit_or_queue(weight, False)
        if outcome is None:
            return
        if isinstance(outcome, float):
            raise self._rate_limited(outcome)
        waiter = outcome
        started = self._clock.now()
        assert waiter.event is not None
        try:
            while True:
                with lock:
                    step = self._head_step(waiter)
                if step is None:
                    self._clock.wait(waiter.event, None)
                    waiter.event.clear()
                elif step == 0.0:
                    break
                else:
                    self._clock.sleep(step)
        except BaseException:
            with lock:
                if not waiter.granted:
                    self._leave(waiter)
            raise
        self.emit(_events.AcquiredAfterWait, waited=self._clock.now() - started)

    async def acquire_async(self, weight: int = 1) -> None:
        """Async twin of :meth:`acquire`; a cancelled waiter takes nothing."""
        if weight == 1 and self._fast():
            return
        await self._acquire_async(weight)

    async def _acquire_async(self, weight: int) -> None:
        if weight != 1:
            self._check_weight(weight)
        shared = self._shared
        if shared is not None and not await shared.acquire_async(
            self._bucket.key, weight, self._wait_budget()
        ):
            return
        lock = self._lock_of()
        with lock:
            outcome = self._admit_or_queue(weight, True)
        if outcome is None:
            return
        if isinstance(outcome, float):
            raise self._rate_limited(outcome)
        waiter = outcome
        started = self._clock.now()
        assert waiter.future is not None
        try:
            while True:
                with lock:
                    step = self._head_step(waiter)
                if step is None:
                    await self._clock.wait_future(waiter.future, None)
                    if waiter.loop is not None:
                        waiter.future = waiter.loop.create_future()
                elif step == 0.0:
                    break
                else:
                    await self._clock.asleep(step)
        except BaseException:
            with lock:
                if not waiter.granted:
                    self._leave(waiter)
            raise
        self.emit(_events.AcquiredAfterWait, waited=self._clock.now() - started)

    # -- per-key limiters -------------------------------------------------------------------

    def for_key(self, key: Hashable) -> RateLimiter:
        """A limiter with the same settings whose budget belongs to ``key`` alone.

        Buckets of idle keys (full again, nobody waiting) are dropped, which changes
        nothing since a new bucket starts full. At most ``max_keys`` buckets are kept: past
        that the oldest are evicted even if not yet full, and until their state would have
        refilled, new buckets start as drained as the most drained evicted one, so that
        eviction can only ever make the limiter stricter, never admit more.
        """
        if self._parent is not None:
            return self._parent.for_key(key)
        try:
            hash(key)
        except TypeError:
            raise ConfigTypeError(
                f"key must be hashable, got {key!r} ({type(key).__name__})"
            ) from None
        with self._lock:
            bucket = self._key_bucket(key)
            view = bucket.view
            if view is None:
                view = bucket.view = self._make_view(bucket)
            return view

    def _key_bucket(self, key: Hashable) -> _Bucket:
        """Lock held: the live bucket of ``key``, created on demand."""
        bucket = self._buckets.get(key)
        if bucket is None:
            self._created_since_sweep += 1
            if (
                self._created_since_sweep > max(64, len(self._buckets) // 2)
                or len(self._buckets) >= self.max_keys
            ):
                self._sweep()
            bucket = self._buckets[key] = _Bucket(key)
            if self._evicted_horizon > self._clock.now():
                # A key evicted while its bucket was not full may be this one: start
                # drained up to the latest evicted state, never more generous than it.
                bucket.tat = self._evicted_horizon
        return bucket

    def _sweep(self) -> None:
        """Lock held: drop idle buckets, then the oldest ones beyond ``max_keys``."""
        self._created_since_sweep = 0
        now = self._clock.now()
        idle = [k for k, b in self._buckets.items() if b.tat <= now + _EPS and not b.waiters]
        for key in idle:
            self._buckets.pop(key).dropped = True
        excess = len(self._buckets) - self.max_keys + 1
        if excess > 0:
            # Evict a batch (the oldest keys), so that a full table is not swept per key.
            excess = max(excess, self.max_keys // 10)
            for key in [k for k, b in self._buckets.items() if not b.waiters][:excess]:
                evicted = self._buckets.pop(key)
                evicted.dropped = True
                self._evicted_horizon = max(self._evicted_horizon, evicted.tat)

    def _make_view(self, bucket: _Bucket) -> RateLimiter:
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.name = None
        view._registry = None
        view._parent = self
        view._bucket = bucket
        view._buckets = {}
        view._fast = _never
        return view

    @property
    def keys(self) -> int:
        """Live per-key buckets held in memory."""
        with self._lock:
            return len(self._buckets)

    # -- drivers ----------------------------------------------------------------------------

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        slow = self._acquire_sync
        fast = self._fast if self._parent is None else _never

        def limited(*args: Any, **kwargs: Any) -> Any:
            if not fast():
                slow(1)
            return fn(*args, **kwargs)

        return limited

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        slow = self._acquire_async
        fast = self._fast if self._parent is None else _never

        async def limited(*args: Any, **kwargs: Any) -> Any:
            if not fast():
                await slow(1)
            return await fn(*args, **kwargs)

        return limited

    def __enter__(self) -> RateLimiter:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def __aenter__(self) -> RateLimiter:
        await self.acquire_async()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    # -- state views ------------------------------------------------------------------------

    def tokens(self) -> float:
        """Units that could be admitted right now (fractional while refilling); read from
        the shared store when there is one and it answers."""
        if self._shared is not None:
            shared_tokens = self._shared.tokens(self._bucket.key)
            if shared_tokens is not None:
                return float(shared_tokens)
        with self._lock_of():
            bucket = self._live_bucket()
            debt = bucket.tat - self._clock.now()
            if debt < 0:
                debt = 0.0
            return max(self._tolerance - debt, 0.0) / self._interval

    def snapshot(self) -> dict[str, Any]:
        """Settings, tokens and counters (a keyed view reports its own key and bucket)."""
        tokens = self.tokens()
        owner = self._parent if self._parent is not None else self
        with self._lock_of():
            out: dict[str, Any] = {
                "kind": self.kind,
                "name": owner.name,
                "rate": self.rate,
                "per": self.per,
                "burst": self.burst,
                "max_wait": self.max_wait,
                "tokens": round(tokens, 6),
                "waiting": len(self._live_bucket().waiters),
                "admitted": owner._admitted + owner._fast_admitted.value,
                "rejected": owner._rejected,
                "waited": owner._waited,
                "keys": len(owner._buckets),
            }
            if self._parent is not None:
                out["key"] = repr(self._bucket.key)
        if self._shared is not None:
            out["store"] = self._shared.snapshot()
        return out

    def health_check(self) -> tuple[str, Any, str]:
        tokens = self.tokens()
        with self._lock_of():
            waiting = len(self._live_bucket().waiters)
        observed = {"tokens": round(tokens, 6), "waiting": waiting}
        # Saturated means demand exceeds the rate: callers are queued. An empty bucket
        # alone is normal between evenly spaced admissions (burst=1).
        if waiting:
            return "warn", observed, "rate limiter saturated: callers are queued"
        return "pass", observed, ""
