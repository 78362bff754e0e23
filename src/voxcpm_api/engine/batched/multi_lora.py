"""Per-row LoRA inside one batched forward pass (ADR 0006).

Every linear layer some adapter targets is replaced by `MultiLoRALinear`, which keeps the very
same weight/bias Parameters and holds the A and B matrices of all GPU adapter slots side by side:

    A_cat: (S * r_cap, in)     slot s owns rows    [s * r_cap, s * r_cap + r_s)
    B_cat: (out, S * r_cap)    slot s owns columns [s * r_cap, s * r_cap + r_s)

A row of the batch picks its slot through a mask (N, S * r_cap) that holds the slot's
`alpha / r` on the slot's r_cap columns and 0 elsewhere (all zeros for base-model rows):

    y = x W^T + b + ((x A_cat^T) * mask) B_cat^T

W and A_cat are the rows of one fused weight [W; A_cat], so the base output and every slot's hidden
come from one GEMM, and `lora_kernels.lora_expand` adds the masked B term in one more kernel (on a
GPU; a torch form elsewhere). For a row of slot s this is x W^T + b + (x A_s^T * scaling_s) B_s^T:
the official LoRALinear's arithmetic up to float rounding (the scaling is applied before B instead of
after; zero padding adds exact zeros). For a base row the mask is 0 and the added term is exactly 0:
y is the fused GEMM's base columns, bit for bit: the plain layer up to that GEMM's accumulation order
(a BLAS may block the wider matrix its own way, on some CPUs and on GPUs).
Ranks up to r_cap, alphas and target sets may all differ between slots: an
adapter that does not target a layer leaves its block of that layer zero.

peft cannot do this: its LoRA layers hold one set of active adapters for the whole forward call,
not one per row (peft's mixed-batch `adapter_names` path loops over sub-batches, which breaks
CUDA-graph capture and costs one extra launch per adapter per layer).

The mask is read from `LoRAContext`, which the runner sets before each module call (rows of the
LM, the 2 x rows of the CFG-doubled DiT, ...). All tensors are static buffers, so the whole step
can be captured in a CUDA graph; a new rank cap or a newly targeted layer re-allocates buffers
and bumps `version`, which invalidates captured graphs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..lora_runtime import AdoptedLinear, wrap_linear
from .lora_kernels import lora_expand, lora_expand3, lora_linear_segments, register_op
from .triton_support import triton_serves


_PACKS_KEPT = 16  # packed host copies of adapters kept for reloading a slot (as many as the host LRU keeps)


class LoRAContext:
    """What the wrapped layers read: the per-row mask (None = no adapter anywhere in this call) and whether
    the LoRA term runs as our kernel (decode steps) or as torch ops (prefills: outside CUDA graphs the
    host is the bottleneck, and the kernel's launch through its custom op costs ~110 us of host time per
    call on an H100 machine against ~20 us for the two torch kernels; measured 2026-11-25)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # (N, S * r_cap) or (1, S * r_cap) broadcast over rows
        self.kernel = True
        # (N,) each mask row's slot (SlotWeights.base_index: none), set only around calls whose rows come in
        # segments of one adapter, N of them (the DiT's sequences, with BatchedConfig.lora_segments): on a GPU
        # their LoRA term then runs per segment (lora_kernels.lora_linear_segments)
        self.slots: torch.Tensor | None = None

    def segments(self, x: torch.Tensor) -> torch.Tensor | None:
        """The segments' slots where this call's LoRA term runs per segment, else None."""
        if self.slots is None or not self.kernel or not triton_serves(x):
            return None
        return self.slots


