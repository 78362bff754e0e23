"""Batch rows: a ConcurrentEngine takes up to --max-concurrent generations at once (real uvicorn,
ConcurrentFakeEngine, whose loop thread advances every running row one patch per step and calls the
rows' callbacks there, as the batched engine does).
"""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np

from tests.api.conftest import Running, decode, fitting_shapes, write_adapter
from tests.api.test_metrics import scrape, value
from tests.helpers import wait_final, wait_until
from voxcpm_api.engine.fake import ConcurrentFakeEngine
from voxcpm_api.engine.pool import EnginePool


def submit(client: httpx.Client, text: str, **body: object) -> str:
    response = client.post("/synthesize", json={"text": text, "response_format": "wav", **body})
    assert response.status_code == 200, response.text
    return response.json()["task_id"]


def task_calls(engine: ConcurrentFakeEngine) -> list:
    return [c for c in engine.calls if not (c.text == "Hello, this is a warm-up." and c.seed == 0)]


def download(client: httpx.Client, task: dict) -> np.ndarray:
    samples, _ = decode(client.get(task["download_url"]).content, "wav", task["sample_rate"])
    return samples


# ---- how many at once -----------------------------------------------------------------------------


def test_max_concurrent_rows_generate_at_once_and_no_more(make_server) -> None:
    engine = ConcurrentFakeEngine(patch_delay_s=0.02, max_rows=8)
    running = make_server(engine=engine, max_concurrent=3)
    client = running.client
    ids = [submit(client, f"batch row number {i} " + "r" * 80, seed=i) for i in range(7)]
    results = [wait_final(client, task_id, 60) for task_id in ids]
    assert [r["status"] for r in results] == ["completed"] * 7
    assert engine.peak_running == 3, f"peak {engine.peak_running}: --max-concurrent 3 must fill exactly 3 rows"
    assert client.get("/tasks").json()["max_concurrent"] == 3


def test_default_max_concurrent_is_the_engine_rows(make_server) -> None:
    engine = ConcurrentFakeEngine(patch_delay_s=0.02, max_rows=5)
    running = make_server(engine=engine, max_concurrent=None)
    client = running.client
    assert client.get("/tasks").json()["max_concurrent"] == 5
    ids = [submit(client, f"default rows {i} " + "d" * 80) for i in range(10)]
    assert all(wait_final(client, t, 60)["status"] == "completed" for t in ids)
    assert engine.peak_running == 5


def test_more_than_the_rows_is_capped_at_the_rows(make_server) -> None:
    engine = ConcurrentFakeEngine(patch_delay_s=0.02, max_rows=2)
    running = make_server(engine=engine, max_concurrent=6)
    ids = [submit(running.client, f"capped {i} " + "c" * 80) for i in range(5)]
    assert all(wait_final(running.client, t, 60)["status"] == "completed" for t in ids)
    assert engine.peak_running == 2
    assert running.client.get("/tasks").json()["max_concurrent"] == 2


def test_concurrent_results_equal_the_same_request_alone(make_server) -> None:
    """Rows never mix: every task's audio is what the same request gives when it runs alone."""
    engine = ConcurrentFakeEngine(patch_delay_s=0.01, max_rows=6)
    running = make_server(engine=engine, max_concurrent=6)
    client = running.client
    texts = [f"Request {i} speaks " + "x" * (10 + 7 * i) for i in range(6)]
    ids = [submit(client, text, seed=100 + i) for i, text in enumerate(texts)]
    together = [download(client, wait_final(client, t, 60)) for t in ids]
    assert engine.peak_running >= 2
    for i, text in enumerate(texts):
        alone = client.post("/synthesize", json={"text": text, "seed": 100 + i, "response_format": "wav",
                                                 "async_mode": False})
        assert alone.status_code == 200, alone.text
        assert np.array_equal(download(client, alone.json()), together[i])


# ---- one row fails or is cancelled, the others go on -------------------------------------------------


