"""/docs and /redoc in a real headless Chromium that can reach nothing but the loopback server.

Every host but 127.0.0.1 resolves to nothing and every non-loopback connection goes to a proxy
that refuses, as on a LAN without internet: Swagger UI must still render every operation of the
schema, take the API key through its Authorize button and run "Try it out" on GET /health and on a
protected route; ReDoc must render the API's title. Same browser conventions as
test_playground.py (Debian chromium + chromium-driver, VOXCPM_SKIP_BROWSER=1 to skip). Screenshots
go to test-artifacts/docs-offline.png and test-artifacts/redoc-offline.png.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import Running
from tests.browser.test_playground import (ARTIFACTS, CHROME_FLAGS, CHROMEDRIVER, CHROMIUM, _ensure_chromium,
                                           _ensure_selenium, _unavailable, console)
from tests.helpers import ThreadServer, free_port, wait_ready
from voxcpm_api.api.app import create_app
from voxcpm_api.config import Settings
from voxcpm_api.engine.fake import FakeEngine

pytestmark = pytest.mark.xdist_group("browser")

API_KEY = "docs-browser-key"
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


@pytest.fixture(scope="module")
def offline_browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    _ensure_chromium()
    _ensure_selenium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    refused = free_port()  # nothing listens there: every proxied (= non-loopback) connection is refused
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-offline-profile')}",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 f"--proxy-server=http://127.0.0.1:{refused}"]:  # loopback bypasses the proxy by default
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = tmp_path_factory.getbasetemp() / "chromedriver-offline.log"
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER, log_output=str(log)))
    except Exception as exc:
        _unavailable(f"Chromium did not start: {exc} (chromedriver log: {log})")
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[Running]:
    settings = Settings(host="127.0.0.1", model="fake", output_dir=tmp_path / "output", lora_dir=tmp_path / "lora",
                        ref_audio_dir=[tmp_path / "refs"], max_concurrent=1, api_key=API_KEY)
    (tmp_path / "refs").mkdir()
    engine = FakeEngine()
    with ThreadServer(create_app(settings, engine=engine)) as http, \
            httpx.Client(base_url=http.url, timeout=60.0, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        wait_ready(client, timeout_s=30)
        yield Running(server=http, client=client, settings=settings, engine=engine, base=tmp_path)


def wait_js(driver: Any, script: str, what: str, timeout_s: float = 30.0) -> Any:
    """The script's first truthy result (the playground's helper reads that page's own error box)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(lambda d: d.execute_script(script))
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} on {driver.current_url}; "
                             f"console: {console(driver)}") from None


def _operations(spec: dict) -> list[tuple[str, str, int]]:
    """(method, path, number of tags) for every operation of the schema."""
    return [(method, path, len(op.get("tags") or [None]))
            for path, item in spec["paths"].items() for method, op in item.items() if method in HTTP_METHODS]


def _foreign_requests(driver: Any, base: str, messages: list[str]) -> list[str]:
    """Loads the page started off this server, less those its Content-Security-Policy stopped in the browser
    (ReDoc's logo from its maker's CDN: with no CSP it would only fail here because the browser is offline)."""
    names = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".filter(u => !u.startsWith(arguments[0]) && !u.startsWith('data:') && !u.startsWith('blob:'))", base + "/")
    return [u for u in names if not any(f"'{u}' violates" in m and "has been blocked" in m for m in messages)]


def _try_it_out(driver: Any, method: str, path: str) -> str:
    """Expand one operation, press "Try it out" then "Execute"; return the live response's status."""
    from selenium.webdriver.common.by import By

    block = driver.find_element(
        By.XPATH, f"//div[contains(@class,'opblock-{method}')]"
                  f"[.//*[contains(@class,'opblock-summary-path') and @data-path='{path}']]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", block)
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait_js(driver, f"return !!document.querySelector(\"[data-path='{path}']\")"
                    f" && [...document.querySelectorAll('.opblock-{method}')].some(b => b.querySelector("
                    f"\"[data-path='{path}']\") && b.querySelector('.try-out__btn'))",
            f"'Try it out' of {method.upper()} {path}", timeout_s=15)
    block.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    wait_js(driver, f"return [...document.querySelectorAll('.opblock-{method}')].some(b => b.querySelector("
                    f"\"[data-path='{path}']\") && b.querySelector('button.execute'))",
            f"'Execute' of {method.upper()} {path}", timeout_s=15)
    block.find_element(By.CSS_SELECTOR, "button.execute").click()
    return wait_js(driver, f"""
        const b = [...document.querySelectorAll('.opblock-{method}')]
          .find(b => b.querySelector("[data-path='{path}']"));
        const cell = b && b.querySelector('.live-responses-table tr.response .response-col_status');
        return cell ? cell.textContent.trim() : null;""", f"the response of {method.upper()} {path}", timeout_s=20)


