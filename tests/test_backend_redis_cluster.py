"""The Redis stores on a real Redis Cluster: three redis-server nodes of the test's own,
on spare loopback ports, with every slot assigned. Each primitive's state is one
hash-tagged key, so each call goes to the one node that owns its slot; different names
land on different nodes, and the stores share state across instances as on a single
server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster

from buttress import (
    Bulkhead,
    CircuitBreaker,
    CircuitOpenError,
    ConfigTypeError,
    RateLimited,
    RateLimiter,
    Registry,
    Saga,
)
from buttress.backends import IdempotencyStore, SagaStore
from buttress.backends.redis import (
    RedisBreakerStore,
    RedisBulkheadStore,
    RedisIdempotencyStore,
    RedisRateLimiterStore,
)
from services import NODES, Cluster, Stores, unique


@pytest.fixture
def stores(cluster: Cluster) -> Iterator[Stores]:
    made = Stores(cluster.url, unique("buttress-test:"), cluster=True)
    yield made
    made.close()


@pytest.fixture
def nodes(cluster: Cluster) -> Iterator[list[redis.Redis]]:
    clients = [redis.Redis(port=port) for port in cluster.ports]
    yield clients
    for client in clients:
        client.close()


def _owner(nodes: list[redis.Redis], key: str) -> list[int]:
    owners = []
    for i, node in enumerate(nodes):
        try:
            if node.exists(key):
                owners.append(i)
        except redis.ResponseError:  # MOVED: another node owns the slot
            pass
    return owners


def _slot_owner(nodes: list[redis.Redis], key: str) -> int:
    """The node that owns ``key``'s slot, from the cluster's own slot table."""
    slot = int(nodes[0].execute_command("CLUSTER", "KEYSLOT", key))
    for start, end, primary, *_ in nodes[0].execute_command("CLUSTER", "SLOTS"):
        if start <= slot <= end:
            port = int(primary[1])
            return [n.connection_pool.connection_kwargs["port"] for n in nodes].index(port)
    raise AssertionError(f"no node owns slot {slot}")


def test_limiter_instances_share_one_budget_on_the_node_that_owns_its_slot(
    stores: Stores, nodes: list[redis.Redis]
) -> None:
    store_a, store_b = stores(RedisRateLimiterStore), stores(RedisRateLimiterStore)
    a = RateLimiter("partner-api", rate=1, per=60, burst=5, max_wait=0, store=store_a)
    b = RateLimiter(
        "partner-api", rate=1, per=60, burst=5, max_wait=0, store=store_b, registry=Registry()
    )
    admitted = sum(limiter.try_acquire() for _ in range(5) for limiter in (a, b))
    assert admitted == 5
    with pytest.raises(RateLimited):
        b.acquire()
    key = a.snapshot()["store"]["key"]
    assert _owner(nodes, key) == [_slot_owner(nodes, key)]


def test_state_of_different_names_spreads_over_the_nodes(
    stores: Stores, nodes: list[redis.Redis]
) -> None:
    store = stores(RedisRateLimiterStore)
    owners = set()
    for n in range(24):
        limiter = RateLimiter(f"api-{n}", rate=10, store=store)
        limiter.acquire()
        (owner,) = _owner(nodes, limiter.snapshot()["store"]["key"])
        owners.add(owner)
    assert owners == set(range(NODES))  # every node serves some of them


def test_async_limiter_on_a_cluster_client_the_user_built(cluster: Cluster, stores: Stores) -> None:
    async def scenario() -> None:
        client = redis.asyncio.cluster.RedisCluster.from_url(cluster.url, socket_timeout=0.5)
        try:
            store = stores(RedisRateLimiterStore, async_client=client)
            limiter = RateLimiter("search", rate=1, per=60, burst=3, max_wait=0, store=store)
            for _ in range(3):
                await limiter.acquire_async()
            with pytest.raises(RateLimited):
                await limiter.acquire_async()
            # a store that builds its own async Cluster client from the URL shares it
            from_url = stores(RedisRateLimiterStore)
            other = RateLimiter(
                "search", rate=1, per=60, burst=3, max_wait=0, store=from_url, registry=Registry()
            )
            with pytest.raises(RateLimited):
                await other.acquire_async()
            slots = stores(RedisBulkheadStore)
            bulkhead = Bulkhead("export", max_concurrent=1, max_wait=0, store=slots)
            async with bulkhead:
                assert await asyncio.to_thread(bulkhead.try_acquire) is None
            permit = bulkhead.try_acquire()
            assert permit is not None
            permit.release()
            await from_url.aclose()
            await slots.aclose()
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_breaker_opened_by_one_instance_is_open_for_the_other(stores: Stores) -> None:
    client = redis.cluster.RedisCluster.from_url(stores.url, socket_timeout=0.5)
    try:
        here = CircuitBreaker(
            "payments", failure_threshold=2, reset_timeout=60, store=stores(RedisBreakerStore)
        )
        there = CircuitBreaker(
            "payments",
            failure_threshold=2,
            reset_timeout=60,
            store=stores(RedisBreakerStore, client=client),
            registry=Registry(),  # as another process would have
        )

        for _ in range(2):
            with pytest.raises(ConnectionError), here:
                raise ConnectionError("down")
        assert here.state == "open"
        with pytest.raises(CircuitOpenError), there:
            pass
        assert there.state == "open"
    finally:
        client.close()


def test_bulkhead_slots_are_shared_between_instances(stores: Stores) -> None:
    a = Bulkhead("reports", max_concurrent=1, max_wait=0, store=stores(RedisBulkheadStore))
    b = Bulkhead(
        "reports",
        max_concurrent=1,
        max_wait=0,
        store=stores(RedisBulkheadStore),
        registry=Registry(),
    )
    held = a.try_acquire()
    assert held is not None
    assert b.try_acquire() is None
    held.release()
    permit = b.try_acquire()
    assert permit is not None
    permit.release()


def test_bulkhead_lease_is_renewed_on_the_node_that_owns_it(stores: Stores) -> None:
    holder = Bulkhead(
        "renewed", max_concurrent=1, max_wait=0, store=stores(RedisBulkheadStore, lease=0.3)
    )
    other = Bulkhead(
        "renewed",
        max_concurrent=1,
        max_wait=0,
        store=stores(RedisBulkheadStore, lease=0.3),
        registry=Registry(),
    )
    with holder:
        time.sleep(1.0)  # more than three leases: only the renewal keeps the slot held
        assert other.try_acquire() is None
    permit = other.try_acquire()
    assert permit is not None
    permit.release()


def test_saga_idempotency_key_replays_across_instances(stores: Stores) -> None:
    runs = []

    def build() -> Saga:
        saga = Saga("orders", idempotency=stores(RedisIdempotencyStore))

        @saga.step("charge")
        def charge(ctx: Any) -> int:
            runs.append(ctx.input)
            return 42

        return saga

    first = build().run({"order": 1}, key="order-1", ttl=60)
    again = build().run({"order": 1}, key="order-1", ttl=60)
    assert first.status == again.status == "completed"
    assert again.outputs == {"charge": 42}
    assert runs == [{"order": 1}]


def test_saga_refuses_the_idempotency_store_as_its_run_log(stores: Stores) -> None:
    """On a Cluster too, Saga(store=RedisIdempotencyStore) is refused when built and
    Saga(idempotency=...) works."""
    keys = stores(RedisIdempotencyStore)
    assert isinstance(keys, IdempotencyStore)
    assert not isinstance(keys, SagaStore)
    with pytest.raises(ConfigTypeError, match=r"store= must be a saga run log"):
        Saga("orders", store=keys)  # type: ignore[arg-type]
    saga = Saga("orders", idempotency=keys)
    saga.step("noop")(lambda ctx: 7)
    assert saga.run(None, key="k").outputs == {"noop": 7}


def test_a_client_of_another_kind_is_refused() -> None:
    with pytest.raises(ConfigTypeError, match="RedisCluster"):
        RedisRateLimiterStore(client=object())
    with pytest.raises(ConfigTypeError, match="cluster must be True or False"):
        RedisRateLimiterStore("redis://127.0.0.1:6379", cluster="yes")  # type: ignore[arg-type]


def test_concurrent_async_callers_are_pipelined_on_a_cluster(
    stores: Stores, nodes: list[redis.Redis]
) -> None:
    """Concurrent acquires of limiters living on different nodes share pipelined round
    trips (the Cluster pipeline sends each command to its slot's node), each caller gets
    its own verdict, and a posted bulkhead release reaches its node."""

    async def main() -> None:
        store = stores(RedisRateLimiterStore)
        limiters = [
            RateLimiter(f"piped-{i}", rate=1, per=60, burst=3, max_wait=0, store=store)
            for i in range(4)
        ]
        results = await asyncio.gather(
            *(limiters[i % 4].acquire_async() for i in range(20)), return_exceptions=True
        )
        assert sum(r is None for r in results) == 12  # 3 per limiter
        assert all(isinstance(r, RateLimited) for r in results if r is not None)
        batcher = store._conn.batcher()
        assert batcher.calls == 20
        assert batcher.round_trips < 20
        slots = stores(RedisBulkheadStore)
        bulkhead = Bulkhead("piped", max_concurrent=2, store=slots)
        held = await asyncio.gather(*(bulkhead.acquire_async() for _ in range(2)))
        for lease in held:
            await lease.release_async()
        await slots.aclose()
        owner = nodes[_slot_owner(nodes, bulkhead.binding.key)]
        assert owner.zcard(bulkhead.binding.key) == 0
        await store.aclose()

    asyncio.run(main())
