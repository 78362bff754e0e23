"""OpenAI-compatible text-to-speech: POST /v1/audio/speech and GET /v1/models.

Follows OpenAI's request and response contract so the official SDKs and tools built for them work
unchanged (`OpenAI(base_url="http://host:8000/v1", api_key=...)`):

* `model` is accepted and ignored (the loaded model speaks; it is echoed in `X-Model`,
  percent-encoded where it is not printable ASCII);
* `voice` is `default` (or empty) for the base model, a LoRA name from GET /loras, or a saved voice
  from GET /voices (string or `{"id": ...}`); anything else is a 400 naming `voice`;
* `instructions` become VoxCPM2's voice-design prefix "(instructions)text"; VoxCPM 1.x has no
  such control, so non-empty instructions are refused with 400;
* `speed` 0.25..4.0 changes tempo, not pitch (FFmpeg atempo; see audio/streaming.py);
* the audio is streamed as it is generated, as OpenAI's is: without `stream_format` (or with
  `"audio"`) the encoded bytes leave chunked as they are made, every `response_format` alike (WAV
  with the unknown-size RIFF header of audio/streaming.py); `"sse"` sends `speech.audio.delta`
  events (base64 audio) and a final `speech.audio.done`;
* extensions: `seed`, `cfg_scale`, `steps`;
* `pcm` is 16-bit little-endian mono at the model's rate (OpenAI's is 24 kHz): see X-Sample-Rate.

Every error on these routes has OpenAI's body `{"error": {"message", "type", "param", "code"}}`,
and request validation errors are 400 as OpenAI returns them; other routes keep `{"detail": ...}`.
The speech handler answers only once the first patch is decoded, so errors before the first audio
are such JSON errors; a later failure cuts the chunked body (SSE: an `error` event).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from string import punctuation
from typing import Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from ..audio.streaming import SPEED_MAX, SPEED_MIN, StreamEncoder, TimeStretcher
from ..domain import OutputFormat
from ..errors import InvalidInput, NotFound, Overloaded, VoxError
from ..lora.catalog import is_base_model_name
from ..tasks.service import SynthesisInput, TaskService
from ..tasks.stream import AudioStream
from .schemas import SEED_MAX
from .routes import ServiceDep
from .stream_routes import AudioStreamingResponse, encoded_audio, first_audio, stream_headers

log = logging.getLogger("voxcpm_api.openai")

DEFAULT_VOICE_NAMES = frozenset({"default"})
HEADER_SAFE = punctuation.replace("%", "")  # with letters and digits: kept as is in the X-Model header
# our error fields -> the OpenAI request parameter the client sent
PARAM_OF_FIELD = {"text": "input", "lora_name": "voice", "voice": "voice", "ref_audio_path": "voice",
                  "ref_text": "voice", "file": "voice", "normalize": None}


# ---- errors in OpenAI's shape -------------------------------------------------------------------


def openai_error_body(message: str, *, status: int, param: str | None = None, code: str | None = None
                      ) -> dict[str, dict[str, object]]:
    if status == 429:
        kind = "rate_limit_error"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=openai_error_body(message, status=status, param=param, code=code),
                        headers=headers)


def _from_vox_error(exc: VoxError) -> JSONResponse:
    param = PARAM_OF_FIELD.get(exc.field, exc.field) if exc.field else None
    status = exc.status_code
    if status == 422 or (status == 404 and param is not None):
        status = 400  # OpenAI answers every invalid parameter with 400
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
    return openai_error(status, exc.message, param=param, headers=headers)


def _from_validation_error(exc: RequestValidationError) -> JSONResponse:
    messages: list[str] = []
    param: str | None = None
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query")]
        if loc and param is None and error.get("type") != "json_invalid":
            param = loc[0]
        where = ".".join(loc)
        messages.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return openai_error(400, "; ".join(messages) or "invalid request", param=param)


class OpenAIRoute(APIRoute):
    """Route class of this router: VoxError and request validation errors leave in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def openai_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _from_validation_error(exc)
            except VoxError as exc:
                return _from_vox_error(exc)

        return openai_handler


router = APIRouter(route_class=OpenAIRoute)




# ---- models -------------------------------------------------------------------------------------


class VoiceRef(BaseModel):
    id: StrictStr


class SpeechRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "voxcpm", "input": "Hello from VoxCPM.", "voice": "default", "response_format": "mp3"},
        {"model": "voxcpm", "input": "Streaming, as it is made.", "voice": "my_lora", "stream_format": "audio",
         "speed": 1.25, "seed": 42},
    ]})

    model: StrictStr = Field(..., description="Accepted for compatibility and ignored: the loaded model speaks.")
    input: StrictStr = Field(..., description="Text to speak (limit: --openai-max-input-chars, default 4096).")
    voice: StrictStr | VoiceRef = Field(
        "default", description="`default` = base model; a LoRA name (GET /loras); a saved voice (GET /voices).")
    instructions: StrictStr | None = Field(None, description="VoxCPM2 only: voice design, sent as \"(...)\" + input.")
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=SPEED_MIN, le=SPEED_MAX, description="Tempo 0.25..4.0, pitch preserved.")
    stream_format: Literal["audio", "sse"] | None = Field(
        None, description="Absent or `audio`: the encoded bytes, chunked as they are made. `sse`: "
                          "speech.audio.delta events.")
    seed: StrictInt = Field(-1, ge=-1, le=SEED_MAX, description="Extension: -1 = random; reported in X-Seed.")
    cfg_scale: float = Field(2.0, gt=0.0, le=10.0, description="Extension: classifier-free guidance.")
    steps: StrictInt = Field(10, ge=1, le=100, description="Extension: diffusion steps per patch.")


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, for a human.")
    type: str = Field(description="invalid_request_error | rate_limit_error | server_error")
    param: str | None = Field(None, description="The request parameter at fault, where one is.")
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """OpenAI's error body; every error on the /v1 routes has this shape."""

    error: OpenAIErrorDetail


OPENAI_ERROR_DESCRIPTIONS = {
    400: "Invalid request (OpenAI answers every invalid parameter with 400)",
    401: "Missing or wrong API key (only with --api-key)",
    404: "Not found (the message says what)",
    429: "Busy: retry after Retry-After seconds",
    503: "The model is not loaded (yet); retry shortly",
}


def openai_error_responses(*codes: int) -> dict[int | str, dict[str, object]]:
    return {code: {"model": OpenAIErrorBody, "description": OPENAI_ERROR_DESCRIPTIONS[code]} for code in codes}


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "voxcpm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- routes -------------------------------------------------------------------------------------


def _model_card(request: Request, service: TaskService) -> ModelCard:
    info = service.engine_info()
    created = getattr(request.app.state, "openai_models_created", None)
    if created is None:  # the first time anyone asked: stable for the life of the process
        created = int(time.time())
        request.app.state.openai_models_created = created
    return ModelCard(id=info.model_id if info is not None else service.settings.model, created=created)


