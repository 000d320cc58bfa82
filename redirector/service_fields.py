"""A Service object's fields as the redirector reads them: addresses, ports, IP families. Pure, never raises.

Split from ``redirector.desired`` (which turns them into entries) because these readers are where a full
sync spends its time: 10,000 Services are 10,000 walks over API dicts, so each reader takes the common
shape (what the apiserver returns) on a direct path and only odd input through the general one.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from redirector.model import Family, Kind
from shared import policy

Address = tuple[Kind, Family, str]  # (how the Service got it, family, canonical IP text)
Port = tuple[str, int | None, str]  # (name, number, protocol), with policy.service_ports' defaults


def addresses(spec: Mapping[str, Any], service: Mapping[str, Any], errors: list[str]) -> list[Address]:
    """ClusterIPs, externalIPs and load-balancer ingress IPs, parsed; a malformed one is an error, skipped."""
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
        ingress = mapping(mapping(status).get("loadBalancer")).get("ingress")
        for item in ingress if isinstance(ingress, list) else []:
            ip = mapping(item).get("ip")
            if ip:  # hostname-only ingress has nothing to match on
                found.append(("loadBalancer", str(ip)))
    parsed: list[Address] = []
    for kind, raw in found:
        hit = _IP_CACHE.get(raw) or parse_ip(raw)
        if hit is None:
            errors.append(f"{kind} {raw!r} is not an IP address: skipped")
        else:
            parsed.append((kind, hit[0], hit[1]))
    return parsed


def ports(service: Mapping[str, Any], raw_ports: list[Any]) -> list[Port]:
    """(name, port, protocol) of each of ``raw_ports`` (the Service's ``spec.ports``), as
    ``policy.service_ports`` defines them.

    Ports as the apiserver returns them (protocol set, int port, str name) mean the same under any
    defaulting and are read directly; anything else goes through the policy. A ``PortInfo`` per port cost a
    sixth of a 10,000-Service full sync.
    """
    fields: list[Port] = []
    for item in raw_ports:
        if type(item) is not dict:
            break
        name, number, protocol = item.get("name", ""), item.get("port"), item.get("protocol")
        if protocol != policy.PROXY_PROTOCOL or type(number) is not int or type(name) is not str:
            break
        fields.append((name, number, protocol))
    else:
        return fields
    return [(p.name, p.port, p.protocol) for p in policy.service_ports(service)]


def describe(port: Port) -> str:
    """A port as the policy names it in messages."""
    return policy.PortInfo(port[0], port[1], port[2], "tcp").describe()


def families(spec: Mapping[str, Any], found: list[Address]) -> tuple[Family, ...]:
    """The Service's IP families (spec.ipFamilies), else those of its ClusterIPs, else IPv4."""
    raw = spec.get("ipFamilies")
    result: list[Family] = []
    for value in raw if isinstance(raw, list) else []:
        family: Family | None = 4 if value == "IPv4" else 6 if value == "IPv6" else None
        if family is not None and family not in result:
            result.append(family)
    if not result:
        for kind, fam, _ in found:
            if kind == "clusterIP" and fam not in result:
                result.append(fam)
    return tuple(result) or (4,)


def parse_ip(raw: str) -> tuple[Family, str] | None:
    """(family, canonical text) of an IP literal, or None. Strict (no zone, no leading zeros) and cached:
    the C parser plus the cache make 10,000 Services parse in milliseconds, unlike ``ipaddress``."""
    hit = _IP_CACHE.get(raw)
    if hit is not None or raw in _IP_CACHE:
        return hit
    result: tuple[Family, str] | None = None
    for family, af in ((4, socket.AF_INET), (6, socket.AF_INET6)):
        try:
            text = socket.inet_ntop(af, socket.inet_pton(af, raw))
            result = (family, raw if text == raw else text)  # type: ignore[assignment]  # the raw string when canonical: one copy kept
            break
        except (OSError, ValueError, TypeError):
            continue
    if len(_IP_CACHE) > _IP_CACHE_MAX:
        _IP_CACHE.clear()
    _IP_CACHE[raw] = result
    return result


_IP_CACHE: dict[str, tuple[Family, str] | None] = {}
_IP_CACHE_MAX = 200_000


def mapping(value: object) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else an empty one (odd input never raises)."""
    if type(value) is dict:  # the common case, without the slow ABC check
        return value
    return value if isinstance(value, Mapping) else {}
