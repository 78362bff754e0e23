"""`BatchedEngine`: many requests, many LoRAs, one decode step at a time (ADR 0006).

Threads:
* callers (the task runner's pool, one thread per row) call `generate`/`generate_stream`; each
  call encodes its reference audio, if any, into the prompt cache (so the batch never waits for an
  encode), then becomes a job and waits for its row;
* one loop thread owns the model: it prepares jobs (the official prompt construction, cached prompt
  features, adapter validation), admits them through the `Scheduler`, prefills them into row
  slots, runs decode steps through `BatchedModel`, calls the rows' callbacks and ends rows;
* one decode thread turns the rows that finished in a step into audio with the AudioVAE.

Sample-exactness with the official package: each job's model inputs are built by the official
`generate_with_prompt_cache` itself (its `_inference` is intercepted, so tokenisation, prompt
layout, masks and max_len are the official ones); prefill runs the official modules; each row
draws its CFM noise from its own `torch.Generator` seeded with the request's seed, which yields
the very numbers `torch.manual_seed(seed)` + the official `torch.randn` calls would (CPU), so a
row's audio never depends on its batch-mates.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import errors
from ...domain import EngineInfo
from ...lora.catalog import AdapterSpec, adapter_key_str
from ..base import AudioCallback, ChunkRequest, EngineLoad, PatchCallback
from ..lora_runtime import LoadedAdapter, load_adapter
from ..voxcpm_engine import EngineConfig, VoxCPMEngine, _normalize_text, _official_args, _short
from .model_runner import BatchedModel, PhaseClock, Prefilled, RowInputs
from .scheduler import RowRequest, Scheduler, TooLong, batch_bucket, batch_buckets_up_to, rows_for_memory

log = logging.getLogger("voxcpm_api.engine.batched")
IDLE_WAIT_S = 0.05
CPU_DEFAULT_ROWS = 16  # BatchedConfig.max_rows None on a CPU
# timed phases in stats(): a decode step; filling an adapter slot; building a request's official inputs
# (callers' threads); one batched prefill; one batched AudioVAE decode (decode thread); the rows' callbacks
# after a step; the loop thread waiting for work
_PHASES = ("step", "adapter_switch", "prepare", "prefill", "vae_decode", "callbacks", "idle")
PREFILL_TOKENS = 8192  # padded prompt positions per batched prefill
ENCODES_AT_ONCE = 2  # reference audios encoded concurrently by callers (each holds its audio on the device)
DECODE_AUDIO_S_PER_CALL = 120.0  # padded audio seconds per batched AudioVAE decode (bounds its memory)
# prefill graphs captured while idle after ready (prompts x positions buckets); others on first use
DEFERRED_PREFILL_PROMPTS = (1, 2, 4, 8, 16)  # 16: the service's default rows per device
DEFERRED_PREFILL_LENGTHS = (32, 64, 128)
GIL_SWITCH_INTERVAL_S = 0.0005  # on a GPU: how long another thread may keep the loop thread waiting for the GIL
# A deferred graph capture (~0.3 s on an H100, not interruptible) starts only after this long without a decode
# step: between the back-to-back requests of a busy client it delayed nearly every one by up to a capture
CAPTURE_QUIET_S = 1.0
NOISE_BLOCK_PATCHES = 16  # CFM noise drawn ahead per row and torch call (see _draw_noise)


@dataclass(frozen=True)
class BatchedConfig:
    model: str
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # rows one decode step holds (static KV slots); None: sized at load from the GPU's free memory
    # (scheduler.rows_for_memory), 16 on a CPU
    max_rows: int | None = None
    max_seq_len: int = 5120  # KV positions per row: prompt + generated patches
    lora_slots: int = 8  # GPU-resident adapter slots
    lora_cache_size: int = 16  # validated adapters kept in host memory
    cuda_graphs: bool = True
    compile: bool = False  # torch.compile the step's element-wise work (CUDA; slower first start, faster steps)
    cache_dir: Path = field(default_factory=lambda: EngineConfig(model="").cache_dir)
    feature_cache_dir: Path | None = None
    prompt_cache_size: int = 32
    capture_attention_lens: tuple[int, ...] = (256, 512)  # graphs captured: the first before ready, then idle
    capture_solver_steps: int = 10
    # the DiT's LoRA term per request segment (lora_kernels.lora_linear_segments) instead of every slot's for
    # every row: off until a GPU measures it (bench: --engine-opt lora_segments=true; ADR 0008)
    lora_segments: bool = False
    # adapters put into GPU slots at load (GPU with graphs only; see _preload_adapters): the service passes the
    # first lora_slots adapters of --lora-dir
    preload_adapters: tuple[AdapterSpec, ...] = ()


class _Intercepted(Exception):
    """Raised from the official `_inference` stand-in: carries the arguments it was called with."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("intercepted")
        self.call_args = args
        self.call_kwargs = kwargs


@dataclass
class _Job:
    request: ChunkRequest
    on_patch: PatchCallback | None = None
    on_audio: AudioCallback | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    latents: torch.Tensor | None = None  # (n, P, D) context + generated patches, when generated
    samples: np.ndarray | None = None  # the decoded audio, when done
    drop_patches: int = 0
    patches: int = 0
    # set once admitted
    request_id: int = 0
    inputs: RowInputs | None = None
    adapter_key: str | None = None
    adapter: LoadedAdapter | None = None
    generator: torch.Generator | None = None
    next_noise: np.ndarray | None = None  # (feat_dim, patch): drawn while the previous step ran
    noise_block: np.ndarray | None = None  # (k, feat_dim, patch): patches drawn ahead by one torch call
    noise_used: int = 0  # patches of noise_block handed out
    prefilled: Prefilled | None = None
    max_len: int = 0
    stream_state: Any = None


