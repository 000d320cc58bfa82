"""What the debug server needs to know, validated up front, and the redacted view of the agent's settings.

WHY a module of its own: the bind check must be callable by the agent's configuration parsing too, so a
colliding ``--debug-port`` stops the agent at start-up with a clear message instead of stealing a port
kube-proxy, Envoy or the proxy needs.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from shared import constants as c

# Who owns each reserved port, for the error message.
RESERVED_OWNERS: Mapping[int, str] = {
    10249: "kube-proxy metrics",
    10256: "kube-proxy healthz",
    c.ENVOY_ADMIN_PORT: "Envoy admin",
    c.DEFAULT_PROXY_PORT: "the proxy listener",
    c.XDS_PORT: "xDS",
}

# Setting names that may hold a secret: their values are never shown.
SECRET_WORDS = ("token", "password", "passwd", "secret", "credential", "bearer", "authorization", "private")
REDACTED = "<redacted>"


DEFAULTS = {"debug": (c.REDIRECTOR_DEBUG_ADDRESS, c.REDIRECTOR_DEBUG_PORT),
            "health": (c.REDIRECTOR_HEALTH_ADDRESS, c.REDIRECTOR_HEALTH_PORT)}


def check_bind(address: str, port: int, proxy_port: int = c.DEFAULT_PROXY_PORT, *, server: str = "debug") -> None:
    """Raise ValueError (with the reason) unless ``address:port`` is a safe place for the ``server``
    ("debug" or "health").

    ``port`` 0 means "any free port" (tests). The address must be an IP literal: a name could resolve to
    a public address.
    """
    default_address, default_port = DEFAULTS[server]
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{server} address must be an IP address (default {default_address}), "
                         f"not {address!r}") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{server} port must be 0-65535, not {port!r}")
    if port in c.RESERVED_PORTS:  # the one list of reserved ports, in shared/constants.py
        raise ValueError(f"{server} port {port} collides with {RESERVED_OWNERS.get(port, 'a reserved port')}: "
                         f"choose another (default {default_port}; reserved: "
                         f"{', '.join(str(p) for p in sorted(c.RESERVED_PORTS))})")
    if port != 0 and port == proxy_port:
        raise ValueError(f"{server} port {port} collides with the proxy port: choose another")


def default_health_timeout(resync_period: float) -> float:
    """kube-proxy's rule of thumb: unhealthy after two sync periods without a successful sync (min 10 s)."""
    return max(10.0, 2.0 * resync_period)


@dataclass(frozen=True)
class DebugSettings:
    """The debug server's own knobs plus the agent facts its answers need."""

    address: str = c.REDIRECTOR_DEBUG_ADDRESS
    port: int = c.REDIRECTOR_DEBUG_PORT
    proxy_port: int = c.DEFAULT_PROXY_PORT
    proxy_name: str = c.DEFAULT_PROXY_NAME
    health_timeout: float = 60.0  # /healthz: 503 once the last successful sync is older than this
    node: str = ""
    # Tests only: run the netlink queries (listeners, local addresses) inside this named netns.
    netns: str | None = None
    # The agent's effective settings, shown (redacted) at /debug/config.
    agent_config: Mapping[str, Any] = field(default_factory=dict)
    server: str = "debug"  # which server these settings are for: "debug" or "health" (error messages)

    def __post_init__(self) -> None:
        check_bind(self.address, self.port, self.proxy_port, server=self.server)
        if not 0 < self.proxy_port < 65536:
            raise ValueError(f"proxy port must be 1-65535, not {self.proxy_port}")
        if not self.health_timeout > 0:
            raise ValueError(f"health timeout must be positive, not {self.health_timeout}")


def config_view(settings: DebugSettings) -> dict[str, Any]:
    """The effective settings as JSON-able data, secrets redacted."""
    own = {
        "address": settings.address,
        "port": settings.port,
        "health_timeout_seconds": settings.health_timeout,
        "proxy_port": settings.proxy_port,
        "proxy_name": settings.proxy_name,
    }
    return {"node": settings.node, "agent": redact(jsonable(settings.agent_config)), "debug_server": own}


def settings_mapping(settings: object) -> dict[str, Any]:
    """Any settings object (dataclass, pydantic model, mapping, plain object) as a plain dict."""
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        out = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    elif hasattr(settings, "model_dump"):
        out = dict(settings.model_dump())
    elif isinstance(settings, Mapping):
        out = dict(settings)
    else:
        out = {k: v for k, v in vars(settings).items() if not k.startswith("_")} if hasattr(settings, "__dict__") else {}
    return out


def jsonable(value: Any) -> Any:
    """Paths, enums, sets, tuples and secret-typed values as plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "get_secret_value"):  # pydantic SecretStr/SecretBytes
        return REDACTED
    return str(value)


def redact(value: Any) -> Any:
    """Replace the value of every setting whose name looks secret (recursively)."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if _secret(k) and v not in (None, "") else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _secret(name: object) -> bool:
    lowered = str(name).lower()
    return any(word in lowered for word in SECRET_WORDS)
