"""Redis backends: rate limits, breaker state, bulkhead slots and saga idempotency keys
shared by every process that points at the same Redis.

Install with ``pip install buttress[redis]`` (redis-py, plus hiredis where it installs).
Each store is handed to a primitive's ``store=`` (or a saga's ``idempotency=``)::

    limiter = RateLimiter("api", rate=100, store=RedisRateLimiterStore(url))

and every decision is made by one Lua script on the server, in one round trip, on the
server's clock. Keys are ``<prefix>{<kind>:<name>}``: the hash tag keeps each primitive's
state in one Cluster slot, and every script touches exactly one key. Stores connect
lazily: from ``url`` they build a sync client and, per event loop, an async client
(``cluster=True`` builds Redis Cluster clients; close them with :meth:`close` /
:meth:`aclose`), or they use the ``client=`` / ``async_client=`` you pass
(``redis.Redis`` or ``redis.cluster.RedisCluster``, and their asyncio twins; set their
``socket_timeout``).

When Redis fails, ``on_backend_error`` decides (see :mod:`buttress.backends._degrade`):
``"fail_closed"`` refuses calls, ``"fail_open"`` lets them through, ``"local"`` falls back
to the primitive's in-process state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from buttress import events as _events
from buttress._validate import check_int, check_seconds, require_seconds
from buttress.exceptions import (
    BackendError,
    BulkheadFull,
    CircuitOpenError,
    ConfigTypeError,
    ConfigValueError,
    RateLimited,
)

from . import (
    COMPLETED,
    INCOMPLETE,
    NO_REPORT,
    BindingBase,
    BreakerStatus,
    KeyClaim,
    LogEntry,
    Outcome,
    RunRecord,
)
from . import _redis_scripts as scripts
from ._degrade import Gate, check_mode

if TYPE_CHECKING:
    import redis as _redis
    import redis.asyncio as _aredis

    from buttress.bulkhead import Bulkhead
    from buttress.circuit_breaker import CircuitBreaker
    from buttress.rate_limiter import RateLimiter

__all__ = [
    "RedisBreakerStore",
    "RedisBulkheadStore",
    "RedisIdempotencyStore",
    "RedisRateLimiterStore",
]

_DEFAULT_PREFIX = "buttress:"


def _import_redis() -> Any:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the Redis backends need redis-py: pip install 'buttress[redis]'"
        ) from exc
    return redis


def _backend_errors() -> tuple[type[BaseException], ...]:
    redis = _import_redis()
    return (redis.RedisError, OSError, asyncio.TimeoutError)


def _client_kinds() -> tuple[tuple[type, type], tuple[type, type]]:
    """The client classes a store accepts: (sync, async), each (standalone, Cluster)."""
    redis = _import_redis()
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import RedisCluster

    return (redis.Redis, RedisCluster), (redis.asyncio.Redis, AsyncRedisCluster)


def _check_url(url: object) -> None:
    """Refuse a URL redis-py would only choke on at the first call."""
    if not isinstance(url, str):
        raise ConfigTypeError(f"url must be a redis://, rediss:// or unix:// URL, got {url!r}")
    from urllib.parse import urlsplit

    from redis.connection import parse_url

    try:
        parse_url(url)  # type: ignore[no-untyped-call]
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigValueError(f"url must be a valid Redis URL ({exc}), got {url!r}") from None
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigValueError(f"url must name a socket path after unix://, got {url!r}")
        return
    if port is not None and not 0 < port < 65536:
        raise ConfigValueError(f"url must have a port within 1..65535, got {url!r}")
    db = parts.path.lstrip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise ConfigValueError(f"url must end in a database number (/0), got {url!r}")


class _Connection:
    """Lazily built clients for one Redis deployment: one sync client, one async client
    per event loop (async connections belong to the loop that opened them)."""

    def __init__(
        self, url: str | None, client: Any, async_client: Any, timeout: float, cluster: bool
    ) -> None:
        sync_kinds, async_kinds = _client_kinds()
        if url is None and client is None and async_client is None:
            raise ConfigValueError("a Redis store needs url=, client= or async_client=")
        if url is not None:
            _check_url(url)
        if not isinstance(cluster, bool):
            raise ConfigTypeError(f"cluster must be True or False, got {cluster!r}")
        if client is not None and not isinstance(client, sync_kinds):
            raise ConfigTypeError(
                f"client must be a redis.Redis or redis.cluster.RedisCluster, got {client!r}"
            )
        if async_client is not None and not isinstance(async_client, async_kinds):
            raise ConfigTypeError(
                "async_client must be a redis.asyncio.Redis or "
                f"redis.asyncio.cluster.RedisCluster, got {async_client!r}"
            )
        self.url = url
        self.timeout = timeout
        self.cluster = cluster
        self._client: Any = client
        self._async_client: Any = async_client
        self._owned_sync = False
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Batcher] = (
            weakref.WeakKeyDictionary()
        )
        self._recent: tuple[weakref.ref[asyncio.AbstractEventLoop], _Batcher] | None = None
        self._lock = threading.Lock()
        self._shas: dict[str, str] = {}

    def _options(self, asynchronous: bool) -> dict[str, Any]:
        # Each face takes its own Retry class (redis-py 6+ warns, and drops a custom
        # call_with_retry, when an async client is given the sync one).
        import redis.asyncio.retry
        import redis.retry
        from redis.backoff import NoBackoff

        retry: Any = redis.asyncio.retry.Retry if asynchronous else redis.retry.Retry

        # No client-side retries: a failed call is the store's to handle (on_backend_error),
        # and retrying inside the client would multiply the timeout. A Cluster client gets
        # one, so that it can follow a MOVED or ASK redirect after a failover or a reshard.
        return {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "retry": retry(NoBackoff(), 1 if self.cluster else 0),
        }

    def _build(self, asynchronous: bool) -> Any:
        assert self.url is not None
        sync_kinds, async_kinds = _client_kinds()
        kind = (async_kinds if asynchronous else sync_kinds)[1 if self.cluster else 0]
        return kind.from_url(self.url, **self._options(asynchronous))  # type: ignore[attr-defined]

    def sync(self) -> _redis.Redis:
        client = self._client
        if client is None:
            if self.url is None:
                raise ConfigTypeError(
                    "this Redis store was given only async_client=: pass url= or client= "
                    "to use it from sync code"
                )
            with self._lock:
                if self._client is None:
                    self._client = self._build(asynchronous=False)
                    self._owned_sync = True
                client = self._client
        return client  # type: ignore[no-any-return]

    def aio(self) -> _aredis.Redis:
        if self._async_client is not None:
            return self._async_client  # type: ignore[no-any-return]
        if self.url is None:
            raise ConfigTypeError(
                "this Redis store was given only client=: pass url= or async_client= "
                "to use it from async code"
            )
        loop = asyncio.get_running_loop()
        client = self._per_loop.get(loop)
        if client is None:
            client = self._build(asynchronous=True)
            self._per_loop[loop] = client
        return client  # type: ignore[no-any-return]

    def sha(self, script: str) -> str:
        sha = self._shas.get(script)
        if sha is None:
            import hashlib

            sha = self._shas[script] = hashlib.sha1(script.encode()).hexdigest()
        return sha

    def run(self, script: str, key: str, *args: Any) -> Any:
        """EVALSHA in one round trip (loading the script once if the server lacks it)."""
        client: Any = self.sync()
        try:
            return client.execute_command("EVALSHA", self.sha(script), 1, key, *args)
        except _import_redis().exceptions.NoScriptError:
            client.script_load(script)
            return client.execute_command("EVALSHA", self.sha(script), 1, key, *args)

    def batcher(self) -> _Batcher:
        """The running loop's pipeliner (built with the loop's async client)."""
        loop = asyncio.get_running_loop()
        recent = self._recent
        if recent is not None and recent[0]() is loop:
            return recent[1]
        batcher = self._batchers.get(loop)
        if batcher is None:
            batcher = self._batchers[loop] = _Batcher(self, self.aio())
        self._recent = (weakref.ref(loop), batcher)
        return batcher

    async def arun(
        self, script: str, key: str, *args: Any, orphan: Callable[[Any], object] | None = None
    ) -> Any:
        """EVALSHA through the loop's pipeliner: alone at once when nothing is in flight,
        else in the next pipeline. ``orphan(reply)`` is called with the reply of a call
        whose caller was cancelled while it waited in the queue (to give back what the
        script granted it)."""
        batcher = self.batcher()
        if batcher.busy:
            return await batcher.queue_call(script, key, args, orphan)
        # nothing in flight: this call goes out alone, at once
        batcher.busy = True
        batcher.round_trips += 1
        batcher.calls += 1
        client = batcher.client
        try:
            try:
                return await client.execute_command("EVALSHA", self.sha(script), 1, key, *args)
            except _import_redis().exceptions.NoScriptError:
                await client.script_load(script)
                return await client.execute_command("EVALSHA", self.sha(script), 1, key, *args)
        finally:
            batcher.done()

    def post(self, script: str, key: str, *args: Any, merge: bool = False) -> asyncio.Future[Any]:
        """EVALSHA in the next pipeline without waiting for it (fire and forget): the
        future holds the reply or the error. ``merge``: the last argument joins a call
        with the same other arguments already waiting for that pipeline, if any (one
        command for many releases; they share its future)."""
        batcher = self.batcher()
        if merge:
            return batcher.post_merged(script, key, args[:-1], args[-1])
        return batcher.post(script, key, args)

    def close(self) -> None:
        with self._lock:
            client = self._client if self._owned_sync else None
            if self._owned_sync:
                self._client = None
                self._owned_sync = False
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover
            return
        batcher = self._batchers.pop(loop, None)
        self._recent = None
        if batcher is not None:
            await batcher.flush()  # what was posted (releases) still goes out
        client = self._per_loop.pop(loop, None)
        if client is not None:
            await client.aclose()


_Call = tuple[str, str, tuple[Any, ...], "asyncio.Future[Any]", "Callable[[Any], object] | None"]
_serials = itertools.count()
# Items one merged call carries at most (a Lua script unpacks its arguments on a stack of
# about 8,000 slots).
_MERGED = 256


class _Batcher:
    """Automatic pipelining for one event loop: at most one round trip in flight.

    A caller that finds nothing in flight sends its command alone, at once (no added
    wait). Callers that arrive while a round trip is in flight queue their command;
    when it returns, everything queued goes out as one pipeline on one connection
    (``transaction=False``: the commands are independent, each gets its own reply or
    error). So concurrent callers share round trips and one connection, and commands
    reach the server in the order they were issued.
    """

    # No reference to the loop itself: the store's per-loop tables hold it weakly.
    __slots__ = (
        "busy",
        "calls",
        "client",
        "cluster",
        "conn",
        "merging",
        "queue",
        "round_trips",
        "serial",
        "task",
    )

    def __init__(self, conn: _Connection, client: Any) -> None:
        self.serial = next(_serials)  # names it in _UNSENT (never reused, unlike id())
        self.conn = conn
        self.client = client
        self.cluster = not isinstance(client, _client_kinds()[1][0])
        self.queue: list[_Call] = []
        # (script, key, leading args) -> index in queue of a merged call still open
        self.merging: dict[tuple[str, str, tuple[Any, ...]], int] = {}
        self.busy = False  # a round trip in flight, or a drain about to start
        self.task: asyncio.Task[None] | None = None
        self.round_trips = 0  # requests written (a pipeline is one)
        self.calls = 0  # commands sent

    def queue_call(
        self,
        script: str,
        key: str,
        args: tuple[Any, ...],
        orphan: Callable[[Any], object] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue a call for the next pipeline (a round trip is in flight)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.append((script, key, args, future, orphan))
        return future

    def post(self, script: str, key: str, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.append((script, key, args, future, None))
        if not self.busy:
            self.busy = True
            self._start()
        return future

    def post_merged(
        self, script: str, key: str, head: tuple[Any, ...], item: Any
    ) -> asyncio.Future[Any]:
        """Like :meth:`post` with arguments ``head + (item,)``, but ``item`` joins the
        call with the same ``head`` queued for this pipeline, if there is one and it has
        room: its future is shared."""
        index = self.merging.get((script, key, head))
        if index is not None:
            script_, key_, args, future, orphan = self.queue[index]
            self.queue[index] = (script_, key_, (*args, item), future, orphan)
            if len(args) + 1 - len(head) >= _MERGED:
                del self.merging[script, key, head]  # full: the next one opens another
            return future
        self.merging[script, key, head] = len(self.queue)
        return self.post(script, key, (*head, item))

    def done(self) -> None:
        """The call sent alone is answered: send what queued meanwhile."""
        if self.queue:
            self._start()
        else:
            self.busy = False

    def _start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        cancelled = False
        try:
            while self.queue:
                batch, self.queue = self.queue, []
                self.merging.clear()
                # A round trip is never torn in half: cancelled (loop shutdown), the
                # drain still waits for the replies and sends what is queued, then stops.
                send = asyncio.get_running_loop().create_task(self._send(batch))
                while not send.done():
                    try:
                        await asyncio.shield(send)
                    except asyncio.CancelledError:
                        cancelled = True
        finally:
            self.busy = False
            self.task = None
        if cancelled:
            raise asyncio.CancelledError

    async def _send(self, batch: list[_Call]) -> None:
        self.round_trips += 1
        self.calls += len(batch)
        try:
            replies = await self._pipeline(batch)
            no_script = _import_redis().exceptions.NoScriptError
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, no_script)]
            if missing:  # a restarted or flushed server: load the scripts, send those again
                for script in {batch[i][0] for i in missing}:
                    await self.client.script_load(script)
                self.round_trips += 1
                again = await self._pipeline([batch[i] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except BaseException as exc:
            for *_, future, _ in batch:
                if not future.done():
                    future.set_exception(_copy(exc))
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, future, orphan), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller was cancelled while waiting
                if orphan is not None and not isinstance(reply, BaseException):
                    with contextlib.suppress(Exception):  # a give-back is best effort
                        orphan(reply)
                continue
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        client, sha = self.client, self.conn.sha
        pipe = client.pipeline() if self.cluster else client.pipeline(transaction=False)
        for script, key, args, *_ in batch:
            pipe.execute_command("EVALSHA", sha(script), 1, key, *args)
        return list(await pipe.execute(raise_on_error=False))

    async def flush(self) -> None:
        """Wait until everything queued has been sent and answered."""
        while self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.task)


def _copy(exc: BaseException) -> BaseException:
    """One exception per waiting caller (each raise adds its own traceback)."""
    if isinstance(exc, asyncio.CancelledError):
        return asyncio.CancelledError()
    try:
        clone = type(exc)(*exc.args)
    except Exception:
        return exc
    clone.__cause__ = exc.__cause__
    return clone


class _RedisStore:
    """Connection, key prefix and failure settings shared by every Redis store."""

    backend = "redis"

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
        async_client: Any = None,
        prefix: str = _DEFAULT_PREFIX,
        timeout: float | timedelta = 0.5,
        on_backend_error: str = "fail_closed",
        retry_interval: float | timedelta = 1.0,
        cluster: bool = False,
    ) -> None:
        if not isinstance(prefix, str):
            raise ConfigTypeError(f"prefix must be a string, got {prefix!r}")
        if "{" in prefix or "}" in prefix:
            raise ConfigValueError(
                f"prefix must not contain braces (buttress adds the hash tags), got {prefix!r}"
            )
        self.prefix = prefix
        self.timeout = require_seconds("timeout", timeout)
        self.on_backend_error = check_mode(on_backend_error)
        self.retry_interval = check_seconds("retry_interval", retry_interval, allow_zero=True)
        self._conn = _Connection(url, client, async_client, self.timeout, cluster)
        self._errors = _backend_errors()
        # what a background read may meet: the backend failing, or no sync client
        self._soft_errors: tuple[type[BaseException], ...] = (*self._errors, ConfigTypeError)

    def key(self, kind: str, name: str, suffix: str | None = None) -> str:
        """The Redis key this store uses for the primitive ``kind``/``name`` (with its
        prefix, and hash-tagged so that one primitive's keys share a Cluster slot)."""
        tag = name if suffix is None else f"{name}:{suffix}"
        return f"{self.prefix}{{{kind}:{tag}}}"

    def _gate(self, policy: Any) -> Gate:
        return Gate(
            self.backend,
            self.on_backend_error,
            self.retry_interval or 0.0,
            policy.clock.now,
            policy.emit,
        )

    def close(self) -> None:
        """Close the sync client this store created (not one you passed in)."""
        self._conn.close()

    async def aclose(self) -> None:
        """Close the async client this store created for the running event loop."""
        await self._conn.aclose()

    def __repr__(self) -> str:
        where = self._conn.url or "client"
        return f"<{type(self).__name__} {where} prefix={self.prefix!r}>"


class _RedisBinding(BindingBase):
    """What every Redis binding keeps: its primitive's facts and its store's connection."""

    def __init__(self, store: _RedisStore, policy: Any) -> None:
        super().__init__(policy)
        self.store = store
        self.conn = store._conn
        self.errors = store._errors
        self.soft_errors = store._soft_errors
        self.gate = store._gate(policy)


def _needs_name(policy: Any, what: str) -> str:
    if policy.name is None:
        raise ConfigValueError(
            f"a {what} with a shared store needs a name: processes find its state by name"
        )
    return str(policy.name)


# -- rate limiter ---------------------------------------------------------------------------


# Batch mode compares local units with GCRA slots on the server's clock, which runs in
# real time whatever clock the limiter waits with: real seconds there.
_monotonic = time.monotonic


class _Unavailable(Exception):
    """Redis could not be reached (the cause): the caller applies on_backend_error."""


class _Stock:
    """Units one batch reply granted: unit i occupies the GCRA slot that starts at
    ``start + i * interval`` (local monotonic seconds, never later than the server's).
    A unit may be spent until its slot starts, never after: spent later, it would
    count in a window the server already handed to others."""

    __slots__ = ("granted", "interval", "next", "start")

    def __init__(self, start: float, interval: float, taken: int, granted: int) -> None:
        self.start = start
        self.interval = interval
        self.next = taken  # the first unit not spent yet
        self.granted = granted

    def take(self, weight: int, now: float) -> bool:
        index = self.next
        if now > self.start + index * self.interval:  # units whose slot began are lost
            index = max(index, math.ceil((now - self.start) / self.interval - 1e-9))
        if index + weight > self.granted:
            self.next = self.granted
            return False
        self.next = index + weight
        return True


class RedisRateLimiterStore(_RedisStore):
    """Shared GCRA buckets for :class:`~buttress.RateLimiter` (and its ``for_key`` views).

    One Lua script per acquire, one round trip, on the server's clock: processes never
    admit more than ``burst + rate * t / per`` in any ``t`` seconds between them. A caller
    that must wait reserves its slot in the same round trip and sleeps locally until it
    comes; a waiter interrupted before its slot gives it back when nothing was reserved
    after it (otherwise the slot is left unused: never an over-admission).

    Args:
        url: ``redis://`` URL (clients are built lazily; sync and per event loop). With
            ``cluster=True`` it names any one node of a Redis Cluster.
        client: a ``redis.Redis`` (or ``redis.cluster.RedisCluster``) to use for sync calls
            instead.
        async_client: a ``redis.asyncio.Redis`` (or ``redis.asyncio.cluster.RedisCluster``)
            to use for async calls instead.
        prefix: prepended to every key (default ``"buttress:"``).
        timeout: seconds allowed for each Redis call of the clients built from ``url``.
        on_backend_error: ``"fail_closed"`` (default), ``"fail_open"`` or ``"local"``.
        retry_interval: seconds between attempts to reach a failed backend (default 1).
        cluster: build Redis Cluster clients from ``url`` (default ``False``). Each
            primitive's state lives in one slot, so each call still goes to one node.
        batch: units a process may take in one round trip and spend locally (default 1:
            every acquire asks Redis). With ``batch=N`` an acquire that finds no local
            unit asks for up to N that conform now; the next acquires spend them without
            a round trip. A unit is spent only before its GCRA slot starts, so the shared
            bound still holds; units a process took but did not spend delay the others
            by at most ``N / rate``. ``snapshot()`` reports round trips per acquire.
    """

    def __init__(self, url: str | None = None, *, batch: int = 1, **options: Any) -> None:
        super().__init__(url, **options)
        self.batch = check_int("batch", batch)

    def bind_limiter(self, limiter: RateLimiter) -> RedisLimiterBinding:
        """The shared buckets of ``limiter`` (the :class:`~buttress.backends.LimiterStore`
        protocol)."""
        return RedisLimiterBinding(self, limiter)


class RedisLimiterBinding(_RedisBinding):
    """One limiter's GCRA buckets in Redis: a :class:`~buttress.backends.LimiterBinding`."""

    store: RedisRateLimiterStore

    def __init__(self, store: RedisRateLimiterStore, limiter: RateLimiter) -> None:
        from buttress.rate_limiter import LocalLimiter

        super().__init__(store, limiter)
        self.base = _needs_name(limiter, "RateLimiter")
        self.unkeyed = store.key("rl", self.base)
        self.interval = limiter.interval
        self.tolerance = limiter.burst * limiter.interval
        # interval and tolerance in microseconds, formatted once
        self.args = (repr(self.interval * 1e6), repr(self.tolerance * 1e6))
        # what "local" mode falls back to while Redis is down: in-process buckets
        self.fallback = LocalLimiter(limiter)
        self.batch = store.batch
        self.batch_arg = str(store.batch)
        self.stocks: dict[str, _Stock] = {}  # batch mode: units taken, not yet spent
        self.refills: dict[str, asyncio.Future[bool]] = {}  # batch mode: one in flight per key
        self.stock_lock = threading.Lock()
        self.acquires = 0  # decisions asked of this binding (acquire and try_acquire)
        self.round_trips = 0  # of them, the ones that went to Redis

    # -- batch mode: units taken in one round trip, spent locally ---------------------------

    def _spend(self, key: str, weight: int) -> bool:
        """Spend ``weight`` units taken earlier (batch mode); False: ask Redis."""
        stock = self.stocks.get(key)
        if stock is None:
            return False
        with self.stock_lock:
            return stock.take(weight, _monotonic())

    def _stock(self, key: str, reply: list[Any], sent: float, weight: int) -> None:
        """Keep what a batch reply granted beyond the caller's own ``weight`` units."""
        if len(reply) < 5:
            return
        granted = int(reply[3])
        if granted <= weight:
            return
        # slot starts in local time: the script ran after `sent`, so this is never late
        start = sent + int(reply[4]) / 1e6
        with self.stock_lock:
            if len(self.stocks) >= 10_000 and key not in self.stocks:
                self.stocks.pop(next(iter(self.stocks)))
            self.stocks[key] = _Stock(start, self.interval, weight, granted)

    def key_of(self, bucket_key: Hashable | None) -> str:
        if bucket_key is None:
            return self.unkeyed
        return self.store.key("rl", self.base, str(bucket_key))

    @staticmethod
    def _max_wait_us(max_wait: float | None) -> str:
        return "-1" if max_wait is None else str(int(max_wait * 1e6))

    def _degraded(self, exc: BaseException | None) -> bool:
        """True: use the in-process fallback; False: let the call through (fail_open)."""
        mode = self.gate.mode
        if mode == "local":
            return True
        if mode == "fail_open":
            return False
        raise self.gate.unavailable(self.label, exc, name=self.name)

    def _verdict(self, reply: list[Any]) -> float:
        """Seconds to wait for the reserved slot (0.0: go now); raises when rejected."""
        self.gate.succeeded()
        wait = int(reply[1]) / 1e6
        if reply[0] == 0:
            raise RateLimited(
                f"{self.label}: no permit within the allowed wait (next in {wait:.3f}s)",
                retry_after=wait,
                name=self.name,
            )
        return wait

    # -- the binding protocol ---------------------------------------------------------------

    def try_acquire(self, key: Hashable | None, weight: int) -> bool:
        self.acquires += 1
        if self.gate.should_try():
            redis_key = self.key_of(key)
            if self.batch > 1 and self._spend(redis_key, weight):
                return True
            self.round_trips += 1
            sent = _monotonic()
            try:
                reply = self.conn.run(
                    scripts.LIMITER, redis_key, *self.args, weight, "0", "", self.batch_arg
                )
            except self.errors as exc:
                self.gate.failed(exc)
                if not self._degraded(exc):
                    return True
            else:
                try:
                    self._verdict(reply)
                except RateLimited:
                    return False
                self._stock(redis_key, reply, sent, weight)
                return True
        elif not self._degraded(None):
            return True
        return self.fallback.try_acquire(key, weight)

    def acquire(self, key: Hashable | None, weight: int, max_wait: float | None) -> float | None:
        self.acquires += 1
        if self.gate.should_try():
            redis_key = self.key_of(key)
            if self.batch > 1 and self._spend(redis_key, weight):
                return None
            self.round_trips += 1
            sent = _monotonic()
            try:
                reply = self.conn.run(
                    scripts.LIMITER,
                    redis_key,
                    *self.args,
                    weight,
                    self._max_wait_us(max_wait),
                    "",
                    self.batch_arg,
                )
            except self.errors as exc:
                self.gate.failed(exc)
                if not self._degraded(exc):
                    return None
            else:
                wait = self._verdict(reply)
                self._stock(redis_key, reply, sent, weight)
                if wait > 0:
                    try:
                        self.clock.sleep(wait)
                    except BaseException:
                        self._refund(redis_key, weight, reply[2])
                        raise
                return wait or None
        elif not self._degraded(None):
            return None
        return self.fallback.acquire(key, weight, max_wait)

    async def acquire_async(
        self, key: Hashable | None, weight: int, max_wait: float | None
    ) -> float | None:
        self.acquires += 1
        if self.gate.should_try():
            redis_key = self.key_of(key)
            refill: asyncio.Future[bool] | None = None
            batch = self.batch_arg
            if self.batch > 1:
                loop = asyncio.get_running_loop()
                while True:
                    if self._spend(redis_key, weight):
                        return None
                    pending = self.refills.get(redis_key)
                    if pending is None:
                        refill = self.refills[redis_key] = loop.create_future()
                        break
                    if pending.get_loop() is not loop:
                        break
                    # One refill per key in flight (never more than one batch reserved):
                    # wait for it and spend from it, or refill next. A refill that found
                    # the bucket drained stocked nothing: then ask for this caller's own
                    # units only (exact, pipelined with the others' calls).
                    if not await asyncio.shield(pending):
                        if self._spend(redis_key, weight):
                            return None
                        batch = "1"
                        break
            try:
                return await self._acquire_async(redis_key, weight, max_wait, batch)
            except _Unavailable as exc:
                if not self._degraded(exc.__cause__):
                    return None
            finally:
                if refill is not None:
                    if self.refills.get(redis_key) is refill:
                        del self.refills[redis_key]
                    stock = self.stocks.get(redis_key)
                    refill.set_result(stock is not None and stock.next < stock.granted)
        elif not self._degraded(None):
            return None
        return await self.fallback.acquire_async(key, weight, max_wait)

    async def _acquire_async(
        self, key: str, weight: int, max_wait: float | None, batch: str
    ) -> float | None:
        self.round_trips += 1
        sent = _monotonic()
        cancels = _cancels()
        try:
            reply = await self.conn.arun(
                scripts.LIMITER,
                key,
                *self.args,
                weight,
                self._max_wait_us(max_wait),
                "",
                batch,
                orphan=functools.partial(self._orphan, key, weight, sent),
            )
        except self.errors as exc:
            self.gate.failed(exc)
            raise _Unavailable from exc
        wait = self._verdict(reply)
        batched = len(reply) >= 5
        self._stock(key, reply, sent, weight)
        try:
            _reraise_swallowed(cancels)
            if wait > 0:
                await self.clock.asleep(wait)
        except BaseException:
            if batched:  # the caller's own units go back to the stock, unspent
                self._stock(key, reply, sent, 0)
            else:
                await _shielded(self._arefund(key, weight, reply[2]))
            raise
        return wait or None

    def _orphan(self, key: str, weight: int, sent: float, reply: list[Any]) -> None:
        """The reply of a caller cancelled while its call was queued: give its units back
        (to the stock in batch mode, else refunded to the bucket, in the next pipeline)."""
        if reply[0] != 1:
            return
        if len(reply) >= 5:
            self._stock(key, reply, sent, 0)
            return
        refund = self.conn.post(scripts.LIMITER, key, *self.args, weight, "-1", reply[2])
        refund.add_done_callback(_ignore)

    def _refund(self, key: str, weight: int, reserved: bytes) -> None:
        # best effort: an unused slot never over-admits
        with contextlib.suppress(*self.errors):
            self.conn.run(scripts.LIMITER, key, *self.args, weight, "-1", reserved)

    async def _arefund(self, key: str, weight: int, reserved: bytes) -> None:
        with contextlib.suppress(*self.errors):
            await self.conn.arun(scripts.LIMITER, key, *self.args, weight, "-1", reserved)

    def tokens(self, key: Hashable | None) -> float | None:
        """Units admissible now, read from Redis (None when it cannot be reached)."""
        try:
            raw = self.conn.sync().get(self.key_of(key))
            now_s, now_us = self.conn.sync().time()
        except self.soft_errors:
            return None
        if raw is None:
            return self.tolerance / self.interval
        debt = (int(raw) - (now_s * 1_000_000 + now_us)) / 1e6
        debt = max(debt, 0.0)
        return max(self.tolerance - debt, 0.0) / self.interval

    def snapshot(self) -> dict[str, Any]:
        acquires, trips = self.acquires, self.round_trips
        return {
            **self.gate.snapshot(),
            "key": self.key_of(None),
            "batch": self.batch,
            "acquires": acquires,
            "round_trips": trips,
            "round_trips_per_acquire": trips / acquires if acquires else None,
        }


# -- circuit breaker ------------------------------------------------------------------------


class RedisBreakerStore(_RedisStore):
    """Shared state for :class:`~buttress.CircuitBreaker`: state, counts and probe slots.

    Every process asks Redis before a call (one round trip that also carries the
    successes this process saw since its last round trip), so a transition made by one
    process is seen by all the others on their next call, and half-open probe slots are
    global. A failure is reported at once (a second round trip, on failures only).

    With ``max_staleness`` (seconds) a process reuses what it last read for that long: a
    closed breaker then costs no round trip per call, and other processes' transitions
    are seen within ``max_staleness``. Half-open probes always go to Redis.

    ``url``, ``client``, ``async_client``, ``prefix``, ``timeout``, ``on_backend_error``,
    ``retry_interval`` and ``cluster`` are as for :class:`RedisRateLimiterStore`.

    Args:
        max_staleness: seconds a process may act on state it read earlier (default
            ``None``: read on every call).
        probe_lease: seconds after which half-open probe slots whose callers never
            reported back (their process died) are granted again (default 60).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        max_staleness: float | timedelta | None = None,
        probe_lease: float | timedelta = 60.0,
        **options: Any,
    ) -> None:
        super().__init__(url, **options)
        self.max_staleness = check_seconds("max_staleness", max_staleness, allow_none=True)
        self.probe_lease = require_seconds("probe_lease", probe_lease)

    def bind_breaker(self, breaker: CircuitBreaker) -> RedisBreakerBinding:
        """The shared state of ``breaker`` (the :class:`~buttress.backends.BreakerStore`
        protocol)."""
        return RedisBreakerBinding(self, breaker)


_STATES = {b"c": "closed", b"o": "open", b"h": "half_open"}


class RedisBreakerBinding(_RedisBinding):
    """One breaker's state machine answered by Redis: a
    :class:`~buttress.backends.BreakerBinding`."""

    store: RedisBreakerStore

    def __init__(self, store: RedisBreakerStore, breaker: CircuitBreaker) -> None:
        from buttress.circuit_breaker import LocalBreaker

        if breaker.success_threshold != 1:
            # The shared Lua state machine closes on the first successful probe.
            raise ConfigValueError(
                f"success_threshold must be 1 with a RedisBreakerStore (the shared circuit "
                f"closes on its first successful probe), got {breaker.success_threshold!r}"
            )
        super().__init__(store, breaker)
        self.failure_rate = breaker.failure_rate
        self.key = store.key("cb", _needs_name(breaker, "CircuitBreaker"))
        self.staleness = store.max_staleness
        rate = -1.0 if breaker.failure_rate is None else breaker.failure_rate
        self.reset_us = int(breaker.reset_timeout * 1e6)
        self.settings = (
            str(self.reset_us),
            str(breaker.half_open_max_calls),
            str(int(store.probe_lease * 1e6)),
            str(breaker.failure_threshold),
            repr(rate),
            str(breaker.window),
            str(breaker.minimum_calls),
        )
        # what "local" mode falls back to while Redis is down: the in-process state machine.
        # It reports its transitions only while it stands in for Redis: force() keeps it in
        # step with the shared state, whose transitions _read() has already emitted.
        self.fallback = LocalBreaker(breaker)
        self.fallback.emit = self._fallback_emit
        self.lock = threading.Lock()
        # successes not yet reported, all admitted under generation `pending_gen`
        self.pending = 0
        self.pending_gen = -1
        # what this process last read
        self.state = "closed"
        self.gen = 0
        self.consecutive = 0
        self.read_at = float("-inf")
        self.open_until = 0.0  # local clock: when an open circuit may be probed
        self.forced = False
        self.last: dict[str, Any] = {}

    def _fallback_emit(self, event_type: type[_events.Event], **fields: Any) -> None:
        if self.gate.degraded:
            self.emit(event_type, **fields)

    # -- talking to Redis -------------------------------------------------------------------

    def _args(self, op: str, gen: int = -1, outcome: str = "") -> tuple[Any, ...]:
        with self.lock:
            pending, pending_gen = self.pending, self.pending_gen
            self.pending = 0
        return (op, *self.settings, pending, pending_gen, gen, outcome)

    def _restore(self, args: tuple[Any, ...]) -> None:
        """The call carrying our pending successes failed: keep them for the next one."""
        pending, gen = args[8], args[9]
        if pending:
            with self.lock:
                if self.pending_gen in (gen, -1):
                    self.pending += pending
                    self.pending_gen = gen

    def _read(self, reply: list[Any]) -> int:
        """Take in a script reply; emit the transitions it made; return its verdict."""
        now = self.now()
        state = _STATES[reply[1]]
        gen = int(reply[2])
        self.state, self.gen, self.consecutive = state, gen, int(reply[3])
        self.forced = reply[8] == b"1"
        self.read_at = now
        if state == "open":
            # when the open period ends, from the server's clock (opened at, now)
            left_us = self.reset_us - (int(reply[10]) - int(reply[7]))
            self.open_until = now + max(left_us, 0) / 1e6
        else:
            self.open_until = now
        window_len, window_failures = int(reply[5]), int(reply[6])
        self.last = {
            "state": state,
            "generation": gen,
            "consecutive_failures": self.consecutive,
            "window_calls": window_len,
            "window_failures": window_failures,
            "half_open_probes": int(reply[9]),
            "forced": self.forced,
        }
        changes = reply[11:]
        for i in range(0, len(changes), 3):
            self.emit(
                _events.CircuitStateChanged,
                old=changes[i].decode(),
                new=changes[i + 1].decode(),
                reason=changes[i + 2].decode(),
            )
        self.gate.succeeded()
        return int(reply[0])

    def _reject(self, reply: list[Any] | None) -> CircuitOpenError:
        retry_after: float | None = None
        if reply is not None and int(reply[4]) >= 0:
            retry_after = int(reply[4]) / 1e6
        elif self.state == "open" and not self.forced:
            retry_after = max(self.open_until - self.now(), 0.0)
        detail = "is open" if self.state == "open" else "is half-open and its probe slots are taken"
        return CircuitOpenError(f"{self.label} {detail}", retry_after=retry_after, name=self.name)

    def _fresh(self) -> bool:
        staleness = self.staleness
        return staleness is not None and self.now() - self.read_at < staleness

    def _cached(self) -> int | None:
        """A token from the cached state (bounded-staleness mode), or None: ask Redis."""
        if not self._fresh():
            return None
        if self.state == "closed":
            return self.gen
        if self.state == "open" and (self.forced or self.now() < self.open_until):
            raise self._reject(None)
        return None

    def _degraded(self, exc: BaseException | None = None) -> int:
        mode = self.gate.mode
        if mode == "fail_closed":
            raise self.gate.unavailable(self.label, exc, name=self.name)
        if mode == "local":
            return -2 - self.fallback.acquire()  # <= -2: the outcome goes to the fallback
        return NO_REPORT  # fail_open: let it through, report nothing

    def _verdict(self, reply: list[Any]) -> int:
        if not self._read(reply):
            raise self._reject(reply)
        return self.gen

    # -- the binding protocol ---------------------------------------------------------------

    def acquire(self) -> int:
        token = self._cached()
        if token is not None:
            return token
        if not self.gate.should_try():
            return self._degraded()
        args = self._args("acquire")
        try:
            reply = self.conn.run(scripts.BREAKER, self.key, *args)
        except self.errors as exc:
            self._restore(args)
            self.gate.failed(exc)
            return self._degraded(exc)
        return self._verdict(reply)

    async def acquire_async(self) -> int:
        token = self._cached()
        if token is not None:
            return token
        if not self.gate.should_try():
            return self._degraded()
        args = self._args("acquire")
        cancels = _cancels()
        try:
            reply = await self.conn.arun(scripts.BREAKER, self.key, *args, orphan=self._orphan)
        except self.errors as exc:
            self._restore(args)
            self.gate.failed(exc)
            return self._degraded(exc)
        token = self._verdict(reply)
        if _cancels() > cancels:  # cancelled, though the client swallowed it: give back
            await _shielded(self.settle_async(token, "neutral"))
            raise asyncio.CancelledError
        return token

    def _orphan(self, reply: list[Any]) -> None:
        """The reply of an acquire whose caller was cancelled while it was queued: a probe
        slot it was granted goes back (a neutral outcome, in the next pipeline)."""
        if self._read(reply) and self.state == "half_open":
            args = self._args("record", self.gen, "n")
            settled = self.conn.post(scripts.BREAKER, self.key, *args)
            settled.add_done_callback(functools.partial(self._orphan_settled, args))

    def _orphan_settled(self, args: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self._restore(args)
            return
        exc = future.exception()
        if exc is None:
            self._read(future.result())
        else:
            self._restore(args)
            if isinstance(exc, self.soft_errors):
                self.gate.failed(exc)

    def _defer(self, token: int) -> bool:
        """A success that can wait for the next round trip (True), or must be sent now."""
        with self.lock:
            if self.state != "closed" or token != self.gen:
                return token != self.gen  # a stale token changes nothing: drop it
            if self.consecutive and self.failure_rate is None:
                return False  # end the failure streak now, not on our next call
            if self.pending_gen != token:
                self.pending = 0
                self.pending_gen = token
            self.pending += 1
            return True

    def _report(self, token: int, outcome: Outcome) -> tuple[Any, ...] | None:
        """The script arguments that report ``outcome`` now, or None: nothing to send."""
        if token == NO_REPORT:
            return None
        if outcome == "success":
            if self._defer(token):
                return None
            return self._args("record", token, "s")
        return self._args("record", token, "f" if outcome == "failure" else "n")

    def settle(self, token: int, outcome: Outcome) -> None:
        if token <= -2:
            self.fallback.settle(-2 - token, outcome)
            return
        args = self._report(token, outcome)
        if args is None:
            return
        try:
            reply = self.conn.run(scripts.BREAKER, self.key, *args)
        except self.errors as exc:
            self._restore(args)
            self.gate.failed(exc)
            return
        self._read(reply)

    async def settle_async(self, token: int, outcome: Outcome) -> None:
        if token <= -2:
            self.fallback.settle(-2 - token, outcome)
            return
        args = self._report(token, outcome)
        if args is None:
            return
        cancels = _cancels()
        try:
            reply = await self.conn.arun(scripts.BREAKER, self.key, *args)
        except self.errors as exc:
            self._restore(args)
            self.gate.failed(exc)
            return
        self._read(reply)
        _reraise_swallowed(cancels)  # the outcome is recorded: the caller still stops

    def force(self, state: Literal["open", "closed", "half_open"]) -> None:
        op = {"open": "open", "closed": "close", "half_open": "half_open"}[state]
        args = self._args(op)
        try:
            reply = self.conn.run(scripts.BREAKER, self.key, *args)
        except self.errors as exc:
            raise BackendError(f"{self.label}: could not {op} the shared state") from exc
        self._read(reply)
        self.fallback.force(state)

    def refresh(self) -> bool:
        """Read the shared state now (and report pending successes); False if Redis
        cannot be reached."""
        args = self._args("peek")
        try:
            reply = self.conn.run(scripts.BREAKER, self.key, *args)
        except self.soft_errors:
            self._restore(args)
            return False
        self._read(reply)
        return True

    def status(self) -> BreakerStatus:
        if self.gate.degraded or not self.refresh():
            return self.fallback.status()
        last = self.last
        state = self.state
        until: float | None = None
        if state == "open" and not self.forced:
            until = max(self.open_until - self.now(), 0.0)
            if until == 0.0:
                state, until = "half_open", None
        ring = self.failure_rate is not None
        return BreakerStatus(
            state=state,
            forced=self.forced,
            seconds_until_half_open=until,
            consecutive_failures=self.consecutive,
            window_calls=last["window_calls"] if ring else None,
            window_failures=last["window_failures"] if ring else None,
            half_open_probes=last["half_open_probes"],
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.last,
            **self.gate.snapshot(),
            "key": self.key,
            "max_staleness": self.staleness,
        }


# -- bulkhead ------------------------------------------------------------------------------


class RedisBulkheadStore(_RedisStore):
    """A distributed semaphore for :class:`~buttress.Bulkhead`: at most ``max_concurrent``
    calls in flight across every process.

    Each slot is a lease: a process that dies while holding slots gives them back when
    their lease runs out. A live holder renews its leases from a background thread every
    ``lease / 3`` seconds, so a call may run longer than the lease. Waiting callers poll
    Redis (every ``poll_interval``, doubling up to 8x): across processes a freed slot goes
    to whoever asks first, not strictly first come first served.

    ``url``, ``client``, ``async_client``, ``prefix``, ``timeout``, ``on_backend_error``,
    ``retry_interval`` and ``cluster`` are as for :class:`RedisRateLimiterStore`.

    Args:
        lease: seconds a slot survives its holder's death (default 30).
        poll_interval: seconds between attempts of a waiting caller (default 0.01).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        lease: float | timedelta = 30.0,
        poll_interval: float | timedelta = 0.01,
        **options: Any,
    ) -> None:
        super().__init__(url, **options)
        self.lease = require_seconds("lease", lease)
        self.poll_interval = require_seconds("poll_interval", poll_interval)
        self._renewer: _Renewer | None = None
        self._renewer_lock = threading.Lock()

    def bind_bulkhead(self, bulkhead: Bulkhead) -> RedisBulkheadBinding:
        """The shared slots of ``bulkhead`` (the :class:`~buttress.backends.BulkheadStore`
        protocol)."""
        return RedisBulkheadBinding(self, bulkhead)

    def _renew_loop(self) -> _Renewer:
        with self._renewer_lock:
            if self._renewer is None:
                self._renewer = _Renewer(self)
            return self._renewer

    def close(self) -> None:
        with self._renewer_lock:
            renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.stop()
        super().close()


