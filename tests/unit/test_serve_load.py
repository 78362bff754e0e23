"""bench/serve_load.py's throughput: prorated, so a window's phase against closed-loop waves does not move it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from serve_load import summarize  # noqa: E402


def request(sent_s: float, done_s: float, audio_s: float = 6.4, error: str | None = None) -> dict:
    return {"kind": "sync", "lora": None, "sent_s": sent_s, "first_byte_s": None, "done_s": done_s,
            "status": 200 if error is None else 500, "audio_s": audio_s if error is None else 0.0, "bytes": 1,
            "error": error}


@pytest.mark.parametrize("phase_s", [0.0, 0.5, 1.0, 1.9])
def test_throughput_does_not_depend_on_where_the_window_falls_between_waves(phase_s: float) -> None:
    waves = [request(t, t + 2.0) for t in (0.0, 2.0, 4.0, 6.0, 8.0)]  # one 6.4 s request every 2 s, back to back
    summary = summarize(waves, [phase_s + 1.0, phase_s + 6.0])
    assert summary["throughput_audio_s_per_s"] == pytest.approx(3.2)


def test_failed_requests_add_no_audio_and_count_as_errors() -> None:
    summary = summarize([request(0.0, 2.0), request(0.0, 2.0, error="boom")], [0.0, 2.0])
    assert summary["throughput_audio_s_per_s"] == pytest.approx(3.2)
    assert summary["errors"] == 1
