"""/docs and /redoc on a LAN without internet: every asset they load comes from this server.

Swagger UI and ReDoc used to load their JavaScript and CSS from a CDN, so without internet both pages
stayed blank. Here the HTML may name no other host than the server itself, every asset it names must
answer 200 with a script/style media type, without the API key, and the OpenAPI schema must carry the
security schemes Swagger's Authorize button needs when --api-key is set.
"""

from __future__ import annotations

import re
from urllib.parse import urljoin

import httpx
import pytest

KEY = "docs-test-key"
URL = re.compile(r"""(?:https?:)?//[^\s'"<>)]+""")
SCRIPT_SRC = re.compile(r"""<script[^>]*\bsrc=["']([^"']+)["']""", re.I)
LINK = re.compile(r"""<link\b([^>]*)>""", re.I)
ATTR = re.compile(r"""(\w[\w-]*)=["']([^"']*)["']""")
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


def _assets(html: str) -> dict[str, str]:
    """url -> 'script' | 'stylesheet' | 'icon' for every asset the page makes the browser load."""
    found = {src: "script" for src in SCRIPT_SRC.findall(html)}
    for attrs in LINK.findall(html):
        values = dict(ATTR.findall(attrs))
        rel = values.get("rel", "").lower()
        if "href" in values:
            found[values["href"]] = "stylesheet" if "stylesheet" in rel else "icon" if "icon" in rel else rel
    return found


@pytest.fixture
def keyed(make_server):  # type: ignore[no-untyped-def]
    return make_server(api_key=KEY)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_same_origin_assets(keyed, page: str) -> None:
    base = keyed.server.url
    with httpx.Client(base_url=base, timeout=30) as anonymous:  # no key: the docs stay open
        response = anonymous.get(page)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/html")
        assert "no-cache" in response.headers.get("cache-control", "")
        html = response.text
        foreign = [u for u in URL.findall(html) if not urljoin(base + "/", u).startswith(base + "/")]
        assert not foreign, f"{page} names other hosts: {foreign}"

        assets = _assets(html)
        kinds = set(assets.values())
        assert "script" in kinds, assets
        if page == "/docs":
            assert "stylesheet" in kinds, assets
        for url, kind in assets.items():
            absolute = urljoin(base + page, url)
            assert absolute.startswith(base + "/"), url
            asset = anonymous.get(absolute)
            assert asset.status_code == 200, (url, asset.status_code)
            media = asset.headers["content-type"].split(";")[0].strip()
            expected = {"script": {"text/javascript", "application/javascript"}, "stylesheet": {"text/css"},
                        "icon": {"image/png", "image/x-icon", "image/svg+xml"}}[kind]
            assert media in expected, (url, media)
            assert len(asset.content) > 1000, url
            cache = asset.headers.get("cache-control", "")
            assert "max-age=" in cache and int(re.search(r"max-age=(\d+)", cache)[1]) > 0, (url, cache)
            assert asset.headers.get("x-content-type-options") == "nosniff", url
            if kind == "script":  # the real bundles, not a stub
                marker = "SwaggerUIBundle" if page == "/docs" else "Redoc"
                assert marker in asset.text, url

        # the spec and Swagger's OAuth2 redirect page: same URLs as before, open too
        assert anonymous.get("/openapi.json").status_code == 200
        redirect = anonymous.get("/docs/oauth2-redirect")
        assert redirect.status_code == 200 and redirect.headers["content-type"].startswith("text/html")
        # the API behind them is not
        assert anonymous.get("/loras").status_code == 401


def test_unknown_docs_assets_are_404(keyed) -> None:
    html = httpx.get(f"{keyed.server.url}/docs", timeout=30).text
    script = next(u for u, kind in _assets(html).items() if kind == "script")
    folder = script.rsplit("/", 1)[0]
    with httpx.Client(base_url=keyed.server.url, timeout=30) as anonymous:
        for name in ("nothing.js", "..%2F..%2Fapp.py", "core.py"):
            assert anonymous.get(f"{folder}/{name}").status_code == 404, name


def test_schema_offers_the_api_key_to_swagger_authorize(keyed) -> None:
    """With --api-key: Bearer and X-API-Key schemes, required by every operation the middleware guards."""
    spec = keyed.client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert {"type": "http", "scheme": "bearer"}.items() <= next(
        s for s in schemes.values() if s["type"] == "http").items()
    assert {"type": "apiKey", "in": "header", "name": "X-API-Key"}.items() <= next(
        s for s in schemes.values() if s["type"] == "apiKey").items()
    open_paths = {"/health", "/ready", "/metrics"}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            if path in open_paths:
                assert not operation.get("security"), (method, path)
            else:
                assert {name for requirement in operation["security"] for name in requirement} == set(schemes), \
                    (method, path, operation.get("security"))
    # the routes themselves behave as before: the key in either header works, none is refused
    with httpx.Client(base_url=keyed.server.url, timeout=30) as anonymous:
        assert anonymous.get("/loras").status_code == 401
        assert anonymous.get("/loras", headers={"X-API-Key": KEY}).status_code == 200
        assert anonymous.get("/loras", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert anonymous.get("/health").status_code == 200


def test_schema_without_api_key_has_no_security(make_server) -> None:
    spec = make_server().client.get("/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {})
    assert not any(op.get("security") for item in spec["paths"].values() for m, op in item.items()
                   if m in HTTP_METHODS)
