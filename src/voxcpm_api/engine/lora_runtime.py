"""Per-request LoRA switching on top of an official VoxCPM model, without reloading anything.

The official package fixes rank, alpha and the target set when the model is built and holds one
adapter at a time. Here every nn.Linear that some adapter targets is replaced (lazily, the first
time an adapter needs it) by `SwitchableLinear`, which keeps the very same weight/bias Parameter
objects and adds the low-rank term only while an adapter is active:

    out = F.linear(x, W, b) + F.linear(F.linear(x, A), B) * scaling

i.e. the arithmetic of the official `LoRALinear` (dropout is the identity at inference), so
float32 results match the official package bit for bit. Adapters of any rank and target set live
side by side in a bounded LRU of loaded tensors; activating one is a pointer swap on the wrapper
modules, deactivating sets the pointers to None. An adapter is fully validated (keys, shapes,
config targets, finiteness) before any wrapper is touched, so a bad one is never half-applied.

Single-threaded by design (the engine's worker thread owns the model).
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterMismatch
from ..lora.catalog import CONFIG_NAME, AdapterSpec, check_adapter_fits

EXCLUDED_PREFIXES = ("audio_vae.",)


class AdoptedLinear(nn.Module):
    """A stand-in for an nn.Linear that keeps the original module's very Parameter objects (same
    state_dict keys, no copy); subclasses add their LoRA term in forward()."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        if base.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = base.bias


class SwitchableLinear(AdoptedLinear):
    """An nn.Linear stand-in whose LoRA term can be swapped per request.

    `weight` and `bias` are the original module's Parameter objects (same state_dict keys, no
    copy). `active` is either None (plain linear) or a tuple (A [r, in], B [out, r], scaling
    0-dim tensor), all already in the weight's dtype and device.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base)
        self.active: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)
        active = self.active
        if active is None:
            return result
        lora_a, lora_b, scaling = active
        lora_out = F.linear(F.linear(x, lora_a), lora_b)
        return result + lora_out * scaling

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, lora={'on' if self.active is not None else 'off'}"
        )


@dataclass(frozen=True)
class LoadedAdapter:
    """Validated adapter tensors, ready to be pointed at by the wrappers."""

    name: str
    key: tuple
    rank: int
    scaling: float
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    load_s: float

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in self.modules.values())


def linear_shapes_of(model: nn.Module, exclude: Iterable[str] = EXCLUDED_PREFIXES) -> dict[str, tuple[int, int]]:
    """{module path: (out_features, in_features)} of every linear layer (plain, ours or official LoRA)."""
    prefixes = tuple(exclude)
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if not name or name.startswith(prefixes):
            continue
        if isinstance(module, (nn.Linear, AdoptedLinear)) or (
            type(module).__name__ == "LoRALinear" and hasattr(module, "in_features")
        ):
            shapes[name] = (int(module.out_features), int(module.in_features))
    return shapes


class LoRARuntime:
    """Owns the wrappers inside one model and an LRU of loaded adapters."""

    def __init__(self, model: nn.Module, cache_size: int = 8) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be >= 1")
        self._model = model
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple, LoadedAdapter] = OrderedDict()
        self._wrappers: dict[str, SwitchableLinear] = {}
        self._active: LoadedAdapter | None = None
        self._shapes: dict[str, tuple[int, int]] | None = None
        self.last_switch_s = 0.0  # time of the last activate() that changed the active adapter
        self.last_load_s = 0.0  # time spent reading + validating the last adapter that missed the cache
        self.loads: dict[str, int] = {}  # adapter name -> times read from disk (cache misses)
        self.evictions: dict[str, int] = {}  # adapter name -> times dropped from the LRU

    # ------------------------------------------------------------------ queries

    @property
    def active_name(self) -> str | None:
        return self._active.name if self._active is not None else None

    @property
    def cached_keys(self) -> list[tuple]:
        return list(self._cache)

    @property
    def wrapped_modules(self) -> list[str]:
        return sorted(self._wrappers)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        if self._shapes is None:
            self._shapes = linear_shapes_of(self._model)
        return dict(self._shapes)

    # ------------------------------------------------------------------ switching

    def activate(self, spec: AdapterSpec | None) -> None:
        """Make `spec` the active adapter (None = base model). Raises AdapterMismatch, changing nothing."""
        if spec is None:
            if self._active is not None:
                started = time.perf_counter()
                self._point(None)
                self.last_switch_s = time.perf_counter() - started
            return
        key = adapter_key(spec)
        if self._active is not None and self._active.key == key:
            self._cache.move_to_end(key, last=True)
            return
        loaded = self._cache.get(key)
        if loaded is None:
            loaded = self._load(spec, key)  # raises before anything is touched
            self.loads[spec.name] = self.loads.get(spec.name, 0) + 1
            self._cache[key] = loaded
            while len(self._cache) > self._cache_size:
                _, evicted = self._cache.popitem(last=False)
                self.evictions[evicted.name] = self.evictions.get(evicted.name, 0) + 1
        else:
            self._cache.move_to_end(key, last=True)
        started = time.perf_counter()
        self._wrap(loaded.modules)
        self._point(loaded)
        self.last_switch_s = time.perf_counter() - started

    def deactivate(self) -> None:
        self.activate(None)

    def _point(self, loaded: LoadedAdapter | None) -> None:
        modules = loaded.modules if loaded is not None else {}
        for path, wrapper in self._wrappers.items():
            wrapper.active = modules.get(path)
        self._active = loaded

    def _wrap(self, paths: Iterable[str]) -> None:
        for path in paths:
            if path not in self._wrappers:
                self._wrappers[path] = wrap_linear(self._model, path, SwitchableLinear, SwitchableLinear)

    # ------------------------------------------------------------------ loading + validation

    def _load(self, spec: AdapterSpec, key: tuple) -> LoadedAdapter:
        loaded = load_adapter(spec, self._model, self.linear_shapes(), key=key)
        self.last_load_s = loaded.load_s
        return loaded


def wrap_linear(model: nn.Module, path: str, kind: type[AdoptedLinear],
                make: Callable[[nn.Linear], AdoptedLinear]) -> AdoptedLinear:
    """The `kind` wrapper at `path` in `model`: the one already there, or `make(linear)` put in its place."""
    module = model.get_submodule(path)
    if isinstance(module, kind):
        return module
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    wrapper = make(module)
    setattr(parent, leaf, wrapper)
    return wrapper


def load_adapter(spec: AdapterSpec, model: nn.Module, shapes: Mapping[str, tuple[int, int]], *, key: tuple,
                 device: torch.device | str | None = None) -> LoadedAdapter:
    """Read and fully validate an adapter against `model` (keys, shapes, rank, finiteness).

    Tensors come back in the target weights' dtype, on `device` (default: the weights' device).
    Raises AdapterMismatch before anything else is touched.
    """
    started = time.perf_counter()
    if spec.module_shapes:
        check_adapter_fits(spec, shapes)  # header-level check, before reading any tensor
    state = _read_weights(spec)
    pairs = _pair_tensors(spec.name, state)
    module_shapes = {m: (tuple(a.shape), tuple(b.shape)) for m, (a, b) in pairs.items()}
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise AdapterMismatch(f"LoRA '{spec.name}' mixes ranks {sorted(ranks)}", field="lora_name")
    rank = ranks.pop()
    has_config = (Path(spec.directory) / CONFIG_NAME).is_file()
    if has_config and rank != spec.rank:
        raise AdapterMismatch(
            f"LoRA '{spec.name}': lora_config.json says r={spec.rank} but the weights have rank {rank}",
            field="lora_name",
        )
    checked = dataclasses.replace(spec, rank=rank, module_shapes=module_shapes)
    check_adapter_fits(checked, shapes)
    if rank <= 0:
        raise AdapterMismatch(f"LoRA '{spec.name}' has rank 0", field="lora_name")
    scaling = spec.alpha / rank
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for path, (a, b) in pairs.items():
        target = model.get_submodule(path)
        if not isinstance(target, (nn.Linear, AdoptedLinear)):
            raise AdapterMismatch(
                f"LoRA '{spec.name}' targets '{path}', which is not a plain linear layer here", field="lora_name"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterMismatch(f"LoRA '{spec.name}' has non-finite values in '{path}'", field="lora_name")
        weight = target.weight
        where = weight.device if device is None else device
        modules[path] = (
            a.to(device=where, dtype=weight.dtype).contiguous(),
            b.to(device=where, dtype=weight.dtype).contiguous(),
            # the official LoRALinear keeps alpha/r in a float32 buffer cast with the model
            torch.tensor(scaling).to(device=where, dtype=weight.dtype),
        )
    elapsed = time.perf_counter() - started
    return LoadedAdapter(name=spec.name, key=key, rank=rank, scaling=scaling, modules=modules, load_s=elapsed)


def adapter_key(spec: AdapterSpec) -> tuple:
    """LRU key: the directory and the weights file's (mtime_ns, size), plus what lora_config.json sets."""
    return (str(spec.directory), spec.weights_file.name, tuple(spec.fingerprint), float(spec.alpha), spec.targets)


