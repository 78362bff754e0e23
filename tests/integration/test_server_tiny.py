"""The real server (`python start_api.py --model tiny`) in a child process, over real HTTP.

Covers what only a real process can show: LoRA hot-switching on the official model, restart and
`kill -9` survival, 20 concurrent tasks, HTTPS, the API key, --workers, and the hub-id failure.
Timings printed here are reported in the closing note; no assertion depends on speed.
"""

from __future__ import annotations

import datetime
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.helpers import REPO_ROOT, SubprocessServer, wait_final, wait_ready, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny-server")]

TINY_CACHE = REPO_ROOT / ".cache" / "test-tiny"
LONG_TEXT = " ".join(f"This is sentence number {i} of a long text that the server splits into chunks."
                     for i in range(8))


def server_args(tmp: Path, *extra: str) -> list[str]:
    return ["--model", "tiny", "--output-dir", str(tmp / "out"), "--cache-dir", str(TINY_CACHE),
            "--ref-audio-dir", str(tmp / "ref"), *extra]


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("tiny-server")
    (tmp / "ref").mkdir()
    rng = np.random.default_rng(0)
    sf.write(tmp / "ref" / "voice.wav", (0.1 * rng.standard_normal(44100)).astype(np.float32), 44100)
    server = SubprocessServer(server_args(tmp, "--max-concurrent", "2"), log_path=tmp / "server.log").start()
    client = httpx.Client(base_url=server.url, timeout=120)
    wait_ready(client, 180)
    yield server, client, tmp
    client.close()
    server.stop()


def synth_wav(client: httpx.Client, **fields: object) -> bytes:
    body = {"text": "Hello from the tiny model.", "seed": 7, "async_mode": False, "response_format": "wav", **fields}
    response = client.post("/synthesize", json=body)
    assert response.status_code == 200, response.text
    name = response.json()["audio_path"].rsplit("/", 1)[-1]
    data = client.get(f"/download/{name}").content
    assert data[:4] == b"RIFF"
    return data


def test_lora_switching_is_hot_and_exact(tiny_server) -> None:
    _, client, _ = tiny_server
    loras = client.get("/loras").json()["loras"]
    assert len(loras) == 2, loras
    lora_a, lora_b = loras
    started = time.monotonic()
    first_a = synth_wav(client, lora_name=lora_a)
    base = synth_wav(client, lora_name="None")
    b = synth_wav(client, lora_name=lora_b)
    again_a = synth_wav(client, lora_name=lora_a)
    elapsed = time.monotonic() - started
    assert first_a == again_a, "A -> none -> B -> A must reproduce A exactly"
    assert len({first_a, base, b}) == 3, "each adapter must change the audio"
    print(f"\n[measure] 4 sync requests with LoRA switches on the tiny model: {elapsed:.2f}s")


def test_seed_is_honoured_and_reported(tiny_server) -> None:
    _, client, _ = tiny_server
    assert synth_wav(client, seed=11) == synth_wav(client, seed=11)
    assert synth_wav(client, seed=11) != synth_wav(client, seed=12)
    task = client.post("/synthesize", json={"text": "Random seed please.", "seed": -1}).json()
    done = wait_final(client, task["task_id"])
    assert done["status"] == "completed" and done["seed"] >= 0


def test_cloning_from_reference_dir_and_upload(tiny_server) -> None:
    _, client, tmp = tiny_server
    by_path = synth_wav(client, ref_audio_path="voice.wav", ref_text="a reference transcript")
    data = (tmp / "ref" / "voice.wav").read_bytes()
    response = client.post("/synthesize/upload", files={"file": ("mine.wav", data, "audio/wav")},
                           data={"text": "Hello from the tiny model.", "ref_text": "a reference transcript",
                                 "seed": "7", "async_mode": "false", "response_format": "wav"})
    assert response.status_code == 200, response.text
    by_upload = client.get(f"/download/{response.json()['audio_path'].rsplit('/', 1)[-1]}").content
    assert by_path == by_upload, "the same reference content must give the same audio"
    missing_text = client.post("/synthesize", json={"text": "x", "ref_audio_path": "voice.wav"})
    assert missing_text.status_code == 422 and "ref_text" in missing_text.text


