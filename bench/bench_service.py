"""Service benchmark on CPU: per-request overhead, LoRA switch time, 20 concurrent tasks.

    make bench                       # writes bench/results/service-cpu.{json,md}

Runs real uvicorn servers on loopback: one over FakeEngine with zero generation time (what the
service itself costs per request: HTTP, validation, SQLite, thread hops, encoding, atomic write)
and one over the tiny random-weight VoxCPM checkpoint (end-to-end, the default batched engine). The
adapter slot load time is the engine's own (stats()).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from tests.helpers import ThreadServer, wait_final, wait_ready  # noqa: E402
from voxcpm_api.api.app import create_app  # noqa: E402
from voxcpm_api.config import Settings  # noqa: E402
from voxcpm_api.engine.fake import FakeEngine  # noqa: E402

RESULTS = REPO / "bench" / "results"


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": round(1000 * statistics.median(ordered), 2), "p90_ms": round(1000 * pick(0.9), 2),
            "min_ms": round(1000 * ordered[0], 2), "n": len(ordered)}


def timed_sync(client: httpx.Client, body: dict) -> float:
    started = time.perf_counter()
    response = client.post("/synthesize", json={**body, "async_mode": False})
    response.raise_for_status()
    return time.perf_counter() - started


def time_to_first_byte(client: httpx.Client, body: dict, n: int = 10) -> dict:
    """POST /synthesize/stream n times; seconds from sending the request to the first body byte.

    Every stream is read to its end, so the next request never waits for a cancelled generation.
    """
    firsts: list[float] = []
    for _ in range(n):
        started = time.perf_counter()
        first = None
        with client.stream("POST", "/synthesize/stream", json=body) as response:
            response.raise_for_status()
            for piece in response.iter_raw():
                if piece and first is None:
                    first = time.perf_counter() - started
        assert first is not None, "the stream sent no bytes"
        firsts.append(first)
    return percentiles(firsts)


def bench_overhead(tmp: Path) -> dict:
    settings = Settings(output_dir=tmp / "fake-out", lora_dir=tmp / "none", ref_audio_dir=[tmp], model="fake",
                        host="127.0.0.1")
    with ThreadServer(create_app(settings, engine=FakeEngine())) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        wait_ready(client)
        results = {}
        for fmt in ("wav", "mp3"):
            for _ in range(5):
                timed_sync(client, {"text": "Warm up.", "response_format": fmt})
            results[fmt] = percentiles([timed_sync(client, {"text": "Hello there, overhead.", "response_format": fmt})
                                        for _ in range(50)])
        started = time.perf_counter()
        ids = [client.post("/synthesize", json={"text": "Queued overhead."}).json()["task_id"] for _ in range(50)]
        submit_s = time.perf_counter() - started
        for task_id in ids:
            wait_final(client, task_id)
        results["async_submit"] = {"per_request_ms": round(1000 * submit_s / 50, 2)}
        results["ttfb"] = {fmt: time_to_first_byte(client, {"text": "Hello there, first byte.", "response_format": fmt})
                           for fmt in ("mp3", "wav")}
        return results


def bench_tiny(tmp: Path) -> dict:
    from voxcpm_api.cli import resolve_model

    settings = resolve_model(Settings(model="tiny", output_dir=tmp / "tiny-out", cache_dir=REPO / ".cache" / "bench",
                                      ref_audio_dir=[tmp], host="127.0.0.1", max_concurrent=2), lora_dir_given=False)
    app = create_app(settings)
    with ThreadServer(app) as server, httpx.Client(base_url=server.url, timeout=300) as client:
        wait_ready(client, 300)
        loras = client.get("/loras").json()["loras"]
        body = {"text": "Hello from the tiny model.", "seed": 1, "response_format": "wav"}
        base = [timed_sync(client, body) for _ in range(5)]
        same_lora = [timed_sync(client, {**body, "lora_name": loras[0]}) for _ in range(5)]
        switching = [timed_sync(client, {**body, "lora_name": loras[i % 2]}) for i in range(6)]
        ttfb = {fmt: time_to_first_byte(client, {**body, "response_format": fmt}) for fmt in ("mp3", "wav")}
        started = time.perf_counter()
        ids: list[str] = []
        lock = threading.Lock()

        def submit(i: int) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                task = c.post("/synthesize", json={"text": f"Concurrent request {i}.", "seed": i,
                                                   "lora_name": ([None] + loras)[i % 3]}).json()
                with lock:
                    ids.append(task["task_id"])

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        done = [wait_final(client, t, 600) for t in ids]
        twenty_s = time.perf_counter() - started
        audio_s = sum(d["duration_s"] or 0 for d in done)
        service = app.state.service
        engine = service.runner._engine  # noqa: SLF001 - benchmark introspection
        return {
            "sync_base": percentiles(base), "sync_same_lora": percentiles(same_lora),
            "sync_alternating_loras": percentiles(switching), "ttfb": ttfb,
            "twenty_concurrent": {"wall_s": round(twenty_s, 2), "audio_s": round(audio_s, 2),
                                  "statuses": sorted({d["status"] for d in done})},
            "lora_switch": measure_switch(engine),
        }


def measure_switch(engine) -> dict:  # type: ignore[no-untyped-def]
    """The batched engine's own timing of putting an adapter into a GPU slot (stats(): adapter_switch, p50)."""
    return {"adapter_slot_load_ms_p50": engine.stats().get("adapter_switch_ms")}


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        report = {"command": "make bench", "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                  f"{__import__('os').cpu_count()} cores", "python": platform.python_version(),
                  "overhead_fake_engine": bench_overhead(tmp), "tiny_model": bench_tiny(tmp)}
    (RESULTS / "service-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "service-cpu.md").write_text(to_markdown(report))
    print(to_markdown(report))


def to_markdown(report: dict) -> str:
    o, t = report["overhead_fake_engine"], report["tiny_model"]
    rows = [
        ("service overhead, sync WAV (fake engine, 0 s generation)",
         f"{o['wav']['p50_ms']} ms p50 / {o['wav']['p90_ms']} ms p90"),
        ("service overhead, sync MP3 (fake engine)", f"{o['mp3']['p50_ms']} ms p50 / {o['mp3']['p90_ms']} ms p90"),
        ("async submit (fake engine)", f"{o['async_submit']['per_request_ms']} ms per request"),
        ("ttfb: /synthesize/stream first byte (fake engine, 0 s generation)",
         f"{o['ttfb']['mp3']['p50_ms']} ms p50 mp3 / {o['ttfb']['wav']['p50_ms']} ms p50 wav"),
        ("tiny model, sync, base", f"{t['sync_base']['p50_ms']} ms p50"),
        ("ttfb: tiny model, /synthesize/stream first byte",
         f"{t['ttfb']['mp3']['p50_ms']} ms p50 mp3 / {t['ttfb']['wav']['p50_ms']} ms p50 wav "
         f"(whole file, sync: {t['sync_base']['p50_ms']} ms p50)"),
        ("tiny model, sync, same LoRA", f"{t['sync_same_lora']['p50_ms']} ms p50"),
        ("tiny model, sync, alternating LoRAs", f"{t['sync_alternating_loras']['p50_ms']} ms p50"),
        ("LoRA adapter into a slot (batched engine, engine-level)",
         f"{t['lora_switch']['adapter_slot_load_ms_p50']} ms p50"),
        ("20 concurrent tasks, 3 adapters (tiny)", f"{t['twenty_concurrent']['wall_s']} s wall for "
                                                   f"{t['twenty_concurrent']['audio_s']} s of audio"),
    ]
    lines = [f"# Service benchmark ({report['machine']}, Python {report['python']})", "",
             f"Command: `{report['command']}`", "", "| measure | result |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
