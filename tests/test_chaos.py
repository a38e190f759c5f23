"""buttress.chaos: off unless enabled, deterministic under a seed, and useful in pipelines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import buttress
from buttress import CircuitBreaker, CircuitOpenError, chaos, pipeline, retry
from buttress.chaos import ChaosInjected, InjectedFault
from buttress.testing import FakeClock, capture_events


@pytest.fixture(autouse=True)
def _chaos_off(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts with chaos off and no chaos variables in the environment."""
    monkeypatch.delenv(chaos.ENV_SWITCH, raising=False)
    monkeypatch.delenv(chaos.ENV_SEED, raising=False)
    saved = chaos._switch.state, chaos._switch.env
    chaos._switch.state = chaos._switch.env = None
    yield
    chaos._switch.state, chaos._switch.env = saved


def injected_positions(policy: chaos.Fault, calls: int) -> list[int]:
    """The call numbers (from 0) at which ``policy`` raised."""
    protected = policy(lambda i: i)
    positions = []
    for i in range(calls):
        try:
            protected(i)
        except Exception:
            positions.append(i)
    return positions


# -- off unless enabled ---------------------------------------------------------------------


def test_nothing_is_injected_unless_enabled(face: Any) -> None:
    """A forgotten chaos policy, even at rate 1, does nothing while chaos is off."""
    calls = face.wrap(
        pipeline(chaos.fault(1.0), chaos.latency(1.0, 5), chaos.result(1.0, "fake")),
        lambda: "real",
    )
    assert not chaos.is_enabled()
    assert chaos.current_seed() is None
    assert [calls() for _ in range(100)] == ["real"] * 100


def test_enable_is_immediate_and_its_block_restores(face: Any) -> None:
    """enable() takes effect at once; used as a context manager it restores the old state."""
    call = face.wrap(chaos.result(1.0, "fake"), lambda: "real")
    with chaos.enable(seed=1) as switch:
        assert chaos.is_enabled()
        assert chaos.current_seed() == 1
        assert call() == "fake"
        assert "enabled=True" in repr(switch)
    assert not chaos.is_enabled()
    assert call() == "real"
    chaos.enable(seed=2)
    assert call() == "fake"
    chaos.disable()
    assert call() == "real"


def test_enable_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Switching chaos on is loud: a warning on the buttress.chaos logger."""
    with chaos.enable(seed=3):
        pass
    assert any(
        record.name == "buttress.chaos"
        and record.levelname == "WARNING"
        and "seed=3" in record.message
        for record in caplog.records
    )


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_the_environment_can_enable_chaos(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """BUTTRESS_CHAOS=1 (or true/yes/on) switches chaos on for the process."""
    monkeypatch.setenv(chaos.ENV_SWITCH, value)
    assert not chaos.is_enabled()  # read at import, and on request only
    assert chaos.read_environment()
    assert chaos.is_enabled()
    assert isinstance(chaos.current_seed(), int)  # a random seed, reported for replay
    assert injected_positions(chaos.fault(1.0), 3) == [0, 1, 2]


@pytest.mark.parametrize("value", ["", "0", "false", "no", "off", "maybe"])
def test_other_environment_values_mean_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """Anything but an explicit yes leaves chaos off."""
    monkeypatch.setenv(chaos.ENV_SWITCH, value)
    assert not chaos.read_environment()
    assert not chaos.is_enabled()
    assert injected_positions(chaos.fault(1.0), 3) == []


def test_disable_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """chaos.disable() forces chaos off even when the environment says on."""
    monkeypatch.setenv(chaos.ENV_SWITCH, "1")
    chaos.read_environment()
    with chaos.disable():
        assert not chaos.is_enabled()
        assert injected_positions(chaos.fault(1.0), 3) == []
    assert chaos.is_enabled()


def test_the_environment_seed_matches_enable_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """BUTTRESS_CHAOS_SEED=42 injects exactly where enable(seed=42) does."""
    with chaos.enable(seed=42):
        expected = injected_positions(chaos.fault(0.2), 500)
    monkeypatch.setenv(chaos.ENV_SWITCH, "1")
    monkeypatch.setenv(chaos.ENV_SEED, "42")
    chaos.read_environment()
    assert chaos.current_seed() == 42
    assert injected_positions(chaos.fault(0.2), 500) == expected


# -- determinism and statistics ---------------------------------------------------------------


def test_a_seed_fixes_the_injections_exactly() -> None:
    """rate 0.1 over 10,000 calls under seed 42: always the same 1,021 positions."""
    with chaos.enable(seed=42):
        positions = injected_positions(chaos.fault(0.1, ConnectionError), 10_000)
    assert len(positions) == 1021
    assert positions[:10] == [3, 9, 10, 21, 22, 36, 39, 40, 48, 50]
    with chaos.enable(seed=42):  # every enable restarts the streams
        assert injected_positions(chaos.fault(0.1, ConnectionError), 10_000) == positions
    with chaos.enable(seed=43):
        assert injected_positions(chaos.fault(0.1, ConnectionError), 10_000) != positions


def test_named_policies_have_independent_streams() -> None:
    """A named policy's injections depend on its name and the seed, not on other policies."""
    db_policy = chaos.fault(0.3, name="db")
    cache_policy = chaos.fault(0.3, name="cache")
    with chaos.enable(seed="ci"):
        alone = injected_positions(db_policy, 200)
    with chaos.enable(seed="ci"):
        noise = cache_policy(lambda: None)
        db = db_policy(lambda i: i)
        positions = []
        for i in range(200):
            with contextlib.suppress(InjectedFault):
                noise()  # another policy drawing in between changes nothing for db
            try:
                db(i)
            except InjectedFault:
                positions.append(i)
    assert positions == alone
    with chaos.enable(seed="ci"):
        assert injected_positions(cache_policy, 200) != alone


