"""tasks/progress.BackgroundProgressWriter: progress writes leave the engine's loop thread."""

from __future__ import annotations

import threading
import time

from voxcpm_api.tasks.progress import BackgroundProgressWriter


def test_writes_happen_on_another_thread_newest_per_task_and_close_flushes() -> None:
    gate = threading.Event()
    written: list[tuple[str, float, str, float | None, str]] = []

    def write(task_id: str, progress: float, message: str, eta: float | None) -> None:
        gate.wait(5)  # a slow store: submit() must not wait for it
        written.append((task_id, progress, message, eta, threading.current_thread().name))

    writer = BackgroundProgressWriter(write)
    started = time.monotonic()
    writer.submit("a", 0.1, "one", None)
    time.sleep(0.05)  # the writer thread is now blocked inside write("a", 0.1)
    for i in range(2, 10):
        writer.submit("a", i / 10, f"step {i}", 1.0)
    writer.for_task("b")(0.5, "b half", 2.0)
    assert time.monotonic() - started < 1.0, "submit() waited for the store"
    gate.set()
    writer.close()
    assert written[0][:3] == ("a", 0.1, "one")
    assert ("a", 0.9, "step 9", 1.0) in [w[:4] for w in written]
    assert ("b", 0.5, "b half", 2.0) in [w[:4] for w in written]
    assert len(written) == 3, written  # the 8 queued writes for "a" collapsed into the newest
    assert {w[4] for w in written} == {"progress-writer"}


def test_a_failing_write_does_not_stop_the_writer() -> None:
    written: list[str] = []

    def write(task_id: str, progress: float, message: str, eta: float | None) -> None:
        if task_id == "bad":
            raise RuntimeError("database is locked")
        written.append(task_id)

    writer = BackgroundProgressWriter(write)
    writer.submit("bad", 0.1, "x", None)
    time.sleep(0.05)
    writer.submit("good", 0.2, "y", None)
    writer.close()
    assert written == ["good"]
