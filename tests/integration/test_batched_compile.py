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