class BatchedEngine:
    def __init__(self, config: BatchedConfig) -> None:
        self.config = config
        self._inner = VoxCPMEngine(EngineConfig(
            model=config.model, device=config.device, compile=False, cache_dir=config.cache_dir,
            lora_cache_size=1, prompt_cache_size=config.prompt_cache_size,
            feature_cache_dir=config.feature_cache_dir))
        self._info: EngineInfo | None = None
        self._model: BatchedModel | None = None
        self._rows = config.max_rows or CPU_DEFAULT_ROWS  # decided in load() when config.max_rows is None
        self._sched = Scheduler(self._rows, config.max_seq_len, config.lora_slots)
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._decoder: threading.Thread | None = None
        # the rows that finished in one step, and (GPU) an event after their latents were copied
        self._decode_q: queue.Queue[tuple[list[_Job], Any]] = queue.Queue()
        self._jobs: dict[int, _Job] = {}
        self._adapters: OrderedDict[str, LoadedAdapter] = OrderedDict()  # host copies, LRU
        self._unregistered: set[str] = set()  # refused until registered again
        self._key_names: dict[str, str] = {}  # adapter key -> name, for per-adapter counters
        self.lora_runtime = AdapterCounters()  # loads into GPU slots / evictions from them, by adapter name
        self._shapes: dict[str, tuple[int, int]] = {}
        self._token_lock = threading.Lock()
        self._encode_slots = threading.BoundedSemaphore(ENCODES_AT_ONCE)
        self._stats_lock = threading.Lock()
        self._summary = EngineLoad(0, 0, self._rows, frozenset())
        self._stream_vae: Any = None
        self._caller_stream: Any = None  # torch.cuda.Stream on a GPU (_callers_stream), set by load()
        self._pinned: torch.Tensor | None = None  # decode thread: host staging for decoded audio
        self.stats_counters: dict[str, float] = {"steps": 0, "rows_stepped": 0, "prefills": 0, "adapter_slot_loads": 0,
                                                 "oom_recoveries": 0}
        # recent durations by phase (ms) and their running totals: where the loop's time goes
        self._durations: dict[str, deque[float]] = {name: deque(maxlen=500) for name in _PHASES}
        self._duration_totals: dict[str, float] = dict.fromkeys(_PHASES, 0.0)
        self.ready_s = 0.0
        self.ready_phases_s: dict[str, float] = {}
        # graphs the loop thread captures while idle: ("step", rows, attention positions, with LoRA) and
        # ("prefill", prompts, positions, False); see load() and _queue_captures()
        self._deferred_captures: deque[tuple[str, int, int, bool]] = deque()
        self._load_started = 0.0
        self._busy_at = 0.0  # perf_counter of the loop's last decode step (deferred captures wait for quiet)
        self.all_captured_s: float | None = None  # start of load() to the last deferred capture

    # ------------------------------------------------------------------ Engine protocol

    @property
    def info(self) -> EngineInfo | None:
        return self._info

    @property
    def max_rows(self) -> int:
        return self._rows

    def load(self) -> EngineInfo:
        if self._info is not None:
            return self._info
        started = self._load_started = time.perf_counter()
        clock = PhaseClock()  # seconds per start-up phase: stats()["ready_<phase>_s"]
        lap = clock.lap
        helpers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="engine-load")
        compiler: concurrent.futures.Future[None] | None = None
        if self.config.compile and not self.config.device.startswith("cpu") and torch.cuda.is_available():
            _persist_compiled_kernels(self.config.cache_dir)  # before the compile workers start: they inherit it
            compiler = helpers.submit(_import_compiler)  # beside the official load (ADR 0009)
        try:
            info = self._inner.load()
        except BaseException:
            helpers.shutdown(wait=False)
            raise
        tts = self._inner.tts_model
        self._shapes = dict(self._inner.linear_shapes())  # before any layer is wrapped
        device = next(tts.parameters()).device
        lap("official_load")
        vae_fused: concurrent.futures.Future[None] | None = None
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # The loop thread gives up the GIL in every torch call and, when another thread holds it, gets it
            # back only after that thread's switch interval (CPython's default: 5 ms). With HTTP, SQLite and
            # encoding threads busy, a decode step of ~10 such calls could wait longer than the GPU works.
            sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
            # the AudioVAE's kernels build and warm up (Triton, cuDNN: ~9-12 s) on a thread of their own,
            # overlapping the decode step's compilation and capture below; ready waits for both
            vae_fused = helpers.submit(_fuse_vae, tts, device)
            self._caller_stream = torch.cuda.Stream(device)
        helpers.shutdown(wait=False)  # its threads end with their tasks
        if compiler is not None:
            compiler.result()
            lap("compiler_wait")
        try:
            self._size_rows(tts, device)
            self._model = BatchedModel(tts, info.architecture, self._rows, self.config.max_seq_len,
                                       self.config.lora_slots, self.config.cuda_graphs, self.config.compile,
                                       self.config.lora_segments)
            lap("wrap")
            clock.phases.update({f"wrap_{name}": seconds for name, seconds in self._model.init_phases_s.items()})
            if self._model.use_graphs:
                # Adapters named at start wrap their layers now: a first adapter arriving with traffic would
                # drop every captured graph (the wrapped layers are new buffers) and queue them all again
                preloaded = self._preload_adapters()
                # One graph before ready: its capture compiles every region the decode step runs (a compiled
                # model: the few variants each region has, ~3 s each on a first start). The other row
                # buckets and attention lengths only capture (~0.3 s each): the loop thread does them while
                # idle after ready, and a request that needs one before that captures it (ADR 0009).
                buckets, lens = self._capture_shapes()
                self._model.warm_up(buckets[:1], lens[:1], self.config.capture_solver_steps)
                self._queue_captures(with_lora=preloaded > 0)
                lap("compile_and_capture" if self._model.compiled else "capture")
            if self._model.compiled or self._model.use_graphs:
                # the first prefill's one-time work (its graph, SDPA, the allocator) now, not in the first request
                with torch.inference_mode():
                    inputs = self._official_inputs(ChunkRequest(text="Warm up.", adapter=None, cfg_scale=2.0,
                                                                steps=self.config.capture_solver_steps, seed=0))
                    self._model.prefill([(0, inputs, None)])
                lap("prefill_warm_up")
            if vae_fused is not None:
                vae_fused.result()
                lap("vae_kernels_wait")
        except torch.OutOfMemoryError as exc:
            raise errors.EngineFailure(
                f"not enough GPU memory for {self._rows} rows of {self.config.max_seq_len} positions "
                f"({_short(exc)}); lower --max-concurrent or --max-seq-len") from exc
        self.ready_phases_s = clock.phases
        self._info = EngineInfo(model_id=info.model_id, architecture=info.architecture,
                                sample_rate_hz=info.sample_rate_hz, patch_duration_s=info.patch_duration_s,
                                device=str(device), needs_ref_text=info.needs_ref_text)
        nothing_deferred = not self._deferred_captures
        # the service's warm-up generation follows at once: no deferred capture (the first LoRA one compiles the
        # regions' LoRA variants, seconds) may start in its way and hold /ready back
        self._busy_at = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name=f"batched-engine-{device}", daemon=True)
        self._thread.start()
        self._decoder = threading.Thread(target=self._decode_loop, name=f"batched-decode-{device}", daemon=True)
        self._decoder.start()
        self.ready_s = time.perf_counter() - started
        if nothing_deferred:
            self.all_captured_s = round(self.ready_s, 2)
        log.info("batched engine ready on %s in %.1f s: %d rows x %d positions, %d adapter slots, graphs=%s",
                 device, self.ready_s, self._rows, self.config.max_seq_len, self.config.lora_slots,
                 self._model.use_graphs)
        return self._info

    @torch.inference_mode()  # as on the loop thread, where registration runs otherwise
    def _preload_adapters(self) -> int:
        """Load thread, before the loop starts: BatchedConfig.preload_adapters into host memory and GPU slots
        (at most lora_slots). One that does not fit the model is skipped with a warning. Returns how many."""
        loaded = 0
        for spec in self.config.preload_adapters[: self.config.lora_slots]:
            try:
                self._register(spec)
                loaded += 1
            except Exception as exc:  # a broken adapter in the folder must not stop the start
                reason = exc.message if isinstance(exc, errors.VoxError) else _short(exc)
                log.warning("adapter %s not preloaded: %s", spec.name, reason)
        if loaded:
            log.info("%d adapter(s) preloaded into GPU slots", loaded)
        return loaded

    def _size_rows(self, tts: Any, device: torch.device) -> None:
        """BatchedConfig.max_rows None on a GPU: as many rows as half its free memory holds (see
        scheduler.rows_for_memory), measured after the weights are loaded."""
        if self.config.max_rows is not None or device.type != "cuda":
            return
        free_bytes, _ = torch.cuda.mem_get_info(device)
        per_row = BatchedModel.bytes_per_row(tts, self.config.max_seq_len)
        self._rows = rows_for_memory(free_bytes, per_row)
        self._sched = Scheduler(self._rows, self.config.max_seq_len, self.config.lora_slots)
        self._summary = EngineLoad(0, 0, self._rows, frozenset())
        log.info("batch rows sized from GPU memory: %d rows (%.1f GiB free, %.0f MB per row)", self._rows,
                 free_bytes / 2**30, per_row / 1e6)

    def linear_shapes(self) -> Mapping[str, tuple[int, int]]:
        if self._info is None:
            raise errors.NotReady("the model is not loaded yet")
        return dict(self._shapes)

    def expected_patches(self, text: str) -> int:
        with self._token_lock:  # the tokenizer is not re-entrant
            return self._inner.expected_patches(text)

    def check_reference_audio(self, path: str) -> None:
        self._inner.check_reference_audio(path)

    def prepare_prompt(self, ref_audio_path: str, ref_text: str | None) -> None:
        if self._info is None:
            raise errors.NotReady("the model is not loaded yet")
        with self._encode_slots, self._callers_stream():  # a few encodes at a time bound their device memory
            self._inner.prepare_prompt(ref_audio_path, ref_text)

    @contextlib.contextmanager
    def _callers_stream(self) -> Any:
        """Callers' device work (prompt features, the official inputs' tensors) on a CUDA stream of their own.
        On the default stream each of their copies waited for the loop's queued decode step (a pageable
        host-to-device copy synchronises it), and under the token lock every arriving request queued behind
        them: ~40 ms a request at 64 clients. The stream is synchronised before the loop sees the tensors."""
        stream = self._caller_stream
        if stream is None:
            yield
            return
        with torch.cuda.stream(stream):
            yield
        stream.synchronize()

    def generate(self, request: ChunkRequest, on_patch: PatchCallback) -> np.ndarray:
        job = _Job(request, on_patch=on_patch)
        self._run(job)
        assert job.samples is not None
        return job.samples

    def generate_stream(self, request: ChunkRequest, on_audio: AudioCallback) -> int:
        job = _Job(request, on_audio=on_audio)
        self._run(job)
        return job.patches

    def load_summary(self) -> EngineLoad:
        with self._stats_lock:
            return self._summary

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        for thread in (self._thread, self._decoder):
            if thread is not None:
                thread.join(timeout=30)

    # ------------------------------------------------------------------ adapters

    def register_adapter(self, spec: AdapterSpec) -> float:
        """Validate `spec`, keep it in host memory and (when a slot is free) on the device. Seconds taken."""
        started = time.perf_counter()
        self._call_in_loop(lambda: self._register(spec))
        return time.perf_counter() - started

    def unregister_adapter(self, spec: AdapterSpec) -> None:
        """Drain: rows using it finish; new requests for it are refused until it is registered again."""
        key = adapter_key_str(spec)

        def drain() -> None:
            self._unregistered.add(key)
            self._sched.drain_adapter(key)
            self._adapters.pop(key, None)
            for request_id in self._sched.waiting_ids(key):  # queued, not started: refused like new ones
                job = self._jobs.get(request_id)
                if job is not None:
                    self._finish(job, self._unregistered_error(spec.name))
        self._call_in_loop(drain)

    @staticmethod
    def _unregistered_error(name: str) -> errors.VoxError:
        return errors.AdapterMismatch(f"LoRA '{name}' was unloaded from this engine", field="lora_name")

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            out: dict[str, Any] = dict(self.stats_counters)
            for name, recent in self._durations.items():
                out[f"{name}_ms_p50"] = float(np.median(recent)) if recent else None
                out[f"{name}_ms_total"] = round(self._duration_totals[name], 1)
            out["adapter_switch_ms"] = out["adapter_switch_ms_p50"]
        out["graph_captures"] = self._model.graph_captures if self._model is not None else 0
        out["ready_s"] = self.ready_s
        out["all_captured_s"] = self.all_captured_s
        out["captures_deferred"] = len(self._deferred_captures)
        out.update({f"ready_{phase}_s": seconds for phase, seconds in self.ready_phases_s.items()})
        return out

    def _record(self, phase: str, started: float) -> None:
        with self._stats_lock:
            self._record_locked(phase, started)

    def _record_locked(self, phase: str, started: float) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._durations[phase].append(elapsed_ms)
        self._duration_totals[phase] += elapsed_ms

    # ------------------------------------------------------------------ caller side

    def _call_in_loop(self, fn: Callable[[], Any]) -> Any:
        if self._info is None or self._thread is None:
            raise errors.NotReady("the model is not loaded yet")
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc
            finally:
                done.set()
        self._inbox.put(run)
        self._wake.set()
        while not done.wait(0.5):
            if self._closed.is_set():
                raise errors.NotReady("the engine is shutting down")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _run(self, job: _Job) -> None:
        if self._info is None or self._thread is None:
            raise errors.NotReady("the model is not loaded yet")
        if self._closed.is_set():
            raise errors.NotReady("the engine is shutting down")
        if job.request.ref_audio_path is not None:
            # encoded here, in the caller's thread, so the loop (which steps every running row) only ever
            # finds it in the prompt cache
            self.prepare_prompt(job.request.ref_audio_path, job.request.ref_text)
        # the official inputs (tokeniser, prompt layout: ~ms of Python each) are built here too: on the loop
        # thread they would hold up every running row once per arriving request
        job.inputs = self._prepared_inputs(job.request)
        self._inbox.put(lambda: self._accept(job))
        self._wake.set()
        while not job.done.wait(0.5):
            if self._closed.is_set() and not self._thread.is_alive():
                raise errors.NotReady("the engine stopped")
        if job.error is not None:
            raise job.error

    def _decode_loop(self) -> None:
        """Decode thread: finished rows' latents -> audio, several rows per AudioVAE call.

        The decoders are causal (left-padded convolutions, right-trimmed transposed convolutions), so
        latents right-padded to the longest row of a group give each row exactly its own audio at the
        front; groups bound the padding (similar lengths) and the memory (audio seconds per call).
        Running here, decoding overlaps the loop thread's decode steps instead of stalling them; on a GPU
        it runs on a CUDA stream of its own, so its kernels fill the SMs a step leaves idle instead of
        queueing between steps on the stream the loop waits on (same kernels, same numbers).

        Only rows that finished in the same step share an AudioVAE call, never rows that merely waited in
        the queue together: a batched convolution may round a row's samples differently with other
        batch-mates, and which rows queue up together depends on timing, while which rows finish in one
        step depends only on the requests. So the same requests always give the same arrays."""
        model = self._model
        assert model is not None
        stream = None
        if model.device.type == "cuda":
            torch.cuda.set_device(model.device)
            stream = torch.cuda.Stream(model.device)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            while not self._closed.is_set():
                try:
                    jobs, latents_ready = self._decode_q.get(timeout=0.2)
                except queue.Empty:
                    continue
                if stream is not None:
                    stream.wait_event(latents_ready)
                    for job in jobs:  # made on the loop's stream, freed after use on this one
                        job.latents.record_stream(stream)  # type: ignore[union-attr]
                for group in _decode_groups(jobs, self._max_decode_patches()):
                    self._decode_group(group)

    def _max_decode_patches(self) -> int:
        assert self._info is not None
        return max(1, int(DECODE_AUDIO_S_PER_CALL / self._info.patch_duration_s))

    @torch.inference_mode()
    def _decode_group(self, jobs: list[_Job]) -> None:
        tts = self._inner.tts_model
        started = time.perf_counter()
        try:
            lengths = [int(job.latents.shape[0]) for job in jobs]  # type: ignore[union-attr]
            first = jobs[0].latents
            assert first is not None
            padded = torch.zeros(len(jobs), max(lengths), *first.shape[1:], dtype=first.dtype, device=first.device)
            for i, job in enumerate(jobs):
                padded[i, : lengths[i]] = job.latents
            # (B, D, n * P): "b t p d -> b d (t p)"
            feat = padded.permute(0, 3, 1, 2).reshape(len(jobs), first.shape[2], -1)
            audio = tts.audio_vae.decode(feat.to(torch.float32)).reshape(len(jobs), -1)
            per_patch = audio.shape[1] // max(lengths)
            drop = self._drop_samples_per_patch()
            host = self._to_host(audio.float())
            self._record("vae_decode", started)
            for i, job in enumerate(jobs):
                row = host[i, : lengths[i] * per_patch]
                job.samples = np.array(row[drop * job.drop_patches:], dtype=np.float32)  # a copy: `host` is reused
                self._end(job, None)
        except torch.OutOfMemoryError as exc:
            for job in jobs:
                self._end(job, errors.EngineFailure(
                    f"GPU out of memory while decoding the audio ({_short(exc)}); retry"))
        except Exception as exc:
            log.exception("decoding failed")
            for job in jobs:
                self._end(job, errors.EngineFailure(f"decoding the audio failed: {_short(exc)}"))

    def _to_host(self, audio: torch.Tensor) -> np.ndarray:
        """Decode thread: `audio` in host memory, through a reused page-locked buffer on a GPU (a copy to
        pageable memory ran at ~3 GB/s on an H100 host: ~19 ms per 64 rows x 5 s of VoxCPM2 audio)."""
        if audio.device.type != "cuda":
            return audio.numpy()
        if self._pinned is None or self._pinned.numel() < audio.numel():
            self._pinned = torch.empty(audio.numel(), dtype=audio.dtype, pin_memory=True)
        host = self._pinned[: audio.numel()].view(audio.shape)
        host.copy_(audio, non_blocking=True)
        torch.cuda.current_stream(audio.device).synchronize()
        return host.numpy()

    def _drop_samples_per_patch(self) -> int:
        tts = self._inner.tts_model
        if self._info is not None and self._info.architecture == "voxcpm2":
            return int(tts.patch_size * getattr(tts, "_decode_chunk_size", tts.chunk_size))
        return int(tts.patch_size * tts.chunk_size)

    # ------------------------------------------------------------------ loop thread

    def _loop(self) -> None:
        model = self._model
        assert model is not None
        if model.device.type == "cuda":
            torch.cuda.set_device(model.device)
        with torch.inference_mode():
            while not self._closed.is_set():
                try:
                    self._drain_inbox()
                    self._stop_waiting()
                    self._admit()
                    if self._sched.running:
                        self._decode_step()
                        self._busy_at = time.perf_counter()
                    elif self._deferred_captures and time.perf_counter() - self._busy_at >= CAPTURE_QUIET_S:
                        self._capture_deferred()
                    else:
                        self._publish()
                        idle_since = time.perf_counter()
                        self._wake.wait(IDLE_WAIT_S)
                        self._wake.clear()
                        self._record("idle", idle_since)
                except Exception:  # never let the loop die: fail what is running, keep serving
                    log.exception("batched engine loop error")
                    self._fail_running(errors.EngineFailure("internal engine error; the request was stopped"))
        self._fail_everything(errors.NotReady("the engine is shutting down"))

    def _capture_shapes(self) -> tuple[list[int], list[int]]:
        """The decode graphs' row buckets and attention lengths (BatchedConfig.capture_attention_lens)."""
        lens = [n for n in self.config.capture_attention_lens if n <= self.config.max_seq_len]
        return batch_buckets_up_to(self._rows), lens

    def _queue_captures(self, with_lora: bool) -> None:
        """Queue every decode graph (and the common prefill buckets) for idle time: at start, and again
        after an adapter changed the wrapped layers (which drops every graph), then with the LoRA graphs."""
        buckets, lens = self._capture_shapes()
        self._deferred_captures.clear()
        # with adapters resident the LoRA graphs first: a step runs one whenever any of its rows has an adapter;
        # the largest row buckets first: a burst of requests needs them at once, while a lone client's small
        # bucket costs one capture on first use (and the first bucket is captured before ready)
        for lora in (True, False) if with_lora else (False,):
            self._deferred_captures.extend(("step", rows, n, lora) for n in lens for rows in reversed(buckets))
        self._deferred_captures.extend(("prefill", prompts, n, False) for n in DEFERRED_PREFILL_LENGTHS
                                       for prompts in DEFERRED_PREFILL_PROMPTS if prompts <= self._rows)

    def _capture_deferred(self) -> None:
        """One of the graphs load() left for idle time (the loop checks for work between them)."""
        model = self._model
        assert model is not None
        kind, rows, positions, lora = self._deferred_captures[0]  # left in the queue until done: stats() counts it
        try:
            if kind == "step":
                model.capture(rows, positions, self.config.capture_solver_steps, with_lora=lora)
            else:
                model.capture_prefill(rows, positions)
        except Exception:  # e.g. out of memory: a request that needs it captures it (and reports its error)
            log.warning("deferred %s capture of %d rows x %d positions failed; later ones are left to requests",
                        kind, rows, positions, exc_info=True)
            self._deferred_captures.clear()
        if len(self._deferred_captures) <= 1 and self.all_captured_s is None:  # the start-up ones: set before
            self.all_captured_s = round(time.perf_counter() - self._load_started, 2)  # the queue reads empty
        if self._deferred_captures:
            self._deferred_captures.popleft()

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            item()

    def _accept(self, job: _Job) -> None:
        """Official inputs, prompt features, adapter: everything that can fail before a row is taken."""
        request = job.request
        try:
            assert job.inputs is not None  # built by the caller (_run), on the callers' stream
            _used_on_this_stream(job.inputs)
            if request.adapter is not None:
                job.adapter_key = adapter_key_str(request.adapter)
                if job.adapter_key in self._unregistered:
                    raise self._unregistered_error(request.adapter.name)
                if self._sched.is_draining(job.adapter_key):
                    raise errors.AdapterMismatch(
                        f"LoRA '{request.adapter.name}' is being unloaded from this engine; retry shortly",
                        field="lora_name")
                job.adapter = self._host_adapter(request.adapter)
            job.max_len = int(request.max_patches) if request.max_patches else job.inputs.max_len
            job.request_id = self._sched.new_id()
            self._sched.submit(RowRequest(job.request_id, job.adapter_key, int(job.inputs.text.shape[1]),
                                          job.max_len, job.inputs.steps))
        except TooLong as exc:
            self._end(job, errors.InvalidInput(str(exc), field="text"))
            return
        except errors.VoxError as exc:
            self._end(job, exc)
            return
        except Exception as exc:
            self._end(job, errors.EngineFailure(f"could not prepare the generation: {_short(exc)}"))
            return
        self._jobs[job.request_id] = job

    @torch.inference_mode()
    def _prepared_inputs(self, request: ChunkRequest) -> RowInputs:
        """Caller thread: the official inputs, or the error the request ends with (a VoxError)."""
        started = time.perf_counter()
        try:
            with self._callers_stream():
                inputs = self._official_inputs(request)
        except errors.VoxError:
            raise
        except Exception as exc:
            raise errors.EngineFailure(f"could not prepare the generation: {_short(exc)}") from exc
        self._record("prepare", started)
        return inputs

    def _official_inputs(self, request: ChunkRequest) -> RowInputs:
        """Run the official generate_with_prompt_cache up to its `_inference` call and keep the arguments."""
        if not isinstance(request.text, str) or not request.text.strip():
            raise errors.InvalidInput("text must be a non-empty string", field="text")
        text = _normalize_text(request.text)
        if request.normalize:
            with self._token_lock:  # callers' threads: one normaliser call at a time
                text = self._inner._text_normalizer().normalize(text)
        prompt_cache = self._inner._prompt_cache_for(request)
        tts = self._inner.tts_model

        def intercept(*args: Any, **kwargs: Any) -> Any:
            raise _Intercepted(args, kwargs)
        try:
            # callers' threads run this concurrently: the shadowing instance attribute is set and removed
            # under the lock, so no call ever reaches the real `_inference`
            with self._token_lock:
                tts._inference = intercept
                try:
                    tts.generate_with_prompt_cache(**_official_args(request, text, prompt_cache))
                finally:
                    del tts._inference
        except _Intercepted as call:
            names = ("text", "text_mask", "feat", "feat_mask")
            values = dict(zip(names, call.call_args)) | call.call_kwargs
            return RowInputs(text=values["text"], text_mask=values["text_mask"], feat=values["feat"],
                             feat_mask=values["feat_mask"], min_len=int(values["min_len"]),
                             max_len=int(values["max_len"]), steps=int(values["inference_timesteps"]),
                             cfg_value=float(values["cfg_value"]))
        raise errors.EngineFailure("the official package did not reach its inference step")

    def _host_adapter(self, spec: AdapterSpec) -> LoadedAdapter:
        key = adapter_key_str(spec)
        loaded = self._adapters.get(key)
        if loaded is None:
            tts = self._inner.tts_model
            loaded = load_adapter(spec, tts, self._shapes, key=(key,), device="cpu")
            if self._model is not None:
                self._model.lora.prepare(loaded)  # the slot load then only copies to the device
            self._key_names[key] = spec.name
            self._adapters[key] = loaded
            while len(self._adapters) > max(1, self.config.lora_cache_size):
                self._adapters.popitem(last=False)
        else:
            self._adapters.move_to_end(key)
        return loaded

    def _register(self, spec: AdapterSpec) -> None:
        key = adapter_key_str(spec)
        self._unregistered.discard(key)
        self._sched.adapters.draining.discard(key)
        loaded = self._host_adapter(spec)
        placed = self._sched.adapters.place_idle(key)
        if placed is not None:
            slot, evicted = placed
            self._count_eviction(evicted)
            self._load_slot(slot, loaded)

    def _load_slot(self, slot: int, adapter: LoadedAdapter) -> None:
        assert self._model is not None
        started = time.perf_counter()
        version = self._model.lora.version
        self._model.lora.load(slot, adapter)
        if self._model.lora.version != version:
            self._model.drop_graphs()
            if self._model.use_graphs:
                self._queue_captures(with_lora=True)
        if self._model.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        with self._stats_lock:
            self.lora_runtime.loads[adapter.name] = self.lora_runtime.loads.get(adapter.name, 0) + 1
            self._record_locked("adapter_switch", started)
            self.stats_counters["adapter_slot_loads"] += 1

    def _stop_waiting(self) -> None:
        """Requests still queued for a row whose caller gave up (cancel, shutdown, client gone) end now."""
        for job in list(self._jobs.values()):
            check = job.request.stop_check
            if check is None or self._sched.is_running(job.request_id):
                continue
            try:
                check()
            except errors.VoxError as exc:
                self._finish(job, exc)
            except Exception as exc:
                self._finish(job, errors.EngineFailure(f"generation failed: {_short(exc)}"))

    def _count_eviction(self, key: str | None) -> None:
        if key is None:
            return
        name = self._key_names.get(key, key)
        with self._stats_lock:
            self.lora_runtime.evictions[name] = self.lora_runtime.evictions.get(name, 0) + 1

    def _admit(self) -> None:
        model = self._model
        assert model is not None
        admissions = self._sched.admit()
        failed: dict[str, Exception] = {}  # adapter key -> why its slot could not be filled
        for admission in admissions:
            job = self._jobs[admission.request.request_id]
            if not admission.load_adapter or job.adapter is None or admission.adapter_slot is None:
                continue
            self._count_eviction(admission.evicted_key)
            try:
                self._load_slot(admission.adapter_slot, job.adapter)
            except Exception as exc:
                log.exception("adapter load failed")
                failed[job.adapter_key or ""] = exc
                with contextlib.suppress(Exception):
                    model.lora.clear(admission.adapter_slot)  # never leave half-written weights behind
        ready: list[tuple[_Job, int, int | None]] = []
        for admission in admissions:
            job = self._jobs[admission.request.request_id]
            if job.adapter_key in failed:  # every row of that adapter this round, not just the first
                exc = failed[job.adapter_key]
                self._finish(job, errors.EngineFailure(f"could not load the LoRA adapter: {_short(exc)}"))
                continue
            ready.append((job, admission.row_slot, admission.adapter_slot))
        for key in failed:  # its rows are gone: forget the slot, so the next request loads it again
            self._sched.adapters.remove(key)
        # one batched prefill per group of at most PREFILL_TOKENS padded positions (bounds activation memory)
        group: list[tuple[_Job, int, int | None]] = []
        for item in sorted(ready, key=lambda it: int(it[0].inputs.text.shape[1])):  # type: ignore[union-attr]
            longest = int(item[0].inputs.text.shape[1])  # type: ignore[union-attr]
            if group and longest * (len(group) + 1) > PREFILL_TOKENS:
                self._prefill(group)
                group = []
            group.append(item)
        if group:
            self._prefill(group)

    def _prefill(self, group: list[tuple[_Job, int, int | None]]) -> None:
        model = self._model
        assert model is not None
        started = time.perf_counter()
        try:
            results = model.prefill([(row, job.inputs, slot) for job, row, slot in group])  # type: ignore[misc]
        except torch.OutOfMemoryError as exc:
            self._recover_oom()
            for job, _, _ in group:
                self._finish(job, errors.EngineFailure(
                    f"GPU out of memory while reading the prompt ({_short(exc)}); retry, or send a shorter text"))
            return
        except Exception as exc:
            log.exception("prefill failed")
            for job, _, _ in group:
                self._finish(job, errors.EngineFailure(f"generation failed: {_short(exc)}"))
            return
        self._record("prefill", started)
        for (job, _, _), prefilled in zip(group, results):
            job.prefilled = prefilled
            job.generator = torch.Generator(device="cpu").manual_seed(int(job.request.seed))
            try:
                if job.on_audio is not None:
                    job.stream_state = self._new_stream_state(job)
            except Exception as exc:
                self._finish(job, errors.EngineFailure(f"could not start the audio stream: {_short(exc)}"))
                continue
            self.stats_counters["prefills"] += 1

    def _decode_step(self) -> None:
        model = self._model
        assert model is not None
        slots = self._sched.row_slots()
        rows = batch_bucket(self._sched.batch_rows(), self._rows) if model.use_graphs \
            else self._sched.batch_rows()
        # numpy writes into the runner's staging buffer: no torch call (each one releases and retakes the GIL,
        # which other busy threads can hold for a whole switch interval) per row
        staging = model.noise_staging().numpy()
        for rid, slot in slots.items():
            job = self._jobs[rid]
            staging[slot] = job.next_noise if job.next_noise is not None else self._draw_noise(job)
        started = time.perf_counter()
        try:
            model.upload_noise(rows)
            model.step(rows, self._sched.attention_len(), self._sched.solver_steps(), self._sched.uses_adapters())
            # while the GPU runs the step: each row's noise for its next patch. A row draws once per
            # patch, in order, so drawing early keeps its sequence; a row that ends leaves its draw unused.
            for rid in slots:
                job = self._jobs[rid]
                job.next_noise = self._draw_noise(job)
            stops = model.out_stop[:rows].tolist()
        except torch.OutOfMemoryError as exc:
            self._recover_oom()
            self._fail_running(errors.EngineFailure(
                f"GPU out of memory while decoding {len(slots)} rows ({_short(exc)}); lower --max-concurrent"))
            return
        with self._stats_lock:
            self.stats_counters["steps"] += 1
            self.stats_counters["rows_stepped"] += len(slots)
            self._record_locked("step", started)
        self._sched.advance(slots)
        callbacks_started = time.perf_counter()
        finished: list[_Job] = []  # decoded together, in the decode thread
        streamed: list[tuple[_Job, torch.Tensor]] = []  # streaming rows' audio of this step, still on the device
        stream_ends: list[_Job] = []  # streaming rows that ended this step: done once their audio is out
        for rid, slot in slots.items():
            job = self._jobs[rid]
            job.patches += 1
            index = job.patches - 1
            if job.on_audio is not None:
                if not self._row_callback(job, lambda job=job, slot=slot: self._stream_patch(job, slot, streamed)):
                    continue
            elif job.on_patch is not None and not self._row_callback(job, job.on_patch):
                continue
            prefilled = job.prefilled
            assert prefilled is not None and job.inputs is not None
            if (index > job.inputs.min_len and stops[slot] == 1) or job.patches >= job.max_len:
                self._release(job)
                if job.on_audio is not None:
                    stream_ends.append(job)  # streamed: its audio goes out patch by patch
                    continue
                generated = model.latents[slot, : job.patches].clone()
                context = prefilled.context
                job.latents = torch.cat([torch.stack(context), generated]) if context else generated
                job.drop_patches = prefilled.context_len
                finished.append(job)
        self._decode_streamed(streamed)
        self._deliver_audio(streamed, stream_ends)
        if finished:
            latents_ready = None
            if model.device.type == "cuda":  # the decode thread's stream waits for the copies above
                latents_ready = torch.cuda.Event()
                latents_ready.record()
            self._decode_q.put((finished, latents_ready))
        self._record("callbacks", callbacks_started)
        self._publish()

    def _row_callback(self, job: _Job, callback: Callable[[], object]) -> bool:
        """Run one row's callback; a raise ends that row alone (False)."""
        try:
            callback()
        except Exception as exc:
            self._fail_row(job, exc)
            return False
        return True

    def _fail_row(self, job: _Job, exc: Exception) -> None:
        """End one row with `exc`: a VoxError (TaskCancelled, ClientGone, ShutdownRequested, ...) as it is, any
        other error as an EngineFailure of that row alone."""
        if isinstance(exc, errors.VoxError):
            self._finish(job, exc)
            return
        log.error("row failed", exc_info=exc)
        failure = errors.EngineFailure(f"generation failed: {_short(exc)}")
        failure.__cause__ = exc
        self._finish(job, failure)

    def _deliver_audio(self, streamed: list[tuple[_Job, torch.Tensor]], ended: list[_Job]) -> None:
        """Hand each streaming row its patch's samples: one copy to the host for all of them (a device sync
        per row made dozens of concurrent streams set the step time), then the rows that ended are done."""
        streamed = [(job, audio) for job, audio in streamed if not job.done.is_set()]  # failed rows: no audio
        if streamed:
            host = torch.cat([audio for _, audio in streamed]).cpu().numpy()
            offset = 0
            for job, audio in streamed:  # each row once: one failing leaves the others as they are
                samples = host[offset: offset + audio.numel()].copy()
                offset += audio.numel()
                self._row_callback(job, lambda job=job, samples=samples: job.on_audio(samples))  # type: ignore[misc]
        for job in ended:
            if not job.done.is_set():
                self._end(job, None)

    def _draw_noise(self, job: _Job) -> np.ndarray:
        """One patch's CFM noise, (feat_dim, patch) float32: the official CFM draws
        torch.randn((b, feat_dim, patch)) once per patch, here from the row's own seeded generator.

        Drawn NOISE_BLOCK_PATCHES patches per torch call where that gives the same numbers: the CPU
        generator fills a tensor with uniforms in order and transforms them in aligned blocks of 16, so
        one draw of k patches equals k draws of one when a patch holds a multiple of 16 values
        (tests/unit/test_noise_blocks.py checks it on the installed torch)."""
        model = self._model
        assert model is not None
        if job.noise_block is None or job.noise_used >= job.noise_block.shape[0]:
            per_call = NOISE_BLOCK_PATCHES if (model.feat_dim * model.patch) % 16 == 0 else 1
            patches = max(1, min(per_call, job.max_len - job.patches))
            job.noise_block = draw_noise(job.generator, patches, model.feat_dim, model.patch)
            job.noise_used = 0
        noise = job.noise_block[job.noise_used]
        job.noise_used += 1
        return noise

    # ------------------------------------------------------------------ streaming decode (loop thread)

    def _new_stream_state(self, job: _Job) -> Any:
        prefilled = job.prefilled
        assert prefilled is not None
        if self._info is not None and self._info.architecture == "voxcpm2":
            from voxcpm.modules.audiovae.audio_vae_v2 import StreamingVAEDecoder

            if self._stream_vae is None:
                # The official streaming decoder patches the VAE's conv modules while it runs; a private
                # copy keeps that away from the rows decoding whole files in caller threads. (deepcopy
                # cannot copy weight-normed modules: build a twin from the config, then load the weights.)
                vae = self._inner.tts_model.audio_vae
                twin = type(vae)(config=self._inner.tts_model.config.audio_vae_config)
                twin.load_state_dict(vae.state_dict())
                param = next(vae.parameters())
                self._stream_vae = twin.to(device=param.device, dtype=param.dtype).eval()
            return StreamingVAEDecoder(self._stream_vae)
        return list(prefilled.context)  # VoxCPM 1.x: the window of recent patches

    def _stream_patch(self, job: _Job, slot: int, streamed: list[tuple[_Job, torch.Tensor]]) -> None:
        """Add this row's newest patch to `streamed`, exactly as the official streaming generator yields it.
        VoxCPM2: the patch, (D, P), for the row's own streaming decoder state. VoxCPM 1.x: the row's window of
        recent patches, (D, n * P). _decode_streamed turns them into audio for every streaming row at once
        (_deliver_audio then copies all of it to the host in one go)."""
        model = self._model
        assert model is not None
        pred = model.out_feat[slot]  # (P, D)
        if self._info is not None and self._info.architecture == "voxcpm2":
            streamed.append((job, pred.t().to(torch.float32)))  # (D, P): _decode_streamed decodes it
            return
        window: list[torch.Tensor] = job.stream_state
        window.append(pred.clone())
        del window[:-3]  # VoxCPMModel's streaming_prefix_len
        streamed.append((job, torch.stack(window).permute(2, 0, 1).reshape(pred.shape[1], -1)))  # (D, n * P)

    def _decode_streamed(self, streamed: list[tuple[_Job, torch.Tensor]]) -> None:
        """Streaming rows' inputs from _stream_patch, replaced in `streamed` by the newest patch's audio, (n,)
        float32, with one AudioVAE call per group instead of one per row (rows are independent in the decoder's
        batch, as in the decode thread's grouped decodes). VoxCPM 1.x: windows of one length form a group.
        VoxCPM2: rows at their first patch form one group and the others a second, each call running the
        official streaming decoder over the rows' carried convolution states stacked along the batch (a first
        patch's missing state is the zero padding the decoder uses then, so each row gets its own audio)."""
        if self._info is None or not streamed:
            return
        v2 = self._info.architecture == "voxcpm2"
        groups: dict[object, list[int]] = {}
        for index, (job, feat) in enumerate(streamed):
            key = bool(job.stream_state._states) if v2 else int(feat.shape[-1])
            groups.setdefault(key, []).append(index)
        keep = self._drop_samples_per_patch()
        vae = self._inner.tts_model.audio_vae
        for indices in groups.values():
            jobs = [streamed[i][0] for i in indices]
            try:
                feat = torch.stack([streamed[i][1] for i in indices]).to(torch.float32)  # (B, D, frames)
                if v2:
                    audio = self._decode_stream_states(jobs, feat).reshape(len(indices), -1)
                else:
                    audio = vae.decode(feat).reshape(len(indices), -1)[:, -keep:]
            except Exception as exc:  # those rows fail alone; _deliver_audio leaves failed rows out
                for job in jobs:
                    self._fail_row(job, exc)
                continue
            for row, i in enumerate(indices):
                streamed[i] = (streamed[i][0], audio[row].float())

    def _decode_stream_states(self, jobs: list[_Job], latents: torch.Tensor) -> torch.Tensor:
        """VoxCPM2: one official streaming-decoder call for `jobs`, whose per-row states (the official
        StreamingVAEDecoder's, keyed by the shared twin VAE's modules) go in stacked and come out split."""
        from voxcpm.modules.audiovae.audio_vae_v2 import StreamingVAEDecoder

        rows = [job.stream_state for job in jobs]
        batch = StreamingVAEDecoder(self._stream_vae)
        batch._states.update({key: torch.cat([row._states[key] for row in rows]) for key in rows[0]._states})
        batch._install()
        try:
            audio = batch.decode_chunk(latents)
        finally:
            batch._restore()
        for i, row in enumerate(rows):
            row._states = {key: state[i: i + 1] for key, state in batch._states.items()}
        return audio

    # ------------------------------------------------------------------ ending rows

    def _finish(self, job: _Job, error: BaseException | None) -> None:
        self._release(job)
        self._end(job, error)

    def _release(self, job: _Job) -> None:
        """Give the row's slots back (the job itself may still be decoding)."""
        if job.request_id in self._jobs:
            self._jobs.pop(job.request_id, None)
            if self._sched.is_running(job.request_id):
                self._sched.finish(job.request_id)
            else:
                self._sched.cancel_waiting(job.request_id)

    @staticmethod
    def _end(job: _Job, error: BaseException | None) -> None:
        job.error = error
        job.stream_state = None
        job.done.set()

    def _fail_running(self, error: BaseException) -> None:
        for rid in self._sched.running_ids():
            job = self._jobs.get(rid)
            if job is not None:
                self._finish(job, error)
            else:
                self._sched.finish(rid)

    def _fail_everything(self, error: BaseException) -> None:
        self._fail_running(error)
        for job in list(self._jobs.values()):
            self._finish(job, error)
        while True:
            try:
                self._inbox.get_nowait()
            except queue.Empty:
                break

    def _recover_oom(self) -> None:
        with self._stats_lock:
            self.stats_counters["oom_recoveries"] += 1
        if self._model is not None:
            self._model.drop_graphs()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _publish(self) -> None:
        summary = EngineLoad(self._sched.running, self._sched.waiting, self._rows,
                             self._sched.adapters.resident())
        with self._stats_lock:
            self._summary = summary