class MultiLoRALinear(AdoptedLinear):
    def __init__(self, base: nn.Linear, context: LoRAContext) -> None:
        super().__init__(base)
        register_op()
        self.context = context
        self.fused_weight: torch.Tensor | None = None  # (out + S * r_cap, in): [W; A_cat]
        self.fused_bias: torch.Tensor | None = None  # (out + S * r_cap,): [b; 0] when the layer has a bias
        self.lora_a: torch.Tensor | None = None  # (S * r_cap, in), a view of fused_weight's last rows
        self.lora_b: torch.Tensor | None = None  # (out, S * r_cap)
        self.rank_cap = 0

    def allocate(self, slots: int, rank_cap: int) -> None:
        """(Re)build [W; A_cat] with zero A blocks. The base weight moves into its first rows: the
        `weight` Parameter stays the same object (state_dict keys, the plain path) and now views them."""
        w = self.weight
        extra = slots * rank_cap
        with torch.inference_mode(False), torch.no_grad():  # .data of a Parameter takes no inference tensor
            fused = torch.zeros(self.out_features + extra, self.in_features, device=w.device, dtype=w.dtype)
            fused[: self.out_features].copy_(w)
            w.data = fused[: self.out_features]
            if self.bias is not None:
                self.fused_bias = torch.cat((self.bias.detach(), self.bias.new_zeros(extra)))
        self.fused_weight = fused
        self.rank_cap = rank_cap
        self.lora_a = fused[self.out_features:]
        self.lora_b = torch.zeros(self.out_features, extra, device=w.device, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.context.mask
        if mask is None or self.fused_weight is None:
            return F.linear(x, self.weight, self.bias)
        slots = self.context.segments(x)
        if slots is not None:  # the GEMM over W alone, then each segment's own slot's term
            out = lora_linear_segments(x.flatten(0, -2), self.weight, self.bias, slots, mask, [self.lora_a],
                                       [self.lora_b], [0], self.rank_cap)
            return out.view(*x.shape[:-1], self.out_features)
        # one GEMM makes the base output and every slot's x A^T; one more kernel adds each row's own term
        both = F.linear(x, self.fused_weight, self.fused_bias)  # (N, ..., out + S * r_cap)
        out = lora_expand(both.flatten(0, -2), mask, self.lora_b, self.context.kernel)  # (N * ..., out)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        slots = "none" if self.lora_a is None else str(self.lora_a.shape[0])
        return f"in_features={self.in_features}, out_features={self.out_features}, lora_rows={slots}"


class FusedQKV:
    """An attention's q, k and v projections as one GEMM. They read the same input, and at VoxCPM's widths
    (grouped-query attention: k and v are an eighth of q) three GEMMs cost 2-3x one GEMM over the stacked
    weight (H100 CUDA-graph replay, 2026-11-25: 15.3 against 5.6 us for VoxCPM2's LM at 64 rows, 38.5
    against ~29 us with 8 adapters for its DiT's 1408 rows), about 1.5 ms of a 20 ms step over the ~170
    attentions a VoxCPM2 step runs. The three layers' weights, and their LoRA A blocks once SlotWeights
    wraps them, are the rows of one buffer

        [W_q; A_q; W_k; A_k; W_v; A_v]      (an A block only for a wrapped layer)

    so each layer's own [W; A] (MultiLoRALinear.fused_weight) is a contiguous slice of it and its weight
    Parameter a view: the layers still work alone (the official forwards, the CPU DiT) and no weight is
    held twice. `rebuild` re-lays the buffer whenever SlotWeights changes the LoRA layout.

    `segmented` (the DiT's attentions with BatchedConfig.lora_segments): calls whose rows come in segments
    of one adapter (LoRAContext.slots) run one GEMM over [W_q; W_k; W_v] alone and add each segment's own
    slot's term (lora_kernels.lora_linear_segments); those three weights are then also held as one copy
    (VoxCPM2's DiT: 63 MB), which the experiment costs until the layout changes for good."""

    def __init__(self, attn: nn.Module, context: LoRAContext, segmented: bool = False) -> None:
        self.attn = attn
        self.context = context
        self.segmented = segmented
        self.weight: torch.Tensor | None = None  # (sum of the spans' widths, in)
        self.bias: torch.Tensor | None = None
        self.base_weight: torch.Tensor | None = None  # (q + k + v widths, in) when segmented and wrapped
        self.base_bias: torch.Tensor | None = None
        self.spans: tuple[tuple[int, int, int], ...] = ()  # per layer: (first row, out, LoRA rows)
        self.rebuild()

    def layers(self) -> tuple[Any, Any, Any]:
        return self.attn.q_proj, self.attn.k_proj, self.attn.v_proj  # the wrappers once SlotWeights wraps them

    def rebuild(self) -> None:
        layers = self.layers()
        blocks: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        spans, start = [], 0
        for layer in layers:
            lora = isinstance(layer, MultiLoRALinear) and layer.fused_weight is not None
            weight = layer.fused_weight if lora else layer.weight
            bias = layer.fused_bias if lora else layer.bias
            blocks.append((weight, bias))
            spans.append((start, layer.out_features, weight.shape[0] - layer.out_features))
            start += weight.shape[0]
        if self.weight is not None and tuple(spans) == self.spans and all(
                weight.data_ptr() == self.weight[first].data_ptr()
                for (weight, _), (first, _, _) in zip(blocks, spans)):
            return  # every block already in place (an adapter re-laid other layers): the compiled code's guards
            # on this buffer still hold
        with torch.inference_mode(False), torch.no_grad():  # .data of a Parameter takes no inference tensor
            fused = torch.cat([weight.detach() for weight, _ in blocks])
            fused_bias = None
            if any(bias is not None for _, bias in blocks):  # zeros for a layer without: adds exactly 0
                fused_bias = torch.cat([bias.detach() if bias is not None else fused.new_zeros(weight.shape[0])
                                        for weight, bias in blocks])
            for layer, (first, out, extra) in zip(layers, spans):
                layer.weight.data = fused[first:first + out]
                if layer.bias is not None and fused_bias is not None:
                    layer.bias.data = fused_bias[first:first + out]
                if extra:
                    layer.fused_weight = fused[first:first + out + extra]
                    layer.lora_a = fused[first + out:first + out + extra]
                    if layer.fused_bias is not None and fused_bias is not None:
                        layer.fused_bias = fused_bias[first:first + out + extra]
            if self.segmented and any(extra for _, _, extra in spans):
                self.base_weight = torch.cat([fused[first:first + out] for first, out, _ in spans])
                self.base_bias = None if fused_bias is None else torch.cat(
                    [fused_bias[first:first + out] for first, out, _ in spans])
        self.weight, self.bias, self.spans = fused, fused_bias, tuple(spans)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (..., in) -> q, k, v, each (..., out) as that layer alone computes it (column views of one GEMM's
        output when no row carries an adapter)."""
        # the mask is read only when a layer has LoRA rows: reading it would make the compiled code guard on
        # it, and so one more variant, in attentions no adapter touches
        mask = self.context.mask if any(extra for _, _, extra in self.spans) else None
        layers = self.layers()
        slots = None if mask is None or self.base_weight is None else self.context.segments(x)
        if slots is not None:  # the GEMM over [W_q; W_k; W_v] alone, then each segment's own slot's terms
            wrapped = [i for i, (_, _, extra) in enumerate(self.spans) if extra]
            cols = [sum(out for _, out, _ in self.spans[:i]) for i in range(len(self.spans))]
            flat = lora_linear_segments(x.flatten(0, -2), self.base_weight, self.base_bias, slots, mask,
                                        [layers[i].lora_a for i in wrapped], [layers[i].lora_b for i in wrapped],
                                        [cols[i] for i in wrapped], layers[wrapped[0]].rank_cap)
            outs = list(flat.split([out for _, out, _ in self.spans], dim=1))
            return [o.view(*x.shape[:-1], o.shape[-1]) for o in outs]
        both = F.linear(x, self.weight, self.bias).flatten(0, -2)  # (N, all spans' rows)
        if mask is not None and all(extra for _, _, extra in self.spans):
            # every slot's hidden came out of the same GEMM; the three expands run as one launch
            outs = lora_expand3([both[:, first:first + out + extra] for first, out, extra in self.spans], mask,
                                [layer.lora_b for layer in layers], self.context.kernel)
        else:
            outs = [lora_expand(both[:, first:first + out + extra], mask, layer.lora_b, self.context.kernel)
                    if mask is not None and extra else both[:, first:first + out]
                    for layer, (first, out, extra) in zip(layers, self.spans)]
        return [o.view(*x.shape[:-1], o.shape[-1]) for o in outs]


def fuse_qkv(stacks: list[Any], context: LoRAContext, segmented: tuple[Any, ...] = ()) -> list[FusedQKV]:
    """Give every attention of these layer stacks its one-GEMM q, k and v projections (`project_qkv`); those of
    the `segmented` stacks can also run their LoRA term per segment (FusedQKV)."""
    groups = []
    for stack in stacks:
        for layer in stack.layers:
            attn = layer.self_attn
            attn.qkv_group = FusedQKV(attn, context, segmented=any(stack is other for other in segmented))
            groups.append(attn.qkv_group)
    return groups


def project_qkv(attn: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The q, k and v projections of `attn` applied to x: one GEMM where `fuse_qkv` grouped them, else each
    layer's own forward. The arithmetic is each layer's own either way."""
    group = getattr(attn, "qkv_group", None)
    if group is not None:
        return group(x)
    return [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]


class SlotWeights:
    """Owns the wrappers of one model and the slot contents; the scheduler decides slot numbers."""

    def __init__(self, model: nn.Module, slots: int, context: LoRAContext, rank_cap: int = 8,
                 qkv_groups: list[FusedQKV] | None = None) -> None:
        self.model = model
        self.qkv_groups = qkv_groups or []  # re-laid with the wrappers' new [W; A] blocks (FusedQKV)
        self.slots = slots
        self.context = context
        self.rank_cap = rank_cap
        self.wrappers: dict[str, MultiLoRALinear] = {}
        self.version = 0  # bumped whenever buffers are (re)allocated: captured graphs are stale
        self._contents: dict[int, object] = {}  # slot -> LoadedAdapter now in it
        self._packs: OrderedDict[tuple, tuple[object, torch.Tensor]] = OrderedDict()  # see _packed
        param = next(model.parameters())
        # scale_table[s] is the mask row of slot s; the last row (index `slots`) is all zeros (base model)
        self.scale_table = torch.zeros(slots + 1, max(1, slots * rank_cap), device=param.device, dtype=param.dtype)

    @property
    def base_index(self) -> int:
        return self.slots

    def load(self, slot: int, adapter: object) -> None:
        """Copy a validated LoadedAdapter (lora_runtime) into `slot` of every wrapper."""
        rank = int(adapter.rank)  # type: ignore[attr-defined]
        modules = adapter.modules  # type: ignore[attr-defined]
        grow = rank > self.rank_cap
        new_paths = [p for p in modules if p not in self.wrappers]
        if grow or new_paths:
            if grow:
                while self.rank_cap < rank:
                    self.rank_cap *= 2
            for path in new_paths:
                self._wrap(path)
            self._reallocate()
        self._write(slot, adapter)

    def prepare(self, adapter: object) -> None:
        """Pack a host adapter for the current slot layout now (when it is read from disk), so that putting
        it into a slot later is only the two device copies. Skipped when it would change the layout (new
        wrapped layers or a larger rank): `load` packs it then."""
        modules, rank = adapter.modules, int(adapter.rank)  # type: ignore[attr-defined]
        if self.wrappers and rank <= self.rank_cap and all(path in self.wrappers for path in modules):
            self._packed(adapter)

    def clear(self, slot: int) -> None:
        self._contents.pop(slot, None)
        self._write(slot, None)

    def _wrap(self, path: str) -> None:
        wrapper = wrap_linear(self.model, path, MultiLoRALinear, lambda base: MultiLoRALinear(base, self.context))
        self.wrappers[path] = wrapper  # type: ignore[assignment]

    def _reallocate(self) -> None:
        for wrapper in self.wrappers.values():
            wrapper.allocate(self.slots, self.rank_cap)
        for group in self.qkv_groups:
            group.rebuild()
        param = self.scale_table
        self.scale_table = torch.zeros(self.slots + 1, self.slots * self.rank_cap, device=param.device,
                                       dtype=param.dtype)
        self.version += 1
        for slot, adapter in list(self._contents.items()):
            self._write(slot, adapter)

    @torch.no_grad()
    def _write(self, slot: int, adapter: object | None) -> None:
        """Fill `slot` of every wrapper with the adapter's A and B, zero-padded to the rank cap (zeros for
        layers it does not target). One host-to-device copy of a packed buffer and one multi-tensor copy,
        instead of four small copies per wrapped layer (~400 for a full-size model: ~20 ms)."""
        cap = self.rank_cap
        lo, hi = slot * cap, (slot + 1) * cap
        if self.wrappers:
            staged = self._packed(adapter).to(self.scale_table.device, non_blocking=True)
            targets = [t for w in self.wrappers.values()
                       for t in (w.lora_a[lo:hi], w.lora_b[:, lo:hi])]  # type: ignore[index]
            torch._foreach_copy_(targets, [block for _, a, b in self._blocks(staged) for block in (a, b)])
        self.scale_table[slot].zero_()
        if adapter is not None:
            # the official LoRALinear multiplies by alpha/r held in the model dtype
            scaling = torch.tensor(float(adapter.scaling)).to(self.scale_table.dtype)  # type: ignore[attr-defined]
            self.scale_table[slot, lo:hi] = scaling
            self._contents[slot] = adapter

    def _packed(self, adapter: object | None) -> torch.Tensor:
        """The adapter's blocks for every wrapper, in wrapper order, as one flat (pinned) host tensor;
        cached per adapter until the rank cap or the wrapped layers change."""
        key = (id(adapter), self.version, self.rank_cap)
        cached = self._packs.get(key)
        if cached is not None and cached[0] is adapter:
            self._packs.move_to_end(key)
            return cached[1]
        modules = adapter.modules if adapter is not None else {}  # type: ignore[attr-defined]
        size = sum(self.rank_cap * (w.in_features + w.out_features) for w in self.wrappers.values())
        packed = torch.zeros(size, dtype=self.scale_table.dtype, pin_memory=self.scale_table.device.type == "cuda")
        for path, a_block, b_block in self._blocks(packed):
            pair = modules.get(path)
            if pair is not None:
                a, b, _scaling = pair
                a_block[: a.shape[0]].copy_(a)
                b_block[:, : a.shape[0]].copy_(b)
        self._packs[key] = (adapter, packed)
        while len(self._packs) > _PACKS_KEPT:
            self._packs.popitem(last=False)
        return packed

    def _blocks(self, flat: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """The packed layout, one place for both sides of the copy: per wrapper (in order), its A block
        (r_cap, in) and then its B block (out, r_cap), as views of `flat`."""
        cap, offset = self.rank_cap, 0
        blocks = []
        for path, wrapper in self.wrappers.items():
            a_size, b_size = cap * wrapper.in_features, wrapper.out_features * cap
            a_block = flat[offset:offset + a_size].view(cap, wrapper.in_features)
            b_block = flat[offset + a_size:offset + a_size + b_size].view(wrapper.out_features, cap)
            blocks.append((path, a_block, b_block))
            offset += a_size + b_size
        return blocks
