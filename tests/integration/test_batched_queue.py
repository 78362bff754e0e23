"""Requests that wait for a batch row: cancelling one ends it before it gets a row (tiny model, CPU)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from voxcpm_api import errors
from voxcpm_api.engine.base import ChunkRequest
from voxcpm_api.engine.batched.engine import BatchedConfig, BatchedEngine


@pytest.mark.xdist_group("batched-parity-voxcpm")
def test_a_queued_request_is_cancelled_before_it_gets_a_row(tiny_root: Path) -> None:
    engine = BatchedEngine(BatchedConfig(model="tiny", device="cpu", max_rows=1, cache_dir=tiny_root))
    engine.load()
    try:
        first_patch = threading.Event()
        stop = threading.Event()
        outcome: dict[str, object] = {}

        def long_row() -> None:
            request = ChunkRequest(text="A long sentence keeps the only row busy.", adapter=None, cfg_scale=2.0,
                                   steps=4, seed=1, max_patches=60)
            outcome["long"] = engine.generate(request, first_patch.set)

        def check() -> None:
            if stop.is_set():
                raise errors.TaskCancelled("cancelled by request")

        patches: list[int] = []

        def queued_row() -> None:
            request = ChunkRequest(text="Waiting for a row.", adapter=None, cfg_scale=2.0, steps=4, seed=2,
                                   stop_check=check)
            try:
                engine.generate(request, lambda: patches.append(1))
            except errors.TaskCancelled as exc:
                outcome["queued"] = exc
                outcome["queued_at"] = time.monotonic()

        busy = threading.Thread(target=long_row)
        busy.start()
        assert first_patch.wait(60)
        waiting = threading.Thread(target=queued_row)
        waiting.start()
        time.sleep(0.3)
        assert engine.load_summary().queued_rows == 1  # the only row is taken: it waits
        stop.set()
        waiting.join(30)
        assert isinstance(outcome.get("queued"), errors.TaskCancelled)
        assert patches == []  # it never produced a patch
        assert busy.is_alive() or "long" in outcome  # the running row was not disturbed
        busy.join(120)
        assert len(outcome["long"]) > 0  # type: ignore[arg-type]
    finally:
        engine.close()
