"""The tiny random checkpoints: official on-disk format, LoRA folders as the trainer writes them,
deterministic weights, and a build that is idempotent and safe when two processes race."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import voxcpm_api
from voxcpm_api.engine import tiny
from voxcpm_api.lora.catalog import LoRACatalog, check_adapter_fits

MODEL_FILES = {"config.json", "model.safetensors", "audiovae.pth", *tiny.TOKENIZER_FILES}
LORA_CONFIG_FIELDS = {"enable_lm", "enable_dit", "enable_proj", "r", "alpha", "dropout",
                      "target_modules_lm", "target_modules_dit", "target_proj_modules"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tiny.TinyCheckpoints:
    return tiny.build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _official_model(arch: str, model_dir: Path, lora_config: dict | None = None):
    if arch == "voxcpm2":
        from voxcpm.model.voxcpm2 import LoRAConfig, VoxCPM2Model as cls
    else:
        from voxcpm.model.voxcpm import LoRAConfig, VoxCPMModel as cls
    cfg = LoRAConfig(**lora_config) if lora_config is not None else None
    return cls.from_local(str(model_dir), optimize=False, device="cpu", lora_config=cfg)


def test_tokenizer_ships_with_the_package() -> None:
    assert tiny._tokenizer_source() == tiny.ASSETS_DIR
    assert (tiny.ASSETS_DIR / "NOTICE").read_text().count("Apache") >= 1


@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
def test_model_directory_is_in_the_official_format(ckpts: tiny.TinyCheckpoints, arch: str) -> None:
    model_dir = ckpts.models[arch]
    assert MODEL_FILES <= {p.name for p in model_dir.iterdir()}
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architecture"] == arch and config["dtype"] == "float32" and config["device"] == "cpu"
    assert config["lm_config"]["vocab_size"] == 73448
    for name in tiny.TOKENIZER_FILES:
        assert _sha(model_dir / name) == _sha(tiny.ASSETS_DIR / name)

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as fh:
        main_keys = set(fh.keys())
        assert all(fh.get_slice(k).get_dtype() == "F32" for k in main_keys)
    assert main_keys and not any(k.startswith("audio_vae.") for k in main_keys)
    vae = torch.load(model_dir / "audiovae.pth", map_location="cpu", weights_only=True)
    assert set(vae) == {"state_dict"}
    vae_keys = set(vae["state_dict"])
    assert vae_keys and not any(k.startswith("audio_vae.") for k in vae_keys)
    if arch == "voxcpm2":
        assert vae["state_dict"]["decoder.sr_bin_boundaries"].tolist() == [20000, 30000, 40000]

    # the official loader uses strict=False: check that every tensor it wants is really on disk
    model = _official_model(arch, model_dir)
    wanted = set(model.state_dict())
    assert wanted - {f"audio_vae.{k}" for k in vae_keys} == main_keys
    assert {k for k in wanted if k.startswith("audio_vae.")} == {f"audio_vae.{k}" for k in vae_keys}


@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
@pytest.mark.parametrize("name", sorted(tiny.LORA_RECIPES))
def test_lora_folders_match_the_trainer_format(ckpts: tiny.TinyCheckpoints, arch: str, name: str) -> None:
    lora_dir = ckpts.loras[arch][name]
    assert {p.name for p in lora_dir.iterdir()} == {"lora_weights.safetensors", "lora_config.json"}
    info = json.loads((lora_dir / "lora_config.json").read_text())
    assert set(info) == {"base_model", "lora_config"}
    assert info["base_model"] == str(ckpts.models[arch])
    cfg = info["lora_config"]
    assert set(cfg) == LORA_CONFIG_FIELDS
    assert isinstance(cfg["r"], int) and isinstance(cfg["alpha"], int)
    recipe = tiny.LORA_RECIPES[name]
    assert (cfg["r"], cfg["alpha"]) == (recipe["r"], recipe["alpha"])

    from safetensors.torch import load_file

    tensors = load_file(str(lora_dir / "lora_weights.safetensors"))
    assert all(k.endswith((".lora_A", ".lora_B")) and v.dtype == torch.float32 for k, v in tensors.items())
    # exactly the modules the official _apply_lora wraps for this config, with the same shapes
    official = _official_model(arch, ckpts.models[arch], cfg).get_lora_state_dict()
    assert set(official) == set(tensors)
    for key, value in tensors.items():
        assert value.shape == official[key].shape, key
    r = cfg["r"]
    for key, value in tensors.items():
        if key.endswith(".lora_A"):
            assert value.shape[0] == r
        else:
            assert value.shape[1] == r and value.abs().max() > 0  # B is non-zero
    spec = LoRACatalog(ckpts.lora_roots[arch]).resolve(name)
    assert spec.rank == r and spec.alpha == cfg["alpha"]
    linear_shapes = {}
    for module_name, module in _official_model(arch, ckpts.models[arch]).named_modules():
        if isinstance(module, torch.nn.Linear) and not module_name.startswith("audio_vae."):
            linear_shapes[module_name] = (module.out_features, module.in_features)
    check_adapter_fits(spec, linear_shapes)


def test_the_two_adapters_differ_in_rank_and_targets(ckpts: tiny.TinyCheckpoints) -> None:
    for arch in tiny.ARCHITECTURES:
        a = json.loads((ckpts.loras[arch]["r4_qkvo"] / "lora_config.json").read_text())["lora_config"]
        b = json.loads((ckpts.loras[arch]["r16_proj_mlp"] / "lora_config.json").read_text())["lora_config"]
        assert (a["r"], a["alpha"], a["enable_dit"], a["enable_proj"]) == (4, 8, True, False)
        assert (b["r"], b["alpha"], b["enable_dit"], b["enable_proj"]) == (16, 32, False, True)
        assert "fusion_concat_proj" in b["target_proj_modules"] if arch == "voxcpm2" else True


def test_build_is_cached_idempotent_and_race_safe(ckpts: tiny.TinyCheckpoints, tmp_path: Path) -> None:
    # a second call on a complete build returns it without touching it
    before = {p: p.stat().st_mtime_ns for p in ckpts.root.rglob("*")}
    again = tiny.build_tiny_checkpoints(ckpts.root.parent)
    assert again == ckpts
    assert {p: p.stat().st_mtime_ns for p in ckpts.root.rglob("*")} == before

    # two processes racing on a fresh root: both succeed, one complete build, no temp leftovers
    root = tmp_path / "race"
    env = dict(os.environ, PYTHONPATH=str(Path(voxcpm_api.__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "voxcpm_api.engine.tiny", str(root)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert [p.name for p in root.iterdir()] == [tiny.RECIPE_VERSION]
    raced = tiny.build_tiny_checkpoints(root)
    # fixed seeds: the weights are the same bytes as the other build's
    for arch in tiny.ARCHITECTURES:
        for name in ("model.safetensors", "audiovae.pth"):
            if name == "audiovae.pth":  # torch.save embeds the archive name; compare the tensors
                a = torch.load(raced.models[arch] / name, weights_only=True)["state_dict"]
                b = torch.load(ckpts.models[arch] / name, weights_only=True)["state_dict"]
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            else:
                assert _sha(raced.models[arch] / name) == _sha(ckpts.models[arch] / name)
        for lora in tiny.LORA_RECIPES:
            assert _sha(raced.loras[arch][lora] / "lora_weights.safetensors") == _sha(
                ckpts.loras[arch][lora] / "lora_weights.safetensors"
            )


def test_incomplete_build_is_replaced(tmp_path: Path) -> None:
    broken = tmp_path / tiny.RECIPE_VERSION
    (broken / "voxcpm").mkdir(parents=True)  # no manifest: an interrupted copy
    built = tiny.build_tiny_checkpoints(tmp_path)
    assert (built.root / tiny.MANIFEST_NAME).is_file()
    assert (built.models["voxcpm"] / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [tiny.RECIPE_VERSION]
