"""Plain ASGI: shed load at the door, and serve health and state.

- :class:`LoadSheddingMiddleware` puts a rate limiter (keyed by client IP, a header or
  a function of the request) and a bulkhead in front of any ASGI application. A request
  over the rate gets ``429 Too Many Requests`` with ``Retry-After`` (whole seconds,
  rounded up from the limiter's own ``retry_after``); a request that finds every slot
  busy gets ``503 Service Unavailable``. Neither reaches the application.
- :func:`health_app` serves :func:`buttress.health` (``application/health+json``,
  ``503`` when the status is ``fail``) and :func:`state_app` serves :func:`buttress.state`.
- :func:`liveness_app` and :func:`readiness_app` serve :func:`buttress.liveness` and
  :func:`buttress.readiness` for Kubernetes liveness and readiness probes (``200`` or
  ``503``).

No framework is imported: the same objects work under Starlette, FastAPI, Quart,
Litestar or a bare ASGI server.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Hashable, Iterable, MutableMapping
from datetime import timedelta
from typing import Any, TypeVar

from buttress._deadline import reset_deadline, set_deadline
from buttress._validate import check_seconds
from buttress.bulkhead import Bulkhead
from buttress.exceptions import BulkheadFull, ConfigTypeError, ConfigValueError, RateLimited
from buttress.rate_limiter import RateLimiter
from buttress.registry import Registry, default_registry

T = TypeVar("T")

__all__ = [
    "ASGIApp",
    "LoadSheddingMiddleware",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "client_ip",
    "health_app",
    "liveness_app",
    "readiness_app",
    "state_app",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
KeyFunction = Callable[[Scope], Hashable | None]


def client_ip(scope: Scope) -> str:
    """The client's address as the server saw it (``"unknown"`` when the server gives none).

    Behind a proxy this is the proxy's address: key on its forwarding header instead
    (``key="header:x-forwarded-for"``), or run the server with its proxy-headers option.
    """
    client = scope.get("client")
    if client:
        return str(client[0])
    return "unknown"


def _header_key(name: str) -> KeyFunction:
    wanted = name.lower().encode("latin-1")

    def key(scope: Scope) -> Hashable:
        for header, value in scope.get("headers") or ():
            if header.lower() == wanted:
                return bytes(value).decode("latin-1")
        return client_ip(scope)

    return key


def _key_function(key: str | KeyFunction) -> KeyFunction:
    if callable(key):
        return key
    if key in ("client", "ip"):
        return client_ip
    if isinstance(key, str) and key.startswith("header:") and key[7:].strip():
        return _header_key(key[7:].strip())
    raise ConfigValueError(
        f'key must be "client", "header:<name>" or a function of the ASGI scope, got {key!r}'
    )


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    extra: Iterable[tuple[bytes, bytes]] = (),
    *,
    head: bool = False,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"cache-control", b"no-store"),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def _retry_after_seconds(seconds: float | None) -> int:
    """Seconds as a ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    if seconds is None or not seconds > 0:
        return 1
    # Rounding up never tells a client to come back before the permit is there; the
    # slack keeps float noise (2.0000000001) from adding a whole second.
    return max(1, math.ceil(seconds - 1e-6))


