"""Targets and the Markdown report of bench/bench_serve.py (pure functions of the results dict)."""

from __future__ import annotations

from typing import Any

CLIENT_BUSY_CORES = 0.8  # an asyncio load generator busier than this is close to its one core
CLIENT_LAG_MS = 20.0  # a 10 ms sleep waking this late means responses waited too
# key -> (what, operator, goal per model or for all; None: reported without a goal)
TARGETS: dict[str, tuple[str, str, dict[str, float] | float | None]] = {
    "served_vs_engine_c64": ("served 64 clients (8 adapters + base) / engine 64 rows with 8 adapters", ">=", 0.90),
    "served_vs_official_c64": ("served 64 clients / official compiled serial", ">=",
                               {"voxcpm1.5": 70.0, "voxcpm2": 60.0}),
    "served_vs_official_c128": ("served 128 clients / official compiled serial", ">=", {"voxcpm1.5": 100.0}),
    "single_rtf_vs_official": ("one client: served RTF p50 / official compiled RTF p50", "<=", 0.4),
    "stream_ttfb_p50_c1_ms": ("stream TTFB p50 at 1 client, ms", "<=", 50.0),
    "stream_ttfb_p99_c64_ms": ("stream TTFB p99 at 64 clients, ms", "<=", 300.0),
    "mix_vs_base_slowdown_c64": ("8-adapter mix vs base model only at 64 clients: slowdown", "<=", 0.10),
    "start_to_ready_defaults_s": ("start to ready with the defaults (process start -> GET /ready 200), s", "<=", 30.0),
    "first_burst_vs_steady": ("first burst right after ready / steady 64-client throughput", ">=", 0.8),
    "zero_errors": ("request errors (non-2xx, exceptions, unfinished), every step within the SLO", "<=", 0.0),
}


def _goal(key: str, model: str) -> float | None:
    goal = TARGETS[key][2]
    return goal.get(model) if isinstance(goal, dict) else goal


def primary_profile(data: dict) -> tuple[str | None, dict]:
    """The profile the served targets read: `best` when it measured anything, else the first that did."""
    profiles = data.get("profiles") or {}
    order = (["best"] if "best" in profiles else []) + [p for p in profiles if p != "best"]
    for name in order:
        if (profiles[name].get("steps") or {}).get("closed"):
            return name, profiles[name]
    return None, {}


def _get(entry: dict, *path: str) -> Any:
    for key in path:
        entry = (entry or {}).get(key) if isinstance(entry, dict) else None
    return entry


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def count_errors(data: dict) -> tuple[int, int]:
    """(errors in steps within the SLO, errors in open-loop rates that missed it: overload, not counted)."""
    counted = beyond = 0
    for prof in (data.get("profiles") or {}).values():
        steps = prof.get("steps") or {}
        for key, value in steps.items():
            if key == "open":
                for row in value.get("rates", []):
                    if row.get("slo_met"):
                        counted += row.get("errors") or 0
                    else:
                        beyond += row.get("errors") or 0
            elif isinstance(value, dict) and "errors" in value:
                counted += value["errors"] or 0
            elif isinstance(value, dict):
                counted += sum((v.get("errors") or 0) for v in value.values() if isinstance(v, dict))
    return counted, beyond


