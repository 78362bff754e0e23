"""VoxCPMEngine against the official `voxcpm` package, on the tiny random checkpoints (CPU).

Every comparison runs the official pipeline exactly as a user would:
`VoxCPM(dir, enable_denoiser=False, optimize=False, device="cpu", lora_config=..., lora_weights_path=...)`
then `torch.manual_seed(seed)` and `.generate(..., retry_badcase=False)`.
Measured numbers are printed with a `[measure]` prefix (run with -s to see them).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from official_calls import official_generate

from voxcpm_api import errors
from voxcpm_api.engine.base import ChunkRequest
from voxcpm_api.engine.voxcpm_engine import EngineConfig, ModelUnavailable, VoxCPMEngine, official_patch_cap
from voxcpm_api.lora.catalog import AdapterSpec, LoRACatalog

ARCH_MODEL = {"voxcpm": "tiny", "voxcpm2": "tiny-v2"}
TEXT = "The quick brown fox jumps over the lazy dog."
REF_TEXT = "A short reference sentence."
TOLERANCE = 2e-3
SEED = 3
MEASURED: list[str] = []


def _measure(line: str) -> None:
    MEASURED.append(line)
    print(f"\n[measure] {line}")


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def engines(tiny_root: Path) -> dict[str, VoxCPMEngine]:
    out = {}
    for arch, model in ARCH_MODEL.items():
        engine = VoxCPMEngine(EngineConfig(model=model, device="cpu", cache_dir=tiny_root, lora_cache_size=4))
        started = time.perf_counter()
        info = engine.load()
        _measure(f"engine load {model}: {time.perf_counter() - started:.2f}s, {info}")
        assert info.architecture == arch
        out[arch] = engine
    return out


@pytest.fixture(scope="session")
def official(tiny_checkpoints):
    """official(arch, adapter_name | None) -> a cached voxcpm.VoxCPM built as a user would build it."""
    import voxcpm
    from voxcpm.model.voxcpm import LoRAConfig as LoRAConfigV1
    from voxcpm.model.voxcpm2 import LoRAConfig as LoRAConfigV2

    instances: dict[tuple[str, str | None], object] = {}

    def get(arch: str, adapter: str | None):
        key = (arch, adapter)
        if key not in instances:
            kwargs: dict = {}
            if adapter is not None:
                lora_dir = tiny_checkpoints.loras[arch][adapter]
                cfg = json.loads((lora_dir / "lora_config.json").read_text())["lora_config"]
                cls = LoRAConfigV2 if arch == "voxcpm2" else LoRAConfigV1
                kwargs = {"lora_config": cls(**cfg), "lora_weights_path": str(lora_dir)}
            vox = voxcpm.VoxCPM(
                str(tiny_checkpoints.models[arch]), enable_denoiser=False, optimize=False, device="cpu", **kwargs
            )
            if adapter is not None:  # the official loader skips unknown keys silently: make sure all landed
                expected = load_file(str(tiny_checkpoints.loras[arch][adapter] / "lora_weights.safetensors"))
                got = vox.tts_model.get_lora_state_dict()
                assert set(expected) <= set(got)
                for name, tensor in expected.items():
                    assert torch.equal(got[name], tensor), name
            instances[key] = vox
        return instances[key]

    return get


@pytest.fixture(scope="session")
def ref_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1.3 s of a gliding tone plus a little noise, 16 kHz mono float, written with soundfile."""
    sr = 16000
    t = np.arange(int(1.3 * sr)) / sr
    rng = np.random.default_rng(42)
    wave = 0.3 * np.sin(2 * np.pi * (180 + 60 * t) * t) + 0.02 * rng.standard_normal(t.size)
    path = tmp_path_factory.mktemp("ref") / "voice.wav"
    sf.write(path, wave.astype(np.float32), sr, subtype="FLOAT")
    return path


def adapter(tiny_checkpoints, arch: str, name: str | None) -> AdapterSpec | None:
    if name is None:
        return None
    return LoRACatalog(tiny_checkpoints.lora_roots[arch]).resolve(name)


