"""Property-based fuzzing of every operation of our OpenAPI schema (schemathesis, issue 16).

For each operation schemathesis generates valid and invalid requests from the schema and sends them
over HTTP to a real uvicorn on a loopback port (create_app + ConcurrentFakeEngine, as conftest.py
does). Every response must:

* never be a 5xx (`not_a_server_error`);
* conform to the schema: a documented status code, a documented content type, a body that matches
  the declared response schema (`status_code_conformance`, `content_type_conformance`,
  `response_schema_conformance`);
* if it is a 4xx, carry a JSON body with a human-readable message: `detail` (a string, or FastAPI's
  validation list) on our routes, OpenAI's `{"error": {"message": ...}}` on /v1/.

Bounded for CI: a fixed number of examples per operation (fewer for multipart uploads), no deadline,
derandomized, so a failure reproduces with the same inputs on every machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckContext
from schemathesis.core.transport import Response

from tests.api.conftest import Running, fitting_shapes, running_server, wav_bytes, write_adapter
from voxcpm_api.api.app import create_app
from voxcpm_api.config import Settings
from voxcpm_api.engine.fake import ConcurrentFakeEngine

MAX_EXAMPLES = 50
UPLOAD_EXAMPLES = 15  # multipart bodies are slow to generate and to parse
UPLOADS = {"POST /synthesize/upload", "POST /voices"}


def _schema_dict() -> dict:
    """The schema the served app publishes at /openapi.json (built without starting it; the fixture
    checks the running server serves exactly this)."""
    settings_ = Settings(host="127.0.0.1", model="fake", output_dir=Path("/nonexistent/fuzz"))
    return create_app(settings_, engine=ConcurrentFakeEngine()).openapi()


SCHEMA_DICT = _schema_dict()
CONFIG = schemathesis.Config.from_dict({
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
    "operations": [{"include-name": sorted(UPLOADS),
                    "generation": {"max-examples": UPLOAD_EXAMPLES, "deterministic": True}}],
})
schema = schemathesis.openapi.from_dict(SCHEMA_DICT, config=CONFIG)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    base = tmp_path_factory.mktemp("fuzz")
    engine = ConcurrentFakeEngine(max_rows=4)
    with running_server(base, engine=engine, max_concurrent=4) as running:
        write_adapter(running.lora_dir / "lora_a", fitting_shapes(engine))
        (running.ref_dir / "ref.wav").write_bytes(wav_bytes())
        # a finished task, so GET /tasks and /task/{id} have real rows to show whichever worker runs first
        done = running.client.post("/synthesize", json={"text": "Hello.", "async_mode": False})
        assert done.status_code == 200, done.text
        served = running.client.get("/openapi.json")
        assert served.status_code == 200 and served.json() == SCHEMA_DICT
        yield running


def error_body_has_message(ctx: CheckContext, response: Response, case: schemathesis.Case) -> bool | None:
    """Every 4xx is JSON with a human-readable message."""
    if not 400 <= response.status_code < 500:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), f"{response.status_code} with content type {content_type!r}"
    body = response.json()
    assert isinstance(body, dict), f"{response.status_code} body is not an object: {body!r}"
    if case.operation.path.startswith("/v1/"):
        error = body.get("error")
        assert isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"].strip(), (
            f"{response.status_code} without OpenAI's error.message: {body!r}")
        return True
    detail = body.get("detail")
    if isinstance(detail, list):
        assert detail and all(isinstance(e, dict) and isinstance(e.get("msg"), str) for e in detail), (
            f"{response.status_code} detail list without messages: {body!r}")
    else:
        assert isinstance(detail, str) and detail.strip(), f"{response.status_code} without a detail message: {body!r}"
    return True


CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    error_body_has_message,
]


pytestmark = pytest.mark.fuzz


@schema.parametrize()
@settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms(case: schemathesis.Case, fuzz_server: Running) -> None:
    case.call_and_validate(base_url=fuzz_server.server.url, checks=CHECKS, timeout=60)


# ---- what the fuzzer found, kept as plain regression tests ---------------------------------------


def test_speech_model_that_no_header_can_carry_is_echoed_percent_encoded(fuzz_server: Running) -> None:
    """X-Model echoed `model` verbatim: a character outside Latin-1 (or a newline) made the response
    headers unencodable, a 500 after the audio was ready."""
    model = "tts-\U000d38c7 é\n%"
    response = fuzz_server.client.post("/v1/audio/speech", json={"model": model, "input": "Hello."})
    assert response.status_code == 200, response.text
    assert response.headers["x-model"] == "tts-%F3%93%A3%87%20%C3%A9%0A%25"
    assert fuzz_server.client.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hi."}
                                   ).headers["x-model"] == "tts-1"


def test_task_times_keep_the_seed_format_and_the_schema_says_so(fuzz_server: Running) -> None:
    """created_at/updated_at are the seed API's naive local ISO 8601 strings, which clients parse and compare
    with naive datetimes; the schema declared them `date-time` (RFC 3339 needs an offset), so the fuzzer flagged
    every task. They stay strings in the seed's format and the schema declares them as such."""
    task = fuzz_server.client.get("/tasks").json()["tasks"][0]
    for key in ("created_at", "updated_at"):
        parsed = datetime.fromisoformat(task[key])
        assert parsed.utcoffset() is None, task[key]
        assert abs((datetime.now() - parsed).total_seconds()) < 3600, task[key]
    schema = fuzz_server.client.get("/openapi.json").json()["components"]["schemas"]["TaskView"]["properties"]
    assert schema["created_at"]["type"] == "string" and "format" not in schema["created_at"]


