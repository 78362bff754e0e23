"""Regional compilation (`--compile`, CUDA in production) keeps the engine's output and compiles a
handful of graphs, not one per layer. Inductor also runs on the CPU, so CI checks both here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from voxcpm_api.engine.base import ChunkRequest
from voxcpm_api.engine.batched.engine import BatchedConfig, BatchedEngine
from voxcpm_api.engine.tiny import TinyCheckpoints
from voxcpm_api.lora.catalog import LoRACatalog


@pytest.mark.xdist_group("batched-compile")
def test_regional_compile_matches_eager_with_mixed_adapters(tiny_checkpoints: TinyCheckpoints,
                                                            tiny_root: Path) -> None:
    arch = "voxcpm"
    engine = BatchedEngine(BatchedConfig(model=str(tiny_checkpoints.models[arch]), device="cpu", max_rows=4,
                                         max_seq_len=256, cache_dir=tiny_root))
    engine.load()
    try:
        catalog = LoRACatalog(tiny_checkpoints.lora_roots[arch])
        adapters = [None, *(catalog.resolve(name) for name in sorted(tiny_checkpoints.loras[arch]))]
        requests = [ChunkRequest(text=f"Compiled or not, row {i} sounds the same.", adapter=adapters[i % 3],
                                 cfg_scale=2.0, steps=5, seed=11 + i, max_patches=6) for i in range(3)]

        def run_all() -> list[np.ndarray]:
            return [engine.generate(request, lambda: None) for request in requests]

        eager = run_all()
        torch._dynamo.reset()
        counters.clear()
        model = engine._model
        assert model is not None
        engine._call_in_loop(model._compile)
        compiled = run_all()
        graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
    finally:
        engine.close()
        torch._dynamo.reset()
    for want, got in zip(eager, compiled):
        assert want.shape == got.shape
        assert float(np.abs(want - got).max()) < 1e-4
    # one graph per compiled code path and LoRA variant, reused by every layer: a per-layer recompile
    # (a guard on a layer's identity) would make this ~10x larger and the first start minutes long
    assert 3 <= graphs <= 12, graphs
    assert breaks == 0


KERNELS_COMPILED = r"""
import json, sys
import numpy as np, torch
from torch._dynamo.utils import counters
from voxcpm_api.engine.base import ChunkRequest
from voxcpm_api.engine.batched.engine import BatchedConfig, BatchedEngine
from voxcpm_api.lora.catalog import LoRACatalog

from pathlib import Path
model_dir, lora_root, cache = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
engine = BatchedEngine(BatchedConfig(model=model_dir, device="cpu", max_rows=4, max_seq_len=256, cache_dir=cache))
engine.load()
catalog = LoRACatalog(lora_root)
names = sorted(p.name for p in lora_root.iterdir() if p.is_dir())
adapters = [None, *(catalog.resolve(name) for name in names)]
requests = [ChunkRequest(text=f"Kernels in the graph, row {i}.", adapter=adapters[i % len(adapters)],
                         cfg_scale=2.0, steps=4, seed=5 + i, max_patches=3) for i in range(3)]
calls = {"lora_expand": 0, "lora_expand3": 0, "short_attention": 0}
for name in calls:  # count the kernels' launches, compiled or not
    from voxcpm_api.engine.batched import attention_kernels, lora_kernels
    module = attention_kernels if name == "short_attention" else lora_kernels
    kernel = getattr(module, "_" + name)
    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel
        def __getitem__(self, grid):
            calls[self.name] += 1
            return self.kernel[grid]
    setattr(module, "_" + name, Counting(name, kernel))
eager = [engine.generate(r, lambda: None) for r in requests]
eager_calls = dict(calls)
torch._dynamo.reset()
counters.clear()
engine._call_in_loop(engine._model._compile)
compiled = [engine.generate(r, lambda: None) for r in requests]
engine.close()
print(json.dumps({"eager_calls": eager_calls, "calls": calls, "breaks": sum(counters["graph_break"].values()),
                  "break_reasons": [str(k)[:200] for k in counters["graph_break"]],
                  "max_abs": max(float(np.abs(a - b).max()) for a, b in zip(eager, compiled))}))
