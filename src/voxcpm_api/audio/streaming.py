"""Incremental audio encoders and time-stretching, for responses sent while the audio is made.

``StreamEncoder(fmt, sample_rate_hz)`` takes mono float samples piece by piece: ``feed(samples)``
returns the bytes that are ready now (possibly ``b""``), ``finish()`` the rest. The concatenation
of everything returned is one playable file/stream:

``pcm``   signed 16-bit little-endian samples at the input rate (same bytes as audio/encoders.py).
``wav``   a RIFF header whose RIFF and data sizes are 0xFFFFFFFF ("unknown", as ffmpeg writes
          when streaming; libsndfile and ffmpeg read to the end of the data), then PCM 16.
``mp3``   LAME (libmp3lame) CBR 64 kbit/s in a raw MPEG audio stream, at the rate
          ``mp3_sample_rate_for`` picks; no Xing/LAME header (it can only be written once the
          length is known), so decoders do not trim LAME's ~1100-sample start delay.
``opus``  libopus 32 kbit/s, 20 ms frames, in Ogg with one page per packet; the input rate when
          Opus supports it, else 48 kHz (as the file encoder). Ogg's pre-skip is set, so decoded
          length equals input length.
``aac``   AAC-LC (ffmpeg's native encoder) 64 kbit/s in ADTS frames, at the nearest AAC rate;
          ADTS carries no priming info, so decoders return 1024 extra leading samples.
``flac``  FLAC 16-bit; STREAMINFO keeps total_samples = 0 ("unknown"), which the format allows.
          FFmpeg (and so browsers) read it to the end; libsndfile 1.2 fails on its last seek.

Why these libraries: libsndfile (soundfile) does write MP3 and FLAC incrementally to a Python
file object, but it rewrites the first bytes at close (MP3: the LAME tag over a zero-filled
placeholder; FLAC: STREAMINFO), and its Ogg Opus writer emits a page only about once per second
of audio. libsndfile has no AAC at all. PyAV (FFmpeg's libraries in self-contained wheels) muxes
packet by packet into a non-seekable sink (``flush_packets``), never seeks back, has AAC, and lets
Ogg flush a page per packet, so bytes leave as soon as the codec produces them. The remaining
latency is the codec's own look-ahead (MP3 and AAC need about one frame of input before the first
packet; FLAC buffers one block of 1152 samples).

``TimeStretcher(speed, sample_rate_hz)`` changes tempo without changing pitch with FFmpeg's
``atempo`` filter (WSOLA) through PyAV. It was chosen over librosa's phase vocoder
(``librosa.effects.time_stretch``) because it works on a stream of blocks with bounded delay,
so a streamed response keeps its per-patch latency, and WSOLA keeps speech crisper than a
phase vocoder, which smears transients ("phasiness"). Speeds outside 0.5..2 chain several
``atempo`` stages (one stage skips samples above 2, FFmpeg's docs advise chaining). The same
code serves whole files, so streamed and non-streamed speed changes sound the same.
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction

import numpy as np

from .encoders import MEDIA_TYPES, check_format_and_rate, encoded_sample_rate_for, to_int16

__all__ = [
    "AAC_SAMPLE_RATES",
    "STREAM_FORMATS",
    "STREAM_MEDIA_TYPES",
    "SPEED_MAX",
    "SPEED_MIN",
    "StreamCrossfader",
    "StreamEncoder",
    "TimeStretcher",
    "aac_sample_rate_for",
    "stream_sample_rate_for",
]

STREAM_FORMATS: tuple[str, ...] = ("mp3", "opus", "aac", "flac", "wav", "pcm")
STREAM_MEDIA_TYPES: dict[str, str] = {**MEDIA_TYPES, "aac": "audio/aac"}
#: Sampling rates ADTS can signal (ISO/IEC 14496-3 sampling_frequency_index, 7350 left out).
AAC_SAMPLE_RATES: tuple[int, ...] = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000,
                                     88200, 96000)
SPEED_MIN, SPEED_MAX = 0.25, 4.0
WAV_UNKNOWN_SIZE = 0xFFFFFFFF

# (container, codec, bit rate, container options, codec options)
_AV_FORMATS: dict[str, tuple[str, str, int | None, dict[str, str], dict[str, str]]] = {
    "mp3": ("mp3", "libmp3lame", 64_000, {"write_xing": "0", "id3v2_version": "0"}, {}),
    "opus": ("ogg", "libopus", 32_000, {"page_duration": "20000"}, {"frame_duration": "20"}),
    "aac": ("adts", "aac", 64_000, {}, {}),
    "flac": ("flac", "flac", None, {}, {}),
}


def aac_sample_rate_for(sample_rate_hz: int) -> int:
    """The input rate when ADTS can signal it, else the nearest one (ties to the higher rate)."""
    if sample_rate_hz in AAC_SAMPLE_RATES:
        return sample_rate_hz
    return min(AAC_SAMPLE_RATES, key=lambda r: (abs(r - sample_rate_hz), -r))


def stream_sample_rate_for(fmt: str, sample_rate_hz: int) -> int:
    """The rate a client decodes from a ``fmt`` stream made from audio at ``sample_rate_hz``."""
    if fmt == "aac":
        return aac_sample_rate_for(sample_rate_hz)
    return encoded_sample_rate_for(fmt, sample_rate_hz)


class _Sink(io.RawIOBase):
    """A write-only, non-seekable file object that hands out what was written since the last take()."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data: bytes) -> int:  # type: ignore[override]
        chunk = bytes(data)
        self._parts.append(chunk)
        return len(chunk)

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class StreamEncoder:
    """Encode mono float audio incrementally; see the module docstring for each format."""

    def __init__(self, fmt: str, sample_rate_hz: int) -> None:
        key, rate = check_format_and_rate(fmt, sample_rate_hz, STREAM_FORMATS, "stream")
        self.format: str = key
        self.input_sample_rate_hz = rate
        self.sample_rate_hz = stream_sample_rate_for(key, rate)  # what a decoder reports
        self.media_type = STREAM_MEDIA_TYPES[key]
        self.samples_in = 0
        self._finished = False
        self._header_sent = False
        self._av: _AVEncoder | None = _AVEncoder(key, rate, self.sample_rate_hz) if key in _AV_FORMATS else None

    def feed(self, samples: np.ndarray) -> bytes:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        pcm = to_int16(samples)
        self.samples_in += pcm.size
        if self._av is not None:
            return self._av.feed(pcm) if pcm.size else b""
        data = pcm.astype("<i2", copy=False).tobytes()
        if self.format == "wav" and not self._header_sent:
            self._header_sent = True
            return _wav_stream_header(self.input_sample_rate_hz) + data
        return data

    def finish(self) -> bytes:
        if self._finished:
            return b""
        self._finished = True
        if self._av is not None:
            return self._av.finish(empty=self.samples_in == 0)
        if self.format == "wav" and not self._header_sent:
            self._header_sent = True
            return _wav_stream_header(self.input_sample_rate_hz)
        return b""


