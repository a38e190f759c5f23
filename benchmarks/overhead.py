"""Happy-path overhead: buttress, hand-written floors and peer libraries, per primitive.

Every candidate wraps the same trivial function (``work(x) -> x``, or its async
twin) and is called with one positional argument. "Happy path" means: no failure,
no waiting. Limiters get a huge rate and burst so they never wait; breakers stay
closed; bulkheads are never full.

Floors are the least code that does the job (no thread safety beyond what the
job needs, no events, no state views); they show how close to the minimum a
full-featured implementation gets.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
from collections.abc import Callable
from typing import Any

import buttress

from ._harness import ALT, BARE, BUTTRESS, FLOOR, PART, PEER, STDLIB, Candidate, Group, Target

HUGE_RATE = 1e9  # admissions per second: the happy path never waits
HUGE_BURST = 1_000_000

Fn = Callable[..., Any]


def work(x: int) -> int:
    return x


async def awork(x: int) -> int:
    return x


class Unavailable(Exception):
    """Raised by a factory to skip a candidate with a reason."""


# -- floors: the least code that does each job ------------------------------------------------


def floor_retry(attempts: int, delay: float = 0.1) -> Callable[[Fn], Fn]:
    def decorate(fn: Fn) -> Fn:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(attempts):
                try:
                    return fn(*args, **kwargs)
                except Exception:
                    if attempt == attempts - 1:
                        raise
                    if delay > 0:
                        time.sleep(delay)
            return None

        return wrapper

    return decorate


def floor_retry_async(attempts: int, delay: float = 0.1) -> Callable[[Fn], Fn]:
    def decorate(fn: Fn) -> Fn:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(attempts):
                try:
                    return await fn(*args, **kwargs)
                except Exception:
                    if attempt == attempts - 1:
                        raise
                    if delay > 0:
                        await asyncio.sleep(delay)
            return None

        return wrapper

    return decorate


class FloorOpen(Exception):
    pass


class FloorBreaker:
    """Consecutive-failure breaker: one attribute check and one store per success."""

    def __init__(self, threshold: int = 5, reset_timeout: float = 30.0) -> None:
        self.threshold = threshold
        self.reset_timeout = reset_timeout
        self.failures = 0
        self.opened_at: float | None = None

    def _allow(self) -> None:
        opened = self.opened_at
        if opened is not None and time.monotonic() - opened < self.reset_timeout:
            raise FloorOpen

    def _failed(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.opened_at = time.monotonic()

    def __call__(self, fn: Fn) -> Fn:
        if asyncio.iscoroutinefunction(fn):

            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                if self.opened_at is not None:
                    self._allow()
                try:
                    result = await fn(*args, **kwargs)
                except Exception:
                    self._failed()
                    raise
                self.failures = 0
                return result

            return awrapper

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.opened_at is not None:
                self._allow()
            try:
                result = fn(*args, **kwargs)
            except Exception:
                self._failed()
                raise
            self.failures = 0
            return result

        return wrapper


class FloorFull(Exception):
    pass


def floor_bulkhead(limit: int, held: int = 0) -> Callable[[Fn], Fn]:
    """A lock and a counter (thread-safe, reject when full, no queue); ``held`` slots
    start taken (a full bulkhead, for the rejection groups)."""
    lock = threading.Lock()
    state = [held]

    def decorate(fn: Fn) -> Fn:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with lock:
                if state[0] >= limit:
                    raise FloorFull
                state[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    state[0] -= 1

        return wrapper

    return decorate


def floor_bulkhead_async(limit: int) -> Callable[[Fn], Fn]:
    """A bare counter: enough on one event loop (no thread safety, no queue)."""
    state = [0]

    def decorate(fn: Fn) -> Fn:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if state[0] >= limit:
                raise FloorFull
            state[0] += 1
            try:
                return await fn(*args, **kwargs)
            finally:
                state[0] -= 1

        return wrapper

    return decorate


class FloorLimited(Exception):
    pass


def floor_gcra(rate: float, burst: int) -> Callable[[Fn], Fn]:
    """GCRA under a lock, rejecting instead of waiting."""
    interval = 1.0 / rate
    tolerance = burst * interval
    lock = threading.Lock()
    tat = [0.0]
    now_fn = time.monotonic

    def admit() -> None:
        now = now_fn()
        with lock:
            new = (tat[0] if tat[0] > now else now) + interval
            if new - now > tolerance:
                raise FloorLimited
            tat[0] = new

    def decorate(fn: Fn) -> Fn:
        if asyncio.iscoroutinefunction(fn):

            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                admit()
                return await fn(*args, **kwargs)

            return awrapper

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            admit()
            return fn(*args, **kwargs)

        return wrapper

    return decorate


def floor_timeout(seconds: float) -> Callable[[Fn], Fn]:
    """A timer that cancels the task, cancelled on the way out (no deadline, no uncancel)."""

    def decorate(fn: Fn) -> Fn:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            task = asyncio.current_task()
            assert task is not None
            handle = asyncio.get_running_loop().call_later(seconds, task.cancel)
            try:
                return await fn(*args, **kwargs)
            finally:
                handle.cancel()

        return wrapper

    return decorate


# -- buttress ---------------------------------------------------------------------------------


def b_retry() -> buttress.Retry:
    return buttress.retry(3)


def b_breaker() -> buttress.CircuitBreaker:
    return buttress.CircuitBreaker(failure_threshold=5)


def b_bulkhead() -> buttress.Bulkhead:
    return buttress.Bulkhead(max_concurrent=10)


def b_limiter() -> buttress.RateLimiter:
    return buttress.RateLimiter(rate=HUGE_RATE, per=1.0, burst=HUGE_BURST)


def b_timeout() -> buttress.Timeout:
    return buttress.timeout(10)


def _limiter_acquire_sync() -> Fn:
    lim = b_limiter()
    acquire = lim.acquire

    def wrapper(x: int) -> int:
        acquire()
        return work(x)

    return wrapper


def _limiter_acquire_async() -> Fn:
    lim = b_limiter()
    acquire = lim.acquire_async

    async def wrapper(x: int) -> int:
        await acquire()
        return await awork(x)

    return wrapper


# -- peers ------------------------------------------------------------------------------------


def _tenacity(fn: Fn) -> Fn:
    import tenacity

    return tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_random_exponential(multiplier=0.1, max=10),
        reraise=True,
    )(fn)


def _stamina(fn: Fn) -> Fn:
    import stamina

    return stamina.retry(on=Exception, attempts=3)(fn)


def _backoff(fn: Fn) -> Fn:
    import backoff

    return backoff.on_exception(backoff.expo, Exception, max_tries=3)(fn)


def _hyx_retry(fn: Fn) -> Fn:
    from hyx.retry import retry

    return retry(on=Exception, attempts=3, backoff=0.1)(fn)


def _pybreaker(fn: Fn) -> Fn:
    import pybreaker

    return pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)(fn)


def _pybreaker_async() -> Fn:
    raise Unavailable("pybreaker runs coroutines only through Tornado (call_async)")


def _circuitbreaker(fn: Fn) -> Fn:
    from circuitbreaker import CircuitBreaker

    return CircuitBreaker(failure_threshold=5, recovery_timeout=30)(fn)


def _aiobreaker(fn: Fn) -> Fn:
    from aiobreaker import CircuitBreaker

    return CircuitBreaker(fail_max=5, timeout_duration=datetime.timedelta(seconds=30))(fn)


def _purgatory(fn: Fn) -> Fn:
    """purgatory (in-memory unit of work): one factory, one named breaker."""
    import purgatory

    if asyncio.iscoroutinefunction(fn):
        factory: Any = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
    else:
        factory = purgatory.SyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
    return factory("bench")(fn)  # type: ignore[no-any-return]


def _hyx_breaker(fn: Fn) -> Fn:
    from hyx.circuitbreaker import consecutive_breaker

    return consecutive_breaker(failure_threshold=5, recovery_time_secs=30)(fn)


class _LimitsPeer:
    """limits (memory storage): a wrapper that calls ``hit`` and rejects on False."""

    def __init__(self, strategy_name: str, is_async: bool) -> None:
        from limits import RateLimitItemPerSecond

        if is_async:
            from limits.aio import storage, strategies
        else:
            from limits import storage, strategies  # type: ignore[no-redef]
        self.item = RateLimitItemPerSecond(int(HUGE_RATE))
        self.storage = storage.MemoryStorage()
        self.strategy = getattr(strategies, strategy_name)(self.storage)
        self.is_async = is_async

    def clear(self) -> None:
        # Keep a moving window's log at <= 1,000 entries (one segment), the population
        # of a 1,000/s limiter; otherwise it would hold every call of the run.
        if self.is_async:
            self.storage.events.clear()
        else:
            self.strategy.clear(self.item, "bench")

    def wrap(self, fn: Fn) -> Fn:
        hit, item = self.strategy.hit, self.item
        if self.is_async:

            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                if not await hit(item, "bench"):
                    raise FloorLimited
                return await fn(*args, **kwargs)

            return awrapper

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not hit(item, "bench"):
                raise FloorLimited
            return fn(*args, **kwargs)

        return wrapper


def _limits_candidate(strategy_name: str, is_async: bool, label: str) -> Candidate:
    holder: dict[str, _LimitsPeer] = {}

    def factory() -> Fn:
        peer = holder["peer"] = _LimitsPeer(strategy_name, is_async)
        return peer.wrap(awork if is_async else work)

    def between() -> None:
        holder["peer"].clear()

    moving = strategy_name.startswith("Moving")
    return Candidate(
        label,
        PEER,
        factory,
        library="limits",
        between=between if moving else None,
        note="log cleared every 1,000 calls" if moving else "",
    )


def _pyrate(fn: Fn, algorithm: str) -> Fn:
    from pyrate_limiter import Duration, Limiter, Rate, StateBucket

    rates = [Rate(int(HUGE_RATE), Duration.SECOND)]
    limiter = Limiter(StateBucket(rates)) if algorithm == "gcra" else Limiter(rates)
    return limiter.as_decorator(name="bench")(fn)


def _aiolimiter(fn: Fn) -> Fn:
    from aiolimiter import AsyncLimiter

    limiter = AsyncLimiter(HUGE_RATE, 1.0)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        async with limiter:
            return await fn(*args, **kwargs)

    return wrapper


def _hyx_tokenbucket(fn: Fn) -> Fn:
    from hyx.ratelimit import tokenbucket

    return tokenbucket(HUGE_RATE, 1.0, bucket_size=HUGE_RATE)(fn)


def _bounded_semaphore(fn: Fn) -> Fn:
    sem = threading.BoundedSemaphore(10)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with sem:
            return fn(*args, **kwargs)

    return wrapper


def _asyncio_semaphore(fn: Fn) -> Fn:
    sem = asyncio.Semaphore(10)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        async with sem:
            return await fn(*args, **kwargs)

    return wrapper


def _hyx_bulkhead(fn: Fn) -> Fn:
    from hyx.bulkhead import bulkhead

    return bulkhead(max_concurrency=10, max_capacity=10)(fn)


def _asyncio_timeout(fn: Fn) -> Fn:
    if not hasattr(asyncio, "timeout"):
        raise Unavailable("asyncio.timeout needs Python 3.11+")

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        async with asyncio.timeout(10):
            return await fn(*args, **kwargs)

    return wrapper


def _asyncio_wait_for(fn: Fn) -> Fn:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await asyncio.wait_for(fn(*args, **kwargs), 10)

    return wrapper


def _hyx_timeout(fn: Fn) -> Fn:
    from hyx.timeout import timeout

    return timeout(10)(fn)


# -- rejections and failures -------------------------------------------------------------------
#
# What runs during an outage: an open breaker, a full bulkhead and a drained limiter refuse
# the call, and a retry sees every attempt fail. Each candidate catches the refusal (or the
# last error) and returns its argument, so ``fn(1)`` is still 1; the floors pay for the same
# catch. Rejections happen before the protected function runs, so it is ``work`` throughout.

NEVER = 3600.0  # seconds: a breaker stays open and a limiter drained for the whole run


class Boom(Exception):
    """The failure of the retry groups (a new instance per attempt, as in real code)."""


def fail(x: int) -> int:
    raise Boom


def ignore(event: object) -> None:
    """The cheapest listener: what attaching one costs is the event itself."""


def _caught(fn: Fn, errors: type[BaseException] | tuple[type[BaseException], ...]) -> Fn:
    def call(x: int) -> Any:
        try:
            return fn(x)
        except errors:
            return x

    return call


def _listeners(heard: bool) -> list[Callable[[Any], None]] | None:
    return [ignore] if heard else None


def b_open_breaker(heard: bool = False) -> Fn:
    breaker = buttress.CircuitBreaker(
        failure_threshold=1, reset_timeout=NEVER, listeners=_listeners(heard)
    )
    _caught(breaker(fail), Boom)(1)  # one failure opens it
    assert breaker.state == "open"
    return _caught(breaker(work), buttress.CircuitOpenError)


def floor_open_breaker() -> Fn:
    breaker = FloorBreaker(threshold=1, reset_timeout=NEVER)
    _caught(breaker(fail), Boom)(1)
    return _caught(breaker(work), FloorOpen)


def _pybreaker_open() -> Fn:
    import pybreaker

    breaker = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=NEVER)
    _caught(breaker(fail), (Boom, pybreaker.CircuitBreakerError))(1)
    return _caught(breaker(work), pybreaker.CircuitBreakerError)


def b_full_bulkhead(heard: bool = False) -> Fn:
    bulkhead = buttress.Bulkhead(max_concurrent=1, listeners=_listeners(heard))
    held = bulkhead.acquire()  # the one slot, kept for the whole run
    call = _caught(bulkhead(work), buttress.BulkheadFull)
    call.held = held  # type: ignore[attr-defined]
    return call


def b_drained_limiter(heard: bool = False) -> Fn:
    limiter = buttress.RateLimiter(rate=1, per=NEVER, max_wait=0, listeners=_listeners(heard))
    limiter.try_acquire()  # the only permit of the hour
    return _caught(limiter(work), buttress.RateLimited)


def floor_drained_limiter() -> Fn:
    call = _caught(floor_gcra(1 / NEVER, 1)(work), FloorLimited)
    call(1)  # the only admission of the hour (or already refused: float rounding)
    return call


def _limits_drained() -> Fn:
    from limits import RateLimitItemPerHour, storage, strategies

    item = RateLimitItemPerHour(1)
    hit = strategies.FixedWindowRateLimiter(storage.MemoryStorage()).hit
    hit(item, "bench")  # the only admission of the hour

    def limited(x: int) -> int:
        if not hit(item, "bench"):
            raise FloorLimited
        return work(x)

    return _caught(limited, FloorLimited)


def b_failing_retry(heard: bool = False) -> Fn:
    return _caught(buttress.retry(3, backoff=[0.0], listeners=_listeners(heard))(fail), Boom)


def _tenacity_failing() -> Fn:
    import tenacity

    policy = tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_none(),
        sleep=_no_zero_sleep,
        reraise=True,
    )
    return _caught(policy(fail), Boom)


def _no_zero_sleep(seconds: float) -> None:
    # As buttress and the floor do: a zero wait is no syscall (time.sleep(0) yields the
    # CPU, which costs hundreds of microseconds on a busy machine and measures nothing).
    if seconds > 0:
        time.sleep(seconds)


NO_LISTENER = "buttress, no listener"


def rejection_groups() -> list[Group]:
    """Rejections (2x the floor at most) and what one listener adds to them."""
    caught = "catches the refusal"
    return [
        Group(
            "rejection_breaker",
            "open-breaker rejection (sync)",
            False,
            [
                _bare(False),
                _c("buttress.CircuitBreaker, open", BUTTRESS, b_open_breaker, "buttress"),
                _c("floor: open check", FLOOR, floor_open_breaker, note=caught),
                _c("pybreaker, open", PEER, _pybreaker_open, "pybreaker"),
            ],
            Target("ratio", 2.0, "floor: open check"),
        ),
        Group(
            "rejection_bulkhead",
            "full-bulkhead rejection (sync)",
            False,
            [
                _bare(False),
                _c("buttress.Bulkhead, full", BUTTRESS, b_full_bulkhead, "buttress"),
                _c(
                    "floor: lock + counter",
                    FLOOR,
                    lambda: _caught(floor_bulkhead(1, held=1)(work), FloorFull),
                    note=caught,
                ),
            ],
            Target("ratio", 2.0, "floor: lock + counter"),
        ),
        Group(
            "rejection_limiter",
            "rate-limited rejection (sync)",
            False,
            [
                _bare(False),
                _c("buttress.RateLimiter, drained", BUTTRESS, b_drained_limiter, "buttress"),
                _c("floor: GCRA under a lock", FLOOR, floor_drained_limiter, note=caught),
                _c("limits FixedWindow (memory)", PEER, _limits_drained, "limits"),
            ],
            Target("ratio", 2.0, "floor: GCRA under a lock"),
        ),
        Group(
            "rejection_retry",
            "retry failing 3 times, zero backoff (sync)",
            False,
            [
                _bare(False),
                _c("buttress.retry(3, backoff=[0])", BUTTRESS, b_failing_retry, "buttress"),
                _c(
                    "floor: try/except loop",
                    FLOOR,
                    lambda: _caught(floor_retry(3, delay=0.0)(fail), Boom),
                    note="re-raises the last error",
                ),
                _c("tenacity", PEER, _tenacity_failing, "tenacity", "sleep= skips zero waits"),
            ],
            Target("ratio", 2.0, "floor: try/except loop"),
        ),
        Group(
            "rejection_breakerheard",
            "open-breaker rejection, one listener (sync)",
            False,
            [
                _bare(False),
                _c("buttress, one listener", BUTTRESS, lambda: b_open_breaker(True), "buttress"),
                _c(NO_LISTENER, ALT, b_open_breaker, "buttress"),
                _c("floor: open check", FLOOR, floor_open_breaker),
            ],
            Target("delta", 1000, NO_LISTENER),
            note="one CallRejected event per call",
        ),
        Group(
            "rejection_bulkheadheard",
            "full-bulkhead rejection, one listener (sync)",
            False,
            [
                _bare(False),
                _c("buttress, one listener", BUTTRESS, lambda: b_full_bulkhead(True), "buttress"),
                _c(NO_LISTENER, ALT, b_full_bulkhead, "buttress"),
            ],
            Target("delta", 1000, NO_LISTENER),
            note="one CallRejected event per call",
        ),
        Group(
            "rejection_limiterheard",
            "rate-limited rejection, one listener (sync)",
            False,
            [
                _bare(False),
                _c("buttress, one listener", BUTTRESS, lambda: b_drained_limiter(True), "buttress"),
                _c(NO_LISTENER, ALT, b_drained_limiter, "buttress"),
            ],
            Target("delta", 1000, NO_LISTENER),
            note="one CallRejected event per call",
        ),
        Group(
            "rejection_retryheard",
            "retry failing 3 times, one listener (sync)",
            False,
            [
                _bare(False),
                _c("buttress, one listener", BUTTRESS, lambda: b_failing_retry(True), "buttress"),
                _c(NO_LISTENER, ALT, b_failing_retry, "buttress"),
                _c(
                    "floor: try/except loop",
                    FLOOR,
                    lambda: _caught(floor_retry(3, delay=0.0)(fail), Boom),
                ),
            ],
            Target("delta", 3000, NO_LISTENER),
            note="three events per call (two RetryScheduled, one RetryGaveUp): 1 \u00b5s each",
        ),
    ]


# -- the groups -------------------------------------------------------------------------------


def _c(
    label: str, role: str, make: Callable[[], Fn], library: str | None = None, note: str = ""
) -> Candidate:
    return Candidate(label, role, make, library=library, note=note)


def _bare(is_async: bool) -> Candidate:
    return _c("bare call", BARE, lambda: awork if is_async else work)


def sync_groups() -> list[Group]:
    w = work
    return [
        Group(
            "retry_sync",
            "retry (sync)",
            False,
            [
                _bare(False),
                _c("buttress.retry(3)", BUTTRESS, lambda: b_retry()(w), "buttress"),
                _c("floor: try/except loop", FLOOR, lambda: floor_retry(3)(w)),
                _c("tenacity", PEER, lambda: _tenacity(w), "tenacity"),
                _c("stamina", PEER, lambda: _stamina(w), "stamina"),
                _c("backoff", PEER, lambda: _backoff(w), "backoff"),
            ],
            Target("ns", 400),
        ),
        Group(
            "breaker_sync",
            "circuit breaker (sync)",
            False,
            [
                _bare(False),
                _c("buttress.CircuitBreaker", BUTTRESS, lambda: b_breaker()(w), "buttress"),
                _c("floor: counter check", FLOOR, lambda: FloorBreaker()(w), note="no lock"),
                _c("pybreaker", PEER, lambda: _pybreaker(w), "pybreaker"),
                _c("circuitbreaker", PEER, lambda: _circuitbreaker(w), "circuitbreaker"),
                _c(
                    "purgatory",
                    PEER,
                    lambda: _purgatory(w),
                    "purgatory",
                    "looks the breaker up in its unit of work on every call",
                ),
            ],
            Target("ns", 250),
        ),
        Group(
            "limiter_sync",
            "rate limiter (sync)",
            False,
            [
                _bare(False),
                _c("buttress.RateLimiter", BUTTRESS, lambda: b_limiter()(w), "buttress"),
                _c("buttress limiter.acquire()", ALT, _limiter_acquire_sync, "buttress"),
                _c("floor: GCRA under a lock", FLOOR, lambda: floor_gcra(HUGE_RATE, HUGE_BURST)(w)),
                _limits_candidate("FixedWindowRateLimiter", False, "limits FixedWindow (memory)"),
                _limits_candidate("MovingWindowRateLimiter", False, "limits MovingWindow (memory)"),
                _c(
                    "pyrate-limiter (list bucket)",
                    PEER,
                    lambda: _pyrate(w, "log"),
                    "pyrate-limiter",
                ),
                _c(
                    "pyrate-limiter (GCRA bucket)",
                    PEER,
                    lambda: _pyrate(w, "gcra"),
                    "pyrate-limiter",
                ),
            ],
            Target("ns", 300),
        ),
        Group(
            "bulkhead_sync",
            "bulkhead (sync)",
            False,
            [
                _bare(False),
                _c("buttress.Bulkhead", BUTTRESS, lambda: b_bulkhead()(w), "buttress"),
                _c("floor: lock + counter", FLOOR, lambda: floor_bulkhead(10)(w)),
                _c("threading.BoundedSemaphore", STDLIB, lambda: _bounded_semaphore(w)),
            ],
            Target("ns", 450),
        ),
        Group(
            "timeout_sync",
            "timeout (sync: a propagated deadline)",
            False,
            [
                _bare(False),
                _c("buttress.timeout(10)", ALT, lambda: b_timeout()(w), "buttress"),
            ],
            None,
            note="no target; no peer offers a thread-safe sync deadline to compare with",
        ),
        Group(
            "pipeline_sync",
            "pipeline (sync): retry + breaker + bulkhead + limiter",
            False,
            [
                _bare(False),
                _c(
                    "buttress.pipeline(...)",
                    BUTTRESS,
                    lambda: buttress.pipeline(b_retry(), b_breaker(), b_bulkhead(), b_limiter())(w),
                    "buttress",
                ),
                _c(
                    "nested decorators",
                    ALT,
                    lambda: b_retry()(b_breaker()(b_bulkhead()(b_limiter()(w)))),
                    "buttress",
                ),
                _c("part: retry", PART, lambda: b_retry()(w)),
                _c("part: breaker", PART, lambda: b_breaker()(w)),
                _c("part: bulkhead", PART, lambda: b_bulkhead()(w)),
                _c("part: limiter", PART, lambda: b_limiter()(w)),
            ],
            Target("ratio", 1.1, "sum of parts"),
        ),
        *rejection_groups(),
    ]


def async_groups() -> list[Group]:
    w = awork
    return [
        Group(
            "retry_async",
            "retry (async)",
            True,
            [
                _bare(True),
                _c("buttress.retry(3)", BUTTRESS, lambda: b_retry()(w), "buttress"),
                _c("floor: try/except loop", FLOOR, lambda: floor_retry_async(3)(w)),
                _c("tenacity", PEER, lambda: _tenacity(w), "tenacity"),
                _c("stamina", PEER, lambda: _stamina(w), "stamina"),
                _c("backoff", PEER, lambda: _backoff(w), "backoff"),
                _c("hyx", PEER, lambda: _hyx_retry(w), "hyx"),
            ],
            Target("ns", 500),
        ),
        Group(
            "breaker_async",
            "circuit breaker (async)",
            True,
            [
                _bare(True),
                _c("buttress.CircuitBreaker", BUTTRESS, lambda: b_breaker()(w), "buttress"),
                _c("floor: counter check", FLOOR, lambda: FloorBreaker()(w), note="no lock"),
                _c("circuitbreaker", PEER, lambda: _circuitbreaker(w), "circuitbreaker"),
                _c("aiobreaker", PEER, lambda: _aiobreaker(w), "aiobreaker"),
                _c(
                    "purgatory",
                    PEER,
                    lambda: _purgatory(w),
                    "purgatory",
                    "looks the breaker up in its unit of work on every call",
                ),
                _c("hyx", PEER, lambda: _hyx_breaker(w), "hyx"),
                _c("pybreaker", PEER, _pybreaker_async, "pybreaker"),
            ],
            Target("ns", 300),
        ),
        Group(
            "limiter_async",
            "rate limiter (async)",
            True,
            [
                _bare(True),
                _c("buttress.RateLimiter", BUTTRESS, lambda: b_limiter()(w), "buttress"),
                _c("buttress await acquire_async()", ALT, _limiter_acquire_async, "buttress"),
                _c("floor: GCRA under a lock", FLOOR, lambda: floor_gcra(HUGE_RATE, HUGE_BURST)(w)),
                _c("aiolimiter", PEER, lambda: _aiolimiter(w), "aiolimiter"),
                _limits_candidate(
                    "FixedWindowRateLimiter", True, "limits.aio FixedWindow (memory)"
                ),
                _limits_candidate(
                    "MovingWindowRateLimiter", True, "limits.aio MovingWindow (memory)"
                ),
                _c(
                    "pyrate-limiter (list bucket)",
                    PEER,
                    lambda: _pyrate(w, "log"),
                    "pyrate-limiter",
                ),
                _c(
                    "pyrate-limiter (GCRA bucket)",
                    PEER,
                    lambda: _pyrate(w, "gcra"),
                    "pyrate-limiter",
                ),
                _c(
                    "hyx tokenbucket",
                    PEER,
                    lambda: _hyx_tokenbucket(w),
                    "hyx",
                    "no lock; reads the clock only when empty; rejects instead of waiting",
                ),
            ],
            Target("ns", 200),
        ),
        Group(
            "bulkhead_async",
            "bulkhead (async)",
            True,
            [
                _bare(True),
                _c("buttress.Bulkhead", BUTTRESS, lambda: b_bulkhead()(w), "buttress"),
                _c("floor: counter (one loop only)", FLOOR, lambda: floor_bulkhead_async(10)(w)),
                _c("asyncio.Semaphore", STDLIB, lambda: _asyncio_semaphore(w)),
                _c("hyx", PEER, lambda: _hyx_bulkhead(w), "hyx"),
            ],
            Target("ns", 450),
        ),
        Group(
            "timeout_async",
            "timeout (async)",
            True,
            [
                _bare(True),
                _c("buttress.timeout(10)", BUTTRESS, lambda: b_timeout()(w), "buttress"),
                _c("asyncio.timeout", STDLIB, lambda: _asyncio_timeout(w)),
                _c(
                    "asyncio.wait_for",
                    STDLIB,
                    lambda: _asyncio_wait_for(w),
                    note="runs the coroutine in a new task",
                ),
                _c("floor: call_later + cancel", FLOOR, lambda: floor_timeout(10)(w)),
                _c("hyx", PEER, lambda: _hyx_timeout(w), "hyx", "a new task and wait_for per call"),
            ],
            Target("ratio", 1.2, "asyncio.timeout"),
            note="most of any async timeout's cost is arming and cancelling an event-loop "
            "timer, as the floor shows",
        ),
        Group(
            "pipeline_async",
            "pipeline (async): timeout + retry + breaker + bulkhead + limiter",
            True,
            [
                _bare(True),
                _c(
                    "buttress.pipeline(...)",
                    BUTTRESS,
                    lambda: buttress.pipeline(
                        b_timeout(), b_retry(), b_breaker(), b_bulkhead(), b_limiter()
                    )(w),
                    "buttress",
                ),
                _c(
                    "nested decorators",
                    ALT,
                    lambda: b_timeout()(b_retry()(b_breaker()(b_bulkhead()(b_limiter()(w))))),
                    "buttress",
                ),
                _c("part: timeout", PART, lambda: b_timeout()(w)),
                _c("part: retry", PART, lambda: b_retry()(w)),
                _c("part: breaker", PART, lambda: b_breaker()(w)),
                _c("part: bulkhead", PART, lambda: b_bulkhead()(w)),
                _c("part: limiter", PART, lambda: b_limiter()(w)),
            ],
            Target("ratio", 1.1, "sum of parts"),
        ),
    ]
