"""The graphs a BatchedEngine captures while idle (engine.py: load() captures one, the loop thread the rest):
the queue's contents, its order, what stats() reports, and a failure handing the rest to requests. A stub
model records the calls (capturing itself needs a GPU: bench/gpu_check.py and the benchmark cover it)."""

from __future__ import annotations

import time

from voxcpm_api.engine.batched import engine as engine_module
from voxcpm_api.engine.batched.engine import BatchedConfig, BatchedEngine
from voxcpm_api.engine.batched.scheduler import batch_buckets_up_to


class StubModel:
    use_graphs = True
    graph_captures = 0

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple] = []
        self.fail_at = fail_at

    def _record(self, call: tuple) -> bool:
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("simulated out of memory")
        self.calls.append(call)
        return True

    def capture(self, rows: int, att_positions: int, solver_steps: int, with_lora: bool) -> bool:
        return self._record(("step", rows, att_positions, solver_steps, with_lora))

    def capture_prefill(self, rows: int, length: int) -> bool:
        return self._record(("prefill", rows, length))


def engine_with(model: StubModel, max_rows: int = 16) -> BatchedEngine:
    engine = BatchedEngine(BatchedConfig(model="tiny", device="cpu", max_rows=max_rows, max_seq_len=1024,
                                         capture_attention_lens=(256, 512)))
    engine._model = model  # white-box: the loop thread's idle work, without a GPU
    engine._load_started = time.perf_counter()
    return engine


def drain(engine: BatchedEngine) -> None:
    for _ in range(1000):
        if not engine._deferred_captures:
            return
        engine._capture_deferred()
    raise AssertionError("the deferred captures never ran out")


def test_start_up_queue_holds_every_step_graph_then_the_common_prefills() -> None:
    model = StubModel()
    engine = engine_with(model)
    engine._queue_captures(with_lora=False)
    buckets = batch_buckets_up_to(16)
    prefill_buckets = len(engine_module.DEFERRED_PREFILL_LENGTHS) * len(engine_module.DEFERRED_PREFILL_PROMPTS)
    assert engine.stats()["captures_deferred"] == 2 * len(buckets) + prefill_buckets
    assert engine.stats()["all_captured_s"] is None
    drain(engine)
    steps = [c for c in model.calls if c[0] == "step"]
    solver_steps = engine.config.capture_solver_steps
    assert steps == [("step", rows, n, solver_steps, False) for n in (256, 512) for rows in reversed(buckets)]
    prefills = [c for c in model.calls if c[0] == "prefill"]
    assert prefills == [("prefill", p, n) for n in engine_module.DEFERRED_PREFILL_LENGTHS
                        for p in engine_module.DEFERRED_PREFILL_PROMPTS]
    assert model.calls[: len(steps)] == steps  # decode graphs first: every request needs them
    stats = engine.stats()
    assert stats["captures_deferred"] == 0 and stats["all_captured_s"] is not None


def test_after_an_adapter_wraps_layers_both_kinds_of_step_are_queued_and_prompts_fit_the_rows() -> None:
    model = StubModel()
    engine = engine_with(model, max_rows=2)
    engine._queue_captures(with_lora=False)
    drain(engine)
    first = engine.stats()["all_captured_s"]
    model.calls.clear()
    engine._queue_captures(with_lora=True)
    drain(engine)
    lora = [c[-1] for c in model.calls if c[0] == "step"]
    # every row bucket x two attention lengths (the model skips a key it holds: 1 row runs as 2 when compiled)
    assert lora.count(True) == lora.count(False) == 2 * len(batch_buckets_up_to(2))
    assert {c[1] for c in model.calls if c[0] == "prefill"} == {1, 2}  # no prefill of more prompts than rows
    assert engine.stats()["all_captured_s"] == first  # the start-up figure stays


def test_a_failed_capture_leaves_the_rest_to_requests() -> None:
    model = StubModel(fail_at=3)
    engine = engine_with(model)
    engine._queue_captures(with_lora=False)
    drain(engine)
    assert len(model.calls) == 3
    assert engine.stats()["captures_deferred"] == 0
    assert engine.stats()["all_captured_s"] is not None


def test_deferred_captures_wait_for_a_quiet_loop() -> None:
    """A capture cannot be interrupted: one started between a busy client's back-to-back requests delayed the
    next request by up to a capture. The loop thread starts one only after CAPTURE_QUIET_S without a step."""
    import threading

    import torch

    model = StubModel()
    model.device = torch.device("cpu")  # type: ignore[attr-defined]
    engine = engine_with(model)
    engine._queue_captures(with_lora=False)
    engine._busy_at = time.perf_counter()  # as if a decode step had just run
    loop = threading.Thread(target=engine._loop, daemon=True)
    loop.start()
    try:
        time.sleep(engine_module.CAPTURE_QUIET_S * 0.6)
        assert model.calls == []  # still within the quiet period after the last step
        deadline = time.perf_counter() + 10
        while engine._deferred_captures and time.perf_counter() < deadline:
            time.sleep(0.05)
        assert not engine._deferred_captures and model.calls  # then the queue drains
    finally:
        engine._closed.set()
        loop.join(timeout=10)
