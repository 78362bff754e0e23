"""Prometheus metrics and readiness: `PrometheusEvents`, the request-counting middleware, GET /metrics, GET /ready.

Nothing here exists at import time: `create_app` builds one `PrometheusEvents` per app, and each owns
its own `CollectorRegistry`, so two apps in one process never share or clash over series.

Two kinds of series:
- **event series** (requests, TTFB, RTF, audio seconds, generations) are counted in this process as
  the middleware and the task runner report them through the `Events` protocol (tasks/events.py);
- **scrape-time series** are read when /metrics is scraped: queue depth and running rows from the
  shared SQLite store (so any worker process reports the same truth), model readiness, and adapter
  loads/evictions from the engine owner's LoRA runtime (this process's engine only; 0 series elsewhere).

Label cardinality is bounded: `endpoint` is a route template (or "unmatched"), `status` a class
(2xx…5xx), `kind` task|stream, `outcome` completed|failed|cancelled. `lora` values are adapter names
("base" for the base model; a saved voice's requests carry the voice's adapter), which only reach the
runner after the catalog validated them against --lora-dir, and `voice` values are saved voices; as a
guard against an unbounded directory each of those labels keeps at most `MAX_LABEL_VALUES` distinct
values per app and reports any further ones as "other".

Per adapter (`lora`): generations started and finished by kind and outcome, generation errors, audio
seconds, time-to-first-audio and real-time-factor histograms (event series); adapter loads, evictions
and GPU-slot residency (scrape-time series, engine owner only).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..domain import TaskStatus
from ..lora.catalog import is_base_model_name

if TYPE_CHECKING:
    from ..tasks.service import TaskService

log = logging.getLogger("voxcpm_api.metrics")

NONE_LABEL = "none"  # no saved voice
BASE_LABEL = "base"  # the `lora` label of the base model (no adapter)
OTHER_LABEL = "other"  # label values beyond MAX_LABEL_VALUES
UNMATCHED_ENDPOINT = "unmatched"  # requests no route matches (404s): never the raw path
CLIENT_GONE_STATUS = 499  # the client disconnected before any response started (nginx's convention)
# Distinct values one app keeps for each of the `lora` and `voice` labels (the base model and "none"
# not counted); later adapters or voices are all reported as "other", so a LoRA directory with
# thousands of adapters cannot blow up the series count (README_API.md, "Readiness and metrics").
MAX_LABEL_VALUES = 200

TTFB_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class _BoundedLabel:
    """Maps label values to themselves until `limit` distinct ones were seen, then to "other".

    Empty values are "none"; with `base_model` (the `lora` label) every name of the base model
    (None, "", "none", "base", ...) is "base". Neither takes one of the `limit` places.
    """

    def __init__(self, limit: int = MAX_LABEL_VALUES, *, base_model: bool = False) -> None:
        self._limit = limit
        self._base_model = base_model
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        if self._base_model and is_base_model_name(value):
            return BASE_LABEL
        if not value:
            return NONE_LABEL
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        return OTHER_LABEL


class PrometheusEvents:
    """The `Events` sink of one app, on its own registry. Thread-safe (prometheus_client metrics are)."""

    def __init__(self, registry: CollectorRegistry | None = None, label_limit: int = MAX_LABEL_VALUES) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._lora = _BoundedLabel(label_limit, base_model=True)
        self._voice = _BoundedLabel(label_limit)
        r = self.registry
        self.requests = Counter("voxcpm_requests", "HTTP requests answered, by route template and status class.",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("voxcpm_request_errors", "HTTP requests answered with a 4xx or 5xx status.",
                              ["endpoint", "status"], registry=r)
        gen = ["kind", "lora", "voice"]
        self.started = Counter("voxcpm_generations_started", "Generations started, by kind (task or stream), "
                               "adapter (base: the base model) and saved voice.", gen, registry=r)
        self.generations = Counter("voxcpm_generations", "Generations finished, by kind, outcome "
                                   "(completed, failed, cancelled), adapter and saved voice.",
                                   ["kind", "outcome", "lora", "voice"], registry=r)
        self.generation_errors = Counter("voxcpm_generation_errors", "Generations that failed (engine error, "
                                         "adapter that no longer fits, unreadable reference audio...), by kind "
                                         "and adapter.", ["kind", "lora"], registry=r)
        self.ttfb = Histogram("voxcpm_time_to_first_audio_seconds", "From the request's arrival to its first audio "
                              "(first patch for tasks, first byte for streams).", gen, buckets=TTFB_BUCKETS_S,
                              registry=r)
        self.rtf = Histogram("voxcpm_real_time_factor", "Wall seconds per second of audio of completed "
                             "generations (below 1 is faster than real time).", gen, buckets=RTF_BUCKETS, registry=r)
        self.audio_seconds = Counter("voxcpm_audio_seconds", "Seconds of audio produced (partial audio of "
                                     "cancelled streams included), by kind, adapter and saved voice.", gen,
                                     registry=r)

    # ---- the Events protocol --------------------------------------------------------------------

    def request_finished(self, endpoint: str, status_code: int) -> None:
        status = f"{status_code // 100}xx"
        self.requests.labels(endpoint, status).inc()
        if status_code >= 400:
            self.errors.labels(endpoint, status).inc()

    def generation_started(self, kind: str, lora: str | None, voice: str | None) -> None:
        self.started.labels(kind, self._lora(lora), self._voice(voice)).inc()

    def first_audio(self, kind: str, seconds: float, lora: str | None, voice: str | None) -> None:
        self.ttfb.labels(kind, self._lora(lora), self._voice(voice)).observe(max(0.0, seconds))

    def generation_finished(self, kind: str, outcome: str, audio_s: float, wall_s: float, lora: str | None,
                            voice: str | None) -> None:
        labels = (kind, self._lora(lora), self._voice(voice))
        self.generations.labels(kind, outcome, *labels[1:]).inc()
        if outcome == "failed":
            self.generation_errors.labels(kind, labels[1]).inc()
        if audio_s > 0:
            self.audio_seconds.labels(*labels).inc(audio_s)
            if outcome == "completed":
                self.rtf.labels(*labels).observe(max(0.0, wall_s) / audio_s)

    # ---- exposition -----------------------------------------------------------------------------

    def render(self, service: TaskService | None) -> bytes:
        """The text exposition: this app's event series plus the scrape-time series of `service`."""
        return generate_latest(_Scrape(self.registry, ServiceCollector(service, self._lora)))  # type: ignore[arg-type]


