"""Saved voices over real HTTP (uvicorn + FakeEngine): CRUD, every refused upload, use in /synthesize,
persistence across restarts and cleanup.

A refused upload must leave no trace: no voice record and no file under <output>/voices."""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.api.conftest import Running, fitting_shapes, running_server, wav_bytes, write_adapter
from tests.helpers import wait_final, wait_until
from voxcpm_api.audio.encoders import encode_audio
from voxcpm_api.engine.fake import FakeEngine

MAX_UPLOAD = 64 * 1024
MAX_DURATION_S = 2.0
TRANSCRIPT = "A short reference sentence."


@pytest.fixture(scope="module")
def srv(make_module_server) -> Running:
    running = make_module_server(engine=FakeEngine(), max_upload_bytes=MAX_UPLOAD,
                                 voice_max_duration_s=MAX_DURATION_S)
    write_adapter(running.lora_dir / "good", fitting_shapes(running.engine))
    (running.ref_dir / "ref.wav").write_bytes(wav_bytes(freq=330))
    return running


def samples(seconds: float = 0.5, rate: int = 16000, freq: float = 200.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encoded(fmt: str, seconds: float = 0.5, freq: float = 200.0) -> bytes:
    return encode_audio(samples(seconds, freq=freq), 16000, fmt)


def post_voice(srv: Running, name: str | None, content: bytes | None = None, file_name: str = "voice.wav",
               **form: object) -> httpx.Response:
    data = {k: str(v) for k, v in form.items() if v is not None}
    if name is not None:
        data["name"] = name
    data.setdefault("transcript", TRANSCRIPT)
    files = {"audio": (file_name, content if content is not None else wav_bytes(), "application/octet-stream")}
    return srv.client.post("/voices", data=data, files=files if content != b"<none>" else None)


def voices_dir(srv: Running) -> Path:
    return srv.output_dir / "voices"


def voice_files(srv: Running) -> set[str]:
    return {p.name for p in voices_dir(srv).iterdir()} if voices_dir(srv).is_dir() else set()


def names_field(response: httpx.Response, field: str) -> bool:
    body = response.json()
    detail = body.get("detail")
    if isinstance(detail, list):  # FastAPI's own validation errors
        return any(field in [str(part) for part in error.get("loc", [])] for error in detail)
    return isinstance(detail, str) and bool(detail) and body.get("field") == field


def synth(srv: Running, **body: object) -> httpx.Response:
    return srv.client.post("/synthesize", json={"text": "Hello there.", "seed": 1, "response_format": "wav", **body})


def done(srv: Running, response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    task = wait_final(srv.client, response.json()["task_id"], 30)
    assert task["status"] == "completed", task
    return task


def last_call(srv: Running):  # type: ignore[no-untyped-def]
    return srv.task_calls()[-1]


# ---- CRUD --------------------------------------------------------------------------------------


def test_create_get_list_delete(srv: Running) -> None:
    audio = wav_bytes(seconds=0.5)
    response = post_voice(srv, "alice", audio, lora_name="good", cfg_scale=3.0, steps=20)
    assert response.status_code == 201, response.text
    voice = response.json()
    sha = hashlib.sha256(audio).hexdigest()
    assert voice["name"] == "alice" and voice["transcript"] == TRANSCRIPT
    assert (voice["lora_name"], voice["cfg_scale"], voice["steps"]) == ("good", 3.0, 20)
    assert voice["sha256"] == sha and voice["format"] == "wav" and voice["sample_rate"] == 16000
    assert voice["duration_s"] == pytest.approx(0.5, abs=1e-3) and voice["size_bytes"] == len(audio)
    assert voice["features_cached"] is True  # the owner precomputed them before answering
    stored = voices_dir(srv) / f"{sha}.wav"
    assert stored.read_bytes() == audio
    assert (str(stored.resolve()), TRANSCRIPT) in srv.engine.prepared

    listed = srv.client.get("/voices").json()
    assert listed["count"] == len(listed["voices"]) and "alice" in [v["name"] for v in listed["voices"]]
    assert srv.client.get("/voices/alice").json() == voice

    deleted = srv.client.delete("/voices/alice")
    assert deleted.status_code == 200 and deleted.json()["name"] == "alice"
    assert not stored.exists()
    for response in (srv.client.get("/voices/alice"), srv.client.delete("/voices/alice")):
        assert response.status_code == 404 and names_field(response, "voice")
    assert "alice" not in [v["name"] for v in srv.client.get("/voices").json()["voices"]]


@pytest.mark.parametrize("fmt, file_name, expected", [
    ("flac", "voice.flac", "flac"),
    ("mp3", "voice.mp3", "mp3"),
    ("opus", "voice.opus", "opus"),
    ("wav", "voice.mp3", "wav"),  # the extension lies: the bytes decide
    ("flac", "voice.wav", "flac"),
    ("mp3", "noextension", "mp3"),
])
def test_accepted_formats_by_content(srv: Running, fmt: str, file_name: str, expected: str) -> None:
    audio = encoded(fmt, freq=150 + len(file_name) * 7 + len(fmt))
    name = f"fmt-{fmt}-{file_name.replace('.', '_')}"
    response = post_voice(srv, name, audio, file_name=file_name)
    assert response.status_code == 201, response.text
    assert response.json()["format"] == expected
    assert (voices_dir(srv) / f"{hashlib.sha256(audio).hexdigest()}.{expected}").is_file()
    assert srv.client.delete(f"/voices/{name}").status_code == 200


def test_ogg_vorbis_is_accepted(srv: Running) -> None:
    buf = io.BytesIO()
    sf.write(buf, samples(), 16000, format="OGG", subtype="VORBIS")
    response = post_voice(srv, "vorbis", buf.getvalue(), file_name="v.ogg")
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "ogg"
    assert srv.client.delete("/voices/vorbis").status_code == 200


# ---- refused uploads leave nothing behind ----------------------------------------------------------


def aiff_bytes() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples(), 16000, format="AIFF")
    return buf.getvalue()


REJECTIONS = {
    "too big": (dict(name="big", content=os.urandom(MAX_UPLOAD + 1)), 413, "audio"),
    "too long": (dict(name="long", content=wav_bytes(seconds=MAX_DURATION_S + 0.5, sample_rate=8000)), 422, "audio"),
    "too long mp3": (dict(name="longmp3", content=encoded("mp3", seconds=MAX_DURATION_S + 1)), 422, "audio"),
    "not audio": (dict(name="text", content=b"this is not audio at all\n" * 40, file_name="notes.txt"), 400, "audio"),
    "junk named .wav": (dict(name="junk", content=os.urandom(4000), file_name="voice.wav"), 400, "audio"),
    "text named .mp3": (dict(name="fake", content=b"ID3 not really an mp3\n" * 40, file_name="song.mp3"), 400,
                        "audio"),
    "header only": (dict(name="hdr", content=b"RIFF\x00\x00\x00\x00WAVEfmt "), 400, "audio"),
    "unsupported format": (dict(name="aiff", content=aiff_bytes(), file_name="voice.wav"), 400, "audio"),
    "empty": (dict(name="empty", content=b""), 400, "audio"),
    "no audio field": (dict(name="noaudio", content=b"<none>"), 422, "audio"),
    "no name": (dict(name=None), 422, "name"),
    "blank name": (dict(name="   "), 422, "name"),
    "traversal name": (dict(name="../etc"), 422, "name"),
    "slash": (dict(name="a/b"), 422, "name"),
    "dot first": (dict(name=".hidden"), 422, "name"),
    "space": (dict(name="two words"), 422, "name"),
    "non-ascii": (dict(name="stimme-ä"), 422, "name"),
    "too long name": (dict(name="x" * 65), 422, "name"),
    "no transcript (VoxCPM 1.x)": (dict(name="notext", transcript=""), 422, "transcript"),
    "unknown lora": (dict(name="lora404", lora_name="missing"), 404, "lora_name"),
    "lora outside dir": (dict(name="lora403", lora_name="../good"), 403, "lora_name"),
    "cfg 0": (dict(name="cfg0", cfg_scale=0), 422, "cfg_scale"),
    "cfg 11": (dict(name="cfg11", cfg_scale=11), 422, "cfg_scale"),
    "cfg text": (dict(name="cfgx", cfg_scale="loud"), 422, "cfg_scale"),
    "steps 0": (dict(name="steps0", steps=0), 422, "steps"),
    "steps 101": (dict(name="steps101", steps=101), 422, "steps"),
    "steps float": (dict(name="stepsf", steps="2.5"), 422, "steps"),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_bad_upload_is_refused_and_stores_nothing(srv: Running, case: str) -> None:
    kwargs, status, field = REJECTIONS[case]
    before_files, before = voice_files(srv), srv.client.get("/voices").json()["count"]
    kwargs = dict(kwargs)
    response = post_voice(srv, kwargs.pop("name"), kwargs.pop("content", None), **kwargs)
    assert response.status_code == status, response.text
    assert names_field(response, field), response.text
    assert srv.client.get("/voices").json()["count"] == before
    assert voice_files(srv) == before_files, "a refused upload left a file behind"


def test_duplicate_name_is_409_and_keeps_the_first(srv: Running) -> None:
    first = wav_bytes(freq=500)
    assert post_voice(srv, "dup", first).status_code == 201
    before_files = voice_files(srv)
    response = post_voice(srv, "dup", wav_bytes(freq=600))
    assert response.status_code == 409 and names_field(response, "name")
    assert voice_files(srv) == before_files
    assert srv.client.get("/voices/dup").json()["sha256"] == hashlib.sha256(first).hexdigest()
    assert srv.client.delete("/voices/dup").status_code == 200


def test_voices_sharing_audio_share_one_file(srv: Running) -> None:
    audio = wav_bytes(freq=700)
    stored = voices_dir(srv) / f"{hashlib.sha256(audio).hexdigest()}.wav"
    assert post_voice(srv, "twin1", audio).status_code == 201
    assert post_voice(srv, "twin2", audio, transcript="Other words.").status_code == 201
    assert srv.client.delete("/voices/twin1").status_code == 200
    assert stored.is_file(), "still used by twin2"
    assert srv.client.delete("/voices/twin2").status_code == 200
    assert not stored.exists()


# ---- using a voice -----------------------------------------------------------------------------


def test_synthesize_with_voice_defaults_and_overrides(srv: Running) -> None:
    audio = wav_bytes(freq=800)
    assert post_voice(srv, "bob", audio, lora_name="good", cfg_scale=3.0, steps=20).status_code == 201
    path = str((voices_dir(srv) / f"{hashlib.sha256(audio).hexdigest()}.wav").resolve())

    task = done(srv, synth(srv, voice="bob"))
    call = last_call(srv)
    assert (call.ref_audio_path, call.ref_text) == (path, TRANSCRIPT)
    assert (call.adapter.name, call.cfg_scale, call.steps) == ("good", 3.0, 20)
    assert task["voice"] == "bob" and task["lora_name"] == "good"

    # what the client names wins, even when it equals the request default
    task = done(srv, synth(srv, voice="bob", lora_name=None, cfg_scale=2.0, steps=5))
    call = last_call(srv)
    assert (call.adapter, call.cfg_scale, call.steps, call.ref_audio_path) == (None, 2.0, 5, path)
    assert task["voice"] == "bob" and task["lora_name"] is None

    # sync mode too
    response = synth(srv, voice="bob", async_mode=False)
    assert response.status_code == 200, response.text
    assert srv.client.get(f"/task/{response.json()['task_id']}").json()["voice"] == "bob"
    assert srv.client.delete("/voices/bob").status_code == 200


def test_voice_without_defaults_uses_request_defaults(srv: Running) -> None:
    assert post_voice(srv, "plain", wav_bytes(freq=900)).status_code == 201
    done(srv, synth(srv, voice="plain"))
    call = last_call(srv)
    assert (call.adapter, call.cfg_scale, call.steps, call.ref_text) == (None, 2.0, 10, TRANSCRIPT)
    assert srv.client.delete("/voices/plain").status_code == 200


def test_voice_conflicts_and_unknown_voice(srv: Running) -> None:
    assert post_voice(srv, "carol", wav_bytes(freq=1000)).status_code == 201
    total = srv.total()
    cases = [
        (dict(voice="carol", ref_audio_path="ref.wav", ref_text="x"), 422, "voice"),
        (dict(voice="carol", ref_text="other transcript"), 422, "ref_text"),
        (dict(voice="nobody"), 404, "voice"),
        (dict(voice="../../etc/passwd"), 404, "voice"),
        (dict(voice="carol", lora_name="missing"), 404, "lora_name"),
    ]
    for body, status, field in cases:
        response = synth(srv, **body)
        assert response.status_code == status and names_field(response, field), (body, response.text)
    assert srv.total() == total, "a refused request created a task"
    assert srv.client.delete("/voices/carol").status_code == 200


def test_deleted_voice_is_refused_but_queued_task_still_runs(make_server) -> None:
    srv = make_server(engine=FakeEngine(patch_delay_s=0.05))
    audio = wav_bytes(freq=1100)
    assert post_voice(srv, "dave", audio).status_code == 201
    first = synth(srv, voice="dave", text="A sentence that takes a little while to speak out loud.")
    second = synth(srv, voice="dave")
    assert srv.client.delete("/voices/dave").status_code == 200
    for response in (first, second):  # queued before the delete: its audio was kept for it
        assert wait_final(srv.client, response.json()["task_id"], 30)["status"] == "completed"
    response = synth(srv, voice="dave")
    assert response.status_code == 404 and names_field(response, "voice")


# ---- VoxCPM2: transcript optional --------------------------------------------------------------


def test_voxcpm2_voice_without_transcript(make_server) -> None:
    srv = make_server(engine=FakeEngine(architecture="voxcpm2"))
    response = post_voice(srv, "eve", wav_bytes(freq=1200), transcript="")
    assert response.status_code == 201, response.text
    assert response.json()["transcript"] is None
    done(srv, synth(srv, voice="eve"))
    assert last_call(srv).ref_text is None and last_call(srv).ref_audio_path.endswith(".wav")


# ---- persistence, cleanup, auth ------------------------------------------------------------------


def test_voices_survive_a_restart(tmp_path: Path) -> None:
    audio = wav_bytes(freq=1300)
    with running_server(tmp_path) as first:
        write_adapter(first.lora_dir / "good", fitting_shapes(first.engine))
        assert post_voice(first, "frank", audio, lora_name="good", steps=7).status_code == 201
        created = first.client.get("/voices/frank").json()
    engine = FakeEngine()
    with running_server(tmp_path, engine=engine) as second:
        assert second.client.get("/voices/frank").json() == created
        path = str((voices_dir(second) / f"{hashlib.sha256(audio).hexdigest()}.wav").resolve())
        # the new owner makes sure every saved voice has its features for the loaded model
        wait_until(lambda: (path, TRANSCRIPT) in engine.prepared, 10, what="startup precompute")
        task = done(second, synth(second, voice="frank"))
        call = last_call(second)
        assert (call.ref_audio_path, call.adapter.name, call.steps) == (path, "good", 7)
        assert task["voice"] == "frank"


def test_cleanup_never_deletes_voice_audio(make_server) -> None:
    srv = make_server()
    (srv.ref_dir / "ref.wav").write_bytes(wav_bytes())
    audio = wav_bytes(freq=1400)
    assert post_voice(srv, "gina", audio).status_code == 201
    done(srv, synth(srv, voice="gina"))
    upload = srv.client.post("/synthesize/upload", files={"file": ("u.wav", wav_bytes(freq=1500), "audio/wav")},
                             data={"text": "Upload.", "ref_text": "x", "async_mode": "false", "response_format": "wav"})
    assert upload.status_code == 200, upload.text
    old = time.time() - 10 * 24 * 3600
    for path in srv.output_dir.rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))
    response = srv.client.delete("/cleanup", params={"max_age_s": 0})
    assert response.status_code == 200 and response.json()["deleted_count"] >= 2  # outputs and the upload went
    stored = voices_dir(srv) / f"{hashlib.sha256(audio).hexdigest()}.wav"
    assert stored.read_bytes() == audio
    done(srv, synth(srv, voice="gina"))


