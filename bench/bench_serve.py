"""Served-product benchmark: start_api.py driven over HTTP the way users drive it, one model per run.

    python bench/bench_serve.py --model voxcpm2                                   # full size, on a GPU (~9 min)
    python bench/bench_serve.py --model voxcpm1.5 --skip-engine --profiles best   # no engine baseline
    python bench/bench_serve.py --model voxcpm1.5 --tiny --device cpu --skip-engine --audio-s 2.56 \
        --clients 1,2 --duration-s 2 --ttfb-clients 1,2 --out-dir /tmp/serve-smoke                # smoke test

Steps (each skipped, and recorded as skipped, when its estimate does not fit in --deadline-s):
 1. the random checkpoint and its 8 adapters (bench/make_checkpoint.py, in a child process so that this
    one never holds a CUDA context); distinct texts of N tokens each, N chosen so that every request
    makes --audio-s of audio (stop head zeroed: a request runs to the official cap int(N*6+10) patches);
 2. unless --skip-engine, bench/bench_engine.py as a child (official compiled RTF and serial throughput,
    our engine at 64 rows with 0 and 8 adapters) for the baselines of the ratios;
 3. per profile (--profiles; `defaults` = no flags, `best` = --best-flags): `python start_api.py --model
    <ckpt> --lora-dir <adapters> --output-dir <tmp> --host 127.0.0.1 --port <free> [flags]`, log under
    <out-dir>/logs/; process start -> GET /ready 200; then a burst of --burst sync requests at once; closed
    loops at --clients (sync, round-robin over the 8 adapters and the base model); --base-clients with the
    base model only; stream TTFB (POST /synthesize/stream) at --ttfb-clients; a mix at --mix-clients (sync,
    async + poll + download, stream, OpenAI streamed, a saved voice made from a WAV the server produced,
    left out with a note where cloning cannot run, e.g. no FFmpeg libraries); an open-loop Poisson sweep (half
    stream, half sync) at --open-fractions of the closed 64-client request rate, stopping at the first rate
    over the SLO (stream TTFB p99 <= 300 ms, latency p99 <= 2 x audio, no errors). Profiles named in
    --light-profiles run only the start, the burst and the 64-client closed loop.

The load comes from bench/serve_load.py, a separate process per step (asyncio + httpx); its own CPU use
and event-loop lag are in every row, beside the server process's CPU (all its threads, /proc) and the
GPU's utilisation and memory (nvidia-smi, once a second). Throughput counts the audio of the requests
in flight during the measured window (after --warmup-s, for --duration-s), each prorated by the share of
its time in flight inside the window, over the window.

Output: <out-dir>/serve-<model>-<device>.json and .md, rewritten after every step; the engine baseline's
own report goes to <out-dir>/serve-engine/. Servers are always killed at the end (Ctrl-C, SIGTERM, errors;
and, through PR_SET_PDEATHSIG, when this process is killed outright).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _p in (str(REPO / "src"), str(BENCH_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_engine import Deadline, Report as EngineReport, log, rnd  # noqa: E402
from serve_report import compute_targets, render_markdown  # noqa: E402
from serve_steps import CHILDREN, GpuSampler, kill, run_profile, spawn  # noqa: E402

SCHEMA = "voxcpm-bench-serve/1"


class Report(EngineReport):
    """bench_engine's report (atomic JSON + Markdown after every step) with the served targets."""

    kind = "serve"

    def derive(self) -> None:
        self.data["targets"] = compute_targets(self.data)

    def markdown(self) -> str:
        return render_markdown(self.data)


# --------------------------------------------------------------------------------------------- #
# environment, checkpoint, texts
# --------------------------------------------------------------------------------------------- #


