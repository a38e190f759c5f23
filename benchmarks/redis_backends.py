"""Redis backends: what one shared decision costs, against a bare ``PING`` and peer libraries.

Every case runs on the local Redis in the same process and the same run, one call at a
time. The buttress rate limiter's store is built from the URL, as users build it; the
``PING`` baseline is sent on that store's own client (same socket options, same parser),
and the other buttress stores, pyrate-limiter and pybreaker are handed that same client,
so they all talk over one connection. ``limits`` builds its client from the URL itself
(``storage_from_string``), with the same socket options.

Timing: the cases are interleaved (every repeat runs every case once, in a rotating
order) and each call is timed on its own; a case's figure is the median over the
repeats of the median call. On a small shared machine one preemption of the client or
of the server costs milliseconds, so means mostly measure the neighbours.

Round trips are counted in a separate pass, by wrapping redis-py's
``AbstractConnection.send_packed_command`` (sync and asyncio): one call is one request
written to the socket and waited for (a pipeline or ``MULTI``/``EXEC`` block is one).
Only the measuring thread counts (pyrate-limiter's leaker and buttress's lease renewer
run in threads of their own). ``INFO commandstats`` is not used for this: it also counts
the commands a Lua script runs on the server, which are not round trips.

Concurrency (issue 16): one primitive driven by 1, 8 and 64 asyncio tasks calling it
in a loop, beside PING on a plain asyncio client, interleaved in the same run; ops/s,
round trips per op (counted as above) and the connections each client's pool holds.
The quick guard requires the limiter and the bulkhead call at 64 callers to make at least
3x their 1-caller ops/s, with at most 2 connections per store.

Accuracy (issue 6): four OS processes (spawn) share one limiter and ask for more than
its rate; each admission is recorded as the (before, after) wall-clock interval of its
call, and a window counts only admissions whose whole interval lies inside it.

Run ``python -m benchmarks.redis_backends [--full]`` for this section alone.
"""

from __future__ import annotations

import asyncio
import gc
import math
import multiprocessing
import os
import platform
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

URL_ENV = "BUTTRESS_REDIS_URL"
DEFAULT_URL = "redis://127.0.0.1:6379/0"
TITLE = "Redis backends"
SECTION = "redis_backends"

LIMITER_TARGET = 1.15  # buttress acquire: at most this many PINGs
CONCURRENCY = (1, 8, 64)  # concurrent async callers of one primitive (issue 16)
SPEEDUP_TARGET = 3.0  # limiter and bulkhead at 64 callers: at least this many times 1 caller's
RATIO_SLACK = 1.25  # what the quick guard allows on that ratio
CONNECTIONS_TARGET = 2  # connections a buttress store may open for 64 callers
BATCH = 32  # the limiter's batch mode case
BATCH_RATE = 20_000  # per second, burst alike: batch-mode units are valid 50 µs apart
NEVER_LIMITED = 1_000_000  # per second, burst alike: no case is ever refused or delayed

# accuracy (issue 6)
PROCESSES = 4
ACC_RATE = 200.0
ACC_BURST = 10
ACC_WINDOWS = (0.05, 0.25, 1.0)


def redis_url() -> str:
    return os.environ.get(URL_ENV, DEFAULT_URL)


# -- round-trip counting ------------------------------------------------------------------------


@contextmanager
def _counting() -> Iterator[list[str]]:
    """Record every request this thread writes to Redis (sync or asyncio redis-py) while
    the block runs; redis-py is unpatched again afterwards, so timing never pays for it."""
    import redis.asyncio.connection as async_connection
    import redis.connection as sync_connection

    sync_class: Any = sync_connection.AbstractConnection
    async_class: Any = async_connection.AbstractConnection
    sync_send = sync_class.send_packed_command
    async_send = async_class.send_packed_command
    thread = threading.get_ident()
    sent: list[str] = []

    def send(self: Any, command: Any, check_health: bool = True) -> None:
        if threading.get_ident() == thread:
            sent.append(_command_names(command))
        sync_send(self, command, check_health)

    async def asend(self: Any, command: Any, check_health: bool = True) -> None:
        if threading.get_ident() == thread:
            sent.append(_command_names(command))
        await async_send(self, command, check_health)

    sync_class.send_packed_command = send
    async_class.send_packed_command = asend
    try:
        yield sent
    finally:
        sync_class.send_packed_command = sync_send
        async_class.send_packed_command = async_send


def _command_names(packed: object) -> str:
    """The command names in one packed request (``GET+INCR`` for a pipeline of two)."""
    if isinstance(packed, str):
        data = packed.encode()
    elif isinstance(packed, bytes | bytearray | memoryview):
        data = bytes(packed)
    else:
        data = b"".join(bytes(part) for part in packed)  # type: ignore[attr-defined]
    names: list[str] = []
    pos = 0
    try:
        while pos < len(data) and data[pos : pos + 1] == b"*":
            end = data.index(b"\r\n", pos)
            count = int(data[pos + 1 : end])
            pos = end + 2
            for index in range(count):
                end = data.index(b"\r\n", pos)
                size = int(data[pos + 1 : end])
                if index == 0:
                    names.append(data[end + 2 : end + 2 + size].decode(errors="replace").upper())
                pos = end + 2 + size + 2
    except ValueError:
        names.append("?")
    return "+".join(names) or "?"


# -- the cases ----------------------------------------------------------------------------------

BASELINE = "baseline"
FLOOR = "floor"
BUTTRESS = "buttress"
PEER = "peer"

# The cheapest call a one-script store can make: EVALSHA of a script that only returns,
# with the limiter's key and argument count.
EMPTY_SCRIPT = "return {1, '0', '0'}"
FLOOR_LABEL = "EVALSHA of an empty Lua script (floor)"
LIMITER_LABEL = "buttress RateLimiter.acquire()"
LIMITER_ASYNC = "buttress RateLimiter.acquire_async()"
BULKHEAD_ASYNC = "buttress Bulkhead call (async with)"
SPEEDUP_GUARDED = (LIMITER_ASYNC, BULKHEAD_ASYNC)  # the cases the speed-up target is for
BATCH_LABEL = f"buttress RateLimiter.acquire_async(), batch={BATCH}"


@dataclass
class Case:
    label: str
    kind: str  # baseline | buttress | peer
    face: str  # sync | async
    library: str
    make: Callable[[], Callable[[], Any]]  # builds the call (inside the loop for async)
    ratio_limit: float | None = None  # x PING
    trips: tuple[str, float] | None = None  # ("==" | "<=", round trips)
    guarded: bool = True  # part of failures()
    note: str = ""
    # results
    us: float | None = None
    samples: list[float] = field(default_factory=list)
    round_trips: float | None = None
    commands: str = ""
    skipped: str | None = None
    fn: Callable[[], Any] | None = None

    def target(self) -> str:
        parts = []
        if self.ratio_limit is not None:
            parts.append(f"<= {self.ratio_limit:g}x PING")
        if self.trips is not None:
            op, value = self.trips
            parts.append(f"{'' if op == '==' else '<= '}{value:g} RT")
        return ", ".join(parts) or "-"

    def trips_ok(self) -> bool | None:
        if self.trips is None or self.round_trips is None:
            return None
        op, value = self.trips
        if op == "==":
            return abs(self.round_trips - value) < 1e-9
        return self.round_trips <= value + 1e-9


