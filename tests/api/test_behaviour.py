"""How the server behaves under load, over time and across restarts (real uvicorn, FakeEngine)."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import running_server, wav_bytes
from tests.helpers import wait_final, wait_ready, wait_until
from voxcpm_api.engine.fake import FAKE_PATCH_SAMPLES, FAKE_SAMPLE_RATE_HZ, FakeEngine
from voxcpm_api.textsplit import split_text


def status_of(client: httpx.Client, task_id: str) -> str:
    return client.get(f"/task/{task_id}").json()["status"]


# ---- the event loop stays free ------------------------------------------------------------------


def test_sync_request_does_not_block_the_server(make_server) -> None:
    engine = FakeEngine(patch_delay_s=0.05)
    running = make_server(engine=engine)
    result: dict[str, httpx.Response] = {}

    def sync_call() -> None:
        with httpx.Client(base_url=running.server.url, timeout=60) as own:
            result["response"] = own.post("/synthesize", json={"text": "s" * 120, "async_mode": False})  # 1.5 s

    thread = threading.Thread(target=sync_call, daemon=True)
    thread.start()
    # short timeouts: a blocked event loop must fail this test, not hang it
    with httpx.Client(base_url=running.server.url, timeout=3) as probe:
        wait_until(lambda: probe.get("/tasks", params={"status": "processing"}).json()["total"] == 1, 10,
                   what="the sync task to run")
        for path in ("/health", "/tasks", "/loras"):
            started = time.monotonic()
            response = probe.get(path)
            elapsed = time.monotonic() - started
            assert response.status_code == 200
            assert elapsed < 0.5, f"{path} took {elapsed:.2f}s while a sync request was in flight"
        assert thread.is_alive(), "the sync request finished before the server was probed"
    thread.join(30)
    assert result["response"].status_code == 200
    assert result["response"].json()["status"] == "success"


# ---- progress -----------------------------------------------------------------------------------


def test_progress_is_monotonic_and_one_only_with_the_file(make_server) -> None:
    engine = FakeEngine(patch_delay_s=0.02)
    running = make_server(engine=engine, chunk_max_chars=120)
    client = running.client
    text = ("This first sentence is long enough to matter here. " * 2 + "A second part follows right after it. " * 3)
    task_id = client.post("/synthesize", json={"text": text}).json()["task_id"]
    seen: list[tuple[str, float, str | None]] = []

    def finished() -> bool:
        task = client.get(f"/task/{task_id}").json()
        seen.append((task["status"], task["progress"], task["audio_path"]))
        if task["status"] == "completed":
            return True
        assert task["status"] in ("pending", "processing"), task
        return False

    wait_until(finished, 30, 0.02, "task completion")
    progress = [p for _, p, _ in seen]
    assert progress == sorted(progress), progress
    assert all(p < 1.0 for s, p, _ in seen if s != "completed")
    assert all(a is None for s, _, a in seen if s != "completed")
    intermediate = {p for s, p, _ in seen if s == "processing" and 0.0 < p < 1.0}
    assert len(intermediate) >= 3, f"too few progress updates observed: {sorted(intermediate)}"
    status, last, audio_path = seen[-1]
    assert last == 1.0 and audio_path is not None and Path(audio_path).is_file()
    assert len(running.task_calls()) > 1  # the progress crossed chunk boundaries


# ---- long text ----------------------------------------------------------------------------------


def test_long_text_is_split_into_engine_calls_with_consecutive_seeds(make_server) -> None:
    engine = FakeEngine()
    running = make_server(engine=engine, chunk_max_chars=40)
    text = ("The first sentence is right here. The second one follows it now. "
            "Then comes a third, which is longer than the others were. And a fourth ends it.")
    assert len(text) > 40
    body = running.client.post("/synthesize", json={"text": text, "seed": 500, "async_mode": False,
                                                    "response_format": "wav"}).json()
    assert body["status"] == "success", body
    calls = running.task_calls()
    chunks = [c.text for c in calls]
    assert len(chunks) >= 3
    assert chunks == split_text(text, 40)
    assert all(len(c) <= 40 for c in chunks)
    assert " ".join(chunks).split() == text.split()  # every word once, in order
    assert [c.seed for c in calls] == [500 + i for i in range(len(calls))]
    # the chunks are joined with a 40 ms crossfade at each seam
    lengths = [engine.expected_patches(c) * FAKE_PATCH_SAMPLES for c in chunks]
    overlap = int(0.040 * FAKE_SAMPLE_RATE_HZ)
    expected = sum(lengths) - overlap * (len(lengths) - 1)
    assert body["duration_s"] == pytest.approx(expected / FAKE_SAMPLE_RATE_HZ, abs=1e-3)


def test_short_text_is_one_call_with_the_text_untouched(make_server) -> None:
    running = make_server(chunk_max_chars=200)
    text = "  Short text, with spaces around it.  "
    running.client.post("/synthesize", json={"text": text, "seed": 3, "async_mode": False})
    assert [(c.text, c.seed) for c in running.task_calls()] == [(text, 3)]


# ---- queue and concurrency ----------------------------------------------------------------------


def test_full_queue_is_429_with_retry_after(make_server) -> None:
    engine = FakeEngine(patch_delay_s=0.05)
    running = make_server(engine=engine, max_queue=1, max_concurrent=1)
    client = running.client
    first = client.post("/synthesize", json={"text": "q" * 400}).json()["task_id"]
    wait_until(lambda: status_of(client, first) == "processing", 10, what="first task running")
    second = client.post("/synthesize", json={"text": "waiting"})
    assert second.status_code == 200
    total = running.total()
    for async_mode in (True, False):
        response = client.post("/synthesize", json={"text": "one too many", "async_mode": async_mode})
        assert response.status_code == 429, response.text
        assert int(response.headers["retry-after"]) >= 1
        assert isinstance(response.json()["detail"], str)
    upload = client.post("/synthesize/upload", files={"file": ("r.wav", wav_bytes(), "audio/wav")},
                         data={"text": "one too many", "ref_text": "r"})
    assert upload.status_code == 429
    assert running.total() == total
    # once the queue drains, submissions are accepted again
    client.delete(f"/task/{second.json()['task_id']}")
    assert client.post("/synthesize", json={"text": "fits again"}).status_code == 200
    client.delete(f"/task/{first}")


def test_max_concurrent_bounds_processing(make_server) -> None:
    engine = FakeEngine(patch_delay_s=0.01)
    running = make_server(engine=engine, max_concurrent=2)
    client = running.client
    ids = [client.post("/synthesize", json={"text": f"concurrent task {i} " + "c" * 40,
                                            "response_format": "flac"}).json()["task_id"] for i in range(6)]
    observed: list[int] = []

    def all_done() -> bool:
        body = client.get("/tasks", params={"status": "processing"}).json()
        assert body["processing"] == body["total"] == len(body["tasks"])
        assert all(t["status"] == "processing" for t in body["tasks"])
        observed.append(body["total"])
        done = client.get("/tasks", params={"status": "completed"}).json()["total"]
        return done == len(ids)

    wait_until(all_done, 30, 0.01, "all tasks to complete")
    assert max(observed) <= 2, observed
    assert max(observed) >= 1, "never saw a task processing: the check above proved nothing"
    assert client.get("/tasks").json()["max_concurrent"] == 2


def test_fifo_completion_with_one_slot(make_server) -> None:
    engine = FakeEngine(patch_delay_s=0.005)
    running = make_server(engine=engine, max_concurrent=1)
    client = running.client
    texts = [f"fifo number {i}" for i in range(6)]
    ids = [client.post("/synthesize", json={"text": t}).json()["task_id"] for t in texts]
    finals = [wait_final(client, task_id, 30) for task_id in ids]
    assert all(f["status"] == "completed" for f in finals)
    assert [c.text for c in running.task_calls()] == texts
    finished = [datetime.fromisoformat(f["updated_at"]) for f in finals]
    assert finished == sorted(finished)


# ---- failures -----------------------------------------------------------------------------------


def test_engine_failure_fails_only_that_task(make_server) -> None:
    running = make_server(max_concurrent=1)
    client = running.client
    bad = client.post("/synthesize", json={"text": "please FAIL_ENGINE now"}).json()["task_id"]
    good = client.post("/synthesize", json={"text": "this one is fine"}).json()["task_id"]
    failed = wait_final(client, bad, 30)
    assert failed["status"] == "failed"
    assert "fake engine was asked to fail" in failed["error"]
    assert failed["audio_path"] is None and failed["progress"] < 1.0
    assert failed["attempts"] == 1
    assert sum(1 for c in running.task_calls() if "FAIL_ENGINE" in c.text) == 1  # not retried
    assert wait_final(client, good, 30)["status"] == "completed"
    assert not any(p.name.startswith(f"tts_{bad}_") for p in running.output_dir.iterdir())

    sync = client.post("/synthesize", json={"text": "sync FAIL_ENGINE", "async_mode": False})
    assert 500 <= sync.status_code < 600
    assert "fake engine was asked to fail" in sync.json()["detail"]
    failed_sync = client.get("/tasks", params={"status": "failed"}).json()
    assert failed_sync["total"] == 2
    after = client.post("/synthesize", json={"text": "still working", "async_mode": False})
    assert after.status_code == 200 and after.json()["status"] == "success"


# ---- auth ---------------------------------------------------------------------------------------


def test_api_key_protects_every_route_but_health_and_docs(make_server) -> None:
    key = "K-secret-123"
    running = make_server(api_key=key, headers={"X-API-Key": key})
    authed = running.client
    done = authed.post("/synthesize", json={"text": "auth check", "async_mode": False}).json()
    name = done["audio_path"].rsplit("/", 1)[-1]
    ref = wav_bytes()

    routes = [
        ("GET", "/loras", {}, 200),
        ("POST", "/synthesize", {"json": {"text": "authorized"}}, 200),
        ("POST", "/synthesize/upload", {"files": {"file": ("r.wav", ref, "audio/wav")},
                                        "data": {"text": "authorized", "ref_text": "r"}}, 200),
        ("GET", f"/task/{done['task_id']}", {}, 200),
        ("DELETE", f"/task/{done['task_id']}", {}, 409),
        ("DELETE", "/task/0123456789ab", {}, 404),
        ("GET", "/tasks", {}, 200),
        ("GET", f"/download/{name}", {}, 200),
        ("DELETE", "/cleanup", {}, 200),
    ]
    bad_headers = [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": key},
                   {"Authorization": f"Basic {key}"}, {"X-API-Key": ""}, {"Authorization": f"Bearer {key}x"},
                   {"X-API-Key": "wrong", "Authorization": f"Bearer {key}"}]
    good_headers = [{"Authorization": f"Bearer {key}"}, {"authorization": f"bearer {key}"}, {"X-API-Key": key}]
    with httpx.Client(base_url=running.server.url, timeout=30) as anonymous:
        for method, path, kwargs, ok_status in routes:
            for headers in bad_headers:
                before = running.total()
                response = anonymous.request(method, path, headers=headers, **kwargs)
                assert response.status_code == 401, (method, path, headers, response.status_code)
                assert response.headers.get("www-authenticate") == "Bearer"
                assert running.total() == before
                if method == "GET" and path.startswith("/download"):
                    assert response.content != Path(done["audio_path"]).read_bytes()
            for headers in good_headers:
                response = anonymous.request(method, path, headers=headers, **kwargs)
                assert response.status_code == ok_status, (method, path, headers, response.text)
        for path in ("/health", "/docs", "/openapi.json"):
            assert anonymous.get(path).status_code == 200, path


def test_api_key_checked_before_the_body_is_parsed(make_server) -> None:
    running = make_server(api_key="K")
    with httpx.Client(base_url=running.server.url, timeout=30) as anonymous:
        response = anonymous.post("/synthesize", content=b'{"text": ', headers={"content-type": "application/json"})
        assert response.status_code == 401


def test_no_api_key_means_open(make_server) -> None:
    running = make_server()
    with httpx.Client(base_url=running.server.url, timeout=30) as anonymous:
        assert anonymous.get("/tasks").status_code == 200
        assert anonymous.get("/loras", headers={"Authorization": "Bearer whatever"}).status_code == 200


# ---- restart ------------------------------------------------------------------------------------


def test_tasks_survive_a_restart(tmp_path) -> None:
    base = tmp_path / "restart"
    engine = FakeEngine()
    with running_server(base, engine=engine) as first:
        client = first.client
        old = client.post("/synthesize", json={"text": "done before the restart", "async_mode": False}).json()
        old_bytes = Path(old["audio_path"]).read_bytes()
        engine.patch_delay_s = 0.05
        texts = [f"interrupted task {i} " + "r" * 80 for i in range(3)]
        ids = [client.post("/synthesize", json={"text": t, "seed": 100 + i}).json()["task_id"]
               for i, t in enumerate(texts)]
        wait_until(lambda: client.get(f"/task/{ids[0]}").json()["progress"] > 0, 10, what="first task running")
    # the first server is gone: nothing answers on its port
    with pytest.raises(httpx.TransportError), httpx.Client(base_url=first.server.url, timeout=2) as dead:
        dead.get("/health")

    engine2 = FakeEngine()
    with running_server(base, engine=engine2, wait=False) as second:
        client = second.client
        wait_ready(client, 30)
        finals = [wait_final(client, task_id, 30) for task_id in ids]
        assert [f["status"] for f in finals] == ["completed"] * 3
        assert [f["seed"] for f in finals] == [100, 101, 102]
        assert all(f["attempts"] == 1 for f in finals)  # a graceful stop does not use up an attempt
        assert [c.text for c in second.task_calls()] == texts
        for final in finals:
            assert client.get(f"/download/{final['audio_path'].rsplit('/', 1)[-1]}").status_code == 200
        listed = {t["task_id"]: t for t in client.get("/tasks").json()["tasks"]}
        assert listed[old["task_id"]]["status"] == "completed"
        assert listed[old["task_id"]]["audio_path"] == old["audio_path"]
        download = client.get(f"/download/{old['audio_path'].rsplit('/', 1)[-1]}")
        assert download.status_code == 200 and download.content == old_bytes
        assert client.get("/tasks").json()["total"] == 4