def compute_targets(data: dict) -> dict:
    model = data.get("model", "")
    name, prof = primary_profile(data)
    steps = prof.get("steps") or {}
    eng = data.get("engine") or {}
    serial, off_rtf = eng.get("official_serial_audio_s_per_s"), eng.get("official_compiled_rtf_p50")
    c64 = _get(steps, "closed", "c64", "throughput_audio_s_per_s")
    c128 = _get(steps, "closed", "c128", "throughput_audio_s_per_s")
    base64 = _get(steps, "base", "c64", "throughput_audio_s_per_s")
    burst = _get(steps, "burst", "throughput_audio_s_per_s")
    c1_rtf = _get(steps, "closed", "c1", "rtf_p50")
    at = f"profile {name}" if name else "no profile measured"
    errors, beyond = count_errors(data)
    values = {
        "served_vs_engine_c64": (_ratio(c64, eng.get("ours_c64_lora8_audio_s_per_s")),
                                 f"{at} c64 {c64} / engine c64-lora8 {eng.get('ours_c64_lora8_audio_s_per_s')}"),
        "served_vs_official_c64": (_ratio(c64, serial), f"{at} c64 {c64} / official serial {serial} audio s/s"),
        "served_vs_official_c128": (_ratio(c128, serial), f"{at} c128 {c128} / official serial {serial} audio s/s"),
        "single_rtf_vs_official": (_ratio(c1_rtf, off_rtf), f"{at} c1 RTF p50 {c1_rtf} / official {off_rtf}"),
        "stream_ttfb_p50_c1_ms": (_get(steps, "stream", "c1", "ttfb_ms_p50"), f"{at}, POST /synthesize/stream"),
        "stream_ttfb_p99_c64_ms": (_get(steps, "stream", "c64", "ttfb_ms_p99"), f"{at}, POST /synthesize/stream"),
        "mix_vs_base_slowdown_c64": (None if _ratio(base64, c64) is None else base64 / c64 - 1.0,
                                     f"{at}: base only {base64} vs mix {c64} audio s/s"),
        "start_to_ready_defaults_s": (_get(data, "profiles", "defaults", "start_to_ready_s"), "profile defaults"),
        "first_burst_vs_steady": (_ratio(burst, c64), f"{at}: burst {burst} / c64 {c64} audio s/s"),
        "zero_errors": (float(errors) if data.get("profiles") else None,
                        f"{errors} in all profiles' steps; {beyond} more in open-loop rates over the SLO"),
    }
    out = {}
    for key, (value, basis) in values.items():
        what, op, _ = TARGETS[key]
        goal = _goal(key, model)
        met = None if value is None or goal is None else (value <= goal if op == "<=" else value >= goal)
        out[key] = {"what": what, "value": None if value is None else round(value, 4),
                    "goal": None if goal is None else f"{op} {goal:g}", "met": met, "basis": basis}
    return out


# --------------------------------------------------------------------------------------------- #
# Markdown
# --------------------------------------------------------------------------------------------- #


def _f(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value}{unit}"


def _pair(a: Any, b: Any) -> str:
    return f"{_f(a)} / {_f(b)}"


def render_markdown(data: dict) -> str:
    s, env = data.get("settings") or {}, data.get("env") or {}
    v = env.get("versions") or {}
    date = (f"- date: {data.get('date')}; git commit {data.get('git_commit')}; elapsed {data.get('elapsed_s')} s; "
            f"complete: {_f(data.get('complete'))}")
    versions = (f"- versions: python {v.get('python')}, torch {v.get('torch')}, voxcpm {v.get('voxcpm')}, fastapi "
                f"{v.get('fastapi')}, uvicorn {v.get('uvicorn')} (httptools {v.get('httptools')}), httpx "
                f"{v.get('httpx')}, uvloop {v.get('uvloop')}; host CPU {env.get('host_cpu')} x{env.get('host_cpus')}")
    request = (f"- each request: {s.get('text_tokens')} text tokens -> {s.get('patches_per_request')} patches = "
               f"{s.get('audio_s_per_request')} s of audio (random weights, stop head zeroed), WAV; a distinct text "
               "per request; adapters round-robin over the 8 and the base model unless said otherwise")
    load = (f"- load: bench/serve_load.py, one process per step (asyncio + httpx); closed loops skip the first "
            f"{s.get('warmup_s')} s and measure {s.get('duration_s')} s (streams {s.get('ttfb_duration_s')} s); "
            "throughput = audio of the requests in flight in the window, each prorated by its share of time inside it, / the window; "
            "latency = request sent -> last byte; TTFB = request sent -> first body byte; RTF = latency / audio; "
            "errors over the whole step; cores = CPU seconds per wall second over the window")
    lines = [f"# Served-product benchmark: {data.get('model_label')} on {data.get('device_name')}", "",
             f"- command: `{data.get('command')}`", date, versions, request, load, "",
             "## Targets", "", "| target | value | goal | met | basis |", "|---|---|---|---|---|"]
    for t in (data.get("targets") or {}).values():
        lines.append(f"| {t['what']} | {_f(t['value'])} | {_f(t['goal'])} | {_f(t['met'])} | {t['basis']} |")
    lines.append("")
    lines += _engine_section(data.get("engine"))
    for name, prof in (data.get("profiles") or {}).items():
        lines += _profile_section(name, prof)
    for section in ("skipped", "errors", "notes"):
        if data.get(section):
            lines += [f"## {section.capitalize()}", "", *[f"- {m}" for m in data[section]], ""]
    return "\n".join(lines)


