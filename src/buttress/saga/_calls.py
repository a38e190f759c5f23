"""What a saga flow asks of its store: a call, executed by whichever driver runs the flow."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any

__all__ = ["ASYNC", "INLINE", "THREAD", "Call", "Failed", "store_call"]


@dataclass(slots=True)
class Call:
    """Instruction: call ``store.<method>(*args, **kwargs)`` (awaiting
    ``store.a<method>`` under ``drive_async`` when the store is async) and send back
    its result."""

    store: Any
    face: str  # ASYNC, INLINE or THREAD: how drive_async calls the store
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    catch: bool = False  # send back a Failed instead of raising


ASYNC = "async"  # await the store's a<method> twin
INLINE = "inline"  # call the sync method on the loop (a store that waits on no I/O)
THREAD = "thread"  # call the sync method on a worker thread


@dataclass(slots=True)
class Failed:
    """What a :class:`Call` with ``catch`` sends back when the store raised."""

    error: Exception


async def store_call(store: Any, face: str, method: str, *args: Any, **kwargs: Any) -> Any:
    """Await ``store.a<method>``, or call ``store.<method>`` inline or on a worker thread."""
    if face is ASYNC:
        return await getattr(store, "a" + method)(*args, **kwargs)
    if face is INLINE:
        return getattr(store, method)(*args, **kwargs)
    return await asyncio.to_thread(functools.partial(getattr(store, method), *args, **kwargs))