class LoadSheddingMiddleware:
    """Reject requests the service should not take, before they reach the application.

    Args:
        app: the ASGI application to protect.
        limiter: a :class:`~buttress.RateLimiter`; each key gets its own bucket
            (``limiter.for_key(key)``). Over the rate: ``429`` with ``Retry-After``.
        key: what a bucket belongs to: ``"client"`` (the client IP, the default),
            ``"header:<name>"`` (that header's value, or the client IP when it is
            missing), or a function ``scope -> key``; a function returning ``None``
            lets that request through unlimited.
        bulkhead: a :class:`~buttress.Bulkhead` bounding the requests in the application
            at once. Saturated: ``503``. A slot is held until the application returns
            (streamed responses included).
        max_wait: seconds a request may wait at the door for a permit or a slot
            (default 0: shed at once). ``None`` defers to the limiter's and the
            bulkhead's own ``max_wait`` and ``max_queue``.
        busy_retry_after: ``Retry-After`` seconds to send with a ``503`` (default
            ``None``: no header, since a bulkhead cannot know when a slot frees up).
        exempt: path prefixes that are never shed (say ``("/health",)``).

    Only ``http`` requests are shed; ``websocket`` and ``lifespan`` pass through.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: RateLimiter | None = None,
        key: str | KeyFunction = "client",
        bulkhead: Bulkhead | None = None,
        max_wait: float | timedelta | None = 0.0,
        busy_retry_after: float | timedelta | None = None,
        exempt: Iterable[str] = (),
    ) -> None:
        if not callable(app):
            raise ConfigTypeError(f"app must be an ASGI application, got {app!r}")
        if limiter is not None and not isinstance(limiter, RateLimiter):
            raise ConfigTypeError(f"limiter must be a buttress.RateLimiter, got {limiter!r}")
        if bulkhead is not None and not isinstance(bulkhead, Bulkhead):
            raise ConfigTypeError(f"bulkhead must be a buttress.Bulkhead, got {bulkhead!r}")
        self.app = app
        self.limiter = limiter
        self.key = _key_function(key)
        self.bulkhead = bulkhead
        self.max_wait = check_seconds("max_wait", max_wait, allow_zero=True, allow_none=True)
        self.busy_retry_after = check_seconds(
            "busy_retry_after", busy_retry_after, allow_zero=True, allow_none=True
        )
        if isinstance(exempt, str) or not all(isinstance(p, str) for p in exempt):
            raise ConfigTypeError(f"exempt must be a collection of path prefixes, got {exempt!r}")
        self.exempt = tuple(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.exempt and scope["path"].startswith(self.exempt)):
            await self.app(scope, receive, send)
            return
        limiter = self.limiter
        if limiter is not None:
            key = self.key(scope)
            # An in-process limiter admits the uncontended request without a coroutine; a
            # shared store is always awaited, never called from the event loop.
            if key is not None and (limiter.store is not None or not limiter.try_acquire(key=key)):
                try:
                    await self._wait(lambda: limiter.acquire_async(key=key), limiter)
                except RateLimited as exc:
                    seconds = _retry_after_seconds(exc.retry_after)
                    await _respond(
                        send,
                        429,
                        b"Too Many Requests\n",
                        b"text/plain; charset=utf-8",
                        [(b"retry-after", str(seconds).encode("ascii"))],
                    )
                    return
        bulkhead = self.bulkhead
        if bulkhead is None:
            await self.app(scope, receive, send)
            return
        try:
            # the uncontended case takes its slot without a coroutine or a deadline
            permit = bulkhead.try_acquire() if bulkhead.store is None else None
            if permit is None:
                permit = await self._wait(bulkhead.acquire_async, bulkhead)
        except BulkheadFull:
            extra = []
            if self.busy_retry_after is not None:
                value = str(_retry_after_seconds(self.busy_retry_after)).encode("ascii")
                extra.append((b"retry-after", value))
            await _respond(send, 503, b"Service Unavailable\n", b"text/plain; charset=utf-8", extra)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            if bulkhead.store is None:
                permit.release()
            else:
                await permit.release_async()

    async def _wait(self, acquire: Callable[[], Awaitable[T]], policy: RateLimiter | Bulkhead) -> T:
        if self.max_wait is None:
            return await acquire()
        # A deadline bounds the wait: the limiter rejects at once, with the exact time its
        # next permit is due, when that is further away than the deadline.
        token = set_deadline(self.max_wait, policy.clock)[1]
        try:
            return await acquire()
        finally:
            reset_deadline(token)


async def _lifespan(receive: Receive, send: Send) -> None:
    """Answer the lifespan protocol when served on its own by an ASGI server."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class _ReportApp:
    """An ASGI app answering GET and HEAD with a JSON report of a registry."""

    def __init__(self, registry: Registry | None, what: str) -> None:
        if registry is not None and not isinstance(registry, Registry):
            raise ConfigTypeError(f"registry must be a buttress.Registry, got {registry!r}")
        self.registry = registry
        self.what = what

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise RuntimeError(f"buttress {self.what} app serves HTTP only, got {scope['type']}")
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await _respond(
                send,
                405,
                b"Method Not Allowed\n",
                b"text/plain; charset=utf-8",
                [(b"allow", b"GET, HEAD")],
            )
            return
        registry = self.registry if self.registry is not None else default_registry()
        if self.what == "liveness":
            # Answered on the loop, reading nothing: that the loop answers is the signal.
            status, content_type, report = self.report(registry)
        else:
            # Off the event loop: a primitive on a shared store answers health() and
            # state() with a round trip, which must not stall every other request.
            status, content_type, report = await asyncio.to_thread(self.report, registry)
        body = json.dumps(report, default=str, separators=(",", ":")).encode("utf-8")
        await _respond(send, status, body, content_type, head=method == "HEAD")

    def report(self, registry: Registry) -> tuple[int, bytes, dict[str, Any]]:
        if self.what == "state":
            return 200, b"application/json", registry.state()
        if self.what == "health":
            report = registry.health()
        elif self.what == "readiness":
            report = registry.readiness()
        else:
            report = registry.liveness()
        status = 503 if report["status"] == "fail" else 200
        return status, b"application/health+json", report

    def __repr__(self) -> str:
        return f"<buttress {self.what} app>"