def test_progress_is_real_for_long_text(tiny_server) -> None:
    _, client, _ = tiny_server
    task_id = client.post("/synthesize", json={"text": LONG_TEXT, "seed": 3}).json()["task_id"]
    seen: list[float] = []

    def poll():  # type: ignore[no-untyped-def]
        body = client.get(f"/task/{task_id}").json()
        seen.append(body["progress"])
        return body if body["status"] in ("completed", "failed") else None

    done = wait_until(poll, 180, 0.02, "long task")
    assert done["status"] == "completed", done
    assert seen == sorted(seen), "progress must never go backwards"
    assert all(p < 1.0 for p in seen[:-1]) and seen[-1] == 1.0
    assert any(0.0 < p < 1.0 for p in seen), "intermediate progress must be visible"
    info = sf.info(io.BytesIO(client.get(done["download_url"]).content))
    assert abs(info.duration - done["duration_s"]) < 0.1


def test_twenty_concurrent_tasks_with_three_adapters(tiny_server) -> None:
    _, client, _ = tiny_server
    loras = [None, *client.get("/loras").json()["loras"]]
    started = time.monotonic()
    ids: list[str] = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        with httpx.Client(base_url=client.base_url, timeout=60) as c:
            body = {"text": f"Concurrent request number {i}.", "seed": i, "lora_name": loras[i % 3]}
            response = c.post("/synthesize", json=body)
            assert response.status_code == 200, response.text
            with lock:
                ids.append(response.json()["task_id"])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    submitted = time.monotonic() - started
    results = [wait_final(client, task_id, 300) for task_id in ids]
    elapsed = time.monotonic() - started
    assert [r["status"] for r in results] == ["completed"] * 20
    assert client.get("/tasks", params={"status": "processing"}).json()["processing"] == 0
    print(f"\n[measure] 20 concurrent tasks (3 adapters): submitted in {submitted:.2f}s, all done in {elapsed:.2f}s")


def test_cancel_running_task(tiny_server) -> None:
    _, client, _ = tiny_server
    task_id = client.post("/synthesize", json={"text": LONG_TEXT * 2, "seed": 1}).json()["task_id"]
    wait_until(lambda: client.get(f"/task/{task_id}").json()["progress"] > 0, 120, 0.02, "progress")
    assert client.delete(f"/task/{task_id}").status_code == 200
    done = wait_final(client, task_id)
    assert done["status"] == "cancelled" and done["audio_path"] is None


def test_kill_9_mid_task_then_restart_completes_it(tmp_path: Path) -> None:
    args = server_args(tmp_path)
    server = SubprocessServer(args, log_path=tmp_path / "first.log").start()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        wait_ready(client, 180)
        running = client.post("/synthesize", json={"text": LONG_TEXT * 2, "seed": 5}).json()["task_id"]
        queued = client.post("/synthesize", json={"text": "Queued behind the long one.", "seed": 6}).json()["task_id"]
        wait_until(lambda: client.get(f"/task/{running}").json()["progress"] > 0.05, 120, 0.02, "progress")
    server.kill9()
    again = SubprocessServer(args, port=server.port, log_path=tmp_path / "second.log").start()
    try:
        with httpx.Client(base_url=again.url, timeout=60) as client:
            first = wait_final(client, running, 300)
            second = wait_final(client, queued, 300)
            assert first["status"] == "completed" and first["attempts"] == 2, first
            assert second["status"] == "completed", second
            assert client.get(first["download_url"]).status_code == 200
    finally:
        again.stop()


