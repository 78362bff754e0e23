"""The batched engine behind the real server (`python start_api.py --model tiny --max-concurrent 16`).

NEEDS THE BATCHED ENGINE (voxcpm_api.engine.batched): skipped until that package exists.

16 requests with three adapters (base, r4_qkvo, r16_proj_mlp) and fixed seeds are sent at once, so
they share decode steps as batch rows; each file must then equal the same request sent alone
afterwards: byte-identical, or within 2e-3 max abs once the WAVs are decoded (batched matmuls may
round differently from one-row ones).
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.helpers import REPO_ROOT, SubprocessServer, wait_final, wait_ready

pytest.importorskip("voxcpm_api.engine.batched.engine", reason="the batched engine is not written yet")

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny-server")]

TINY_CACHE = REPO_ROOT / ".cache" / "test-tiny"
ADAPTERS = (None, "r4_qkvo", "r16_proj_mlp")
ROWS = 16
MAX_ABS_DIFF = 2e-3


@pytest.fixture(scope="module")
def batched_server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("batched-tiny-server")
    (tmp / "ref").mkdir()
    args = ["--model", "tiny", "--engine", "batched", "--max-concurrent", str(ROWS), "--output-dir", str(tmp / "out"),
            "--cache-dir", str(TINY_CACHE), "--ref-audio-dir", str(tmp / "ref")]
    server = SubprocessServer(args, log_path=tmp / "server.log").start()
    client = httpx.Client(base_url=server.url, timeout=300)
    try:
        wait_ready(client, 300)
        yield server, client
    finally:
        client.close()
        server.stop()


def body(i: int) -> dict:
    return {"text": f"Batch row number {i} says hello.", "seed": 1000 + i, "lora_name": ADAPTERS[i % 3],
            "response_format": "wav"}


def wav_of(client: httpx.Client, task: dict) -> bytes:
    assert task["status"] == "completed", task
    data = client.get(task["download_url"]).content
    assert data[:4] == b"RIFF"
    return data


def same_audio(a: bytes, b: bytes) -> tuple[bool, float]:
    if a == b:
        return True, 0.0
    x, rate_x = sf.read(io.BytesIO(a), dtype="float32")
    y, rate_y = sf.read(io.BytesIO(b), dtype="float32")
    if rate_x != rate_y or x.shape != y.shape:
        return False, float("inf")
    diff = float(np.max(np.abs(x - y))) if x.size else 0.0
    return diff <= MAX_ABS_DIFF, diff


def test_sixteen_rows_with_three_adapters_equal_each_request_alone(batched_server) -> None:
    _, client = batched_server
    loras = client.get("/loras").json()["loras"]
    assert {"r4_qkvo", "r16_proj_mlp"} <= set(loras), loras
    assert client.get("/tasks").json()["max_concurrent"] == ROWS

    ids: dict[int, str] = {}
    lock = threading.Lock()

    def submit(i: int) -> None:
        with httpx.Client(base_url=client.base_url, timeout=60) as own:
            response = own.post("/synthesize", json=body(i))
            assert response.status_code == 200, response.text
            with lock:
                ids[i] = response.json()["task_id"]

    peak = [0]
    done = threading.Event()

    def watch() -> None:  # how many tasks were processing at once (generating or encoding)
        with httpx.Client(base_url=client.base_url, timeout=30) as own:
            while not done.is_set():
                peak[0] = max(peak[0], own.get("/tasks", params={"status": "processing", "limit": 1}).json()["total"])
                time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    threads = [threading.Thread(target=submit, args=(i,)) for i in range(ROWS)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    together = {i: wav_of(client, wait_final(client, ids[i], 600)) for i in range(ROWS)}
    batched_s = time.monotonic() - started
    done.set()
    watcher.join(5)
    assert peak[0] >= 2, "the requests never ran at the same time"

    started = time.monotonic()
    mismatches = []
    for i in range(ROWS):
        response = client.post("/synthesize", json={**body(i), "async_mode": False})
        assert response.status_code == 200, response.text
        alone = wav_of(client, client.get(f"/task/{response.json()['task_id']}").json())
        ok, diff = same_audio(together[i], alone)
        if not ok:
            mismatches.append((i, ADAPTERS[i % 3], diff))
    alone_s = time.monotonic() - started
    print(f"\n[measure] {ROWS} rows at once: {batched_s:.2f}s; the same one by one: {alone_s:.2f}s; "
          f"peak processing {peak[0]}")
    assert not mismatches, f"rows that differ from the request alone (index, adapter, max |diff|): {mismatches}"


def test_metrics_show_the_batch_rows(batched_server) -> None:
    _, client = batched_server
    text = client.get("/metrics").text
    assert f'voxcpm_batch_rows{{state="max"}} {float(ROWS)}' in text, text


def test_log_names_the_engine(batched_server) -> None:
    server, _ = batched_server
    log = Path(server.log_path).read_text(errors="replace") if server.log_path else ""
    assert "engine=batched" in log