"""


@pytest.mark.xdist_group("batched-compile")
def test_compiled_layers_keep_our_kernels_without_graph_breaks(tiny_checkpoints: TinyCheckpoints,
                                                               tiny_root: Path) -> None:
    """The LoRA expand and short-attention kernels are custom ops inside the compiled layers. Triton's
    interpreter runs them on the CPU (it is read when a kernel is defined, hence the fresh process)."""
    import json
    import os
    import subprocess
    import sys

    arch = "voxcpm"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    done = subprocess.run([sys.executable, "-c", KERNELS_COMPILED, str(tiny_checkpoints.models[arch]),
                           str(tiny_checkpoints.lora_roots[arch]), str(tiny_root / "compile-kernels")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("lora_expand", "lora_expand3", "short_attention"):
        assert result["eager_calls"][name] > 0, result
        assert result["calls"][name] > result["eager_calls"][name], result  # the compiled run launched them too
    assert result["breaks"] == 0, result["break_reasons"]
    assert result["max_abs"] < 1e-4, result


# the first adapter (r16_proj_mlp) targets the LMs' o_proj and gate_proj (and projections outside the layers):
# it touches one compiled region, the second half of an LM layer, whose wrapped layers make two more variants
# (rows with an adapter; calls with none), shared by steps and prefills of any size
LORA_GRAPHS = 6
GRAPH_COUNT = r"""
import json, sys, threading
import torch
from pathlib import Path
from torch._dynamo.utils import counters

# dynamo's guards decide the variants, whatever backend compiles them: "eager" keeps this test fast
_compile, _module_compile = torch.compile, torch.nn.Module.compile
torch.compile = lambda *a, **k: _compile(*a, **{**k, "backend": "eager"})
torch.nn.Module.compile = lambda self, *a, **k: _module_compile(self, *a, **{**k, "backend": "eager"})

from voxcpm_api.engine.base import ChunkRequest
from voxcpm_api.engine.batched.engine import BatchedConfig, BatchedEngine
from voxcpm_api.lora.catalog import LoRACatalog

model_dir, lora_root, cache = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
engine = BatchedEngine(BatchedConfig(model=model_dir, device="cpu", max_rows=4, max_seq_len=256, cache_dir=cache))
engine.load()
torch._dynamo.reset()
counters.clear()
engine._call_in_loop(engine._model._compile)
def request(i, adapter=None):
    return ChunkRequest(text=f"Row {i} of the graph count.", adapter=adapter, cfg_scale=2.0, steps=4, seed=i,
                        max_patches=3)
def together(requests):
    threads = [threading.Thread(target=engine.generate, args=(r, lambda: None)) for r in requests]
    [t.start() for t in threads]
    [t.join() for t in threads]
engine.generate(request(0), lambda: None)  # one row: decode steps and a prefill of one prompt
one_row = counters["stats"]["unique_graphs"]
together([request(i) for i in range(1, 4)])  # three rows, prefills of several prompts
several = counters["stats"]["unique_graphs"]
adapter = LoRACatalog(lora_root).resolve(sorted(p.name for p in lora_root.iterdir() if p.is_dir())[0])
engine.generate(request(4, adapter), lambda: None)  # its layers are wrapped now: one row with the adapter
engine.generate(request(5), lambda: None)  # and one without, through the wrapped layers
together([request(6, adapter), request(7), request(8, adapter)])  # mixed rows, prompts with and without
engine.close()
print(json.dumps({"one_row": one_row, "several": several, "with_lora": counters["stats"]["unique_graphs"],
                  "breaks": sum(counters["graph_break"].values())}))
"""


@pytest.mark.parametrize("arch", ["voxcpm", "voxcpm2"])
@pytest.mark.xdist_group("batched-compile")
def test_each_compiled_region_has_one_variant(tiny_checkpoints: TinyCheckpoints, tiny_root: Path, arch: str) -> None:
    """Each variant costs a first start ~3 s on an H100 host (ADR 0009). The compiled regions are the two LM
    layer halves (decode steps and prefills alike), the DiT / local-encoder layer and the Euler update: one
    variant each for one row or several, one prompt or several, both LMs (VoxCPM2's residual LM has no
    rotary), and one more of each region an adapter touches once rows carry one."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    done = subprocess.run([sys.executable, "-c", GRAPH_COUNT, str(tiny_checkpoints.models[arch]),
                           str(tiny_checkpoints.lora_roots[arch]), str(tiny_root / f"graph-count-{arch}")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["breaks"] == 0, result
    assert result["one_row"] == 4, result
    assert result["several"] == 4, result  # no variant for more rows or prompts
    assert result["with_lora"] == LORA_GRAPHS, result
