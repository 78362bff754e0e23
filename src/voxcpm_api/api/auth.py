"""Optional API key: `Authorization: Bearer K` or `X-API-Key: K` on every route but the open ones.

A pure ASGI middleware rather than a route dependency, so the key is checked before anything
else looks at the request: a malformed body without a key gets 401, not 422.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics",  # probes and scrapes: see README_API.md
                        "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/"})
OPEN_PREFIXES = ("/static/",)  # the playground's assets; the page asks for the key itself


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES)
                or scope["method"] == "OPTIONS"):
            await self.app(scope, receive, send)
            return
        if self._authorized(scope):
            await self.app(scope, receive, send)
            return
        message = "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        content: dict[str, object] = {"detail": message}
        if scope["path"].startswith("/v1/"):  # OpenAI-compatible routes answer in OpenAI's error shape
            content = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "invalid_api_key"}}
        response = JSONResponse(status_code=401, headers={"WWW-Authenticate": "Bearer"}, content=content)
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        supplied: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                supplied = value.strip()
                break
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                supplied = value[7:].strip()
        return supplied is not None and hmac.compare_digest(supplied, self.api_key)
