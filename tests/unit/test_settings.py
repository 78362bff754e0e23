"""Settings for the engines: --devices, --engine, --max-concurrent defaults, the batched engine's flags."""

from __future__ import annotations

import pytest

from voxcpm_api.cli import build_parser, settings_from_args
from voxcpm_api.config import Settings, parse_devices


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DEVICES", "DEVICE", "ENGINE", "MAX_CONCURRENT", "LORA_SLOTS", "MAX_SEQ_LEN", "CUDA_GRAPHS"):
        monkeypatch.delenv(f"VOXCPM_{name}", raising=False)


@pytest.mark.parametrize(("text", "devices"), [
    ("0", ["cuda:0"]),
    ("0,1", ["cuda:0", "cuda:1"]),
    (" 0 , 3 ", ["cuda:0", "cuda:3"]),
    ("cuda:0,cuda:1", ["cuda:0", "cuda:1"]),
    ("CUDA:2", ["cuda:2"]),
    ("1,cuda:0", ["cuda:1", "cuda:0"]),
    ("cpu", ["cpu"]),
    ("cpu,cpu", ["cpu", "cpu"]),
    ("cuda", ["cuda"]),
    ("mps", ["mps"]),
])
def test_devices_are_normalised(text: str, devices: list[str]) -> None:
    assert parse_devices(text) == devices
    settings = Settings(devices=text)
    assert settings.devices == ",".join(devices)
    assert settings.engine_devices == devices


