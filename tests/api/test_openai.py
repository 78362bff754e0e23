"""POST /v1/audio/speech and GET /v1/models, driven by the official `openai` Python SDK against real
uvicorn with FakeEngine; error bodies in OpenAI's shape on /v1/* only. Speech is streamed as it is
generated (chunked) unless `stream_format: "sse"` asks for events."""

from __future__ import annotations

import base64
import io
import json
import struct
import time

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from tests.api.conftest import fitting_shapes, wav_bytes, write_adapter
from voxcpm_api.audio.streaming import STREAM_FORMATS
from voxcpm_api.engine.fake import FAKE_PATCH_SAMPLES, FAKE_SAMPLE_RATE_HZ, FakeEngine

API_KEY = "sk-test-key"
TEXT = "Hello from the OpenAI compatible endpoint."
MEDIA_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
               "wav": "audio/wav", "pcm": "audio/pcm"}
# MP3 and AAC streams carry no encoder delay / priming info: decoders return about a frame more
EXTRA_S = {"mp3": 0.16, "aac": 0.16}


def seconds_of(text: str) -> float:
    return FakeEngine().expected_patches(text) * FAKE_PATCH_SAMPLES / FAKE_SAMPLE_RATE_HZ


def decode(data: bytes, fmt: str, rate: int) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0, rate
    if fmt in ("aac", "flac"):  # ADTS: no libsndfile; streamed FLAC (total_samples 0): libsndfile fails to seek
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            samples = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
            decoded_rate = stream.rate
        if samples.dtype == np.int16:
            return samples.astype(np.float32) / 32768.0, decoded_rate
        return samples.astype(np.float32, copy=False), decoded_rate
    samples, decoded_rate = sf.read(io.BytesIO(data), dtype="float32")
    return samples, decoded_rate


def streamed_wav_samples(data: bytes) -> tuple[np.ndarray, int]:
    """The streamed WAV read by hand: the unknown-size RIFF header audio/streaming.py documents, then
    PCM 16 to the end of the body; soundfile must read the very same samples from the bytes."""
    riff, riff_size, wave_id = struct.unpack("<4sI4s", data[:12])
    fmt_id, fmt_size, tag, channels, rate, byte_rate, align, bits = struct.unpack("<4sIHHIIHH", data[12:36])
    data_id, data_size = struct.unpack("<4sI", data[36:44])
    assert (riff, wave_id, fmt_id, data_id) == (b"RIFF", b"WAVE", b"fmt ", b"data")
    assert riff_size == data_size == 0xFFFFFFFF  # "unknown": the length is not known when the header leaves
    assert (fmt_size, tag, channels, bits, byte_rate, align) == (16, 1, 1, 16, rate * 2, 2)
    assert (len(data) - 44) % 2 == 0
    pcm = np.frombuffer(data[44:], dtype="<i2")
    read, read_rate = sf.read(io.BytesIO(data), dtype="int16")
    assert read_rate == rate and np.array_equal(read, pcm)
    return pcm, rate


