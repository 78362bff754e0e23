"""Path traversal corpus (issue 16, item 3): every field and path segment that names a file.

Servers like ours shipped path traversal (Chatterbox PR #147, xtts-api-server PR #61). A
generated corpus of payloads (plain and backslash `..`, absolute and UNC paths, URL-encoded and
double-encoded dots and slashes, NUL bytes, overlong UTF-8, Unicode look-alikes, case variants of
real names, symlinks planted inside the output, LoRA and reference-audio dirs (and the voices dir)
that point outside them, long names, dot segments in the middle, trailing dots and spaces) is sent
to every place a client names a file. For every payload and endpoint:

* the answer is a 4xx (never 2xx, never 5xx) with a JSON message;
* no byte sequence of the secret file (created outside every served root) appears in a body or header;
* "outside" is answered exactly like "absent": a payload aimed at the existing secret file and the
  same payload aimed at a file that does not exist get the same status and the same body (once the
  differing names are mapped onto each other).

Requests are batched per endpoint (one test each) so the whole module stays fast.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.api.conftest import Running, fitting_shapes, wav_bytes, write_adapter
from voxcpm_api.engine.fake import FakeEngine

SECRET = f"VOXCPM-TRAVERSAL-SECRET-{uuid.uuid4().hex}"
SECRET_PIECES = (SECRET, SECRET[-32:], SECRET[:24])  # the whole token, its random part, its prefix
EXISTS, ABSENT = "secret", "nosuch"  # same length: messages that cut names at N chars cut both alike
VOICE_MAX_S = 0.5

# ---- the corpus ----------------------------------------------------------------------------------
# A template names its target with @X@ (secret | nosuch), @O@ (the absolute outside dir, posix),
# @W@ (the same with backslashes), @K@ (a download name the store knows; its file is a planted
# symlink to the target). `only` limits a template to some fields (where it names a real object).

TEMPLATES: list[tuple[str, str, frozenset[str] | None]] = []


def _t(name: str, template: str, only: set[str] | None = None) -> None:
    TEMPLATES.append((name, template, frozenset(only) if only else None))


T = "../outside/@X@.wav"
# plain and backslash dot-dot, dot segments in the middle
_t("dotdot", T)
_t("dotdot-backslash", T.replace("/", "\\"))
_t("dotdot-mixed", "..\\outside/@X@.wav")
_t("dotdot-double-slash", "..//outside//@X@.wav")
_t("dot-then-dotdot", "./../outside/@X@.wav")
_t("mid-dotdot", "a/../../outside/@X@.wav")
_t("mid-dotdot-deep", "a/b/../../../outside/@X@.wav")
_t("mid-dotdot-backslash", "a\\..\\..\\outside\\@X@.wav")
_t("sub-dotdot", "sub/../../outside/@X@.wav")
_t("dotdot-trailing-slash", "../outside/@X@.wav/")
_t("dotdot-dot-suffix", "../outside/@X@.wav/.")
_t("dotdot-twice", "../../" + "@O@"[1:] + "/@X@.wav")
for depth in (3, 8, 40):
    _t(f"dotdot-to-root-x{depth}", "../" * depth + "@O@/@X@.wav".lstrip("/"))
_t("dotdot-to-root-backslash", "..\\" * 8 + "@W@\\@X@.wav".lstrip("\\"))
_t("dotdot-many-then-rel", "../" * 300 + "@O@/@X@.wav".lstrip("/"))
_t("dot-only", ".")
_t("dotdot-only", "..")
_t("dotdot-slash", "../")
_t("dotdot-backslash-only", "..\\")
# absolute paths
_t("absolute", "@O@/@X@.wav")
_t("absolute-double-slash", "/@O@/@X@.wav")
_t("absolute-dotdot", "@O@/../outside/@X@.wav")
_t("absolute-backslash", "@W@\\@X@.wav")
_t("file-url", "file://@O@/@X@.wav")
_t("etc-passwd", "/etc/passwd")
_t("etc-passwd-dotdot", "../../../../../../../../etc/passwd")
_t("etc-hostname", "/etc/hostname")
_t("windows-drive", "C:\\Windows\\win.ini")
_t("windows-drive-slash", "C:/Windows/win.ini")
_t("windows-drive-relative", "C:@X@.wav")
_t("home-tilde", "~/@X@.wav")
_t("env-var", "$HOME/@X@.wav")
_t("windows-env-var", "%SYSTEMROOT%\\win.ini")
# UNC-like
_t("unc-backslash", "\\\\host\\share\\@X@.wav")
_t("unc-slash", "//host/share/@X@.wav")
_t("unc-device", "\\\\?\\@W@\\@X@.wav")
_t("unc-dot-device", "\\\\.\\@W@\\@X@.wav")
_t("unc-localhost", "//localhost@O@/@X@.wav")
# URL-encoded, double-encoded, mixed case, partial
_t("urlenc-dotdot-slash", "%2e%2e%2foutside%2f@X@.wav")
_t("urlenc-upper", "%2E%2E%2Foutside%2F@X@.wav")
_t("urlenc-dots-only", "%2e%2e/outside/@X@.wav")
_t("urlenc-slash-only", "..%2foutside%2f@X@.wav")
_t("urlenc-backslash", "..%5coutside%5c@X@.wav")
_t("urlenc-absolute", "%2f" + "@O@"[1:].replace("/", "%2f") + "%2f@X@.wav")
_t("double-enc", "%252e%252e%252foutside%252f@X@.wav")
_t("double-enc-slash", "..%252foutside%252f@X@.wav")
_t("triple-enc", "%25252e%25252e%25252foutside%25252f@X@.wav")
_t("urlenc-nul", "../outside/@X@.wav%00.wav")
# NUL bytes
_t("nul-suffix", "../outside/@X@.wav\x00.wav")
_t("nul-prefix", "voice.wav\x00../outside/@X@.wav")
_t("nul-in-name", "@X@\x00.wav")
_t("nul-absolute", "@O@/@X@.wav\x00")
# overlong UTF-8 (as percent escapes and as raw invalid bytes decoded as latin-1)
_t("overlong-dot-slash", "%c0%ae%c0%ae/outside/@X@.wav")
_t("overlong-all", "%c0%ae%c0%ae%c0%afoutside%c0%af@X@.wav")
_t("overlong-3byte", "%e0%80%ae%e0%80%ae%e0%80%afoutside%e0%80%af@X@.wav")
_t("overlong-backslash", "..%c1%9coutside%c1%9c@X@.wav")
_t("overlong-latin1", "\xc0\xae\xc0\xae/outside/@X@.wav")
_t("overlong-4byte", "%f0%80%80%ae%f0%80%80%ae/outside/@X@.wav")
# Unicode look-alikes and normalisation variants
_t("fullwidth-dots-slash", "\uff0e\uff0e\uff0foutside\uff0f@X@.wav")
_t("fullwidth-dots", "\uff0e\uff0e/outside/@X@.wav")
_t("fullwidth-backslash", "..\uff3coutside\uff3c@X@.wav")
_t("one-dot-leader", "\u2024\u2024/outside/@X@.wav")
_t("two-dot-leader", "\u2025/outside/@X@.wav")
_t("division-slash", "..\u2215outside\u2215@X@.wav")
_t("fraction-slash", "..\u2044outside\u2044@X@.wav")
_t("big-solidus", "..\u29f8outside\u29f8@X@.wav")
_t("small-full-stop", "\ufe52\ufe52/outside/@X@.wav")
_t("fullwidth-all", "\uff0e\uff0e\uff0f\uff4f\uff55\uff54\uff53\uff49\uff44\uff45\uff0f@X@.wav")
_t("combining-dot", ".\u0307./outside/@X@.wav")
_t("zero-width", ".\u200b./outside/@X@.wav")
_t("rtl-override", "\u202e../outside/@X@.wav")
_t("bom-prefix", "\ufeff../outside/@X@.wav")
# trailing dots and spaces, odd dot runs
_t("trailing-dot", "../outside/@X@.wav.")
_t("trailing-space", "../outside/@X@.wav ")
_t("trailing-dots-spaces", "../outside/@X@.wav. . ")
_t("dotdot-space", ".. /outside/@X@.wav")
_t("space-dotdot", " ../outside/@X@.wav")
_t("three-dots", ".../outside/@X@.wav")
_t("four-dots", "..../outside/@X@.wav")
_t("dots-spaces-segment", ". ./outside/@X@.wav")
_t("dotdot-tab", "..\t/outside/@X@.wav")
_t("newline", "../outside/@X@.wav\n")
_t("crlf-header", "x.wav\r\nX-Injected: 1")
# symlinks planted inside every served root (output, lora, refs) pointing outside
_t("symlink-file", "lnk_@X@.wav")
_t("symlink-dir-file", "lnkdir/@X@.wav")
_t("symlink-dir-dotdot", "lnkdir/../lnkdir/@X@.wav")
_t("symlink-to-dir", "lnkd_@X@dir")
_t("symlink-to-dir-child", "lnkd_@X@dir/lora_weights.safetensors")
_t("symlink-download-name", "tts_0123456789ab_17000000@X@.wav".replace("@X@", "@Y@"))
_t("adapter-with-symlinked-weights", "evil_@X@")
_t("download-known-name-symlinked", "@K@")
_t("voice-audio-symlinked", "v@X@", {"voice"})
_t("symlink-loop", "loop_a")
_t("symlink-loop-child", "loop_a/x.wav")
_t("symlink-loop-download", "tts_0123456789ab_1700000099.wav")
# case variants of real names (voice.wav, lora 'good', voice 'alice', a known download)
_t("case-ref", "VOICE.WAV", {"ref_audio_path"})
_t("case-ref-2", "Voice.wav", {"ref_audio_path"})
_t("case-lora", "GOOD", {"lora_name", "voice"})
_t("case-lora-2", "Good", {"lora_name", "voice"})
_t("case-voice", "ALICE", {"voice", "voice_path"})
_t("case-voice-2", "Alice", {"voice", "voice_path"})
_t("case-download", "@KU@", {"download"})
# long names
_t("long-name-255", "a" * 255)
_t("long-name-256", "a" * 256 + ".wav")
_t("long-name-4096", "b" * 4096)
_t("long-segments", "/".join(["c" * 255] * 20))
_t("long-dotdot-tail", "../outside/@X@.wav" + "/" * 1000)
# miscellaneous
_t("query-like", "../outside/@X@.wav?x=1")
_t("fragment-like", "../outside/@X@.wav#x")
_t("semicolon-param", "..;/outside/@X@.wav")
_t("colon-stream", "voice.wav::$DATA")
_t("proc-self-cwd", "/proc/self/cwd/../outside/@X@.wav")

FIELDS = ("download", "lora_name", "ref_audio_path", "voice", "voice_path", "voice_name", "filename")


@dataclass(frozen=True)
class Pair:
    name: str
    exists: str  # aimed at the existing outside file (or a real object)
    absent: str  # the same, aimed at nothing


@dataclass
class Env:
    srv: Running
    outside: Path
    pairs: dict[str, list[Pair]]  # field -> payload pairs
    absent_to_exists: list[tuple[str, str]]  # substitutions that map an absent answer onto an exists one
    outside_listing: set[str]


def build_pairs(outside: Path, known: tuple[str, str], known_upper: str) -> dict[str, list[Pair]]:
    o = outside.as_posix()

    def fill(template: str, x: str, k: str) -> str:
        return (template.replace("@O@", o).replace("@W@", o.replace("/", "\\")).replace("@X@", x)
                .replace("@Y@", "00" if x == EXISTS else "01").replace("@KU@", known_upper).replace("@K@", k))

    pairs: dict[str, list[Pair]] = {f: [] for f in FIELDS}
    for name, template, only in TEMPLATES:
        pair = Pair(name, fill(template, EXISTS, known[0]), fill(template, ABSENT, known[1]))
        for field_name in FIELDS:
            if only is None or field_name in only:
                pairs[field_name].append(pair)
    return pairs


def corpus_payloads(pairs: dict[str, list[Pair]]) -> set[str]:
    return {p for field_pairs in pairs.values() for pair in field_pairs for p in (pair.exists, pair.absent)}


# ---- the server and its planted files ------------------------------------------------------------


def _symlink(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link)


@pytest.fixture(scope="module")
def env(make_module_server) -> Env:
    srv = make_module_server(engine=FakeEngine(), voice_max_duration_s=VOICE_MAX_S)
    base = srv.base
    outside = base / "outside"  # a sibling of output/, lora/ and refs/: outside every served root
    (outside / f"{EXISTS}dir").mkdir(parents=True)
    (outside / f"{EXISTS}.wav").write_text(SECRET, encoding="utf-8")
    (outside / f"{EXISTS}dir" / "lora_weights.safetensors").write_text(SECRET, encoding="utf-8")
    (outside / f"{EXISTS}dir" / "lora_config.json").write_text(json.dumps({"r": SECRET}), encoding="utf-8")

    # real objects: a reference file, an adapter, a saved voice, two finished downloads
    (srv.ref_dir / "voice.wav").write_bytes(wav_bytes())
    write_adapter(srv.lora_dir / "good", fitting_shapes(srv.engine))
    created = srv.client.post("/voices", data={"name": "alice", "transcript": "hi"},
                              files={"audio": ("a.wav", wav_bytes(freq=200), "audio/wav")})
    assert created.status_code == 201, created.text
    known = []
    for _ in range(2):
        done = srv.client.post("/synthesize", json={"text": "Hello there.", "async_mode": False,
                                                    "response_format": "wav"})
        assert done.status_code == 200, done.text
        known.append(done.json()["audio_path"].rsplit("/", 1)[-1])

    # symlinks inside every served root that point outside it
    for root in (srv.output_dir, srv.lora_dir, srv.ref_dir):
        for x in (EXISTS, ABSENT):
            _symlink(root / f"lnk_{x}.wav", outside / f"{x}.wav")
            _symlink(root / f"lnkd_{x}dir", outside / f"{x}dir")
        _symlink(root / "lnkdir", outside)
        _symlink(root / "loop_a", root / "loop_b")
        _symlink(root / "loop_b", root / "loop_a")
    _symlink(srv.output_dir / "tts_0123456789ab_1700000099.wav", srv.output_dir / "tts_0123456789ab_1700000099.wav")
    for x, y in ((EXISTS, "00"), (ABSENT, "01")):
        _symlink(srv.output_dir / f"tts_0123456789ab_17000000{y}.wav", outside / f"{x}.wav")
        # an adapter directory whose weights file is a symlink to outside
        _symlink(srv.lora_dir / f"evil_{x}" / "lora_weights.safetensors",
                 outside / f"{x}dir" / "lora_weights.safetensors")
    # finished downloads whose files were replaced by symlinks to outside
    _symlink(srv.output_dir / known[0], outside / f"{EXISTS}.wav")
    _symlink(srv.output_dir / known[1], outside / f"{ABSENT}.wav")
    # saved voices whose audio files were replaced by symlinks to outside
    for x, freq in ((EXISTS, 300), (ABSENT, 400)):
        made = srv.client.post("/voices", data={"name": f"v{x}", "transcript": "hi"},
                               files={"audio": ("v.wav", wav_bytes(freq=freq), "audio/wav")})
        assert made.status_code == 201, made.text
        body = made.json()
        _symlink(srv.output_dir / "voices" / f"{body['sha256']}.{body['format']}", outside / f"{x}.wav")

    pairs = build_pairs(outside, (known[0], known[1]), known[0].upper())
    substitutions = [(known[1], known[0]), (ABSENT, EXISTS), ("01.wav", "00.wav")]
    listing = {p.relative_to(outside).as_posix() for p in outside.rglob("*")}
    return Env(srv=srv, outside=outside, pairs=pairs, absent_to_exists=substitutions, outside_listing=listing)


# ---- sending -------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def _answer(response: httpx.Response) -> Answer:
    return Answer(response.status_code, list(response.headers.multi_items()), response.content)


def raw_segment(payload: str) -> str:
    """The payload as literally as an HTTP request line can carry it: '/', '\\', '%' and '.' stay as
    they are (no client-side normalisation); controls, spaces, '?', '#' and non-ASCII are escaped."""
    out = []
    for ch in payload:
        if ord(ch) <= 0x20 or ord(ch) >= 0x7F or ch in "?#":
            out.append(quote(ch, safe=""))
        else:
            out.append(ch)
    return "".join(out)


def send_raw(srv: Running, method: str, path: str, hops: int = 2) -> Answer:
    """One request with exactly this request target (httpx would resolve dot segments).

    Starlette answers a trailing slash with a 307 to the same path without it (`/download/../` ->
    `/download/..`); that redirect is followed, within this server, and the final answer judged.
    """
    conn = http.client.HTTPConnection("127.0.0.1", srv.server.port, timeout=30)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        answer = Answer(response.status, response.getheaders(), response.read())
    finally:
        conn.close()
    location = dict((k.lower(), v) for k, v in answer.headers).get("location", "")
    if answer.status in (307, 308) and hops > 0 and location.startswith(srv.server.url + "/"):
        assert SECRET not in location
        return send_raw(srv, method, location[len(srv.server.url):], hops - 1)
    return answer


def _path_sender(method: str, prefix: str, encoded: bool) -> Callable[[Running, str], list[Answer]]:
    def send(srv: Running, payload: str) -> list[Answer]:
        segment = quote(payload, safe="") if encoded else raw_segment(payload)
        return [send_raw(srv, method, prefix + segment)]
    return send


def _json_sender(path: str, field_name: str, extra: dict) -> Callable[[Running, str], list[Answer]]:
    def send(srv: Running, payload: str) -> list[Answer]:
        return [_answer(srv.client.post(path, json={**extra, field_name: payload}))]
    return send


def _query_sender(field_name: str, extra: dict) -> Callable[[Running, str], list[Answer]]:
    def send(srv: Running, payload: str) -> list[Answer]:
        return [_answer(srv.client.get("/synthesize/stream", params={"text": "Hi there.", **extra,
                                                                     field_name: payload}))]
    return send


def _openai(srv: Running, payload: str) -> list[Answer]:
    base = {"model": "voxcpm", "input": "Hi there."}
    return [_answer(srv.client.post("/v1/audio/speech", json={**base, "voice": payload})),
            _answer(srv.client.post("/v1/audio/speech", json={**base, "voice": {"id": payload}}))]


def _voice_create_name(srv: Running, payload: str) -> list[Answer]:
    # valid audio and a missing adapter: a name that passes its check is still refused (404 lora)
    return [_answer(srv.client.post("/voices", data={"name": payload, "transcript": "hi",
                                                     "lora_name": "no_such_adapter"},
                                    files={"audio": ("v.wav", wav_bytes(freq=500), "audio/wav")}))]


JUNK = b"RIFF\x00\x00\x00\x00not really audio" * 8
TOO_LONG = wav_bytes(seconds=VOICE_MAX_S + 1.6, freq=600)


def _upload_filename(srv: Running, payload: str) -> list[Answer]:
    form = {"text": "Hi there.", "ref_text": "hi"}
    return [
        _answer(srv.client.post("/synthesize/upload", data=form, files={"file": (payload, JUNK, "audio/wav")})),
        # decodable audio, so the file name reaches staging; an unknown adapter refuses it afterwards
        _answer(srv.client.post("/synthesize/upload", data={**form, "lora_name": "no_such_adapter"},
                                files={"file": (payload, wav_bytes(freq=700), "audio/wav")})),
    ]


def _voice_filename(srv: Running, payload: str) -> list[Answer]:
    form = {"name": "fresh_voice", "transcript": "hi"}
    return [_answer(srv.client.post("/voices", data=form, files={"audio": (payload, JUNK, "audio/wav")})),
            _answer(srv.client.post("/voices", data=form, files={"audio": (payload, TOO_LONG, "audio/wav")}))]


ENDPOINTS: dict[str, tuple[str, Callable[[Running, str], list[Answer]]]] = {
    "GET /download/{raw}": ("download", _path_sender("GET", "/download/", encoded=False)),
    "GET /download/{encoded}": ("download", _path_sender("GET", "/download/", encoded=True)),
    "POST /synthesize lora_name": ("lora_name", _json_sender("/synthesize", "lora_name", {"text": "Hi there."})),
    "POST /synthesize/stream lora_name": ("lora_name", _json_sender("/synthesize/stream", "lora_name",
                                                                    {"text": "Hi there."})),
    "GET /synthesize/stream ?lora_name": ("lora_name", _query_sender("lora_name", {})),
    "POST /v1/audio/speech voice": ("lora_name", _openai),
    "POST /synthesize ref_audio_path": ("ref_audio_path", _json_sender("/synthesize", "ref_audio_path",
                                                                       {"text": "Hi there.", "ref_text": "hi"})),
    "POST /synthesize/stream ref_audio_path": ("ref_audio_path", _json_sender(
        "/synthesize/stream", "ref_audio_path", {"text": "Hi there.", "ref_text": "hi"})),
    "GET /synthesize/stream ?ref_audio_path": ("ref_audio_path", _query_sender("ref_audio_path", {"ref_text": "hi"})),
    "POST /synthesize voice": ("voice", _json_sender("/synthesize", "voice", {"text": "Hi there."})),
    "POST /synthesize/stream voice": ("voice", _json_sender("/synthesize/stream", "voice", {"text": "Hi there."})),
    "GET /synthesize/stream ?voice": ("voice", _query_sender("voice", {})),
    "POST /v1/audio/speech saved voice": ("voice", _openai),
    "GET /voices/{raw}": ("voice_path", _path_sender("GET", "/voices/", encoded=False)),
    "GET /voices/{encoded}": ("voice_path", _path_sender("GET", "/voices/", encoded=True)),
    "DELETE /voices/{raw}": ("voice_path", _path_sender("DELETE", "/voices/", encoded=False)),
    "DELETE /voices/{encoded}": ("voice_path", _path_sender("DELETE", "/voices/", encoded=True)),
    "POST /voices name": ("voice_name", _voice_create_name),
    "POST /synthesize/upload filename": ("filename", _upload_filename),
    "POST /voices filename": ("filename", _voice_filename),
}

SUMMARY: dict[str, tuple[int, int]] = {}  # endpoint -> (payloads, requests), all refused


# ---- checks --------------------------------------------------------------------------------------


def message_of(body: object) -> object:
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):
            return body["error"].get("message")
        return body.get("detail")
    return None


def shape(value: object) -> object:
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


def refusal_problems(answer: Answer) -> list[str]:
    problems = []
    if not 400 <= answer.status < 500:
        problems.append(f"status {answer.status}")
    leaked = [p for p in SECRET_PIECES if p.encode() in answer.body
              or any(p in k or p in v for k, v in answer.headers)]
    if leaked:
        problems.append("the secret file's content is in the response")
    try:
        message = message_of(answer.json())
    except ValueError:
        return [*problems, f"not JSON: {answer.body[:120]!r}"]
    if not message:
        problems.append(f"no message: {answer.body[:200]!r}")
    return problems


def normalised(env: Env, answer: Answer) -> tuple[int, object, str]:
    text = answer.body.decode("utf-8", "replace")
    for absent, exists in env.absent_to_exists:
        text = text.replace(absent, exists)
    for cut in range(1, len(ABSENT)):  # a name that an echo cut short ('.../outside/nosu' ...)
        text = text.replace(ABSENT[:cut] + "'", EXISTS[:cut] + "'")
    try:
        body = json.loads(answer.body)
    except ValueError:
        body = None
    return answer.status, shape(body), text


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_every_payload_is_refused_and_outside_looks_absent(env: Env, endpoint: str) -> None:
    field_name, send = ENDPOINTS[endpoint]
    srv = env.srv
    tasks_before = srv.total()
    files_before = srv.output_files()
    failures: list[str] = []
    requests = 0
    payloads: set[str] = set()
    for pair in env.pairs[field_name]:
        exists = send(srv, pair.exists)
        absent = send(srv, pair.absent) if pair.absent != pair.exists else exists
        payloads.update((pair.exists, pair.absent))
        requests += len(exists) + (len(absent) if absent is not exists else 0)
        for which, answers in (("exists", exists), ("absent", absent)):
            for i, answer in enumerate(answers):
                for problem in refusal_problems(answer):
                    failures.append(f"{pair.name} [{which}#{i}]: {problem}: {answer.body[:300]!r}")
        for i, (a, b) in enumerate(zip(exists, absent)):
            if normalised(env, a) != normalised(env, b):
                failures.append(f"{pair.name} [#{i}]: outside answered unlike absent: "
                                f"{a.status} {a.body[:300]!r} vs {b.status} {b.body[:300]!r}")
    assert not failures, f"{endpoint}: {len(failures)} problems:\n" + "\n".join(failures[:40])
    assert srv.total() == tasks_before, "a refused request created a task"
    assert srv.output_files() == files_before, "a refused request left a file in the output dir"
    assert (env.outside / f"{EXISTS}.wav").read_text(encoding="utf-8") == SECRET
    assert {p.relative_to(env.outside).as_posix() for p in env.outside.rglob("*")} == env.outside_listing
    SUMMARY[endpoint] = (len(payloads), requests)


def test_corpus_size_and_summary(env: Env) -> None:
    payloads = corpus_payloads(env.pairs)
    assert len(payloads) >= 100, len(payloads)
    assert len(TEMPLATES) == len({name for name, _, _ in TEMPLATES}), "duplicate template names"
    ran = {e: SUMMARY[e] for e in ENDPOINTS if e in SUMMARY}
    checks = sum(n for n, _ in ran.values())
    requests = sum(r for _, r in ran.values())
    lines = [f"traversal corpus: {len(payloads)} distinct payloads from {len(TEMPLATES)} templates; "
             f"{len(ran)}/{len(ENDPOINTS)} endpoints; {checks} payload x endpoint checks, {requests} requests, "
             "all refused (4xx JSON, no secret bytes, outside == absent)"]
    lines += [f"  {e}: {n} payloads, {r} requests" for e, (n, r) in ran.items()]
    print("\n" + "\n".join(lines))
    if len(ran) == len(ENDPOINTS):
        assert checks >= 100 * len(ENDPOINTS) * 0.9
    assert re.fullmatch(r"VOXCPM-TRAVERSAL-SECRET-[0-9a-f]{32}", SECRET)