class _Unsent:
    """Slots this process released whose release may not have reached Redis yet, per
    key (shared by every binding of the process, so a second instance of the same
    bulkhead sees them too), each with the time it was released. Every later script
    call for the key removes them first, in its own round trip, so a release is never
    waited for and never missed.

    A release posted to an event loop's pipeliner is *posted* there: it reaches Redis
    before any command that loop queues after it, so that loop's own calls need not
    carry it (with 64 callers in flight, carrying every posted release made each acquire
    carry the other 63: a pipeline of n acquires sent n * n tokens). Every other caller
    (the sync face, another loop) still carries it, and a posted release that fails goes
    back to the tokens every call carries."""

    LIMIT = 1000  # past this many (Redis down a long time), the leases return them

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_key: dict[str, dict[str, float]] = {}  # not posted: every call carries
        # key -> pipeliner serial -> token -> released at
        self.posted: dict[str, dict[int, dict[str, float]]] = {}

    def add(self, key: str, token: str) -> None:
        with self.lock:
            tokens = self.by_key.setdefault(key, {})
            tokens[token] = time.monotonic()
            if len(tokens) > self.LIMIT:
                del tokens[next(iter(tokens))]

    def post(self, key: str, token: str, poster: int) -> None:
        """``token``'s release is queued in pipeliner ``poster``: its calls skip it."""
        with self.lock:
            tokens = self.by_key.get(key)
            at = None if tokens is None else tokens.pop(token, None)
            if at is None:
                return  # sent already (carried by a call in between)
            if not tokens:
                del self.by_key[key]
            self.posted.setdefault(key, {}).setdefault(poster, {})[token] = at

    def unpost(self, key: str, token: str, poster: int) -> None:
        """The posted release did not reach Redis: every call carries it again."""
        with self.lock:
            groups = self.posted.get(key)
            group = None if groups is None else groups.get(poster)
            at = None if group is None else group.pop(token, None)
            if at is None:
                return
            self._prune(key, poster)
            tokens = self.by_key.setdefault(key, {})
            tokens[token] = at
            if len(tokens) > self.LIMIT:
                del tokens[next(iter(tokens))]

    def _prune(self, key: str, poster: int) -> None:
        groups = self.posted[key]
        if not groups[poster]:
            del groups[poster]
            if not groups:
                del self.posted[key]

    def tokens(
        self, key: str, released_before: float | None = None, poster: int | None = None
    ) -> tuple[str, ...]:
        """The unsent tokens of ``key`` (only those released before a time, if given),
        but those posted in pipeliner ``poster``, which reach Redis ahead of its calls."""
        tokens = self.by_key.get(key)
        groups = self.posted.get(key)
        if not tokens and not groups:
            return ()
        with self.lock:
            carried = [] if tokens is None else [tokens]
            if groups:
                carried += [group for owner, group in groups.items() if owner != poster]
            if released_before is None:
                return tuple(t for group in carried for t in group)
            return tuple(t for group in carried for t, at in group.items() if at < released_before)

    def sent(self, key: str, tokens: tuple[str, ...]) -> None:
        """``tokens`` are out of the sorted set: forget them."""
        if not tokens:
            return
        with self.lock:
            held = self.by_key.get(key)
            if held is not None:
                for token in tokens:
                    held.pop(token, None)
                if not held:
                    del self.by_key[key]
            groups = self.posted.get(key)
            if groups is not None:
                for poster, group in list(groups.items()):
                    for token in tokens:
                        group.pop(token, None)
                    self._prune(key, poster)


