"""The fused AudioVAE residual unit (Triton, GPU in production) against the official decoder.

Triton's interpreter runs the very kernel on the CPU; it reads TRITON_INTERPRET when a kernel is
defined, so each check runs in a fresh interpreter process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from voxcpm_api.engine.tiny import TinyCheckpoints

CHECK = r"""
import json, sys, torch
from voxcpm_api.engine.batched.vae_kernels import FusedResidualUnit, fuse_residual_units

arch, config_path = sys.argv[1], sys.argv[2]
if arch == "voxcpm2":
    from voxcpm.modules.audiovae.audio_vae_v2 import AudioVAE, AudioVAEConfig
else:
    from voxcpm.modules.audiovae.audio_vae import AudioVAE, AudioVAEConfig
config = json.load(open(config_path))["audio_vae_config"]
torch.manual_seed(0)
vae = AudioVAE(AudioVAEConfig(**config)).eval()
with torch.no_grad():  # random snake alphas and biases: the defaults (ones, zeros) would hide mistakes
    for name, p in vae.named_parameters():
        if name.endswith("alpha"):
            p.uniform_(0.3, 2.0)
        elif name.endswith("bias"):
            p.normal_(0, 0.1)
z = torch.randn(2, config["latent_dim"], 9)
keys = list(vae.state_dict())
with torch.inference_mode():
    want = vae.decode(z)
    swapped = fuse_residual_units(vae.decoder)
    got = vae.decode(z)
fused = sum(isinstance(m, FusedResidualUnit) for m in vae.modules())
print(json.dumps({"swapped": swapped, "fused": fused, "same_keys": keys == list(vae.state_dict()),
                  "max_abs": float((want - got).abs().max()), "peak": float(want.abs().max()),
                  "shape_ok": want.shape == got.shape}))
"""


@pytest.mark.parametrize("arch", ["voxcpm", "voxcpm2"])
def test_fused_residual_units_decode_like_the_official_decoder(arch: str, tiny_checkpoints: TinyCheckpoints) -> None:
    config = tiny_checkpoints.models[arch] / "config.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    done = subprocess.run([sys.executable, "-c", CHECK, arch, str(config)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["swapped"] == result["fused"] > 0  # every decoder block's 3 units
    assert result["same_keys"]  # the VAE still loads and saves under the official names
    assert result["shape_ok"]
    assert result["peak"] > 0.01  # a silent decoder would make the comparison empty
    assert result["max_abs"] < 1e-5, result
