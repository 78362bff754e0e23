"""BatchedEngine against the official `voxcpm` package, on the tiny random checkpoints (CPU, float32).

Several requests (texts, seeds, cfg, solver steps, adapters base / r4_qkvo / r16_proj_mlp, with and
without a reference voice) run at once as rows of one BatchedEngine with max_rows=4, so rows queue
and join the running batch between decode steps. Each row's audio must equal what the official
package gives for that request alone (`VoxCPM(...)`, `torch.manual_seed(seed)`, `.generate(...)`)
within 2e-3 max abs; streamed rows must equal the sequential VoxCPMEngine.generate_stream (which
tests/integration/test_streaming_tiny.py and test_engine_parity.py tie to the official package).

Also: a row cancelled from its callback ends alone; a bad reference file fails its request only;
the same requests in the same composition give identical arrays twice.

Each architecture's tests form one xdist group (run with `-n 2 --dist loadgroup`: the two
architectures then run side by side, each building its engines once). Measured numbers are printed
with a `[measure]` prefix (run with -s to see them).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from official_calls import official_generate

from voxcpm_api import errors
from voxcpm_api.engine.base import ChunkRequest
from voxcpm_api.engine.batched.engine import BatchedConfig, BatchedEngine
from voxcpm_api.engine.voxcpm_engine import EngineConfig, VoxCPMEngine
from voxcpm_api.lora.catalog import LoRACatalog

ARCH_MODEL = {"voxcpm": "tiny", "voxcpm2": "tiny-v2"}
ARCHS = [pytest.param(arch, marks=pytest.mark.xdist_group(f"batched-parity-{arch}"), id=arch) for arch in ARCH_MODEL]
MAX_ROWS = 4
TOLERANCE = 2e-3
REF_TEXT = "A short reference sentence."


def _measure(line: str) -> None:
    print(f"\n[measure] {line}")


# ------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class Spec:
    """One row of a test batch, independent of the architecture."""

    label: str
    text: str
    adapter: str | None = None
    cfg: float = 2.0
    steps: int = 6
    seed: int = 3
    clone: bool = False  # use the reference voice
    ref_text: str | None = REF_TEXT  # transcript when cloning (None: VoxCPM2 reference-only)
    stream: bool = False


SPECS = {
    s.label: s
    for s in (
        Spec("base-long", "The quick brown fox jumps over it.", steps=6, seed=3),
        Spec("r4", "Hello world, a test.", adapter="r4_qkvo", cfg=1.5, steps=4, seed=7),
        Spec("r16-clone", "Cloned with lora.", adapter="r16_proj_mlp", cfg=2.5, steps=5, seed=11, clone=True),
        Spec("base-short", "Hi.", steps=6, seed=5),
        Spec("clone", "The quick fox.", steps=4, seed=3, clone=True),
        Spec("r4-stream", "A streamed one.", adapter="r4_qkvo", steps=5, seed=9, stream=True),
        Spec("clone-stream", "Streamed, cloned.", cfg=1.8, steps=4, seed=13, clone=True, stream=True),
        Spec("ref-only", "Reference only.", steps=4, seed=17, clone=True, ref_text=None),  # VoxCPM2 only
        Spec("r16", "Many targets.", adapter="r16_proj_mlp", cfg=3.0, steps=3, seed=21),
    )
}
MIXED = ["base-long", "r4", "r16-clone", "base-short", "clone", "r4-stream", "clone-stream", "ref-only"]


def specs_for(arch: str, labels: list[str]) -> list[Spec]:
    return [SPECS[label] for label in labels if not (arch == "voxcpm" and SPECS[label].ref_text is None
                                                       and SPECS[label].clone)]


@dataclass
class Env:
    """Everything one architecture's tests share (built once per session and worker)."""

    arch: str
    batched: BatchedEngine
    sequential: VoxCPMEngine
    official: Callable[[str | None], object]
    catalog: LoRACatalog
    ref_wav: Path
    expected: dict[str, np.ndarray]

    def request(self, spec: Spec, ref: Path | None = None) -> ChunkRequest:
        adapter = self.catalog.resolve(spec.adapter) if spec.adapter is not None else None
        path = ref if ref is not None else (self.ref_wav if spec.clone else None)
        return ChunkRequest(text=spec.text, adapter=adapter, cfg_scale=spec.cfg, steps=spec.steps, seed=spec.seed,
                            ref_audio_path=str(path) if path is not None else None,
                            ref_text=spec.ref_text if path is not None else None)

    def want(self, spec: Spec) -> np.ndarray:
        """The request alone: the official package for files, the sequential engine's stream for streams."""
        if spec.label not in self.expected:
            req = self.request(spec)
            if spec.stream:
                pieces: list[np.ndarray] = []
                self.sequential.generate_stream(req, lambda samples: pieces.append(samples.copy()))
                self.expected[spec.label] = np.concatenate(pieces)
            else:
                self.expected[spec.label] = official_generate(self.official(spec.adapter), self.arch, req)
        return self.expected[spec.label]

    @property
    def patch_samples(self) -> int:
        info = self.batched.info
        assert info is not None
        return round(info.patch_duration_s * info.sample_rate_hz)


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, f"lengths differ: {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def batched_ref_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1.3 s of a gliding tone plus a little noise, 16 kHz mono float (private to this file)."""
    sr = 16000
    t = np.arange(int(1.3 * sr)) / sr
    rng = np.random.default_rng(7)
    wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * t) * t) + 0.02 * rng.standard_normal(t.size)
    path = tmp_path_factory.mktemp("batched-ref") / "voice.wav"
    sf.write(path, wave.astype(np.float32), sr, subtype="FLOAT")
    return path


