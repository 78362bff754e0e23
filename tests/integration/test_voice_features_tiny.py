"""Prompt features on disk, on the tiny random VoxCPM checkpoints (CPU).

A reference audio is encoded once per model: a second engine pointed at the same feature directory
loads the features instead of encoding (prompt_cache_misses stays 0) and produces the very same
samples. End to end, a saved voice's features are computed when it is created and reused after a
server restart.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.helpers import ThreadServer, wait_ready, wait_until
from voxcpm_api.api.app import create_app, default_engine_factory
from voxcpm_api.config import Settings
from voxcpm_api.engine.base import ChunkRequest
from voxcpm_api.engine.voxcpm_engine import EngineConfig, VoxCPMEngine

pytestmark = [pytest.mark.slow]

TEXT = "The quick brown fox jumps over the lazy dog."
REF_TEXT = "A short reference sentence."


def ref_wav(path: Path, seconds: float = 1.0, rate: int = 16000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(int(seconds * rate))).astype(np.float32), rate)
    return path


def make_engine(model: str, tiny_root: Path, feature_dir: Path | None) -> VoxCPMEngine:
    engine = VoxCPMEngine(EngineConfig(model=model, device="cpu", cache_dir=tiny_root, feature_cache_dir=feature_dir))
    engine.load()
    return engine


def generate(engine: VoxCPMEngine, ref: Path, ref_text: str | None, seed: int = 3) -> np.ndarray:
    request = ChunkRequest(text=TEXT, adapter=None, cfg_scale=2.0, steps=4, seed=seed, ref_audio_path=str(ref),
                           ref_text=ref_text)
    return engine.generate(request, lambda: None)


@pytest.mark.parametrize("model, ref_text", [("tiny", REF_TEXT), ("tiny-v2", None), ("tiny-v2", REF_TEXT)],
                         ids=["v1-prompt", "v2-ref", "v2-ref+prompt"])
def test_second_engine_loads_features_from_disk(tiny_root: Path, tmp_path: Path, model: str,
                                                ref_text: str | None) -> None:
    feature_dir = tmp_path / "features"
    ref = ref_wav(tmp_path / "ref.wav")

    first = make_engine(model, tiny_root, feature_dir)
    first.prepare_prompt(str(ref), ref_text)
    assert (first.prompt_cache_misses, first.prompt_disk_hits) == (1, 0)
    files = list(feature_dir.rglob("*.safetensors"))
    assert len(files) == 1 and not list(feature_dir.rglob("*.part"))
    fresh = generate(first, ref, ref_text)  # from the features it just encoded (memory)
    assert first.prompt_cache_misses == 1 and first.prompt_cache_hits == 1

    second = make_engine(model, tiny_root, feature_dir)
    copy = shutil.copy(ref, tmp_path / "same-bytes-other-name.wav")  # keyed by content, not by path
    from_disk = generate(second, Path(copy), ref_text)
    assert (second.prompt_cache_misses, second.prompt_disk_hits) == (0, 1), "the second engine re-encoded"
    np.testing.assert_array_equal(from_disk, fresh)

    # and both equal an engine without any disk cache
    plain = make_engine(model, tiny_root, None)
    np.testing.assert_array_equal(generate(plain, ref, ref_text), fresh)
    assert (plain.prompt_cache_misses, plain.prompt_disk_hits) == (1, 0)


def test_corrupt_feature_file_is_re_encoded_and_models_do_not_share(tiny_root: Path, tmp_path: Path) -> None:
    feature_dir = tmp_path / "features"
    ref = ref_wav(tmp_path / "ref.wav", seed=1)
    first = make_engine("tiny", tiny_root, feature_dir)
    expected = generate(first, ref, REF_TEXT)
    (path,) = feature_dir.rglob("*.safetensors")
    path.write_bytes(b"\x00 not safetensors")

    second = make_engine("tiny", tiny_root, feature_dir)
    np.testing.assert_array_equal(generate(second, ref, REF_TEXT), expected)
    assert (second.prompt_cache_misses, second.prompt_disk_hits) == (1, 0)
    third = make_engine("tiny", tiny_root, feature_dir)  # the re-encode rewrote a good file
    generate(third, ref, REF_TEXT)
    assert (third.prompt_cache_misses, third.prompt_disk_hits) == (0, 1)

    other_model = make_engine("tiny-v2", tiny_root, feature_dir)  # same audio, other model: own folder
    other_model.prepare_prompt(str(ref), REF_TEXT)
    assert (other_model.prompt_cache_misses, other_model.prompt_disk_hits) == (1, 0)
    assert len({p.parent for p in feature_dir.rglob("*.safetensors")}) == 2


def test_feature_cache_is_bounded(tiny_root: Path, tmp_path: Path) -> None:
    feature_dir = tmp_path / "features"
    engine = VoxCPMEngine(EngineConfig(model="tiny-v2", device="cpu", cache_dir=tiny_root,
                                       feature_cache_dir=feature_dir, feature_cache_max_files=2))
    engine.load()
    for seed in range(3):
        engine.prepare_prompt(str(ref_wav(tmp_path / f"ref{seed}.wav", seed=10 + seed)), None)
    assert engine.prompt_cache_misses == 3
    assert len(list(feature_dir.rglob("*.safetensors"))) == 2


def test_default_engine_factory_puts_features_under_the_cache_dir(tmp_path: Path) -> None:
    settings = Settings(model="tiny", output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", engine="official")
    engine = default_engine_factory(settings)()
    assert isinstance(engine, VoxCPMEngine)
    assert engine.config.feature_cache_dir == tmp_path / "cache" / "prompt_features"


def test_default_engine_factory_builds_batched_engines_per_device(tmp_path: Path) -> None:
    from voxcpm_api.engine.batched.engine import BatchedEngine
    from voxcpm_api.engine.pool import EnginePool

    common = dict(model="tiny", output_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    one = default_engine_factory(Settings(**common, devices="cpu", lora_slots=3, max_seq_len=1024,
                                          cuda_graphs=False))()  # type: ignore[arg-type]
    assert isinstance(one, BatchedEngine)
    assert (one.config.device, one.config.max_rows, one.config.lora_slots, one.config.max_seq_len,
            one.config.cuda_graphs) == ("cpu", None, 3, 1024, False)  # rows: the engine decides
    assert one.max_rows == 16  # on a CPU; a GPU engine sizes its rows from free memory when it loads
    assert one.config.feature_cache_dir == tmp_path / "cache" / "prompt_features"
    pool = default_engine_factory(Settings(**common, devices="cpu,cpu", max_concurrent=6))()  # type: ignore[arg-type]
    assert isinstance(pool, EnginePool) and pool.max_rows == 6
    assert [e.config.max_rows for e in pool.engines] == [3, 3]  # type: ignore[attr-defined]


def test_saved_voice_features_are_computed_once_across_restarts(tiny_root: Path, tmp_path: Path) -> None:
    feature_dir = tmp_path / "features"
    settings = Settings(host="127.0.0.1", model="tiny", output_dir=tmp_path / "out", lora_dir=tmp_path / "lora",
                        ref_audio_dir=[tmp_path / "refs"], cache_dir=tiny_root, max_concurrent=1)
    ref_wav(tmp_path / "voice.wav", seed=2)
    audio = (tmp_path / "voice.wav").read_bytes()

    def synthesize(client: httpx.Client) -> bytes:
        response = client.post("/synthesize", json={"text": TEXT, "voice": "narrator", "seed": 5, "steps": 4,
                                                    "async_mode": False, "response_format": "wav"})
        assert response.status_code == 200, response.text
        return client.get(response.json()["download_url"]).content

    first = VoxCPMEngine(EngineConfig(model="tiny", device="cpu", cache_dir=tiny_root, feature_cache_dir=feature_dir))
    with ThreadServer(create_app(settings, engine=first)) as server, \
            httpx.Client(base_url=server.url, timeout=120) as client:
        wait_ready(client, 120)
        response = client.post("/voices", data={"name": "narrator", "transcript": REF_TEXT},
                               files={"audio": ("narrator.flac", audio, "audio/flac")})
        assert response.status_code == 201, response.text
        assert response.json()["features_cached"] is True and response.json()["format"] == "wav"
        assert first.prompt_cache_misses == 1  # encoded at creation, in the engine thread
        assert len(list(feature_dir.rglob("*.safetensors"))) == 1
        before = synthesize(client)
        assert first.prompt_cache_misses == 1

    second = VoxCPMEngine(EngineConfig(model="tiny", device="cpu", cache_dir=tiny_root, feature_cache_dir=feature_dir))
    with ThreadServer(create_app(settings, engine=second)) as server, \
            httpx.Client(base_url=server.url, timeout=120) as client:
        wait_ready(client, 120)
        wait_until(lambda: second.prompt_disk_hits == 1, 60, what="startup precompute from disk")
        assert synthesize(client) == before
        assert second.prompt_cache_misses == 0, "the restarted server re-encoded the saved voice"
        assert client.get("/voices/narrator").json()["features_cached"] is True
