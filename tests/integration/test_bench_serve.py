"""bench/bench_serve.py end to end on the tiny random checkpoint, on the CPU: real start_api.py server, real
load generator processes, every step short. Checks the report, not the speed: every step ran, every kind of
request completed without an error, the numbers are positive, the targets table and both files exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bench-serve")]

# Everything short: 16-patch requests (2.56 s of audio, one text token), 3 s windows (a stream takes ~1.5 s
# on two busy cores), two open-loop rates.
HARNESS_ARGS = [
    "--model", "voxcpm1.5", "--tiny", "--device", "cpu", "--skip-engine", "--profiles", "best",
    "--audio-s", "2.56", "--texts", "3000", "--burst", "4", "--clients", "1,2", "--warmup-s", "1",
    "--duration-s", "3", "--base-clients", "2", "--ttfb-clients", "1,2", "--ttfb-duration-s", "3",
    "--mix-clients", "5", "--open-fractions", "0.5,1.0", "--open-warmup-s", "1", "--open-duration-s", "2",
]
MIX_KINDS = {"sync", "async", "stream", "openai", "voice"}


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    tmp = tmp_path_factory.mktemp("bench-serve")
    out = tmp / "out"
    cmd = [sys.executable, str(REPO_ROOT / "bench" / "bench_serve.py"), *HARNESS_ARGS, "--out-dir", str(out),
           "--ckpt-root", str(tmp / "ckpt")]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    return done, out


def report(out: Path) -> dict:
    files = sorted(out.glob("serve-voxcpm1.5-tiny-*.json"))
    assert len(files) == 1, f"one JSON report expected in {out}: {files}"
    return json.loads(files[0].read_text(encoding="utf-8"))


def test_the_run_succeeds_and_writes_both_files(harness) -> None:
    done, out = harness
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = report(out)
    md = out / "serve-voxcpm1.5-tiny-cpu.md"
    assert md.is_file() and "## Targets" in md.read_text(encoding="utf-8")
    assert (out / "logs" / "serve-voxcpm1.5-tiny-cpu-best.log").stat().st_size > 0
    assert data["complete"] is True and not data.get("errors") and not data.get("skipped"), data.get("errors")
    assert data["command"] and data["date"] and data["device_name"] == "cpu"


def test_every_step_ran_with_positive_numbers_and_no_errors(harness) -> None:
    _, out = harness
    prof = report(out)["profiles"]["best"]
    assert prof["start_to_ready_s"] > 0 and "died" not in prof
    steps = prof["steps"]
    rows = [steps["burst"], steps["closed"]["c1"], steps["closed"]["c2"], steps["base"]["c2"],
            steps["stream"]["c1"], steps["stream"]["c2"], steps["mix"]]
    for row in rows:
        assert row["errors"] == 0 and row["completed"] > 0, row
        assert row["throughput_audio_s_per_s"] > 0 and row["latency_ms_p50"] > 0 and row["rtf_p50"] > 0, row
        assert row["server_cores"] > 0 and row["client_cores"] > 0, row
        assert abs(row["audio_s_per_request_p50"] - 2.56) < 0.01, row  # one text token -> 16 patches
    for row in (steps["stream"]["c1"], steps["stream"]["c2"]):
        assert 0 < row["ttfb_ms_p50"] <= row["latency_ms_p50"], row


def test_every_kind_of_request_completed_in_the_mix(harness) -> None:
    _, out = harness
    mix = report(out)["profiles"]["best"]["steps"]["mix"]
    assert mix["voice"]["usable"] is True, mix["voice"]
    assert set(mix["kinds"]) == MIX_KINDS
    for kind in MIX_KINDS:
        got = mix["by_kind"][kind]
        assert got["requests_total"] > 0 and got["errors"] == 0, (kind, got)
    for kind in ("stream", "openai"):  # TTFB where the window holds a completed one (2 s windows: not always)
        got = mix["by_kind"][kind]
        assert got["completed"] == 0 or got["ttfb_ms_p50"] > 0, (kind, got)


def test_the_open_loop_sweep_and_the_targets(harness) -> None:
    _, out = harness
    data = report(out)
    sweep = data["profiles"]["best"]["steps"]["open"]
    assert sweep["rates"] and sweep["guide_requests_per_s"] > 0
    for row in sweep["rates"]:
        assert row["requests_total"] > 0 and row["arrivals_per_s"] >= 0, row
    targets = data["targets"]
    assert targets["zero_errors"]["value"] == 0 and targets["zero_errors"]["met"] is True
    assert targets["stream_ttfb_p50_c1_ms"]["value"] > 0
    assert targets["served_vs_official_c64"]["value"] is None  # --skip-engine: no baseline, no invented ratio
