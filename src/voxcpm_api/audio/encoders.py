"""Encode mono float audio into response formats, join chunks, write files atomically.

Formats (``fmt`` is case-insensitive):

``wav``   16-bit signed PCM in a RIFF/WAVE container, at the input rate.
``flac``  16-bit FLAC, at the input rate.
``pcm``   headerless signed 16-bit little-endian samples (2 bytes per sample).
``mp3``   MPEG-1/2/2.5 Layer III through libsndfile's LAME encoder, VBR with
          libsndfile's default quality (about 70 kbit/s for mono 44.1 kHz).
          LAME accepts only 8000, 11025, 12000, 16000, 22050, 24000, 32000,
          44100 and 48000 Hz; any other input rate is resampled with soxr to
          the *nearest* of those (ties go to the higher rate), so the decoded
          file reports that rate, not the input rate.
``opus``  Opus in an Ogg container. Opus accepts 8000, 12000, 16000, 24000 and
          48000 Hz; those rates are encoded as-is (libsndfile stores the input
          rate in the Opus header and decodes back to it), any other rate is
          resampled with soxr to 48000 Hz first.

All integer formats use the same float -> int16 conversion (NaN/inf -> 0, clip
to [-1, 1], multiply by 32767, round half to even), so the ``pcm`` bytes equal
the data chunk of the ``wav`` output.

Empty input encodes to a valid but empty ``wav`` and to ``b""`` for ``pcm``.
libsndfile writes nothing at all for zero-frame MP3/FLAC/Opus files, so for
those one silent sample is encoded instead; the result decodes everywhere.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

__all__ = [
    "FILE_EXTENSIONS",
    "MEDIA_TYPES",
    "MP3_SAMPLE_RATES",
    "OPUS_SAMPLE_RATES",
    "SUPPORTED_FORMATS",
    "check_format_and_rate",
    "crossfade_concat",
    "encode_audio",
    "encoded_sample_rate_for",
    "mp3_sample_rate_for",
    "opus_sample_rate_for",
    "probe_duration_s",
    "to_int16",
    "write_atomic",
]

SUPPORTED_FORMATS: tuple[str, ...] = ("mp3", "wav", "flac", "opus", "pcm")

MEDIA_TYPES: dict[str, str] = {
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "flac": "audio/flac",
    "opus": "audio/ogg",
    "pcm": "audio/pcm",
}

FILE_EXTENSIONS: dict[str, str] = {
    "mp3": ".mp3",
    "wav": ".wav",
    "flac": ".flac",
    "opus": ".opus",
    "pcm": ".pcm",
}

#: Rates libsndfile's MPEG encoder accepts (MPEG-1, MPEG-2 and MPEG-2.5 rates).
MP3_SAMPLE_RATES: tuple[int, ...] = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
#: Rates the Opus encoder accepts.
OPUS_SAMPLE_RATES: tuple[int, ...] = (8000, 12000, 16000, 24000, 48000)

_INT16_SCALE = 32767.0


def mp3_sample_rate_for(sample_rate_hz: int) -> int:
    """Rate the MP3 encoder will use for input at ``sample_rate_hz``.

    The input rate itself when LAME supports it, else the nearest supported
    rate (ties resolved towards the higher rate, to keep bandwidth).
    """
    if sample_rate_hz in MP3_SAMPLE_RATES:
        return sample_rate_hz
    return min(MP3_SAMPLE_RATES, key=lambda r: (abs(r - sample_rate_hz), -r))


def opus_sample_rate_for(sample_rate_hz: int) -> int:
    """Rate the Opus encoder will use: the input rate when Opus supports it, else 48000."""
    return sample_rate_hz if sample_rate_hz in OPUS_SAMPLE_RATES else 48000


def _as_mono_float32(samples: np.ndarray) -> np.ndarray:
    """Return a 1-D float32 view/copy with NaN/inf replaced by 0 and values clipped to [-1, 1]."""
    x = np.asarray(samples)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise ValueError(f"expected mono samples of shape (N,), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"expected numeric samples, got dtype {x.dtype}")
    # Always produce a fresh array: the caller's buffer is never modified.
    x = np.array(x, dtype=np.float32, copy=True)
    np.nan_to_num(x, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    np.clip(x, -1.0, 1.0, out=x)
    return x


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples -> int16 (NaN/inf -> 0, clip to [-1, 1], scale by 32767, round)."""
    x = _as_mono_float32(samples)
    return np.rint(x * _INT16_SCALE).astype(np.int16)