def test_docs_work_offline(offline_browser: Any, keyed_server: Running) -> None:
    from selenium.webdriver.common.by import By

    driver = offline_browser
    base = keyed_server.server.url
    spec = httpx.get(f"{base}/openapi.json", timeout=30).json()
    operations = _operations(spec)
    assert {("get", "/health"), ("get", "/loras")} <= {(m, p) for m, p, _ in operations}

    # the browser really is offline: a CDN page does not load
    driver.get("data:text/html,<script src='https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js'"
               " onerror='document.title=\"blocked\"' onload='document.title=\"loaded\"'></script>")
    wait_js(driver, "return document.title === 'blocked'", "the CDN script to fail", timeout_s=20)
    console(driver)  # reading the log empties it: the probe's own failure is not held against the pages

    driver.get(f"{base}/docs")
    wait_js(driver, "return document.querySelector('.swagger-ui .info .title')", "Swagger UI's title", timeout_s=30)
    assert spec["info"]["title"] in driver.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
    expected = sum(tags for _, _, tags in operations)
    rendered = wait_js(driver, f"const n = document.querySelectorAll('.opblock').length; return n >= {expected} && n",
                       f"{expected} operations", timeout_s=30)
    assert rendered == expected, (rendered, expected)
    listed = set(driver.execute_script(
        "return [...document.querySelectorAll('.opblock')].map(b => b.querySelector('.opblock-summary-method')"
        ".textContent.toLowerCase() + ' ' + b.querySelector('.opblock-summary-path').dataset.path)"))
    assert listed == {f"{m} {p}" for m, p, _ in operations}

    # an open route
    assert _try_it_out(driver, "get", "/health") == "200"

    # Authorize with the key (the Bearer scheme), then a protected route
    driver.find_element(By.CSS_SELECTOR, ".auth-wrapper .btn.authorize").click()
    wait_js(driver, "return document.querySelector('.dialog-ux .auth-container input')", "the Authorize dialog",
            timeout_s=15)
    container = next(c for c in driver.find_elements(By.CSS_SELECTOR, ".dialog-ux .auth-container")
                     if "HTTPBearer" in c.text)
    container.find_element(By.CSS_SELECTOR, "input").send_keys(API_KEY)
    container.find_element(By.CSS_SELECTOR, "button.authorize").click()
    wait_js(driver, "return [...document.querySelectorAll('.dialog-ux .auth-container')]"
                    ".some(c => c.textContent.includes('HTTPBearer') && c.textContent.includes('Logout'))",
            "the key to be accepted by the dialog", timeout_s=15)
    driver.find_element(By.CSS_SELECTOR, ".dialog-ux .btn-done").click()
    assert _try_it_out(driver, "get", "/loras") == "200"

    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(ARTIFACTS / "docs-offline.png"))
    messages = console(driver)
    assert not _foreign_requests(driver, base, messages)
    errors = [m for m in messages if "Uncaught" in m or "ERR_" in m]
    assert not errors, errors

    driver.get(f"{base}/redoc")
    wait_js(driver, "const h = document.querySelector('.api-info h1'); return h && h.textContent",
            "ReDoc's title", timeout_s=30)
    assert spec["info"]["title"] in driver.find_element(By.CSS_SELECTOR, ".api-info h1").text
    wait_js(driver, "return document.querySelectorAll('[data-section-id^=\"operation/\"]').length > 0",
            "ReDoc's operations", timeout_s=30)
    assert driver.save_screenshot(str(ARTIFACTS / "redoc-offline.png"))
    messages = console(driver)
    assert not _foreign_requests(driver, base, messages)
    errors = [m for m in messages if "Uncaught" in m or "ERR_" in m]
    assert not errors, errors
