"""Bad requests get the right 4xx naming the culprit, in sync and async mode, and leave no trace:
no task (GET /tasks total unchanged) and no file under the output directory."""

from __future__ import annotations

from tests.helpers import wait_until

import json
import os
from collections.abc import Callable

import httpx
import pytest

from tests.api.conftest import Running, fitting_shapes, wav_bytes, write_adapter
from voxcpm_api.engine.fake import FakeEngine

MAX_TEXT = 50
MAX_UPLOAD = 4096


@pytest.fixture(scope="module")
def srv(make_module_server) -> Running:
    running = make_module_server(engine=FakeEngine(), max_text_chars=MAX_TEXT, max_upload_bytes=MAX_UPLOAD)
    (running.ref_dir / "voice.wav").write_bytes(wav_bytes())
    (running.ref_dir / "junk.wav").write_bytes(os.urandom(2000))
    (running.ref_dir / "empty.wav").write_bytes(b"")
    (running.ref_dir / "sub").mkdir()
    (running.ref_dir / "sub" / "nested.wav").write_bytes(wav_bytes(freq=300))
    (running.base / "outside.wav").write_bytes(wav_bytes())
    write_adapter(running.lora_dir / "good", fitting_shapes(running.engine))
    # wrong in_features for one module: lora_A must be (r, 64)
    bad = fitting_shapes(running.engine)
    bad["base_lm.layers.1.self_attn.v_proj"] = ((8, 32), (64, 8))
    write_adapter(running.lora_dir / "mismatch", bad)
    # rank in lora_config.json disagrees with the weights
    write_adapter(running.lora_dir / "wrong_rank", fitting_shapes(running.engine, rank=4),
                  config={"r": 8, "alpha": 16})
    # weights for a module the model does not have
    extra = fitting_shapes(running.engine)
    extra["base_lm.layers.7.mlp.up_proj"] = ((8, 64), (64, 8))
    write_adapter(running.lora_dir / "unknown_module", extra)
    (running.lora_dir / "no_weights").mkdir()
    (running.lora_dir / "corrupt").mkdir()
    (running.lora_dir / "corrupt" / "lora_weights.safetensors").write_bytes(b"\x00garbage")
    return running


def names_field(response: httpx.Response, field: str) -> bool:
    """The error body points at `field`: FastAPI's `loc`, or our `field` key plus a message."""
    body = response.json()
    detail = body.get("detail")
    if isinstance(detail, list):
        return any(field in [str(part) for part in error.get("loc", [])] for error in detail)
    return isinstance(detail, str) and bool(detail) and body.get("field") == field


def assert_rejected(srv: Running, send: Callable[[], httpx.Response], status: int | tuple[int, ...],
                    field: str | None, check_files: bool = True) -> httpx.Response:
    # Earlier valid tasks on this module's server may still be writing their files: let them land
    # first, so any file that appears below can only come from the rejected request.
    wait_until(lambda: all(srv.client.get("/tasks", params={"status": s}).json()["total"] == 0
                           for s in ("pending", "processing")), 30, 0.02, "earlier tasks to finish")
    before_total = srv.total()
    before_files = srv.output_files()
    before_calls = len(srv.engine.calls)
    response = send()
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text)
    if field is not None:
        assert names_field(response, field), response.text
    assert srv.total() == before_total, "a rejected request created a task"
    if check_files:
        assert srv.output_files() == before_files, "a rejected request wrote a file"
    assert len(srv.engine.calls) == before_calls
    return response


MODES = pytest.mark.parametrize("async_mode", [True, False], ids=["async", "sync"])

