"""Real traffic for kernel tests: echo listeners in a netns, and clients that dial from a netns.

WHY: a rule is proven by what a real connection sees. Listeners run ``sandbox/node/echo_server.py`` in
a namespace (started via ``NetNS.popen``, so they die with it) and report where each connection
landed plus its SO_ORIGINAL_DST; clients run in a forked child that entered the source netns.
Failures raise ``TrafficError`` with the source netns and target in the message.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from sandbox.node.netns import NetNS, run_in_netns
from shared.errors import SandboxError

T = TypeVar("T")
Mode = Literal["tcp", "udp", "http"]
ECHO_SERVER = Path(__file__).with_name("echo_server.py")


class TrafficError(SandboxError):
    """A test connection or datagram did not get its reply."""


@dataclass
class Listener:
    """An echo server running in ``netns``; ``port`` is the bound port (useful with port=0)."""

    netns: NetNS
    port: int
    family: int
    mode: Mode
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def _ns_name(netns: NetNS | str) -> str:
    return netns if isinstance(netns, str) else netns.name


def _read_ready(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for the server's ``READY <port>`` line (no sleeping: select on its stdout)."""
    assert proc.stdout is not None
    fd, buf, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            proc.kill()
            raise TrafficError(f"echo server {proc.args!r} not ready within {timeout}s")
        chunk = os.read(fd, 256)
        if not chunk:
            raise TrafficError(f"echo server {proc.args!r} exited with {proc.wait()} before READY")
        buf += chunk
    word, port = buf.split(b"\n", 1)[0].split()
    if word != b"READY":
        raise TrafficError(f"echo server said {buf!r}, expected READY <port>")
    return int(port)


def echo_listener(
    netns: NetNS,
    port: int = 0,
    family: int = 4,
    *,
    mode: Mode = "tcp",
    name: str | None = None,
    bind: str | None = None,
    timeout: float = 20,
) -> Listener:
    """Start an echo server in ``netns`` and return once it accepts. ``name`` tags its replies."""
    # -P: keep sandbox/ off sys.path so no module of ours can shadow a stdlib one.
    argv = [sys.executable, "-P", str(ECHO_SERVER), "--port", str(port), "--family", str(family)]
    argv += ["--name", name or netns.name]
    if bind:
        argv += ["--bind", bind]
    if mode != "tcp":
        argv.append(f"--{mode}")
    proc = netns.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    return Listener(netns, _read_ready(proc, timeout), family, mode, proc)


def tcp_listener(netns: NetNS, port: int = 0, family: int = 4, **kw: Any) -> Listener:
    """TCP echo server: one JSON line per connection (server, local, peer, original_dst)."""
    return echo_listener(netns, port, family, mode="tcp", **kw)


def udp_listener(netns: NetNS, port: int = 0, family: int = 4, **kw: Any) -> Listener:
    """UDP echo server: one JSON reply per datagram (server, local, peer, data)."""
    return echo_listener(netns, port, family, mode="udp", **kw)


def http_listener(netns: NetNS, port: int = 0, family: int = 4, **kw: Any) -> Listener:
    """HTTP echo server: replies with the request's method, path and headers as JSON."""
    return echo_listener(netns, port, family, mode="http", **kw)


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _tcp_exchange(ip: str, port: int, timeout: float, payload: bytes | None) -> dict[str, Any]:
    with socket.socket(_family(ip), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        stream = sock.makefile("rb")
        line = stream.readline()
        if not line:
            raise TrafficError(f"TCP {ip}:{port}: connected, but closed without a reply")
        reply: dict[str, Any] = json.loads(line)
        if payload is not None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            reply["echo"] = stream.read().decode(errors="replace")
        return reply


def tcp_request(
    netns: NetNS | str, ip: str, port: int, timeout: float = 5.0, payload: bytes | None = None
) -> dict[str, Any]:
    """Connect from ``netns`` to ip:port and return the echo server's JSON line (+ ``echo``)."""
    name = _ns_name(netns)
    try:
        return run_in_netns(name, _tcp_exchange, ip, port, timeout, payload, timeout=timeout + 10)
    except (OSError, ValueError, TrafficError) as exc:
        raise TrafficError(f"TCP from netns {name} to {ip}:{port} failed: {exc!r}") from exc


def _udp_exchange(ip: str, port: int, timeout: float, payload: bytes) -> dict[str, Any]:
    with socket.socket(_family(ip), socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        sock.send(payload)
        reply: dict[str, Any] = json.loads(sock.recv(65536))
        return reply


def udp_request(
    netns: NetNS | str, ip: str, port: int, timeout: float = 5.0, payload: bytes = b"ping"
) -> dict[str, Any]:
    """Send one datagram from ``netns`` to ip:port and return the UDP echo server's JSON reply."""
    name = _ns_name(netns)
    try:
        return run_in_netns(name, _udp_exchange, ip, port, timeout, payload, timeout=timeout + 10)
    except (OSError, ValueError) as exc:
        raise TrafficError(f"UDP from netns {name} to {ip}:{port} failed: {exc!r}") from exc


def _http_exchange(
    ip: str, port: int, method: str, path: str, headers: dict[str, str], timeout: float
) -> dict[str, Any]:
    conn = http.client.HTTPConnection(ip, port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        return {"status": resp.status, "headers": dict(resp.getheaders()), "body": body}
    finally:
        conn.close()


def http_request(
    netns: NetNS | str,
    ip: str,
    port: int,
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """One HTTP/1.1 request from ``netns``; returns status, headers and body (text)."""
    name = _ns_name(netns)
    try:
        return run_in_netns(
            name, _http_exchange, ip, port, method, path, headers or {}, timeout, timeout=timeout + 10
        )
    except (OSError, http.client.HTTPException) as exc:
        raise TrafficError(f"HTTP {method} from netns {name} to {ip}:{port}{path} failed: {exc!r}") from exc


def wait_until(fn: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> T:
    """Poll ``fn`` until it returns a truthy value (exceptions count as not yet) or the deadline passes."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - kept for the timeout message
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what or fn!r} not true within {timeout}s (last error: {last!r})")
        time.sleep(interval)