def check_format_and_rate(fmt: str, sample_rate_hz: int, allowed: tuple[str, ...] | frozenset[str],
                          what: str) -> tuple[str, int]:
    """(normalised format name, integer rate), or ValueError naming what was wrong."""
    key = fmt.lower().strip() if isinstance(fmt, str) else fmt
    if key not in allowed:
        raise ValueError(f"unsupported {what} format {fmt!r}; expected one of {', '.join(allowed)}")
    rate = int(sample_rate_hz)
    if rate <= 0 or rate != sample_rate_hz:
        raise ValueError(f"sample_rate_hz must be a positive integer, got {sample_rate_hz!r}")
    return key, rate


def encoded_sample_rate_for(fmt: str, sample_rate_hz: int) -> int:
    """The rate a decoder reports for `fmt` audio made from `sample_rate_hz` samples (MP3 and Opus
    accept only some rates and are resampled; the other formats keep the input rate)."""
    if fmt == "mp3":
        return mp3_sample_rate_for(sample_rate_hz)
    if fmt == "opus":
        return opus_sample_rate_for(sample_rate_hz)
    return sample_rate_hz


def _resample(x: np.ndarray, src_hz: int, dst_hz: int) -> np.ndarray:
    if src_hz == dst_hz or x.size == 0:
        return x
    import soxr  # imported lazily: only needed for unusual rates

    y = soxr.resample(x, src_hz, dst_hz, quality="HQ")
    y = np.asarray(y, dtype=np.float32)
    # Resampling can overshoot slightly near full scale.
    np.clip(y, -1.0, 1.0, out=y)
    return y


