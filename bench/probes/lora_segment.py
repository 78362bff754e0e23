"""GPU probe: the DiT's LoRA term per request segment (BatchedConfig.lora_segments) against today's [W; A] form.

Why: at 64 requests with 8 adapters VoxCPM2's step is ~3.5 ms slower than without adapters (17-19 %),
~2 ms of it in the DiT's LoRA expands (108 calls a step, 11.2 us for q/k/v and 7.1 us for o; H100,
2026-11-25). The [W; A] form computes every slot's hidden for every row: the q/k/v GEMM is 2048 + 768 rows
wide instead of 2560, and the expand multiplies 256 hidden columns per row of which 32 are not masked to
zero. `lora_kernels.lora_linear_segments` runs the GEMM over the base weights alone and, per segment (one
request's DiT tokens, one adapter), only that slot's hidden and term. This probe times, on the real shapes
(64 requests, CFG-doubled: 128 segments; 8 slots of rank 32; every segment with an adapter), per DiT
attention's q/k/v and per output projection, CUDA-graph replays of:

    base      y = x W^T                                  (no adapters: what the LoRA term adds to)
    current   both = x [W; A]^T, then lora_expand(3)     (the engine's default)
    segments  lora_linear_segments                       (its default tiles, then a sweep of them)

    python3 bench/probes/lora_segment.py     (GPU; JSON lines; PYTHONPATH=src, wheels as bench/device_run.sh)

Then `bench/device_run.sh --model voxcpm2 --ours-compile --engine-opt lora_segments=true` against the same
without, for the step times and target (c).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from voxcpm_api.engine.batched import lora_kernels  # noqa: E402

# (segments = 2 x 64 requests with CFG, tokens per segment, hidden, q/k/v widths, o input width)
SHAPES = {"voxcpm2": (128, 11, 1024, (2048, 256, 256), 2048), "voxcpm1.5": (128, 9, 1024, (1024, 128, 128), 1024)}
SLOTS, RANK_CAP = 8, 32
SWEEP = [(n, k, split, warps) for n in (64, 128, 256) for k in (64, 128) for split in (1, 2) for warps in (4, 8)]


def time_us(fn, calls: int = 50, replays: int = 20) -> float:
    """Median per-call time of `calls` launches captured in one CUDA graph (the engine replays graphs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def main() -> None:
    lora_kernels.register_op()
    dtype, dev = torch.bfloat16, "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    for model, (segments, rep, hidden, qkv, o_in) in SHAPES.items():
        for layer, in_features, outs in (("qkv", hidden, qkv), ("o", o_in, (hidden,))):
            def rnd(*shape, std=1.0):
                return (torch.randn(*shape, generator=gen, device=dev) * std).to(dtype)

            x = rnd(segments * rep, in_features)
            weights = [rnd(out, in_features, std=in_features ** -0.5) for out in outs]
            lora_as = [rnd(SLOTS * RANK_CAP, in_features, std=in_features ** -0.5) for _ in outs]
            lora_bs = [rnd(out, SLOTS * RANK_CAP, std=RANK_CAP ** -0.5) for out in outs]
            slots = torch.arange(segments, device=dev) % SLOTS  # 8 adapters round-robin, as the bench's mix
            table = torch.zeros(SLOTS + 1, SLOTS * RANK_CAP, dtype=dtype, device=dev)
            for s in range(SLOTS):
                table[s, s * RANK_CAP:(s + 1) * RANK_CAP] = 0.5
            mask = table[slots]
            w_all = torch.cat(weights)
            # the engine's FusedQKV buffer [W_q; A_q; W_k; A_k; W_v; A_v] (one layer: [W; A])
            fused = torch.cat([torch.cat((w, a)) for w, a in zip(weights, lora_as)])
            spans, first = [], 0
            for out in outs:
                spans.append((first, out))
                first += out + SLOTS * RANK_CAP
            cols = [sum(outs[:i]) for i in range(len(outs))]
            y = torch.empty(x.shape[0], w_all.shape[0], dtype=dtype, device=dev)

            def base():
                torch.matmul(x, w_all.t(), out=y)

            def current():
                both = x @ fused.t()
                parts = [both[:, s:s + out + SLOTS * RANK_CAP] for s, out in spans]
                if len(parts) == 3:
                    return torch.cat(torch.ops.voxcpm_api.lora_expand3(*parts, mask, *lora_bs), dim=1)
                return torch.ops.voxcpm_api.lora_expand(parts[0], mask, lora_bs[0])

            def segmented():
                return lora_kernels.lora_linear_segments(x, w_all, None, slots, mask, lora_as, lora_bs, cols,
                                                         RANK_CAP)

            want = current().float()
            row = {"model": model, "layer": layer, "rows": x.shape[0], "rep": rep, "outs": list(outs)}
            print(json.dumps(row | {"variant": "base", "us": round(time_us(base), 2)}), flush=True)
            print(json.dumps(row | {"variant": "current", "us": round(time_us(current), 2)}), flush=True)
            err = (segmented().float() - want).abs().max().item()
            print(json.dumps(row | {"variant": "segments", "tiles": list(lora_kernels._segment_tiles()),
                                    "us": round(time_us(segmented), 2), "max_abs_vs_current": err}), flush=True)
            for tiles in SWEEP:
                def swept(tiles=tiles):
                    torch.matmul(x, w_all.t(), out=y)
                    lora_kernels._launch_segments(x, y, slots, mask, lora_as, lora_bs, cols, RANK_CAP, tiles)
                try:
                    swept()
                    err = (y.float() - want).abs().max().item()
                    us = time_us(swept)
                except Exception as exc:  # e.g. a tile over a resource limit: report it, go on
                    print(json.dumps(row | {"variant": "sweep", "tiles": tiles, "error": repr(exc)[:200]}), flush=True)
                    continue
                print(json.dumps(row | {"variant": "sweep", "tiles": tiles, "us": round(us, 2),
                                        "max_abs_vs_current": err}), flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("a GPU probe (the kernel's CPU checks: tests/integration/test_lora_segments.py)")
    main()