def test_the_observed_rate_is_right_over_many_seeds() -> None:
    """Across 200 seeds x 1,000 calls the injected fraction matches the rate."""
    total = 0
    per_seed = []
    for seed in range(200):
        with chaos.enable(seed=seed):
            count = len(injected_positions(chaos.fault(0.1), 1000))
        per_seed.append(count)
        total += count
    # 200,000 Bernoulli(0.1) draws: standard deviation of the fraction is ~0.00067.
    assert abs(total / 200_000 - 0.1) < 0.003
    # Each seed's count is Binomial(1000, 0.1): sd ~9.5; none should be 6 sd away.
    assert all(40 < count < 160 for count in per_seed)
    assert len(set(per_seed)) > 20  # the seeds really differ


def test_rates_zero_and_one_are_exact() -> None:
    """rate 0 never injects and rate 1 always does."""
    with chaos.enable(seed=5):
        assert injected_positions(chaos.fault(0.0), 1000) == []
        assert len(injected_positions(chaos.fault(1.0), 1000)) == 1000


def test_counts_are_exact_across_threads() -> None:
    """Threads share one stream under a lock: the total injected is the seed's exact count."""
    with chaos.enable(seed=42):
        policy = chaos.fault(0.1, ConnectionError)
        protected = policy(lambda: None)
        failures = []
        lock = threading.Lock()

        def worker() -> None:
            mine = 0
            for _ in range(1250):
                try:
                    protected()
                except ConnectionError:
                    mine += 1
            with lock:
                failures.append(mine)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sum(failures) == 1021  # the same as sequentially: same draws, same count
        assert policy.snapshot()["calls"] == 10_000


# -- the three policies ---------------------------------------------------------------------


def test_fault_raises_instead_of_calling(face: Any, flaky: Any) -> None:
    """An injected fault raises before the function runs."""
    behaviour = flaky()
    call = face.wrap(chaos.fault(1.0, TimeoutError), behaviour)
    with chaos.enable(seed=0), pytest.raises(TimeoutError, match=r"injected by buttress\.chaos"):
        call()
    assert behaviour.calls == 0


def test_fault_accepts_instances_and_factories() -> None:
    """An instance is raised as a fresh copy each time; a factory is called per injection."""
    template = ConnectionError("reset by peer")
    protected = chaos.fault(1.0, template)(lambda: None)
    raised = []
    with chaos.enable(seed=0):
        for _ in range(3):
            try:
                protected()
            except ConnectionError as exc:
                raised.append(exc)
    assert [str(exc) for exc in raised] == ["reset by peer"] * 3
    assert len({id(exc) for exc in raised}) == 3
    assert template.__traceback__ is None  # the template never piles up frames

    made = chaos.fault(1.0, lambda: OSError(104, "reset"))(lambda: None)
    with chaos.enable(seed=0), pytest.raises(OSError, match="reset") as info:
        made()
    assert info.value.errno == 104


def test_the_default_fault_is_a_connection_error() -> None:
    """InjectedFault is a ConnectionError (so retries on it apply) and a ButtressError."""
    assert issubclass(InjectedFault, ConnectionError)
    assert issubclass(InjectedFault, buttress.ButtressError)


