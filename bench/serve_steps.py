"""The child processes of bench/bench_serve.py (server, GPU sampler, load generator) and one profile's steps.

A profile is one server started as a user starts it; `ProfileRun` sends it the steps' loads through
bench/serve_load.py (one process per step) and writes each result into the report as soon as it is in.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench_engine import Deadline, log, rnd, slug
from serve_load import as_dicts, summarize

if TYPE_CHECKING:
    from bench_serve import Report

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SLO_TTFB_MS = 300.0
SLO_RTF = 2.0
CHILDREN: set[subprocess.Popen] = set()  # every child still running; bench_serve.main kills them on any exit


# --------------------------------------------------------------------------------------------- #
# child processes
# --------------------------------------------------------------------------------------------- #


try:  # looked up here, not in the forked child: a child of a threaded parent must not import
    import ctypes

    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when this process dies, even by SIGKILL (a device timeout), so no
    server is left holding the GPU. Only a C call: safe between fork and exec. Elsewhere the finally
    blocks are all there is."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def spawn(cmd: list[str], log_path: Path | None = None, **kw: Any) -> subprocess.Popen:
    """A child in its own process group (kill() takes its workers too), output appended to log_path."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                preexec_fn=_die_with_parent, **kw)  # noqa: PLW1509 - one C call, see above
    finally:
        if log_path:
            out.close()  # the child has its own copy of the descriptor
    CHILDREN.add(proc)
    return proc


def kill(proc: subprocess.Popen | None, grace_s: float = 15.0) -> None:
    """SIGTERM to the child's process group (a server's compile workers too), SIGKILL after grace_s."""
    if proc is None:
        return
    CHILDREN.discard(proc)
    if proc.poll() is None:
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait_s)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


