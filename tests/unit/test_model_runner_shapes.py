"""Shapes the batched model runner gives its compiled regions and prefill graphs (model_runner.py), and the
identity rotary tables that let a stack without rotary share the other stacks' compiled variant."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from voxcpm.modules.minicpm4.model import apply_rotary_pos_emb

from voxcpm_api.engine.batched import model_runner
from voxcpm_api.engine.batched.model_runner import (
    BatchedModel,
    _identity_rotary_where_missing,
    _IdentityRotary,
    _prefill_graph_shape,
)


@pytest.mark.parametrize(("rows", "longest", "want"), [
    (1, 1, (1, 32)), (1, 17, (1, 32)), (1, 32, (1, 32)), (1, 33, (1, 64)), (3, 100, (4, 128)),
    (8, 256, (8, 256)), (1, 2048, (1, 2048)), (9, 10, (16, 32)), (33, 20, (64, 32)), (16, 128, (16, 128)),
])
def test_prefills_pad_to_power_of_two_buckets(rows: int, longest: int, want: tuple[int, int]) -> None:
    batch, width = _prefill_graph_shape(rows, longest)
    assert (batch, width) == want
    assert batch >= rows and width >= longest


@pytest.mark.parametrize(("rows", "longest"), [(65, 10), (8, 300), (1, 2049), (2, 1025), (16, 129), (64, 33)])
def test_large_prefills_run_eagerly(rows: int, longest: int) -> None:
    assert _prefill_graph_shape(rows, longest) is None  # no graph per rare large shape: memory, capture time
    assert rows > model_runner.PREFILL_GRAPH_ROWS or rows * longest > model_runner.PREFILL_GRAPH_TOKENS // 2


@pytest.mark.parametrize(("compiled", "max_rows", "rows", "want"), [
    (True, 64, 1, 2), (True, 64, 2, 2), (True, 64, 12, 12), (True, 1, 1, 1), (False, 64, 1, 1),
])
def test_compiled_regions_see_at_least_two_rows(compiled: bool, max_rows: int, rows: int, want: int) -> None:
    model = SimpleNamespace(compiled=compiled, max_rows=max_rows)
    assert BatchedModel._compiled_rows(model, rows) == want  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_rotary_leaves_queries_and_keys_bit_identical(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    q = torch.randn(5, 4, 1, 16, dtype=dtype) * 30  # (B, heads, 1, head_dim), large values included
    k = torch.randn(5, 2, 1, 16, dtype=dtype)
    cos, sin = _IdentityRotary(16, torch.float32)(torch.arange(5))
    assert cos.shape == sin.shape == (5, 16)
    q2, k2 = apply_rotary_pos_emb(q, k, cos.view(5, 1, 1, 16), sin.view(5, 1, 1, 16))
    assert torch.equal(q2, q) and torch.equal(k2, k)


def test_identity_rotary_goes_only_where_a_stack_has_none() -> None:
    real = SimpleNamespace(cos_cached=torch.zeros(8, 16, dtype=torch.float32))
    config = SimpleNamespace(kv_channels=None, hidden_size=64, num_attention_heads=4)
    with_rope = SimpleNamespace(rope_emb=real, config=config)
    without = SimpleNamespace(rope_emb=None, config=config)
    _identity_rotary_where_missing((with_rope, without))
    assert with_rope.rope_emb is real
    assert isinstance(without.rope_emb, _IdentityRotary) and without.rope_emb.head_dim == 16
    alone = SimpleNamespace(rope_emb=None, config=config)
    _identity_rotary_where_missing((alone,))
    assert alone.rope_emb is None  # no stack with rotary: nothing to share a variant with
