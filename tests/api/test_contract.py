"""The HTTP contract: every endpoint keeps every field the seed's README shows, with its type.

All tests talk HTTP to a real uvicorn serving `create_app(Settings(...), engine=FakeEngine(...))`.
"""

from __future__ import annotations

import io
import os
import re
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.api.conftest import decode, fitting_shapes, wav_bytes, write_adapter
from tests.helpers import wait_final, wait_ready, wait_until
from voxcpm_api.engine.fake import FAKE_PATCH_SAMPLES, FAKE_SAMPLE_RATE_HZ, FakeEngine

TEXT = "Hello, this is a test of VoxCPM TTS API."
MEDIA = {"mp3": "audio/mpeg", "wav": "audio/wav", "flac": "audio/flac", "opus": "audio/ogg", "pcm": "audio/pcm"}


def expected_samples(text: str) -> int:
    return FakeEngine().expected_patches(text) * FAKE_PATCH_SAMPLES


def is_int(value: object) -> bool:
    return type(value) is int


def is_float(value: object) -> bool:
    return type(value) in (int, float)  # JSON 1.0 may arrive as 1 from some encoders; never a bool


def file_name(audio_path: str) -> str:
    return audio_path.rsplit("/", 1)[-1]


def check_task_shape(task: dict) -> None:
    """Every field of the seed's GET /task/{id} example, plus the additions the brief requires."""
    assert isinstance(task["task_id"], str) and task["task_id"]
    assert task["status"] in ("pending", "processing", "completed", "failed", "cancelled")
    assert isinstance(task["message"], str)
    assert is_float(task["progress"]) and 0.0 <= task["progress"] <= 1.0
    datetime.fromisoformat(task["created_at"])
    datetime.fromisoformat(task["updated_at"])
    assert task["estimated_time"] is None or is_int(task["estimated_time"])
    assert task["audio_path"] is None or isinstance(task["audio_path"], str)
    assert task["sample_rate"] is None or is_int(task["sample_rate"])
    assert task["duration_s"] is None or is_float(task["duration_s"])
    assert task["lora_name"] is None or isinstance(task["lora_name"], str)
    assert is_int(task["seed"]) and task["seed"] >= 0
    assert "error" in task


@pytest.fixture(scope="module")
def srv(make_module_server):
    """One fast server shared by the read-mostly contract tests of this module."""
    return make_module_server(engine=FakeEngine())


# ---- /health ----------------------------------------------------------------------------------


def test_health_reports_loading_then_loaded(make_server) -> None:
    running = make_server(engine=FakeEngine(load_delay_s=1.5), wait=False)
    first = running.client.get("/health")
    assert first.status_code == 200
    body = first.json()
    assert body["status"] == "healthy"
    assert body["model_loaded"] is False
    loaded = wait_ready(running.client, timeout_s=30)
    assert loaded["status"] == "healthy"
    assert loaded["model_loaded"] is True
    assert loaded["sample_rate"] == FAKE_SAMPLE_RATE_HZ
    assert loaded["model"] == "fake"


def test_health_shape(srv) -> None:
    body = srv.client.get("/health").json()
    assert body["status"] == "healthy"
    assert type(body["model_loaded"]) is bool and body["model_loaded"]


# ---- /loras -----------------------------------------------------------------------------------


def test_loras_empty_then_new_adapters_appear_without_restart(make_server) -> None:
    running = make_server()
    body = running.client.get("/loras").json()
    assert body == {"loras": [], "count": 0}

    shapes = fitting_shapes(running.engine)
    write_adapter(running.lora_dir / "flat", shapes)
    write_adapter(running.lora_dir / "run1" / "checkpoints" / "step_0000200", shapes)
    legacy = running.lora_dir / "legacy"
    legacy.mkdir()
    (legacy / "lora_weights.ckpt").write_bytes(b"not read by the catalog")
    no_weights = running.lora_dir / "no_weights"
    no_weights.mkdir()
    (no_weights / "lora_config.json").write_text('{"r": 8}', encoding="utf-8")
    (running.lora_dir / "run1" / "checkpoints" / "notes.txt").write_text("x", encoding="utf-8")

    body = running.client.get("/loras").json()
    assert sorted(body["loras"]) == ["flat", "legacy", "run1/checkpoints/step_0000200"]
    assert body["count"] == 3 and is_int(body["count"])

    write_adapter(running.lora_dir / "run1" / "checkpoints" / "step_0000400", shapes)
    body = running.client.get("/loras").json()
    assert "run1/checkpoints/step_0000400" in body["loras"] and body["count"] == 4


# ---- POST /synthesize -------------------------------------------------------------------------


