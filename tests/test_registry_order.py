"""Registry order and membership: the kept (kind, name) order, changes during a read, and
primitives that are garbage collected."""

from __future__ import annotations

import gc
import random
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from buttress import Bulkhead, CircuitBreaker, Registry
from buttress._policy import Policy


def _make(kind: str, name: str, registry: Registry) -> Policy:
    if kind == "bulkhead":
        return Bulkhead(name, max_concurrent=1, registry=registry)
    return CircuitBreaker(name, registry=registry)


def test_iteration_health_and_state_follow_kind_then_name() -> None:
    """Whatever order primitives join in, every view lists them by (kind, name)."""
    registry = Registry()
    pairs = [(kind, f"p{n}") for kind in ("bulkhead", "circuit_breaker") for n in range(50)]
    random.Random(7).shuffle(pairs)
    members = [_make(kind, name, registry) for kind, name in pairs]
    expected = sorted(pairs)
    assert [(p.kind, p.name) for p in registry] == expected
    assert list(registry.health()["checks"]) == [f"{name}:{kind}" for kind, name in expected]
    state = registry.state()
    assert [(kind, name) for kind in state for name in state[kind]] == expected
    # A newcomer after a read lands in its place too.
    members.append(_make("bulkhead", "a-first", registry))
    assert next(iter(registry)).name == "a-first"
    assert len(registry) == len(members)


def test_members_joining_and_leaving_during_health() -> None:
    """A health check that registers one primitive and unregisters another mid-read: the
    read finishes on the order it started with, the next read sees the change."""
    registry = Registry()
    keep = [_make("circuit_breaker", f"c{n}", registry) for n in range(5)]
    late: list[Policy] = []

    class Meddling(Bulkhead):
        def health_check(self) -> tuple[str, Any, str]:
            if not late:
                late.append(_make("circuit_breaker", "c-late", registry))
                registry.unregister(keep[0])
            return super().health_check()

    meddler = Meddling("meddler", max_concurrent=1, registry=registry)
    first = registry.health()["checks"]
    assert "c0:circuit_breaker" in first and "c-late:circuit_breaker" not in first
    second = registry.health()["checks"]
    assert "c0:circuit_breaker" not in second and "c-late:circuit_breaker" in second
    assert "meddler:bulkhead" in second
    assert registry.get("circuit_breaker", "c0") is None
    del meddler


def test_collected_primitives_leave_and_their_names_come_back() -> None:
    """Primitives held only by the registry disappear from every view; their names can be
    registered again; the order sheds the dead entries once they are most of it."""
    registry = Registry()
    keep = [_make("bulkhead", f"keep{n}", registry) for n in range(3)]
    gone = [_make("bulkhead", f"gone{n}", registry) for n in range(100)]
    registry.health()
    del gone
    gc.collect()
    assert len(registry) == 3
    assert [p.name for p in registry] == ["keep0", "keep1", "keep2"]
    assert len(registry._entries) == 3  # most entries were dead: the read dropped them
    again = _make("bulkhead", "gone7", registry)
    assert [p.name for p in registry] == ["gone7", "keep0", "keep1", "keep2"]
    assert set(registry.state()["bulkhead"]) == {"gone7", "keep0", "keep1", "keep2"}
    registry.clear()
    assert list(registry) == [] and registry.health()["checks"] == {}
    del keep, again


_names = st.sampled_from([f"n{i}" for i in range(8)])
_kinds = st.sampled_from(["bulkhead", "circuit_breaker"])
_steps = st.lists(
    st.tuples(st.sampled_from(["add", "unregister", "drop", "read"]), _kinds, _names),
    max_size=60,
)


@given(_steps)
def test_membership_agrees_with_a_dict(steps: list[tuple[str, str, str]]) -> None:
    """Registering, unregistering, dropping the last reference and reading, in any order:
    iteration always gives the live members sorted by (kind, name)."""
    registry = Registry()
    model: dict[tuple[str, str], Policy] = {}
    for op, kind, name in steps:
        key = (kind, name)
        if op == "add" and key not in model:
            model[key] = _make(kind, name, registry)
        elif op == "unregister" and key in model:
            registry.unregister(model.pop(key))
        elif op == "drop" and key in model:
            del model[key]
            gc.collect()
        elif op == "read":
            registry.health()
        assert [(p.kind, p.name) for p in registry] == sorted(model)
        assert len(registry) == len(model)
