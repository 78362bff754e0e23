"""A fused AudioVAE residual unit for the GPU (Triton), used by the batched engine's decodes.

Profiled on an H100 (2026-11-25, 64 rows x 5 s of VoxCPM1.5 audio, 400 ms per decode), the official
decoder spends most of its time outside matrix work: the TorchScript snake activation (26 %), PyTorch's
generic depthwise-convolution kernel (23 %), and copies made by `F.pad` in every causal convolution.
Each `CausalResidualUnit` computes

    s1 = snake(x, a1);  h = depthwise_causal_conv(s1, w, b, dilation);  s2 = snake(h, a2)
    out = x + pointwise_conv(s2)

`FusedResidualUnit` does the first three in two kernels (snake; taps + bias + snake): the causal left
padding becomes a mask (the official pads snake(x) with zeros), the weight-normed weights are computed
once (they are constants in inference), and the pointwise convolution runs as the same `conv1d` the
official module ends in. The arithmetic is the official one in float32, up to the order of the 7 taps'
additions and the sin routine (~1e-7 relative). Only the engine's own VAE is changed; off CUDA the
official code runs unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from .triton_support import triton_serves

_BLOCK_T = 1024  # time samples per program


@triton.jit
def _snake(x_ptr, out_ptr, a_ptr, length, channels, BLOCK: tl.constexpr):
    """out = snake(x, a) for one (batch, channel) row and one block of time."""
    row = tl.program_id(0)  # b * channels + c
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = t < length
    a = tl.load(a_ptr + row % channels)
    offsets = row.to(tl.int64) * length + t
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    sx = tl.sin(a * x)
    tl.store(out_ptr + offsets, x + (1.0 / (a + 1e-9)) * sx * sx, mask=inside)


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


def _effective_weight(conv: nn.Conv1d) -> torch.Tensor:
    """The weight a (possibly weight-normed) conv uses in its forward, computed the way its hook does."""
    for hook in conv._forward_pre_hooks.values():
        if type(hook).__name__ == "WeightNorm" and getattr(hook, "name", None) == "weight":
            return hook.compute_weight(conv).detach()
    return conv.weight.detach()


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
        self.register_buffer("pw_w", _effective_weight(pointwise).float().contiguous(), persistent=False)
        self.register_buffer("pw_b", pointwise.bias.detach().float().contiguous(), persistent=False)

    @staticmethod
    def fits(unit: nn.Module) -> bool:
        block = getattr(unit, "block", None)
        if not isinstance(block, nn.Sequential) or len(block) != 4:
            return False
        depthwise, pointwise = block[1], block[3]
        return (isinstance(depthwise, nn.Conv1d) and depthwise.groups == depthwise.in_channels == depthwise.out_channels
                and depthwise.bias is not None and depthwise.stride[0] == 1 and isinstance(pointwise, nn.Conv1d)
                and pointwise.kernel_size[0] == 1 and pointwise.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, T) float32
        if x.dtype != torch.float32 or x.dim() != 3 or not triton_serves(x):
            return x + self.block(x)  # the official CausalResidualUnit.forward
        x = x.contiguous()
        rows, length = x.shape[0] * x.shape[1], x.shape[2]
        s1 = torch.empty_like(x)
        s2 = torch.empty_like(x)
        grid = (rows, triton.cdiv(length, _BLOCK_T))
        # two passes, not one: fusing the first snake into the taps computed its sine 7 times per sample,
        # which made the kernel compute-bound (7.8 ms per unit on an H100 at 64 x 5 s)
        _snake[grid](x, s1, self.a1, length, x.shape[1], BLOCK=_BLOCK_T)
        _dwconv_snake[grid](s1, s2, self.w, self.b, self.a2, length, x.shape[1], self.dilation,
                            TAPS=self.taps, BLOCK=_BLOCK_T)
        y = F.conv1d(s2, self.pw_w, self.pw_b)
        return y.add_(x)


def fuse_residual_units(decoder: nn.Module) -> int:
    """Swap every depthwise `CausalResidualUnit` under `decoder` for a `FusedResidualUnit`. Returns how many."""
    swapped = 0
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "CausalResidualUnit" and FusedResidualUnit.fits(child):
                setattr(parent, name, FusedResidualUnit(child))
                swapped += 1
    return swapped