# (case id, fields to send (merged over {"text": "Hello"}), status, field named)
BAD_JSON_CASES = [
    ("empty_text", {"text": ""}, 422, "text"),
    ("whitespace_text", {"text": " \t\n  "}, 422, "text"),
    ("text_too_long", {"text": "x" * (MAX_TEXT + 1)}, 422, "text"),
    ("text_number", {"text": 5}, 422, "text"),
    ("text_list", {"text": ["Hello"]}, 422, "text"),
    ("text_null", {"text": None}, 422, "text"),
    ("text_missing", {"text": ...}, 422, "text"),
    ("steps_0", {"steps": 0}, 422, "steps"),
    ("steps_101", {"steps": 101}, 422, "steps"),
    ("steps_string", {"steps": "ten"}, 422, "steps"),
    ("steps_float", {"steps": 10.5}, 422, "steps"),
    ("cfg_0", {"cfg_scale": 0}, 422, "cfg_scale"),
    ("cfg_negative", {"cfg_scale": -1}, 422, "cfg_scale"),
    ("cfg_10_5", {"cfg_scale": 10.5}, 422, "cfg_scale"),
    ("seed_minus_2", {"seed": -2}, 422, "seed"),
    ("seed_too_big", {"seed": 2**32}, 422, "seed"),
    ("seed_string", {"seed": "42"}, 422, "seed"),
    ("lora_unknown", {"lora_name": "nope"}, 404, "lora_name"),
    ("lora_no_weights", {"lora_name": "no_weights"}, 404, "lora_name"),
    ("lora_traversal", {"lora_name": "../x"}, 403, "lora_name"),
    ("lora_deep_traversal", {"lora_name": "good/../../x"}, 403, "lora_name"),
    ("lora_absolute", {"lora_name": "/etc"}, 403, "lora_name"),
    ("lora_wrong_rank", {"lora_name": "wrong_rank"}, 422, "lora_name"),
    ("lora_unknown_module", {"lora_name": "unknown_module"}, 422, "lora_name"),
    ("lora_corrupt", {"lora_name": "corrupt"}, 422, "lora_name"),
    ("lora_number", {"lora_name": 3}, 422, "lora_name"),
    ("ref_text_without_audio", {"ref_text": "what the reference says"}, 422, "ref_text"),
    ("ref_absolute", {"ref_audio_path": "/etc/passwd", "ref_text": "r"}, 403, "ref_audio_path"),
    ("ref_absolute_existing_wav", {"ref_audio_path": "OUTSIDE", "ref_text": "r"}, 403, "ref_audio_path"),
    ("ref_dotdot", {"ref_audio_path": "../outside.wav", "ref_text": "r"}, 403, "ref_audio_path"),
    ("ref_dotdot_inner", {"ref_audio_path": "sub/../../outside.wav", "ref_text": "r"}, 403, "ref_audio_path"),
    ("ref_missing", {"ref_audio_path": "missing.wav", "ref_text": "r"}, 404, "ref_audio_path"),
    ("ref_junk", {"ref_audio_path": "junk.wav", "ref_text": "r"}, 400, "ref_audio_path"),
    ("ref_empty_file", {"ref_audio_path": "empty.wav", "ref_text": "r"}, 400, "ref_audio_path"),
    ("ref_directory", {"ref_audio_path": "sub", "ref_text": "r"}, 404, "ref_audio_path"),
    ("ref_without_ref_text", {"ref_audio_path": "voice.wav"}, 422, "ref_text"),
    ("ref_text_blank", {"ref_audio_path": "voice.wav", "ref_text": "   "}, 422, "ref_text"),
    ("format_unknown", {"response_format": "aac"}, 422, "response_format"),
    ("format_number", {"response_format": 3}, 422, "response_format"),
    ("async_mode_string", {"async_mode": "maybe"}, 422, "async_mode"),
]


@MODES
@pytest.mark.parametrize("case,fields,status,field", BAD_JSON_CASES, ids=[c[0] for c in BAD_JSON_CASES])
def test_bad_json_field(srv: Running, async_mode: bool, case: str, fields: dict, status: int, field: str) -> None:
    body: dict[str, object] = {"text": "Hello", "async_mode": async_mode}
    for key, value in fields.items():
        if value is ...:
            body.pop(key)
        elif value == "OUTSIDE":
            body[key] = str(srv.base / "outside.wav")
        else:
            body[key] = value
    assert_rejected(srv, lambda: srv.client.post("/synthesize", json=body), status, field)


@MODES
def test_adapter_that_does_not_fit_names_the_module(srv: Running, async_mode: bool) -> None:
    response = assert_rejected(
        srv, lambda: srv.client.post("/synthesize", json={"text": "Hello", "lora_name": "mismatch",
                                                          "async_mode": async_mode}), 422, "lora_name")
    assert "base_lm.layers.1.self_attn.v_proj" in response.json()["detail"]


@MODES
def test_malformed_json_body(srv: Running, async_mode: bool) -> None:
    flag = "true" if async_mode else "false"
    for raw in (f'{{"text": "Hello", "async_mode": {flag}', f'{{"text": "Hello",, "async_mode": {flag}}}',
                f'{{"text": \'Hello\', "async_mode": {flag}}}', ""):
        assert_rejected(srv, lambda: srv.client.post("/synthesize", content=raw.encode(),
                                                     headers={"content-type": "application/json"}), 422, None)


@MODES
def test_json_that_is_not_an_object(srv: Running, async_mode: bool) -> None:
    for payload in (["Hello"], "Hello", 42, None):
        assert_rejected(srv, lambda: srv.client.post("/synthesize", content=json.dumps(payload).encode(),
                                                     headers={"content-type": "application/json"}), 422, None)