def _write_sf(data: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def encode_audio(samples: np.ndarray, sample_rate_hz: int, fmt: str) -> bytes:
    """Encode mono ``samples`` (float, nominally in [-1, 1]) at ``sample_rate_hz`` as ``fmt``.

    ``fmt`` is one of :data:`SUPPORTED_FORMATS` (case-insensitive). Raises
    ``ValueError`` for an unknown format, a non-positive rate, or non-mono input.
    See the module docstring for the exact output of each format.
    """
    key, rate = check_format_and_rate(fmt, sample_rate_hz, SUPPORTED_FORMATS, "audio")
    x = _as_mono_float32(samples)

    if key == "pcm":
        return np.rint(x * _INT16_SCALE).astype("<i2").tobytes()
    if key == "wav":
        return _write_sf(np.rint(x * _INT16_SCALE).astype(np.int16), rate, "WAV", "PCM_16")

    if x.size == 0:
        # libsndfile emits zero bytes for empty MP3/FLAC/Opus; keep the output decodable.
        x = np.zeros(1, dtype=np.float32)

    if key == "flac":
        return _write_sf(np.rint(x * _INT16_SCALE).astype(np.int16), rate, "FLAC", "PCM_16")
    if key == "mp3":
        out_rate = mp3_sample_rate_for(rate)
        return _write_sf(_resample(x, rate, out_rate), out_rate, "MP3", "MPEG_LAYER_III")
    # opus
    out_rate = opus_sample_rate_for(rate)
    return _write_sf(_resample(x, rate, out_rate), out_rate, "OGG", "OPUS")


def crossfade_concat(
    chunks: list[np.ndarray],
    sample_rate_hz: int,
    crossfade_ms: float = 40.0,
    *,
    curve: str = "equal_power",
) -> np.ndarray:
    """Join mono chunks, overlapping each pair of neighbours by a short crossfade.

    The overlap between chunk ``i`` and ``i+1`` is
    ``min(round(crossfade_ms * rate / 1000), len(chunk_i) // 2, len(chunk_i+1) // 2)``
    samples, so every chunk keeps at least its middle and the output length is
    ``sum(len(c)) - sum(overlaps)``. Within an overlap the outgoing chunk is
    multiplied by a fade-out and the incoming one by a fade-in:
    ``curve="equal_power"`` (default; cos/sin, constant power for uncorrelated
    material such as separately generated utterances) or ``"linear"``
    (gains sum to 1, constant amplitude for correlated material).

    Empty chunks are ignored. A single (non-empty) chunk comes back with
    identical float32 values (a copy, never the caller's buffer); no chunks
    give an empty float32 array.
    """
    if curve not in ("equal_power", "linear"):
        raise ValueError(f"curve must be 'equal_power' or 'linear', got {curve!r}")
    if crossfade_ms < 0:
        raise ValueError("crossfade_ms must be >= 0")
    arrays: list[np.ndarray] = []
    for c in chunks:
        a = np.asarray(c)
        if a.ndim == 2 and 1 in a.shape:
            a = a.reshape(-1)
        if a.ndim != 1:
            raise ValueError(f"expected mono chunks of shape (N,), got shape {a.shape}")
        if a.size:
            arrays.append(a.astype(np.float32, copy=False))
    if not arrays:
        return np.zeros(0, dtype=np.float32)
    if len(arrays) == 1:
        return arrays[0].copy()

    want = int(round(crossfade_ms * sample_rate_hz / 1000.0))
    overlaps = [min(want, len(a) // 2, len(b) // 2) for a, b in zip(arrays, arrays[1:])]
    total = sum(len(a) for a in arrays) - sum(overlaps)
    out = np.empty(total, dtype=np.float32)

    pos = 0  # write position of the current chunk's first sample
    prev_ov = 0  # samples of the current chunk already mixed into `out` by the previous fade
    for i, a in enumerate(arrays):
        next_ov = overlaps[i] if i < len(overlaps) else 0
        # body of chunk i that is not part of either overlap
        body = a[prev_ov : len(a) - next_ov]
        out[pos + prev_ov : pos + prev_ov + len(body)] = body
        if next_ov:
            b = arrays[i + 1]
            # t in (0, 1): sample midpoints, so neither gain is exactly 0 or 1
            t = (np.arange(next_ov, dtype=np.float64) + 0.5) / next_ov
            if curve == "linear":
                g_out, g_in = 1.0 - t, t
            else:
                g_out, g_in = np.cos(0.5 * np.pi * t), np.sin(0.5 * np.pi * t)
            start = pos + len(a) - next_ov
            mixed = a[len(a) - next_ov :] * g_out + b[:next_ov] * g_in
            out[start : start + next_ov] = mixed.astype(np.float32)
        pos += len(a) - next_ov
        prev_ov = next_ov
    return out


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    The bytes go to ``.<name>.<random>.part`` in the same directory, are
    flushed and fsynced, then ``os.replace``-d onto ``path`` (atomic on POSIX
    within one filesystem); the directory is fsynced afterwards where the OS
    allows. On any failure the temporary file is removed and the error re-raised.
    The final file gets mode 0o644.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def probe_duration_s(data: bytes) -> float:
    """Duration in seconds of an encoded wav/flac/mp3/ogg(opus) file held in memory.

    Raises ``ValueError`` if libsndfile cannot parse the bytes (e.g. headerless pcm).
    """
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise ValueError(f"cannot probe audio: {exc}") from exc
    if info.samplerate <= 0:
        raise ValueError("cannot probe audio: zero sample rate")
    return info.frames / float(info.samplerate)
