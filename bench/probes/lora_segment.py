"""Probe (not used by the engine): the DiT's per-row LoRA term as one kernel per request segment.

Why: at 64 requests with 8 adapters VoxCPM2's step is ~3.5 ms slower than without adapters (17-19 %),
~2 ms of it in the DiT's LoRA expands (108 calls a step, 11.2 us for q/k/v and 7.1 us for o; H100,
2026-11-25). Today's form (ADR 0008) computes every slot's hidden for every row: the fused GEMM
[W_q; A_q; W_k; A_k; W_v; A_v] is 2048 + 768 rows wide instead of 2560 (+30 % GEMM work: k and v are
only 256 wide each, their A blocks 256 each), and the expand multiplies S * r_cap = 256 hidden columns
per row of which r_cap = 32 are not masked to zero: 8x the useful work at 8 slots.

A DiT call's rows come in segments: one request's tokens (`rep` of them, 11 for VoxCPM2 at 64 requests,
CFG-doubled to 128 segments) share one adapter. So one program per segment can compute that segment's
own hidden h = X_seg A_s^T (rep x r_cap) and add (h * scale) B_s^T onto the base GEMM's output in place:
the base GEMM loses its A rows and the expand its 7/8 of zeros. This probe measures, on the real shapes,
per DiT attention (q/k/v) and output projection:

    base     y = x W^T                                  (no adapters: what the LoRA term adds to)
    current  both = x [W; A_cat]^T, lora_expand(3)      (the engine today, lora_kernels.py)
    segment  y = x W^T, then the segment kernel         (this probe)

    python3 bench/probes/lora_segment.py                 # GPU: JSON lines, one per (model, layer, variant)
    TRITON_INTERPRET=1 python3 bench/probes/lora_segment.py --check    # CPU: kernel == torch form

The arithmetic is today's: hidden rounded to the model dtype, times the slot's scaling, rounded, products
accumulated in float32, the base added before the single rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


@triton.jit
def _segment_layer(x_ptr, y_ptr, a_ptr, b_ptr, scale, rows, row_in, col0, part,
                   stride_x, stride_y, stride_a, stride_b, OUT: tl.constexpr, IN: tl.constexpr, R_CAP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                   IEEE: tl.constexpr):
    """One layer of one segment: h = X_seg A^T (BLOCK_M, R_CAP), then y[:, col0 + n] += (h * scale) B^T over this
    program's share (`part` of SPLIT) of the layer's output tiles."""
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_CAP)
    h = tl.zeros((BLOCK_M, R_CAP), dtype=tl.float32)
    for k0 in tl.range(0, IN, BLOCK_K):
        x = tl.load(x_ptr + rows[:, None] * stride_x + (k0 + rk)[None, :], mask=row_in[:, None], other=0.0)
        a_t = tl.load(a_ptr + rr[None, :] * stride_a + (k0 + rk)[:, None])  # (BLOCK_K, R_CAP) of A^T
        if IEEE:
            h += tl.dot(x, a_t, input_precision="ieee")
        else:
            h += tl.dot(x, a_t)
    dtype = x_ptr.dtype.element_ty  # (a loop body's names are not visible after it in compiled Triton)
    masked = (h.to(dtype).to(tl.float32) * scale).to(dtype)  # the GEMM's hidden, then the mask product: rounded
    rn = tl.arange(0, BLOCK_N)
    for t in tl.range(0, (OUT + SPLIT * BLOCK_N - 1) // (SPLIT * BLOCK_N)):
        cols = (t * SPLIT + part) * BLOCK_N + rn
        col_in = cols < OUT
        b_t = tl.load(b_ptr + cols[None, :].to(tl.int64) * stride_b + rr[:, None], mask=col_in[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(masked, b_t, input_precision="ieee")
        else:
            acc = tl.dot(masked, b_t)
        tile = row_in[:, None] & col_in[None, :]
        y_at = y_ptr + rows[:, None] * stride_y + (col0 + cols)[None, :]
        base = tl.load(y_at, mask=tile, other=0.0)
        tl.store(y_at, (base.to(tl.float32) + acc).to(dtype), mask=tile)


@triton.jit
def _lora_segment(x_ptr, y_ptr, slot_ptr, scale_ptr, rep, stride_x, stride_y,
                  a0, b0, sa0, sb0, a1, b1, sa1, sb1, a2, b2, sa2, sb2,
                  stride_a_slot0, stride_a_slot1, stride_a_slot2, N0: tl.constexpr, N1: tl.constexpr,
                  N2: tl.constexpr, LAYERS: tl.constexpr, IN: tl.constexpr, R_CAP: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr):
    """Grid (segments, SPLIT). Segment g is rows [g * rep, (g + 1) * rep) of x and y; slot_ptr[g] < 0: no
    adapter (y is left as the base GEMM wrote it). Layer i's A is a_i + slot * stride_a_slot_i, (R_CAP, IN)
    rows of stride sa_i; its B (out_i, S * R_CAP) rows of stride sb_i, the slot's columns from slot * R_CAP;
    its output columns start after the previous layers' in y."""
    seg = tl.program_id(0)
    part = tl.program_id(1)
    slot = tl.load(slot_ptr + seg)
    if slot >= 0:
        scale = tl.load(scale_ptr + slot).to(tl.float32)
        local = tl.arange(0, BLOCK_M)
        row_in = local < rep
        rows = (seg * rep + local).to(tl.int64)
        _segment_layer(x_ptr, y_ptr, a0 + slot * stride_a_slot0, b0 + slot * R_CAP, scale, rows, row_in, 0,
                       part, stride_x, stride_y, sa0, sb0, N0, IN, R_CAP, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT, IEEE)
        if LAYERS > 1:
            _segment_layer(x_ptr, y_ptr, a1 + slot * stride_a_slot1, b1 + slot * R_CAP, scale, rows, row_in, N0,
                           part, stride_x, stride_y, sa1, sb1, N1, IN, R_CAP, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT, IEEE)
        if LAYERS > 2:
            _segment_layer(x_ptr, y_ptr, a2 + slot * stride_a_slot2, b2 + slot * R_CAP, scale, rows, row_in, N0 + N1,
                           part, stride_x, stride_y, sa2, sb2, N2, IN, R_CAP, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT, IEEE)


