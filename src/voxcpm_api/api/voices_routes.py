"""Saved voices: upload a reference recording once, then name it in synthesis requests.

    POST   /voices          multipart: audio, name, transcript, [lora_name, cfg_scale, steps]  -> 201 voice
    GET    /voices          {"voices": [...], "count": N}
    GET    /voices/{name}   one voice
    DELETE /voices/{name}   forget it (its audio goes too unless another voice shares the same bytes)

All the checks and the storage live in tasks/voices.py; these handlers only parse and shape.
The API-key middleware covers these paths like every other non-public one.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from pydantic import BaseModel, Field

from ..tasks.voices import UploadTooLarge, VoiceRecord
from .routes import ServiceDep
from .schemas import error_responses

UPLOAD_READ_BYTES = 1024 * 1024

router = APIRouter(tags=["voices"])


class VoiceView(BaseModel):
    name: str
    transcript: str | None = Field(description="What is said in the audio (null: none stored; VoxCPM2 only).")
    lora_name: str | None = Field(description="Default adapter for requests using this voice (null: base model).")
    cfg_scale: float | None = Field(description="Default cfg_scale (null: the request's own default).")
    steps: int | None = Field(description="Default steps (null: the request's own default).")
    sha256: str = Field(description="sha256 of the stored audio bytes.")
    duration_s: float
    sample_rate: int
    format: str = Field(description="wav | flac | mp3 | ogg | opus, detected from the bytes.")
    size_bytes: int
    created_at: datetime
    features_cached: bool = Field(description="The model's prompt features for this voice are computed and stored.")


class VoiceList(BaseModel):
    voices: list[VoiceView]
    count: int


class VoiceDeleted(BaseModel):
    message: str
    name: str


@router.post("/voices", response_model=VoiceView, status_code=201,
             responses=error_responses(400, 404, 409, 413, 422, 503))
async def create_voice(
    service: ServiceDep,
    audio: Annotated[UploadFile | None, File(description="Reference recording: wav, flac, mp3 or ogg (vorbis/opus), "
                                             "at most --max-upload-bytes and --voice-max-duration-s.")] = None,
    name: Annotated[str | None,
                    Form(description="1-64 of A-Z a-z 0-9 _ . - (starting with a letter or digit).")] = None,
    transcript: Annotated[str | None, Form(description="The words spoken in the audio; required by VoxCPM 1.x "
                                           "models, optional for VoxCPM2.")] = None,
    lora_name: Annotated[str | None, Form(description="Default adapter (GET /loras).")] = None,
    cfg_scale: Annotated[float | None, Form(description="Default cfg_scale, in (0, 10].")] = None,
    steps: Annotated[int | None, Form(description="Default diffusion steps, 1..100.")] = None,
) -> VoiceView:
    """Save a voice. Nothing is stored unless every check passes (409 if the name is taken)."""
    data = await _read_capped(audio, service.settings.max_upload_bytes) if audio is not None else None
    record = await service.voices.create(name=name, transcript=transcript, lora_name=lora_name, cfg_scale=cfg_scale,
                                         steps=steps, audio=data, file_name=(audio.filename or "") if audio else "")
    return voice_view(record)


@router.get("/voices", response_model=VoiceList)
async def list_voices(service: ServiceDep) -> VoiceList:
    voices = [voice_view(r) for r in await service.voices.list()]
    return VoiceList(voices=voices, count=len(voices))


@router.get("/voices/{name}", response_model=VoiceView, responses=error_responses(404))
async def get_voice(name: str, service: ServiceDep) -> VoiceView:
    return voice_view(await service.voices.get(name))


@router.delete("/voices/{name}", response_model=VoiceDeleted, responses=error_responses(404))
async def delete_voice(name: str, service: ServiceDep) -> VoiceDeleted:
    """Tasks already queued with this voice still run; new requests naming it get 404."""
    record = await service.voices.delete(name)
    return VoiceDeleted(message=f"Voice '{record.name}' deleted", name=record.name)


def voice_view(record: VoiceRecord) -> VoiceView:
    return VoiceView(
        name=record.name, transcript=record.transcript, lora_name=record.lora_name, cfg_scale=record.cfg_scale,
        steps=record.steps, sha256=record.sha256, duration_s=record.duration_s, sample_rate=record.sample_rate,
        format=record.format, size_bytes=record.size_bytes,
        created_at=datetime.fromtimestamp(record.created_at, tz=timezone.utc), features_cached=record.features_cached)


async def _read_capped(file: UploadFile, max_bytes: int) -> bytes:
    too_big = UploadTooLarge(f"the uploaded audio exceeds {max_bytes} bytes (--max-upload-bytes)", field="audio")
    if file.size is not None and file.size > max_bytes:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    while block := await file.read(UPLOAD_READ_BYTES):
        size += len(block)
        if size > max_bytes:
            raise too_big
        chunks.append(block)
    return b"".join(chunks)
