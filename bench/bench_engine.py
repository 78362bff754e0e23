"""Engine benchmark: the official `voxcpm` package (batch 1) against our batched engine, one process, one GPU.

    python bench/bench_engine.py --model voxcpm2                         # everything (~9 min on an H100)
    python bench/bench_engine.py --model voxcpm2 --skip-official         # our engine only
    python bench/bench_engine.py --model voxcpm2 --skip-ours --skip-compile
    python bench/bench_engine.py --merge a.json b.json                   # one report from split runs
    python bench/bench_engine.py --model voxcpm1.5 --tiny --device cpu --out-dir /tmp/benchtest  # smoke test

Weights are random at the real size (bench/make_checkpoint.py) with the stop head zeroed, so every
request generates exactly --patches patches (31 = 4.96 s of audio by default) on both sides.

Official package (batch 1, its only mode), driven the way `voxcpm.VoxCPM` drives it:
  load = `from_local(dir, optimize=False)`; eager = 1 warm-up + --official-eager-reps requests;
  compile = `optimize()` + the package's own warm-up `generate("Hello, this is the first test
  sentence.", max_len=10)` (that wall is the compile cost), then --official-compiled-reps requests;
  serial = --serial-requests different texts back to back (the baseline of aggregate throughput);
  optional (--official-lora) LoRA hot swap = `load_lora_weights(dir)` on a LoRA-enabled model.
  Its time to first patch comes from a forward hook on `stop_head`, which the generation loop calls
  exactly once per patch (the hook synchronises the GPU on its first call only).

Our engine (`BatchedEngine`, settings from --max-rows, --lora-slots, --ours-compile, --engine-opt):
construct + `load()` (start to ready, CUDA graph capture included), `register_adapter` for 8
adapters, then for every concurrency C in --concurrency and LoRA count K in --lora-counts (the pairs
the target ratios need first): one warm-up round of --warmup-patches and --timed-rounds timed rounds,
a round being C requests fired at once from C threads (rows assigned round-robin to the K adapters;
K = 0: base model). At C = 1 the timed round is repeated --single-reps times, one after the other.
By default our engine runs first (--order), so its start-to-ready is that of a fresh process.

Per configuration: TTFP (submit -> first on_patch) p50/p90, RTF per request (submit -> result,
over the audio seconds) p50, inter-patch ms p50, aggregate audio seconds per wall second, peak GPU
memory allocated (peak reset per configuration) and `engine.stats()`.

--profile KEYS (e.g. c64-lora8): after those configurations, one more round under torch.profiler; the
report gets the GPU kernel time by kind (GEMM, attention, our kernels, inductor's, copies, ...) and
profile-<stem>-<key>.txt the 40 costliest kernels.

Output: `<out-dir>/engine-<model>-<device-slug>.json` and `.md`, rewritten after every step so a
timeout still leaves data; the Markdown table is printed last. --deadline-s stops gracefully: a
step that would not fit in the time left is skipped and recorded as such.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # process start, as near as Python lets us see it

import argparse
import dataclasses
import datetime as dt
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ALL_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _p in (str(REPO / "src"), str(BENCH_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SCHEMA = "voxcpm-bench-engine/1"
# Distinct English sentences of 20-24 tokens: the official per-call cap min(tokens * 6 + 10, max_len)
# then stays above --patches up to ~125 patches (20 s), so both sides generate exactly --patches.
TEXTS = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden porch.",
    "Please remember to bring your umbrella tomorrow, because the forecast says it will rain all afternoon.",
    "Our team shipped the new release on Friday, and the early feedback from customers has been very positive.",
    "She opened the letter slowly, read it twice, and then smiled for the first time in many weeks.",
    "If you follow the river north for about two miles, you will find a small village with a bakery.",
    "The museum will stay open late on Thursday evenings so that visitors can enjoy the new exhibition.",
    "After a long day of meetings, he finally sat down with a cup of tea and a good book.",
    "Scientists have discovered a new species of frog in the rainforest, hidden beneath the fallen leaves.",
)
WARMUP_TEXT = "Hello, this is the first test sentence."  # the package's own warm-up (VoxCPM.__init__)
TARGETS = {
    "a": ("single-stream RTF: ours / official compiled", "<=", 0.5),
    "b": ("aggregate throughput: ours (64 concurrent, 8 LoRAs) / official compiled serial", ">=", 50.0),
    "c": ("8-LoRA mix vs no LoRA at 64 concurrent: slowdown", "<=", 0.15),
    "d": ("adapter switch, ms", "<=", 10.0),
    "e": ("start to ready (engine construct + load), s", "<=", 30.0),
}


# --------------------------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------------------------- #


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def pct(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1); None for no values. p50 is the median."""
    if not values:
        return None
    if q == 0.5:
        return float(statistics.median(values))
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q * len(ordered)) - 1)])