class _Scrape:
    """Registry-like object for `generate_latest`: one app's registry plus its scrape-time collector."""

    def __init__(self, registry: CollectorRegistry, extra: ServiceCollector) -> None:
        self._registry = registry
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()
        yield from self._extra.collect()


# BatchedEngine.stats() counters exported as they are (summed over the engines of a pool).
ENGINE_COUNTERS = (
    ("steps", "voxcpm_engine_decode_steps", "Batched decode steps run (each advances every running row one patch)."),
    ("rows_stepped", "voxcpm_engine_rows_stepped", "Rows advanced, summed over decode steps (÷ steps = mean "
     "batch occupancy)."),
    ("prefills", "voxcpm_engine_prefills", "Prompts prefilled into a batch row."),
    ("adapter_slot_loads", "voxcpm_engine_adapter_slot_loads", "LoRA adapters copied into a GPU slot."),
    ("oom_recoveries", "voxcpm_engine_oom_recoveries", "Out-of-memory errors the batched engine recovered from."),
)


class ServiceCollector:
    """Series read at scrape time: the store's queue, readiness, and the owner engine's adapter counters."""

    def __init__(self, service: TaskService | None, lora_label: _BoundedLabel | None = None) -> None:
        self._service = service
        self._lora = lora_label or _BoundedLabel(base_model=True)

    def collect(self) -> Iterable[Metric]:
        service = self._service
        if service is None:  # the app has not started yet
            return []
        queue = GaugeMetricFamily("voxcpm_queue_depth", "Tasks waiting for the engine (pending), all workers.")
        queue.add_metric([], service.store.count(TaskStatus.PENDING))
        running = GaugeMetricFamily("voxcpm_running_tasks", "Tasks being generated or encoded (processing), "
                                    "all workers.")
        running.add_metric([], service.store.count(TaskStatus.PROCESSING))
        ready = service.readiness()
        loaded = GaugeMetricFamily("voxcpm_model_loaded", "1 when the model is loaded and an engine owner is alive.")
        loaded.add_metric([], 1.0 if ready.model_loaded else 0.0)
        owner = GaugeMetricFamily("voxcpm_engine_owner", "1 in the process that owns the engine.")
        owner.add_metric([], 1.0 if service.runner is not None else 0.0)
        metrics: list[Metric] = [queue, running, loaded, owner]
        stats = _engine_stats(service)
        for key, name, doc in (("adapter_loads", "voxcpm_adapter_loads",
                                "LoRA adapter loads by adapter, this process: copies into a GPU slot (batched "
                                "engine) or reads from disk into the resident cache (official engine)."),
                               ("adapter_evictions", "voxcpm_adapter_evictions",
                                "LoRA adapters evicted by adapter, this process: from a GPU slot (batched "
                                "engine) or from the resident LRU cache (official engine).")):
            family = CounterMetricFamily(name, doc, labels=["lora"])
            totals: dict[str, float] = {}
            for adapter, count in stats.get(key, {}).items():
                label = self._lora(adapter)
                totals[label] = totals.get(label, 0.0) + float(count)
            for label, value in sorted(totals.items()):
                family.add_metric([label], value)
            metrics.append(family)
        resident = stats.get("resident_adapters")
        if resident is not None:  # a ConcurrentEngine (batched engine, pool): adapters in its GPU slots now
            gauge = GaugeMetricFamily("voxcpm_adapter_resident", "1 for each LoRA adapter resident in a GPU slot "
                                      "of this process's batched engine(s) now (absent: not resident; "
                                      "\"other\": how many of those beyond the label limit are).", labels=["lora"])
            counts: dict[str, float] = {}
            for adapter in resident:
                label = self._lora(adapter)
                counts[label] = counts.get(label, 0.0) + 1.0
            for label, count in sorted(counts.items()):
                gauge.add_metric([label], count)
            metrics.append(gauge)
        rows = stats.get("batch_rows")
        if rows:  # a batched engine (or a pool of them) in this process
            gauge = GaugeMetricFamily("voxcpm_batch_rows", "Batch rows of the batched engine(s) now: running, "
                                      "queued for a row, and the most one decode step holds (max).", labels=["state"])
            for state in ("running", "queued", "max"):
                gauge.add_metric([state], float(rows.get(state, 0)))
            metrics.append(gauge)
        counters = stats.get("engine_counters") or {}
        for key, name, doc in ENGINE_COUNTERS:
            if key in counters:
                family = CounterMetricFamily(name, doc)
                family.add_metric([], float(counters[key]))
                metrics.append(family)
        phases = {k[: -len("_ms_total")]: v for k, v in counters.items() if k.endswith("_ms_total")}
        if phases:  # where the batched engine's threads spend their time (the loop's idle share included)
            family = CounterMetricFamily("voxcpm_engine_phase_seconds", "Seconds the batched engine spent per "
                                         "phase: decode steps, their row callbacks, prefills, adapter slot loads "
                                         "and idle waits (loop thread), request preparation (callers' threads), "
                                         "AudioVAE decodes (decode thread).", labels=["phase"])
            for phase, total_ms in sorted(phases.items()):
                family.add_metric([phase], float(total_ms) / 1000.0)
            metrics.append(family)
        placements = stats.get("engine_placements")
        if placements:
            family = CounterMetricFamily("voxcpm_engine_placements", "Generations placed on each engine of a "
                                         "multi-device pool (by LoRA affinity, then load).", labels=["engine"])
            for engine, count in sorted(placements.items(), key=lambda kv: int(kv[0])):
                family.add_metric([engine], float(count))
            metrics.append(family)
        return metrics


