"""The node agents' Leases, read: which agents are alive and what each has prepared for a handover.

One parser for everyone who waits on the agents: the CLI (``cli.handover``, ``cli.uninstall``) and the
webhook's handover controller (``webhook.handover``); and the per-Service traffic the agents report there
(``lightpath status``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared import constants as c


def _time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _current(lease: Mapping[str, Any], now: datetime) -> bool:
    """An agent's Lease, renewed within its duration (an expired or unreadable one is a node gone)."""
    meta, spec = lease.get("metadata") or {}, lease.get("spec") or {}
    if not str(meta.get("name") or "").startswith(c.AGENT_LEASE_PREFIX):
        return False
    renewed, duration = _time(spec.get("renewTime")), spec.get("leaseDurationSeconds")
    return renewed is not None and isinstance(duration, int) and (now - renewed).total_seconds() <= duration


def live_agents(leases: Iterable[Mapping[str, Any]], now: datetime) -> dict[str, set[str]]:
    """node -> Services it prepared, for agents whose Lease is current (pure)."""
    out: dict[str, set[str]] = {}
    for lease in leases:
        meta, spec = lease.get("metadata") or {}, lease.get("spec") or {}
        name = str(meta.get("name") or "")
        if not _current(lease, now):
            continue  # expired (or unreadable): that node does not block
        try:
            prepared = json.loads((meta.get("annotations") or {}).get(c.PREPARED_ANNOTATION) or "[]")
        except ValueError:
            prepared = []
        node = str(spec.get("holderIdentity") or name.removeprefix(c.AGENT_LEASE_PREFIX))
        out[node] = {str(p) for p in prepared} if isinstance(prepared, list) else set()
    return out


@dataclass(frozen=True)
class Traffic:
    """One Service's traffic through the node Envoys, added up over the live agents' Leases."""

    requests: float  # per second
    errors: float  # 5xx answers per second
    retries: float  # per second
    p99_ms: float | None  # the worst node's p99 (percentiles do not add up)
    nodes: int  # nodes that saw traffic for it
    window: float  # the longest node window, seconds

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"requestsPerSecond": self.requests, "errorsPerSecond": self.errors,
                "retriesPerSecond": self.retries, "p99Milliseconds": self.p99_ms, "nodes": self.nodes,
                "windowSeconds": self.window}


def traffic(leases: Iterable[Mapping[str, Any]], now: datetime) -> dict[str, Traffic]:
    """Service "ns/name" -> its traffic on every node whose agent's Lease is current (pure). Unreadable or
    odd annotations count as no traffic from that node (a Lease is input we did not write in this process)."""
    sums: dict[str, list[float]] = {}
    slow: dict[str, float] = {}
    nodes: dict[str, int] = {}
    window: dict[str, float] = {}
    for lease in leases:
        if not _current(lease, now):
            continue
        try:
            doc = json.loads(((lease.get("metadata") or {}).get("annotations") or {}).get(c.TRAFFIC_ANNOTATION) or "{}")
        except ValueError:
            continue
        services = doc.get("services") if isinstance(doc, dict) else None
        seconds = doc.get("window") if isinstance(doc, dict) else None
        if not isinstance(services, dict):
            continue
        for sid, figures in services.items():
            if not isinstance(sid, str) or not isinstance(figures, list) or len(figures) != 4:
                continue
            numbers = [f if isinstance(f, int | float) and not isinstance(f, bool) and f >= 0 else None for f in figures]
            if any(n is None for n in numbers[:3]):
                continue
            row = sums.setdefault(sid, [0.0, 0.0, 0.0])
            for i in range(3):
                row[i] += float(numbers[i] or 0)
            if numbers[3] is not None:
                slow[sid] = max(slow.get(sid, 0.0), float(numbers[3]))
            nodes[sid] = nodes.get(sid, 0) + 1
            if isinstance(seconds, int | float):
                window[sid] = max(window.get(sid, 0.0), float(seconds))
    return {sid: Traffic(round(r[0], 2), round(r[1], 2), round(r[2], 2), slow.get(sid), nodes[sid], window.get(sid, 0.0))
            for sid, r in sums.items()}
