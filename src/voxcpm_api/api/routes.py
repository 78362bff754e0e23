"""Route handlers: parse, call the task service once, shape the response."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import ValidationError

from ..audio.encoders import MEDIA_TYPES
from ..domain import OutputFormat, TaskStatus
from ..errors import InvalidInput, VoxError
from ..paths import display_path
from ..tasks.service import SynthesisInput, TaskService
from ..tasks.store import TaskRecord
from .schemas import (SYNTHESIS_ERRORS, CleanupResult, Health, LoRAList, SubmitResponse, SynthesizeRequest,
                      SyncResponse, TaskList, TaskView, error_responses)

UPLOAD_READ_BYTES = 1024 * 1024
DOWNLOAD_TYPES = sorted(set(MEDIA_TYPES.values()))  # /download serves only files this service encoded


def get_service(request: Request) -> TaskService:
    return request.app.state.service  # type: ignore[no-any-return]


ServiceDep = Annotated[TaskService, Depends(get_service)]

public = APIRouter()
protected = APIRouter()


@public.get("/health", response_model=Health, tags=["service"])
async def health(service: ServiceDep) -> Health:
    """Liveness plus readiness: answers while the model loads (model_loaded false)."""
    ready = service.readiness()
    info = ready.info
    return Health(status="unhealthy" if ready.error else "healthy", model_loaded=ready.model_loaded,
                  model=info.model_id if info else service.settings.model,
                  architecture=info.architecture if info else None,
                  sample_rate=info.sample_rate_hz if info else None, device=info.device if info else None,
                  engine_owner=ready.engine_owner, error=ready.error)


@protected.get("/loras", response_model=LoRAList, tags=["lora"])
async def list_loras(service: ServiceDep) -> LoRAList:
    """Every adapter directory under --lora-dir (nested ones by relative path); rescanned per call."""
    names = service.catalog.list_names()
    return LoRAList(loras=names, count=len(names))


@protected.post("/synthesize", response_model=SubmitResponse | SyncResponse, tags=["synthesis"],
                responses=SYNTHESIS_ERRORS)
async def synthesize(body: SynthesizeRequest, request: Request, service: ServiceDep) -> SubmitResponse | SyncResponse:
    """Async (default): returns a task_id at once. Sync: waits for the file without blocking the server."""
    record = await service.submit(to_synthesis_input(body))
    return await _respond(service, record, body.async_mode, request)


@protected.post("/synthesize/upload", response_model=SubmitResponse | SyncResponse, tags=["synthesis"],
                responses=SYNTHESIS_ERRORS)
async def synthesize_upload(
    request: Request, service: ServiceDep,
    file: Annotated[UploadFile, File(description="Reference audio (wav, flac, mp3, ogg) to clone.")],
    text: Annotated[str, Form()], ref_text: Annotated[str | None, Form()] = None,
    lora_name: Annotated[str | None, Form()] = None, cfg_scale: Annotated[float, Form()] = 2.0,
    steps: Annotated[int, Form()] = 10, seed: Annotated[int, Form()] = -1,
    async_mode: Annotated[bool, Form()] = True, response_format: Annotated[OutputFormat, Form()] = OutputFormat.MP3,
    normalize: Annotated[bool, Form()] = False,
) -> SubmitResponse | SyncResponse:
    """Voice cloning from an uploaded reference instead of a server-side file."""
    try:
        body = SynthesizeRequest(text=text, ref_text=ref_text, lora_name=lora_name, cfg_scale=cfg_scale, steps=steps,
                                 seed=seed, async_mode=async_mode, response_format=response_format,
                                 normalize=normalize)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    data = await _read_capped(file, service.settings.max_upload_bytes)
    record = await service.submit_upload(to_synthesis_input(body), file.filename or "", data)
    return await _respond(service, record, body.async_mode, request)


@protected.get("/task/{task_id}", response_model=TaskView, tags=["tasks"], responses=error_responses(404))
async def get_task(task_id: str, request: Request, service: ServiceDep) -> TaskView:
    return _task_view(await service.get(task_id), service, request)


@protected.delete("/task/{task_id}", response_model=TaskView, tags=["tasks"], responses=error_responses(404, 409))
async def cancel_task(task_id: str, request: Request, service: ServiceDep) -> TaskView:
    """Cancel a pending task at once, or a processing one at its next patch (status becomes cancelled)."""
    return _task_view(await service.cancel(task_id), service, request)


@protected.get("/tasks", response_model=TaskList, tags=["tasks"])
async def list_tasks(request: Request, service: ServiceDep, status: TaskStatus | None = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> TaskList:
    records, total, processing = await service.list_tasks(status, limit)
    return TaskList(tasks=[_task_view(r, service, request) for r in records], total=total, processing=processing,
                    max_concurrent=service.max_concurrent())


@protected.get("/download/{filename}", tags=["files"], response_class=FileResponse,
               responses={200: {"description": "The audio file", "content": {t: {} for t in DOWNLOAD_TYPES}},
                          **error_responses(404)})
async def download(filename: str, service: ServiceDep) -> FileResponse:
    """Only audio files this service wrote; anything else is 404."""
    path = service.download_path(filename)
    media_type = MEDIA_TYPES.get(path.suffix.lstrip("."), "application/octet-stream")
    return FileResponse(path, media_type=media_type, filename=filename)


@protected.delete("/cleanup", response_model=CleanupResult, tags=["files"])
async def cleanup(service: ServiceDep, max_age_s: Annotated[float, Query(ge=0)] = 3600.0) -> CleanupResult:
    """Delete output files older than max_age_s (never those of pending or processing tasks)."""
    return CleanupResult(message="Cleanup completed", deleted_count=await service.cleanup(max_age_s))


# ---- shaping helpers --------------------------------------------------------------------------


def to_synthesis_input(body: SynthesizeRequest) -> SynthesisInput:
    """The service's input for a /synthesize-shaped body; a saved voice's defaults fill unset fields."""
    return SynthesisInput(text=body.text, lora_name=body.lora_name, cfg_scale=body.cfg_scale, steps=body.steps,
                          seed=body.seed, ref_audio_path=body.ref_audio_path, ref_text=body.ref_text,
                          response_format=body.response_format, normalize=body.normalize, voice=body.voice,
                          explicit_fields=frozenset(body.model_fields_set))


async def _respond(service: TaskService, record: TaskRecord, async_mode: bool,
                   request: Request) -> SubmitResponse | SyncResponse:
    if async_mode:
        return SubmitResponse(
            task_id=record.task_id, message="Task submitted; poll GET /task/{task_id} for status and progress",
            estimated_time=_seconds(record.estimated_time_s + service.store.pending_estimate_ahead_s(record.task_id)),
            seed=record.params.seed, status_url=str(request.url_for("get_task", task_id=record.task_id)))
    done = await service.wait(record.task_id)
    if done.audio_file is None:
        raise _task_error(done)
    return SyncResponse(task_id=done.task_id, message="Speech synthesized successfully",
                        audio_path=display_path(service.settings.output_dir, done.audio_file),
                        sample_rate=done.sample_rate_hz or 0, duration_s=done.duration_s or 0.0, seed=done.params.seed,
                        lora_name=done.params.lora_name,
                        download_url=str(request.url_for("download", filename=done.audio_file)))


def _task_error(record: TaskRecord) -> VoxError:
    """A sync request whose task failed gets the task's error with the status it maps to."""
    error = VoxError(record.error or f"task ended as {record.status.value}")
    error.status_code = record.error_status or (409 if record.status is TaskStatus.CANCELLED else 500)
    return error