def lora_segment(x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor,
                 a_list: list[torch.Tensor], b_list: list[torch.Tensor], block_n: int = 128, block_k: int = 64,
                 split: int = 1, warps: int = 4) -> torch.Tensor:
    """x: (M, in); y: (M, sum of outs) holding x W^T (+ b), updated in place; slots: (G,) int32, -1 for none,
    M = G * rep; scales: (S,) alpha / r per slot; a_list[i]: (S, r_cap, in); b_list[i]: (out_i, S * r_cap)."""
    rows, in_features = x.shape
    rep = rows // slots.shape[0]
    r_cap = a_list[0].shape[1]
    block_m = max(16, triton.next_power_of_2(rep))
    layers = len(a_list)
    pad_a = a_list + [a_list[0]] * (3 - layers)
    pad_b = b_list + [b_list[0]] * (3 - layers)
    args, widths = [], []
    for i, (a, b) in enumerate(zip(pad_a, pad_b)):
        args += [a, b, a.stride(1), b.stride(0)]
        widths.append(b.shape[0] if i < layers else 0)
    _lora_segment[(slots.shape[0], split)](
        x, y, slots, scales, rep, x.stride(0), y.stride(0), *args, *(a.stride(0) for a in pad_a),
        N0=widths[0], N1=widths[1], N2=widths[2], LAYERS=layers, IN=in_features, R_CAP=r_cap, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split, IEEE=x.dtype == torch.float32, num_warps=warps)
    return y


def reference(x, weights, slots, scales, a_list, b_list):
    """The torch form: each segment's rows get x W_i^T + ((x A_{i,s}^T) * scale_s) B_{i,s}^T (rounded as above)."""
    rep = x.shape[0] // slots.shape[0]
    outs = []
    for w, a, b in zip(weights, a_list, b_list):
        y = (x @ w.t()).float()
        r_cap = a.shape[1]
        for g, s in enumerate(slots.tolist()):
            if s < 0:
                continue
            seg = x[g * rep:(g + 1) * rep]
            h = (seg @ a[s].t()).to(x.dtype)
            masked = (h.float() * scales[s].float()).to(x.dtype)
            y[g * rep:(g + 1) * rep] += masked.float() @ b[:, s * r_cap:(s + 1) * r_cap].t().float()
        outs.append(y.to(x.dtype))
    return torch.cat(outs, dim=1)