@dataclass
class Accuracy:
    label: str
    contract: str
    bound: Callable[[float], float]  # most admissions allowed in any window of t seconds
    seconds: float
    admitted: int = 0
    per_process: list[int] = field(default_factory=list)
    allowed: float = 0.0  # the bound over the span from the first admission to the end
    span: float = 0.0
    worst: dict[float, tuple[int, float]] = field(default_factory=dict)  # width -> (max, bound)
    skipped: str | None = None
    is_buttress: bool = False

    def excess(self, width: float) -> float | None:
        if width not in self.worst:
            return None
        most, bound = self.worst[width]
        return most - math.floor(bound + 1e-9)


# -- timing -------------------------------------------------------------------------------------


def _time_sync(fn: Callable[[], Any], calls: int) -> float:
    perf = time.perf_counter_ns
    laps = []
    for _ in range(calls):
        start = perf()
        fn()
        laps.append(perf() - start)
    return statistics.median(laps) / 1000.0


async def _time_async(fn: Callable[[], Awaitable[Any]], calls: int) -> float:
    perf = time.perf_counter_ns
    laps = []
    for _ in range(calls):
        start = perf()
        await fn()
        laps.append(perf() - start)
    return statistics.median(laps) / 1000.0


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:120]


def _count_sync(case: Case, calls: int) -> None:
    assert case.fn is not None
    case.fn()  # whatever is loaded or connected once happens here, not in the count
    with _counting() as sent:
        for _ in range(calls):
            case.fn()
    _take_count(case, sent, calls)


async def _count_async(case: Case, calls: int) -> None:
    assert case.fn is not None
    await case.fn()
    with _counting() as sent:
        for _ in range(calls):
            await case.fn()
    _take_count(case, sent, calls)


def _take_count(case: Case, sent: list[str], calls: int) -> None:
    case.round_trips = len(sent) / calls
    kinds: dict[str, int] = {}
    for name in sent:
        kinds[name] = kinds.get(name, 0) + 1
    case.commands = ", ".join(f"{name} x{n / calls:g}" for name, n in kinds.items()) or "none"