def test_a_failing_row_fails_only_its_task(make_server) -> None:
    engine = ConcurrentFakeEngine(patch_delay_s=0.03, max_rows=4)
    running = make_server(engine=engine, max_concurrent=4)
    client = running.client
    good = [submit(client, f"good row {i} " + "g" * 170) for i in range(3)]  # 45 patches, 1.35 s
    wait_until(lambda: engine.load_summary().running_rows == 3, 10, what="three rows running")
    bad = submit(client, "this row says FAIL_ENGINE and dies " + "b" * 20)
    failed = wait_final(client, bad, 30)
    assert failed["status"] == "failed" and "fake engine was asked to fail" in failed["error"]
    # the others were running when it failed, and finish normally
    assert any(client.get(f"/task/{t}").json()["status"] == "processing" for t in good)
    assert [wait_final(client, t, 30)["status"] for t in good] == ["completed"] * 3
    assert sum(1 for c in task_calls(engine) if "FAIL_ENGINE" in c.text) == 1  # not retried
    after = client.post("/synthesize", json={"text": "the engine still works", "async_mode": False})
    assert after.status_code == 200 and after.json()["status"] == "success"


def test_cancelling_one_running_row_leaves_the_others_running(make_server) -> None:
    engine = ConcurrentFakeEngine(patch_delay_s=0.02, max_rows=4)
    running = make_server(engine=engine, max_concurrent=4)
    client = running.client
    ids = [submit(client, f"long running row {i} " + "l" * 170) for i in range(3)]  # 47 patches, ~1 s
    wait_until(lambda: all(client.get(f"/task/{t}").json()["progress"] > 0 for t in ids), 20,
               what="every row to make progress")
    victim = ids[1]
    assert client.delete(f"/task/{victim}").status_code == 200
    assert wait_final(client, victim, 10)["status"] == "cancelled"
    others = [wait_final(client, t, 30) for t in (ids[0], ids[2])]
    assert [o["status"] for o in others] == ["completed", "completed"]
    assert all(o["progress"] == 1.0 for o in others)
    assert engine.peak_running == 3
    assert client.get("/tasks", params={"status": "processing"}).json()["total"] == 0


# ---- streams are rows too -----------------------------------------------------------------------------


def test_a_stream_and_tasks_generate_at_once(make_server) -> None:
    engine = ConcurrentFakeEngine(patch_delay_s=0.02, max_rows=4)
    running = make_server(engine=engine, max_concurrent=4)
    client = running.client
    tasks = [submit(client, f"task beside a stream {i} " + "t" * 170) for i in range(2)]  # 48 patches, ~1 s
    wait_until(lambda: engine.load_summary().running_rows == 2, 10, what="two task rows")
    text = "A stream that shares the decode step with tasks."
    streamed = client.post("/synthesize/stream", json={"text": text, "seed": 5, "response_format": "pcm"})
    assert streamed.status_code == 200
    assert any(client.get(f"/task/{t}").json()["status"] == "processing" for t in tasks), \
        "the stream had to wait for the tasks: it did not run as a row beside them"
    assert engine.peak_running >= 3
    assert all(wait_final(client, t, 30)["status"] == "completed" for t in tasks)
    alone = client.post("/synthesize/stream", json={"text": text, "seed": 5, "response_format": "pcm"})
    assert streamed.content == alone.content


def test_concurrent_streams_each_get_their_own_audio(make_server) -> None:
    engine = ConcurrentFakeEngine(patch_delay_s=0.01, max_rows=4)
    running = make_server(engine=engine, max_concurrent=4)
    results: dict[int, bytes] = {}

    def fetch(i: int) -> None:
        with httpx.Client(base_url=running.server.url, timeout=60) as own:
            results[i] = own.post("/synthesize/stream", json={"text": f"Parallel stream number {i}.", "seed": i,
                                                              "response_format": "pcm"}).content

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert sorted(results) == [0, 1, 2, 3]
    assert engine.peak_running >= 2
    for i, data in results.items():
        alone = running.client.post("/synthesize/stream", json={"text": f"Parallel stream number {i}.", "seed": i,
                                                                "response_format": "pcm"}).content
        assert data == alone


def test_stream_disconnect_ends_its_row_alone(make_server) -> None:
    engine = ConcurrentFakeEngine(patch_delay_s=0.02, max_rows=4)
    running = make_server(engine=engine, max_concurrent=4)
    client = running.client
    task = submit(client, "a task that outlives the stream " + "o" * 160)  # 48 patches, ~1 s
    wait_until(lambda: engine.load_summary().running_rows == 1, 10, what="the task's row")
    with httpx.Client(base_url=running.server.url, timeout=30) as leaver:
        with leaver.stream("POST", "/synthesize/stream", json={"text": "word " * 39, "response_format": "pcm"}) as r:
            assert r.status_code == 200  # 48 patches if it ran to the end
            next(r.iter_raw())
    wait_until(lambda: engine.load_summary().running_rows <= 1, 5, what="the stream's row to end")
    assert client.get(f"/task/{task}").json()["status"] == "processing", "the task's row must go on"
    time.sleep(0.2)
    assert engine.patches_streamed < 30, f"{engine.patches_streamed} patches streamed after the client left"
    assert wait_final(client, task, 30)["status"] == "completed"


