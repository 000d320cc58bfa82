"""uvicorn over TLS with the hot-reloadable context from webhook.certs; runnable in a thread for tests."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

from webhook.certs import CertStore

# kube-apiserver keeps connections to webhooks alive; closing idle ones early only costs handshakes.
KEEP_ALIVE_SECONDS = 60


def build_server(app: Any, certs: CertStore, *, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server whose SSLContext is ``certs.server_context`` (rotations reach new handshakes)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_context_factory=lambda _config, _default: certs.server_context,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        server_header=False,
    )
    return uvicorn.Server(config)


@dataclass
class RunningServer:
    """A server started by ``serve_in_thread``."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def serve_in_thread(app: Any, certs: CertStore, *, host: str = "127.0.0.1", port: int = 0,
                    startup_timeout: float = 10.0) -> RunningServer:
    """Bind (port 0: any free port), start uvicorn in a daemon thread, return once it accepts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = build_server(app, certs, host=host, port=sock.getsockname()[1])
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="webhook-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("webhook server did not start")
        time.sleep(0.01)
    return RunningServer(server, thread, host, sock.getsockname()[1])
