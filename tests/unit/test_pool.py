"""engine/pool.py: placement by capacity, LoRA affinity and load; loading and fan-out over engines."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from voxcpm_api.domain import EngineInfo
from voxcpm_api.engine.base import ChunkRequest, EngineLoad
from voxcpm_api.engine.fake import ConcurrentFakeEngine
from voxcpm_api.engine.pool import EnginePool, choose_engine
from voxcpm_api.errors import BadAudio, EngineFailure
from voxcpm_api.lora.catalog import AdapterSpec, LoRATargets, adapter_key_str


def spec(name: str, fingerprint: tuple[int, int] = (1, 2)) -> AdapterSpec:
    return AdapterSpec(name=name, directory=Path("/loras") / name, weights_file=Path("/loras") / name / "w.safetensors",
                       rank=4, alpha=8.0, targets=LoRATargets(), fingerprint=fingerprint)


def load(running: int = 0, queued: int = 0, rows: int = 4, resident: tuple[str, ...] = ()) -> EngineLoad:
    return EngineLoad(running_rows=running, queued_rows=queued, max_rows=rows, resident_adapters=frozenset(resident))


def request(adapter: AdapterSpec | None = None, text: str = "hello") -> ChunkRequest:
    return ChunkRequest(text=text, adapter=adapter, cfg_scale=2.0, steps=10, seed=1)


# ---- the placement rule ------------------------------------------------------------------------


def test_ties_go_to_the_lowest_index() -> None:
    assert choose_engine([load(), load(), load()], [0, 0, 0], None) == 0
    assert choose_engine([load(2), load(1), load(1)], [0, 0, 0], None) == 1


def test_lowest_relative_load_wins() -> None:
    # engine 0: 2 of 4 rows (0.5); engine 1: 3 of 8 rows (0.375)
    assert choose_engine([load(2, rows=4), load(3, rows=8)], [0, 0], None) == 1
    # queued rows count as load
    assert choose_engine([load(1, 2), load(2)], [0, 0], None) == 1


def test_the_pools_own_count_covers_rows_the_engine_has_not_seen_yet() -> None:
    assert choose_engine([load(0), load(1)], [3, 0], None) == 1


def test_affinity_beats_load_while_the_holder_has_a_free_row() -> None:
    key = adapter_key_str(spec("a"))
    loads = [load(0), load(3, resident=(key,))]
    assert choose_engine(loads, [0, 0], key) == 1
    assert choose_engine(loads, [0, 0], None) == 0  # the base model has no affinity
    assert choose_engine(loads, [0, 0], adapter_key_str(spec("b"))) == 0  # nobody holds b: load decides


def test_affinity_among_several_holders_goes_by_load() -> None:
    key = adapter_key_str(spec("a"))
    loads = [load(0), load(2, resident=(key,)), load(1, resident=(key,))]
    assert choose_engine(loads, [0, 0, 0], key) == 2


def test_a_full_holder_loses_to_an_engine_with_a_free_row() -> None:
    key = adapter_key_str(spec("a"))
    loads = [load(4, resident=(key,)), load(3)]
    assert choose_engine(loads, [0, 0], key) == 1


def test_when_every_engine_is_full_affinity_then_load_still_decide() -> None:
    key = adapter_key_str(spec("a"))
    assert choose_engine([load(4, 2), load(4, 1)], [0, 0], None) == 1
    assert choose_engine([load(4, 0), load(4, 3, resident=(key,))], [0, 0], key) == 1


def test_a_rewritten_adapter_is_another_key() -> None:
    old, new = adapter_key_str(spec("a", (1, 2))), adapter_key_str(spec("a", (3, 4)))
    assert old != new
    assert choose_engine([load(0), load(1, resident=(old,))], [0, 0], new) == 0


# ---- the pool over stub engines ---------------------------------------------------------------------


@dataclass
class StubEngine:
    """A ConcurrentEngine whose load and residency the test sets; generate records and sleeps."""

    device: str = "cuda:0"
    rows: int = 4
    sample_rate_hz: int = 16000
    running: int = 0
    resident: set[str] = field(default_factory=set)
    generated: list[ChunkRequest] = field(default_factory=list)
    prepared: list[str] = field(default_factory=list)
    closed: bool = False
    hold: threading.Event | None = None  # generate blocks until set
    fail_load: Exception | None = None
    _info: EngineInfo | None = None

    def load(self) -> EngineInfo:
        time.sleep(0.2)
        if self.fail_load is not None:
            raise self.fail_load
        self._info = EngineInfo(model_id="m", architecture="voxcpm", sample_rate_hz=self.sample_rate_hz,
                                patch_duration_s=0.08, device=self.device, needs_ref_text=True)
        return self._info

    @property
    def info(self) -> EngineInfo | None:
        return self._info

    @property
    def max_rows(self) -> int:
        return self.rows

    def load_summary(self) -> EngineLoad:
        return EngineLoad(running_rows=self.running, queued_rows=0, max_rows=self.rows,
                          resident_adapters=frozenset(self.resident))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        return {f"{self.device}.q_proj": (8, 8)}

    def expected_patches(self, text: str) -> int:
        return len(text) + (0 if self.device == "cuda:0" else 1000)

    def generate(self, request: ChunkRequest, on_patch) -> np.ndarray:  # type: ignore[no-untyped-def]
        self.generated.append(request)
        if self.hold is not None:
            assert self.hold.wait(10)
        on_patch()
        return np.zeros(4, dtype=np.float32)

    def generate_stream(self, request: ChunkRequest, on_audio) -> int:  # type: ignore[no-untyped-def]
        self.generated.append(request)
        on_audio(np.zeros(4, dtype=np.float32))
        return 1

    def check_reference_audio(self, path: str) -> None:
        if path.endswith(".bad"):
            raise BadAudio("bad")

    def prepare_prompt(self, ref_audio_path: str, ref_text: str | None) -> None:
        self.prepared.append(ref_audio_path)

    def close(self) -> None:
        self.closed = True


def test_load_runs_every_engine_at_once_and_lists_the_devices() -> None:
    engines = [StubEngine(device=f"cuda:{i}") for i in range(3)]
    pool = EnginePool(engines)  # type: ignore[list-item]
    assert pool.info is None
    started = time.monotonic()
    info = pool.load()
    assert time.monotonic() - started < 0.5, "three 0.2 s loads must overlap"
    assert info.device == "cuda:0,cuda:1,cuda:2" and info.model_id == "m"
    assert pool.info == info and pool.max_rows == 12
    assert pool.linear_shapes() == {"cuda:0.q_proj": (8, 8)}  # the first engine answers
    assert pool.expected_patches("abc") == 3


def test_engines_of_other_models_are_refused() -> None:
    pool = EnginePool([StubEngine(), StubEngine(device="cuda:1", sample_rate_hz=44100)])  # type: ignore[list-item]
    with pytest.raises(EngineFailure, match="sample_rate_hz"):
        pool.load()


def test_a_failing_engine_fails_the_load() -> None:
    pool = EnginePool([StubEngine(), StubEngine(device="cuda:1", fail_load=EngineFailure("out of memory"))])  # type: ignore[list-item]
    with pytest.raises(EngineFailure, match="out of memory"):
        pool.load()


def test_placement_counts_and_affinity_through_generate() -> None:
    engines = [StubEngine(device="cuda:0"), StubEngine(device="cuda:1")]
    pool = EnginePool(engines)  # type: ignore[list-item]
    pool.load()
    a = spec("a")
    engines[1].resident.add(adapter_key_str(a))
    pool.generate(request(a), lambda: None)
    pool.generate(request(None), lambda: None)
    assert pool.generate_stream(request(a), lambda samples: None) == 1
    assert [r.adapter for r in engines[1].generated] == [a, a]
    assert [r.adapter for r in engines[0].generated] == [None]
    assert pool.placements == {0: 1, 1: 2}


def test_rows_in_flight_spread_over_the_engines() -> None:
    hold = threading.Event()
    engines = [StubEngine(device=f"cuda:{i}", rows=2, hold=hold) for i in range(2)]
    pool = EnginePool(engines)  # type: ignore[list-item]
    pool.load()
    threads = [threading.Thread(target=pool.generate, args=(request(), lambda: None)) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    try:
        deadline = time.monotonic() + 5
        while sum(len(e.generated) for e in engines) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [len(e.generated) for e in engines] == [2, 2]
        assert pool.choose(request()) == 0  # all full and equal: the tie goes to the lowest index
    finally:
        hold.set()
        for t in threads:
            t.join(5)
    assert pool.choose(request()) == 0 and pool.placements == {0: 2, 1: 2}


def test_prepare_prompt_reaches_every_engine_and_close_closes_them_all() -> None:
    engines = [StubEngine(device=f"cuda:{i}") for i in range(2)]
    pool = EnginePool(engines)  # type: ignore[list-item]
    pool.load()
    pool.prepare_prompt("/refs/voice.wav", "hi")
    assert [e.prepared for e in engines] == [["/refs/voice.wav"], ["/refs/voice.wav"]]
    with pytest.raises(BadAudio):
        pool.check_reference_audio("x.bad")
    summary = pool.load_summary()
    assert summary.max_rows == 8 and summary.running_rows == 0
    pool.close()
    assert all(e.closed for e in engines)


def test_pool_of_concurrent_fakes_generates_what_one_engine_does() -> None:
    engines = [ConcurrentFakeEngine(max_rows=2, device=f"cpu{i}") for i in range(2)]
    pool = EnginePool(engines)
    assert pool.load().device == "cpu0,cpu1"
    single = ConcurrentFakeEngine(max_rows=4)
    single.load()
    results: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        results[i] = pool.generate(request(text=f"row {i} " + "z" * 20), lambda: None)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    for i in range(6):
        assert np.array_equal(results[i], single.generate(request(text=f"row {i} " + "z" * 20), lambda: None))
    assert sum(pool.placements.values()) == 6
    pool.close()
    single.close()


def test_pool_does_not_import_torch() -> None:
    assert "voxcpm_api.engine.pool" in sys.modules
    import subprocess

    code = "import sys, voxcpm_api.engine.pool, voxcpm_api.engine.fake; assert 'torch' not in sys.modules"
    src = Path(__file__).resolve().parents[2] / "src"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(src)})