def rnd(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def jsonable(value: Any) -> Any:
    """engine.stats() may hold numpy scalars, tuples, paths...: keep what JSON can hold, str() the rest."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


class Deadline:
    """Time budget counted from process start; steps ask before starting instead of being killed."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s

    def left(self) -> float:
        return self.total_s - (time.perf_counter() - _T0)

    def allows(self, need_s: float) -> bool:
        return self.left() >= need_s


class GpuMem:
    """Peak allocated memory per configuration (torch.cuda.max_memory_allocated); no-ops on the CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def reset(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return rnd(torch.cuda.memory_allocated() / 2**30)

    def peak(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        torch.cuda.synchronize()
        return rnd(torch.cuda.max_memory_allocated() / 2**30)

    def now(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        return rnd(torch.cuda.memory_allocated() / 2**30)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


@dataclass
class RequestTiming:
    """One request, seconds relative to its own submit time."""

    wall_s: float  # submit -> result in hand
    ttfp_s: float | None  # submit -> first patch
    last_patch_s: float | None  # submit -> last patch
    patches: int  # patch callbacks seen
    samples: int  # length of the returned audio
    audio_s: float  # samples / sample rate
    adapter: str | None = None
    error: str | None = None

    @property
    def rtf(self) -> float | None:
        return self.wall_s / self.audio_s if self.audio_s > 0 else None

    @property
    def step_ms(self) -> float | None:
        if self.ttfp_s is None or self.last_patch_s is None or self.patches < 2:
            return None
        return 1000.0 * (self.last_patch_s - self.ttfp_s) / (self.patches - 1)


def summarize(reqs: list[RequestTiming], round_walls: list[float]) -> dict:
    ok = [r for r in reqs if r.error is None]
    ttfp = [r.ttfp_s for r in ok if r.ttfp_s is not None]
    rtf = [r.rtf for r in ok if r.rtf is not None]
    steps = [r.step_ms for r in ok if r.step_ms is not None]
    audio = sum(r.audio_s for r in ok)
    wall = sum(round_walls)
    return {
        "requests": len(reqs),
        "errors": len(reqs) - len(ok),
        "ttfp_ms_p50": rnd(1000 * pct(ttfp, 0.5), 1) if ttfp else None,
        "ttfp_ms_p90": rnd(1000 * pct(ttfp, 0.9), 1) if ttfp else None,
        "rtf_p50": rnd(pct(rtf, 0.5), 4),
        "rtf_p90": rnd(pct(rtf, 0.9), 4),
        "wall_s_p50": rnd(pct([r.wall_s for r in ok], 0.5)),
        "step_ms_p50": rnd(pct(steps, 0.5), 2),
        "audio_s": rnd(audio),
        "round_wall_s": [rnd(w) for w in round_walls],
        "throughput_audio_s_per_s": rnd(audio / wall, 3) if wall > 0 else None,
    }


# --------------------------------------------------------------------------------------------- #
# results file
# --------------------------------------------------------------------------------------------- #


class Report:
    """The results dict plus where it goes; save() rewrites JSON + Markdown atomically (a timeout still
    leaves data). Subclasses (bench_serve.py) set `kind` and derive their own figures in `derive()`."""

    kind = "engine"

    def __init__(self, data: dict, out_dir: Path) -> None:
        self.data = data
        self.out_dir = out_dir

    @property
    def stem(self) -> str:
        return f"{self.kind}-{self.data['model_label']}-{slug(self.data.get('device_name') or self.data['device'])}"

    def note(self, section: str, message: str) -> None:
        self.data.setdefault(section, []).append(message)
        log(f"{section}: {message}")

    def derive(self) -> None:
        self.data["ratios"] = compute_ratios(self.data)

    def markdown(self) -> str:
        return render_markdown(self.data)

    def save(self) -> Path:
        self.derive()
        if not self.data.get("merged_from"):
            self.data["elapsed_s"] = rnd(time.perf_counter() - _T0, 1)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        json_path = self.out_dir / f"{self.stem}.json"
        md_path = self.out_dir / f"{self.stem}.md"
        _atomic_write(json_path, json.dumps(self.data, indent=2) + "\n")
        _atomic_write(md_path, self.markdown())
        return md_path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def environment(device: str) -> dict:
    import torch

    versions: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("voxcpm", "transformers", "triton", "numpy"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"versions": versions, "host_cpu": cpu, "host_cpus": os.cpu_count(), "platform": platform.platform()}
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
        env["gpu_total_gib"] = rnd(torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30, 1)
    else:
        env["device_name"] = "cpu"
    return env


# --------------------------------------------------------------------------------------------- #
# official package
# --------------------------------------------------------------------------------------------- #


class PatchProbe:
    """Forward hook on the official model's stop_head: called once per generated patch."""

    def __init__(self, model, mem: GpuMem) -> None:
        self.mem = mem
        self.first: float | None = None
        self.last: float | None = None
        self.count = 0
        self.handle = model.stop_head.register_forward_hook(self._hook)

    def arm(self) -> None:
        self.first = self.last = None
        self.count = 0

    def _hook(self, _module, _inputs, _output) -> None:
        if self.first is None:
            self.mem.sync()  # the patch is done on the GPU (the loop syncs right after anyway: .item())
            self.first = time.perf_counter()
        self.last = time.perf_counter()
        self.count += 1

    def remove(self) -> None:
        self.handle.remove()


class Official:
    """The official model object, and one request the way VoxCPM.generate makes it."""

    def __init__(self, args: argparse.Namespace, model_dir: Path, mem: GpuMem, lora_config: Any = None) -> None:
        import torch

        arch = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("architecture", "voxcpm")
        if arch == "voxcpm2":
            from voxcpm.model.voxcpm2 import VoxCPM2Model as model_cls
        else:
            from voxcpm.model.voxcpm import VoxCPMModel as model_cls
        self.args = args
        self.mem = mem
        self.torch = torch
        started = time.perf_counter()
        kwargs = {"lora_config": lora_config} if lora_config is not None else {}
        self.model = model_cls.from_local(str(model_dir), optimize=False, device=args.device, **kwargs)
        mem.sync()
        self.load_s = time.perf_counter() - started
        self.sample_rate = int(self.model.sample_rate)
        self.patch_samples = int(
            self.model.patch_size * getattr(self.model, "_decode_chunk_size", self.model.chunk_size)
        )
        self.probe = PatchProbe(self.model, mem)

    def token_count(self, text: str) -> int:
        return len(self.model.text_tokenizer(text))

    def request(self, text: str, n_patches: int) -> RequestTiming:
        # what VoxCPM.generate(text, max_len=n, retry_badcase=False) runs, minus its argument checks
        text = re.sub(r"\s+", " ", text.replace("\n", " "))
        self.probe.arm()
        started = time.perf_counter()
        wav, _feat, _ctx = self.model.generate_with_prompt_cache(
            target_text=text,
            prompt_cache=None,
            min_len=2,
            max_len=n_patches,
            inference_timesteps=self.args.steps,
            cfg_value=self.args.cfg,
            retry_badcase=False,  # with a forced length every request would look like a bad case
        )
        audio = wav.squeeze(0).cpu().numpy()
        done = time.perf_counter()
        p = self.probe
        return RequestTiming(
            wall_s=done - started,
            ttfp_s=None if p.first is None else p.first - started,
            last_patch_s=None if p.last is None else p.last - started,
            patches=p.count,
            samples=int(audio.shape[-1]),
            audio_s=int(audio.shape[-1]) / self.sample_rate,
        )

    def close(self) -> None:
        self.probe.remove()
        del self.model
        free_gpu()


def free_gpu() -> None:
    import torch

    gc.collect()
    try:
        torch._dynamo.reset()  # drops compiled graphs (and their CUDA graph pools) of an optimize()d model
    except Exception as exc:  # noqa: BLE001 - best effort
        log(f"torch._dynamo.reset() failed: {exc!r}")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_lengths(report: Report, where: str, reqs: list[RequestTiming], n_patches: int, patch_samples: int) -> None:
    want = n_patches * patch_samples
    for i, r in enumerate(reqs):
        if r.error is not None:
            report.note("errors", f"{where} request {i}: {r.error}")
        elif r.samples != want or r.patches != n_patches:
            report.note(
                "errors",
                f"!!! LENGTH MISMATCH {where} request {i}: {r.samples} samples / {r.patches} patches, "
                f"expected {want} samples / {n_patches} patches",
            )
            print(
                f"!!! LENGTH MISMATCH in {where}: got {r.samples} samples ({r.patches} patches), "
                f"expected {want} ({n_patches} patches)",
                file=sys.stderr,
                flush=True,
            )


def run_official(args: argparse.Namespace, ckpt, report: Report, deadline: Deadline, mem: GpuMem) -> None:
    off: dict[str, Any] = report.data.setdefault("official", {})
    n = args.patches
    per_patch_guess = 0.2 if not args.tiny else 0.05  # eager s per patch (baseline: 140-166 ms on an H100 host)
    if not deadline.allows(40 + 2 * n * per_patch_guess):
        report.note("skipped", f"official package: {deadline.left():.0f} s left, not enough to load and run it")
        return
    log("official: loading (from_local, optimize=False)")
    mem.reset()
    model = Official(args, ckpt.model_dir, mem)
    off["load_s"] = rnd(model.load_s, 2)
    off["mem_after_load_gib"] = mem.now()
    off["sample_rate_hz"] = model.sample_rate
    off["patch_samples"] = model.patch_samples
    tokens = [model.token_count(t) for t in TEXTS]
    off["text_tokens"] = tokens
    cap = min(tokens) * 6 + 10
    if cap < n:
        report.note(
            "errors", f"official caps a call at tokens*6+10 = {cap} patches < --patches {n}: lengths will differ"
        )
    log(f"official: loaded in {model.load_s:.1f} s")
    report.save()

    def timed(label: str, reps: int, warmups: int) -> list[RequestTiming]:
        for i in range(warmups):
            first = model.request(TEXTS[i % len(TEXTS)], n)
            off.setdefault("first_request_s", {})[label] = rnd(first.wall_s)  # after load / after the compile
            log(f"official {label}: first (untimed) request {first.wall_s:.2f} s")
        reqs = []
        for i in range(reps):
            reqs.append(model.request(TEXTS[i % len(TEXTS)], n))
            log(
                f"official {label}: {reqs[-1].wall_s:.2f} s for {reqs[-1].audio_s:.2f} s of audio "
                f"(TTFP {1000 * (reqs[-1].ttfp_s or 0):.0f} ms)"
            )
        check_lengths(report, f"official {label}", reqs, n, model.patch_samples)
        return reqs

    try:
        serial_model_mode = "eager"
        if not args.skip_eager:
            if deadline.allows((1 + args.official_eager_reps) * n * per_patch_guess + 10):
                mem.reset()
                reqs = timed("eager", args.official_eager_reps, warmups=1)
                off["eager"] = {**summarize(reqs, [r.wall_s for r in reqs]), "peak_gib": mem.peak()}
                report.save()
            else:
                report.note("skipped", "official eager: deadline")

        if not args.skip_compile:
            # off CUDA optimize() is a no-op, and the "compile" is one short eager call
            if deadline.allows(args.compile_budget_s if mem.cuda else 30.0):
                mem.reset()
                log("official: optimize() + the package's warm-up (this is the compile)")
                started = time.perf_counter()
                model.model.optimize()
                optimize_s = time.perf_counter() - started
                started = time.perf_counter()
                model.model.generate(target_text=WARMUP_TEXT, max_len=10)
                mem.sync()
                warmup_s = time.perf_counter() - started
                # optimize() swallows its own failures (e.g. not on CUDA) with a warning; the DiT estimator
                # is wrapped last, so an OptimizedModule there means all four parts were compiled
                effective = type(model.model.feat_decoder.estimator).__name__ == "OptimizedModule"
                log(f"official: optimize() {optimize_s:.1f} s + warm-up {warmup_s:.1f} s (compiled: {effective})")
                # one untimed full-length request first: a new prompt length may still recompile
                reqs = timed("compiled", args.official_compiled_reps, warmups=1)
                off["compiled"] = {
                    **summarize(reqs, [r.wall_s for r in reqs]),
                    "optimize_s": rnd(optimize_s, 2),
                    "warmup_s": rnd(warmup_s, 2),
                    "compile_s": rnd(optimize_s + warmup_s, 2),
                    "effective": bool(effective),
                    "peak_gib": mem.peak(),
                }
                serial_model_mode = "compiled" if effective else "eager (optimize() was a no-op here)"
                report.save()
            else:
                report.note("skipped", f"official compile: {deadline.left():.0f} s left < --compile-budget-s")

        if args.serial_requests > 0:
            guess = args.serial_requests * n * (0.03 if "compiled" == serial_model_mode else per_patch_guess)
            if deadline.allows(guess + 5):
                mem.reset()
                reqs = []
                started = time.perf_counter()
                for i in range(args.serial_requests):
                    reqs.append(model.request(TEXTS[i % len(TEXTS)], n))
                wall = time.perf_counter() - started
                check_lengths(report, "official serial", reqs, n, model.patch_samples)
                off["serial"] = {**summarize(reqs, [wall]), "mode": serial_model_mode, "peak_gib": mem.peak()}
                log(f"official serial ({serial_model_mode}): {off['serial']['throughput_audio_s_per_s']} audio s / s")
                report.save()
            else:
                report.note("skipped", "official serial: deadline")
    finally:
        model.close()

    if args.official_lora:
        if deadline.allows(40 + model.load_s):
            run_official_lora(args, ckpt, report, mem)
        else:
            report.note("skipped", "official LoRA hot swap: deadline")


def run_official_lora(args: argparse.Namespace, ckpt, report: Report, mem: GpuMem) -> None:
    """The package's own hot swap: load_lora_weights(dir) into a model built with a matching LoRAConfig."""
    arch = ckpt.architecture
    if arch == "voxcpm2":
        from voxcpm.model.voxcpm2 import LoRAConfig
    else:
        from voxcpm.model.voxcpm import LoRAConfig
    from make_checkpoint import LORA_ALPHA, LORA_RANK

    log("official LoRA: loading a LoRA-enabled model (r 32, alpha 16, LM + DiT)")
    cfg = LoRAConfig(enable_lm=True, enable_dit=True, enable_proj=False, r=LORA_RANK, alpha=LORA_ALPHA)
    model = Official(args, ckpt.model_dir, mem, lora_config=cfg)
    try:
        dirs = ckpt.lora_dirs
        swaps = []
        loaded_counts = set()
        skipped_total = 0
        for i in range(6):  # 1 first call + 5 timed
            mem.sync()
            started = time.perf_counter()
            loaded, skipped = model.model.load_lora_weights(str(dirs[i % len(dirs)]))
            mem.sync()
            swaps.append(time.perf_counter() - started)
            loaded_counts.add(len(loaded))
            skipped_total += len(skipped)
        n_params = sum(1 for name, _ in model.model.named_parameters() if "lora_" in name)
        if skipped_total or loaded_counts != {n_params}:
            report.note(
                "errors", f"official LoRA: loaded {sorted(loaded_counts)} of {n_params}, skipped {skipped_total}"
            )
        reqs = [model.request(TEXTS[i], args.patches) for i in range(2)]  # first one warms up
        check_lengths(report, "official LoRA", reqs[1:], args.patches, model.patch_samples)
        report.data["official"]["lora"] = {
            "load_s": rnd(model.load_s, 2),
            "hot_swap_first_ms": rnd(1000 * swaps[0], 2),
            "hot_swap_ms_p50": rnd(1000 * pct(swaps[1:], 0.5), 2),
            "hot_swap_ms_min": rnd(1000 * min(swaps[1:]), 2),
            "lora_tensors": n_params,
            "eager_rtf_with_lora": rnd(reqs[1].rtf, 4),
        }
        report.save()
    finally:
        model.close()


# --------------------------------------------------------------------------------------------- #
# our batched engine
# --------------------------------------------------------------------------------------------- #


class RoundTimeout(RuntimeError):
    pass


def run_round(
    engine: Any,
    make_request: Callable[[int], Any],  # request index -> ChunkRequest
    concurrency: int,
    first_index: int,
    sample_rate: int,
    timeout_s: float,
    adapter_names: Sequence[str | None],
) -> tuple[list[RequestTiming], float]:
    """Fire `concurrency` requests at once from as many threads; returns their timings and the round wall."""
    start = threading.Event()

    def one(i: int) -> RequestTiming:
        marks: dict[str, Any] = {"first": None, "last": None, "count": 0}

        def on_patch(*_args: Any) -> None:  # engine loop thread: keep it cheap
            now = time.perf_counter()
            if marks["first"] is None:
                marks["first"] = now
            marks["last"] = now
            marks["count"] += 1

        request = make_request(first_index + i)
        start.wait()
        submitted = time.perf_counter()
        name = adapter_names[(first_index + i) % len(adapter_names)]
        try:
            audio = engine.generate(request, on_patch)
        except Exception as exc:  # noqa: BLE001 - recorded, reported, the round goes on
            return RequestTiming(
                wall_s=time.perf_counter() - submitted,
                ttfp_s=None,
                last_patch_s=None,
                patches=marks["count"],
                samples=0,
                audio_s=0.0,
                adapter=name,
                error=f"{type(exc).__name__}: {exc}",
            )
        done = time.perf_counter()
        samples = int(getattr(audio, "shape", (len(audio),))[-1])
        return RequestTiming(
            wall_s=done - submitted,
            ttfp_s=None if marks["first"] is None else marks["first"] - submitted,
            last_patch_s=None if marks["last"] is None else marks["last"] - submitted,
            patches=marks["count"],
            samples=samples,
            audio_s=samples / sample_rate,
            adapter=name,
        )

    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"bench-c{concurrency}")
    futures = [pool.submit(one, i) for i in range(concurrency)]
    started = time.perf_counter()
    start.set()
    _done, pending = wait(futures, timeout=timeout_s, return_when=ALL_COMPLETED)  # one() never raises
    wall = time.perf_counter() - started
    if pending:
        pool.shutdown(wait=False, cancel_futures=True)
        raise RoundTimeout(f"{len(pending)} of {concurrency} requests unfinished after {timeout_s:.0f} s")
    pool.shutdown(wait=True)
    return [f.result() for f in futures], wall


