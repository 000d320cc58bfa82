"""/debug/lookup: would a TCP connection from a pod to ip:port be redirected on this node? Pure.

The answer follows the kernel's own order of evaluation (see ``redirector.nftshape``): first the
address . port sets, then the NodePort set, which only matches when the destination is a local address
(``fib daddr type local``). The kernel's keys decide; the desired state only names the owner and explains
a miss (drift). When nothing redirects, the cluster's Services (one list from the API) say whether the
address belongs to a Service kube-proxy (or another proxy) handles, or to none.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redirector.debug.pages import BadRequest
from redirector.desired import parse_ip, service_entries
from redirector.model import DesiredState, Entry, Family, Key
from shared import constants as c
from shared import policy


@dataclass(frozen=True)
class Query:
    family: Family
    ip: str  # canonical text
    port: int

    @property
    def address_key(self) -> Key:
        return Key(self.family, self.ip, self.port)

    @property
    def node_port_key(self) -> Key:
        return Key(self.family, None, self.port)


def parse_query(ip: str | None, port: int | None) -> Query:
    """Validate the query parameters (BadRequest with the reason)."""
    if not ip:
        raise BadRequest("ip is required: an IPv4 or IPv6 address, e.g. ip=10.96.0.10")
    parsed = parse_ip(ip.strip())
    if parsed is None:
        raise BadRequest(f"ip {ip[:64]!r} is not an IPv4 or IPv6 address")
    if port is None:
        raise BadRequest("port is required: a TCP port 1-65535")
    if isinstance(port, bool) or not 1 <= port <= 65535:
        raise BadRequest(f"port must be between 1 and 65535, not {port}")
    return Query(parsed[0], parsed[1], port)


def is_local(ip: str, prefixes: Iterable[str]) -> bool:
    """Is ``ip`` inside one of the local routing table's local prefixes?"""
    address = ipaddress.ip_address(ip)
    for prefix in prefixes:
        try:
            if address in ipaddress.ip_network(prefix, strict=False):
                return True
        except (ValueError, TypeError):
            continue
    return False


def lookup(
    query: Query,
    *,
    kernel: frozenset[Key],
    desired: DesiredState,
    local_prefixes: Sequence[str],
    proxy_port: int,
    proxy_name: str = c.DEFAULT_PROXY_NAME,
    services: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The answer as JSON-able data. ``services`` None: the API was not consulted (or unavailable)."""
    local = is_local(query.ip, local_prefixes)
    answer: dict[str, Any] = {
        "query": {"ip": query.ip, "port": query.port, "family": query.family},
        "local_address": local,
        "redirected": False,
        "match": None,
        "key": None,
        "proxy_port": None,
        "service": None,
        "handled_by": "none",
        "in_kernel": False,
        "in_desired_state": False,
        "reason": "",
    }
    hit = _kernel_match(query, kernel, local)
    if hit is not None:
        key, match = hit
        entry = desired.entries.get(key)
        answer.update(redirected=True, match=match, key=str(key), proxy_port=proxy_port, in_kernel=True,
                      in_desired_state=entry is not None, handled_by="lightpath", service=_service(entry))
        how = "NodePort entry" if match == "nodePort" else "address entry"
        owner = (f"Service {entry.owner} ({entry.kind})" if entry is not None
                 else "no Service in the desired state (a stale entry: the next resync removes it)")
        answer["reason"] = (f"TCP to {_hostport(query)} is redirected to local port {proxy_port} by the kernel's "
                            f"{how} {key}, for {owner}")
        return answer

    wanted = _desired_match(query, desired, local)
    if wanted is not None:
        answer.update(in_desired_state=True, handled_by="lightpath", service=_service(wanted),
                      key=str(wanted.key), match="nodePort" if wanted.key.ip is None else "address")
        answer["reason"] = (f"NOT redirected: Service {wanted.owner} wants {wanted.key} but the kernel does not "
                            "hold it (drift or a sync in progress: the next resync adds it)")
        return answer

    if services is None:
        answer["handled_by"] = "unknown"
        answer["reason"] = "NOT redirected on this node; the API server was not consulted for other Services"
        return answer
    answer.update(_classify(query, local, services, proxy_name))
    return answer


def _kernel_match(query: Query, kernel: frozenset[Key], local: bool) -> tuple[Key, str] | None:
    if query.address_key in kernel:
        return query.address_key, "address"
    if local and query.node_port_key in kernel:
        return query.node_port_key, "nodePort"
    return None


def _desired_match(query: Query, desired: DesiredState, local: bool) -> Entry | None:
    entry = desired.entries.get(query.address_key)
    if entry is None and local:
        entry = desired.entries.get(query.node_port_key)
    return entry


def _classify(query: Query, local: bool, services: Sequence[Mapping[str, Any]], proxy_name: str) -> dict[str, Any]:
    """Who handles ip:port among all Services (the same entry rules as the desired state)."""
    address_owner: tuple[str, str] | None = None
    for svc in services:
        found = service_entries(svc)
        labels = (svc.get("metadata") or {}).get("labels") or {}
        value = labels.get(c.SERVICE_PROXY_NAME_LABEL) if isinstance(labels, Mapping) else None
        who = policy.handled_by(value if isinstance(value, str) else None, proxy_name)
        for entry in found.entries:
            if entry.key in (query.address_key, query.node_port_key if local else None):
                reason = {
                    "kube-proxy": "NOT redirected: kube-proxy handles this Service",
                    "lightpath": "NOT redirected: the Service is labelled for this proxy, but this agent has no "
                                 "entry for it (not synced yet, or another Service wins the key)",
                }.get(who, f"NOT redirected: the Service is labelled for another proxy ({value})")
                return {"handled_by": who, "service": _service(entry), "key": str(entry.key),
                        "reason": f"{reason}: {entry.owner} ({entry.kind} {entry.key})"}
            if entry.key.ip == query.ip and address_owner is None:
                address_owner = (f"{entry.owner.namespace}/{entry.owner.name}", who)
    if address_owner is not None:
        return {"handled_by": address_owner[1],
                "reason": f"NOT redirected: {query.ip} belongs to Service {address_owner[0]}, which has no TCP "
                          f"port {query.port}"}
    return {"handled_by": "none",
            "reason": f"NOT redirected: no Service has {_hostport(query)}; the connection goes wherever routing "
                      "sends it"}


def _service(entry: Entry | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    return {"namespace": entry.owner.namespace, "name": entry.owner.name, "port_name": entry.owner.port_name,
            "kind": entry.kind}


def _hostport(query: Query) -> str:
    return str(query.address_key)