_UNSENT = _Unsent()
# A sync release is sent by the lease thread once it has been unsent this long: a
# caller that calls again sooner carries it in its own round trip instead.
_RELEASE_DELAY = 0.002


class _Renewer:
    """One daemon thread per store that extends the leases of every slot held here and
    sends the releases of the sync face (so a sync release never waits for Redis)."""

    def __init__(self, store: RedisBulkheadStore) -> None:
        self.store = store
        self.held: dict[str, dict[str, None]] = {}  # key -> tokens (insertion-ordered)
        self.releasing: set[str] = set()  # keys with releases for this thread to send
        self.retry_at = 0.0  # monotonic: no release sent before (after a failure)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.thread = threading.Thread(
            target=self._run, name="buttress-bulkhead-lease", daemon=True
        )
        self.thread.start()

    def add(self, key: str, token: str) -> None:
        with self.lock:
            self.held.setdefault(key, {})[token] = None

    def discard(self, key: str, token: str) -> None:
        with self.lock:
            tokens = self.held.get(key)
            if tokens is not None:
                tokens.pop(token, None)
                if not tokens:
                    del self.held[key]

    def release(self, key: str) -> None:
        """Send ``key``'s unsent releases soon (they are in ``_UNSENT`` already)."""
        with self.lock:
            idle = not self.releasing
            self.releasing.add(key)
        if idle:
            self.wake.set()

    def _run(self) -> None:
        period = self.store.lease / 3
        renew_at = time.monotonic() + period
        while True:
            now = time.monotonic()
            timeout = renew_at - now
            if self.releasing:  # after a failure, wait retry_interval before trying again
                timeout = min(timeout, max(_RELEASE_DELAY, self.retry_at - now))
            self.wake.wait(max(timeout, 0.0))
            self.wake.clear()
            stopping = self.stopping.is_set()
            self._send_releases(everything=stopping)
            if stopping:
                return
            if time.monotonic() >= renew_at:
                renew_at = time.monotonic() + period
                self._renew()

    def _send_releases(self, everything: bool = False) -> None:
        """Send the releases unsent for ``_RELEASE_DELAY`` (a process that calls again
        sooner carries them itself, so this thread stays off a busy caller's path)."""
        store = self.store
        before = None if everything else time.monotonic() - _RELEASE_DELAY
        with self.lock:
            keys, self.releasing = self.releasing, set()
        for key in keys:
            tokens = _UNSENT.tokens(key, before)
            if tokens:
                try:
                    store._conn.run(scripts.BULKHEAD, key, "release", 0, 0, *tokens)
                except store._soft_errors:
                    # the next call for the key carries them; retried here too, later
                    self.retry_at = time.monotonic() + (store.retry_interval or 1.0)
                else:
                    _UNSENT.sent(key, tokens)
            if _UNSENT.tokens(key):
                with self.lock:
                    self.releasing.add(key)

    def _renew(self) -> None:
        store = self.store
        lease_us = str(int(store.lease * 1e6))
        with self.lock:
            batches = [(key, list(tokens)) for key, tokens in self.held.items()]
            retry = bool(self.releasing)
        for key, tokens in batches:
            try:
                store._conn.run(scripts.BULKHEAD, key, "renew", 0, lease_us, *tokens)
            except store._soft_errors:
                continue  # the next round tries again; an expired lease is the risk
        if retry:
            self._send_releases()

    def stop(self) -> None:
        """Stop after sending the releases still waiting (for at most a few timeouts)."""
        self.stopping.set()
        self.wake.set()
        if self.thread is not threading.current_thread():
            self.thread.join(self.store.timeout * 4 + 0.1)