# kernel name fragments -> kind, first match wins (cuBLAS/cuDNN/CUTLASS kernel names on Hopper)
_KERNEL_KINDS = (
    ("lora expand (ours)", ("_lora_expand",)),
    ("AudioVAE residual units (ours)", ("_snake", "_dwconv_snake")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "winograd")),
    ("GEMM", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "splitk", "sm90_", "sm80_")),
    ("inductor fused (triton)", ("triton_",)),
    ("copy / index / cat", ("copy", "index", "cat", "scatter", "gather", "fill")),
    ("reduction", ("reduce",)),
    ("element-wise (aten)", ("elementwise", "vectorized", "unrolled")),
)


def _kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in _KERNEL_KINDS:
        if any(f in lowered for f in fragments):
            return kind
    return "other"


def profile_round(report: Report, key: str, one_round: Callable[[], Any]) -> dict:
    """One more round under torch.profiler (CUDA activity, CUDA-graph kernels included): the GPU time by
    kernel kind, for the report, and the 40 costliest kernels in profile-<stem>-<key>.txt."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _reqs, wall = one_round()
        torch.cuda.synchronize()
    by_kind: dict[str, float] = {}
    kernels: list[tuple[float, int, str]] = []
    for event in prof.key_averages():
        us = float(getattr(event, "self_device_time_total", 0) or 0)
        if us <= 0:
            continue
        kind = _kernel_kind(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + us / 1000
        kernels.append((us / 1000, int(event.count), event.key))
    kernels.sort(reverse=True)
    total = sum(by_kind.values())
    lines = [f"{report.stem} {key}: one round under torch.profiler, wall {1000 * wall:.1f} ms, "
             f"GPU kernel time {total:.1f} ms", "", "ms\tcalls\tkind\tkernel"]
    lines += [f"{ms:.2f}\t{n}\t{_kernel_kind(name)}\t{name[:160]}" for ms, n, name in kernels[:40]]
    path = report.out_dir / f"profile-{report.stem}-{key}.txt"
    _atomic_write(path, "\n".join(lines) + "\n")
    log(f"ours {key}: profile in {path}")
    return {
        "round_wall_ms": rnd(1000 * wall, 1),
        "gpu_kernel_ms": rnd(total, 1),
        "by_kind_ms": {kind: rnd(ms, 1) for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "file": path.name,
    }


def config_order(concurrency: Sequence[int], lora_counts: Sequence[int]) -> list[tuple[int, int]]:
    """Every (concurrency, LoRA count) pair; the ones the target ratios need first, so a deadline cuts the rest."""
    pairs = [(c, k) for c in concurrency for k in lora_counts]
    lo, hi, kmax = min(concurrency), max(concurrency), max(lora_counts)
    first = [p for p in ((lo, 0), (hi, kmax), (hi, 0)) if p in pairs]
    return list(dict.fromkeys(first + pairs))


def adapter_switch_ms(stats: dict) -> float | None:
    """engine.stats()["adapter_switch_ms"] as one number, whatever shape the engine gives it."""
    value = stats.get("adapter_switch_ms")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return rnd(value, 3)
    if isinstance(value, dict):
        for key in ("p50", "median", "mean", "avg", "last", "max"):
            if isinstance(value.get(key), (int, float)):
                return rnd(value[key], 3)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return rnd(statistics.median(value), 3)
    return None


def stats_delta(before: dict, after: dict) -> dict:
    """Counters of engine.stats() that moved during the timed rounds: integers (steps, rows stepped, ...)
    and the milliseconds spent per phase (`*_ms_total`: steps, prefills, AudioVAE decodes, ...)."""
    delta = {
        key: after[key] - before[key]
        for key in after
        if isinstance(after[key], int)
        and not isinstance(after[key], bool)
        and isinstance(before.get(key), int)
        and after[key] != before[key]
    }
    for key in after:
        number = (int, float)
        if key.endswith("_ms_total") and isinstance(after[key], number) and isinstance(before.get(key), number):
            delta[key] = rnd(after[key] - before[key], 1)
    if delta.get("steps") and "rows_stepped" in delta:
        delta["rows_per_step"] = rnd(delta["rows_stepped"] / delta["steps"], 2)  # how full the batches were
    return delta


def run_ours(args: argparse.Namespace, ckpt, report: Report, deadline: Deadline, mem: GpuMem) -> bool:
    """Returns False when a round hung (its threads cannot be stopped; the caller must exit hard)."""
    ours: dict[str, Any] = report.data.setdefault("ours", {})
    ours.setdefault("configs", {})
    if not deadline.allows(60):
        report.note("skipped", f"our engine: {deadline.left():.0f} s left")
        return True
    started = time.perf_counter()
    from voxcpm_api.engine.base import ChunkRequest
    from voxcpm_api.engine.batched.engine import BatchedConfig, BatchedEngine
    from voxcpm_api.lora.catalog import LoRACatalog

    ours["import_s"] = rnd(time.perf_counter() - started, 2)
    use_graphs = mem.cuda and not args.no_cuda_graphs
    extra = dict(args.engine_opt)  # --engine-opt FIELD=JSON: any other BatchedConfig field
    known = {f.name for f in dataclasses.fields(BatchedConfig)}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"--engine-opt: BatchedConfig has no field {', '.join(unknown)}")
    for key, value in extra.items():  # JSON lists -> tuples, as the dataclass declares them
        if isinstance(value, list):
            extra[key] = tuple(value)
    settings = {
        "max_rows": args.max_rows,
        "lora_slots": args.lora_slots,
        "cuda_graphs": use_graphs,
        "compile": bool(getattr(args, "ours_compile", False)),
        **extra,
    }
    cfg = BatchedConfig(
        model=str(ckpt.model_dir), device=args.device, cache_dir=Path(args.engine_cache_dir), **settings
    )
    ours["config"] = jsonable(settings)
    log(
        f"ours: constructing + load() (max_rows {args.max_rows}, lora_slots {args.lora_slots}, "
        f"cuda_graphs {use_graphs})"
    )
    mem.reset()
    started = time.perf_counter()
    engine = BatchedEngine(cfg)
    constructed = time.perf_counter()
    info = engine.load()
    mem.sync()
    ready = time.perf_counter()
    ours["construct_s"] = rnd(constructed - started, 2)
    ours["load_s"] = rnd(ready - constructed, 2)
    ours["construct_to_ready_s"] = rnd(ready - started, 2)
    ours["process_start_to_ready_s"] = rnd(ready - _T0, 2)  # includes this script's own earlier phases
    ours["mem_after_load_gib"] = mem.now()
    ours["load_peak_gib"] = mem.peak()
    sample_rate = int(info.sample_rate_hz)
    patch_samples = round(info.patch_duration_s * info.sample_rate_hz)
    ours["sample_rate_hz"] = sample_rate
    ours["patch_samples"] = patch_samples
    ours["all_captured_s"] = rnd(wait_all_captured(engine), 2)  # so no deferred capture runs in a timed round
    log(f"ours: ready in {ready - started:.1f} s (load() {ready - constructed:.1f} s); every graph captured "
        f"{ours['all_captured_s']} s after load() began")
    report.save()

    healthy = True
    try:
        specs = []
        if max(args.lora_counts) > 0:
            catalog = LoRACatalog(ckpt.lora_root)
            reg: list[float] = []
            reg_wall: list[float] = []
            for name in ckpt.lora_names[: max(args.lora_counts)]:
                spec = catalog.resolve(name)
                started = time.perf_counter()
                secs = engine.register_adapter(spec)
                reg_wall.append(time.perf_counter() - started)
                reg.append(float(secs) if isinstance(secs, (int, float)) else reg_wall[-1])
                specs.append(spec)
            ours["register_adapter_ms"] = [rnd(1000 * s, 1) for s in reg]
            ours["register_adapter_ms_p50"] = rnd(1000 * pct(reg, 0.5), 1)
            ours["register_adapter_wall_ms_p50"] = rnd(1000 * pct(reg_wall, 0.5), 1)
            log(f"ours: registered {len(specs)} adapters, p50 {ours['register_adapter_ms_p50']} ms")
            # the first adapter wrapped layers: the engine recaptures every graph (and compiles the LoRA
            # variants) while idle; wait, so that no capture runs between the timed requests
            started = time.perf_counter()
            wait_all_captured(engine)
            ours["adapter_recapture_wait_s"] = rnd(time.perf_counter() - started, 2)
            log(f"ours: graphs recaptured with the adapters' layers in {ours['adapter_recapture_wait_s']} s")
            report.save()

        round_cost: float | None = None  # seconds per full-length round in the last configuration
        last_c = 1
        warm_share = args.warmup_patches / max(1, args.patches)  # a warm-up round, in full rounds
        for config_index, (c, k) in enumerate(config_order(args.concurrency, args.lora_counts), start=1):
            key = f"c{c}-lora{k}"
            reps = max(args.timed_rounds, args.single_reps) if c == 1 else args.timed_rounds
            # batching makes a step with more rows cost more, but far less than proportionally
            need = 20.0
            if round_cost is not None:
                need = 1.3 * round_cost * (reps + warm_share) * max(1.0, c / last_c) ** 0.5
            if not deadline.allows(need):
                report.note("skipped", f"ours {key}: {deadline.left():.0f} s left, needs ~{need:.0f} s")
                continue
            adapters = [None] if k == 0 else specs[:k]
            names = [None] if k == 0 else [spec.name for spec in adapters]

            def make_request(index: int, n: int, adapters=adapters, base=config_index) -> Any:
                return ChunkRequest(
                    text=TEXTS[index % len(TEXTS)],
                    adapter=adapters[index % len(adapters)],
                    cfg_scale=args.cfg,
                    steps=args.steps,
                    seed=base * 100_000 + index,
                    max_patches=n,
                )

            cost_started = time.perf_counter()
            timeout = max(10.0, deadline.left() - 5)
            log(f"ours {key}: warm-up round ({args.warmup_patches} patches)")
            start_mem = mem.reset()
            warm, _ = run_round(
                engine, lambda i: make_request(i, args.warmup_patches), c, 0, sample_rate, timeout, names
            )
            check_lengths(report, f"ours {key} warm-up", warm, args.warmup_patches, patch_samples)
            stats_before = jsonable(engine.stats() or {})
            reqs: list[RequestTiming] = []
            walls: list[float] = []
            for rep in range(reps):
                got, wall = run_round(
                    engine,
                    lambda i: make_request(i, args.patches),
                    c,
                    rep * c,
                    sample_rate,
                    max(10.0, deadline.left() - 5),
                    names,
                )
                reqs += got
                walls.append(wall)
            check_lengths(report, f"ours {key}", reqs, args.patches, patch_samples)
            stats = jsonable(engine.stats() or {})
            entry = {
                "concurrency": c,
                "loras": k,
                **summarize(reqs, walls),
                "mem_start_gib": start_mem,
                "peak_gib": mem.peak(),
                "adapter_switch_ms": adapter_switch_ms(stats),  # the engine's figure so far (may be cumulative)
                "stats_delta": stats_delta(stats_before, stats),
                "stats": stats,
            }
            ours["configs"][key] = entry
            round_cost = (time.perf_counter() - cost_started) / (reps + warm_share)
            if key in args.profile and not mem.cuda:
                report.note("skipped", f"--profile {key}: GPU kernel times need CUDA")
            elif key in args.profile and deadline.allows(1.5 * round_cost):
                entry["profile"] = profile_round(
                    report, key, lambda: run_round(engine, lambda i: make_request(i, args.patches), c, reps * c,
                                                   sample_rate, max(10.0, deadline.left() - 5), names)
                )
            last_c = c
            log(
                f"ours {key}: TTFP p50 {entry['ttfp_ms_p50']} ms, RTF p50 {entry['rtf_p50']}, "
                f"{entry['throughput_audio_s_per_s']} audio s/s, peak {entry['peak_gib']} GiB"
            )
            report.save()
        final_stats = jsonable(engine.stats() or {})
        ours["stats_final"] = final_stats
        ours["adapter_switch_ms"] = adapter_switch_ms(final_stats)
    except RoundTimeout as exc:
        report.note("errors", f"ours: {exc}; stopping our engine's part")
        healthy = False
    except Exception as exc:  # noqa: BLE001 - keep what was measured
        report.note("errors", f"ours: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        report.save()
        if healthy:
            try:
                engine.close()
            except Exception as exc:  # noqa: BLE001
                report.note("errors", f"ours: close() raised {exc!r}")
            del engine
            free_gpu()
            ours["mem_after_close_gib"] = mem.now()
            report.save()
            if healthy and deadline.left() > 90:
                ours["restart"] = restart_ready(cfg)
                report.save()
    return healthy


def restart_ready(cfg: Any) -> dict:
    """Start to ready of a new process running the same engine configuration, after this one's engine
    filled the on-disk kernel caches (inductor, Triton): what a server restart pays. Measured from the
    child's first line (its imports included)."""
    import subprocess

    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--restart-child",
                            json.dumps(jsonable(fields))], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if child.returncode != 0:
        return {"error": child.stderr[-800:]}
    result = json.loads(child.stdout.strip().splitlines()[-1])
    log(f"ours: a restarted process is ready in {result.get('process_start_to_ready_s')} s {result}")
    return result


