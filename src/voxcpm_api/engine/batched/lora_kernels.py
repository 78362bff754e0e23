"""The per-row LoRA term of `MultiLoRALinear` in one GPU kernel (Triton).

`MultiLoRALinear` computes the base projection and every slot's LoRA A in one GEMM over its fused
weight [W; A_cat], so each flattened row m of the output holds

    both[m] = [ x W^T + b  |  x A_cat^T ]          widths: out, K = S * r_cap

and the layer's result is

    y[m] = both[m, :out] + (both[m, out:] * mask[m // rep]) @ B_cat^T

where `mask` is the (R, K) table of the rows' slot scalings (see multi_lora.py) and `rep` = M / R
flattened rows per mask row (a DiT sequence's tokens, a prefill patch's positions). On an H100 at
64 rows the step was bound by its number of kernels, and the unfused form is four of them per
adapted projection (the A GEMM, the mask multiply, the mask's repeat, the B GEMM with its add);
`_lora_expand` does the mask multiply, the B GEMM and the add in one, reading the mask row of each
output row in place instead of materialising the repeat. Its arithmetic is the torch form's: the
masked hidden rounded to the model dtype, products accumulated in float32, the base added before
the single rounding.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_support import triton_serves


@triton.jit
def _expand_tile(both_ptr, mask_ptr, b_ptr, out_ptr, tile_m, tile_n, rows, out_features, rep,
                 stride_both, stride_mask, stride_b, stride_out, RANK_COLS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of y = base + (hidden * mask[row // rep]) @ B^T. RANK_COLS (K) is a
    constant of the slot layout (slots x rank cap). The loop is a pipelined `tl.range`: an unrolled
    `static_range` waited on each block's loads in turn (~10 us per call on an H100)."""
    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rm < rows
    col_in = rn < out_features
    mask_row = (rm // rep).to(tl.int64)
    both_row = rm.to(tl.int64) * stride_both
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, RANK_COLS, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_in = rk < RANK_COLS
        tile = row_in[:, None] & k_in[None, :]
        hidden = tl.load(both_ptr + both_row[:, None] + out_features + rk[None, :], mask=tile, other=0.0)
        scale = tl.load(mask_ptr + mask_row[:, None] * stride_mask + rk[None, :], mask=tile, other=0.0)
        masked = (hidden.to(tl.float32) * scale.to(tl.float32)).to(hidden.dtype)  # the torch form rounds here
        b_t = tl.load(b_ptr + rn[None, :].to(tl.int64) * stride_b + rk[:, None],
                      mask=k_in[:, None] & col_in[None, :], other=0.0)  # (BLOCK_K, BLOCK_N) of B^T
        if IEEE:
            acc += tl.dot(masked, b_t, input_precision="ieee")
        else:
            acc += tl.dot(masked, b_t)
    out_tile = row_in[:, None] & col_in[None, :]
    base = tl.load(both_ptr + both_row[:, None] + rn[None, :], mask=out_tile, other=0.0)
    y = base.to(tl.float32) + acc
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_out + rn[None, :], y.to(base.dtype), mask=out_tile)