@pytest.fixture(scope="session")
def batched_envs(tiny_root: Path, tiny_checkpoints, batched_ref_wav: Path) -> Iterator[Callable[[str], Env]]:
    """envs(arch) -> Env, built on first use (so an xdist worker only builds the architecture it runs)."""
    import voxcpm
    from voxcpm.model.voxcpm import LoRAConfig as LoRAConfigV1
    from voxcpm.model.voxcpm2 import LoRAConfig as LoRAConfigV2

    built: dict[str, Env] = {}

    def get(arch: str) -> Env:
        if arch in built:
            return built[arch]
        instances: dict[str | None, object] = {}

        def official(adapter: str | None):
            if adapter not in instances:
                kwargs: dict = {}
                if adapter is not None:
                    lora_dir = tiny_checkpoints.loras[arch][adapter]
                    cfg = json.loads((lora_dir / "lora_config.json").read_text())["lora_config"]
                    cls = LoRAConfigV2 if arch == "voxcpm2" else LoRAConfigV1
                    kwargs = {"lora_config": cls(**cfg), "lora_weights_path": str(lora_dir)}
                instances[adapter] = voxcpm.VoxCPM(str(tiny_checkpoints.models[arch]), enable_denoiser=False,
                                                   optimize=False, device="cpu", **kwargs)
            return instances[adapter]

        started = time.perf_counter()
        engine = BatchedEngine(BatchedConfig(model=ARCH_MODEL[arch], device="cpu", max_rows=MAX_ROWS,
                                             cache_dir=tiny_root))
        loaded_s = time.perf_counter() - started
        info = engine.load()
        assert info.architecture == arch
        # the start-up report: every phase a CPU load goes through, adding up to no more than the load
        phases = {k: v for k, v in engine.stats().items() if k.startswith("ready_") and k != "ready_s"}
        assert {"ready_official_load_s", "ready_wrap_s", "ready_wrap_lora_slots_s"} <= phases.keys(), phases
        elapsed_s = time.perf_counter() - started - loaded_s
        assert 0 < phases["ready_official_load_s"] + phases["ready_wrap_s"] <= elapsed_s + 0.02
        sequential = VoxCPMEngine(EngineConfig(model=ARCH_MODEL[arch], device="cpu", cache_dir=tiny_root))
        sequential.load()
        _measure(f"batched + sequential engines {arch}: {time.perf_counter() - started:.2f}s")
        built[arch] = Env(arch, engine, sequential, official, LoRACatalog(tiny_checkpoints.lora_roots[arch]),
                          batched_ref_wav, {})
        return built[arch]

    yield get
    for env in built.values():
        env.batched.close()


# ------------------------------------------------------------------------------------------ running a batch


@contextmanager
def loop_held(engine: BatchedEngine) -> Iterator[None]:
    """Keep the engine's loop thread busy, so that requests pile up in its inbox in a known order and are
    all accepted in one go when it is released (white-box: deterministic admission for the tests)."""
    entered, release = threading.Event(), threading.Event()

    def block() -> None:
        entered.set()
        release.wait(120)

    engine._inbox.put(block)
    engine._wake.set()
    assert entered.wait(60), "the engine loop did not pick up the blocker"
    try:
        yield
    finally:
        release.set()


@dataclass
class Row:
    spec: Spec
    request: ChunkRequest
    on_patch: Callable[[], None] | None = None  # extra behaviour (e.g. cancelling)
    on_audio: Callable[[np.ndarray], None] | None = None
    output: np.ndarray | None = None
    error: BaseException | None = None
    calls: int = 0
    returned_patches: int | None = None
    steps_seen: list[int] | None = None  # engine step counter at each of this row's patches