@router.get("/v1/models", response_model=ModelList, tags=["openai"])
async def list_models(request: Request, service: ServiceDep) -> ModelList:
    """The loaded model, as an OpenAI model list."""
    return ModelList(data=[_model_card(request, service)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["openai"],
            responses=openai_error_responses(404))
async def retrieve_model(model_id: str, request: Request, service: ServiceDep) -> ModelCard | JSONResponse:
    card = _model_card(request, service)
    if model_id != card.id:
        return openai_error(404, f"The model '{model_id}' does not exist; this server serves '{card.id}'",
                            param="model", code="model_not_found")
    return card


@router.post("/v1/audio/speech", tags=["openai"], response_class=Response,
             responses={200: {"description": "Audio, chunked as it is generated, or text/event-stream (sse).",
                              "content": {"audio/mpeg": {}, "audio/ogg": {}, "audio/aac": {}, "audio/flac": {},
                                          "audio/wav": {}, "audio/pcm": {}, "text/event-stream": {}}},
                        **openai_error_responses(400, 404, 429, 503)})
async def create_speech(body: SpeechRequest, service: ServiceDep) -> Response:
    """OpenAI's speech endpoint over VoxCPM (+ LoRA adapters and saved voices), streamed as generated."""
    arrived_at = time.time()
    settings = service.settings
    if not body.input.strip():
        raise InvalidInput("input must not be empty or whitespace", field="input")
    if len(body.input) > settings.openai_max_input_chars:
        raise InvalidInput(f"input is {len(body.input)} characters; the maximum is {settings.openai_max_input_chars}",
                           field="input")
    service.require_ready()
    text = _apply_instructions(service, body.input, body.instructions)
    lora_name, voice = await _resolve_voice(service, body.voice)
    explicit = {"text", "seed", "response_format"} | ({"lora_name"} if lora_name else set())
    explicit |= {f for f in ("cfg_scale", "steps") if f in body.model_fields_set}
    request = SynthesisInput(
        text=text, lora_name=lora_name, cfg_scale=body.cfg_scale, steps=body.steps, seed=body.seed,
        ref_audio_path=None, ref_text=None,
        # the task-side format only matters for tasks; the response is encoded here
        response_format=OutputFormat(body.response_format) if body.response_format != "aac" else OutputFormat.MP3,
        voice=voice, explicit_fields=frozenset(explicit))
    sample_rate, stream = await service.open_stream(request, arrived_at=arrived_at)
    first = await first_audio(stream)  # errors until here are JSON errors; after it the status is 200
    try:
        stretcher = TimeStretcher(body.speed, sample_rate) if body.speed != 1.0 else None
        encoder = StreamEncoder(body.response_format, sample_rate)
    except BaseException:
        stream.close()
        raise
    headers = {"X-Model": header_value(body.model), **stream_headers(stream, encoder)}
    audio = encoded_audio(first, stream, encoder, stretcher)
    if body.stream_format == "sse":
        return AudioStreamingResponse(_sse_events(audio, stream, encoder), media_type="text/event-stream",
                                      headers=headers)
    # no stream_format, or "audio": OpenAI's default, the encoded bytes chunked as they are made
    return AudioStreamingResponse(audio, media_type=encoder.media_type, headers=headers)


# ---- helpers ------------------------------------------------------------------------------------


def header_value(text: str) -> str:
    """`text` as a header value: printable ASCII as is, anything else (non-Latin-1, control characters,
    spaces, '%') percent-encoded as UTF-8. Echoing a client's `model` verbatim was a 500 whenever it held
    a character a header cannot carry (found by tests/api/test_fuzz_schema.py)."""
    return quote(text, safe=HEADER_SAFE)


def _apply_instructions(service: TaskService, text: str, instructions: str | None) -> str:
    if instructions is None or not instructions.strip():
        return text
    info = service.engine_info()
    if info is None or info.architecture != "voxcpm2":
        raise InvalidInput("instructions need a VoxCPM2 model (voice design); the loaded model is VoxCPM "
                           f"{'1.x' if info is not None else '(unknown)'}, so leave instructions empty",
                           field="instructions")
    return f"({instructions.strip()}){text}"


async def _resolve_voice(service: TaskService, voice: str | VoiceRef) -> tuple[str | None, str | None]:
    """(lora_name, saved voice): `default`/empty = base model, then LoRA names, then saved voices."""
    name = (voice.id if isinstance(voice, VoiceRef) else voice).strip()
    if name.lower() in DEFAULT_VOICE_NAMES or is_base_model_name(name):
        return None, None
    if name in await asyncio.to_thread(service.catalog.list_names):
        return name, None
    resolve = getattr(service, "resolve_voice", None)  # saved voices (POST /voices)
    if resolve is not None:
        try:
            await asyncio.to_thread(resolve, name)
            return None, name
        except NotFound:
            pass
    where = "a LoRA name from GET /loras" + (" or a saved voice from GET /voices" if resolve is not None else "")
    raise InvalidInput(f"unknown voice '{name[:80]}': use 'default' (the base model), {where}", field="voice")


def _sse(event: dict[str, object]) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def _sse_events(audio: AsyncIterator[bytes], stream: AudioStream, encoder: StreamEncoder
                      ) -> AsyncIterator[bytes]:
    """speech.audio.delta per encoded piece, then speech.audio.done; a late failure is an `error` event."""
    try:
        async for data in audio:
            yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
    except VoxError as exc:
        body = openai_error_body(exc.message, status=exc.status_code)
        yield _sse({"type": "error", **body})
        return
    finally:
        await audio.aclose()  # type: ignore[attr-defined]
    yield _sse({"type": "speech.audio.done", "sample_rate": encoder.sample_rate_hz, "seed": stream.params.seed,
                "duration_s": round(encoder.samples_in / encoder.input_sample_rate_hz, 3)})
