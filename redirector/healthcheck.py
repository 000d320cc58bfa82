"""The healthCheckNodePort of migrated LoadBalancer Services with externalTrafficPolicy Local.

Cloud load balancers probe ``http://<node>:<healthCheckNodePort>/`` to learn which nodes have local
endpoints; kube-proxy answers it, but not for a Service labelled for another proxy (it ignores those). So
the agent answers exactly as kube-proxy does (pkg/proxy/healthcheck): HTTP 200 with the number of local
endpoints when there is at least one, 503 when there is none, a small JSON body, on every node address.
The control plane decides the ports and counts (``ServiceResources.health``); this is the shell.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


def answer(service: str, local_endpoints: int) -> tuple[int, bytes]:
    """kube-proxy's healthcheck answer (pure)."""
    namespace, _, name = service.partition("/")
    body = {"service": {"namespace": namespace, "name": name}, "localEndpoints": local_endpoints,
            "serviceProxyHealthy": True}
    return (200 if local_endpoints > 0 else 503), json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status, body = answer(*self.server.state)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: tuple[str, int] = ("", 0)


class HealthChecks:
    """One small HTTP server per healthCheckNodePort, started, updated and stopped as the map changes."""

    def __init__(self, address: str = "0.0.0.0") -> None:
        self.address = address
        self._servers: dict[int, _Server] = {}
        self._lock = threading.Lock()

    def apply(self, ports: Mapping[int, tuple[str, int]]) -> None:
        with self._lock:
            for port in [p for p in self._servers if p not in ports]:
                self._servers.pop(port).shutdown()
            for port, state in ports.items():
                server = self._servers.get(port)
                if server is None:
                    try:
                        server = _Server((self.address, port), _Handler)
                    except OSError as exc:  # e.g. kube-proxy still holds it during a handover: retried next change
                        log.warning("cannot serve a healthCheckNodePort", extra={"port": port, "error": str(exc)})
                        continue
                    threading.Thread(target=server.serve_forever, name=f"healthcheck-{port}", daemon=True).start()
                    self._servers[port] = server
                server.state = state

    def stop(self) -> None:
        self.apply({})
