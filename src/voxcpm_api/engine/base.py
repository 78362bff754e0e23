"""The engine seam: what the task layer may ask of a speech model. No torch import here.

An engine is single-threaded: the task layer calls every method but `info` from one dedicated
worker thread per engine (see tasks/runner.py), so implementations may keep mutable model state
(KV caches, the active adapter, torch's global RNG) without locks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..domain import EngineInfo
from ..lora.catalog import AdapterSpec

# Called once after every generated patch, from the engine thread. It may raise TaskCancelled
# to stop the generation at that patch boundary.
PatchCallback = Callable[[], None]
# Called with the decoded float32 samples of each new patch while streaming, from the engine thread.
# It may raise TaskCancelled to stop the generation at that patch boundary.
AudioCallback = Callable[[np.ndarray], None]


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    """One model call: a piece of text that fits the model in one generation."""

    text: str
    adapter: AdapterSpec | None  # None = base model
    cfg_scale: float
    steps: int
    seed: int  # torch.manual_seed(seed) right before generating, as the official package does
    ref_audio_path: str | None = None
    ref_text: str | None = None
    normalize: bool = False  # run the official text normaliser first (VoxCPM.generate(normalize=True))
    # Benchmarks only: generate exactly this many patches (the official max_len argument) instead of
    # the official cap min(tokens * 6 + 10, 4096); None = the official behaviour.
    max_patches: int | None = None
    # Raises (TaskCancelled, ...) when the request should stop. A batching engine calls it while the
    # request waits for a row, so a queued request can be cancelled before it produces any patch.
    stop_check: Callable[[], None] | None = field(default=None, compare=False)


class Engine(Protocol):
    def load(self) -> EngineInfo:
        """Load weights (blocking, may take minutes). Raises VoxError subclasses on failure."""
        ...

    @property
    def info(self) -> EngineInfo | None:
        """None until load() has returned."""
        ...

    def linear_shapes(self) -> Mapping[str, tuple[int, int]]:
        """(out_features, in_features) of every nn.Linear an adapter may target, by module path."""
        ...

    def expected_patches(self, text: str) -> int:
        """Best estimate of how many patches `text` will produce (for progress and ETA)."""
        ...

    def generate(self, request: ChunkRequest, on_patch: PatchCallback) -> np.ndarray:
        """Synthesize one chunk; returns mono float32 samples at info.sample_rate_hz, shape (N,).

        Raises AdapterMismatch, BadAudio, TaskCancelled or EngineFailure.
        """
        ...

    def generate_stream(self, request: ChunkRequest, on_audio: AudioCallback) -> int:
        """Synthesize one chunk, passing each patch's decoded samples to `on_audio` as soon as it exists.

        Returns the number of patches. Same seed, same stream; the stream need not equal generate()'s
        samples (the official streaming path decodes patch by patch). Raises like generate().
        """
        ...

    def check_reference_audio(self, path: str) -> None:
        """Raise BadAudio if `path` cannot be decoded as audio the model can clone from."""
        ...

    def prepare_prompt(self, ref_audio_path: str, ref_text: str | None) -> None:
        """Compute (and cache) the prompt features generate() will need for this reference, now.

        Used for saved voices, so their first request does not pay for encoding. Raises BadAudio
        when the audio cannot be read, InvalidInput when the model needs a transcript and got none.
        """
        ...


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What placement across engines needs to know (engine/pool.py); cheap, any thread."""

    running_rows: int  # requests generating now (batch rows in use)
    queued_rows: int  # submitted, waiting for a row
    max_rows: int  # rows one decode step can hold
    resident_adapters: frozenset[str]  # adapter keys (lora_runtime.adapter_key as str) in GPU slots


class ConcurrentEngine(Engine, Protocol):
    """An engine that batches: `generate`, `generate_stream`, `expected_patches`, `linear_shapes` and
    `check_reference_audio` may be called from up to `max_rows` threads at once (each call becomes
    one row of a shared decode step and blocks until its row is done). Callbacks run on the engine's
    own loop thread; one that raises ends that row alone."""

    @property
    def max_rows(self) -> int: ...

    def load_summary(self) -> EngineLoad: ...

    def close(self) -> None:
        """Stop the loop thread; rows still running fail with NotReady."""
        ...
