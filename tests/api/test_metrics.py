"""GET /metrics and GET /ready over real HTTP (uvicorn + FakeEngine).

Every scrape is parsed with prometheus_client's own text parser; counters are checked as deltas
between two scrapes, with their exact labels, so the tests do not depend on what ran before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import Running, fitting_shapes, wav_bytes, write_adapter
from tests.helpers import wait_final, wait_until
from voxcpm_api.api.app import create_app
from voxcpm_api.api.metrics import BASE_LABEL, MAX_LABEL_VALUES, OTHER_LABEL, PrometheusEvents, _BoundedLabel
from voxcpm_api.config import Settings
from voxcpm_api.engine.base import ChunkRequest, PatchCallback
from voxcpm_api.engine.fake import FAKE_SAMPLE_RATE_HZ, ConcurrentFakeEngine, FakeEngine
from voxcpm_api.errors import EngineFailure

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version="), response.headers
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


class StubLoRARuntime:
    """The counters of engine/lora_runtime.LoRARuntime, over an LRU of `size` resident adapters."""

    def __init__(self, size: int = 1) -> None:
        self.size = size
        self.resident: list[str] = []
        self.loads: dict[str, int] = {}
        self.evictions: dict[str, int] = {}

    def activate(self, name: str | None) -> None:
        if name is None:
            return
        if name in self.resident:
            self.resident.remove(name)
        else:
            self.loads[name] = self.loads.get(name, 0) + 1
        self.resident.append(name)
        while len(self.resident) > self.size:
            evicted = self.resident.pop(0)
            self.evictions[evicted] = self.evictions.get(evicted, 0) + 1


@dataclass
class LoRAFakeEngine(FakeEngine):
    """FakeEngine with a `lora_runtime` like VoxCPMEngine's, so adapter loads/evictions show up."""

    lora_runtime: StubLoRARuntime = field(default_factory=StubLoRARuntime)

    def generate(self, request: ChunkRequest, on_patch: PatchCallback):  # type: ignore[no-untyped-def]
        self.lora_runtime.activate(request.adapter.name if request.adapter else None)
        return super().generate(request, on_patch)


@dataclass
class BrokenEngine(FakeEngine):
    def load(self):  # type: ignore[no-untyped-def]
        raise EngineFailure("weights are missing")


# ---- readiness ------------------------------------------------------------------------------------


def test_ready_is_503_while_loading_then_200(make_server) -> None:
    srv: Running = make_server(engine=FakeEngine(load_delay_s=2.0), wait=False)
    first = srv.client.get("/ready")
    assert first.status_code == 503, first.text
    assert first.json()["ready"] is False and "loading" in first.json()["reason"]
    health = srv.client.get("/health")  # liveness stays 200 while loading
    assert health.status_code == 200 and health.json()["model_loaded"] is False
    assert value(scrape(srv.client), "voxcpm_model_loaded") == 0.0

    wait_until(lambda: srv.client.get("/ready").status_code == 200, 30, 0.05, "/ready 200")
    body = srv.client.get("/ready").json()
    assert body["ready"] is True and body["reason"] is None and body["model"] == "fake"
    assert body["engine_owner"] is True
    after = scrape(srv.client)
    assert value(after, "voxcpm_model_loaded") == 1.0
    assert value(after, "voxcpm_engine_owner") == 1.0
    assert value(after, "voxcpm_requests_total", endpoint="/ready", status="5xx") >= 1
    assert value(after, "voxcpm_requests_total", endpoint="/ready", status="2xx") >= 1


def test_ready_names_a_load_failure(make_server) -> None:
    srv: Running = make_server(engine=BrokenEngine(), wait=False)
    wait_until(lambda: srv.client.get("/health").json()["status"] == "unhealthy", 30, 0.05, "load failure")
    response = srv.client.get("/ready")
    assert response.status_code == 503
    assert response.json()["ready"] is False
    assert "failed to load" in response.json()["reason"] and "weights are missing" in response.json()["reason"]
    assert srv.client.get("/health").status_code == 200


