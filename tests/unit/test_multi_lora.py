"""Per-row LoRA in one forward pass (engine/batched/multi_lora.py), against the official arithmetic.

Reference for a row of adapter s: F.linear(x, W, b) + F.linear(F.linear(x, A_s), B_s) * scaling_s
(the official LoRALinear at inference). A base row (and a row of a cleared slot) gets an added LoRA term
of exactly 0, so it must equal, bit for bit, the base columns of the layer's own wide GEMM
F.linear(x, [W; A_cat], [b; 0]); that wide GEMM may round differently from the plain F.linear(x, W, b)
(the BLAS blocks a wider matrix its own way, which depends on the CPU), so against the plain layer a base
row is held to float32's worst-case rounding bound of a dot product of that length (`assert_base_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from voxcpm_api.engine.batched.multi_lora import LoRAContext, MultiLoRALinear, SlotWeights, fuse_qkv, project_qkv

TOL = 1e-5
IN, HID, OUT = 12, 10, 7


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HID, OUT, bias=False)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(IN, HID)
        self.inner = Inner()
        self.untouched = nn.Linear(OUT, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.untouched(self.inner.proj(torch.tanh(self.lin1(x))))


@dataclass
class FakeAdapter:
    """The shape of lora_runtime.LoadedAdapter that SlotWeights reads."""

    rank: int
    scaling: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def fake_adapter(model: nn.Module, rank: int, alpha: float, targets: list[str], seed: int) -> FakeAdapter:
    gen = torch.Generator().manual_seed(seed)
    scaling = alpha / rank
    modules = {}
    for path in targets:
        layer = model.get_submodule(path)
        a = torch.randn(rank, layer.in_features, generator=gen) * 0.5
        b = torch.randn(layer.out_features, rank, generator=gen) * 0.5
        modules[path] = (a, b, torch.tensor(scaling, dtype=torch.float32))
    return FakeAdapter(rank=rank, scaling=scaling, modules=modules)


def reference_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    pair: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The official LoRALinear, for one row (or a group of rows) of one adapter."""
    out = F.linear(x, weight, bias)
    if pair is None:
        return out
    a, b, scaling = pair
    return out + F.linear(F.linear(x, a), b) * scaling


