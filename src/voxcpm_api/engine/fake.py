"""In-repo engines that honour the Engine protocols without torch, for fast API tests.

Output is a deterministic function of (text, seed, adapter, cfg_scale, steps, reference), so
tests can check that parameters reach the engine, that the seed is honoured and that chunked
long texts are joined; `patch_delay_s` makes generations slow enough to cancel or kill.

`FakeEngine` is a plain (sequential) Engine. `ConcurrentFakeEngine` is a ConcurrentEngine shaped
like the batched one: callers' threads submit rows and block; one loop thread advances every
running row by one patch per step (one `patch_delay_s` per step, however many rows), calls the
rows' callbacks there, and ends a row alone when its callback or its generation raises.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf

from ..domain import EngineInfo
from ..errors import BadAudio, EngineFailure, NotReady
from ..lora.catalog import adapter_key_str
from .base import AudioCallback, ChunkRequest, EngineLoad, PatchCallback

FAKE_SAMPLE_RATE_HZ = 16000
FAKE_PATCH_SAMPLES = 1280  # 80 ms per patch, like VoxCPM-0.5B


@dataclass
class FakeEngine:
    patch_delay_s: float = 0.0
    load_delay_s: float = 0.0
    fail_marker: str = "FAIL_ENGINE"  # text containing this makes generate() raise EngineFailure
    architecture: str = "voxcpm"
    device: str = "cpu"
    model_id: str = "fake"
    calls: list[ChunkRequest] = field(default_factory=list)
    prepared: list[tuple[str, str | None]] = field(default_factory=list)  # prepare_prompt calls
    patches_streamed: int = 0  # patches handed out by generate_stream (all requests)
    _info: EngineInfo | None = None

    def load(self) -> EngineInfo:
        time.sleep(self.load_delay_s)
        self._info = EngineInfo(
            model_id=self.model_id, architecture=self.architecture, sample_rate_hz=FAKE_SAMPLE_RATE_HZ,
            patch_duration_s=FAKE_PATCH_SAMPLES / FAKE_SAMPLE_RATE_HZ, device=self.device,
            needs_ref_text=self.architecture != "voxcpm2",
        )
        return self._info

    @property
    def info(self) -> EngineInfo | None:
        return self._info

    def linear_shapes(self) -> Mapping[str, tuple[int, int]]:
        shapes: dict[str, tuple[int, int]] = {}
        for layer in range(2):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shapes[f"base_lm.layers.{layer}.self_attn.{proj}"] = (64, 64)
                shapes[f"feat_decoder.estimator.decoder.layers.{layer}.self_attn.{proj}"] = (64, 64)
        return shapes

    def expected_patches(self, text: str) -> int:
        return max(3, len(text) // 4)

    def generate(self, request: ChunkRequest, on_patch: PatchCallback) -> np.ndarray:
        patches = []
        for patch in self._patches(request):
            patches.append(patch)
            on_patch()
        return np.concatenate(patches)

    def generate_stream(self, request: ChunkRequest, on_audio: AudioCallback) -> int:
        """The very patches generate() would return, handed to on_audio one by one as they are made.

        `patches_streamed` counts every patch handed out (tests check that a disconnect stops it).
        """
        count = 0
        for patch in self._patches(request):
            self.patches_streamed += 1
            count += 1
            on_audio(patch)
        return count

    def _patches(self, request: ChunkRequest) -> Iterator[np.ndarray]:
        """Deterministic noise patches from every parameter that must reach the engine."""
        for patch in self._patch_source(request):
            time.sleep(self.patch_delay_s)
            yield patch

    def _patch_source(self, request: ChunkRequest) -> Iterator[np.ndarray]:
        """The patches of `request`, made at once (the caller paces them)."""
        self.calls.append(request)
        if self.fail_marker and self.fail_marker in request.text:
            raise EngineFailure("the fake engine was asked to fail")
        if request.ref_audio_path is not None:
            self.check_reference_audio(request.ref_audio_path)
        key = "|".join([request.text, str(request.seed), request.adapter.name if request.adapter else "",
                        f"{request.cfg_scale:.4f}", str(request.steps), request.ref_audio_path or ""])
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
        count = request.max_patches if request.max_patches is not None else self.expected_patches(request.text)
        for _ in range(count):
            yield (0.1 * rng.standard_normal(FAKE_PATCH_SAMPLES)).astype(np.float32)

    def prepare_prompt(self, ref_audio_path: str, ref_text: str | None) -> None:
        """No features to compute: validates the audio and records the call (tests read `prepared`)."""
        self.check_reference_audio(ref_audio_path)
        self.prepared.append((ref_audio_path, ref_text))

    def check_reference_audio(self, path: str) -> None:
        try:
            info = sf.info(path)
        except Exception as exc:  # soundfile raises several types; all mean "not decodable"
            raise BadAudio(f"reference audio cannot be decoded: {exc}", field="ref_audio_path") from exc
        if info.frames <= 0:
            raise BadAudio("reference audio is empty", field="ref_audio_path")


class _Row:
    """One generate()/generate_stream() call inside ConcurrentFakeEngine."""

    def __init__(self, request: ChunkRequest, source: Iterator[np.ndarray],
                 callback: Callable[[np.ndarray], None]) -> None:
        self.request = request
        self.source = source
        self.callback = callback
        self.patches: list[np.ndarray] = []
        self.error: BaseException | None = None
        self.done = threading.Event()


@dataclass
class ConcurrentFakeEngine(FakeEngine):
    """A ConcurrentEngine without torch: rows of up to `max_rows` calls advance together, one patch
    per step of `patch_delay_s`, on one loop thread (callbacks run there, as in the batched engine).

    Calls beyond `max_rows` wait in a queue. `peak_running` is the most rows ever generating in one
    step; `lora_slots` adapters stay "resident" (LRU) and are reported by load_summary().
    """

    max_rows: int = 4
    lora_slots: int = 8
    peak_running: int = 0
    steps: int = 0  # decode steps run (each advances every running row by one patch)
    rows_stepped: int = 0  # rows advanced, summed over steps
    closed: bool = False

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._queued: list[_Row] = []
        self._running: list[_Row] = []
        self._resident: OrderedDict[str, None] = OrderedDict()
        self._loop: threading.Thread | None = None
        self._stop = False

    # ---- ConcurrentEngine ---------------------------------------------------------------------

    def load_summary(self) -> EngineLoad:
        with self._cond:
            return EngineLoad(running_rows=len(self._running), queued_rows=len(self._queued),
                              max_rows=self.max_rows, resident_adapters=frozenset(self._resident))

    def stats(self) -> dict[str, float]:
        """Counters named like BatchedEngine.stats()'s."""
        with self._cond:
            return {"steps": self.steps, "rows_stepped": self.rows_stepped}

    def close(self) -> None:
        """Stop the loop thread; rows still running or queued fail with NotReady. A later call starts it again."""
        with self._cond:
            self._stop = True
            self.closed = True
            self._cond.notify_all()
            loop = self._loop
        if loop is not None and loop is not threading.current_thread():
            loop.join(timeout=30)

    def generate(self, request: ChunkRequest, on_patch: PatchCallback) -> np.ndarray:
        def callback(patch: np.ndarray) -> None:
            on_patch()

        row = self._submit(request, callback)
        return np.concatenate(row.patches)

    def generate_stream(self, request: ChunkRequest, on_audio: AudioCallback) -> int:
        def callback(patch: np.ndarray) -> None:
            self.patches_streamed += 1  # loop thread only
            on_audio(patch)

        return len(self._submit(request, callback).patches)

    # ---- the loop -----------------------------------------------------------------------------

    def _submit(self, request: ChunkRequest, callback: Callable[[np.ndarray], None]) -> _Row:
        row = _Row(request, iter(()), callback)
        row.source = self._row_source(row)
        with self._cond:
            if self._loop is None or not self._loop.is_alive():
                self._stop = False
                self._loop = threading.Thread(target=self._run, name="fake-engine-loop", daemon=True)
                self._loop.start()
            self._queued.append(row)
            self._cond.notify_all()
        row.done.wait()
        if row.error is not None:
            raise row.error
        return row

    def _row_source(self, row: _Row) -> Iterator[np.ndarray]:
        # made lazily on the loop thread, so a failing request fails in a step like a real row would
        yield from self._patch_source(row.request)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._queued and not self._running:
                    self._cond.wait()
                if self._stop:
                    for row in self._running + self._queued:
                        row.error = NotReady("the engine was closed")
                        row.done.set()
                    self._running.clear()
                    self._queued.clear()
                    return
                while self._queued and len(self._running) < self.max_rows:
                    row = self._queued.pop(0)
                    if row.request.adapter is not None:
                        self._make_resident(adapter_key_str(row.request.adapter))
                    self._running.append(row)
                self.peak_running = max(self.peak_running, len(self._running))
                step_rows = list(self._running)
            time.sleep(self.patch_delay_s)
            finished: list[_Row] = []
            for row in step_rows:  # one decode step: every running row gets its next patch
                try:
                    patch = next(row.source)
                except StopIteration:
                    finished.append(row)
                    continue
                except BaseException as exc:  # this row's generation failed; the others go on
                    row.error = exc
                    finished.append(row)
                    continue
                row.patches.append(patch)
                try:
                    row.callback(patch)
                except BaseException as exc:  # cancelled, shut down, client gone: this row alone ends
                    row.error = exc
                    finished.append(row)
            with self._cond:
                self.steps += 1
                self.rows_stepped += len(step_rows)
                for row in finished:
                    self._running.remove(row)
            for row in finished:
                row.done.set()

    def _make_resident(self, key: str) -> None:
        self._resident.pop(key, None)
        self._resident[key] = None
        while len(self._resident) > self.lora_slots:
            self._resident.popitem(last=False)
