"""An in-repo engine that honours the Engine protocol without torch, for fast API tests.

Output is a deterministic function of (text, seed, adapter, cfg_scale, steps, reference), so
tests can check that parameters reach the engine, that the seed is honoured and that chunked
long texts are joined; `patch_delay_s` makes generations slow enough to cancel or kill.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf

from ..domain import EngineInfo
from ..errors import BadAudio, EngineFailure
from .base import AudioCallback, ChunkRequest, PatchCallback

FAKE_SAMPLE_RATE_HZ = 16000
FAKE_PATCH_SAMPLES = 1280  # 80 ms per patch, like VoxCPM-0.5B


@dataclass
class FakeEngine:
    patch_delay_s: float = 0.0
    load_delay_s: float = 0.0
    fail_marker: str = "FAIL_ENGINE"  # text containing this makes generate() raise EngineFailure
    architecture: str = "voxcpm"
    calls: list[ChunkRequest] = field(default_factory=list)
    prepared: list[tuple[str, str | None]] = field(default_factory=list)  # prepare_prompt calls
    patches_streamed: int = 0  # patches handed out by generate_stream (all requests)
    _info: EngineInfo | None = None

    def load(self) -> EngineInfo:
        time.sleep(self.load_delay_s)
        self._info = EngineInfo(
            model_id="fake", architecture=self.architecture, sample_rate_hz=FAKE_SAMPLE_RATE_HZ,
            patch_duration_s=FAKE_PATCH_SAMPLES / FAKE_SAMPLE_RATE_HZ, device="cpu",
            needs_ref_text=self.architecture != "voxcpm2",
        )
        return self._info

    @property
    def info(self) -> EngineInfo | None:
        return self._info

    def linear_shapes(self) -> Mapping[str, tuple[int, int]]:
        shapes: dict[str, tuple[int, int]] = {}
        for layer in range(2):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shapes[f"base_lm.layers.{layer}.self_attn.{proj}"] = (64, 64)
                shapes[f"feat_decoder.estimator.decoder.layers.{layer}.self_attn.{proj}"] = (64, 64)
        return shapes

    def expected_patches(self, text: str) -> int:
        return max(3, len(text) // 4)

    def generate(self, request: ChunkRequest, on_patch: PatchCallback) -> np.ndarray:
        patches = []
        for patch in self._patches(request):
            patches.append(patch)
            on_patch()
        return np.concatenate(patches)

    def generate_stream(self, request: ChunkRequest, on_audio: AudioCallback) -> int:
        """The very patches generate() would return, handed to on_audio one by one as they are made.

        `patches_streamed` counts every patch handed out (tests check that a disconnect stops it).
        """
        count = 0
        for patch in self._patches(request):
            self.patches_streamed += 1
            count += 1
            on_audio(patch)
        return count

    def _patches(self, request: ChunkRequest) -> Iterator[np.ndarray]:
        """Deterministic noise patches from every parameter that must reach the engine."""
        self.calls.append(request)
        if self.fail_marker and self.fail_marker in request.text:
            raise EngineFailure("the fake engine was asked to fail")
        if request.ref_audio_path is not None:
            self.check_reference_audio(request.ref_audio_path)
        key = "|".join([request.text, str(request.seed), request.adapter.name if request.adapter else "",
                        f"{request.cfg_scale:.4f}", str(request.steps), request.ref_audio_path or ""])
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
        for _ in range(self.expected_patches(request.text)):
            time.sleep(self.patch_delay_s)
            yield (0.1 * rng.standard_normal(FAKE_PATCH_SAMPLES)).astype(np.float32)

    def prepare_prompt(self, ref_audio_path: str, ref_text: str | None) -> None:
        """No features to compute: validates the audio and records the call (tests read `prepared`)."""
        self.check_reference_audio(ref_audio_path)
        self.prepared.append((ref_audio_path, ref_text))

    def check_reference_audio(self, path: str) -> None:
        try:
            info = sf.info(path)
        except Exception as exc:  # soundfile raises several types; all mean "not decodable"
            raise BadAudio(f"reference audio cannot be decoded: {exc}", field="ref_audio_path") from exc
        if info.frames <= 0:
            raise BadAudio("reference audio is empty", field="ref_audio_path")