# ---- shutdown -------------------------------------------------------------------------------------------


def test_shutdown_requeues_every_running_row(tmp_path) -> None:
    from tests.api.conftest import running_server

    engine = ConcurrentFakeEngine(patch_delay_s=0.05, max_rows=4)
    with running_server(tmp_path / "srv", engine=engine, max_concurrent=4) as first:
        ids = [submit(first.client, f"interrupted row {i} " + "i" * 200) for i in range(3)]
        wait_until(lambda: engine.load_summary().running_rows == 3, 10, what="three rows")
    assert engine.closed, "the runner must close a ConcurrentEngine when it stops"
    again = ConcurrentFakeEngine(patch_delay_s=0.0, max_rows=4)
    with running_server(tmp_path / "srv", engine=again, max_concurrent=4) as second:
        assert [wait_final(second.client, t, 30)["status"] for t in ids] == ["completed"] * 3


# ---- several engines ------------------------------------------------------------------------------------


def test_engine_pool_spreads_rows_and_reports_them(make_server) -> None:
    engines = [ConcurrentFakeEngine(patch_delay_s=0.02, max_rows=2, device=f"cpu{i}") for i in range(2)]
    pool = EnginePool(engines)
    running: Running = make_server(engine=pool, max_concurrent=None)  # type: ignore[arg-type]
    client = running.client
    assert client.get("/tasks").json()["max_concurrent"] == 4
    assert client.get("/health").json()["device"] == "cpu0,cpu1"
    ids = [submit(client, f"pooled row {i} " + "p" * 50, seed=i) for i in range(8)]
    results = [wait_final(client, t, 60) for t in ids]
    assert [r["status"] for r in results] == ["completed"] * 8
    assert all(e.peak_running == 2 for e in engines), [e.peak_running for e in engines]
    assert sum(pool.placements.values()) >= 8 and all(n > 0 for n in pool.placements.values())
    samples = scrape(client)
    assert value(samples, "voxcpm_batch_rows", state="max") == 4
    assert value(samples, "voxcpm_engine_placements_total", engine="0") == pool.placements[0]
    assert value(samples, "voxcpm_engine_placements_total", engine="1") == pool.placements[1]
    steps = value(samples, "voxcpm_engine_decode_steps_total")
    assert steps == sum(e.steps for e in engines) > 0
    assert steps <= value(samples, "voxcpm_engine_rows_stepped_total") <= 2 * steps  # two rows per engine at most
    for i, r in enumerate(results):  # either engine makes the same audio for a request
        alone = client.post("/synthesize", json={"text": f"pooled row {i} " + "p" * 50, "seed": i,
                                                 "response_format": "wav", "async_mode": False}).json()
        assert np.array_equal(download(client, alone), download(client, r))


def test_engine_pool_keeps_an_adapter_on_the_engine_that_holds_it(make_server) -> None:
    engines = [ConcurrentFakeEngine(patch_delay_s=0.0, max_rows=4) for _ in range(2)]
    pool = EnginePool(engines)
    running: Running = make_server(engine=pool, max_concurrent=None)  # type: ignore[arg-type]
    write_adapter(running.lora_dir / "voice_a", fitting_shapes(engines[0]))
    client = running.client
    for i in range(4):  # one at a time: each finds the adapter resident where the first one ran
        response = client.post("/synthesize", json={"text": f"adapter {i}", "lora_name": "voice_a",
                                                    "async_mode": False})
        assert response.status_code == 200, response.text
    used = [sum(1 for c in task_calls(e) if c.adapter is not None) for e in engines]
    assert sorted(used) == [0, 4], used


def test_one_row_engine_runs_one_generation_at_a_time(make_server) -> None:
    engine = ConcurrentFakeEngine(patch_delay_s=0.005, max_rows=1)
    running = make_server(engine=engine, max_concurrent=None)
    ids = [submit(running.client, f"in order {i}") for i in range(4)]
    assert all(wait_final(running.client, t, 30)["status"] == "completed" for t in ids)
    assert engine.peak_running == 1
