"""Tiny echo backends for real-traffic tests, run as a subprocess inside a test network namespace.

WHY: a redirect or DNAT is only proven when a packet lands on a listener that can say where it
landed and what the client originally dialled. Each mode prints ``READY <port>`` on stdout once it
listens (so callers wait on a line, not on a sleep), then serves until killed.

Modes:
- TCP (default): per connection, one JSON line ``{"server", "local", "peer", "original_dst"}``
  (``original_dst`` from SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST, null when the connection was not
  NATed), then echoes whatever the client sends until EOF.
- ``--udp``: per datagram, one JSON reply ``{"server", "local", "peer", "data"}``.
- ``--http``: FastAPI app answering any path/method with the request line and headers as JSON.
"""

import argparse
import contextlib
import json
import socket
import struct
import sys
import threading
from typing import Any

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h


def original_dst(conn: socket.socket) -> list[Any] | None:
    """The pre-NAT destination (ip, port) conntrack remembers for this connection, or None."""
    try:
        if conn.family == socket.AF_INET6:
            raw = conn.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port = struct.unpack("!H", raw[2:4])[0]
            return [socket.inet_ntop(socket.AF_INET6, raw[8:24]), port]
        raw = conn.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack("!H", raw[2:4])[0]
        return [socket.inet_ntop(socket.AF_INET, raw[4:8]), port]
    except OSError:
        return None


def _bind(kind: int, family: int, host: str, port: int) -> socket.socket:
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    sock = socket.socket(af, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if af == socket.AF_INET6:
        # v4 and v6 listeners on the same port must coexist.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    return sock


def _ready(port: int) -> None:
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()


def _serve_conn(conn: socket.socket, name: str) -> None:
    with conn:
        reply = {
            "server": name,
            "local": list(conn.getsockname()[:2]),
            "peer": list(conn.getpeername()[:2]),
            "original_dst": original_dst(conn),
        }
        try:
            conn.sendall(json.dumps(reply).encode() + b"\n")
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


def serve_tcp(family: int, host: str, port: int, name: str) -> None:
    sock = _bind(socket.SOCK_STREAM, family, host, port)
    sock.listen(128)
    _ready(sock.getsockname()[1])
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=_serve_conn, args=(conn, name), daemon=True).start()


def serve_udp(family: int, host: str, port: int, name: str) -> None:
    sock = _bind(socket.SOCK_DGRAM, family, host, port)
    _ready(sock.getsockname()[1])
    local = list(sock.getsockname()[:2])
    while True:
        data, peer = sock.recvfrom(65536)
        reply = {"server": name, "local": local, "peer": list(peer[:2]), "data": data.decode(errors="replace")}
        sock.sendto(json.dumps(reply).encode(), peer)


def serve_http(family: int, host: str, port: int, name: str) -> None:
    import uvicorn
    from fastapi import FastAPI, Request

    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def echo(request: Request, path: str) -> dict[str, Any]:
        return {
            "server": name,
            "method": request.method,
            "path": "/" + path,
            "query": request.url.query,
            "headers": dict(request.headers),
            "client": list(request.client) if request.client else None,
            "local": list(request.scope.get("server") or []),
        }

    sock = _bind(socket.SOCK_STREAM, family, host, port)
    sock.listen(128)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    server = uvicorn.Server(config)

    # Announce readiness only once uvicorn actually accepts on the socket.
    original_startup = server.startup

    async def startup(sockets: list[socket.socket] | None = None) -> None:
        await original_startup(sockets=sockets)
        _ready(sock.getsockname()[1])

    server.startup = startup  # type: ignore[method-assign]
    server.run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--family", type=int, choices=(4, 6), default=4)
    parser.add_argument("--bind", default=None, help="address to bind (default: any of the family)")
    parser.add_argument("--name", default=socket.gethostname(), help="tag echoed in every reply")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--udp", action="store_true")
    mode.add_argument("--http", action="store_true")
    args = parser.parse_args(argv)
    host = args.bind or ("::" if args.family == 6 else "0.0.0.0")
    serve = serve_http if args.http else serve_udp if args.udp else serve_tcp
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.family, host, args.port, args.name)


if __name__ == "__main__":
    main()
