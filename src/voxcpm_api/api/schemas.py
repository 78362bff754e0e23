"""Request and response bodies. Field names and shapes follow the seed's README exactly;
fields after the seed's are additions (clients ignoring unknown fields keep working)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from ..domain import OutputFormat, TaskStatus

SEED_MAX = 2**32 - 1


class SynthesizeRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"text": "Hello, this is a test of VoxCPM TTS API.", "lora_name": None, "cfg_scale": 2.0,
                 "steps": 10, "seed": 42, "async_mode": False},
                {"text": "这是使用声音克隆技术合成的语音。", "ref_audio_path": "reference_audio.wav",
                 "ref_text": "这是参考音频的内容", "cfg_scale": 2.0, "steps": 20, "response_format": "wav"},
            ]
        }
    )

    text: StrictStr = Field(..., description="Text to synthesize (non-empty; limit set by --max-text-chars).")
    lora_name: StrictStr | None = Field(None, description="A name from GET /loras; null or \"None\" = base model.")
    cfg_scale: float = Field(2.0, gt=0.0, le=10.0, description="Classifier-free guidance, in (0, 10].")
    steps: StrictInt = Field(10, ge=1, le=100, description="Diffusion steps per patch, 1..100.")
    seed: StrictInt = Field(-1, ge=-1, le=SEED_MAX, description="-1 = random; the seed used is reported back.")
    ref_audio_path: StrictStr | None = Field(
        None, description="Reference audio for cloning, relative to a --ref-audio-dir root.")
    ref_text: StrictStr | None = Field(None, description="Transcript of the reference audio.")
    async_mode: StrictBool = Field(True, description="true: return a task_id at once; false: wait for the file.")
    response_format: OutputFormat = Field(OutputFormat.MP3, description="mp3 | wav | flac | opus | pcm (s16le).")
    voice: StrictStr | None = Field(None, description="A saved voice from GET /voices (clone without re-uploading).")
    normalize: StrictBool = Field(False, description="Spell out numbers, dates, units first (the official "
                                  "wetext normaliser); off by default, as in the official package.")

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text must not be empty or whitespace")
        return value


class SubmitResponse(BaseModel):
    task_id: str
    status: Literal["submitted"] = "submitted"
    message: str
    estimated_time: int = Field(description="Seconds until the file should be ready (measured speed, queue included).")
    progress: float = 0.0
    seed: int
    status_url: str


class SyncResponse(BaseModel):
    task_id: str
    status: Literal["success"] = "success"
    message: str
    audio_path: str
    sample_rate: int
    duration_s: float
    seed: int
    lora_name: str | None
    download_url: str


class TaskView(BaseModel):
    task_id: str
    status: TaskStatus
    message: str
    progress: float
    # The seed API's format, which clients parse: the server's local time, ISO 8601 without an offset
    # ("2023-12-14T12:00:00.123456"). A string, not a date-time: RFC 3339 date-times must carry one.
    created_at: str = Field(description="Local server time, ISO 8601 without a UTC offset (as the seed API).",
                            examples=["2023-12-14T12:00:00.123456"])
    updated_at: str = Field(description="Local server time, ISO 8601 without a UTC offset (as the seed API).",
                            examples=["2023-12-14T12:01:30.654321"])
    estimated_time: int | None
    audio_path: str | None
    error: str | None
    sample_rate: int | None
    duration_s: float | None
    lora_name: str | None
    seed: int
    response_format: OutputFormat
    attempts: int
    download_url: str | None
    voice: str | None = None  # the saved voice the task cloned (POST /voices), if any


class TaskList(BaseModel):
    tasks: list[TaskView]
    total: int
    processing: int
    max_concurrent: int


class LoRAList(BaseModel):
    loras: list[str]
    count: int


class Health(BaseModel):
    status: Literal["healthy", "unhealthy"]
    model_loaded: bool
    model: str | None = None
    architecture: str | None = None
    sample_rate: int | None = None
    device: str | None = None
    engine_owner: bool
    error: str | None = None


class CleanupResult(BaseModel):
    message: str
    deleted_count: int


# ---- error bodies, declared on every route that can return them (the fuzz test holds us to it) -------


class ErrorBody(BaseModel):
    """A service error (api/errors.py): what went wrong and, for 4xx caused by one, the request field."""

    detail: str = Field(description="What went wrong, for a human.")
    field: str | None = Field(None, description="The request field at fault, where one is.")


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(description="Where: body/query/path, then the field.")
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    """FastAPI's request validation error: one entry per invalid field."""

    detail: list[ValidationIssue]


ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Reference audio that cannot be decoded",
    401: "Missing or wrong API key (only with --api-key)",
    403: "A path outside the allowed directories",
    404: "Not found (the message says what)",
    409: "Conflicts with the current state (the message says which)",
    413: "The upload exceeds --max-upload-bytes",
    422: "Invalid request: a list of field errors, or one message naming the field",
    429: "The queue is full; retry after Retry-After seconds",
    503: "The model is not loaded (yet); retry shortly",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, object]]:
    """`responses=` entries for these statuses with our error bodies (422 also has FastAPI's list form)."""
    return {code: {"model": ValidationErrorBody | ErrorBody if code == 422 else ErrorBody,
                   "description": ERROR_DESCRIPTIONS[code]} for code in codes}


SYNTHESIS_ERRORS = error_responses(400, 403, 404, 409, 422, 429, 503)
