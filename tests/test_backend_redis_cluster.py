"""The Redis stores on a real Redis Cluster: three redis-server nodes of the test's own,
on spare loopback ports, with every slot assigned. Each primitive's state is one
hash-tagged key, so each call goes to the one node that owns its slot; different names
land on different nodes, and the stores share state across instances as on a single
server."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
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
from services import Stores, unique

NODES = 3
BUS_OFFSET = 10_000  # a Cluster node also listens on port + 10000 for its peers


def _ports(count: int) -> list[int]:
    """Free loopback ports whose cluster-bus port (+10000) is free as well."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + BUS_OFFSET > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + BUS_OFFSET))
            except OSError:
                continue
        ports.append(port)
    return ports


class Cluster:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports = _ports(NODES)
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        for port in self.ports:
            home = self.directory / str(port)
            home.mkdir()
            self.processes.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(home / "nodes.conf"),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(home),
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
        for port in self.ports:
            self._wait(lambda client: client.ping(), port, "start")
        # Assign every slot (an equal range per node), then introduce the nodes.
        per_node = -(-16384 // NODES)
        for i, port in enumerate(self.ports):
            with redis.Redis(port=port, socket_timeout=5) as node:
                slots = range(i * per_node, min((i + 1) * per_node, 16384))
                node.execute_command("CLUSTER", "ADDSLOTS", *slots)
                if i:
                    node.execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[0])
        for port in self.ports:
            self._wait(
                lambda client: client.cluster("info")["cluster_state"] == "ok", port, "agree"
            )

    @staticmethod
    def _wait(ready: Any, port: int, what: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            client = redis.Redis(port=port, socket_timeout=0.5, decode_responses=True)
            try:
                if ready(client):
                    return
            except redis.RedisError:
                pass
            finally:
                client.close()
            time.sleep(0.05)
        raise RuntimeError(f"the Redis Cluster node on port {port} did not {what}")

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if shutil.which("redis-server") is None:
        reason = "redis-server is not on PATH (needed to start a Redis Cluster)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    own = Cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        own.start()
        yield own
    finally:
        own.stop()


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
                assert not await asyncio.to_thread(bulkhead.try_acquire)
            assert bulkhead.try_acquire()
            bulkhead.release()
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
    assert a.try_acquire()
    assert not b.try_acquire()
    a.release()
    assert b.try_acquire()
    b.release()


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
        assert not other.try_acquire()
    assert other.try_acquire()
    other.release()


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
