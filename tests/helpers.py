"""Test helpers: real uvicorn servers on free loopback ports, in a thread or a subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadServer:
    """uvicorn serving an app object in a background thread of the test process."""

    def __init__(self, app, port: int | None = None, **config) -> None:  # type: ignore[no-untyped-def]
        self.port = port or free_port()
        self.config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", **config)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        scheme = "https" if config.get("ssl_certfile") else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def wait_until(predicate, timeout_s: float = 60.0, interval_s: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def wait_ready(client: httpx.Client, timeout_s: float = 120.0) -> dict:
    def ready():  # type: ignore[no-untyped-def]
        try:
            body = client.get("/health").json()
        except httpx.TransportError:
            return None
        return body if body.get("model_loaded") else None

    return wait_until(ready, timeout_s, 0.1, "model_loaded")


def wait_final(client: httpx.Client, task_id: str, timeout_s: float = 120.0) -> dict:
    def final():  # type: ignore[no-untyped-def]
        body = client.get(f"/task/{task_id}").json()
        return body if body["status"] in ("completed", "failed", "cancelled") else None

    return wait_until(final, timeout_s, 0.05, f"task {task_id} to finish")


class SubprocessServer:
    """`python start_api.py ...` as a real child process (restart and kill -9 tests)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, port: int | None = None,
                 log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.args = [sys.executable, str(REPO_ROOT / "start_api.py"), "--host", "127.0.0.1", "--port",
                     str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SubprocessServer:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     cwd=str(REPO_ROOT), start_new_session=True)
        def up():  # type: ignore[no-untyped-def]
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"server exited early with {self.proc.returncode}; log: {self.log_path}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
            return False
        wait_until(up, 120, 0.1, "server port")
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