def test_synthesize_async_shape(srv) -> None:
    response = srv.client.post("/synthesize", json={"text": TEXT})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "submitted"
    assert isinstance(body["task_id"], str) and body["task_id"]
    assert isinstance(body["message"], str) and body["message"]
    assert is_int(body["estimated_time"]) and body["estimated_time"] >= 0
    assert body["progress"] == 0.0 and is_float(body["progress"])
    assert wait_final(srv.client, body["task_id"], 30)["status"] == "completed"


def test_synthesize_sync_shape_and_audio_path(srv) -> None:
    before = int(time.time())
    response = srv.client.post("/synthesize", json={"text": TEXT, "async_mode": False})
    after = int(time.time())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success"
    assert isinstance(body["message"], str) and body["message"]
    task_id = body["task_id"]
    match = re.fullmatch(re.escape(srv.output_dir.as_posix()) + rf"/tts_{task_id}_(\d+)\.mp3", body["audio_path"])
    assert match, body["audio_path"]
    assert before <= int(match.group(1)) <= after
    assert Path(body["audio_path"]).is_file()
    assert body["sample_rate"] == FAKE_SAMPLE_RATE_HZ and is_int(body["sample_rate"])
    task = srv.client.get(f"/task/{task_id}").json()
    assert task["status"] == "completed" and task["audio_path"] == body["audio_path"]


@pytest.mark.parametrize("fmt", ["mp3", "wav", "flac", "opus", "pcm", None])
def test_every_response_format_downloads_and_decodes(srv, fmt: str | None) -> None:
    payload: dict[str, object] = {"text": TEXT, "async_mode": False, "seed": 11}
    if fmt is not None:
        payload["response_format"] = fmt
    fmt = fmt or "mp3"  # the default
    body = srv.client.post("/synthesize", json=payload).json()
    name = file_name(body["audio_path"])
    assert name.endswith("." + fmt)
    download = srv.client.get(f"/download/{name}")
    assert download.status_code == 200
    assert download.headers["content-type"].split(";")[0] == MEDIA[fmt]
    assert download.content == Path(body["audio_path"]).read_bytes()
    samples, rate = decode(download.content, fmt, body["sample_rate"])
    assert rate == FAKE_SAMPLE_RATE_HZ == body["sample_rate"]  # 16 kHz is valid for every codec
    want = expected_samples(TEXT)
    if fmt in ("wav", "flac", "pcm"):
        assert len(samples) == want
    else:  # lossy codecs add encoder delay/padding of at most a few frames
        assert abs(len(samples) - want) < 0.25 * want, (len(samples), want)
    if fmt == "pcm":
        assert len(download.content) == 2 * want
    assert float(np.sqrt(np.mean(samples ** 2))) > 0.02  # real signal, not silence
    task = srv.client.get(f"/task/{body['task_id']}").json()
    assert task["response_format"] == fmt
    assert task["duration_s"] == pytest.approx(want / FAKE_SAMPLE_RATE_HZ, abs=1e-3)


def test_pcm_bytes_equal_the_wav_data(srv) -> None:
    paths = {}
    for fmt in ("wav", "pcm"):
        body = srv.client.post("/synthesize", json={"text": TEXT, "async_mode": False, "seed": 5,
                                                    "response_format": fmt}).json()
        paths[fmt] = srv.client.get(f"/download/{file_name(body['audio_path'])}").content
    wav_samples, _ = sf.read(io.BytesIO(paths["wav"]), dtype="int16")
    assert np.array_equal(wav_samples, np.frombuffer(paths["pcm"], dtype="<i2"))


# ---- GET /task/{id} ---------------------------------------------------------------------------


def test_task_fields_and_random_seed_reported(srv) -> None:
    submitted = srv.client.post("/synthesize", json={"text": TEXT, "seed": -1, "response_format": "wav"}).json()
    assert is_int(submitted["seed"]) and submitted["seed"] >= 0
    task = wait_final(srv.client, submitted["task_id"], 30)
    check_task_shape(task)
    assert task["status"] == "completed" and task["progress"] == 1.0 and task["error"] is None
    assert task["seed"] == submitted["seed"]
    assert task["sample_rate"] == FAKE_SAMPLE_RATE_HZ
    assert task["duration_s"] == pytest.approx(expected_samples(TEXT) / FAKE_SAMPLE_RATE_HZ, abs=1e-3)
    assert task["lora_name"] is None
    assert Path(task["audio_path"]).is_file()
    calls = [c for c in srv.engine.calls if c.text == TEXT and c.seed == submitted["seed"]]
    assert len(calls) == 1  # the seed reported is the seed the engine used


