"""`create_app(settings, engine=..., store=...)`: no import-time state; everything is built here."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .. import __version__
from ..config import Settings
from ..engine.base import Engine
from ..errors import VoxError
from ..lora.catalog import AdapterSpec, LoRACatalog
from ..tasks.events import Events
from ..tasks.ownership import EngineLock
from ..tasks.runner import EngineRunner, RunnerConfig
from ..tasks.service import TaskService
from ..tasks.store import TaskStore
from .auth import ApiKeyMiddleware
from .docs import install_docs
from .errors import install_error_handlers
from .metrics import PrometheusEvents, RequestMetricsMiddleware, router as metrics_router
from .playground import router as playground
from .openai_routes import router as openai_router
from .routes import protected, public
from .stream_routes import router as stream_router
from .voices_routes import router as voices_router

log = logging.getLogger("voxcpm_api")
OWNER_RETRY_INTERVAL_S = 2.0
IO_THREADS = 64  # the event loop's default executor

DESCRIPTION = """
Text-to-speech with OpenBMB VoxCPM and hot-switched LoRA adapters.

* **POST /synthesize** queues a task (or, with `async_mode: false`, waits for the file);
  poll **GET /task/{task_id}** for real progress, then **GET /download/{filename}**.
* Reference audio for cloning is named relative to `--ref-audio-dir`, or uploaded to
  **POST /synthesize/upload**.
* With `--api-key`, send `Authorization: Bearer <key>` (or `X-API-Key`) on every route but /health.
"""


def default_engine_factory(settings: Settings) -> Callable[[], Engine]:
    """What the engine owner builds (in its engine thread): one official VoxCPMEngine, one BatchedEngine,
    or an EnginePool of one BatchedEngine per device. Imports happen inside `build`, so worker processes
    that never own the engine never import torch."""

    def build() -> Engine:
        cache_dir = settings.effective_cache_dir
        if settings.engine == "official":
            from ..engine.voxcpm_engine import EngineConfig, VoxCPMEngine

            devices = settings.engine_devices
            return VoxCPMEngine(EngineConfig(model=settings.model, device=devices[0] if devices else "auto",
                                             compile=settings.effective_compile, cache_dir=cache_dir,
                                             lora_cache_size=settings.lora_cache_size,
                                             feature_cache_dir=cache_dir / "prompt_features"))
        from ..engine.batched.engine import BatchedConfig, BatchedEngine

        devices = settings.engine_devices or visible_devices()
        rows = settings.rows_per_engine(len(devices))
        preload = preload_specs(LoRACatalog(settings.lora_dir), settings.lora_slots)
        engines = [BatchedEngine(BatchedConfig(model=settings.model, device=device, max_rows=rows,
                                               lora_slots=settings.lora_slots, max_seq_len=settings.max_seq_len,
                                               cuda_graphs=settings.cuda_graphs, compile=settings.effective_compile,
                                               cache_dir=cache_dir,
                                               feature_cache_dir=cache_dir / "prompt_features",
                                               lora_cache_size=settings.lora_cache_size,
                                               preload_adapters=preload))
                   for device in devices]
        log.info("batched engine: %s row(s) on each of %s", rows if rows is not None else "auto", ", ".join(devices))
        if len(engines) == 1:
            return engines[0]
        from ..engine.pool import EnginePool

        return EnginePool(engines)

    return build


def preload_specs(catalog: LoRACatalog, count: int) -> tuple[AdapterSpec, ...]:
    """The first `count` adapters of the LoRA folder that resolve (a GPU engine puts them into its slots at
    load, so the first requests using them change no captured graph); broken ones are left to requests,
    which get the 4xx naming the problem."""
    specs: list[AdapterSpec] = []
    for name in catalog.list_names():
        if len(specs) >= count:
            break
        try:
            specs.append(catalog.resolve(name))
        except VoxError as exc:
            log.warning("adapter %s is not preloaded: %s", name, exc.message)
    return tuple(specs)


def visible_devices() -> list[str]:
    """--devices auto: every CUDA GPU this process can see, else the CPU (imports torch: owner only)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def create_app(settings: Settings, *, engine: Engine | None = None, store: TaskStore | None = None,
               events: Events | None = None) -> FastAPI:
    engine_factory = (lambda: engine) if engine is not None else default_engine_factory(settings)
    sink: Events = events if events is not None else PrometheusEvents()  # per app: its own registry

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # asyncio.to_thread's pool (validation, SQLite, encoding, file writes): the default, cpu_count + 4 threads,
        # queued quick store reads behind encodes and fsyncs once dozens of requests were in flight
        io_pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="io")
        asyncio.get_running_loop().set_default_executor(io_pool)
        settings.output_dir.mkdir(parents=True, exist_ok=True)
        task_store = store or TaskStore(settings.database_path)
        catalog = LoRACatalog(settings.lora_dir)
        service = TaskService(settings, task_store, catalog)
        app.state.service = service
        lock = EngineLock(settings.output_dir / ".engine.lock")
        _warn_if_open(settings)
        election = asyncio.create_task(_become_owner(service, lock, engine_factory, settings, sink))
        try:
            yield
        finally:
            election.cancel()
            await asyncio.gather(election, return_exceptions=True)
            if service.runner is not None:
                await service.runner.stop()
            lock.release()
            if store is None:
                task_store.close()
            io_pool.shutdown(wait=False, cancel_futures=True)

    # /docs and /redoc come from api/docs.py: the same URLs, their assets served by this server (no CDN)
    app = FastAPI(title="VoxCPM LoRA TTS API", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    install_error_handlers(app)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.cors_origins:  # added last = outermost, so even a 401 carries CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Retry-After", "Content-Disposition"])
    app.state.events = sink  # GET /metrics renders it when it is a PrometheusEvents
    app.add_middleware(RequestMetricsMiddleware, events=sink)  # outermost: counts 401s and preflights too
    app.include_router(public)
    app.include_router(protected)
    app.include_router(stream_router)
    app.include_router(openai_router)
    app.include_router(voices_router)
    app.include_router(metrics_router)
    app.include_router(playground)
    install_docs(app, api_key=bool(settings.api_key))
    return app


async def _become_owner(service: TaskService, lock: EngineLock, engine_factory: Callable[[], Engine],
                        settings: Settings, events: Events) -> None:
    """Take the engine lock as soon as it is free (at once, or when the owner process dies)."""
    while not lock.try_acquire():
        await asyncio.sleep(OWNER_RETRY_INTERVAL_S)
    runner = EngineRunner(
        engine_factory, service.store, service.catalog,
        RunnerConfig(output_dir=settings.output_dir, max_concurrent=settings.max_concurrent,
                     max_attempts=settings.max_attempts, chunk_max_chars=settings.chunk_max_chars,
                     cleanup_interval_s=settings.cleanup_interval_s),
        cleanup=service.cleanup_blocking, events=events,
    )
    service.runner = runner
    await runner.start()
    await service.voices.precompute_all()  # saved voices' prompt features for this model (disk hits are cheap)


def _warn_if_open(settings: Settings) -> None:
    if settings.api_key:
        return
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    if not loopback:
        log.warning("no --api-key set and listening on %s: anyone on the network can use this server", settings.host)


def app_from_env() -> FastAPI:
    """Factory for uvicorn's --workers/--reload modes: each process rebuilds Settings from env twins."""
    return create_app(Settings())
