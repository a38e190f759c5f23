"""One contract for every primitive store (docs/backends.md, "Writing a store for a
primitive"), run on each implementation: the in-process memory stores, the Redis stores
on one server and on a real Redis Cluster, and a store written from the docs alone
(tests/docs_store.py).

Every case binds two primitives of one name to the store, as two processes would, and
checks that they share one state. Stores that decide on their own clock run on a
FakeClock; the Redis stores decide on the server's clock, so their cases that need time
to pass wait for real, briefly. Most cases run through both faces, sync and async.

To run the suite on another store, name a function returning a new, empty store:
``BUTTRESS_STORE_CONTRACT=module:function`` (and ``BUTTRESS_STORE_CONTRACT_CLOCK=system``
when that store decides on a server's clock); its cases are the ``custom`` ones.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from buttress import (
    Bulkhead,
    BulkheadFull,
    CircuitBreaker,
    CircuitOpenError,
    RateLimited,
    RateLimiter,
    Registry,
)
from buttress.backends import (
    NO_REPORT,
    BreakerBinding,
    BreakerStatus,
    BulkheadBinding,
    LimiterBinding,
)
from buttress.backends.memory import MemoryBreakerStore, MemoryBulkheadStore, MemoryLimiterStore
from buttress.clock import system_clock
from buttress.events import AcquiredAfterWait, CircuitStateChanged
from buttress.permit import Permit
from buttress.testing import FakeClock, capture_events
from services import Stores, unique

NAME = "contract"
KINDS = ("breaker", "bulkhead", "limiter")


def load_factory(spec: str) -> Callable[[], Any]:
    """The function named by ``module:function``."""
    module, _, function = spec.partition(":")
    factory = getattr(importlib.import_module(module), function)
    if not callable(factory):
        raise TypeError(f"{spec} is not callable")
    return factory  # type: ignore[no-any-return]


CUSTOM = os.environ.get("BUTTRESS_STORE_CONTRACT")
IMPLEMENTATIONS = ["memory", "docs", "redis", "redis_cluster", *(["custom"] if CUSTOM else [])]


class Impl:
    """One implementation under test: its stores, its clock, and how time passes for it."""

    def __init__(self, name: str, request: pytest.FixtureRequest) -> None:
        self.name = name
        self.redis: Stores | None = None
        self.factory: Callable[[], Any] | None = None
        real = name.startswith("redis") or (
            name == "custom" and os.environ.get("BUTTRESS_STORE_CONTRACT_CLOCK") == "system"
        )
        self.clock: Any = system_clock() if real else FakeClock()
        self.fake = not real
        if name == "redis":
            url = request.getfixturevalue("redis_url")
            self.redis = Stores(url, request.getfixturevalue("redis_prefix"))
        elif name == "redis_cluster":
            cluster = request.getfixturevalue("cluster")
            self.redis = Stores(cluster.url, unique("buttress-test:"), cluster=True)
        elif name == "docs":
            self.factory = load_factory("docs_store:DocsStore")
        elif name == "custom":
            assert CUSTOM is not None
            self.factory = load_factory(CUSTOM)
        self.shared: Any = self.factory() if self.factory is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- stores -----------------------------------------------------------------------------

    def stores(self, kind: str) -> tuple[Any, Any]:
        """The stores the two sharers are bound to: one store, or (Redis) two instances
        on one server, as two processes would have."""
        if self.redis is not None:
            from buttress.backends.redis import (
                RedisBreakerStore,
                RedisBulkheadStore,
                RedisRateLimiterStore,
            )

            cls = {
                "breaker": RedisBreakerStore,
                "bulkhead": RedisBulkheadStore,
                "limiter": RedisRateLimiterStore,
            }[kind]
            return self.redis(cls), self.redis(cls)
        if self.shared is None:
            memory = {
                "breaker": MemoryBreakerStore,
                "bulkhead": MemoryBulkheadStore,
                "limiter": MemoryLimiterStore,
            }[kind]
            store = memory()
            return store, store
        if not callable(getattr(self.shared, f"bind_{kind}", None)):
            pytest.skip(f"the {self.name} store is not a {kind} store")
        return self.shared, self.shared

    # -- time -------------------------------------------------------------------------------

    def short(self, fake: float, real: float) -> float:
        """A duration: ``fake`` seconds on a FakeClock, ``real`` ones (keep them small) else."""
        return fake if self.fake else real

    def elapse(self, seconds: float) -> None:
        """Let ``seconds`` pass for the implementation."""
        if self.fake:
            self.clock.advance(seconds)
        else:
            time.sleep(seconds)

    def mark(self) -> float:
        return float(self.clock.now())

    def waited_since(self, mark: float) -> float:
        return float(self.clock.now()) - mark

    # -- async ------------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    def run(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        return self.loop.run_until_complete(make())

    def close(self) -> None:
        if self._loop is not None:
            if self.redis is not None:
                for store in self.redis.made:  # the async clients of this loop
                    self._loop.run_until_complete(store.aclose())
            self._loop.close()
        if self.redis is not None:
            self.redis.close()


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> Iterator[Impl]:
    """Each store implementation in turn."""
    made = Impl(request.param, request)
    try:
        yield made
    finally:
        made.close()


class Face:
    """A primitive's permission calls, made through its sync or its async face."""

    def __init__(self, kind: str, impl: Impl) -> None:
        self.kind = kind
        self.impl = impl

    def _do(self, sync: Callable[[], Any], make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        return sync() if self.kind == "sync" else self.impl.run(make)

    def acquire(self, primitive: CircuitBreaker | Bulkhead) -> Permit:
        return self._do(primitive.acquire, primitive.acquire_async)  # type: ignore[no-any-return]

    def success(self, permit: Permit) -> None:
        self._do(permit.success, permit.success_async)

    def failure(self, permit: Permit) -> None:
        exc = ConnectionError("down")
        self._do(lambda: permit.failure(exc), lambda: permit.failure_async(exc))

    def release(self, permit: Permit) -> None:
        self._do(permit.release, permit.release_async)

    def fail(self, breaker: CircuitBreaker) -> None:
        """One call through ``breaker`` that fails."""
        self.failure(self.acquire(breaker))

    def succeed(self, breaker: CircuitBreaker) -> None:
        """One call through ``breaker`` that works."""
        self.success(self.acquire(breaker))

    def admit(self, limiter: RateLimiter, weight: int = 1, key: str | None = None) -> None:
        self._do(
            lambda: limiter.acquire(weight, key=key),
            lambda: limiter.acquire_async(weight, key=key),
        )


@pytest.fixture(params=["sync", "async"])
def face(request: pytest.FixtureRequest, impl: Impl) -> Face:
    """The sync face, then the async one (``acquire_async``, ``settle_async``...)."""
    return Face(request.param, impl)


def breakers(impl: Impl, **settings: Any) -> tuple[CircuitBreaker, CircuitBreaker]:
    store_a, store_b = impl.stores("breaker")
    settings.setdefault("reset_timeout", 60)
    return (
        CircuitBreaker(NAME, store=store_a, clock=impl.clock, registry=Registry(), **settings),
        CircuitBreaker(NAME, store=store_b, clock=impl.clock, registry=Registry(), **settings),
    )


def bulkheads(impl: Impl, **settings: Any) -> tuple[Bulkhead, Bulkhead]:
    store_a, store_b = impl.stores("bulkhead")
    return (
        Bulkhead(NAME, store=store_a, clock=impl.clock, registry=Registry(), **settings),
        Bulkhead(NAME, store=store_b, clock=impl.clock, registry=Registry(), **settings),
    )


def limiters(impl: Impl, **settings: Any) -> tuple[RateLimiter, RateLimiter]:
    store_a, store_b = impl.stores("limiter")
    return (
        RateLimiter(NAME, store=store_a, clock=impl.clock, registry=Registry(), **settings),
        RateLimiter(NAME, store=store_b, clock=impl.clock, registry=Registry(), **settings),
    )


def status(breaker: CircuitBreaker) -> BreakerStatus:
    return breaker.binding.status()


# -- circuit breaker ------------------------------------------------------------------------


def test_breaker_bindings_implement_the_protocol(impl: Impl) -> None:
    """The store binds each breaker to a BreakerBinding, once, when the breaker is built."""
    a, b = breakers(impl)
    assert isinstance(a.binding, BreakerBinding)
    assert isinstance(b.binding, BreakerBinding)
    assert isinstance(a.binding.snapshot(), dict)


def test_breaker_failures_through_one_open_the_circuit_for_the_other(
    impl: Impl, face: Face
) -> None:
    """Failures through either breaker add up to one streak and open the circuit for both."""
    a, b = breakers(impl, failure_threshold=2)
    face.fail(a)
    assert status(b).consecutive_failures == 1
    face.fail(b)
    for breaker in (a, b):
        with pytest.raises(CircuitOpenError) as info:
            face.acquire(breaker)
        assert info.value.retry_after is not None
        assert 0 < info.value.retry_after <= 60
        assert breaker.state == "open"


def test_breaker_success_through_one_ends_the_streak_of_both(impl: Impl, face: Face) -> None:
    """A success through one breaker ends the failure streak the other sees."""
    a, b = breakers(impl, failure_threshold=2)
    face.fail(a)
    face.succeed(b)
    assert status(a).consecutive_failures == 0
    face.fail(a)
    assert a.state == b.state == "closed"
    face.fail(b)
    assert a.state == b.state == "open"


def test_breaker_neutral_outcome_counts_as_neither(impl: Impl, face: Face) -> None:
    """A neutral outcome neither ends the failure streak nor adds to it."""
    a, b = breakers(impl, failure_threshold=2)
    face.fail(a)
    face.release(face.acquire(b))
    assert status(a).consecutive_failures == 1
    assert a.state == "closed"
    face.fail(b)
    assert a.state == "open"


def test_breaker_half_open_probe_slots_are_shared(impl: Impl, face: Face) -> None:
    """Half-open probe slots are counted across both breakers; a probe's success closes both."""
    reset = impl.short(10, 0.05)
    a, b = breakers(impl, failure_threshold=1, reset_timeout=reset, half_open_max_calls=1)
    face.fail(a)
    impl.elapse(reset * 1.5)
    assert status(b).state == "half_open"  # an expired open circuit reads as half-open
    probe = face.acquire(a)
    assert status(b).half_open_probes == 1
    with pytest.raises(CircuitOpenError) as info:
        face.acquire(b)
    assert info.value.retry_after is None
    face.success(probe)
    assert a.state == b.state == "closed"
    face.succeed(b)


def test_breaker_failed_probe_opens_the_circuit_again(impl: Impl, face: Face) -> None:
    """A failed probe reopens the circuit for both, for a new reset timeout."""
    reset = impl.short(10, 0.15)
    a, b = breakers(impl, failure_threshold=1, reset_timeout=reset, half_open_max_calls=1)
    face.fail(a)
    impl.elapse(reset * 1.5)
    face.fail(b)
    with pytest.raises(CircuitOpenError) as info:
        face.acquire(a)
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= reset
    assert status(a).state == "open"


def test_breaker_outcome_of_a_probe_after_the_other_probe_decided_is_ignored(
    impl: Impl, face: Face
) -> None:
    """With two probes out, the first outcome decides; the other probe's outcome is stale."""
    reset = impl.short(10, 0.05)
    a, b = breakers(impl, failure_threshold=1, reset_timeout=reset, half_open_max_calls=2)
    face.fail(a)
    impl.elapse(reset * 1.5)
    first, second = face.acquire(a), face.acquire(b)
    assert status(a).half_open_probes == 2
    with pytest.raises(CircuitOpenError):
        face.acquire(a)  # both probe slots are taken
    face.success(first)
    assert b.state == "closed"
    face.failure(second)  # admitted while half-open: must not reopen the closed circuit
    assert a.state == b.state == "closed"
    assert status(b).consecutive_failures == 0


def test_breaker_neutral_outcome_frees_a_half_open_probe_slot(impl: Impl, face: Face) -> None:
    """A probe settled as neutral gives its probe slot back to either breaker."""
    reset = impl.short(10, 0.05)
    a, b = breakers(impl, failure_threshold=1, reset_timeout=reset, half_open_max_calls=1)
    face.fail(a)
    impl.elapse(reset * 1.5)
    probe = face.acquire(a)
    with pytest.raises(CircuitOpenError):
        face.acquire(b)
    face.release(probe)
    assert status(a).half_open_probes == 0
    again = face.acquire(b)
    assert status(a).state == "half_open"
    assert status(a).half_open_probes == 1
    face.success(again)
    assert a.state == "closed"


def test_breaker_outcome_of_an_older_generation_never_moves_the_state(
    impl: Impl, face: Face
) -> None:
    """An outcome settled with a token from before a transition changes nothing."""
    a, b = breakers(impl, failure_threshold=1)
    early, earlier = face.acquire(a), face.acquire(a)  # admitted while closed
    face.fail(b)  # opens: a new generation
    face.success(early)  # a slow success from before: must not close the circuit
    assert a.state == b.state == "open"
    b.close()  # closed again: another generation
    face.failure(earlier)  # a failure from two generations ago: must not open it
    assert a.state == b.state == "closed"
    assert status(a).consecutive_failures == 0


def test_breaker_no_report_token_is_ignored(impl: Impl) -> None:
    """Settling the NO_REPORT token does nothing, sync or async."""
    a, b = breakers(impl, failure_threshold=1)
    a.binding.settle(NO_REPORT, "failure")
    impl.run(lambda: b.binding.settle_async(NO_REPORT, "failure"))
    assert a.state == b.state == "closed"
    assert status(b).consecutive_failures == 0


def test_breaker_forced_states_are_seen_by_both(impl: Impl, face: Face) -> None:
    """open() and close() on one breaker force the state of both; forced open never probes."""
    reset = impl.short(10, 0.05)
    a, b = breakers(impl, failure_threshold=2, reset_timeout=reset)
    inflight = face.acquire(b)
    a.open()
    impl.elapse(reset * 1.5)  # a forced circuit does not go half-open
    seen = status(b)
    assert (seen.state, seen.forced, seen.seconds_until_half_open) == ("open", True, None)
    with pytest.raises(CircuitOpenError) as info:
        face.acquire(b)
    assert info.value.retry_after is None
    face.success(inflight)  # nothing a call reports moves a forced circuit
    assert status(a).forced
    b.close()
    seen = status(a)
    assert (seen.state, seen.forced) == ("closed", False)
    face.fail(a)
    a.close()  # already closed: still forgets the streak
    assert status(b).consecutive_failures == 0
    face.fail(b)
    assert a.state == "closed"


def test_breaker_status_fields(impl: Impl) -> None:
    """status() reports state, forced, seconds_until_half_open, the streak and the probes."""
    a, b = breakers(impl, failure_threshold=2, reset_timeout=60)
    assert status(a) == BreakerStatus(
        state="closed",
        forced=False,
        seconds_until_half_open=None,
        consecutive_failures=0,
        window_calls=None,
        window_failures=None,
        half_open_probes=0,
    )
    a.acquire().failure(ConnectionError())
    b.acquire().failure(ConnectionError())
    opened = status(a)
    assert opened.state == "open" and not opened.forced
    assert opened.seconds_until_half_open is not None
    assert 59 < opened.seconds_until_half_open <= 60
    assert opened.window_calls is None and opened.window_failures is None
    assert opened.half_open_probes == 0


def test_breaker_failure_rate_window_is_shared(impl: Impl, face: Face) -> None:
    """In failure-rate mode both breakers fill one window, which opens the circuit for both."""
    a, b = breakers(impl, failure_rate=0.5, window=4, minimum_calls=4)
    face.succeed(a)
    face.fail(a)
    face.fail(b)
    # a binding may batch successes until its next call to the store; status() is one
    for breaker in (a, b):
        seen = status(breaker)
        assert (seen.window_calls, seen.window_failures) == (3, 2)
        assert seen.state == "closed"  # fewer than minimum_calls outcomes
    face.succeed(b)  # the fourth outcome: 2 failures out of 4 reach the rate
    assert status(b).state == "open"
    assert status(a).state == "open"
    a.close()  # closing forgets the window, for both
    seen = status(b)
    assert (seen.state, seen.window_calls, seen.window_failures) == ("closed", 0, 0)


def test_breaker_each_transition_is_emitted_once(impl: Impl, face: Face) -> None:
    """Every transition is emitted once, by the binding that made it, with old, new, reason."""
    reset = impl.short(10, 0.05)
    a, b = breakers(impl, failure_threshold=1, reset_timeout=reset)
    with capture_events() as events:
        face.fail(a)
        impl.elapse(reset * 1.5)
        face.succeed(b)  # moves to half-open, then its probe closes the circuit
        b.open()
        a.close()
    moves = [(e.old, e.new) for e in events if isinstance(e, CircuitStateChanged)]
    assert moves == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
        ("closed", "open"),
        ("open", "closed"),
    ]
    assert all(e.name == NAME and e.reason for e in events if isinstance(e, CircuitStateChanged))


