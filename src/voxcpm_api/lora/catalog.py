"""Find LoRA adapters under --lora-dir and check them against the base model, without torch.

An adapter is any directory below the LoRA root holding `lora_weights.safetensors` (or the legacy
`lora_weights.ckpt`), named by its path relative to the root with `/` separators, exactly as the
official trainer lays them out (`<run>/checkpoints/step_0000200`). `lora_config.json` beside the
weights gives rank, alpha and the target set; without it the official package's defaults apply
(r 8, alpha 16, LM + DiT, q/k/v/o), which is what `VoxCPM(lora_weights_path=...)` 2.0.3 does.

Validation reads only the safetensors JSON header, so any worker process can refuse a bad
adapter with a 4xx before a task is queued. `.ckpt` files are checked by the engine when loaded.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdapterMismatch, Forbidden, InvalidInput, LoRANotFound

SAFETENSORS_NAME = "lora_weights.safetensors"
CKPT_NAME = "lora_weights.ckpt"
CONFIG_NAME = "lora_config.json"
_MAX_HEADER_BYTES = 64 * 1024 * 1024
_DEFAULT_QKVO = ("q_proj", "v_proj", "k_proj", "o_proj")
_DEFAULT_PROJ = ("enc_to_lm_proj", "lm_to_dit_proj", "res_to_dit_proj")
BASE_MODEL_NAMES = frozenset({"", "none", "null", "base"})
_MAX_RESOLVED = 1024  # parsed adapters kept by a catalog (names, not weights: a few KB each)


@dataclass(frozen=True, slots=True)
class LoRATargets:
    """Which nn.Linear modules a LoRA config wraps (mirrors the official LoRAConfig fields)."""

    enable_lm: bool = True
    enable_dit: bool = True
    enable_proj: bool = False
    target_modules_lm: tuple[str, ...] = _DEFAULT_QKVO
    target_modules_dit: tuple[str, ...] = _DEFAULT_QKVO
    target_proj_modules: tuple[str, ...] = _DEFAULT_PROJ

    def covers(self, module_path: str) -> bool:
        short = module_path.rsplit(".", 1)[-1]
        if self.enable_lm and module_path.startswith(("base_lm.", "residual_lm.")):
            if short in self.target_modules_lm:
                return True
        if self.enable_dit and module_path.startswith("feat_decoder.estimator."):
            if short in self.target_modules_dit:
                return True
        return self.enable_proj and module_path in self.target_proj_modules


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """A resolved adapter on disk. `fingerprint` changes when the weights file is rewritten."""

    name: str
    directory: Path
    weights_file: Path
    rank: int
    alpha: float
    targets: LoRATargets
    fingerprint: tuple[int, int]  # (mtime_ns, size) of the weights file
    module_shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    # module path -> (lora_A shape (r, in), lora_B shape (out, r)); empty for .ckpt until loaded

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank > 0 else 0.0


def adapter_key_str(spec: AdapterSpec) -> str:
    """One adapter version as a string: the batched engines report their GPU-resident adapters by it
    (`EngineLoad.resident_adapters`) and engine/pool.py places requests by it. A rewritten weights file
    (new fingerprint) or a changed lora_config.json is another key."""
    return f"{spec.directory}|{spec.weights_file.name}|{tuple(spec.fingerprint)}|{float(spec.alpha)}|{spec.targets}"


def is_base_model_name(name: str | None) -> bool:
    return name is None or name.strip().lower() in BASE_MODEL_NAMES


class LoRACatalog:
    """Lists and resolves adapters under one root. Every call looks at the directory again; a resolved
    adapter is parsed once and reused while its weights file and lora_config.json are unchanged (same
    inode, size and mtime), so a request pays a few stat calls, not a header parse (hundreds of tensors,
    tens of KB of JSON at full size)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._resolved: dict[str, tuple[tuple, AdapterSpec]] = {}  # name -> (files' stamp, spec)
        self._lock = threading.Lock()

    def list_names(self) -> list[str]:
        root = self.root.resolve()
        if not root.is_dir():
            return []
        names: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if SAFETENSORS_NAME in filenames or CKPT_NAME in filenames:
                rel = Path(dirpath).relative_to(root).as_posix()
                if rel != ".":
                    names.append(rel)
        return sorted(names)

    def resolve(self, name: str) -> AdapterSpec:
        """Name -> AdapterSpec. Refuses traversal (403) and unknown names (404)."""
        directory = self._safe_dir(name)
        root = self.root.resolve()
        for file_name in (SAFETENSORS_NAME, CKPT_NAME, CONFIG_NAME):  # a symlink out: refused, target or not
            if not _resolves_inside(directory / file_name, root):
                raise Forbidden(f"LoRA '{name}': {file_name} points outside the LoRA directory", field="lora_name")
        weights = directory / SAFETENSORS_NAME
        if not weights.is_file():
            weights = directory / CKPT_NAME
        if not weights.is_file():
            raise LoRANotFound(f"LoRA '{name}' not found under the LoRA directory; see GET /loras", field="lora_name")
        stamp = (directory, _file_stamp(weights), _file_stamp(directory / CONFIG_NAME))
        with self._lock:
            known = self._resolved.get(name)
        if known is not None and known[0] == stamp:
            return known[1]
        spec = self._parse(name, directory, weights)
        with self._lock:
            if len(self._resolved) >= _MAX_RESOLVED:
                self._resolved.clear()
            self._resolved[name] = (stamp, spec)
        return spec

    def _parse(self, name: str, directory: Path, weights: Path) -> AdapterSpec:
        rank_from_cfg, alpha, targets = _read_config(directory / CONFIG_NAME, name)
        shapes = read_safetensors_lora_shapes(weights, name) if weights.suffix == ".safetensors" else {}
        rank = _rank_of(shapes, name) if shapes else rank_from_cfg
        if rank_from_cfg is not None and shapes and rank != rank_from_cfg:
            raise AdapterMismatch(
                f"LoRA '{name}': lora_config.json says r={rank_from_cfg} but the weights have rank {rank}",
                field="lora_name",
            )
        stat = weights.stat()
        return AdapterSpec(
            name=name,
            directory=directory,
            weights_file=weights,
            rank=int(rank if rank is not None else 8),
            alpha=alpha,
            targets=targets,
            fingerprint=(stat.st_mtime_ns, stat.st_size),
            module_shapes=shapes,
        )

    def names_of_keys(self, keys: Iterable[str]) -> list[str]:
        """The adapter names of `adapter_key_str` keys (their directory under the root), sorted; keys of
        adapters outside the root (none in practice) are left out. The inverse of the key's first field,
        kept beside the format."""
        root = f"{self.root.resolve()}{os.sep}"
        names = set()
        for key in keys:
            if not key.startswith(root):
                continue
            rest = key[len(root):]
            for weights in (SAFETENSORS_NAME, CKPT_NAME):
                end = rest.find(f"|{weights}|")
                if end > 0:
                    names.add(Path(rest[:end]).as_posix())
                    break
        return sorted(names)

    def _safe_dir(self, name: str) -> Path:
        if not isinstance(name, str) or not name.strip():
            raise InvalidInput("lora_name must be a non-empty string", field="lora_name")
        if "\\" in name or "\x00" in name or name.startswith("/") or ".." in Path(name).parts:
            raise Forbidden(f"lora_name '{name}' must be a relative name under the LoRA directory", field="lora_name")
        root = self.root.resolve()
        try:
            candidate = (root / name).resolve()
            inside = candidate == root or root in candidate.parents
            found = inside and candidate.is_dir()
        except (OSError, RuntimeError):  # a name too long for the filesystem, a symlink loop: nothing there
            inside, found = True, False
        if not inside:
            raise Forbidden(f"lora_name '{name}' points outside the LoRA directory", field="lora_name")
        if not found:
            raise LoRANotFound(f"LoRA '{name}' not found; see GET /loras", field="lora_name")
        return candidate


