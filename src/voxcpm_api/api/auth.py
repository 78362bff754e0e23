"""Optional API key: `Authorization: Bearer K` or `X-API-Key: K` on every route but /health and /docs."""

from __future__ import annotations

import hmac

from fastapi import Request

from ..errors import Unauthorized


def make_api_key_check(api_key: str | None):  # type: ignore[no-untyped-def]
    async def check(request: Request) -> None:
        if not api_key:
            return
        supplied = request.headers.get("x-api-key")
        authorization = request.headers.get("authorization", "")
        if supplied is None and authorization.lower().startswith("bearer "):
            supplied = authorization[7:].strip()
        if supplied is None or not hmac.compare_digest(supplied.encode(), api_key.encode()):
            raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")

    return check