def wait_all_captured(engine: Any, timeout_s: float = 180.0) -> float | None:
    """Wait for the graphs the engine captures while idle after ready; seconds from the start of load()."""
    limit = time.perf_counter() + timeout_s
    while time.perf_counter() < limit:
        stats = engine.stats()
        if not stats.get("captures_deferred"):
            return stats.get("all_captured_s")
        time.sleep(0.05)
    return None


def _restart_child(fields_json: str) -> int:
    """The child of restart_ready: build the engine, load it, print the timings as one JSON line."""
    from voxcpm_api.engine.batched.engine import BatchedConfig, BatchedEngine

    declared = {f.name: f for f in dataclasses.fields(BatchedConfig)}
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in json.loads(fields_json).items() if k in declared}
    fields["cache_dir"] = Path(fields["cache_dir"])
    started = time.perf_counter()
    engine = BatchedEngine(BatchedConfig(**fields))
    engine.load()
    ready = time.perf_counter()
    all_captured_s = wait_all_captured(engine)
    phases = {k: v for k, v in engine.stats().items() if k.startswith("ready_") and k != "ready_s"}
    engine.close()
    print(json.dumps({"process_start_to_ready_s": rnd(ready - _T0, 2), "construct_to_ready_s": rnd(ready - started, 2),
                      "all_captured_s": rnd(all_captured_s, 2), **phases}))
    return 0


