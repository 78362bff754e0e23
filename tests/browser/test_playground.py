"""The playground page (`/`) in a real headless Chromium against a real uvicorn + FakeEngine.

A session fixture provides the browser: Debian's `chromium` + `chromium-driver` (installed with
apt-get when missing and running as root) driven by Selenium (pip-installed at the version pinned
in requirements-dev.txt when missing). If the browser cannot be had the tests FAIL with the reason,
unless VOXCPM_SKIP_BROWSER=1 is set. The main test leaves a screenshot in test-artifacts/playground.png.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.api.conftest import Running, fitting_shapes, wav_bytes, write_adapter
from tests.helpers import REPO_ROOT, ThreadServer, wait_ready
from voxcpm_api.api.app import create_app
from voxcpm_api.config import Settings
from voxcpm_api.engine.fake import FakeEngine

pytestmark = pytest.mark.xdist_group("browser")

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = REPO_ROOT / "test-artifacts"
API_KEY = "playground-test-key"
LORA = "narrator"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required", "--mute-audio",
                "--window-size=1280,1150"]


def _unavailable(reason: str) -> None:
    if os.environ.get("VOXCPM_SKIP_BROWSER") == "1":
        pytest.skip(f"browser tests skipped (VOXCPM_SKIP_BROWSER=1): {reason}")
    pytest.fail(f"browser tests need Chromium + chromedriver + selenium: {reason}\n"
                "Install them (Debian: apt-get install chromium chromium-driver) or set VOXCPM_SKIP_BROWSER=1.",
                pytrace=False)


def _ensure_chromium() -> None:
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")):
        _unavailable(f"{CHROMIUM} or {CHROMEDRIVER} is missing, and installing needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Both xdist workers may get here at once: one installs, the other waits and then finds it done.
    # dpkg's own lock is waited for too (another apt run on the machine), instead of failing at once.
    import fcntl

    with open("/tmp/voxcpm-api-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
            return
        wait = ["-o", "DPkg::Lock::Timeout=900"]
        for cmd in (["apt-get", *wait, "update", "-qq"],
                    ["apt-get", *wait, "install", "-y", "-qq", "chromium", "chromium-driver"]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, check=False)
            if done.returncode != 0:
                _unavailable(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr[-2000:]}")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        _unavailable(f"apt-get ran but {CHROMIUM} / {CHROMEDRIVER} are still missing")


def _ensure_selenium() -> None:
    with contextlib.suppress(ImportError):
        import selenium  # noqa: F401
        return
    pins = re.findall(r"^selenium==[\w.]+", (REPO_ROOT / "requirements-dev.txt").read_text(), re.M)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", pins[0] if pins else "selenium"],
                          capture_output=True, text=True, timeout=600, check=False)
    importlib.invalidate_caches()
    try:
        import selenium  # noqa: F401
    except ImportError:
        _unavailable(f"selenium is not installed and pip failed: {done.stderr[-2000:]}")


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    _ensure_chromium()
    _ensure_selenium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with both paths given, Selenium Manager never downloads anything
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = tmp_path_factory.getbasetemp() / "chromedriver.log"
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER, log_output=str(log)))
    except Exception as exc:  # a broken install shows up here
        _unavailable(f"Chromium did not start: {exc} (chromedriver log: {log})")
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


STREAM_PATH = "/synthesize/stream"


def _without_stream(app: FastAPI) -> ASGIApp:
    """The app as a server without the streaming route would answer: 404 Not Found there."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == STREAM_PATH:
            await JSONResponse({"detail": "Not Found"}, status_code=404)(scope, receive, send)
        else:
            await app(scope, receive, send)

    return asgi


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Running]:
    """A real uvicorn serving create_app(Settings(...), engine=FakeEngine(...)) with one fitting LoRA.

    Parametrised with (api_key, stream): stream "yes" = the server as it is, with its streaming route;
    "no" = as if it had none (404 there), so the page must fall back to POST /synthesize.
    """
    key, stream = request.param
    settings = Settings(host="127.0.0.1", model="fake", output_dir=tmp_path / "output", lora_dir=tmp_path / "lora",
                        ref_audio_dir=[tmp_path / "refs"], max_concurrent=1, api_key=key)
    engine = FakeEngine(patch_delay_s=0.02)
    write_adapter(settings.lora_dir / LORA, fitting_shapes(engine))
    (tmp_path / "refs").mkdir()
    app = create_app(settings, engine=engine)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with ThreadServer(app if stream == "yes" else _without_stream(app)) as http, \
            httpx.Client(base_url=http.url, timeout=60.0, headers=headers) as client:
        wait_ready(client, timeout_s=30)
        yield Running(server=http, client=client, settings=settings, engine=engine, base=tmp_path)