def test_latency_sleeps_on_the_clock(face: Any) -> None:
    """Injected latency sleeps through the policy's clock (asleep for async)."""
    clock = FakeClock()
    call = face.wrap(chaos.latency(1.0, 2.5, clock=clock), lambda: "done")
    with chaos.enable(seed=0):
        assert call() == "done"
    assert clock.sleeps == [2.5]
    assert clock.now() == 2.5


def test_latency_ranges_are_drawn_uniformly() -> None:
    """A (low, high) latency draws each delay in the range, reproducibly."""
    clock = FakeClock()
    protected = chaos.latency(0.5, (0.1, 0.3), clock=clock)(lambda: None)
    with chaos.enable(seed=9):
        for _ in range(1000):
            protected()
    first = list(clock.sleeps)
    assert 400 < len(first) < 600
    assert all(0.1 <= delay <= 0.3 for delay in first)
    assert min(first) < 0.12 and max(first) > 0.28
    clock.sleeps.clear()
    with chaos.enable(seed=9):
        for _ in range(1000):
            protected()
    assert clock.sleeps == first


def test_result_replaces_the_call(face: Any, flaky: Any) -> None:
    """An injected result is returned without running the function."""
    behaviour = flaky(value="real")
    call = face.wrap(chaos.result(0.5, None), behaviour)
    with chaos.enable(seed=4):
        results = [call() for _ in range(100)]
    assert results.count(None) + results.count("real") == 100
    assert behaviour.calls == results.count("real")
    assert 30 < results.count(None) < 70


def test_context_manager_faces() -> None:
    """fault and latency also guard blocks; result cannot."""
    clock = FakeClock()
    with chaos.enable(seed=0):
        with pytest.raises(InjectedFault), chaos.fault(1.0):
            pass
        with chaos.latency(1.0, 3, clock=clock):
            pass

        async def block() -> None:
            async with chaos.latency(1.0, 4, clock=clock):
                pass
            with pytest.raises(InjectedFault):
                async with chaos.fault(1.0):
                    pass

        asyncio.run(block())
    assert clock.sleeps == [3, 4]
    with pytest.raises(TypeError, match="cannot guard a block"), pipeline(chaos.result(1, 0)):
        pass


def test_injections_emit_events(face: Any) -> None:
    """Each injection emits ChaosInjected with its mode and what was injected."""
    clock = FakeClock()
    call = face.wrap(
        pipeline(chaos.latency(1.0, 1, clock=clock), chaos.fault(1.0, KeyError, name="f")),
        lambda: None,
    )
    with chaos.enable(seed=0), capture_events() as events, pytest.raises(KeyError):
        call()
    assert [type(event) for event in events] == [ChaosInjected, ChaosInjected]
    latency, fault = events
    assert isinstance(latency, ChaosInjected) and isinstance(fault, ChaosInjected)
    assert (latency.mode, latency.delay, latency.source) == ("latency", 1.0, "chaos")
    assert (fault.mode, fault.name) == ("fault", "f")
    assert isinstance(fault.error, KeyError)
    json.dumps(fault.to_dict())


def test_named_policies_show_in_state_and_warn_in_health() -> None:
    """state() shows the counts; health() warns while chaos is on."""
    policy = chaos.fault(0.5, ConnectionError, name="payments-chaos")
    protected = policy(lambda: None)
    assert buttress.health()["status"] == "pass"
    with chaos.enable(seed=11):
        for _ in range(100):
            with contextlib.suppress(ConnectionError):
                protected()
        state = buttress.state()["chaos"]["payments-chaos"]
        json.dumps(state)
        assert state["mode"] == "fault"
        assert state["enabled"] is True
        assert state["seed"] == 11
        assert state["calls"] == 100
        assert state["exc"] == "ConnectionError"
        assert 30 < state["injected"] < 70
        health = buttress.health()
        assert health["status"] == "warn"
        check = health["checks"]["payments-chaos:chaos"][0]
        assert check["output"] == "chaos injection is enabled"
    assert buttress.health()["status"] == "pass"
    latency = chaos.latency(0.1, (1, 2), name="slow").snapshot()
    assert latency["seconds"] == [1.0, 2.0]
    assert chaos.result(0.1, [], name="empty").snapshot()["value"] == "[]"


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: chaos.fault(-0.1), ValueError, "rate must be >= 0"),
        (lambda: chaos.fault(1.5), ValueError, "rate must be <= 1"),
        (lambda: chaos.fault("0.1"), TypeError, "rate must be a number"),
        (lambda: chaos.fault(0.1, 42), TypeError, "exc must be an exception class"),
        (lambda: chaos.fault(0.1, UnicodeDecodeError), TypeError, "cannot be built"),
        (lambda: chaos.latency(0.1, -1), ValueError, "seconds must be"),
        (lambda: chaos.latency(0.1, (2, 1)), ValueError, "low <= high"),
        (lambda: chaos.latency(0.1, (1, 2, 3)), ValueError, "pair"),
        (lambda: chaos.enable(seed=1.5), TypeError, "seed must be an int, a str or None"),
        (lambda: chaos.enable(seed=True), TypeError, "seed must be"),
    ],
)
def test_options_are_validated(build: Any, error: type[Exception], message: str) -> None:
    """Bad options raise config errors naming the parameter and value."""
    with pytest.raises(error, match=message) as info:
        build()
    assert isinstance(info.value, buttress.ConfigError)
    assert not chaos.is_enabled()