def test_ready_and_metrics_need_no_api_key(make_server) -> None:
    srv: Running = make_server(api_key="sekrit", headers={"X-API-Key": "sekrit"})
    with httpx.Client(base_url=srv.server.url, timeout=30) as anonymous:
        assert anonymous.get("/ready").status_code == 200
        before = scrape(anonymous)
        refused = anonymous.post("/synthesize", json={"text": "Hello"})
        assert refused.status_code == 401
        assert anonymous.get("/task/some-id").status_code == 401
        after = scrape(anonymous)
    # refused before routing, still counted under the route's template
    assert delta(before, after, "voxcpm_requests_total", endpoint="/synthesize", status="4xx") == 1
    assert delta(before, after, "voxcpm_request_errors_total", endpoint="/synthesize", status="4xx") == 1
    assert delta(before, after, "voxcpm_request_errors_total", endpoint="/task/{task_id}", status="4xx") == 1


# ---- event series ---------------------------------------------------------------------------------


def test_requests_generations_ttfb_rtf_and_audio_by_lora(make_server) -> None:
    engine = LoRAFakeEngine()
    srv: Running = make_server(engine=engine)
    write_adapter(srv.lora_dir / "good", fitting_shapes(engine))
    c = srv.client
    before = scrape(c)

    durations: dict[str, float] = {"base": 0.0, "good": 0.0}
    for body in ({"text": "Base one, synchronously."}, {"text": "Base two, synchronously."},
                 {"text": "With an adapter.", "lora_name": "good"}):
        response = c.post("/synthesize", json={**body, "async_mode": False, "response_format": "wav"})
        assert response.status_code == 200, response.text
        durations[body.get("lora_name", "base")] += response.json()["duration_s"]
    task_ids = []
    for text in ("Queued with an adapter.", "Another queued one."):
        response = c.post("/synthesize", json={"text": text, "lora_name": "good", "response_format": "wav"})
        assert response.status_code == 200, response.text
        task_ids.append(response.json()["task_id"])
    failed_async = c.post("/synthesize", json={"text": "Please FAIL_ENGINE now"})
    assert failed_async.status_code == 200
    task_ids.append(failed_async.json()["task_id"])
    for task_id in task_ids:
        done = wait_final(c, task_id, 30)
        if done["status"] == "completed":
            durations["good"] += done["duration_s"]
    assert c.get(f"/task/{task_ids[-1]}").json()["status"] == "failed"
    failed_sync = c.post("/synthesize", json={"text": "FAIL_ENGINE please", "async_mode": False})
    assert failed_sync.status_code == 500, failed_sync.text
    assert c.post("/synthesize", json={"text": "x", "lora_name": "nope"}).status_code == 404
    assert c.post("/synthesize", json={"text": ""}).status_code == 422
    assert c.get("/task/does-not-exist").status_code == 404
    assert c.get("/no/such/route").status_code == 404

    after = scrape(c)
    d = lambda name, **labels: delta(before, after, name, **labels)  # noqa: E731
    # requests by route template and status class; errors are the 4xx and 5xx ones
    assert d("voxcpm_requests_total", endpoint="/synthesize", status="2xx") == 6
    assert d("voxcpm_requests_total", endpoint="/synthesize", status="4xx") == 2
    assert d("voxcpm_requests_total", endpoint="/synthesize", status="5xx") == 1
    assert d("voxcpm_request_errors_total", endpoint="/synthesize", status="4xx") == 2
    assert d("voxcpm_request_errors_total", endpoint="/synthesize", status="5xx") == 1
    assert d("voxcpm_request_errors_total", endpoint="/synthesize", status="2xx") == 0
    assert d("voxcpm_request_errors_total", endpoint="/task/{task_id}", status="4xx") == 1
    assert d("voxcpm_requests_total", endpoint="/task/{task_id}", status="2xx") >= 4
    assert d("voxcpm_requests_total", endpoint="unmatched", status="4xx") == 1
    assert not any(dict(labels).get("endpoint") == "/no/such/route" for _, labels in after)
    # generations by outcome, lora and voice
    base, lora = {"kind": "task", "lora": "base", "voice": "none"}, {"kind": "task", "lora": "good", "voice": "none"}
    assert d("voxcpm_generations_started_total", **base) == 4
    assert d("voxcpm_generations_started_total", **lora) == 3
    assert d("voxcpm_generations_total", outcome="completed", **base) == 2
    assert d("voxcpm_generations_total", outcome="completed", **lora) == 3
    assert d("voxcpm_generations_total", outcome="failed", **base) == 2
    assert d("voxcpm_generations_total", outcome="failed", **lora) == 0
    assert d("voxcpm_generation_errors_total", kind="task", lora="base") == 2
    assert d("voxcpm_generation_errors_total", kind="task", lora="good") == 0
    # TTFB: only generations that produced audio; RTF: completed ones
    assert d("voxcpm_time_to_first_audio_seconds_count", **base) == 2
    assert d("voxcpm_time_to_first_audio_seconds_count", **lora) == 3
    assert d("voxcpm_time_to_first_audio_seconds_bucket", le="+Inf", **lora) == 3
    assert 0 < d("voxcpm_time_to_first_audio_seconds_sum", **lora) < 30
    assert d("voxcpm_real_time_factor_count", **base) == 2
    assert d("voxcpm_real_time_factor_count", **lora) == 3
    assert d("voxcpm_real_time_factor_sum", **lora) > 0
    assert d("voxcpm_audio_seconds_total", **base) == pytest.approx(durations["base"], abs=1e-3)
    assert d("voxcpm_audio_seconds_total", **lora) == pytest.approx(durations["good"], abs=1e-3)
    assert durations["good"] > 0
    # read at scrape time from the engine's LoRA runtime: one cache miss, nothing evicted
    assert value(after, "voxcpm_adapter_loads_total", lora="good") == 1
    assert value(after, "voxcpm_adapter_evictions_total", lora="good") == 0
    assert value(after, "voxcpm_queue_depth") == 0 and value(after, "voxcpm_running_tasks") == 0


