"""Attention over the DiT's and the local encoder's short sequences in one small GPU kernel (Triton).

Every decode step runs the DiT 9 times (10 solver steps) over sequences of 9 to 11 positions
(mu, time, the previous patch, the noisy patch) and the local encoder over 5 (CLS + the patch), with
grouped-query attention (16 query heads share 2 key/value heads) and no mask. PyTorch's backends
are built for long sequences: on an H100 at 64 rows (2 x 64 CFG rows x 16 heads x 9 positions)
cuDNN took 38 us per call, FlashAttention 46 us and the math path 70 us, for about 3 MB of
reads (measured 2026-11-25, CUDA-graph replay); 80 such calls made ~3 ms of a 17 ms step.

`_short_attention` gives one program to each (row, key/value head): it loads that head's keys and
values once and attends for all query heads of its group at once, so a (GROUP x T, D) by (D, T)
product and a (GROUP x T, T) by (T, D) product replace 16 separate per-head tiles. Softmax in
float32 with the normalisation after the value product, as the flash kernels do. It reads the
projections as the linear layers wrote them, (B, T, heads x D), applies the rotary embedding on load
(in float32, rounded back, as `apply_rotary_pos_emb` does) and writes the output in the same order,
which is what the output projection reads: no transpose, rotary or contiguous copy runs around it
(inductor's rotary kernel alone took 11 us per call at 64 rows once it was no longer fused into the
cuDNN call's input copy).

`ShortSequenceAttention` is the official `MiniCPMAttention` with this kernel in its non-causal path
(the DiT, the local encoder) on a GPU; the LMs' causal passes and every CPU pass are the official
forward, unchanged. The layers' parameters and names stay as they are: only the class changes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from voxcpm.modules.minicpm4.model import MiniCPMAttention

from .multi_lora import project_qkv
from .triton_support import triton_serves

_MAX_POSITIONS = 16  # the tile sizes measured and tested (VoxCPM: 5 to 11); longer sequences take the official path


@triton.jit
def _rotated(ptr, offsets, partner, sign, cos, sin, HAS_ROPE: tl.constexpr, mask):
    """Load a (rows, HEAD_DIM) tile and apply the official rotary embedding in float32, rounded back to the
    input dtype (`apply_rotary_pos_emb`: x * cos + rotate_half(x) * sin)."""
    x = tl.load(ptr + offsets, mask=mask, other=0.0)
    if HAS_ROPE:
        half = tl.load(ptr + partner, mask=mask, other=0.0)
        x = (x.to(tl.float32) * cos + sign * half.to(tl.float32) * sin).to(x.dtype)
    return x


@triton.jit
def _short_attention(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, o_ptr, positions, scale,
                     sq_b, sq_t, sk_b, sk_t, sv_b, sv_t, so_b, so_t, sc_t,
                     GROUP: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr,
                     IEEE: tl.constexpr):
    """Non-causal attention of one row's GROUP query heads against their shared key/value head. q, k, v are
    the projections as they come out of the linear layers, (B, T, heads * HEAD_DIM) with any row and
    position strides; the rotary embedding is applied on load."""
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, HEAD_DIM)
    # rotate_half: the first half of a head takes -x[d + D/2], the second half x[d - D/2]
    partner_d = (d + HEAD_DIM // 2) % HEAD_DIM
    sign = tl.where(d < HEAD_DIM // 2, -1.0, 1.0)[None, :]
    t_in = t < positions
    kv_mask = t_in[:, None]
    cos_k = tl.load(cos_ptr + t[:, None] * sc_t + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
    sin_k = tl.load(sin_ptr + t[:, None] * sc_t + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
    k_base = k_ptr + row * sk_b + kv_head * HEAD_DIM + t[:, None] * sk_t
    k = _rotated(k_base, d[None, :], partner_d[None, :], sign, cos_k, sin_k, HAS_ROPE, kv_mask)
    v = tl.load(v_ptr + row * sv_b + kv_head * HEAD_DIM + t[:, None] * sv_t + d[None, :], mask=kv_mask, other=0.0)
    # query rows r = g * BLOCK_T + t: position t of query head kv_head * GROUP + g
    r = tl.arange(0, GROUP * BLOCK_T)
    head = kv_head * GROUP + r // BLOCK_T
    tq = r % BLOCK_T
    q_mask = (tq < positions)[:, None]
    cos_q = tl.load(cos_ptr + tq[:, None] * sc_t + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    sin_q = tl.load(sin_ptr + tq[:, None] * sc_t + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    q_base = q_ptr + row * sq_b + head[:, None] * HEAD_DIM + tq[:, None] * sq_t
    q = _rotated(q_base, d[None, :], partner_d[None, :], sign, cos_q, sin_q, HAS_ROPE, q_mask)
    if IEEE:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))  # (GROUP * BLOCK_T, BLOCK_T) float32
    scores = tl.where(t_in[None, :], scores * scale, float("-inf"))
    weights = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    total = tl.sum(weights, axis=1)
    if IEEE:
        out = tl.dot(weights.to(v.dtype), v, input_precision="ieee")
    else:
        out = tl.dot(weights.to(v.dtype), v)
    out = out / total[:, None]
    tl.store(o_ptr + row * so_b + tq[:, None] * so_t + head[:, None] * HEAD_DIM + d[None, :], out.to(v.dtype),
             mask=q_mask)


@functools.cache
def register_op() -> None:
    """Register the kernel as the torch custom op `voxcpm_api::short_attention` (once per process, from
    `use_short_attention`, never at import): one opaque call inside the compiled layers, reached through
    torch.ops in traced code."""

    @torch.library.custom_op("voxcpm_api::short_attention", mutates_args=())
    def short_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           head_dim: int, rope: bool) -> torch.Tensor:
        q, k, v, cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, cos, sin))
        rows, positions, width = q.shape
        kv_heads = k.shape[2] // head_dim
        out = torch.empty(rows, positions, width, device=q.device, dtype=q.dtype)
        _short_attention[(rows, kv_heads)](
            q, k, v, cos, sin, out, positions, head_dim ** -0.5,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), cos.stride(0),
            GROUP=width // head_dim // kv_heads, BLOCK_T=max(16, triton.next_power_of_2(positions)),
            HEAD_DIM=head_dim, HAS_ROPE=rope, IEEE=q.dtype == torch.float32)
        return out

    @short_attention_op.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          head_dim: int, rope: bool) -> torch.Tensor:
        return torch.empty_like(q)


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int,
                    position_emb: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """q: (B, T, H * head_dim), k and v: (B, T, KVH * head_dim), the linear layers' outputs; position_emb: the
    (T, head_dim) cos and sin, or None. Non-causal, no mask; returns (B, T, H * head_dim)."""
    cos, sin = position_emb if position_emb is not None else (q.new_zeros(1, head_dim), q.new_zeros(1, head_dim))
    return torch.ops.voxcpm_api.short_attention(q, k, v, cos, sin, head_dim, position_emb is not None)


def fits(hidden_states: torch.Tensor, head_dim: int, heads: int, kv_heads: int) -> bool:
    """Whether the kernel serves this call: a GPU (or Triton's interpreter), a short sequence, and the
    power-of-two head sizes tl.dot and tl.arange need."""
    def pow2(n: int) -> bool:
        return n >= 16 and n & (n - 1) == 0
    return (triton_serves(hidden_states) and hidden_states.shape[1] <= _MAX_POSITIONS
            and pow2(head_dim) and heads % kv_heads == 0 and (heads // kv_heads) & (heads // kv_heads - 1) == 0)


class ShortSequenceAttention(MiniCPMAttention):
    """The official attention module with the short-sequence kernel on its non-causal GPU path."""

    def forward(self, hidden_states: torch.Tensor, position_emb: tuple[torch.Tensor, torch.Tensor] | None,
                is_causal: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        if (is_causal or not fits(hidden_states, self.head_dim, self.num_heads, self.num_key_value_heads)
                or (position_emb is not None and position_emb[0].dim() != 2)):
            return super().forward(hidden_states, position_emb, is_causal)
        q, k, v = project_qkv(self, hidden_states)
        out = short_attention(q, k, v, self.head_dim, position_emb)
        # no KV cache: this path serves only the DiT and the local encoder, whose callers drop it
        return self.o_proj(out), None


def use_short_attention(stacks: list) -> int:
    """Give every attention module of these layer stacks the short-sequence path. Returns how many."""
    register_op()
    swapped = 0
    for stack in stacks:
        for layer in stack.layers:
            if type(layer.self_attn) is MiniCPMAttention:
                layer.self_attn.__class__ = ShortSequenceAttention
                swapped += 1
    return swapped