# --------------------------------------------------------------------------------------------- #
# ratios and the report
# --------------------------------------------------------------------------------------------- #


def _pick_config(configs: dict, loras: int, want_c: int = 64) -> dict | None:
    """The configuration at `want_c` concurrency with `loras` adapters, else the highest measured one."""
    found = [v for v in configs.values() if v.get("loras") == loras]
    if not found:
        return None
    exact = [v for v in found if v.get("concurrency") == want_c]
    return exact[0] if exact else max(found, key=lambda v: v.get("concurrency", 0))


def compute_ratios(data: dict) -> dict:
    off = data.get("official") or {}
    ours = data.get("ours") or {}
    configs = ours.get("configs") or {}
    out: dict[str, dict] = {}

    def put(key: str, value: float | None, basis: str) -> None:
        what, op, goal = TARGETS[key]
        met = None if value is None else (value <= goal if op == "<=" else value >= goal)
        out[key] = {"what": what, "value": rnd(value, 4), "goal": f"{op} {goal:g}", "met": met, "basis": basis}

    # (a) single stream
    single = next((v for v in configs.values() if v.get("concurrency") == 1 and v.get("loras") == 0), None)
    ref, ref_label = off.get("compiled"), "official compiled"
    if ref and not ref.get("effective"):
        ref_label = "official 'compiled' run where optimize() was a no-op (= EAGER)"
    if ref is None and off.get("eager"):
        ref, ref_label = off["eager"], "official EAGER (no compiled run)"
    if single and ref and single.get("rtf_p50") and ref.get("rtf_p50"):
        put(
            "a",
            single["rtf_p50"] / ref["rtf_p50"],
            f"ours c1 RTF p50 {single['rtf_p50']} / {ref_label} RTF p50 {ref['rtf_p50']}",
        )
    else:
        put("a", None, "needs ours c1-lora0 and an official RTF")

    # (b) aggregate throughput
    mix = _pick_config(configs, 8)
    serial = off.get("serial")
    if mix and serial and mix.get("throughput_audio_s_per_s") and serial.get("throughput_audio_s_per_s"):
        put(
            "b",
            mix["throughput_audio_s_per_s"] / serial["throughput_audio_s_per_s"],
            f"ours c{mix['concurrency']} 8 LoRAs {mix['throughput_audio_s_per_s']} / official serial "
            f"({serial.get('mode')}) {serial['throughput_audio_s_per_s']} audio s per s",
        )
    else:
        put("b", None, "needs ours with 8 LoRAs and the official serial run")

    # (c) LoRA mix slowdown at the same concurrency
    if mix:
        base = next(
            (v for v in configs.values() if v.get("loras") == 0 and v.get("concurrency") == mix["concurrency"]), None
        )
        if base and base.get("throughput_audio_s_per_s") and mix.get("throughput_audio_s_per_s"):
            put(
                "c",
                base["throughput_audio_s_per_s"] / mix["throughput_audio_s_per_s"] - 1.0,
                f"c{mix['concurrency']}: no LoRA {base['throughput_audio_s_per_s']} vs 8 LoRAs "
                f"{mix['throughput_audio_s_per_s']} audio s per s",
            )
        else:
            put("c", None, f"needs ours c{mix['concurrency']}-lora0")
    else:
        put("c", None, "needs ours with 8 LoRAs")

    # (d) adapter switch
    switch = ours.get("adapter_switch_ms")
    if switch is None:
        switches = [v.get("adapter_switch_ms") for v in configs.values() if v.get("adapter_switch_ms") is not None]
        switch = max(switches) if switches else None
    put(
        "d",
        switch,
        "engine.stats()['adapter_switch_ms'] at the end of the run"
        if switch is not None
        else "engine.stats() has no adapter_switch_ms",
    )

    # (e) start to ready
    ready = ours.get("construct_to_ready_s")
    put(
        "e",
        ready,
        f"BatchedEngine(cfg) + load(); module import adds {ours.get('import_s')} s"
        if ready is not None
        else "needs our engine's load",
    )
    return out