# -- bulkhead -------------------------------------------------------------------------------


def test_bulkhead_bindings_implement_the_protocol(impl: Impl) -> None:
    """The store binds each bulkhead to a BulkheadBinding."""
    a, b = bulkheads(impl, max_concurrent=1)
    assert isinstance(a.binding, BulkheadBinding)
    assert isinstance(b.binding, BulkheadBinding)
    assert isinstance(a.binding.snapshot(), dict)


def test_bulkhead_max_concurrent_holds_across_both(impl: Impl, face: Face) -> None:
    """max_concurrent caps the slots held through both bulkheads together; in_use() counts them."""
    a, b = bulkheads(impl, max_concurrent=2)
    assert a.binding.in_use() == 0
    first = face.acquire(a)
    assert b.binding.in_use() == 1
    second = face.acquire(b)
    assert a.binding.in_use() == b.binding.in_use() == 2
    for bulkhead in (a, b):
        assert bulkhead.try_acquire() is None
        with pytest.raises(BulkheadFull) as info:
            face.acquire(bulkhead)
        assert info.value.reason == "bulkhead_full"
    face.release(first)
    assert a.binding.in_use() == 1
    third = face.acquire(b)
    face.release(second)
    face.release(third)
    assert a.binding.in_use() == b.binding.in_use() == 0


