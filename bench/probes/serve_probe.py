"""A short look at the served product on a GPU: where a closed loop of HTTP clients loses to the engine.

    python bench/probes/serve_probe.py --model voxcpm1.5 --clients 1,64 --duration-s 20 [--flags "..."]

Builds the random full-size checkpoint and its 8 adapters (bench/make_checkpoint.py), starts
`start_api.py` as a user does, and for each client count runs sync `POST /synthesize` (wav) requests
back to back from threads of this process (a separate process from the server), spread over the 8
adapters and the base model. Between windows it scrapes /metrics for the engine's decode steps, rows
stepped and per-phase seconds, so the report shows the mean batch occupancy and where the loop thread's
time went. Then 10 one-at-a-time `/synthesize/stream` requests give the time to the first byte. Prints
one JSON object per step and writes them to --out. bench/bench_serve.py is the full benchmark; this is
the quick probe the lead runs first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

BENCH_DIR = Path(__file__).resolve().parents[1]
REPO = BENCH_DIR.parent
sys.path[:0] = [str(REPO / "src"), str(BENCH_DIR)]

TEXTS = ("Good morning, friends.", "See you later today.", "Thanks for calling us.", "Please hold the line.",
         "The shop opens soon.", "It looks like rain.", "Welcome back, traveller.", "Have a great weekend.")
METRIC_LINE = re.compile(r'^(voxcpm_engine_[a-z_]+?)(?:_total)?(?:\{phase="([a-z_]+)"\})? ([0-9.e+-]+)$')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        match = METRIC_LINE.match(line)
        if match:
            name, phase, value = match.groups()
            out[f"{name}:{phase}" if phase else name] = float(value)
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 3) for k in after}


def closed_loop(url: str, clients: int, loras: list[str | None], warmup_s: float, duration_s: float) -> dict:
    records: list[tuple[float, float, float, bool]] = []  # (start, end, audio_s, ok)
    lock = threading.Lock()
    stop_at = time.perf_counter() + warmup_s + duration_s
    counter = iter(range(10**9))

    def client() -> None:
        session = requests.Session()
        while time.perf_counter() < stop_at:
            i = next(counter)
            body = {"text": TEXTS[i % len(TEXTS)], "lora_name": loras[i % len(loras)], "async_mode": False,
                    "response_format": "wav", "seed": i}
            started = time.perf_counter()
            try:
                r = session.post(f"{url}/synthesize", json=body, timeout=600)
                ok, audio_s = r.status_code == 200, float(r.json().get("duration_s", 0.0))
            except Exception:  # counted as an error
                ok, audio_s = False, 0.0
            with lock:
                records.append((started, time.perf_counter(), audio_s, ok))

    window_start = time.perf_counter() + warmup_s
    metrics_box: dict[str, dict[str, float]] = {}

    def mark() -> None:
        time.sleep(warmup_s)
        metrics_box["before"] = scrape(url)
    marker = threading.Thread(target=mark)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    marker.start()
    for t in threads:
        t.start()
    marker.join()
    time.sleep(max(0.0, stop_at - time.perf_counter()))
    after = scrape(url)
    window_end = time.perf_counter()
    for t in threads:
        t.join()
    inside = [r for r in records if r[1] >= window_start and r[0] <= window_end]
    # audio prorated by the share of each request's wall time that falls inside the window
    audio_s = sum(a * (min(e, window_end) - max(s, window_start)) / max(e - s, 1e-9) for s, e, a, ok in inside if ok)
    lat = sorted(e - s for s, e, a, ok in records if ok and s >= window_start and e <= window_end)
    pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3)) if lat else (lambda q: None)
    engine = delta(metrics_box["before"], after)
    steps = engine.get("voxcpm_engine_decode_steps", 0.0)
    return {"clients": clients, "audio_s_per_s": round(audio_s / (window_end - window_start), 2),
            "requests": len(lat), "errors": sum(1 for r in records if not r[3]),
            "latency_p50_s": pick(0.5), "latency_p99_s": pick(0.99),
            "mean_audio_s": round(sum(r[2] for r in records if r[3]) / max(1, sum(r[3] for r in records)), 3),
            "mean_rows_per_step": round(engine.get("voxcpm_engine_rows_stepped", 0.0) / max(steps, 1), 2),
            "steps_per_s": round(steps / (window_end - window_start), 2), "engine_delta": engine}


def stream_ttfb(url: str, n: int) -> dict:
    firsts, totals = [], []
    for i in range(n):
        started = time.perf_counter()
        first = None
        with requests.post(f"{url}/synthesize/stream", json={"text": TEXTS[i % len(TEXTS)], "seed": i,
                                                              "response_format": "wav"}, stream=True, timeout=120) as r:
            for piece in r.iter_content(chunk_size=None):
                if piece and first is None:
                    first = time.perf_counter() - started
        firsts.append(first)
        totals.append(time.perf_counter() - started)
    return {"stream_ttfb_ms": [round(1000 * f, 1) for f in firsts], "stream_total_s": [round(t, 3) for t in totals]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="voxcpm1.5")
    p.add_argument("--clients", default="1,64")
    p.add_argument("--duration-s", type=float, default=20.0)
    p.add_argument("--warmup-s", type=float, default=8.0)
    p.add_argument("--flags", default="")
    p.add_argument("--ckpt-root", type=Path, default=Path("/tmp/voxcpm-bench"))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "serve-probe.jsonl")
    p.add_argument("--base-only", action="store_true", help="no adapters in the mix")
    p.add_argument("--tiny", action="store_true", help="tiny random checkpoint on the CPU (smoke test)")
    args = p.parse_args()
    from make_checkpoint import build_checkpoint

    ckpt = build_checkpoint(args.model, args.ckpt_root, tiny=args.tiny, device="cpu" if args.tiny else "cuda")
    loras: list[str | None] = [None] if args.base_only else [None, *ckpt.lora_names]
    out_dir = Path(tempfile.mkdtemp(prefix="serve-probe-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(Path(os.environ.get("OUT", "/tmp")) / f"server-{args.model}.log", "w")
    cmd = [sys.executable, str(REPO / "start_api.py"), "--model", str(ckpt.model_dir), "--lora-dir",
           str(ckpt.lora_root), "--output-dir", str(out_dir), "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *args.flags.split()]
    started = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    results = []

    def emit(item: dict) -> None:
        results.append(item)
        print(json.dumps(item), flush=True)
        args.out.write_text("\n".join(json.dumps(r) for r in results) + "\n")
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit("server died; see its log")
            try:
                if requests.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.25)
        emit({"model": args.model, "flags": args.flags, "start_to_ready_s": round(time.perf_counter() - started, 2),
              "health": requests.get(f"{url}/health").json(), "max_concurrent": requests.get(f"{url}/tasks").json().get("max_concurrent")})
        for clients in (int(c) for c in args.clients.split(",")):
            emit(closed_loop(url, clients, loras, args.warmup_s, args.duration_s))
        emit(stream_ttfb(url, 10))
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
