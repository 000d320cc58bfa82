"""Labelled Services -> redirect entries. Pure: no I/O, never raises on odd input.

``service_entries`` computes one Service; ``DesiredIndex`` keeps the result per Service so a watch event
recomputes ONE Service (microseconds) instead of all of them, and knows which keys changed.
Several Services may claim one key (an externalIP equal to another Service's ClusterIP, a NodePort the
apiserver would have refused): the kernel holds the key once, the smallest owner wins deterministically and
every loser gets an error, so nothing is silently dropped.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

from redirector.model import Delta, DesiredState, Entry, Key, Kind, Owner, UnservedPort
from redirector.service_fields import addresses, describe, families, mapping, ports
from redirector.service_fields import parse_ip as parse_ip  # re-exported: the debug lookup parses with it
from shared import policy

ServiceId = str  # "namespace/name"
_V = TypeVar("_V")
NODE_PORT_TYPES = frozenset({"NodePort", "LoadBalancer"})


@dataclass(frozen=True)
class ServiceEntries:
    """What one Service asks for: its keys and how it claims each, its unserved ports, its own errors.

    The sync path needs only ``keys``; the ``Entry``/``Owner`` objects (frozen dataclasses, ~0.5 µs each) are
    built on first use of ``entries`` (debug endpoints, duplicate-key errors), not for every Service listed.
    """

    namespace: str = ""
    name: str = ""
    keys: tuple[Key, ...] = ()  # one per entry, no duplicates
    claims: tuple[tuple[Kind, str], ...] = ()  # (kind, port name) of each key, in the same order
    unserved: tuple[UnservedPort, ...] = ()
    errors: tuple[str, ...] = ()

    @cached_property
    def entries(self) -> tuple[Entry, ...]:
        owners: dict[str, Owner] = {}
        entries = []
        for key, (kind, port_name) in zip(self.keys, self.claims, strict=True):
            owner = owners.get(port_name) or owners.setdefault(port_name, Owner(self.namespace, self.name, port_name))
            entries.append(Entry(key, kind, owner))
        return tuple(entries)

    def entry(self, key: Key) -> Entry:
        """This Service's entry for one of its keys."""
        return self.entries[self.keys.index(key)]


EMPTY = ServiceEntries()


def service_id(service: Mapping[str, Any]) -> ServiceId:
    """"namespace/name", interned: the kernel index, the control plane and every EndpointSlice view of the
    Service hold one string, not one each."""
    meta = mapping(service.get("metadata"))
    return sys.intern(f"{meta.get('namespace') or 'default'}/{meta.get('name') or ''}")


def service_entries(service: Mapping[str, Any]) -> ServiceEntries:
    """The redirect entries of one (labelled) Service: ``project_entries``, shared while someone holds it.

    The kernel side and the control plane both project every Service the watch delivers; an object's uid
    and resourceVersion name its content, so the second projection of the same object is the first one's
    result (one copy of 10,000 Services' keys instead of two). Objects without both are projected afresh.
    """
    meta = mapping(service.get("metadata"))
    uid, version = meta.get("uid"), meta.get("resourceVersion")
    if not (isinstance(uid, str) and uid and isinstance(version, str) and version):
        return project_entries(service)
    memo = (uid, version)
    with _SHARED_LOCK:
        found = _SHARED.get(memo)
    if found is not None:
        return found
    found = project_entries(service)
    if found is not EMPTY:
        with _SHARED_LOCK:
            found = _SHARED.setdefault(memo, found)
    return found