def test_bulkhead_try_acquire_never_waits(impl: Impl) -> None:
    """try_acquire() answers None at once when every slot is taken, even with a queue."""
    a, b = bulkheads(impl, max_concurrent=1, max_queue=5)  # max_wait=None: no limit
    held = a.try_acquire()
    assert held is not None
    mark = impl.mark()
    assert b.try_acquire() is None
    assert a.binding.try_acquire() is None
    if impl.fake:
        assert impl.waited_since(mark) == 0.0 and impl.clock.sleeps == []
    else:
        assert impl.waited_since(mark) < 0.5
    held.release()


def test_bulkhead_a_lease_frees_exactly_its_own_slot(impl: Impl, face: Face) -> None:
    """Releasing one caller's permit frees that slot only; the other caller's stays held."""
    a, b = bulkheads(impl, max_concurrent=2)
    mine, theirs = face.acquire(a), face.acquire(b)
    face.release(mine)
    assert a.binding.in_use() == 1
    replacement = a.try_acquire()
    assert replacement is not None
    assert b.try_acquire() is None  # theirs is still held
    with pytest.raises(RuntimeError):
        face.release(mine)  # a permit is settled once: it can never free a second slot
    assert b.binding.in_use() == 2
    face.release(theirs)
    face.release(replacement)
    assert b.binding.in_use() == 0


