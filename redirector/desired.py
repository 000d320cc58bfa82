"""Labelled Services -> redirect entries. Pure: no I/O, never raises on odd input.

``service_entries`` computes one Service; ``DesiredIndex`` keeps the result per Service so a watch event
recomputes ONE Service (microseconds) instead of all of them, and knows which keys changed.
Several Services may claim one key (an externalIP equal to another Service's ClusterIP, a NodePort the
apiserver would have refused): the kernel holds the key once, the smallest owner wins deterministically and
every loser gets an error, so nothing is silently dropped.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from redirector.model import Delta, DesiredState, Entry, Family, Key, Kind, Owner, UnservedPort
from shared import policy

ServiceId = str  # "namespace/name"
NODE_PORT_TYPES = frozenset({"NodePort", "LoadBalancer"})


@dataclass(frozen=True)
class ServiceEntries:
    """What one Service asks for: its entries (one per key), its unserved ports, its own errors."""

    entries: tuple[Entry, ...] = ()
    unserved: tuple[UnservedPort, ...] = ()
    errors: tuple[str, ...] = ()


EMPTY = ServiceEntries()


def service_id(service: Mapping[str, Any]) -> ServiceId:
    meta = _mapping(service.get("metadata"))
    return f"{meta.get('namespace') or 'default'}/{meta.get('name') or ''}"


def service_entries(service: Mapping[str, Any]) -> ServiceEntries:
    """The redirect entries of one (labelled) Service.

    ClusterIPs, externalIPs and load-balancer ingress IPs x every TCP port; NodePorts as
    ``Key(family, None, nodePort)`` for each of the Service's IP families. Headless and ExternalName
    Services have no virtual IP: nothing. Non-TCP ports are reported as unserved. A malformed IP or port
    is skipped with an error; the Service's other entries stay.
    """
    meta = _mapping(service.get("metadata"))
    spec = _mapping(service.get("spec"))
    svc_type = spec.get("type") or "ClusterIP"
    if svc_type not in policy.ELIGIBLE_TYPES or spec.get("clusterIP") == "None":
        return EMPTY
    namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
    errors: list[str] = []

    addresses: list[tuple[Kind, Family, str]] = []
    for kind, raw in _addresses(spec, service):
        parsed = _IP_CACHE.get(raw) or parse_ip(raw)
        if parsed is None:
            errors.append(f"{kind} {raw!r} is not an IP address: skipped")
            continue
        addresses.append((kind, parsed[0], parsed[1]))

    node_ports = svc_type in NODE_PORT_TYPES
    families = _families(spec, addresses) if node_ports else ()
    by_key: dict[Key, Entry] = {}
    unserved: list[UnservedPort] = []
    raw_ports = spec.get("ports")
    raw_ports = raw_ports if isinstance(raw_ports, list) else []
    for index, port in enumerate(policy.service_ports(service)):
        if port.port is None or not 0 < port.port < 65536:
            errors.append(f"port {port.describe()} has no valid port number: skipped")
            continue
        if port.protocol != policy.PROXY_PROTOCOL:
            unserved.append(UnservedPort(Owner(namespace, name, port.name), port.protocol, port.port))
            continue
        owner = Owner(namespace, name, port.name)
        for kind, family, ip in addresses:
            key = Key(family, ip, port.port)
            if key not in by_key:
                by_key[key] = Entry(key, kind, owner)
        if node_ports and index < len(raw_ports):
            node_port = _mapping(raw_ports[index]).get("nodePort")
            if node_port is None:
                continue
            if not isinstance(node_port, int) or isinstance(node_port, bool) or not 0 < node_port < 65536:
                errors.append(f"port {port.describe()} has an invalid nodePort {node_port!r}: skipped")
                continue
            for family in families:
                key = Key(family, None, node_port)
                if key not in by_key:
                    by_key[key] = Entry(key, "nodePort", owner)
    return ServiceEntries(tuple(by_key.values()), tuple(unserved), tuple(errors))


def parse_ip(raw: str) -> tuple[Family, str] | None:
    """(family, canonical text) of an IP literal, or None. Strict (no zone, no leading zeros) and cached:
    the C parser plus the cache make 10,000 Services parse in milliseconds, unlike ``ipaddress``."""
    hit = _IP_CACHE.get(raw)
    if hit is not None or raw in _IP_CACHE:
        return hit
    result: tuple[Family, str] | None = None
    for family, af in ((4, socket.AF_INET), (6, socket.AF_INET6)):
        try:
            result = (family, socket.inet_ntop(af, socket.inet_pton(af, raw)))  # type: ignore[assignment]
            break
        except (OSError, ValueError, TypeError):
            continue
    if len(_IP_CACHE) > _IP_CACHE_MAX:
        _IP_CACHE.clear()
    _IP_CACHE[raw] = result
    return result


_IP_CACHE: dict[str, tuple[Family, str] | None] = {}
_IP_CACHE_MAX = 200_000


def desired_state(services: Iterable[Mapping[str, Any]]) -> DesiredState:
    """All Services at once (the same rules as the incremental index)."""
    index = DesiredIndex()
    for service in services:
        index.upsert(service)
    return index.state()


@dataclass
class DesiredIndex:
    """Per-Service entries plus, per key, which Services claim it. Updating one Service is O(its entries)."""

    _services: dict[ServiceId, ServiceEntries] = field(default_factory=dict)
    _claims: dict[Key, dict[ServiceId, Entry]] = field(default_factory=dict)
    _contested: set[Key] = field(default_factory=set)
    unserved_count: int = 0  # unserved ports over all Services (kept up to date for metrics)
    error_count: int = 0  # Services with an error of their own (duplicates come on top, see state())

    def __len__(self) -> int:
        return len(self._services)

    def __contains__(self, sid: object) -> bool:
        return sid in self._services

    def service_ids(self) -> Iterator[ServiceId]:
        return iter(self._services)

    def get(self, sid: ServiceId) -> ServiceEntries | None:
        return self._services.get(sid)

    def upsert(self, service: Mapping[str, Any]) -> Delta:
        """(Re)compute one Service. Returns how the SET of desired keys changed."""
        touched: dict[Key, bool] = {}
        self._set(service_id(service), service_entries(service), touched)
        return self._delta(touched)

    def remove(self, sid: ServiceId) -> Delta:
        """Forget a Service (deleted, or no longer labelled)."""
        return self.put(sid, None)

    def put(self, sid: ServiceId, entries: ServiceEntries | None) -> Delta:
        """Set one Service's already computed entries (None: gone)."""
        touched: dict[Key, bool] = {}
        self._set(sid, entries, touched)
        return self._delta(touched)

    def replace_all(self, services: Iterable[Mapping[str, Any]]) -> Delta:
        """A fresh list: upsert every listed Service and remove the ones that are gone."""
        return self.replace_entries((service_id(s), service_entries(s)) for s in services)

    def replace_entries(self, listed: Iterable[tuple[ServiceId, ServiceEntries]]) -> Delta:
        """``replace_all`` for already computed entries."""
        seen: set[ServiceId] = set()
        touched: dict[Key, bool] = {}
        for sid, entries in listed:
            seen.add(sid)
            self._set(sid, entries, touched)
        for sid in [s for s in self._services if s not in seen]:
            self._set(sid, None, touched)
        return self._delta(touched)

    def keys(self) -> frozenset[Key]:
        return frozenset(self._claims)

    def has_key(self, key: Key) -> bool:
        return key in self._claims

    def entry(self, key: Key) -> Entry | None:
        claimants = self._claims.get(key)
        return None if not claimants else _winner(claimants)

    def state(self) -> DesiredState:
        """The full desired state: winning entry per key, unserved ports, errors per Service."""
        entries = {key: _winner(claimants) for key, claimants in self._claims.items()}
        unserved = sorted(u for se in self._services.values() for u in se.unserved)
        errors = {sid: "; ".join(se.errors) for sid, se in self._services.items() if se.errors}
        for key in sorted(self._contested):
            winner = entries[key]
            for sid, entry in sorted(self._claims[key].items()):
                if entry is winner:
                    continue
                message = f"{key} is also claimed by {winner.owner} ({winner.kind}), which wins"
                errors[sid] = f"{errors[sid]}; {message}" if sid in errors else message
        return DesiredState(entries=entries, unserved=unserved, errors=errors)

    def _set(self, sid: ServiceId, new: ServiceEntries | None, touched: dict[Key, bool]) -> None:
        """Replace one Service's entries. ``touched`` records, for each key whose claims changed, whether
        it was desired BEFORE its first change in this batch (so a batch's net delta is exact)."""
        old = self._services.get(sid)
        if old is None and new is None:
            return
        if old is not None and new is not None and old == new:
            return
        claims = self._claims
        if old is not None:
            self.unserved_count -= len(old.unserved)
            self.error_count -= bool(old.errors)
            new_keys = {e.key for e in new.entries} if new is not None else set()
            for entry in old.entries:
                key = entry.key
                if key in new_keys:
                    continue
                claimants = claims[key]
                del claimants[sid]
                if not claimants:
                    del claims[key]
                    touched.setdefault(key, True)
                elif len(claimants) == 1:
                    self._contested.discard(key)
        if new is None:
            del self._services[sid]
            return
        self._services[sid] = new
        self.unserved_count += len(new.unserved)
        self.error_count += bool(new.errors)
        for entry in new.entries:
            key = entry.key
            found = claims.get(key)
            if found is None:
                claims[key] = {sid: entry}
                touched.setdefault(key, False)
            else:
                claimants = found
                claimants[sid] = entry
                if len(claimants) > 1:
                    self._contested.add(key)

    def _delta(self, touched: dict[Key, bool]) -> Delta:
        if not touched:
            return _NO_CHANGE
        claims = self._claims
        add = frozenset(k for k, before in touched.items() if not before and k in claims)
        delete = frozenset(k for k, before in touched.items() if before and k not in claims)
        return Delta(add, delete)