def _engine_stats(service: TaskService) -> dict[str, dict[str, float]]:
    runner = service.runner
    stats = getattr(runner, "engine_stats", None)
    if stats is None:
        return {}
    try:
        return stats()  # type: ignore[no-any-return]
    except Exception:  # a scrape must never fail because the engine is mid-change
        return {}


# ---- middleware ----------------------------------------------------------------------------------


class RequestMetricsMiddleware:
    """Pure ASGI: reports `request_finished(route template, status)` for every HTTP request.

    Outermost, so requests refused before routing (401 from the API key check, CORS preflights) are
    counted too; their template is then found by matching the app's route templates, never the raw path.
    """

    def __init__(self, app: ASGIApp, events: object) -> None:
        self.app = app
        self.events = events
        self._templates: list[tuple[re.Pattern[str], str, frozenset[str]]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            self._report(scope, status[0] if status else 500)
            raise
        self._report(scope, status[0] if status else CLIENT_GONE_STATUS)

    def _report(self, scope: Scope, status_code: int) -> None:
        try:
            self.events.request_finished(self.endpoint_template(scope), status_code)  # type: ignore[attr-defined]
        except Exception:  # metrics must never break a response
            log.debug("request metrics failed", exc_info=True)

    def endpoint_template(self, scope: Scope) -> str:
        """The route template ("/task/{task_id}") of a request, or "unmatched"; bounded by the app's routes."""
        path = getattr(scope.get("route"), "path", None)  # set by the router when it routed the request
        if isinstance(path, str) and path:
            return path
        # Not routed (refused earlier, or no route): match the templates the app declares.
        route_path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and route_path.startswith(root):
            route_path = route_path[len(root):]
        method = scope.get("method", "GET")
        fallback = None
        for regex, template, methods in self._route_templates(scope.get("app")):
            if regex.match(route_path):
                if not methods or method in methods:
                    return template
                fallback = fallback or template  # a 405 still has a template
        return fallback or UNMATCHED_ENDPOINT

    def _route_templates(self, app: object) -> list[tuple[re.Pattern[str], str, frozenset[str]]]:
        """Templates of the app's plain routes and of every operation in its OpenAPI schema (computed once)."""
        if self._templates is not None:
            return self._templates
        templates: list[tuple[re.Pattern[str], str, frozenset[str]]] = []
        for route in getattr(app, "routes", ()):
            path = getattr(route, "path", None)
            if isinstance(path, str) and path:
                templates.append((compile_path(path)[0], path, frozenset(getattr(route, "methods", None) or ())))
        try:
            paths = app.openapi().get("paths", {})  # type: ignore[attr-defined]
        except Exception:
            paths = {}
        for path, operations in paths.items():
            methods = frozenset(m.upper() for m in operations)
            templates.append((compile_path(path)[0], path, methods | ({"HEAD"} if "GET" in methods else set())))
        self._templates = templates
        return templates


# ---- routes --------------------------------------------------------------------------------------

router = APIRouter()


class ReadyView(BaseModel):
    ready: bool
    reason: str | None = None
    model: str | None = None
    engine_owner: bool = False


@router.get("/ready", response_model=ReadyView, tags=["service"],
            responses={503: {"model": ReadyView, "description": "Not ready: loading, failed, or no engine owner"}})
async def ready(request: Request) -> JSONResponse:
    """Readiness probe: 200 only when the model is loaded and can take work, else 503 with the reason.
    Unlike /health (liveness: 200 while the process is up), load balancers should route on this."""
    service: TaskService | None = getattr(request.app.state, "service", None)
    if service is None:
        return _ready_response(False, "the server is starting")
    state = await asyncio.to_thread(service.readiness)
    info = state.info
    model = info.model_id if info else service.settings.model
    if state.model_loaded:
        return _ready_response(True, None, model, state.engine_owner)
    if state.error:
        reason = f"the model failed to load: {state.error}"
    elif state.engine_owner or state.owner_pid is not None:
        reason = "the model is loading"
    else:
        reason = "no engine owner is running (waiting for a worker to take over)"
    return _ready_response(False, reason, model, state.engine_owner)


def _ready_response(is_ready: bool, reason: str | None, model: str | None = None,
                    engine_owner: bool = False) -> JSONResponse:
    body = ReadyView(ready=is_ready, reason=reason, model=model, engine_owner=engine_owner)
    return JSONResponse(status_code=200 if is_ready else 503, content=body.model_dump(),
                        headers=None if is_ready else {"Retry-After": "2", "Cache-Control": "no-store"})


@router.get("/metrics", tags=["service"], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    """Prometheus text exposition (series list in README_API.md). Open like /health; see README_API.md."""
    events = getattr(request.app.state, "events", None)
    if not isinstance(events, PrometheusEvents):
        return JSONResponse(status_code=404, content={"detail": "metrics are off: this app was given its own "
                                                                "events sink"})
    service = getattr(request.app.state, "service", None)
    body = await asyncio.to_thread(events.render, service)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})