def test_adapter_loads_and_evictions_come_from_the_engine(make_server) -> None:
    engine = LoRAFakeEngine(lora_runtime=StubLoRARuntime(size=1))
    srv: Running = make_server(engine=engine)
    for name in ("alpha", "beta"):
        write_adapter(srv.lora_dir / name, fitting_shapes(engine))
    for name in ("alpha", "alpha", "beta", "alpha", None):
        response = srv.client.post("/synthesize", json={"text": "Switching.", "lora_name": name, "async_mode": False})
        assert response.status_code == 200, response.text
    samples = scrape(srv.client)
    assert value(samples, "voxcpm_adapter_loads_total", lora="alpha") == 2
    assert value(samples, "voxcpm_adapter_loads_total", lora="beta") == 1
    assert value(samples, "voxcpm_adapter_evictions_total", lora="alpha") == 1
    assert value(samples, "voxcpm_adapter_evictions_total", lora="beta") == 1
    assert value(samples, "voxcpm_adapter_loads_total", lora="base") == 0


# ---- per adapter (issue 19) -----------------------------------------------------------------------


def test_per_adapter_requests_audio_errors_histograms_and_residency(make_server) -> None:
    engine = ConcurrentFakeEngine(lora_slots=1)  # one GPU slot: the last adapter used is the resident one
    srv: Running = make_server(engine=engine)
    for name in ("alpha", "beta"):
        write_adapter(srv.lora_dir / name, fitting_shapes(engine))
    c = srv.client
    before = scrape(c)

    audio = {"base": 0.0, "alpha": 0.0, "beta": 0.0}
    for text, lora in (("Base model one.", None), ("Base model two.", "base"), ("Alpha speaks.", "alpha")):
        response = c.post("/synthesize", json={"text": text, "lora_name": lora, "async_mode": False})
        assert response.status_code == 200, response.text
        audio[lora or "base"] += response.json()["duration_s"]
    failed = c.post("/synthesize", json={"text": "Alpha must FAIL_ENGINE here.", "lora_name": "alpha",
                                         "async_mode": False})
    assert failed.status_code == 500, failed.text
    streamed = c.post("/synthesize/stream", json={"text": "Alpha streams.", "lora_name": "alpha",
                                                  "response_format": "pcm"})
    assert streamed.status_code == 200, streamed.text
    stream_audio = len(streamed.content) / 2 / FAKE_SAMPLE_RATE_HZ  # 16-bit mono
    created = c.post("/voices", data={"name": "betty", "transcript": "A reference.", "lora_name": "beta"},
                     files={"audio": ("ref.wav", wav_bytes(0.5), "audio/wav")})
    assert created.status_code == 201, created.text
    for body in ({"text": "Beta goes last.", "lora_name": "beta"}, {"text": "A saved voice.", "voice": "betty"}):
        response = c.post("/synthesize", json={**body, "async_mode": False})
        assert response.status_code == 200, response.text
        audio["beta"] += response.json()["duration_s"]
    wait_until(lambda: delta(before, scrape(c), "voxcpm_generations_total", kind="stream", outcome="completed",
                             lora="alpha", voice="none") == 1, 10, 0.02, "the stream's generation to finish")

    after = scrape(c)
    d = lambda name, **labels: delta(before, after, name, **labels)  # noqa: E731
    task = lambda lora: {"kind": "task", "lora": lora, "voice": "none"}  # noqa: E731
    stream = {"kind": "stream", "lora": "alpha", "voice": "none"}
    # requests started and finished, by kind and outcome; the base model is "base" ("none"/"base" alike)
    assert d("voxcpm_generations_started_total", **task("base")) == 2
    assert d("voxcpm_generations_started_total", **task("alpha")) == 2
    assert d("voxcpm_generations_started_total", **task("beta")) == 1
    betty = {"kind": "task", "lora": "beta", "voice": "betty"}  # a saved voice counts for its adapter
    assert d("voxcpm_generations_started_total", **betty) == 1
    assert d("voxcpm_generations_total", outcome="completed", **betty) == 1
    assert d("voxcpm_generations_started_total", **stream) == 1
    assert d("voxcpm_generations_total", outcome="completed", **task("base")) == 2
    assert d("voxcpm_generations_total", outcome="completed", **task("alpha")) == 1
    assert d("voxcpm_generations_total", outcome="failed", **task("alpha")) == 1
    assert d("voxcpm_generations_total", outcome="completed", **stream) == 1
    assert not any(dict(labels).get("lora") == "none" for _, labels in after)
    # errors: the failed request counts for its adapter only
    assert d("voxcpm_generation_errors_total", kind="task", lora="alpha") == 1
    assert d("voxcpm_generation_errors_total", kind="task", lora="beta") == 0
    assert d("voxcpm_generation_errors_total", kind="task", lora="base") == 0
    assert d("voxcpm_generation_errors_total", kind="stream", lora="alpha") == 0
    # audio seconds and histogram counts
    for lora in ("base", "alpha", "beta"):
        voiced = d("voxcpm_audio_seconds_total", **betty) if lora == "beta" else 0.0
        assert d("voxcpm_audio_seconds_total", **task(lora)) + voiced == pytest.approx(audio[lora], abs=1e-3), lora
    assert d("voxcpm_audio_seconds_total", **stream) == pytest.approx(stream_audio, abs=1e-3)
    assert audio["alpha"] > 0 and stream_audio > 0 and d("voxcpm_audio_seconds_total", **betty) > 0
    for lora, count in (("base", 2), ("alpha", 1), ("beta", 1)):
        assert d("voxcpm_time_to_first_audio_seconds_count", **task(lora)) == count, lora
        assert d("voxcpm_real_time_factor_count", **task(lora)) == count, lora
        assert d("voxcpm_real_time_factor_bucket", le="+Inf", **task(lora)) == count, lora
    assert d("voxcpm_time_to_first_audio_seconds_count", **stream) == 1
    assert d("voxcpm_real_time_factor_count", **stream) == 1
    assert d("voxcpm_real_time_factor_count", **betty) == 1
    # GPU-slot residency now: beta took the one slot from alpha; the base model needs none
    assert value(after, "voxcpm_adapter_resident", lora="beta") == 1
    assert value(after, "voxcpm_adapter_resident", lora="alpha") == 0
    assert ("voxcpm_adapter_resident", (("lora", "base"),)) not in after


