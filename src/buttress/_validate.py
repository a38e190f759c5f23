"""Validation of options at construction time.

Every message names the parameter, the rule and the offending value, in the
shape ``"reset_timeout must be a finite number of seconds > 0, got -1"``.
A wrong type raises ConfigTypeError (a TypeError), a bad range ConfigValueError
(a ValueError).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from .exceptions import ConfigTypeError, ConfigValueError

__all__ = [
    "ExceptionFilter",
    "ExceptionMatcher",
    "ExceptionSpec",
    "check_bool",
    "check_callable",
    "check_choice",
    "check_exception_filter",
    "check_exception_types",
    "check_int",
    "check_name",
    "check_number",
    "check_seconds",
    "require_seconds",
]


_INF = float("inf")


def _show(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_seconds(
    name: str,
    value: object,
    *,
    allow_zero: bool = False,
    allow_none: bool = False,
) -> float | None:
    """Coerce seconds given as int, float or timedelta; reject NaN, infinity and negatives."""
    kind = type(value)
    if (kind is float or kind is int) and (
        0.0 < value < _INF or (allow_zero and value == 0)  # type: ignore[operator]
    ):
        return float(value)  # type: ignore[arg-type]
    if value is None:
        if allow_none:
            return None
        raise ConfigTypeError(f"{name} must be a number of seconds, got None")
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(
            f"{name} must be a number of seconds (int, float or timedelta), got {_show(value)}"
        )
    seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise ConfigValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        rule = ">= 0" if allow_zero else "> 0"
        raise ConfigValueError(f"{name} must be a finite number of seconds {rule}, got {value!r}")
    return seconds


def require_seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Like :func:`check_seconds` for options that cannot be ``None``."""
    seconds = check_seconds(name, value, allow_zero=allow_zero)
    if seconds is None:  # pragma: no cover - check_seconds raises first
        raise ConfigTypeError(f"{name} must be a number of seconds, got None")
    return seconds


def check_number(
    name: str,
    value: object,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """A finite real number within an optional range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(f"{name} must be a number, got {_show(value)}")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise ConfigValueError(f"{name} must be a finite number, got {value!r}")
    if min_value is not None and (
        number < min_value or (number == min_value and not min_inclusive)
    ):
        op = ">=" if min_inclusive else ">"
        raise ConfigValueError(f"{name} must be {op} {min_value:g}, got {value!r}")
    if max_value is not None and (
        number > max_value or (number == max_value and not max_inclusive)
    ):
        op = "<=" if max_inclusive else "<"
        raise ConfigValueError(f"{name} must be {op} {max_value:g}, got {value!r}")
    return number


def check_int(name: str, value: object, *, min_value: int = 1) -> int:
    """An integer >= min_value (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{name} must be an integer, got {_show(value)}")
    if value < min_value:
        raise ConfigValueError(f"{name} must be >= {min_value}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigTypeError(f"{name} must be True or False, got {_show(value)}")
    return value


def check_name(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigTypeError(f"name must be a string or None, got {_show(value)}")
    if not value.strip():
        raise ConfigValueError(f"name must not be empty, got {value!r}")
    return value


def check_callable(name: str, value: object, *, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if not callable(value):
        raise ConfigTypeError(f"{name} must be callable, got {_show(value)}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise ConfigTypeError(f"{name} must be one of {choices!r}, got {_show(value)}")
    if value not in choices:
        raise ConfigValueError(f"{name} must be one of {choices!r}, got {value!r}")
    return value


def check_exception_types(
    name: str, value: object, *, allow_empty: bool = False
) -> tuple[type[BaseException], ...]:
    """An exception class or a tuple/list of them, normalised to a tuple."""
    items: tuple[object, ...]
    if isinstance(value, type):
        items = (value,)
    elif isinstance(value, (tuple, list, frozenset, set)):
        items = tuple(value)
    else:
        raise ConfigTypeError(
            f"{name} must be an exception class or a tuple of them, got {_show(value)}"
        )
    if not items and not allow_empty:
        raise ConfigValueError(f"{name} must name at least one exception class, got {value!r}")
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise ConfigTypeError(
                f"{name} must contain only exception classes, got {_show(item)} in {value!r}"
            )
    return tuple(items)  # type: ignore[arg-type]


ExceptionMatcher = type[BaseException] | Callable[[BaseException], object]
ExceptionSpec = ExceptionMatcher | tuple[ExceptionMatcher, ...] | list[ExceptionMatcher]
"""What ``on=``, ``include=`` and ``exclude=`` take: exception classes, predicates, or a
tuple or list mixing them."""


class ExceptionFilter:
    """Which exceptions an option such as ``on=``, ``include=`` or ``exclude=`` names.

    Built by :func:`check_exception_filter` from an exception class, a predicate
    ``exc -> bool``, or a tuple or list mixing both. Calling it answers whether an
    exception matches: an instance of one of the classes, or one for which a predicate
    returns true. The classes are checked first, with one ``isinstance`` call. A predicate
    that raises (``lambda e: e.status < 500`` given an error without ``status``) does not
    match: the primitive's bookkeeping never depends on a predicate working.
    """

    __slots__ = ("predicates", "types")

    def __init__(
        self,
        types: tuple[type[BaseException], ...],
        predicates: tuple[Callable[[BaseException], object], ...] = (),
    ) -> None:
        self.types = types
        self.predicates = predicates

    def __call__(self, exc: BaseException) -> bool:
        if isinstance(exc, self.types):
            return True
        for predicate in self.predicates:
            try:
                if predicate(exc):
                    return True
            except Exception:
                continue
        return False

    def __bool__(self) -> bool:
        return bool(self.types or self.predicates)

    def __repr__(self) -> str:
        items = [t.__name__ for t in self.types] + [repr(p) for p in self.predicates]
        return f"ExceptionFilter({', '.join(items)})"


def check_exception_filter(
    name: str, value: object, *, allow_empty: bool = False
) -> ExceptionFilter:
    """An exception class, a predicate ``exc -> bool``, or a tuple/list mixing them."""
    items: tuple[object, ...]
    if isinstance(value, ExceptionFilter):
        return value
    if isinstance(value, (tuple, list, frozenset, set)):
        items = tuple(value)
    else:
        items = (value,)
    if not items and not allow_empty:
        raise ConfigValueError(
            f"{name} must name at least one exception class or predicate, got {value!r}"
        )
    types: list[type[BaseException]] = []
    predicates: list[Callable[[BaseException], object]] = []
    for item in items:
        if isinstance(item, type):
            if not issubclass(item, BaseException):
                raise ConfigTypeError(
                    f"{name} must contain only exception classes or predicates, got "
                    f"{_show(item)} in {value!r}"
                )
            types.append(item)
        elif callable(item):
            predicates.append(item)
        else:
            raise ConfigTypeError(
                f"{name} must be an exception class, a predicate exc -> bool, or a tuple or "
                f"list of them, got {_show(item)}" + (f" in {value!r}" if item is not value else "")
            )
    return ExceptionFilter(tuple(types), tuple(predicates))


def check_decoratable(value: object) -> Callable[..., Any]:
    """What a policy may decorate: a plain callable that is not a generator function."""
    if not callable(value):
        raise ConfigTypeError(
            f"can only decorate a callable (function, method or coroutine function), "
            f"got {_show(value)}"
        )
    if inspect.isgeneratorfunction(value) or inspect.isasyncgenfunction(value):
        raise ConfigTypeError(
            f"cannot decorate the generator function {value!r}: a policy protects one call "
            f"that returns a result; wrap the code that consumes the generator instead"
        )
    return value
