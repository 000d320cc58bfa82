"""Entry points the agent calls to start its health server and its debug server (``redirector.__main__``).

Wiring only: ``AgentSource`` (what the endpoints read) + ``create_health_app``/``create_debug_app`` +
``DebugServer`` (uvicorn in a daemon thread). A debug bind failure is logged and counted, and the agent
carries on without it; a health bind failure is the caller's to act on (the kubelet probes that port).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from redirector.debug.app import create_debug_app, create_health_app
from redirector.debug.server import DebugServer
from redirector.debug.settings import DebugSettings, default_health_timeout, settings_mapping
from redirector.debug.source import AgentSource
from shared import constants as c


def start(
    agent: Any,
    host: str = c.REDIRECTOR_DEBUG_ADDRESS,
    port: int = c.REDIRECTOR_DEBUG_PORT,
    *,
    settings: object | None = None,
    sync_thread: threading.Thread | None = None,
    health_timeout: float | None = None,
) -> Callable[[], None]:
    """Serve the debug endpoints for ``agent`` on host:port in a daemon thread; return ``stop``.

    ``settings`` (the agent's ``redirector.config.Settings``) feeds /debug/config, the proxy port and
    name; ``sync_thread`` lets /healthz see a dead sync loop at once. Raises ValueError only for a
    colliding or malformed address/port; never for a bind failure.
    """
    debug_settings = _settings(agent, host, port, settings, health_timeout, "debug")
    source = AgentSource(agent, sync_thread=sync_thread)
    app = create_debug_app(source, agent.backend, debug_settings)
    server = DebugServer(app, host, port, registry=source.registry)
    server.start()
    return server.stop


def start_health(
    agent: Any,
    host: str = c.REDIRECTOR_HEALTH_ADDRESS,
    port: int = c.REDIRECTOR_HEALTH_PORT,
    *,
    settings: object | None = None,
    sync_thread: threading.Thread | None = None,
    health_timeout: float | None = None,
) -> DebugServer:
    """Serve /healthz, /readyz and /metrics for ``agent`` on host:port in a daemon thread.

    Returns the server: ``running`` once it serves, else ``error`` says why (bind failure). Raises
    ValueError only for a colliding or malformed address/port.
    """
    health_settings = _settings(agent, host, port, settings, health_timeout, "health")
    source = AgentSource(agent, sync_thread=sync_thread)
    server = DebugServer(create_health_app(source, health_settings), host, port, name="health")
    server.start()
    return server


def _settings(agent: Any, host: str, port: int, settings: object | None, health_timeout: float | None,
              server: str) -> DebugSettings:
    resync_value: Any = getattr(settings, "resync_period", None) or getattr(agent, "resync_period", 30.0)
    return DebugSettings(
        address=host,
        port=port,
        proxy_port=int(getattr(settings, "proxy_port", None) or backend_proxy_port(agent.backend)),
        proxy_name=str(getattr(settings, "proxy_name", None) or c.DEFAULT_PROXY_NAME),
        health_timeout=health_timeout or default_health_timeout(float(resync_value)),
        node=str(getattr(settings, "node", "") or ""),
        agent_config=settings_mapping(settings) if settings is not None else {},
        server=server,
    )


def backend_proxy_port(backend: Any) -> int:
    """The proxy port a backend redirects to (nftables: ``layout``, iptables: ``cfg``)."""
    for holder in ("layout", "cfg"):
        port = getattr(getattr(backend, holder, None), "proxy_port", None)
        if isinstance(port, int):
            return port
    return c.DEFAULT_PROXY_PORT
