"""POST/GET /synthesize/stream over real uvicorn with FakeEngine: bytes as they are made, errors before
the first byte, the engine gate shared with tasks, and a disconnect stopping the generation."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.helpers import ThreadServer, wait_final, wait_ready, wait_until
from voxcpm_api.api.app import create_app
from voxcpm_api.config import Settings
from voxcpm_api.engine.fake import FAKE_PATCH_SAMPLES, FAKE_SAMPLE_RATE_HZ, FakeEngine


def pcm_samples(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def wav_as_int16(data: bytes) -> np.ndarray:
    samples, _ = sf.read(io.BytesIO(data), dtype="int16")
    return samples


def task_wav(client: httpx.Client, **body: object) -> bytes:
    response = client.post("/synthesize", json={**body, "async_mode": False, "response_format": "wav"})
    assert response.status_code == 200, response.text
    return client.get(response.json()["download_url"]).content


class RecordingEvents:
    """An Events sink that keeps every call (thread-safe enough: list.append is atomic)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def request_finished(self, endpoint: str, status_code: int) -> None:
        self.calls.append(("request_finished", endpoint, status_code))

    def generation_started(self, kind: str, lora: str | None, voice: str | None) -> None:
        self.calls.append(("generation_started", kind))

    def first_audio(self, kind: str, seconds: float, lora: str | None, voice: str | None) -> None:
        self.calls.append(("first_audio", kind, seconds))

    def generation_finished(self, kind: str, outcome: str, audio_s: float, wall_s: float, lora: str | None,
                            voice: str | None) -> None:
        self.calls.append(("generation_finished", kind, outcome, audio_s))

    def of_kind(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if len(c) > 1 and c[1] == kind]


@pytest.fixture(scope="module")
def shared(make_module_server):  # type: ignore[no-untyped-def]
    """One server for the tests that only read (started once per module)."""
    return make_module_server()


# ---- what comes back ----------------------------------------------------------------------------