def run_quiet(cmd: list[str], timeout_s: float = 10) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO,
                              check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict:
    """Versions and hardware without importing torch: this process must never hold a CUDA context."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("torch", "voxcpm", "fastapi", "uvicorn", "httptools", "uvloop", "httpx", "av"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "") if Path("/proc/cpuinfo").exists() else ""
    name = "cpu"
    if device.startswith("cuda"):
        index = device.split(":", 1)[1] if ":" in device else "0"
        smi = run_quiet(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", index])
        name = smi.splitlines()[0] if smi else "cuda"
    commit = run_quiet(["git", "rev-parse", "HEAD"])
    dirty = run_quiet(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"versions": versions, "host_cpu": cpu, "host_cpus": os.cpu_count(), "device_name": name,
            "git_commit": (commit + ("+dirty" if dirty else "")) if commit else "unknown (no git here)"}


def make_texts(model_dir: Path, n_tokens: int, count: int, seed: int = 11) -> list[str]:
    """`count` distinct texts of exactly n_tokens tokens for the model's tokenizer (what the official cap
    counts), each word one vocabulary word: nonsense, but the weights are random anyway."""
    from transformers import LlamaTokenizerFast

    tok = LlamaTokenizerFast.from_pretrained(str(model_dir))
    words = sorted(t[1:] for t in tok.get_vocab() if t.startswith("\u2581") and t[1:].isascii()
                   and t[1:].isalpha() and t[1:].islower() and 4 <= len(t) - 1 <= 8)
    rng = random.Random(seed)
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < count:
        text = " ".join(rng.choice(words) for _ in range(n_tokens))
        # the official wrapper only splits multi-character Chinese tokens: for ASCII, tokenize() is the count
        if text not in seen and len(tok.tokenize(text)) == n_tokens:
            seen.add(text)
            texts.append(text)
    return texts


def prepare(args: argparse.Namespace, report: Report, work: Path) -> dict:
    """Checkpoint (child process), request shape, texts file."""
    from make_checkpoint import build_checkpoint

    from voxcpm_api.engine.voxcpm_engine import official_patch_cap

    started = time.perf_counter()
    cmd = [sys.executable, str(BENCH_DIR / "make_checkpoint.py"), "--model", args.model, "--out",
           str(args.ckpt_root), "--device", args.device, *(["--tiny"] if args.tiny else [])]
    subprocess.run(cmd, check=True, cwd=REPO)
    ckpt = build_checkpoint(args.model, args.ckpt_root, tiny=args.tiny, device=args.device, log=log)  # complete now
    config = json.loads((ckpt.model_dir / "config.json").read_text(encoding="utf-8"))
    vae = config.get("audio_vae_config", {})
    patch_s = config["patch_size"] * math.prod(vae.get("decoder_rates", [1])) / vae.get(
        "out_sample_rate", vae.get("sample_rate", 16000))
    n_tokens = max(1, round((args.audio_s / patch_s - 10) / 6))
    patches = official_patch_cap(n_tokens)
    texts = make_texts(ckpt.model_dir, n_tokens, args.texts)
    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps(texts), encoding="utf-8")
    report.data["checkpoint"] = {"dir": str(ckpt.root), "ready_s": rnd(time.perf_counter() - started, 1),
                                 "loras": list(ckpt.lora_names)}
    report.data["settings"].update({"patch_duration_s": rnd(patch_s, 4), "text_tokens": n_tokens,
                                    "patches_per_request": patches, "audio_s_per_request": rnd(patches * patch_s, 3),
                                    "texts": len(texts), "text_example": texts[0]})
    report.save()
    return {"ckpt": ckpt, "patches": patches, "audio_s": patches * patch_s, "patch_s": patch_s,
            "texts_file": texts_file, "text_offset": 0, "loras": [None, *ckpt.lora_names]}


# --------------------------------------------------------------------------------------------- #
# engine baseline
# --------------------------------------------------------------------------------------------- #


def run_engine(args: argparse.Namespace, shape: dict, report: Report, deadline: Deadline) -> None:
    """bench_engine.py as a child: official first (its compile must fit), then ours at 64 rows."""
    budget_s = min(args.engine_deadline_s, deadline.left() - args.serve_reserve_s)
    if budget_s < (60 if args.tiny else 180):
        report.note("skipped", f"engine baseline: {deadline.left():.0f} s left, {budget_s:.0f} s for it")
        return
    engine_dir = args.out_dir / "serve-engine"
    cmd = [sys.executable, str(BENCH_DIR / "bench_engine.py"), "--model", args.model, "--device", args.device,
           "--ckpt-root", str(args.ckpt_root), "--out-dir", str(engine_dir), "--skip-eager", "--order",
           "official-first", "--concurrency", "64", "--lora-counts", "0,8", "--patches", str(shape["patches"]),
           "--official-compiled-reps", "2", "--serial-requests", "4", "--compile-budget-s", "110",
           "--deadline-s", str(int(budget_s)), *(["--tiny"] if args.tiny else []),
           *(["--ours-compile"] if args.device.startswith("cuda") else []), *shlex.split(args.engine_args)]
    log(f"engine baseline: {shlex.join(cmd)}")
    logs = args.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    proc = spawn(cmd, logs / f"{report.stem}-engine.log")
    try:
        rc = proc.wait(timeout=budget_s + 120)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        kill(proc)
    found = sorted(engine_dir.glob(f"engine-{report.data['model_label']}-*.json"), key=lambda p: p.stat().st_mtime)
    entry: dict[str, Any] = {"command": shlex.join(cmd), "rc": rc, "wall_s": rnd(time.perf_counter() - started, 1)}
    if found:
        entry.update(engine_summary(json.loads(found[-1].read_text(encoding="utf-8"))))
        entry["report"] = str(found[-1])
    else:
        report.note("errors", f"engine baseline wrote no report (rc {rc}); log {logs}/{report.stem}-engine.log")
    report.data["engine"] = entry
    report.save()


def engine_summary(data: dict) -> dict:
    """The baselines the targets divide by, from bench_engine.py's results (see its compute_ratios)."""
    off, ours = data.get("official") or {}, data.get("ours") or {}
    configs = ours.get("configs") or {}
    compiled, serial = off.get("compiled") or {}, off.get("serial") or {}
    return {
        "official_compiled_rtf_p50": compiled.get("rtf_p50"),
        "official_compiled_effective": compiled.get("effective"),
        "official_serial_audio_s_per_s": serial.get("throughput_audio_s_per_s"),
        "official_serial_mode": serial.get("mode"),
        "ours_c64_lora0_audio_s_per_s": (configs.get("c64-lora0") or {}).get("throughput_audio_s_per_s"),
        "ours_c64_lora8_audio_s_per_s": (configs.get("c64-lora8") or {}).get("throughput_audio_s_per_s"),
        "ours_construct_to_ready_s": ours.get("construct_to_ready_s"),
        "engine_errors": data.get("errors") or [],
        "engine_skipped": data.get("skipped") or [],
    }