def health_app(registry: Registry | None = None) -> ASGIApp:
    """An ASGI app serving :func:`buttress.health` as ``application/health+json``.

    ``200`` when the status is ``pass`` or ``warn`` (degraded: an open breaker that is
    not ``critical``), ``503`` when it is ``fail`` (a critical primitive fails). For
    probes, prefer :func:`readiness_app` and :func:`liveness_app`. Answers ``GET`` and
    ``HEAD`` on any path: mount it where you like.

    Args:
        registry: the registry to report on (default: the default registry, looked up
            on every request).
    """
    return _ReportApp(registry, "health")


def state_app(registry: Registry | None = None) -> ASGIApp:
    """An ASGI app serving :func:`buttress.state` as ``application/json`` (always ``200``).

    Args:
        registry: the registry to report on (default: the default registry, looked up
            on every request).
    """
    return _ReportApp(registry, "state")


def readiness_app(registry: Registry | None = None) -> ASGIApp:
    """An ASGI app serving :func:`buttress.readiness` as ``application/health+json``: the
    endpoint for a Kubernetes readiness probe (or a load balancer's health check).

    ``503`` when a primitive built with ``critical=True`` fails its check or the
    registry is draining (:meth:`~buttress.Registry.drain`), else ``200``. An open
    breaker that is not critical never fails it: every replica sees the same upstream
    down, and failing them all at once would take the whole service out of rotation.
    Answers ``GET`` and ``HEAD`` on any path.

    Args:
        registry: the registry to report on (default: the default registry, looked up
            on every request).
    """
    return _ReportApp(registry, "readiness")


def liveness_app(registry: Registry | None = None) -> ASGIApp:
    """An ASGI app serving :func:`buttress.liveness` (always ``200`` with
    ``{"status": "pass"}``): the endpoint for a Kubernetes liveness probe.

    It reads no primitive, so no dependency can fail it and get the process restarted;
    it is answered on the event loop, so a loop blocked for longer than the probe's
    timeout does fail it. Answers ``GET`` and ``HEAD`` on any path.

    Args:
        registry: accepted for symmetry with the other apps (liveness reads nothing
            from it).
    """
    return _ReportApp(registry, "liveness")