@triton.jit
def _lora_expand(both_ptr, mask_ptr, b_ptr, out_ptr, rows, out_features, rep,
                 stride_both, stride_mask, stride_b, stride_out, RANK_COLS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    _expand_tile(both_ptr, mask_ptr, b_ptr, out_ptr, tl.program_id(0), tl.program_id(1), rows, out_features, rep,
                 stride_both, stride_mask, stride_b, stride_out, RANK_COLS, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)


@triton.jit
def _lora_expand3(both0, b0, out0, n0, sboth0, sb0, sout0, both1, b1, out1, n1, sboth1, sb1, sout1,
                  both2, b2, out2, n2, sboth2, sb2, sout2, mask_ptr, stride_mask, rows, rep, tiles0, tiles1,
                  RANK_COLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  IEEE: tl.constexpr):
    """Three layers' expands over the same rows in one launch (an attention's q, k and v projections):
    the grid's second axis runs over the first layer's N tiles, then the second's, then the third's."""
    tile_m = tl.program_id(0)
    tile_n = tl.program_id(1)
    if tile_n < tiles0:
        _expand_tile(both0, mask_ptr, b0, out0, tile_m, tile_n, rows, n0, rep, sboth0, stride_mask, sb0, sout0,
                     RANK_COLS, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
    elif tile_n < tiles0 + tiles1:
        _expand_tile(both1, mask_ptr, b1, out1, tile_m, tile_n - tiles0, rows, n1, rep, sboth1, stride_mask, sb1,
                     sout1, RANK_COLS, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
    else:
        _expand_tile(both2, mask_ptr, b2, out2, tile_m, tile_n - tiles0 - tiles1, rows, n2, rep, sboth2, stride_mask,
                     sb2, sout2, RANK_COLS, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)


@triton.jit
def _segment_layer(x_ptr, y_ptr, a_ptr, b_ptr, scale, rows, row_in, part, stride_x, stride_y, stride_b,
                   COL0: tl.constexpr, OUT: tl.constexpr, IN: tl.constexpr, R_CAP: tl.constexpr,
                   R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT: tl.constexpr, IEEE: tl.constexpr):
    """One layer, one block of a segment's rows: h = X A_s^T (BLOCK_M, R_BLOCK), then y[:, COL0 + n] += (h * scale)
    B_s^T over this program's share (`part` of SPLIT) of the layer's output tiles. a_ptr: the slot's (R_CAP, IN)
    rows of A; b_ptr: the slot's first column of B (row stride stride_b). R_BLOCK >= 16 (a GPU dot's least
    size) covers R_CAP; the rank columns past it read as zeros."""
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_BLOCK)
    r_in = rr < R_CAP
    h = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for k0 in tl.range(0, IN, BLOCK_K):
        k_in = (k0 + rk) < IN
        x = tl.load(x_ptr + rows[:, None] * stride_x + (k0 + rk)[None, :], mask=row_in[:, None] & k_in[None, :],
                    other=0.0)
        a_t = tl.load(a_ptr + rr[None, :] * IN + (k0 + rk)[:, None], mask=k_in[:, None] & r_in[None, :],
                      other=0.0)  # (BLOCK_K, R_BLOCK) of A^T
        if IEEE:
            h += tl.dot(x, a_t, input_precision="ieee")
        else:
            h += tl.dot(x, a_t)
    dtype = x_ptr.dtype.element_ty  # (a loop body's names are not visible after it in compiled Triton)
    # as in the [W; A] form: the hidden rounded as a GEMM output, times the slot's scaling, rounded again
    masked = (h.to(dtype).to(tl.float32) * scale).to(dtype)
    rn = tl.arange(0, BLOCK_N)
    for t in tl.range(0, (OUT + SPLIT * BLOCK_N - 1) // (SPLIT * BLOCK_N)):
        cols = (t * SPLIT + part) * BLOCK_N + rn
        col_in = cols < OUT
        b_t = tl.load(b_ptr + cols[None, :].to(tl.int64) * stride_b + rr[:, None], mask=r_in[:, None] & col_in[None, :],
                      other=0.0)  # (R_BLOCK, BLOCK_N) of B^T
        if IEEE:
            acc = tl.dot(masked, b_t, input_precision="ieee")
        else:
            acc = tl.dot(masked, b_t)
        tile = row_in[:, None] & col_in[None, :]
        y_at = y_ptr + rows[:, None] * stride_y + (COL0 + cols)[None, :]
        base = tl.load(y_at, mask=tile, other=0.0)
        tl.store(y_at, (base.to(tl.float32) + acc).to(dtype), mask=tile)


@triton.jit
def _lora_segments(x_ptr, y_ptr, slot_ptr, mask_ptr, stride_x, stride_y, stride_mask, a0, b0, sb0, a1, b1, sb1,
                   a2, b2, sb2, LAYERS: tl.constexpr, C0: tl.constexpr, N0: tl.constexpr, C1: tl.constexpr,
                   N1: tl.constexpr, C2: tl.constexpr, N2: tl.constexpr, SLOTS: tl.constexpr, REP: tl.constexpr,
                   IN: tl.constexpr, R_CAP: tl.constexpr, R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr):
    """Grid (segments, SPLIT). Segment g is rows [g * REP, (g + 1) * REP) of x and y; its slot is slot_ptr[g]
    (SLOTS or more: no adapter, y stays the base GEMM's) and its scaling the mask's entry at the slot's first
    column. Layer i (of LAYERS) has A rows a_i (SLOTS * R_CAP, IN), B b_i (N_i, SLOTS * R_CAP) of row stride
    sb_i, and its output in y's columns [C_i, C_i + N_i)."""
    seg = tl.program_id(0)
    part = tl.program_id(1)
    slot = tl.load(slot_ptr + seg)
    if slot < SLOTS:
        scale = tl.load(mask_ptr + seg * stride_mask + slot * R_CAP).to(tl.float32)
        a_off = slot * R_CAP * IN
        b_off = slot * R_CAP
        for m0 in tl.static_range(0, REP, BLOCK_M):
            local = m0 + tl.arange(0, BLOCK_M)
            row_in = local < REP
            rows = (seg * REP + local).to(tl.int64)
            _segment_layer(x_ptr, y_ptr, a0 + a_off, b0 + b_off, scale, rows, row_in, part, stride_x, stride_y, sb0,
                           C0, N0, IN, R_CAP, R_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT, IEEE)
            if LAYERS > 1:
                _segment_layer(x_ptr, y_ptr, a1 + a_off, b1 + b_off, scale, rows, row_in, part, stride_x, stride_y,
                               sb1, C1, N1, IN, R_CAP, R_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT, IEEE)
            if LAYERS > 2:
                _segment_layer(x_ptr, y_ptr, a2 + a_off, b2 + b_off, scale, rows, row_in, part, stride_x, stride_y,
                               sb2, C2, N2, IN, R_CAP, R_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT, IEEE)


def _launch(both: torch.Tensor, mask: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor,
            tiles: tuple[int, int, int, int] | None = None) -> None:
    """both: (M, out + K) row-major rows; mask: (R, K), R divides M; lora_b: (out, K); out: (M, out).
    tiles: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps), for measuring; default `_tiles`."""
    rows, out_features = out.shape
    rank_cols = lora_b.shape[1]
    rep = rows // mask.shape[0]
    block_m, block_n, block_k, warps = tiles or _tiles(rows, out_features)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    _lora_expand[grid](both, mask, lora_b, out, rows, out_features, rep,
                       both.stride(0), mask.stride(0), lora_b.stride(0), out.stride(0), RANK_COLS=rank_cols,
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=both.dtype == torch.float32,
                       num_warps=warps)


def _launch3(boths: list[torch.Tensor], mask: torch.Tensor, lora_bs: list[torch.Tensor],
             outs: list[torch.Tensor]) -> None:
    """`_launch` for three layers over the same rows and slot layout (one tile size, the widest layer's)."""
    rows = outs[0].shape[0]
    widths = [out.shape[1] for out in outs]
    block_m, block_n, block_k, warps = _tiles(rows, max(widths), grouped=True)
    tiles = [triton.cdiv(width, block_n) for width in widths]
    args = []
    for both, lora_b, out, width in zip(boths, lora_bs, outs, widths):
        args += [both, lora_b, out, width, both.stride(0), lora_b.stride(0), out.stride(0)]
    _lora_expand3[(triton.cdiv(rows, block_m), sum(tiles))](
        *args, mask, mask.stride(0), rows, rows // mask.shape[0], tiles[0], tiles[1],
        RANK_COLS=lora_bs[0].shape[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=boths[0].dtype == torch.float32, num_warps=warps)


def _launch_segments(x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                     lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor], cols: list[int], rank_cap: int,
                     tiles: tuple[int, int, int, int] | None = None) -> None:
    """x: (M, in); y: (M, width) holding the base GEMM's x W^T (+ b), updated in place; slots: (R,) each segment's
    slot, R dividing M; mask: (R, S * rank_cap); lora_as[i]: (S * rank_cap, in), lora_bs[i]: (out_i, S * rank_cap)
    of the layer whose output starts at y's column cols[i]. tiles: (BLOCK_N, BLOCK_K, SPLIT, num_warps)."""
    rows, in_features = x.shape
    if mask.shape[0] != slots.shape[0] or rows % slots.shape[0]:
        raise ValueError(f"{rows} rows, {slots.shape[0]} segments and {mask.shape[0]} mask rows do not match")
    rep = rows // slots.shape[0]
    block_n, block_k, split, warps = tiles or _segment_tiles()
    layers = len(lora_as)
    per_layer: list = []
    shapes: dict[str, int] = {}
    for i in range(3):
        j = min(i, layers - 1)  # unused layer arguments repeat the last layer's (LAYERS masks them out)
        per_layer += [lora_as[j], lora_bs[j], lora_bs[j].stride(0)]
        shapes[f"C{i}"], shapes[f"N{i}"] = cols[j], lora_bs[j].shape[0]
    _lora_segments[(slots.shape[0], split)](
        x, y, slots, mask, x.stride(0), y.stride(0), mask.stride(0), *per_layer, LAYERS=layers, **shapes,
        SLOTS=mask.shape[1] // rank_cap, REP=rep, IN=in_features, R_CAP=rank_cap,
        R_BLOCK=max(16, triton.next_power_of_2(rank_cap)),
        BLOCK_M=min(64, max(16, triton.next_power_of_2(rep))), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split,
        IEEE=x.dtype == torch.float32, num_warps=warps)


def _segment_tiles() -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT, num_warps) of `_launch_segments`: a first choice, not measured on a GPU yet
    (bench/probes/lora_segment.py sweeps them on the DiTs' shapes)."""
    return 128, 64, 1, 4


def _tiles(rows: int, out_features: int, grouped: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps), measured on an H100 (CUDA-graph replay, 2026-11-25): 3.2-3.4 us
    up to 64 rows (about one launch's floor). The DiTs' rows (1152 / 1408 at 64 requests), from a sweep of
    BLOCK_M 32-128, BLOCK_N 64-256, BLOCK_K 32-64 and 4 or 8 warps: q/k/v in one launch (`grouped`, read in
    place from the FusedQKV GEMM) 14.0 -> 11.2 us for VoxCPM2 and 9.6 -> 7.1 us for VoxCPM1.5, the output
    projection 8.3 -> 7.1 us; wide tiles re-read each row's masked hidden for fewer output tiles."""
    if rows <= 64:
        return (16 if rows <= 16 else 32), 64, 64, 8
    if not grouped:
        return 64, 256, 64, 8
    if out_features >= 2048:
        return 128, 256, 32, 8
    return 128, 128, 64, 8


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with unit column stride, which the kernels assume; any row stride: `both` may be a column slice of
    a wider GEMM output (FusedQKV), read in place rather than copied."""
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.cache
def register_op() -> None:
    """Register the kernel as the torch custom op `voxcpm_api::lora_expand` (once per process; called when a
    layer is wrapped, never at import). torch.compile keeps it as one opaque call inside the compiled
    layers, and CUDA graphs capture its launch. Traced code calls it through torch.ops, which dynamo
    follows; a call through this cached function would break the graph."""

    @torch.library.custom_op("voxcpm_api::lora_expand", mutates_args=())
    def lora_expand_op(both: torch.Tensor, mask: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        both, mask, lora_b = (_rows(x) for x in (both, mask, lora_b))
        out = torch.empty(both.shape[0], lora_b.shape[0], device=both.device, dtype=both.dtype)
        if out.numel():
            _launch(both, mask, lora_b, out)
        return out

    @lora_expand_op.register_fake
    def _(both: torch.Tensor, mask: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        return both.new_empty(both.shape[0], lora_b.shape[0])

    @torch.library.custom_op("voxcpm_api::lora_expand3", mutates_args=())
    def lora_expand3_op(both0: torch.Tensor, both1: torch.Tensor, both2: torch.Tensor, mask: torch.Tensor,
                        b0: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boths = [_rows(x) for x in (both0, both1, both2)]
        lora_bs = [_rows(x) for x in (b0, b1, b2)]
        outs = [torch.empty(both0.shape[0], b.shape[0], device=both0.device, dtype=both0.dtype) for b in lora_bs]
        if both0.shape[0]:
            _launch3(boths, _rows(mask), lora_bs, outs)
        return outs[0], outs[1], outs[2]

    @lora_expand3_op.register_fake
    def _(both0: torch.Tensor, both1: torch.Tensor, both2: torch.Tensor, mask: torch.Tensor,
          b0: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(both0.new_empty(both0.shape[0], b.shape[0]) for b in (b0, b1, b2))  # type: ignore[return-value]

    @torch.library.custom_op("voxcpm_api::lora_linear_segments", mutates_args=())
    def lora_linear_segments_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                slots: torch.Tensor, mask: torch.Tensor, lora_as: list[torch.Tensor],
                                lora_bs: list[torch.Tensor], cols: list[int], rank_cap: int) -> torch.Tensor:
        x = _rows(x)
        y = torch.nn.functional.linear(x, weight, bias)  # (M, width): the base GEMM, which the kernel adds onto
        if y.shape[0]:
            _launch_segments(x, y, slots, _rows(mask), [_rows(a) for a in lora_as], [_rows(b) for b in lora_bs],
                             cols, rank_cap)
        return y

    @lora_linear_segments_op.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], slots: torch.Tensor,
          mask: torch.Tensor, lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor], cols: list[int],
          rank_cap: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])


def lora_expand(both: torch.Tensor, mask: torch.Tensor, lora_b: torch.Tensor, kernel: bool = True) -> torch.Tensor:
    """both: (M, out + K) = [base | hidden]; mask: (R, K) with R dividing M (row m uses mask row m // (M/R));
    lora_b: (out, K). Returns (M, out) = base + (hidden * mask) @ lora_b^T. kernel=False: the torch form
    (always off the GPU)."""
    out_features = lora_b.shape[0]
    if kernel and triton_serves(both):
        return torch.ops.voxcpm_api.lora_expand(both, mask, lora_b)
    # row m's mask row by index: no branch on the repeat count (one prompt's tokens share its row), which
    # would be a guard, and so one more compiled variant of every layer region holding a LoRA layer
    rows = torch.arange(both.shape[0], device=both.device) // (both.shape[0] // mask.shape[0])
    mask = mask.index_select(0, rows)
    hidden = both[:, out_features:] * mask
    # one GEMM adds the LoRA term onto the base output (beta = 1); base rows add exactly 0
    return torch.addmm(both[:, :out_features], hidden, lora_b.t())


def lora_expand3(boths: list[torch.Tensor], mask: torch.Tensor, lora_bs: list[torch.Tensor],
                 kernel: bool = True) -> list[torch.Tensor]:
    """`lora_expand` of three layers over the same rows and slot layout, in one launch on a GPU."""
    if kernel and triton_serves(boths[0]):
        return list(torch.ops.voxcpm_api.lora_expand3(*boths, mask, *lora_bs))
    return [lora_expand(both, mask, lora_b, kernel=False) for both, lora_b in zip(boths, lora_bs)]


def lora_linear_segments(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, slots: torch.Tensor,
                         mask: torch.Tensor, lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor], cols: list[int],
                         rank_cap: int) -> torch.Tensor:
    """x: (M, in) whose rows come in segments that share an adapter (a DiT sequence's tokens); slots: (R,) each
    segment's slot; mask: (R, S * rank_cap) as for `lora_expand`; lora_as[i] / lora_bs[i]: the A (S * rank_cap,
    in) and B (out_i, S * rank_cap) of the layer whose output starts at column cols[i] of x weight^T + bias.
    Returns (M, width) = x weight^T + bias plus each row's own slot's term in those columns: the GEMM runs
    over the base weights alone and the kernel computes only each segment's own slot's hidden (the [W; A]
    form computes every slot's). Where `triton_serves` only (no torch form: callers take the [W; A] one)."""
    return torch.ops.voxcpm_api.lora_linear_segments(x, weight, bias, slots, mask, lora_as, lora_bs, cols, rank_cap)

