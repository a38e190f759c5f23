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