@MODES
def test_wrong_content_type(srv: Running, async_mode: bool) -> None:
    raw = json.dumps({"text": "Hello", "async_mode": async_mode}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        assert_rejected(srv, lambda: srv.client.post("/synthesize", content=raw,
                                                     headers={"content-type": content_type}), (415, 422), None)
    assert_rejected(srv, lambda: srv.client.post("/synthesize", data={"text": "Hello"}), (415, 422), None)


@MODES
def test_the_same_requests_succeed_when_valid(srv: Running, async_mode: bool) -> None:
    """Positive control: the fixtures the bad cases lean on do work when used correctly."""
    for fields in ({"text": "x" * MAX_TEXT}, {"lora_name": "good"}, {"ref_audio_path": "voice.wav", "ref_text": "r"},
                   {"ref_audio_path": "sub/nested.wav", "ref_text": "r"}, {"steps": 1, "cfg_scale": 10.0, "seed": 0},
                   {"steps": 100, "cfg_scale": 0.01, "seed": 2**32 - 1}, {"response_format": "wav"}):
        body = {"text": "Hello", "async_mode": async_mode, **fields}
        before = srv.total()
        response = srv.client.post("/synthesize", json=body)
        assert response.status_code == 200, (fields, response.text)
        assert response.json()["status"] == ("submitted" if async_mode else "success")
        assert srv.total() == before + 1


# ---- POST /synthesize/upload --------------------------------------------------------------------


def upload(srv: Running, content: bytes, async_mode: bool, name: str = "ref.wav", **form: str) -> httpx.Response:
    data = {"text": "Clone this voice", "ref_text": "the reference transcript",
            "async_mode": "true" if async_mode else "false", **form}
    return srv.client.post("/synthesize/upload", files={"file": (name, content, "audio/wav")}, data=data)


@MODES
def test_upload_junk_is_400(srv: Running, async_mode: bool) -> None:
    assert_rejected(srv, lambda: upload(srv, os.urandom(3000), async_mode), 400, "file")
    assert_rejected(srv, lambda: upload(srv, b"RIFF\x00\x00\x00\x00WAVEfmt ", async_mode), 400, "file")


@MODES
def test_upload_empty_is_400(srv: Running, async_mode: bool) -> None:
    assert_rejected(srv, lambda: upload(srv, b"", async_mode), 400, "file")


@MODES
def test_upload_oversized_is_rejected(srv: Running, async_mode: bool) -> None:
    big = wav_bytes(seconds=1.0, sample_rate=8000)  # 16 kB > MAX_UPLOAD
    assert len(big) > MAX_UPLOAD
    assert_rejected(srv, lambda: upload(srv, big, async_mode), (413, 422), "file")


@MODES
def test_upload_with_bad_fields(srv: Running, async_mode: bool) -> None:
    good = wav_bytes(seconds=0.05)
    assert_rejected(srv, lambda: upload(srv, good, async_mode, steps="0"), 422, "steps")
    assert_rejected(srv, lambda: upload(srv, good, async_mode, cfg_scale="11"), 422, "cfg_scale")
    assert_rejected(srv, lambda: upload(srv, good, async_mode, seed="-5"), 422, "seed")
    assert_rejected(srv, lambda: upload(srv, good, async_mode, text="   "), 422, "text")
    # the file is stored before this check: see test_upload_rejected_by_the_service_leaves_no_file
    assert_rejected(srv, lambda: upload(srv, good, async_mode, text="y" * (MAX_TEXT + 1)), 422, "text",
                    check_files=False)
    assert_rejected(srv, lambda: upload(srv, good, async_mode, response_format="aac"), 422, "response_format")
    assert_rejected(srv, lambda: srv.client.post("/synthesize/upload", data={"text": "no file"}), 422, "file")


@pytest.mark.parametrize("form", [{"text": "y" * (MAX_TEXT + 1)}, {"lora_name": "nope"}, {"ref_text": " "}],
                         ids=["text_too_long", "unknown_lora", "blank_ref_text"])
def test_upload_rejected_by_the_service_leaves_no_file(srv: Running, form: dict) -> None:
    unique = wav_bytes(seconds=0.05, freq=100 + 10 * len(srv.output_files()) + len(json.dumps(form)))
    status = 404 if "lora_name" in form else 422
    field = next(iter(form)) if "ref_text" not in form else "ref_text"
    assert_rejected(srv, lambda: upload(srv, unique, True, **form), status, field)


def test_upload_reaches_engine_with_cloning_params(srv: Running) -> None:
    content = wav_bytes(seconds=0.05, freq=410)
    assert len(content) <= MAX_UPLOAD
    before = srv.total()
    response = upload(srv, content, False, text="Cloned words", ref_text="what the reference says",
                      cfg_scale="3.5", steps="12", seed="99", response_format="wav")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success" and body["seed"] == 99
    assert srv.total() == before + 1
    call = [c for c in srv.engine.calls if c.text == "Cloned words"][-1]
    assert call.ref_text == "what the reference says"
    assert call.cfg_scale == 3.5 and call.steps == 12 and call.seed == 99
    assert call.ref_audio_path is not None
    with open(call.ref_audio_path, "rb") as fh:
        assert fh.read() == content
    assert srv.client.get(f"/download/{body['audio_path'].rsplit('/', 1)[-1]}").status_code == 200


def test_json_ref_audio_reaches_engine(srv: Running) -> None:
    response = srv.client.post("/synthesize", json={"text": "Named reference", "ref_audio_path": "sub/nested.wav",
                                                    "ref_text": "nested transcript", "async_mode": False})
    assert response.status_code == 200, response.text
    call = [c for c in srv.engine.calls if c.text == "Named reference"][-1]
    assert call.ref_audio_path == str((srv.ref_dir / "sub" / "nested.wav").resolve())
    assert call.ref_text == "nested transcript"
