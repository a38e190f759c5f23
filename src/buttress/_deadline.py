"""The ambient deadline set by an enclosing ``timeout`` (deadline propagation).

A deadline is stored with the clock that set it, so a primitive running on any
clock can ask how many seconds are left.
"""

from __future__ import annotations

from contextvars import ContextVar, Token

from .clock import Clock

__all__ = ["ambient", "remaining", "reset_deadline", "set_deadline"]

_deadline: ContextVar[tuple[float, Clock] | None] = ContextVar("buttress_deadline", default=None)

ambient = _deadline.get
"""The innermost enclosing deadline as ``(deadline, clock)``, or ``None``: what
:func:`remaining` reads, for the hot paths that cannot afford a Python call per use."""


def remaining() -> float | None:
    """Seconds left before the innermost enclosing ``timeout`` expires, or ``None``.

    Never negative: an expired deadline reports ``0.0``.
    """
    current = _deadline.get()
    if current is None:
        return None
    deadline, clock = current
    left = deadline - clock.now()
    return left if left > 0.0 else 0.0


def set_deadline(seconds: float, clock: Clock) -> tuple[float, Token[tuple[float, Clock] | None]]:
    """Narrow the ambient deadline to ``seconds`` from now (never widen it).

    Returns the effective remaining seconds and the token that restores the previous deadline.
    """
    now = clock.now()
    deadline = now + seconds
    outer = _deadline.get()
    if outer is not None:
        outer_deadline, outer_clock = outer
        outer_left = outer_deadline - outer_clock.now()
        if outer_left < seconds:
            seconds = max(outer_left, 0.0)
            deadline = now + seconds
    return seconds, _deadline.set((deadline, clock))


def reset_deadline(token: Token[tuple[float, Clock] | None]) -> None:
    _deadline.reset(token)
