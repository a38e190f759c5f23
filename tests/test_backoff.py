"""Backoff schedules: properties of every generator, and user iterables."""

from __future__ import annotations

from itertools import islice, pairwise

from hypothesis import given
from hypothesis import strategies as st

from buttress import backoff

seconds = st.floats(0.0, 100.0)


@given(initial=seconds, multiplier=st.floats(1.0, 10.0), extra=seconds, n=st.integers(1, 60))
def test_exponential_without_jitter_grows_geometrically_up_to_max(initial, multiplier, extra, n):
    """No jitter: initial * multiplier**k, never above max, never decreasing."""
    cap = initial + extra
    delays = list(islice(backoff.exponential(initial, multiplier, cap, "none"), n))
    assert delays[0] == initial
    assert all(0 <= d <= cap for d in delays)
    assert all(a <= b for a, b in pairwise(delays))


@given(initial=seconds, extra=seconds, jitter=st.sampled_from(["full", "equal"]))
def test_jittered_delays_stay_within_their_band(initial, extra, jitter):
    """Full jitter lies in [0, d]; equal jitter in [d/2, d]."""
    cap = initial + extra
    plain = list(islice(backoff.exponential(initial, 2.0, cap, "none"), 30))
    jittered = list(islice(backoff.exponential(initial, 2.0, cap, jitter), 30))
    for base, delay in zip(plain, jittered, strict=True):
        low = 0.0 if jitter == "full" else base / 2
        assert low - 1e-9 <= delay <= base + 1e-9


@given(initial=st.floats(0.001, 10.0), extra=seconds)
def test_decorrelated_stays_between_initial_and_max(initial, extra):
    """Decorrelated jitter never leaves [initial, max]."""
    cap = initial + extra
    for delay in islice(backoff.decorrelated(initial, cap), 50):
        assert initial - 1e-9 <= delay <= cap + 1e-9


@given(initial=seconds, step=seconds, extra=seconds)
def test_linear_and_constant(initial, step, extra):
    """Linear adds step up to max; constant repeats."""
    cap = initial + extra
    delays = list(islice(backoff.linear(initial, step, cap), 20))
    assert delays[0] == initial
    assert all(d <= cap for d in delays)
    assert list(islice(backoff.constant(initial), 3)) == [initial] * 3


def test_each_iteration_starts_a_fresh_schedule():
    """A backoff object is reusable: each iter() starts from the first delay."""
    schedule = backoff.exponential(1.0, 2.0, 8.0, "none")
    assert list(islice(schedule, 4)) == [1.0, 2.0, 4.0, 8.0]
    assert list(islice(schedule, 2)) == [1.0, 2.0]


@given(
    initial=st.floats(0.0, 100.0),
    below=st.floats(0.0, 1.0),
    extra=seconds,
    jitter=st.sampled_from(["none", "full", "equal"]),
)
def test_a_floor_bounds_jittered_delays_from_below(initial, below, extra, jitter):
    """With min=, exponential and fibonacci delays stay in [min, delay], whatever the jitter."""
    floor, cap = initial * below, initial + extra
    for build in (backoff.exponential, backoff.fibonacci):
        plain = list(islice(build(initial, max=cap, jitter="none"), 30))
        floored = list(islice(build(initial, max=cap, jitter=jitter, min=floor), 30))
        for base, delay in zip(plain, floored, strict=True):
            assert floor - 1e-9 <= delay <= base + 1e-9


@given(initial=st.floats(0.001, 10.0), extra=seconds, n=st.integers(3, 40))
def test_fibonacci_without_jitter_adds_the_two_previous_delays(initial, extra, n):
    """Fibonacci: initial, initial, then each delay the sum of the two before, up to max."""
    cap = initial + extra
    delays = list(islice(backoff.fibonacci(initial, cap, "none"), n))
    assert delays[:2] == [min(initial, cap)] * 2
    for a, b, c in zip(delays, delays[1:], delays[2:], strict=False):
        assert c == min(a + b, cap) or c == cap
    assert all(a <= b <= cap for a, b in pairwise(delays))


@given(low=seconds, extra=seconds)
def test_random_stays_between_min_and_max(low, extra):
    """backoff.random(min, max) draws every delay from [min, max]."""
    for delay in islice(backoff.random(low, low + extra), 50):
        assert low - 1e-9 <= delay <= low + extra + 1e-9


@given(
    a=st.lists(seconds, min_size=1, max_size=5),
    b=st.lists(seconds, min_size=1, max_size=5),
    offset=seconds,
)
def test_schedules_add_up_step_by_step(a, b, offset):
    """(x + y)[n] == x[n] + y[n], a finite last delay repeating; a number adds a constant."""

    def padded(delays: list[float], n: int) -> list[float]:
        return (delays + [delays[-1]] * n)[:n]

    total = list(islice(backoff.constant(offset) + a + b, 10))
    assert total == [offset + x + y for x, y in zip(padded(a, 10), padded(b, 10), strict=True)]
    assert list(islice(a + backoff.constant(offset), 3)) == [x + offset for x in padded(a, 3)]


def test_new_schedules_validate_their_options():
    """Bad bounds, floors and operands raise ConfigError naming the value."""
    import pytest

    from buttress.exceptions import ConfigTypeError, ConfigValueError

    with pytest.raises(ConfigValueError, match="max must be >= min"):
        backoff.random(2, 1)
    with pytest.raises(ConfigValueError, match="min must be <= initial"):
        backoff.exponential(0.5, min=1.0)
    with pytest.raises(ConfigValueError, match="min"):
        backoff.fibonacci(1.0, min=-1)
    with pytest.raises(ConfigTypeError, match="adds up with"):
        backoff.constant(1) + "2"  # type: ignore[operator]
    with pytest.raises(ConfigValueError, match="at least one"):
        backoff.constant(1) + []  # noqa: RUF005 - a schedule, not a list
