"""`python start_api.py [flags]`: parse flags, build Settings once, resolve the model, run uvicorn."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .config import Settings

TINY_MODELS = ("tiny", "tiny-v2")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="start_api.py", description="VoxCPM LoRA TTS API server. Every flag has an env twin VOXCPM_<FLAG>.")
    add = p.add_argument
    add("--host", help="interface to listen on (default 0.0.0.0 = all)")
    add("--port", type=int, help="port (default 8000)")
    add("--dev", action="store_true", default=None, help="auto-reload on code changes")
    add("--workers", type=int, help="HTTP worker processes; one of them owns the model (default 1)")
    add("--log-level", choices=["critical", "error", "warning", "info", "debug", "trace"])
    add("--ssl-keyfile", help="TLS private key (PEM) for HTTPS")
    add("--ssl-certfile", help="TLS certificate (PEM) for HTTPS")
    add("--model", help="local model dir, hub id, or 'tiny' (random weights, makes noise)")
    add("--lora-dir", type=Path, help="LoRA adapters root (default ./lora)")
    add("--output-dir", type=Path, help="audio files and the task database (default ./api_outputs)")
    add("--ref-audio-dir", type=Path, action="append",
        help="allowed root for reference audio; repeatable (default ./reference_audio)")
    add("--device", help="auto | cpu | cuda | cuda:N: one engine on this device (--devices wins when both are given)")
    add("--devices", help="where the engines run: auto (every visible GPU, else cpu; default), a comma list "
        "such as 0,1 or cuda:0,cuda:1 (one batched engine per GPU), or cpu")
    add("--engine", choices=["batched", "official"],
        help="batched: many requests share each decode step (default); official: the official package's "
        "sequential generation, one request at a time")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile on CUDA (default: on for --engine batched, regional, start to ready within ~30 s, "
        "~1.5x throughput; off for --engine official, whose compile takes minutes; --no-compile to turn off)")
    add("--max-concurrent", type=int,
        help="tasks and streams generating at once = batch rows, spread over the devices (default: --engine "
        "batched sizes each GPU's rows from its free memory, 128 on an 80 GB card, and uses 16 on a CPU; "
        "2 for --engine official, which overlaps one generation with encoding)")
    add("--lora-cache-size", type=int,
        help="validated LoRA adapters kept in memory, least recently used dropped first (default 8)")
    add("--lora-slots", type=int, help="GPU-resident LoRA adapter slots per engine, --engine batched (default 8)")
    add("--max-seq-len", type=int,
        help="KV-cache positions per batch row (prompt + generated), --engine batched (default 5120)")
    add("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
        help="capture the batched decode step as CUDA graphs (default on; --no-cuda-graphs to debug)")
    add("--max-queue", type=int, help="pending tasks before 429 (default 1000)")
    add("--max-text-chars", type=int, help="longest accepted text (default 5000)")
    add("--max-upload-bytes", type=int, help="largest uploaded reference audio or saved voice (default 20 MiB)")
    add("--voice-max-duration-s", type=float, help="longest saved voice recording, in seconds (default 60)")
    add("--api-key", help="require this key (Authorization: Bearer / X-API-Key)")
    add("--cors-origins", help="comma-separated origins allowed by CORS (default *; empty string = no CORS)")
    add("--cleanup-interval-s", type=float, help="delete old outputs every N seconds (0 = never)")
    add("--cleanup-max-age-s", type=float, help="age after which the periodic cleanup deletes outputs (3600)")
    add("--cache-dir", type=Path, help="where tiny checkpoints are built (default <output-dir>/.cache)")
    return p


def settings_from_args(argv: list[str] | None) -> tuple[Settings, bool]:
    """Settings plus whether the LoRA dir was chosen explicitly (flag or env)."""
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    lora_dir_given = "lora_dir" in given or "VOXCPM_LORA_DIR" in os.environ
    try:
        return Settings(**given), lora_dir_given
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"error: invalid settings: {problems}") from None


def resolve_model(settings: Settings, lora_dir_given: bool = True) -> Settings:
    """Turn `tiny` or a hub id into a local directory before serving; exit with one clear message on failure."""
    model = settings.model
    if model in TINY_MODELS:
        return _use_tiny(settings, lora_dir_given)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SystemExit(f"error: {path} has no config.json; it does not look like a VoxCPM model directory")
        return settings.model_copy(update={"model": str(path)})
    if path.exists() or model.startswith((".", "/")) or model.count("/") != 1:
        raise SystemExit(f"error: model '{model}' is neither a directory nor a hub id like openbmb/VoxCPM1.5")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=model)
    except Exception as exc:  # any hub failure ends in the same advice
        raise SystemExit(
            f"error: could not download the model '{model}' ({type(exc).__name__}). Download it where you have "
            f"internet (e.g. `huggingface-cli download {model} --local-dir ./models/{model.replace('/', '__')}`), "
            "copy the directory (config.json, model.safetensors or pytorch_model.bin, audiovae.pth, tokenizer "
            f"files) to this machine and start with --model ./models/{model.replace('/', '__')}. "
            "To try the API without weights, use --model tiny."
        ) from None
    return settings.model_copy(update={"model": local})


def _use_tiny(settings: Settings, lora_dir_given: bool) -> Settings:
    from .engine.tiny import build_tiny_checkpoints

    tiny = build_tiny_checkpoints(settings.effective_cache_dir / "tiny")
    arch = "voxcpm2" if settings.model == "tiny-v2" else "voxcpm"
    banner = "!" * 78
    print(f"{banner}\n  --model {settings.model}: RANDOM WEIGHTS in the official format ({tiny.models[arch]}).\n"
          "  It makes NOISE, NOT SPEECH. Use it to try the API offline; pass --model <dir> for real voices.\n"
          f"{banner}", file=sys.stderr)
    update: dict[str, Any] = {"model": str(tiny.models[arch])}
    if not lora_dir_given:
        update["lora_dir"] = tiny.lora_roots[arch]
        print(f"  LoRA adapters of the tiny model: {tiny.lora_roots[arch]}", file=sys.stderr)
    return settings.model_copy(update=update)


def log_config(level: str) -> dict[str, Any]:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["voxcpm_api"] = {"handlers": ["default"], "level": level.upper() if level != "trace" else "DEBUG",
                                       "propagate": False}
    return config


def lan_addresses() -> list[str]:
    addresses: set[str] = set()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it only picks a route
            addresses.add(s.getsockname()[0])
    except OSError:
        pass
    return sorted(a for a in addresses if not a.startswith("127."))


def _devices_shown(settings: Settings) -> str:
    devices = settings.engine_devices
    return "auto" if devices is None else ",".join(devices)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    settings, lora_dir_given = settings_from_args(argv)
    settings = resolve_model(settings, lora_dir_given)
    logging.getLogger("voxcpm_api").setLevel(logging.INFO)
    scheme = "https" if settings.ssl_certfile else "http"
    shown = ["127.0.0.1"] + (lan_addresses() if settings.host in ("0.0.0.0", "::") else [])
    if settings.host not in ("0.0.0.0", "::"):
        shown = [settings.host]
    print(f"VoxCPM API: model={settings.model} engine={settings.engine} devices={_devices_shown(settings)} "
          f"output={settings.output_dir} loras={settings.lora_dir}", file=sys.stderr)
    for host in shown:
        print(f"  {scheme}://{host}:{settings.port}   (docs: {scheme}://{host}:{settings.port}/docs)", file=sys.stderr)
    common: dict[str, Any] = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
                                  log_config=log_config(settings.log_level), ssl_keyfile=settings.ssl_keyfile,
                                  ssl_certfile=settings.ssl_certfile, timeout_graceful_shutdown=30)
    if settings.workers > 1 or settings.dev:
        # Worker/reload processes import the app by name and rebuild Settings from the env twins.
        os.environ.update(settings.to_env())
        reload_dirs = [str(Path(__file__).resolve().parent)] if settings.dev else None  # our code, not cwd
        uvicorn.run("voxcpm_api.api.app:app_from_env", factory=True, workers=settings.workers,
                    reload=settings.dev, reload_dirs=reload_dirs, **common)
    else:
        from .api.app import create_app

        uvicorn.run(create_app(settings), **common)