def request(spec: AdapterSpec | None, *, seed: int = SEED, text: str = TEXT, ref: Path | None = None,
            ref_text: str | None = None, cfg: float = 2.0, steps: int = 10, normalize: bool = False) -> ChunkRequest:
    return ChunkRequest(text=text, adapter=spec, cfg_scale=cfg, steps=steps, seed=seed,
                        ref_audio_path=str(ref) if ref is not None else None, ref_text=ref_text, normalize=normalize)


def ours(engine: VoxCPMEngine, req: ChunkRequest) -> tuple[np.ndarray, int]:
    calls = 0

    def on_patch() -> None:
        nonlocal calls
        calls += 1

    wav = engine.generate(req, on_patch)
    assert wav.dtype == np.float32 and wav.ndim == 1
    return wav, calls


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, f"lengths differ: {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def patch_samples(engine: VoxCPMEngine) -> int:
    info = engine.info
    return int(round(info.patch_duration_s * info.sample_rate_hz))


# ------------------------------------------------------------------------------------------ parity


CASES = [
    ("zero-shot", None, None),
    ("clone", "ref", REF_TEXT),
    ("clone-no-text", "ref", None),  # VoxCPM2 only: reference_wav_path alone
]


@pytest.mark.parametrize("arch", list(ARCH_MODEL))
@pytest.mark.parametrize("adapter_name", [None, "r4_qkvo", "r16_proj_mlp"])
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_generate_matches_official(engines, official, tiny_checkpoints, ref_wav, arch, adapter_name, case) -> None:
    _, ref, ref_text = next(c for c in CASES if c[0] == case)
    if case == "clone-no-text" and arch != "voxcpm2":
        pytest.skip("VoxCPM 1.x clones only with a transcript")
    engine = engines[arch]
    spec = adapter(tiny_checkpoints, arch, adapter_name)
    req = request(spec, ref=ref_wav if ref else None, ref_text=ref_text)
    started = time.perf_counter()
    got, calls = ours(engine, req)
    took = time.perf_counter() - started
    want = official_generate(official(arch, adapter_name), arch, req)
    diff = max_abs(got, want)
    patches = got.size // patch_samples(engine)
    _measure(f"parity {arch} adapter={adapter_name} {case}: max|diff|={diff:.3g}, {patches} patches, ours {took:.2f}s")
    assert diff <= TOLERANCE
    assert calls == patches and got.size % patch_samples(engine) == 0
    if adapter_name is not None:  # the adapter must audibly change the output
        base, _ = ours(engine, request(None, ref=ref_wav if ref else None, ref_text=ref_text))
        assert base.shape != got.shape or max_abs(base, got) > 1e-2


@pytest.mark.parametrize("arch", list(ARCH_MODEL))
def test_switching_adapters_gives_each_fresh_official_result(engines, official, tiny_checkpoints, arch) -> None:
    engine = engines[arch]
    sequence = ["r4_qkvo", None, "r16_proj_mlp", "r4_qkvo", None]
    switch_times = []
    for name in sequence:
        req = request(adapter(tiny_checkpoints, arch, name), seed=11)
        got, _ = ours(engine, req)
        switch_times.append(engine.lora_runtime.last_switch_s)
        want = official_generate(official(arch, name), arch, req)
        # Float32 sums on the CPU may round differently between runs (BLAS kernels depend on memory
        # alignment and threads), so "the same" means equal up to rounding noise, far below TOLERANCE.
        assert got.shape == want.shape and max_abs(got, want) <= 1e-5, f"{arch} {name}: {max_abs(got, want)}"
    # a pure switch, timed on its own (adapters are in the LRU by now)
    rt = engine.lora_runtime
    specs = [adapter(tiny_checkpoints, arch, n) for n in ("r4_qkvo", "r16_proj_mlp")]
    timings = []
    for i in range(200):
        started = time.perf_counter()
        rt.activate(specs[i % 2])
        timings.append(time.perf_counter() - started)
    rt.activate(None)
    _measure(f"LoRA switch {arch}: median {np.median(timings) * 1e6:.0f} us, max {max(timings) * 1e6:.0f} us "
             f"over {len(rt.wrapped_modules)} wrapped modules; first loads {rt.last_load_s * 1e3:.1f} ms")


