"""Configuration, read once at the edge.

`Settings` is built from CLI flags (start_api.py) or environment variables, each flag having an
env twin named `VOXCPM_<FLAG>` (e.g. `--max-concurrent` ↔ `VOXCPM_MAX_CONCURRENT`). Everything
below the edge receives the frozen object (or a slice of it) and never reads the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "VOXCPM_"
DEFAULT_LOCAL_MODEL_DIR = "./models/openbmb__VoxCPM1.5"
DEFAULT_HUB_MODEL_ID = "openbmb/VoxCPM1.5"
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


def default_model() -> str:
    """The seed's default: a local copy when present, else the hub id."""
    return DEFAULT_LOCAL_MODEL_DIR if Path(DEFAULT_LOCAL_MODEL_DIR).is_dir() else DEFAULT_HUB_MODEL_ID


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    # --- network (the seed's flags) ---
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    dev: bool = False
    workers: int = Field(1, ge=1, le=64)
    log_level: LogLevel = "info"
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None

    # --- model and files ---
    model: str = Field(default_factory=default_model)
    lora_dir: Path = Path("./lora")
    output_dir: Path = Path("./api_outputs")
    ref_audio_dir: Annotated[list[Path], NoDecode] = Field(default_factory=lambda: [Path("./reference_audio")])
    cache_dir: Path | None = None  # tiny checkpoints and downloads; default <output_dir>/.cache
    device: str = "auto"
    compile: bool = False  # torch.compile on CUDA (minutes of warm-up; off by default)

    # --- limits ---
    max_concurrent: int = Field(2, ge=1, le=256)
    max_queue: int = Field(1000, ge=1)
    max_text_chars: int = Field(5000, ge=1)
    max_attempts: int = Field(3, ge=1, le=20)
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    lora_cache_size: int = Field(8, ge=1)
    chunk_max_chars: int = Field(200, ge=20)
    openai_max_input_chars: int = Field(4096, ge=1)  # POST /v1/audio/speech `input` limit, as OpenAI's
    voice_max_duration_s: float = Field(60.0, gt=0)  # saved voices: longest reference audio accepted

    # --- security and housekeeping ---
    api_key: str | None = None
    # Browsers on other origins (the seed's JavaScript example) need CORS; "*" allows any page,
    # which is safe without cookies because auth is an explicit header.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    cleanup_interval_s: float = Field(0.0, ge=0.0)  # 0 = no periodic cleanup
    cleanup_max_age_s: float = Field(3600.0, ge=0.0)

    @field_validator("ref_audio_dir", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        # env form: "a:b" (os.pathsep) or "a,b"; CLI form: a list (the flag is repeatable)
        if isinstance(value, str):
            parts = [p for chunk in value.split(os.pathsep) for p in chunk.split(",")]
            return [p.strip() for p in parts if p.strip()]
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("device must be auto, cpu, cuda, cuda:N or mps")

    @model_validator(mode="after")
    def _ssl_pair(self) -> Settings:
        if bool(self.ssl_keyfile) != bool(self.ssl_certfile):
            raise ValueError("--ssl-keyfile and --ssl-certfile must be given together")
        return self

    @property
    def effective_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.output_dir / ".cache"

    @property
    def database_path(self) -> Path:
        return self.output_dir / "tasks.sqlite3"

    def to_env(self) -> dict[str, str]:
        """Env-var twins of these settings, so uvicorn worker processes rebuild the same object."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, list):  # paths split on os.pathsep, origins (which hold ':') on ','
                separator = "," if name == "cors_origins" else os.pathsep
                text = separator.join(str(v) for v in value)
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            env[ENV_PREFIX + name.upper()] = text
        return env