def _run_row(engine: BatchedEngine, row: Row) -> None:
    row.steps_seen = []
    try:
        if row.spec.stream:
            pieces: list[np.ndarray] = []

            def on_audio(samples: np.ndarray) -> None:
                row.calls += 1
                row.steps_seen.append(int(engine.stats_counters["steps"]))  # the loop thread calls us
                pieces.append(samples.copy())
                if row.on_audio is not None:
                    row.on_audio(samples)

            row.returned_patches = engine.generate_stream(row.request, on_audio)
            row.output = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        else:
            def on_patch() -> None:
                row.calls += 1
                row.steps_seen.append(int(engine.stats_counters["steps"]))
                if row.on_patch is not None:
                    row.on_patch()

            row.output = engine.generate(row.request, on_patch)
    except BaseException as exc:  # noqa: BLE001 - every outcome is checked by the test
        row.error = exc


def run_batch(engine: BatchedEngine, rows: list[Row], *, ordered: bool = True) -> float:
    """Start every row from its own thread (as the task runner does) and wait for all of them.

    ordered: hold the loop while submitting, so the rows reach it in this order in one go; otherwise
    they race in freely. Returns the wall time in seconds."""
    threads = [threading.Thread(target=_run_row, args=(engine, row), daemon=True) for row in rows]
    started = time.perf_counter()
    if ordered:
        with loop_held(engine):
            arrived = 0
            for thread in threads:
                thread.start()
                # a hang guard, not a timing: a reference encode in the caller's thread can take tens of seconds
                # on a loaded 2-core machine (seen at 30 s while inductor compiled in a parallel test)
                deadline = time.monotonic() + 120
                # a request whose reference audio fails to encode ends in its caller's thread, before the loop
                while engine._inbox.qsize() < arrived + 1 and thread.is_alive():
                    assert time.monotonic() < deadline, "a request never reached the engine"
                    time.sleep(0.001)
                arrived = engine._inbox.qsize()
    else:
        for thread in threads:
            thread.start()
    for thread in threads:
        thread.join(timeout=300)
        assert not thread.is_alive(), "a batched request hung"
    return time.perf_counter() - started


def check_row(env: Env, row: Row) -> float:
    assert row.error is None, f"{row.spec.label}: {row.error!r}"
    assert row.output is not None and row.output.dtype == np.float32 and row.output.ndim == 1
    diff = max_abs(row.output, env.want(row.spec))
    assert diff <= TOLERANCE, f"{env.arch} {row.spec.label}: max|diff| {diff:.3g}"
    size = env.patch_samples
    assert row.output.size % size == 0 and row.calls == row.output.size // size, row.spec.label
    if row.spec.stream:
        assert row.returned_patches == row.calls
    return diff


def counters(engine: BatchedEngine) -> dict[str, float]:
    stats = engine.stats()
    return {k: stats[k] for k in ("steps", "rows_stepped", "prefills", "adapter_slot_loads")}


def wait_idle(engine: BatchedEngine) -> None:
    deadline = time.monotonic() + 30
    while engine.load_summary().running_rows or engine.load_summary().queued_rows:
        assert time.monotonic() < deadline
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_each_request_alone(batched_envs, arch: str) -> None:
    env = batched_envs(arch)
    engine = env.batched
    specs = specs_for(arch, MIXED)
    assert len(specs) > MAX_ROWS  # some rows must queue and join later
    rows = [Row(s, env.request(s)) for s in specs]
    before = counters(engine)
    took = run_batch(engine, rows)
    wait_idle(engine)
    after = counters(engine)
    delta = {k: after[k] - before[k] for k in after}

    diffs = {row.spec.label: check_row(env, row) for row in rows}
    patches = {row.spec.label: row.calls for row in rows}
    _measure(f"batched {arch}: {len(rows)} rows in {took:.2f}s, {delta}, patches {patches}, "
             f"max|diff| {max(diffs.values()):.3g}")

    # every request was prefilled once; steps ran several rows at once; every step row is a patch
    assert delta["prefills"] == len(rows)
    assert delta["rows_stepped"] > delta["steps"]
    assert delta["rows_stepped"] == sum(patches.values())
    # /metrics' per-adapter counters: every adapter of the batch went into a GPU slot at least once
    used = {row.request.adapter.name for row in rows if row.request.adapter is not None}
    assert used and used <= set(engine.lora_runtime.loads)
    # rows per step never exceed max_rows, and some step ran a full batch
    per_step: dict[int, int] = {}
    for row in rows:
        # one patch per step, in consecutive steps from admission to the end
        assert row.steps_seen == list(range(row.steps_seen[0], row.steps_seen[0] + len(row.steps_seen)))
        for step in row.steps_seen:
            per_step[step] = per_step.get(step, 0) + 1
    assert max(per_step.values()) == MAX_ROWS
    # continuous batching: a queued row joined while an earlier row was still decoding
    spans = {row.spec.label: (row.steps_seen[0], row.steps_seen[-1]) for row in rows}
    first_wave = {label for label, (start, _) in spans.items() if start == min(s for s, _ in spans.values())}
    assert len(first_wave) == MAX_ROWS  # FIFO: the first max_rows requests started together
    joined = [label for label, (start, _) in spans.items()
              if label not in first_wave and any(s < start <= e for other, (s, e) in spans.items() if other != label)]
    assert joined, f"no row joined a running batch: {spans}"
    assert [r.spec.label for r in rows if r.spec.label in first_wave] == [s.label for s in specs[:MAX_ROWS]]
    # adapters: at most one slot load per distinct adapter (the engine has 8 slots)
    assert delta["adapter_slot_loads"] <= len({s.adapter for s in specs if s.adapter})


