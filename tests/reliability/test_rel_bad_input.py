"""Bad input to calls and methods, and to the public constructors tests/test_validation.py
does not fuzz: the only outcomes are a working object (or a documented result) or a
TypeError/ValueError whose message names the offending parameter.

Each case is a public call with the parameters hypothesis may fill with anything
(numbers of every kind, NaN and infinities, strings, bytes, containers, callables,
exception classes, arbitrary objects); the other parameters keep valid values.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from reliability_support import examples

from buttress import (
    Bulkhead,
    CircuitBreaker,
    Fallback,
    RateLimited,
    RateLimiter,
    Saga,
    Step,
    backoff,
    events,
    fallback,
    pipeline,
    retry,
    timeout,
)
from buttress.backends.memory import MemoryStore
from buttress.backends.sqlite import SQLiteStore
from buttress.testing import FakeClock, isolated_registry, set_testing

ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**9), 10**9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=4),
    st.timedeltas(min_value=timedelta(seconds=-5), max_value=timedelta(seconds=5)),
    st.lists(st.integers(-2, 5), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.just(ValueError),
    st.just((KeyError, ValueError)),
    st.just(print),
    st.just(lambda *args: None),
    st.builds(object),
)


def limiter() -> RateLimiter:
    return RateLimiter(rate=1, burst=5, max_wait=0, clock=FakeClock())


def run_async(factory: Callable[[], Any]) -> Any:
    return asyncio.run(factory())


def saga() -> Saga:
    built = Saga("fuzzed")
    built.step("only", lambda ctx: "done")
    return built


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def step_fn(ctx: Any) -> str:
    return "done"


# (label, call taking the fuzzed keyword arguments, fuzzable parameters, documented
# exceptions besides TypeError/ValueError)
CASES: list[tuple[str, Callable[..., Any], list[str], tuple[type[BaseException], ...]]] = [
    ("RateLimiter.try_acquire", lambda **kw: limiter().try_acquire(**kw), ["weight"], ()),
    ("RateLimiter.acquire", lambda **kw: limiter().acquire(**kw), ["weight"], (RateLimited,)),
    (
        "RateLimiter.acquire_async",
        lambda **kw: run_async(lambda: limiter().acquire_async(**kw)),
        ["weight"],
        (RateLimited,),
    ),
    ("FakeClock", lambda **kw: FakeClock(**kw), ["start", "autojump", "grace"], ()),
    ("FakeClock.advance", lambda **kw: FakeClock().advance(**kw), ["seconds"], ()),
    ("set_testing", lambda **kw: set_testing(**kw).__exit__(), ["testing", "attempts"], ()),
    ("backoff.constant", lambda **kw: backoff.constant(**kw), ["delay"], ()),
    (
        "backoff.linear",
        lambda **kw: backoff.linear(**{"initial": 0, "step": 1, "max": 2, **kw}),
        ["initial", "step", "max"],
        (),
    ),
    (
        "backoff.decorrelated",
        lambda **kw: backoff.decorrelated(**{"initial": 1, "max": 2, **kw}),
        ["initial", "max"],
        (),
    ),
    ("fallback", lambda **kw: fallback(**kw), ["value", "handler", "on", "name"], ()),
    ("Fallback", lambda **kw: Fallback(**kw), ["value", "handler", "on"], ()),
    ("pipeline", lambda **kw: pipeline(*kw.values()), ["policies"], ()),
    (
        "CircuitBreaker(name, listeners, registry, clock)",
        lambda **kw: CircuitBreaker(**kw),
        ["name", "listeners", "registry", "clock", "exclude", "include", "store"],
        (),
    ),
    (
        "Bulkhead(name, listeners, clock)",
        lambda **kw: Bulkhead(**{"max_concurrent": 1, **kw}),
        ["name", "listeners", "clock"],
        (),
    ),
    (
        "RateLimiter(store, max_keys)",
        lambda **kw: RateLimiter(**{"rate": 1, **kw}),
        ["store", "max_keys", "name"],
        (),
    ),
    (
        "retry(on, budget, retry_if_result)",
        lambda **kw: retry(**kw),
        ["on", "budget", "retry_if_result", "name", "listeners"],
        (),
    ),
    ("timeout(name, clock)", lambda **kw: timeout(**{"seconds": 1, **kw}), ["name", "clock"], ()),
    ("events.subscribe", lambda **kw: events.subscribe(**kw)(), ["listener"], ()),
    ("MemoryStore", lambda **kw: MemoryStore(**kw), ["max_runs"], ()),
    (
        "Saga",
        lambda **kw: Saga(**{"name": "fuzzed", **kw}),
        ["name", "store", "idempotency", "validate", "timeout", "lease", "listeners", "clock"],
        (),
    ),
    (
        "Saga.step",
        lambda **kw: Saga("fuzzed").step(**{"name": "s", "fn": step_fn, **kw}),
        [
            "name",
            "fn",
            "compensate",
            "retry",
            "timeout",
            "policy",
            "compensate_uncertain",
            "permanent",
            "compensate_retry",
        ],
        (),
    ),
    (
        "Step",
        lambda **kw: Step(**{"name": "s", "fn": step_fn, **kw}),
        [
            "name",
            "fn",
            "compensate",
            "retry",
            "timeout",
            "policy",
            "compensate_uncertain",
            "permanent",
            "compensate_retry",
        ],
        (),
    ),
    (
        "Saga.parallel",
        lambda **kw: Saga("fuzzed").parallel(
            kw.get("name", "group"), *as_list(kw.get("steps", [Step("s", step_fn)]))
        ),
        ["name", "steps"],
        (),
    ),
    ("Saga.run", lambda **kw: saga().run(**kw), ["key", "ttl"], ()),
    ("Saga.resolve", lambda **kw: saga().resolve(**{"run_id": "nope", **kw}), ["note"], ()),
]


# Where a message names the parameter by another word: resolve() says which run, and
# parallel(name, *steps) says it "needs at least one step".
ALIASES = {"Saga.resolve": ["run "], "Saga.parallel": ["step"]}


def names_the_parameter(message: str, parameters: list[str]) -> bool:
    return any(name in message for name in parameters)


@examples(600, 10_000)
@given(data=st.data())
def test_fuzzed_calls_work_or_name_the_parameter(data):
    """Anything passed to a public call: it works, or a TypeError/ValueError names it."""
    label, call, parameters, documented = data.draw(st.sampled_from(CASES), label="case")
    chosen = data.draw(st.lists(st.sampled_from(parameters), min_size=1, unique=True))
    kwargs = {name: data.draw(ANYTHING, label=name) for name in chosen}
    try:
        with isolated_registry():
            call(**kwargs)
    except documented:
        pass
    except (TypeError, ValueError) as exc:
        message = str(exc)
        # The message names one of the call's parameters (usually the fuzzed one; for
        # fallback(on=...) alone, the missing value= or handler=).
        assert names_the_parameter(message, [*parameters, *ALIASES.get(label, ())]), (
            f"{label}({kwargs!r}) raised {type(exc).__name__}: {message}"
        )


def test_sqlite_store_options(tmp_path: Path):
    """SQLiteStore: a bad path, synchronous or timeout is refused, naming it."""
    with pytest.raises(TypeError, match="path"):
        SQLiteStore(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore(tmp_path / "a.db", synchronous="SOMETIMES")


@pytest.mark.parametrize("value", [-1.0, math.nan, "5"])
def test_sqlite_store_timeout_is_validated(tmp_path: Path, value: Any):
    """SQLiteStore's timeout is checked like every other duration."""
    with pytest.raises((TypeError, ValueError), match="timeout"):
        SQLiteStore(tmp_path / "a.db", timeout=value)


@pytest.mark.parametrize("key", [[], {}, {1}])
def test_for_key_names_an_unhashable_key(key: Any):
    """for_key() refuses an unhashable key with a message naming ``key``."""
    with pytest.raises(TypeError, match="key must be hashable"):
        limiter().for_key(key)


@examples(200, 3000)
@given(key=st.one_of(st.none(), st.integers(), st.text(max_size=4), st.tuples(st.integers())))
def test_for_key_accepts_any_hashable_key(key: Any):
    """Any hashable key gets its own working limiter."""
    view = limiter().for_key(key)
    assert view.try_acquire() is True


@pytest.mark.parametrize("run_id", [[], None, 42])
def test_resolve_names_a_bad_run_id(run_id: Any):
    """resolve() refuses a run id that is not a string, naming ``run_id``."""
    with pytest.raises(TypeError, match="run_id"):
        saga().resolve(run_id)
