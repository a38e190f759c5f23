"""Loud misuse: blocking calls made on a thread whose event loop is running.

The check is one C call (``asyncio._get_running_loop``), cheap enough for the entry
of every blocking ``acquire()``; the warning itself is built only when it fires.
"""

from __future__ import annotations

import os
import sys
import warnings
from asyncio import _get_running_loop

from .exceptions import LoopBlockingWarning

__all__ = ["loop_running", "warn_blocking"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep

loop_running = _get_running_loop
"""The running event loop of this thread, or ``None`` (the C function itself)."""


def warn_blocking(message: str) -> None:
    """Warn with :class:`LoopBlockingWarning`, pointing at the first frame outside
    buttress: the user's line, however many buttress frames lie in between (``with
    limiter:`` reaches ``acquire()`` through ``__enter__``)."""
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    warnings.warn(message, LoopBlockingWarning, stacklevel=level)