# --------------------------------------------------------------------------------------------- #
# command line
# --------------------------------------------------------------------------------------------- #


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--model", choices=("voxcpm1.5", "voxcpm2"), default="voxcpm2")
    add("--tiny", action="store_true", help="tiny dimensions (smoke test on a CPU)")
    add("--device", default="cuda", help="cuda, cuda:N or cpu")
    add("--out-dir", type=Path, default=REPO / "bench" / "results")
    add("--ckpt-root", type=Path, default=Path("/tmp/voxcpm-bench-ckpt"), help="shared with bench_engine.py")
    add("--deadline-s", type=float, default=540.0, help="no step starts that would end after this (from start)")
    add("--audio-s", type=float, default=6.4, help="audio per request; text tokens chosen to make it")
    add("--texts", type=int, default=20000, help="distinct texts (one per request)")
    add("--skip-engine", action="store_true", help="no engine baseline (ratios to it stay empty)")
    add("--engine-deadline-s", type=float, default=250.0, help="bench_engine.py's own --deadline-s")
    add("--serve-reserve-s", type=float, default=150.0, help="time the engine baseline must leave to the server")
    add("--engine-args", default="", help="more bench_engine.py flags")
    add("--profiles", type=lambda t: [x for x in t.split(",") if x], default=["defaults", "best"],
        help="defaults (no flags), best (--best-flags), or a quoted flag string of its own")
    add("--best-flags", default="--compile --max-concurrent 64")
    add("--light-profiles", type=lambda t: [x for x in t.split(",") if x], default=["defaults"],
        help="profiles that run only start to ready, the burst and the 64-client closed loop")
    add("--ready-timeout-s", type=float, default=300.0)
    add("--request-timeout-s", type=float, default=300.0)
    add("--burst", type=int, default=64, help="sync requests sent at once right after ready")
    add("--clients", type=_ints, default=[1, 8, 32, 64, 128], help="closed-loop levels")
    add("--warmup-s", type=float, default=3.0, help="closed loop: seconds not measured at the start")
    add("--duration-s", type=float, default=8.0, help="closed loop: the measured window")
    add("--base-clients", type=int, default=64, help="closed loop with the base model only (mix vs base)")
    add("--ttfb-clients", type=_ints, default=[1, 64, 128],
        help="closed loops of streams (TTFB; 128: the load generator at its busiest)")
    add("--ttfb-duration-s", type=float, default=6.0)
    add("--mix-clients", type=int, default=32)
    add("--open-fractions", type=_floats, default=[0.6, 0.8, 0.95, 1.1],
        help="open-loop rates as fractions of the closed 64-client request rate")
    add("--open-warmup-s", type=float, default=2.0)
    add("--open-duration-s", type=float, default=6.0)
    add("--keep-work", action="store_true", help="keep the plans, raw results and load logs (printed path)")
    return p.parse_args(argv)


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: servers and children are killed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = Deadline(args.deadline_s)
    signal.signal(signal.SIGTERM, _on_sigterm)
    env = environment(args.device)
    label = f"{args.model}-tiny" if args.tiny else args.model
    data: dict[str, Any] = {
        "schema": SCHEMA, "command": shlex.join([sys.executable, *sys.argv]), "argv": sys.argv,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "model": args.model, "model_label": label,
        "tiny": args.tiny, "device": args.device, "device_name": env["device_name"], "git_commit": env["git_commit"],
        "env": env, "complete": False,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    report = Report(data, args.out_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    gpu = GpuSampler(args.device)
    interrupted = False
    try:
        shape = prepare(args, report, work)
        if not args.skip_engine:
            run_engine(args, shape, report, deadline)
        for name in args.profiles:
            run_profile(args, shape, report, deadline, gpu, name, work)
    except KeyboardInterrupt:
        interrupted = True
        report.note("errors", "interrupted (Ctrl-C or SIGTERM): the report holds what was measured")
    except Exception as exc:  # noqa: BLE001 - a failed preparation or baseline: say so in the report
        report.note("errors", f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        for child in list(CHILDREN):
            kill(child, 5.0)
        gpu.close()
        if args.keep_work:
            log(f"plans, raw results and load logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    data["complete"] = not interrupted and not data.get("skipped") and not data.get("errors")
    md_path = report.save()
    log(f"results: {md_path.with_suffix('.json')} and {md_path}")
    print(md_path.read_text(encoding="utf-8"), flush=True)
    return 1 if data.get("errors") or interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