def _engine_section(eng: dict | None) -> list[str]:
    if not eng:
        return []
    rows = [
        (f"official compiled RTF p50 (compiled: {_f(eng.get('official_compiled_effective'))})",
         _f(eng.get("official_compiled_rtf_p50"))),
        (f"official serial ({eng.get('official_serial_mode')}), audio s per s",
         _f(eng.get("official_serial_audio_s_per_s"))),
        ("our engine, 64 rows, no adapter / 8 adapters, audio s per s",
         _pair(eng.get("ours_c64_lora0_audio_s_per_s"), eng.get("ours_c64_lora8_audio_s_per_s"))),
        ("our engine construct -> ready, s", _f(eng.get("ours_construct_to_ready_s"))),
    ]
    return ["## Engine baseline (bench/bench_engine.py in the same run)", "", f"- command: `{eng.get('command')}`",
            f"- report: {eng.get('report')}; exit {eng.get('rc')}; {eng.get('wall_s')} s", "",
            "| measure | value |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows], ""]


ROW_HEAD = ("| step | clients | requests | audio s per s | req/s | latency p50 / p99 ms | TTFB p50 / p99 ms | "
            "RTF p50 / p99 | errors | server cores | client cores / loop lag p99 ms | GPU util mean / max % | "
            "GPU MiB |")


def _row(step: str, e: dict) -> str:
    cells = [step, _f(e.get("clients", e.get("requests_sent"))), _f(e.get("requests")),
             _f(e.get("throughput_audio_s_per_s")), _f(e.get("requests_per_s")),
             _pair(e.get("latency_ms_p50"), e.get("latency_ms_p99")), _pair(e.get("ttfb_ms_p50"), e.get("ttfb_ms_p99")),
             _pair(e.get("rtf_p50"), e.get("rtf_p99")), _f(e.get("errors")), _f(e.get("server_cores")),
             _pair(e.get("client_cores"), e.get("client_loop_lag_ms_p99")),
             _pair(e.get("gpu_util_mean"), e.get("gpu_util_max")), _f(e.get("gpu_mem_max_mib"))]
    return "| " + " | ".join(cells) + " |"


def _profile_section(name: str, prof: dict) -> list[str]:
    steps = prof.get("steps") or {}
    flags = " ".join(prof.get("flags") or []) or "(none)"
    light = " (light: start, burst, 64 clients)" if prof.get("light") else ""
    lines = [f"## Profile `{name}`: flags `{flags}`{light}", "", f"- command: `{prof.get('command')}`",
             f"- start to ready: {_f(prof.get('start_to_ready_s'), ' s')}; server log: {prof.get('log')}", ""]
    rows = []
    if steps.get("burst"):
        rows.append(_row("first burst (sync, all at once; over its whole wall)", steps["burst"]))
    groups = (("closed", "closed loop, sync, 8 adapters + base"), ("base", "closed loop, sync, base only"),
              ("stream", "closed loop, streams (TTFB)"))
    for group, label in groups:
        rows += [_row(label, e) for e in (steps.get(group) or {}).values()]
    if steps.get("mix"):
        rows.append(_row(f"mix ({', '.join(steps['mix'].get('kinds', []))})", steps["mix"]))
    if rows:
        lines += [ROW_HEAD, "|" + "---|" * 13, *rows, "", _client_line(steps), ""]
    if steps.get("mix"):
        lines += _mix_section(steps["mix"])
    if steps.get("open"):
        lines += _open_section(steps["open"])
    if prof.get("died"):
        lines += [f"The server died (exit {prof['died'].get('returncode')}); the end of its log:", "", "```",
                  *prof["died"].get("log_tail", []), "```", ""]
    return lines


def _client_line(steps: dict) -> str:
    """The evidence that the load generator did not limit the numbers: one asyncio thread near a whole core,
    or an event loop that wakes tens of ms late, would hold every response back."""
    rows = [steps.get("burst") or {}, steps.get("mix") or {}, *(steps.get("open") or {}).get("rates", [])]
    for group in ("closed", "base", "stream"):
        rows += list((steps.get(group) or {}).values())
    cores = [r["client_cores"] for r in rows if r.get("client_cores") is not None]
    lags = [r["client_loop_lag_ms_p99"] for r in rows if r.get("client_loop_lag_ms_p99") is not None]
    if not cores:
        return "Load generator: no measurement."
    bound = max(cores) > CLIENT_BUSY_CORES or (lags and max(lags) > CLIENT_LAG_MS)
    return (f"Load generator (one asyncio thread per step): at most {max(cores)} cores, event-loop lag p99 at most "
            f"{max(lags) if lags else '—'} ms: " + ("**it may have limited these numbers**" if bound else
                                                    "not the bottleneck"))


def _mix_section(mix: dict) -> list[str]:
    voice = mix.get("voice") or {}
    used = "used" if voice.get("usable") else f"not used: {voice.get('reason')}"
    lines = [f"Mix at {mix.get('clients')} clients, by kind (saved voice: {used}):", "",
             "| kind | requests | errors | latency p50 / p99 ms | TTFB p50 / p99 ms | RTF p50 |", "|" + "---|" * 6]
    for kind, e in (mix.get("by_kind") or {}).items():
        lines.append(f"| {kind} | {e.get('requests')} | {e.get('errors')} | "
                     f"{_pair(e.get('latency_ms_p50'), e.get('latency_ms_p99'))} | "
                     f"{_pair(e.get('ttfb_ms_p50'), e.get('ttfb_ms_p99'))} | {_f(e.get('rtf_p50'))} |")
    return lines + [""]


def _open_section(sweep: dict) -> list[str]:
    slo = sweep.get("slo") or {}
    intro = (f"Open loop, Poisson arrivals, half streams and half sync (requests that arrived in the window; SLO: "
             f"stream TTFB p99 <= {slo.get('stream_ttfb_ms_p99')} ms, latency p99 <= "
             f"{slo.get('latency_over_audio_p99')} x audio, no errors); rates are fractions of the request rate of "
             f"the {sweep.get('guide_from')} loop, {sweep.get('guide_requests_per_s')} requests/s. "
             f"Highest rate within the SLO: **{_f(sweep.get('best_rate_per_s'))} requests/s**")
    head = ("| rate requests/s (arrived) | completed/s | requests | stream TTFB p99 ms | latency p99 ms | RTF p99 | "
            "errors | server cores | client cores | GPU util mean % | SLO |")
    lines = [intro, "", head, "|" + "---|" * 11]
    for r in sweep.get("rates", []):
        lines.append(f"| {r['rate_per_s']} ({_f(r.get('arrivals_per_s'))}) | {_f(r.get('requests_per_s'))} | "
                     f"{r.get('requests')} | "
                     f"{_f(r.get('stream_ttfb_ms_p99'))} | {_f(r.get('latency_ms_p99'))} | {_f(r.get('rtf_p99'))} | "
                     f"{r.get('errors')} | {_f(r.get('server_cores'))} | {_f(r.get('client_cores'))} | "
                     f"{_f(r.get('gpu_util_mean'))} | {'met' if r.get('slo_met') else 'missed'} |")
    return lines + [""]
