"""What the task layer reports as it works, for metrics. No torch, no prometheus here.

The runner and the service call an `Events` object at fixed points; `NullEvents` ignores them and
`api/metrics.py` turns them into Prometheus series. Calls happen on the event loop or in the
engine thread, so implementations must be thread-safe and fast (counters, histograms).
"""

from __future__ import annotations

from typing import Protocol


class Events(Protocol):
    def request_finished(self, endpoint: str, status_code: int) -> None:
        """Every HTTP request, successful or not: its route template ("/task/{task_id}") and final status."""

    def generation_started(self, kind: str, lora: str | None, voice: str | None) -> None:
        """kind: "task" (queued or sync) or "stream"."""

    def first_audio(self, kind: str, seconds: float, lora: str | None, voice: str | None) -> None:
        """Time from the request's arrival to its first audio (first patch for tasks, first byte for streams)."""

    def generation_finished(self, kind: str, outcome: str, audio_s: float, wall_s: float, lora: str | None,
                            voice: str | None) -> None:
        """outcome: completed | failed | cancelled. RTF = wall_s / audio_s."""


class NullEvents:
    def request_finished(self, endpoint: str, status_code: int) -> None:
        pass

    def generation_started(self, kind: str, lora: str | None, voice: str | None) -> None:
        pass

    def first_audio(self, kind: str, seconds: float, lora: str | None, voice: str | None) -> None:
        pass

    def generation_finished(self, kind: str, outcome: str, audio_s: float, wall_s: float, lora: str | None,
                            voice: str | None) -> None:
        pass
