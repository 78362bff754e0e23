#!/usr/bin/env python3
"""Network check for the VoxCPM LoRA TTS API server.

Run it on the machine that hosts the server (or any machine that should reach it):

    python test_network.py                       # server on this machine, port 8000
    python test_network.py --port 8080
    python test_network.py --host 192.168.1.100  # a server elsewhere on the LAN
    python test_network.py --https --insecure    # HTTPS with a self-signed certificate
    python test_network.py --api-key KEY         # or set VOXCPM_API_KEY

What it does:
  1. lists this machine's LAN IPv4 addresses (no packets are sent to find them);
  2. checks whether the port is open on 127.0.0.1 and on each of this machine's own LAN
     addresses (plain TCP connects with a short timeout, never to other machines);
  3. calls GET /health, GET /loras and GET /tasks on the server you name;
  4. prints advice: firewall, --host 0.0.0.0, the URL other devices should use, /docs.

Exit status: 0 when the server answers /health, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence
from urllib.parse import quote

try:
    import requests
except ImportError:  # pragma: no cover - only hit when the dependency is missing
    sys.stderr.write("This script needs 'requests': pip install -r requirements_api.txt\n")
    raise

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "VOXCPM_API_KEY"

# A private address used only to ask the kernel which local interface would route there.
# Connecting a UDP socket sends nothing on the wire; it just selects a source address.
_ROUTE_PROBE_ADDRESS = ("10.254.254.254", 1)


# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Check that the VoxCPM TTS API server is reachable from this machine and the LAN.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"server host name or IP address (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"server port (default: {DEFAULT_PORT})")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"API key, if the server was started with --api-key (default: ${API_KEY_ENV})")
    parser.add_argument("--https", action="store_true", help="the server uses HTTPS (--ssl-keyfile/--ssl-certfile)")
    parser.add_argument("--insecure", action="store_true",
                        help="do not verify the TLS certificate (self-signed certificates)")
    parser.add_argument("--timeout", type=float, default=5.0, help="HTTP timeout in seconds (default: 5)")
    parser.add_argument("--connect-timeout", type=float, default=1.0,
                        help="timeout of each TCP port check in seconds (default: 1)")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error("--port must be between 1 and 65535")
    return args


def is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except (ipaddress.AddressValueError, ValueError):
        return False
    return True


def is_usable_lan_ipv4(text: str) -> bool:
    """True for an IPv4 address other devices could use: not loopback, unspecified or multicast."""
    if not is_ipv4(text):
        return False
    addr = ipaddress.IPv4Address(text)
    return not (addr.is_loopback or addr.is_unspecified or addr.is_multicast or addr.is_reserved)


def connect_host(host: str) -> str:
    """The address a client should dial: 0.0.0.0 / :: are listen-only addresses."""
    if host in ("0.0.0.0", "", "::", "[::]"):
        return "127.0.0.1"
    return host


def build_base_url(host: str, port: int, https: bool = False) -> str:
    """http(s)://host:port, with IPv6 literals bracketed."""
    host = connect_host(host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    scheme = "https" if https else "http"
    return f"{scheme}://{host}:{port}"


def build_url(base_url: str, path: str, **query: Any) -> str:
    """Join base URL and path; `query` items that are None are left out."""
    url = base_url.rstrip("/") + "/" + path.lstrip("/")
    params = [(k, v) for k, v in query.items() if v is not None]
    if params:
        url += "?" + "&".join(f"{quote(str(k))}={quote(str(v))}" for k, v in params)
    return url


def build_auth_headers(api_key: str | None) -> dict[str, str]:
    """The server accepts `Authorization: Bearer KEY` (or `X-API-Key: KEY`)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def is_local_host(host: str, local_addresses: Sequence[str]) -> bool:
    host = connect_host(host)
    if host.lower() in ("localhost", "localhost.localdomain", socket.gethostname().lower()):
        return True
    if is_ipv4(host):
        return ipaddress.IPv4Address(host).is_loopback or host in local_addresses
    return host in ("::1", "[::1]")


# --------------------------------------------------------------------------------------------
# network probes
# --------------------------------------------------------------------------------------------

def _route_source_address() -> str | None:
    """The local address the kernel would use for a private destination (sends no packet)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect(_ROUTE_PROBE_ADDRESS)  # UDP connect: no traffic, just route selection
        return str(sock.getsockname()[0])
    except OSError:
        return None  # no route (offline machine, sandbox)
    finally:
        sock.close()


def _hostname_addresses() -> list[str]:
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except (OSError, UnicodeError):
        return []
    return [str(info[4][0]) for info in infos]


def get_lan_ipv4_addresses() -> list[str]:
    """This machine's LAN IPv4 addresses, the default-route one first, without duplicates."""
    seen: list[str] = []
    for candidate in [_route_source_address(), *_hostname_addresses()]:
        if candidate and is_usable_lan_ipv4(candidate) and candidate not in seen:
            seen.append(candidate)
    return seen


def check_port(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a TCP connection to host:port succeeds within `timeout` seconds."""
    try:
        with socket.create_connection((connect_host(host), port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class ProbeResult:
    path: str
    ok: bool
    status_code: int | None = None
    data: Any = None
    error: str | None = None
    elapsed_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def probe(session: requests.Session, url: str, path: str, *, timeout: float, verify: bool) -> ProbeResult:
    """GET one endpoint; never raises."""
    start = time.perf_counter()
    try:
        resp = session.get(url, timeout=timeout, verify=verify)
    except requests.exceptions.SSLError as exc:
        return ProbeResult(path, False, error=f"TLS error: {tls_reason(exc)} (self-signed certificate? try --insecure)")
    except requests.exceptions.ConnectionError as exc:
        return ProbeResult(path, False, error=f"connection failed: {_short(exc)}")
    except requests.exceptions.Timeout:
        return ProbeResult(path, False, error=f"no answer within {timeout:g} s")
    except requests.exceptions.RequestException as exc:
        return ProbeResult(path, False, error=str(exc))
    elapsed_ms = (time.perf_counter() - start) * 1000
    try:
        data = resp.json()
    except ValueError:
        data = resp.text[:200]
    error = None
    if not resp.ok:
        detail = data.get("detail") if isinstance(data, dict) else data
        error = f"HTTP {resp.status_code}: {detail}"
    return ProbeResult(path, resp.ok, resp.status_code, data, error, elapsed_ms)


def tls_reason(exc: BaseException) -> str:
    """'certificate verify failed: self-signed certificate' out of requests' long SSLError text."""
    text = str(exc)
    match = re.search(r"certificate verify failed: ([^(]*)", text) or re.search(r"\[SSL[^\]]*\] ([^(]*)", text)
    return match.group(0 if "verify" in match.group(0) else 1).strip().rstrip(" ,") if match else text[:160]


def _short(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "No route to host",
                   "Network is unreachable", "timed out", "nodename nor servname"):
        if marker in text:
            return marker
    return text[:160]


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------

def describe_probe(result: ProbeResult) -> str:
    if not result.ok:
        return f"  ✗ GET {result.path:<8} {result.error}"
    data = result.data if isinstance(result.data, dict) else {}
    if result.path == "/health":
        parts = [f"status={data.get('status')}", f"model_loaded={data.get('model_loaded')}"]
        parts += [f"{k}={v}" for k, v in data.items() if k not in ("status", "model_loaded")]
        summary = ", ".join(parts)
    elif result.path == "/loras":
        names = data.get("loras") or []
        shown = ", ".join(map(str, names[:5])) + (" …" if len(names) > 5 else "")
        summary = f"{data.get('count', len(names))} LoRA(s)" + (f": {shown}" if shown else "")
    elif result.path == "/tasks":
        summary = (f"total={data.get('total')}, processing={data.get('processing')}"
                   f"/{data.get('max_concurrent')}")
    else:
        summary = str(result.data)[:120]
    return f"  ✓ GET {result.path:<8} {result.elapsed_ms:6.1f} ms  {summary}"


def build_advice(*, host: str, port: int, https: bool, lan_addresses: Sequence[str],
                 loopback_open: bool, lan_open: dict[str, bool], server_is_local: bool,
                 health: ProbeResult, auth_failed: bool) -> list[str]:
    """Human advice derived from the checks; a pure function so it can be tested."""
    advice: list[str] = []
    scheme = "https" if https else "http"
    if not health.ok:
        if server_is_local and not loopback_open:
            advice.append(f"Nothing listens on port {port}. Start the server: python start_api.py --port {port}"
                          " (or make serve)")
        elif health.error and "TLS" in health.error:
            advice.append("The TLS handshake failed: for a self-signed certificate add --insecure,"
                          " or drop --https if the server runs plain HTTP.")
        elif https is False and loopback_open and server_is_local:
            advice.append("The port is open but /health did not answer over HTTP; if the server was"
                          " started with --ssl-keyfile/--ssl-certfile, add --https.")
        else:
            advice.append(f"The server at {build_base_url(host, port, https)} did not answer /health;"
                          " check the host, the port and any firewall between the machines.")
    if server_is_local and loopback_open and lan_addresses:
        closed = [ip for ip in lan_addresses if not lan_open.get(ip)]
        if closed and len(closed) == len(lan_addresses):
            advice.append("The port answers on 127.0.0.1 only: restart the server with --host 0.0.0.0"
                          " (the default of start_api.py) so other devices can connect.")
        elif closed:
            advice.append(f"The port is closed on {', '.join(closed)}; the server may be bound to one interface.")
    if server_is_local and lan_addresses and any(lan_open.values()):
        urls = [f"{scheme}://{ip}:{port}" for ip in lan_addresses if lan_open.get(ip)]
        advice.append("Other devices on the LAN should use: " + ", ".join(urls))
        advice.append("If they still cannot connect, open the port in this machine's firewall, e.g.\n"
                      f"      Linux (ufw):        sudo ufw allow {port}/tcp\n"
                      f"      Linux (firewalld):  sudo firewall-cmd --add-port={port}/tcp --permanent"
                      " && sudo firewall-cmd --reload\n"
                      f"      Windows (admin):    netsh advfirewall firewall add rule name=\"VoxCPM API\""
                      f" dir=in action=allow protocol=TCP localport={port}\n"
                      "      macOS:              System Settings → Network → Firewall → allow python")
    if server_is_local and not lan_addresses:
        advice.append("No LAN IPv4 address was found: this machine seems to have no network connection,"
                      " so only local clients can reach the server.")
    if auth_failed:
        advice.append(f"The server requires an API key: pass --api-key KEY or set {API_KEY_ENV}; clients send"
                      " 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.")
    if health.ok:
        data = health.data if isinstance(health.data, dict) else {}
        if data.get("status") == "unhealthy":
            advice.append(f"The server is up but its model failed to load: {data.get('error') or 'see the server log'}."
                          " Check --model (a local directory, a hub id, or tiny) and the server log.")
        elif data.get("model_loaded") is False:
            advice.append("The model is still loading (the first start can take minutes); synthesis requests"
                          " return 503 until /health reports model_loaded=true.")
        advice.append(f"Interactive API docs: {build_base_url(host, port, https)}/docs")
    return advice


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def _tolerant_stdout() -> None:
    """Never crash on a console that cannot print ✓/✗ (e.g. a redirected Windows console)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _tolerant_stdout()
    verify = not args.insecure
    if args.insecure:
        try:
            from urllib3.exceptions import InsecureRequestWarning
            warnings.simplefilter("ignore", InsecureRequestWarning)
        except ImportError:  # pragma: no cover
            pass

    base_url = build_base_url(args.host, args.port, args.https)
    print("VoxCPM TTS API — network check")
    print("=" * 60)
    print(f"Host name: {socket.gethostname()}")

    lan_addresses = get_lan_ipv4_addresses()
    print("\n[1] LAN IPv4 addresses of this machine")
    if lan_addresses:
        for ip in lan_addresses:
            print(f"  • {ip}")
    else:
        print("  (none found — offline, or only a loopback interface)")

    server_is_local = is_local_host(args.host, lan_addresses)
    print(f"\n[2] TCP port {args.port} on this machine")
    loopback_open = check_port("127.0.0.1", args.port, args.connect_timeout)
    print(f"  {'✓ open  ' if loopback_open else '✗ closed'}  127.0.0.1:{args.port}")
    lan_open: dict[str, bool] = {}
    for ip in lan_addresses:
        lan_open[ip] = check_port(ip, args.port, args.connect_timeout)
        print(f"  {'✓ open  ' if lan_open[ip] else '✗ closed'}  {ip}:{args.port}")
    if not server_is_local:
        remote_open = check_port(args.host, args.port, args.connect_timeout)
        print(f"  {'✓ open  ' if remote_open else '✗ closed'}  {args.host}:{args.port} (the server you named)")

    print(f"\n[3] API endpoints at {base_url}")
    headers = build_auth_headers(args.api_key)
    with requests.Session() as session:
        session.headers.update(headers)
        health = probe(session, build_url(base_url, "/health"), "/health", timeout=args.timeout, verify=verify)
        print(describe_probe(health))
        results = [health]
        if health.ok:
            for path, query in (("/loras", {}), ("/tasks", {"limit": 5})):
                result = probe(session, build_url(base_url, path, **query), path, timeout=args.timeout,
                               verify=verify)
                print(describe_probe(result))
                results.append(result)
    auth_failed = any(r.status_code == 401 for r in results)

    print("\n[4] Advice")
    for line in build_advice(host=args.host, port=args.port, https=args.https, lan_addresses=lan_addresses,
                             loopback_open=loopback_open, lan_open=lan_open, server_is_local=server_is_local,
                             health=health, auth_failed=auth_failed):
        print(f"  → {line}")

    print("\nResult:", "server reachable" if health.ok else "server NOT reachable")
    return 0 if health.ok else 1


if __name__ == "__main__":
    sys.exit(main())
