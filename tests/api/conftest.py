"""Shared fixtures for the HTTP API tests.

Every API test talks HTTP to a real uvicorn (tests.helpers.ThreadServer) serving
`create_app(Settings(...), engine=FakeEngine(...))`, with real files and a real SQLite store
under a temporary output directory that belongs to the test (function-scoped `make_server`) or
to the test module (module-scoped `make_module_server`).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from safetensors.numpy import save_file

from tests.helpers import ThreadServer, wait_ready
from voxcpm_api.api.app import create_app
from voxcpm_api.config import Settings
from voxcpm_api.engine.fake import FakeEngine

WARMUP_TEXT = "Hello, this is a warm-up."  # the runner's speed-measuring generation at start
DB_FILES = {"tasks.sqlite3", "tasks.sqlite3-wal", "tasks.sqlite3-shm", ".engine.lock"}


@dataclass
class Running:
    server: ThreadServer
    client: httpx.Client
    settings: Settings
    engine: FakeEngine
    base: Path  # the directory holding output/, lora/ and refs/

    @property
    def output_dir(self) -> Path:
        return self.settings.output_dir

    @property
    def lora_dir(self) -> Path:
        return self.settings.lora_dir

    @property
    def ref_dir(self) -> Path:
        return self.settings.ref_audio_dir[0]

    def task_calls(self) -> list:
        """Engine calls made for tasks (the runner's warm-up generation excluded)."""
        return [c for c in self.engine.calls if not (c.text == WARMUP_TEXT and c.seed == 0)]

    def total(self) -> int:
        response = self.client.get("/tasks")
        assert response.status_code == 200, response.text
        return int(response.json()["total"])

    def output_files(self) -> set[str]:
        """Every file under the output directory (relative paths), store and lock files excluded."""
        return {p.relative_to(self.output_dir).as_posix() for p in self.output_dir.rglob("*")
                if p.is_file() and p.name not in DB_FILES}


@contextlib.contextmanager
def running_server(base: Path, *, engine: FakeEngine | None = None, wait: bool = True,
                   headers: dict[str, str] | None = None, **overrides: object) -> Iterator[Running]:
    """Start a server whose output, LoRA and reference-audio dirs live under `base`."""
    base.mkdir(parents=True, exist_ok=True)
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "model": "fake",
        "output_dir": base / "output",
        "lora_dir": base / "lora",
        "ref_audio_dir": [base / "refs"],
        "max_concurrent": 1,
    }
    values.update(overrides)
    settings = Settings(**values)  # type: ignore[arg-type]
    settings.lora_dir.mkdir(parents=True, exist_ok=True)
    for root in settings.ref_audio_dir:
        root.mkdir(parents=True, exist_ok=True)
    engine = engine if engine is not None else FakeEngine()
    app = create_app(settings, engine=engine)
    with ThreadServer(app) as server, httpx.Client(base_url=server.url, timeout=60.0,
                                                   headers=headers or {}) as client:
        if wait:
            wait_ready(client, timeout_s=30)
        yield Running(server=server, client=client, settings=settings, engine=engine, base=base)


class ServerFactory:
    """`factory(engine=..., **settings_overrides)` -> Running; every server is stopped at teardown."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._stack = contextlib.ExitStack()
        self._count = 0

    def __call__(self, *, engine: FakeEngine | None = None, base: Path | None = None, wait: bool = True,
                 headers: dict[str, str] | None = None, **overrides: object) -> Running:
        if base is None:
            self._count += 1
            base = self.base / f"srv{self._count}"
        return self._stack.enter_context(running_server(base, engine=engine, wait=wait, headers=headers,
                                                        **overrides))

    def close(self) -> None:
        self._stack.close()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def make_module_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
                       ) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    try:
        yield factory
    finally:
        factory.close()


# ---- builders for files on disk ------------------------------------------------------------


def wav_bytes(seconds: float = 0.25, sample_rate: int = 16000, freq: float = 220.0) -> bytes:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    samples = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, samples, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def write_adapter(directory: Path, shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]], *,
                  rank: int = 8, alpha: float = 16.0, config: dict | None = None) -> Path:
    """An adapter dir as the official trainer writes it: lora_weights.safetensors + lora_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a_shape, b_shape) in shapes.items():
        tensors[f"{module}.lora_A"] = np.zeros(a_shape, dtype=np.float32)
        tensors[f"{module}.lora_B"] = np.zeros(b_shape, dtype=np.float32)
    save_file(tensors, str(directory / "lora_weights.safetensors"))
    cfg = config if config is not None else {"r": rank, "alpha": alpha, "enable_lm": True, "enable_dit": True}
    (directory / "lora_config.json").write_text(json.dumps({"lora_config": cfg}), encoding="utf-8")
    return directory


def fitting_shapes(engine: FakeEngine, rank: int = 8) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """lora_A (r, in) / lora_B (out, r) for every linear the fake model exposes."""
    return {m: ((rank, i), (o, rank)) for m, (o, i) in engine.linear_shapes().items()}


def decode(data: bytes, fmt: str, sample_rate: int) -> tuple[np.ndarray, int]:
    """Decode downloaded bytes with libsndfile (pcm: raw s16le at the task's sample rate)."""
    if fmt == "pcm":
        assert len(data) % 2 == 0
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0, sample_rate
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    return samples, rate
