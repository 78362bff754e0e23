"""The one service the HTTP handlers call: validate, submit, wait, inspect, cancel, clean up.

It runs in every worker process. Only the engine owner also has a runner; the others talk to
the owner exclusively through the SQLite store (tasks in, results and progress out).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import logging
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path

import soundfile as sf

from ..config import DEFAULT_ROWS_PER_ENGINE, Settings
from ..domain import EngineInfo, OutputFormat, SynthesisParams, TaskStatus
from ..errors import (BadAudio, Conflict, InvalidInput, NotReady, Overloaded, TaskNotFound, VoxError)
from ..lora.catalog import LoRACatalog, check_adapter_fits, is_base_model_name
from ..paths import (AUDIO_FILE_RE, UPLOADS_DIR_NAME, new_task_id, resolve_download, resolve_reference_audio)
from .runner import EngineRunner
from .store import TaskRecord, TaskStore
from .stream import AudioStream
from .voices import VoiceLibrary, VoiceRecord

log = logging.getLogger("voxcpm_api.service")

OWNER_STALE_AFTER_S = 10.0
DEFAULT_SECONDS_PER_PATCH = 0.5
DEFAULT_PATCHES_PER_CHAR = 0.6
UPLOAD_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus"}
SYNC_POLL_INTERVAL_S = 0.5


@dataclass(frozen=True, slots=True)
class SynthesisInput:
    """A request as the client sent it (already type-checked by the API schema)."""

    text: str
    lora_name: str | None
    cfg_scale: float
    steps: int
    seed: int
    ref_audio_path: str | None
    ref_text: str | None
    response_format: OutputFormat
    normalize: bool = False
    voice: str | None = None  # a saved voice (POST /voices): its reference audio, transcript and defaults
    uploaded_ref: Path | None = None  # set by the upload endpoint instead of ref_audio_path
    # fields the client set itself (pydantic's model_fields_set); a voice's defaults fill the others.
    # None: guess (lora_name/cfg_scale/steps count as set when they differ from the request defaults)
    explicit_fields: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Readiness:
    model_loaded: bool
    engine_owner: bool
    owner_pid: int | None
    error: str | None
    info: EngineInfo | None


class TaskService:
    def __init__(self, settings: Settings, store: TaskStore, catalog: LoRACatalog) -> None:
        self.settings = settings
        self.store = store
        self.catalog = catalog
        self.runner: EngineRunner | None = None  # set when this process becomes the engine owner
        self.voices = VoiceLibrary(self)  # saved voices (tasks/voices.py)

    # ---- submission ---------------------------------------------------------------------------

    async def submit(self, request: SynthesisInput) -> TaskRecord:
        """Validate everything that can be validated now; nothing is stored unless all of it passes."""
        self._refuse_if_load_failed()
        params = await asyncio.to_thread(self._validate, request)
        return await self._enqueue(params)

    async def open_stream(self, request: SynthesisInput, *, arrived_at: float | None = None
                          ) -> tuple[int, AudioStream]:
        """Validate like submit() and start a streamed generation; no task is stored (ADR 0005).

        Returns (model sample rate, stream). Only the engine-owner process can stream (ADR 0002).
        """
        self._refuse_if_load_failed()
        if self.runner is None:
            raise NotReady("streaming is served by the engine-owner process; run with --workers 1 or use "
                           "async tasks (POST /synthesize)")
        self.require_ready()
        params = await asyncio.to_thread(self._validate, request)
        stream = self.runner.stream(params, arrived_at=arrived_at)
        return stream.sample_rate_hz, stream

    async def _enqueue(self, params: SynthesisParams) -> TaskRecord:
        estimate_s = self._estimate_s(params.text)
        record = await asyncio.to_thread(
            self.store.insert, new_task_id(), params,
            message="Task submitted; poll GET /task/{task_id} for status", estimated_time_s=estimate_s,
            max_pending=self.settings.max_queue,
        )
        if record is None:
            retry_after = int(min(3600, max(1.0, self.store.pending_estimate_ahead_s())))
            raise Overloaded(f"the queue is full ({self.settings.max_queue} tasks waiting); retry later",
                             retry_after_s=retry_after)
        if self.runner is not None:
            self.runner.wake()
        return record

    def resolve_voice(self, name: str) -> VoiceRecord:
        """A saved voice (name, ref_audio_path, transcript, lora_name, cfg_scale, steps); 404 'voice' if unknown."""
        return self.voices.resolve(name)

    def _validate(self, request: SynthesisInput) -> SynthesisParams:
        request = self.voices.apply(request)  # a saved voice: its audio, transcript and defaults
        text = request.text
        if not text.strip():
            raise InvalidInput("text must not be empty or whitespace", field="text")
        if len(text) > self.settings.max_text_chars:
            raise InvalidInput(f"text is {len(text)} characters; the limit is {self.settings.max_text_chars} "
                               "(--max-text-chars)", field="text")
        lora_name = self.check_lora(request.lora_name)
        ref_path = self._resolve_reference(request)
        if request.ref_text is not None and ref_path is None:
            raise InvalidInput("ref_text was given without reference audio (ref_audio_path or an upload)",
                               field="ref_text")
        info = self.engine_info()
        if ref_path is not None and not (request.ref_text or "").strip() and info is not None and info.needs_ref_text:
            raise InvalidInput("this model (VoxCPM 1.x) needs ref_text, the transcript of the reference audio, "
                               "to clone a voice", field="ref_text")
        if request.ref_text is not None and not request.ref_text.strip():
            raise InvalidInput("ref_text must not be empty or whitespace", field="ref_text")
        seed = request.seed if request.seed >= 0 else secrets.randbelow(2**31)
        return SynthesisParams(
            text=text, lora_name=lora_name, cfg_scale=request.cfg_scale, steps=request.steps, seed=seed,
            ref_audio_path=str(ref_path) if ref_path else None, ref_text=request.ref_text,
            response_format=request.response_format, normalize=request.normalize, voice=request.voice,
        )

    def check_lora(self, lora_name: str | None) -> str | None:
        """None for the base model; else the name, once it resolves (404/403) and fits the model (422)."""
        if is_base_model_name(lora_name):
            return None
        spec = self.catalog.resolve(lora_name or "")
        shapes = self._linear_shapes()
        if shapes is not None:
            check_adapter_fits(spec, shapes)
        return lora_name

    def _resolve_reference(self, request: SynthesisInput) -> Path | None:
        if request.uploaded_ref is not None:
            path = request.uploaded_ref
        elif request.ref_audio_path is not None:
            path = resolve_reference_audio(request.ref_audio_path, list(self.settings.ref_audio_dir))
        else:
            return None
        check_audio_decodable(path)
        return path

    def _linear_shapes(self) -> dict[str, tuple[int, int]] | None:
        if self.runner is not None and self.runner.linear_shapes() is not None:
            return self.runner.linear_shapes()
        raw = self.store.get_meta("linear_shapes")
        if isinstance(raw, dict):
            return {k: (int(v[0]), int(v[1])) for k, v in raw.items()}
        return None

    def _estimate_s(self, text: str) -> float:
        """Own generation time from measured speed on this machine, plus the queue ahead."""
        runner = self.runner  # the engine owner knows it without a database read
        stats = runner.speed_stats() if runner is not None else self.store.get_meta("speed", {}) or {}
        assert isinstance(stats, dict)
        per_patch = float(stats.get("seconds_per_patch", DEFAULT_SECONDS_PER_PATCH))
        per_char = float(stats.get("patches_per_char", DEFAULT_PATCHES_PER_CHAR))
        return round(per_patch * per_char * len(text), 2)

    def _refuse_if_load_failed(self) -> None:
        error = self.readiness().error
        if error:
            raise NotReady(f"the model failed to load, so no task can run: {error}")

    async def submit_upload(self, request: SynthesisInput, file_name: str, data: bytes) -> TaskRecord:
        """Cloning from uploaded bytes. The file is kept only if the whole request is accepted.

        Stored content-addressed (sha256), so re-uploading the same voice reuses the file and the
        engine's cached prompt features.
        """
        self._refuse_if_load_failed()
        if len(data) == 0:
            raise BadAudio("the uploaded reference audio is empty", field="file")
        if len(data) > self.settings.max_upload_bytes:
            raise InvalidInput(f"upload is {len(data)} bytes; the limit is {self.settings.max_upload_bytes}",
                               field="file")
        suffix = Path(file_name or "").suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            suffix = ".audio"
        # absolute, like every stored ref_audio_path: cleanup compares resolved paths to spare active inputs
        target = (self.settings.output_dir / UPLOADS_DIR_NAME).resolve() / f"{hashlib.sha256(data).hexdigest()}{suffix}"
        staged = target.with_name(f".incoming-{new_task_id()}{suffix}")
        await asyncio.to_thread(_stage, staged, data, file_name)
        created = False
        try:
            params = await asyncio.to_thread(self._validate, replace(request, uploaded_ref=staged))
            created = await asyncio.to_thread(_promote, staged, target)
            params = replace(params, ref_audio_path=str(target))
            return await self._enqueue(params)
        except BaseException:
            if created:
                target.unlink(missing_ok=True)
            raise
        finally:
            staged.unlink(missing_ok=True)

    # ---- reading ------------------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord:
        record = await asyncio.to_thread(self.store.get, task_id)
        if record is None:
            raise TaskNotFound(f"task '{task_id}' not found")
        return record

    async def wait(self, task_id: str) -> TaskRecord:
        """Await a final state without blocking the event loop (sync mode)."""
        while True:
            event = self.runner.done_event(task_id) if self.runner is not None else None
            record = await self.get(task_id)
            if record.status.is_final:
                return record
            if event is not None:
                try:
                    await asyncio.wait_for(event.wait(), SYNC_POLL_INTERVAL_S * 4)
                except asyncio.TimeoutError:
                    pass
            else:
                await asyncio.sleep(SYNC_POLL_INTERVAL_S / 5)

    async def list_tasks(self, status: TaskStatus | None, limit: int) -> tuple[list[TaskRecord], int, int]:
        return await asyncio.to_thread(self.store.listing, status, limit)

    async def cancel(self, task_id: str) -> TaskRecord:
        before = await asyncio.to_thread(self.store.request_cancel, task_id)
        if before is None:
            raise TaskNotFound(f"task '{task_id}' not found")
        if before.is_final:
            raise Conflict(f"task '{task_id}' is already {before.value}; nothing to cancel")
        if before is TaskStatus.PROCESSING and self.runner is not None:
            self.runner.request_cancel(task_id)
        return await self.get(task_id)

    def download_path(self, file_name: str) -> Path:
        path = resolve_download(self.settings.output_dir, file_name)
        if not self.store.is_known_audio_file(file_name):
            raise_missing()
        return path

    # ---- housekeeping -------------------------------------------------------------------------

    async def cleanup(self, max_age_s: float) -> int:
        return await asyncio.to_thread(self.cleanup_blocking, max_age_s)

    def cleanup_blocking(self, max_age_s: float | None = None) -> int:
        """Delete our output files older than max_age_s; never inputs of unfinished tasks."""
        max_age_s = self.settings.cleanup_max_age_s if max_age_s is None else max_age_s
        cutoff = time.time() - max_age_s
        output_dir = self.settings.output_dir
        active_refs = {t.params.ref_audio_path for s in (TaskStatus.PENDING, TaskStatus.PROCESSING)
                       for t in self.store.list_tasks(s, limit=1_000_000)}
        deleted_audio: list[str] = []
        deleted = 0
        candidates = list(output_dir.glob("tts_*")) + list(output_dir.glob(".*.part"))
        uploads = output_dir / UPLOADS_DIR_NAME
        candidates += list(uploads.glob("*")) if uploads.is_dir() else []
        for path in candidates:
            try:
                if not path.is_file() or path.stat().st_mtime >= cutoff or str(path.resolve()) in active_refs:
                    continue
                if (path.parent == output_dir and path.name.startswith("tts_")
                        and not AUDIO_FILE_RE.fullmatch(path.name)):
                    continue  # not one of ours
                path.unlink()
            except FileNotFoundError:
                continue
            deleted += 1
            if AUDIO_FILE_RE.fullmatch(path.name):
                deleted_audio.append(path.name)
        if deleted_audio:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            self.store.forget_audio_files(deleted_audio, f"Audio file removed by cleanup at {stamp}")
        log.info("cleanup removed %d files older than %.0f s", deleted, max_age_s)
        return deleted

    # ---- readiness ----------------------------------------------------------------------------

    def readiness(self) -> Readiness:
        if self.runner is not None:
            return Readiness(model_loaded=self.runner.info is not None and self.runner.loaded.is_set(),
                             engine_owner=True, owner_pid=None, error=self.runner.load_error, info=self.runner.info)
        state = self.store.get_meta("engine", {}) or {}
        assert isinstance(state, dict)
        fresh = time.time() - float(state.get("heartbeat", 0)) < OWNER_STALE_AFTER_S
        return Readiness(model_loaded=bool(state.get("loaded")) and fresh, engine_owner=False,
                         owner_pid=state.get("pid") if fresh else None, error=state.get("error"),
                         info=self.engine_info())

    def max_concurrent(self) -> int:
        """Generations at once as the engine owner resolved --max-concurrent (GET /tasks)."""
        if self.runner is not None and self.runner.loaded.is_set():
            return self.runner.max_concurrent
        known = self.settings.effective_max_concurrent
        if known is not None:
            return known
        raw = self.store.get_meta("limits")  # "auto" devices: only the owner knows how many GPUs it found
        if isinstance(raw, dict) and isinstance(raw.get("max_concurrent"), int):
            return int(raw["max_concurrent"])
        return DEFAULT_ROWS_PER_ENGINE

    def engine_info(self) -> EngineInfo | None:
        if self.runner is not None and self.runner.info is not None:
            return self.runner.info
        raw = self.store.get_meta("engine_info")
        return EngineInfo(**raw) if isinstance(raw, dict) else None

    def require_ready(self) -> None:
        if not self.readiness().model_loaded:
            raise NotReady("the model is still loading; retry shortly (GET /health shows model_loaded)")


def _stage(staged: Path, data: bytes, client_name: str) -> None:
    from ..audio.encoders import write_atomic

    staged.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(staged, data)
    try:
        check_audio_decodable(staged)
    except BadAudio as exc:  # undecodable: no task can use it, so do not keep it
        staged.unlink(missing_ok=True)
        raise BadAudio(f"the uploaded file '{Path(client_name or 'file').name}' cannot be decoded as wav, "
                       "flac, mp3 or ogg audio, or holds no samples", field="file") from exc


def _promote(staged: Path, target: Path) -> bool:
    """Move the staged upload to its content address; False if that content was already stored."""
    if target.exists():
        return False
    os.replace(staged, target)
    return True


def raise_missing() -> None:
    from ..errors import FileMissing

    raise FileMissing("file not found")


def check_audio_decodable(path: Path) -> None:
    """Cheap header check with libsndfile (wav, flac, ogg/opus, mp3); raises BadAudio."""
    try:
        info = sf.info(str(path))
    except Exception as exc:  # soundfile raises RuntimeError/LibsndfileError/TypeError for junk
        raise BadAudio(f"reference audio '{path.name}' cannot be decoded as wav, flac, mp3 or ogg audio",
                       field="ref_audio_path") from exc
    if info.frames <= 0 or info.samplerate <= 0:
        raise BadAudio(f"reference audio '{path.name}' holds no samples", field="ref_audio_path")


__all__ = ["SynthesisInput", "TaskService", "Readiness", "VoxError"]
