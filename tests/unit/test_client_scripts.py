"""Unit tests of the user-facing client scripts: test_network.py, test_async_api.py, example_usage.py.

The scripts live at the repository root and are imported by file path under private module names
(their own names start with `test_`, and the root is on pythonpath, so importing them by name
could clash with pytest's collection). Network access stays on 127.0.0.1: the end-to-end cases
run the scripts' main() against a tiny in-process stdlib HTTP server that speaks the API contract.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import ipaddress
import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load(filename: str) -> ModuleType:
    name = "client_script_" + filename.removesuffix(".py")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


net = _load("test_network.py")
aio = _load("test_async_api.py")
ex = _load("example_usage.py")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("VOXCPM_API_KEY", "VOXCPM_BASE_URL"):
        monkeypatch.delenv(var, raising=False)


# =============================================================================================
# a small fake of the API contract (stdlib only), for the scripts' main()
# =============================================================================================

class FakeApi:
    """In-memory server state. Tasks finish after a few polls, with rising progress."""

    def __init__(self, api_key: str | None = None, loras: list[str] | None = None) -> None:
        self.api_key = api_key
        self.loras = ["tiny-lora-r4", "run1/checkpoints/step_0000200"] if loras is None else loras
        self.tasks: dict[str, dict[str, Any]] = {}
        self.polls: dict[str, int] = {}
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.lock = threading.Lock()
        self.counter = 0

    def new_task(self, body: dict[str, Any]) -> dict[str, Any]:
        self.counter += 1
        task_id = f"{self.counter:08x}"
        seed = body.get("seed", -1)
        task = {
            "task_id": task_id, "status": "pending", "message": "queued", "progress": 0.0,
            "created_at": "2025-01-01T00:00:00", "updated_at": "2025-01-01T00:00:00",
            "estimated_time": 3, "audio_path": None, "error": None, "sample_rate": None,
            "duration_s": None, "lora_name": body.get("lora_name"), "seed": 777 if seed in (-1, None) else seed,
            "_format": body.get("response_format", "mp3"),
        }
        self.tasks[task_id] = task
        self.polls[task_id] = 0
        return task

    def finish(self, task: dict[str, Any]) -> None:
        fmt = task["_format"]
        name = f"tts_{task['task_id']}_1700000000.{fmt}"
        self.files[name] = {"wav": b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 64,
                            "mp3": b"ID3\x04" + b"\x00" * 64}.get(fmt, b"\x01" * 64)
        task.update(status="completed", progress=1.0, message="done", audio_path=f"api_outputs/{name}",
                    sample_rate=16000, duration_s=1.25)

    def advance(self, task: dict[str, Any]) -> None:
        if task["status"] in ("completed", "failed", "cancelled"):
            return
        n = self.polls[task["task_id"]] = self.polls[task["task_id"]] + 1
        if n >= 3:
            self.finish(task)
        else:
            task.update(status="processing", progress=round(0.4 * n, 2), message=f"patch {n}")

    def public(self, task: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in task.items() if not k.startswith("_")}


def _make_handler(api: FakeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, body: Any, headers: dict[str, str] | None = None,
                  raw: bytes | None = None) -> None:
            data = raw if raw is not None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self, path: str) -> bool:
            if not api.api_key or path in ("/health", "/docs"):
                return True
            return (self.headers.get("Authorization") == f"Bearer {api.api_key}"
                    or self.headers.get("X-API-Key") == api.api_key)

        def _route(self, method: str) -> None:
            parts = urlsplit(self.path)
            path, query = unquote(parts.path), parse_qs(parts.query)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            with api.lock:
                api.requests.append((method, self.path, raw))
                if not self._authorized(path):
                    return self._send(401, {"detail": "Missing or invalid API key"})
                if method == "GET" and path == "/health":
                    return self._send(200, {"status": "healthy", "model_loaded": True, "device": "cpu"})
                if method == "GET" and path == "/loras":
                    return self._send(200, {"loras": api.loras, "count": len(api.loras)})
                if method == "GET" and path == "/tasks":
                    status = query.get("status", [None])[0]
                    limit = int(query.get("limit", ["50"])[0])
                    rows = [api.public(t) for t in api.tasks.values() if status in (None, t["status"])]
                    return self._send(200, {"tasks": rows[:limit], "total": len(api.tasks),
                                            "processing": 0, "max_concurrent": 2})
                if method == "POST" and path in ("/synthesize", "/synthesize/upload"):
                    if path == "/synthesize":
                        body = json.loads(raw)
                    else:  # multipart: only check that a file and text were sent
                        if b'name="file"' not in raw or b'name="text"' not in raw:
                            return self._send(422, {"detail": [{"loc": ["body", "file"], "msg": "required"}]})
                        body = {"async_mode": b'name="async_mode"\r\n\r\nfalse' not in raw}
                    lora = body.get("lora_name")
                    if lora not in (None, "None") and lora not in api.loras:
                        return self._send(404, {"detail": f"LoRA '{lora}' not found"})
                    if body.get("ref_audio_path") and body["ref_audio_path"] != "ok.wav":
                        return self._send(404, {"detail": "reference audio not found"})
                    task = api.new_task(body)
                    if body.get("async_mode", True):
                        return self._send(200, {"task_id": task["task_id"], "status": "submitted",
                                                "message": "Task submitted", "estimated_time": 3,
                                                "progress": 0.0})
                    api.finish(task)
                    return self._send(200, {"task_id": task["task_id"], "status": "success",
                                            "message": "Speech synthesized successfully",
                                            "audio_path": task["audio_path"], "sample_rate": 16000})
                match = re.fullmatch(r"/task/([^/]+)", path)
                if match:
                    task = api.tasks.get(match.group(1))
                    if task is None:
                        return self._send(404, {"detail": "Task not found"})
                    if method == "GET":
                        api.advance(task)
                        return self._send(200, api.public(task))
                    if method == "DELETE":
                        if task["status"] in ("completed", "failed", "cancelled"):
                            return self._send(409, {"detail": "Task already finished"})
                        task.update(status="cancelled", message="Cancelled")
                        return self._send(200, {"task_id": task["task_id"], "status": "cancelled",
                                                "message": "Task cancelled"})
                match = re.fullmatch(r"/download/([^/]+)", path)
                if method == "GET" and match:
                    data = api.files.get(match.group(1))
                    if data is None:
                        return self._send(404, {"detail": "File not found"})
                    return self._send(200, None, raw=data)
                if method == "DELETE" and path == "/cleanup":
                    return self._send(200, {"message": "Cleanup completed", "deleted_count": 0})
                return self._send(404, {"detail": "Not Found"})

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_DELETE(self) -> None:
            self._route("DELETE")

    return Handler


class FakeServer:
    def __init__(self, api: FakeApi) -> None:
        self.api = api
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(api))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server() -> Any:
    with FakeServer(FakeApi()) as server:
        yield server


@pytest.fixture
def fake_server_with_key() -> Any:
    with FakeServer(FakeApi(api_key="s3cret")) as server:
        yield server


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the with-block ends


# =============================================================================================
# test_network.py
# =============================================================================================

class TestNetworkArgs:
    def test_defaults(self) -> None:
        args = net.parse_args([])
        assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)
        assert (args.https, args.insecure) == (False, False)

    def test_flags(self) -> None:
        args = net.parse_args(["--host", "192.168.1.5", "--port", "8080", "--api-key", "k", "--https", "--insecure"])
        assert (args.host, args.port, args.api_key, args.https, args.insecure) == ("192.168.1.5", 8080, "k", True, True)

    def test_api_key_from_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("VOXCPM_API_KEY", "from-env")
        assert net.parse_args([]).api_key == "from-env"
        assert net.parse_args(["--api-key", "flag"]).api_key == "flag"

    @pytest.mark.parametrize("port", ["0", "70000", "abc"])
    def test_bad_port(self, port: str) -> None:
        with pytest.raises(SystemExit):
            net.parse_args(["--port", port])


class TestNetworkUrlsAndHeaders:
    @pytest.mark.parametrize(("host", "port", "https", "expected"), [
        ("127.0.0.1", 8000, False, "http://127.0.0.1:8000"),
        ("192.168.1.100", 8080, True, "https://192.168.1.100:8080"),
        ("0.0.0.0", 8000, False, "http://127.0.0.1:8000"),
        ("localhost", 1, False, "http://localhost:1"),
        ("::1", 8000, False, "http://[::1]:8000"),
    ])
    def test_build_base_url(self, host: str, port: int, https: bool, expected: str) -> None:
        assert net.build_base_url(host, port, https) == expected

    def test_build_url(self) -> None:
        assert net.build_url("http://h:1/", "/tasks") == "http://h:1/tasks"
        assert net.build_url("http://h:1", "tasks", limit=5, status=None) == "http://h:1/tasks?limit=5"
        assert net.build_url("http://h:1", "/x", q="a b") == "http://h:1/x?q=a%20b"

    def test_auth_headers(self) -> None:
        assert net.build_auth_headers(None) == {}
        assert net.build_auth_headers("") == {}
        assert net.build_auth_headers("abc") == {"Authorization": "Bearer abc"}


class TestLanDiscovery:
    def test_returns_valid_non_loopback_ipv4_strings(self) -> None:
        addresses = net.get_lan_ipv4_addresses()
        assert isinstance(addresses, list)
        assert len(addresses) == len(set(addresses))
        for address in addresses:
            assert isinstance(address, str)
            parsed = ipaddress.IPv4Address(address)
            assert not parsed.is_loopback and not parsed.is_unspecified

    def test_merges_route_and_hostname_sources(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(net, "_route_source_address", lambda: "192.168.1.20")
        monkeypatch.setattr(net, "_hostname_addresses",
                            lambda: ["127.0.1.1", "192.168.1.20", "10.0.0.7", "0.0.0.0", "not-an-ip"])
        assert net.get_lan_ipv4_addresses() == ["192.168.1.20", "10.0.0.7"]

    def test_offline_machine(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(net, "_route_source_address", lambda: None)
        monkeypatch.setattr(net, "_hostname_addresses", lambda: ["127.0.0.1"])
        assert net.get_lan_ipv4_addresses() == []

    def test_route_probe_sends_nothing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        calls: list[str] = []

        class Spy(socket.socket):
            def send(self, *a: Any, **k: Any) -> int:  # pragma: no cover - must not be called
                calls.append("send")
                return 0

            def sendto(self, *a: Any, **k: Any) -> int:  # pragma: no cover - must not be called
                calls.append("sendto")
                return 0

        monkeypatch.setattr(net.socket, "socket", Spy)
        result = net._route_source_address()
        assert result is None or net.is_ipv4(result)
        assert calls == []

    @pytest.mark.parametrize(("text", "usable"), [
        ("192.168.1.2", True), ("10.1.2.3", True), ("127.0.0.1", False), ("0.0.0.0", False),
        ("224.0.0.1", False), ("999.1.1.1", False), ("fe80::1", False), ("", False),
    ])
    def test_is_usable_lan_ipv4(self, text: str, usable: bool) -> None:
        assert net.is_usable_lan_ipv4(text) is usable


class TestPortCheck:
    def test_open_and_closed(self) -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            port = listener.getsockname()[1]
            assert net.check_port("127.0.0.1", port, timeout=0.5) is True
        assert net.check_port("127.0.0.1", _closed_port(), timeout=0.5) is False


class TestAdvice:
    def _health(self, ok: bool = True, loaded: bool = True) -> Any:
        if ok:
            return net.ProbeResult("/health", True, 200, {"status": "healthy", "model_loaded": loaded})
        return net.ProbeResult("/health", False, error="connection failed: Connection refused")

    def _advice(self, **overrides: Any) -> str:
        kwargs: dict[str, Any] = dict(host="127.0.0.1", port=8000, https=False, lan_addresses=["192.168.1.20"],
                                      loopback_open=True, lan_open={"192.168.1.20": True}, server_is_local=True,
                                      health=self._health(), auth_failed=False)
        kwargs.update(overrides)
        return "\n".join(net.build_advice(**kwargs))

    def test_reachable_server_gets_lan_url_firewall_and_docs(self) -> None:
        text = self._advice()
        assert "http://192.168.1.20:8000" in text
        assert "ufw allow 8000/tcp" in text
        assert "http://127.0.0.1:8000/docs" in text

    def test_loopback_only_suggests_host_0000(self) -> None:
        assert "--host 0.0.0.0" in self._advice(lan_open={"192.168.1.20": False})

    def test_nothing_listening(self) -> None:
        text = self._advice(loopback_open=False, lan_open={"192.168.1.20": False}, health=self._health(ok=False))
        assert "start_api.py --port 8000" in text

    def test_auth_and_loading_hints(self) -> None:
        text = self._advice(auth_failed=True, health=self._health(loaded=False))
        assert "--api-key" in text and "VOXCPM_API_KEY" in text
        assert "model_loaded" in text

    def test_load_failure(self) -> None:
        health = net.ProbeResult("/health", True, 200, {"status": "unhealthy", "model_loaded": False,
                                                        "error": "OSError: no weights"})
        text = self._advice(health=health)
        assert "failed to load" in text and "no weights" in text and "still loading" not in text

    def test_https_urls(self) -> None:
        assert "https://192.168.1.20:8443" in self._advice(https=True, port=8443)

    def test_describe_probe(self) -> None:
        ok = net.ProbeResult("/loras", True, 200, {"loras": ["a", "b/c"], "count": 2}, elapsed_ms=3.0)
        assert "2 LoRA(s): a, b/c" in net.describe_probe(ok)
        bad = net.ProbeResult("/tasks", False, 401, {"detail": "no"}, error="HTTP 401: no")
        assert "HTTP 401" in net.describe_probe(bad)

    def test_tls_reason(self) -> None:
        long = ("HTTPSConnectionPool(host='h', port=1): Max retries exceeded (Caused by SSLError("
                "SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
                "self-signed certificate (_ssl.c:1006)')))")
        assert net.tls_reason(Exception(long)) == "certificate verify failed: self-signed certificate"


class TestNetworkMain:
    def test_server_answers(self, fake_server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
        assert net.main(["--port", str(fake_server.port), "--connect-timeout", "0.3"]) == 0
        out = capsys.readouterr().out
        assert "GET /health" in out and "2 LoRA(s)" in out and "total=0" in out
        assert f"127.0.0.1:{fake_server.port}" in out

    def test_api_key_is_sent(self, fake_server_with_key: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
        port = str(fake_server_with_key.port)
        assert net.main(["--port", port, "--connect-timeout", "0.3"]) == 0  # /health needs no key
        assert "requires an API key" in capsys.readouterr().out
        assert net.main(["--port", port, "--api-key", "s3cret", "--connect-timeout", "0.3"]) == 0
        assert "2 LoRA(s)" in capsys.readouterr().out

    def test_no_server(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert net.main(["--port", str(_closed_port()), "--connect-timeout", "0.3", "--timeout", "1"]) == 1
        assert "NOT reachable" in capsys.readouterr().out


# =============================================================================================
# test_async_api.py
# =============================================================================================

class TestAsyncArgs:
    def test_defaults(self) -> None:
        args = aio.parse_args([])
        assert args.base_url == "http://127.0.0.1:8000"
        assert args.api_key is None and args.insecure is False
        assert (args.lora, args.first_lora, args.seed, args.response_format) == (None, False, -1, "mp3")
        assert (args.cfg_scale, args.steps) == (2.0, 10)
        assert args.out_dir == Path("./downloads")
        assert args.wait_s > 0

    def test_options(self) -> None:
        args = aio.parse_args(["--base-url", "https://h:9", "--api-key", "k", "--insecure", "--lora", "a/b",
                               "--seed", "42", "--format", "wav", "--out-dir", "x", "--wait-s", "5",
                               "--text", "hi"])
        assert (args.base_url, args.api_key, args.insecure, args.lora) == ("https://h:9", "k", True, "a/b")
        assert (args.seed, args.response_format, args.out_dir, args.wait_s, args.text) == (
            42, "wav", Path("x"), 5.0, "hi")

    def test_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("VOXCPM_API_KEY", "ek")
        monkeypatch.setenv("VOXCPM_BASE_URL", "http://e:1")
        args = aio.parse_args([])
        assert (args.api_key, args.base_url) == ("ek", "http://e:1")

    @pytest.mark.parametrize("argv", [
        ["--format", "ogg"], ["--lora", "a", "--first-lora"], ["--poll-interval", "0"], ["--timeout-s", "0"],
    ])
    def test_rejected(self, argv: list[str]) -> None:
        with pytest.raises(SystemExit):
            aio.parse_args(argv)


class TestAsyncHelpers:
    @pytest.mark.parametrize(("given", "expected"), [
        ("http://h:8000/", "http://h:8000"), ("h:8000", "http://h:8000"),
        (" https://h ", "https://h"), ("http://h:1/prefix/", "http://h:1/prefix"),
    ])
    def test_normalize_base_url(self, given: str, expected: str) -> None:
        assert aio.normalize_base_url(given) == expected

    def test_build_url(self) -> None:
        assert aio.build_url("http://h:1/", "/task/abc") == "http://h:1/task/abc"
        assert aio.build_url("http://h:1", "/tasks", status="processing", limit=10) == \
            "http://h:1/tasks?status=processing&limit=10"
        assert aio.build_url("http://h:1", "/tasks", status=None) == "http://h:1/tasks"

    def test_auth_headers(self) -> None:
        assert aio.build_auth_headers(None) == {}
        assert aio.build_auth_headers("k") == {"Authorization": "Bearer k"}

    def test_payload(self) -> None:
        args = aio.parse_args(["--seed", "7", "--format", "flac", "--text", "hello", "--steps", "12"])
        payload = aio.build_payload(args, "my/lora")
        assert payload == {"text": "hello", "lora_name": "my/lora", "cfg_scale": 2.0, "steps": 12, "seed": 7,
                           "response_format": "flac", "async_mode": True}
        args = aio.parse_args(["--ref-audio-path", "spk/a.wav", "--ref-text", "words"])
        payload = aio.build_payload(args, None)
        assert payload["ref_audio_path"] == "spk/a.wav" and payload["ref_text"] == "words"
        assert payload["lora_name"] is None
        json.dumps(payload)  # JSON-serialisable

    def test_choose_lora(self) -> None:
        available = ["a", "run/checkpoints/step_1"]
        assert aio.choose_lora(None, False, available) == (None, None)
        assert aio.choose_lora(None, True, available) == ("a", None)
        assert aio.choose_lora(None, True, []) == (None, None)
        assert aio.choose_lora("run/checkpoints/step_1", False, available) == ("run/checkpoints/step_1", None)
        assert aio.choose_lora("None", False, available) == (None, None)
        name, problem = aio.choose_lora("missing", False, available)
        assert name is None and "missing" in problem and "run/checkpoints/step_1" in problem

    @pytest.mark.parametrize(("path", "name"), [
        ("api_outputs/tts_ab12cd34_1765715910.mp3", "tts_ab12cd34_1765715910.mp3"),
        ("tts_x_1.wav", "tts_x_1.wav"),
        ("C:\\out\\tts_x_1.wav", "tts_x_1.wav"),
        ("/abs/dir/tts_x_1.flac", "tts_x_1.flac"),
    ])
    def test_audio_filename(self, path: str, name: str) -> None:
        assert aio.audio_filename(path) == name

    @pytest.mark.parametrize(("progress", "bar"), [
        (0.0, "[----------]   0.0%"),
        (0.5, "[#####-----]  50.0%"),
        (1.0, "[##########] 100.0%"),
        (1.7, "[##########] 100.0%"),
        (-1, "[----------]   0.0%"),
        (None, "[----------]   0.0%"),
        ("0.25", "[##--------]  25.0%"),
        (float("nan"), "[----------]   0.0%"),
    ])
    def test_progress_bar(self, progress: Any, bar: str) -> None:
        assert aio.format_progress_bar(progress, width=10) == bar

    def test_progress_bar_width(self) -> None:
        bar = aio.format_progress_bar(0.333)
        assert bar.startswith("[") and len(bar.split("]")[0]) == 31 and bar.endswith(" 33.3%")

    @pytest.mark.parametrize(("seconds", "text"), [
        (None, "--:--"), (-1, "--:--"), (float("inf"), "--:--"), (0, "0:00"), (7.4, "0:07"),
        (754, "12:34"), (3723, "1:02:03"),
    ])
    def test_format_duration(self, seconds: Any, text: str) -> None:
        assert aio.format_duration(seconds) == text

    def test_estimate_remaining(self) -> None:
        assert aio.estimate_remaining(0.5, 10.0) == pytest.approx(10.0)
        assert aio.estimate_remaining(0.25, 6.0, server_estimate_s=100) == pytest.approx(18.0)
        assert aio.estimate_remaining(1.0, 6.0) == 0.0
        # no usable progress yet: fall back to the server's estimate minus the time already waited
        assert aio.estimate_remaining(0.0, None, server_estimate_s=45, total_elapsed_s=5) == pytest.approx(40.0)
        assert aio.estimate_remaining(0.0, None, server_estimate_s=45, total_elapsed_s=60) == 0.0
        assert aio.estimate_remaining(0.0, None) is None

    def test_render_progress_line(self) -> None:
        line = aio.render_progress_line({"status": "processing", "progress": 0.6, "message": "generating"},
                                        elapsed_s=30, eta_s=20)
        assert "60.0%" in line and "processing" in line and "ETA 0:20" in line and "elapsed 0:30" in line
        assert "generating" in line
        long = aio.render_progress_line({"status": "pending", "message": "x" * 100}, 0, None)
        assert "ETA --:--" in long and len(long) < 140

    def test_retry_after(self) -> None:
        assert aio.retry_after_seconds({"Retry-After": "7"}) == 7.0
        assert aio.retry_after_seconds({}, default=3) == 3
        assert aio.retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, default=2) == 2
        assert aio.retry_after_seconds(None, default=1) == 1

    def _response(self, status: int, body: Any) -> requests.Response:
        resp = requests.Response()
        resp.status_code = status
        resp._content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return resp

    def test_error_detail(self) -> None:
        assert aio.error_detail(self._response(404, {"detail": "Task not found"})) == "Task not found"
        validation = {"detail": [{"loc": ["body", "steps"], "msg": "Input should be less than or equal to 100",
                                  "type": "less_than_equal"}]}
        assert aio.error_detail(self._response(422, validation)) == "steps: Input should be less than or equal to 100"
        assert aio.error_detail(self._response(502, b"<html>Bad gateway</html>")) == "<html>Bad gateway</html>"

    @pytest.mark.parametrize(("head", "fmt", "ok"), [
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "wav", True), (b"ID3\x04\x00", "mp3", True),
        (b"\xff\xfb\x90\x00", "mp3", True), (b"fLaC\x00", "flac", True), (b"OggS\x00", "opus", True),
        (b"\x00\x00\x00\x00", "wav", False), (b"RIFF", "mp3", False), (b"\x01\x02", "pcm", None),
    ])
    def test_audio_signature(self, head: bytes, fmt: str, ok: bool | None) -> None:
        assert aio.audio_signature_ok(head, fmt) is ok

    def test_progress_printer_without_tty_prints_changes_only(self) -> None:
        stream = io.StringIO()
        printer = aio.ProgressPrinter(stream)
        for progress in (0.0, 0.01, 0.02, 0.5, 0.51, 1.0):
            task = {"status": "processing" if progress < 1 else "completed", "progress": progress}
            printer.update(task, aio.render_progress_line(task, 1, None))
        printer.finish()
        lines = stream.getvalue().splitlines()
        assert len(lines) == 3 and "100.0%" in lines[-1]

    def test_format_size(self) -> None:
        assert aio.format_size(10) == "10 B"
        assert aio.format_size(2048) == "2.0 KiB"
        assert aio.format_size(3 * 1024 * 1024) == "3.0 MiB"


class TestAsyncMain:
    def test_full_walkthrough(self, fake_server: FakeServer, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
        rc = aio.main(["--base-url", fake_server.url, "--out-dir", str(tmp_path), "--first-lora",
                       "--seed", "42", "--format", "wav", "--poll-interval", "0.01", "--wait-s", "5"])
        out = capsys.readouterr().out
        assert rc == 0, out
        files = list(tmp_path.iterdir())
        assert [f.name for f in files] == ["tts_00000001_1700000000.wav"] and files[0].stat().st_size > 0
        body = json.loads(next(raw for method, path, raw in fake_server.api.requests
                               if method == "POST" and path == "/synthesize"))
        assert body["lora_name"] == "tiny-lora-r4" and body["seed"] == 42 and body["async_mode"] is True
        assert body["response_format"] == "wav"
        assert "100.0%" in out and "Summary" in out and "42" in out

    def test_auth(self, fake_server_with_key: FakeServer, tmp_path: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
        base = ["--base-url", fake_server_with_key.url, "--out-dir", str(tmp_path), "--poll-interval", "0.01"]
        assert aio.main(base) == 1
        assert "API key" in capsys.readouterr().out
        assert aio.main([*base, "--api-key", "s3cret"]) == 0

    def test_unknown_lora(self, fake_server: FakeServer, tmp_path: Path) -> None:
        assert aio.main(["--base-url", fake_server.url, "--out-dir", str(tmp_path), "--lora", "nope"]) == 1
        assert not any(m == "POST" for m, _, _ in fake_server.api.requests)

    def test_model_load_failure_stops_waiting(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        api = FakeApi()
        with FakeServer(api) as server:
            original = server.httpd.RequestHandlerClass._send

            def unhealthy(handler: Any, status: int, body: Any, headers: Any = None, raw: Any = None) -> None:
                if isinstance(body, dict) and body.get("status") == "healthy":
                    body = {"status": "unhealthy", "model_loaded": False, "error": "OSError: no weights"}
                original(handler, status, body, headers, raw)

            server.httpd.RequestHandlerClass._send = unhealthy  # type: ignore[method-assign]
            started = time.monotonic()
            assert aio.main(["--base-url", server.url, "--out-dir", str(tmp_path), "--wait-s", "30"]) == 1
            assert time.monotonic() - started < 10
        assert "no weights" in capsys.readouterr().out

    def test_no_server(self, tmp_path: Path) -> None:
        url = f"http://127.0.0.1:{_closed_port()}"
        started = time.monotonic()
        assert aio.main(["--base-url", url, "--out-dir", str(tmp_path), "--wait-s", "0"]) == 1
        assert time.monotonic() - started < 10


# =============================================================================================
# example_usage.py
# =============================================================================================

class TestExampleUsage:
    def test_args(self) -> None:
        args = ex.parse_args([])
        assert args.base_url == "http://localhost:8000" and args.api_key is None
        assert args.examples == list(ex.EXAMPLE_NAMES)
        args = ex.parse_args(["sync", "tasks", "sync", "--base-url", "http://h:1", "--api-key", "k"])
        assert args.examples == ["sync", "tasks"] and args.base_url == "http://h:1" and args.api_key == "k"

    def test_unknown_example(self) -> None:
        with pytest.raises(SystemExit):
            ex.parse_args(["nonsense"])

    def test_helpers(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(ex, "BASE_URL", "http://h:8000/")
        assert ex.url("/loras") == "http://h:8000/loras"
        assert ex.url("task/1") == "http://h:8000/task/1"
        assert ex.auth_headers(None) == {} and ex.auth_headers("k") == {"Authorization": "Bearer k"}
        assert ex.filename_of("api_outputs/tts_ab12cd34_1765715910.mp3") == "tts_ab12cd34_1765715910.mp3"

    def test_reference_name(self, tmp_path: Path) -> None:
        root = tmp_path / "reference_audio"
        (root / "spk").mkdir(parents=True)
        inside = root / "spk" / "voice.wav"
        inside.write_bytes(b"RIFF")
        assert ex.reference_name(inside, root) == "spk/voice.wav"
        outside = tmp_path / "clip.flac"
        outside.write_bytes(b"fLaC")
        assert ex.reference_name(outside, root) == "example_reference.flac"
        assert (root / "example_reference.flac").read_bytes() == b"fLaC"

    def test_examples_run(self, fake_server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
        monkeypatch.setattr(ex.time, "sleep", lambda s: None)
        rc = ex.main(["--base-url", fake_server.url, "--out-dir", str(tmp_path / "dl"),
                      "--ref-audio-dir", str(tmp_path / "refs"), "--wait-s", "5"])
        out = capsys.readouterr().out
        # clone-path is skipped: the fake server only knows "ok.wav"; everything else succeeds
        assert rc == 0, out
        assert "6 example(s) OK, 1 skipped, 0 failed" in out
        assert len(list((tmp_path / "dl").iterdir())) == 4  # sync, async, loras, clone-upload
        posted = [path for method, path, _ in fake_server.api.requests if method == "POST"]
        assert "/synthesize/upload" in posted
        assert ("DELETE", "/cleanup?max_age_s=3600") in [(m, p) for m, p, _ in fake_server.api.requests]

    def test_clone_by_path_sends_relative_name(self, fake_server: FakeServer, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
        refs = tmp_path / "refs"
        refs.mkdir()
        (refs / "ok.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVE")
        rc = ex.main(["clone-path", "--base-url", fake_server.url, "--out-dir", str(tmp_path / "dl"),
                      "--ref-audio-dir", str(refs), "--ref-audio", str(refs / "ok.wav"), "--ref-text", "words"])
        assert rc == 0, capsys.readouterr().out
        body = json.loads(next(raw for method, path, raw in fake_server.api.requests if method == "POST"))
        assert body["ref_audio_path"] == "ok.wav" and body["ref_text"] == "words"

    def test_failure_is_reported(self, fake_server_with_key: FakeServer, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
        rc = ex.main(["loras", "--base-url", fake_server_with_key.url, "--out-dir", str(tmp_path)])
        assert rc == 1
        assert "HTTP 401" in capsys.readouterr().out


def test_scripts_have_main_and_guard() -> None:
    for module in (net, aio, ex):
        source = Path(module.__file__).read_text(encoding="utf-8")
        assert callable(module.main)
        assert 'if __name__ == "__main__":' in source
        # pytest collects test_*.py files; the scripts must not define tests of their own
        assert not any(name.startswith(("test_", "Test")) for name in vars(module))


def test_argparse_namespace_types() -> None:
    assert isinstance(net.parse_args([]), argparse.Namespace)
