"""Real progress: generated patches over the expected patch count, across long-text chunks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..errors import TaskCancelled

ProgressWriter = Callable[[float, str, float | None], None]  # (progress 0..1, message, eta seconds)


class ShutdownRequested(TaskCancelled):
    """Raised at a patch boundary when the server stops gracefully; the task is re-queued."""


class PatchProgress:
    """Counts patches for one task, in the engine thread. Raises at a patch boundary on cancel.

    `expected_per_chunk` comes from the engine's estimate. While chunk i runs, the denominator is
    (patches done) + (what chunk i still expects, at least 1) + (what later chunks expect), so the
    ratio stays below 1 even when the model talks longer than estimated; the store keeps the
    maximum, so progress never goes backwards, and only a finished file sets 1.0.
    """

    def __init__(self, expected_per_chunk: list[int], write: ProgressWriter, cancel: threading.Event,
                 shutdown: threading.Event, min_write_interval_s: float = 0.2) -> None:
        self.expected = [max(1, n) for n in expected_per_chunk]
        self.write = write
        self.cancel = cancel
        self.shutdown = shutdown
        self.min_write_interval_s = min_write_interval_s
        self.chunk_index = 0
        self.done_total = 0
        self.done_in_chunk = 0
        self.started_at = time.monotonic()
        self._last_write = 0.0

    def start_chunk(self, index: int) -> None:
        self.chunk_index = index
        self.done_in_chunk = 0

    @property
    def fraction(self) -> float:
        left_in_chunk = max(self.expected[self.chunk_index] - self.done_in_chunk, 1)
        later = sum(self.expected[self.chunk_index + 1:])
        return self.done_total / (self.done_total + left_in_chunk + later)

    def eta_s(self) -> float | None:
        if self.done_total == 0:
            return None
        per_patch_s = (time.monotonic() - self.started_at) / self.done_total
        left = max(self.expected[self.chunk_index] - self.done_in_chunk, 1) + sum(self.expected[self.chunk_index + 1:])
        return per_patch_s * left

    def on_patch(self) -> None:
        self.done_total += 1
        self.done_in_chunk += 1
        if self.shutdown.is_set():
            raise ShutdownRequested("server is shutting down")
        if self.cancel.is_set():
            raise TaskCancelled("cancelled by request")
        now = time.monotonic()
        if now - self._last_write >= self.min_write_interval_s:
            self._last_write = now
            chunks = len(self.expected)
            where = f"chunk {self.chunk_index + 1}/{chunks}, " if chunks > 1 else ""
            self.write(self.fraction, f"Generating audio ({where}{self.done_total} patches)", self.eta_s())


class BackgroundProgressWriter:
    """Progress writes handed off to one thread of their own, newest per task only.

    A batched engine calls `on_patch` on the loop thread that steps every row; a SQLite write there
    (which may wait for the store's lock or for another process's transaction) would stall all rows.
    `submit` only records the newest value for the task and wakes the writer thread, which applies
    them with `write(task_id, progress, message, eta)`; the store keeps the maximum progress and only
    touches tasks still processing, so a late or skipped write is harmless.
    """

    def __init__(self, write: Callable[[str, float, str, float | None], None]) -> None:
        self._write = write
        self._pending: dict[str, tuple[float, str, float | None]] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="progress-writer", daemon=True)
        self._thread.start()

    def submit(self, task_id: str, progress: float, message: str, eta_s: float | None) -> None:
        with self._cond:
            self._pending[task_id] = (progress, message, eta_s)
            self._cond.notify()

    def for_task(self, task_id: str) -> ProgressWriter:
        return lambda progress, message, eta_s: self.submit(task_id, progress, message, eta_s)

    def close(self) -> None:
        """Apply what is pending, then stop the thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import logging

        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                batch, self._pending = self._pending, {}
                stopped = self._stopped
            for task_id, (progress, message, eta_s) in batch.items():
                try:
                    self._write(task_id, progress, message, eta_s)
                except Exception:  # progress is advisory; the next write or the final state corrects it
                    logging.getLogger("voxcpm_api.progress").exception("progress write for %s failed", task_id)
            if stopped and not batch:
                return