def _wav_stream_header(rate: int) -> bytes:
    fmt_chunk = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, rate, rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", WAV_UNKNOWN_SIZE) + b"WAVE" + fmt_chunk
            + b"data" + struct.pack("<I", WAV_UNKNOWN_SIZE))


class _AVEncoder:
    """PyAV: s16 mono frames -> resampler (rate and frame size the codec wants) -> codec -> muxer -> sink."""

    def __init__(self, fmt: str, in_rate: int, out_rate: int) -> None:
        import av  # lazily: only streaming and AAC need FFmpeg's libraries

        container_name, codec_name, bit_rate, container_opts, codec_opts = _AV_FORMATS[fmt]
        self._av = av
        self._in_rate = in_rate
        self._sink = _Sink()
        self._container = av.open(self._sink, mode="w", format=container_name,
                                  options={"flush_packets": "1", **container_opts})
        stream = self._container.add_stream(codec_name, rate=out_rate, layout="mono", options=codec_opts)
        if bit_rate is not None:
            stream.codec_context.bit_rate = bit_rate
        if fmt == "flac":
            stream.codec_context.format = "s16"
        self._stream = stream
        ctx = stream.codec_context
        ctx.open()  # fixes sample format and frame size before the resampler is configured
        self._resampler = av.AudioResampler(format=ctx.format.name, layout="mono", rate=out_rate,
                                            frame_size=ctx.frame_size or None)
        self._pts = 0

    def _encode(self, frames: list) -> None:  # type: ignore[type-arg]
        for frame in frames:
            for packet in self._stream.encode(frame):
                self._container.mux(packet)

    def feed(self, pcm: np.ndarray) -> bytes:
        frame = self._av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self._in_rate
        frame.pts = self._pts
        frame.time_base = Fraction(1, self._in_rate)
        self._pts += pcm.size
        self._encode(self._resampler.resample(frame))
        return self._sink.take()

    def finish(self, *, empty: bool) -> bytes:
        out = b""
        if empty:  # keep the result decodable, as encode_audio does for empty compressed files
            out = self.feed(np.zeros(1, dtype=np.int16))
        self._encode(self._resampler.resample(None))
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return out + self._sink.take()