@pytest.fixture(scope="module")
def server(make_module_server):  # type: ignore[no-untyped-def]
    running = make_module_server(engine=FakeEngine(patch_delay_s=0.02), api_key=API_KEY,
                                 headers={"Authorization": f"Bearer {API_KEY}"}, openai_max_input_chars=300)
    engine = running.engine
    write_adapter(running.lora_dir / "narrator", fitting_shapes(engine))
    write_adapter(running.lora_dir / "team" / "alice", fitting_shapes(engine))
    return running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    with openai.OpenAI(base_url=f"{server.server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as sdk:
        yield sdk


SLOW_PATCH_S = 0.1  # one patch (80 ms of audio) per 100 ms: a generation slower than real time
SLOW_TEXT = "s" * 80  # 20 patches: 2.0 s of generation for 1.6 s of audio


@pytest.fixture(scope="module")
def slow_client(make_module_server) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    running = make_module_server(engine=FakeEngine(patch_delay_s=SLOW_PATCH_S))
    with openai.OpenAI(base_url=f"{running.server.url}/v1", api_key="unused", max_retries=0, timeout=60) as sdk:
        yield sdk


def last_call(server):  # type: ignore[no-untyped-def]
    return server.engine.calls[-1]


# ---- default response: audio streamed as it is generated ---------------------------------------


@pytest.mark.parametrize("fmt", STREAM_FORMATS)
def test_sdk_create_returns_streamed_audio_in_each_format(client, server, fmt: str) -> None:
    response = client.audio.speech.create(model="tts-1", voice="default", input=TEXT, response_format=fmt)
    data = response.content
    headers = response.response.headers
    assert headers["content-type"] == MEDIA_TYPES[fmt]
    assert headers["x-model"] == "tts-1"
    assert headers.get("transfer-encoding") == "chunked" and "content-length" not in headers
    assert headers["cache-control"] == "no-store" and headers["x-accel-buffering"] == "no"
    samples, rate = decode(data, fmt, int(headers["x-sample-rate"]))
    assert rate == int(headers["x-sample-rate"])
    expected = seconds_of(TEXT)
    assert expected - 1e-3 <= samples.shape[0] / rate <= expected + EXTRA_S.get(fmt, 1e-3)
    assert last_call(server).adapter is None and last_call(server).text == TEXT


@pytest.mark.parametrize("fmt", STREAM_FORMATS)
def test_default_response_streams_while_it_is_generated(slow_client, fmt: str) -> None:
    """No stream_format: the SDK's streaming response gets its first bytes about one patch (plus the
    codec's look-ahead) after the request, not when the 2 s generation ends; the body is one file."""
    arrivals: list[float] = []
    pieces: list[bytes] = []
    started = time.monotonic()
    with slow_client.audio.speech.with_streaming_response.create(
            model="m", voice="default", input=SLOW_TEXT, response_format=fmt, extra_body={"seed": 5}) as response:
        headers = response.headers
        for piece in response.iter_bytes():
            pieces.append(piece)
            arrivals.append(time.monotonic() - started)
    total = time.monotonic() - started
    assert total >= 20 * SLOW_PATCH_S
    assert arrivals[0] < total / 3, f"first chunk after {arrivals[0]:.2f} s of {total:.2f} s"
    assert len(pieces) > 5 and arrivals[-1] - arrivals[0] > total / 2
    assert headers.get("transfer-encoding") == "chunked" and headers["content-type"] == MEDIA_TYPES[fmt]
    assert headers["x-seed"] == "5"
    data = b"".join(pieces)
    rate = int(headers["x-sample-rate"])
    expected_samples = 20 * FAKE_PATCH_SAMPLES
    if fmt == "pcm":
        assert len(data) == 2 * expected_samples and rate == FAKE_SAMPLE_RATE_HZ
        return
    if fmt == "wav":
        pcm, wav_rate = streamed_wav_samples(data)
        assert wav_rate == rate == FAKE_SAMPLE_RATE_HZ and pcm.size == expected_samples
    samples, decoded_rate = decode(data, fmt, rate)
    assert decoded_rate == rate
    expected = expected_samples / FAKE_SAMPLE_RATE_HZ
    assert expected - 1e-3 <= samples.shape[0] / rate <= expected + EXTRA_S.get(fmt, 1e-3)


def test_default_response_is_the_stream_format_audio_response(client) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(model="m", voice="default", input=TEXT, response_format="wav", extra_body={"seed": 21})
    default = client.audio.speech.create(**kwargs).content
    streamed = client.audio.speech.create(**kwargs, stream_format="audio")
    assert streamed.response.headers.get("transfer-encoding") == "chunked"
    assert default == streamed.content
    assert streamed_wav_samples(default)[0].size == round(seconds_of(TEXT) * FAKE_SAMPLE_RATE_HZ)


def test_extensions_seed_cfg_steps_reach_the_engine_and_seed_repeats(client, server) -> None:
    kwargs = dict(model="voxcpm", voice="default", input=TEXT, response_format="wav",
                  extra_body={"seed": 1234, "cfg_scale": 3.5, "steps": 7})
    first = client.audio.speech.create(**kwargs)
    call = last_call(server)
    assert (call.seed, call.cfg_scale, call.steps) == (1234, 3.5, 7)
    assert first.response.headers["x-seed"] == "1234"
    assert client.audio.speech.create(**kwargs).content == first.content


def test_speed_changes_duration(client) -> None:  # type: ignore[no-untyped-def]
    text = TEXT * 2
    base = seconds_of(text)  # 2.0 s
    for speed in (0.5, 2.0, 4.0):
        data = client.audio.speech.create(model="m", voice="default", input=text, response_format="wav",
                                          speed=speed, extra_body={"seed": 4}).content
        samples, rate = streamed_wav_samples(data)
        # WSOLA's length is exact up to about one analysis window (64 ms at 16 kHz)
        assert abs(samples.shape[0] / rate - base / speed) < 0.08 + 0.03 * base / speed, speed


# ---- voices -------------------------------------------------------------------------------------


def test_voice_names_a_lora_as_string_or_object(client, server) -> None:  # type: ignore[no-untyped-def]
    client.audio.speech.create(model="m", voice="narrator", input=TEXT, response_format="pcm")
    assert last_call(server).adapter.name == "narrator"
    client.audio.speech.create(model="m", voice={"id": "team/alice"}, input=TEXT, response_format="pcm")
    assert last_call(server).adapter.name == "team/alice"
    client.audio.speech.create(model="m", voice="", input=TEXT, response_format="pcm")
    assert last_call(server).adapter is None


def test_unknown_voice_is_a_400_naming_voice(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT)
    error = caught.value.body
    assert caught.value.status_code == 400
    assert error["param"] == "voice" and error["type"] == "invalid_request_error" and error["code"] is None
    assert "alloy" in error["message"]


def test_saved_voice_clones_its_reference(client, server) -> None:  # type: ignore[no-untyped-def]
    created = server.client.post("/voices", data={"name": "sdkvoice", "transcript": "A reference transcript."},
                                 files={"audio": ("ref.wav", wav_bytes(0.5), "audio/wav")})
    assert created.status_code == 201, created.text
    client.audio.speech.create(model="m", voice="sdkvoice", input=TEXT, response_format="pcm")
    call = last_call(server)
    assert call.ref_audio_path is not None and call.ref_text == "A reference transcript."


# ---- streaming ----------------------------------------------------------------------------------


def test_stream_format_audio_streams_mp3_as_it_is_made(client) -> None:  # type: ignore[no-untyped-def]
    text = "m" * 120  # 30 patches of 20 ms generation each
    arrivals: list[float] = []
    pieces: list[bytes] = []
    started = time.monotonic()
    with client.audio.speech.with_streaming_response.create(
            model="m", voice="default", input=text, response_format="mp3", stream_format="audio") as response:
        assert response.headers["content-type"] == "audio/mpeg"
        assert response.headers.get("transfer-encoding") == "chunked"
        for piece in response.iter_bytes():
            pieces.append(piece)
            arrivals.append(time.monotonic() - started)
    assert len(pieces) > 5
    assert arrivals[0] < arrivals[-1] - 0.2
    samples, rate = decode(b"".join(pieces), "mp3", 0)
    assert seconds_of(text) <= samples.shape[0] / rate <= seconds_of(text) + 0.16


def test_stream_format_sse_sends_delta_events_then_done(client) -> None:  # type: ignore[no-untyped-def]
    events = []
    with client.audio.speech.with_streaming_response.create(
            model="m", voice="default", input=TEXT, response_format="wav", stream_format="sse",
            extra_body={"seed": 9}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert len(events) > 3
    done = events[-1]
    assert done["type"] == "speech.audio.done" and done["seed"] == 9
    assert abs(done["duration_s"] - seconds_of(TEXT)) < 1e-3
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    samples, rate = decode(audio, "wav", 0)
    whole = client.audio.speech.create(model="m", voice="default", input=TEXT, response_format="wav",
                                       extra_body={"seed": 9}).content
    assert np.array_equal(samples, decode(whole, "wav", 0)[0])


# ---- instructions -------------------------------------------------------------------------------


def test_instructions_are_refused_on_voxcpm1(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="m", voice="default", input=TEXT, instructions="Speak softly.")
    assert caught.value.body["param"] == "instructions"
    assert "VoxCPM2" in caught.value.body["message"]
    # blank instructions are no instructions
    client.audio.speech.create(model="m", voice="default", input=TEXT, instructions="  ", response_format="pcm")


def test_instructions_become_the_voxcpm2_voice_design_prefix(make_server) -> None:
    running = make_server(engine=FakeEngine(architecture="voxcpm2"))
    with openai.OpenAI(base_url=f"{running.server.url}/v1", api_key="unused", max_retries=0) as sdk:
        sdk.audio.speech.create(model="m", voice="default", input="Hello there.", instructions=" A calm, low voice ",
                                response_format="pcm")
    assert running.engine.calls[-1].text == "(A calm, low voice)Hello there."


# ---- errors -------------------------------------------------------------------------------------


def test_validation_errors_are_400_in_openai_shape(server) -> None:  # type: ignore[no-untyped-def]
    http = server.client
    cases = [
        ({"model": "m", "input": TEXT, "voice": "default", "response_format": "ogg"}, "response_format"),
        ({"model": "m", "input": TEXT, "voice": "default", "speed": 4.5}, "speed"),
        ({"model": "m", "input": TEXT, "voice": "default", "speed": 0.1}, "speed"),
        ({"model": "m", "voice": "default"}, "input"),
        ({"input": TEXT, "voice": "default"}, "model"),
        ({"model": "m", "input": TEXT, "voice": "default", "stream_format": "json"}, "stream_format"),
        ({"model": "m", "input": TEXT, "voice": "default", "steps": 0}, "steps"),
        ({"model": "m", "input": "x" * 301, "voice": "default"}, "input"),
        ({"model": "m", "input": "   ", "voice": "default"}, "input"),
    ]
    for body, param in cases:
        response = http.post("/v1/audio/speech", json=body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and error["type"] == "invalid_request_error", (body, error)
    broken = http.post("/v1/audio/speech", content=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["param"] is None
    # other routes keep FastAPI's shape
    native = http.post("/synthesize", json={"text": ""})
    assert native.status_code == 422 and "detail" in native.json()


def test_engine_failure_before_audio_is_a_500_server_error(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.InternalServerError) as caught:
        client.audio.speech.create(model="m", voice="default", input="please FAIL_ENGINE now")
    assert caught.value.body["type"] == "server_error"
    assert "fake engine was asked to fail" in caught.value.body["message"]


def test_wrong_api_key_gets_openai_401_on_v1_only(server) -> None:  # type: ignore[no-untyped-def]
    with openai.OpenAI(base_url=f"{server.server.url}/v1", api_key="wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk.audio.speech.create(model="m", voice="default", input=TEXT)
    assert caught.value.body["code"] == "invalid_api_key"
    with httpx.Client(base_url=server.server.url) as anonymous:
        assert "detail" in anonymous.get("/loras").json()


# ---- models -------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client) -> None:  # type: ignore[no-untyped-def]
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake"]
    card = models.data[0]
    assert card.object == "model" and card.owned_by == "voxcpm" and card.created > 1_600_000_000
    assert client.models.retrieve("fake").id == "fake"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("tts-1")
    assert caught.value.body["type"] == "invalid_request_error" and caught.value.body["code"] == "model_not_found"
