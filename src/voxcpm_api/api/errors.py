"""The one place where service errors become HTTP responses."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..errors import Overloaded, Unauthorized, VoxError


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
