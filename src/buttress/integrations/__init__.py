"""Integrations with third-party libraries, one module each, each behind its extra.

Nothing here is imported by ``buttress`` itself: import the module you need,
``buttress.integrations.httpx`` (extra ``httpx``), ``buttress.integrations.requests``
(extra ``requests``), ``buttress.integrations.aiohttp`` (extra ``aiohttp``),
``buttress.integrations.grpc`` (extra ``grpc``) or
``buttress.integrations.asgi`` (extra ``asgi``, no dependency).
"""

__all__: list[str] = []
