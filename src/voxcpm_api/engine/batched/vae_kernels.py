"""Fused AudioVAE decoder kernels for the GPU (Triton), used by the batched engine's decodes.

Profiled on an H100 (2026-11-25, 64 rows x 5 s of audio), the official decoder spends most of its
time outside matrix work, on float32 passes over tensors of up to 128 channels x 2.3 M samples: the
TorchScript snake activation, PyTorch's generic depthwise-convolution kernel, copies made by `F.pad`
in every causal convolution, and the bias and residual adds around each pointwise convolution (cuDNN
adds a convolution's bias as a separate pass). Each `CausalResidualUnit` computes

    s1 = snake(x, a1);  h = depthwise_causal_conv(s1, w, b, dilation);  s2 = snake(h, a2)
    out = x + pointwise_conv(s2, pw_w, pw_b)

`FusedResidualUnit` runs it in three kernels, each a single pass over its tensors:

* `_snake`: s1 = snake(x), reading x through its strides (the first unit of a block gets a slice of
  the transposed convolution's output, which the official unit would copy);
* `_dwconv_snake`: s2 from s1 (7 taps, bias, snake). Computing s2 inside the next kernel instead was
  measured slower (2.5-5.3 ms against 1.9-2.5 ms per unit): the taps' loads and the sine then compete
  with the matrix product for registers;
* `_unit_tail`: the pointwise product with the bias and the residual in its epilogue.

Measured per unit on an H100 (24 rows x 5 s): 13-14 ms -> 3.6-4.3 ms at 1.34 GB of input.
`FusedDecoderBlock` can also replace the snake + causal transposed convolution that open a decoder
block; it is kept only where it times faster than cuDNN (VoxCPM2's first block: 8.7 ms -> 1.8 ms).

The causal left padding becomes a mask (the official pads snake(x) with zeros) and the weight-normed
weights are computed once (constants in inference). Matrix products use TF32 tensor cores, as cuDNN
does for the official float32 convolutions (`torch.backends.cudnn.allow_tf32` is on by default); the
rest is float32 in the official order, up to the order of the taps' additions and the sin routine.
Only the engine's own VAE is changed; off CUDA the official code runs unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import nn

from .triton_support import triton_serves

_BLOCK_T = 1024  # time samples per program of the element-wise kernels
_UPSAMPLE_MIN_IN_CHANNELS = 2048  # blocks offered our head; it stays where it times faster (FusedDecoderBlock)


# Triton compiles a variant per divisibility (by 16) of each integer argument. Lengths take both classes
# (the engine's warm-up decodes build both); x's strides would multiply the variants (a block's first
# unit reads a slice of length L with row stride L + stride), so they are not specialised.
_STRIDES_ANY = ("stride_xb", "stride_xc")


@triton.jit(do_not_specialize=_STRIDES_ANY)
def _snake(x_ptr, out_ptr, a_ptr, length, channels, stride_xb, stride_xc, BLOCK: tl.constexpr):
    """out = snake(x, a) for one (batch, channel) row and one block of time; out is contiguous, x is
    read through its batch and channel strides (unit time stride)."""
    row = tl.program_id(0)  # b * channels + c
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = t < length
    c = row % channels
    a = tl.load(a_ptr + c)
    x = tl.load(x_ptr + (row // channels).to(tl.int64) * stride_xb + c.to(tl.int64) * stride_xc + t,
                mask=inside, other=0.0)
    sx = tl.sin(a * x)
    tl.store(out_ptr + row.to(tl.int64) * length + t, x + (1.0 / (a + 1e-9)) * sx * sx, mask=inside)


@triton.jit
def _dwconv_snake(s_ptr, out_ptr, w_ptr, b_ptr, a_ptr, length, channels, dilation,
                  TAPS: tl.constexpr, BLOCK: tl.constexpr):
    """out = snake(causal depthwise conv(s) + bias, a): the taps read s at t - (TAPS - 1 - k) * dilation,
    and positions before 0 are the official left padding's zeros."""
    row = tl.program_id(0)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    c = row % channels
    inside = t < length
    base = row.to(tl.int64) * length
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(TAPS):
        src = t - (TAPS - 1 - k) * dilation
        acc += tl.load(w_ptr + c * TAPS + k) * tl.load(s_ptr + base + src, mask=inside & (src >= 0), other=0.0)
    h = acc + tl.load(b_ptr + c)
    a = tl.load(a_ptr + c)
    sh = tl.sin(a * h)
    tl.store(out_ptr + base + t, h + (1.0 / (a + 1e-9)) * sh * sh, mask=inside)


