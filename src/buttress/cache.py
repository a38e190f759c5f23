"""Memoisation with a time to live, request coalescing and serve-stale.

``cache(ttl)`` remembers what a function returned for ``ttl`` seconds, keyed by its
arguments. On top of a plain TTL cache (cachetools' ``TTLCache``, timed by the
policy's clock) it adds what a service needs in front of a slow dependency:

- **Request coalescing (single flight).** Concurrent callers of a key that is not
  cached share *one* execution: the first caller starts it, the others wait for it,
  and all of them receive its result or its exception. Exceptions are shared, never
  cached.
- **Stale-while-revalidate.** For ``stale_while_revalidate`` seconds after a value
  expires it is still served at once, while one background refresh runs.
- **Stale-if-error.** When loading a new value fails, the last good value is served
  instead, as long as it expired less than ``stale_if_error`` seconds ago.

Async: the shared execution runs in a task of its own. A waiter that is cancelled
leaves without disturbing the others; when the last waiter leaves, the execution is
cancelled (nobody wants its result). Sync: the first caller runs the function in its
own thread and the others block until it is done. If the execution ends without an
outcome to share (it was cancelled, or raised ``KeyboardInterrupt``), the waiters
start over and one of them runs the function again: nobody is left hanging.

cachetools is an optional dependency (``pip install 'buttress[cache]'``), imported
when the first cache is built, never by ``import buttress``.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import weakref
from collections.abc import Callable, Hashable
from datetime import timedelta
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    NamedTuple,
    ParamSpec,
    Protocol,
    TypeVar,
    cast,
    overload,
)

from ._counter import Counter
from ._policy import Policy, PolicyOptions, is_async_callable
from ._validate import check_bool, check_callable, check_decoratable, check_int, check_seconds
from ._validate import require_seconds as _require_seconds
from .events import CacheRefreshFailed, CacheStaleServed  # defined in buttress.events
from .exceptions import ButtressError

if TYPE_CHECKING:
    from cachetools import TTLCache
    from typing_extensions import Self, Unpack

__all__ = [
    "BoundCachedMethod",
    "Cache",
    "CacheInfo",
    "CacheRefreshFailed",
    "CacheStaleServed",
    "CachedFunction",
    "MissingExtraError",
    "cache",
]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
P2 = ParamSpec("P2")
R2 = TypeVar("R2")
S = TypeVar("S")


class MissingExtraError(ButtressError, ImportError):
    """An optional dependency of a buttress feature is not installed."""


# -- what the decorated function offers ---------------------------------------------------------


class CacheInfo(NamedTuple):
    """Counters and size of one cached function (see :meth:`CachedFunction.cache_info`).

    ``misses`` counts executions started for callers, ``coalesced`` callers who
    joined an execution another caller had started, ``stale`` expired values served
    (while revalidating or instead of an error), ``errors`` executions that failed,
    ``refreshes`` background refreshes started.
    """

    hits: int
    misses: int
    coalesced: int
    stale: int
    errors: int
    refreshes: int
    maxsize: int
    currsize: int


class CachedFunction(Protocol[P, R_co]):
    """A function decorated by :class:`Cache`: same signature, plus cache controls."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def cache_clear(self) -> None:
        """Forget every cached value (executions in flight are not stored when they end)."""

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Forget the value cached for these arguments; True if there was one."""

    def cache_info(self) -> CacheInfo:
        """Counters and current size."""

    # Decorating a method: looked up on the class it stays this object; looked up on an
    # instance it is a bound method, whose signature lacks ``self``.
    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...

    @overload
    def __get__(
        self: CachedFunction[Concatenate[S, P2], R2],
        instance: S,
        owner: type[Any] | None = None,
    ) -> BoundCachedMethod[P2, R2]: ...

    def __get__(self, instance: object, owner: type[Any] | None = None) -> Any: ...


class BoundCachedMethod(Protocol[P, R_co]):
    """A cached method looked up on an instance.

    ``invalidate`` is not bound to the instance: call it on the class with the
    instance first, ``Repo.get.invalidate(repo, key)``.
    """

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def cache_clear(self) -> None:
        """Forget every cached value, for every instance."""

    def cache_info(self) -> CacheInfo:
        """Counters and current size, for every instance."""


# -- the store: one per decorated function --------------------------------------------------------

_VALUE, _ERROR, _STALE, _RETRY = 0, 1, 2, 3
_CONTROLS = ("cache_clear", "cache_info", "invalidate")
_AGAIN: Any = object()  # Store.deliver: the flight left nothing to share


class _Entry:
    __slots__ = ("stored_at", "value")

    def __init__(self, value: Any, stored_at: float) -> None:
        self.value = value
        self.stored_at = stored_at


class _Flight:
    """One execution of the function for one key, and everybody waiting for it."""

    __slots__ = ("detached", "event", "futures", "key", "outcome", "store_result", "task")

    def __init__(self, key: Hashable, *, detached: bool) -> None:
        self.key = key
        # A background refresh nobody waits for: never cancelled for lack of waiters.
        self.detached = detached
        # False once invalidated while running: its result is handed out but not stored.
        self.store_result = True
        self.outcome: tuple[int, Any] | None = None
        self.event = threading.Event()  # sync waiters
        self.futures: list[asyncio.Future[tuple[int, Any]]] = []  # async waiters
        self.task: asyncio.Task[None] | None = None


def _resolve(future: asyncio.Future[tuple[int, Any]], outcome: tuple[int, Any]) -> None:
    if not future.done():
        future.set_result(outcome)


class _Store:
    """Cached entries and flights of one decorated function; every decision under one lock."""

    def __init__(self, policy: Cache, data: TTLCache[Hashable, _Entry]) -> None:
        self.policy = policy
        self.now = policy.clock.now
        self.data = data
        self.flights: dict[Hashable, _Flight] = {}
        self.lock = threading.Lock()
        self.background: set[asyncio.Task[None]] = set()
        self.hits = Counter()
        self.misses = Counter()
        self.coalesced = Counter()
        self.stale = Counter()
        self.errors = Counter()
        self.refreshes = Counter()

    # -- decisions ------------------------------------------------------------------------------

    def lookup(self, key: Hashable) -> tuple[int, Any, Any]:
        """``(_VALUE, value, refresh flight or None)`` or ``(_RETRY, flight, is_leader)``.

        A returned refresh flight has just been created and must be started by the caller.
        """
        policy = self.policy
        with self.lock:
            try:
                # Not .get(): TTLCache.get checks membership and then reads, twice the work.
                entry: _Entry | None = self.data[key]
            except KeyError:
                entry = None
            age = -1.0
            if entry is not None:
                age = self.now() - entry.stored_at
                if age < policy.ttl:
                    self.hits.incr()
                    return _VALUE, entry.value, None
                swr = policy.stale_while_revalidate
                if swr is None or age >= policy.ttl + swr:
                    entry = None
            if entry is None:
                flight = self.flights.get(key)
                if flight is not None:
                    self.coalesced.incr()
                    return _RETRY, flight, False
                flight = self.flights[key] = _Flight(key, detached=False)
                self.misses.incr()
                return _RETRY, flight, True
            self.stale.incr()
            refresh = None
            if key not in self.flights:
                refresh = self.flights[key] = _Flight(key, detached=True)
                self.refreshes.incr()
        policy.emit(CacheStaleServed, reason="revalidating", age=age)
        return _VALUE, entry.value, refresh

    def finish(self, flight: _Flight, kind: int, value: Any) -> None:
        """Record the outcome of ``flight`` and wake everybody waiting for it."""
        policy = self.policy
        error: BaseException | None = None
        stale_age = -1.0
        with self.lock:
            if self.flights.get(flight.key) is flight:
                del self.flights[flight.key]
            if kind == _VALUE:
                if flight.store_result:
                    self.data[flight.key] = _Entry(value, self.now())
            elif kind == _ERROR:
                error = value
                # Every waiter re-raises the same exception object: keep the traceback it
                # came with, so the raises do not pile their frames onto one another.
                value = (value, value.__traceback__)
                self.errors.incr()
                entry = self.data.get(flight.key)
                sie = policy.stale_if_error
                if entry is not None and sie is not None:
                    age = self.now() - entry.stored_at
                    if age < policy.ttl + sie:
                        kind, value, stale_age = _STALE, entry.value, age
            outcome = (kind, value)
            flight.outcome = outcome
            futures, flight.futures = flight.futures, []
        flight.event.set()
        for future in futures:
            loop = future.get_loop()
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                _resolve(future, outcome)
            elif not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, future, outcome)
        if error is not None:
            if flight.detached:
                policy.emit(CacheRefreshFailed, error=error)
            if stale_age >= 0:
                policy.emit(CacheStaleServed, reason="error", age=stale_age, error=error)

    def deliver(self, flight: _Flight) -> Any:
        """What a caller of ``flight`` gets once it is over: its value, the stale value
        served instead of its error, its error raised, or ``_AGAIN`` (it ended with nothing
        to share: start over)."""
        outcome = flight.outcome
        assert outcome is not None
        kind, value = outcome
        if kind == _VALUE:
            return value
        if kind == _ERROR:
            del flight, outcome  # see _reraise
            try:
                _reraise(value)
            finally:
                del value
        if kind == _STALE:
            self.stale.incr()
            return value
        return _AGAIN

    def join(self, flight: _Flight, future: asyncio.Future[tuple[int, Any]]) -> bool:
        """Wait for ``flight`` through ``future``; False if it is already over."""
        with self.lock:
            if flight.outcome is not None:
                future.set_result(flight.outcome)
                return False
            flight.futures.append(future)
            return True

    def leave(self, flight: _Flight, future: asyncio.Future[tuple[int, Any]]) -> None:
        """A cancelled async waiter gives up its place; the last one out cancels the work."""
        with self.lock:
            if future in flight.futures:
                flight.futures.remove(future)
            orphaned = flight.outcome is None and not flight.detached and not flight.futures
            if orphaned and self.flights.get(flight.key) is flight:
                del self.flights[flight.key]
        task = flight.task
        if orphaned and task is not None:
            loop = task.get_loop()
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                task.cancel()
            elif not loop.is_closed():
                loop.call_soon_threadsafe(task.cancel)

    def invalidate(self, key: Hashable) -> bool:
        with self.lock:
            flight = self.flights.pop(key, None)
            if flight is not None:
                flight.store_result = False
            return self.data.pop(key, None) is not None

    def clear(self) -> None:
        with self.lock:
            for flight in self.flights.values():
                flight.store_result = False
            self.flights.clear()
            self.data.clear()

    def size(self) -> int:
        with self.lock:
            self.data.expire()
            return len(self.data)

    def in_flight(self) -> int:
        with self.lock:
            return len(self.flights)

    def info(self) -> CacheInfo:
        return CacheInfo(
            hits=self.hits.value,
            misses=self.misses.value,
            coalesced=self.coalesced.value,
            stale=self.stale.value,
            errors=self.errors.value,
            refreshes=self.refreshes.value,
            maxsize=self.policy.maxsize,
            currsize=self.size(),
        )

    # -- executions -----------------------------------------------------------------------------

    def run_sync(self, flight: _Flight, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        try:
            value = fn(*args, **kwargs)
        except Exception as exc:
            self.finish(flight, _ERROR, exc)
            del flight  # this frame is in the error's traceback: see _reraise
        except BaseException:
            self.finish(flight, _RETRY, None)
            raise
        else:
            self.finish(flight, _VALUE, value)

    def refresh_in_thread(
        self, flight: _Flight, fn: Callable[..., Any], args: Any, kwargs: Any
    ) -> None:
        thread = threading.Thread(
            target=self.run_sync,
            args=(flight, fn, args, kwargs),
            name="buttress-cache-refresh",
            daemon=True,
        )
        try:
            thread.start()
        except RuntimeError:
            # No thread to be had (interpreter shutdown, thread limit): the caller still gets
            # the stale value, and no flight is left behind that nobody runs.
            self.finish(flight, _RETRY, None)

    async def run_async(
        self, flight: _Flight, fn: Callable[..., Any], args: Any, kwargs: Any
    ) -> None:
        try:
            value = await fn(*args, **kwargs)
        except Exception as exc:
            self.finish(flight, _ERROR, exc)
            del flight  # this frame is in the error's traceback: see _reraise
        except BaseException:
            # Cancelled (every waiter left, or the loop is shutting down) or interrupted:
            # nothing to share; whoever still waits starts over.
            self.finish(flight, _RETRY, None)
            raise
        else:
            self.finish(flight, _VALUE, value)

    def start_task(self, flight: _Flight, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        loop = asyncio.get_running_loop()
        coro = self.run_async(flight, fn, args, kwargs)
        if flight.detached:
            # A background refresh outlives the call that triggered it: it must not
            # inherit that call's deadline or other context.
            task = contextvars.Context().run(loop.create_task, coro)
            self.background.add(task)
            task.add_done_callback(self.background.discard)
        else:
            task = loop.create_task(coro)
        flight.task = task


def _reraise(shared: tuple[BaseException, Any]) -> None:
    """Raise a shared exception with the traceback it came with.

    The frames on the way drop their references first: a frame that keeps a raised
    exception in a local (directly, or through the flight holding it) is part of a
    reference cycle through the traceback, freed only by the garbage collector.
    """
    error, traceback = shared
    del shared
    try:
        raise error.with_traceback(traceback)
    finally:
        del error, traceback


def _load_cachetools() -> Any:
    try:
        import cachetools
    except ImportError as exc:
        raise MissingExtraError(
            "buttress.cache needs cachetools, which is not installed: "
            "install the 'cache' extra with `pip install 'buttress[cache]'`"
        ) from exc
    return cachetools


# -- the policy ---------------------------------------------------------------------------------


class Cache(Policy):
    """Remember results for ``ttl`` seconds; concurrent callers of a missing key share one call.

    Args:
        ttl: seconds a value stays fresh (> 0, or a timedelta).
        maxsize: values kept per decorated function; the least recently used goes first.
        key: a function of the call's arguments returning the cache key (hashable).
            Default: the positional and keyword arguments, as ``functools.lru_cache`` does.
        typed: with the default key, cache arguments of different types separately
            (``1`` and ``1.0``).
        stale_while_revalidate: seconds after expiry during which the old value is still
            served at once while one background refresh runs (default: none).
        stale_if_error: seconds after expiry during which the old value is served when
            loading a new one fails (default: none; the error propagates).

    It also takes the options every primitive takes: ``name``, ``listeners``,
    ``registry`` and ``clock`` (see "Every primitive" on the options page).

    Raises:
        MissingExtraError: cachetools is not installed (``pip install 'buttress[cache]'``).
    """

    kind = "cache"

    def __init__(
        self,
        ttl: float | timedelta,
        *,
        maxsize: int = 1024,
        key: Callable[..., Hashable] | None = None,
        typed: bool = False,
        stale_while_revalidate: float | timedelta | None = None,
        stale_if_error: float | timedelta | None = None,
        name: str | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(name=name, **options)
        self.ttl = _require_seconds("ttl", ttl)
        self.maxsize = check_int("maxsize", maxsize)
        self.key: Callable[..., Hashable] | None = check_callable("key", key, allow_none=True)
        self.typed = check_bool("typed", typed)
        self.stale_while_revalidate = check_seconds(
            "stale_while_revalidate", stale_while_revalidate, allow_none=True
        )
        self.stale_if_error = check_seconds("stale_if_error", stale_if_error, allow_none=True)
        self._cachetools = _load_cachetools()
        self._stores: weakref.WeakSet[_Store] = weakref.WeakSet()
        self._stores_lock = threading.Lock()
        self._register()

    # -- decoration -----------------------------------------------------------------------------

    def __call__(self, fn: Callable[P, R]) -> CachedFunction[P, R]:
        """Decorate ``fn`` (sync or async); the wrapper keeps its signature."""
        check_decoratable(fn)
        wrapper = self._wrap_async(fn) if is_async_callable(fn) else self._wrap_sync(fn)
        controls = {name: getattr(wrapper, name) for name in _CONTROLS}
        self.wraps(wrapper, fn)
        wrapper.__dict__.update(controls)  # not the controls of a cached function we wrap
        return cast("CachedFunction[P, R]", wrapper)

    def _key_function(self) -> Callable[..., Hashable]:
        if self.key is not None:
            return self.key
        keys = self._cachetools.keys
        return cast("Callable[..., Hashable]", keys.typedkey if self.typed else keys.hashkey)

    def _new_store(self) -> _Store:
        # Values stay in the TTLCache as long as they can still be served stale.
        grace = max(self.stale_while_revalidate or 0.0, self.stale_if_error or 0.0)
        data = self._cachetools.TTLCache(
            maxsize=self.maxsize, ttl=self.ttl + grace, timer=self._clock.now
        )
        store = _Store(self, data)
        with self._stores_lock:
            self._stores.add(store)
        return store

    def _attach(self, wrapper: Any, store: _Store, make_key: Callable[..., Hashable]) -> None:
        def invalidate(*args: Any, **kwargs: Any) -> bool:
            return store.invalidate(make_key(*args, **kwargs))

        wrapper.cache_clear = store.clear
        wrapper.invalidate = invalidate
        wrapper.cache_info = store.info

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        store = self._new_store()
        make_key = self._key_function()
        lookup, deliver = store.lookup, store.deliver
        run, refresh = store.run_sync, store.refresh_in_thread

        def cached(*args: Any, **kwargs: Any) -> Any:
            key = make_key(*args, **kwargs)
            while True:
                kind, payload, extra = lookup(key)
                if kind == _VALUE:
                    if extra is not None:
                        refresh(extra, fn, args, kwargs)
                    return payload
                if extra:
                    run(payload, fn, args, kwargs)
                else:
                    payload.event.wait()
                try:
                    answer = deliver(payload)
                finally:
                    del payload  # see _reraise
                if answer is not _AGAIN:
                    return answer

        self._attach(cached, store, make_key)
        return cached

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        store = self._new_store()
        make_key = self._key_function()
        lookup, deliver = store.lookup, store.deliver
        join, leave, start = store.join, store.leave, store.start_task

        async def cached(*args: Any, **kwargs: Any) -> Any:
            key = make_key(*args, **kwargs)
            while True:
                kind, payload, extra = lookup(key)
                if kind == _VALUE:
                    if extra is not None:
                        start(extra, fn, args, kwargs)
                    return payload
                if extra:
                    start(payload, fn, args, kwargs)
                future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
                if join(payload, future):
                    try:
                        await future
                    except asyncio.CancelledError:
                        leave(payload, future)
                        raise
                del future  # it holds the outcome too: see _reraise
                try:
                    answer = deliver(payload)
                finally:
                    del payload
                if answer is not _AGAIN:
                    return answer

        self._attach(cached, store, make_key)
        return cached

    # -- control and state ----------------------------------------------------------------------

    def _live_stores(self) -> list[_Store]:
        with self._stores_lock:
            return list(self._stores)

    def clear(self) -> None:
        """Forget every value cached by every function this policy decorates."""
        for store in self._live_stores():
            store.clear()

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Forget the value cached for these arguments in every decorated function."""
        make_key = self._key_function()
        key = make_key(*args, **kwargs)
        found = False
        for store in self._live_stores():
            found = store.invalidate(key) or found
        return found

    def snapshot(self) -> dict[str, Any]:
        stores = self._live_stores()
        infos = [store.info() for store in stores]

        def total(field: str) -> int:
            return sum(getattr(info, field) for info in infos)

        return {
            "kind": self.kind,
            "name": self.name,
            "ttl": self.ttl,
            "maxsize": self.maxsize,
            "stale_while_revalidate": self.stale_while_revalidate,
            "stale_if_error": self.stale_if_error,
            "size": total("currsize"),
            "in_flight": sum(store.in_flight() for store in stores),
            "hits": total("hits"),
            "misses": total("misses"),
            "coalesced": total("coalesced"),
            "stale": total("stale"),
            "errors": total("errors"),
            "refreshes": total("refreshes"),
        }


cache = Cache
"""``cache(ttl, maxsize=1024, ...)``: the same as :class:`Cache`."""