def _resolves_inside(path: Path, root: Path) -> bool:
    """False for a path (present or not) whose symlinks lead out of root."""
    try:
        return root in path.resolve().parents
    except (OSError, RuntimeError):  # a symlink loop: not followed anywhere
        return True


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime_ns) of a file, None when absent: a rewrite or a replacement changes it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def check_adapter_fits(spec: AdapterSpec, linear_shapes: Mapping[str, tuple[int, int]]) -> None:
    """Raise AdapterMismatch naming the first module whose keys or shapes do not fit the model."""
    for module, (a_shape, b_shape) in sorted(spec.module_shapes.items()):
        if module not in linear_shapes:
            raise AdapterMismatch(
                f"LoRA '{spec.name}' has weights for '{module}', which is not a linear layer of the loaded model",
                field="lora_name",
            )
        if not spec.targets.covers(module):
            raise AdapterMismatch(
                f"LoRA '{spec.name}' has weights for '{module}', which its lora_config.json does not target",
                field="lora_name",
            )
        out_features, in_features = linear_shapes[module]
        if tuple(a_shape) != (spec.rank, in_features) or tuple(b_shape) != (out_features, spec.rank):
            raise AdapterMismatch(
                f"LoRA '{spec.name}' does not fit '{module}': lora_A {list(a_shape)} / lora_B {list(b_shape)} "
                f"vs expected [{spec.rank}, {in_features}] / [{out_features}, {spec.rank}]",
                field="lora_name",
            )


