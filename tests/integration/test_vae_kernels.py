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
from voxcpm_api.engine.batched.vae_kernels import FusedDecoderBlock, FusedResidualUnit, fuse_decoder

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
    swapped, blocks = fuse_decoder(vae.decoder, upsample_min_in_channels=0)  # tiny blocks: every head too
    got = vae.decode(z)
fused = sum(isinstance(m, FusedResidualUnit) for m in vae.modules())
heads = sum(isinstance(m, FusedDecoderBlock) for m in vae.modules())
print(json.dumps({"swapped": swapped, "fused": fused, "blocks": blocks, "heads": heads,
                  "rates": len(config["decoder_rates"]), "same_keys": keys == list(vae.state_dict()),
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
    assert result["swapped"] == result["fused"] == 3 * result["rates"]  # every decoder block's 3 units
    assert result["blocks"] == result["heads"] == result["rates"]  # and every block's snake + upsampling
    assert result["same_keys"]  # the VAE still loads and saves under the official names
    assert result["shape_ok"]
    assert result["peak"] > 0.01  # a silent decoder would make the comparison empty
    assert result["max_abs"] < 1e-5, result


WIDE = r"""
import json, torch
from voxcpm.modules.audiovae.audio_vae_v2 import CausalDecoderBlock, CausalResidualUnit
from voxcpm_api.engine.batched import vae_kernels as vk

torch.manual_seed(0)
def randomize(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("alpha"):
                p.uniform_(0.3, 2.0)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return module.eval()

# a unit with several output-channel tiles and the wide units' tile shape, fed a strided slice, and a
# block head with several K blocks and an odd stride
unit = randomize(CausalResidualUnit(256, dilation=9, groups=256))
block = randomize(CausalDecoderBlock(96, 48, stride=7, groups=48))
wide = torch.randn(2, 256, 40)[..., 3:]
x = torch.randn(2, 96, 11)
with torch.inference_mode():
    want_unit, want_block = unit(wide), block(x)
    fused_unit = vk.FusedResidualUnit(unit)
    vk.FusedDecoderBlock.swap(block)
    got_unit, got_block = fused_unit(wide), block(x)
    vk.FusedDecoderBlock.unswap(block)
    back = type(block) is CausalDecoderBlock and torch.equal(block(x), want_block)
print(json.dumps({"unit": float((want_unit - got_unit).abs().max()),
                  "block": float((want_block - got_block).abs().max()),
                  "peaks": [float(want_unit.abs().max()), float(want_block.abs().max())],
                  "shapes": [list(want_block.shape), list(got_block.shape)], "back": back}))
"""


def test_wide_units_and_odd_strides_match_the_official_modules() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    done = subprocess.run([sys.executable, "-c", WIDE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shapes"][0] == result["shapes"][1] == [2, 48, 77]
    assert min(result["peaks"]) > 0.1
    assert result["unit"] < 1e-5 and result["block"] < 1e-5, result
    assert result["back"]  # unswap restores the official class and its exact output
