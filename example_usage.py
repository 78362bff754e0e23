#!/usr/bin/env python3
"""Basic usage examples for the VoxCPM LoRA TTS API, written with `requests`.

    python example_usage.py                                # every example, server on localhost:8000
    python example_usage.py sync async                     # only some of them
    python example_usage.py --base-url http://192.168.1.100:8000 --api-key KEY
    python example_usage.py --ref-audio my_voice.wav --ref-text "What my_voice.wav says"

Examples (names for the command line):
    sync          synchronous synthesis + download
    async         asynchronous submit + polling + download
    loras         list the LoRA adapters and synthesize with the first one, if any
    clone-path    voice cloning with ref_audio_path (a name relative to the server's --ref-audio-dir)
    clone-upload  voice cloning by uploading the reference audio (POST /synthesize/upload)
    tasks         task list, task status, cancelling a task
    cleanup       delete old audio files on the server

Everything works against the offline test model too (`python start_api.py --model tiny`), which
produces noise instead of speech. Downloaded files go to ./downloads (--out-dir).
"""

from __future__ import annotations

import argparse
import mimetypes
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import requests

BASE_URL = "http://localhost:8000"
HEADERS: dict[str, str] = {}  # {"Authorization": "Bearer KEY"} when the server runs with --api-key
OUT_DIR = Path("downloads")
SAMPLE_TEXT = "Hello, this is a test of the VoxCPM TTS API."


class ApiError(Exception):
    """An HTTP error answered by the server, with its {"detail": ...} message."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class Skipped(Exception):
    """An example that cannot run in this setup (not an error of the server)."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

def auth_headers(api_key: str | None) -> dict[str, str]:
    """The server accepts `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def url(path: str) -> str:
    return BASE_URL.rstrip("/") + "/" + path.lstrip("/")


def api(method: str, path: str, *, timeout: float = 60, **kwargs: Any) -> requests.Response:
    """Send one request; raise ApiError with the server's message when it answers 4xx/5xx."""
    response = requests.request(method, url(path), headers=HEADERS, timeout=timeout, **kwargs)
    if not response.ok:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        raise ApiError(response.status_code, detail)
    return response


def filename_of(audio_path: str) -> str:
    """'api_outputs/tts_ab12cd34_1765715910.mp3' -> 'tts_ab12cd34_1765715910.mp3'."""
    return audio_path.replace("\\", "/").split("/")[-1]