def _measure_sync(cases: list[Case], repeats: int, calls: int, count_calls: int) -> None:
    live = []
    for case in cases:
        try:
            case.fn = case.make()
            _count_sync(case, count_calls)
            _time_sync(case.fn, max(calls // 4, 10))  # warm-up
            live.append(case)
        except Exception as exc:
            case.skipped = _describe(exc)
    _timed_sync(live, repeats, calls)


def _timed_sync(live: list[Case], repeats: int, calls: int) -> None:
    """Interleaved repeats (rotating order); the collector is off while timing."""
    for case in live:
        case.samples = []
    gc.collect()
    gc.disable()
    try:
        for index in range(repeats):
            shift = index % max(len(live), 1)
            for case in live[shift:] + live[:shift]:
                assert case.fn is not None
                case.samples.append(_time_sync(case.fn, calls))
    finally:
        gc.enable()
    for case in live:
        case.us = statistics.median(case.samples)


async def _measure_async(cases: list[Case], repeats: int, calls: int, count_calls: int) -> None:
    live = []
    for case in cases:
        try:
            case.fn = case.make()
            await _count_async(case, count_calls)
            await _time_async(case.fn, max(calls // 4, 10))
            live.append(case)
        except Exception as exc:
            case.skipped = _describe(exc)
    await _timed_async(live, repeats, calls)


async def _timed_async(live: list[Case], repeats: int, calls: int) -> None:
    for case in live:
        case.samples = []
    gc.collect()
    gc.disable()
    try:
        for index in range(repeats):
            shift = index % max(len(live), 1)
            for case in live[shift:] + live[:shift]:
                assert case.fn is not None
                case.samples.append(await _time_async(case.fn, calls))
    finally:
        gc.enable()
    for case in live:
        case.us = statistics.median(case.samples)


# -- building the cases ---------------------------------------------------------------------------


class _Setup:
    """Stores, clients and peers of one run; ``close()`` undoes all of it."""

    def __init__(self, url: str, prefix: str) -> None:
        from buttress.backends.redis import RedisRateLimiterStore

        self.url = url
        self.prefix = prefix
        self.limiter_store = RedisRateLimiterStore(url, prefix=prefix)
        self.client: Any = self.limiter_store._conn.sync()  # the store's own client
        self.options = self.limiter_store._conn._options(asynchronous=False)
        self.closers: list[Callable[[], object]] = []
        self.limiter: Any = None  # the buttress limiter, once its case is built
        self.async_stores: list[Any] = []  # closed (aclose) inside the loop, then close()

    # sync --------------------------------------------------------------------------------------

    def ping(self) -> Callable[[], Any]:
        return self.client.ping  # type: ignore[no-any-return]

    def empty_script(self) -> Callable[[], Any]:
        client = self.client
        sha = client.script_load(EMPTY_SCRIPT)
        key = f"{self.prefix}{{floor}}"
        return lambda: client.execute_command("EVALSHA", sha, 1, key, "1.0", "1e12", 1, "-1", "")

    def buttress_limiter(self) -> Callable[[], Any]:
        from buttress import RateLimiter

        limiter = RateLimiter(
            "bench-limiter", rate=NEVER_LIMITED, burst=NEVER_LIMITED, store=self.limiter_store
        )
        self.limiter = limiter
        return limiter.acquire

    def buttress_breaker(self, staleness: float | None) -> Callable[[], Any]:
        from buttress import CircuitBreaker
        from buttress.backends.redis import RedisBreakerStore

        store = RedisBreakerStore(client=self.client, prefix=self.prefix, max_staleness=staleness)
        name = "bench-breaker" if staleness is None else "bench-breaker-stale"
        breaker = CircuitBreaker(name, failure_threshold=5, reset_timeout=60, store=store)
        self.closers.append(store.close)
        return breaker(_one)

    def buttress_bulkhead(self) -> Callable[[], Any]:
        from buttress import Bulkhead
        from buttress.backends.redis import RedisBulkheadStore

        store = RedisBulkheadStore(client=self.client, prefix=self.prefix)
        bulkhead = Bulkhead("bench-bulkhead", max_concurrent=100, store=store)
        self.closers.append(store.close)
        return bulkhead(_one)

    def limits(self, strategy: str) -> Callable[[], Any]:
        from limits import RateLimitItemPerSecond, strategies
        from limits.storage import storage_from_string

        storage: Any = storage_from_string(
            self.url,
            key_prefix=f"{self.prefix}limits",
            socket_timeout=self.options["socket_timeout"],
            socket_connect_timeout=self.options["socket_connect_timeout"],
        )
        self.closers.append(storage.storage.close)
        limiter = getattr(strategies, strategy)(storage)
        item = RateLimitItemPerSecond(NEVER_LIMITED)
        name = strategy.lower()

        def hit() -> None:
            if not limiter.hit(item, name):
                raise RuntimeError("limits refused a call")

        return hit

    def pyrate(self, algorithm: str) -> Callable[[], Any]:
        from pyrate_limiter import Duration, Limiter, Rate, RedisBucket

        key = f"{self.prefix}pyrate-{algorithm}"
        if algorithm == "log":
            bucket: Any = RedisBucket.init([Rate(NEVER_LIMITED, Duration.SECOND)], self.client, key)
        else:
            from pyrate_limiter import RedisStateStore, StateBucket

            rate = Rate(NEVER_LIMITED, Duration.SECOND, burst=NEVER_LIMITED)
            bucket = StateBucket([rate], store=RedisStateStore(self.client, key))
        limiter = Limiter(bucket)
        self.closers.append(limiter.close)

        def acquire() -> None:
            if not limiter.try_acquire("bench", blocking=False):
                raise RuntimeError("pyrate-limiter refused a call")

        return acquire

    def pybreaker(self) -> Callable[[], Any]:
        import pybreaker

        storage = pybreaker.CircuitRedisStorage(
            pybreaker.STATE_CLOSED, self.client, namespace=f"{self.prefix}pybreaker"
        )
        breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60, state_storage=storage)
        return lambda: breaker.call(_one)

    # async -------------------------------------------------------------------------------------

    def aping(self) -> Callable[[], Awaitable[Any]]:
        client: Any = self.limiter_store._conn.aio()  # the store's client for this loop
        return client.ping  # type: ignore[no-any-return]

    def buttress_limiter_async(self) -> Callable[[], Awaitable[Any]]:
        return self.limiter.acquire_async  # type: ignore[no-any-return]

    def buttress_bulkhead_async(self) -> Callable[[], Awaitable[Any]]:
        from buttress import Bulkhead
        from buttress.backends.redis import RedisBulkheadStore

        # built from the URL: the async face needs an asyncio client of its own
        store = RedisBulkheadStore(self.url, prefix=self.prefix)
        bulkhead = Bulkhead("bench-bulkhead-async", max_concurrent=100, store=store)
        self.async_stores.append(store)
        return bulkhead(_aone)

    def close(self) -> None:
        for close in reversed(self.closers):
            with suppress(Exception):
                close()
        with suppress(Exception):
            keys = list(self.client.scan_iter(match=f"{self.prefix}*", count=1000))
            for start in range(0, len(keys), 500):
                self.client.delete(*keys[start : start + 500])
        self.limiter_store.close()


def _one() -> int:
    return 1


async def _aone() -> int:
    return 1


def _sync_cases(setup: _Setup) -> list[Case]:
    trip1 = ("==", 1.0)
    return [
        Case("PING", BASELINE, "sync", "redis", setup.ping),
        Case(
            FLOOR_LABEL,
            FLOOR,
            "sync",
            "redis",
            setup.empty_script,
            note="same key and argument count as the limiter's script",
        ),
        Case(
            LIMITER_LABEL,
            BUTTRESS,
            "sync",
            "buttress",
            setup.buttress_limiter,
            ratio_limit=LIMITER_TARGET,
            trips=trip1,
        ),
        Case(
            "limits FixedWindowRateLimiter.hit()",
            PEER,
            "sync",
            "limits",
            lambda: setup.limits("FixedWindowRateLimiter"),
        ),
        Case(
            "limits MovingWindowRateLimiter.hit()",
            PEER,
            "sync",
            "limits",
            lambda: setup.limits("MovingWindowRateLimiter"),
        ),
        Case(
            "pyrate-limiter try_acquire() (RedisBucket, log)",
            PEER,
            "sync",
            "pyrate-limiter",
            lambda: setup.pyrate("log"),
        ),
        Case(
            "pyrate-limiter try_acquire() (RedisStateStore, GCRA)",
            PEER,
            "sync",
            "pyrate-limiter",
            lambda: setup.pyrate("gcra"),
        ),
        Case(
            "buttress CircuitBreaker call (closed)",
            BUTTRESS,
            "sync",
            "buttress",
            lambda: setup.buttress_breaker(None),
            trips=("<=", 1.0),
        ),
        Case(
            "buttress CircuitBreaker call (closed, max_staleness=1.0)",
            BUTTRESS,
            "sync",
            "buttress",
            lambda: setup.buttress_breaker(1.0),
            trips=("==", 0.0),
            note="re-reads the shared state once a second (not in the median call)",
        ),
        Case(
            "pybreaker CircuitBreaker.call() (CircuitRedisStorage, closed)",
            PEER,
            "sync",
            "pybreaker",
            setup.pybreaker,
        ),
        Case(
            "buttress Bulkhead call (acquire + release)",
            BUTTRESS,
            "sync",
            "buttress",
            setup.buttress_bulkhead,
            trips=("==", 1.0),
            note="the release is sent by the lease thread (or by the next acquire)",
        ),
    ]


def _async_cases(setup: _Setup) -> list[Case]:
    return [
        Case("PING (asyncio)", BASELINE, "async", "redis", setup.aping),
        Case(
            "buttress RateLimiter.acquire_async()",
            BUTTRESS,
            "async",
            "buttress",
            setup.buttress_limiter_async,
            ratio_limit=LIMITER_TARGET,
            trips=("==", 1.0),
        ),
        Case(
            BULKHEAD_ASYNC,
            BUTTRESS,
            "async",
            "buttress",
            setup.buttress_bulkhead_async,
            trips=("==", 1.0),
            note="the release is posted: it shares the next acquire's pipeline",
        ),
    ]


# -- concurrent async callers (issue 16) -----------------------------------------------------------


@dataclass
class Load:
    """One case driven by ``callers`` concurrent asyncio tasks, each calling in a loop."""

    label: str
    kind: str  # baseline | buttress
    callers: int
    samples: list[float] = field(default_factory=list)  # ops/s, one per repeat
    ops: float | None = None  # median ops/s
    round_trips: float | None = None  # requests written per op (a pipeline is one)
    connections: int | None = None  # connections its client holds after this many callers
    calls_per_op: float | None = None  # batch mode: script calls per acquire
    skipped: str | None = None


async def _throughput(fn: Callable[[], Awaitable[Any]], callers: int, seconds: float) -> float:
    perf = time.perf_counter
    stop = perf() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while perf() < stop:
            await fn()
            done += 1

    start = perf()
    await asyncio.gather(*(worker() for _ in range(callers)))
    return done / (perf() - start)


async def _run_each(fn: Callable[[], Awaitable[Any]], callers: int, each: int) -> None:
    async def worker() -> None:
        for _ in range(each):
            await fn()

    await asyncio.gather(*(worker() for _ in range(callers)))


def _pool_size(client: Any) -> int | None:
    """Connections an asyncio client's pool holds (open or idle)."""
    pool = getattr(client, "connection_pool", None)
    try:
        return len(pool._available_connections) + len(pool._in_use_connections)  # type: ignore[union-attr]
    except Exception:
        return None


async def _concurrency(url: str, prefix: str, quick: bool) -> list[Load]:
    """ops/s of PING and of buttress's async faces at 1, 8 and 64 concurrent callers, in
    one interleaved run; round trips per op and connections in a separate pass."""
    import redis.asyncio

    from buttress import Bulkhead, RateLimiter
    from buttress.backends.redis import RedisBulkheadStore, RedisRateLimiterStore

    limiter_store = RedisRateLimiterStore(url, prefix=f"{prefix}conc:")
    batch_store = RedisRateLimiterStore(url, prefix=f"{prefix}conc:", batch=BATCH)
    bulkhead_store = RedisBulkheadStore(url, prefix=f"{prefix}conc:")
    ping_client: Any = redis.asyncio.Redis.from_url(
        url, **limiter_store._conn._options(asynchronous=True)
    )
    limiter = RateLimiter(
        "conc-limiter", rate=NEVER_LIMITED, burst=NEVER_LIMITED, store=limiter_store
    )
    batched = RateLimiter("conc-batched", rate=BATCH_RATE, burst=BATCH_RATE, store=batch_store)
    bulkhead = Bulkhead("conc-bulkhead", max_concurrent=100, store=bulkhead_store)
    call = bulkhead(_aone)
    cases: list[tuple[str, str, Callable[[], Awaitable[Any]], Any, Any]] = [
        ("PING", BASELINE, ping_client.ping, lambda: ping_client, None),
        (LIMITER_ASYNC, BUTTRESS, limiter.acquire_async, limiter_store._conn.aio, None),
        (BULKHEAD_ASYNC, BUTTRESS, call, bulkhead_store._conn.aio, None),
        (BATCH_LABEL, BUTTRESS, batched.acquire_async, batch_store._conn.aio, batched),
    ]
    repeats, seconds, each = (3, 0.05, 10) if quick else (7, 0.4, 100)
    loads = {(label, n): Load(label, kind, n) for label, kind, *_ in cases for n in CONCURRENCY}
    try:
        # counting pass, in rising order of callers: connections opened by then
        for label, _, fn, client, primitive in cases:
            for n in CONCURRENCY:
                load = loads[label, n]
                try:
                    await _run_each(fn, n, 2)  # connect, load scripts
                    before = primitive.snapshot()["store"] if primitive is not None else None
                    per = each
                    if primitive is not None:  # batch mode: count over several refills
                        per = max(each, math.ceil(8 * BATCH / n))
                    with _counting() as sent:
                        await _run_each(fn, n, per)
                    ops = n * per
                    load.round_trips = len(sent) / ops
                    load.connections = _pool_size(client())
                    if before is not None:
                        after = primitive.snapshot()["store"]
                        calls = after["round_trips"] - before["round_trips"]
                        load.calls_per_op = calls / (after["acquires"] - before["acquires"])
                except Exception as exc:
                    load.skipped = _describe(exc)
        live = [(label, fn) for label, _, fn, *_ in cases]
        await _timed_loads(live, loads, repeats, seconds)
        if quick:
            low = [
                label
                for label in SPEEDUP_GUARDED
                if (_speedup(list(loads.values()), label) or SPEEDUP_TARGET) < SPEEDUP_TARGET
            ]
            if low:  # once more, longer
                await _timed_loads(
                    [(label, fn) for label, fn in live if label in low], loads, 5, 0.15
                )
    finally:
        for store in (limiter_store, batch_store, bulkhead_store):
            with suppress(Exception):
                await store.aclose()
            store.close()
        with suppress(Exception):
            await ping_client.aclose()
    return list(loads.values())


async def _timed_loads(
    live: list[tuple[str, Callable[[], Awaitable[Any]]]],
    loads: dict[tuple[str, int], Load],
    repeats: int,
    seconds: float,
) -> None:
    """Interleaved: every repeat drives every (case, callers) once, in a rotating order."""
    runs = [(label, fn, n) for label, fn in live for n in CONCURRENCY]
    runs = [r for r in runs if loads[r[0], r[2]].skipped is None]
    for label, _, n in runs:
        loads[label, n].samples = []
    gc.collect()
    gc.disable()
    try:
        for index in range(repeats):
            shift = index % max(len(runs), 1)
            for label, fn, n in runs[shift:] + runs[:shift]:
                loads[label, n].samples.append(await _throughput(fn, n, seconds))
    finally:
        gc.enable()
    for label, _, n in runs:
        loads[label, n].ops = statistics.median(loads[label, n].samples)


def _load(loads: list[Load], label: str, callers: int) -> Load | None:
    return next(
        (x for x in loads if x.label == label and x.callers == callers and x.ops is not None),
        None,
    )


def _speedup(loads: list[Load], label: str = "") -> float | None:
    """ops/s at the most callers over ops/s at one caller."""
    label = label or LIMITER_ASYNC
    one, most = _load(loads, label, CONCURRENCY[0]), _load(loads, label, CONCURRENCY[-1])
    if one is None or most is None or not one.ops or most.ops is None:
        return None
    return most.ops / one.ops


# -- server-side script time (information) --------------------------------------------------------


def _script_time(setup: _Setup, calls: int) -> float | None:
    """Server microseconds per EVALSHA of the limiter, from ``INFO commandstats`` deltas:
    the least over 5 batches (a batch in which the server was preempted reads long). A
    batch in which another client ran scripts is left out (its delta is not ours)."""

    def evalsha() -> tuple[int, int]:
        stats = setup.client.info("commandstats").get("cmdstat_evalsha", {})
        return int(stats.get("calls", 0)), int(stats.get("usec", 0))

    batches = []
    try:
        for _ in range(5):
            calls0, usec0 = evalsha()
            for _ in range(calls):
                setup.limiter.acquire()
            calls1, usec1 = evalsha()
            if calls1 - calls0 == calls:
                batches.append((usec1 - usec0) / calls)
    except Exception:
        return None
    return min(batches) if batches else None


def _client_cost(calls: int) -> float | None:
    """Microseconds buttress adds around the round trip per ``acquire()``: the limiter on
    a stub client that answers at once, minus the stub's own call (best of 5)."""
    import redis

    from buttress import RateLimiter
    from buttress.backends.redis import RedisRateLimiterStore

    class Stub(redis.Redis):
        def __init__(self) -> None:  # no connection at all
            pass

        def execute_command(self, *args: Any, **options: Any) -> Any:
            return [1, b"0", b"1"]

    stub = Stub()
    store = RedisRateLimiterStore(client=stub)
    limiter = RateLimiter("bench-stub", rate=NEVER_LIMITED, burst=NEVER_LIMITED, store=store)

    def bare() -> None:
        stub.execute_command("EVALSHA", "0" * 40, 1, "k", "1.0", "1e12", 1, "-1", "")

    def best(fn: Callable[[], Any]) -> float:
        runs = []
        for _ in range(5):
            start = time.perf_counter_ns()
            for _ in range(calls):
                fn()
            runs.append((time.perf_counter_ns() - start) / calls / 1000.0)
        return min(runs)

    try:
        return max(best(limiter.acquire) - best(bare), 0.0)
    except Exception:
        return None


def _ratio_of(cases: list[Case], case: Case) -> float | None:
    base = next((c for c in cases if c.kind == BASELINE and c.us is not None), None)
    if base is None or base.us is None or case.us is None:
        return None
    return case.us / base.us


def _suspects(cases: list[Case]) -> list[Case]:
    """Cases above twice their target (the quick run's guard): measured once more."""
    out = []
    for case in cases:
        ratio = _ratio_of(cases, case)
        if case.ratio_limit is not None and ratio is not None and ratio > 2 * case.ratio_limit:
            out.append(case)
    return out


# -- accuracy across processes --------------------------------------------------------------------


def _accuracy_worker(  # noqa: PLR0917 - a process target takes positional arguments
    kind: str,
    url: str,
    prefix: str,
    seconds: float,
    ready: Any,
    go: Any,
    start: Any,
    results: Any,
) -> None:
    """One process hammering the shared limiter; puts its (before, after) admissions."""
    admitted: list[tuple[float, float]] = []
    try:
        attempt, close = _acquirer(kind, url, prefix)
        ready.put(os.getpid())
        if not go.wait(60):
            raise RuntimeError("never told to start")
        begin = start.value
        while time.time() < begin:
            time.sleep(0.0005)
        end = begin + seconds
        while True:
            before = time.time()
            if before >= end:
                break
            wait = attempt()
            if wait is None:
                admitted.append((before, time.time()))
            else:
                # sleep until the next slot should be free, then race the others for it
                time.sleep(max(wait, 0.0))
        close()
        results.put((os.getpid(), admitted, None))
    except BaseException as exc:
        results.put((os.getpid(), admitted, _describe(exc)))


def _acquirer(kind: str, url: str, prefix: str) -> tuple[Callable[[], float | None], Any]:
    """``attempt() -> None`` when admitted, else seconds to wait; and a close function."""
    if kind == "buttress":
        from buttress import RateLimited, RateLimiter
        from buttress.backends.redis import RedisRateLimiterStore

        store = RedisRateLimiterStore(url, prefix=prefix)
        limiter = RateLimiter("shared", rate=ACC_RATE, burst=ACC_BURST, max_wait=0, store=store)
        store._conn.sync().ping()  # connect before the start line

        def attempt() -> float | None:
            try:
                limiter.acquire()
            except RateLimited as exc:
                return exc.retry_after or 0.0
            return None

        return attempt, store.close

    from limits import RateLimitItemPerSecond
    from limits.storage import storage_from_string
    from limits.strategies import MovingWindowRateLimiter

    storage: Any = storage_from_string(url, key_prefix=f"{prefix}limits")
    strategy = MovingWindowRateLimiter(storage)
    item = RateLimitItemPerSecond(int(ACC_RATE))
    storage.storage.ping()

    def attempt_limits() -> float | None:
        if strategy.hit(item, "shared"):
            return None
        stats = strategy.get_window_stats(item, "shared")
        return stats.reset_time - time.time()

    return attempt_limits, storage.storage.close


def _run_processes(kind: str, url: str, prefix: str, seconds: float) -> list[list[Any]]:
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    start = ctx.Value("d", 0.0)
    workers = [
        ctx.Process(
            target=_accuracy_worker,
            args=(kind, url, prefix, seconds, ready, go, start, results),
            daemon=True,
        )
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            ready.get(timeout=60)
        start.value = time.time() + 0.05
        go.set()
        parts = []
        for _ in workers:
            _, admitted, error = results.get(timeout=seconds + 60)
            if error is not None:
                raise RuntimeError(f"a worker failed: {error}")
            parts.append(admitted)
        return parts
    finally:
        go.set()
        for worker in workers:
            worker.join(5)
            if worker.is_alive():
                worker.kill()
                worker.join()


def _most_inside(admissions: list[tuple[float, float]], width: float) -> int:
    """The most admissions whose whole (before, after) interval lies in one window of
    ``width`` seconds (every admission's ``before`` tried as a window start)."""
    ordered = sorted(admissions)
    most = 0
    for i, (begin, _) in enumerate(ordered):
        stop = begin + width
        inside = 0
        for before, after in ordered[i:]:
            if before > stop:
                break
            if after <= stop:
                inside += 1
        most = max(most, inside)
    return most


def _accuracy(kind: str, url: str, prefix: str, seconds: float) -> Accuracy:
    if kind == "buttress":
        run = Accuracy(
            "buttress RateLimiter (RedisRateLimiterStore)",
            f"GCRA: <= {ACC_BURST} + {ACC_RATE:g} t",
            lambda t: ACC_BURST + ACC_RATE * t,
            seconds,
            is_buttress=True,
        )
    else:
        run = Accuracy(
            "limits MovingWindowRateLimiter (RedisStorage)",
            f"sliding log: <= {ACC_RATE:g} per 1 s",
            lambda t: ACC_RATE * max(1, math.ceil(t - 1e-9)),
            seconds,
        )
    try:
        parts = _run_processes(kind, url, f"{prefix}acc-{kind}:", seconds)
    except Exception as exc:
        run.skipped = _describe(exc)
        return run
    admissions = sorted(a for part in parts for a in part)
    run.per_process = [len(part) for part in parts]
    run.admitted = len(admissions)
    if admissions:
        # a loaded machine may start the processes late: count from the first admission
        first = admissions[0][0]
        end = max(after for _, after in admissions)
        run.span = max(end - first, 0.0)
        run.allowed = run.bound(run.span)
    for width in ACC_WINDOWS:
        run.worst[width] = (_most_inside(admissions, width), run.bound(width))
    return run


# -- the report -----------------------------------------------------------------------------------


def _versions(client: Any) -> list[tuple[str, str]]:
    rows = [("Python", f"{platform.python_implementation()} {platform.python_version()}")]
    for name in ("buttress", "redis", "hiredis", "limits", "pyrate-limiter", "pybreaker"):
        try:
            rows.append((name if name != "redis" else "redis-py", metadata.version(name)))
        except metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    try:
        server = client.info("server")
        rows.append(("Redis server", f"{server.get('redis_version')} ({server.get('redis_mode')})"))
    except Exception as exc:
        rows.append(("Redis server", f"? ({_describe(exc)})"))
    return rows


def _parsers(client: Any) -> str:
    import redis.asyncio.connection as async_connection

    name = "?"
    pool = client.connection_pool
    with suppress(Exception):
        connection = pool.get_connection()
        try:
            name = type(connection._parser).__name__
        finally:
            pool.release(connection)
    return f"{name} (sync), {async_connection.DefaultParser.__name__} (asyncio)"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _table(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
    ]
    out = ["  " + "  ".join(h.ljust(widths[i]) for i, h in enumerate(head)).rstrip()]
    out.append("  " + "  ".join("-" * w for w in widths))
    out += ["  " + "  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    return "\n".join(out)


HEAD = ["case", "µs per call", "ratio to PING", "round trips per call", "target", "verdict"]
LOAD_HEAD = [
    "case",
    "callers",
    "ops/s",
    "vs 1 caller",
    "vs PING (same callers)",
    "round trips per op",
    "connections",
]
ACC_HEAD = ["limiter", "contract", "admitted (per process)", "bound over the run"] + [
    f"worst excess, {w * 1000:g} ms" if w < 1 else f"worst excess, {w:g} s" for w in ACC_WINDOWS
]


@dataclass
class RedisReport:
    quick: bool
    url: str
    skipped: str | None = None
    cases: list[Case] = field(default_factory=list)
    accuracy: list[Accuracy] = field(default_factory=list)
    versions: list[tuple[str, str]] = field(default_factory=list)
    parsers: str = ""
    repeats: int = 0
    calls: int = 0
    count_calls: int = 0
    script_us: float | None = None  # server time per limiter script call
    client_us: float | None = None  # buttress client-side cost per acquire (stub client)
    confirmed: list[str] = field(default_factory=list)  # quick-mode re-measured cases
    concurrency: list[Load] = field(default_factory=list)  # concurrent async callers
    seconds: float = 0.0

    # -- figures ------------------------------------------------------------------------------

    def baseline(self, face: str) -> Case | None:
        for case in self.cases:
            if case.kind == BASELINE and case.face == face and case.us is not None:
                return case
        return None

    def ratio(self, case: Case) -> float | None:
        base = self.baseline(case.face)
        if base is None or base.us is None or case.us is None or base.us <= 0:
            return None
        return case.us / base.us

    def verdict(self, case: Case) -> str:
        if case.skipped is not None:
            return f"skipped: {case.skipped}"
        if case.kind != BUTTRESS:
            return "-"
        misses = []
        ratio = self.ratio(case)
        if case.ratio_limit is not None and (ratio is None or ratio > case.ratio_limit):
            misses.append("time")
        if case.trips_ok() is False:
            misses.append("round trips")
        return "MISS (" + ", ".join(misses) + ")" if misses else "ok"

    def _rows(self) -> list[list[str]]:
        rows = []
        for case in self.cases:
            ratio = self.ratio(case)
            trips = "-" if case.round_trips is None else f"{case.round_trips:g}"
            rows.append(
                [
                    case.label,
                    _us(case.us),
                    "-" if ratio is None else f"{ratio:.2f}x",
                    trips,
                    case.target(),
                    self.verdict(case),
                ]
            )
        return rows

    def _acc_rows(self) -> list[list[str]]:
        rows = []
        for run in self.accuracy:
            if run.skipped is not None:
                rows.append([run.label, run.contract, f"skipped: {run.skipped}", "", "", "", ""])
                continue
            parts = " + ".join(str(n) for n in run.per_process)
            share = run.admitted / run.allowed if run.allowed else 0.0
            cells = [
                run.label,
                run.contract,
                f"{run.admitted} ({parts})",
                f"{run.allowed:.0f} in {run.span:.2f} s ({share:.0%} used)",
            ]
            for width in ACC_WINDOWS:
                most, bound = run.worst[width]
                excess = run.excess(width)
                cells.append(f"{excess:+.0f} ({most} vs {math.floor(bound + 1e-9)})")
            rows.append(cells)
        return rows

    def _load_rows(self) -> list[list[str]]:
        rows = []
        for load in self.concurrency:
            if load.skipped is not None:
                rows.append([load.label, str(load.callers), f"skipped: {load.skipped}"] + [""] * 5)
                continue
            one = _load(self.concurrency, load.label, CONCURRENCY[0])
            ping = _load(self.concurrency, "PING", load.callers)
            scale = (
                "-"
                if one is None or not one.ops or load.ops is None
                else f"{load.ops / one.ops:.2f}x"
            )
            vs_ping = (
                "-"
                if ping is None or not ping.ops or load.ops is None
                else f"{load.ops / ping.ops:.2f}x"
            )
            trips = "-" if load.round_trips is None else f"{load.round_trips:.3f}"
            if load.calls_per_op is not None:
                trips += f" ({load.calls_per_op:.3f} script calls)"
            rows.append(
                [
                    load.label,
                    str(load.callers),
                    "-" if load.ops is None else f"{load.ops:,.0f}",
                    scale,
                    vs_ping,
                    trips,
                    "-" if load.connections is None else str(load.connections),
                ]
            )
        return rows

    def scaling_series(self) -> list[Any]:
        """The concurrency figures for the scaling section's "redis" chart: ops/s against
        concurrent async callers, PING as the floor."""
        from .scaling import Series

        out = []
        for label in dict.fromkeys(x.label for x in self.concurrency):
            points = [x for x in self.concurrency if x.label == label and x.ops is not None]
            if not points:
                continue
            role = "floor" if points[0].kind == BASELINE else "buttress"
            out.append(
                Series(
                    "redis",
                    label
                    if label != "PING"
                    else "PING (redis-py asyncio, a connection per caller)",
                    role,
                    [float(x.callers) for x in points],
                    [float(x.ops or 0.0) for x in points],
                )
            )
        return out

    def _series(self) -> list[str]:
        """The chart's data, one line per case (for the scaling page)."""
        out = []
        for label in dict.fromkeys(x.label for x in self.concurrency):
            points = [
                f"{x.callers}: {x.ops:.0f}"
                for x in self.concurrency
                if x.label == label and x.ops is not None
            ]
            out.append(f"{label} {{{', '.join(points)}}}")
        return out

    def _commands(self) -> list[str]:
        return [
            f"{case.label}: {case.commands}" + (f" ({case.note})" if case.note else "")
            for case in self.cases
            if case.skipped is None
        ]

    # -- the protocol -----------------------------------------------------------------------------

    def console(self) -> str:
        if self.skipped is not None:
            return f"{TITLE}: skipped: {self.skipped}"
        lines = [
            f"{TITLE} ({'quick' if self.quick else 'full'}; {self.url}; parser {self.parsers}; "
            f"median call, median of {self.repeats} repeats x {self.calls} calls)",
            _table(HEAD, self._rows(), markdown=False),
            "  commands per call:",
            *(f"    {line}" for line in self._commands()),
        ]
        if self.script_us is not None:
            lines.append(
                "  server time per limiter script call (INFO commandstats): "
                f"{self.script_us:.1f} µs"
            )
        if self.client_us is not None:
            lines.append(
                f"  buttress client-side cost per acquire (stub client): {self.client_us:.1f} µs"
            )
        if self.confirmed:
            lines.append(
                "  re-measured (above twice the target at first): " + ", ".join(self.confirmed)
            )
        if self.concurrency:
            lines.append(
                f"\n{TITLE}: concurrent asyncio callers of one primitive (ops/s, median of "
                f"{len(self.concurrency[0].samples)} interleaved runs)"
            )
            lines.append(_table(LOAD_HEAD, self._load_rows(), markdown=False))
            lines.append("  series (ops/s by callers): " + "; ".join(self._series()))
        if self.accuracy:
            lines.append(
                f"\n{TITLE}: accuracy, {PROCESSES} processes sharing one limiter "
                f"({ACC_RATE:g}/s, burst {ACC_BURST})"
            )
            lines.append(_table(ACC_HEAD, self._acc_rows(), markdown=False))
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in self.versions))
        return "\n".join(lines)

    def markdown(self) -> str:
        if self.skipped is not None:
            return f"## {TITLE}\n\nskipped: {self.skipped}\n"
        versions = ", ".join(f"{name} {version}" for name, version in self.versions)
        script = self._where_the_time_goes()
        accuracy = ""
        if self.accuracy:
            seconds = self.accuracy[0].seconds
            accuracy = f"""

### Accuracy across processes

{PROCESSES} OS processes (multiprocessing, spawn) share one limiter of {ACC_RATE:g} per second,
burst {ACC_BURST}, for {seconds:g} s; each asks again as soon as the server says a slot is
free (buttress: `RateLimited.retry_after`; limits: `get_window_stats().reset_time`), so
demand is always above the rate. Each admission is the (before, after) wall-clock
interval of its call; a window of each width is tried at every admission, and counts
only admissions whose whole interval lies inside it. *Worst excess* is the most
admissions in such a window minus the contract's bound for it (at most 0: the contract
held); *bound over the run* is what the contract allows from the first admission to
the last.

{_table(ACC_HEAD, self._acc_rows(), markdown=True)}
"""
        concurrency = ""
        if self.concurrency:
            shown = ", ".join(
                f"{'limiter' if label == LIMITER_ASYNC else 'bulkhead'} "
                + ("?" if (x := _speedup(self.concurrency, label)) is None else f"{x:.2f}x")
                for label in SPEEDUP_GUARDED
            )
            concurrency = f"""

### Concurrent async callers

One primitive, {", ".join(str(n) for n in CONCURRENCY)} asyncio tasks calling it in a loop;
each figure is the median ops/s of interleaved runs, *round trips per op* are counted in
a separate pass (requests written to a socket: a pipeline is one) and *connections* are
those the client's pool holds once that many callers have run. `PING` uses a plain
redis-py asyncio client, which opens one connection per caller in flight; buttress's
stores pipeline automatically (one round trip in flight per event loop, the callers
arriving meanwhile share the next one). Targets: the limiter and the bulkhead call at
{CONCURRENCY[-1]} callers at least {SPEEDUP_TARGET:g}x their 1-caller figure (this run:
{shown}), at most {CONNECTIONS_TARGET} connections per store; the bulkhead call one round
trip (its release is posted, never waited for: the releases posted to one pipeline go out
as one command, and the loop's own acquires need not carry them). The batch case takes
up to {BATCH} units per round trip (limiter of {BATCH_RATE:,} per second) and spends them
locally; its round trips per acquire are the figure to read.

{_table(LOAD_HEAD, self._load_rows(), markdown=True)}

Series (ops/s by callers): {"; ".join(self._series())}.
"""
        rows = "\n".join(f"- {line}" for line in self._commands())
        return f"""## {TITLE}

What a decision shared through Redis costs, next to a bare `PING` on the same
connection, and what peer libraries pay for the same job. Reproduce with
`python -m benchmarks --only {SECTION}` (add `--quick` for the short run); Redis at
`{URL_ENV}` or `{DEFAULT_URL}`.

Versions: {versions}. Parser: {self.parsers}. Machine: {_machine()}, shared with other
work while measuring; client and server compete for the same cores, so absolute figures
are noisy and the ratios to `PING` in the same run are what to read.

**How:** one process, one call at a time. The buttress limiter's store is built from
the URL; `PING` goes over that store's own client (same options: {_options_text()}),
and the other buttress stores, pyrate-limiter and pybreaker are given that client, so
they share its connection; `limits` builds its own client from the URL. Limits are set
so that no call is ever refused or delayed ({NEVER_LIMITED:,} per second). The cases
are interleaved, each call is timed alone, and a figure is the median over
{self.repeats} repeats of the median of {self.calls} calls. *Round trips per call* are
counted in a separate pass of {self.count_calls} calls by wrapping redis-py's
`send_packed_command` (one request written and waited for: a pipeline or a
`MULTI`/`EXEC` block is one), not with `INFO commandstats`, which also counts the
commands a script runs on the server. Targets: the limiter's `acquire` at most
{LIMITER_TARGET:g}x `PING` and exactly one round trip; the breaker's closed-state call at
most one round trip, none with `max_staleness`; the bulkhead one round trip to
acquire, none waited for to release (sync: the lease thread sends it; async: it is
posted to the next pipeline).

{_table(HEAD, self._rows(), markdown=True)}

Commands per call:

{rows}{script}{concurrency}{accuracy}"""

    def _case(self, label: str) -> Case | None:
        return next((c for c in self.cases if c.label == label and c.us is not None), None)

    def _where_the_time_goes(self) -> str:
        base, floor = self.baseline("sync"), self._case(FLOOR_LABEL)
        limiter = self._case(LIMITER_LABEL)
        if base is None or floor is None or limiter is None:
            return ""
        assert base.us is not None
        assert floor.us is not None
        assert limiter.us is not None
        parts = [
            f"\n\n**Where the limiter's time goes** (sync, this run): it takes "
            f"{limiter.us - base.us:.1f} µs more than a `PING`. An `EVALSHA` of a script that "
            f"only returns, with the same key and argument count, already takes "
            f"{floor.us - base.us:.1f} µs more ({floor.us / base.us:.2f}x `PING`): entering Lua "
            "and the longer request."
        ]
        if self.script_us is not None:
            parts.append(
                f" The limiter's script runs for {self.script_us:.1f} µs on the server per "
                "call (`INFO commandstats`, `cmdstat_evalsha`; a `PING` takes well under "
                "1 µs there): `TIME`, `GET`, `SET ... PX` and the arithmetic."
            )
        if self.client_us is not None:
            parts.append(
                f" On the client, buttress's own code around the round trip costs "
                f"{self.client_us:.1f} µs per `acquire()` (measured against a stub client "
                "that answers at once)."
            )
        return "".join(parts)

    def failures(self, factor: float) -> list[str]:
        if self.skipped is not None:
            return []
        out = []
        for case in self.cases:
            if case.kind != BUTTRESS or not case.guarded:
                continue
            if case.skipped is not None:
                out.append(f"{TITLE}: {case.label} could not be measured ({case.skipped})")
                continue
            ratio = self.ratio(case)
            if case.ratio_limit is not None and (
                ratio is None or ratio > factor * case.ratio_limit
            ):
                shown = "?" if ratio is None else f"{ratio:.2f}x"
                out.append(
                    f"{TITLE}: {case.label} takes {shown} PING, target <= "
                    f"{case.ratio_limit:g}x (failing above {factor * case.ratio_limit:.2f}x)"
                )
            if case.trips_ok() is False:
                out.append(
                    f"{TITLE}: {case.label} makes {case.round_trips:g} round trips per call, "
                    f"target {case.target()}"
                )
        if self.concurrency:
            for label in SPEEDUP_GUARDED:
                speedup = _speedup(self.concurrency, label)
                if speedup is None:
                    out.append(f"{TITLE}: {label} under concurrency could not be measured")
                elif speedup < SPEEDUP_TARGET / (RATIO_SLACK if factor > 1 else 1.0):
                    # The quick guard allows RATIO_SLACK on this in-run ratio (a slow or
                    # busy client CPU caps 64 callers first); the full run holds 3x.
                    out.append(
                        f"{TITLE}: {label} at {CONCURRENCY[-1]} callers makes {speedup:.2f}x "
                        f"its 1-caller ops/s, target >= {SPEEDUP_TARGET:g}x"
                    )
            for load in self.concurrency:
                if load.kind != BUTTRESS or load.callers != CONCURRENCY[-1]:
                    continue
                if load.connections is not None and load.connections > CONNECTIONS_TARGET:
                    out.append(
                        f"{TITLE}: {load.label} holds {load.connections} connections at "
                        f"{load.callers} callers, target <= {CONNECTIONS_TARGET}"
                    )
        for run in self.accuracy:
            if not run.is_buttress or run.skipped is not None:
                continue
            for width in ACC_WINDOWS:
                excess = run.excess(width)
                if excess is not None and excess > 0:
                    out.append(
                        f"{TITLE}: {PROCESSES} processes admitted {excess:+.0f} over the GCRA "
                        f"bound in a {width:g} s window"
                    )
        return out

    def charts(self, directory: Path) -> list[Path]:
        if self.skipped is not None:
            return []
        cases = [c for c in self.cases if c.us is not None]
        if not cases:
            return []
        from .charts import pyplot

        plt = pyplot()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{SECTION}.png"
        colors = {BASELINE: "#9e9e9e", FLOOR: "#c7c7c7", BUTTRESS: "#1f77b4", PEER: "#ff7f0e"}
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(cases) + 1.8))
        labels = [
            f"{c.label}{' [async]' if c.face == 'async' and 'async' not in c.label else ''}"
            for c in cases
        ]
        values = [c.us or 0.0 for c in cases]
        positions = list(range(len(cases)))[::-1]
        ax.barh(positions, values, color=[colors[c.kind] for c in cases])
        ax.set_yticks(positions, labels, fontsize=8)
        top = max(values)
        for y, case in zip(positions, cases, strict=True):
            trips = "?" if case.round_trips is None else f"{case.round_trips:g}"
            ax.text(
                (case.us or 0.0) + top * 0.01,
                y,
                f"{case.us:,.1f} µs, {trips} RT",
                va="center",
                fontsize=7,
            )
        for face, style in (("sync", "--"), ("async", ":")):
            base = self.baseline(face)
            if base is not None and base.us is not None:
                ax.axvline(
                    base.us,
                    color="black",
                    linestyle=style,
                    linewidth=1,
                    label=f"{face} PING {base.us:.1f} µs",
                )
        ax.set_xlim(0, top * 1.3)
        ax.set_xlabel("µs per call (median; RT = round trips per call)")
        ax.set_title("Redis backends: cost per call on one local connection")
        ax.legend(loc="upper right", fontsize=7)
        ax.grid(axis="x", alpha=0.3)
        footer = ", ".join(f"{k} {v}" for k, v in self.versions) + f"; {_machine()}"
        fig.text(0.99, 0.005, footer, ha="right", va="bottom", fontsize=6, color="#666666")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths = [path]
        if any(x.ops is not None for x in self.concurrency):
            paths.append(self._concurrency_chart(plt, directory))
        return paths

    def _concurrency_chart(self, plt: Any, directory: Path) -> Path:
        """ops/s against concurrent asyncio callers, one line per case."""
        path = directory / f"{SECTION}_concurrency.png"
        fig, ax = plt.subplots(figsize=(8, 4.5))
        styles = {BASELINE: ("black", "--"), BUTTRESS: (None, "-")}
        for label in dict.fromkeys(x.label for x in self.concurrency):
            points = [x for x in self.concurrency if x.label == label and x.ops is not None]
            if not points:
                continue
            color, style = styles.get(points[0].kind, (None, "-"))
            ax.plot(
                [x.callers for x in points],
                [x.ops for x in points],
                marker="o",
                linestyle=style,
                color=color,
                label=label,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(CONCURRENCY), [str(n) for n in CONCURRENCY])
        ax.set_yscale("log")
        ax.set_xlabel("concurrent asyncio callers of one primitive")
        ax.set_ylabel("ops/s (median, log scale)")
        ax.set_title("Redis backends: throughput against concurrent callers")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        footer = ", ".join(f"{k} {v}" for k, v in self.versions) + f"; {_machine()}"
        fig.text(0.99, 0.005, footer, ha="right", va="bottom", fontsize=6, color="#666666")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _machine() -> str:
    return f"{os.cpu_count()} logical CPUs ({platform.machine()}, {platform.system()})"


def _options_text() -> str:
    return "`socket_timeout=0.5`, `socket_connect_timeout=0.5`, no client-side retries"


# -- entry point ---------------------------------------------------------------------------------


def _reachable(url: str) -> str | None:
    try:
        import redis
    except ImportError:
        return "redis-py is not installed (pip install 'buttress[redis]')"
    try:
        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"Redis at {url} is not reachable ({_describe(exc)})"
    return None


def measure(quick: bool) -> RedisReport:
    started = time.monotonic()
    url = redis_url()
    report = RedisReport(quick=quick, url=url)
    report.skipped = _reachable(url)
    if report.skipped is not None:
        return report
    from buttress.testing import isolated_registry

    report.repeats, report.calls, report.count_calls = (5, 150, 50) if quick else (11, 1000, 200)
    prefix = f"buttress-bench:{uuid.uuid4().hex[:12]}:"
    with isolated_registry():
        setup = _Setup(url, prefix)
        try:
            report.versions = _versions(setup.client)
            report.parsers = _parsers(setup.client)
            sync_cases = _sync_cases(setup)
            _measure_sync(sync_cases, report.repeats, report.calls, report.count_calls)
            suspects = _suspects(sync_cases)
            if quick and suspects:  # one noisy repeat must not fail the build
                _timed_sync([sync_cases[0], *suspects], 9, 300)
                report.confirmed += [c.label for c in suspects]
            async_cases = _async_cases(setup)

            async def run_async() -> None:
                try:
                    await _measure_async(
                        async_cases, report.repeats, report.calls, report.count_calls
                    )
                    suspects = _suspects(async_cases)
                    if quick and suspects:
                        await _timed_async([async_cases[0], *suspects], 9, 300)
                        report.confirmed += [c.label for c in suspects]
                    report.concurrency = await _concurrency(url, prefix, quick)
                finally:
                    await setup.limiter_store.aclose()
                    for store in setup.async_stores:
                        await store.aclose()
                        store.close()

            if setup.limiter is not None:
                asyncio.run(run_async())
            else:
                for case in async_cases:
                    case.skipped = "the sync limiter could not be built"
            report.cases = sync_cases + async_cases
            if setup.limiter is not None:
                report.script_us = _script_time(setup, 100 if quick else 400)
            report.client_us = _client_cost(5_000 if quick else 20_000)
        finally:
            setup.close()
    seconds = 1.0 if quick else 3.0
    report.accuracy = [_accuracy("buttress", url, prefix, seconds)]
    if not quick:
        report.accuracy.append(_accuracy("limits", url, prefix, seconds))
    _delete_prefix(url, prefix)
    report.seconds = time.monotonic() - started
    return report


def _delete_prefix(url: str, prefix: str) -> None:
    with suppress(Exception):
        import redis

        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


if __name__ == "__main__":
    import sys

    result = measure("--full" not in sys.argv)
    print(result.console())
    print(f"\n{result.seconds:.1f} s")
    for line in result.failures(1.0):
        print("MISS:", line)
