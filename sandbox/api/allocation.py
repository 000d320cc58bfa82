"""Service cluster IP and node port allocation, as kube-apiserver's Service REST storage does it.

WHY: the redirector and kube-proxy stand-in key everything on clusterIPs/nodePorts, so the double must
hand out unique addresses from the configured CIDRs (IPv4, IPv6, dual-stack), keep them across updates
and refuse collisions. Runs AFTER admission (as in the real server): webhooks never see allocations on
CREATE. Dynamic picks start in the upper part of the range (like the real static-subrange split) so
tests that request fixed low addresses rarely collide with dynamic ones.
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

from sandbox.api.errors import ApiError, invalid

IPV4, IPV6 = "IPv4", "IPv6"
SINGLE, PREFER_DUAL, REQUIRE_DUAL = "SingleStack", "PreferDualStack", "RequireDualStack"
NODE_PORT_TYPES = ("NodePort", "LoadBalancer")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _family(ip: str) -> str | None:
    try:
        return IPV4 if ipaddress.ip_address(ip).version == 4 else IPV6
    except ValueError:
        return None


def holdings(svc: dict[str, Any] | None) -> tuple[set[str], set[int]]:
    """The cluster IPs and node ports an existing Service holds."""
    if not svc:
        return set(), set()
    spec = svc.get("spec") or {}
    ips = {ip for ip in spec.get("clusterIPs") or [] if ip and ip != "None"}
    ports = {p["nodePort"] for p in spec.get("ports") or [] if isinstance(p, dict) and p.get("nodePort")}
    if spec.get("healthCheckNodePort"):
        ports.add(spec["healthCheckNodePort"])
    return ips, ports


def _needs_node_ports(spec: dict[str, Any]) -> bool:
    t = spec.get("type")
    return t == "NodePort" or (t == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is not False)


def carry_over(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """On update: keep allocated values the request left out, drop those the new type cannot have,
    and refuse changes to immutable ones (422)."""
    out = copy.deepcopy(new)
    ns, os_ = out.setdefault("spec", {}), old.get("spec") or {}
    new_type, old_type = ns.get("type"), os_.get("type")
    name = (out.get("metadata") or {}).get("name", "")
    causes: list[tuple[str, str]] = []
    if new_type != "ExternalName" and old_type != "ExternalName":
        if not ns.get("clusterIP") and not ns.get("clusterIPs"):
            for key in ("clusterIP", "clusterIPs"):
                if key in os_:
                    ns[key] = copy.deepcopy(os_[key])
        elif ns.get("clusterIP") and not ns.get("clusterIPs") and ns["clusterIP"] == os_.get("clusterIP"):
            ns["clusterIPs"] = copy.deepcopy(os_.get("clusterIPs"))
        for key in ("ipFamilies", "ipFamilyPolicy"):
            if not ns.get(key) and key in os_:
                ns[key] = copy.deepcopy(os_[key])
        if ns.get("clusterIP") and os_.get("clusterIP") and ns["clusterIP"] != os_["clusterIP"]:
            causes.append(("spec.clusterIPs[0]", f"Invalid value: {ns['clusterIP']!r}: may not change once set"))
        old_fams, new_fams = os_.get("ipFamilies") or [], ns.get("ipFamilies") or []
        if old_fams and new_fams and old_fams[0] != new_fams[0]:
            causes.append(("spec.ipFamilies[0]", f"Invalid value: {new_fams[0]!r}: may not change once set"))
    if new_type == "ExternalName":
        for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
            if old_type != "ExternalName" and ns.get(key) == os_.get(key):
                ns.pop(key, None)
    if new_type in NODE_PORT_TYPES:
        old_ports = {(p.get("port"), p.get("protocol")): p.get("nodePort") for p in os_.get("ports") or []}
        for port in ns.get("ports") or []:
            if isinstance(port, dict) and not port.get("nodePort"):
                carried = old_ports.get((port.get("port"), port.get("protocol")))
                if carried:
                    port["nodePort"] = carried
        if not ns.get("healthCheckNodePort") and os_.get("healthCheckNodePort"):
            ns["healthCheckNodePort"] = os_["healthCheckNodePort"]
    elif old_type in NODE_PORT_TYPES:
        old_node_ports = {p.get("nodePort") for p in os_.get("ports") or []}
        for port in ns.get("ports") or []:
            if isinstance(port, dict) and port.get("nodePort") in old_node_ports:
                port.pop("nodePort", None)
        if ns.get("healthCheckNodePort") == os_.get("healthCheckNodePort"):
            ns.pop("healthCheckNodePort", None)
    if causes:
        raise invalid("Service", name, causes)
    return out


class ServiceAllocator:
    """Tracks which cluster IPs and node ports are taken; hands out free ones.

    Not thread-safe by itself: the store calls it under its lock. `allocate` does not claim anything;
    `commit` does, once the write is certain (dry runs never commit).
    """

    def __init__(self, cidr_v4: str | None, cidr_v6: str | None, node_port_range: tuple[int, int]) -> None:
        self.cidrs: dict[str, Network] = {}
        if cidr_v4:
            self.cidrs[IPV4] = ipaddress.IPv4Network(cidr_v4)
        if cidr_v6:
            self.cidrs[IPV6] = ipaddress.IPv6Network(cidr_v6)
        if not self.cidrs:
            raise ValueError("at least one service CIDR is required")
        lo, hi = node_port_range
        if not 0 < lo <= hi <= 65535:
            raise ValueError(f"bad node port range {node_port_range}")
        self.primary = next(iter(self.cidrs))
        self.node_port_range = (lo, hi)
        self.used_ips: set[str] = set()
        self.used_ports: set[int] = set()
        self._ip_cursor: dict[str, int] = {}
        self._port_cursor = lo + min(max(16, (hi - lo + 1) // 32), 128) if hi - lo > 256 else lo

    @property
    def dual_stack(self) -> bool:
        return len(self.cidrs) == 2

    def commit(self, new: dict[str, Any] | None, old: dict[str, Any] | None) -> None:
        old_ips, old_ports = holdings(old)
        new_ips, new_ports = holdings(new)
        self.used_ips = (self.used_ips - old_ips) | new_ips
        self.used_ports = (self.used_ports - old_ports) | new_ports

    def _next_ip(self, family: str, taken: set[str]) -> str:
        net = self.cidrs[family]
        size = net.num_addresses
        first, last = 1, size - (2 if family == IPV4 else 1)
        if last < first:
            raise ApiError(500, f"service CIDR {net} is too small")
        start = self._ip_cursor.get(family, first + min(max(16, size // 16), 256) if size > 256 else first)
        span = last - first + 1
        for step in range(span):
            idx = first + (start - first + step) % span
            ip = str(net.network_address + idx)
            if ip not in taken:
                self._ip_cursor[family] = idx + 1 if idx < last else first
                return ip
        raise ApiError(500, f"range is full: no free cluster IP in {net}", reason="InternalError")

    def _next_port(self, taken: set[int]) -> int:
        lo, hi = self.node_port_range
        span = hi - lo + 1
        for step in range(span):
            port = lo + (self._port_cursor - lo + step) % span
            if port not in taken:
                self._port_cursor = port + 1 if port < hi else lo
                return port
        raise ApiError(500, f"range is full: no free node port in {lo}-{hi}", reason="InternalError")

    def allocate(self, svc: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
        """A copy of `svc` with ipFamilies/ipFamilyPolicy/clusterIPs/nodePorts filled in (422 on conflict)."""
        out = copy.deepcopy(svc)
        spec = out.setdefault("spec", {})
        name = (out.get("metadata") or {}).get("name", "")
        old_ips, old_ports = holdings(old)
        taken_ips = self.used_ips - old_ips
        taken_ports = self.used_ports - old_ports
        causes: list[tuple[str, str]] = []
        if spec.get("type") == "ExternalName":
            for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
                spec.pop(key, None)
        else:
            causes += self._allocate_ips(spec, taken_ips)
        causes += self._allocate_ports(spec, taken_ports)
        if causes:
            raise invalid("Service", name, causes)
        return out

    def _allocate_ips(self, spec: dict[str, Any], taken: set[str]) -> list[tuple[str, str]]:
        requested = [ip for ip in (spec.get("clusterIPs") or []) if isinstance(ip, str)]
        if spec.get("clusterIP"):
            if requested and requested[0] != spec["clusterIP"]:
                return [("spec.clusterIPs[0]", f"Invalid value: {requested[0]!r}: must match `clusterIP` {spec['clusterIP']!r}")]
            requested = requested or [spec["clusterIP"]]
        headless = requested[:1] == ["None"]
        families = list(spec.get("ipFamilies") or [])
        if not families:
            families = [f for f in (_family(ip) for ip in requested) if f]
        policy = spec.get("ipFamilyPolicy")
        if policy is None:
            policy = REQUIRE_DUAL if headless and not spec.get("selector") and self.dual_stack else SINGLE
        if policy not in (SINGLE, PREFER_DUAL, REQUIRE_DUAL):
            return [("spec.ipFamilyPolicy", f"Unsupported value: {policy!r}: supported values: "
                     f"\"{PREFER_DUAL}\", \"{REQUIRE_DUAL}\", \"{SINGLE}\"")]
        if not families:
            families = [self.primary]
        for i, fam in enumerate(families):
            if fam not in (IPV4, IPV6):
                return [(f"spec.ipFamilies[{i}]", f"Unsupported value: {fam!r}: supported values: \"IPv4\", \"IPv6\"")]
            if fam not in self.cidrs:
                return [(f"spec.ipFamilies[{i}]", f"Invalid value: {fam!r}: not configured on this cluster")]
        if len(set(families)) != len(families):
            return [("spec.ipFamilies", f"Duplicate value: {families!r}")]
        if policy == SINGLE and len(families) > 1:
            return [("spec.ipFamilyPolicy", f"Invalid value: {SINGLE!r}: must be {PREFER_DUAL!r} or "
                     f"{REQUIRE_DUAL!r} when multiple ipFamilies are specified")]
        if policy != SINGLE and len(families) == 1:
            if self.dual_stack:
                families.append(IPV6 if families[0] == IPV4 else IPV4)
            elif policy == REQUIRE_DUAL:
                return [("spec.ipFamilyPolicy", f"Invalid value: {REQUIRE_DUAL!r}: this cluster is not configured for dual-stack services")]
        if len(requested) > len(families):
            return [("spec.clusterIPs", f"Invalid value: {requested!r}: more cluster IPs than IP families")]
        spec["ipFamilies"], spec["ipFamilyPolicy"] = families, policy
        if headless:
            spec["clusterIP"], spec["clusterIPs"] = "None", ["None"]
            return []
        ips: list[str] = []
        causes: list[tuple[str, str]] = []
        for i, fam in enumerate(families):
            want = requested[i] if i < len(requested) else ""
            if not want:
                ip = self._next_ip(fam, taken)
            else:
                field = f"spec.clusterIPs[{i}]"
                if _family(want) != fam:
                    causes.append((field, f"Invalid value: {want!r}: expected an {fam} value as indicated by `ipFamilies[{i}]`"))
                    continue
                ip = str(ipaddress.ip_address(want))
                net = self.cidrs[fam]
                if ipaddress.ip_address(ip) not in net or ip in (str(net.network_address), str(net.broadcast_address)):
                    causes.append((field, f"Invalid value: {want!r}: provided IP is not in the valid range. "
                                   f"The range of valid IPs is {net}"))
                    continue
                if ip in taken:
                    causes.append((field, f"Invalid value: {want!r}: provided IP is already allocated"))
                    continue
            taken.add(ip)
            ips.append(ip)
        spec["clusterIPs"] = ips
        if ips:
            spec["clusterIP"] = ips[0]
        return causes

    def _allocate_ports(self, spec: dict[str, Any], taken: set[int]) -> list[tuple[str, str]]:
        lo, hi = self.node_port_range
        causes: list[tuple[str, str]] = []
        if spec.get("type") not in NODE_PORT_TYPES:
            return causes
        mine: set[int] = set()
        for i, port in enumerate(spec.get("ports") or []):
            if not isinstance(port, dict):
                continue
            node_port = port.get("nodePort")
            if node_port:
                if not isinstance(node_port, int) or not lo <= node_port <= hi:
                    causes.append((f"spec.ports[{i}].nodePort", f"Invalid value: {node_port!r}: provided port is not in "
                                   f"the valid range. The range of valid ports is {lo}-{hi}"))
                elif node_port in taken or node_port in mine:
                    causes.append((f"spec.ports[{i}].nodePort", f"Invalid value: {node_port}: provided port is already allocated"))
                else:
                    mine.add(node_port)
            elif _needs_node_ports(spec):
                port["nodePort"] = self._next_port(taken | mine)
                mine.add(port["nodePort"])
        if spec.get("type") == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local":
            hc = spec.get("healthCheckNodePort")
            if not hc:
                spec["healthCheckNodePort"] = self._next_port(taken | mine)
            elif hc in taken or hc in mine:
                causes.append(("spec.healthCheckNodePort", f"Invalid value: {hc}: provided port is already allocated"))
        return causes
