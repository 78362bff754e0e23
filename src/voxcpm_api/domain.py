"""Value types shared by the API, the task layer and the engine. No torch here."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TaskStatus(str, enum.Enum):
    PENDING = "pending"        # stored, waiting for an engine slot
    PROCESSING = "processing"  # claimed by the engine owner; generating or encoding
    COMPLETED = "completed"    # audio file written atomically; audio_path set
    FAILED = "failed"          # error set; never retried again
    CANCELLED = "cancelled"    # DELETE /task/{id} before completion

    @property
    def is_final(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


class OutputFormat(str, enum.Enum):
    MP3 = "mp3"
    WAV = "wav"
    FLAC = "flac"
    OPUS = "opus"
    PCM = "pcm"  # raw signed 16-bit little-endian mono at the model's sample rate


@dataclass(frozen=True, slots=True)
class SynthesisParams:
    """One validated synthesis request, as stored with its task (JSON-serialisable)."""

    text: str
    lora_name: str | None
    cfg_scale: float
    steps: int
    seed: int  # already resolved: never -1 here
    ref_audio_path: str | None  # absolute path, already checked to lie inside an allowed root
    ref_text: str | None
    response_format: OutputFormat
    normalize: bool = False  # the official wetext normaliser (numbers, dates...) before generating
    voice: str | None = None  # saved voice the reference audio came from (for reporting and metrics)

    def to_json_dict(self) -> dict[str, object]:
        return {
            "text": self.text,
            "lora_name": self.lora_name,
            "cfg_scale": self.cfg_scale,
            "steps": self.steps,
            "seed": self.seed,
            "ref_audio_path": self.ref_audio_path,
            "ref_text": self.ref_text,
            "response_format": self.response_format.value,
            "normalize": self.normalize,
            "voice": self.voice,
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, object]) -> SynthesisParams:
        return cls(
            text=str(data["text"]),
            lora_name=data.get("lora_name"),  # type: ignore[arg-type]
            cfg_scale=float(data["cfg_scale"]),  # type: ignore[arg-type]
            steps=int(data["steps"]),  # type: ignore[call-overload]
            seed=int(data["seed"]),  # type: ignore[call-overload]
            ref_audio_path=data.get("ref_audio_path"),  # type: ignore[arg-type]
            ref_text=data.get("ref_text"),  # type: ignore[arg-type]
            response_format=OutputFormat(str(data.get("response_format", "mp3"))),
            normalize=bool(data.get("normalize", False)),
            voice=data.get("voice"),  # type: ignore[arg-type]
        )


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the loaded model is; published to the store so every worker process can read it."""

    model_id: str
    architecture: str  # "voxcpm" | "voxcpm2"
    sample_rate_hz: int
    patch_duration_s: float  # audio seconds produced per decode step (one "patch")
    device: str
    needs_ref_text: bool  # True when cloning needs a transcript (VoxCPM 1.x)
