"""The one place where service errors become HTTP responses."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Overloaded, Unauthorized, VoxError
from .openai_routes import openai_error_body


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(VoxError)
    async def _vox_error(_: Request, exc: VoxError) -> JSONResponse:
        headers: dict[str, str] = {}
        if isinstance(exc, Overloaded):
            headers["Retry-After"] = str(exc.retry_after_s)
        if isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        content: dict[str, str] = {"detail": exc.message}
        if exc.field:  # 4xx bodies name the culprit (see errors.py)
            content["field"] = exc.field
        return JSONResponse(status_code=exc.status_code, content=content, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own 404/405 (no route, wrong method): OpenAI's error shape under /v1/, as its SDKs
        expect; FastAPI's `{"detail": ...}` elsewhere."""
        if request.url.path.startswith("/v1/"):
            body = openai_error_body(str(exc.detail), status=exc.status_code)
            return JSONResponse(status_code=exc.status_code, content=body, headers=exc.headers)
        return await http_exception_handler(request, exc)  # type: ignore[return-value]