def test_bulkhead_no_wait_budget_rejects_as_full(impl: Impl, face: Face) -> None:
    """A caller with a wait budget of 0, or no queue, is rejected at once with "bulkhead_full"."""
    a, b = bulkheads(impl, max_concurrent=1, max_queue=1, max_wait=0)
    held = face.acquire(a)
    mark = impl.mark()
    with pytest.raises(BulkheadFull) as info:
        face.acquire(b)
    assert info.value.reason == "bulkhead_full"
    with pytest.raises(BulkheadFull) as info:
        b.binding.acquire(0)
    assert info.value.reason == "bulkhead_full"
    if impl.fake:
        assert impl.waited_since(mark) == 0.0
    store_a, _ = impl.stores("bulkhead")
    no_queue = Bulkhead(
        "contract-no-queue", max_concurrent=1, store=store_a, clock=impl.clock, registry=Registry()
    )
    other = no_queue.try_acquire()
    assert other is not None
    with pytest.raises(BulkheadFull) as info:
        face.acquire(no_queue)  # max_wait=None, but max_queue=0: nobody may wait
    assert info.value.reason == "bulkhead_full"
    assert a.binding.in_use() == 1
    face.release(held)
    other.release()


def test_bulkhead_short_wait_budget_rejects_as_wait_timeout(impl: Impl, face: Face) -> None:
    """A caller whose budget runs out gets "bulkhead_wait_timeout" and takes nothing."""
    budget = impl.short(5, 0.1)
    a, b = bulkheads(impl, max_concurrent=1, max_queue=1, max_wait=budget)
    face.release(face.acquire(b))  # connected: its first attempt comes well within budget
    held = face.acquire(a)
    mark = impl.mark()
    with pytest.raises(BulkheadFull) as info:
        face.acquire(b)
    assert info.value.reason == "bulkhead_wait_timeout"
    assert impl.waited_since(mark) >= budget * 0.9
    assert a.binding.in_use() == 1
    face.release(held)
    assert a.binding.in_use() == 0
    permit = b.try_acquire()
    assert permit is not None
    permit.release()


