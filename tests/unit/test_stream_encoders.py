"""Incremental encoders, time-stretching and live crossfading (src/voxcpm_api/audio/streaming.py).

Every encoder is fed patch-sized pieces and must (a) hand out bytes while it is being fed, not only
at finish(), and (b) produce bytes that a real decoder (libsndfile, or FFmpeg through PyAV for AAC
and unknown-length FLAC, which libsndfile cannot read to the end) decodes to the right rate and
duration.
"""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest
import soundfile as sf

from voxcpm_api.audio.encoders import crossfade_concat, encode_audio
from voxcpm_api.audio.streaming import STREAM_FORMATS, StreamCrossfader, StreamEncoder, TimeStretcher

# Codecs that need look-ahead add a little at the start (no Xing/LAME tag or AAC priming info in a
# raw stream): at most LAME's 1105-sample delay plus a frame of padding, or AAC's 1024 + one frame.
EXTRA_S = {"mp3": 0.16, "aac": 0.16}


def speechlike(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (tone + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def patches(samples: np.ndarray, rate: int, patch_s: float = 0.08) -> list[np.ndarray]:
    size = int(rate * patch_s)
    return [samples[i:i + size] for i in range(0, samples.size, size)]


def decode(data: bytes, fmt: str, rate: int) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0, rate
    if fmt in ("aac", "flac"):
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]
            joined = np.concatenate(frames)
            if np.issubdtype(joined.dtype, np.integer):  # FLAC decodes to s16
                return joined.astype(np.float32) / 32768.0, stream.rate
            return joined.astype(np.float32), stream.rate
    samples, decoded_rate = sf.read(io.BytesIO(data), dtype="float32")
    return samples, decoded_rate


@pytest.mark.parametrize("rate", [16000, 44100])
@pytest.mark.parametrize("fmt", STREAM_FORMATS)
def test_fed_in_patches_decodes_to_the_right_duration(fmt: str, rate: int) -> None:
    audio = speechlike(1.6, rate)
    encoder = StreamEncoder(fmt, rate)
    pieces = [encoder.feed(p) for p in patches(audio, rate)]
    tail = encoder.finish()
    data = b"".join(pieces) + tail

    # bytes leave while feeding: from the second patch on at the latest, and most patches yield some
    assert any(pieces[:2]), f"{fmt}: nothing after two patches"
    assert sum(1 for p in pieces if p) >= len(pieces) // 2, f"{fmt}: output only at the end"

    samples, decoded_rate = decode(data, fmt, encoder.sample_rate_hz)
    assert decoded_rate == encoder.sample_rate_hz
    duration = samples.shape[0] / decoded_rate
    assert duration >= 1.6 - 1e-3
    assert duration <= 1.6 + EXTRA_S.get(fmt, 1e-3), f"{fmt}: {duration:.4f}s"
    if fmt in ("wav", "pcm", "flac"):  # lossless: exactly the int16 samples
        expected = np.rint(np.clip(audio, -1, 1) * 32767).astype(np.int16)
        scale = 32768.0 if fmt == "flac" else 32767.0  # ffmpeg's int->float scale vs ours
        if fmt == "wav":
            scale = 32768.0  # libsndfile reads PCM_16 as x / 32768
        decoded = np.rint(samples * scale).astype(np.int16)
        assert np.array_equal(decoded[: expected.size], expected)
    else:  # lossy: still the same sound (dominant frequency 220 Hz)
        spectrum = np.abs(np.fft.rfft(samples.reshape(-1)))
        peak_hz = np.argmax(spectrum[1:]) * decoded_rate / samples.shape[0]
        assert 200 < peak_hz < 240, f"{fmt}: peak at {peak_hz:.0f} Hz"


def test_rates_the_codecs_do_not_support_are_converted() -> None:
    audio = speechlike(0.5, 22050)
    for fmt, expected in [("opus", 48000), ("mp3", 22050), ("aac", 22050), ("wav", 22050)]:
        encoder = StreamEncoder(fmt, 22050)
        assert encoder.sample_rate_hz == expected
        data = b"".join(encoder.feed(p) for p in patches(audio, 22050)) + encoder.finish()
        _, rate = decode(data, fmt, expected)
        assert rate == expected
    assert StreamEncoder("opus", 44100).sample_rate_hz == 48000
    assert StreamEncoder("aac", 44100).sample_rate_hz == 44100


def test_wav_stream_header_says_unknown_length_and_pcm_matches_the_file_encoder() -> None:
    audio = speechlike(0.3, 16000)
    encoder = StreamEncoder("wav", 16000)
    first = encoder.feed(audio[:1280])
    assert first[:4] == b"RIFF" and first[8:16] == b"WAVEfmt "
    assert struct.unpack("<I", first[4:8])[0] == 0xFFFFFFFF
    assert first[36:40] == b"data" and struct.unpack("<I", first[40:44])[0] == 0xFFFFFFFF
    rest = encoder.feed(audio[1280:]) + encoder.finish()
    assert first[44:] + rest == encode_audio(audio, 16000, "pcm")
    pcm = StreamEncoder("pcm", 16000)
    assert b"".join(pcm.feed(p) for p in patches(audio, 16000)) + pcm.finish() == encode_audio(audio, 16000, "pcm")


@pytest.mark.parametrize("fmt", STREAM_FORMATS)
def test_nothing_fed_still_gives_a_valid_stream(fmt: str) -> None:
    encoder = StreamEncoder(fmt, 16000)
    data = encoder.finish()
    if fmt == "pcm":
        assert data == b""
        return
    samples, _ = decode(data, fmt, encoder.sample_rate_hz)
    assert samples.shape[0] < 16000 * 0.2


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError):
        StreamEncoder("ogg", 16000)
    with pytest.raises(ValueError):
        StreamEncoder("mp3", 0)
    encoder = StreamEncoder("mp3", 16000)
    encoder.finish()
    assert encoder.finish() == b""
    with pytest.raises(RuntimeError):
        encoder.feed(np.zeros(10, dtype=np.float32))


