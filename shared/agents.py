"""The node agents' Leases, read: which agents are alive and what each has prepared for a handover.

One parser for everyone who waits on the agents: the CLI (``cli.handover``, ``cli.uninstall``) and the
webhook's handover controller (``webhook.handover``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
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


def live_agents(leases: Iterable[Mapping[str, Any]], now: datetime) -> dict[str, set[str]]:
    """node -> Services it prepared, for agents whose Lease is current (pure)."""
    out: dict[str, set[str]] = {}
    for lease in leases:
        meta, spec = lease.get("metadata") or {}, lease.get("spec") or {}
        name = str(meta.get("name") or "")
        if not name.startswith(c.AGENT_LEASE_PREFIX):
            continue
        renewed, duration = _time(spec.get("renewTime")), spec.get("leaseDurationSeconds")
        if renewed is None or not isinstance(duration, int) or (now - renewed).total_seconds() > duration:
            continue  # expired (or unreadable): that node does not block
        try:
            prepared = json.loads((meta.get("annotations") or {}).get(c.PREPARED_ANNOTATION) or "[]")
        except ValueError:
            prepared = []
        node = str(spec.get("holderIdentity") or name.removeprefix(c.AGENT_LEASE_PREFIX))
        out[node] = {str(p) for p in prepared} if isinstance(prepared, list) else set()
    return out