def test_bulkhead_max_queue_as_documented(impl: Impl) -> None:
    """FIFO stores count waiters against max_queue; the Redis store's polling waiters are not."""
    budget = impl.short(5, 0.1)
    a, b = bulkheads(impl, max_concurrent=1, max_queue=1, max_wait=budget)
    held = a.try_acquire()
    assert held is not None
    if impl.fake:
        impl.clock.autojump = False  # the first waiter waits until the test moves time

    async def scenario() -> str:
        for bulkhead in (a, b):  # connected: each first attempt comes well within budget
            with pytest.raises(BulkheadFull):
                await bulkhead.binding.acquire_async(0)
        first = asyncio.ensure_future(a.acquire_async())  # the one caller allowed to queue
        await asyncio.sleep(0.01)
        try:
            await b.acquire_async()
        except BulkheadFull as exc:
            reason = exc.reason
        while impl.fake and not first.done():
            impl.clock.advance(budget)
            await asyncio.sleep(0)
        with pytest.raises(BulkheadFull):
            await first
        return reason

    reason = impl.run(scenario)
    if impl.name.startswith("redis"):  # docs/redis.md: waiters are not counted
        assert reason == "bulkhead_wait_timeout"
    else:
        assert reason == "bulkhead_full"
    assert a.binding.in_use() == 1
    held.release()


