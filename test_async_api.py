#!/usr/bin/env python3
"""End-to-end walk-through of the VoxCPM LoRA TTS API's asynchronous workflow.

    python test_async_api.py                                  # server on http://127.0.0.1:8000
    python test_async_api.py --base-url http://192.168.1.100:8000 --api-key KEY
    python test_async_api.py --lora my_lora --seed 42 --format wav --text "Hello there"
    python test_async_api.py --first-lora                     # use the first LoRA the server lists

Steps:
  1. health check — waits up to --wait-s seconds for the model to be loaded;
  2. lists the LoRA adapters (GET /loras);
  3. shows task statistics (GET /tasks);
  4. submits an asynchronous synthesis task (POST /synthesize, async_mode=true);
  5. polls GET /task/{id}, drawing a progress bar from the server's real progress, with an ETA;
  6. downloads the audio into --out-dir (GET /download/{filename}) and checks it is not empty;
  then prints a summary. Ctrl-C while waiting cancels the task on the server (DELETE /task/{id}).

Exit status: 0 when the audio was generated and downloaded, 1 otherwise (130 on Ctrl-C).
Works against any model, including the offline test model (`python start_api.py --model tiny`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import quote, urlencode

try:
    import requests
except ImportError:  # pragma: no cover - only hit when the dependency is missing
    sys.stderr.write("This script needs 'requests': pip install -r requirements_api.txt\n")
    raise

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
BASE_URL_ENV = "VOXCPM_BASE_URL"
API_KEY_ENV = "VOXCPM_API_KEY"
FORMATS = ("mp3", "wav", "flac", "opus", "pcm")
FINAL_STATUSES = ("completed", "failed", "cancelled")
DEFAULT_TEXT = ("Hello! This is an asynchronous test of the VoxCPM text to speech API. "
                "The task is queued, processed in the background and downloaded when it is done.")


# --------------------------------------------------------------------------------------------
# argument parsing and pure helpers
# --------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Asynchronous end-to-end test of the VoxCPM TTS API.")
    conn = parser.add_argument_group("connection")
    conn.add_argument("--base-url", default=os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL,
                      help=f"server URL (default: ${BASE_URL_ENV} or {DEFAULT_BASE_URL})")
    conn.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                      help=f"API key if the server was started with --api-key (default: ${API_KEY_ENV})")
    conn.add_argument("--insecure", action="store_true",
                      help="do not verify the TLS certificate (HTTPS with a self-signed certificate)")
    conn.add_argument("--http-timeout", type=float, default=30.0, help="timeout of one HTTP request, s (30)")

    synth = parser.add_argument_group("synthesis")
    synth.add_argument("--text", default=DEFAULT_TEXT, help="text to synthesize")
    lora = synth.add_mutually_exclusive_group()
    lora.add_argument("--lora", default=None, metavar="NAME",
                      help="LoRA adapter name as listed by GET /loras (default: the base model)")
    lora.add_argument("--first-lora", action="store_true", help="use the first LoRA the server lists, if any")
    synth.add_argument("--seed", type=int, default=-1, help="random seed; -1 lets the server pick one (default)")
    synth.add_argument("--format", dest="response_format", choices=FORMATS, default="mp3",
                       help="audio format (default: mp3)")
    synth.add_argument("--cfg-scale", type=float, default=2.0, help="CFG scale, (0, 10] (default: 2.0)")
    synth.add_argument("--steps", type=int, default=10, help="inference steps, 1..100 (default: 10)")
    synth.add_argument("--ref-audio-path", default=None,
                       help="voice cloning: reference audio path RELATIVE to the server's --ref-audio-dir")
    synth.add_argument("--ref-text", default=None, help="voice cloning: transcript of the reference audio")

    run = parser.add_argument_group("waiting and output")
    run.add_argument("--wait-s", type=float, default=300.0,
                     help="how long to wait for the server and its model to be ready, s (default: 300)")
    run.add_argument("--timeout-s", type=float, default=900.0,
                     help="how long to wait for the task to finish before cancelling it, s (default: 900)")
    run.add_argument("--poll-interval", type=float, default=1.0, help="seconds between status polls (default: 1)")
    run.add_argument("--out-dir", type=Path, default=Path("./downloads"),
                     help="where to save the audio (default: ./downloads)")
    args = parser.parse_args(argv)
    if args.poll_interval <= 0:
        parser.error("--poll-interval must be positive")
    if args.wait_s < 0 or args.timeout_s <= 0:
        parser.error("--wait-s must be >= 0 and --timeout-s > 0")
    return args


def normalize_base_url(base_url: str) -> str:
    """Accept 'host:port' or a full URL; drop trailing slashes."""
    base_url = base_url.strip()
    if "://" not in base_url:
        base_url = "http://" + base_url
    return base_url.rstrip("/")


def build_url(base_url: str, path: str, **query: Any) -> str:
    """Join the base URL and a path; query items that are None are left out."""
    url = normalize_base_url(base_url) + "/" + path.lstrip("/")
    params = {k: v for k, v in query.items() if v is not None}
    return url + ("?" + urlencode(params) if params else "")


def build_auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def build_payload(args: argparse.Namespace, lora_name: str | None) -> dict[str, Any]:
    """The POST /synthesize JSON body for this run (always asynchronous)."""
    payload: dict[str, Any] = {
        "text": args.text,
        "lora_name": lora_name,
        "cfg_scale": args.cfg_scale,
        "steps": args.steps,
        "seed": args.seed,
        "response_format": args.response_format,
        "async_mode": True,
    }
    if args.ref_audio_path:
        payload["ref_audio_path"] = args.ref_audio_path
        payload["ref_text"] = args.ref_text
    return payload


def choose_lora(requested: str | None, first: bool, available: Sequence[str]) -> tuple[str | None, str | None]:
    """(lora_name to send, error message). None means the base model."""
    if requested is not None:
        if requested.strip().lower() in ("", "none", "null", "base"):
            return None, None
        if requested not in available:
            listed = ", ".join(available) if available else "none"
            return None, f"LoRA '{requested}' is not on the server (available: {listed})"
        return requested, None
    if first and available:
        return available[0], None
    return None, None


def audio_filename(audio_path: str) -> str:
    """'api_outputs/tts_ab12_1700000000.mp3' -> 'tts_ab12_1700000000.mp3' (/ or \\ separators)."""
    return audio_path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def clamp_progress(progress: Any) -> float:
    try:
        value = float(progress)
    except (TypeError, ValueError):
        return 0.0
    if value != value:  # NaN
        return 0.0
    return min(1.0, max(0.0, value))


def format_progress_bar(progress: Any, width: int = 30) -> str:
    """'[###########-------------------]  36.7%' for progress 0.367."""
    value = clamp_progress(progress)
    filled = int(round(value * width))
    return f"[{'#' * filled}{'-' * (width - filled)}] {value * 100:5.1f}%"


def format_duration(seconds: float | None) -> str:
    """'0:07', '12:34', '1:02:03'; '--:--' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "--:--"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def estimate_remaining(progress: Any, processing_elapsed_s: float | None, *,
                       server_estimate_s: float | None = None, total_elapsed_s: float = 0.0) -> float | None:
    """Seconds left: extrapolated from the real progress rate once there is some progress,
    otherwise what is left of the server's estimated_time; None when nothing is known."""
    value = clamp_progress(progress)
    if value >= 1.0:
        return 0.0
    if processing_elapsed_s is not None and processing_elapsed_s > 0 and value >= 0.02:
        return processing_elapsed_s * (1.0 - value) / value
    if server_estimate_s is not None:
        try:
            return max(0.0, float(server_estimate_s) - total_elapsed_s)
        except (TypeError, ValueError):
            return None
    return None