def test_two_random_seeds_differ(srv) -> None:
    seeds = {srv.client.post("/synthesize", json={"text": TEXT}).json()["seed"] for _ in range(3)}
    assert len(seeds) == 3


def test_lora_name_reported_and_reaches_engine(srv) -> None:
    write_adapter(srv.lora_dir / "voices" / "alice", fitting_shapes(srv.engine))
    body = srv.client.post("/synthesize", json={"text": "adapter text", "lora_name": "voices/alice",
                                                "async_mode": False}).json()
    assert body["status"] == "success", body
    task = srv.client.get(f"/task/{body['task_id']}").json()
    assert task["lora_name"] == "voices/alice"
    call = [c for c in srv.engine.calls if c.text == "adapter text"][-1]
    assert call.adapter is not None and call.adapter.name == "voices/alice"
    assert call.adapter.rank == 8


@pytest.mark.parametrize("lora_name", [None, "None", "none", ""])
def test_base_model_names(srv, lora_name: str | None) -> None:
    body = srv.client.post("/synthesize", json={"text": "base model", "lora_name": lora_name,
                                                "async_mode": False}).json()
    assert body["status"] == "success", body
    assert srv.client.get(f"/task/{body['task_id']}").json()["lora_name"] is None


def test_same_seed_same_bytes_different_seed_different_bytes(srv) -> None:
    def audio(seed: int) -> bytes:
        body = srv.client.post("/synthesize", json={"text": TEXT, "seed": seed, "async_mode": False}).json()
        assert body["seed"] == seed
        return srv.client.get(f"/download/{file_name(body['audio_path'])}").content

    first, second, other = audio(1234), audio(1234), audio(1235)
    assert first == second
    assert first != other


def test_unknown_task_is_404(srv) -> None:
    response = srv.client.get("/task/0123456789ab")
    assert response.status_code == 404
    assert isinstance(response.json()["detail"], str)


# ---- GET /tasks -------------------------------------------------------------------------------


def test_tasks_list_filter_and_limit(make_server) -> None:
    running = make_server(max_concurrent=2)
    client = running.client
    ids = [client.post("/synthesize", json={"text": f"task number {i}", "async_mode": False}).json()["task_id"]
           for i in range(3)]
    failed = client.post("/synthesize", json={"text": "FAIL_ENGINE now"}).json()["task_id"]
    assert wait_final(client, failed, 30)["status"] == "failed"

    body = client.get("/tasks").json()
    assert set(body) >= {"tasks", "total", "processing", "max_concurrent"}
    assert body["total"] == 4 and is_int(body["total"])
    assert is_int(body["processing"]) and body["processing"] == 0
    assert body["max_concurrent"] == 2
    for task in body["tasks"]:
        check_task_shape(task)
    assert {t["task_id"] for t in body["tasks"]} == {*ids, failed}

    completed = client.get("/tasks", params={"status": "completed"}).json()
    assert completed["total"] == 3 and {t["task_id"] for t in completed["tasks"]} == set(ids)
    assert all(t["status"] == "completed" for t in completed["tasks"])

    limited = client.get("/tasks", params={"status": "completed", "limit": 2}).json()
    assert len(limited["tasks"]) == 2 and limited["total"] == 3

    only_failed = client.get("/tasks", params={"status": "failed"}).json()
    assert [t["task_id"] for t in only_failed["tasks"]] == [failed] and only_failed["total"] == 1
    assert client.get("/tasks", params={"status": "pending"}).json() == {
        "tasks": [], "total": 0, "processing": 0, "max_concurrent": 2}

    assert client.get("/tasks", params={"status": "bogus"}).status_code == 422
    assert client.get("/tasks", params={"limit": 0}).status_code == 422
    assert client.get("/tasks", params={"limit": "many"}).status_code == 422


