"""Compose policies into one, outermost first.

``pipeline(timeout(10), retry(...), breaker, bulkhead, limiter)`` protects a
call the way the nested decorators would, in that order: the timeout bounds
everything, each retry attempt goes through the breaker, the bulkhead and the
limiter. The wrappers are nested once, at decoration time, so a pipeline costs
the sum of its parts and nothing more.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack, ExitStack
from types import TracebackType
from typing import Any

from ._policy import ExcType, Policy, Traceback, cm_pop, cm_push
from .exceptions import ConfigTypeError, ConfigValueError

__all__ = ["Pipeline", "pipeline"]


class Pipeline(Policy):
    """Policies applied in order, outermost first. Build it with :func:`pipeline`."""

    kind = "pipeline"

    def __init__(self, *policies: Policy) -> None:
        super().__init__()
        flat: list[Policy] = []
        for index, item in enumerate(policies):
            if isinstance(item, Pipeline):
                flat.extend(item.policies)
            elif isinstance(item, Policy):
                flat.append(item)
            else:
                raise ConfigTypeError(
                    f"policies[{index}] must be a buttress policy (retry, CircuitBreaker, "
                    f"Bulkhead, RateLimiter, timeout, fallback, hedge...), got {item!r} "
                    f"({type(item).__name__})"
                )
        if not flat:
            raise ConfigValueError("pipeline needs at least one policy, got none")
        self.policies: tuple[Policy, ...] = tuple(flat)

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        for policy in reversed(self.policies):
            fn = policy._wrap_sync(fn)
        return fn

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        for policy in reversed(self.policies):
            fn = policy._wrap_async(fn)
        return fn

    def _wrap_generator(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        for policy in reversed(self.policies):
            fn = policy._wrap_generator(fn)
        return fn

    def _wrap_async_generator(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        for policy in reversed(self.policies):
            fn = policy._wrap_async_generator(fn)
        return fn

    def _context_policies(self, method: str) -> tuple[Any, ...]:
        for policy in self.policies:
            if policy.kind == "fallback":
                raise ConfigTypeError(
                    "fallback cannot guard a block inside a pipeline: its value would be "
                    "unreachable; write `with fallback(...) as outcome:` around the "
                    "pipeline's block instead, or decorate a function"
                )
            if not hasattr(policy, method):
                raise ConfigTypeError(
                    f"{type(policy).__name__} in this pipeline cannot guard a block of code "
                    f"(it needs to call the function itself, e.g. to call it again): "
                    f"decorate a function instead"
                    + (
                        ", or loop with `for attempt in retry.attempts()` around the pipeline"
                        if policy.kind == "retry"
                        else ""
                    )
                )
        return self.policies

    def __enter__(self) -> Pipeline:
        stack = ExitStack()
        with stack:
            for policy in self._context_policies("__enter__"):
                stack.enter_context(policy)
            cm_push(self, stack.pop_all())
        return self

    def __exit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> bool | None:
        stack: ExitStack = cm_pop(self)
        return stack.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> Pipeline:
        stack = AsyncExitStack()
        async with stack:
            for policy in self._context_policies("__aenter__"):
                await stack.enter_async_context(policy)
            cm_push(self, stack.pop_all())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack: AsyncExitStack = cm_pop(self)
        return await stack.__aexit__(exc_type, exc, tb)

    def snapshot(self) -> dict[str, Any]:
        return {"kind": self.kind, "policies": [p.snapshot() for p in self.policies]}

    def __repr__(self) -> str:
        return f"pipeline({', '.join(map(repr, self.policies))})"


def pipeline(*policies: Policy) -> Pipeline:
    """Compose ``policies`` into one, outermost first; usable wherever one policy is."""
    return Pipeline(*policies)