def render_progress_line(task: dict[str, Any], elapsed_s: float, eta_s: float | None, width: int = 30) -> str:
    status = str(task.get("status", "?"))
    message = str(task.get("message") or "")
    if len(message) > 40:
        message = message[:39] + "…"
    return (f"{format_progress_bar(task.get('progress'), width)} {status:<10} "
            f"elapsed {format_duration(elapsed_s)}  ETA {format_duration(eta_s)}  {message}")


def retry_after_seconds(headers: Any, default: float = 5.0) -> float:
    """The Retry-After header as seconds (only the delta-seconds form is used)."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return default


def error_detail(resp: requests.Response) -> str:
    """FastAPI errors are {"detail": str | list}; make them one readable line."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:300] or resp.reason or ""
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # 422 validation errors
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def tls_reason(exc: BaseException) -> str:
    """'certificate verify failed: self-signed certificate' out of requests' long SSLError text."""
    text = str(exc)
    match = re.search(r"certificate verify failed: ([^(]*)", text) or re.search(r"\[SSL[^\]]*\] ([^(]*)", text)
    return match.group(0 if "verify" in match.group(0) else 1).strip().rstrip(" ,") if match else text[:160]


_SIGNATURES: dict[str, Callable[[bytes], bool]] = {
    "wav": lambda b: b[:4] == b"RIFF" and b[8:12] == b"WAVE",
    "flac": lambda b: b[:4] == b"fLaC",
    "opus": lambda b: b[:4] == b"OggS",
    "mp3": lambda b: b[:3] == b"ID3" or (len(b) > 1 and b[0] == 0xFF and (b[1] & 0xE0) == 0xE0),
}


