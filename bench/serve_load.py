"""Load generator of bench/bench_serve.py: one step of HTTP load against a running server, in its own process.

    python bench/serve_load.py --url http://127.0.0.1:8000 --plan plan.json --out result.json [--server-pid PID]

It runs apart from the server (and from the orchestrator) so that its event loop, its HTTP parsing and
its CPU never share a GIL with what is measured. One asyncio loop (uvloop when installed) and one
httpx.AsyncClient whose pool holds at least as many connections as there are clients in flight.

Plan (JSON): `mode` closed | open | burst; `clients` (closed), `count` (burst), `rate_per_s` (open,
Poisson arrivals, `seed`); `warmup_s` + `duration_s` (the measured window, closed and open); `drain_s`
(the most to wait for requests still running once the load stops); `kinds` and `loras`, both cycled by
request index; `texts_file` + `text_offset` (request i speaks text offset + i, so no two requests of a
run share a text); `response_format`; `voice` (the saved voice of the "voice" kind); `poll_s` (async
kind); `timeout_s` (per request).

Kinds: sync (POST /synthesize, async_mode false), async (POST /synthesize, then GET /task/{id} every
poll_s until completed, then GET the download), stream (POST /synthesize/stream), openai (POST
/v1/audio/speech with stream_format "audio"), voice (sync with `voice`).

Result (JSON): one record per request [kind, lora, sent, first byte, done, HTTP status, audio s, bytes,
error] with times in seconds from the step's start, the window's bounds, and this process's own CPU
use and event-loop lag over the window (the evidence that the client is not the bottleneck), plus the
server process's CPU use over the window when --server-pid is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import pct  # noqa: E402  (standard library only at import time)

WAV_HEADER_BYTES = 44  # the streamed WAV header (audio/streaming.py): everything after it is s16 mono
LAG_TICK_S = 0.01
FIELDS = ("kind", "lora", "sent_s", "first_byte_s", "done_s", "status", "audio_s", "bytes", "error")


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (all its threads), from /proc; None where that is not readable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15 of stat(5)


class Step:
    """One plan being run: the client, the request counter, the records."""

    def __init__(self, plan: dict, client: httpx.AsyncClient) -> None:
        self.plan = plan
        self.client = client
        self.texts: list[str] = json.loads(Path(plan["texts_file"]).read_text(encoding="utf-8"))
        self.kinds: list[str] = plan.get("kinds") or ["sync"]
        self.loras: list[str | None] = plan.get("loras") or [None]
        self.fmt = plan.get("response_format", "wav")
        self.records: list[list[Any]] = []
        self.next_index = 0
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def one(self) -> None:
        """Send request number next_index (kind, adapter and text chosen by that number) and record it."""
        i = self.next_index
        self.next_index += 1
        kind = self.kinds[i % len(self.kinds)]
        lora = None if kind == "voice" else self.loras[i % len(self.loras)]
        text = self.texts[(self.plan.get("text_offset", 0) + i) % len(self.texts)]
        rec: list[Any] = [kind, lora, self.now(), None, None, None, None, 0, None]
        self.records.append(rec)
        try:
            await KINDS[kind](self, rec, text, lora)
        except asyncio.CancelledError:
            rec[8] = rec[8] or "unfinished when the drain time ran out"
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is a data point
            rec[8] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            rec[4] = self.now()

    def body(self, text: str, lora: str | None, **extra: Any) -> dict:
        return {"text": text, "lora_name": lora, "response_format": self.fmt, **extra}


def _http_error(rec: list[Any], status: int, text: str) -> bool:
    rec[5] = status
    if status >= 300:
        rec[8] = f"HTTP {status}: {text[:200]}"
        return True
    return False


async def do_sync(step: Step, rec: list[Any], text: str, lora: str | None, voice: str | None = None) -> None:
    extra = {"voice": voice} if voice else {}
    r = await step.client.post("/synthesize", json=step.body(text, lora, async_mode=False, **extra))
    if not _http_error(rec, r.status_code, r.text):
        rec[6] = float(r.json()["duration_s"])


async def do_voice(step: Step, rec: list[Any], text: str, _lora: str | None) -> None:
    await do_sync(step, rec, text, None, voice=step.plan["voice"])


async def do_async(step: Step, rec: list[Any], text: str, lora: str | None) -> None:
    r = await step.client.post("/synthesize", json=step.body(text, lora, async_mode=True))
    if _http_error(rec, r.status_code, r.text):
        return
    task_id = r.json()["task_id"]
    while True:  # the polling a client does: its interval is part of the latency it sees
        await asyncio.sleep(step.plan.get("poll_s", 0.1))
        r = await step.client.get(f"/task/{task_id}")
        if _http_error(rec, r.status_code, r.text):
            return
        task = r.json()
        if task["status"] == "completed":
            break
        if task["status"] in ("failed", "cancelled"):
            rec[8] = f"task {task['status']}: {task.get('error')}"[:300]
            return
    r = await step.client.get(urlsplit(task["download_url"]).path)
    if not _http_error(rec, r.status_code, r.text if r.status_code >= 300 else ""):  # no text() of a WAV
        rec[6] = float(task["duration_s"])
        rec[7] = len(r.content)


async def _read_stream(step: Step, rec: list[Any], path: str, body: dict) -> None:
    async with step.client.stream("POST", path, json=body) as r:
        if r.status_code >= 300:
            await r.aread()
            _http_error(rec, r.status_code, r.text)
            return
        rec[5] = r.status_code
        async for chunk in r.aiter_raw():
            if chunk and rec[3] is None:
                rec[3] = step.now()
            rec[7] += len(chunk)
        rate = int(r.headers.get("x-sample-rate") or 0)
    if rate <= 0:
        rec[8] = "the stream had no X-Sample-Rate header: its audio length is unknown"
    elif step.fmt == "wav":
        rec[6] = max(0, rec[7] - WAV_HEADER_BYTES) / 2 / rate
    elif step.fmt == "pcm":
        rec[6] = rec[7] / 2 / rate


async def do_stream(step: Step, rec: list[Any], text: str, lora: str | None) -> None:
    await _read_stream(step, rec, "/synthesize/stream", step.body(text, lora))


async def do_openai(step: Step, rec: list[Any], text: str, lora: str | None) -> None:
    body = {"model": "voxcpm", "input": text, "voice": lora or "default", "response_format": step.fmt,
            "stream_format": "audio"}  # explicit: the default of this route has changed before
    await _read_stream(step, rec, "/v1/audio/speech", body)


KINDS = {"sync": do_sync, "async": do_async, "stream": do_stream, "openai": do_openai, "voice": do_voice}


class Probe:
    """Event-loop lag (a 10 ms sleep that wakes late means every response waited that long too) and the
    CPU clocks at the window's bounds."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.lags_s: list[float] = []
        self.marks: dict[str, dict] = {}

    async def lag_loop(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(LAG_TICK_S)
            self.lags_s.append(time.perf_counter() - started - LAG_TICK_S)

    def mark(self, name: str, at_s: float) -> None:
        self.marks[name] = {"at_s": at_s, "unix": time.time(), "client_cpu_s": time.process_time(),
                            "server_cpu_s": proc_cpu_s(self.server_pid) if self.server_pid else None}

    async def mark_at(self, step: Step, name: str, at_s: float) -> None:
        await asyncio.sleep(max(0.0, at_s - step.now()))
        self.mark(name, step.now())

    def usage(self) -> dict:
        a, b = self.marks.get("window_start"), self.marks.get("window_end")
        if not a or not b or b["at_s"] <= a["at_s"]:
            return {}
        wall = b["at_s"] - a["at_s"]
        server = None
        if a["server_cpu_s"] is not None and b["server_cpu_s"] is not None:
            server = (b["server_cpu_s"] - a["server_cpu_s"]) / wall
        lags = [1000 * x for x in self.lags_s]
        return {"window": [a["at_s"], b["at_s"]], "window_unix": [a["unix"], b["unix"]],
                "client_cores": (b["client_cpu_s"] - a["client_cpu_s"]) / wall, "server_cores": server,
                "loop_lag_ms_p50": pct(lags, 0.5), "loop_lag_ms_p99": pct(lags, 0.99),
                "loop_lag_ms_max": max(lags) if lags else None}


async def _drain(tasks: set[asyncio.Task], until_s: float, step: Step) -> None:
    pending = {t for t in tasks if not t.done()}
    if pending:
        _done, pending = await asyncio.wait(pending, timeout=max(0.0, until_s - step.now()))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


async def run_closed(step: Step, probe: Probe) -> None:
    """`clients` loops, each sending its next request as soon as the last one returned, until the window ends."""
    plan = step.plan
    stop_s = plan["warmup_s"] + plan["duration_s"]

    async def client_loop() -> None:
        while step.now() < stop_s:
            await step.one()

    marks = [asyncio.create_task(probe.mark_at(step, "window_start", plan["warmup_s"])),
             asyncio.create_task(probe.mark_at(step, "window_end", stop_s))]
    loops = {asyncio.create_task(client_loop()) for _ in range(plan["clients"])}
    await asyncio.gather(*marks)
    await _drain(loops, stop_s + plan.get("drain_s", 60.0), step)


async def run_open(step: Step, probe: Probe) -> None:
    """Poisson arrivals at rate_per_s over warmup + duration, each request started whatever is in flight."""
    plan = step.plan
    stop_s = plan["warmup_s"] + plan["duration_s"]
    rng = random.Random(plan.get("seed", 1))
    marks = [asyncio.create_task(probe.mark_at(step, "window_start", plan["warmup_s"])),
             asyncio.create_task(probe.mark_at(step, "window_end", stop_s))]
    tasks: set[asyncio.Task] = set()
    at_s = rng.expovariate(plan["rate_per_s"])
    while at_s < stop_s:
        await asyncio.sleep(max(0.0, at_s - step.now()))
        tasks.add(asyncio.create_task(step.one()))
        at_s += rng.expovariate(plan["rate_per_s"])
    await asyncio.gather(*marks)
    await _drain(tasks, stop_s + plan.get("drain_s", 60.0), step)


async def run_burst(step: Step, probe: Probe) -> None:
    """`count` requests sent at once; the window is the whole burst."""
    probe.mark("window_start", step.now())
    tasks = {asyncio.create_task(step.one()) for _ in range(step.plan["count"])}
    await _drain(tasks, step.now() + step.plan.get("drain_s", 300.0), step)
    probe.mark("window_end", step.now())


async def run_plan(url: str, plan: dict, server_pid: int | None) -> dict:
    in_flight = plan.get("clients") or plan.get("count") or 64
    if plan["mode"] == "open":  # arrivals do not wait for answers: leave room for an overloaded server
        in_flight = max(in_flight, int(plan["rate_per_s"] * (plan["warmup_s"] + plan["duration_s"])) + 1)
    limits = httpx.Limits(max_connections=in_flight + 8, max_keepalive_connections=in_flight + 8)
    timeout = httpx.Timeout(plan.get("timeout_s", 300.0), connect=30.0, pool=None)
    probe = Probe(server_pid)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        step = Step(plan, client)
        lag = asyncio.create_task(probe.lag_loop())
        try:
            await {"closed": run_closed, "open": run_open, "burst": run_burst}[plan["mode"]](step, probe)
        finally:
            lag.cancel()
    return {"plan": {k: v for k, v in plan.items() if k != "texts_file"}, "fields": list(FIELDS),
            "records": step.records, "requests_made": step.next_index, "elapsed_s": step.now(),
            "usage": probe.usage(), "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            "client_cpu_s_total": time.process_time()}


# --------------------------------------------------------------------------------------------- #
# summaries (used by bench_serve.py on the records)
# --------------------------------------------------------------------------------------------- #


def as_dicts(result: dict) -> list[dict]:
    return [dict(zip(result["fields"], rec)) for rec in result["records"]]


def summarize(reqs: list[dict], window: list[float] | None, *, by: str = "done_s") -> dict:
    """Counts and percentiles of the requests whose `by` time (done_s: completed; sent_s: arrived) falls in
    the window (all of them without one). Throughput is prorated: each successful request adds its audio times
    the share of its time in flight (sent -> done) that falls inside the window, over the window's length.
    (Counting only the requests completed inside it swung by +-20 % over an 8 s window: closed-loop clients
    started together finish in waves.) Errors count the whole step."""
    if window:
        inside = [r for r in reqs if r[by] is not None and window[0] <= r[by] <= window[1]]
        span_s = window[1] - window[0]
    else:
        inside = list(reqs)
        span_s = max((r["done_s"] for r in reqs if r["done_s"] is not None), default=0.0) - min(
            (r["sent_s"] for r in reqs), default=0.0)
    ok = [r for r in inside if r["error"] is None and r["audio_s"]]
    lat = [r["done_s"] - r["sent_s"] for r in ok]
    ttfb = [r["first_byte_s"] - r["sent_s"] for r in ok if r["first_byte_s"] is not None]
    rtf = [(r["done_s"] - r["sent_s"]) / r["audio_s"] for r in ok]
    audio_s = sum(r["audio_s"] for r in ok)
    if window:
        audio_s = sum(r["audio_s"] * _overlap_share(r, window) for r in reqs
                      if r["error"] is None and r["audio_s"] and r["done_s"] is not None)
    errors = [r for r in reqs if r["error"] is not None]
    return {
        "requests": len(inside), "completed": len(ok), "window_s": round(span_s, 3),
        "audio_s": round(audio_s, 3), "audio_s_per_request_p50": _r(pct([r["audio_s"] for r in ok], 0.5), 3),
        "throughput_audio_s_per_s": _r(audio_s / span_s, 3) if span_s > 0 else None,
        "requests_per_s": _r(len(ok) / span_s, 3) if span_s > 0 else None,
        "latency_ms_p50": _r(_ms(pct(lat, 0.5)), 1), "latency_ms_p99": _r(_ms(pct(lat, 0.99)), 1),
        "ttfb_ms_p50": _r(_ms(pct(ttfb, 0.5)), 1), "ttfb_ms_p99": _r(_ms(pct(ttfb, 0.99)), 1),
        "rtf_p50": _r(pct(rtf, 0.5), 4), "rtf_p99": _r(pct(rtf, 0.99), 4),
        "errors": len(errors), "requests_total": len(reqs),
        "error_samples": sorted({f"{r['kind']}: {r['error']}" for r in errors})[:5],
    }


def _overlap_share(req: dict, window: list[float]) -> float:
    """The share of a request's time in flight that falls inside the window."""
    sent, done = req["sent_s"], req["done_s"]
    inside = min(done, window[1]) - max(sent, window[0])
    return max(0.0, inside) / max(done - sent, 1e-9)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000.0 * seconds


def _r(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--server-pid", type=int, default=None, help="report this process's CPU use over the window")
    args = p.parse_args(argv)
    plan = json.loads(args.plan.read_text(encoding="utf-8"))
    try:
        import uvloop  # the client's own overhead per response is what we keep small

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(run_plan(args.url.rstrip("/"), plan, args.server_pid))
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