def test_voices_need_the_api_key(make_server) -> None:
    srv = make_server(api_key="sekret", headers={"X-API-Key": "sekret"})
    with httpx.Client(base_url=srv.server.url) as anonymous:
        assert anonymous.get("/voices").status_code == 401
        assert anonymous.post("/voices", data={"name": "x"}).status_code == 401
    assert srv.client.get("/voices").json() == {"voices": [], "count": 0}


# ---- precomputing features in the engine owner ----------------------------------------------------


class UnreadableForModel(FakeEngine):
    """Audio that libsndfile decodes but the model cannot use (e.g. a codec its loader lacks)."""

    def prepare_prompt(self, ref_audio_path: str, ref_text: str | None) -> None:
        from voxcpm_api.errors import BadAudio

        raise BadAudio("the model cannot read it", field="ref_audio_path")


class SlowPrepare(FakeEngine):
    def prepare_prompt(self, ref_audio_path: str, ref_text: str | None) -> None:
        time.sleep(1.0)
        super().prepare_prompt(ref_audio_path, ref_text)


def test_audio_the_model_cannot_read_is_refused_and_not_kept(make_server) -> None:
    srv = make_server(engine=UnreadableForModel())
    response = post_voice(srv, "henry", wav_bytes(freq=1600))
    assert response.status_code == 400 and names_field(response, "audio"), response.text
    assert srv.client.get("/voices").json()["count"] == 0
    assert voice_files(srv) == set()


def test_slow_features_finish_in_the_background(make_server, monkeypatch) -> None:
    import voxcpm_api.tasks.voices as voices_module

    monkeypatch.setattr(voices_module, "PRECOMPUTE_WAIT_S", 0.1)
    srv = make_server(engine=SlowPrepare())
    response = post_voice(srv, "ivy", wav_bytes(freq=1700))
    assert response.status_code == 201 and response.json()["features_cached"] is False, response.text
    done(srv, synth(srv, voice="ivy"))  # usable at once
    wait_until(lambda: srv.client.get("/voices/ivy").json()["features_cached"], 10, what="features_cached")