@pytest.mark.parametrize("arch", list(ARCH_MODEL))
def test_wrong_shape_adapter_is_refused_and_changes_nothing(engines, tiny_checkpoints, tmp_path, arch) -> None:
    engine = engines[arch]
    good = adapter(tiny_checkpoints, arch, "r4_qkvo")
    before_good, _ = ours(engine, request(good, seed=5))
    before_base, _ = ours(engine, request(None, seed=5))
    ours(engine, request(good, seed=5))  # leave the good adapter active

    src = tiny_checkpoints.loras[arch]["r4_qkvo"]
    tensors = load_file(str(src / "lora_weights.safetensors"))
    victim = "base_lm.layers.1.self_attn.v_proj"
    tensors[f"{victim}.lora_A"] = torch.zeros(4, 65)
    bad_dir = tmp_path / "lora" / "bad"
    bad_dir.mkdir(parents=True)
    save_file(tensors, str(bad_dir / "lora_weights.safetensors"))
    shutil.copy(src / "lora_config.json", bad_dir / "lora_config.json")
    bad = LoRACatalog(tmp_path / "lora").resolve("bad")
    with pytest.raises(errors.AdapterMismatch) as info:
        engine.generate(request(bad, seed=5), lambda: None)
    assert victim in str(info.value)
    assert engine.lora_runtime.active_name == "r4_qkvo"  # the previous adapter is still in place

    # an adapter with weights for a module its config does not target is refused too
    extra = load_file(str(src / "lora_weights.safetensors"))
    extra["stop_proj.lora_A"] = torch.zeros(4, 64)
    extra["stop_proj.lora_B"] = torch.zeros(64, 4)
    (tmp_path / "lora" / "extra").mkdir()
    save_file(extra, str(tmp_path / "lora" / "extra" / "lora_weights.safetensors"))
    shutil.copy(src / "lora_config.json", tmp_path / "lora" / "extra" / "lora_config.json")
    with pytest.raises(errors.AdapterMismatch, match="stop_proj"):
        engine.generate(request(LoRACatalog(tmp_path / "lora").resolve("extra"), seed=5), lambda: None)

    after_good, _ = ours(engine, request(good, seed=5))
    after_base, _ = ours(engine, request(None, seed=5))
    assert np.array_equal(after_good, before_good)
    assert np.array_equal(after_base, before_base)


@pytest.mark.parametrize("arch", list(ARCH_MODEL))
def test_ckpt_adapter_matches_safetensors(engines, tiny_checkpoints, tmp_path, arch) -> None:
    engine = engines[arch]
    src = tiny_checkpoints.loras[arch]["r16_proj_mlp"]
    ckpt_dir = tmp_path / "lora" / "legacy"
    ckpt_dir.mkdir(parents=True)
    torch.save({"state_dict": load_file(str(src / "lora_weights.safetensors"))}, ckpt_dir / "lora_weights.ckpt")
    shutil.copy(src / "lora_config.json", ckpt_dir / "lora_config.json")
    legacy = LoRACatalog(tmp_path / "lora").resolve("legacy")
    assert legacy.weights_file.suffix == ".ckpt" and not legacy.module_shapes
    got, _ = ours(engine, request(legacy, seed=2))
    want, _ = ours(engine, request(adapter(tiny_checkpoints, arch, "r16_proj_mlp"), seed=2))
    assert got.shape == want.shape and max_abs(got, want) <= 1e-5  # rounding noise only (see above)


# ------------------------------------------------------------------------------------------ patches


@pytest.mark.parametrize("arch", list(ARCH_MODEL))
def test_on_patch_once_per_patch_and_cancel(engines, ref_wav, arch) -> None:
    engine = engines[arch]
    tokens = len(engine.tts_model.text_tokenizer(TEXT))
    counts = []
    for seed in range(4):
        for ref, ref_text in ((None, None), (ref_wav, REF_TEXT)):
            wav, calls = ours(engine, request(None, seed=seed, ref=ref, ref_text=ref_text))
            assert wav.size == calls * patch_samples(engine)
            assert 4 <= calls <= official_patch_cap(tokens)
            counts.append(calls)
    _measure(f"patches {arch} ({tokens} tokens, cap {official_patch_cap(tokens)}): {counts}")

    reference, _ = ours(engine, request(None, seed=1))
    seen = 0

    def cancel_at_third() -> None:
        nonlocal seen
        seen += 1
        if seen == 3:
            raise errors.TaskCancelled("cancelled by test")

    with pytest.raises(errors.TaskCancelled):
        engine.generate(request(None, seed=1), cancel_at_third)
    assert seen == 3
    assert not engine.tts_model.stop_head._forward_hooks  # hook removed
    again, _ = ours(engine, request(None, seed=1))
    assert np.array_equal(again, reference)

    def boom() -> None:
        raise RuntimeError("callback bug")

    with pytest.raises(errors.EngineFailure):
        engine.generate(request(None, seed=1), boom)
    assert np.array_equal(ours(engine, request(None, seed=1))[0], reference)