_SHARED: weakref.WeakValueDictionary[tuple[str, str], ServiceEntries] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def project_entries(service: Mapping[str, Any]) -> ServiceEntries:
    """The redirect entries of one (labelled) Service, computed.

    ClusterIPs, externalIPs and load-balancer ingress IPs x every TCP port; NodePorts as
    ``Key(family, None, nodePort)`` for each of the Service's IP families. Headless and ExternalName
    Services have no virtual IP: nothing. Non-TCP ports are reported as unserved. A malformed IP or port
    is skipped with an error; the Service's other entries stay.
    """
    meta = mapping(service.get("metadata"))
    spec = mapping(service.get("spec"))
    svc_type = spec.get("type") or "ClusterIP"
    if type(svc_type) is not str or svc_type not in policy.ELIGIBLE_TYPES or spec.get("clusterIP") == "None":
        return EMPTY  # a list or map as type (unhashable) is no Service we could serve either
    namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
    errors: list[str] = []
    found = addresses(spec, service, errors)
    node_ports = svc_type in NODE_PORT_TYPES
    node_families = families(spec, found) if node_ports else ()
    claims: dict[Key, tuple[Kind, str]] = {}  # the first claim of a key wins (an IP listed twice)
    unserved: list[UnservedPort] = []
    raw_ports = spec.get("ports")
    raw_ports = raw_ports if isinstance(raw_ports, list) else []
    for index, port in enumerate(ports(service, raw_ports)):
        port_name, number, protocol = port
        if number is None or not 0 < number < 65536:
            errors.append(f"port {describe(port)} has no valid port number: skipped")
            continue
        if protocol != policy.PROXY_PROTOCOL:
            unserved.append(UnservedPort(Owner(namespace, name, port_name), protocol, number))
            continue
        for kind, family, ip in found:
            key = Key(family, ip, number)
            if key not in claims:
                claims[key] = _claim(kind, port_name)
        if node_ports:
            node_port = mapping(raw_ports[index]).get("nodePort")
            if node_port is None:
                continue
            if type(node_port) is not int or not 0 < node_port < 65536:
                errors.append(f"port {describe(port)} has an invalid nodePort {node_port!r}: skipped")
                continue
            for family in node_families:
                key = Key(family, None, node_port)
                if key not in claims:
                    claims[key] = _claim("nodePort", port_name)
    return ServiceEntries(namespace, name, tuple(claims), tuple(claims.values()), tuple(unserved), tuple(errors))


def _claim(kind: Kind, port_name: str) -> tuple[Kind, str]:
    """The one shared (kind, port name) tuple of its value: 10,000 Services hold a few dozen, not 20,000 (a
    full sync allocates fewer objects for the GC to scan, and the index is smaller)."""
    return shared_value(_CLAIMS, (kind, port_name), _CLAIMS_MAX)


def shared_value(table: dict[_V, _V], value: _V, limit: int) -> _V:
    """The one object equal to ``value`` in ``table`` (added if new; the table is emptied past ``limit``
    entries, so odd input cannot grow it without bound): many equal small tuples become one."""
    if len(table) > limit:
        table.clear()
    return table.setdefault(value, value)