def _task_view(record: TaskRecord, service: TaskService, request: Request) -> TaskView:
    audio_path = display_path(service.settings.output_dir, record.audio_file) if record.audio_file else None
    download_url = str(request.url_for("download", filename=record.audio_file)) if record.audio_file else None
    return TaskView(
        task_id=record.task_id, status=record.status, message=record.message, progress=round(record.progress, 4),
        created_at=datetime.fromtimestamp(record.created_at).isoformat(),
        updated_at=datetime.fromtimestamp(record.updated_at).isoformat(),
        estimated_time=None if record.estimated_time_s is None else _seconds(record.estimated_time_s),
        audio_path=audio_path, error=record.error, sample_rate=record.sample_rate_hz, duration_s=record.duration_s,
        lora_name=record.params.lora_name, seed=record.params.seed, response_format=record.params.response_format,
        attempts=record.attempts, download_url=download_url, voice=record.params.voice)


def _seconds(value: float | None) -> int:
    return max(0, int(round(value or 0.0)))


async def _read_capped(file: UploadFile, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while block := await file.read(UPLOAD_READ_BYTES):
        size += len(block)
        if size > max_bytes:
            raise InvalidInput(f"upload exceeds {max_bytes} bytes", field="file")
        chunks.append(block)
    return b"".join(chunks)