@pytest.mark.parametrize("arch", list(ARCH_MODEL))
def test_expected_patches_is_bounded_and_learns(engines, arch) -> None:
    engine = engines[arch]
    for text in ("Hi.", TEXT, "word " * 300, "字" * 2000):
        tokens = len(engine.tts_model.text_tokenizer(" ".join(text.split())))
        estimate = engine.expected_patches(text)
        assert 1 <= estimate <= official_patch_cap(tokens)
    before = engine.expected_patches(TEXT)
    ours(engine, request(None, seed=0))
    after = engine.expected_patches(TEXT)
    _measure(f"expected_patches {arch} for TEXT: {before} -> {after} after observing {engine.last_patch_count}")


# ------------------------------------------------------------------------------------------ caches, seeds


@pytest.mark.parametrize("arch", list(ARCH_MODEL))
def test_prompt_cache_is_keyed_by_content(engines, ref_wav, tmp_path, arch) -> None:
    engine = engines[arch]
    fresh = tmp_path / "ref-fresh.wav"
    # bytes unique to this test, so the first call is a miss
    data, sr = sf.read(ref_wav, dtype="float32")
    sf.write(fresh, data * 0.9, sr, subtype="FLOAT")
    renamed = tmp_path / "same-bytes-other-name.wav"
    shutil.copy(fresh, renamed)

    misses, hits = engine.prompt_cache_misses, engine.prompt_cache_hits
    first, _ = ours(engine, request(None, ref=fresh, ref_text=REF_TEXT))
    assert engine.prompt_cache_misses == misses + 1
    second, _ = ours(engine, request(None, ref=renamed, ref_text=REF_TEXT))
    assert engine.prompt_cache_hits == hits + 1 and engine.prompt_cache_misses == misses + 1
    assert np.array_equal(first, second)


@pytest.mark.parametrize("arch", list(ARCH_MODEL))
def test_seeds(engines, arch) -> None:
    engine = engines[arch]
    a1, _ = ours(engine, request(None, seed=1))
    a2, _ = ours(engine, request(None, seed=1))
    b, _ = ours(engine, request(None, seed=2))
    assert np.array_equal(a1, a2)
    assert a1.shape != b.shape or not np.array_equal(a1, b)


# ------------------------------------------------------------------------------------------ errors


def test_bad_reference_audio(engines, tmp_path) -> None:
    engine = engines["voxcpm2"]
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    with pytest.raises(errors.BadAudio, match="junk.wav"):
        engine.check_reference_audio(str(junk))
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(errors.BadAudio, match="empty.wav"):
        engine.check_reference_audio(str(empty))
    with pytest.raises(errors.BadAudio):
        engine.generate(request(None, ref=junk), lambda: None)


def test_v1_clone_needs_transcript(engines, ref_wav) -> None:
    with pytest.raises(errors.InvalidInput, match="ref_text"):
        engines["voxcpm"].generate(request(None, ref=ref_wav), lambda: None)


def test_linear_shapes(engines) -> None:
    shapes = engines["voxcpm2"].linear_shapes()
    assert shapes["base_lm.layers.0.self_attn.q_proj"] == (128, 64)
    assert shapes["fusion_concat_proj"] == (64, 128)
    assert not any(name.startswith("audio_vae.") for name in shapes)