def test_graceful_restart_keeps_every_task(tmp_path: Path) -> None:
    args = server_args(tmp_path, "--max-concurrent", "1")
    server = SubprocessServer(args, log_path=tmp_path / "first.log").start()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        wait_ready(client, 180)
        done_id = client.post("/synthesize",
                              json={"text": "Finished before restart.", "async_mode": False}).json()["task_id"]
        ids = [client.post("/synthesize", json={"text": LONG_TEXT, "seed": i}).json()["task_id"] for i in range(3)]
    server.stop()  # SIGTERM while tasks run and wait
    again = SubprocessServer(args, port=server.port, log_path=tmp_path / "second.log").start()
    try:
        with httpx.Client(base_url=again.url, timeout=60) as client:
            assert client.get(f"/task/{done_id}").json()["status"] == "completed"
            for task_id in ids:
                assert wait_final(client, task_id, 300)["status"] == "completed"
    finally:
        again.stop()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = tmp / "key.pem", tmp / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_https_and_api_key_from_env(tmp_path: Path) -> None:
    key_path, cert_path = _self_signed(tmp_path)
    server = SubprocessServer(server_args(tmp_path, "--ssl-keyfile", str(key_path), "--ssl-certfile", str(cert_path)),
                              env={"VOXCPM_API_KEY": "s3cret"}, log_path=tmp_path / "server.log").start()
    url = f"https://127.0.0.1:{server.port}"
    try:
        with httpx.Client(base_url=url, timeout=60, verify=str(cert_path)) as client:
            wait_ready(client, 180)
            assert client.get("/loras").status_code == 401
            ok = client.post("/synthesize", json={"text": "Over TLS.", "async_mode": False},
                             headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200, ok.text
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/health", verify=True)  # untrusted self-signed certificate is refused
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{server.port}/health")  # plain HTTP is not served
    finally:
        server.stop()


def _maps_torch(pid: int) -> bool:
    try:
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_workers_share_one_model_and_one_task_store(tmp_path: Path) -> None:
    server = SubprocessServer(server_args(tmp_path, "--workers", "2"), log_path=tmp_path / "server.log").start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            wait_ready(client, 180)
        ids = []
        for i in range(6):  # fresh connections spread requests over both workers
            with httpx.Client(base_url=server.url, timeout=60) as c:
                ids.append(c.post("/synthesize", json={"text": f"Worker test {i}.", "seed": i}).json()["task_id"])
        owners = set()
        for task_id in ids:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                assert wait_final(c, task_id, 300)["status"] == "completed"
                owners.add(c.get("/health").json()["engine_owner"])
        children = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
        worker_pids = [int(p) for p in children if int(p) > 0]
        with_torch = [p for p in worker_pids if _maps_torch(p)]
        assert len(with_torch) == 1, f"exactly one worker may load the model, got {with_torch} of {worker_pids}"
    finally:
        server.stop()


def test_unreachable_hub_id_exits_with_one_clear_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "start_api.py"), "--model", "openbmb/VoxCPM1.5", "--output-dir",
         str(tmp_path / "out"), "--port", "1"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert result.returncode != 0
    assert "could not download the model 'openbmb/VoxCPM1.5'" in result.stderr
    assert "--model" in result.stderr and "Traceback" not in result.stderr


def test_client_scripts_run_against_the_server(tiny_server, tmp_path: Path) -> None:
    server, _, _ = tiny_server
    for script, extra in (("test_network.py", ["--host", "127.0.0.1", "--port", str(server.port)]),
                          ("test_async_api.py", ["--base-url", server.url, "--out-dir", str(tmp_path)])):
        result = subprocess.run([sys.executable, str(REPO_ROOT / script), *extra], capture_output=True, text=True,
                                timeout=300, cwd=tmp_path)
        assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("async_mode", [True, False], ids=["async", "sync"])
def test_bad_input_on_the_real_model_is_4xx_and_stores_nothing(tiny_server, async_mode: bool) -> None:
    """The exhaustive matrix runs on FakeEngine (tests/api/test_bad_input.py); this checks the same
    refusals hold with the real engine owner behind them (LoRA shapes and model info come from it)."""
    _, client, tmp = tiny_server
    (tmp / "ref" / "junk.wav").write_bytes(b"not audio at all" * 100)
    lora = client.get("/loras").json()["loras"][0]
    cases = [
        ({"text": "   "}, 422), ({"text": 42}, 422), ({"text": "x" * 6000}, 422), ({"text": "ok", "steps": 0}, 422),
        ({"text": "ok", "cfg_scale": 0}, 422), ({"text": "ok", "seed": -2}, 422),
        ({"text": "ok", "lora_name": "nope"}, 404),
        ({"text": "ok", "lora_name": "../x"}, 403), ({"text": "ok", "ref_text": "no audio"}, 422),
        ({"text": "ok", "ref_audio_path": "/etc/passwd", "ref_text": "t"}, 403),
        ({"text": "ok", "ref_audio_path": "missing.wav", "ref_text": "t"}, 404),
        ({"text": "ok", "ref_audio_path": "junk.wav", "ref_text": "t"}, 400),
        ({"text": "ok", "ref_audio_path": "voice.wav"}, 422),  # VoxCPM 1.x needs the transcript
        ({"text": "ok", "response_format": "aac"}, 422), ({"text": "ok", "lora_name": lora, "steps": 101}, 422),
    ]
    wait_until(lambda: all(client.get("/tasks", params={"status": s}).json()["total"] == 0
                           for s in ("pending", "processing")), 120, 0.05, "earlier tasks to finish")
    before = client.get("/tasks").json()["total"]
    files_before = sorted(p.name for p in (tmp / "out").glob("tts_*"))
    for body, status in cases:
        response = client.post("/synthesize", json={**body, "async_mode": async_mode})
        assert response.status_code == status, (body, response.status_code, response.text)
        assert response.json().get("detail"), response.text
    malformed = client.post("/synthesize", content=b"{not json", headers={"Content-Type": "application/json"})
    assert malformed.status_code == 422
    assert client.get("/tasks").json()["total"] == before
    assert sorted(p.name for p in (tmp / "out").glob("tts_*")) == files_before