def _fmt(value: Any, unit: str = "", digits: int | None = None) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and digits is not None:
        value = round(value, digits)
    return f"{value}{unit}"


def render_markdown(data: dict) -> str:
    lines: list[str] = []
    settings = data.get("settings", {})
    env = data.get("env", {})
    versions = env.get("versions", {})
    lines.append(f"# Engine benchmark: {data.get('model_label')} on {data.get('device_name') or data.get('device')}")
    lines.append("")
    lines.append(f"- command: `{data.get('command')}`")
    lines.append(
        f"- date: {data.get('date')}; elapsed {data.get('elapsed_s')} s; complete: {_fmt(data.get('complete'))}"
    )
    lines.append(
        f"- versions: python {versions.get('python')}, torch {versions.get('torch')} (CUDA {versions.get('cuda')}), "
        f"voxcpm {versions.get('voxcpm')}, transformers {versions.get('transformers')}; host CPU "
        f"{env.get('host_cpu')} x{env.get('host_cpus')}"
    )
    patch_s = settings.get("patch_duration_s")
    audio = f" = {settings['patches'] * patch_s:.2f} s of audio" if patch_s else ""
    lines.append(
        f"- each request: {settings.get('patches')} patches{audio}; {settings.get('steps')} diffusion steps, "
        f"cfg {settings.get('cfg')}; random weights, stop head zeroed (exact length)"
    )
    if data.get("merged_from"):
        lines.append(f"- merged from: {', '.join(data['merged_from'])}")
        lines.extend(f"  - source command: `{c}`" for c in data.get("source_commands", []))
    lines.append("")

    lines.append("## Targets (issue): ours vs the official package")
    lines.append("")
    lines.append("| | target | value | goal | met | basis |")
    lines.append("|---|---|---|---|---|---|")
    for key, r in (data.get("ratios") or {}).items():
        lines.append(f"| ({key}) | {r['what']} | {_fmt(r['value'])} | {r['goal']} | {_fmt(r['met'])} | {r['basis']} |")
    lines.append("")

    off = data.get("official")
    if off:
        lines.append("## Official voxcpm package (batch 1)")
        lines.append("")
        lines.append("| measure | value |")
        lines.append("|---|---|")
        lines.append(f"| load: from_local(optimize=False) | {_fmt(off.get('load_s'), ' s')} |")
        lines.append(f"| GPU memory after load (allocated) | {_fmt(off.get('mem_after_load_gib'), ' GiB')} |")
        for mode in ("eager", "compiled"):
            m = off.get(mode)
            if not m:
                lines.append(f"| {mode} | not run |")
                continue
            lines.append(
                f"| {mode}: RTF p50 / p90 ({m['requests']} requests) | {_fmt(m['rtf_p50'])} / {_fmt(m['rtf_p90'])} |"
            )
            lines.append(
                f"| {mode}: TTFP p50 / p90 | {_fmt(m['ttfp_ms_p50'], ' ms')} / {_fmt(m['ttfp_ms_p90'], ' ms')} |"
            )
            lines.append(f"| {mode}: ms per patch p50 | {_fmt(m['step_ms_p50'], ' ms')} |")
            lines.append(f"| {mode}: peak GPU memory allocated | {_fmt(m.get('peak_gib'), ' GiB')} |")
        comp = off.get("compiled")
        if comp:
            lines.append(
                f"| compile: optimize() + package warm-up | {comp['optimize_s']} + {comp['warmup_s']} = "
                f"{comp['compile_s']} s (effective: {_fmt(comp.get('effective'))}) |"
            )
        ser = off.get("serial")
        if ser:
            lines.append(
                f"| serial: {ser['requests']} requests back to back ({ser['mode']}) | "
                f"{_fmt(ser['throughput_audio_s_per_s'])} audio s per wall s |"
            )
        lora = off.get("lora")
        if lora:
            lines.append(
                f"| LoRA hot swap load_lora_weights p50 (first call) | {lora['hot_swap_ms_p50']} ms "
                f"({lora['hot_swap_first_ms']} ms), {lora['lora_tensors']} tensors |"
            )
            lines.append(f"| eager RTF with a LoRA applied | {_fmt(lora.get('eager_rtf_with_lora'))} |")
        lines.append("")

    ours = data.get("ours")
    if ours:
        lines.append("## Our batched engine")
        lines.append("")
        cfg = ours.get("config", {})
        lines.append(f"- BatchedConfig: {', '.join(f'{k} {v}' for k, v in cfg.items())}")
        lines.append(
            f"- start to ready: construct {_fmt(ours.get('construct_s'), ' s')} + load() "
            f"{_fmt(ours.get('load_s'), ' s')} = {_fmt(ours.get('construct_to_ready_s'), ' s')} "
            f"(module import {_fmt(ours.get('import_s'), ' s')}); GPU memory after load "
            f"{_fmt(ours.get('mem_after_load_gib'), ' GiB')}, load peak {_fmt(ours.get('load_peak_gib'), ' GiB')}"
        )
        phases = _ready_phases(ours.get("stats_final") or {})
        if phases:
            lines.append(f"- load() by phase: {phases}")
        if ours.get("all_captured_s") is not None:
            lines.append(f"- every decode graph and the common prefill graphs captured (all but the first while idle "
                         f"after ready): {_fmt(ours['all_captured_s'], ' s')} after load() began")
        restart = ours.get("restart") or {}
        if restart.get("construct_to_ready_s") is not None:
            lines.append(
                f"- restart (a new process, kernels from the on-disk caches this run filled): ready "
                f"{_fmt(restart['construct_to_ready_s'], ' s')} after construction, "
                f"{_fmt(restart.get('process_start_to_ready_s'), ' s')} from process start, every graph "
                f"{_fmt(restart.get('all_captured_s'), ' s')}; {_ready_phases(restart)}"
            )
        if ours.get("register_adapter_ms"):
            lines.append(
                f"- register_adapter: p50 {ours.get('register_adapter_ms_p50')} ms "
                f"(each: {', '.join(str(x) for x in ours['register_adapter_ms'])} ms)"
            )
        if ours.get("adapter_recapture_wait_s") is not None:
            lines.append(f"- graphs recaptured (and LoRA variants compiled) while idle after the first adapter "
                         f"wrapped layers: {_fmt(ours['adapter_recapture_wait_s'], ' s')}")
        lines.append(f"- adapter switch (engine.stats): {_fmt(ours.get('adapter_switch_ms'), ' ms')}")
        if "mem_after_close_gib" in ours:
            lines.append(f"- GPU memory still allocated after close(): {_fmt(ours.get('mem_after_close_gib'), ' GiB')}")
        lines.append("")
        lines.append(
            "| concurrency | LoRAs | requests | TTFP p50 | TTFP p90 | RTF p50 | RTF p90 | ms/patch p50 | "
            "audio s per s | rows/step | peak GiB | switch ms | errors |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for v in sorted((ours.get("configs") or {}).values(), key=lambda v: (v["concurrency"], v["loras"])):
            lines.append(
                f"| {v['concurrency']} | {v['loras']} | {v['requests']} | {_fmt(v['ttfp_ms_p50'], ' ms')} | "
                f"{_fmt(v['ttfp_ms_p90'], ' ms')} | {_fmt(v['rtf_p50'])} | {_fmt(v['rtf_p90'])} | "
                f"{_fmt(v['step_ms_p50'])} | {_fmt(v['throughput_audio_s_per_s'])} | "
                f"{_fmt((v.get('stats_delta') or {}).get('rows_per_step'))} | {_fmt(v.get('peak_gib'))} | "
                f"{_fmt(v.get('adapter_switch_ms'))} | {v['errors']} |"
            )
        lines.append("")
        lines.extend(_phase_table(ours.get("configs") or {}))
        lines.extend(_profile_table(ours.get("configs") or {}))

    for section in ("skipped", "errors"):
        if data.get(section):
            lines.append(f"## {section.capitalize()}")
            lines.append("")
            lines.extend(f"- {m}" for m in data[section])
            lines.append("")
    return "\n".join(lines)


def _ready_phases(stats: dict) -> str:
    """engine.stats()' `ready_<phase>_s` as "phase 1.2 s, ..." (empty when the engine has none)."""
    return ", ".join(f"{key[6:-2]} {value} s" for key, value in stats.items()
                     if key.startswith("ready_") and key.endswith("_s") and key != "ready_s")


def _profile_table(configs: dict) -> list[str]:
    """GPU kernel time by kind of the profiled rounds (--profile)."""
    profiled = {key: v["profile"] for key, v in configs.items() if v.get("profile")}
    if not profiled:
        return []
    kinds: list[str] = []
    for prof in profiled.values():
        kinds += [k for k in prof["by_kind_ms"] if k not in kinds]
    lines = [
        "GPU kernel time of one extra round under torch.profiler (ms; the profiler slows the host side, so the "
        "round's wall is longer than in the table above; top kernels in the profile-*.txt files):",
        "",
        "| kernel kind | " + " | ".join(profiled) + " |",
        "|---|" + "---|" * len(profiled),
        "| round wall | " + " | ".join(_fmt(p["round_wall_ms"]) for p in profiled.values()) + " |",
        "| all kernels | " + " | ".join(_fmt(p["gpu_kernel_ms"]) for p in profiled.values()) + " |",
    ]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(_fmt(p["by_kind_ms"].get(kind)) for p in profiled.values()) + " |")
    lines.append("")
    return lines