def test_hub_id_that_cannot_be_downloaded(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    def no_network(repo_id: str, **_: object) -> str:  # never touch the network in tests
        raise OSError(f"offline: cannot reach the Hub for {repo_id}\n(second line)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    engine = VoxCPMEngine(EngineConfig(model="openbmb/NoSuchModel-xyz", cache_dir=tmp_path))
    with pytest.raises(ModelUnavailable) as info:
        engine.load()
    message = str(info.value)
    assert "Could not download 'openbmb/NoSuchModel-xyz'" in message and "--model" in message
    assert "./models/openbmb__NoSuchModel-xyz" in message
    assert "\n" not in message
    assert info.value.status_code == 503
    with pytest.raises(ModelUnavailable, match="does not exist"):
        VoxCPMEngine(EngineConfig(model=str(tmp_path / "missing-dir"), cache_dir=tmp_path)).load()


@pytest.mark.parametrize("arch", ["voxcpm", "voxcpm2"])
def test_text_normalisation_matches_official(engines, official, arch) -> None:
    text = "I have 3 apples costing $4.50 on 2025-01-02."
    req = request(None, text=text, normalize=True)
    wav, _ = ours(engines[arch], req)
    reference = official_generate(official(arch, None), arch, req)
    assert wav.shape == reference.shape and max_abs(wav, reference) <= 2e-3
    plain, _ = ours(engines[arch], request(None, text=text))
    assert plain.shape != wav.shape or max_abs(plain, wav) > 0, "normalisation must change what is spoken"


@pytest.mark.parametrize("arch", ["voxcpm", "voxcpm2"])
def test_load_skips_random_init_and_keeps_every_official_weight(engines, official, arch, tiny_checkpoints, tmp_path,
                                                                caplog) -> None:
    """The engine builds the official model with torch.nn.init skipped (every weight comes from the
    checkpoint): each tensor equals the official load's, bit for bit. A checkpoint missing a weight
    makes it load again the official way, so that weight keeps the official initial value."""
    ours = engines[arch].tts_model.state_dict()
    theirs = official(arch, None).tts_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    caplog.set_level("WARNING", logger="voxcpm_api.engine")
    VoxCPMEngine(EngineConfig(model=str(tiny_checkpoints.models[arch]), device="cpu")).load()
    assert "loading again" not in caplog.text  # a complete checkpoint: one load, without the random draws

    partial = tmp_path / "partial"
    shutil.copytree(tiny_checkpoints.models[arch], partial)
    weights = load_file(partial / "model.safetensors")
    dropped = sorted(k for k in weights if k.endswith("stop_head.weight"))
    assert dropped
    save_file({k: v for k, v in weights.items() if k not in dropped}, str(partial / "model.safetensors"))
    torch.manual_seed(0)
    engine = VoxCPMEngine(EngineConfig(model=str(partial), device="cpu"))
    engine.load()
    assert "loading again with the official initialisation" in caplog.text
    head = engine.tts_model.state_dict()[dropped[0]]
    assert torch.isfinite(head).all() and head.abs().sum() > 0  # initialised, not left as allocated
    assert not torch.equal(head, theirs[dropped[0]])  # and not the checkpoint's: the file lacked it


def test_skipping_init_acts_on_the_loading_thread_only() -> None:
    """The init patch is process-wide; its effect is not: a pool loads its engines on one thread each,
    and another thread building modules meanwhile (a tiny checkpoint, say) must get its random values."""
    import threading

    from voxcpm_api.engine.voxcpm_engine import _checkpoint_weights_only

    original = torch.nn.init.uniform_
    results: dict[str, bool] = {}

    def elsewhere() -> None:
        t = torch.full((4, 4), 7.0)
        torch.nn.init.uniform_(t)
        results["other thread initialised"] = not torch.all(t == 7.0).item()

    with _checkpoint_weights_only() as missing:
        t = torch.full((4, 4), 7.0)
        torch.nn.init.uniform_(t)
        results["loading thread skipped"] = bool(torch.all(t == 7.0).item())
        worker = threading.Thread(target=elsewhere)
        worker.start()
        worker.join()
        torch.nn.Linear(2, 2).load_state_dict({"weight": torch.zeros(2, 2)}, strict=False)
    assert results == {"loading thread skipped": True, "other thread initialised": True}
    assert missing == ["bias"]  # what load_state_dict left missing, recorded for the loading thread
    assert torch.nn.init.uniform_ is original  # restored on exit
