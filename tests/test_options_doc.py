"""docs/options.md lists every option of every primitive, with the defaults the code has."""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import buttress
from buttress import adaptive, chaos
from buttress._policy import PolicyOptions
from buttress.saga import Saga

PAGE = Path(__file__).resolve().parent.parent / "docs" / "options.md"

COMMON = {"name", "listeners", "registry", "clock", "critical"}

BUILDERS: dict[str, tuple[Callable[..., Any], set[str]]] = {
    # label in the table -> (what builds it, parameters that are not options)
    "retry": (buttress.retry, set()),
    "RetryBudget": (buttress.RetryBudget, set()),
    "CircuitBreaker": (buttress.CircuitBreaker, set()),
    "Bulkhead": (buttress.Bulkhead, set()),
    "RateLimiter": (buttress.RateLimiter, set()),
    "timeout": (buttress.timeout, set()),
    "debounce": (buttress.debounce, set()),
    "throttle": (buttress.throttle, set()),
    "fallback": (buttress.fallback, set()),
    "hedge": (buttress.hedge, set()),
    "cache": (buttress.cache, set()),
    "AdaptiveBulkhead": (buttress.AdaptiveBulkhead, set()),
    "AIMD": (adaptive.AIMD, set()),
    "Gradient": (adaptive.Gradient, set()),
    "chaos.fault": (chaos.fault, set()),
    "chaos.latency": (chaos.latency, set()),
    "chaos.result": (chaos.result, set()),
    "Saga": (Saga, set()),
    "Saga.step": (Saga.step, {"self", "name", "fn"}),  # the step's name and function
}

_ROW = re.compile(
    r"^\| (?P<primitive>[^|]+) \| `(?P<option>\w+)` \| [^|]+ \| (?P<default>[^|]+) \|"
)
_LABEL = re.compile(r"`([\w.]+)`")


def rows() -> list[tuple[str, str, str]]:
    """``(primitive label, option, default cell)`` of every option row on the page."""
    out = []
    for line in PAGE.read_text().splitlines():
        match = _ROW.match(line)
        if match is None:
            continue
        cell = match["primitive"].strip()
        label = _LABEL.search(cell)
        out.append((label[1] if label else cell, match["option"], match["default"].strip()))
    return out


def parameters(label: str) -> dict[str, inspect.Parameter]:
    builder, skipped = BUILDERS[label]
    found = inspect.signature(builder).parameters
    if "options" in found:  # **options: the common keyword options of every policy
        assert found["options"].kind is inspect.Parameter.VAR_KEYWORD
        assert set(PolicyOptions.__annotations__) | {"name"} == COMMON
    return {
        name: param
        for name, param in found.items()
        if name not in skipped and name not in COMMON and name != "options"
    }


def test_every_primitive_in_the_table_is_known():
    """Each label in the table is one this test can check against the code."""
    labels = {label for label, _, _ in rows()}
    assert labels - {"every primitive"} == set(BUILDERS)


@pytest.mark.parametrize("label", sorted(BUILDERS))
def test_the_table_lists_exactly_the_options_of_each_primitive(label):
    """No option is missing from the table, and no row names an option that is gone."""
    documented = [option for row_label, option, _ in rows() if row_label == label]
    assert len(documented) == len(set(documented)), "one row per option"
    assert set(documented) == set(parameters(label))


def test_the_common_options_are_documented_once():
    """name, listeners, registry, clock and critical have their own rows, for every primitive."""
    assert {option for label, option, _ in rows() if label == "every primitive"} == COMMON


def _literal(cell: str) -> tuple[bool, object]:
    """``(True, value)`` when the cell starts with a literal in backticks."""
    match = re.match(r"^`([^`]+)`", cell)
    if match is None:
        return False, None
    if match[1] == "Exception":
        return True, Exception
    try:
        return True, ast.literal_eval(match[1])
    except (ValueError, SyntaxError):
        return False, None  # an expression such as backoff.exponential(...)


@pytest.mark.parametrize(
    ("label", "option", "default"),
    [row for row in rows() if row[0] != "every primitive"],
)
def test_documented_defaults_match_the_code(label, option, default):
    """A default written as a literal (`3`, `None`, `Exception`...) is the code's default."""
    param = parameters(label)[option]
    if default.startswith("required"):
        # fallback's value has a private "missing" sentinel rather than no default
        assert param.default is inspect.Parameter.empty or type(param.default) is object
        return
    known, value = _literal(default)
    if known:
        assert param.default == value, (label, option, param.default)