def test_bulkhead_waiter_gets_the_slot_the_other_frees(impl: Impl, face: Face) -> None:
    """A caller queued in one bulkhead gets the slot freed through the other (reported)."""
    a, b = bulkheads(impl, max_concurrent=1, max_queue=1)
    face.release(face.acquire(b))  # connected: b waits from its first attempt on
    held = a.acquire()
    with capture_events() as events:
        if face.kind == "sync":
            timer = threading.Timer(0.05, held.release)
            timer.start()
            permit = b.acquire()
            timer.join()
        else:

            async def scenario() -> Permit:
                asyncio.get_running_loop().call_later(0.05, held.release)
                return await b.acquire_async()

            permit = impl.run(scenario)
    assert a.binding.in_use() == 1
    waits = [e for e in events if isinstance(e, AcquiredAfterWait) and e.name == NAME]
    assert len(waits) == 1
    face.release(permit)
    assert b.binding.in_use() == 0


def test_bulkhead_cancelled_async_waiter_takes_nothing(impl: Impl) -> None:
    """A cancelled async waiter holds no slot, also when the slot was freed as it was cancelled."""
    a, b = bulkheads(impl, max_concurrent=1, max_queue=2)

    async def scenario() -> None:
        held = await a.acquire_async()
        waiter = asyncio.ensure_future(b.acquire_async())
        await asyncio.sleep(0.02)  # it is waiting now
        assert not waiter.done()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert b.binding.in_use() == 1
        # freed, then cancelled before the waiter ran again: it must pass the slot on
        waiter = asyncio.ensure_future(b.acquire_async())
        await asyncio.sleep(0.02)
        await held.release_async()
        waiter.cancel()
        try:
            got = await waiter
        except asyncio.CancelledError:
            assert b.binding.in_use() == 0
        else:  # it ran before the cancellation landed: then it holds the slot
            assert b.binding.in_use() == 1
            await got.release_async()
        assert a.binding.in_use() == 0
        permit = b.try_acquire()
        assert permit is not None
        assert a.try_acquire() is None
        await permit.release_async()

    impl.run(scenario)


# -- rate limiter ---------------------------------------------------------------------------


def test_limiter_bindings_implement_the_protocol(impl: Impl) -> None:
    """The store binds each limiter to a LimiterBinding."""
    a, b = limiters(impl, rate=1)
    assert isinstance(a.binding, LimiterBinding)
    assert isinstance(b.binding, LimiterBinding)
    assert isinstance(a.binding.snapshot(), dict)