def test_v1_routing_errors_have_openai_error_bodies(fuzz_server: Running) -> None:
    """Starlette's own 405/404 under /v1/ came as `{"detail": ...}`, which OpenAI's SDKs cannot read."""
    response = fuzz_server.client.request("TRACE", "/v1/models")
    assert response.status_code == 405
    assert response.json()["error"]["message"] == "Method Not Allowed"
    assert "GET" in response.headers["allow"]
    response = fuzz_server.client.get("/v1/no/such/route")
    assert response.status_code == 404 and response.json()["error"]["type"] == "invalid_request_error"
    assert fuzz_server.client.request("TRACE", "/tasks").json() == {"detail": "Method Not Allowed"}


def test_service_errors_are_documented_with_their_bodies() -> None:
    """A 422 from the service (one message naming the field) and FastAPI's list form are both declared."""
    responses = SCHEMA_DICT["paths"]["/synthesize"]["post"]["responses"]
    assert {"400", "403", "404", "409", "422", "429", "503"} <= set(responses)
    assert len(responses["422"]["content"]["application/json"]["schema"]["anyOf"]) == 2
    speech = SCHEMA_DICT["paths"]["/v1/audio/speech"]["post"]["responses"]
    assert speech["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OpenAIErrorBody"}


# ---- the stateful phase: sequences along the links schemathesis infers from our schema ---------------


def test_stateful_sequences_conform(fuzz_server: Running) -> None:
    """schemathesis infers links from response fields to path parameters (GET /tasks -> GET/DELETE
    /task/{task_id}, GET /v1/models -> /v1/models/{model_id}, GET /voices -> /voices/{name}) and walks
    them; every response gets the same checks. (It starts no chain from a request body, so the POSTs
    are covered by the per-operation test above.)"""
    url = fuzz_server.server.url
    seen: set[str] = set()

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict:
            return {"base_url": url, "timeout": 60}

        def validate_response(self, response: Response, case: schemathesis.Case,  # type: ignore[override]
                              additional_checks: object = None, **kwargs: object) -> None:
            seen.add(f"{case.operation.method.upper()} {case.operation.path} {response.status_code}")
            case.validate_response(response, checks=CHECKS)

    Workflow.run(settings=settings(max_examples=MAX_EXAMPLES, stateful_step_count=8, deadline=None,
                                   derandomize=True, suppress_health_check=list(HealthCheck)))
    assert "GET /task/{task_id} 200" in seen, sorted(seen)  # a link really was followed to a real task
