"""The short-sequence attention kernel (Triton, GPU in production) inside the official DiT decoder.

Triton's interpreter runs the very kernel on the CPU (float32); it reads TRITON_INTERPRET when a
kernel is defined, so the check runs in a fresh interpreter process."""

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
from voxcpm.modules.minicpm4 import MiniCPM4Config, MiniCPMModel
from voxcpm_api.engine.batched import attention_kernels as ak

cfg = json.load(open(sys.argv[1]))
# the DiT decoder the way the official model builds it: the LM's config with the DiT's sizes
decoder = MiniCPM4Config(**cfg["lm_config"]).model_copy(deep=True)
dit = cfg["dit_config"]
decoder.hidden_size, decoder.intermediate_size = dit["hidden_dim"], dit["ffn_dim"]
decoder.num_attention_heads, decoder.num_hidden_layers = dit["num_heads"], dit["num_layers"]
decoder.kv_channels, decoder.vocab_size = dit.get("kv_channels"), 0
torch.manual_seed(0)
model = MiniCPMModel(decoder).eval()
calls = []
kernel = ak.short_attention
ak.short_attention = lambda *a: calls.append(1) or kernel(*a)
inputs = {t: torch.randn(3, t, decoder.hidden_size) for t in (5, 9, 11)}
with torch.inference_mode():
    want = {t: model(x, is_causal=False)[0] for t, x in inputs.items()}
    causal_before = model(inputs[9], is_causal=True)[0]
    swapped = ak.use_short_attention([model])
    got = {t: model(x, is_causal=False)[0] for t, x in inputs.items()}
    causal_after = model(inputs[9], is_causal=True)[0]
names_ok = all(type(layer.self_attn) is ak.ShortSequenceAttention for layer in model.layers)
print(json.dumps({"swapped": swapped, "layers": len(model.layers), "names_ok": names_ok, "kernel_calls": len(calls),
                  "max_abs": {t: float((want[t] - got[t]).abs().max()) for t in inputs},
                  "peak": min(float(w.abs().max()) for w in want.values()),
                  "causal_same": bool(torch.equal(causal_before, causal_after))}))
"""


@pytest.mark.parametrize("arch", ["voxcpm", "voxcpm2"])
def test_short_attention_matches_the_official_decoder(arch: str, tiny_checkpoints: TinyCheckpoints) -> None:
    config = tiny_checkpoints.models[arch] / "config.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    done = subprocess.run([sys.executable, "-c", CHECK, str(config)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["swapped"] == result["layers"] > 0 and result["names_ok"]
    assert result["kernel_calls"] == 3 * result["layers"]  # every non-causal layer call ran the kernel
    assert result["peak"] > 0.1
    for length, err in result["max_abs"].items():
        assert err < 1e-5, (length, result)
    assert result["causal_same"]  # the LMs' causal passes keep the official attention