# ---- DELETE /cleanup --------------------------------------------------------------------------


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_cleanup_deletes_old_files_keeps_records_fresh_files_and_active_inputs(make_server) -> None:
    engine = FakeEngine()
    running = make_server(engine=engine)
    client = running.client

    old = client.post("/synthesize", json={"text": "old one", "async_mode": False}).json()
    fresh = client.post("/synthesize", json={"text": "fresh one", "async_mode": False}).json()
    done_upload = client.post("/synthesize/upload", files={"file": ("done.wav", wav_bytes(freq=300), "audio/wav")},
                              data={"text": "cloned", "ref_text": "a reference", "async_mode": "false"}).json()
    assert done_upload["status"] == "success", done_upload
    _age(Path(old["audio_path"]), 7200)
    (done_ref,) = (running.output_dir / "uploads").iterdir()
    _age(done_ref, 7200)

    # an unfinished task whose uploaded reference is old must keep it
    engine.patch_delay_s = 0.05
    busy = client.post("/synthesize/upload", files={"file": ("busy.wav", wav_bytes(freq=500), "audio/wav")},
                       data={"text": "x" * 400, "ref_text": "another reference"}).json()
    wait_until(lambda: client.get(f"/task/{busy['task_id']}").json()["status"] == "processing", 10, what="busy")
    busy_ref = next(p for p in (running.output_dir / "uploads").iterdir() if p != done_ref)
    _age(busy_ref, 7200)
    # a file that only looks like ours is not touched either
    stranger = running.output_dir / "tts_notours.mp3"
    stranger.write_bytes(b"x")
    _age(stranger, 7200)

    response = client.delete("/cleanup", params={"max_age_s": 3600})
    assert response.status_code == 200
    body = response.json()
    assert body["message"] == "Cleanup completed"
    assert body["deleted_count"] == 2 and is_int(body["deleted_count"])

    assert not Path(old["audio_path"]).exists()
    assert not done_ref.exists()
    assert busy_ref.exists()
    assert stranger.exists()
    assert Path(fresh["audio_path"]).exists()
    record = client.get(f"/task/{old['task_id']}").json()
    assert record["status"] == "completed" and record["audio_path"] is None
    assert client.get(f"/download/{file_name(old['audio_path'])}").status_code == 404
    assert client.get(f"/task/{fresh['task_id']}").json()["audio_path"] == fresh["audio_path"]
    assert client.get(f"/download/{file_name(fresh['audio_path'])}").status_code == 200
    listed = {t["task_id"] for t in client.get("/tasks").json()["tasks"]}
    assert {old["task_id"], fresh["task_id"], done_upload["task_id"], busy["task_id"]} <= listed

    # the default max age (3600 s) keeps everything that is left
    assert client.delete("/cleanup").json()["deleted_count"] == 0
    assert client.delete(f"/task/{busy['task_id']}").status_code == 200
    assert wait_final(client, busy["task_id"], 10)["status"] == "cancelled"