def test_stream_is_the_task_audio_sent_patch_by_patch(make_server) -> None:
    engine = FakeEngine(patch_delay_s=0.1)
    running = make_server(engine=engine)
    body = {"text": "Streaming keeps the first byte early.", "seed": 11, "response_format": "wav"}
    arrivals: list[tuple[float, int]] = []
    started = time.monotonic()
    with running.client.stream("POST", "/synthesize/stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/wav"
        assert response.headers["x-seed"] == "11"
        assert response.headers["x-sample-rate"] == str(FAKE_SAMPLE_RATE_HZ)
        assert response.headers.get("transfer-encoding") == "chunked"
        for piece in response.iter_raw():
            arrivals.append((time.monotonic() - started, len(piece)))
    data_len = sum(n for _, n in arrivals)
    patches = engine.expected_patches(body["text"])  # 9 patches, 0.9 s
    assert data_len == 44 + 2 * patches * FAKE_PATCH_SAMPLES
    assert len(arrivals) >= patches // 2, "the body arrived in one piece, not as it was made"
    first_s, last_s = arrivals[0][0], arrivals[-1][0]
    assert first_s < last_s - 0.4, f"first byte at {first_s:.2f}s, last at {last_s:.2f}s"

    # identical samples to the task path for the same seed (one chunk, FakeEngine decodes alike)
    with running.client.stream("POST", "/synthesize/stream", json=body) as response:
        streamed = response.read()
    assert np.array_equal(wav_as_int16(streamed), wav_as_int16(task_wav(running.client, text=body["text"], seed=11)))


def test_long_text_streams_chunks_with_the_task_crossfade(make_server) -> None:
    running = make_server(chunk_max_chars=60)
    text = ("The first sentence is here and fills a chunk. A second one follows it right away. "
            "And a third sentence closes the text.")
    streamed = running.client.post("/synthesize/stream", json={"text": text, "seed": 5, "response_format": "pcm"})
    assert streamed.status_code == 200
    assert [c.seed for c in running.task_calls()] == [5, 6, 7]  # chunk i is seeded with seed + i, as tasks do
    assert np.array_equal(pcm_samples(streamed.content), wav_as_int16(task_wav(running.client, text=text, seed=5)))


def test_get_twin_takes_query_parameters(make_server) -> None:
    running = make_server()
    params = {"text": "An audio element can play this.", "seed": "3", "response_format": "pcm", "cfg_scale": "2.5",
              "steps": "12"}
    got = running.client.get("/synthesize/stream", params=params)
    assert got.status_code == 200, got.text
    assert got.headers["content-type"] == "audio/pcm"
    posted = running.client.post("/synthesize/stream", json={"text": params["text"], "seed": 3,
                                                              "response_format": "pcm", "cfg_scale": 2.5, "steps": 12})
    assert got.content == posted.content
    call = running.task_calls()[-1]
    assert (call.cfg_scale, call.steps, call.seed) == (2.5, 12, 3)


@pytest.mark.parametrize("fmt", ["mp3", "opus", "flac", "wav", "pcm"])
def test_every_format_streams_a_decodable_file(shared, fmt: str) -> None:
    running = shared
    text = "Every format decodes."
    response = running.client.get("/synthesize/stream", params={"text": text, "response_format": fmt, "seed": 1})
    assert response.status_code == 200, response.text
    rate = int(response.headers["x-sample-rate"])
    expected_s = running.engine.expected_patches(text) * FAKE_PATCH_SAMPLES / FAKE_SAMPLE_RATE_HZ
    if fmt == "pcm":
        duration = len(response.content) / 2 / rate
    elif fmt == "opus":  # FFmpeg always decodes Opus at 48 kHz; libsndfile honours the header's rate
        samples, decoded_rate = sf.read(io.BytesIO(response.content), dtype="float32")
        assert decoded_rate == rate
        duration = samples.shape[0] / decoded_rate
    else:
        with av.open(io.BytesIO(response.content)) as container:
            stream = container.streams.audio[0]
            duration = sum(f.samples for f in container.decode(stream)) / stream.rate
            assert stream.rate == rate
    assert expected_s - 1e-3 <= duration <= expected_s + (0.16 if fmt == "mp3" else 1e-3)


# ---- errors before the first byte ---------------------------------------------------------------


def test_errors_before_audio_are_plain_json_responses(shared) -> None:
    running = shared
    client = running.client
    cases = [
        (client.post("/synthesize/stream", json={"text": "   "}), 422, None),
        (client.post("/synthesize/stream", json={"text": "x", "lora_name": "missing"}), 404, "lora_name"),
        (client.post("/synthesize/stream", json={"text": "x", "ref_audio_path": "../../etc/passwd",
                                                 "ref_text": "t"}), 403, "ref_audio_path"),
        (client.post("/synthesize/stream", json={"text": "please FAIL_ENGINE now"}), 500, None),
        (client.get("/synthesize/stream"), 422, None),
        (client.get("/synthesize/stream", params={"text": "x", "steps": "0"}), 422, None),
        (client.get("/synthesize/stream", params={"text": "x", "response_format": "aiff"}), 422, None),
    ]
    for response, status, field in cases:
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert "detail" in response.json()
        if field is not None:
            assert response.json()["field"] == field
    assert "fake engine was asked to fail" in cases[3][0].json()["detail"]
    # the server still streams afterwards (the failed generation released the engine)
    assert client.post("/synthesize/stream", json={"text": "Still fine."}).status_code == 200


def test_api_key_guards_the_stream(make_server) -> None:
    running = make_server(api_key="s3cret", headers={"X-API-Key": "s3cret"})
    with httpx.Client(base_url=running.server.url, timeout=30) as anonymous:
        assert anonymous.get("/synthesize/stream", params={"text": "x"}).status_code == 401
    assert running.client.get("/synthesize/stream", params={"text": "Hello."}).status_code == 200


def test_worker_without_the_engine_refuses_streams_clearly(make_server, tmp_path: Path) -> None:
    owner = make_server(base=tmp_path / "shared")
    other = make_server(base=tmp_path / "shared")  # same output dir: the engine lock is taken
    assert owner.client.get("/health").json()["engine_owner"] is True
    assert other.client.get("/health").json()["engine_owner"] is False
    response = other.client.post("/synthesize/stream", json={"text": "Hello."})
    assert response.status_code == 503
    assert "engine-owner process" in response.json()["detail"] and "--workers 1" in response.json()["detail"]
    assert owner.client.post("/synthesize/stream", json={"text": "Hello."}).status_code == 200


# ---- sharing the engine, and stopping ----------------------------------------------------------


def test_a_stream_and_a_task_never_generate_at_once(make_server) -> None:
    engine = FakeEngine(patch_delay_s=0.05)
    running = make_server(engine=engine)
    text = "s" * 160  # 40 patches, 2 s
    with httpx.Client(base_url=running.server.url, timeout=30) as streamer:
        with streamer.stream("POST", "/synthesize/stream", json={"text": text, "response_format": "pcm"}) as response:
            pieces = response.iter_raw()
            next(pieces)
            task_id = running.client.post("/synthesize", json={"text": "A queued task."}).json()["task_id"]
            time.sleep(0.3)
            assert running.client.get(f"/task/{task_id}").json()["status"] == "pending"
            for _ in pieces:
                pass
    assert wait_final(running.client, task_id, 30)["status"] == "completed"
    texts = [c.text for c in running.task_calls()]
    assert texts.index(text) < texts.index("A queued task.")


def _stable(read, settle_s: float = 0.5):  # type: ignore[no-untyped-def]
    """read() once it has not changed for settle_s."""
    last = read()
    while True:
        time.sleep(settle_s)
        now = read()
        if now == last:
            return now
        last = now


def test_client_disconnect_stops_the_generation_at_the_next_patch(tmp_path: Path) -> None:
    engine = FakeEngine(patch_delay_s=0.05)
    events = RecordingEvents()
    settings = Settings(host="127.0.0.1", model="fake", output_dir=tmp_path / "out", lora_dir=tmp_path / "lora",
                        ref_audio_dir=[tmp_path], max_concurrent=1)
    text = "word " * 60  # 300 characters: 2 chunks, 75 patches, 3.75 s of generation
    with ThreadServer(create_app(settings, engine=engine, events=events)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        wait_ready(client, 30)
        with httpx.Client(base_url=server.url, timeout=30) as leaver:
            with leaver.stream("POST", "/synthesize/stream", json={"text": text, "response_format": "mp3"}) as resp:
                assert resp.status_code == 200
                next(resp.iter_raw())
        # the connection is closed now (response not read to the end)
        stopped_at = _stable(lambda: engine.patches_streamed)
        assert stopped_at < 25, f"{stopped_at} of 75 patches were generated after the client left"
        wait_until(lambda: [c for c in events.of_kind("stream") if c[0] == "generation_finished"], 10,
                   what="the stream's generation_finished event")
        started = [c for c in events.of_kind("stream") if c[0] == "generation_started"]
        finished = [c for c in events.of_kind("stream") if c[0] == "generation_finished"]
        firsts = [c for c in events.of_kind("stream") if c[0] == "first_audio"]
        assert len(started) == 1 and len(firsts) == 1 and 0 < firsts[0][2] < 5
        assert finished[0][2] == "cancelled"
        # the engine is free again: a sync task runs, and a full stream reports completed
        assert client.post("/synthesize", json={"text": "After.", "async_mode": False}).status_code == 200
        assert client.post("/synthesize/stream", json={"text": "Complete."}).status_code == 200
        wait_until(lambda: len([c for c in events.of_kind("stream") if c[0] == "generation_finished"]) == 2, 10,
                   what="the second stream to finish")
        last = [c for c in events.of_kind("stream") if c[0] == "generation_finished"][-1]
        expected_s = engine.expected_patches("Complete.") * FAKE_PATCH_SAMPLES / FAKE_SAMPLE_RATE_HZ
        assert last[2] == "completed" and abs(last[3] - expected_s) < 1e-6


def test_slow_reader_does_not_lose_audio(make_server) -> None:
    """The engine may run ahead of a slow client (bounded buffer); every sample still arrives, in order."""
    running = make_server()
    text = "A slow reader still gets the whole stream in the right order."
    expected = pcm_samples(running.client.post("/synthesize/stream",
                                               json={"text": text, "seed": 2, "response_format": "pcm"}).content)
    got = bytearray()
    with running.client.stream("POST", "/synthesize/stream", json={"text": text, "seed": 2,
                                                                   "response_format": "pcm"}) as response:
        for piece in response.iter_raw(512):
            got.extend(piece)
            time.sleep(0.002)
    assert np.array_equal(pcm_samples(bytes(got)), expected)


def test_concurrent_streams_are_served_one_generation_at_a_time(make_server) -> None:
    engine = FakeEngine(patch_delay_s=0.01)
    running = make_server(engine=engine)
    results: dict[int, bytes] = {}

    def fetch(i: int) -> None:
        with httpx.Client(base_url=running.server.url, timeout=60) as own:
            results[i] = own.post("/synthesize/stream", json={"text": f"Stream number {i}.", "seed": i,
                                                              "response_format": "pcm"}).content

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert sorted(results) == [0, 1, 2, 3]
    for i, data in results.items():
        alone = running.client.post("/synthesize/stream", json={"text": f"Stream number {i}.", "seed": i,
                                                                "response_format": "pcm"}).content
        assert data == alone