def test_adapters_beyond_the_label_limit_fold_into_other(tmp_path) -> None:
    from tests.helpers import ThreadServer, wait_ready

    assert MAX_LABEL_VALUES == 200  # the production limit; this app is given a limit of 2
    settings = Settings(host="127.0.0.1", model="fake", output_dir=tmp_path / "out", lora_dir=tmp_path / "lora",
                        ref_audio_dir=[tmp_path / "refs"], max_concurrent=1)
    engine = ConcurrentFakeEngine(lora_slots=8)
    names_ = [f"a{i}" for i in range(5)]
    for name in names_:
        write_adapter(settings.lora_dir / name, fitting_shapes(engine))
    app = create_app(settings, engine=engine, events=PrometheusEvents(label_limit=2))
    with ThreadServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        wait_ready(client, 30)
        for lora in [None, *names_, "a0"]:
            response = client.post("/synthesize", json={"text": "Folding.", "lora_name": lora, "async_mode": False})
            assert response.status_code == 200, response.text
        assert client.post("/synthesize", json={"text": "FAIL_ENGINE", "lora_name": "a4",
                                                "async_mode": False}).status_code == 500
        samples = scrape(client)
    loras = {dict(labels)["lora"] for _, labels in samples if "lora" in dict(labels)}
    assert loras == {BASE_LABEL, "a0", "a1", OTHER_LABEL}  # the base model takes no place; a2…a4 fold
    started = lambda lora: value(samples, "voxcpm_generations_started_total", kind="task",  # noqa: E731
                                 lora=lora, voice="none")
    assert (started("base"), started("a0"), started("a1"), started("other")) == (1, 2, 1, 4)
    assert value(samples, "voxcpm_generation_errors_total", kind="task", lora="other") == 1
    assert value(samples, "voxcpm_real_time_factor_count", kind="task", lora="other", voice="none") == 3
    assert value(samples, "voxcpm_audio_seconds_total", kind="task", lora="other", voice="none") > 0
    # all five adapters are in a GPU slot: two by name, three folded into one "other" sample
    assert value(samples, "voxcpm_adapter_resident", lora="a0") == 1
    assert value(samples, "voxcpm_adapter_resident", lora="other") == 3


