"""EndpointSlices -> the endpoints a Service port sends to, on this node. Pure, never raises on odd input.

``project_slice`` keeps what the translation needs of one EndpointSlice (a few tuples, not the API dict);
``select`` applies kube-proxy's rules (pkg/proxy/topology.go, CategorizeEndpoints and topologyModeFromHints,
as of Kubernetes v1.33) to the slices of one Service: ready endpoints; when none is ready, the
serving+terminating ones (KEP-1669); with a Local traffic policy only this node's, with the same fallback
among them; otherwise topology hints (trafficDistribution PreferSameNode/PreferClose/PreferSameZone, or
topology-aware routing) narrow the set to this node's or this zone's endpoints when EVERY ready endpoint
carries hints and at least one names this node (zone) -- else all endpoints, exactly as kube-proxy falls back.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redirector.desired import shared_value
from redirector.model import Family
from redirector.service_fields import parse_ip

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
Endpoint = tuple[str, int]  # (ip, port)


@dataclass(frozen=True, slots=True)
class EndpointView:
    """One endpoint's addresses and conditions (nil conditions defaulted as the API documents them)."""

    addresses: tuple[str, ...]
    ready: bool
    serving: bool
    terminating: bool
    node: str | None = None
    zone: str | None = None
    zone_hints: frozenset[str] = frozenset()  # hints.forZones
    node_hints: frozenset[str] = frozenset()  # hints.forNodes


@dataclass(frozen=True, slots=True)
class SliceView:
    """What the translation needs of one EndpointSlice."""

    name: str  # "namespace/slice-name"
    service: str  # "namespace/service-name" (the kubernetes.io/service-name label)
    family: Family
    ports: tuple[tuple[str, int], ...]  # (port name, number) of its TCP ports
    endpoints: tuple[EndpointView, ...]


def slice_id(obj: Mapping[str, Any]) -> str:
    meta = _mapping(obj.get("metadata"))
    return f"{meta.get('namespace') or 'default'}/{meta.get('name') or ''}"


def project_slice(obj: Mapping[str, Any]) -> SliceView | None:
    """None for a slice that belongs to no Service or has an address type we do not proxy (FQDN)."""
    meta = _mapping(obj.get("metadata"))
    service = _mapping(meta.get("labels")).get(SERVICE_NAME_LABEL)
    address_type = obj.get("addressType")
    family: Family | None = 4 if address_type == "IPv4" else 6 if address_type == "IPv6" else None
    if not isinstance(service, str) or not service or family is None:
        return None
    ports: list[tuple[str, int]] = []
    for raw in _list(obj.get("ports")):
        p = _mapping(raw)
        number, name, protocol = p.get("port"), p.get("name"), p.get("protocol", "TCP")
        if protocol not in ("TCP", None) or type(number) is not int or not 0 < number < 65536:
            continue  # another protocol's port, or no number: nothing we could connect to
        ports.append((name if isinstance(name, str) else "", number))
    endpoints: list[EndpointView] = []
    for raw in _list(obj.get("endpoints")):
        ep = _mapping(raw)
        addresses = tuple(a for a in (_address(x, family) for x in _list(ep.get("addresses"))) if a is not None)
        if not addresses:
            continue  # an endpoint with no (valid) address serves nothing
        cond = _mapping(ep.get("conditions"))
        ready = cond.get("ready") is not False  # nil means ready
        serving = cond.get("serving") is not False if cond.get("serving") is not None else ready
        terminating = cond.get("terminating") is True
        node = ep.get("nodeName")
        zone = ep.get("zone")
        hints = _mapping(ep.get("hints"))
        endpoints.append(EndpointView(addresses, ready, serving, terminating,
                                      sys.intern(node) if isinstance(node, str) else None,
                                      sys.intern(zone) if isinstance(zone, str) else None,
                                      _names(hints.get("forZones")), _names(hints.get("forNodes"))))
    namespace = str(meta.get("namespace") or "default")
    return SliceView(slice_id(obj), sys.intern(f"{namespace}/{service}"), family, _shared(tuple(ports)),
                     tuple(endpoints))


def _shared(ports: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
    """One object per distinct port list: 20,000 slices hold a handful (~100 bytes each otherwise)."""
    return shared_value(_PORTS, ports, _PORTS_MAX)


_PORTS: dict[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]] = {}
_PORTS_MAX = 10_000


def select(slices: Iterable[SliceView], port_name: str, family: Family, *, node: str | None = None,
           local: bool = False, zone: str | None = None) -> tuple[Endpoint, ...]:
    """The (ip, port) a Service port of one IP family sends new connections to, sorted and deduplicated.

    ``local``: a Local traffic policy: only endpoints on ``node`` (hints do not apply). Otherwise topology
    hints for ``node``/``zone`` when they apply (``topology_mode``). Ready endpoints first; when none is
    ready, the ones still serving while terminating (their connections drain instead of being refused).
    """
    found: list[tuple[Endpoint, EndpointView]] = []
    for view in slices:
        if view.family != family:
            continue
        number = next((n for name, n in view.ports if name == port_name), None)
        if number is None:
            continue
        found.extend(((ep.addresses[0], number), ep) for ep in view.endpoints)
    if local:
        found = [(e, ep) for e, ep in found if node is not None and ep.node == node]
        mode = None
    else:
        mode = topology_mode([ep for _, ep in found], node, zone)
    ready: set[Endpoint] = set()
    fallback: set[Endpoint] = set()
    for endpoint, ep in found:
        if mode == "node" and node not in ep.node_hints or mode == "zone" and zone not in ep.zone_hints:
            continue
        if ep.ready and not ep.terminating:
            ready.add(endpoint)
        elif ep.serving and ep.terminating:
            fallback.add(endpoint)
    return tuple(sorted(ready or fallback))


def topology_mode(endpoints: Iterable[EndpointView], node: str | None, zone: str | None) -> str | None:
    """kube-proxy's topologyModeFromHints: "node" when every ready endpoint has node hints and one names
    this node; else "zone" likewise for zone hints; else None (all endpoints)."""
    ready = [ep for ep in endpoints if ep.ready]
    if not ready:
        return None
    if all(ep.node_hints for ep in ready) and node is not None and any(node in ep.node_hints for ep in ready):
        return "node"
    if all(ep.zone_hints for ep in ready) and zone is not None and any(zone in ep.zone_hints for ep in ready):
        return "zone"
    return None


_NO_NAMES: frozenset[str] = frozenset()


def _names(value: object) -> frozenset[str]:
    """Hint names, interned (one zone or node name is shared by thousands of endpoints); most endpoints have
    none: one shared empty set instead of 200 bytes each (16 MiB at 80,000 endpoints)."""
    names = frozenset(sys.intern(str(h.get("name"))) for h in (_mapping(x) for x in _list(value))
                      if isinstance(h.get("name"), str))
    return names or _NO_NAMES


def _address(value: object, family: Family) -> str | None:
    """Canonical text of an endpoint address of ``family`` (the API allows only one address per endpoint
    to be used; consumers take the first)."""
    if not isinstance(value, str):
        return None
    parsed = parse_ip(value)
    if parsed is None or parsed[0] != family:
        return None
    return parsed[1]


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
