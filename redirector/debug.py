"""Entry point the agent calls to start its debug server (``redirector.__main__.start_debug_server``).

Wiring only: ``AgentSource`` (what the endpoints read) + ``create_debug_app`` + ``DebugServer``. Returns
the stop function; a bind failure is logged and counted, and the agent carries on without the server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from redirector.debug_app import create_debug_app
from redirector.debug_server import DebugServer
from redirector.debug_settings import DebugSettings, default_health_timeout, settings_mapping
from redirector.debug_source import AgentSource
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
    resync_value: Any = getattr(settings, "resync_period", None) or getattr(agent, "resync_period", 30.0)
    resync = float(resync_value)
    debug_settings = DebugSettings(
        address=host,
        port=port,
        proxy_port=int(getattr(settings, "proxy_port", None) or backend_proxy_port(agent.backend)),
        proxy_name=str(getattr(settings, "proxy_name", None) or c.DEFAULT_PROXY_NAME),
        health_timeout=health_timeout or default_health_timeout(resync),
        node=str(getattr(settings, "node", "") or ""),
        agent_config=settings_mapping(settings) if settings is not None else {},
    )
    source = AgentSource(agent, sync_thread=sync_thread)
    app = create_debug_app(source, agent.backend, debug_settings)
    server = DebugServer(app, host, port, registry=source.registry)
    server.start()
    return server.stop


def backend_proxy_port(backend: Any) -> int:
    """The proxy port a backend redirects to (nftables: ``layout``, iptables: ``cfg``)."""
    for holder in ("layout", "cfg"):
        port = getattr(getattr(backend, holder, None), "proxy_port", None)
        if isinstance(port, int):
            return port
    return c.DEFAULT_PROXY_PORT
