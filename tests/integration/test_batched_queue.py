"""Requests that wait for a batch row, and work kept off the loop thread (tiny model, CPU)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voxcpm_api import errors
from voxcpm_api.engine.base import ChunkRequest
from voxcpm_api.engine.batched.engine import BatchedConfig, BatchedEngine


@pytest.mark.xdist_group("batched-parity-voxcpm")
def test_a_queued_request_is_cancelled_before_it_gets_a_row(tiny_root: Path) -> None:
    engine = BatchedEngine(BatchedConfig(model="tiny", device="cpu", max_rows=1, cache_dir=tiny_root))
    engine.load()
    try:
        first_patch = threading.Event()
        stop = threading.Event()
        outcome: dict[str, object] = {}

        def long_row() -> None:
            request = ChunkRequest(text="A long sentence keeps the only row busy.", adapter=None, cfg_scale=2.0,
                                   steps=4, seed=1, max_patches=400)
            outcome["long"] = engine.generate(request, first_patch.set)

        def check() -> None:
            if stop.is_set():
                raise errors.TaskCancelled("cancelled by request")

        patches: list[int] = []

        def queued_row() -> None:
            request = ChunkRequest(text="Waiting for a row.", adapter=None, cfg_scale=2.0, steps=4, seed=2,
                                   stop_check=check)
            try:
                engine.generate(request, lambda: patches.append(1))
            except errors.TaskCancelled as exc:
                outcome["queued"] = exc
                outcome["queued_at"] = time.monotonic()

        busy = threading.Thread(target=long_row)
        busy.start()
        assert first_patch.wait(60)
        waiting = threading.Thread(target=queued_row)
        waiting.start()
        deadline = time.monotonic() + 60  # under a loaded CI machine the loop may take a while to accept it
        while engine.load_summary().queued_rows == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.load_summary().queued_rows == 1  # the only row is taken: it waits
        stop.set()
        waiting.join(30)
        assert isinstance(outcome.get("queued"), errors.TaskCancelled)
        assert patches == []  # it never produced a patch
        assert busy.is_alive() or "long" in outcome  # the running row was not disturbed
        busy.join(120)
        assert len(outcome["long"]) > 0  # type: ignore[arg-type]
    finally:
        engine.close()


@pytest.mark.xdist_group("batched-parity-voxcpm")
def test_a_reference_is_encoded_in_the_callers_thread_while_the_batch_keeps_stepping(tiny_root: Path,
                                                                                    tmp_path: Path) -> None:
    sr = 16000
    t = np.arange(int(1.0 * sr)) / sr
    ref = tmp_path / "voice.wav"
    sf.write(ref, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr, subtype="FLOAT")
    engine = BatchedEngine(BatchedConfig(model="tiny-v2", device="cpu", max_rows=2, cache_dir=tiny_root))
    engine.load()
    try:
        patches: list[float] = []
        first_patch = threading.Event()

        def on_patch() -> None:
            patches.append(time.monotonic())
            first_patch.set()

        encodes: list[tuple[str, float, float]] = []
        real_encode = engine._inner._encode_prompt

        def slow_encode(*args: object, **kwargs: object) -> dict:
            started = time.monotonic()
            time.sleep(0.8)  # a long reference: the running row must keep stepping meanwhile
            result = real_encode(*args, **kwargs)  # type: ignore[arg-type]
            encodes.append((threading.current_thread().name, started, time.monotonic()))
            return result

        engine._inner._encode_prompt = slow_encode  # type: ignore[method-assign]
        outcome: dict[str, object] = {}

        def long_row() -> None:
            request = ChunkRequest(text="A long sentence keeps a row busy.", adapter=None, cfg_scale=2.0, steps=4,
                                   seed=1, max_patches=400)
            outcome["long"] = engine.generate(request, on_patch)

        busy = threading.Thread(target=long_row)
        busy.start()
        assert first_patch.wait(60)
        clone = ChunkRequest(text="Cloned.", adapter=None, cfg_scale=2.0, steps=4, seed=2, ref_audio_path=str(ref),
                             max_patches=3)
        audio = engine.generate(clone, lambda: None)
        busy.join(300)
        assert len(audio) > 0 and len(outcome["long"]) > 0  # type: ignore[arg-type]
        assert len(encodes) == 1  # encoded once; the loop thread found it in the prompt cache
        thread_name, began, ended = encodes[0]
        assert not thread_name.startswith("batched-engine"), thread_name
        assert sum(began <= at <= ended for at in patches) >= 3  # the batch stepped during the encode
    finally:
        engine.close()


@pytest.mark.xdist_group("batched-parity-voxcpm")
def test_preloaded_adapters_are_in_slots_before_the_first_request(tiny_root: Path, tiny_checkpoints) -> None:
    """BatchedConfig.preload_adapters (the service passes the LoRA folder's first ones): a GPU engine loads them
    at start so no request's adapter changes the captured graphs. The preload itself runs here on the CPU
    (load() calls it only where graphs exist); a broken adapter is skipped, the rest still load."""
    from dataclasses import replace

    from voxcpm_api.api.app import preload_specs
    from voxcpm_api.lora.catalog import LoRACatalog

    specs = preload_specs(LoRACatalog(tiny_checkpoints.lora_roots["voxcpm"]), 8)
    assert len(specs) >= 2
    broken = replace(specs[0], name="broken", weights_file=specs[0].weights_file.with_name("absent.safetensors"))
    engine = BatchedEngine(BatchedConfig(model="tiny", device="cpu", max_rows=2, cache_dir=tiny_root,
                                         preload_adapters=(broken, *specs[:2])))
    engine.load()
    try:
        assert engine._preload_adapters() == 2  # noqa: SLF001 - what load() does on a GPU
        assert engine.stats()["adapter_slot_loads"] == 2
        request = ChunkRequest(text="Preloaded.", adapter=specs[1], cfg_scale=2.0, steps=2, seed=3, max_patches=3)
        assert engine.generate(request, lambda: None).size > 0
        assert engine.stats()["adapter_slot_loads"] == 2  # the request found its adapter in a slot
    finally:
        engine.close()


@pytest.mark.xdist_group("batched-parity-voxcpm")
def test_a_failed_stream_window_decode_fails_only_the_streaming_rows(tiny_root: Path) -> None:
    """VoxCPM 1.x streaming rows share one AudioVAE call per window length each step (_decode_streamed); when it
    raises, those rows fail alone and a file row stepping beside them still completes."""
    engine = BatchedEngine(BatchedConfig(model="tiny", device="cpu", max_rows=4, cache_dir=tiny_root))
    engine.load()
    vae = engine._inner.tts_model.audio_vae  # noqa: SLF001 - a decoder that breaks on stream windows only
    real_decode = vae.decode

    def decode(feat, *args, **kwargs):  # type: ignore[no-untyped-def]
        if feat.shape[-1] <= 3 * engine._model.patch:  # noqa: SLF001 - a window of at most 3 patches
            raise RuntimeError("simulated decoder failure")
        return real_decode(feat, *args, **kwargs)

    vae.decode = decode
    try:
        outcome: dict[str, object] = {}

        def run(name: str, call) -> None:  # type: ignore[no-untyped-def]
            try:
                outcome[name] = call()
            except Exception as exc:  # noqa: BLE001 - recorded for the assertions
                outcome[name] = exc

        file_request = ChunkRequest(text="A file row beside the streams.", adapter=None, cfg_scale=2.0, steps=2,
                                    seed=4, max_patches=12)
        threads = [threading.Thread(target=run, args=(f"stream{i}", lambda i=i: engine.generate_stream(
            ChunkRequest(text="A stream.", adapter=None, cfg_scale=2.0, steps=2, seed=10 + i, max_patches=12),
            lambda samples: None))) for i in range(2)]
        threads.append(threading.Thread(target=run, args=("file", lambda: engine.generate(file_request, lambda: None))))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert isinstance(outcome["stream0"], errors.EngineFailure), outcome["stream0"]
        assert isinstance(outcome["stream1"], errors.EngineFailure), outcome["stream1"]
        assert isinstance(outcome["file"], np.ndarray) and outcome["file"].size > 0, outcome["file"]
    finally:
        vae.decode = real_decode
        engine.close()


@pytest.mark.xdist_group("batched-parity-voxcpm2")
def test_voxcpm2_streams_decoded_together_equal_each_stream_alone(tiny_root: Path) -> None:
    """VoxCPM2 streaming rows share one streaming-decoder call per step (their carried convolution states stacked
    along the batch, _decode_stream_states): each row must still get its own audio, patch by patch."""
    engine = BatchedEngine(BatchedConfig(model="tiny-v2", device="cpu", max_rows=4, cache_dir=tiny_root))
    engine.load()
    try:
        requests = [ChunkRequest(text=text, adapter=None, cfg_scale=2.0, steps=2, seed=seed, max_patches=patches)
                    for text, seed, patches in (("First stream.", 1, 9), ("A second one.", 2, 6),
                                                ("And a third.", 3, 11))]

        def stream(request: ChunkRequest) -> np.ndarray:
            pieces: list[np.ndarray] = []
            engine.generate_stream(request, lambda samples: pieces.append(samples.copy()))
            return np.concatenate(pieces)

        alone = [stream(r) for r in requests]
        together: dict[int, np.ndarray] = {}
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, stream(requests[i])))
                   for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert engine.stats()["rows_stepped"] > engine.stats()["steps"]  # the rows did share steps
        for i, want in enumerate(alone):
            assert together[i].shape == want.shape
            assert float(np.max(np.abs(together[i] - want))) < 1e-4, i
    finally:
        engine.close()