def read_safetensors_lora_shapes(path: Path, name: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Parse the safetensors header (8-byte length + JSON) into module -> (A shape, B shape)."""
    header = read_safetensors_header(path, what=f"LoRA '{name}'")
    a_shapes: dict[str, tuple[int, ...]] = {}
    b_shapes: dict[str, tuple[int, ...]] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        shape = tuple(int(d) for d in meta.get("shape", ()))
        if key.endswith(".lora_A"):
            a_shapes[key[: -len(".lora_A")]] = shape
        elif key.endswith(".lora_B"):
            b_shapes[key[: -len(".lora_B")]] = shape
        else:
            raise AdapterMismatch(
                f"LoRA '{name}' contains '{key}', which is not a lora_A/lora_B tensor", field="lora_name"
            )
    unpaired = sorted(set(a_shapes) ^ set(b_shapes))
    if unpaired:
        raise AdapterMismatch(f"LoRA '{name}': '{unpaired[0]}' lacks its lora_A/lora_B partner", field="lora_name")
    if not a_shapes:
        raise AdapterMismatch(f"LoRA '{name}' holds no LoRA tensors", field="lora_name")
    return {m: (a_shapes[m], b_shapes[m]) for m in a_shapes}


def read_safetensors_header(path: Path, *, what: str) -> dict[str, dict]:
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length <= 0 or length > _MAX_HEADER_BYTES:
                raise ValueError("implausible header length")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise AdapterMismatch(f"{what}: {path.name} is not a readable safetensors file ({exc})",
                              field="lora_name") from exc
    if not isinstance(header, dict):
        raise AdapterMismatch(f"{what}: {path.name} has a malformed header", field="lora_name")
    return header


def _rank_of(shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]], name: str) -> int:
    ranks = {a[0] for a, _ in shapes.values() if len(a) == 2}
    if len(ranks) != 1 or any(len(a) != 2 or len(b) != 2 for a, b in shapes.values()):
        raise AdapterMismatch(f"LoRA '{name}' mixes ranks {sorted(ranks)} or has non-matrix tensors", field="lora_name")
    return ranks.pop()


def _read_config(path: Path, name: str) -> tuple[int | None, float, LoRATargets]:
    if not path.is_file():
        return None, 16.0, LoRATargets()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        cfg = data["lora_config"] if isinstance(data, dict) and "lora_config" in data else data
        if not isinstance(cfg, dict):
            raise ValueError("lora_config must be an object")
        defaults = LoRATargets(enable_lm=False, enable_dit=False)
        targets = LoRATargets(
            enable_lm=bool(cfg.get("enable_lm", defaults.enable_lm)),
            enable_dit=bool(cfg.get("enable_dit", defaults.enable_dit)),
            enable_proj=bool(cfg.get("enable_proj", defaults.enable_proj)),
            target_modules_lm=tuple(cfg.get("target_modules_lm", _DEFAULT_QKVO)),
            target_modules_dit=tuple(cfg.get("target_modules_dit", _DEFAULT_QKVO)),
            target_proj_modules=tuple(cfg.get("target_proj_modules", _DEFAULT_PROJ)),
        )
        rank = int(cfg.get("r", 8))
        alpha = float(cfg.get("alpha", 16))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise AdapterMismatch(f"LoRA '{name}': unreadable lora_config.json ({exc})", field="lora_name") from exc
    if rank <= 0 or alpha <= 0:
        raise AdapterMismatch(f"LoRA '{name}': r and alpha must be positive", field="lora_name")
    return rank, alpha, targets
