"""Serve the health or the debug app with uvicorn in a daemon thread of the agent process.

WHY the socket is bound here, before the thread starts: a bind failure (port taken, address not on this
node) is then known at once, logged and counted, and ``start`` returns False — the agent carries on
programming redirects without its debug server (and exits when the health server, which the kubelet
probes, cannot listen). Nothing here can raise into the sync loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import weakref

import uvicorn
from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp

log = logging.getLogger("lightpath.redirector.debug")

_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()
_METRICS_LOCK = threading.Lock()


def failure_counter(registry: CollectorRegistry) -> Counter:
    """``lightpath_redirector_debug_server_failures_total{reason}`` in ``registry`` (created once per registry)."""
    with _METRICS_LOCK:
        counter = _METRICS.get(registry)
        if counter is None:
            counter = Counter("lightpath_redirector_debug_server_failures",
                              "Debug server failures (bind: could not listen; crash: the server thread died). "
                              "Redirects are programmed regardless.", ["reason"], registry=registry)
            for reason in ("bind", "crash"):
                counter.labels(reason)
            _METRICS[registry] = counter
        return counter


class DebugServer:
    """``start()`` binds and serves in a daemon thread; ``stop()`` ends it. Never raises from either."""

    def __init__(self, app: ASGIApp, address: str, port: int, *, registry: CollectorRegistry | None = None,
                 limit_concurrency: int = 32, name: str = "debug") -> None:
        """``registry``: count failures there; ``name`` ("debug", "health") goes into the logs."""
        self.app, self.address, self.port, self.name = app, address, port, name
        self.failures = failure_counter(registry) if registry is not None else None
        self.limit_concurrency = limit_concurrency
        self.error: str | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._server is not None \
            and self._server.started

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    def start(self, ready_timeout: float = 10.0) -> bool:
        """Bind and serve; True when serving. False (logged, counted) when the socket could not be bound."""
        try:
            sock = self._bind()
        except OSError as exc:
            self._fail("bind", f"cannot listen on {self.address}:{self.port}: {exc.strerror or exc}")
            return False
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                limit_concurrency=self.limit_concurrency, timeout_keep_alive=5,
                                h11_max_incomplete_event_size=16 * 1024, server_header=False)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=self._serve, args=(server, sock), name=f"{self.name}-server", daemon=True)
        self._thread.start()
        ok = self._wait_started(server, ready_timeout)
        if ok:
            log.info(f"{self.name} server listening", extra={"url": self.url})
        return ok

    def _wait_started(self, server: uvicorn.Server, timeout: float) -> bool:
        """Until uvicorn says it serves (or its thread died, or ``timeout``): polled, uvicorn has no event."""
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            if server.started:
                return True
            pause.wait(0.005)
        if server.started:
            return True
        if self._thread is not None and self._thread.is_alive():  # a dead thread was counted by _serve
            self._fail("crash", f"{self.name} server did not start within {timeout}s")
        return False

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((self.address, self.port))
            sock.listen(64)
            sock.set_inheritable(True)
        except OSError:
            sock.close()
            raise
        return sock

    def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except BaseException as exc:  # noqa: BLE001 - a crashed debug server must not take the agent down
            self._fail("crash", f"{self.name} server stopped: {type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def _fail(self, reason: str, message: str) -> None:
        self.error = message
        if self.failures is not None:
            self.failures.labels(reason).inc()
        log.error(f"{self.name} server failed: redirects are still programmed",
                  extra={"reason": reason, "error": message})

    def stop(self, timeout: float = 5.0) -> None:
        server, thread = self._server, self._thread
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout)
        self._server, self._thread = None, None