@pytest.mark.parametrize(("text", "complaint"), [
    ("gpu", "not a device"),
    ("0,0", "named twice"),
    ("cuda:1,1", "named twice"),
    ("cuda,cuda:1", "cannot be combined"),
    ("mps,cpu", "mps is one device"),
    (",", "comma list"),
    ("auto,0", "not a device"),
])
def test_bad_devices_are_refused(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_devices(text)
    with pytest.raises(ValueError, match=complaint):
        Settings(devices=text)


def test_auto_is_decided_by_the_engine_owner() -> None:
    assert Settings().devices == "auto" and Settings().engine_devices is None
    assert Settings(devices="AUTO").devices == "auto"


def test_an_explicit_device_means_one_engine_there_unless_devices_is_given() -> None:
    assert Settings(device="cuda:1").engine_devices == ["cuda:1"]
    assert Settings(device="cpu").engine_devices == ["cpu"]
    assert Settings(device="cuda:1", devices="0,2").engine_devices == ["cuda:0", "cuda:2"]


def test_official_engine_takes_one_device() -> None:
    assert Settings(engine="official", devices="1").engine_devices == ["cuda:1"]
    assert Settings(engine="official").engine_devices is None
    with pytest.raises(ValueError, match="one device"):
        Settings(engine="official", devices="0,1")


def test_max_concurrent_defaults_per_engine() -> None:
    assert Settings().max_concurrent is None
    assert Settings(engine="official").effective_max_concurrent == 2
    assert Settings(engine="batched", devices="0,1").effective_max_concurrent is None  # sized from GPU memory
    assert Settings(engine="batched", devices="cpu,cpu").effective_max_concurrent == 32
    assert Settings(engine="batched", device="cpu").effective_max_concurrent == 16
    assert Settings(engine="batched").effective_max_concurrent is None  # auto: known once torch counted GPUs
    assert Settings(max_concurrent=5, engine="official").effective_max_concurrent == 5
    assert Settings(max_concurrent=5).effective_max_concurrent == 5


def test_rows_per_engine_spread_max_concurrent() -> None:
    assert Settings().rows_per_engine(3) is None  # each engine decides (GPU memory, or 16 on a CPU)
    assert Settings(max_concurrent=20).rows_per_engine(3) == 7
    assert Settings(max_concurrent=32).rows_per_engine(2) == 16
    assert Settings(max_concurrent=1).rows_per_engine(4) == 1


def test_batched_engine_defaults() -> None:
    settings = Settings()
    assert settings.engine == "batched"
    assert settings.lora_slots == 8 and settings.max_seq_len == 5120 and settings.cuda_graphs is True


def test_cli_flags(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings, _ = settings_from_args(["--devices", "0,1", "--engine", "batched", "--lora-slots", "4",
                                      "--max-seq-len", "2048", "--no-cuda-graphs", "--max-concurrent", "24",
                                      "--lora-cache-size", "5"])
    assert settings.lora_cache_size == 5
    assert settings.engine_devices == ["cuda:0", "cuda:1"]
    assert (settings.lora_slots, settings.max_seq_len, settings.cuda_graphs) == (4, 2048, False)
    assert settings.max_concurrent == 24 and settings.rows_per_engine(2) == 12
    assert settings_from_args(["--cuda-graphs"])[0].cuda_graphs is True
    assert settings_from_args([])[0].cuda_graphs is True
    assert settings_from_args(["--device", "cuda:3"])[0].engine_devices == ["cuda:3"]
    assert settings_from_args(["--engine", "official"])[0].engine == "official"


@pytest.mark.parametrize("argv", [["--devices", "0,0"], ["--devices", "0,1", "--engine", "official"],
                                  ["--lora-slots", "0"], ["--max-concurrent", "0"]])
def test_cli_refuses_bad_values_with_one_message(argv: list[str]) -> None:
    with pytest.raises(SystemExit, match="invalid settings"):
        settings_from_args(argv)


def test_cli_refuses_an_unknown_engine(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--engine", "fast"])
    assert "invalid choice" in capsys.readouterr().err


def test_env_twins_and_the_worker_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXCPM_DEVICES", "cuda:0,1")
    monkeypatch.setenv("VOXCPM_CUDA_GRAPHS", "false")
    monkeypatch.setenv("VOXCPM_LORA_SLOTS", "3")
    settings = Settings()
    assert settings.engine_devices == ["cuda:0", "cuda:1"] and not settings.cuda_graphs and settings.lora_slots == 3
    env = settings.to_env()
    assert env["VOXCPM_DEVICES"] == "cuda:0,cuda:1" and "VOXCPM_MAX_CONCURRENT" not in env  # None: not exported
    for name in list(env):
        monkeypatch.delenv(name, raising=False)
    for name, text in env.items():
        monkeypatch.setenv(name, text)
    assert Settings() == settings


def test_compile_is_on_by_default_for_the_batched_engine_only() -> None:
    assert Settings().effective_compile is True
    assert Settings(engine="official").effective_compile is False
    assert Settings(compile=False).effective_compile is False
    assert Settings(engine="official", compile=True).effective_compile is True
    assert settings_from_args(["--no-compile"])[0].effective_compile is False
    assert settings_from_args(["--compile", "--engine", "official"])[0].effective_compile is True


def test_the_first_adapters_that_resolve_are_preloaded(tmp_path) -> None:
    """A GPU engine puts them into its slots at load (engine._preload_adapters); a broken one is skipped."""
    import json
    import struct

    from voxcpm_api.api.app import preload_specs
    from voxcpm_api.lora.catalog import LoRACatalog

    def adapter(name: str, header: dict) -> None:
        folder = tmp_path / name
        folder.mkdir()
        raw = json.dumps(header).encode()
        (folder / "lora_weights.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
        (folder / "lora_config.json").write_text(json.dumps({"r": 4, "alpha": 8}))

    good = {"base_lm.layers.0.self_attn.q_proj.lora_A": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 0]},
            "base_lm.layers.0.self_attn.q_proj.lora_B": {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 0]}}
    adapter("a", good)
    adapter("b", {"not_lora": {"dtype": "F32", "shape": [1], "data_offsets": [0, 0]}})
    adapter("c", good)
    adapter("d", good)
    assert [s.name for s in preload_specs(LoRACatalog(tmp_path), 2)] == ["a", "c"]
    assert [s.name for s in preload_specs(LoRACatalog(tmp_path / "missing"), 8)] == []


def test_catalog_names_adapter_keys_back(tmp_path) -> None:
    """/metrics reports GPU-resident adapters by name: LoRACatalog.names_of_keys inverts adapter_key_str."""
    import json
    import struct

    from voxcpm_api.lora.catalog import LoRACatalog, adapter_key_str

    header = json.dumps({"base_lm.layers.0.self_attn.q_proj.lora_A": {"dtype": "F32", "shape": [4, 8],
                                                                        "data_offsets": [0, 0]},
                         "base_lm.layers.0.self_attn.q_proj.lora_B": {"dtype": "F32", "shape": [8, 4],
                                                                        "data_offsets": [0, 0]}}).encode()
    for name in ("plain", "run|1/checkpoints/step_0000200"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "lora_weights.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    catalog = LoRACatalog(tmp_path)
    keys = [adapter_key_str(catalog.resolve(name)) for name in ("plain", "run|1/checkpoints/step_0000200")]
    outside = keys[0].replace(str(tmp_path.resolve()), "/elsewhere", 1)
    assert catalog.names_of_keys([*keys, outside]) == ["plain", "run|1/checkpoints/step_0000200"]