_tokens = itertools.count()
_PROCESS = os.urandom(6).hex()


class _LocalLease:
    """A slot taken from the in-process fallback ("local" mode while Redis is down)."""

    __slots__ = ("lease",)

    def __init__(self, lease: object) -> None:
        self.lease = lease


_background: set[asyncio.Task[Any]] = set()


def _cancels() -> int:
    """The current task's pending cancellation requests (Python 3.11+; 0 before)."""
    count = getattr(asyncio.current_task(), "cancelling", None)
    return 0 if count is None else int(count())


def _reraise_swallowed(before: int) -> None:
    """Raise CancelledError if the task was cancelled during a command whose client
    swallowed the cancellation and returned the reply anyway (redis-py's asyncio
    cluster client can): a cancelled caller must still stop, and give back what it got."""
    if _cancels() > before:
        raise asyncio.CancelledError


async def _shielded(coro: Any) -> None:
    """Run ``coro`` to the end even if the caller is cancelled again meanwhile."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(task)


class RedisBulkheadBinding(_RedisBinding):
    """One bulkhead's slots as leases in a Redis sorted set: a
    :class:`~buttress.backends.BulkheadBinding`. A lease is the slot's token (``""`` for a
    call that ``fail_open`` let through without a slot)."""

    store: RedisBulkheadStore

    def __init__(self, store: RedisBulkheadStore, bulkhead: Bulkhead) -> None:
        from buttress.bulkhead import LocalBulkhead

        super().__init__(store, bulkhead)
        self.max_queue = bulkhead.max_queue
        self.key = store.key("bh", _needs_name(bulkhead, "Bulkhead"))
        if store._conn.url is None and store._conn._client is None:
            raise ConfigTypeError(
                "RedisBulkheadStore needs url= or client=: leases are renewed from a thread, "
                "which cannot use an asyncio client"
            )
        self.fallback = LocalBulkhead(bulkhead)
        self.limit = str(bulkhead.max_concurrent)
        self.lease_us = str(int(store.lease * 1e6))
        self.in_use_seen: int | None = None

    def _token(self) -> str:
        return f"{_PROCESS}:{os.getpid()}:{next(_tokens)}"

    def _degraded(self, exc: BaseException | None, local: Callable[[], object]) -> object:
        """fail_closed raises; fail_open admits without a slot (""); local: the fallback."""
        mode = self.gate.mode
        if mode == "fail_closed":
            raise self.gate.unavailable(self.label, exc, name=self.name)
        if mode == "fail_open":
            return ""
        return _LocalLease(local())

    def _granted(self, reply: list[Any], token: str) -> bool:
        self.gate.succeeded()
        self.in_use_seen = int(reply[1])
        if reply[0] == 1:
            self.store._renew_loop().add(self.key, token)
            return True
        return False

    def _try_degraded(self, exc: BaseException | None) -> object | None:
        lease = self._degraded(exc, self.fallback.try_acquire)
        if isinstance(lease, _LocalLease) and lease.lease is None:
            return None  # the fallback had no free slot either
        return lease

    def _script(
        self, op: str, token: str, poster: int | None = None
    ) -> tuple[tuple[Any, ...], tuple[str, ...]]:
        """The script arguments of ``op``, carrying this process's unsent releases (but
        those posted in pipeliner ``poster``, which go out ahead of the call)."""
        unsent = _UNSENT.tokens(self.key, poster=poster)
        return (op, self.limit, self.lease_us, token, *unsent), unsent

    def try_acquire(self) -> object | None:
        if not self.gate.should_try():
            return self._try_degraded(None)
        token = self._token()
        args, unsent = self._script("acquire", token)
        try:
            reply = self.conn.run(scripts.BULKHEAD, self.key, *args)
        except self.errors as exc:
            self.gate.failed(exc)
            return self._try_degraded(exc)
        _UNSENT.sent(self.key, unsent)
        return token if self._granted(reply, token) else None

    def acquire(self, timeout: float | None) -> object:
        if not self.gate.should_try():
            return self._degraded(None, lambda: self.fallback.acquire(timeout))
        poll = _Poll(self, timeout)
        while True:
            args, unsent = self._script("acquire", poll.token)
            try:
                reply = self.conn.run(scripts.BULKHEAD, self.key, *args)
            except self.errors as exc:
                self.gate.failed(exc)
                return self._degraded(exc, lambda: self.fallback.acquire(timeout))
            _UNSENT.sent(self.key, unsent)
            if poll.granted(reply):
                return poll.token
            self.clock.sleep(poll.pause())

    async def acquire_async(self, timeout: float | None) -> object:
        if not self.gate.should_try():
            if self.gate.mode == "local":
                return _LocalLease(await self.fallback.acquire_async(timeout))
            return self._degraded(None, _never)
        poll = _Poll(self, timeout)
        while True:
            cancels = _cancels()
            # releases posted in this loop's pipeliner reach Redis ahead of this call
            args, unsent = self._script("acquire", poll.token, self.conn.batcher().serial)
            try:
                reply = await self.conn.arun(scripts.BULKHEAD, self.key, *args)
                _UNSENT.sent(self.key, unsent)
                _reraise_swallowed(cancels)
            except self.errors as exc:
                self.gate.failed(exc)
                if self.gate.mode == "local":
                    return _LocalLease(await self.fallback.acquire_async(timeout))
                return self._degraded(exc, _never)
            except BaseException:
                # cancelled while the script may have granted the slot: give it back,
                # awaiting the async client (never a blocking call on the loop)
                await _shielded(self.release_async(poll.token))
                raise
            if poll.granted(reply):
                return poll.token
            await self.clock.asleep(poll.pause())

    def _unsend(self, lease: object) -> str | None:
        """Take ``lease`` off the renewer; the token to release in Redis, if any."""
        if isinstance(lease, _LocalLease):
            self.fallback.release(lease.lease)
            return None
        if not lease:
            return None
        assert isinstance(lease, str)
        self.store._renew_loop().discard(self.key, lease)
        _UNSENT.add(self.key, lease)
        return lease

    def release(self, lease: object) -> None:
        # The lease thread sends it (no round trip waited for here); this process's next
        # call for the bulkhead carries it too, so its own next acquire sees the slot free.
        if self._unsend(lease) is not None:
            self.store._renew_loop().release(self.key)

    async def release_async(self, lease: object) -> None:
        # Fire and forget: it goes out in the next pipeline (the same round trip as calls
        # queued meanwhile); a failure is reported by the gate's events, the token stays
        # unsent for the next call to carry, and the lease bounds a release never sent.
        token = self._unsend(lease)
        if token is None:
            return
        # one command for every release of this key posted to the same pipeline
        future = self.conn.post(scripts.BULKHEAD, self.key, "release", 0, 0, token, merge=True)
        poster = self.conn.batcher().serial  # the pipeliner post() queued it in
        _UNSENT.post(self.key, token, poster)
        future.add_done_callback(functools.partial(self._released, token, poster))

    def _released(self, token: str, poster: int, future: asyncio.Future[Any]) -> None:
        exc = None if future.cancelled() else future.exception()
        if exc is None and not future.cancelled():
            _UNSENT.sent(self.key, (token,))
            return
        _UNSENT.unpost(self.key, token, poster)  # every later call carries it
        if isinstance(exc, self.soft_errors):
            self.gate.failed(exc)

    def in_use(self) -> int | None:
        """Slots held across every process (None when Redis cannot be reached)."""
        args, unsent = self._script("count", "")
        try:
            reply = self.conn.run(scripts.BULKHEAD, self.key, *args)
        except self.soft_errors:
            return None
        _UNSENT.sent(self.key, unsent)
        return int(reply[1])

    def snapshot(self) -> dict[str, Any]:
        return {**self.gate.snapshot(), "key": self.key, "lease": self.store.lease}


def _ignore(future: asyncio.Future[Any]) -> None:
    """Retrieve a best-effort command's outcome (an unused unit never over-admits)."""
    if not future.cancelled():
        future.exception()


