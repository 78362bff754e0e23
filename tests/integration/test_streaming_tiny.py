"""VoxCPMEngine.generate_stream on the tiny random checkpoints (CPU): the official streaming path.

One on_audio call per generated patch, each exactly one patch of samples; the same seed gives the
same stream; the patch count equals the non-streaming generation's; a TaskCancelled raised from
on_audio stops the generation at once and leaves the model ready for the next request. Measured
numbers are printed with a `[measure]` prefix (run with -s to see them).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from voxcpm_api import errors
from voxcpm_api.engine.base import ChunkRequest
from voxcpm_api.engine.voxcpm_engine import EngineConfig, VoxCPMEngine

ARCH_MODEL = {"voxcpm": "tiny", "voxcpm2": "tiny-v2"}
TEXT = "Streaming speech, one patch at a time."


@pytest.fixture(scope="module", params=sorted(ARCH_MODEL))
def engine(request: pytest.FixtureRequest, tiny_root: Path) -> VoxCPMEngine:
    built = VoxCPMEngine(EngineConfig(model=ARCH_MODEL[request.param], device="cpu", cache_dir=tiny_root))
    assert built.load().architecture == request.param
    return built


def patch_samples(engine: VoxCPMEngine) -> int:
    info = engine.info
    assert info is not None
    return int(round(info.patch_duration_s * info.sample_rate_hz))


def stream(engine: VoxCPMEngine, seed: int, text: str = TEXT) -> tuple[list[np.ndarray], int, float]:
    pieces: list[np.ndarray] = []
    first: list[float] = []
    started = time.perf_counter()

    def on_audio(samples: np.ndarray) -> None:
        if not first:
            first.append(time.perf_counter() - started)
        pieces.append(samples.copy())

    patches = engine.generate_stream(ChunkRequest(text=text, adapter=None, cfg_scale=2.0, steps=4, seed=seed), on_audio)
    return pieces, patches, first[0]


def test_one_callback_per_patch_of_exactly_one_patch(engine: VoxCPMEngine) -> None:
    pieces, patches, first_s = stream(engine, seed=3)
    size = patch_samples(engine)
    assert patches == len(pieces) >= 3
    assert {p.shape for p in pieces} == {(size,)}
    assert all(p.dtype == np.float32 for p in pieces)
    assert sum(p.size for p in pieces) == patches * size
    assert engine.last_patch_count == patches
    print(f"\n[measure] {engine.info.model_id}: first patch after {first_s * 1000:.0f} ms, {patches} patches")


def test_same_seed_same_stream_other_seed_other_stream(engine: VoxCPMEngine) -> None:
    first, _, _ = stream(engine, seed=21)
    again, _, _ = stream(engine, seed=21)
    other, _, _ = stream(engine, seed=22)
    assert np.array_equal(np.concatenate(first), np.concatenate(again))
    joined, joined_other = np.concatenate(first), np.concatenate(other)
    assert joined.size != joined_other.size or not np.array_equal(joined, joined_other)


def test_stream_has_the_files_patches_and_length(engine: VoxCPMEngine) -> None:
    """Same seed, same latents: as many patches and samples as generate(); the samples themselves come
    from a patch-by-patch decode (see VoxCPMEngine.generate_stream), so only VoxCPM2's match closely."""
    pieces, patches, _ = stream(engine, seed=5)
    counted = [0]
    audio = engine.generate(ChunkRequest(text=TEXT, adapter=None, cfg_scale=2.0, steps=4, seed=5),
                            lambda: counted.__setitem__(0, counted[0] + 1))
    streamed = np.concatenate(pieces)
    assert counted[0] == patches
    assert audio.size == streamed.size
    diff = float(np.abs(audio - streamed).max())
    print(f"\n[measure] {engine.info.model_id}: max |file - stream| = {diff:.3g}")
    if engine.info.architecture == "voxcpm2":
        assert diff < 1e-3  # the official stateful causal decoder reproduces the one-pass decode


def test_cancel_from_on_audio_stops_at_that_patch_and_the_model_stays_usable(engine: VoxCPMEngine) -> None:
    reference, _, _ = stream(engine, seed=8)
    seen = [0]

    def on_audio(_samples: np.ndarray) -> None:
        seen[0] += 1
        if seen[0] == 2:
            raise errors.TaskCancelled("client gone")

    with pytest.raises(errors.TaskCancelled):
        engine.generate_stream(ChunkRequest(text=TEXT, adapter=None, cfg_scale=2.0, steps=4, seed=8), on_audio)
    assert seen[0] == 2
    after, _, _ = stream(engine, seed=8)
    assert np.array_equal(np.concatenate(after), np.concatenate(reference))