def test_cleanup_keeps_upload_of_pending_task_with_relative_output_dir(monkeypatch, make_server, tmp_path) -> None:
    """The default --output-dir is relative (./api_outputs); uploads of unfinished tasks must survive."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    engine = FakeEngine(patch_delay_s=0.05)
    running = make_server(engine=engine, output_dir=Path("api_outputs"))
    client = running.client
    first = client.post("/synthesize", json={"text": "y" * 400}).json()
    wait_until(lambda: client.get(f"/task/{first['task_id']}").json()["status"] == "processing", 10, what="first")
    pending = client.post("/synthesize/upload", files={"file": ("ref.wav", wav_bytes(), "audio/wav")},
                          data={"text": "waits in the queue", "ref_text": "the reference"}).json()
    assert client.get(f"/task/{pending['task_id']}").json()["status"] == "pending"
    (upload,) = (workdir / "api_outputs" / "uploads").iterdir()
    _age(upload, 7200)
    assert client.delete("/cleanup", params={"max_age_s": 60}).json()["deleted_count"] == 0
    assert upload.exists()
    engine.patch_delay_s = 0.0
    client.delete(f"/task/{first['task_id']}")
    assert wait_final(client, pending["task_id"], 20)["status"] == "completed"


# ---- DELETE /task/{id} ------------------------------------------------------------------------


def test_cancel_pending_running_finished_unknown(make_server) -> None:
    engine = FakeEngine(patch_delay_s=0.05)
    running = make_server(engine=engine)
    client = running.client
    long_text = "z" * 400  # 100 patches: 5 s if not cancelled
    runner = client.post("/synthesize", json={"text": long_text}).json()["task_id"]
    waiter = client.post("/synthesize", json={"text": "queued behind"}).json()["task_id"]
    wait_until(lambda: client.get(f"/task/{runner}").json()["progress"] > 0, 10, what="progress")
    assert client.get(f"/task/{waiter}").json()["status"] == "pending"

    response = client.delete(f"/task/{waiter}")
    assert response.status_code == 200
    check_task_shape(response.json())
    assert response.json()["status"] == "cancelled"

    started = time.monotonic()
    response = client.delete(f"/task/{runner}")
    assert response.status_code == 200
    assert response.json()["status"] in ("processing", "cancelled")
    final = wait_final(client, runner, 10)
    assert final["status"] == "cancelled"
    assert time.monotonic() - started < 2.0  # stopped at a patch boundary, not after 100 patches
    assert final["audio_path"] is None and final["progress"] < 1.0
    assert not any(p.name.startswith(f"tts_{runner}_") for p in running.output_dir.iterdir())
    assert client.get(f"/task/{waiter}").json()["status"] == "cancelled"
    assert not any(c.text == "queued behind" for c in engine.calls)

    assert client.delete(f"/task/{waiter}").status_code == 409
    engine.patch_delay_s = 0.0
    done = client.post("/synthesize", json={"text": "finishes", "async_mode": False}).json()
    conflict = client.delete(f"/task/{done['task_id']}")
    assert conflict.status_code == 409 and isinstance(conflict.json()["detail"], str)
    assert client.get(f"/task/{done['task_id']}").json()["status"] == "completed"
    assert client.delete("/task/0123456789ab").status_code == 404


# ---- /download security -----------------------------------------------------------------------


def test_download_serves_only_files_of_tasks(srv) -> None:
    body = srv.client.post("/synthesize", json={"text": TEXT, "async_mode": False}).json()
    name = file_name(body["audio_path"])
    assert srv.client.get(f"/download/{name}").status_code == 200  # the positive control

    upload = srv.client.post("/synthesize/upload", files={"file": ("ref.wav", wav_bytes(freq=330), "audio/wav")},
                             data={"text": "clone", "ref_text": "ref", "async_mode": "false"})
    assert upload.status_code == 200, upload.text
    uploaded = next((srv.output_dir / "uploads").iterdir()).name
    stray = f"tts_{'ab' * 6}_{int(time.time())}.mp3"  # our pattern, but no task wrote it
    (srv.output_dir / stray).write_bytes(Path(body["audio_path"]).read_bytes())
    os.symlink("/etc/passwd", srv.output_dir / f"tts_{'cd' * 6}_1700000000.wav")
    secret = srv.output_dir.parent / "secret.txt"
    secret.write_text("secret", encoding="utf-8")

    for path in [
        "/download/..%2F..%2Fetc%2Fpasswd",
        "/download/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/download/%2e%2e%2F%2e%2e%2Fetc%2Fpasswd",
        "/download/%2e%2e%2Fsecret.txt",
        "/download/%2e%2e",
        "/download/..%5Csecret.txt",
        "/download/tasks.sqlite3",
        "/download/tasks.sqlite3-wal",
        "/download/.engine.lock",
        f"/download/{stray}",
        f"/download/tts_{'cd' * 6}_1700000000.wav",
        f"/download/{uploaded}",
        f"/download/uploads%2F{uploaded}",
        f"/download/.{name}.part",
    ]:
        request = srv.client.build_request("GET", path)
        response = srv.client.send(request)
        assert response.status_code == 404, (path, response.status_code)
        assert b"root:" not in response.content and b"secret" not in response.content
        assert b"SQLite" not in response.content


# ---- /docs and /openapi.json ------------------------------------------------------------------


def test_docs_and_openapi_list_every_endpoint(srv) -> None:
    docs = srv.client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = srv.client.get("/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    expected = {
        "/health": {"get"}, "/loras": {"get"}, "/synthesize": {"post"}, "/synthesize/upload": {"post"},
        "/task/{task_id}": {"get", "delete"}, "/tasks": {"get"}, "/download/{filename}": {"get"},
        "/cleanup": {"delete"},
    }
    for path, methods in expected.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))
    schemas = spec.json()["components"]["schemas"]
    assert {"text", "lora_name", "cfg_scale", "steps", "seed", "ref_audio_path", "ref_text", "async_mode",
            "response_format"} <= set(schemas["SynthesizeRequest"]["properties"])


def test_periodic_cleanup_removes_old_files_by_itself(make_server) -> None:
    """--cleanup-interval-s: the engine owner sweeps on its own, with --cleanup-max-age-s."""
    running = make_server(cleanup_interval_s=0.2, cleanup_max_age_s=3600)
    client = running.client
    old = client.post("/synthesize", json={"text": "old one", "async_mode": False}).json()
    fresh = client.post("/synthesize", json={"text": "fresh one", "async_mode": False}).json()
    old_path, fresh_path = Path(old["audio_path"]), Path(fresh["audio_path"])
    _age(old_path, 7200)
    # the sweep deletes its files, then records them in the store: wait for the record, the sweep's last act
    # (waiting for the file alone raced the record's update on a loaded machine)
    record = wait_until(lambda: (r := client.get(f"/task/{old['task_id']}").json())["audio_path"] is None and r,
                        10, 0.05, "the periodic sweep")
    assert not old_path.exists()
    assert fresh_path.exists()
    assert record["status"] == "completed" and record["audio_path"] is None
    assert "cleanup" in record["message"]