def test_limiter_burst_then_spacing_holds_across_both(impl: Impl, face: Face) -> None:
    """Both limiters draw on one GCRA budget: the burst, then one admission per interval."""
    interval = impl.short(0.1, 0.25)
    a, b = limiters(impl, rate=1, per=interval, burst=3, max_wait=0)

    def attempt(limiter: RateLimiter, use_face: bool) -> bool:
        if not use_face:
            return limiter.try_acquire()
        try:
            face.admit(limiter)
        except RateLimited:
            return False
        return True

    mark = impl.mark()
    burst = sum(attempt(limiter, True) for limiter in (a, b, a, b, a))
    burst += sum(attempt(limiter, False) for limiter in (a, b))
    impl.elapse(interval * 1.2)
    spaced = sum(attempt(limiter, use) for limiter, use in ((b, True), (a, False), (b, False)))
    # GCRA: at most burst + t / interval in any t seconds (on a loaded machine the real
    # seconds these calls took may let one more turn come)
    assert burst >= 3 and spaced >= 1
    assert burst + spaced <= 3 + int(impl.waited_since(mark) / interval)
    if impl.fake:
        assert (burst, spaced) == (3, 1)


def test_limiter_keys_have_independent_buckets(impl: Impl, face: Face) -> None:
    """Each key has its own bucket, shared by both limiters; keys never draw on each other."""
    a, b = limiters(impl, rate=1, per=60, burst=1, max_wait=0)
    face.admit(a, key="tenant-1")
    with pytest.raises(RateLimited):
        face.admit(b, key="tenant-1")
    assert not b.for_key("tenant-1").try_acquire()
    face.admit(b, key="tenant-2")
    face.admit(b)  # the unkeyed bucket is one more
    assert not a.try_acquire()
    assert a.binding.tokens("tenant-1") == pytest.approx(0.0, abs=0.01)
    assert a.binding.tokens("tenant-3") == 1.0


def test_limiter_weights_draw_on_the_shared_budget(impl: Impl, face: Face) -> None:
    """A weight of n takes n units of the shared budget, or nothing."""
    a, b = limiters(impl, rate=1, per=60, burst=5, max_wait=0)
    face.admit(a, weight=3)
    with pytest.raises(RateLimited):
        face.admit(b, weight=3)
    assert not b.try_acquire(3)
    face.admit(b, weight=2)
    assert not a.try_acquire()
    assert b.binding.tokens(None) == pytest.approx(0.0, abs=0.01)


def test_limiter_try_acquire_never_waits(impl: Impl) -> None:
    """try_acquire() answers False at once on a drained bucket, even for a limiter that may wait."""
    a, b = limiters(impl, rate=1, per=60, burst=1)  # max_wait=None: no limit
    assert a.try_acquire()
    mark = impl.mark()
    assert not b.try_acquire()
    assert not a.binding.try_acquire(None, 1)
    if impl.fake:
        assert impl.waited_since(mark) == 0.0 and impl.clock.sleeps == []
    else:
        assert impl.waited_since(mark) < 0.5


def test_limiter_rejects_at_once_when_the_wait_exceeds_max_wait(impl: Impl, face: Face) -> None:
    """A caller whose turn is further than max_wait is rejected at once, with retry_after."""
    a, b = limiters(impl, rate=1, per=60, burst=1, max_wait=1)
    face.admit(a)
    mark = impl.mark()
    with pytest.raises(RateLimited) as info:
        face.admit(b)
    assert info.value.retry_after is not None
    assert 59 < info.value.retry_after <= 60
    if impl.fake:
        assert impl.waited_since(mark) == 0.0
    else:
        assert impl.waited_since(mark) < 0.5
    with pytest.raises(RateLimited) as info:
        b.binding.acquire(None, 1, 0.0)
    assert info.value.retry_after is not None and info.value.retry_after > 59


def test_limiter_waits_for_its_turn_within_max_wait(impl: Impl, face: Face) -> None:
    """A caller whose turn comes within max_wait waits for it, and the wait is reported."""
    interval = impl.short(0.5, 0.1)
    a, b = limiters(impl, rate=1, per=interval, burst=1, max_wait=10)
    for limiter in (a, b):  # connected, so that each request reaches the store at once
        face.admit(limiter, key=f"warm-up-{id(limiter)}")
        limiter.binding.tokens(None)
    face.admit(a)
    mark = impl.mark()
    with capture_events() as events:
        face.admit(b)
    assert impl.waited_since(mark) >= interval * 0.8
    waits = [e for e in events if isinstance(e, AcquiredAfterWait)]
    assert len(waits) == 1
    assert interval * 0.6 <= waits[0].waited <= interval * 1.5 + 0.5
    waited = b.binding.acquire(None, 1, 10)  # the binding returns the seconds it waited
    assert interval * 0.6 <= waited <= interval * 1.5 + 0.5


