"""ASGI middleware: request metrics (status and latency to the last byte) and the optional API key gate."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable, Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from ternary.server.errors import APIError


class MetricsMiddleware:
    """Times every HTTP request, streamed ones to their last chunk, and reports (route, status, seconds)."""

    def __init__(
        self, app: ASGIApp, record: Callable[[str, int, float], None], routes: Collection[str]
    ) -> None:
        self.app = app
        self.record = record
        self.routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.record(route, status, time.perf_counter() - t0)


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` (or `x-api-key`) except on public paths, like llama-server."""

    def __init__(self, app: ASGIApp, api_key: str, public_paths: Collection[str]) -> None:
        self.app = app
        self.key = api_key.encode()
        self.public = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        if hmac.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        err = APIError(401, "Invalid API key.", type="authentication_error", code="invalid_api_key")
        body = json.dumps(err.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
