"""Services + EndpointSlices + this node -> what the node-local Envoy must hold. Pure, never raises.

The one translation to Envoy. Its output is plain frozen data (``ServiceResources``: cluster and endpoint
specs, and which listener chain each redirected key takes); ``controlplane.resources`` turns specs into
protobuf, and only for the specs that changed.

The configuration shape (docs/controlplane.md has the measurements behind it): per IP family ONE listener
on the proxy port whose filter chains never change per Service: ``tcp`` and ``http`` for Service addresses
(ClusterIP, externalIP, load-balancer IP), ``tcp-nodeport`` and ``http-nodeport`` for NodePorts. A filter
chain matcher (destination IP -> destination port) picks the chain; only that map changes when a Service
comes or goes, and Envoy updates a listener whose matcher alone changed without draining a connection.
The chain names the upstream cluster after the connection's original destination (``%DOWNSTREAM_LOCAL_
ADDRESS%`` after the ``original_dst`` listener filter): tcp_proxy through the ``envoy.tcp_proxy.cluster``
filter state, HTTP through a header set before routing. So every redirected key has its own cluster
(``10.96.0.10:80``, ``[fd00::10]:80``, ``nodeport4:30080``) and its own endpoints (EDS) -- which is also
what lets ClusterIP traffic follow internalTrafficPolicy and NodePort/external traffic follow
externalTrafficPolicy, as kube-proxy does.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from controlplane import endpoints as eps
from controlplane import l7
from controlplane.l7 import H2C_APP_PROTOCOLS, HTTP1_APP_PROTOCOLS, Protocol, upstream_protocol
from redirector.desired import EMPTY, ServiceEntries, service_entries, service_id
from redirector.model import Family, Key, Kind
from shared import constants as c
from shared import policy

Chain = Literal["tcp", "http"]
Block = Literal["reject", "drop"]

# How Envoy speaks to a port, by appProtocol: controlplane.l7 holds it (the webhook checks options with it too).
__all__ = ["H2C_APP_PROTOCOLS", "HTTP1_APP_PROTOCOLS", "upstream_protocol"]


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """This node, as far as the translation cares."""

    name: str
    ipv6: bool = True  # the node can bind an IPv6 listener
    zone: str | None = None  # the Node's topology.kubernetes.io/zone label (topology hints)
    # The node's primary address per family (its Node's first InternalIP, else ExternalIP), as kube-proxy's
    # nodeIPs: a loadBalancerSourceRanges entry holding it also admits the LB IP as a source.
    ips: tuple[str, ...] = ()
    # The Node's spec.podCIDRs (canonical): this node's own pods, which keep the ordinary listener under
    # --preserve-source-ip (on a bridge CNI a backend's reply to a pod beside it is switched, never routed
    # back to Envoy; kube-proxy too treats local pods' traffic to external addresses apart).
    pod_cidrs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServiceView:
    """What the translation keeps of one Service (the API dict is dropped as soon as it is projected)."""

    sid: str  # "namespace/name" (interned: shared with the kernel index and the slices)
    served: bool  # Envoy should know it: ours (labelled), or eligible and not another proxy's
    labelled: bool  # carries OUR handoff label (the kernel redirects it)
    entries: ServiceEntries = EMPTY
    protocols: tuple[tuple[str, Protocol], ...] = ()  # (port name, protocol)
    internal_local: bool = False  # internalTrafficPolicy: Local
    external_local: bool = False  # externalTrafficPolicy: Local
    affinity: bool = False  # sessionAffinity: ClientIP
    problems: tuple[str, ...] = ()
    options: l7.Parsed = l7.Parsed()  # per-port L7 options from config.lightpath.cloud/ annotations
    health_check_node_port: int | None = None  # LoadBalancer + externalTrafficPolicy Local: answered per node
    # loadBalancerSourceRanges, canonical networks (kube-proxy trims and parses them sloppily: host bits
    # allowed, invalid entries skipped)
    source_ranges: tuple[str, ...] = ()

    @property
    def namespace(self) -> str:
        return self.sid.partition("/")[0]

    @property
    def name(self) -> str:
        return self.sid.partition("/")[2]


def project_service(service: Mapping[str, Any], proxy_name: str = c.DEFAULT_PROXY_NAME) -> ServiceView:
    meta = _mapping(service.get("metadata"))
    spec = _mapping(service.get("spec"))
    labels = _mapping(meta.get("labels"))
    label = labels.get(c.SERVICE_PROXY_NAME_LABEL)
    labelled = label == proxy_name
    problems: list[str] = []
    try:
        reason = policy.ineligibility(service)
    except Exception as exc:  # noqa: BLE001 - the policy never raises; if it did, this Service alone is skipped
        reason = f"policy error: {type(exc).__name__}"
    served = labelled or (label is None and reason is None)
    if labelled and reason is not None:
        problems.append(f"labelled but not eligible ({reason}): only its TCP ports are served")
    sid = service_id(service)
    if not served:
        return ServiceView(sid, False, labelled)
    entries = service_entries(service)
    protocols: list[tuple[str, Protocol]] = []
    for raw in _list(spec.get("ports")):
        p = _mapping(raw)
        raw_name = p.get("name")
        port_name = raw_name if isinstance(raw_name, str) else ""
        protocols.append((port_name, upstream_protocol(p.get("appProtocol"))))
    itp, etp = spec.get("internalTrafficPolicy"), spec.get("externalTrafficPolicy")
    if itp not in (None, "Cluster", "Local"):
        problems.append(f"internalTrafficPolicy {itp!r} is unknown: treated as Cluster")
    if etp not in (None, "Cluster", "Local"):
        problems.append(f"externalTrafficPolicy {etp!r} is unknown: treated as Cluster")
    affinity = spec.get("sessionAffinity")
    if affinity not in (None, "None", "ClientIP"):
        problems.append(f"sessionAffinity {affinity!r} is unknown: treated as None")
    elif affinity != "ClientIP" and spec.get("sessionAffinityConfig"):
        problems.append("sessionAffinityConfig without sessionAffinity: ClientIP is ignored")
    problems.extend(entries.errors)
    options = l7.parse(meta.get("annotations"), [(n, p != "tcp") for n, p in protocols])
    problems.extend(options.problems)
    if affinity == "ClientIP" and any(o.cluster.lb_policy not in ("LEAST_REQUEST", "RING_HASH") for _, o in options.ports):
        problems.append("lb-policy is ignored: sessionAffinity ClientIP needs a ring hash")
    ranges = _source_ranges(spec.get("loadBalancerSourceRanges"), problems)
    hc = spec.get("healthCheckNodePort")
    hc_port = hc if (labelled and spec.get("type") == "LoadBalancer" and etp == "Local" and type(hc) is int
                     and 0 < hc < 65536) else None
    return ServiceView(sid, True, labelled, entries, tuple(protocols), itp == "Local", etp == "Local",
                       affinity == "ClientIP", tuple(problems), options, hc_port, ranges)


def _with_node_sources(ranges: tuple[str, ...], key: Key, node_ips: tuple[str, ...]) -> tuple[str, ...]:
    """kube-proxy's exception: when a range holds this node's IP, traffic from the load balancer's own IP is
    allowed too (a cloud's local routing can SNAT node-originated traffic to the LB IP)."""
    nets = [ipaddress.ip_network(r, strict=False) for r in ranges]
    for ip in node_ips:
        address = ipaddress.ip_address(ip)
        if address.version == key.family and any(address in net for net in nets):
            own = f"{key.ip}/{32 if key.family == 4 else 128}"
            return ranges if own in ranges else (*ranges, own)
    return ranges


def _source_ranges(value: Any, problems: list[str]) -> tuple[str, ...]:
    """loadBalancerSourceRanges as kube-proxy reads them: each trimmed and parsed (host bits allowed); an
    invalid one is skipped with a problem, the others still apply."""
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append("loadBalancerSourceRanges is not a list: ignored")
        return ()
    out: list[str] = []
    for item in value:
        try:
            out.append(ipaddress.ip_network(str(item).strip() if isinstance(item, str) else "", strict=False).compressed)
        except ValueError:
            problems.append(f"loadBalancerSourceRanges entry {str(item)[:64]!r} is not a CIDR: skipped")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """One upstream cluster (EDS): named after the redirected key it serves."""

    name: str
    stat_name: str
    protocol: Protocol
    service: str  # "namespace/name", for people
    affinity: bool = False  # ClientIP session affinity: consistent hashing on the client's address
    options: l7.ClusterOptions = l7.TCP_CLUSTER_DEFAULT


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """The endpoints (ClusterLoadAssignment) of one cluster."""

    name: str
    endpoints: tuple[eps.Endpoint, ...]


@dataclass(frozen=True, slots=True)
class ServiceResources:
    """Everything one Service contributes to Envoy's configuration."""

    clusters: tuple[ClusterSpec, ...] = ()
    loads: tuple[LoadSpec, ...] = ()
    chains: tuple[tuple[Key, Chain], ...] = ()  # listener matcher entries
    problems: tuple[str, ...] = field(default=())
    routes: tuple[tuple[Key, l7.RouteOptions], ...] = ()  # HTTP keys whose route options differ from the default
    # Keys of a LABELLED Service (nobody else serves them) with nowhere to send a new connection, and what
    # kube-proxy does with such traffic: "reject" (no endpoints at all), "drop" (a Local traffic policy and
    # no endpoint on this node). The kernel answers those itself (redirector.blocks), as kube-proxy would.
    blocked: tuple[tuple[Key, Block], ...] = ()
    # The ClusterIP keys of a LABELLED Service (kube-proxy's ``cluster-ips`` set no longer holds its
    # ClusterIPs): traffic to one of its ClusterIPs on any other port or protocol is rejected in the kernel
    # as kube-proxy's cluster-ips-check does (redirector.blocks), never sent to the proxy or dropped.
    exposed: tuple[Key, ...] = ()
    # loadBalancerSourceRanges per load-balancer key of a LABELLED Service (only ranges of the key's
    # family; none of its family: no filter, as kube-proxy): new connections from elsewhere are dropped in
    # the kernel before the redirect (redirector.blocks), as kube-proxy's firewall-check does.
    firewall: tuple[tuple[Key, tuple[str, ...]], ...] = ()
    # kube-proxy's healthCheckNodePort (it stops serving it for labelled Services, so we answer it):
    # (port, endpoints of the Service ready on this node).
    health: tuple[int, int] | None = None
    # externalTrafficPolicy Local: the external keys (NodePort, externalIP, load-balancer IP), whose
    # backends see the client's own source address when the agent preserves it (--preserve-source-ip):
    # kube-proxy does not masquerade that traffic, the endpoints are this node's, so the replies come back
    # through this node (docs/conformance.md row 6). With each key its endpoints' addresses: an endpoint
    # dialling its own Service (hairpin) must not get a connection from its own address, which it would drop
    # as a martian; kube-proxy masquerades hairpin traffic, so those keep the ordinary listener.
    transparent: tuple[tuple[Key, tuple[str, ...]], ...] = ()


NOTHING = ServiceResources()


def cluster_name(key: Key) -> str:
    """The cluster a key's connections go to: exactly what Envoy's formatter prints for the connection's
    original destination (``%DOWNSTREAM_LOCAL_ADDRESS%``), or ``nodeport<family>:<port>`` for NodePorts.
    Interned: the translation, the controller's indexes, the store and every stream share one string."""
    if key.ip is None:
        return sys.intern(f"nodeport{key.family}:{key.port}")
    return sys.intern(f"[{key.ip}]:{key.port}" if key.family == 6 else f"{key.ip}:{key.port}")


_STAT_SUFFIX: dict[Kind, str] = {"clusterIP": "", "externalIP": "_ext", "loadBalancer": "_lb", "nodePort": "_np"}


def stat_name(view: ServiceView, port_number: int, family: Family, kind: Kind) -> str:
    """Stats per Service port: Kubernetes names never contain '_' or '.', so the name stays unambiguous and
    Envoy's stat tags (split on '.') are not confused by IP addresses."""
    return f"{view.namespace}_{view.name}_{port_number}_ipv{family}{_STAT_SUFFIX[kind]}"


def translate_service(view: ServiceView, slices: Iterable[eps.SliceView], node: NodeInfo) -> ServiceResources:
    """One Service's clusters, endpoints and listener entries."""
    if not view.served or not view.entries.keys:
        return ServiceResources(problems=view.problems) if view.problems else NOTHING
    slices = tuple(slices)
    protocols = dict(view.protocols)
    numbers = _port_numbers(view)
    clusters: list[ClusterSpec] = []
    loads: list[LoadSpec] = []
    chains: list[tuple[Key, Chain]] = []
    routes: list[tuple[Key, l7.RouteOptions]] = []
    blocked: list[tuple[Key, Block]] = []
    exposed: list[Key] = []
    firewall: list[tuple[Key, tuple[str, ...]]] = []
    transparent: list[tuple[Key, tuple[str, ...]]] = []
    selected: dict[tuple[str, Family, bool], tuple[eps.Endpoint, ...]] = {}
    for key, (kind, port_name) in zip(view.entries.keys, view.entries.claims, strict=True):
        if key.family == 6 and not node.ipv6:
            continue
        protocol = protocols.get(port_name, "tcp")
        local = view.internal_local if kind == "clusterIP" else view.external_local
        pick = (port_name, key.family, local)
        if pick not in selected:
            selected[pick] = eps.select(slices, port_name, key.family, node=node.name, local=local, zone=node.zone)
        name = cluster_name(key)
        port = view.options.of(port_name)
        default = l7.TCP_CLUSTER_DEFAULT if protocol == "tcp" else l7.HTTP_CLUSTER_DEFAULT
        clusters.append(ClusterSpec(name, stat_name(view, numbers.get(port_name, key.port), key.family, kind),
                                    protocol, view.sid, view.affinity, port.cluster if port else default))
        loads.append(LoadSpec(name, selected[pick]))
        chains.append((key, "tcp" if protocol == "tcp" else "http"))
        if protocol != "tcp" and port is not None and port.route is not None and port.route != l7.DEFAULT_ROUTE:
            routes.append((key, port.route))
        if view.labelled and kind == "clusterIP":
            exposed.append(key)
        if view.external_local and kind != "clusterIP":
            transparent.append((key, tuple(sorted({ip for ip, _port in selected[pick]}))))
        if view.labelled and kind == "loadBalancer" and view.source_ranges:
            ranges = tuple(r for r in view.source_ranges if (":" in r) == (key.family == 6))
            if ranges:
                firewall.append((key, _with_node_sources(ranges, key, node.ips)))
        if view.labelled and not selected[pick]:
            anywhere = local and bool(eps.select(slices, port_name, key.family, node=node.name, zone=node.zone))
            blocked.append((key, "drop" if anywhere else "reject"))
    health = None
    if view.health_check_node_port is not None:
        here = {ep.addresses[0] for s in slices for ep in s.endpoints if ep.node == node.name and ep.ready}
        health = (view.health_check_node_port, len(here))
    return ServiceResources(tuple(clusters), tuple(loads), tuple(chains), view.problems, tuple(routes),
                            tuple(blocked), tuple(exposed), tuple(firewall), health, tuple(transparent))


def _port_numbers(view: ServiceView) -> dict[str, int]:
    """Service port number per port name, from the ClusterIP keys (NodePort keys carry the node port)."""
    numbers: dict[str, int] = {}
    for key, (kind, port_name) in zip(view.entries.keys, view.entries.claims, strict=True):
        if kind != "nodePort":
            numbers.setdefault(port_name, key.port)
    return numbers


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