def test_limiter_turn_of_a_waiter_counts_for_the_next_caller(impl: Impl) -> None:
    """A caller waiting for its turn holds it: the next caller's turn comes after it."""
    interval = impl.short(1.0, 0.2)
    a, b = limiters(impl, rate=1, per=interval, burst=1)
    if impl.fake:
        impl.clock.autojump = False

    async def scenario() -> float | None:
        for limiter in (a, b):  # connected: each request reaches the store at once
            await limiter.acquire_async(key=f"warm-up-{id(limiter)}")
        await a.acquire_async()
        waiter = asyncio.ensure_future(b.acquire_async())  # waits one interval
        await asyncio.sleep(0.01)
        try:
            await a.acquire_async()  # no room for it within one and a half intervals
        except RateLimited as exc:
            retry_after = exc.retry_after
        if impl.fake:
            impl.clock.advance(interval)
        await waiter
        return retry_after

    limiter_max_wait = interval * 1.5
    a.max_wait = limiter_max_wait
    retry_after = impl.run(scenario)
    assert retry_after is not None
    assert interval * 1.5 < retry_after <= interval * 2 + 0.01


def test_limiter_tokens(impl: Impl) -> None:
    """tokens() is the units admissible now, as both limiters see them."""
    a, b = limiters(impl, rate=1, per=60, burst=3)
    assert a.binding.tokens(None) == pytest.approx(3.0)
    assert a.try_acquire()
    assert b.binding.tokens(None) == pytest.approx(2.0, abs=0.01)
    assert b.try_acquire(2)
    assert a.binding.tokens(None) == pytest.approx(0.0, abs=0.01)
    assert b.tokens() == pytest.approx(0.0, abs=0.01)


def test_limiter_tokens_refill_fractionally(impl: Impl) -> None:
    """A drained bucket refills continuously: half an interval later it holds half a unit."""
    interval = impl.short(1.0, 0.2)
    a, b = limiters(impl, rate=1, per=interval, burst=2)
    assert a.try_acquire(2)
    impl.elapse(interval / 2)
    assert b.binding.tokens(None) == pytest.approx(0.5, abs=0.01 if impl.fake else 0.3)
    assert not a.try_acquire()


def test_limiter_cancelled_async_waiter_never_over_admits(impl: Impl) -> None:
    """A waiter cancelled before its turn never lets the bucket admit more than its rate."""
    interval = impl.short(1.0, 0.25)
    a, b = limiters(impl, rate=1, per=interval, burst=1)
    if impl.fake:
        impl.clock.autojump = False  # time moves only when the test says so

    async def scenario() -> tuple[float, int]:
        for limiter in (a, b):  # connected: each request reaches the store at once
            await limiter.acquire_async(key=f"warm-up-{id(limiter)}")
        mark = impl.mark()
        await a.acquire_async()
        waiter = asyncio.ensure_future(b.acquire_async())
        for _ in range(5):
            await asyncio.sleep(0.005)
        if waiter.done():  # a stalled machine let its turn come first: then it counts
            assert not impl.fake
            return mark, 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return mark, 0

    mark, early = impl.run(scenario)
    early += sum(limiter.try_acquire() for limiter in (a, b))  # b's turn has not come yet
    impl.elapse(interval * 1.2)
    # the cancelled turn was given back (then one admission now) or left unused (then
    # none until the next interval): never more than one turn per interval
    now = sum(limiter.try_acquire() for limiter in (a, b, a, b))
    impl.elapse(interval)
    later = sum(limiter.try_acquire() for limiter in (a, b, a, b))
    assert later >= 1
    # with a's admission: at most burst (1) + t / interval in the t seconds since the mark
    assert 1 + early + now + later <= 1 + int(impl.waited_since(mark) / interval)
    if impl.fake:
        assert early == 0 and now <= 1 and later == 1