def fused_base_columns(layer: MultiLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """What the wrapper returns for a base row, bit for bit: the first `out` columns of its own wide GEMM
    F.linear(x, [W; A_cat], [b; 0]), to which it adds a LoRA term of exactly 0. Call it on the same input
    (same shape) the layer saw, so that the BLAS makes the same call."""
    return F.linear(x, layer.fused_weight, layer.fused_bias)[..., :layer.out_features]


def rounding_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Per output element, how far two float32 evaluations of F.linear(x, weight, bias) can be apart, whatever
    order they sum in (blocking, FMA, threads): each lies within gamma_n * (|x| |W|^T + |b|) of the exact
    value, n = in_features + 1 terms, gamma_n = n u / (1 - n u), u = 2^-24 (Higham, Accuracy and Stability
    of Numerical Algorithms, 2nd ed., eq. 3.5); twice that bounds their difference. Computed in float64.
    About 1.6e-6 of |x| |W|^T + |b| for IN = 12: a LoRA term, a bias or a weight off by more fails it."""
    n = weight.shape[1] + 1
    u = 2.0 ** -24
    gamma = n * u / (1 - n * u)
    magnitude = F.linear(x.double().abs(), weight.double().abs(), None if bias is None else bias.double().abs())
    return 2 * gamma * magnitude


def assert_base_rows(got: torch.Tensor, layer: MultiLoRALinear, x: torch.Tensor, rows: list[int], what: str) -> None:
    """Rows `rows` of got = layer(x) (the whole batch x, as the layer saw it) are base-model rows: bit for bit
    the wide GEMM's base columns (the added LoRA term is exactly 0), and the plain layer F.linear(x, W, b)
    up to float32 rounding (`rounding_bound`)."""
    with torch.no_grad():
        wide = fused_base_columns(layer, x)
        plain = F.linear(x, layer.weight, layer.bias)
        bound = rounding_bound(x, layer.weight, layer.bias)
    for row in rows:
        diff = (got[row] - wide[row]).abs().max().item()
        assert torch.equal(got[row], wide[row]), (
            f"{what} base row {row} is not bit-identical to the fused GEMM's base columns (max diff {diff:.3g}): "
            "the LoRA term added to a base row must be exactly 0")
        err = (got[row].double() - plain[row].double()).abs()
        worst = (err - bound[row]).argmax()
        assert (err <= bound[row]).all(), (
            f"{what} base row {row} differs from the plain layer by {err.flatten()[worst].item():.3g} at flat "
            f"index {worst.item()}, beyond float32 rounding ({bound[row].flatten()[worst].item():.3g})")


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Tiny().eval()
    context = LoRAContext()
    weights = SlotWeights(model, slots=3, context=context)  # rank_cap 8
    adapters = [
        fake_adapter(model, rank=2, alpha=4.0, targets=["lin1"], seed=1),  # scaling 2
        fake_adapter(model, rank=4, alpha=2.0, targets=["lin1", "inner.proj"], seed=2),  # scaling 0.5
        fake_adapter(model, rank=8, alpha=8.0, targets=["inner.proj"], seed=3),  # scaling 1
    ]
    for slot, adapter in enumerate(adapters):
        weights.load(slot, adapter)
    return model, context, weights, adapters


def use_rows(weights: SlotWeights, context: LoRAContext, row_slots: list[int | None]) -> None:
    index = torch.tensor([weights.base_index if s is None else s for s in row_slots])
    context.mask = weights.scale_table[index]


def test_wrapping_keeps_the_parameters(setup) -> None:
    model, _, weights, _ = setup
    assert sorted(weights.wrappers) == ["inner.proj", "lin1"]
    assert isinstance(model.lin1, MultiLoRALinear) and isinstance(model.inner.proj, MultiLoRALinear)
    assert isinstance(model.untouched, nn.Linear)  # no adapter targets it
    assert model.inner.proj.bias is None
    names = {name for name, _ in model.named_parameters()}
    assert names == {"lin1.weight", "lin1.bias", "inner.proj.weight", "untouched.weight", "untouched.bias"}
    assert weights.rank_cap == 8 and weights.base_index == 3
    assert weights.scale_table.shape == (4, 24)
    assert model.lin1.lora_a.shape == (24, IN) and model.lin1.lora_b.shape == (HID, 24)


@pytest.mark.parametrize("shape", ["2d", "3d"])
def test_mixed_rows_match_the_official_layer_per_row(setup, shape) -> None:
    model, context, weights, adapters = setup
    row_slots = [0, None, 1, 2, None, 1, 0, 2]
    n = len(row_slots)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, IN, generator=gen) if shape == "2d" else torch.randn(n, 5, IN, generator=gen)
    use_rows(weights, context, row_slots)
    for path in ("lin1", "inner.proj"):
        layer = model.get_submodule(path)
        inp = x if path == "lin1" else torch.randn(*x.shape[:-1], HID, generator=gen)
        with torch.no_grad():
            got = layer(inp)
            plain = F.linear(inp, layer.weight, layer.bias)
        assert got.shape == plain.shape
        assert_base_rows(got, layer, inp, [row for row, slot in enumerate(row_slots) if slot is None], path)
        for row, slot in enumerate(row_slots):
            if slot is None:
                continue
            pair = adapters[slot].modules.get(path)
            want = reference_layer(inp[row], layer.weight, layer.bias, pair)
            assert (got[row] - want).abs().max().item() < TOL, (path, row, slot)
            if pair is not None:  # the adapter really changes this row
                assert (got[row] - plain[row]).abs().max().item() > 1e-3
            else:  # an adapter that does not target the layer leaves it as it is
                assert (got[row] - plain[row]).abs().max().item() < TOL


def test_whole_model_forward_matches_per_row_reference(setup) -> None:
    model, context, weights, adapters = setup
    row_slots = [2, 1, None, 0]
    x = torch.randn(len(row_slots), 3, IN, generator=torch.Generator().manual_seed(3))
    use_rows(weights, context, row_slots)
    with torch.no_grad():
        got = model(x)
        # a base row is the model run on the wide GEMMs' base columns, bit for bit (same shapes as in the model)
        h = fused_base_columns(model.lin1, x).contiguous()
        wide = model.untouched(fused_base_columns(model.inner.proj, torch.tanh(h)).contiguous())
    context.mask = None
    with torch.no_grad():
        plain = model(x)
        for row, slot in enumerate(row_slots):
            mods = adapters[slot].modules if slot is not None else {}
            h = reference_layer(x[row], model.lin1.weight, model.lin1.bias, mods.get("lin1"))
            h = reference_layer(torch.tanh(h), model.inner.proj.weight, None, mods.get("inner.proj"))
            want = model.untouched(h)
            assert (got[row] - want).abs().max().item() < TOL, row
            if slot is None:
                assert torch.equal(got[row], wide[row]), f"base row {row} is not the wide GEMMs' base columns"
                assert (got[row] - plain[row]).abs().max().item() < TOL, f"base row {row} is not the plain model"


def test_no_mask_is_the_plain_layer(setup) -> None:
    model, context, _, _ = setup
    x = torch.randn(4, IN)
    context.mask = None
    with torch.no_grad():
        assert torch.equal(model.lin1(x), F.linear(x, model.lin1.weight, model.lin1.bias))


def test_all_base_mask_adds_exactly_nothing(setup) -> None:
    model, context, weights, _ = setup
    x = torch.randn(6, 4, IN)
    use_rows(weights, context, [None] * 6)
    with torch.no_grad():
        got = model.lin1(x)
    assert_base_rows(got, model.lin1, x, list(range(6)), "lin1")


def test_one_mask_row_broadcasts_over_all_rows(setup) -> None:
    model, context, weights, adapters = setup
    x = torch.randn(5, 3, IN)
    use_rows(weights, context, [1])
    with torch.no_grad():
        got = model.lin1(x)
    want = reference_layer(x, model.lin1.weight, model.lin1.bias, adapters[1].modules["lin1"])
    assert (got - want).abs().max().item() < TOL


def test_repeat_interleave_when_rows_are_flattened_with_time(setup) -> None:
    """The local encoder sees (B * T, P, H) while the mask has B rows: row b covers x rows [b*T, (b+1)*T)."""
    model, context, weights, adapters = setup
    row_slots = [1, None, 0]
    steps = 4
    x = torch.randn(len(row_slots) * steps, 2, IN)
    use_rows(weights, context, row_slots)
    with torch.no_grad():
        got = model.lin1(x)
    assert_base_rows(got, model.lin1, x, [i for i in range(x.shape[0]) if row_slots[i // steps] is None], "lin1")
    for i in range(x.shape[0]):
        slot = row_slots[i // steps]
        if slot is not None:
            want = reference_layer(x[i], model.lin1.weight, model.lin1.bias, adapters[slot].modules["lin1"])
            assert (got[i] - want).abs().max().item() < TOL, i
    # 2-D flattened input too
    x2 = torch.randn(len(row_slots) * steps, IN)
    with torch.no_grad():
        got2 = model.lin1(x2)
    for i in range(x2.shape[0]):
        slot = row_slots[i // steps]
        pair = adapters[slot].modules["lin1"] if slot is not None else None
        assert (got2[i] - reference_layer(x2[i], model.lin1.weight, model.lin1.bias, pair)).abs().max() < TOL


def test_rank_growth_reallocates_and_keeps_earlier_slots() -> None:
    torch.manual_seed(1)
    model = Tiny().eval()
    context = LoRAContext()
    weights = SlotWeights(model, slots=3, context=context, rank_cap=4)
    small = fake_adapter(model, rank=2, alpha=3.0, targets=["lin1"], seed=11)
    mid = fake_adapter(model, rank=4, alpha=4.0, targets=["lin1", "inner.proj"], seed=12)
    weights.load(0, small)
    weights.load(1, mid)
    version = weights.version
    old_a = model.lin1.lora_a
    big = fake_adapter(model, rank=16, alpha=8.0, targets=["lin1"], seed=13)
    weights.load(2, big)
    assert weights.rank_cap == 16 and weights.version == version + 1
    assert model.lin1.lora_a is not old_a and model.lin1.lora_a.shape == (48, IN)
    assert weights.scale_table.shape == (4, 48)
    # earlier slots' contents were rewritten into the new layout
    cap = weights.rank_cap
    assert torch.equal(model.lin1.lora_a[0:2], small.modules["lin1"][0])
    assert torch.equal(model.lin1.lora_a[2:cap], torch.zeros(cap - 2, IN))
    assert torch.equal(model.lin1.lora_b[:, cap:cap + 4], mid.modules["lin1"][1])
    assert torch.equal(model.inner.proj.lora_a[cap:cap + 4], mid.modules["inner.proj"][0])
    assert torch.equal(model.inner.proj.lora_a[2 * cap:], torch.zeros(cap, HID))  # big does not target it
    assert weights.scale_table[0, :cap].eq(1.5).all() and weights.scale_table[1, cap:2 * cap].eq(1.0).all()
    assert weights.scale_table[3].eq(0).all()
    adapters = {0: small, 1: mid, 2: big}
    x = torch.randn(4, IN)
    use_rows(weights, context, [0, 1, 2, None])
    with torch.no_grad():
        got = model.lin1(x)
    for row, slot in enumerate([0, 1, 2, None]):
        pair = adapters[slot].modules["lin1"] if slot is not None else None
        assert (got[row] - reference_layer(x[row], model.lin1.weight, model.lin1.bias, pair)).abs().max() < TOL

    # a newly targeted layer re-allocates too; a load that fits changes nothing but the slot
    fresh = fake_adapter(model, rank=2, alpha=2.0, targets=["untouched"], seed=14)
    weights.load(0, fresh)
    assert weights.version == version + 2 and isinstance(model.untouched, MultiLoRALinear)
    assert torch.equal(model.lin1.lora_a[0:cap], torch.zeros(cap, IN))  # slot 0 now holds `fresh` only
    assert torch.equal(model.lin1.lora_b[:, cap:cap + 4], mid.modules["lin1"][1])
    weights.load(0, small)
    assert weights.version == version + 2


def test_clear_zeroes_a_slot(setup) -> None:
    model, context, weights, adapters = setup
    cap = weights.rank_cap
    weights.clear(1)
    for wrapper in weights.wrappers.values():
        assert wrapper.lora_a[cap:2 * cap].eq(0).all() and wrapper.lora_b[:, cap:2 * cap].eq(0).all()
    assert weights.scale_table[1].eq(0).all()
    assert weights.scale_table[0, :cap].eq(2.0).all()  # neighbours untouched
    x = torch.randn(3, IN)
    use_rows(weights, context, [1, 0, None])
    with torch.no_grad():
        got = model.lin1(x)
    assert_base_rows(got, model.lin1, x, [0, 2], "lin1")  # a cleared slot (row 0) acts as the base model
    want = reference_layer(x[1], model.lin1.weight, model.lin1.bias, adapters[0].modules["lin1"])
    assert (got[1] - want).abs().max().item() < TOL
    # a cleared slot is not brought back by a later re-allocation
    weights.load(2, fake_adapter(model, rank=32, alpha=1.0, targets=["lin1"], seed=9))
    cap = weights.rank_cap
    assert model.lin1.lora_a[cap:2 * cap].eq(0).all() and weights.scale_table[1].eq(0).all()
    assert torch.equal(model.lin1.lora_a[0:2], adapters[0].modules["lin1"][0])


def test_reloading_a_slot_replaces_its_adapter(setup) -> None:
    model, context, weights, _ = setup
    # slot 1 held a rank-4 adapter on both layers; put a rank-2 adapter on lin1 only in its place
    replacement = fake_adapter(model, rank=2, alpha=1.0, targets=["lin1"], seed=21)
    weights.load(1, replacement)
    cap = weights.rank_cap
    assert model.inner.proj.lora_a[cap:2 * cap].eq(0).all()  # no stale rows of the old adapter
    assert model.lin1.lora_a[cap + 2:2 * cap].eq(0).all()
    x = torch.randn(2, IN)
    use_rows(weights, context, [1, 1])
    with torch.no_grad():
        got = model.lin1(x)
    want = reference_layer(x, model.lin1.weight, model.lin1.bias, replacement.modules["lin1"])
    assert (got - want).abs().max().item() < TOL


# FusedQKV: an attention's q, k and v projections as one GEMM over one weight buffer


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(IN, 8)
        self.k_proj = nn.Linear(IN, 4, bias=False)
        self.v_proj = nn.Linear(IN, 4)


class Stack(nn.Module):
    """The shape fuse_qkv reads: a stack's `layers`, each with its `self_attn`."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].self_attn = Attention()


def test_fused_qkv_shares_the_weights_and_follows_the_lora_layout() -> None:
    torch.manual_seed(3)
    stack = Stack().eval()
    attn = stack.layers[0].self_attn
    plain = {name: (layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
             for name, layer in attn.named_children()}
    params = [p for p in attn.parameters()]
    context = LoRAContext()
    (group,) = fuse_qkv([stack], context)
    x = torch.randn(3, 5, IN)

    def check(rows: list[int | None], adapters: dict[int, FakeAdapter]) -> None:
        with torch.no_grad():
            q, k, v = project_qkv(attn, x)
        for name, got in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
            weight, bias = plain[name]
            assert got.shape == (3, 5, weight.shape[0])
            for row, slot in enumerate(rows):
                pair = adapters[slot].modules.get(f"layers.0.self_attn.{name}") if slot is not None else None
                want = reference_layer(x[row], weight, bias, pair)
                assert (got[row] - want).abs().max().item() < TOL, (name, row, slot)

    # no adapter yet: [W_q; W_k; W_v], the layers' Parameters (the same objects) are views of it
    assert list(attn.parameters()) == params
    assert group.weight.shape == (16, IN) and group.bias.shape == (16,)
    for layer in group.layers():
        assert layer.weight.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
    assert torch.equal(group.bias[8:12], torch.zeros(4))  # k has no bias: zeros add exactly nothing
    check([None, None, None], {})

    # an adapter on q and v only: A blocks after those two, k stays plain; a mask row per sequence
    weights = SlotWeights(stack, slots=2, context=context, rank_cap=4, qkv_groups=[group])
    qv = fake_adapter(stack, rank=4, alpha=2.0, targets=["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"],
                      seed=5)
    weights.load(0, qv)
    assert group.spans == ((0, 8, 8), (16, 4, 0), (20, 4, 8))
    assert isinstance(attn.q_proj, MultiLoRALinear) and not isinstance(attn.k_proj, MultiLoRALinear)
    for layer in group.layers():  # still one buffer, no second copy of any weight
        assert layer.weight.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
    assert attn.q_proj.lora_a.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
    assert torch.equal(attn.q_proj.lora_a[:4], qv.modules["layers.0.self_attn.q_proj"][0])
    use_rows(weights, context, [0, None, 0])
    check([0, None, 0], {0: qv})

    # all three wrapped, then a larger rank re-lays the buffer and keeps slot 0
    qkv = fake_adapter(stack, rank=8, alpha=4.0, targets=[f"layers.0.self_attn.{n}" for n in ("q_proj", "k_proj",
                                                                                              "v_proj")], seed=6)
    weights.load(1, qkv)
    assert weights.rank_cap == 8 and group.spans == ((0, 8, 16), (24, 4, 16), (44, 4, 16))
    use_rows(weights, context, [1, 0, None])
    check([1, 0, None], {0: qv, 1: qkv})
    context.mask = None  # a step with no adapter: the base columns of the same GEMM
    check([None, None, None], {})