def _never() -> object:  # pragma: no cover - only "local" mode calls its fallback
    raise AssertionError("unreachable")


class _Poll:
    """One caller's attempts at a shared slot: everything both drivers do between round
    trips (they differ only in how they make the call and how they sleep)."""

    __slots__ = ("binding", "budget", "started", "step", "token", "waited")

    def __init__(self, binding: RedisBulkheadBinding, timeout: float | None) -> None:
        self.binding = binding
        self.token = binding._token()
        # without a queue nobody waits; across processes a freed slot goes to whoever asks
        self.budget = 0.0 if binding.max_queue == 0 else timeout
        self.started = binding.clock.now()
        self.step = binding.store.poll_interval
        self.waited = False

    def granted(self, reply: list[Any]) -> bool:
        binding = self.binding
        if not binding._granted(reply, self.token):
            return False
        if self.waited:
            binding.emit(_events.AcquiredAfterWait, waited=binding.clock.now() - self.started)
        return True

    def pause(self) -> float:
        """Seconds to sleep before the next attempt; raises BulkheadFull when out of time."""
        binding = self.binding
        sleep = self.step
        if self.budget is not None:
            left = self.budget - (binding.clock.now() - self.started)
            if left <= 0:
                if self.budget > 0:  # allowed to wait, and the time ran out
                    raise BulkheadFull(
                        f"{binding.label} is full: no slot freed up in time",
                        name=binding.name,
                        reason="bulkhead_wait_timeout",
                    )
                raise BulkheadFull(
                    f"{binding.label} is full: all {binding.limit} slots busy",
                    name=binding.name,
                    reason="bulkhead_full",
                )
            sleep = min(sleep, left)
        self.waited = True
        self.step = min(self.step * 2, binding.store.poll_interval * 8)
        return sleep


