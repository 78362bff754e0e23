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
EngineKind = Literal["batched", "official"]
# --engine batched without --max-concurrent: rows per CPU engine; a GPU engine sizes its rows from its free
# memory when it loads (engine/batched/scheduler.py rows_for_memory: 128 on an 80 GB card)
DEFAULT_ROWS_PER_ENGINE = 16
DEFAULT_OFFICIAL_MAX_CONCURRENT = 2  # --engine official: generation of one task overlaps encoding of another


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
    device: str = "auto"  # one engine on this device; --devices (below) wins when both are given
    # Where the engine(s) run: "auto" (every visible CUDA GPU, else the CPU; decided by the engine owner,
    # which may import torch), or a comma list normalised to "cuda:0,cuda:1" / "cpu" / "cpu,cpu".
    devices: str = "auto"
    engine: EngineKind = "batched"  # batched = rows of many requests per decode step; official = sequential
    # torch.compile on CUDA. None = auto: on for --engine batched (regional; start to ready stays within
    # ~30 s, ADR 0009), off for --engine official (its whole-model compile takes minutes)
    compile: bool | None = None
    lora_slots: int = Field(8, ge=1, le=256)  # --engine batched: GPU-resident adapter slots per engine
    max_seq_len: int = Field(4096 + 1024, ge=64, le=1 << 20)  # --engine batched: KV positions per row
    cuda_graphs: bool = True  # --engine batched: capture decode steps as CUDA graphs

    # --- limits ---
    # Tasks (and streams) generating at once. None = the engine's default: 16 batch rows per device for
    # --engine batched, 2 for --engine official (which still generates one at a time; see effective_...).
    max_concurrent: int | None = Field(None, ge=1, le=4096)
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

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: str) -> str:
        return ",".join(parse_devices(value)) if value.strip().lower() != "auto" else "auto"

    @model_validator(mode="after")
    def _ssl_pair(self) -> Settings:
        if bool(self.ssl_keyfile) != bool(self.ssl_certfile):
            raise ValueError("--ssl-keyfile and --ssl-certfile must be given together")
        return self

    @model_validator(mode="after")
    def _official_is_one_engine(self) -> Settings:
        devices = self.engine_devices
        if self.engine == "official" and devices is not None and len(devices) > 1:
            raise ValueError("--engine official runs one model on one device; give one device or use "
                             "--engine batched for several")
        return self

    @property
    def engine_devices(self) -> list[str] | None:
        """The device of every engine to build, or None for "auto" (the engine owner asks torch).

        `--devices` wins; otherwise an explicit `--device X` means one engine on X.
        """
        if self.devices != "auto":
            return self.devices.split(",")
        if self.device != "auto":
            return [self.device]
        return None

    def rows_per_engine(self, engines: int) -> int | None:
        """--engine batched: batch rows of each of `engines` engines (--max-concurrent spread over them);
        None = each engine decides (a GPU engine from its free memory, a CPU engine 16)."""
        if self.max_concurrent is None:
            return None
        return max(1, -(-self.max_concurrent // max(1, engines)))

    @property
    def effective_compile(self) -> bool:
        """--compile as the engine sees it (None = on for the batched engine, off for the official one)."""
        return self.compile if self.compile is not None else self.engine == "batched"

    @property
    def effective_max_concurrent(self) -> int | None:
        """What --max-concurrent means when known without torch; None = decided by the loaded engine
        (batched engines on "auto" devices: 16 rows per visible GPU)."""
        if self.max_concurrent is not None:
            return self.max_concurrent
        if self.engine == "official":
            return DEFAULT_OFFICIAL_MAX_CONCURRENT
        devices = self.engine_devices
        if devices is None or any(d != "cpu" for d in devices):
            return None  # GPU engines size their rows when they load; the owner publishes the total
        return DEFAULT_ROWS_PER_ENGINE * len(devices)

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


def parse_devices(value: str) -> list[str]:
    """"0,1" / "cuda:0,cuda:1" / "cpu" / "cpu,cpu" / "cuda" / "mps" -> normalised device names.

    A bare number N means cuda:N. The same GPU may not be named twice (two engines on one GPU only
    split its memory); several "cpu" engines are allowed (tests use them).
    """
    names: list[str] = []
    for raw in value.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        if item.isdigit():
            item = f"cuda:{int(item)}"
        elif item.startswith("cuda:") and item[5:].isdigit():
            item = f"cuda:{int(item[5:])}"
        elif item not in ("cpu", "cuda", "mps"):
            raise ValueError(f"'{raw.strip()}' is not a device; use auto, cpu, N, cuda:N or a comma list")
        if item != "cpu" and item in names:
            raise ValueError(f"'{item}' is named twice")
        names.append(item)
    if not names:
        raise ValueError("devices must be auto or a comma list like 0,1 or cuda:0,cuda:1 or cpu")
    if "cuda" in names and any(n.startswith("cuda:") for n in names):
        raise ValueError("'cuda' (the current GPU) cannot be combined with cuda:N")
    if "mps" in names and len(names) > 1:
        raise ValueError("mps is one device")
    return names
