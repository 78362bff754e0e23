"""Saved voices: a name for a reference audio, its transcript and default synthesis settings.

A voice is created once (`POST /voices`) and then named by requests (`"voice": "alice"`) instead of
re-sending the reference audio. No torch here.

Storage
  * records: the `voices` table of the task database (`<output_dir>/tasks.sqlite3`), so every worker
    process sees the same voices and they survive restarts;
  * audio: `<output_dir>/voices/<sha256>.<ext>`, content-addressed (two voices with the same audio
    share one file) and outside everything `DELETE /cleanup` sweeps. `<ext>` comes from what the
    bytes are (libsndfile's verdict), never from the client's file name;
  * prompt features: computed by the engine owner right after creation (`Engine.prepare_prompt`) and
    kept by the engine on disk under the audio's content hash (see `VoxCPMEngine._prompt_cache_for`).

File moves and record changes happen inside one SQLite write transaction (`BEGIN IMMEDIATE`), which
serialises creators and deleters across worker processes: a delete never removes a file that a
concurrent create has just decided to share. An upload is staged as `voices/.incoming-*`, checked,
then renamed to its content address only together with the insert; nothing is stored on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import soundfile as sf

from ..errors import BadAudio, Conflict, FileMissing, InvalidInput, NotFound, NotReady, VoxError

if TYPE_CHECKING:
    from .service import SynthesisInput, TaskService

log = logging.getLogger("voxcpm_api.voices")

VOICES_DIR_NAME = "voices"
VOICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VOICE_FILE_RE = re.compile(r"^[0-9a-f]{64}\.(wav|flac|mp3|ogg|opus)$")
STAGING_PREFIX = ".incoming-"
STALE_STAGING_S = 3600.0
PRECOMPUTE_WAIT_S = 30.0  # POST /voices waits this long for the features, then lets them finish in the background
# Defaults a voice may carry; a request that names the field itself wins. Values are the
# SynthesizeRequest defaults, used to guess what a caller set when it does not say (explicit_fields None).
VOICE_DEFAULT_FIELDS = {"lora_name": None, "cfg_scale": 2.0, "steps": 10}
CFG_RANGE = (0.0, 10.0)  # (exclusive, inclusive), as SynthesizeRequest.cfg_scale
STEPS_RANGE = (1, 100)
# libsndfile (format, subtype) -> (reported format, file extension); subtype None = any
ACCEPTED_FORMATS: dict[tuple[str, str | None], tuple[str, str]] = {
    ("WAV", None): ("wav", "wav"),
    ("WAVEX", None): ("wav", "wav"),
    ("FLAC", None): ("flac", "flac"),
    ("MP3", "MPEG_LAYER_III"): ("mp3", "mp3"),
    ("OGG", "VORBIS"): ("ogg", "ogg"),
    ("OGG", "OPUS"): ("opus", "opus"),
}
ACCEPTED_DESCRIPTION = "wav, flac, mp3 or ogg (vorbis/opus)"
DECODE_BLOCK_FRAMES = 65536

_SCHEMA = """
CREATE TABLE IF NOT EXISTS voices (
    name            TEXT    PRIMARY KEY,
    transcript      TEXT,
    lora_name       TEXT,
    cfg_scale       REAL,
    steps           INTEGER,
    sha256          TEXT    NOT NULL,
    audio_file      TEXT    NOT NULL,
    duration_s      REAL    NOT NULL,
    sample_rate     INTEGER NOT NULL,
    format          TEXT    NOT NULL,
    size_bytes      INTEGER NOT NULL,
    created_at      REAL    NOT NULL,
    features_cached INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS voices_by_sha256 ON voices (sha256);
"""


class UploadTooLarge(InvalidInput):
    """413: the upload exceeds --max-upload-bytes."""

    status_code = 413


@dataclass(frozen=True, slots=True)
class VoiceRecord:
    name: str
    transcript: str | None
    lora_name: str | None  # default adapter; None = base model
    cfg_scale: float | None  # default; None = the request's own default
    steps: int | None
    sha256: str
    audio_file: str  # file name inside <output_dir>/voices
    ref_audio_path: str  # absolute path of that file (what the engine reads)
    duration_s: float
    sample_rate: int
    format: str  # wav | flac | mp3 | ogg | opus, from the bytes
    size_bytes: int
    created_at: float  # unix seconds
    features_cached: bool  # the engine owner has computed (and stored) its prompt features


@dataclass(frozen=True, slots=True)
class AudioProbe:
    format: str
    extension: str
    sample_rate: int
    channels: int
    frames: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


def check_voice_name(name: str | None) -> str:
    if name is None or not name.strip():
        raise InvalidInput("name is required: the voice's name, e.g. 'alice'", field="name")
    if not VOICE_NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"name '{name[:80]}' is not allowed: use 1-64 letters, digits, '_', '.' or '-', starting with a letter "
            "or digit (no spaces, slashes or other path characters)", field="name")
    return name


def probe_voice_audio(path: Path, *, max_duration_s: float, client_name: str) -> AudioProbe:
    """What the bytes really are (not what the name says); every sample is decoded once.

    Raises BadAudio (400) for anything that is not complete audio in an accepted format and
    InvalidInput (422) when it is longer than max_duration_s.
    """
    shown = Path(client_name or "audio").name[:120]
    try:
        info = sf.info(str(path))
    except Exception as exc:  # LibsndfileError/RuntimeError/TypeError: not audio libsndfile knows
        raise BadAudio(f"the uploaded file '{shown}' is not audio this server accepts ({ACCEPTED_DESCRIPTION})",
                       field="audio") from exc
    accepted = ACCEPTED_FORMATS.get((info.format, None)) or ACCEPTED_FORMATS.get((info.format, info.subtype))
    if accepted is None:
        raise BadAudio(f"the uploaded file '{shown}' is {info.format}/{info.subtype} audio; accepted formats are "
                       f"{ACCEPTED_DESCRIPTION}", field="audio")
    if info.samplerate <= 0 or info.channels <= 0:
        raise BadAudio(f"the uploaded file '{shown}' has no valid sample rate or channel count", field="audio")

    def too_long(seconds: float) -> InvalidInput:
        return InvalidInput(f"the uploaded audio lasts {seconds:.1f} s; the limit for a voice is {max_duration_s:g} s "
                            "(--voice-max-duration-s)", field="audio")

    if info.frames > 0 and info.frames / info.samplerate > max_duration_s + 1.0:  # header says so: no need to decode
        raise too_long(info.frames / info.samplerate)
    frames = 0
    try:
        with sf.SoundFile(str(path)) as fh:
            while True:
                block = fh.read(DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                frames += block.shape[0]
                if frames / info.samplerate > max_duration_s:
                    raise too_long(frames / info.samplerate)
    except InvalidInput:
        raise
    except Exception as exc:
        raise BadAudio(f"the uploaded file '{shown}' is {accepted[0]} audio that cannot be decoded (truncated or "
                       "corrupt)", field="audio") from exc
    if frames == 0:
        raise BadAudio(f"the uploaded file '{shown}' holds no audio samples", field="audio")
    return AudioProbe(format=accepted[0], extension=accepted[1], sample_rate=int(info.samplerate),
                      channels=int(info.channels), frames=frames)


class VoiceStore:
    """Voice records in the task database plus the audio files they point at.

    One short-lived connection per call (voice calls are rare and sub-millisecond), so this store
    needs no closing and is safe from any thread.
    """

    def __init__(self, db_path: Path, voices_dir: Path) -> None:
        self.db_path = db_path
        self.voices_dir = voices_dir
        voices_dir.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.executescript(_SCHEMA)
        self._remove_stale_staging()

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(str(self.db_path), timeout=30.0, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=30000")
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: holds the database's write lock, across processes, until the end."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def staging_path(self, token: str) -> Path:
        return self.voices_dir / f"{STAGING_PREFIX}{token}.upload"

    # ---- reads ---------------------------------------------------------------------------------

    def get(self, name: str) -> VoiceRecord | None:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM voices WHERE name = ?", (name,)).fetchone()
        return self._to_record(row) if row else None

    def list(self) -> list[VoiceRecord]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM voices ORDER BY name").fetchall()
        return [self._to_record(r) for r in rows]

    # ---- writes --------------------------------------------------------------------------------

    def create(self, *, name: str, transcript: str | None, lora_name: str | None, cfg_scale: float | None,
               steps: int | None, staged: Path, sha256: str, probe: AudioProbe, size_bytes: int) -> VoiceRecord:
        """Move the staged upload to its content address and insert the record, or do neither (409)."""
        file_name = f"{sha256}.{probe.extension}"
        target = self.voices_dir / file_name
        created_file = False
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM voices WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"a voice named '{name}' already exists; delete it first (DELETE /voices/{name})",
                               field="name")
            if not target.exists():
                os.replace(staged, target)
                created_file = True
            try:
                conn.execute(
                    "INSERT INTO voices (name, transcript, lora_name, cfg_scale, steps, sha256, audio_file, duration_s,"
                    " sample_rate, format, size_bytes, created_at, features_cached)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                    (name, transcript, lora_name, cfg_scale, steps, sha256, file_name, round(probe.duration_s, 3),
                     probe.sample_rate, probe.format, size_bytes, time.time()),
                )
            except BaseException:
                if created_file:
                    target.unlink(missing_ok=True)
                raise
        record = self.get(name)
        assert record is not None
        return record

    def delete(self, name: str) -> VoiceRecord | None:
        """Remove the record, then every voice file no voice and no unfinished task still uses."""
        record = self.get(name)
        if record is None:
            return None
        with self._write() as conn:
            if conn.execute("DELETE FROM voices WHERE name = ?", (name,)).rowcount == 0:
                return None
            self._sweep_unused_files(conn)
        return record

    def set_features_cached(self, name: str, sha256: str, value: bool) -> None:
        with self._write() as conn:
            conn.execute("UPDATE voices SET features_cached = ? WHERE name = ? AND sha256 = ?",
                         (1 if value else 0, name, sha256))

    # ---- housekeeping --------------------------------------------------------------------------

    def _sweep_unused_files(self, conn: sqlite3.Connection) -> None:
        used = {r["audio_file"] for r in conn.execute("SELECT audio_file FROM voices").fetchall()}
        active_refs: set[str] = set()
        with contextlib.suppress(sqlite3.OperationalError):  # no tasks table: nothing can be active
            for row in conn.execute("SELECT params_json FROM tasks WHERE status IN ('pending', 'processing')"):
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    ref = json.loads(row["params_json"]).get("ref_audio_path")
                    if ref:
                        active_refs.add(str(ref))
        for path in self.voices_dir.iterdir():
            if not VOICE_FILE_RE.fullmatch(path.name) or path.name in used:
                continue
            if str(path.resolve()) in active_refs:  # an unfinished task still reads it; a later sweep removes it
                continue
            path.unlink(missing_ok=True)

    def _remove_stale_staging(self) -> None:
        cutoff = time.time() - STALE_STAGING_S
        for path in self.voices_dir.glob(".*"):
            if path.name.startswith(STAGING_PREFIX) or path.name.endswith(".part"):
                with contextlib.suppress(OSError):
                    if path.is_file() and path.stat().st_mtime < cutoff:
                        path.unlink()

    def _to_record(self, row: sqlite3.Row) -> VoiceRecord:
        return VoiceRecord(
            name=row["name"], transcript=row["transcript"], lora_name=row["lora_name"],
            cfg_scale=row["cfg_scale"], steps=row["steps"], sha256=row["sha256"], audio_file=row["audio_file"],
            ref_audio_path=str((self.voices_dir / row["audio_file"]).resolve()),
            duration_s=float(row["duration_s"]), sample_rate=int(row["sample_rate"]), format=row["format"],
            size_bytes=int(row["size_bytes"]), created_at=float(row["created_at"]),
            features_cached=bool(row["features_cached"]),
        )


class VoiceLibrary:
    """Create, read, delete and apply saved voices; one per TaskService (every worker process).

    It uses its service for settings, the LoRA catalog, engine info and, in the engine-owner process,
    the runner that precomputes prompt features.
    """

    def __init__(self, service: TaskService) -> None:
        self._service = service
        settings = service.settings
        # absolute, like every stored ref_audio_path (cleanup and sweeps compare resolved paths)
        self.store = VoiceStore(service.store.path, (settings.output_dir / VOICES_DIR_NAME).resolve())
        self._background: set[asyncio.Task[None]] = set()

    # ---- reads ---------------------------------------------------------------------------------

    def resolve(self, name: str) -> VoiceRecord:
        """The voice called `name`; NotFound (404, field 'voice') when there is none."""
        record = self.store.get(name) if isinstance(name, str) and VOICE_NAME_RE.fullmatch(name) else None
        if record is None:
            raise NotFound(f"voice '{str(name)[:80]}' not found; see GET /voices", field="voice")
        return record

    async def get(self, name: str) -> VoiceRecord:
        return await asyncio.to_thread(self.resolve, name)

    async def list(self) -> list[VoiceRecord]:
        return await asyncio.to_thread(self.store.list)

    async def delete(self, name: str) -> VoiceRecord:
        record = await asyncio.to_thread(self.store.delete, name) if VOICE_NAME_RE.fullmatch(name or "") else None
        if record is None:
            raise NotFound(f"voice '{str(name)[:80]}' not found; see GET /voices", field="voice")
        return record

    # ---- creation ------------------------------------------------------------------------------

    async def create(self, *, name: str | None, transcript: str | None, lora_name: str | None,
                     cfg_scale: str | float | None, steps: str | int | None, audio: bytes | None,
                     file_name: str) -> VoiceRecord:
        """Validate everything, then store audio + record together; precompute features when owner."""
        service = self._service
        service._refuse_if_load_failed()
        name = check_voice_name(name)
        if await asyncio.to_thread(self.store.get, name) is not None:
            raise Conflict(f"a voice named '{name}' already exists; delete it first (DELETE /voices/{name})",
                           field="name")
        transcript = self._check_transcript(transcript)
        lora_name = await asyncio.to_thread(self._service.check_lora, lora_name)
        cfg = _parse_number(cfg_scale, "cfg_scale", float)
        if cfg is not None and not (CFG_RANGE[0] < cfg <= CFG_RANGE[1]):
            raise InvalidInput(f"cfg_scale must be in ({CFG_RANGE[0]:g}, {CFG_RANGE[1]:g}]", field="cfg_scale")
        step_count = _parse_number(steps, "steps", int)
        if step_count is not None and not (STEPS_RANGE[0] <= step_count <= STEPS_RANGE[1]):
            raise InvalidInput(f"steps must be in {STEPS_RANGE[0]}..{STEPS_RANGE[1]}", field="steps")
        if audio is None:
            raise InvalidInput("audio is required: send the reference recording as the multipart file field "
                               "'audio'", field="audio")
        if len(audio) == 0:
            raise BadAudio("the uploaded audio is empty", field="audio")
        limit = service.settings.max_upload_bytes
        if len(audio) > limit:
            raise UploadTooLarge(f"the uploaded audio is {len(audio)} bytes; the limit is {limit} (--max-upload-bytes)",
                                 field="audio")
        staged = self.store.staging_path(os.urandom(8).hex())
        try:
            await asyncio.to_thread(_write_staged, staged, audio)
            probe = await asyncio.to_thread(probe_voice_audio, staged, client_name=file_name,
                                            max_duration_s=service.settings.voice_max_duration_s)
            record = await asyncio.to_thread(
                self.store.create, name=name, transcript=transcript, lora_name=lora_name, cfg_scale=cfg,
                steps=step_count, staged=staged, sha256=hashlib.sha256(audio).hexdigest(), probe=probe,
                size_bytes=len(audio))
        finally:
            staged.unlink(missing_ok=True)
        return await self._precompute_after_create(record)

    def _check_transcript(self, transcript: str | None) -> str | None:
        text = transcript.strip() if transcript is not None else ""
        limit = self._service.settings.max_text_chars
        if len(text) > limit:
            raise InvalidInput(f"transcript is {len(text)} characters; the limit is {limit} (--max-text-chars)",
                               field="transcript")
        if text:
            return text
        info = self._service.engine_info()
        if info is None:
            raise NotReady("the model is still loading, so it is not known yet whether it needs a transcript; send "
                           "the transcript or retry shortly")
        if info.needs_ref_text:
            raise InvalidInput("transcript is required: this model (VoxCPM 1.x) clones a voice from its audio plus "
                               "the exact words spoken in it", field="transcript")
        return None

    # ---- prompt features (engine owner only) ---------------------------------------------------

    async def _precompute_after_create(self, record: VoiceRecord) -> VoiceRecord:
        """Wait up to PRECOMPUTE_WAIT_S; audio the model cannot read undoes the creation (400)."""
        runner = self._service.runner
        if runner is None or runner.info is None:
            return record  # not the owner (or not loaded): the owner computes them at its start or first use
        task = asyncio.ensure_future(self._precompute(record))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        try:
            await asyncio.wait_for(asyncio.shield(task), PRECOMPUTE_WAIT_S)
        except asyncio.TimeoutError:
            log.info("voice %s: prompt features still being computed in the background", record.name)
            return record
        except BadAudio:
            await asyncio.to_thread(self.store.delete, record.name)
            raise
        except VoxError as exc:  # kept: the features are computed again on first use, which reports the error
            log.warning("voice %s: prompt features could not be precomputed: %s", record.name, exc.message)
            return record
        return await asyncio.to_thread(self.store.get, record.name) or record

    async def _precompute(self, record: VoiceRecord) -> None:
        runner = self._service.runner
        assert runner is not None
        try:
            await runner.precompute_voice(record.ref_audio_path, record.transcript)
        except BadAudio as exc:
            raise BadAudio(f"voice '{record.name}': the model cannot read this audio: {exc.message}",
                           field="audio") from exc
        except VoxError:
            await asyncio.to_thread(self.store.set_features_cached, record.name, record.sha256, False)
            raise
        except Exception as exc:
            log.exception("voice %s: precomputing prompt features crashed", record.name)
            raise VoxError(f"internal error while encoding voice '{record.name}': {type(exc).__name__}") from exc
        await asyncio.to_thread(self.store.set_features_cached, record.name, record.sha256, True)

    async def precompute_all(self) -> None:
        """Engine owner, once loaded: make sure every saved voice has features for *this* model.

        Features already on disk load in milliseconds; a changed model re-encodes (in the engine
        thread, between tasks). Failures only clear features_cached; the voice stays usable or
        reports its problem when used.
        """
        runner = self._service.runner
        if runner is None or runner.info is None:
            return
        voices = await asyncio.to_thread(self.store.list)
        ready = 0
        for record in voices:
            try:
                await self._precompute(record)
                ready += 1
            except VoxError as exc:
                await asyncio.to_thread(self.store.set_features_cached, record.name, record.sha256, False)
                log.warning("voice %s: prompt features unavailable: %s", record.name, exc.message)
        if voices:
            log.info("saved voices: %d of %d have prompt features ready", ready, len(voices))

    # ---- applying a voice to a synthesis request -----------------------------------------------

    def apply(self, request: SynthesisInput) -> SynthesisInput:
        """The voice's audio, transcript and defaults; fields the request names itself win."""
        if request.voice is None:
            return request
        if request.ref_audio_path is not None or request.uploaded_ref is not None:
            raise InvalidInput("give either 'voice' or reference audio (ref_audio_path or an uploaded file), not "
                               "both: a saved voice already supplies its reference audio", field="voice")
        if request.ref_text is not None:
            raise InvalidInput("ref_text cannot be combined with 'voice': the saved voice supplies its own "
                               "transcript", field="ref_text")
        voice = self.resolve(request.voice)
        info = self._service.engine_info()
        if voice.transcript is None and info is not None and info.needs_ref_text:
            raise InvalidInput(f"voice '{voice.name}' has no transcript, which this model (VoxCPM 1.x) needs; "
                               "re-create the voice with a transcript", field="voice")
        path = Path(voice.ref_audio_path)  # resolved: a symlink out of the voices dir reads as missing
        if path.parent != self.store.voices_dir or not path.is_file():
            raise FileMissing(f"the audio of voice '{voice.name}' is missing on the server; delete and re-create "
                              "the voice", field="voice")
        explicit = _explicit_fields(request)
        changes: dict[str, object] = {"uploaded_ref": path, "ref_text": voice.transcript}
        for field_name in VOICE_DEFAULT_FIELDS:
            value = getattr(voice, field_name)
            if value is not None and field_name not in explicit:
                changes[field_name] = value
        return replace(request, **changes)  # type: ignore[arg-type]


def _explicit_fields(request: SynthesisInput) -> frozenset[str]:
    if request.explicit_fields is not None:
        return request.explicit_fields
    # a programmatic caller that did not say: a value other than the request default counts as set
    return frozenset(f for f, default in VOICE_DEFAULT_FIELDS.items() if getattr(request, f) != default)


def _parse_number(value: str | float | int | None, field: str, kind: type) -> float | int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = kind(value.strip()) if isinstance(value, str) else kind(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{field} must be {'an integer' if kind is int else 'a number'}, got '{str(value)[:40]}'",
                           field=field) from None
    if isinstance(number, float) and not math.isfinite(number):
        raise InvalidInput(f"{field} must be a finite number", field=field)
    return number


def _write_staged(staged: Path, data: bytes) -> None:
    from ..audio.encoders import write_atomic

    staged.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(staged, data)