class TimeStretcher:
    """Pitch-preserving tempo change (FFmpeg ``atempo``), block by block. speed 1.0 is a no-op."""

    def __init__(self, speed: float, sample_rate_hz: int) -> None:
        if not SPEED_MIN <= speed <= SPEED_MAX:
            raise ValueError(f"speed must be within {SPEED_MIN}..{SPEED_MAX}, got {speed}")
        self.speed = float(speed)
        self.sample_rate_hz = int(sample_rate_hz)
        self._graph = None if self.speed == 1.0 else self._build()
        self._pts = 0
        self._finished = False

    def _build(self):  # type: ignore[no-untyped-def]
        import av.filter

        rate = self.sample_rate_hz
        graph = av.filter.Graph()
        node = graph.add_abuffer(format="flt", sample_rate=rate, layout="mono", time_base=Fraction(1, rate))
        remaining = self.speed
        stages: list[float] = []
        while remaining < 0.5:
            stages.append(0.5)
            remaining /= 0.5
        while remaining > 2.0:  # above 2 one atempo skips samples instead of blending them (FFmpeg docs)
            stages.append(2.0)
            remaining /= 2.0
        stages.append(remaining)
        for tempo in stages:
            stage = graph.add("atempo", f"{tempo:.6f}")
            node.link_to(stage)
            node = stage
        fmt = graph.add("aformat", "sample_fmts=flt:channel_layouts=mono")
        node.link_to(fmt)
        sink = graph.add("abuffersink")
        fmt.link_to(sink)
        graph.configure()
        return graph

    def _pull(self) -> np.ndarray:
        import av

        out: list[np.ndarray] = []
        assert self._graph is not None
        while True:
            try:
                frame = self._graph.pull()
            except (av.BlockingIOError, av.EOFError):
                break
            out.append(frame.to_ndarray().reshape(-1).astype(np.float32, copy=False))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def feed(self, samples: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(samples, dtype=np.float32).reshape(-1))
        if self._graph is None or x.size == 0:
            return x
        import av

        frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = self.sample_rate_hz
        frame.pts = self._pts
        frame.time_base = Fraction(1, self.sample_rate_hz)
        self._pts += x.size
        self._graph.push(frame)
        return self._pull()

    def finish(self) -> np.ndarray:
        if self._graph is None or self._finished:
            return np.zeros(0, dtype=np.float32)
        self._finished = True
        self._graph.push(None)
        return self._pull()


class StreamCrossfader:
    """Joins long-text chunks while they stream, with the equal-power crossfade of `crossfade_concat`.

    While a chunk that is not the last one streams, its newest `crossfade_ms` of audio are held
    back (any patch may turn out to be its last); when the next chunk's first samples arrive the
    two are mixed. The output equals ``crossfade_concat(chunks, rate, crossfade_ms)`` whenever
    every chunk is at least twice the crossfade long (always true for model output: a chunk has
    at least two patches of 80 ms or more). A single chunk passes through untouched, unbuffered.
    """

    def __init__(self, sample_rate_hz: int, crossfade_ms: float = 40.0) -> None:
        self.want = int(round(crossfade_ms * sample_rate_hz / 1000.0))
        self._buf = np.zeros(0, dtype=np.float32)  # current chunk, not yet emitted
        self._tail: np.ndarray | None = None  # previous chunk's held end, waiting to fade out
        self._holding = False  # the current chunk is not the last one

    def start_chunk(self, *, last: bool) -> None:
        self._holding = not last and self.want > 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._buf = np.concatenate([self._buf, x]) if self._buf.size else x
        out: list[np.ndarray] = []
        if self._tail is not None:
            overlap = self._tail.size
            if self._buf.size < overlap:
                return np.zeros(0, dtype=np.float32)
            t = (np.arange(overlap, dtype=np.float64) + 0.5) / overlap
            mixed = self._tail * np.cos(0.5 * np.pi * t) + self._buf[:overlap] * np.sin(0.5 * np.pi * t)
            out.append(mixed.astype(np.float32))
            self._buf = self._buf[overlap:]
            self._tail = None
        if self._holding:
            cut = max(0, self._buf.size - self.want)
            out.append(self._buf[:cut])
            self._buf = self._buf[cut:]
        else:
            out.append(self._buf)
            self._buf = np.zeros(0, dtype=np.float32)
        return np.concatenate(out) if len(out) > 1 else out[0].copy()

    def end_chunk(self) -> np.ndarray:
        """The chunk's generation ended; returns samples now ready (only in degenerate cases)."""
        ready = np.zeros(0, dtype=np.float32)
        if self._tail is not None:  # the chunk was shorter than the crossfade: no room to mix
            ready = np.concatenate([self._tail, self._buf])
            self._tail, self._buf = None, np.zeros(0, dtype=np.float32)
            return ready
        if self._holding:
            self._tail, self._buf = (self._buf if self._buf.size else None), np.zeros(0, dtype=np.float32)
        return ready

    def finish(self) -> np.ndarray:
        parts = [p for p in (self._tail, self._buf) if p is not None and p.size]
        self._tail, self._buf = None, np.zeros(0, dtype=np.float32)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