def _inputs(segments, rep, in_features, outs, slots_n, r_cap, dtype, device, none_every=0, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    x = rnd(segments * rep, in_features)
    weights = [rnd(out, in_features, std=in_features ** -0.5) for out in outs]
    a_list = [rnd(slots_n, r_cap, in_features, std=in_features ** -0.5) for _ in outs]
    b_list = [rnd(out, slots_n * r_cap, std=r_cap ** -0.5) for out in outs]
    slots = torch.tensor([(-1 if none_every and g % none_every == 0 else g % slots_n) for g in range(segments)],
                         dtype=torch.int32, device=device)
    scales = torch.full((slots_n,), 0.5, dtype=dtype, device=device)
    return x, weights, slots, scales, a_list, b_list


def check() -> None:
    """Kernel against the torch form (CPU interpreter or GPU): every layer count, a segment without adapter,
    a rep that is not a power of two, a layer width that is not a multiple of BLOCK_N."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for layers, outs in ((1, (96,)), (3, (64, 32, 48))):
        for split in (1, 2):
            x, weights, slots, scales, a_list, b_list = _inputs(5, 11, 64, outs, 3, 16, torch.float32, device,
                                                                 none_every=3)
            y = torch.cat([x @ w.t() for w in weights], dim=1)
            got = lora_segment(x, y, slots, scales, a_list, b_list, block_n=32, block_k=32, split=split)
            want = reference(x, weights, slots, scales, a_list, b_list)
            err = (got - want).abs().max().item()
            print(json.dumps({"check": f"layers={layers} split={split}", "max_abs": err}))
            assert err < 1e-4, err
    print("check ok")


def _time_us(fn, calls=50, replays=20) -> float:
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


# (segments = 2 x 64 requests with CFG, tokens per segment, hidden, q/k/v widths, o input width)
SHAPES = {"voxcpm2": (128, 11, 1024, (2048, 256, 256), 2048), "voxcpm1.5": (128, 9, 1024, (1024, 128, 128), 1024)}
SLOTS, R_CAP = 8, 32


def bench() -> None:
    from voxcpm_api.engine.batched import lora_kernels

    lora_kernels.register_op()
    dtype, device = torch.bfloat16, "cuda"
    for model, (segments, rep, hidden, qkv, o_in) in SHAPES.items():
        for layer, in_features, outs in (("qkv", hidden, qkv), ("o", o_in, (hidden,))):
            x, weights, slots, scales, a_list, b_list = _inputs(segments, rep, in_features, outs, SLOTS, R_CAP,
                                                                 dtype, device)
            w_all = torch.cat(weights)
            # today's buffer: [W_i; A_i (all slots)] per layer; the mask: each segment's slot scale on its columns
            fused = torch.cat([torch.cat([w, a.reshape(-1, in_features)]) for w, a in zip(weights, a_list)])
            mask = torch.zeros(segments, SLOTS * R_CAP, dtype=dtype, device=device)
            for g, s in enumerate(slots.tolist()):
                mask[g, s * R_CAP:(s + 1) * R_CAP] = scales[s]
            spans, start = [], 0
            for out in outs:
                spans.append((start, out))
                start += out + SLOTS * R_CAP
            y = torch.empty(x.shape[0], w_all.shape[0], dtype=dtype, device=device)

            def base():
                torch.matmul(x, w_all.t(), out=y)

            def current():
                both = x @ fused.t()
                parts = [both[:, first:first + out + SLOTS * R_CAP] for first, out in spans]
                if len(parts) == 3:
                    torch.ops.voxcpm_api.lora_expand3(*parts, mask, *b_list)
                else:
                    torch.ops.voxcpm_api.lora_expand(parts[0], mask, b_list[0])

            want = reference(x, weights, slots, scales, a_list, b_list).float()
            row = {"model": model, "layer": layer, "rows": x.shape[0], "rep": rep, "outs": list(outs)}
            print(json.dumps(row | {"variant": "base", "us": round(_time_us(base), 2)}), flush=True)
            print(json.dumps(row | {"variant": "current", "us": round(_time_us(current), 2)}), flush=True)
            for block_n in (64, 128, 256):
                for split in (1, 2, 4):
                    for block_k, warps in ((64, 4), (128, 4), (64, 8)):
                        def segment(block_n=block_n, split=split, block_k=block_k, warps=warps):
                            torch.matmul(x, w_all.t(), out=y)
                            lora_segment(x, y, slots, scales, a_list, b_list, block_n, block_k, split, warps)
                        tiles = {"variant": "segment", "block_n": block_n, "split": split, "block_k": block_k,
                                 "warps": warps}
                        try:
                            segment()
                            err = (y.float() - want).abs().max().item()
                            us = _time_us(segment)
                        except Exception as exc:  # e.g. a tile over the shared-memory limit: the next one
                            print(json.dumps(row | tiles | {"error": repr(exc)[:200]}), flush=True)
                            continue
                        print(json.dumps(row | tiles | {"us": round(us, 2), "max_abs_vs_torch": round(err, 4)}),
                              flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="kernel vs torch form only (CPU: TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if args.check or not torch.cuda.is_available():
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("no GPU: run with TRITON_INTERPRET=1 --check")
        check()
    else:
        check()
        bench()
