"""Tiny random-weight VoxCPM checkpoints in the official on-disk format, for tests and `--model tiny`.

`build_tiny_checkpoints(root)` writes, once per recipe version, under `root/<RECIPE_VERSION>/`:

    voxcpm/    VoxCPM1.5-like geometry (44.1 kHz, patch 4, chunk 1764), float32
    voxcpm2/   VoxCPM2-like geometry (16 kHz in, 48 kHz out, patch 4), float32
    lora/<arch>/r4_qkvo/        r=4  alpha=8,  LM + DiT q/k/v/o
    lora/<arch>/r16_proj_mlp/   r=16 alpha=32, LM o_proj/gate_proj + the projection Linears

Each model directory holds what `voxcpm.VoxCPM(dir, enable_denoiser=False, optimize=False,
device="cpu")` reads: config.json, model.safetensors (no `audio_vae.*` keys), audiovae.pth
(`torch.save({"state_dict": vae})`) and the three tokenizer files (VoxCPM1.5's, shipped in
`tiny_assets/`). LoRA folders hold lora_weights.safetensors + lora_config.json as the official
trainer writes them. Weights are random but deterministic (fixed seeds); the stop head is biased
so that generations end after a varied, bounded number of patches.

Concurrency: the build happens in a private temp folder that is renamed into place, so two
processes racing on the same root both end up using one complete build.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

RECIPE_VERSION = "tiny-r2"
ARCHITECTURES = ("voxcpm", "voxcpm2")
MANIFEST_NAME = "tiny_manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ASSETS_DIR = Path(__file__).with_name("tiny_assets")
_SHARED_TOKENIZER_DIR = Path("/work/shared/reference/tokenizer/voxcpm1.5")

VOCAB_SIZE = 73448  # every id the VoxCPM1.5 tokenizer can emit is below this
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
FFN = 128

# The stop decision is argmax(stop_head(silu(stop_proj(h)))). Channel 0 of stop_proj is made a
# constant (zero weights, bias _STOP_CONST) and stop_head reads it, so the stop-minus-continue logit
# is _STOP_GAIN * (random part - threshold). The thresholds were measured on these exact weights
# (per-patch random part: V1 mean 0.048 std 0.008, V2 mean -0.070 std 0.010; threshold ~ mean +
# 1.8..1.9 std) so a 10-word sentence (14 tokens, cap 94) stops after ~10-70 patches depending on
# the seed, rarely at the minimum (4) or the cap. Scaling enc_to_lm_proj makes the LM state follow
# the freshly generated (noise-driven) patch more than the text, so lengths vary with the seed.
_STOP_CONST = 4.0
_STOP_GAIN = 50.0
_STOP_THRESHOLD = {"voxcpm": 0.0632, "voxcpm2": -0.0498}
_ENC_TO_LM_GAIN = 6.0
# A random AudioVAE decoder is dominated by its conv biases (a near-constant, DC-heavy output that
# hardly depends on the latents). Zeroing the decoder biases makes the output linear-ish in the
# latents; the gain on the last conv (before the tanh) brings it to a speech-like level (rms ~0.2).
_VAE_OUT_GAIN = {"voxcpm": 60.0, "voxcpm2": 120.0}

LORA_RECIPES: dict[str, dict] = {
    "r4_qkvo": {
        "enable_lm": True,
        "enable_dit": True,
        "enable_proj": False,
        "r": 4,
        "alpha": 8,
        "target_modules_lm": ["q_proj", "v_proj", "k_proj", "o_proj"],
        "target_modules_dit": ["q_proj", "v_proj", "k_proj", "o_proj"],
        "seed": 101,
        "b_std": 0.2,
    },
    "r16_proj_mlp": {
        "enable_lm": True,
        "enable_dit": False,
        "enable_proj": True,
        "r": 16,
        "alpha": 32,
        "target_modules_lm": ["o_proj", "gate_proj"],
        "target_modules_dit": ["q_proj", "v_proj", "k_proj", "o_proj"],
        "seed": 202,
        "b_std": 0.1,
    },
}
_PROJ_MODULES = {
    "voxcpm": ["enc_to_lm_proj", "lm_to_dit_proj", "res_to_dit_proj"],
    "voxcpm2": ["enc_to_lm_proj", "lm_to_dit_proj", "res_to_dit_proj", "fusion_concat_proj"],
}
_MODEL_SEEDS = {"voxcpm": 1234, "voxcpm2": 5678}


@dataclass(frozen=True)
class TinyCheckpoints:
    """Where a complete tiny build lives."""

    root: Path
    models: dict[str, Path] = field(default_factory=dict)  # architecture -> model directory
    lora_roots: dict[str, Path] = field(default_factory=dict)  # architecture -> folder to use as --lora-dir
    loras: dict[str, dict[str, Path]] = field(default_factory=dict)  # architecture -> {adapter name: dir}

    @property
    def v1(self) -> Path:
        return self.models["voxcpm"]

    @property
    def v2(self) -> Path:
        return self.models["voxcpm2"]


# --------------------------------------------------------------------------------------------- #
# public entry point
# --------------------------------------------------------------------------------------------- #


def build_tiny_checkpoints(root: Path) -> TinyCheckpoints:
    """Return the tiny checkpoints under `root`, building them first if no complete build exists."""
    root = Path(root).expanduser().resolve()
    final = root / RECIPE_VERSION
    if _is_complete(final):
        return _describe(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{RECIPE_VERSION}.build-", dir=root))
    try:
        _build_into(tmp, final)
        for _attempt in range(5):
            try:
                os.rename(tmp, final)  # atomic; fails if another process already put a build there
                break
            except OSError:
                if _is_complete(final):
                    break  # somebody else finished first: use theirs
                # an interrupted build (no manifest) is in the way: move it aside and retry
                aside = Path(tempfile.mkdtemp(prefix=f".{RECIPE_VERSION}.stale-", dir=root))
                try:
                    os.rename(final, aside / "old")
                except OSError:
                    pass
                shutil.rmtree(aside, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(final):
        raise RuntimeError(f"tiny checkpoint build under {final} is incomplete")
    return _describe(final)


def _is_complete(final: Path) -> bool:
    try:
        manifest = json.loads((final / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("recipe") == RECIPE_VERSION


def _describe(final: Path) -> TinyCheckpoints:
    models = {arch: final / arch for arch in ARCHITECTURES}
    lora_roots = {arch: final / "lora" / arch for arch in ARCHITECTURES}
    loras = {arch: {name: lora_roots[arch] / name for name in LORA_RECIPES} for arch in ARCHITECTURES}
    return TinyCheckpoints(root=final, models=models, lora_roots=lora_roots, loras=loras)


# --------------------------------------------------------------------------------------------- #
# building
# --------------------------------------------------------------------------------------------- #


def _tokenizer_source() -> Path:
    if all((ASSETS_DIR / name).is_file() for name in TOKENIZER_FILES):
        return ASSETS_DIR
    if all((_SHARED_TOKENIZER_DIR / name).is_file() for name in TOKENIZER_FILES):
        return _SHARED_TOKENIZER_DIR
    raise FileNotFoundError(f"tokenizer files {TOKENIZER_FILES} not found in {ASSETS_DIR}")


def _rope_factors(head_dim: int) -> list[float]:
    # Same shape of curve as the published long-rope factors: 1.0 rising smoothly, head_dim/2 values.
    n = head_dim // 2
    return [round(1.0 + 3.0 * (i / max(n - 1, 1)) ** 2, 6) for i in range(n)]


def tiny_config(arch: str) -> dict:
    """config.json contents for the tiny model of `arch`."""
    if arch == "voxcpm":
        head_dim = HIDDEN // HEADS
        lm_extra: dict = {}
        enc_extra: dict = {}
        vae = {
            "encoder_dim": 4,
            "encoder_rates": [2, 3, 6, 7, 7],
            "latent_dim": 64,
            "decoder_dim": 64,
            "decoder_rates": [7, 7, 6, 3, 2],
            "sample_rate": 44100,
        }
    elif arch == "voxcpm2":
        head_dim = 32  # kv_channels, so q_proj is [128, 64] like the real V2's 2048 x 1024
        lm_extra = {"kv_channels": head_dim}
        enc_extra = {"kv_channels": head_dim}
        vae = {
            "encoder_dim": 4,
            "encoder_rates": [2, 5, 8, 8],
            "latent_dim": 64,
            "decoder_dim": 64,
            "decoder_rates": [8, 6, 5, 2, 2, 2],
            "sr_bin_boundaries": [20000, 30000, 40000],
            "sample_rate": 16000,
            "out_sample_rate": 48000,
        }
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    factors = _rope_factors(head_dim)
    lm = {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "max_position_embeddings": 32768,
        "num_attention_heads": HEADS,
        "num_hidden_layers": 2,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000,
        **lm_extra,
        "rope_scaling": {
            "type": "longrope",
            "long_factor": factors,
            "short_factor": factors,
            "original_max_position_embeddings": 32768,
        },
        "vocab_size": VOCAB_SIZE,
        "scale_emb": 12,
        "dim_model_base": 256,
        "scale_depth": 1.4,
        "use_mup": False,
    }
    sub = {"hidden_dim": HIDDEN, "ffn_dim": FFN, "num_heads": HEADS, "num_layers": 1, **enc_extra}
    cfm = {"sigma_min": 1e-06, "solver": "euler", "t_scheduler": "log-norm", "inference_cfg_rate": 2.0}
    config = {
        "architecture": arch,
        "lm_config": lm,
        "patch_size": 4,
        "feat_dim": 64,
        "scalar_quantization_latent_dim": 32,
        "scalar_quantization_scale": 9,
        "residual_lm_num_layers": 1,
    }
    if arch == "voxcpm2":
        config["residual_lm_no_rope"] = True
    config.update(
        {
            "encoder_config": dict(sub),
            "dit_config": {**sub, "cfm_config": cfm},
            "audio_vae_config": vae,
            "max_length": 8192,
            "device": "cpu",
            "dtype": "float32",
        }
    )
    return config


def _instantiate(arch: str, model_dir: Path, tokenizer):
    """The official model class built from model_dir/config.json with random weights."""
    import torch

    if arch == "voxcpm":
        from voxcpm.model.voxcpm import VoxCPMConfig, VoxCPMModel
        from voxcpm.modules.audiovae import AudioVAE

        config = VoxCPMConfig.model_validate_json((model_dir / "config.json").read_text(encoding="utf-8"))
        vae = AudioVAE(config=config.audio_vae_config)
        model = VoxCPMModel(config, tokenizer, vae, device="cpu")
    else:
        from voxcpm.model.voxcpm2 import VoxCPM2Model, VoxCPMConfig
        from voxcpm.modules.audiovae import AudioVAEV2

        config = VoxCPMConfig.model_validate_json((model_dir / "config.json").read_text(encoding="utf-8"))
        vae = AudioVAEV2(config=config.audio_vae_config)
        model = VoxCPM2Model(config, tokenizer, vae, device="cpu")
    return model.to(torch.float32).eval()


def _shape_weights(arch: str, model) -> None:
    """Post-init adjustments: smaller embeddings, a louder patch feedback and a biased stop head."""
    import torch

    with torch.no_grad():
        model.base_lm.embed_tokens.weight.mul_(0.5)
        model.enc_to_lm_proj.weight.mul_(_ENC_TO_LM_GAIN)
        model.enc_to_lm_proj.bias.mul_(_ENC_TO_LM_GAIN)
        model.stop_proj.weight[0].zero_()
        model.stop_proj.bias[0] = _STOP_CONST
        model.stop_head.weight.mul_(_STOP_GAIN)
        silu = _STOP_CONST / (1.0 + math.exp(-_STOP_CONST))
        model.stop_head.weight[0, 0] = 0.0
        model.stop_head.weight[1, 0] = -_STOP_GAIN * _STOP_THRESHOLD[arch] / silu
        decoder = model.audio_vae.decoder
        for name, param in decoder.named_parameters():
            if name.endswith("bias") and "embed" not in name:
                param.zero_()
        last_conv = [m for m in decoder.model if hasattr(m, "weight_g")][-1]
        last_conv.weight_g.mul_(_VAE_OUT_GAIN[arch])


def _build_model(arch: str, out_dir: Path, tok_src: Path) -> list[str]:
    """Write one model directory; return the module paths of its nn.Linear layers (minus audio_vae)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaTokenizerFast

    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(tiny_config(arch), indent=4) + "\n", encoding="utf-8")
    for name in TOKENIZER_FILES:
        shutil.copyfile(tok_src / name, out_dir / name)
    tokenizer = LlamaTokenizerFast.from_pretrained(str(out_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_MODEL_SEEDS[arch])
        model = _instantiate(arch, out_dir, tokenizer)
        _shape_weights(arch, model)
    state = model.state_dict()
    main = {k: v.detach().contiguous().clone() for k, v in state.items() if not k.startswith("audio_vae.")}
    vae = {k[len("audio_vae."):]: v.detach().contiguous().clone()
           for k, v in state.items() if k.startswith("audio_vae.")}
    save_file(main, str(out_dir / "model.safetensors"))
    torch.save({"state_dict": vae}, str(out_dir / "audiovae.pth"))
    linears = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.startswith("audio_vae."):
            linears[name] = (module.out_features, module.in_features)
    return linears


def _build_lora(arch: str, name: str, recipe: dict, linears: dict[str, tuple[int, int]], out_dir: Path,
                base_model: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from ..lora.catalog import LoRATargets

    cfg = {
        "enable_lm": recipe["enable_lm"],
        "enable_dit": recipe["enable_dit"],
        "enable_proj": recipe["enable_proj"],
        "r": recipe["r"],
        "alpha": recipe["alpha"],
        "dropout": 0.0,
        "target_modules_lm": list(recipe["target_modules_lm"]),
        "target_modules_dit": list(recipe["target_modules_dit"]),
        "target_proj_modules": list(_PROJ_MODULES[arch]),
    }
    targets = LoRATargets(
        enable_lm=cfg["enable_lm"],
        enable_dit=cfg["enable_dit"],
        enable_proj=cfg["enable_proj"],
        target_modules_lm=tuple(cfg["target_modules_lm"]),
        target_modules_dit=tuple(cfg["target_modules_dit"]),
        target_proj_modules=tuple(cfg["target_proj_modules"]),
    )
    r = cfg["r"]
    gen = torch.Generator().manual_seed(recipe["seed"] + (0 if arch == "voxcpm" else 1))
    tensors: dict[str, torch.Tensor] = {}
    for module in sorted(linears):
        if not targets.covers(module):
            continue
        out_f, in_f = linears[module]
        bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform(a=sqrt(5)) bound, as the trainer initialises A
        a = (torch.rand(r, in_f, generator=gen) * 2.0 - 1.0) * bound
        b = torch.randn(out_f, r, generator=gen) * recipe["b_std"]  # non-zero: a "trained" adapter
        tensors[f"{module}.lora_A"] = a.to(torch.float32).contiguous()
        tensors[f"{module}.lora_B"] = b.to(torch.float32).contiguous()
    if not tensors:
        raise RuntimeError(f"LoRA recipe {name} targets nothing in the tiny {arch} model")
    out_dir.mkdir(parents=True)
    save_file(tensors, str(out_dir / "lora_weights.safetensors"))
    info = {"base_model": str(base_model), "lora_config": cfg}
    with open(out_dir / "lora_config.json", "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2, ensure_ascii=False)


def _build_into(tmp: Path, final: Path) -> None:
    tok_src = _tokenizer_source()
    for arch in ARCHITECTURES:
        linears = _build_model(arch, tmp / arch, tok_src)
        for name, recipe in LORA_RECIPES.items():
            _build_lora(arch, name, recipe, linears, tmp / "lora" / arch / name, base_model=final / arch)
    manifest = {
        "recipe": RECIPE_VERSION,
        "architectures": list(ARCHITECTURES),
        "loras": sorted(LORA_RECIPES),
        "note": "random weights for tests; not a speech model",
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    # mkdtemp made the folder private and safetensors writes 0600 files; make the build readable
    for dirpath, _dirnames, filenames in os.walk(tmp):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m voxcpm_api.engine.tiny OUTDIR", file=sys.stderr)
        return 2
    ckpts = build_tiny_checkpoints(Path(args[0]))
    print(f"tiny checkpoints ({RECIPE_VERSION}) at {ckpts.root}")
    for arch, path in ckpts.models.items():
        print(f"  model {arch}: {path}")
        for name, lpath in ckpts.loras[arch].items():
            print(f"    lora {name}: {lpath}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
