"""The batched forward passes over the official VoxCPM modules and weights (ADR 0006).

The only file of the batched engine that moves tensors between CPU and device.

State lives in static per-row-slot buffers (row slot = index into every tensor below), so a
decode step over rows [0, B) is a fixed sequence of kernels over fixed addresses, which is what
CUDA graphs need:

    kv_base  (layers, 2, S, kv_heads, slot_len, head_dim)   the text-semantic LM's KV cache
    kv_res   (layers, 2, S, kv_heads, slot_len, head_dim)   the residual acoustic LM's KV cache
    lm_h, res_h (S, H)          last hidden states of both LMs
    cond     (S, P, D)          the previous patch (the DiT's prefix condition)
    pos      (S,)               next KV position of each row
    noise    (S, D, P)          this step's initial CFM noise, drawn per row from the row's generator
    t_tab, dt_tab (S, N)        each row's Euler times/steps (rows with fewer steps get dt = 0)
    zero_tab (S, N)             True where the official solver uses dphi = 0 (cfg-zero-star init)
    cfg      (S, 1, 1)          each row's guidance value
    adapter  (S,)               each row's adapter slot (SlotWeights.base_index = none)
    latents  (S, max_patches, P, D)   every patch each row has generated

A prefill runs the official prompt pass for a batch of prompts (right-padded; on a GPU to a bucket
whose LM pass replays a CUDA graph), with each LM layer as the decode step's two compiled halves
around a causal attention, and copies each prompt's KV into its row's slot. A decode step replicates the official
loop body (`VoxCPMModel._inference` / `VoxCPM2Model._inference`) for many rows at once:
per-row positions and attention masks over the slot caches, per-row noise, per-row solver steps
and cfg. Rows never see each other: every op is row-wise except the shared weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from voxcpm.modules.minicpm4.model import apply_rotary_pos_emb

from .attention_kernels import use_short_attention
from .multi_lora import LoRAContext, SlotWeights, fuse_qkv, project_qkv
from .scheduler import attention_bucket

log = logging.getLogger("voxcpm_api.engine.batched")
# Prefill attention without cuDNN: cuDNN builds an execution plan for every new prompt length, 70-150 ms
# on the first prefill of each length (H100, 2026-11-25), which real traffic hits on nearly every request.
# Decode steps keep every backend: their shapes are fixed per captured graph, so plans are built once.
_PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class RowInputs:
    """What the official `_generate_with_prompt_cache` hands to `_inference` for one request."""

    text: torch.Tensor  # (1, T) token ids
    text_mask: torch.Tensor  # (1, T)
    feat: torch.Tensor  # (1, T, P, D) model dtype
    feat_mask: torch.Tensor  # (1, T)
    min_len: int
    max_len: int
    steps: int
    cfg_value: float


@dataclass
class Prefilled:
    prompt_len: int  # positions written into the KV slot
    context: list[torch.Tensor]  # prompt patches the official decode prepends, each (P, D)
    context_len: int  # leading decoded patches the official output drops (see trim_samples)


def _attention_inputs(layer: Any, x: torch.Tensor, cos: torch.Tensor | None,
                      sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`MiniCPMDecoderLayer.forward_step` up to the KV write: norm, projections, rotary. x: (B, H) ->
    q (B, heads, 1, head_dim), k and v (B, kv_heads, 1, head_dim)."""
    rows = x.shape[0]
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    q, k, v = project_qkv(attn, h)
    q = q.view(rows, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = k.view(rows, 1, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
    v = v.view(rows, 1, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
    if cos is not None and sin is not None:
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q.contiguous(), k, v


def _attention_output(layer: Any, residual: torch.Tensor, out: torch.Tensor, depth: float | None) -> torch.Tensor:
    """The rest of `MiniCPMDecoderLayer.forward_step`: output projection, residuals, MLP.
    residual: (B, H); out: (B, heads * head_dim), the attention's output with its heads side by side -> (B, H)."""
    out = layer.self_attn.o_proj(out)
    x = residual + (out * depth if depth is not None else out)
    h = layer.mlp(layer.post_attention_layernorm(x))
    return x + (h * depth if depth is not None else h)


def _guided_euler_step(out: torch.Tensor, x: torch.Tensor, cfg: torch.Tensor, dt: torch.Tensor,
                       zero: torch.Tensor) -> torch.Tensor:
    """One step of `UnifiedCFM.solve_euler` with cfg-zero-star guidance, per row.
    out: (2B, D, P) velocities (conditioned rows, then unconditioned); x: (B, D, P); cfg: (B, 1, 1);
    dt: (B,); zero: (B,) True where the official solver uses dphi = 0."""
    rows = x.shape[0]
    pos_v, neg_v = out[:rows], out[rows:]
    pos_flat, neg_flat = pos_v.reshape(rows, -1), neg_v.reshape(rows, -1)
    dot = torch.sum(pos_flat * neg_flat, dim=1, keepdim=True)
    norm = torch.sum(neg_flat**2, dim=1, keepdim=True) + 1e-8
    st_star = (dot / norm).view(rows, 1, 1)
    dphi = neg_v * st_star + cfg * (pos_v - neg_v * st_star)
    dphi = torch.where(zero.view(rows, 1, 1), torch.zeros_like(dphi), dphi)
    return x - dt.view(rows, 1, 1) * dphi


def _head_dim(cfg: Any) -> int:
    return cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads


def _rotary_rows(lm: Any, positions: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The rotary tables for rows at these positions, (N, 1, 1, head_dim) each; None for a stack without."""
    if lm.rope_emb is None:
        return None, None
    cos, sin = lm.rope_emb(positions)  # (N, head_dim)
    rows = positions.shape[0]
    return cos.view(rows, 1, 1, -1), sin.view(rows, 1, 1, -1)


def _residual_scale(cfg: Any) -> float | None:
    """MiniCPM's muP scale of each residual branch (None: unscaled)."""
    return cfg.scale_depth / math.sqrt(cfg.num_hidden_layers) if cfg.use_mup else None


def _capture_graph(fn: Any, pool: Any) -> tuple[Any, Any]:
    """Run fn once on a side stream (its lazy inits stay off the graph), then capture it into a CUDA graph
    in `pool`. Thread-local capture mode keeps other threads' launches out. Returns (graph, fn's result)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        result = fn()
    return graph, result


class _IdentityRotary(nn.Module):
    """The rotary tables of a stack that has none (`no_rope`, e.g. VoxCPM2's residual LM): cos = 1, sin = 0.
    Exact: the official rotary computes q * cos + rotate_half(q) * sin in float32, which is q itself for
    these values. With it, every stack's layers take one compiled path; a None in its place was another
    variant of each layer graph to compile at start."""

    def __init__(self, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.dtype = dtype

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # made per call, inside inference mode like the real tables' rows: a tensor kept from outside it
        # would differ from them in dispatch keys, itself a compiled variant
        shape = (*position_ids.shape, self.head_dim)
        ones = torch.ones(shape, device=position_ids.device, dtype=self.dtype)
        return ones, torch.zeros_like(ones)


def _identity_rotary_where_missing(stacks: tuple[Any, ...]) -> None:
    ropes = [stack.rope_emb for stack in stacks if stack.rope_emb is not None]
    if not ropes:
        return
    for stack in stacks:
        if stack.rope_emb is None:
            stack.rope_emb = _IdentityRotary(_head_dim(stack.config), ropes[0].cos_cached.dtype)


# prompts in one prefill up to which its LM pass replays a CUDA graph: a burst of up to 64 requests too, whose
# eager pass was host-bound (VoxCPM2, 64 prompts: 31 ms, 77 ms with adapters, against ~8 ms for 8 prompts
# in a graph with or without them)
PREFILL_GRAPH_ROWS = 64
# padded prompt positions (prompts x length) up to which it does: a graph keeps its outputs (every layer's
# KV), ~75 MB at 2048 positions for VoxCPM2, and ~0.9 GB if every bucket of prompts x length gets used
# (28 buckets; twice that with adapters)
PREFILL_GRAPH_TOKENS = 2048
_PREFILL_MIN_WIDTH = 32


def _prefill_graph_shape(rows: int, longest: int) -> tuple[int, int] | None:
    """(prompts, length) a prefill is padded to for a graph (powers of two), or None: eager."""
    batch = 1 << (rows - 1).bit_length()
    width = max(_PREFILL_MIN_WIDTH, 1 << (longest - 1).bit_length())
    if batch > PREFILL_GRAPH_ROWS or batch * width > PREFILL_GRAPH_TOKENS:
        return None
    return batch, width


@dataclass
class _PrefillGraph:
    """The LM pass of a prefill for one (prompts, padded length) bucket: static inputs, a graph, its outputs."""

    graph: Any
    inputs: tuple[torch.Tensor, ...]
    mask: torch.Tensor | None  # the LoRA rows' mask the layers read (static); None: no adapter
    outputs: tuple[torch.Tensor, list, torch.Tensor, list]

    @classmethod
    def capture(cls, fn: Any, inputs: tuple[torch.Tensor, ...], mask: torch.Tensor | None, context: LoRAContext,
                pool: Any) -> _PrefillGraph:
        static = tuple(t.clone() for t in inputs)
        static_mask = None if mask is None else mask.clone()
        context.mask = static_mask
        try:
            graph, outputs = _capture_graph(lambda: fn(*static), pool)
        finally:
            context.mask = mask
        return cls(graph, static, static_mask, outputs)

    def run(self, inputs: tuple[torch.Tensor, ...],
            context: LoRAContext) -> tuple[torch.Tensor, list, torch.Tensor, list]:
        """Replay on these inputs. The outputs live in the graph's memory: read them before the next replay
        of any prefill graph (they share one pool)."""
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        if self.mask is not None:
            self.mask.copy_(context.mask)
        self.graph.replay()
        return self.outputs


class PhaseClock:
    """Seconds per named phase, each counted from the end of the one before (the start-up report)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self._last, 2)
        self._last = now


class BatchedModel:
    def __init__(self, tts: Any, architecture: str, max_rows: int, slot_len: int, lora_slots: int,
                 cuda_graphs: bool, compile: bool = False, lora_segments: bool = False) -> None:
        self.tts = tts
        self.v2 = architecture == "voxcpm2"
        self.device = next(tts.parameters()).device
        self.dtype = next(tts.base_lm.parameters()).dtype
        self.max_rows = max_rows
        self.slot_len = slot_len
        self.patch = int(tts.patch_size)
        self.feat_dim = int(tts.feat_dim)
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self._noise_host: torch.Tensor | None = None  # noise_staging()
        # prompts padded to the prefill graphs' buckets: on a GPU with or without graphs, so that graphs change
        # no kernel's shape (eager == graph); the CPU (parity tests) runs each batch at its own size
        self.pad_prefills = self.device.type == "cuda"
        clock = PhaseClock()
        self.init_phases_s = clock.phases  # seconds per part of this constructor (start-up report)
        self.lora_context = LoRAContext()
        self.estimator = tts.feat_decoder.estimator
        self.feat_encoder = tts.feat_encoder
        # every attention's q, k and v projections as one GEMM (multi_lora.FusedQKV); with lora_segments the
        # DiT's LoRA term runs per request segment on a GPU (an experiment awaiting its measurement, ADR 0008)
        self.lora_segments = lora_segments
        qkv_groups = fuse_qkv([self.estimator.decoder, self.feat_encoder.encoder, tts.base_lm, tts.residual_lm],
                              self.lora_context, segmented=(self.estimator.decoder,) if lora_segments else ())
        self.lora = SlotWeights(tts, max(1, lora_slots), self.lora_context, qkv_groups=qkv_groups)
        clock.lap("lora_slots")
        # the DiT's and the local encoder's 5-11 position sequences: our kernel on a GPU (attention_kernels)
        use_short_attention([self.estimator.decoder, self.feat_encoder.encoder])
        self._attn_in, self._attn_out, self._euler = _attention_inputs, _attention_output, _guided_euler_step
        clock.lap("short_attention")
        self.compiled = False
        if compile and self.device.type == "cuda":
            self._compile()
            clock.lap("compile_setup")
        self.mean_mode = bool(tts.feat_decoder.mean_mode)
        self.max_solver_steps = 0
        lm_cfg = tts.config.lm_config
        self.scale_emb = float(lm_cfg.scale_emb) if lm_cfg.use_mup else 1.0
        self._graphs: dict[tuple, Any] = {}
        self._graph_pool: Any = None
        self._prefill_graphs: dict[tuple, _PrefillGraph] = {}  # (prompts, padded length, LoRA, version)
        self._prefill_pool: Any = None
        self._prefill_dtypes: tuple[torch.dtype, ...] | None = None
        self._schedules: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.graph_captures = 0
        self._allocate(16)

    def _compile(self) -> None:
        """torch.compile (inductor) the step's small element-wise work, which otherwise is thousands of
        tiny kernels per step; our CUDA graphs then capture the fused kernels (ADR 0007).

        Regional: one transformer layer's code is compiled and reused for every layer: the DiT's and the
        local encoder's `MiniCPMDecoderLayer`, our two halves of an LM layer around its attention (decode
        steps and prefills), and the guided Euler update. Compile time grows with one layer, not with the
        model's depth (the whole DiT as one graph took ~60 s more start-up, the whole step ~290 s), and
        inductor's cache on disk (engine._persist_compiled_kernels) makes a restart reuse the kernels.
        Each compiled variant costs a first start ~3 s (H100 host), so the inputs are kept to one variant
        per region: batches of >= 2 rows (_compiled_rows), no duck shapes (_tracing), identity rotary
        tables for stacks without (_IdentityRotary), one inference-tensor kind, one attention layout.
        An adapter adds two variants of each region whose layers it wraps (rows with an adapter; calls
        without one through the wrapped layers)."""
        self.compiled = True
        # one code object serves many shapes (rows buckets x LMs x DiT): allow that many variants
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        stacks = (self.estimator.decoder, self.feat_encoder.encoder, self.tts.base_lm, self.tts.residual_lm)
        _identity_rotary_where_missing(stacks)
        self._attn_in = torch.compile(_attention_inputs, dynamic=True)
        self._attn_out = torch.compile(_attention_output, dynamic=True)
        self._euler = torch.compile(_guided_euler_step, dynamic=True)
        # whole-sequence layers: the DiT and the local encoder (both LMs run through the two halves above,
        # in decode steps and prefills alike)
        for stack in stacks[:2]:
            for layer in stack.layers:
                layer.compile(dynamic=True)

    # ------------------------------------------------------------------ buffers

    @staticmethod
    def bytes_per_row(tts: Any, slot_len: int) -> int:
        """Device memory one row slot holds in the buffers `_allocate` makes: both LMs' KV caches at
        `slot_len` positions and the generated latents (the rest is a few KB)."""
        itemsize = next(tts.base_lm.parameters()).element_size()
        total = 0
        for lm in (tts.base_lm, tts.residual_lm):
            cfg = lm.config
            total += cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * slot_len * _head_dim(cfg) * itemsize
        return total + slot_len * int(tts.patch_size) * int(tts.feat_dim) * itemsize

    def _kv(self, lm: Any) -> torch.Tensor:
        cfg = lm.config
        return torch.zeros(cfg.num_hidden_layers, 2, self.max_rows, cfg.num_key_value_heads, self.slot_len,
                           _head_dim(cfg), device=self.device, dtype=self.dtype)

    def _allocate(self, solver_steps: int) -> None:
        S, P, D, dev, dt = self.max_rows, self.patch, self.feat_dim, self.device, self.dtype
        hidden = self.tts.config.lm_config.hidden_size
        self.kv_base = self._kv(self.tts.base_lm)
        self.kv_res = self._kv(self.tts.residual_lm)
        self.lm_h = torch.zeros(S, hidden, device=dev, dtype=dt)
        self.res_h = torch.zeros(S, hidden, device=dev, dtype=dt)
        self.cond = torch.zeros(S, P, D, device=dev, dtype=dt)
        self.pos = torch.zeros(S, device=dev, dtype=torch.long)
        self.noise = torch.zeros(S, D, P, device=dev, dtype=dt)
        self.cfg = torch.ones(S, 1, 1, device=dev, dtype=dt)
        self.adapter = torch.full((S,), self.lora.base_index, device=dev, dtype=torch.long)
        self.patch_idx = torch.zeros(S, device=dev, dtype=torch.long)
        self.latents = torch.zeros(S, self.slot_len, P, D, device=dev, dtype=dt)
        self.out_feat = torch.zeros(S, P, D, device=dev, dtype=dt)
        self.out_stop = torch.zeros(S, device=dev, dtype=torch.long)
        self._resize_schedule(solver_steps)

    def _resize_schedule(self, steps: int) -> None:
        """(Re)allocate the per-row Euler tables for up to `steps` solver steps."""
        if steps <= self.max_solver_steps:
            return
        S, dev, dt = self.max_rows, self.device, self.dtype
        old = (self.t_tab, self.dt_tab, self.zero_tab) if self.max_solver_steps else None
        self.t_tab = torch.zeros(S, steps, device=dev, dtype=dt)
        self.dt_tab = torch.zeros(S, steps, device=dev, dtype=dt)
        self.zero_tab = torch.ones(S, steps, device=dev, dtype=torch.bool)
        if old is not None:
            n = old[0].shape[1]
            self.t_tab[:, :n], self.dt_tab[:, :n], self.zero_tab[:, :n] = old
        self.max_solver_steps = steps
        self.drop_graphs()  # they captured the old tables' addresses

    def kv_bytes_per_row(self) -> int:
        per = self.kv_base[:, :, 0].numel() + self.kv_res[:, :, 0].numel()
        return per * self.kv_base.element_size() + self.latents[0].numel() * self.latents.element_size()

    # ------------------------------------------------------------------ the official Euler schedule

    def _schedule(self, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """t, dt and the zero-init flags of `UnifiedCFM.solve_euler` for `steps` steps, computed with the
        same tensor ops in the same dtype and device, so each row's times equal the official ones."""
        cached = self._schedules.get(steps)
        if cached is not None:
            return cached
        dev, dt_type = self.device, self.dtype
        t_span = torch.linspace(1, 0, steps + 1, device=dev, dtype=dt_type)
        sway = 1.0  # UnifiedCFM.forward's default sway_sampling_coef, which _inference keeps
        t_span = t_span + sway * (torch.cos(torch.pi / 2 * t_span) - 1 + t_span)
        t, dt = t_span[0], t_span[0] - t_span[1]
        zero_init_steps = max(1, int(len(t_span) * 0.04))
        ts, dts, zeros = [], [], []
        for step in range(1, len(t_span)):
            ts.append(t)
            dts.append(dt)
            zeros.append(step <= zero_init_steps)
            t = t - dt
            if step < len(t_span) - 1:
                dt = t - t_span[step + 1]
        cached = (torch.stack(ts), torch.stack(dts), torch.tensor(zeros, device=dev))
        self._schedules[steps] = cached
        return cached

    # ------------------------------------------------------------------ prefill (one request)

    def _lora_rows(self, slots: torch.Tensor | None) -> None:
        """Point the wrapped layers at these rows' adapters (None = no adapter in this call)."""
        self.lora_context.mask = None if slots is None else self.lora.scale_table[slots]
        self.lora_context.slots = None  # (a step that failed inside its DiT loop may have left them set)

    @torch.inference_mode()
    def prefill(self, items: list[tuple[int, RowInputs, int | None]]) -> list[Prefilled]:
        """The part of the official `_inference` before its loop, for several requests at once.

        items: (row slot, inputs, adapter slot or None). Prompts are right-padded to the longest one:
        every layer before the loop is causal or works per patch, so padding after a prompt never
        changes that prompt's positions, and each row keeps only its own positions.
        """
        lengths = [int(inputs.text.shape[1]) for _, inputs, _ in items]
        rows, longest = len(items), max(lengths)
        # the LM pass replays a CUDA graph captured for (prompts, padded length) buckets: without one, a
        # prefill is ~40 ms of host time for ~2 ms of GPU work (H100 host, VoxCPM1.5, one 17-token prompt).
        # The padding is all-zero prompts and positions after each prompt, which (as above) change nothing.
        graph_shape = _prefill_graph_shape(rows, longest) if self.pad_prefills else None
        batch_rows, width = graph_shape or (rows, longest)
        first = items[0][1]
        text = torch.zeros(batch_rows, width, dtype=first.text.dtype, device=self.device)
        text_mask = torch.zeros(batch_rows, width, dtype=first.text_mask.dtype, device=self.device)
        feat = torch.zeros(batch_rows, width, *first.feat.shape[2:], dtype=first.feat.dtype, device=self.device)
        feat_mask = torch.zeros(batch_rows, width, dtype=first.feat_mask.dtype, device=self.device)
        for i, (_, inputs, _) in enumerate(items):
            n = lengths[i]
            text[i, :n], text_mask[i, :n] = inputs.text[0], inputs.text_mask[0]
            feat[i, :n], feat_mask[i, :n] = inputs.feat[0], inputs.feat_mask[0]
        adapters = [self.lora.base_index if slot is None else slot for _, _, slot in items]
        with_lora = any(slot is not None for _, _, slot in items)
        masks = feat_mask.cpu()  # one device sync for every row's prompt layout
        padded = adapters + [self.lora.base_index] * (batch_rows - rows)
        self._lora_rows(torch.tensor(padded, device=self.device) if with_lora else None)
        # the LoRA term as our kernel in graphs (see LoRAContext: eager, a prefill is host-bound) and wherever
        # the layers are compiled: the flag is a guard there, and the decode step's variant has it set
        self.lora_context.kernel = graph_shape is not None or self.compiled
        try:
            with sdpa_kernel(_PREFILL_ATTENTION), self._tracing():
                enc_out, kv, res_out, res_kv = self._prefill_forward(text, text_mask, feat, feat_mask,
                                                                      masks.nonzero().to(self.device),
                                                                      graphed=graph_shape is not None
                                                                      and self.use_graphs)
        finally:
            self._lora_rows(None)
            self.lora_context.kernel = True
        # Write every row's state with a few batched copies (a per-row, per-layer loop was thousands of
        # tiny copies per prefill). KV positions past a row's own length hold its padding's keys: the
        # decode step writes position p before it lets the row attend to it, so they are never read.
        dev = self.device
        row_ids = torch.tensor([row for row, _, _ in items], device=dev)
        last = torch.tensor([n - 1 for n in lengths], device=dev)
        batch = torch.arange(rows, device=dev)
        for cache, layers in ((self.kv_base, kv), (self.kv_res, res_kv)):
            for layer, (k, v) in enumerate(layers):  # k, v: (B, kv_heads, T, head_dim), maybe padded
                cache[layer, 0, row_ids, :, :longest] = k[:rows, :, :longest]
                cache[layer, 1, row_ids, :, :longest] = v[:rows, :, :longest]
        self.lm_h[row_ids] = enc_out[batch, last]
        self.res_h[row_ids] = res_out[batch, last]
        self.cond[row_ids] = feat[batch, last]  # the official prefix_feat_cond: the prompt's last patch
        self.pos[row_ids] = last + 1
        self.patch_idx[row_ids] = 0
        cfg_values = [inputs.cfg_value for _, inputs, _ in items]
        self.cfg[row_ids] = torch.tensor(cfg_values, device=dev, dtype=self.dtype).view(-1, 1, 1)
        self.adapter[row_ids] = torch.tensor(adapters, device=dev)
        self._set_schedules(row_ids, [inputs.steps for _, inputs, _ in items])
        return [self._context(feat[i:i + 1, :n], masks[i, :n], n) for i, n in enumerate(lengths)]

    def _prefill_forward(self, text: torch.Tensor, text_mask: torch.Tensor, feat: torch.Tensor, feat_mask: torch.Tensor,
                         audio_at: torch.Tensor,
                         graphed: bool = False) -> tuple[torch.Tensor, list, torch.Tensor, list]:
        """The official prompt pass: local encoder, text-semantic LM, FSQ, residual LM. (B, T, ...) inputs;
        audio_at: (N, 2) [row, position] of the prompt's audio patches (feat_mask == 1).

        The official pass runs the local encoder over every position and multiplies its output by
        feat_mask; we run it over the audio positions only (each position is its own sequence there) and
        leave exact zeros elsewhere, which is what the mask made of them. A zero-shot prompt has no audio
        position, and a batch of prompts never pays for another's length."""
        tts = self.tts
        feat_embed = torch.zeros(*feat.shape[:2], tts.config.lm_config.hidden_size, device=feat.device,
                                 dtype=feat.dtype)  # (B, T, H)
        if audio_at.shape[0]:
            rows, positions = audio_at[:, 0], audio_at[:, 1]
            row_mask = self.lora_context.mask
            if row_mask is not None:  # one LoRA mask row per encoded patch: each patch is its own batch row
                self.lora_context.mask = row_mask[rows]
            try:
                patches = feat[rows, positions].unsqueeze(1)  # (N, 1, P, D)
                count = patches.shape[0]
                if self._compiled_rows(count) > count:  # one audio patch: a copy as its companion
                    patches = torch.cat((patches, patches))
                    if self.lora_context.mask is not None:
                        self.lora_context.mask = torch.cat((self.lora_context.mask, self.lora_context.mask))
                feat_embed[rows, positions] = tts.enc_to_lm_proj(tts.feat_encoder(patches))[:count, 0]
            finally:
                self.lora_context.mask = row_mask
        text_embed = tts.base_lm.embed_tokens(text) * self.scale_emb
        combined = text_mask.unsqueeze(-1) * text_embed + feat_mask.unsqueeze(-1) * feat_embed
        inputs = (combined, feat_embed, text_mask, feat_mask)
        if graphed:
            return self._prefill_graph(inputs).run(inputs, self.lora_context)
        return self._prefill_lms(*inputs)

    def _prefill_lms(self, combined: torch.Tensor, feat_embed: torch.Tensor, text_mask: torch.Tensor,
                     feat_mask: torch.Tensor) -> tuple[torch.Tensor, list, torch.Tensor, list]:
        """Both LMs over the prompts' embeddings (B, T, H): the part of a prefill a CUDA graph replays."""
        tts = self.tts
        enc_out, kv = self._lm_prefill(tts.base_lm, combined)
        enc_out = tts.fsq_layer(enc_out) * feat_mask.unsqueeze(-1) + enc_out * text_mask.unsqueeze(-1)
        if self.v2:
            res_in = tts.fusion_concat_proj(torch.cat((enc_out, feat_mask.unsqueeze(-1) * feat_embed), dim=-1))
        else:
            res_in = enc_out + feat_mask.unsqueeze(-1) * feat_embed
        res_out, res_kv = self._lm_prefill(tts.residual_lm, res_in)
        return enc_out, kv, res_out, res_kv

    @torch.inference_mode()
    def capture_prefill(self, rows: int, length: int) -> bool:
        """Capture the LM pass of a prefill of `rows` prompts of up to `length` positions (no adapter)
        unless it is captured; True when it captured. Needs one real prefill first (the inputs' dtypes)."""
        shape = _prefill_graph_shape(rows, length)
        if not self.use_graphs or shape is None or self._prefill_dtypes is None:
            return False
        if (*shape, False, self.lora.version) in self._prefill_graphs:
            return False
        hidden = self.tts.config.lm_config.hidden_size
        sizes = ((*shape, hidden), (*shape, hidden), shape, shape)  # combined, feat_embed, text_mask, feat_mask
        inputs = tuple(torch.zeros(size, device=self.device, dtype=dtype)
                       for size, dtype in zip(sizes, self._prefill_dtypes))
        with sdpa_kernel(_PREFILL_ATTENTION), self._tracing():
            self._prefill_graph(inputs)
        return True

    def _prefill_graph(self, inputs: tuple[torch.Tensor, ...]) -> _PrefillGraph:
        mask = self.lora_context.mask
        key = (*inputs[0].shape[:2], mask is not None, self.lora.version)
        found = self._prefill_graphs.get(key)
        if found is None:
            self._prefill_dtypes = tuple(t.dtype for t in inputs)  # for capture_prefill's zero inputs
            if self._prefill_pool is None:
                self._prefill_pool = torch.cuda.graph_pool_handle()
            found = _PrefillGraph.capture(self._prefill_lms, inputs, mask, self.lora_context, self._prefill_pool)
            self._prefill_graphs[key] = found
            self.graph_captures += 1
        return found

    def _lm_prefill(self, lm: Any, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """`MiniCPMModel.forward(x, is_causal=True)`: x (B, T, H) -> (B, T, H) and each layer's (k, v), each
        (B, kv_heads, T, head_dim). Every token is a row of the decode step's two layer halves (the rotary
        of its own position), with the causal attention over each prompt between them: the same arithmetic
        as the official layer, and no compiled variant of its own (a whole-layer causal variant was ~3-4 s
        of a first start). A LoRA mask of one row per prompt is repeated for each of its T tokens."""
        batch, length, hidden = x.shape
        flat = x.reshape(batch * length, hidden)  # (N, H), token n = prompt n // T, position n % T
        cos, sin = _rotary_rows(lm, torch.arange(length, device=x.device).repeat(batch))
        depth = _residual_scale(lm.config)
        caches = []
        prompt_mask = self.lora_context.mask
        if prompt_mask is not None:  # one mask row per token, as in a decode step (one prompt would be a size of 1)
            self.lora_context.mask = prompt_mask.repeat_interleave(length, dim=0)
        for layer in lm.layers:
            attn = layer.self_attn
            q, k, v = self._attn_in(layer, flat, cos, sin)  # (N, heads or kv_heads, 1, head_dim)
            q = q.view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)
            k = k.reshape(batch, length, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
            v = v.reshape(batch, length, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, heads, T, head_dim)
            flat = self._attn_out(layer, flat, out.transpose(1, 2).reshape(batch * length, -1), depth)
            caches.append((k, v))
        self.lora_context.mask = prompt_mask
        return lm.norm(flat).view(batch, length, hidden), caches

    def _set_schedules(self, row_ids: torch.Tensor, steps: list[int]) -> None:
        """Each row's Euler table; rows with fewer steps than the table get dt = 0 (x unchanged), t = 0."""
        self._resize_schedule(max(steps))
        width = self.max_solver_steps
        t_rows = torch.zeros(len(steps), width, device=self.device, dtype=self.dtype)
        dt_rows = torch.zeros_like(t_rows)
        zero_rows = torch.ones(len(steps), width, device=self.device, dtype=torch.bool)
        for i, n in enumerate(steps):
            ts, dts, zeros = self._schedule(n)
            t_rows[i, :n], dt_rows[i, :n], zero_rows[i, :n] = ts, dts, zeros
        self.t_tab[row_ids], self.dt_tab[row_ids], self.zero_tab[row_ids] = t_rows, dt_rows, zero_rows

    def _context(self, feat: torch.Tensor, mask: torch.Tensor, length: int) -> Prefilled:
        """Prompt patches the official decode prepends (streaming_prefix_len - 1 of them at most) and how
        many leading patches of decoded audio it then drops. feat: (1, T, P, D); mask: (T,) on the CPU."""
        if self.v2:
            prefix_len = 4  # VoxCPM2Model._generate_with_prompt_cache's streaming_prefix_len default
            has_audio = bool(mask[-1].item() == 1)
            if not has_audio:
                return Prefilled(length, [], 0)
            indices = mask.nonzero(as_tuple=True)[0]
            context_len = min(prefix_len - 1, len(indices))
            patches = [feat[0, i] for i in indices[-context_len:].tolist()]
            return Prefilled(length, patches, context_len)
        prefix_len = 3  # VoxCPMModel._generate_with_prompt_cache's streaming_prefix_len default
        audio_count = int(mask.sum().item())
        if audio_count == 0:
            return Prefilled(length, [], 0)
        context_len = min(prefix_len - 1, audio_count)
        patches = [feat[0, -context_len + i] for i in range(context_len)]
        # VoxCPM 1.x drops (streaming_prefix_len - 1) patches of audio whenever the prompt has audio
        return Prefilled(length, patches, prefix_len - 1)

    # ------------------------------------------------------------------ one decode step

    def _lm_step(self, lm: Any, kv: torch.Tensor, x: torch.Tensor, pos: torch.Tensor, att_len: int) -> torch.Tensor:
        """`MiniCPMModel.forward_step` for B rows at their own positions. x: (B, H) -> (B, H)."""
        rows = x.shape[0]
        cos, sin = _rotary_rows(lm, pos)
        row_ids = torch.arange(rows, device=x.device)
        mask = (torch.arange(att_len, device=x.device).view(1, -1) <= pos.view(-1, 1)).view(rows, 1, 1, att_len)
        depth = _residual_scale(lm.config)
        for index, layer in enumerate(lm.layers):
            q, k, v = self._attn_in(layer, x, cos, sin)
            # the KV write and the attention stay outside the compiled regions: they index the shared slot cache
            k_cache = kv[index, 0, :rows]  # (B, kv_heads, slot_len, head_dim)
            v_cache = kv[index, 1, :rows]
            k_cache[row_ids, :, pos] = k[:, :, 0]
            v_cache[row_ids, :, pos] = v[:, :, 0]
            out = F.scaled_dot_product_attention(q, k_cache[:, :, :att_len], v_cache[:, :, :att_len],
                                                 attn_mask=mask, enable_gqa=True)  # (B, heads, 1, head_dim)
            # heads side by side before the compiled half: the strides of SDPA's output differ between
            # backends (a size-1 dimension's stride is arbitrary), and each layout was a compiled variant
            x = self._attn_out(layer, x, out.transpose(1, 2).reshape(rows, -1), depth)
        return lm.norm(x)

    def _step_body(self, rows: int, att_len: int, solver_steps: int, with_lora: bool) -> None:
        """One patch for rows [0, rows): the official loop body, batched. Reads and writes the buffers."""
        tts = self.tts
        adapter_rows = self.lora.scale_table[self.adapter[:rows]] if with_lora else None
        lm_h, res_h = self.lm_h[:rows], self.res_h[:rows]
        self.lora_context.mask = adapter_rows
        self.lora_context.slots = None  # set for the DiT's calls only
        if self.v2:
            mu = torch.cat((tts.lm_to_dit_proj(lm_h), tts.res_to_dit_proj(res_h)), dim=-1)
        else:
            mu = tts.lm_to_dit_proj(lm_h) + tts.res_to_dit_proj(res_h)
        # --- UnifiedCFM.solve_euler with per-row times, cfg and step counts
        # a copy: an inference tensor like every later x (a view of the buffer is not one, and each kind
        # of tensor was its own compiled variant of the Euler update)
        x = self.noise[:rows].clone()  # (B, D, P)
        cond = self.cond[:rows].transpose(1, 2).contiguous()
        cond_in = torch.cat((cond, cond))
        mu_in = torch.cat((mu, torch.zeros_like(mu)))
        cfg = self.cfg[:rows]
        self.lora_context.mask = None if adapter_rows is None else torch.cat((adapter_rows, adapter_rows))
        if adapter_rows is not None and self.lora_segments:  # each CFG-doubled row is one DiT sequence
            self.lora_context.slots = torch.cat((self.adapter[:rows], self.adapter[:rows]))
        for k in range(solver_steps):
            t, dt = self.t_tab[:rows, k], self.dt_tab[:rows, k]
            if k == 0:
                # the official first step always uses dphi = 0 (zero_init_steps >= 1): x stays as it is
                continue
            t_in = torch.cat((t, t))
            dt_in = torch.cat((dt, dt)) if self.mean_mode else torch.zeros_like(t_in)
            out = self.estimator(torch.cat((x, x)), mu_in, t_in, cond_in, dt_in)
            x = self._euler(out, x, cfg, dt, self.zero_tab[:rows, k])
        self.lora_context.slots = None
        pred = x.transpose(1, 2)  # (B, P, D)
        # --- feedback, stop decision and both LM steps
        self.lora_context.mask = adapter_rows
        row_ids = torch.arange(rows, device=x.device)
        self.latents[row_ids, self.patch_idx[:rows]] = pred
        self.out_feat[:rows] = pred
        emb = tts.enc_to_lm_proj(self.feat_encoder(pred.unsqueeze(1)))[:, 0, :]  # (B, H)
        self.out_stop[:rows] = tts.stop_head(tts.stop_actn(tts.stop_proj(lm_h))).argmax(dim=-1)
        pos = self.pos[:rows]
        new_lm = tts.fsq_layer(self._lm_step(tts.base_lm, self.kv_base, emb, pos, att_len))
        if self.v2:
            res_in = tts.fusion_concat_proj(torch.cat((new_lm, emb), dim=-1))
        else:
            res_in = new_lm + emb
        new_res = self._lm_step(tts.residual_lm, self.kv_res, res_in, pos, att_len)
        self.lm_h[:rows] = new_lm
        self.res_h[:rows] = new_res
        self.cond[:rows] = pred
        self.pos[:rows] = torch.clamp(pos + 1, max=self.slot_len - 1)
        self.patch_idx[:rows] = torch.clamp(self.patch_idx[:rows] + 1, max=self.slot_len - 1)
        self.lora_context.mask = None

    def _tracing(self) -> contextlib.AbstractContextManager[Any]:
        """Around every call that may trace a compiled region: each dynamic dimension gets a symbol of its
        own. With dynamo's default "duck" shapes, sizes that happen to be equal share a symbol, e.g. the
        CFG-doubled batch (2 x 2 rows) and the patch (4), and that coincidence became a guard and one more
        compiled variant (or a recompile in the middle of serving) when the sizes part."""
        if not self.compiled:
            return contextlib.nullcontext()
        from torch.fx.experimental import _config as shapes_config

        return shapes_config.patch(use_duck_shape=False)

    def _compiled_rows(self, rows: int) -> int:
        """Batch rows a compiled region is called with: at least 2 where the buffers allow. dynamic=True
        still compiles a separate variant for a dimension of size 1 (one decode row, one prompt), and
        each variant costs ~1.5 s of a first start (H100 host); an extra row costs the step ~nothing at
        one row, where kernel launches, not the work in them, set its time."""
        return min(max(rows, 2), self.max_rows) if self.compiled else rows

    def noise_staging(self) -> torch.Tensor:
        """(max_rows, D, P) float32 host buffer the engine fills with each step's noise (page-locked on a
        GPU, so `upload_noise` is one asynchronous copy); rows past the active ones keep stale values,
        which only idle slots read."""
        if self._noise_host is None:
            self._noise_host = torch.zeros(self.max_rows, self.feat_dim, self.patch, dtype=torch.float32,
                                           pin_memory=self.device.type == "cuda")
        return self._noise_host

    def upload_noise(self, rows: int) -> None:
        """This step's noise for rows [0, rows), from `noise_staging()`. The cast to the model dtype happens
        on the device, rounding to nearest even like the host cast. The staging buffer may be rewritten
        once the step's results are read back (that read waits for the copy)."""
        self.noise[:rows].copy_(self.noise_staging()[:rows], non_blocking=True)

    @torch.inference_mode()
    def step(self, rows: int, att_positions: int, solver_steps: int, with_lora: bool) -> None:
        """Run one decode step for rows [0, rows) (caller filled `noise`); results in out_feat/out_stop.
        Compiled, rows [rows, 2) may run too: idle slots, whose results nobody reads."""
        if not self.use_graphs:
            with self._tracing():
                self._step_body(self._compiled_rows(rows), attention_bucket(att_positions, self.slot_len),
                                solver_steps, with_lora)
            return
        key = self._graph_key(rows, att_positions, solver_steps, with_lora)
        graph = self._graphs.get(key)
        if graph is None:
            self.capture(rows, att_positions, solver_steps, with_lora)
            graph = self._graphs[key]
        graph.replay()

    def _graph_key(self, rows: int, att_positions: int, solver_steps: int, with_lora: bool) -> tuple:
        return (self._compiled_rows(rows), attention_bucket(att_positions, self.slot_len), solver_steps, with_lora,
                self.lora.version)

    @torch.inference_mode()
    def capture(self, rows: int, att_positions: int, solver_steps: int, with_lora: bool) -> bool:
        """Capture the decode step of this shape unless it is captured already; True when it captured."""
        key = self._graph_key(rows, att_positions, solver_steps, with_lora)
        if not self.use_graphs or key in self._graphs:
            return False
        self._resize_schedule(solver_steps)
        with self._tracing():
            self._graphs[key] = self._capture(*key[:4])
        return True

    def _capture(self, rows: int, att_len: int, solver_steps: int, with_lora: bool) -> Any:
        """Capture one decode step. The warm-up and capture runs change the row buffers, so they are
        saved and restored around it: capturing never disturbs rows in flight."""
        saved = {name: getattr(self, name)[:rows].clone() for name in self._mutable}
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph, _ = _capture_graph(lambda: self._step_body(rows, att_len, solver_steps, with_lora), self._graph_pool)
        # The warm-up also wrote one KV position per row, at `pos` (restored above): beyond each row's valid
        # length, and the next real step rewrites it, so the KV cache needs no undoing.
        for name, value in saved.items():
            getattr(self, name)[:rows].copy_(value)
        self.graph_captures += 1
        return graph

    _mutable = ("lm_h", "res_h", "cond", "pos", "patch_idx", "latents", "out_feat", "out_stop")

    def warm_up(self, batch_sizes: list[int], att_lens: list[int], solver_steps: int) -> None:
        """Capture these graphs now (start-up), so first requests do not pay for capture."""
        if not self.use_graphs:
            return
        for rows in batch_sizes:
            for att_len in att_lens:
                self.capture(rows, att_len, solver_steps, with_lora=False)
        torch.cuda.synchronize()

    def drop_graphs(self) -> None:
        """Forget every captured step (buffers moved). The memory pool goes with them: capturing into a
        pool whose graphs were all freed trips an allocator assertion, so the next capture starts a new one."""
        self._graphs.clear()
        self._graph_pool = None
        self._prefill_graphs.clear()
        self._prefill_pool = None
