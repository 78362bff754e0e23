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
