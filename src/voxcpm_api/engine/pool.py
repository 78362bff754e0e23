"""Several batched engines (one per device) behind one ConcurrentEngine. No torch import here.

`EnginePool` is what the runner sees when `--devices` names more than one device: its `max_rows` is
the sum of its engines' rows, and every `generate`/`generate_stream` call is placed on one engine,
in the calling thread, by

1. capacity: engines with a free row (rows placed by this pool, or running + queued as the engine
   reports, whichever is larger, below its `max_rows`); when none has one, all engines;
2. LoRA affinity: among those, the engines that hold the request's adapter in a GPU slot
   (`EngineLoad.resident_adapters`, keyed by `lora.catalog.adapter_key_str`), when any does;
3. load: the lowest occupancy / max_rows; ties go to the lowest index.

Placement and the pool's own row count change under one lock, so concurrent callers never see a
stale count. `placements` counts the calls placed on each engine (metrics, bench).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TypeVar

import numpy as np

from ..domain import EngineInfo
from ..errors import EngineFailure, VoxError
from ..lora.catalog import adapter_key_str
from .base import AudioCallback, ChunkRequest, ConcurrentEngine, EngineLoad, PatchCallback

log = logging.getLogger("voxcpm_api.pool")
T = TypeVar("T")

# Counters of BatchedEngine.stats() that add up over engines (the rest, timings, are taken at their max).
SUMMED_STATS = frozenset({"steps", "rows_stepped", "prefills", "adapter_slot_loads", "oom_recoveries",
                          "graph_captures"})
# EngineInfo fields every engine of a pool must agree on (the device is the one that differs).
_MUST_AGREE = ("model_id", "architecture", "sample_rate_hz", "patch_duration_s", "needs_ref_text")


def choose_engine(loads: Sequence[EngineLoad], placed: Sequence[int], adapter_key: str | None) -> int:
    """Index of the engine a new row goes to (rules in the module docstring). Pure; tested alone."""
    if not loads:
        raise ValueError("no engines to choose from")
    occupancy = [max(p, s.running_rows + s.queued_rows) for s, p in zip(loads, placed, strict=True)]
    candidates = [i for i, s in enumerate(loads) if occupancy[i] < s.max_rows] or list(range(len(loads)))
    if adapter_key is not None:
        holding = [i for i in candidates if adapter_key in loads[i].resident_adapters]
        if holding:
            candidates = holding
    return min(candidates, key=lambda i: (occupancy[i] / max(1, loads[i].max_rows), i))


class _MergedLoRAStats:
    """Per-adapter loads/evictions summed over the engines (what runner.engine_stats reads)."""

    def __init__(self, engines: Sequence[object]) -> None:
        self._engines = engines

    def _merged(self, attr: str) -> dict[str, int]:
        total: dict[str, int] = {}
        for engine in self._engines:
            runtime = getattr(engine, "lora_runtime", None)
            for name, count in dict(getattr(runtime, attr, None) or {}).items():
                total[name] = total.get(name, 0) + int(count)
        return total

    @property
    def loads(self) -> dict[str, int]:
        return self._merged("loads")

    @property
    def evictions(self) -> dict[str, int]:
        return self._merged("evictions")


class EnginePool:
    """A ConcurrentEngine over `engines` (one per device), placing each call by adapter and load."""

    def __init__(self, engines: Sequence[ConcurrentEngine]) -> None:
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        self.engines: tuple[ConcurrentEngine, ...] = tuple(engines)
        self.placements: dict[int, int] = {i: 0 for i in range(len(self.engines))}
        self._placed = [0] * len(self.engines)  # rows this pool has running on each engine now
        self._lock = threading.Lock()
        self._info: EngineInfo | None = None
        self.lora_runtime = _MergedLoRAStats(self.engines)

    # ---- loading ------------------------------------------------------------------------------

    def load(self) -> EngineInfo:
        """Load every engine at once (one thread each); they must serve the same model."""
        infos = self._on_every_engine(lambda engine: engine.load(), "load")
        first = infos[0]
        for index, info in enumerate(infos[1:], start=1):
            for name in _MUST_AGREE:
                if getattr(info, name) != getattr(first, name):
                    raise EngineFailure(f"the engines disagree on {name}: engine 0 ({first.device}) has "
                                        f"{getattr(first, name)!r}, engine {index} ({info.device}) has "
                                        f"{getattr(info, name)!r}")
        self._info = replace(first, device=",".join(info.device for info in infos))
        return self._info

    @property
    def info(self) -> EngineInfo | None:
        return self._info

    @property
    def devices(self) -> list[str]:
        return [engine.info.device if engine.info is not None else "?" for engine in self.engines]

    # ---- ConcurrentEngine ---------------------------------------------------------------------

    @property
    def max_rows(self) -> int:
        return sum(engine.max_rows for engine in self.engines)

    def load_summary(self) -> EngineLoad:
        loads = [engine.load_summary() for engine in self.engines]
        return EngineLoad(running_rows=sum(s.running_rows for s in loads),
                          queued_rows=sum(s.queued_rows for s in loads),
                          max_rows=sum(s.max_rows for s in loads),
                          resident_adapters=frozenset().union(*(s.resident_adapters for s in loads)))

    def stats(self) -> dict[str, float | None]:
        """The engines' `stats()` (when they have it): counters summed, other numbers (timings) at their max."""
        merged: dict[str, float | None] = {}
        for engine in self.engines:
            stats = getattr(engine, "stats", None)
            if not callable(stats):
                continue
            for key, value in dict(stats()).items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    merged.setdefault(key, None)
                    continue
                old = merged.get(key)
                if old is None:
                    merged[key] = float(value)
                else:
                    merged[key] = old + value if key in SUMMED_STATS else max(old, float(value))
        return merged

    def close(self) -> None:
        errors: list[BaseException] = []
        for engine in self.engines:
            try:
                engine.close()
            except Exception as exc:  # close the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]

    # ---- the Engine calls ---------------------------------------------------------------------

    def linear_shapes(self) -> Mapping[str, tuple[int, int]]:
        return self.engines[0].linear_shapes()

    def expected_patches(self, text: str) -> int:
        return self.engines[0].expected_patches(text)

    def check_reference_audio(self, path: str) -> None:
        self.engines[0].check_reference_audio(path)

    def prepare_prompt(self, ref_audio_path: str, ref_text: str | None) -> None:
        """Every engine caches its own features (they live on its device), all at once."""
        self._on_every_engine(lambda engine: engine.prepare_prompt(ref_audio_path, ref_text), "prepare_prompt")

    def generate(self, request: ChunkRequest, on_patch: PatchCallback) -> np.ndarray:
        index = self._place(request)
        try:
            return self.engines[index].generate(request, on_patch)
        finally:
            self._release(index)

    def generate_stream(self, request: ChunkRequest, on_audio: AudioCallback) -> int:
        index = self._place(request)
        try:
            return self.engines[index].generate_stream(request, on_audio)
        finally:
            self._release(index)

    # ---- placement ----------------------------------------------------------------------------

    def choose(self, request: ChunkRequest) -> int:
        """Where `request` would go now (without taking a row)."""
        with self._lock:
            return self._choose_locked(request)

    def _choose_locked(self, request: ChunkRequest) -> int:
        key = adapter_key_str(request.adapter) if request.adapter is not None else None
        return choose_engine([engine.load_summary() for engine in self.engines], self._placed, key)

    def _place(self, request: ChunkRequest) -> int:
        with self._lock:
            index = self._choose_locked(request)
            self._placed[index] += 1
            self.placements[index] += 1
        return index

    def _release(self, index: int) -> None:
        with self._lock:
            self._placed[index] -= 1

    def _on_every_engine(self, fn: Callable[[ConcurrentEngine], T], what: str) -> list[T]:
        """fn(engine) for every engine in its own thread; the first engine's error wins (VoxError first)."""
        results: list[T | None] = [None] * len(self.engines)
        errors: list[tuple[int, BaseException]] = []

        def run(index: int) -> None:
            try:
                results[index] = fn(self.engines[index])
            except BaseException as exc:  # re-raised in the caller below
                errors.append((index, exc))

        if len(self.engines) == 1:
            run(0)
        else:
            threads = [threading.Thread(target=run, args=(i,), name=f"pool-{what}-{i}", daemon=True)
                       for i in range(len(self.engines))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        if errors:
            errors.sort(key=lambda e: (not isinstance(e[1], VoxError), e[0]))
            index, exc = errors[0]
            if len(self.engines) > 1:
                log.error("engine %d failed in %s: %s", index, what, exc)
            raise exc
        return results  # type: ignore[return-value]