_NO_CHANGE = Delta()


def _winner(claimants: Mapping[ServiceId, Entry]) -> Entry:
    if len(claimants) == 1:
        return next(iter(claimants.values()))
    return min(claimants.values(), key=lambda e: (e.owner, e.kind))


def _addresses(spec: Mapping[str, Any], service: Mapping[str, Any]) -> list[tuple[Kind, str]]:
    cluster_ips = spec.get("clusterIPs")
    if type(cluster_ips) is not list or not cluster_ips:
        single = spec.get("clusterIP")
        cluster_ips = [single] if single else []
    found: list[tuple[Kind, str]] = [("clusterIP", str(ip)) for ip in cluster_ips if ip and ip != "None"]
    external = spec.get("externalIPs")
    if external:
        found += [("externalIP", str(ip)) for ip in (external if isinstance(external, list) else [])]
    status = service.get("status")
    if status:
        ingress = _mapping(_mapping(status).get("loadBalancer")).get("ingress")
        for item in ingress if isinstance(ingress, list) else []:
            ip = _mapping(item).get("ip")
            if ip:  # hostname-only ingress has nothing to match on
                found.append(("loadBalancer", str(ip)))
    return found


def _families(spec: Mapping[str, Any], addresses: list[tuple[Kind, Family, str]]) -> tuple[Family, ...]:
    """The Service's IP families (spec.ipFamilies), else those of its ClusterIPs, else IPv4."""
    raw = spec.get("ipFamilies")
    found: list[Family] = []
    for value in raw if isinstance(raw, list) else []:
        family: Family | None = 4 if value == "IPv4" else 6 if value == "IPv6" else None
        if family is not None and family not in found:
            found.append(family)
    if not found:
        for kind, fam, _ in addresses:
            if kind == "clusterIP" and fam not in found:
                found.append(fam)
    return tuple(found) or (4,)


def _mapping(value: object) -> Mapping[str, Any]:
    if type(value) is dict:  # the common case, without the slow ABC check
        return value
    return value if isinstance(value, Mapping) else {}