# ---- scrape-time gauges, and two apps in one process ------------------------------------------


def test_queue_depth_and_running_reflect_a_slow_engine_and_are_shared(make_server) -> None:
    owner: Running = make_server(engine=FakeEngine(patch_delay_s=0.2), max_concurrent=1)
    ids = [owner.client.post("/synthesize", json={"text": f"A slow sentence number {i}. " * 6}).json()["task_id"]
           for i in range(3)]
    wait_until(lambda: owner.client.get("/tasks", params={"status": "processing"}).json()["total"] == 1,
               30, 0.02, "one task processing")
    samples = scrape(owner.client)
    assert value(samples, "voxcpm_running_tasks") == 1
    assert value(samples, "voxcpm_queue_depth") == 2

    # A second app on the same output directory is a non-owner worker: the same store truth,
    # but its own registry (none of the owner's request counts) and no engine of its own.
    worker: Running = make_server(base=owner.base, engine=FakeEngine())
    seen = scrape(worker.client)
    assert value(seen, "voxcpm_running_tasks") == 1
    assert value(seen, "voxcpm_queue_depth") == 2
    assert value(seen, "voxcpm_engine_owner") == 0 and value(seen, "voxcpm_model_loaded") == 1
    assert value(seen, "voxcpm_requests_total", endpoint="/synthesize", status="2xx") == 0
    assert value(samples, "voxcpm_requests_total", endpoint="/synthesize", status="2xx") == 3
    assert worker.client.get("/ready").json() == {"ready": True, "reason": None, "model": "fake",
                                                  "engine_owner": False}

    for task_id in ids:
        assert worker.client.delete(f"/task/{task_id}").status_code == 200
    for task_id in ids:
        assert wait_final(owner.client, task_id, 30)["status"] == "cancelled"
    done = scrape(owner.client)
    assert value(done, "voxcpm_running_tasks") == 0 and value(done, "voxcpm_queue_depth") == 0
    # only the task that had started produces a generation; pending ones were cancelled before
    assert value(done, "voxcpm_generations_total", kind="task", outcome="cancelled", lora="base", voice="none") == 1
    worker_after = scrape(worker.client)
    assert value(worker_after, "voxcpm_requests_total", endpoint="/task/{task_id}", status="2xx") == 3
    assert value(worker_after, "voxcpm_generations_total", kind="task", outcome="cancelled", lora="base",
                 voice="none") == 0


