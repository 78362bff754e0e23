"""The playground: a static page at `/` for trying the API from a browser (no build step).

The page and its two assets are open (see auth.OPEN_PATHS / OPEN_PREFIXES); the page asks for
the API key itself and sends it on every API call it makes.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).with_name("static")
ASSETS = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}
# Same-origin only; blob: for audio assembled in the page (MediaSource, downloaded files).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def playground_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                        headers={**HEADERS, "Content-Security-Policy": CSP})


@router.get("/static/{name}")
async def playground_asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)  # a fixed list: nothing else under static/ (or outside it) is served
    if media_type is None:
        raise HTTPException(status_code=404, detail="Not Found")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=HEADERS)