def test_whole_aac_file_decodes() -> None:
    audio = speechlike(1.0, 24000)
    encoder = StreamEncoder("aac", 24000)
    samples, rate = decode(encoder.feed(audio) + encoder.finish(), "aac", 24000)
    assert rate == 24000 and 1.0 <= samples.shape[0] / rate <= 1.0 + EXTRA_S["aac"]


# ---- time stretching ----------------------------------------------------------------------------


@pytest.mark.parametrize("speed", [0.25, 0.5, 1.5, 2.0, 4.0])
def test_speed_changes_duration_not_pitch_also_when_streamed(speed: float) -> None:
    rate = 16000
    audio = speechlike(2.0, rate)
    stretcher = TimeStretcher(speed, rate)
    pieces = [stretcher.feed(p) for p in patches(audio, rate)]
    out = np.concatenate([*pieces, stretcher.finish()])
    assert sum(1 for p in pieces if p.size) >= len(pieces) // 2, "stretched audio must come out while fed"
    assert abs(out.size - audio.size / speed) <= 0.03 * audio.size / speed
    spectrum = np.abs(np.fft.rfft(out))
    peak_hz = np.argmax(spectrum[1:]) * rate / out.size
    assert abs(peak_hz - 220) < 10, f"pitch moved to {peak_hz:.0f} Hz"


def test_speed_one_is_the_identity_and_limits_hold() -> None:
    audio = speechlike(0.5, 16000)
    stretcher = TimeStretcher(1.0, 16000)
    assert np.array_equal(stretcher.feed(audio), audio)
    assert stretcher.finish().size == 0
    for bad in (0.2, 4.5):
        with pytest.raises(ValueError):
            TimeStretcher(bad, 16000)


# ---- live crossfade -----------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [(3, 5, 2), (2, 2), (7,), (4, 1, 3)])
def test_live_crossfade_equals_the_file_crossfade(lengths: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(lengths))
    chunks = [rng.standard_normal(1280 * n).astype(np.float32) for n in lengths]
    joiner = StreamCrossfader(16000)
    out: list[np.ndarray] = []
    for index, chunk in enumerate(chunks):
        joiner.start_chunk(last=index == len(chunks) - 1)
        for piece in np.split(chunk, len(chunk) // 1280):
            out.append(joiner.push(piece))
        out.append(joiner.end_chunk())
    out.append(joiner.finish())
    assert np.allclose(np.concatenate(out), crossfade_concat(chunks, 16000), atol=1e-6)


def test_single_chunk_passes_through_without_delay() -> None:
    joiner = StreamCrossfader(16000)
    joiner.start_chunk(last=True)
    piece = np.ones(1280, dtype=np.float32)
    assert np.array_equal(joiner.push(piece), piece)
    assert joiner.end_chunk().size == 0 and joiner.finish().size == 0
