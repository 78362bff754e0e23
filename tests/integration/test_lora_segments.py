"""BatchedConfig.lora_segments: the DiT's LoRA term per request segment (lora_kernels.lora_linear_segments, a
GPU path awaiting its measurement) gives what the [W; A] form gives. Triton's interpreter runs the kernels on
the CPU; it reads TRITON_INTERPRET when a kernel is defined, hence fresh processes. float32 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from voxcpm_api.engine.tiny import TinyCheckpoints

LAYERS = r"""
import json, torch
from voxcpm_api.engine.batched import lora_kernels
from voxcpm_api.engine.batched.multi_lora import FusedQKV, LoRAContext, MultiLoRALinear

torch.manual_seed(0)
context = LoRAContext()
segments, rep, slots_n, cap = 4, 5, 2, 4
x = torch.randn(segments, rep, 12)  # (segments, tokens, in): one sequence per segment, as in the DiT
# segment 1 has no adapter (slot index = slots_n); the others slots 0, 1, 0 with their scalings in the mask
slot_of = torch.tensor([0, slots_n, 1, 0])
table = torch.zeros(slots_n + 1, slots_n * cap)
table[0, :cap], table[1, cap:] = 0.5, 2.0
context.mask = table[slot_of]


def both_ways(fn):
    context.slots = None
    with torch.no_grad():
        expand = fn()
    context.slots = slot_of
    with torch.no_grad():
        segment = fn()
    context.slots = None
    return expand, segment


# one layer (an output projection), with a bias
layer = MultiLoRALinear(torch.nn.Linear(12, 10), context)
layer.allocate(slots=slots_n, rank_cap=cap)
with torch.no_grad():
    layer.lora_a.normal_()
    layer.lora_b.normal_()
expand, segment = both_ways(lambda: layer(x))
plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
result = {"layer": float((expand - segment).abs().max()), "layer_lora_size": float((expand - plain).abs().max()),
          "layer_base_exact": bool(torch.equal(segment[1], plain[1])), "layer_shape": list(segment.shape)}

# q/k/v of one attention, all three wrapped, then only q and v (an adapter that leaves k alone)
for name, wrapped in (("qkv", ("q_proj", "k_proj", "v_proj")), ("qv", ("q_proj", "v_proj"))):
    attn = torch.nn.Module()
    for proj, n in (("q_proj", 16), ("k_proj", 8), ("v_proj", 8)):
        linear = torch.nn.Linear(12, n, bias=False)
        setattr(attn, proj, MultiLoRALinear(linear, context) if proj in wrapped else linear)
    for proj in wrapped:
        getattr(attn, proj).allocate(slots=slots_n, rank_cap=cap)
        with torch.no_grad():
            getattr(attn, proj).lora_a.normal_()
            getattr(attn, proj).lora_b.normal_()
    group = FusedQKV(attn, context, segmented=True)
    expand, segment = both_ways(lambda: group(x))
    result[name] = max(float((a - b).abs().max()) for a, b in zip(expand, segment))
    result[name + "_shapes"] = [list(t.shape) for t in segment]
    result[name + "_copy"] = group.base_weight is not None and list(group.base_weight.shape) == [32, 12]

# an unsegmented group never takes the segment path (no base-only copy)
launches = []
real = lora_kernels._launch_segments
lora_kernels._launch_segments = lambda *a, **k: launches.append(1)
plain_group = FusedQKV(attn, context)
context.slots = slot_of
with torch.no_grad():
    plain_group(x)