def test_two_independent_apps_keep_separate_counts(make_server) -> None:
    first: Running = make_server()
    second: Running = make_server()
    for _ in range(2):
        assert first.client.post("/synthesize", json={"text": "Only on the first.", "async_mode": False}
                                 ).status_code == 200
    a, b = scrape(first.client), scrape(second.client)
    labels = {"kind": "task", "lora": "base", "voice": "none"}
    assert value(a, "voxcpm_generations_total", outcome="completed", **labels) == 2
    assert value(b, "voxcpm_generations_total", outcome="completed", **labels) == 0
    assert value(a, "voxcpm_requests_total", endpoint="/synthesize", status="2xx") == 2
    assert value(b, "voxcpm_requests_total", endpoint="/synthesize", status="2xx") == 0


def test_a_custom_events_sink_gets_requests_and_metrics_is_off(tmp_path) -> None:
    from tests.helpers import ThreadServer, wait_ready

    class Recorder:
        def __init__(self) -> None:
            self.requests: list[tuple[str, int]] = []

        def request_finished(self, endpoint: str, status_code: int) -> None:
            self.requests.append((endpoint, status_code))

        def generation_started(self, *args: object) -> None:
            pass

        def first_audio(self, *args: object) -> None:
            pass

        def generation_finished(self, *args: object) -> None:
            pass

    recorder = Recorder()
    settings = Settings(host="127.0.0.1", model="fake", output_dir=tmp_path / "out", lora_dir=tmp_path / "lora",
                        ref_audio_dir=[tmp_path / "refs"], max_concurrent=1)
    app = create_app(settings, engine=FakeEngine(), events=recorder)  # type: ignore[arg-type]
    with ThreadServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        wait_ready(client, 30)
        assert client.get("/metrics").status_code == 404
        assert client.get("/task/abc").status_code == 404
    assert ("/metrics", 404) in recorder.requests
    assert ("/task/{task_id}", 404) in recorder.requests


# ---- the sink itself ------------------------------------------------------------------------------


def test_prometheus_events_stream_kind_voice_labels_and_separate_registries() -> None:
    one, two = PrometheusEvents(), PrometheusEvents()  # no global registry: no duplicate-series error
    one.generation_started("stream", "good", "alice")
    one.first_audio("stream", 0.3, "good", "alice")
    one.generation_finished("stream", "completed", 2.0, 1.0, "good", "alice")
    one.generation_finished("stream", "cancelled", 0.5, 0.4, None, None)
    one.generation_finished("stream", "failed", 0.0, 0.1, "good", None)
    samples: Samples = {}
    for family in text_string_to_metric_families(one.render(None).decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    stream = {"kind": "stream", "lora": "good", "voice": "alice"}
    assert value(samples, "voxcpm_time_to_first_audio_seconds_count", **stream) == 1
    assert value(samples, "voxcpm_time_to_first_audio_seconds_bucket", le="0.5", **stream) == 1
    assert value(samples, "voxcpm_time_to_first_audio_seconds_bucket", le="0.25", **stream) == 0
    assert value(samples, "voxcpm_real_time_factor_sum", **stream) == pytest.approx(0.5)
    assert value(samples, "voxcpm_audio_seconds_total", **stream) == pytest.approx(2.0)
    # a cancelled stream's partial audio counts as produced, but gives no RTF
    assert value(samples, "voxcpm_audio_seconds_total", kind="stream", lora="base", voice="none") == pytest.approx(0.5)
    assert value(samples, "voxcpm_real_time_factor_count", kind="stream", lora="base", voice="none") == 0
    assert value(samples, "voxcpm_generation_errors_total", kind="stream", lora="good") == 1
    assert value(samples, "voxcpm_generation_errors_total", kind="stream", lora="base") == 0
    assert "voxcpm_queue_depth" not in names(samples)  # no service yet: no scrape-time series
    assert b"alice" not in two.render(None)


def test_label_values_are_bounded() -> None:
    label = _BoundedLabel(limit=2)
    assert [label(v) for v in ("a", "b", "c", "a", None, "")] == ["a", "b", OTHER_LABEL, "a", "none", "none"]
    adapters = _BoundedLabel(limit=1, base_model=True)  # the `lora` label: the base model is "base", never folded
    assert [adapters(v) for v in (None, "", "none", "Base", "x", "y", "x")] == [
        BASE_LABEL, BASE_LABEL, BASE_LABEL, BASE_LABEL, "x", OTHER_LABEL, "x"]
