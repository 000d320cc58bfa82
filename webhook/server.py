"""uvicorn over TLS with the hot-reloadable context from webhook.certs; runnable in a thread for tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from webhook.certs import CertStore

# kube-apiserver keeps connections to webhooks alive; closing idle ones early only costs handshakes.
KEEP_ALIVE_SECONDS = 60
# From a connection's TLS handshake (or a kept-alive connection's next byte) to the end of the request's
# body. kube-apiserver writes a whole request at once and gives up after timeoutSeconds (3).
HEAD_TIMEOUT_SECONDS = 10.0


class HeadDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on reading each request, head and body.

    uvicorn only times out a connection after a response (keep-alive); a client that completes the TLS
    handshake and then sends nothing, half a header, or a head announcing a body it never sends, would hold
    its socket (and, for the body, a waiting request) forever. Armed when the connection is made and when
    the first byte of a next request arrives; disarmed once the whole request is in. On expiry the
    connection is closed (no response: there is no whole request to answer).
    """

    head_timeout: float = HEAD_TIMEOUT_SECONDS
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:  # these bytes start a request's head
            self._arm_head_deadline()
        super().data_received(data)

    def on_message_complete(self) -> None:
        self._disarm_head_deadline()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.head_timeout, self._head_deadline_expired)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_deadline_expired(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.logger.debug("closing a connection whose request did not arrive in %ss", self.head_timeout)
            self.transport.close()


def build_server(app: Any, certs: CertStore, *, host: str, port: int,
                 head_timeout: float = HEAD_TIMEOUT_SECONDS) -> uvicorn.Server:
    """A uvicorn server whose SSLContext is ``certs.server_context`` (rotations reach new handshakes)."""
    protocol = type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout": head_timeout})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_context_factory=lambda _config, _default: certs.server_context,
        loop="uvloop",
        http=protocol,
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
                    startup_timeout: float = 10.0, head_timeout: float = HEAD_TIMEOUT_SECONDS) -> RunningServer:
    """Bind (port 0: any free port), start uvicorn in a daemon thread, return once it accepts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = build_server(app, certs, host=host, port=sock.getsockname()[1], head_timeout=head_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="webhook-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("webhook server did not start")
        time.sleep(0.01)
    return RunningServer(server, thread, host, sock.getsockname()[1])