context.slots = None
lora_kernels._launch_segments = real
result["unsegmented_launches"] = len(launches)
print(json.dumps(result))
"""


def _run(script: str, *args: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_segment_path_of_the_lora_layers_matches_the_expand_path() -> None:
    result = _run(LAYERS)
    assert result["layer_lora_size"] > 0.1, result  # the LoRA term is really there to get wrong
    assert result["layer"] < 1e-5 and result["layer_base_exact"], result  # a base segment: the plain GEMM
    assert result["layer_shape"] == [4, 5, 10]
    for name in ("qkv", "qv"):
        assert result[name] < 1e-5, result
        assert result[name + "_shapes"] == [[4, 5, 16], [4, 5, 8], [4, 5, 8]], result
        assert result[name + "_copy"], result
    assert result["unsegmented_launches"] == 0, result


ENGINE = r"""
import json, sys, threading
from pathlib import Path
import numpy as np, torch
from torch._dynamo.utils import counters
from voxcpm_api.engine.base import ChunkRequest
from voxcpm_api.engine.batched import lora_kernels
from voxcpm_api.engine.batched.engine import BatchedConfig, BatchedEngine
from voxcpm_api.lora.catalog import LoRACatalog

model_dir, lora_root, cache = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
# dynamo's graph breaks, whatever backend compiles: "eager" keeps this test fast
_compile, _module_compile = torch.compile, torch.nn.Module.compile
torch.compile = lambda *a, **k: _compile(*a, **{**k, "backend": "eager"})
torch.nn.Module.compile = lambda self, *a, **k: _module_compile(self, *a, **{**k, "backend": "eager"})
calls = {"segments": 0}
kernel = lora_kernels._lora_segments


class Counting:
    def __getitem__(self, grid):
        calls["segments"] += 1
        return kernel[grid]


lora_kernels._lora_segments = Counting()
names = sorted(p.name for p in lora_root.iterdir() if p.is_dir())


def run(segments, compile=False):
    engine = BatchedEngine(BatchedConfig(model=model_dir, device="cpu", max_rows=4, max_seq_len=256,
                                         cache_dir=cache, lora_segments=segments))
    engine.load()
    if compile:
        torch._dynamo.reset()
        counters.clear()
        engine._call_in_loop(engine._model._compile)
    catalog = LoRACatalog(lora_root)
    adapters = [None, *(catalog.resolve(name) for name in names)]
    requests = [ChunkRequest(text=f"Segments or not, row {i}.", adapter=adapters[i % len(adapters)],
                             cfg_scale=2.0, steps=4, seed=3 + i, max_patches=3) for i in range(3)]
    results = [None] * len(requests)

    def one(i):
        results[i] = engine.generate(requests[i], lambda: None)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]  # rows in one batch
    [t.start() for t in threads]
    [t.join() for t in threads]
    engine.close()
    return results


def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


expand = run(False)
expand_launches = calls["segments"]
segments = run(True)
segment_launches = calls["segments"] - expand_launches
compiled = run(True, compile=True)
breaks = sum(counters["graph_break"].values())
real = lora_kernels._launch_segments
lora_kernels._launch_segments = lambda *a, **k: None  # the LoRA term left out: the check must see it
broken = run(True)
lora_kernels._launch_segments = real
print(json.dumps({"expand_launches": expand_launches, "segment_launches": segment_launches,
                  "segments": max_diff(expand, segments), "compiled": max_diff(expand, compiled),
                  "breaks": breaks, "broken": max_diff(expand, broken)}))
"""


@pytest.mark.parametrize("arch", ["voxcpm", "voxcpm2"])
@pytest.mark.xdist_group("batched-compile")
def test_engine_with_lora_segments_gives_the_same_audio(tiny_checkpoints: TinyCheckpoints, tiny_root: Path,
                                                        arch: str) -> None:
    """Mixed rows (no adapter and two adapters of different ranks and targets) in one batch, with and without
    lora_segments, eager and compiled (no graph break at the new custom op)."""
    result = _run(ENGINE, str(tiny_checkpoints.models[arch]), str(tiny_checkpoints.lora_roots[arch]),
                  str(tiny_root / f"segments-{arch}"))
    assert result["expand_launches"] == 0, result  # off by default
    assert result["segment_launches"] > 0, result
    assert result["segments"] < 1e-4, result
    assert result["compiled"] < 1e-4 and result["breaks"] == 0, result
    assert result["broken"] > 1e-3, result  # the DiT's LoRA term matters to the audio