def test_a_factory_must_return_an_exception() -> None:
    """A factory returning something else is reported when it is used."""
    protected = chaos.fault(1.0, lambda: "oops")(lambda: None)  # type: ignore[arg-type,return-value]
    with chaos.enable(seed=0), pytest.raises(TypeError, match="must return an exception"):
        protected()


# -- proving resilience -------------------------------------------------------------------------


def replay_draws(seed: int, salt: str, count: int) -> list[float]:
    """The draws a policy makes under ``seed`` (same derivation as the library)."""
    rng = random.Random(f"{seed!r}/{salt}")
    return [rng.random() for _ in range(count)]


def test_retry_absorbs_exactly_the_faults_it_should(face: Any) -> None:
    """retry(3) over a 30 % fault: a caller fails exactly when 3 attempts in a row were hit."""
    clock = FakeClock()
    service = face.wrap(
        pipeline(
            retry(3, on=ConnectionError, clock=clock),
            chaos.fault(0.3, ConnectionError, name="dependency"),
        ),
        lambda: "ok",
    )
    outcomes = []
    with chaos.enable(seed=2024):
        for _ in range(1000):
            try:
                outcomes.append(service())
            except ConnectionError:
                outcomes.append("failed")
    # An independent replay of the same stream: walk the draws the way retry(3) must.
    draws = iter(replay_draws(2024, "dependency", 3000))
    expected = []
    for _ in range(1000):
        for _attempt in range(3):
            if next(draws) >= 0.3:
                expected.append("ok")
                break
        else:
            expected.append("failed")
    assert outcomes == expected
    assert 10 < expected.count("failed") < 50  # about 0.3**3 = 2.7 % reach the caller


def test_the_breaker_opens_under_an_outage_and_recovers() -> None:
    """A 100 % fault opens the breaker; it stops calling; it closes again once chaos stops."""
    clock = FakeClock()
    breaker = CircuitBreaker("dep", failure_threshold=5, reset_timeout=30, clock=clock)
    outage = chaos.fault(1.0, ConnectionError, name="outage")
    service = pipeline(breaker, outage)(lambda: "ok")
    with chaos.enable(seed=1):
        for _ in range(5):
            with pytest.raises(ConnectionError):
                service()
        for _ in range(20):
            with pytest.raises(CircuitOpenError):
                service()
        assert outage.snapshot()["calls"] == 5  # the open breaker shielded the dependency
    clock.advance(30)
    assert service() == "ok"  # the half-open probe succeeds: chaos is off again
    assert breaker.snapshot()["state"] == "closed"


def test_an_injected_fault_leaves_no_reference_cycle() -> None:
    """A raised fault does not keep its policy alive until the next garbage collection."""
    import gc
    import weakref

    policy = chaos.fault(1.0, name="cycle")
    protected = policy(lambda: None)
    gc.disable()
    try:
        with chaos.enable(seed=0), pytest.raises(InjectedFault):
            protected()
        ref = weakref.ref(policy)
        del policy, protected
        assert ref() is None
    finally:
        gc.enable()


def test_the_environment_is_read_when_buttress_is_imported() -> None:
    """A process started with BUTTRESS_CHAOS=1 has chaos on from the start, and says so."""
    import os
    import subprocess
    import sys

    code = (
        "import buttress; from buttress import chaos; "
        "assert chaos.is_enabled() and chaos.current_seed() == 'staging'"
    )
    env = {**os.environ, chaos.ENV_SWITCH: "1", chaos.ENV_SEED: "staging"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    )
    assert "chaos injection enabled by BUTTRESS_CHAOS" in done.stderr