_CLAIMS: dict[tuple[Kind, str], tuple[Kind, str]] = {}
_CLAIMS_MAX = 100_000


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
    # Every desired key -> one Service claiming it; the keys claimed by several -> all of them. A key has one
    # claimant nearly always: no container per key (20,000 fewer objects for the GC to scan in a full sync).
    _claims: dict[Key, ServiceId] = field(default_factory=dict)
    _contested: dict[Key, set[ServiceId]] = field(default_factory=dict)
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
        return self.put(service_id(service), service_entries(service))

    def remove(self, sid: ServiceId) -> Delta:
        """Forget a Service (deleted, or no longer labelled)."""
        return self.put(sid, None)

    def put(self, sid: ServiceId, entries: ServiceEntries | None) -> Delta:
        """Set one Service's already computed entries (None: gone)."""
        batch = _Batch()
        self._set(sid, entries, batch)
        return self._delta(batch)

    def replace_all(self, services: Iterable[Mapping[str, Any]]) -> Delta:
        """A fresh list: upsert every listed Service and remove the ones that are gone."""
        return self.replace_entries((service_id(s), service_entries(s)) for s in services)

    def replace_entries(self, listed: Iterable[tuple[ServiceId, ServiceEntries]]) -> Delta:
        """``replace_all`` for already computed entries."""
        seen: set[ServiceId] = set()
        batch = _Batch()
        for sid, entries in listed:
            seen.add(sid)
            self._set(sid, entries, batch)
        for sid in [s for s in self._services if s not in seen]:
            self._set(sid, None, batch)
        return self._delta(batch)

    def keys(self) -> frozenset[Key]:
        return frozenset(self._claims)

    def has_key(self, key: Key) -> bool:
        return key in self._claims

    def entry(self, key: Key) -> Entry | None:
        return self._winner(key) if key in self._claims else None

    def state(self) -> DesiredState:
        """The full desired state: winning entry per key, unserved ports, errors per Service."""
        contested = self._contested
        entries = {e.key: e for se in self._services.values() for e in se.entries if e.key not in contested}
        unserved = sorted(u for se in self._services.values() for u in se.unserved)
        errors = {sid: "; ".join(se.errors) for sid, se in self._services.items() if se.errors}
        for key in sorted(contested):
            winner = entries[key] = self._winner(key)
            for sid in sorted(contested[key]):
                entry = self._services[sid].entry(key)
                if entry is winner:
                    continue
                message = f"{key} is also claimed by {winner.owner} ({winner.kind}), which wins"
                errors[sid] = f"{errors[sid]}; {message}" if sid in errors else message
        return DesiredState(entries=entries, unserved=unserved, errors=errors)

    def _set(self, sid: ServiceId, new: ServiceEntries | None, batch: _Batch) -> None:
        """Replace one Service's entries, recording in ``batch`` the keys that stop or start being desired."""
        old = self._services.get(sid)
        if old is None and new is None:
            return
        if old is not None and new is not None and old == new:
            return
        claims, contested = self._claims, self._contested
        kept: frozenset[Key] = _NO_KEYS
        if old is not None:
            self.unserved_count -= len(old.unserved)
            self.error_count -= bool(old.errors)
            kept = frozenset(old.keys).intersection(new.keys) if new is not None else kept
            for key in old.keys:
                if key in kept:
                    continue
                others = contested.get(key)
                if others is None:  # its only claimant
                    del claims[key]
                    if key not in batch.appeared:
                        batch.vanished.add(key)
                    continue
                others.remove(sid)
                claims[key] = next(iter(others))
                if len(others) == 1:
                    del contested[key]
        if new is None:
            del self._services[sid]
            return
        self._services[sid] = new
        self.unserved_count += len(new.unserved)
        self.error_count += bool(new.errors)
        for key in new.keys:
            holder = claims.get(key)
            if holder is None:
                claims[key] = sid
                if key not in batch.vanished:
                    batch.appeared.add(key)
            elif key not in kept:
                contested.setdefault(key, {holder}).add(sid)

    def _delta(self, batch: _Batch) -> Delta:
        """The batch's net change: keys absent before it and desired now, and the reverse (set operations
        in C: a full sync touches 20,000 keys)."""
        if not batch.appeared and not batch.vanished:
            return _NO_CHANGE
        claims = self._claims
        return Delta(add=frozenset(claims.keys() & batch.appeared), delete=frozenset(batch.vanished.difference(claims)))

    def _winner(self, key: Key) -> Entry:
        """The entry the kernel holds for a key: the smallest owner's (then kind), whatever the order of
        events."""
        claimants = self._contested.get(key) or (self._claims[key],)
        entries = [self._services[sid].entry(key) for sid in claimants]
        return entries[0] if len(entries) == 1 else min(entries, key=lambda e: (e.owner, e.kind))


_NO_CHANGE = Delta()
_NO_KEYS: frozenset[Key] = frozenset()


@dataclass
class _Batch:
    """The keys whose claims changed in one batch, by whether they were desired BEFORE their first change
    in it: a key deleted then re-added within the batch is no change (so the batch's net delta is exact)."""

    appeared: set[Key] = field(default_factory=set)  # not desired before the batch
    vanished: set[Key] = field(default_factory=set)  # desired before the batch