def download(audio_path: str, save_as: str | None = None) -> Path:
    """GET /download/{filename} and save the file under OUT_DIR."""
    filename = filename_of(audio_path)
    response = api("GET", f"/download/{filename}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    target = OUT_DIR / (save_as or filename)
    target.write_bytes(response.content)
    print(f"  saved {target} ({len(response.content)} bytes)")
    return target


def reference_name(reference: Path, ref_audio_dir: Path) -> str:
    """The ref_audio_path to send for `reference`: its path relative to ref_audio_dir, after
    copying it there as example_reference.<ext> when it lies elsewhere. Only meaningful when
    ref_audio_dir is the (local) server's --ref-audio-dir."""
    root = ref_audio_dir.resolve()
    source = reference.resolve()
    if root in source.parents:
        return source.relative_to(root).as_posix()
    root.mkdir(parents=True, exist_ok=True)
    target = root / ("example_reference" + (reference.suffix or ".wav"))
    shutil.copyfile(source, target)
    return target.name


def wait_for_task(task_id: str, timeout_s: float = 600, interval_s: float = 1.0) -> dict[str, Any]:
    """Poll GET /task/{task_id} until it is completed, failed or cancelled."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        task = api("GET", f"/task/{task_id}").json()
        line = f"  {task['status']:<10} {(task.get('progress') or 0) * 100:5.1f}%  {task.get('message') or ''}"
        if line != last:
            print(line)
            last = line
        if task["status"] in ("completed", "failed", "cancelled"):
            return task
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task_id} still {task['status']} after {timeout_s:.0f} s")
        time.sleep(interval_s)


def wait_until_ready(timeout_s: float = 300) -> dict[str, Any]:
    """Wait for GET /health to report model_loaded=true (the first model load can take minutes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            health = requests.get(url("/health"), timeout=10).json()
            if health.get("model_loaded"):
                return health
            if health.get("status") == "unhealthy":
                raise RuntimeError(f"the model failed to load: {health.get('error')} (see the server log)")
        except (requests.RequestException, ValueError):
            health = None
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not ready after {timeout_s:.0f} s (last /health: {health})")
        time.sleep(2)


# ---------------------------------------------------------------------------------------------
# the examples
# ---------------------------------------------------------------------------------------------

def example_sync() -> Path:
    """Synchronous mode: the request returns when the audio is ready (fine for short texts)."""
    response = api("POST", "/synthesize", timeout=600, json={
        "text": SAMPLE_TEXT,
        "cfg_scale": 2.0,
        "steps": 10,
        "seed": 42,                # fixed seed: the same request gives the same audio
        "response_format": "wav",  # mp3 (default), wav, flac, opus or pcm
        "async_mode": False,
    })
    result = response.json()
    print(f"  {result['status']}: {result['audio_path']} ({result['sample_rate']} Hz)")
    return download(result["audio_path"])


def example_async() -> Path:
    """Asynchronous mode (the default): submit, poll the real progress, then download."""
    response = api("POST", "/synthesize", json={
        "text": "This longer text is processed in the background. " * 3,
        "seed": -1,  # -1: the server picks a seed and reports it in GET /task/{id}
    })
    submitted = response.json()
    print(f"  submitted {submitted['task_id']} (estimated {submitted['estimated_time']} s)")
    task = wait_for_task(submitted["task_id"])
    if task["status"] != "completed":
        raise RuntimeError(f"task {task['status']}: {task.get('error')}")
    print(f"  seed used: {task.get('seed')}, audio length: {task.get('duration_s')} s")
    return download(task["audio_path"])


def example_loras() -> Path | None:
    """List the LoRA adapters, then synthesize with the first one, if any.

    The server switches adapters per request without reloading the base model."""
    loras = api("GET", "/loras").json()
    print(f"  {loras['count']} LoRA(s): {loras['loras']}")
    if not loras["loras"]:
        print("  no LoRA installed: put adapters under the server's --lora-dir")
        return None
    name = loras["loras"][0]
    submitted = api("POST", "/synthesize", json={"text": SAMPLE_TEXT, "lora_name": name}).json()
    task = wait_for_task(submitted["task_id"])
    if task["status"] != "completed":
        raise RuntimeError(f"task {task['status']}: {task.get('error')}")
    print(f"  synthesized with LoRA '{task.get('lora_name')}'")
    return download(task["audio_path"])


def example_clone_path(reference: Path, ref_text: str, ref_audio_dir: Path) -> Path:
    """Voice cloning with ref_audio_path, a name relative to the server's --ref-audio-dir.

    The roots default to ./reference_audio on the server; absolute paths and '..' get 403."""
    name = reference_name(reference, ref_audio_dir)  # copies the clip into the root if needed
    try:
        response = api("POST", "/synthesize", timeout=600, json={
            "text": "This sentence is spoken with the voice of the reference audio.",
            "ref_audio_path": name,
            "ref_text": ref_text,  # the transcript of the reference audio
            "async_mode": False,
        })
    except ApiError as exc:
        if exc.status_code in (403, 404):
            raise Skipped(f"{exc} — the server does not see {ref_audio_dir}; run it on this machine "
                          "or pass --ref-audio-dir with its reference-audio root") from exc
        raise
    return download(response.json()["audio_path"])


def example_clone_upload(reference: Path, ref_text: str) -> Path:
    """Voice cloning by uploading the reference audio: multipart form, same fields as /synthesize."""
    content_type = mimetypes.guess_type(reference.name)[0] or "application/octet-stream"
    with open(reference, "rb") as audio:
        response = api("POST", "/synthesize/upload", timeout=600,
                       files={"file": (reference.name, audio, content_type)},
                       data={
                           "text": "This sentence clones the voice of an uploaded file.",
                           "ref_text": ref_text,
                           "response_format": "mp3",
                           "async_mode": "false",
                       })
    result = response.json()
    print(f"  {result['status']}: {result['audio_path']}")
    return download(result["audio_path"])


def example_tasks() -> None:
    """Task management: list, filter, query one task, cancel one."""
    tasks = api("GET", "/tasks").json()
    print(f"  total tasks: {tasks['total']}, processing: {tasks['processing']}/{tasks['max_concurrent']}")
    for task in api("GET", "/tasks", params={"status": "completed", "limit": 3}).json()["tasks"]:
        print(f"  completed: {task['task_id']} -> {task.get('audio_path')}")

    # submit a long task and cancel it right away
    submitted = api("POST", "/synthesize", json={"text": "A task we are going to cancel. " * 20}).json()
    try:
        cancelled = api("DELETE", f"/task/{submitted['task_id']}").json()
        print(f"  cancel: {cancelled}")
    except ApiError as exc:
        if exc.status_code != 409:  # 409: it finished before we could cancel it
            raise
        print(f"  too late to cancel: {exc.detail}")
    task = api("GET", f"/task/{submitted['task_id']}").json()
    print(f"  task {task['task_id']} is now {task['status']}")


def example_cleanup() -> None:
    """Delete generated audio files older than max_age_s (default 3600 s) on the server."""
    result = api("DELETE", "/cleanup", params={"max_age_s": 3600}).json()
    print(f"  {result['message']}: {result['deleted_count']} file(s) deleted")


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

EXAMPLE_NAMES = ("sync", "async", "loras", "clone-path", "clone-upload", "tasks", "cleanup")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="VoxCPM TTS API usage examples.")
    parser.add_argument("examples", nargs="*", metavar="EXAMPLE",
                        help=f"which examples to run (default: all): {', '.join(EXAMPLE_NAMES)}")
    parser.add_argument("--base-url", default=os.environ.get("VOXCPM_BASE_URL") or BASE_URL,
                        help=f"server URL (default: $VOXCPM_BASE_URL or {BASE_URL})")
    parser.add_argument("--api-key", default=os.environ.get("VOXCPM_API_KEY") or None,
                        help="API key if the server runs with --api-key (default: $VOXCPM_API_KEY)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="where to save audio (default: ./downloads)")
    parser.add_argument("--ref-audio", type=Path, default=None,
                        help="reference audio for the cloning examples (default: the clip made by 'sync')")
    parser.add_argument("--ref-text", default=None, help="transcript of --ref-audio")
    parser.add_argument("--ref-audio-dir", type=Path, default=Path("reference_audio"),
                        help="the server's --ref-audio-dir, when the server runs on this machine "
                             "(default: ./reference_audio)")
    parser.add_argument("--wait-s", type=float, default=300, help="how long to wait for the model to load")
    args = parser.parse_args(argv)
    unknown = [name for name in args.examples if name not in EXAMPLE_NAMES]
    if unknown:
        parser.error(f"unknown example(s) {', '.join(unknown)}; choose from {', '.join(EXAMPLE_NAMES)}")
    args.examples = list(dict.fromkeys(args.examples)) or list(EXAMPLE_NAMES)
    if args.ref_audio is not None and not args.ref_audio.is_file():
        parser.error(f"--ref-audio {args.ref_audio} is not a file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    global BASE_URL, HEADERS, OUT_DIR
    args = parse_args(argv)
    BASE_URL, HEADERS, OUT_DIR = args.base_url.rstrip("/"), auth_headers(args.api_key), args.out_dir

    print(f"Waiting for {BASE_URL} ...")
    try:
        print(f"  ready: {wait_until_ready(args.wait_s)}")
    except TimeoutError as exc:
        print(f"  {exc} — is the server running? (python start_api.py, or python test_network.py)")
        return 1
    except RuntimeError as exc:
        print(f"  {exc}")
        return 1

    reference: dict[str, Any] = {"path": args.ref_audio, "text": args.ref_text or SAMPLE_TEXT}

    def reference_clip() -> tuple[Path, str]:
        # the cloning examples need a reference clip: --ref-audio, or the clip made by `sync`
        if reference["path"] is None:
            print("  (making a reference clip with the sync example first)")
            reference["path"] = example_sync()
        return reference["path"], reference["text"]

    def run_sync() -> None:
        path = example_sync()
        if reference["path"] is None:
            reference["path"] = path

    runners: dict[str, Callable[[], Any]] = {
        "sync": run_sync,
        "async": example_async,
        "loras": example_loras,
        "clone-path": lambda: example_clone_path(*reference_clip(), args.ref_audio_dir),
        "clone-upload": lambda: example_clone_upload(*reference_clip()),
        "tasks": example_tasks,
        "cleanup": example_cleanup,
    }
    failed = skipped = 0
    for name in args.examples:
        print(f"\n=== {name}: {(runners[name].__doc__ or _doc_of(name)).strip().splitlines()[0]}")
        try:
            runners[name]()
        except Skipped as exc:
            print(f"  SKIPPED: {exc}")
            skipped += 1
        except (ApiError, RuntimeError, TimeoutError, requests.RequestException) as exc:
            print(f"  FAILED: {exc}")
            failed += 1
    ok = len(args.examples) - failed - skipped
    print(f"\n{ok} example(s) OK, {skipped} skipped, {failed} failed.")
    return 1 if failed else 0


def _doc_of(name: str) -> str:
    function = globals().get("example_" + name.replace("-", "_"))
    return (function.__doc__ or name) if function else name


if __name__ == "__main__":
    sys.exit(main())
