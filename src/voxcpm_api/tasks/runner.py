"""The engine owner's loop: claim tasks from the store, synthesize, encode, write, record.

Only the process holding the engine lock runs this. Concurrency model:
- one engine thread (a single-thread executor) loads the engine and runs its one-off calls
  (linear shapes, the warm-up generation, saved voices' prompt features);
- a plain engine (the official sequential one, FakeEngine) runs every generation in that same
  thread, one at a time behind a gate of 1, because the official model keeps per-generation state
  (KV caches, torch's global RNG) and must not be re-entered; `max_concurrent` worker coroutines
  (default 2) let the encoding of one task overlap the generation of the next;
- a ConcurrentEngine (engine/base.py: it has `max_rows`; the batched engine, or an EnginePool of
  several) takes up to `max_concurrent` generations at once (default and cap: its `max_rows`), each
  a batch row: the gate holds `max_concurrent` slots and generations run in a pool of that many
  row threads, each blocking in engine.generate()/generate_stream() until its row is done. A row
  that fails (or is cancelled through its PatchProgress) fails its own task only;
- a task is claimed only after its worker has a gate slot, so "processing" means "generating now,
  or encoding/writing its file";
- every blocking call (engine, encoder, SQLite) runs off the event loop.

Whatever happens to a task, it ends in a final state or, when the process dies, is re-queued by
the next owner (`TaskStore.requeue_interrupted`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..audio.encoders import (FILE_EXTENSIONS, crossfade_concat, encode_audio, encoded_sample_rate_for,
                              write_atomic)
from ..domain import EngineInfo, SynthesisParams
from ..engine.base import ChunkRequest, Engine
from ..errors import NotReady, TaskCancelled, VoxError
from ..lora.catalog import AdapterSpec, LoRACatalog, check_adapter_fits, is_base_model_name
from ..paths import audio_file_name
from ..textsplit import split_text, voice_design_prefix
from .events import Events, NullEvents
from .progress import BackgroundProgressWriter, PatchProgress, ShutdownRequested
from .store import TaskRecord, TaskStore

if TYPE_CHECKING:  # streaming lives in tasks/stream.py
    from .stream import AudioStream

log = logging.getLogger("voxcpm_api.runner")

HEARTBEAT_INTERVAL_S = 2.0
CANCEL_POLL_INTERVAL_S = 0.3
IDLE_POLL_INTERVAL_S = 0.5
SEED_MODULUS = 2**32


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    output_dir: Path
    # Generations at once. None = the engine's default: max_rows for a ConcurrentEngine, 2 workers
    # (one generating, one encoding) for a plain engine. Capped at a ConcurrentEngine's max_rows.
    max_concurrent: int | None
    max_attempts: int
    chunk_max_chars: int
    cleanup_interval_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Synthesized:
    samples: np.ndarray  # (N,) float32
    sample_rate_hz: int
    num_patches: int


class EngineRunner:
    def __init__(self, engine_factory: Callable[[], Engine], store: TaskStore, catalog: LoRACatalog,
                 config: RunnerConfig, cleanup: Callable[[], object] | None = None,
                 events: Events | None = None) -> None:
        self._engine_factory = engine_factory
        self._store = store
        self._catalog = catalog
        self._config = config
        self._cleanup = cleanup
        self._events: Events = events if events is not None else NullEvents()
        self._engine: Engine | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._row_executor: ThreadPoolExecutor | None = None  # ConcurrentEngine: one thread per batch row
        self._progress_writer: BackgroundProgressWriter | None = None  # ConcurrentEngine: off the loop thread
        self._gate = asyncio.Semaphore(1)  # generations at once; replaced once a ConcurrentEngine has loaded
        self.max_concurrent = 1  # what --max-concurrent resolved to (GET /tasks), set by start()
        self._wake = asyncio.Event()
        self._cancel_events: dict[str, threading.Event] = {}
        self._shutdown = threading.Event()
        self._done_waiters: dict[str, list[asyncio.Event]] = {}
        self._background: list[asyncio.Task[None]] = []
        self._running: set[str] = set()  # task ids this process is generating right now
        self.load_error: str | None = None
        self.loaded = asyncio.Event()
        # measured speed for ETAs, kept here and written to the store by the heartbeat (other worker processes
        # read it there): one SQLite transaction per finished task on the event loop cost every request
        self._speed: dict[str, float] = {}
        self._speed_dirty = False

    @property
    def info(self) -> EngineInfo | None:
        return self._engine.info if self._engine is not None else None

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model, publish what it is, recover interrupted tasks, start the workers."""
        self._store.set_meta("engine", {"loaded": False, "pid": os.getpid(), "heartbeat": time.time()})
        self._background.append(asyncio.create_task(self._heartbeat()))
        try:
            engine = await self._in_engine_thread(self._engine_factory)
            info = await self._in_engine_thread(engine.load)
            shapes = await self._in_engine_thread(lambda: dict(engine.linear_shapes()))
        except Exception as exc:  # reported through /health; the process keeps serving task reads
            self.load_error = exc.message if isinstance(exc, VoxError) else f"{type(exc).__name__}: {exc}"
            log.error("model could not be loaded: %s", self.load_error)
            self._store.set_meta("engine", {"loaded": False, "error": self.load_error, "pid": os.getpid(),
                                            "heartbeat": time.time()})
            return
        self._engine = engine
        workers = self._size_concurrency(engine)
        self._store.set_meta("limits", {"max_concurrent": self.max_concurrent})
        self._store.set_meta("linear_shapes", {k: list(v) for k, v in shapes.items()})
        self._store.set_meta("engine_info", asdict(info))
        requeued, failed = await asyncio.to_thread(self._store.requeue_interrupted, self._config.max_attempts)
        if requeued or failed:
            log.warning("recovered interrupted tasks: %d re-queued, %d failed after too many attempts",
                        requeued, failed)
        known = self._store.get_meta("speed", {}) or {}  # an earlier run's measurements on this machine
        self._speed = {k: float(v) for k, v in known.items() if isinstance(v, (int, float))}  # type: ignore[union-attr]
        await self._measure_speed(engine)
        self._flush_speed()
        self._store.set_meta("engine", {"loaded": True, "pid": os.getpid(), "heartbeat": time.time()})
        self.loaded.set()
        log.info("model ready: %s (%s, %d Hz, %s), %d generation(s) at once", info.model_id, info.architecture,
                 info.sample_rate_hz, info.device, self.max_concurrent)
        for index in range(workers):
            self._background.append(asyncio.create_task(self._worker(index)))
        self._background.append(asyncio.create_task(self._watch_cancellations()))
        if self._config.cleanup_interval_s > 0 and self._cleanup is not None:
            self._background.append(asyncio.create_task(self._periodic_cleanup()))

    async def stop(self) -> None:
        """Graceful stop: running generations stop at their next patch and go back to pending."""
        self._shutdown.set()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._row_executor is not None:  # every row stops at its next patch (ShutdownRequested)
            self._row_executor.shutdown(wait=True, cancel_futures=True)
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._progress_writer is not None:
            await asyncio.to_thread(self._progress_writer.close)
        for task_id in list(self._running):
            self._store.requeue_interrupted_one(task_id)
        self._flush_speed()
        self._store.set_meta("engine", {"loaded": False, "pid": os.getpid(), "heartbeat": 0})
        close = getattr(self._engine, "close", None) if is_concurrent(self._engine) else None
        if close is not None:  # a batched engine's loop thread
            try:
                await asyncio.to_thread(close)
            except Exception:
                log.exception("closing the engine failed")

    def wake(self) -> None:
        self._wake.set()

    def request_cancel(self, task_id: str) -> None:
        event = self._cancel_events.get(task_id)
        if event is not None:
            event.set()

    def done_event(self, task_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._done_waiters.setdefault(task_id, []).append(event)
        return event

    def linear_shapes(self) -> dict[str, tuple[int, int]] | None:
        return dict(self._engine.linear_shapes()) if self._engine is not None else None

    async def precompute_voice(self, path: str, transcript: str | None) -> None:
        """A saved voice's prompt features, computed (or loaded from disk) in the engine thread, between tasks."""
        engine = self._engine
        if engine is None:
            raise NotReady("the model is not loaded yet")
        await self._in_engine_thread(lambda: engine.prepare_prompt(path, transcript))

    def engine_stats(self) -> dict[str, dict[str, float]]:
        """For /metrics: per-adapter LoRA loads and evictions of this engine (empty without a LoRA runtime);
        a ConcurrentEngine's batch rows and GPU-slot resident adapters (by name) now; an EnginePool's
        placements per engine."""
        engine = self._engine
        runtime = getattr(engine, "lora_runtime", None)
        stats = {"adapter_loads": dict(getattr(runtime, "loads", None) or {}),
                 "adapter_evictions": dict(getattr(runtime, "evictions", None) or {})}
        if is_concurrent(engine):
            load = engine.load_summary()  # type: ignore[union-attr]
            stats["batch_rows"] = {"running": load.running_rows, "queued": load.queued_rows, "max": load.max_rows}
            stats["resident_adapters"] = {name: 1 for name in self._catalog.names_of_keys(load.resident_adapters)}
        placements = getattr(engine, "placements", None)
        if isinstance(placements, dict):
            stats["engine_placements"] = {str(k): int(v) for k, v in placements.items()}
        counters = getattr(engine, "stats", None)  # BatchedEngine / EnginePool: decode steps, rows stepped, ...
        if callable(counters):
            stats["engine_counters"] = {k: v for k, v in dict(counters()).items()
                                        if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return stats

    # ---- background loops ---------------------------------------------------------------------

    async def _in_engine_thread(self, fn: Callable[[], object]) -> object:  # type: ignore[misc]
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _in_row_thread(self, fn: Callable[[], object]) -> object:  # type: ignore[misc]
        """A generation (task or stream), taken with a gate slot: its own row thread on a ConcurrentEngine,
        else the one engine thread."""
        executor = self._row_executor if self._row_executor is not None else self._executor
        return await asyncio.get_running_loop().run_in_executor(executor, fn)

    @property
    def concurrent(self) -> bool:
        """True when generations run as batch rows of a ConcurrentEngine."""
        return self._row_executor is not None

    def _size_concurrency(self, engine: Engine) -> int:
        """Size the gate (and, for a ConcurrentEngine, the row threads); returns how many workers to start."""
        wanted = self._config.max_concurrent
        if not is_concurrent(engine):  # gate of 1; the second worker encodes while the first generates
            self.max_concurrent = wanted if wanted is not None else 2
            return self.max_concurrent
        rows = max(1, int(engine.max_rows))  # type: ignore[attr-defined]
        if wanted is not None and wanted > rows:
            log.warning("--max-concurrent %d is more than the engine's %d batch rows; using %d", wanted, rows, rows)
        self.max_concurrent = min(wanted, rows) if wanted is not None else rows
        self._gate = asyncio.Semaphore(self.max_concurrent)
        self._row_executor = ThreadPoolExecutor(max_workers=self.max_concurrent, thread_name_prefix="engine-row")
        self._progress_writer = BackgroundProgressWriter(self._store.update_progress)
        # more workers than rows: a worker encoding its file does not hold a row, another one fills it
        return self.max_concurrent + max(1, self.max_concurrent // 2)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            await asyncio.to_thread(self._beat)

    def _beat(self) -> None:
        state = self._store.get_meta("engine", {}) or {}
        state.update(heartbeat=time.time(), pid=os.getpid())  # type: ignore[union-attr]
        self._store.set_meta("engine", state)
        self._flush_speed()

    def _flush_speed(self) -> None:
        if self._speed_dirty:
            self._speed_dirty = False
            self._store.set_meta("speed", dict(self._speed))

    def speed_stats(self) -> dict[str, float]:
        """seconds_per_patch and patches_per_char measured on this machine (EWMA), for estimates."""
        return dict(self._speed)

    async def _watch_cancellations(self) -> None:
        # Cancels requested through another worker process arrive via the store.
        while True:
            await asyncio.sleep(CANCEL_POLL_INTERVAL_S)
            if not self._cancel_events:
                continue
            for task_id in await asyncio.to_thread(self._store.cancel_requested_ids):
                self.request_cancel(task_id)

    async def _periodic_cleanup(self) -> None:
        while True:
            await asyncio.sleep(self._config.cleanup_interval_s)
            try:
                await asyncio.to_thread(self._cleanup)  # type: ignore[arg-type]
            except Exception:  # a failed sweep must not stop the next one
                log.exception("periodic cleanup failed")

    async def _measure_speed(self, engine: Engine) -> None:
        """A short warm-up generation gives seconds-per-patch on this machine for ETAs."""
        request = ChunkRequest(text="Hello, this is a warm-up.", adapter=None, cfg_scale=2.0, steps=10, seed=0)
        counter = [0]

        def count() -> None:
            counter[0] += 1

        started = time.monotonic()
        try:
            await self._in_engine_thread(lambda: engine.generate(request, count))
        except VoxError as exc:
            log.warning("warm-up generation failed: %s", exc.message)
            return
        if counter[0]:
            self._record_speed((time.monotonic() - started) / counter[0], None)

    def _record_speed(self, seconds_per_patch: float, patches_per_char: float | None) -> None:
        stats = self._speed
        old = stats.get("seconds_per_patch")
        stats["seconds_per_patch"] = seconds_per_patch if old is None else 0.7 * old + 0.3 * seconds_per_patch
        if patches_per_char is not None:
            old_ppc = stats.get("patches_per_char")
            stats["patches_per_char"] = patches_per_char if old_ppc is None else 0.7 * old_ppc + 0.3 * patches_per_char
        self._speed_dirty = True

    async def _worker(self, index: int) -> None:
        while True:
            async with self._gate:
                record = await asyncio.to_thread(self._store.claim_next)
                if record is not None:
                    synthesized = await self._generate(record)
            if record is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), IDLE_POLL_INTERVAL_S)
                except asyncio.TimeoutError:
                    pass
                continue
            if synthesized is not None:
                await self._finish(record, synthesized)
            self._notify_done(record.task_id)

    # ---- one task -----------------------------------------------------------------------------

    async def _generate(self, record: TaskRecord) -> Synthesized | None:
        """Runs the model; returns None when the task already reached a final state (failed, etc.)."""
        cancel = self._cancel_events.setdefault(record.task_id, threading.Event())
        if record.cancel_requested:
            cancel.set()
        started = time.monotonic()
        self._running.add(record.task_id)
        lora, voice = record.params.lora_name, record.params.voice
        self._events.generation_started("task", lora, voice)
        try:
            result = await self._in_row_thread(lambda: self._synthesize_blocking(record, cancel))
        except ShutdownRequested:
            await asyncio.to_thread(self._store.requeue_interrupted_one, record.task_id)
            return None
        except TaskCancelled:
            await asyncio.to_thread(self._store.mark_cancelled, record.task_id)
            self._events.generation_finished("task", "cancelled", 0.0, time.monotonic() - started, lora, voice)
            return None
        except VoxError as exc:
            log.info("task %s failed: %s", record.task_id, exc.message)
            await asyncio.to_thread(self._store.fail, record.task_id, error=exc.message, error_status=exc.status_code)
            self._events.generation_finished("task", "failed", 0.0, time.monotonic() - started, lora, voice)
            return None
        except Exception as exc:  # the engine must never leave a task stuck in processing
            log.exception("task %s crashed the engine call", record.task_id)
            await asyncio.to_thread(self._store.fail, record.task_id,
                                    error=f"internal error: {type(exc).__name__}: {exc}", error_status=500)
            self._events.generation_finished("task", "failed", 0.0, time.monotonic() - started, lora, voice)
            return None
        finally:
            self._cancel_events.pop(record.task_id, None)
            if not self._shutdown.is_set():  # on shutdown stop() re-queues what is still running
                self._running.discard(record.task_id)
        assert isinstance(result, Synthesized)
        elapsed = time.monotonic() - started
        if result.num_patches:
            self._record_speed(elapsed / result.num_patches, result.num_patches / max(len(record.params.text), 1))
        return result

    def _synthesize_blocking(self, record: TaskRecord, cancel: threading.Event) -> Synthesized:
        """Engine or row thread: resolve the adapter, split the text, generate every chunk, join them.

        On a ConcurrentEngine `on_patch` runs on the engine's loop thread, shared by every row: it only
        counts, may raise, and hands progress to the BackgroundProgressWriter (never SQLite itself).
        """
        engine = self._engine
        assert engine is not None and engine.info is not None
        params = record.params
        adapter = self._adapter_for(params, engine)
        chunks = self._plan_chunks(params.text, engine.info)
        writer = self._progress_writer  # on a ConcurrentEngine on_patch runs on its loop thread: no SQLite there
        progress = PatchProgress(
            [engine.expected_patches(c) for c in chunks],
            write=(writer.for_task(record.task_id) if writer is not None
                   else lambda p, m, eta: self._store.update_progress(record.task_id, p, m, eta)),
            cancel=cancel, shutdown=self._shutdown,
        )
        first_patch = threading.Event()

        def on_patch() -> None:
            if not first_patch.is_set():
                first_patch.set()
                self._events.first_audio("task", time.time() - record.created_at, params.lora_name, params.voice)
            progress.on_patch()

        def stop_check() -> None:  # the same decisions as PatchProgress, for a request still waiting for a row
            if self._shutdown.is_set():
                raise ShutdownRequested("server is shutting down")
            if cancel.is_set():
                raise TaskCancelled("cancelled by request")

        pieces = []
        for index, chunk in enumerate(chunks):
            progress.start_chunk(index)
            pieces.append(engine.generate(_chunk_request(params, adapter, index, chunk, stop_check), on_patch))
        samples = crossfade_concat(pieces, engine.info.sample_rate_hz)
        return Synthesized(samples=samples, sample_rate_hz=engine.info.sample_rate_hz, num_patches=progress.done_total)

    # ---- streaming (tasks/stream.py) ----------------------------------------------------------

    def stream(self, params: SynthesisParams, *, arrived_at: float | None = None) -> AudioStream:
        """Start a streamed synthesis of validated `params`; no task is stored (ADR 0005)."""
        from .stream import DEFAULT_MAX_BUFFERED, AudioStream

        info = self.info
        if info is None or not self.loaded.is_set():
            raise NotReady("the model is still loading; retry shortly (GET /health shows model_loaded)")
        # A batched engine calls on_audio on its loop thread, shared by every row: waiting there for a slow
        # reader would stall all rows, so its streams buffer without a bound (one generation is finite).
        return AudioStream(self, params, info.sample_rate_hz, arrived_at=arrived_at,
                           max_buffered=None if self.concurrent else DEFAULT_MAX_BUFFERED)

    def _stream_blocking(self, params: SynthesisParams, emit: Callable[[np.ndarray], None],
                         cancel: threading.Event) -> int:
        """Engine or row thread: like _synthesize_blocking, but each patch goes to `emit` as it is decoded."""
        from ..audio.streaming import StreamCrossfader
        from .stream import ClientGone

        engine = self._engine
        assert engine is not None and engine.info is not None
        adapter = self._adapter_for(params, engine)
        chunks = self._plan_chunks(params.text, engine.info)
        joiner = StreamCrossfader(engine.info.sample_rate_hz)  # the 40 ms crossfade tasks use, done live

        def stop_check() -> None:
            if self._shutdown.is_set():
                raise ShutdownRequested("server is shutting down")
            if cancel.is_set():
                raise ClientGone("the client went away")

        def on_audio(samples: np.ndarray) -> None:
            stop_check()
            ready = joiner.push(samples)
            if ready.size:
                emit(ready)

        patches = 0
        for index, chunk in enumerate(chunks):
            if cancel.is_set():
                raise ClientGone("the client went away")
            joiner.start_chunk(last=index == len(chunks) - 1)
            patches += engine.generate_stream(_chunk_request(params, adapter, index, chunk, stop_check), on_audio)
            ready = joiner.end_chunk()
            if ready.size:
                emit(ready)
        rest = joiner.finish()
        if rest.size:
            emit(rest)
        return patches

    def _adapter_for(self, params: SynthesisParams, engine: Engine) -> AdapterSpec | None:
        """Re-resolved at run time: the folder may have changed since the request was validated."""
        if is_base_model_name(params.lora_name):
            return None
        adapter = self._catalog.resolve(params.lora_name or "")
        check_adapter_fits(adapter, engine.linear_shapes())
        return adapter

    def _plan_chunks(self, text: str, info: EngineInfo) -> list[str]:
        max_chars = self._config.chunk_max_chars
        chunks = split_text(text, max_chars)
        if len(chunks) == 1:
            return chunks  # untouched: sample-exact with the official package
        prefix, rest = voice_design_prefix(text) if info.architecture == "voxcpm2" else ("", text)
        if not prefix:
            return chunks
        # VoxCPM2 voice design: split only the words, then give every chunk the description
        return [prefix + c for c in split_text(rest, max(20, max_chars - len(prefix)))]

    async def _finish(self, record: TaskRecord, synthesized: Synthesized) -> None:
        await asyncio.to_thread(self._store_result, record, synthesized)  # one thread hop: encode, write, record

    def _store_result(self, record: TaskRecord, synthesized: Synthesized) -> None:
        """Worker thread: encode, write the file atomically, complete the task (or fail it)."""
        fmt = record.params.response_format.value
        file_name = audio_file_name(record.task_id, FILE_EXTENSIONS[fmt].lstrip("."))
        try:
            data = encode_audio(synthesized.samples, synthesized.sample_rate_hz, fmt)
            write_atomic(self._config.output_dir / file_name, data)
        except Exception as exc:
            log.exception("task %s: encoding or writing failed", record.task_id)
            self._store.fail(record.task_id, error=f"could not write the audio file: {exc}", error_status=500)
            self._events.generation_finished("task", "failed", 0.0, time.time() - (record.started_at or
                                             record.created_at), record.params.lora_name, record.params.voice)
            return
        duration_s = len(synthesized.samples) / synthesized.sample_rate_hz
        wall_s = time.time() - (record.started_at or record.created_at)
        self._events.generation_finished("task", "completed", duration_s, wall_s, record.params.lora_name,
                                         record.params.voice)
        self._store.complete(
            record.task_id, audio_file=file_name,
            sample_rate_hz=encoded_sample_rate_for(fmt, synthesized.sample_rate_hz),
            duration_s=round(duration_s, 3), num_patches=synthesized.num_patches,
            message="Speech synthesized successfully",
        )

    def _notify_done(self, task_id: str) -> None:
        for event in self._done_waiters.pop(task_id, []):
            event.set()


def is_concurrent(engine: object) -> bool:
    """A ConcurrentEngine (engine/base.py) is recognised by its `max_rows` and `load_summary`."""
    return engine is not None and hasattr(engine, "max_rows") and callable(getattr(engine, "load_summary", None))


def _chunk_request(params: SynthesisParams, adapter: AdapterSpec | None, index: int, chunk: str,
                   stop_check: Callable[[], None] | None = None) -> ChunkRequest:
    """Chunk `index` of a request, for tasks and streams alike."""
    return ChunkRequest(
        stop_check=stop_check,
        text=chunk, adapter=adapter, cfg_scale=params.cfg_scale, steps=params.steps,
        # chunk i is seeded with seed + i: a chunk's audio does not depend on scheduling
        seed=(params.seed + index) % SEED_MODULUS,
        ref_audio_path=params.ref_audio_path, ref_text=params.ref_text, normalize=params.normalize,
    )