@pytest.mark.parametrize("arch", ARCHS)
def test_free_running_threads_match_too(batched_envs, arch: str) -> None:
    """No ordering help: rows race into the engine as the task runner's threads would."""
    env = batched_envs(arch)
    specs = [SPECS[label] for label in ("r16", "base-short", "r4", "clone", "r4-stream")]
    rows = [Row(s, env.request(s)) for s in specs]
    run_batch(env.batched, rows, ordered=False)
    for row in rows:
        check_row(env, row)


@pytest.mark.parametrize("arch", ARCHS)
def test_cancelled_rows_end_alone(batched_envs, arch: str) -> None:
    env = batched_envs(arch)
    engine = env.batched
    seen = {"file": 0, "stream": 0}

    def cancel_file_at_third() -> None:
        seen["file"] += 1
        if seen["file"] == 3:
            raise errors.TaskCancelled("cancelled by test")

    def cancel_stream_at_second(_samples: np.ndarray) -> None:
        seen["stream"] += 1
        if seen["stream"] == 2:
            raise errors.TaskCancelled("cancelled by test")

    victim_file = Row(SPECS["base-long"], env.request(SPECS["base-long"]), on_patch=cancel_file_at_third)
    victim_stream = Row(SPECS["clone-stream"], env.request(SPECS["clone-stream"]), on_audio=cancel_stream_at_second)
    survivors = [Row(SPECS[label], env.request(SPECS[label])) for label in ("r4", "clone")]
    before = counters(engine)
    run_batch(engine, [survivors[0], victim_file, victim_stream, survivors[1]])
    wait_idle(engine)
    after = counters(engine)

    assert isinstance(victim_file.error, errors.TaskCancelled) and victim_file.calls == 3
    assert isinstance(victim_stream.error, errors.TaskCancelled) and victim_stream.calls == 2
    for row in survivors:
        check_row(env, row)
    assert after["rows_stepped"] - before["rows_stepped"] == 3 + 2 + sum(r.calls for r in survivors)
    # the engine keeps serving: the cancelled request alone, afterwards, still matches
    again = Row(SPECS["base-short"], env.request(SPECS["base-short"]))
    run_batch(engine, [again])
    check_row(env, again)


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_reference_audio_fails_only_its_request(batched_envs, tmp_path: Path, arch: str) -> None:
    env = batched_envs(arch)
    engine = env.batched
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage, not really audio" + bytes(range(256)) * 4)
    in_flight = threading.Event()

    def flag() -> None:
        in_flight.set()

    good = [Row(SPECS["r16-clone"], env.request(SPECS["r16-clone"]), on_patch=flag),
            Row(SPECS["base-short"], env.request(SPECS["base-short"]))]
    bad_spec = Spec("junk", "This voice cannot be read.", clone=True)
    bad_early = Row(bad_spec, env.request(bad_spec, ref=junk))
    runner = threading.Thread(target=run_batch, args=(engine, [good[0], bad_early, good[1]]), daemon=True)
    runner.start()
    # and one more arriving while the good rows are decoding
    assert in_flight.wait(120)
    with pytest.raises(errors.BadAudio, match="junk.wav"):
        engine.generate(env.request(bad_spec, ref=junk), lambda: None)
    runner.join(300)
    assert not runner.is_alive()
    assert isinstance(bad_early.error, errors.BadAudio), repr(bad_early.error)
    assert bad_early.calls == 0
    for row in good:
        check_row(env, row)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seeds_and_composition_give_identical_arrays(batched_envs, arch: str) -> None:
    env = batched_envs(arch)
    labels = ["r4", "clone", "base-short", "r16", "r4-stream"]  # 5 rows: one queues behind the others
    runs = []
    for _ in range(2):
        rows = [Row(SPECS[label], env.request(SPECS[label])) for label in labels]
        run_batch(env.batched, rows)
        wait_idle(env.batched)
        for row in rows:
            assert row.error is None, repr(row.error)
        runs.append([row.output for row in rows])
    for label, first, second in zip(labels, *runs):
        assert first.shape == second.shape and np.array_equal(first, second), label
    # and they are the requests' own results, whatever the batch
    for label, output in zip(labels, runs[0]):
        assert max_abs(output, env.want(SPECS[label])) <= TOLERANCE, label


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_decode_equals_each_row_decoded_alone(batched_envs, arch: str) -> None:
    """Finished rows of similar length share one AudioVAE call, right-padded to the longest: the causal
    decoder must give each row its own audio (white-box: the engine's decode-group step, called directly)."""
    from voxcpm_api.engine.batched.engine import _decode_groups, _Job

    engine = batched_envs(arch).batched
    tts = engine._inner.tts_model
    gen = torch.Generator().manual_seed(0)
    request = ChunkRequest(text="unused", adapter=None, cfg_scale=2.0, steps=4, seed=0)

    def job(patches: int, drop: int, latents: torch.Tensor | None = None) -> _Job:
        made = _Job(request)
        made.latents = latents if latents is not None else torch.randn(patches, tts.patch_size, tts.feat_dim,
                                                                        generator=gen)
        made.drop_patches = drop
        return made

    group = [job(6, 0), job(7, 2), job(8, 3)]
    assert _decode_groups(group, engine._max_decode_patches()) == [group]  # one AudioVAE call for all three
    alone = [job(0, j.drop_patches, j.latents.clone()) for j in group]
    for single in alone:
        engine._decode_group([single])
    engine._decode_group(group)
    for together, single in zip(group, alone):
        assert together.error is None and single.error is None
        assert together.samples.shape == single.samples.shape
        assert max_abs(together.samples, single.samples) <= 1e-5