class GpuSampler:
    """nvidia-smi once a second in a child; samples (unix time, util %, memory MiB) read by a thread."""

    def __init__(self, device: str) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.proc: subprocess.Popen | None = None
        if not device.startswith("cuda") or shutil.which("nvidia-smi") is None:
            return
        index = device.split(":", 1)[1] if ":" in device else "0"
        self.proc = subprocess.Popen(["nvidia-smi", "-i", index, "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits", "-l", "1"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                                     preexec_fn=_die_with_parent)  # noqa: PLW1509 - one C call
        CHILDREN.add(self.proc)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def window(self, unix: list[float] | None) -> dict:
        if not unix:
            return {}
        got = [s for s in self.samples if unix[0] <= s[0] <= unix[1]]
        if not got:
            return {}
        return {"gpu_util_mean": rnd(sum(s[1] for s in got) / len(got), 1), "gpu_util_max": max(s[1] for s in got),
                "gpu_mem_max_mib": max(s[2] for s in got)}

    def close(self) -> None:
        kill(self.proc, 2.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`python start_api.py ...` as a user starts it; its output goes to a log file under the out dir."""

    def __init__(self, args: argparse.Namespace, shape: dict, name: str, flags: list[str], work: Path,
                 log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_dir = work / f"out-{name}"
        ckpt = shape["ckpt"]
        self.cmd = [sys.executable, str(REPO / "start_api.py"), "--model", str(ckpt.model_dir), "--lora-dir",
                    str(ckpt.lora_root), "--output-dir", str(self.output_dir), "--host", "127.0.0.1", "--port",
                    str(self.port), *([] if args.device == "cuda" else ["--device", args.device]), *flags]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> float:
        """Seconds from process start to the first GET /ready 200."""
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        started = time.perf_counter()
        self.proc = spawn(self.cmd, self.log_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        with httpx.Client(base_url=self.url, timeout=2.0) as client:
            while time.perf_counter() - started < timeout_s:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode} before ready")
                try:
                    if client.get("/ready").status_code == 200:
                        return time.perf_counter() - started
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> list[str]:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    def stop(self) -> None:
        kill(self.proc)
        shutil.rmtree(self.output_dir, ignore_errors=True)  # thousands of WAVs: disk, not data


# --------------------------------------------------------------------------------------------- #
# one profile's steps
# --------------------------------------------------------------------------------------------- #


class ProfileRun:
    """The steps against one started server; every measurement lands in `self.entry` and is saved at once."""

    def __init__(self, args: argparse.Namespace, shape: dict, report: Report, deadline: Deadline,
                 gpu: GpuSampler, server: Server, entry: dict, work: Path) -> None:
        self.args, self.shape, self.report, self.deadline = args, shape, report, deadline
        self.gpu, self.server, self.entry, self.work = gpu, server, entry, work
        self.steps: dict[str, Any] = entry.setdefault("steps", {})
        self.latency_guess_s = 3.0 if args.tiny else 5.0  # refined by every step (p99 of the last one)
        self.last: tuple[list[dict], list[float] | None] = ([], None)  # the last step's requests and window

    def fits(self, what: str, need_s: float) -> bool:
        if not self.server.alive():
            raise RuntimeError("the server died")
        if self.deadline.allows(need_s):
            return True
        self.report.note("skipped", f"{self.entry['name']} {what}: needs ~{need_s:.0f} s, "
                                    f"{self.deadline.left():.0f} s left")
        return False

    def load(self, what: str, plan: dict) -> tuple[list[dict], dict]:
        """Run serve_load.py on one plan; returns the requests and the window's resource use."""
        plan = {"texts_file": str(self.shape["texts_file"]), "text_offset": self.shape["text_offset"],
                "loras": self.shape["loras"], "response_format": "wav", "timeout_s": self.args.request_timeout_s,
                "drain_s": max(10.0, 4 * self.latency_guess_s), **plan}
        path = self.work / f"plan-{self.entry['name']}-{what}.json"
        out = path.with_name(path.name.replace("plan-", "result-"))
        path.write_text(json.dumps(plan), encoding="utf-8")
        cmd = [sys.executable, str(BENCH_DIR / "serve_load.py"), "--url", self.server.url, "--plan", str(path),
               "--out", str(out), "--server-pid", str(self.server.proc.pid)]
        limit_s = plan.get("warmup_s", 0) + plan.get("duration_s", 0) + plan["drain_s"] + 60
        proc = spawn(cmd, self.work / f"load-{self.entry['name']}-{what}.log")
        try:
            rc = proc.wait(timeout=limit_s)
        finally:
            kill(proc, 2.0)
        if rc != 0 or not out.exists():
            tail = (self.work / f"load-{self.entry['name']}-{what}.log").read_text(errors="replace")[-600:]
            raise RuntimeError(f"load generator exited with {rc}: {tail}")
        result = json.loads(out.read_text(encoding="utf-8"))
        self.shape["text_offset"] += result["requests_made"]  # no text is spoken twice in a run
        reqs = as_dicts(result)
        usage = result["usage"]
        lat = sorted(r["done_s"] - r["sent_s"] for r in reqs if r["error"] is None)
        if lat:
            self.latency_guess_s = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        resources = {"client_cores": rnd(usage.get("client_cores"), 3),
                     "client_loop_lag_ms_p99": rnd(usage.get("loop_lag_ms_p99"), 2),
                     "client_loop_lag_ms_max": rnd(usage.get("loop_lag_ms_max"), 2),
                     "server_cores": rnd(usage.get("server_cores"), 3), "client_loop": result.get("loop"),
                     **self.gpu.window(usage.get("window_unix"))}
        return reqs, {"window": usage.get("window"), **resources}

    def summary(self, what: str, reqs: list[dict], usage: dict, by: str = "done_s", window: bool = True) -> dict:
        out = {**summarize(reqs, usage.get("window") if window else None, by=by),
               **{k: v for k, v in usage.items() if k != "window"}}
        got, want = out.get("audio_s_per_request_p50"), self.shape["audio_s"]
        if got is not None and abs(got - want) > self.shape["patch_s"] + 1e-6:
            self.report.note("errors", f"{self.entry['name']} {what}: requests made {got} s of audio, expected "
                                       f"{want:.2f} s: the length targets' basis is off")
        for sample in out["error_samples"]:
            self.report.note("errors", f"{self.entry['name']} {what}: {sample}")
        return out

    def save(self) -> None:
        self.report.save()

    def closed_need(self, duration_s: float) -> float:
        return self.args.warmup_s + duration_s + self.latency_guess_s + 5

    def burst(self) -> None:
        count = self.args.burst
        if not self.fits("burst", 10 + 3 * self.latency_guess_s):
            return
        reqs, usage = self.load("burst", {"mode": "burst", "count": count, "kinds": ["sync"],
                                          "drain_s": self.args.request_timeout_s})
        self.steps["burst"] = {"requests_sent": count, **self.summary("burst", reqs, usage, window=False)}
        log(f"{self.entry['name']} burst of {count}: {self.steps['burst']['throughput_audio_s_per_s']} audio s/s")
        self.save()

    def closed(self, key: str, clients: int, loras: list | None = None, kinds: list[str] | None = None,
               duration_s: float | None = None, **extra: Any) -> dict | None:
        duration_s = duration_s or self.args.duration_s
        if not self.fits(key, self.closed_need(duration_s)):
            return None
        plan = {"mode": "closed", "clients": clients, "warmup_s": self.args.warmup_s, "duration_s": duration_s,
                "kinds": kinds or ["sync"], **({"loras": loras} if loras else {}), **extra}
        reqs, usage = self.load(key, plan)
        self.last = (reqs, usage.get("window"))
        entry = {"clients": clients, **self.summary(key, reqs, usage)}
        log(f"{self.entry['name']} {key}: {entry['throughput_audio_s_per_s']} audio s/s, latency p50 "
            f"{entry['latency_ms_p50']} ms, TTFB p50 {entry['ttfb_ms_p50']} ms, errors {entry['errors']}")
        return entry

    def closed_levels(self, levels: list[int]) -> None:
        table = self.steps.setdefault("closed", {})
        for clients in levels:
            entry = self.closed(f"closed-c{clients}", clients)
            if entry:
                table[f"c{clients}"] = entry
                self.save()

    def base_only(self) -> None:
        c = self.args.base_clients
        entry = self.closed(f"base-c{c}", c, loras=[None])
        if entry:
            self.steps.setdefault("base", {})[f"c{c}"] = entry
            self.save()

    def ttfb(self) -> None:
        for c in self.args.ttfb_clients:
            entry = self.closed(f"stream-c{c}", c, kinds=["stream"], duration_s=self.args.ttfb_duration_s)
            if entry:
                self.steps.setdefault("stream", {})[f"c{c}"] = entry
                self.save()

    def mix(self) -> None:
        if not self.fits("mix", self.closed_need(self.args.duration_s) + 10):
            return
        voice = self.make_voice()
        kinds = ["sync", "async", "stream", "openai"] + (["voice"] if voice.get("usable") else [])
        entry = self.closed("mix", self.args.mix_clients, kinds=kinds, voice=voice.get("name"))
        if entry is None:
            return
        reqs, window = self.last
        entry["by_kind"] = {k: summarize([r for r in reqs if r["kind"] == k], window) for k in kinds}
        self.steps["mix"] = {"kinds": kinds, "voice": voice, **entry}
        self.save()

    def make_voice(self) -> dict:
        """A saved voice made from a WAV this server produced, with its transcript (VoxCPM1.x needs one);
        one sync request with it decides whether cloning works here (it needs FFmpeg/librosa's stack)."""
        import httpx

        text = json.loads(self.shape["texts_file"].read_text(encoding="utf-8"))[-1]  # the load starts at 0
        name = f"bench_{slug(self.entry['name'])}"
        with httpx.Client(base_url=self.server.url, timeout=self.args.request_timeout_s) as client:
            try:
                made = client.post("/synthesize", json={"text": text, "async_mode": False, "response_format": "wav"})
                made.raise_for_status()
                wav = client.get(httpx.URL(made.json()["download_url"]).path).raise_for_status().content
                created = client.post("/voices", files={"audio": ("reference.wav", wav, "audio/wav")},
                                      data={"name": name, "transcript": text})
                created.raise_for_status()
            except httpx.HTTPError as exc:  # the product failed a plain request: an error, not a missing stack
                first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self.report.note("errors", f"{self.entry['name']} making the saved voice: {first_line}")
                return {"usable": False, "reason": f"making it failed: {first_line}"}
            started = time.perf_counter()
            probe = client.post("/synthesize", json={"text": text, "voice": name, "async_mode": False,
                                                     "response_format": "wav"})
        first_s = rnd(time.perf_counter() - started, 3)
        if probe.status_code == 200:
            return {"usable": True, "name": name, "first_request_s": first_s, "reference_s": made.json()["duration_s"]}
        reason = f"a request with the saved voice failed: {probe.status_code} {probe.text[:300]}"
        self.report.note("notes", f"{self.entry['name']} mix: cloning unavailable on this machine, the mix runs "
                                  f"without the voice kind ({reason})")
        return {"usable": False, "reason": reason}

    def open_sweep(self) -> None:
        closed = self.steps.get("closed") or {}
        source = "c64" if (closed.get("c64") or {}).get("requests_per_s") else max(
            closed, key=lambda k: closed[k].get("requests_per_s") or 0, default=None)  # the busiest level run
        guide = (closed.get(source) or {}).get("requests_per_s") if source else None
        if not guide:
            self.report.note("skipped", f"{self.entry['name']} open loop: no closed-loop rate to start from")
            return
        sweep = self.steps.setdefault("open", {"guide_requests_per_s": guide, "guide_from": f"closed {source}",
                                               "rates": [], "slo": {"stream_ttfb_ms_p99": SLO_TTFB_MS,
                                                                    "latency_over_audio_p99": SLO_RTF, "errors": 0}})
        for index, fraction in enumerate(self.args.open_fractions):
            rate = round(guide * fraction, 3)
            need = self.args.open_warmup_s + self.args.open_duration_s + 2 * self.latency_guess_s + 3
            if not self.fits(f"open {rate}/s", need):
                break
            plan = {"mode": "open", "rate_per_s": rate, "warmup_s": self.args.open_warmup_s, "seed": 1000 + index,
                    "duration_s": self.args.open_duration_s, "kinds": ["stream", "sync"],
                    "drain_s": max(10.0, SLO_RTF * self.shape["audio_s"] * 2)}
            reqs, usage = self.load(f"open-{rate}", plan)
            row = {"fraction": fraction, "rate_per_s": rate, **self.summary(f"open {rate}/s", reqs, usage,
                                                                            by="sent_s")}
            stream = summarize([r for r in reqs if r["kind"] == "stream"], usage.get("window"), by="sent_s")
            row["stream_ttfb_ms_p99"] = stream["ttfb_ms_p99"]
            row["arrivals_per_s"] = rnd(row["requests"] / row["window_s"], 3) if row["window_s"] else None
            row["slo_met"] = bool(row["errors"] == 0 and row["completed"] == row["requests"] > 0
                                  and (row["stream_ttfb_ms_p99"] or 1e9) <= SLO_TTFB_MS
                                  and (row["rtf_p99"] or 1e9) <= SLO_RTF)
            sweep["rates"].append(row)
            met = [r["rate_per_s"] for r in sweep["rates"] if r["slo_met"]]
            sweep["best_rate_per_s"] = max(met) if met else None
            log(f"{self.entry['name']} open {rate}/s: TTFB p99 {row['stream_ttfb_ms_p99']} ms, RTF p99 "
                f"{row['rtf_p99']}, errors {row['errors']}: SLO {'met' if row['slo_met'] else 'missed'}")
            self.save()
            if not row["slo_met"]:
                break  # higher rates only queue more

    def run(self, light: bool) -> None:
        self.burst()
        if light:
            entry = self.closed("closed-c64", 64)
            if entry:
                self.steps.setdefault("closed", {})["c64"] = entry
                self.save()
            return
        self.closed_levels(self.args.clients)
        self.base_only()
        self.ttfb()
        self.mix()
        self.open_sweep()


def run_profile(args: argparse.Namespace, shape: dict, report: Report, deadline: Deadline, gpu: GpuSampler,
                name: str, work: Path) -> None:
    flags = shlex.split(args.best_flags) if name == "best" else [] if name == "defaults" else shlex.split(name)
    entry: dict[str, Any] = {"name": name, "flags": flags, "light": name in args.light_profiles}
    report.data.setdefault("profiles", {})[name] = entry
    need = 30 if args.tiny else 90
    if not deadline.allows(need):
        report.note("skipped", f"profile {name}: {deadline.left():.0f} s left, a start needs ~{need} s")
        return
    server = Server(args, shape, slug(name), flags, work, args.out_dir / "logs" / f"{report.stem}-{slug(name)}.log")
    entry["command"] = shlex.join(server.cmd)
    entry["log"] = str(server.log_path)
    try:
        log(f"profile {name}: {entry['command']}")
        entry["start_to_ready_s"] = rnd(server.start(args.ready_timeout_s), 2)
        log(f"profile {name}: ready {entry['start_to_ready_s']} s after the process started")
        report.save()
        ProfileRun(args, shape, report, deadline, gpu, server, entry, work).run(entry["light"])
    except Exception as exc:  # noqa: BLE001 - keep what was measured, say why the rest is missing
        report.note("errors", f"profile {name}: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        if server.proc is not None and server.proc.poll() is not None:
            entry["died"] = {"returncode": server.proc.returncode, "log_tail": server.log_tail()}
            report.note("errors", f"profile {name}: the server died (exit {server.proc.returncode}); log tail in "
                                  f"the report, whole log {server.log_path}")
        if server.alive():
            entry["engine_metrics"] = engine_metrics(server.url)
        server.stop()
        report.save()


def engine_metrics(url: str) -> dict[str, float]:
    """The server's voxcpm_engine_* series at the end of a profile (decode steps, rows stepped, seconds per
    phase of the loop thread): where the engine's time went while the clients drove it."""
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("voxcpm_engine_", "voxcpm_batch_rows")) and " " in line:
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out