# ---- page helpers ------------------------------------------------------------------------------


def wait_js(driver: Any, script: str, what: str, timeout_s: float = 60.0) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(lambda d: d.execute_script(script))
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; error box: {error_text(driver)!r}; "
                             f"player status: {text_of(driver, 'player-status')!r}; console: {console(driver)}")


def text_of(driver: Any, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById({element_id!r}).textContent")


def error_text(driver: Any) -> str:
    return driver.execute_script("const e = document.getElementById('error'); return e.hidden ? '' : e.textContent")


def console(driver: Any) -> list[str]:
    with contextlib.suppress(Exception):
        return [entry["message"] for entry in driver.get_log("browser")]
    return []


def set_value(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def playable_audio(driver: Any) -> dict:
    """Wait until the player has a source it has loaded far enough to know a duration."""
    return wait_js(driver, """
        const a = document.getElementById('player');
        return a.currentSrc && a.readyState >= 1 && a.duration > 0 && !a.error
          ? {src: a.currentSrc, mode: a.dataset.mode, readyState: a.readyState, duration: String(a.duration)} : null;
    """, "a playable <audio>")


ALL_TASKS_DONE = """
    const rows = [...document.querySelectorAll('#task-rows tr')];
    if (!rows.length || rows.some(tr => tr.cells[1].textContent !== 'completed')) return null;
    return rows.map(tr => ({id: tr.dataset.taskId, lora: tr.cells[3].textContent, seed: tr.cells[4].textContent,
                            progress: tr.querySelector('progress').value,
                            href: (tr.querySelector('a[download]') || {}).href}));
"""


# ---- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("server", [(API_KEY, "yes")], indirect=True, ids=["api-key-streaming"])
def test_playground_with_api_key(browser: Any, server: Running) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url = server.server.url
    # The page and its assets are open; the API behind them is not.
    assert httpx.get(f"{url}/").status_code == 200
    assert httpx.get(f"{url}/static/playground.js").status_code == 200
    assert httpx.get(f"{url}/static/nothing.js").status_code == 404
    assert httpx.get(f"{url}/loras").status_code == 401

    browser.get(f"{url}/")
    assert browser.title == "VoxCPM Playground"
    wait_js(browser, "return document.getElementById('error').textContent.includes('API key')",
            "the 401 message asking for the key")

    set_value(browser, "api-key", API_KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    lora_script = f"return [...document.getElementById('lora').options].some(o => o.value === {LORA!r})"
    wait_js(browser, lora_script, "the LoRA list")
    assert error_text(browser) == ""

    # the key survives a reload (localStorage)
    browser.refresh()
    wait_js(browser, lora_script, "the LoRA list after a reload")
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == API_KEY

    # the voice picker is shown exactly when the server has GET /voices; upload one and pick it
    wait_js(browser, "return document.getElementById('health').textContent.startsWith('Ready')", "health")
    has_voices = server.client.get("/voices").status_code == 200
    assert browser.find_element(By.ID, "voice-field").is_displayed() == has_voices
    if has_voices:
        reference = server.base / "alice.wav"
        reference.write_bytes(wav_bytes(seconds=1.0))
        set_value(browser, "voice-name", "alice")
        browser.find_element(By.ID, "voice-audio").send_keys(str(reference))
        set_value(browser, "voice-transcript", "A short reference recording.")
        browser.find_element(By.ID, "voice-btn").click()
        wait_js(browser, "return document.getElementById('voice').value === 'alice'", "the uploaded voice")
        assert "alice" in text_of(browser, "voice-list")

    # streamed with the key in a header: fetched, fed to the player (MediaSource for MP3), offered for download
    Select(browser.find_element(By.ID, "lora")).select_by_value(LORA)
    set_value(browser, "seed", "42")
    set_value(browser, "text", "The playground streams this sentence to the browser.")
    browser.find_element(By.ID, "play-btn").click()
    wait_js(browser, "return document.getElementById('play-btn').disabled", "the button to be disabled while busy",
            timeout_s=5)
    audio = playable_audio(browser)
    assert audio["src"].startswith("blob:") and audio["mode"] == "mediasource", audio
    wait_js(browser, "return !document.getElementById('play-btn').disabled", "the stream to end")
    assert error_text(browser) == ""
    assert text_of(browser, "player-status").startswith("Streamed"), text_of(browser, "player-status")
    assert browser.find_element(By.ID, "player-download").is_displayed()

    browser.find_element(By.ID, "task-btn").click()
    rows = wait_js(browser, ALL_TASKS_DONE, "the submitted task to complete in the task list")
    row = rows[0]
    assert row["lora"] == (f"{LORA} · voice alice" if has_voices else LORA), row
    assert row["seed"] == "42" and row["progress"] == 1, row
    assert row["href"] and row["href"].endswith(".mp3"), row
    download = server.client.get(row["href"])
    assert download.status_code == 200 and download.headers["content-type"] == "audio/mpeg"
    assert len(download.content) > 0

    ARTIFACTS.mkdir(exist_ok=True)
    browser.execute_script("document.activeElement && document.activeElement.blur()")
    assert browser.save_screenshot(str(ARTIFACTS / "playground.png"))
    errors = [m for m in console(browser) if "Uncaught" in m or "Content Security Policy" in m]
    assert not errors, errors

    if has_voices:  # delete it again (after a confirmation)
        browser.find_element(By.CSS_SELECTOR, "#voice-list button[aria-label='Delete voice alice']").click()
        browser.switch_to.alert.accept()
        wait_js(browser, "return !document.getElementById('voice-list').textContent.includes('alice')",
                "the voice to be deleted")
        assert server.client.get("/voices/alice").status_code == 404


@pytest.mark.parametrize("server", [(None, "yes"), (None, "no")], indirect=True,
                         ids=["streaming", "no-stream-route"])
def test_playground_without_key(browser: Any, server: Running, request: pytest.FixtureRequest) -> None:
    """No key: the player gets a plain URL: the stream's, or (no stream route) the file of a sync task."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{server.server.url}/")
    wait_js(browser, f"return [...document.getElementById('lora').options].some(o => o.value === {LORA!r})",
            "the LoRA list")
    assert error_text(browser) == ""
    Select(browser.find_element(By.ID, "format")).select_by_value("wav")
    browser.find_element(By.ID, "play-btn").click()
    audio = playable_audio(browser)
    streamed = request.node.callspec.params["server"][1] == "yes"
    pattern = r"/synthesize/stream\?.*response_format=wav" if streamed else r"/download/[^/]+\.wav$"
    assert re.search(pattern, audio["src"]) and audio["mode"] == ("stream-url" if streamed else "file"), audio
    assert error_text(browser) == ""

    # a bad request shows the API's own `detail`
    before = server.total()
    set_value(browser, "steps", "0")
    browser.find_element(By.ID, "task-btn").click()  # the form's own check (min=1) stops it: nothing is sent
    browser.execute_script("document.getElementById('steps').removeAttribute('min')")
    browser.find_element(By.ID, "task-btn").click()
    wait_js(browser, "return document.getElementById('error').textContent.includes('steps')", "the 422 detail")
    assert server.total() == before
