"""`/docs` (Swagger UI) and `/redoc` served entirely from this server, so they work on a LAN without internet.

FastAPI's own pages load Swagger UI and ReDoc from a CDN. Here the same URLs (`/docs`, `/redoc`,
`/docs/oauth2-redirect`, `/openapi.json`) name only assets under `/static/docs/<version>/`, taken from
the files the pinned PyPI package `fastapi-offline` ships (Swagger UI 5, ReDoc 2; ADR 0011). The
pages and their assets are open like the playground's (auth.OPEN_PATHS / OPEN_PREFIXES).

With `--api-key`, the OpenAPI schema also declares the two ways the key is accepted (Bearer and
X-API-Key), so Swagger's Authorize button takes it and "Try it out" sends it. Schema only: what the
routes accept is decided by auth.ApiKeyMiddleware, as before.
"""

from __future__ import annotations

from importlib import metadata, resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from .auth import OPEN_PATHS, OPEN_PREFIXES

PACKAGE = "fastapi-offline"
ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
          "redoc.standalone.js": "text/javascript; charset=utf-8", "favicon.png": "image/png"}
# img-src: ReDoc's side menu shows a logo from its maker's CDN (hidden when it fails to load); refused here,
# so the pages make no request off this server at all. Nothing else is restricted (both UIs inject styles).
PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "img-src 'self' data:"}
# the version is part of each asset's URL: a new package version is a new URL, so the old one may be kept long
ASSET_HEADERS = {"Cache-Control": "public, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff"}
# deepLinking etc. are FastAPI's defaults; no validator badge (an image from the validator's host);
# the entered key survives a reload of the page (kept in the browser's localStorage, like the playground's)
SWAGGER_PARAMETERS = {"validatorUrl": None, "persistAuthorization": True}
SECURITY_SCHEMES = {
    "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>` (--api-key)"},
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "the --api-key"},
}
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "patch", "options", "head", "trace"})


def asset_dir() -> Path:
    return Path(str(resources.files("fastapi_offline") / "static"))


def install_docs(app: FastAPI, *, api_key: bool) -> None:
    """Add the docs routes to an app built with `docs_url=None, redoc_url=None` (and, with `api_key`, the
    security schemes to its schema)."""
    version = metadata.version(PACKAGE)
    folder = asset_dir()
    prefix = f"/static/docs/{version}"
    assert prefix.startswith(OPEN_PREFIXES), "the docs' assets must stay reachable without the key"
    router = APIRouter(include_in_schema=False)
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(openapi_url=root + openapi_url, title=f"{app.title} - Swagger UI",
                                   oauth2_redirect_url=root + redirect_url,
                                   swagger_js_url=f"{root}{prefix}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{prefix}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{prefix}/favicon.png",
                                   swagger_ui_parameters={**(app.swagger_ui_parameters or {}), **SWAGGER_PARAMETERS})
        page.headers.update(PAGE_HEADERS)
        return page

    @router.get(redirect_url)
    async def swagger_ui_redirect() -> HTMLResponse:
        page = get_swagger_ui_oauth2_redirect_html()
        page.headers.update(PAGE_HEADERS)
        return page

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(openapi_url=root + openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{prefix}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{prefix}/favicon.png", with_google_fonts=False)
        page.headers.update(PAGE_HEADERS)
        return page

    @router.get(prefix + "/{name}")
    async def docs_asset(name: str) -> FileResponse:
        media_type = ASSETS.get(name)  # a fixed list: nothing else of the package (or outside it) is served
        if media_type is None:
            raise HTTPException(status_code=404, detail="Not Found")
        return FileResponse(folder / name, media_type=media_type, headers=ASSET_HEADERS)

    app.include_router(router)
    if api_key:
        _declare_api_key(app)


def _declare_api_key(app: FastAPI) -> None:
    """Wrap `app.openapi` so the schema names the key's two headers on every operation the middleware guards."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()  # FastAPI's schema, cached by it in app.openapi_schema: completed here, once
        schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
        requirement = [{name: []} for name in SECURITY_SCHEMES]  # either header will do
        for path, item in schema.get("paths", {}).items():
            if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
                continue
            for method, operation in item.items():
                if method in HTTP_METHODS:
                    operation["security"] = requirement
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
