"""The fused LoRA expand kernel (Triton, GPU in production) against the float64 arithmetic it stands for.

Triton's interpreter runs the very kernel on the CPU; it reads TRITON_INTERPRET when a kernel is
defined, so the check runs in a fresh interpreter process. float32 only: the interpreter has no
bfloat16 arithmetic (the GPU benchmark run compares the bfloat16 kernel with the torch form)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHECK = r"""
import json, torch
from voxcpm_api.engine.batched.lora_kernels import lora_expand, lora_expand3, register_op
from voxcpm_api.engine.batched.multi_lora import FusedQKV, LoRAContext, MultiLoRALinear

register_op()  # what wrapping a layer does
torch.manual_seed(0)
cases = []
# (flattened rows M, mask rows R, out, K): one mask row per row, per DiT sequence (rep 9), broadcast (R = 1),
# K not a multiple of the kernel's 32-wide K block, out not a multiple of its 64-wide N block
for rows, mask_rows, out, k in [(5, 5, 7, 24), (36, 4, 70, 64), (130, 1, 33, 40), (72, 8, 128, 256)]:
    both = torch.randn(rows, out + k)
    table = torch.randn(mask_rows, k)
    if mask_rows > 1:
        table[1] = 0  # a base-model row
    b = torch.randn(out, k)
    got = lora_expand(both, table, b)
    rep = rows // mask_rows
    hidden = both[:, out:] * table.repeat_interleave(rep, 0)
    want = both[:, :out].double() + hidden.double() @ b.double().t()
    base_rows = slice(rep, 2 * rep) if mask_rows > 1 else slice(0, 0)
    cases.append({"case": [rows, mask_rows, out, k], "shape_ok": list(got.shape) == [rows, out],
                  "rel": float((got.double() - want).abs().max() / want.abs().max()),
                  "lora_size": float((want - both[:, :out].double()).abs().max()),
                  "base_exact": bool(torch.equal(got[base_rows], both[base_rows, :out]))})

# the whole layer: fused [W; A] GEMM + the kernel, (B, T, in) input with one mask row per sequence
layer = torch.nn.Linear(12, 10)
context = LoRAContext()
wrapper = MultiLoRALinear(layer, context)
wrapper.allocate(slots=2, rank_cap=4)
with torch.no_grad():
    wrapper.lora_a.normal_()
    wrapper.lora_b.normal_()
x = torch.randn(3, 5, 12)
context.mask = torch.tensor([[0.5] * 4 + [0.0] * 4, [0.0] * 8, [0.0] * 4 + [2.0] * 4])
with torch.no_grad():
    got = wrapper(x)
want = []
for row, (slot, scale) in enumerate([(0, 0.5), (None, 0.0), (1, 2.0)]):
    ref = torch.nn.functional.linear(x[row].double(), layer.weight.double(), layer.bias.double())
    if slot is not None:
        a = wrapper.lora_a[slot * 4:(slot + 1) * 4].double()
        bb = wrapper.lora_b[:, slot * 4:(slot + 1) * 4].double()
        ref = ref + (x[row].double() @ a.t() * scale) @ bb.t()
    want.append(ref)
want = torch.stack(want)

# three layers in one launch (q, k, v): widths spanning 1 and 2 N tiles, a base row, one mask row per sequence
grouped = []
# (36 rows: the LM's tiles; 144 and 132: the DiTs' wider tiles, one of them VoxCPM2's >= 2048 wide q)
for widths, rows in [((70, 7, 7), 36), ((128, 16, 16), 144), ((2048, 8, 8), 132)]:
    mask_rows, k = 4, 40
    boths = [torch.randn(rows, n + k) for n in widths]
    bs = [torch.randn(n, k) for n in widths]
    table = torch.randn(mask_rows, k)
    table[2] = 0
    outs = lora_expand3(boths, table, bs)
    rep = rows // mask_rows
    for both, b, out, n in zip(boths, bs, outs, widths):
        want3 = both[:, :n].double() + (both[:, n:] * table.repeat_interleave(rep, 0)).double() @ b.double().t()
        grouped.append({"widths": widths, "shape_ok": list(out.shape) == [rows, n],
                        "rel": float((out.double() - want3).abs().max() / want3.abs().max()),
                        "base_exact": bool(torch.equal(out[2 * rep:3 * rep], both[2 * rep:3 * rep, :n]))})

# FusedQKV: one GEMM over [W_q; A_q; W_k; A_k; W_v; A_v], whose column slices the kernel reads in place (row
# stride = the whole GEMM's width), gives each layer's own result
attn = torch.nn.Module()
for name, n in (("q_proj", 16), ("k_proj", 8), ("v_proj", 8)):
    setattr(attn, name, MultiLoRALinear(torch.nn.Linear(12, n, bias=False), context))
layers = [attn.q_proj, attn.k_proj, attn.v_proj]
for layer in layers:
    layer.allocate(slots=2, rank_cap=4)
group = FusedQKV(attn, context)
for layer in layers:
    with torch.no_grad():
        layer.lora_a.normal_()
        layer.lora_b.normal_()
with torch.no_grad():
    together = group(x)
    alone = [layer(x) for layer in layers]
together_max = max(float((a - b).abs().max()) for a, b in zip(together, alone))

# prefills ask for the torch form (context.kernel = False): no launch, the same arithmetic
import voxcpm_api.engine.batched.lora_kernels as lk
launches = []
lk._launch, lk._launch3 = (lambda *a, **k: launches.append(1)), (lambda *a, **k: launches.append(3))
context.kernel = False
with torch.no_grad():
    torch_form = group(x) + [wrapper(x)]
torch_form_max = max(float((a - b).abs().max()) for a, b in zip(torch_form, alone + [got]))
print(json.dumps({"cases": cases, "layer_rel": float((got.double() - want).abs().max() / want.abs().max()),
                  "layer_shape_ok": list(got.shape) == [3, 5, 10], "grouped": grouped,
                  "together_max": together_max, "together_shapes": [list(t.shape) for t in together],
                  "torch_form_launches": len(launches), "torch_form_max": torch_form_max}))
"""


def test_lora_expand_kernel_matches_the_arithmetic() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for case in result["cases"]:
        assert case["shape_ok"], case
        assert case["lora_size"] > 0.1, case  # the LoRA term is really there to get wrong
        assert case["rel"] < 1e-6, case
        assert case["base_exact"], case  # base-model rows are the base output, bit for bit
    assert result["layer_shape_ok"]
    assert result["layer_rel"] < 1e-6, result
    for case in result["grouped"]:  # the q/k/v launch: each of the three problems, tiles not mixed up
        assert case["shape_ok"] and case["base_exact"], case
        assert case["rel"] < 1e-6, case
    assert result["together_shapes"] == [[3, 5, 16], [3, 5, 8], [3, 5, 8]]
    assert result["together_max"] < 1e-5, result
    assert result["torch_form_launches"] == 0 and result["torch_form_max"] < 1e-5, result