# -- saga idempotency -----------------------------------------------------------------------


class RedisIdempotencyStore(_RedisStore):
    """Idempotency keys of :class:`~buttress.Saga` runs, shared through Redis.

    Pass it as ``Saga(..., idempotency=RedisIdempotencyStore(url))`` next to a durable run
    log (``store=``). It is an :class:`~buttress.backends.IdempotencyStore` only (it keeps
    no run log), so ``Saga(store=RedisIdempotencyStore(...))`` is refused when the saga
    is built. Claiming a key is one atomic script: of two processes running the
    same key at once, one runs the steps and the other is told the key is busy (or, once
    the first finished, gets its stored result). A completed run's key lives for the run's
    ``ttl`` (or ``default_ttl``); a failed, compensated run frees its key.

    ``url``, ``client``, ``prefix``, ``timeout`` and ``cluster`` are as for
    :class:`RedisRateLimiterStore` (the saga runner calls stores from sync code, so a sync
    client is used). ``on_backend_error`` is ``"fail_closed"`` (default: a run whose key
    cannot be claimed does not start), ``"fail_open"`` (run without the guarantee) or
    ``"local"`` (keys claimed in this process only, with an in-memory store).

    Args:
        default_ttl: seconds a completed key is remembered when the run sets no ``ttl``
            (default ``None``: until it is deleted).
        clock: whose ``wall()`` reading turns a run's expiry into a Redis TTL (default:
            the system clock; pass the saga's clock when it is a ``FakeClock``).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        default_ttl: float | timedelta | None = None,
        clock: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(url, **options)
        wall = getattr(clock, "wall", None)
        if clock is not None and not callable(wall):
            raise ConfigTypeError(
                f"clock must have a wall() reading (SystemClock, FakeClock), got {clock!r}"
            )
        self._wall = wall if wall is not None else _wall
        self.default_ttl = check_seconds("default_ttl", default_ttl, allow_none=True)
        from .memory import MemoryStore

        self._local = MemoryStore()
        self._claimed: dict[str, str] = {}  # run id -> its key, for runs claimed here
        self._gate_impl = Gate(
            self.backend, self.on_backend_error, self.retry_interval or 0.0, self._wall, self.emit
        )

    def emit(self, event_type: type[_events.Event], **fields: Any) -> None:
        """Report a store event (a degraded or recovered backend) to the global
        listeners, as a primitive would."""
        if _events.hub.listeners:
            event = event_type(
                source="saga_idempotency", name=self.prefix, time=self._wall(), **fields
            )
            _events.dispatch((), event)

    def _key(self, saga: str, key: str) -> str:
        return self.key("idem", saga, key)

    def _run_key(self, run_id: str) -> str:
        return self.key("idem-run", run_id)

    # -- the IdempotencyStore protocol -----------------------------------------------------

    def claim_key(self, record: RunRecord, *, now: float) -> KeyClaim:
        assert record.key is not None
        gate = self._gate_impl
        if gate.should_try():
            key = self._key(record.saga, record.key)
            try:
                reply = self._conn.run(
                    scripts.IDEMPOTENCY_CLAIM,
                    key,
                    record.run_id,
                    record.input_hash or "",
                    record.owner or "",
                    repr(record.lease_until),
                    repr(now),
                    record.saga,
                    repr(record.created_at),
                )
                run_id = reply[1].decode()
                # where the key of a run lives, for a process that recovers the run
                self._conn.sync().set(self._run_key(run_id), key, ex=7 * 86400)
            except self._errors as exc:
                gate.failed(exc)
            else:
                gate.succeeded()
                claim = _claim_from(reply, record)
                if claim.outcome in ("new", "resume"):
                    if len(self._claimed) >= 10_000:  # runs this process never finished
                        self._claimed.pop(next(iter(self._claimed)))
                    self._claimed[run_id] = key
                return claim
        if gate.mode == "fail_closed":
            raise gate.unavailable(f"idempotency key {record.key!r}")
        if gate.mode == "fail_open":
            return KeyClaim("new", record.run_id)
        return self._local.claim_key(record, now=now)

    def write(
        self,
        run_id: str,
        entries: list[LogEntry],
        *,
        lease_until: float | None = None,
        status: str | None = None,
        error: str | None = None,
        result: dict[str, Any] | None = None,
        expires_at: float | None = None,
        wake_at: float | None = None,
        waiting_for: str | None = None,
    ) -> None:
        self._local.write(
            run_id,
            entries,
            lease_until=lease_until,
            status=status,
            error=error,
            result=result,
            expires_at=expires_at,
            wake_at=wake_at,
            waiting_for=waiting_for,
        )
        gate = self._gate_impl
        final = status is not None and status not in INCOMPLETE
        if gate.should_try():
            try:
                self._write(
                    run_id,
                    lease_until=lease_until,
                    status=status,
                    error=error,
                    result=result,
                    expires_at=expires_at,
                    final=final,
                )
            except self._errors as exc:
                gate.failed(exc)
            else:
                gate.succeeded()
                return
        if gate.mode == "fail_closed":
            raise BackendError(f"could not record run {run_id} in Redis (fail_closed)")
        # fail_open / local: the run goes on; its key is released when its lease runs out

    def _write(
        self,
        run_id: str,
        *,
        lease_until: float | None,
        status: str | None,
        error: str | None,
        result: dict[str, Any] | None,
        expires_at: float | None,
        final: bool,
    ) -> None:
        key: Any = self._claimed.pop(run_id, None) if final else self._claimed.get(run_id)
        if key is None:  # a run claimed by another process (recovered here)
            key = self._conn.sync().get(self._run_key(run_id))
            if key is None:
                return
            key = key.decode()
        ttl_ms = 0
        if status == COMPLETED:
            ttl = None if expires_at is None else expires_at - self._wall()
            if ttl is None and self.default_ttl is not None:
                ttl = self.default_ttl
                expires_at = self._wall() + ttl
            if ttl is not None:
                ttl_ms = max(int(ttl * 1000), 1)
        self._conn.run(
            scripts.IDEMPOTENCY_WRITE,
            key,
            run_id,
            status or "",
            "" if lease_until is None else repr(lease_until),
            error or "",
            "" if result is None else json.dumps(result, default=str),
            "" if expires_at is None else repr(expires_at),
            ttl_ms,
        )
        if final:
            self._conn.sync().delete(self._run_key(run_id))


def _wall() -> float:
    import time

    return time.time()


def _claim_from(reply: list[Any], wanted: RunRecord) -> KeyClaim:
    outcome = reply[0].decode()
    run_id = reply[1].decode()
    if outcome == "new":
        return KeyClaim("new", run_id)
    raw = reply[2:]
    fields = {raw[i].decode(): raw[i + 1].decode() for i in range(0, len(raw), 2)}
    result = json.loads(fields["result"]) if fields.get("result") else None
    record = RunRecord(
        run_id=run_id,
        saga=fields.get("saga", wanted.saga),
        status=fields.get("status", "running"),
        input=None,
        key=wanted.key,
        input_hash=fields.get("hash"),
        created_at=float(fields.get("created") or 0.0),
        owner=fields.get("owner") or None,
        lease_until=float(fields.get("lease") or 0.0),
        error=fields.get("error") or None,
        result=result,
        expires_at=float(fields["expires"]) if fields.get("expires") else None,
    )
    return KeyClaim(outcome, run_id, record=record)