def _phase_table(configs: dict) -> list[str]:
    """Where the timed rounds' wall time went, from the engine's per-phase totals (loop thread: steps,
    prefills, request preparation; decode thread: AudioVAE decodes, which overlap the loop)."""
    rows = []
    for v in sorted(configs.values(), key=lambda v: (v["concurrency"], v["loras"])):
        delta = v.get("stats_delta") or {}
        wall_ms = 1000 * sum(v.get("round_wall_s") or [])
        if not wall_ms or "step_ms_total" not in delta:
            continue
        cells = [f"{_fmt(delta.get(f'{phase}_ms_total'))} ({100 * delta.get(f'{phase}_ms_total', 0) / wall_ms:.0f} %)"
                 for phase in ("step", "prefill", "prepare", "vae_decode")]
        head = f"| {v['concurrency']} | {v['loras']} | {wall_ms:.0f} | {delta.get('steps', 0)} | "
        rows.append(head + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["Where the timed rounds' wall time went (ms, share of the rounds' wall time; AudioVAE decodes run "
            "on their own thread and can overlap steps):", "",
            "| concurrency | LoRAs | rounds' wall | steps | in steps | in prefills | preparing requests | "
            "AudioVAE decodes |", "|---|---|---|---|---|---|---|---|", *rows, ""]


# --------------------------------------------------------------------------------------------- #
# command line
# --------------------------------------------------------------------------------------------- #


def _int_list(text: str) -> list[int]:
    values = [int(x) for x in text.replace(" ", "").split(",") if x]
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}")
    return values