def _read_weights(spec: AdapterSpec) -> dict[str, torch.Tensor]:
    path = Path(spec.weights_file)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
            state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    except Exception as exc:  # unreadable, truncated, unsafe pickle, ...
        raise AdapterMismatch(f"LoRA '{spec.name}': {path.name} cannot be read ({exc})", field="lora_name") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterMismatch(f"LoRA '{spec.name}': {path.name} is not a flat dict of tensors", field="lora_name")
    return state


def _pair_tensors(name: str, state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    a_parts: dict[str, torch.Tensor] = {}
    b_parts: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".lora_A"):
            a_parts[key[: -len(".lora_A")]] = value
        elif key.endswith(".lora_B"):
            b_parts[key[: -len(".lora_B")]] = value
        else:
            raise AdapterMismatch(f"LoRA '{name}' contains '{key}', which is not a lora_A/lora_B tensor",
                                  field="lora_name")
    unpaired = sorted(set(a_parts) ^ set(b_parts))
    if unpaired:
        raise AdapterMismatch(f"LoRA '{name}': '{unpaired[0]}' lacks its lora_A/lora_B partner", field="lora_name")
    if not a_parts:
        raise AdapterMismatch(f"LoRA '{name}' holds no LoRA tensors", field="lora_name")
    pairs = {}
    for module in sorted(a_parts):
        a, b = a_parts[module], b_parts[module]
        if a.dim() != 2 or b.dim() != 2 or not a.is_floating_point() or not b.is_floating_point():
            raise AdapterMismatch(
                f"LoRA '{name}': '{module}' tensors must be floating-point matrices", field="lora_name"
            )
        pairs[module] = (a, b)
    return pairs