def _used_on_this_stream(inputs: RowInputs) -> None:
    """The loop's stream reads tensors the callers' stream allocated: the allocator must not hand their memory
    to that stream again before the loop's work on them is done."""
    if inputs.text.is_cuda:
        stream = torch.cuda.current_stream(inputs.text.device)
        for tensor in (inputs.text, inputs.text_mask, inputs.feat, inputs.feat_mask):
            tensor.record_stream(stream)


def draw_noise(generator: torch.Generator | None, patches: int, feat_dim: int, patch: int) -> np.ndarray:
    """`patches` patches of CFM noise, (patches, feat_dim, patch) float32, from one torch.randn call."""
    return torch.randn((patches, feat_dim, patch), generator=generator, dtype=torch.float32).numpy()


def _fuse_vae(tts: Any, device: torch.device) -> None:
    """Our Triton kernels in the AudioVAE decoder (vae_kernels: most of a batched decode was float32
    element-wise passes, layout conversions and copies around the convolutions), compiled here, not on
    the first request. Runs on a load thread of its own, beside the step's CUDA-graph captures: those
    capture in thread-local mode on a side stream, so this thread's launches and allocations stay out."""
    from .vae_kernels import fuse_decoder  # Triton: CUDA only

    torch.cuda.set_device(device)
    decoder = tts.audio_vae.decoder
    units, blocks = fuse_decoder(decoder)
    param = next(decoder.parameters())
    with torch.inference_mode():
        # Triton specialises integer arguments on divisibility by 16: decodes of 3 and 16 latent frames
        # give every decoder stage both classes its lengths can take, so a real decode of any length
        # compiles nothing (one that did stalled its batch ~1.5 s)
        for frames in (3, 16):
            tts.audio_vae.decode(torch.zeros(1, tts.audio_vae.latent_dim, frames, device=param.device,
                                             dtype=torch.float32))
    log.info("AudioVAE decoder: %d residual units and %d block heads fused", units, blocks)


