"""Type-checked (mypy --strict), not run: decorators keep the signatures they wrap."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from typing_extensions import assert_type

import buttress
from buttress import CircuitBreaker, RateLimiter, fallback, pipeline, retry, timeout
from buttress.telemetry import Installation, measured, otel
from buttress.telemetry import logging as telemetry_logging


@retry(3)
def parse(text: str, *, strict: bool = False) -> int:
    return len(text)


@CircuitBreaker()
async def fetch(url: str) -> bytes:
    return url.encode()


@pipeline(timeout(1), retry(2), RateLimiter(rate=5))
async def guarded(n: int) -> list[int]:
    return [n]


@fallback(0)
def risky() -> int:
    return 1


assert_type(parse("x", strict=True), int)
assert_type(risky(), int)
assert_type(buttress.remaining(), float | None)
assert_type(buttress.health(), dict[str, Any])
assert_type(buttress.readiness(), dict[str, Any])
assert_type(buttress.liveness(), dict[str, Any])
_database = buttress.CircuitBreaker("database", critical=True)
assert_type(_database.critical, bool)
buttress.default_registry().drain()
assert_type(buttress.default_registry().draining, bool)
buttress.default_registry().resume()


@buttress.debounce(0.5)
def reload(path: str) -> str:
    return path


assert_type(reload("p"), str | None)


@buttress.debounce(0.5)
async def save(value: int) -> str:
    return str(value)


async def awaits() -> None:
    assert_type(await fetch("u"), bytes)
    assert_type(await guarded(1), list[int])
    assert_type(await save(1), str)
    async for attempt in retry(2).attempts():
        with attempt:
            assert_type(attempt.number, int)


def loop_form() -> None:
    for attempt in retry(3).attempts():
        with attempt:
            assert_type(attempt.number, int)


@buttress.cache(60, stale_while_revalidate=10)
def lookup_user(user_id: int, *, fresh: bool = False) -> dict[str, str]:
    return {"id": str(user_id)}


@buttress.cache(60)
async def load_rates(currency: str) -> float:
    return 1.0


@buttress.chaos.fault(0.1, ConnectionError)
def chaotic(n: int) -> str:
    return str(n)


@pipeline(retry(3), buttress.chaos.latency(0.1, 0.5), buttress.chaos.result(0.01, []))
async def chaotic_async(n: int) -> list[int]:
    return [n]


def cached_usage() -> None:
    assert_type(lookup_user(1, fresh=True), dict[str, str])
    assert_type(lookup_user.invalidate(1), bool)
    assert_type(lookup_user.cache_info().hits, int)
    lookup_user.cache_clear()
    assert_type(chaotic(3), str)
    assert_type(buttress.chaos.is_enabled(), bool)
    with buttress.chaos.enable(seed=1):
        pass


async def cached_awaits() -> None:
    assert_type(await load_rates("EUR"), float)
    assert_type(await chaotic_async(1), list[int])
    assert_type(load_rates.invalidate("EUR"), bool)


# -- telemetry: the call-level hooks keep signatures ------------------------------------------


@otel.traced("payments")
def traced_charge(amount: int, *, currency: str = "EUR") -> str:
    return f"{amount} {currency}"


@pipeline(measured("quotes"), retry(2))
async def measured_quote(symbol: str) -> float:
    return 1.0


def telemetry_usage() -> None:
    assert_type(traced_charge(1, currency="USD"), str)
    assert_type(otel.instrument(), Installation)
    assert_type(telemetry_logging.install("app"), Installation)
    with otel.traced("block"):
        pass


async def telemetry_awaits() -> None:
    assert_type(await measured_quote("ACME"), float)
    async with measured("block"):
        pass


class UserRepo:
    @buttress.cache(30)
    def find(self, user_id: int) -> str:
        return str(user_id)


def cached_method_usage(repo: UserRepo) -> None:
    assert_type(repo.find(1), str)
    assert_type(repo.find.cache_info().currsize, int)
    assert_type(UserRepo.find.invalidate(repo, 1), bool)


def integrations() -> None:
    import httpx

    from buttress.integrations.asgi import (
        ASGIApp,
        LoadSheddingMiddleware,
        health_app,
        liveness_app,
        readiness_app,
        state_app,
    )
    from buttress.integrations.httpx import AsyncResilientTransport, ResilientTransport

    transport = ResilientTransport(name="api", breaker={"failure_threshold": 3})
    assert_type(httpx.Client(transport=transport), httpx.Client)
    assert_type(transport.breakers, dict[str, buttress.CircuitBreaker])
    assert_type(AsyncResilientTransport(retry=None).retry_after(httpx.Response(429)), float | None)
    assert_type(health_app(), ASGIApp)
    assert_type(readiness_app(), ASGIApp)
    assert_type(liveness_app(buttress.Registry()), ASGIApp)
    assert_type(LoadSheddingMiddleware(state_app(), key="header:x-api-key").app, ASGIApp)


# -- retry's on= and the per-call protocol that drivers use -----------------------------------


@retry(5, on=[ConnectionError, lambda e: getattr(e, "status", 0) >= 500])
def mixed_on(n: int) -> int:
    return n


def retry_state_usage() -> None:
    assert_type(mixed_on(1), int)
    retry(2, on=(KeyError, ValueError))
    retry(2, on=lambda exc: isinstance(exc, OSError))
    state = retry(3).start()
    assert_type(state, buttress.RetryState)
    assert_type(state.attempt, int)
    assert_type(state.on_error(ValueError()), float | None)
    assert_type(state.on_result("x"), float | None)
    assert_type(state.retry_result("x", retry_after=1.0), float | None)
    assert_type(state.on_success(), None)
    error = timeout(1).expired(ValueError())
    assert_type(error, buttress.TimeoutExceeded)


def durations_as_timedelta() -> None:
    from datetime import timedelta

    retry(3, deadline=timedelta(seconds=5))
    buttress.RetryBudget(window=timedelta(seconds=30))
    timeout(timedelta(milliseconds=1500))
    buttress.hedge(timedelta(milliseconds=50))
    buttress.cache(timedelta(minutes=5), stale_while_revalidate=timedelta(seconds=30))
    buttress.debounce(timedelta(milliseconds=200), max_wait=timedelta(seconds=1))
    assert_type(buttress.throttle(timedelta(seconds=1), name="poller"), buttress.Throttle)
    assert_type(buttress.debounce(1, name="saver"), buttress.Debounce)


@pipeline(buttress.debounce(0.5), retry(2))
def debounced_in_pipeline(path: str) -> str:
    return path


# -- the permission protocol and the store contracts ------------------------------------------


def permits_usage() -> None:
    from datetime import timedelta

    from buttress.bulkhead import BulkheadPermit
    from buttress.circuit_breaker import BreakerPermit

    breaker = CircuitBreaker(
        "typed-permits",
        reset_timeout=timedelta(seconds=30),
        slow_call_duration=timedelta(milliseconds=800),
        exclude=[KeyError, lambda exc: getattr(exc, "status", 500) < 500],
        include=(ConnectionError, TimeoutError),
    )
    permit = breaker.acquire()
    assert_type(permit, BreakerPermit)
    assert_type(permit.token, int)
    permit.success(duration=0.1)
    breaker.acquire().failure(ConnectionError(), duration=timedelta(seconds=1))
    breaker.acquire().failure()
    breaker.acquire().release()
    with breaker.acquire() as held:
        assert_type(held.settled, bool)

    bulkhead = buttress.Bulkhead("typed-slots", max_concurrent=2, max_wait=timedelta(seconds=1))
    slot = bulkhead.try_acquire()
    assert_type(slot, BulkheadPermit | None)
    if slot is not None:
        slot.release()
    with bulkhead.acquire():
        pass

    limiter = RateLimiter("typed-keys", rate=10, per=timedelta(seconds=1), max_wait=0)
    assert_type(limiter.try_acquire(key="203.0.113.7"), bool)
    limiter.acquire(2, key=("tenant", 7))
    assert_type(limiter.interval, float)


async def async_permits_usage() -> None:
    breaker = CircuitBreaker("typed-async-permits")
    permit = await breaker.acquire_async()
    await permit.success_async()
    async with await breaker.acquire_async():
        pass
    bulkhead = buttress.Bulkhead("typed-async-slots", max_concurrent=1)
    async with await bulkhead.acquire_async() as slot:
        assert_type(slot.settled, bool)
    await RateLimiter("typed-async-keys", rate=5).acquire_async(key="a")


class ListBreakerStore:
    """A store written against the Protocol: mypy checks it structurally."""

    def bind_breaker(self, breaker: CircuitBreaker) -> buttress.circuit_breaker.LocalBreaker:
        return buttress.circuit_breaker.LocalBreaker(breaker)


def stores_usage() -> None:
    from buttress.backends import BreakerStore, BulkheadStore, LimiterStore
    from buttress.backends.memory import (
        MemoryBreakerStore,
        MemoryBulkheadStore,
        MemoryLimiterStore,
    )

    breaker_store: BreakerStore = MemoryBreakerStore()
    custom: BreakerStore = ListBreakerStore()
    bulkhead_store: BulkheadStore = MemoryBulkheadStore()
    limiter_store: LimiterStore = MemoryLimiterStore()
    CircuitBreaker("typed-store", store=breaker_store)
    CircuitBreaker("typed-custom-store", store=custom)
    buttress.Bulkhead("typed-store", max_concurrent=1, store=bulkhead_store)
    RateLimiter("typed-store", rate=1, store=limiter_store)


# -- sagas: the decorator form keeps the step's type; pydantic models validate input --------


def saga_usage() -> None:
    from datetime import timedelta

    from pydantic import BaseModel

    from buttress.saga import Context, Saga

    class Order(BaseModel):
        sku: str
        qty: int

    checkout = Saga("typed-checkout", validate=Order, timeout=timedelta(seconds=30))

    @checkout.step("reserve", timeout=timedelta(seconds=2))
    def reserve(ctx: Context) -> int:
        return 1

    @checkout.step("charge")
    async def charge(ctx: Context) -> str:
        return "ok"

    typed_step: Callable[[Context], int] = reserve  # not Any: the decorator keeps the type
    typed_async: Callable[[Context], Coroutine[Any, Any, str]] = charge
    del typed_step, typed_async
    assert_type(checkout.step("ship", lambda ctx: None), buttress.Step)
    Saga("typed-callable", validate=lambda value: value)

    # Durable waits take seconds or a timedelta, deadlines as epoch seconds or datetime.
    from datetime import datetime, timezone

    approvals = Saga(
        "typed-approvals",
        version="3",
        park_after=timedelta(minutes=5),
        poll_interval=timedelta(seconds=2),
        previous=(),
    )

    @approvals.step("wait", heartbeat_timeout=timedelta(seconds=10))
    def wait(ctx: Context) -> object:
        ctx.sleep(timedelta(hours=1))
        ctx.heartbeat({"done": 1})
        ctx.wait_for("a", timeout=timedelta(days=2))
        return ctx.wait_for("b", deadline=datetime(2030, 1, 1, tzinfo=timezone.utc))

    @approvals.step("wait-async")
    async def wait_async(ctx: Context) -> object:
        await ctx.sleep_async(5)
        await ctx.heartbeat_async()
        return await ctx.wait_for_async("c", deadline=1_900_000_000.0)

    approvals.child("child", checkout, input=lambda ctx: ctx.input)
    approvals.map("fan", lambda ctx, item: item, items=lambda ctx: [1, 2], concurrency=2)
    assert_type(approvals.signal("run", "a", {"ok": True}), buttress.SagaResult | None)
    assert_type(approvals.cancel("run", reason="why"), buttress.SagaResult | None)
    assert_type(approvals.version, str)


# -- backoff: floors, new schedules, sums ------------------------------------------------------


def backoff_usage() -> None:
    from datetime import timedelta

    from buttress import backoff

    floored = backoff.exponential(0.5, 2.0, 8.0, min=0.25)
    assert_type(backoff.fibonacci(0.1, timedelta(seconds=5), min=0.05), backoff.Fibonacci)
    assert_type(backoff.random(0.1, timedelta(seconds=1)), backoff.Random)
    assert_type(floored + backoff.random(0, 0.5), backoff.Sum)
    assert_type(backoff.constant(1) + [0.1, 0.2] + 0.5, backoff.Sum)
    retry(5, backoff=backoff.constant(timedelta(seconds=1)) + backoff.random(0, 0.5))


# -- retry: results that carry the wait, TryAgain, hooks, retry_with, the loop form ----------


def retry_features_usage() -> None:
    from datetime import timedelta

    from buttress.testing import is_testing

    def hint(reply: int) -> float | timedelta | None:
        return 3.0 if reply == 429 else None

    def before(state: buttress.RetryState) -> None:
        assert_type(state.waited, float)
        assert_type(state.elapsed, float)
        assert_type(state.next_delay(), float | None)

    policy = retry(
        3,
        retry_if_result=lambda reply: reply == 429,
        retry_after=hint,
        before_attempt=before,
        after_call=lambda state: print(state.attempt, state.settled),
    )
    assert_type(policy.retry_with(attempts=5, deadline=timedelta(seconds=30)), buttress.Retry)
    assert_type(is_testing(), bool)
    error = buttress.TryAgain("not yet", retry_after=timedelta(seconds=1))
    assert_type(error.retry_after, float | None)
    for attempt in policy.attempts():
        with attempt:
            assert_type(attempt.next_wait, float | None)


async def retry_async_loop() -> None:
    async for attempt in retry(3).attempts():
        async with attempt:
            assert_type(attempt.next_wait, float | None)


# -- breaker: success_threshold, call(), listeners on every policy ----------------------------


def breaker_features_usage() -> None:
    def lookup(key: str, *, default: str = "") -> str:
        return key or default

    breaker = CircuitBreaker("typed-threshold", success_threshold=3)
    assert_type(breaker.call(lookup, "a", default="b"), str)

    def listener(event: buttress.events.Event) -> None:
        pass

    for policy in (breaker, retry(2), timeout(1), RateLimiter(rate=1), pipeline(retry(2))):
        policy.add_listener(listener)
        assert_type(policy.remove_listener(listener), bool)


async def breaker_call_async() -> None:
    async def price(sku: str) -> float:
        return 1.0

    assert_type(await CircuitBreaker().call_async(price, "kettle"), float)


def retry_without_attempt_limit() -> None:
    from datetime import timedelta

    assert_type(retry(None, deadline=timedelta(minutes=1)).max_attempts, int | None)


def breaker_half_open_by_hand() -> None:
    breaker = CircuitBreaker("typed-half-open")
    breaker.half_open()
    buttress.circuit_breaker.LocalBreaker(breaker).force("half_open")


def breaker_call_events() -> None:
    def on_call(event: buttress.events.Event) -> None:
        if isinstance(event, buttress.events.CallCompleted):
            assert_type(event.outcome, str)
            assert_type(event.duration, float)
            assert_type(event.error, BaseException | None)

    CircuitBreaker("typed-call-events", call_events=True, listeners=[on_call])


def retry_event_details() -> None:
    def on_event(event: buttress.events.Event) -> None:
        if isinstance(event, buttress.events.RetryScheduled):
            assert_type(event.elapsed, float | None)
            assert_type(event.args, tuple[object, ...] | None)
            assert_type(event.kwargs, dict[str, object] | None)

    retry(3, event_details=True, listeners=[on_event])


def stores_take_timedelta() -> None:
    from datetime import timedelta

    from buttress.backends.redis import RedisBreakerStore, RedisBulkheadStore
    from buttress.integrations.asgi import LoadSheddingMiddleware

    RedisBreakerStore(
        "redis://127.0.0.1:6379/0",
        timeout=timedelta(milliseconds=300),
        retry_interval=timedelta(seconds=2),
        max_staleness=timedelta(milliseconds=250),
        probe_lease=timedelta(minutes=1),
    )
    RedisBulkheadStore("redis://127.0.0.1:6379/0", lease=timedelta(seconds=20))
    buttress.AdaptiveBulkhead(max_wait=timedelta(seconds=1))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    LoadSheddingMiddleware(app, max_wait=timedelta(milliseconds=50))


def timeout_modes() -> None:
    from datetime import timedelta

    from buttress.timeout import TimeoutMode

    legacy = timeout(timedelta(milliseconds=50), mode="thread", max_workers=8, max_abandoned=2)

    @legacy
    def call_sdk(account: str, *, retries: int = 0) -> bytes:
        return account.encode()

    assert_type(call_sdk("a", retries=1), bytes)
    assert_type(legacy.mode, TimeoutMode)
    assert_type(legacy.max_abandoned, int | None)
    legacy.close()

    with timeout(1, mode="signal"):
        pass
    mode: TimeoutMode = "deadline"
    timeout(1, mode=mode)
    timeout(1, mode="walk-away")  # type: ignore[arg-type]
    assert_type(buttress.LoopBlockingWarning("x"), buttress.LoopBlockingWarning)
