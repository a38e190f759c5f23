"""Bad input: every constructor rejects it with a message naming the parameter and value."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import buttress
from buttress import (
    Bulkhead,
    CircuitBreaker,
    ConfigError,
    RateLimiter,
    RetryBudget,
    backoff,
    debounce,
    fallback,
    hedge,
    retry,
    throttle,
    timeout,
)

NAN, INF = math.nan, math.inf

CASES: list[tuple[Any, dict[str, Any], type[Exception], str]] = [
    (retry, {"attempts": 0}, ValueError, "attempts must be >= 1, got 0"),
    (retry, {"attempts": 2.5}, TypeError, "attempts must be an integer, got 2.5"),
    (retry, {"attempts": True}, TypeError, "attempts must be an integer"),
    (retry, {"on": "ValueError"}, TypeError, "on must be an exception class"),
    (retry, {"on": (ValueError, 3)}, TypeError, "or a tuple or list of them, got 3 (int)"),
    (retry, {"on": [ValueError, int]}, TypeError, "on must contain only exception classes or"),
    (retry, {"on": []}, ValueError, "on must name at least one exception class or predicate"),
    (retry, {"backoff": []}, ValueError, "backoff must hold at least one delay"),
    (retry, {"backoff": ()}, ValueError, "backoff must hold at least one delay"),
    (retry, {"deadline": -1}, ValueError, "deadline must be a finite number of seconds > 0"),
    (retry, {"deadline": NAN}, ValueError, "deadline must be a finite number of seconds, got nan"),
    (retry, {"backoff": 3}, TypeError, "backoff must be an iterable"),
    (retry, {"backoff": [0.1, -1]}, ValueError, "backoff[1] must be"),
    (retry, {"budget": 0.5}, TypeError, "budget must be a buttress.RetryBudget"),
    (retry, {"retry_if_result": 1}, TypeError, "retry_if_result must be callable"),
    (retry, {"name": ""}, ValueError, "name must not be empty"),
    (retry, {"name": 5}, TypeError, "name must be a string"),
    (retry, {"listeners": [1]}, TypeError, "listeners must contain only callables"),
    (retry, {"listeners": print}, TypeError, "listeners must be a list"),
    (retry, {"clock": object()}, TypeError, "clock must implement buttress.Clock"),
    (retry, {"registry": {}}, TypeError, "registry must be a buttress.Registry"),
    (CircuitBreaker, {"failure_threshold": 0}, ValueError, "failure_threshold must be >= 1, got 0"),
    (CircuitBreaker, {"reset_timeout": 0}, ValueError, "reset_timeout must be a finite number"),
    (CircuitBreaker, {"reset_timeout": INF}, ValueError, "reset_timeout must be a finite number"),
    (CircuitBreaker, {"reset_timeout": "30"}, TypeError, "reset_timeout must be a number"),
    (CircuitBreaker, {"failure_rate": 0}, ValueError, "failure_rate must be > 0, got 0"),
    (CircuitBreaker, {"failure_rate": 1.5}, ValueError, "failure_rate must be <= 1, got 1.5"),
    (CircuitBreaker, {"failure_rate": NAN}, ValueError, "failure_rate must be a finite number"),
    (CircuitBreaker, {"failure_rate": 0.5, "window": 5}, ValueError, "minimum_calls must be <="),
    (CircuitBreaker, {"window": -3}, ValueError, "window must be >= 1, got -3"),
    (CircuitBreaker, {"half_open_max_calls": 0}, ValueError, "half_open_max_calls must be >= 1"),
    (CircuitBreaker, {"slow_call_duration": -1}, ValueError, "slow_call_duration must be"),
    (
        CircuitBreaker,
        {"exclude": [1]},
        TypeError,
        "exclude must be an exception class, a predicate",
    ),
    (CircuitBreaker, {"include": ()}, ValueError, "include must name at least one"),
    (CircuitBreaker, {"store": "redis://"}, TypeError, "store must be a breaker store"),
    (
        RateLimiter,
        {"rate": 1, "store": object()},
        TypeError,
        "store must be a rate-limiter store (LimiterStore)",
    ),
    (Bulkhead, {"max_concurrent": 1, "store": 42}, TypeError, "store must be a bulkhead store"),
    (Bulkhead, {"max_concurrent": 0}, ValueError, "max_concurrent must be >= 1, got 0"),
    (Bulkhead, {"max_concurrent": 1, "max_queue": -1}, ValueError, "max_queue must be >= 0"),
    (Bulkhead, {"max_concurrent": 1, "max_wait": NAN}, ValueError, "max_wait must be a finite"),
    (Bulkhead, {"max_concurrent": "2"}, TypeError, "max_concurrent must be an integer, got '2'"),
    (RateLimiter, {"rate": 0}, ValueError, "rate must be > 0, got 0"),
    (RateLimiter, {"rate": INF}, ValueError, "rate must be a finite number, got inf"),
    (RateLimiter, {"rate": 1, "per": 0}, ValueError, "per must be a finite number of seconds > 0"),
    (RateLimiter, {"rate": 1, "burst": 0}, ValueError, "burst must be >= 1, got 0"),
    (RateLimiter, {"rate": 1, "max_wait": -0.5}, ValueError, "max_wait must be a finite number"),
    (RateLimiter, {"rate": 1, "max_keys": 0}, ValueError, "max_keys must be >= 1"),
    (timeout, {"seconds": 0}, ValueError, "seconds must be a finite number of seconds > 0, got 0"),
    (timeout, {"seconds": None}, TypeError, "seconds must be a number of seconds, got None"),
    (hedge, {"delay": -1}, ValueError, "delay must be a finite number of seconds >= 0"),
    (hedge, {"delay": 1, "max_hedged": 0}, ValueError, "max_hedged must be >= 1"),
    (fallback, {"value": 1, "on": 5}, TypeError, "on must be an exception class"),
    (fallback, {"handler": "x"}, TypeError, "handler must be callable"),
    (debounce, {"wait": NAN}, ValueError, "wait must be a finite number of seconds"),
    (throttle, {"interval": "1"}, TypeError, "interval must be a number of seconds"),
    (RetryBudget, {"ratio": -1}, ValueError, "ratio must be >= 0, got -1"),
    (RetryBudget, {"window": 0}, ValueError, "window must be a finite number of seconds > 0"),
    (backoff.exponential, {"initial": -1}, ValueError, "initial must be"),
    (backoff.exponential, {"multiplier": 0.5}, ValueError, "multiplier must be >= 1"),
    (backoff.exponential, {"initial": 2, "max": 1}, ValueError, "max must be >= initial"),
    (backoff.exponential, {"jitter": "some"}, ValueError, "jitter must be one of"),
    (backoff.constant, {"delay": INF}, ValueError, "delay must be a finite number of seconds"),
    (backoff.linear, {"initial": 1, "step": -1, "max": 2}, ValueError, "step must be"),
    (backoff.decorrelated, {"initial": 0, "max": 1}, ValueError, "initial must be"),
]


@pytest.mark.parametrize(("factory", "kwargs", "error", "message"), CASES)
def test_bad_options_name_the_parameter_and_value(factory, kwargs, error, message):
    """Each bad option raises TypeError/ValueError (and ConfigError) naming it."""
    needs_rate = factory is RateLimiter and "rate" not in kwargs
    needs_slots = factory is Bulkhead and "max_concurrent" not in kwargs
    if needs_rate:
        kwargs = {"rate": 1, **kwargs}
    if needs_slots:
        kwargs = {"max_concurrent": 1, **kwargs}
    with pytest.raises(error) as info:
        factory(**kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, buttress.ButtressError)


def test_timedelta_is_accepted_as_seconds():
    """Durations may be given as timedelta."""
    assert timeout(timedelta(milliseconds=1500)).seconds == 1.5
    assert CircuitBreaker(reset_timeout=timedelta(minutes=1)).reset_timeout == 60.0


@pytest.mark.parametrize(
    "policy",
    [
        retry(),
        CircuitBreaker(),
        Bulkhead(max_concurrent=1),
        RateLimiter(rate=1),
        timeout(1),
        fallback(0),
        hedge(1),
        debounce(1),
        buttress.pipeline(retry()),
    ],
)
@pytest.mark.parametrize("target", [None, 42, "f", object()])
def test_decorating_a_non_callable_is_a_type_error(policy, target):
    """Only callables can be decorated."""
    with pytest.raises(TypeError, match="can only decorate a callable"):
        policy(target)


def test_decorating_a_generator_function_without_a_generator_rule_is_a_type_error():
    """Policies with no stated rule for generators refuse them clearly (retry, breaker,
    bulkhead, limiter and timeout take them: tests/test_generators.py)."""

    def gen():
        yield 1

    with pytest.raises(TypeError, match="generator function"):
        buttress.fallback(None)(gen)


def test_duplicate_live_names_are_an_error_and_names_free_up():
    """Two live primitives of one kind cannot share a name; a collected one frees it."""
    import gc

    breaker = CircuitBreaker("payments")
    with pytest.raises(buttress.DuplicateNameError, match="payments"):
        CircuitBreaker("payments")
    Bulkhead("payments", max_concurrent=1)  # another kind may use the name
    del breaker
    gc.collect()
    CircuitBreaker("payments")


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.timedeltas(min_value=timedelta(seconds=-5), max_value=timedelta(seconds=5)),
    st.just(ValueError),
    st.just((KeyError, ValueError)),
    st.lists(st.floats(-1, 5), max_size=3),
)

SIGNATURES: list[tuple[Any, list[str], dict[str, Any]]] = [
    (retry, ["attempts", "deadline", "backoff", "on"], {}),
    (
        CircuitBreaker,
        [
            "failure_threshold",
            "reset_timeout",
            "half_open_max_calls",
            "failure_rate",
            "window",
            "minimum_calls",
            "slow_call_duration",
        ],
        {},
    ),
    (Bulkhead, ["max_concurrent", "max_queue", "max_wait"], {}),
    (RateLimiter, ["rate", "per", "burst", "max_wait"], {}),
    (timeout, ["seconds"], {}),
    (hedge, ["delay", "max_hedged"], {}),
    (debounce, ["wait", "max_wait", "leading", "trailing"], {}),
    (RetryBudget, ["ratio", "window", "min_per_second"], {}),
    (backoff.exponential, ["initial", "multiplier", "max", "jitter"], {}),
]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzzed_constructors_either_work_or_name_the_parameter(data):
    """Any arguments: a working object, or a TypeError/ValueError naming the parameter."""
    factory, params, _ = data.draw(st.sampled_from(SIGNATURES))
    chosen = data.draw(st.lists(st.sampled_from(params), min_size=1, unique=True))
    kwargs = {name: data.draw(values) for name in chosen}
    if factory in (Bulkhead,) and "max_concurrent" not in kwargs:
        kwargs["max_concurrent"] = 1
    if factory is RateLimiter and "rate" not in kwargs:
        kwargs["rate"] = 1
    if factory in (timeout,) and "seconds" not in kwargs:
        kwargs["seconds"] = 1
    if factory in (hedge,) and "delay" not in kwargs:
        kwargs["delay"] = 1
    if factory in (debounce,) and "wait" not in kwargs:
        kwargs["wait"] = 1
    try:
        factory(**kwargs)
    except (TypeError, ValueError) as exc:
        assert isinstance(exc, ConfigError), f"{type(exc).__name__}: {exc}"
        message = str(exc)
        assert any(name in message for name in [*kwargs, "initial", "wait", "window"]), message