@pytest.mark.xdist_group("batched-parity-voxcpm2")
def test_failed_adapter_slot_load_is_not_left_resident(batched_envs, tiny_root: Path) -> None:
    env = batched_envs("voxcpm2")  # the official result to compare with; its engine is not touched
    engine = BatchedEngine(BatchedConfig(model="tiny-v2", device="cpu", max_rows=2, cache_dir=tiny_root))
    engine.load()
    try:
        slots = engine._model.lora  # white-box: make the first slot load fail (as a CUDA OOM there would)
        real_load = slots.load
        attempts = []

        def flaky(slot: int, adapter: object) -> None:
            attempts.append(slot)
            if len(attempts) == 1:
                raise RuntimeError("simulated failure while loading an adapter slot")
            real_load(slot, adapter)

        slots.load = flaky
        request = env.request(SPECS["r4"])
        with pytest.raises(errors.EngineFailure, match="LoRA adapter"):
            engine.generate(request, lambda: None)
        again = engine.generate(request, lambda: None)
        assert max_abs(again, env.want(SPECS["r4"])) <= TOLERANCE
    finally:
        engine.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_prompts_padded_to_graph_buckets_match_each_request_alone(batched_envs, arch: str) -> None:
    """On a GPU every prefill is padded to a CUDA-graph bucket (powers of two in prompts and positions);
    the padding must change no request's audio. Here the CPU engine pads the same way (white-box switch)
    and the mixed batch (adapters, cloning prompts, streams) is checked against the official package."""
    env = batched_envs(arch)
    engine = env.batched
    model = engine._model
    assert model is not None and not model.pad_prefills  # the CPU default: each batch at its own size

    def set_padding(value: bool) -> None:
        model.pad_prefills = value

    engine._call_in_loop(lambda: set_padding(True))
    try:
        rows = [Row(s, env.request(s)) for s in specs_for(arch, MIXED)]
        run_batch(engine, rows)
        wait_idle(engine)
    finally:
        engine._call_in_loop(lambda: set_padding(False))
    diffs = {row.spec.label: check_row(env, row) for row in rows}
    _measure(f"padded prefills {arch}: max|diff| {max(diffs.values()):.3g}")
