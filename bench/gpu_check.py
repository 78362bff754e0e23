"""GPU checks of the batched engine (not a benchmark): CUDA-graph step vs eager step, determinism of a
batch composition, alone-vs-batched differences in bf16, and a quick step-time sweep.

    python bench/gpu_check.py --model voxcpm1.5 [--tiny] [--rows 64]

Prints one JSON line per check; the device run keeps stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_checkpoint import build_checkpoint  # noqa: E402

from voxcpm_api.engine.base import ChunkRequest  # noqa: E402
from voxcpm_api.engine.batched.engine import BatchedConfig, BatchedEngine  # noqa: E402
from voxcpm_api.lora.catalog import LoRACatalog  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is a test of batching.",
         "Speech synthesis servers should never mix audio.", "One more sentence for the batch here."]


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def run_batch(engine: BatchedEngine, requests: list[ChunkRequest]) -> tuple[list[np.ndarray], float, list[float]]:
    out: list[np.ndarray | None] = [None] * len(requests)
    first: list[float] = [0.0] * len(requests)
    started = time.perf_counter()

    def one(i: int) -> None:
        seen = [False]

        def on_patch() -> None:
            if not seen[0]:
                seen[0] = True
                first[i] = time.perf_counter() - started
        out[i] = engine.generate(requests[i], on_patch)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [o for o in out if o is not None], time.perf_counter() - started, first


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="voxcpm1.5")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--patches", type=int, default=31)
    parser.add_argument("--root", default="/tmp/voxcpm-bench")
    parser.add_argument("--sweep", default="1,8,32,64")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--skip-checks", action="store_true")
    args = parser.parse_args()
    import logging
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    ckpt = build_checkpoint(args.model, Path(args.root), tiny=args.tiny, device="cuda")
    emit(check="checkpoint", s=round(time.perf_counter() - t0, 1), dir=str(ckpt.model_dir))
    catalog = LoRACatalog(ckpt.lora_root)
    specs = [catalog.resolve(n) for n in ckpt.lora_names]
    t0 = time.perf_counter()
    engine = BatchedEngine(BatchedConfig(model=str(ckpt.model_dir), device="cuda", max_rows=args.rows,
                                         cache_dir=Path(args.root) / "cache", cuda_graphs=True,
                                         compile=args.compile))
    engine.load()
    emit(check="ready", s=round(time.perf_counter() - t0, 2), stats=engine.stats(),
         mem_gib=round(torch.cuda.memory_allocated() / 2**30, 2))
    n = args.patches

    def req(i: int, adapter: bool) -> ChunkRequest:
        return ChunkRequest(text=TEXTS[i % len(TEXTS)], adapter=specs[i % len(specs)] if adapter else None,
                            cfg_scale=2.0, steps=10, seed=100 + i, max_patches=n)
    for spec in specs:
        engine.register_adapter(spec)
    if not args.skip_checks:
        alone, _, _ = run_batch(engine, [req(0, True)])
        mixed = [req(i, i % 2 == 0) for i in range(8)]
        batch1, _, _ = run_batch(engine, mixed)
        batch2, _, _ = run_batch(engine, mixed)
        same = all(np.array_equal(a, b) for a, b in zip(batch1, batch2))
        emit(check="same composition twice identical", ok=same,
             max_abs=max(float(np.abs(a - b).max()) for a, b in zip(batch1, batch2)))
        emit(check="alone vs batched (row 0, bf16)", max_abs=float(np.abs(alone[0] - batch1[0]).max()),
             rms=float(np.sqrt(np.mean(alone[0] ** 2))), lengths=[len(alone[0]), len(batch1[0])])
        # eager vs graph for the same composition
        engine._model.use_graphs = False  # noqa: SLF001 - a check, not an API
        eager, _, _ = run_batch(engine, mixed)
        engine._model.use_graphs = True  # noqa: SLF001
        emit(check="eager vs graph", max_abs=max(float(np.abs(a - b).max()) for a, b in zip(eager, batch1)))
    for conc in [int(c) for c in args.sweep.split(",")]:
        for loras in (0, 8):
            requests = [ChunkRequest(text=TEXTS[i % 4], adapter=specs[i % len(specs)] if loras else None,
                                     cfg_scale=2.0, steps=10, seed=i, max_patches=n) for i in range(conc)]
            run_batch(engine, requests)  # warm (graph capture for new buckets)
            before = engine.stats()["steps"]
            torch.cuda.synchronize()
            outs, wall, first = run_batch(engine, requests)
            audio_s = sum(len(o) for o in outs) / engine.info.sample_rate_hz
            st = engine.stats()
            emit(check="sweep", concurrency=conc, loras=loras, wall_s=round(wall, 3),
                 audio_per_s=round(audio_s / wall, 1), ttfp_p50_ms=round(1000 * float(np.median(first)), 1),
                 step_ms_p50=st["step_ms_p50"], steps=st["steps"] - before,
                 max_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
