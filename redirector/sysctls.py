"""Kernel settings of the node's network namespace that the agent keeps, with why each matters. Pure: which
settings and their files (``path``); shell: ``ensure`` reads and writes them and says what it did.

WHY ``net.ipv4.tcp_migrate_req=1`` (Linux 5.14; per network namespace, for IPv4 and IPv6): during an Envoy
rollout the old and the new Envoy share the proxy port with SO_REUSEPORT, and the kernel spreads incoming
connections over both groups' sockets. When the old Envoy's preStop closes its listening sockets, the
connections the kernel already queued on them (handshake done, not yet accepted; or half-open) are reset —
a client sees "connection reset by peer". With ``tcp_migrate_req`` the kernel moves them to another socket
of the same reuseport group, the new Envoy's. The agent runs in the node's namespace (hostNetwork); in a
container ``/proc/sys`` is read-only, so the DaemonSet mounts the node's ``/proc/sys/net`` (as Cilium does)
and passes ``--proc-sys``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sysctl:
    name: str
    value: str
    why: str  # what goes wrong without it


REQUIRED: tuple[Sysctl, ...] = (
    Sysctl("net.ipv4.tcp_migrate_req", "1",
           "an Envoy rollout resets the connections queued on the old Envoy's listening sockets"),
)


def path(root: Path, name: str) -> Path:
    """The file of sysctl ``name`` under ``root`` (``/proc/sys`` or where the node's copy is mounted)."""
    return root.joinpath(*name.split("."))


def ensure(root: Path, wanted: tuple[Sysctl, ...] = REQUIRED) -> dict[str, str]:
    """Set each of ``wanted`` that differs; never raises. Returns name → "kept", "set" or "failed: <why>"
    (logged as a warning with its consequence: the agent still runs, only that protection is missing)."""
    result: dict[str, str] = {}
    for setting in wanted:
        file = path(root, setting.name)
        try:
            if file.read_text().strip() == setting.value:
                result[setting.name] = "kept"
                continue
            file.write_text(setting.value + "\n")
            result[setting.name] = "set"
            log.info("sysctl set", extra={"sysctl": setting.name, "value": setting.value})
        except OSError as exc:
            result[setting.name] = f"failed: {exc.strerror or exc}"
            log.warning("cannot set a sysctl: " + setting.why,
                        extra={"sysctl": setting.name, "value": setting.value, "file": str(file),
                               "error": exc.strerror or str(exc)})
    return result