def audio_signature_ok(head: bytes, fmt: str) -> bool | None:
    """Does the file start like `fmt`? None for formats without a header (pcm)."""
    check = _SIGNATURES.get(fmt)
    return None if check is None else bool(check(head))


def format_size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


# --------------------------------------------------------------------------------------------
# HTTP client
# --------------------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status_code: int | None, detail: str, headers: Any = None, *, fatal: bool = False) -> None:
        super().__init__(f"HTTP {status_code}: {detail}" if status_code else detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers
        self.fatal = fatal  # retrying will not help (e.g. a TLS certificate problem)


class ApiClient:
    """A thin wrapper over requests.Session for this API."""

    def __init__(self, base_url: str, api_key: str | None = None, *, verify: bool = True,
                 timeout: float = 30.0) -> None:
        self.base_url = normalize_base_url(base_url)
        self.verify = verify
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers.update(build_auth_headers(api_key))

    def close(self) -> None:
        self.session.close()

    def url(self, path: str, **query: Any) -> str:
        return build_url(self.base_url, path, **query)

    def request(self, method: str, path: str, *, query: dict[str, Any] | None = None,
                **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        try:
            resp = self.session.request(method, self.url(path, **(query or {})), verify=self.verify, **kwargs)
        except requests.exceptions.SSLError as exc:
            raise ApiError(None, f"TLS error ({tls_reason(exc)}); for a self-signed certificate add --insecure",
                           fatal=True) from exc
        except requests.exceptions.RequestException as exc:
            raise ApiError(None, f"cannot reach {self.base_url}: {exc.__class__.__name__}") from exc
        if not resp.ok:
            raise ApiError(resp.status_code, error_detail(resp), resp.headers)
        return resp

    def get_json(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query).json()

    def health(self) -> dict[str, Any]:
        return self.get_json("/health")

    def loras(self) -> list[str]:
        return list(self.get_json("/loras").get("loras") or [])

    def tasks(self, status: str | None = None, limit: int | None = None) -> dict[str, Any]:
        return self.get_json("/tasks", status=status, limit=limit)

    def submit(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/synthesize", json=payload).json()

    def task(self, task_id: str) -> dict[str, Any]:
        return self.get_json(f"/task/{quote(task_id, safe='')}")

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/task/{quote(task_id, safe='')}").json()

    def download(self, filename: str, dest: Path) -> int:
        """Stream /download/{filename} into dest (atomically); returns the byte count."""
        resp = self.request("GET", f"/download/{quote(filename, safe='')}", stream=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        written = 0
        with resp, open(tmp, "wb") as fh:
            for chunk in resp.iter_content(chunk_size=64 * 1024):
                fh.write(chunk)
                written += len(chunk)
        expected = resp.headers.get("Content-Length")
        if expected is not None and expected.isdigit() and int(expected) != written:
            tmp.unlink(missing_ok=True)
            raise ApiError(None, f"download truncated: {written} of {expected} bytes")
        os.replace(tmp, dest)
        return written


# --------------------------------------------------------------------------------------------
# the walk-through
# --------------------------------------------------------------------------------------------

def _step(number: int, title: str) -> None:
    print(f"\n[{number}/6] {title}")


def wait_until_ready(client: ApiClient, wait_s: float, interval: float = 2.0) -> dict[str, Any] | None:
    """Poll /health until model_loaded is true; None when the deadline passes."""
    deadline = time.monotonic() + wait_s
    last_note = ""
    while True:
        note = ""
        try:
            health = client.health()
            if health.get("model_loaded", health.get("status") == "healthy"):
                return health
            if health.get("status") == "unhealthy":  # the model failed to load: waiting will not help
                print(f"  … the server reports a failure: {health.get('error') or health}")
                return None
            note = f"server up, model loading… ({json.dumps(health, ensure_ascii=False)})"
        except ApiError as exc:
            note = f"not ready: {exc}"
            if exc.fatal:
                print(f"  … {note}")
                return None
        if note != last_note:
            print(f"  … {note}")
            last_note = note
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(interval, max(0.1, deadline - time.monotonic())))


def submit_with_retry(client: ApiClient, payload: dict[str, Any], deadline: float) -> dict[str, Any]:
    """POST /synthesize, waiting out 429 (queue full, honours Retry-After) and 503 (model loading)."""
    while True:
        try:
            return client.submit(payload)
        except ApiError as exc:
            if exc.status_code not in (429, 503) or time.monotonic() >= deadline:
                raise
            delay = retry_after_seconds(exc.headers, default=5.0 if exc.status_code == 429 else 2.0)
            delay = min(delay, max(0.0, deadline - time.monotonic()))
            print(f"  … HTTP {exc.status_code} ({exc.detail}); retrying in {delay:.0f} s")
            time.sleep(delay)


class ProgressPrinter:
    """Redraws one line on a terminal; prints a line per change otherwise (logs, CI)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last_key: tuple[str, int] | None = None
        self.width = 0

    def update(self, task: dict[str, Any], line: str) -> None:
        if self.tty:
            pad = max(0, self.width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
            self.width = len(line)
            return
        key = (str(task.get("status")), int(clamp_progress(task.get("progress")) * 10))
        if key != self.last_key:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_key = key

    def finish(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


def poll_task(client: ApiClient, task_id: str, *, submitted_at: float, server_estimate_s: float | None,
              timeout_s: float, interval: float, printer: ProgressPrinter | None = None) -> dict[str, Any]:
    """Poll until the task reaches a final status or timeout_s passes (raises TimeoutError)."""
    printer = printer or ProgressPrinter()
    processing_since: float | None = None
    deadline = submitted_at + timeout_s
    transient_errors = 0
    try:
        while True:
            try:
                task = client.task(task_id)
                transient_errors = 0
            except ApiError as exc:
                if exc.status_code is not None or transient_errors >= 5:
                    raise
                transient_errors += 1  # the server may be restarting; tasks survive restarts
                time.sleep(interval)
                continue
            now = time.monotonic()
            status = task.get("status")
            if status == "processing" and processing_since is None:
                processing_since = now
            eta = estimate_remaining(
                task.get("progress"),
                None if processing_since is None else now - processing_since,
                server_estimate_s=(task.get("estimated_time") if task.get("estimated_time") is not None
                                   else server_estimate_s),
                total_elapsed_s=now - submitted_at,
            )
            printer.update(task, render_progress_line(task, now - submitted_at, eta))
            if status in FINAL_STATUSES:
                return task
            if now >= deadline:
                raise TimeoutError(f"task {task_id} not finished after {timeout_s:.0f} s (last status: {status})")
            time.sleep(interval)
    finally:
        printer.finish()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    if args.insecure:
        try:
            from urllib3.exceptions import InsecureRequestWarning
            warnings.simplefilter("ignore", InsecureRequestWarning)
        except ImportError:  # pragma: no cover
            pass
    client = ApiClient(args.base_url, args.api_key, verify=not args.insecure, timeout=args.http_timeout)
    try:
        return _run(client, args)
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    finally:
        client.close()


def _run(client: ApiClient, args: argparse.Namespace) -> int:
    started = time.monotonic()
    print(f"VoxCPM TTS API — asynchronous walk-through against {client.base_url}")
    print("=" * 70)

    _step(1, "Health check")
    health = wait_until_ready(client, args.wait_s)
    if health is None:
        print(f"  ✗ giving up (waited up to --wait-s {args.wait_s:g} s); see the server log,"
              " or run: python test_network.py")
        return 1
    print(f"  ✓ {json.dumps(health, ensure_ascii=False)}")

    try:
        _step(2, "LoRA adapters")
        available = client.loras()
        if available:
            for name in available:
                print(f"  • {name}")
        else:
            print("  (none — put adapters under the server's --lora-dir)")
        lora_name, problem = choose_lora(args.lora, args.first_lora, available)
        if problem:
            print(f"  ✗ {problem}")
            return 1
        print(f"  → using: {lora_name or 'base model (no LoRA)'}")

        _step(3, "Task statistics")
        stats = client.tasks(limit=5)
        print(f"  total tasks: {stats.get('total')}   processing: {stats.get('processing')}"
              f"/{stats.get('max_concurrent')} slots")
        for task in stats.get("tasks", [])[:5]:
            print(f"    {task.get('task_id')}  {task.get('status'):<10} "
                  f"{clamp_progress(task.get('progress')) * 100:5.1f}%")

        _step(4, "Submit an asynchronous task")
        payload = build_payload(args, lora_name)
        shown = dict(payload, text=payload["text"] if len(payload["text"]) <= 60 else payload["text"][:57] + "...")
        print(f"  POST /synthesize {json.dumps(shown, ensure_ascii=False)}")
        submitted_at = time.monotonic()
        submitted = submit_with_retry(client, payload, deadline=submitted_at + args.wait_s)
        task_id = submitted.get("task_id")
        if not task_id:
            print(f"  ✗ unexpected answer: {submitted}")
            return 1
        print(f"  ✓ {json.dumps(submitted, ensure_ascii=False)}")

        _step(5, "Progress")
        try:
            task = poll_task(client, task_id, submitted_at=submitted_at,
                             server_estimate_s=submitted.get("estimated_time"),
                             timeout_s=args.timeout_s, interval=args.poll_interval)
        except TimeoutError as exc:
            print(f"  ✗ {exc}; cancelling it")
            _cancel_quietly(client, task_id)
            return 1
        except KeyboardInterrupt:
            print("\n  interrupted; cancelling the task on the server")
            _cancel_quietly(client, task_id)
            return 130
        finished_at = time.monotonic()
        if task.get("status") != "completed":
            print(f"  ✗ task {task.get('status')}: {task.get('error') or task.get('message')}")
            return 1
        if not task.get("audio_path"):
            print("  ✗ the task completed without an audio_path")
            return 1

        _step(6, "Download")
        filename = audio_filename(str(task["audio_path"]))
        dest = args.out_dir / filename
        size = client.download(filename, dest)
        if size <= 0:
            print(f"  ✗ {dest} is empty")
            return 1
        with open(dest, "rb") as fh:
            signature = audio_signature_ok(fh.read(16), args.response_format)
        print(f"  ✓ saved {dest} ({format_size(size)})")
        if signature is False:
            print(f"  ! the file does not start like a .{args.response_format} file")
    except ApiError as exc:
        print(f"  ✗ {exc}")
        if exc.status_code == 401:
            print(f"    the server needs an API key: --api-key KEY or ${API_KEY_ENV}")
        return 1

    print_summary(task, dest=dest, size=size, wall_s=finished_at - submitted_at,
                  total_s=time.monotonic() - started, response_format=args.response_format)
    return 0


def _cancel_quietly(client: ApiClient, task_id: str) -> None:
    try:
        client.cancel(task_id)
    except ApiError as exc:
        print(f"    (cancel failed: {exc})")


def print_summary(task: dict[str, Any], *, dest: Path, size: int, wall_s: float, total_s: float,
                  response_format: str) -> None:
    duration = task.get("duration_s")
    rows = [
        ("task id", task.get("task_id")),
        ("status", task.get("status")),
        ("LoRA", task.get("lora_name") or "base model"),
        ("seed", task.get("seed")),
        ("format", response_format),
        ("sample rate", f"{task['sample_rate']} Hz" if task.get("sample_rate") else None),
        ("audio length", f"{float(duration):.2f} s" if duration else None),
        ("submit → done", f"{wall_s:.1f} s"),
        ("real-time factor", f"{wall_s / float(duration):.2f}" if duration else None),
        ("file", f"{dest} ({format_size(size)})"),
        ("total run time", f"{total_s:.1f} s"),
    ]
    print("\nSummary")
    print("-" * 70)
    for label, value in rows:
        if value is not None:
            print(f"  {label:<17} {value}")
    print("\n✓ asynchronous workflow OK")


if __name__ == "__main__":
    sys.exit(main())
