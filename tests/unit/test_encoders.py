"""Unit tests for voxcpm_api.audio.encoders."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voxcpm_api.audio import encoders
from voxcpm_api.audio.encoders import (
    FILE_EXTENSIONS,
    MEDIA_TYPES,
    MP3_SAMPLE_RATES,
    SUPPORTED_FORMATS,
    crossfade_concat,
    encode_audio,
    mp3_sample_rate_for,
    opus_sample_rate_for,
    probe_duration_s,
    write_atomic,
)


def tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    y, sr = sf.read(io.BytesIO(data), dtype="float32")
    return y, sr


# --------------------------------------------------------------------------- tables


def test_tables_cover_all_formats():
    assert set(SUPPORTED_FORMATS) == {"mp3", "wav", "flac", "opus", "pcm"}
    assert set(MEDIA_TYPES) == set(SUPPORTED_FORMATS) == set(FILE_EXTENSIONS)
    assert MEDIA_TYPES["mp3"] == "audio/mpeg"
    assert MEDIA_TYPES["opus"] == "audio/ogg"
    assert MEDIA_TYPES["pcm"] == "audio/pcm"
    assert FILE_EXTENSIONS["opus"] == ".opus"
    assert FILE_EXTENSIONS["pcm"] == ".pcm"
    assert all(ext.startswith(".") for ext in FILE_EXTENSIONS.values())


# --------------------------------------------------------------------------- lossless formats


@pytest.mark.parametrize("rate", [16000, 24000, 44100, 48000])
@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_lossless_round_trip_exact(fmt, rate):
    x = tone(0.5, rate)
    data = encode_audio(x, rate, fmt)
    info = sf.info(io.BytesIO(data))
    assert info.format == fmt.upper()
    assert info.subtype == "PCM_16"
    assert info.channels == 1
    y, sr = sf.read(io.BytesIO(data), dtype="int16")
    assert sr == rate
    assert y.shape == x.shape
    np.testing.assert_array_equal(y, np.rint(x * 32767).astype(np.int16))
    assert probe_duration_s(data) == pytest.approx(len(x) / rate)


def test_pcm_is_raw_int16_le_and_matches_wav_payload():
    rate = 24000
    x = tone(0.3, rate)
    pcm = encode_audio(x, rate, "pcm")
    assert len(pcm) == 2 * len(x)
    ints = np.frombuffer(pcm, dtype="<i2")
    np.testing.assert_array_equal(ints, np.rint(x * 32767).astype(np.int16))
    wav = encode_audio(x, rate, "wav")
    assert wav.endswith(pcm)  # canonical 44-byte header + identical sample data
    assert len(wav) == 44 + len(pcm)


def test_clipping_and_non_finite_values():
    x = np.array([0.0, 2.0, -2.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 0.5], dtype=np.float32)
    ints = np.frombuffer(encode_audio(x, 16000, "pcm"), dtype="<i2")
    assert ints.tolist() == [0, 32767, -32767, 32767, -32767, 0, 0, 0, 16384]
    y, _ = sf.read(io.BytesIO(encode_audio(x, 16000, "wav")), dtype="int16")
    assert y.tolist() == ints.tolist()
    for fmt in ("mp3", "opus", "flac"):
        y, _ = decode(encode_audio(x, 16000, fmt))
        assert np.all(np.isfinite(y))
    # input buffer is not modified
    assert np.isnan(x[5]) and x[1] == 2.0


def test_accepts_float64_and_column_vector():
    x = tone(0.1, 16000).astype(np.float64)
    a = encode_audio(x, 16000, "pcm")
    b = encode_audio(x.reshape(-1, 1), 16000, "pcm")
    assert a == b == encode_audio(x.astype(np.float32), 16000, "pcm")


def test_rejects_bad_input():
    x = tone(0.1, 16000)
    with pytest.raises(ValueError):
        encode_audio(x, 16000, "aac")
    with pytest.raises(ValueError):
        encode_audio(x, 16000, "")
    with pytest.raises(ValueError):
        encode_audio(np.zeros((2, 100), np.float32), 16000, "wav")
    with pytest.raises(ValueError):
        encode_audio(x, 0, "wav")


def test_format_is_case_insensitive():
    x = tone(0.1, 16000)
    assert encode_audio(x, 16000, "WAV") == encode_audio(x, 16000, "wav")


# --------------------------------------------------------------------------- lossy formats


@pytest.mark.parametrize("rate", list(MP3_SAMPLE_RATES))
def test_mp3_native_rates_decode(rate):
    x = tone(1.0, rate, freq=300.0)
    data = encode_audio(x, rate, "mp3")
    assert data[:3] == b"ID3" or data[0] == 0xFF
    y, sr = decode(data)
    assert sr == rate
    assert abs(len(y) / sr - 1.0) < 0.06
    assert probe_duration_s(data) == pytest.approx(1.0, abs=0.06)
    # it is the same tone: correlation with the input is high
    n = min(len(x), len(y))
    c = np.corrcoef(x[:n], y[:n])[0, 1]
    assert c > 0.9


@pytest.mark.parametrize(("rate", "expected"), [(96000, 48000), (7000, 8000), (20000, 22050), (40000, 44100)])
def test_mp3_unsupported_rates_are_resampled_to_nearest(rate, expected):
    assert mp3_sample_rate_for(rate) == expected
    x = tone(0.5, rate, freq=300.0)
    y, sr = decode(encode_audio(x, rate, "mp3"))
    assert sr == expected
    assert abs(len(y) / sr - 0.5) < 0.06


def test_mp3_duration_10s_44k():
    x = tone(10.0, 44100, freq=220.0)
    data = encode_audio(x, 44100, "mp3")
    assert probe_duration_s(data) == pytest.approx(10.0, abs=0.06)
    assert len(data) < len(x)  # far smaller than 16-bit PCM would be


@pytest.mark.parametrize("rate", [44100, 22050, 32000, 96000])
def test_opus_non_native_rates_decode_at_48k(rate):
    assert opus_sample_rate_for(rate) == 48000
    x = tone(1.0, rate, freq=300.0)
    data = encode_audio(x, rate, "opus")
    assert data[:4] == b"OggS"
    assert b"OpusHead" in data[:200]
    y, sr = decode(data)
    assert sr == 48000
    assert abs(len(y) / sr - 1.0) < 0.03
    assert probe_duration_s(data) == pytest.approx(1.0, abs=0.03)
    n = min(len(y), 48000)
    ref = tone(1.0, 48000, freq=300.0)[:n]
    assert np.corrcoef(ref, y[:n])[0, 1] > 0.9


@pytest.mark.parametrize("rate", [8000, 12000, 16000, 24000, 48000])
def test_opus_native_rates_kept(rate):
    x = tone(0.5, rate, freq=300.0)
    y, sr = decode(encode_audio(x, rate, "opus"))
    assert sr == rate
    assert abs(len(y) / sr - 0.5) < 0.03


@pytest.mark.parametrize("fmt", list(SUPPORTED_FORMATS))
def test_empty_input(fmt):
    data = encode_audio(np.zeros(0, np.float32), 24000, fmt)
    if fmt == "pcm":
        assert data == b""
        return
    y, _ = decode(data)
    assert len(y) <= 1
    assert probe_duration_s(data) < 0.01


def test_probe_rejects_raw_pcm():
    with pytest.raises(ValueError):
        probe_duration_s(encode_audio(tone(0.1, 16000), 16000, "pcm"))
    with pytest.raises(ValueError):
        probe_duration_s(b"")


# --------------------------------------------------------------------------- crossfade


def test_crossfade_empty_and_single():
    out = crossfade_concat([], 24000)
    assert out.dtype == np.float32 and out.shape == (0,)
    x = np.random.default_rng(0).uniform(-1, 1, 5000).astype(np.float32)
    y = crossfade_concat([x], 24000)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x)  # bit-exact
    assert not np.shares_memory(x, y)
    # empty chunks are ignored, the single real chunk is still returned unchanged
    np.testing.assert_array_equal(crossfade_concat([np.zeros(0, np.float32), x, np.zeros(0)], 24000), x)
    assert crossfade_concat([np.zeros(0, np.float32)], 24000).shape == (0,)


@pytest.mark.parametrize("curve", ["equal_power", "linear"])
def test_crossfade_lengths(curve):
    rate = 24000
    ov = round(0.040 * rate)  # 960 samples
    a, b, c = np.ones(10000, np.float32), np.ones(8000, np.float32), np.ones(6000, np.float32)
    out = crossfade_concat([a, b, c], rate, curve=curve)
    assert out.dtype == np.float32
    assert len(out) == 10000 + 8000 + 6000 - 2 * ov
    # overlap limited to half the shorter neighbour
    short = np.ones(100, np.float32)
    out = crossfade_concat([a, short, b], rate, curve=curve)
    assert len(out) == 10000 + 100 + 8000 - 2 * 50
    # crossfade 0 is plain concatenation
    np.testing.assert_array_equal(crossfade_concat([a, b], rate, crossfade_ms=0), np.concatenate([a, b]))
    # tiny chunks (1 sample -> overlap 0)
    assert len(crossfade_concat([np.ones(1, np.float32), np.ones(1, np.float32)], rate)) == 2


def test_crossfade_bodies_untouched():
    rate = 16000
    rng = np.random.default_rng(1)
    a, b = rng.uniform(-1, 1, 4000).astype(np.float32), rng.uniform(-1, 1, 4000).astype(np.float32)
    ov = round(0.040 * rate)
    out = crossfade_concat([a, b], rate)
    np.testing.assert_array_equal(out[: 4000 - ov], a[: 4000 - ov])
    np.testing.assert_array_equal(out[4000:], b[ov:])


def test_crossfade_linear_reconstructs_overlapping_signal():
    rate = 24000
    x = tone(1.0, rate, freq=123.0)
    ov = round(0.040 * rate)
    a, b = x[: 12000 + ov], x[12000:]  # chunks share `ov` samples
    out = crossfade_concat([a, b], rate, curve="linear")
    np.testing.assert_allclose(out, x, atol=1e-6)


def test_crossfade_equal_power_gains():
    rate = 24000
    ov = round(0.040 * rate)
    a, b = np.ones(4000, np.float32), np.ones(4000, np.float32)
    out = crossfade_concat([a, b], rate)
    seg = out[4000 - ov : 4000]
    # cos + sin: between 1 and sqrt(2), symmetric, 1 at the edges
    assert seg.min() >= 1.0 - 1e-3 and seg.max() <= np.sqrt(2) + 1e-6
    assert seg.max() > 1.4
    # power of uncorrelated noise stays constant through the fade
    rng = np.random.default_rng(2)
    n1, n2 = rng.standard_normal(200000).astype(np.float32), rng.standard_normal(200000).astype(np.float32)
    long_ov = 4000
    out = crossfade_concat([n1, n2], 1000 * long_ov // 40, crossfade_ms=40.0)
    mid = out[200000 - long_ov : 200000]
    assert np.var(mid) == pytest.approx(1.0, rel=0.1)


def test_crossfade_removes_discontinuity():
    rate = 24000
    a = np.full(4800, 0.8, np.float32)
    b = np.full(4800, -0.8, np.float32)
    hard = np.concatenate([a, b])
    assert np.max(np.abs(np.diff(hard))) == pytest.approx(1.6)
    for curve in ("equal_power", "linear"):
        out = crossfade_concat([a, b], rate, curve=curve)
        assert np.max(np.abs(np.diff(out))) < 0.01
        assert out[0] == pytest.approx(0.8) and out[-1] == pytest.approx(-0.8)


def test_crossfade_does_not_modify_inputs_and_validates():
    a = np.ones(1000, np.float32)
    b = np.ones(1000, np.float32)
    crossfade_concat([a, b], 16000)
    assert np.all(a == 1) and np.all(b == 1)
    with pytest.raises(ValueError):
        crossfade_concat([a, b], 16000, curve="cubic")
    with pytest.raises(ValueError):
        crossfade_concat([np.ones((2, 10), np.float32)], 16000)


# --------------------------------------------------------------------------- write_atomic


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".part") or p.name.startswith(".")]


def test_write_atomic_creates_and_replaces(tmp_path):
    target = tmp_path / "out.wav"
    write_atomic(target, b"first")
    assert target.read_bytes() == b"first"
    write_atomic(target, b"second version")
    assert target.read_bytes() == b"second version"
    assert _leftovers(tmp_path) == []
    assert os.listdir(tmp_path) == ["out.wav"]
    assert (target.stat().st_mode & 0o777) == 0o644


def test_write_atomic_cleans_up_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.mp3"
    write_atomic(target, b"old")

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(encoders.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []

    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_write_atomic_temp_name_pattern(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(Path(src))
        assert Path(src).read_bytes() == b"payload"  # fully written before the rename
        real_replace(src, dst)

    monkeypatch.setattr(encoders.os, "replace", spy)
    write_atomic(tmp_path / "a.flac", b"payload")
    assert len(seen) == 1
    assert seen[0].parent == tmp_path
    assert seen[0].name.startswith(".") and seen[0].name.endswith(".part")


def test_write_atomic_readers_never_see_partial_file(tmp_path):
    target = tmp_path / "big.bin"
    versions = [bytes([i]) * (1 << 20) for i in range(1, 6)]
    write_atomic(target, versions[0])
    stop = threading.Event()
    bad: list[int] = []

    def reader():
        while not stop.is_set():
            data = target.read_bytes()
            if data not in versions:
                bad.append(len(data))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(4):
            for v in versions:
                write_atomic(target, v)
    finally:
        stop.set()
        t.join()
    assert bad == []
    assert _leftovers(tmp_path) == []
