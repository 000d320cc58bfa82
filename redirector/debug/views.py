"""The debug endpoints' answers as JSON-able data, built from plain facts. Pure: no I/O, no clock.

Each function takes what the shell read (the agent's facts, the kernel's keys, the backend's
description) and returns ``(status, body)`` or a body; ``redirector.debug.text`` renders the same
bodies as aligned tables for people.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from redirector.debug.netlink import ListeningSocket
from redirector.debug.pages import paginate
from redirector.debug.source import SyncFacts
from redirector.model import DesiredState, Entry, Key, diff

MAX_LIST_ITEMS = 100  # lists inside a backend description (iptables rules) are cut to this many


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def health_view(facts: SyncFacts, now: float, timeout: float) -> tuple[int, dict[str, Any]]:
    """kube-proxy's healthz: healthy while the loop runs and the last successful sync is recent enough.

    Before the first sync the agent is given ``timeout`` of grace (it may be waiting for the API server);
    after it, a periodic full resync refreshes the time even when nothing changes.
    """
    age = None if facts.last_success is None else max(0.0, now - facts.last_success)
    since_start = max(0.0, now - facts.started)
    if not facts.loop_alive:
        healthy, reason = False, "the sync loop is not running"
    elif age is None:
        healthy = since_start <= timeout
        reason = (f"starting: no successful sync yet ({since_start:.1f}s since start, grace {timeout:g}s)"
                  if healthy else f"no successful sync in the {since_start:.1f}s since start (threshold {timeout:g}s)")
    elif age > timeout:
        healthy, reason = False, f"the last successful sync is {age:.1f}s old (threshold {timeout:g}s)"
    else:
        healthy, reason = True, "ok"
    body = {
        "status": "ok" if healthy else "unhealthy",
        "reason": reason,
        "lastUpdated": rfc3339(facts.last_success),
        "currentTime": rfc3339(now),
        "ageSeconds": None if age is None else round(age, 3),
        "thresholdSeconds": timeout,
        "loopAlive": facts.loop_alive,
        "firstSyncDone": facts.first_sync_done,
        "fullSyncPending": facts.full_sync_pending,
        "lastFullSync": rfc3339(facts.last_full_sync),
        "lastIncrementalSync": rfc3339(facts.last_incremental_sync),
        "lastError": facts.last_error,
        "lastErrorTime": rfc3339(facts.last_error_time),
        "watchConnected": facts.watch_connected,
        "resourceVersion": facts.resource_version,
    }
    return (200 if healthy else 503), body


def ready_view(
    facts: SyncFacts, proxy_port: int, listeners: Sequence[ListeningSocket] | None, probe_error: str | None = None
) -> tuple[int, dict[str, Any]]:
    """Ready once the first full sync is done and something LISTENs on the proxy port (per sock_diag)."""
    found = [{"family": s.family, "address": s.address, "port": s.port} for s in listeners or ()]
    if not facts.first_sync_done:
        ready, reason = False, "the first full sync has not completed yet"
    elif probe_error is not None:
        ready, reason = False, f"cannot check the proxy port: {probe_error}"
    elif not found:
        ready, reason = False, f"nothing listens on TCP port {proxy_port} (the proxy is down): redirected traffic would be refused"
    elif facts.proxy_in_sync is False:
        ready, reason = False, f"Envoy is not in sync with the control plane: {facts.proxy_detail}"
    else:
        ready, reason = True, "ok"
    body = {"status": "ready" if ready else "not ready", "reason": reason, "firstSyncDone": facts.first_sync_done,
            "proxyPort": proxy_port, "listeners": found, "proxyInSync": facts.proxy_in_sync,
            "proxyDetail": facts.proxy_detail}
    return (200 if ready else 503), body


def entry_row(key: Key, entry: Entry | None) -> dict[str, Any]:
    """One redirect key (plus its owner, when the desired state names one)."""
    return {
        "key": str(key),
        "family": key.family,
        "ip": key.ip,
        "port": key.port,
        "match": "nodePort" if key.ip is None else "address",
        "kind": entry.kind if entry is not None else None,
        "owner": str(entry.owner) if entry is not None else None,
    }


def services_view(desired: DesiredState, *, limit: int | None, token: str | None) -> dict[str, Any]:
    """The desired state per labelled Service (entries, unserved ports, error), one page of Services."""
    records: dict[tuple[str, str], dict[str, Any]] = {}

    def record(namespace: str, name: str) -> dict[str, Any]:
        return records.setdefault((namespace, name), {"namespace": namespace, "name": name, "entries": [],
                                                      "unserved": [], "error": None})

    for key, entry in desired.entries.items():
        record(entry.owner.namespace, entry.owner.name)["entries"].append(entry_row(key, entry))
    for unserved in desired.unserved:
        record(unserved.owner.namespace, unserved.owner.name)["unserved"].append(
            {"port_name": unserved.owner.port_name, "protocol": unserved.protocol, "port": unserved.port})
    for sid, message in desired.errors.items():
        namespace, _, name = sid.partition("/")
        record(namespace, name)["error"] = message
    page = paginate(list(records.values()), lambda r: (r["namespace"], r["name"]), kind="services",
                    limit=limit, token=token)
    for rec in page.items:
        rec["entries"].sort(key=lambda row: (row["family"], row["ip"] is None, row["ip"] or "", row["port"]))
    return {
        "total_services": page.total,
        "total_entries": len(desired.entries),
        "total_unserved_ports": len(desired.unserved),
        "services": page.items,
        "continue": page.next_token,
    }


def rules_view(
    kernel: Iterable[Key], description: Mapping[str, Any], desired: DesiredState, *, limit: int | None,
    token: str | None,
) -> dict[str, Any]:
    """What the kernel holds (read back), one page of keys, plus the backend's table/chain description."""
    page = paginate(list(kernel), Key.sort_key, kind="rules", limit=limit, token=token)
    described, truncated = bounded(dict(description))
    return {
        "backend": description.get("backend"),
        "kernel": described,
        "truncated": truncated,
        "total": page.total,
        "entries": [entry_row(key, desired.entries.get(key)) for key in page.items],
        "continue": page.next_token,
    }


def diff_view(desired: DesiredState, kernel: Iterable[Key], *, limit: int) -> dict[str, Any]:
    """Desired vs actual: entries missing from the kernel, extra entries in it (at most ``limit`` each)."""
    delta = diff(desired.keys(), kernel)
    missing, extra = sorted(delta.add), sorted(delta.delete)
    return {
        "in_sync": not delta,
        "missing_total": len(missing),
        "extra_total": len(extra),
        "missing": [entry_row(key, desired.entries.get(key)) for key in missing[:limit]],
        "extra": [entry_row(key, None) for key in extra[:limit]],
    }


def bounded(value: Any, path: str = "", limit: int = MAX_LIST_ITEMS) -> tuple[Any, dict[str, int]]:
    """``value`` with every list cut to ``limit`` items; the cut lists' paths and original lengths."""
    cut: dict[str, int] = {}
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out[str(k)], sub = bounded(v, f"{path}.{k}" if path else str(k), limit)
            cut.update(sub)
        return out, cut
    if isinstance(value, list | tuple):
        items = []
        for i, v in enumerate(value[:limit]):
            item, sub = bounded(v, f"{path}[{i}]", limit)
            items.append(item)
            cut.update(sub)
        if len(value) > limit:
            cut[path] = len(value)
        return items, cut
    return value, cut
