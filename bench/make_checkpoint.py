"""Random-weight VoxCPM checkpoints at the real size, in the official on-disk layout, for benchmarks.

    python bench/make_checkpoint.py --model voxcpm2 --out /tmp/voxcpm-bench            # full size, on the GPU
    python bench/make_checkpoint.py --model voxcpm1.5 --tiny --device cpu --out /tmp/x  # tiny dims, for a smoke test

`build_checkpoint(model, root)` writes, once per recipe, under `root/<model>[-tiny]-<RECIPE>/`:

    model/   config.json (bench/configs/<model>.config.json verbatim; tiny: the tiny config of
             voxcpm_api.engine.tiny), model.safetensors (every non-VAE tensor, in the config's dtype:
             bf16 at full size), audiovae.pth (torch.save({"state_dict": vae}), float32) and the three
             VoxCPM1.5 tokenizer files
    lora/adapter_0 .. adapter_7/   lora_weights.safetensors + lora_config.json as the official trainer
             writes them: r 32, alpha 16, LM + DiT q/k/v/o, float32, each from its own seed

The model is built with the package's own classes (`VoxCPMModel` / `VoxCPM2Model` and their
AudioVAE), so names, shapes and the default initialisation are the package's. Then `stop_head.weight`
is zeroed: both stop logits are exactly 0, argmax picks index 0 ("continue"), so every request runs
until its max_len: speed per patch does not depend on the values, and this makes every request the
same known length. At full size the parameters are created directly on the GPU (default init of
2.3 B parameters on the CPU would take minutes).

A finished build has a manifest, written last; the build goes into a temp folder renamed into place,
so an interrupted build is never mistaken for a complete one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

# Bump when what is written changes (sizes, seeds, LoRA recipe), so old builds are not reused.
RECIPE = "bench-r1"
MANIFEST_NAME = "bench_manifest.json"
CONFIG_DIR = BENCH_DIR / "configs"
# model name -> (config.json "architecture", config file under bench/configs/)
MODELS: dict[str, tuple[str, str]] = {
    "voxcpm1.5": ("voxcpm", "voxcpm1.5.config.json"),
    "voxcpm2": ("voxcpm2", "voxcpm2.config.json"),
}
LORA_COUNT = 8
LORA_RANK = 32
LORA_ALPHA = 16
_LORA_B_STD = 0.01  # small but non-zero: a zero B would make an adapter a no-op a smart engine could skip
_LORA_SEED0 = 7001
_MODEL_SEED = 4242


@dataclass(frozen=True)
class BenchCheckpoint:
    """Where one complete build lives."""

    root: Path
    model_dir: Path
    lora_root: Path  # use as LoRACatalog root / --lora-dir
    lora_names: tuple[str, ...]  # relative to lora_root
    architecture: str
    manifest: dict

    @property
    def lora_dirs(self) -> list[Path]:
        return [self.lora_root / name for name in self.lora_names]


def build_checkpoint(
    model: str,
    root: Path,
    *,
    tiny: bool = False,
    device: str = "cuda",
    n_loras: int = LORA_COUNT,
    log=print,
) -> BenchCheckpoint:
    """Return the build of `model` under `root`, building it first unless a complete one is there."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; one of {sorted(MODELS)}")
    root = Path(root).expanduser().resolve()
    final = root / f"{model}{'-tiny' if tiny else ''}-{RECIPE}"
    found = _load_complete(final, n_loras)
    if found is not None:
        log(f"checkpoint: reusing {final}")
        return found
    root.mkdir(parents=True, exist_ok=True)
    if final.exists():  # an interrupted or smaller build: replace it
        shutil.rmtree(final, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.build-", dir=root))
    try:
        started = time.perf_counter()
        manifest = _build_into(tmp, final, model, tiny=tiny, device=device, n_loras=n_loras, log=log)
        manifest["build_s"] = round(time.perf_counter() - started, 2)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    found = _load_complete(final, n_loras)
    if found is None:
        raise RuntimeError(f"checkpoint build under {final} is incomplete")
    log(f"checkpoint: built {final} in {found.manifest['build_s']} s")
    return found


def _load_complete(final: Path, n_loras: int) -> BenchCheckpoint | None:
    try:
        manifest = json.loads((final / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("recipe") != RECIPE:
        return None
    names = tuple(manifest.get("loras", []))
    if len(names) < n_loras:
        return None
    return BenchCheckpoint(
        root=final,
        model_dir=final / "model",
        lora_root=final / "lora",
        lora_names=names[:n_loras],
        architecture=str(manifest["architecture"]),
        manifest=manifest,
    )


def _config_text(model: str, tiny: bool) -> str:
    arch, filename = MODELS[model]
    if tiny:
        from voxcpm_api.engine.tiny import tiny_config

        return json.dumps(tiny_config(arch), indent=4) + "\n"
    return (CONFIG_DIR / filename).read_text(encoding="utf-8")  # verbatim: byte-identical to the published file


def _instantiate(arch: str, model_dir: Path, device: str):
    """The package's model class with default random init, parameters created on `device`."""
    import torch
    from transformers import LlamaTokenizerFast

    if arch == "voxcpm":
        from voxcpm.model.voxcpm import VoxCPMConfig
        from voxcpm.model.voxcpm import VoxCPMModel as model_cls
        from voxcpm.modules.audiovae import AudioVAE as vae_cls
    else:
        from voxcpm.model.voxcpm2 import VoxCPM2Model as model_cls
        from voxcpm.model.voxcpm2 import VoxCPMConfig
        from voxcpm.modules.audiovae import AudioVAEV2 as vae_cls

    config = VoxCPMConfig.model_validate_json((model_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer = LlamaTokenizerFast.from_pretrained(str(model_dir))

    def construct():
        torch.manual_seed(_MODEL_SEED)
        vae = vae_cls(config=config.audio_vae_config)
        return model_cls(config, tokenizer, vae, device=device)

    if device == "cpu":
        return construct(), config
    try:
        # torch.device as a context makes every parameter/buffer factory default to the GPU
        with torch.device(device):
            return construct(), config
    except Exception as exc:  # noqa: BLE001 - an unexpected constructor detail: fall back to the slow path
        print(f"checkpoint: building on {device} failed ({exc!r}); building on the CPU instead", file=sys.stderr)
        return construct().to(device), config


def _build_into(tmp: Path, final: Path, model: str, *, tiny: bool, device: str, n_loras: int, log) -> dict:
    import torch
    from safetensors.torch import save_file

    from voxcpm_api.engine.tiny import TOKENIZER_FILES, _tokenizer_source

    arch = MODELS[model][0]
    model_dir = tmp / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(_config_text(model, tiny), encoding="utf-8")
    tok_src = _tokenizer_source()  # the verbatim VoxCPM1.5 tokenizer files shipped with the tiny checkpoints
    for name in TOKENIZER_FILES:
        shutil.copyfile(tok_src / name, model_dir / name)

    started = time.perf_counter()
    with torch.no_grad():
        net, config = _instantiate(arch, model_dir, device)
        main_dtype = getattr(torch, config.dtype)  # what from_local casts to: bfloat16 at full size
        net = net.to(main_dtype)
        net.audio_vae = net.audio_vae.to(torch.float32)  # the package keeps the VAE in fp32
        net.stop_head.weight.zero_()  # both stop logits 0 -> argmax 0 = "continue" -> exactly max_len patches
        state = net.state_dict()
        main: dict[str, torch.Tensor] = {}
        vae: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            # .to("cpu") gives each tensor its own storage (safetensors refuses shared ones)
            tensor = value.detach().to("cpu", copy=True).contiguous()
            if key.startswith("audio_vae."):
                vae[key[len("audio_vae.") :]] = tensor
            else:
                main[key] = tensor
        linears = {
            name: (module.out_features, module.in_features)
            for name, module in net.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.startswith("audio_vae.")
        }
        n_main = sum(t.numel() for t in main.values())
        del net, state
    if device != "cpu":
        torch.cuda.empty_cache()
    log(
        f"checkpoint: {model}{' (tiny)' if tiny else ''} built on {device} in {time.perf_counter() - started:.1f} s, "
        f"{n_main / 1e6:.1f} M main params"
    )

    started = time.perf_counter()
    save_file(main, str(model_dir / "model.safetensors"))
    torch.save({"state_dict": vae}, str(model_dir / "audiovae.pth"))
    log(
        f"checkpoint: weights written in {time.perf_counter() - started:.1f} s "
        f"({(model_dir / 'model.safetensors').stat().st_size / 1e9:.2f} GB + "
        f"{(model_dir / 'audiovae.pth').stat().st_size / 1e9:.2f} GB)"
    )
    del main, vae

    started = time.perf_counter()
    names = write_loras(arch, linears, tmp / "lora", base_model=final / "model", n=n_loras)
    log(
        f"checkpoint: {len(names)} LoRA adapters (r {LORA_RANK}, alpha {LORA_ALPHA}) written in "
        f"{time.perf_counter() - started:.1f} s"
    )

    # mkdtemp made the folder private and safetensors writes 0600 files; make the build readable
    for dirpath, _dirnames, filenames in os.walk(tmp):
        os.chmod(dirpath, 0o755)
        for filename in filenames:
            os.chmod(os.path.join(dirpath, filename), 0o644)
    return {
        "recipe": RECIPE,
        "model": model,
        "tiny": tiny,
        "architecture": arch,
        "main_params": n_main,
        "main_dtype": str(main_dtype).replace("torch.", ""),
        "model_safetensors_bytes": (model_dir / "model.safetensors").stat().st_size,
        "loras": names,
        "lora": {"r": LORA_RANK, "alpha": LORA_ALPHA, "targets": "LM + DiT q/k/v/o", "b_std": _LORA_B_STD},
        "note": "random weights, stop head zeroed (every request runs to max_len); not a speech model",
    }


def write_loras(
    arch: str, linears: dict[str, tuple[int, int]], lora_root: Path, *, base_model: Path, n: int
) -> list[str]:
    """Write `n` adapters under `lora_root` in the trainer's format; returns their names.

    The writing itself is voxcpm_api.engine.tiny's (same key names, shapes, config schema), with the
    web UI's default recipe (r 32, alpha 16, LM + DiT q/k/v/o) and a different seed per adapter.
    """
    from voxcpm_api.engine.tiny import _build_lora

    names: list[str] = []
    for i in range(n):
        recipe = {
            "enable_lm": True,
            "enable_dit": True,
            "enable_proj": False,
            "r": LORA_RANK,
            "alpha": LORA_ALPHA,
            "target_modules_lm": ["q_proj", "v_proj", "k_proj", "o_proj"],
            "target_modules_dit": ["q_proj", "v_proj", "k_proj", "o_proj"],
            "seed": _LORA_SEED0 + 10 * i,
            "b_std": _LORA_B_STD,
        }
        name = f"adapter_{i}"
        _build_lora(arch, name, recipe, linears, lora_root / name, base_model=base_model)
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--out", type=Path, required=True, help="root folder; the build goes in a subfolder")
    parser.add_argument("--tiny", action="store_true", help="tiny dimensions (smoke tests), float32")
    parser.add_argument("--device", default="cuda", help="where to create the parameters (cuda, cuda:N, cpu)")
    parser.add_argument("--loras", type=int, default=LORA_COUNT, help="number of LoRA adapters")
    args = parser.parse_args(argv)
    ckpt = build_checkpoint(args.model, args.out, tiny=args.tiny, device=args.device, n_loras=args.loras)
    print(f"model dir: {ckpt.model_dir}")
    print(f"lora root: {ckpt.lora_root} ({', '.join(ckpt.lora_names)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
