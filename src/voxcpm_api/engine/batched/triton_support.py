"""Where our Triton kernels (lora_kernels, attention_kernels, vae_kernels) run instead of the torch code."""

from __future__ import annotations

import os

import torch


def triton_serves(x: torch.Tensor) -> bool:
    """True for a GPU tensor, and under Triton's CPU interpreter (TRITON_INTERPRET=1: the tests run the very
    kernels on the CPU that way); everywhere else the callers take their torch form."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