@triton.jit(do_not_specialize=_STRIDES_ANY)
def _unit_tail(x_ptr, s_ptr, out_ptr, pw_ptr, pwb_ptr, length, stride_xb, stride_xc, CHANNELS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[b, m, t] = x[b, m, t] + pw_b[m] + sum_k pw_w[m, k] * s2[b, k, t] for one tile of (output
    channels m, time t): the pointwise convolution with its bias and the residual in the epilogue.
    CHANNELS is a constant: a decoder has a handful of widths."""
    tiles_t = tl.cdiv(length, BLOCK_T)
    batch = tl.program_id(0) // tiles_t
    t = (tl.program_id(0) % tiles_t) * BLOCK_T + tl.arange(0, BLOCK_T)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_in = t < length
    m_in = m < CHANNELS
    s_base = batch.to(tl.int64) * CHANNELS * length
    acc = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
    for k0 in tl.range(0, CHANNELS, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_in = k < CHANNELS
        s2 = tl.load(s_ptr + s_base + k.to(tl.int64)[:, None] * length + t[None, :],
                     mask=k_in[:, None] & t_in[None, :], other=0.0)
        pw = tl.load(pw_ptr + m[:, None] * CHANNELS + k[None, :], mask=m_in[:, None] & k_in[None, :], other=0.0)
        acc += tl.dot(pw, s2, input_precision="tf32")
    tile = m_in[:, None] & t_in[None, :]
    x = tl.load(x_ptr + batch.to(tl.int64) * stride_xb + m.to(tl.int64)[:, None] * stride_xc + t[None, :],
                mask=tile, other=0.0)
    y = acc + tl.load(pwb_ptr + m, mask=m_in, other=0.0)[:, None] + x
    tl.store(out_ptr + s_base + m.to(tl.int64)[:, None] * length + t[None, :], y, mask=tile)


@triton.jit
def _upsample(u_ptr, out_ptr, w_ptr, bias_ptr, length_in,
              C_IN: tl.constexpr, C_OUT: tl.constexpr, STRIDE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr):
    """A decoder block's causal transposed convolution (kernel 2 * STRIDE) + bias, of u = snake(x)
    (contiguous, made by `_snake`: computing the sine here would repeat it for every phase and
    output-channel tile, which made this kernel compute-bound).

    Output sample t = q * STRIDE + r takes taps r (from input q) and r + STRIDE (from input q - 1),
    so each phase r is a GEMM of w[r] (C_OUT, 2 * C_IN) with the stacked inputs [u_q; u_{q-1}]; the
    official output's trailing STRIDE samples (cut by its causal slice) are never computed. One
    program makes one phase of a (channels, input positions) tile; the phases of a tile are adjacent
    in launch order, so their interleaved stores meet in L2."""
    r = tl.program_id(0) % STRIDE
    tile = tl.program_id(0) // STRIDE
    tiles_q = tl.cdiv(length_in, BLOCK_Q)
    batch = tile // tiles_q
    q = (tile % tiles_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = m < C_OUT
    u_base = batch.to(tl.int64) * C_IN * length_in
    w_base = r * C_OUT * 2 * C_IN
    acc = tl.zeros((BLOCK_M, BLOCK_Q), dtype=tl.float32)
    for k0 in tl.range(0, C_IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_in = k < C_IN
        for j in tl.static_range(2):
            src = q - j
            u = tl.load(u_ptr + u_base + k.to(tl.int64)[:, None] * length_in + src[None, :],
                        mask=k_in[:, None] & ((src >= 0) & (src < length_in))[None, :], other=0.0)
            w = tl.load(w_ptr + w_base + m[:, None] * (2 * C_IN) + j * C_IN + k[None, :],
                        mask=m_in[:, None] & k_in[None, :], other=0.0)
            acc += tl.dot(w, u, input_precision="tf32")
    y = acc + tl.load(bias_ptr + m, mask=m_in, other=0.0)[:, None]
    length_out = length_in * STRIDE
    t = q * STRIDE + r
    out_rows = batch.to(tl.int64) * C_OUT * length_out + m.to(tl.int64)[:, None] * length_out
    tl.store(out_ptr + out_rows + t[None, :], y, mask=m_in[:, None] & (q < length_in)[None, :])


def _snaked(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """snake(x, alpha) as a new contiguous tensor; x: (B, C, T) float32 with unit time stride, any other
    strides; alpha: (C,)."""
    batch, channels, length = x.shape
    out = torch.empty(batch, channels, length, device=x.device, dtype=x.dtype)
    _snake[(batch * channels, triton.cdiv(length, _BLOCK_T))](x, out, alpha, length, channels, x.stride(0),
                                                              x.stride(1), BLOCK=_BLOCK_T)
    return out


def _effective_weight(conv: nn.Conv1d) -> torch.Tensor:
    """The weight a (possibly weight-normed) conv uses in its forward, computed the way its hook does."""
    for hook in conv._forward_pre_hooks.values():
        if type(hook).__name__ == "WeightNorm" and getattr(hook, "name", None) == "weight":
            return hook.compute_weight(conv).detach()
    return conv.weight.detach()


def _tail_tiles(channels: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_T, num_warps, num_stages) of `_unit_tail`, the best of a sweep on an H100
    (both decoders, 24 rows x 5 s): 3.6-4.3 ms per unit at 1.34 GB of input (64 and 128 channels),
    about 7 passes over it at 2.3-2.6 TB/s, against 13-14 ms for the official unit."""
    block_m = max(16, triton.next_power_of_2(min(channels, 128)))  # tl.dot needs >= 16
    return block_m, block_m if block_m <= 64 else 32, 64, 4, 3


class FusedResidualUnit(nn.Module):
    """Drop-in for an official `CausalResidualUnit` whose first convolution is depthwise."""

    def __init__(self, unit: nn.Module) -> None:
        super().__init__()
        snake1, depthwise, snake2, pointwise = unit.block
        channels = depthwise.in_channels
        self.block = unit.block  # the official layers under their own name: the VAE's state_dict keys stay
        self.taps = int(depthwise.kernel_size[0])
        self.dilation = int(depthwise.dilation[0])
        self.register_buffer("a1", snake1.alpha.detach().reshape(channels).float().contiguous(), persistent=False)
        self.register_buffer("a2", snake2.alpha.detach().reshape(channels).float().contiguous(), persistent=False)
        self.register_buffer("w", _effective_weight(depthwise).reshape(channels, self.taps).float().contiguous(),
                             persistent=False)
        self.register_buffer("b", depthwise.bias.detach().float().contiguous(), persistent=False)
        self.register_buffer("pw_w", _effective_weight(pointwise).reshape(channels, channels).float().contiguous(),
                             persistent=False)
        self.register_buffer("pw_b", pointwise.bias.detach().float().contiguous(), persistent=False)

    @staticmethod
    def fits(unit: nn.Module) -> bool:
        block = getattr(unit, "block", None)
        if not isinstance(block, nn.Sequential) or len(block) != 4:
            return False
        depthwise, pointwise = block[1], block[3]
        return (isinstance(depthwise, nn.Conv1d) and depthwise.groups == depthwise.in_channels == depthwise.out_channels
                and depthwise.bias is not None and depthwise.stride[0] == 1 and isinstance(pointwise, nn.Conv1d)
                and pointwise.kernel_size[0] == 1 and pointwise.bias is not None
                and pointwise.in_channels == pointwise.out_channels == depthwise.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, T) float32
        if x.dtype != torch.float32 or x.dim() != 3 or not triton_serves(x):
            return x + self.block(x)  # the official CausalResidualUnit.forward
        if x.stride(2) != 1:
            x = x.contiguous()
        batch, channels, length = x.shape
        s1 = _snaked(x, self.a1)
        grid = (batch * channels, triton.cdiv(length, _BLOCK_T))
        s2 = torch.empty_like(s1)
        _dwconv_snake[grid](s1, s2, self.w, self.b, self.a2, length, channels, self.dilation,
                            TAPS=self.taps, BLOCK=_BLOCK_T)
        out = s1  # s1 is dead once s2 exists: the tail writes over it
        block_m, block_k, block_t, warps, stages = _tail_tiles(channels)
        tail_grid = (batch * triton.cdiv(length, block_t), triton.cdiv(channels, block_m))
        _unit_tail[tail_grid](x, s2, out, self.pw_w, self.pw_b, length, x.stride(0), x.stride(1), CHANNELS=channels,
                              BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_T=block_t, num_warps=warps,
                              num_stages=stages)
        return out


def _upsample_tiles(c_in: int, c_out: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_Q, num_warps, num_stages) of `_upsample`."""
    block_m = max(16, triton.next_power_of_2(min(c_out, 128)))
    return block_m, 32, 64, 8 if block_m >= 128 else 4, 2


class FusedDecoderBlock:
    """Mixed into an official `CausalDecoderBlock` (its modules and state_dict keys stay): the snake
    and the causal transposed convolution that open the block run as `_snake` + `_upsample`, writing
    the trimmed output contiguously (cuDNN converts layouts, adds the bias in a separate pass and its
    causal slice is a strided view).

    Measured on an H100 at 24 rows x 5 s, which one is faster depends on cuDNN's choice for the shape:
    VoxCPM2's first block (2048 -> 1024 channels, stride 8) 8.7 ms in cuDNN against 1.8 ms here, but
    VoxCPM1.5's (stride 7) 1.0 ms against 1.6 ms, and cuDNN is 1.1-1.6x faster for the later, longer
    blocks (each phase's strided stores and the weight tiles re-read by every program cost more than
    the layout conversions they save). So `fuse_decoder` offers it from `_UPSAMPLE_MIN_IN_CHANNELS`
    input channels, and on a GPU keeps it only where it times faster than the official head."""

    up_shape: tuple[int, int, int]

    @staticmethod
    def fits(block: nn.Module, min_in_channels: int = _UPSAMPLE_MIN_IN_CHANNELS) -> bool:
        layers = getattr(block, "block", None)
        if type(block).__name__ != "CausalDecoderBlock" or not isinstance(layers, nn.Sequential) or len(layers) < 2:
            return False
        snake, conv = layers[0], layers[1]
        pad = getattr(conv, f"_{type(conv).__name__}__padding", None)
        out_pad = getattr(conv, f"_{type(conv).__name__}__output_padding", 0)
        return (type(snake).__name__ == "Snake1d" and isinstance(conv, nn.ConvTranspose1d) and pad is not None
                and conv.in_channels >= min_in_channels and conv.groups == 1 and conv.bias is not None
                and conv.kernel_size[0] == 2 * conv.stride[0] and conv.padding[0] == 0
                and conv.output_padding[0] == 0 and conv.dilation[0] == 1
                and 2 * pad - out_pad == conv.stride[0])  # the causal cut: exactly the last STRIDE samples

    @staticmethod
    def swap(block: nn.Module) -> None:
        snake, conv = block.block[0], block.block[1]
        c_in, c_out, stride = conv.in_channels, conv.out_channels, conv.stride[0]
        weight = _effective_weight(conv).float()  # (C_in, C_out, 2 * stride)
        # phase r: (C_out, 2 * C_in) = [taps r | taps r + stride] over the input channels
        phases = torch.cat([weight[:, :, :stride], weight[:, :, stride:]], dim=0)  # (2 C_in, C_out, stride)
        block.__class__ = _fused_block_class(type(block))
        block.register_buffer("up_w", phases.permute(2, 1, 0).contiguous(), persistent=False)  # (stride, C_out, 2 C_in)
        block.register_buffer("up_b", conv.bias.detach().float().contiguous(), persistent=False)
        block.register_buffer("up_a", snake.alpha.detach().reshape(c_in).float().contiguous(), persistent=False)
        block.up_shape = (c_in, c_out, stride)

    @staticmethod
    def unswap(block: nn.Module) -> None:
        """Back to the official class and forward."""
        block.__class__ = next(base for base in type(block).__mro__[1:] if not issubclass(base, FusedDecoderBlock))
        for name in ("up_w", "up_b", "up_a"):
            delattr(block, name)

    def head(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T) float32 -> (B, C_out, T * stride)
        if x.stride(2) != 1:
            x = x.contiguous()
        c_in, c_out, stride = self.up_shape
        batch, length = x.shape[0], x.shape[2]
        u = _snaked(x, self.up_a)
        y = torch.empty(batch, c_out, length * stride, device=x.device, dtype=x.dtype)
        block_m, block_k, block_q, warps, stages = _upsample_tiles(c_in, c_out)
        grid = (batch * triton.cdiv(length, block_q) * stride, triton.cdiv(c_out, block_m))
        _upsample[grid](u, y, self.up_w, self.up_b, length, C_IN=c_in, C_OUT=c_out, STRIDE=stride,
                        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_Q=block_q, num_warps=warps, num_stages=stages)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C_in, T) float32 -> (B, C_out, T * stride)
        if x.dtype != torch.float32 or x.dim() != 3 or not triton_serves(x):
            return super().forward(x)  # type: ignore[misc]  # the official CausalDecoderBlock.forward
        y = self.head(x)
        for layer in self.block[2:]:  # type: ignore[attr-defined]
            y = layer(y)
        return y


def _head_is_faster(block: nn.Module, rows: int = 8, length: int = 256) -> bool:
    """Time our head against the official one (snake + transposed convolution) on a GPU: median of 5."""
    x = torch.randn(rows, block.up_shape[0], length, device=block.up_w.device)

    def median_ms(fn: Callable[[], torch.Tensor]) -> float:
        fn()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[2]

    with torch.inference_mode():
        return median_ms(lambda: block.head(x)) < median_ms(lambda: block.block[1](block.block[0](x)))


@functools.cache
def _fused_block_class(official: type) -> type:
    """The official block class (VoxCPM1's or VoxCPM2's) with our forward in front of its own."""
    return type(f"Fused{official.__name__}", (FusedDecoderBlock, official), {})


def fuse_decoder(decoder: nn.Module, upsample_min_in_channels: int = _UPSAMPLE_MIN_IN_CHANNELS,
                 keep_faster_heads: bool = True) -> tuple[int, int]:
    """Swap every depthwise `CausalResidualUnit` under `decoder` for a `FusedResidualUnit` and give the
    `CausalDecoderBlock`s with at least `upsample_min_in_channels` input channels our fused head, on a
    GPU only where it times faster (`keep_faster_heads`). Returns (units, blocks) swapped."""
    units = blocks = 0
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "CausalResidualUnit" and FusedResidualUnit.fits(child):
                setattr(parent, name, FusedResidualUnit(child))
                units += 1
    for module in list(decoder.modules()):
        if FusedDecoderBlock.fits(module, upsample_min_in_channels):
            FusedDecoderBlock.swap(module)
            if keep_faster_heads and module.up_w.is_cuda and not _head_is_faster(module):
                FusedDecoderBlock.unswap(module)
                continue
            blocks += 1
    return units, blocks