def _engine_opt(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=JSON, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # a bare word: keep it as a string
    return key.strip(), value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", choices=("voxcpm1.5", "voxcpm2"), default="voxcpm2")
    p.add_argument("--tiny", action="store_true", help="tiny dimensions (smoke test on a CPU)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument(
        "--ckpt-root",
        type=Path,
        default=Path("/tmp/voxcpm-bench-ckpt"),
        help="where the random checkpoint is built (reused when complete)",
    )
    p.add_argument("--engine-cache-dir", type=Path, default=Path("/tmp/voxcpm-bench-cache"))
    p.add_argument(
        "--deadline-s", type=float, default=540.0, help="stop starting new steps after this (from process start)"
    )
    p.add_argument(
        "--order",
        choices=("ours-first", "official-first"),
        default="ours-first",
        help="ours-first: our start-to-ready is measured in a fresh process, and a deadline cuts the official part",
    )
    p.add_argument("--patches", type=int, default=31, help="patches per timed request (31 = 4.96 s)")
    p.add_argument("--steps", type=int, default=10, help="diffusion steps (inference_timesteps)")
    p.add_argument("--cfg", type=float, default=2.0, help="cfg_value / cfg_scale")
    # official
    p.add_argument("--skip-official", action="store_true")
    p.add_argument("--skip-eager", action="store_true", help="official: no eager runs")
    p.add_argument("--skip-compile", action="store_true", help="official: no optimize() + warm-up (saves ~2 min)")
    p.add_argument("--official-eager-reps", type=int, default=2)
    p.add_argument("--official-compiled-reps", type=int, default=3)
    p.add_argument("--serial-requests", type=int, default=8, help="official back-to-back requests (0: none)")
    p.add_argument("--compile-budget-s", type=float, default=170.0, help="time that must be left to start the compile")
    p.add_argument("--official-lora", action="store_true", help="also time the package's load_lora_weights hot swap")
    # ours
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--concurrency", "--only-concurrency", dest="concurrency", type=_int_list, default=[1, 8, 32, 64])
    p.add_argument("--lora-counts", "--only-loras", dest="lora_counts", type=_int_list, default=[0, 1, 8])
    p.add_argument("--max-rows", type=int, default=64)
    p.add_argument("--lora-slots", type=int, default=8)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument(
        "--engine-opt",
        type=_engine_opt,
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="any other BatchedConfig field, value as JSON (repeatable), e.g. max_seq_len=1024",
    )
    p.add_argument(
        "--ours-compile", action="store_true",
        help="our engine with --compile (regional inductor; BatchedConfig.compile)",
    )
    p.add_argument(
        "--profile",
        type=lambda text: [k for k in text.split(",") if k],
        default=[],
        metavar="KEYS",
        help="after these configurations' timed rounds (e.g. c64-lora8,c64-lora0), one more round under "
        "torch.profiler: GPU kernel time by kind in the report, the top kernels in profile-*.txt",
    )
    p.add_argument("--warmup-patches", type=int, default=8, help="patches per request of the warm-up round")
    p.add_argument("--timed-rounds", type=int, default=1)
    p.add_argument("--single-reps", type=int, default=3, help="timed requests (one after the other) at concurrency 1")
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="no run: combine results files of split runs (later files win per section) into one report",
    )
    args = p.parse_args(argv)
    if max(args.lora_counts) > 8:
        p.error("--lora-counts: at most 8 adapters are built")
    if max(args.concurrency) > args.max_rows:
        p.error("--concurrency above --max-rows")
    return args


def merge(paths: list[Path], out_dir: Path) -> Report:
    merged: dict[str, Any] = {}
    commands: list[str] = []
    elapsed: list[float | None] = []
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("schema") != SCHEMA:
            raise SystemExit(f"{path}: not a {SCHEMA} file")
        commands.append(str(data.get("command")))
        elapsed.append(data.get("elapsed_s"))
        for key, value in data.items():
            if key == "official" and value:
                merged.setdefault("official", {}).update(value)
            elif key == "ours" and value:
                ours = merged.setdefault("ours", {})
                configs = {**ours.get("configs", {}), **value.get("configs", {})}
                ours.update(value)
                ours["configs"] = configs
            elif key in ("skipped", "errors"):
                merged.setdefault(key, []).extend(f"[{path.name}] {m}" for m in value)
            elif key not in ("official", "ours"):
                merged[key] = value
    merged["merged_from"] = [str(p) for p in paths]
    merged["elapsed_s"] = rnd(sum(float(e) for e in elapsed if e is not None), 1)  # all source runs together
    merged["source_commands"] = commands
    merged["command"] = shlex.join([sys.executable, *sys.argv])
    return Report(merged, out_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        report = merge(args.merge, args.out_dir)
        path = report.save()
        print(path.read_text(encoding="utf-8"))
        return 0

    import torch

    deadline = Deadline(args.deadline_s)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --device cpu (with --tiny)")
    mem = GpuMem(args.device)
    env = environment(args.device)
    model_label = f"{args.model}-tiny" if args.tiny else args.model
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "command": shlex.join([sys.executable, *sys.argv]),
        "argv": sys.argv,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": args.model,
        "model_label": model_label,
        "tiny": args.tiny,
        "device": args.device,
        "device_name": env["device_name"],
        "env": env,
        "settings": {
            "patches": args.patches,
            "steps": args.steps,
            "cfg": args.cfg,
            "warmup_patches": args.warmup_patches,
            "order": args.order,
            "texts": list(TEXTS),
        },
        "complete": False,
    }
    report = Report(data, args.out_dir)
    log(f"{model_label} on {env['device_name']} (torch {env['versions']['torch']}, voxcpm {env['versions']['voxcpm']})")

    from make_checkpoint import build_checkpoint

    started = time.perf_counter()
    ckpt = build_checkpoint(args.model, args.ckpt_root, tiny=args.tiny, device=args.device, log=log)
    data["checkpoint"] = {**ckpt.manifest, "dir": str(ckpt.root), "ready_s": rnd(time.perf_counter() - started, 1)}
    # the patch length both sides must produce: patch_size x samples per latent frame at the output rate
    config = json.loads((ckpt.model_dir / "config.json").read_text(encoding="utf-8"))
    vae = config.get("audio_vae_config", {})
    out_rate = vae.get("out_sample_rate", vae.get("sample_rate", 16000))
    data["settings"]["patch_duration_s"] = rnd(
        config["patch_size"] * math.prod(vae.get("decoder_rates", [1])) / out_rate, 4
    )
    report.save()

    healthy = True
    phases: list[tuple[str, Callable[[], Any]]] = []
    if not args.skip_ours:
        phases.append(("ours", lambda: run_ours(args, ckpt, report, deadline, mem)))
    if not args.skip_official:
        phases.append(("official", lambda: run_official(args, ckpt, report, deadline, mem)))
    if args.order == "official-first":
        phases.reverse()
    for name, phase in phases:
        try:
            result = phase()
            if result is False:
                healthy = False
                break  # a hung round: threads we cannot stop are still holding the GPU
        except Exception as exc:  # noqa: BLE001 - record, go on with the other phase
            report.note("errors", f"{name}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            free_gpu()
    data["complete"] = healthy and not data.get("skipped")
    md_path = report.save()
    log(f"results: {md_path.with_suffix('.json')} and {md_path}")
    print(md_path.read_text(encoding="utf-8"), flush=True)
    code = 1 if data.get("errors") else 0
    if not healthy:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)  # stuck worker threads would block the interpreter's exit forever
    return code


if __name__ == "__main__":
    if sys.argv[1:2] == ["--restart-child"]:
        raise SystemExit(_restart_child(sys.argv[2]))
    raise SystemExit(main())