def _import_compiler() -> None:
    """Import dynamo and inductor (7-10 s on H100 hosts) on a helper thread while the official loader reads
    the checkpoint; the first compile would import them otherwise. Both are mostly Python and share the
    GIL, so the overlap saves ~2-5 s, not all of it. Starting inductor's compile workers here as well was
    slower: 16 processes importing torch starved the load's own threads (measured, ADR 0009)."""
    try:
        import torch._dynamo  # noqa: F401
        from torch._inductor import compile_fx  # noqa: F401
    except Exception:  # the first compile imports them again and reports the error
        log.warning("could not import the compiler ahead of the first compile", exc_info=True)


def _persist_compiled_kernels(cache_dir: Path) -> None:
    """Keep inductor's and Triton's kernel caches next to our checkpoints instead of /tmp (often wiped
    in containers): a restart then loads the compiled kernels instead of compiling them again.
    Variables the operator set win."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir / "triton"))


@dataclass
class AdapterCounters:
    """What /metrics reads as `engine.lora_runtime` (the same names as lora_runtime.LoRARuntime's)."""

    loads: dict[str, int] = field(default_factory=dict)
    evictions: dict[str, int] = field(default_factory=dict)


def _decode_groups(jobs: list[_Job], max_patches: int) -> list[list[_Job]]:
    """Rows of similar length (padding at most a third) and bounded padded size, shortest first."""
    groups: list[list[_Job]] = []
    for job in sorted(jobs, key=lambda j: int(j.latents.shape[0])):  # type: ignore[union-attr]
        length = int(job.latents.shape[0])  # type: ignore[union-attr]
        if groups:
            group = groups[-1]
            shortest = int(group[0].latents.shape[0])  # type: ignore[union-attr]
            if length * 3 <= shortest * 4 and length * (len(group) + 1) <= max_patches:
                group.append(job)
                continue
        groups.append([job])
    return groups

