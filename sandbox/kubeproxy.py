"""KUBE-PROXY STAND-IN FOR TESTS AND THE DEMO. THIS IS NOT KUBE-PROXY AND NOT A PRODUCTION DATA PLANE.

WHY: lightpath's whole point is the hand-over between kube-proxy and the node-local proxy. Tests and
``make demo`` need "the other side" programmed in a real kernel, and what we measure against it (the
handover windows) must hold on a real node. So it follows **kube-proxy v1.33's nftables mode**
(pkg/proxy/nftables, its README "kube-proxy's use of nftables hooks") in what matters to a handover:

- tables ``ip kube-proxy`` and ``ip6 kube-proxy`` with kube-proxy's names: verdict maps ``service-ips``
  (``ip . proto . port : goto service-…``) and ``service-nodeports``, dispatched from ``services`` in
  ``nat-prerouting``/``nat-output`` (type nat, priority dstnat -100), masquerading in ``nat-postrouting``
  (srcnat 100), per-port ``service-…`` chains choosing an ``endpoint-…`` chain by ``numgen random``;
- traffic to a ClusterIP it does not know (a Service labelled for another proxy, e.g. ours) is **dropped**
  and to an undefined port of a known ClusterIP **rejected** (``cluster-ips-check`` from ``filter-forward``
  and ``filter-output-post-dnat``, i.e. after DNAT), and a Service without endpoints is **rejected**
  (``no-endpoint-services``) -- so a handover window in which neither side serves shows up as the SYN
  timeout a real node gives, not as a clean refusal;
- Services labelled ``service.kubernetes.io/service-proxy-name`` are IGNORED, exactly as kube-proxy does;
- syncs are rate limited like kube-proxy's BoundedFrequencyRunner: at most one per ``min_sync_period``
  (``--min-sync-period``, 1 s by default); a change after a quiet period applies at once.

Left out: externalIPs and load-balancer IPs, session affinity, traffic policies, topology, terminating
endpoints, loadBalancerSourceRanges, the masquerade decision by pod CIDR (it masquerades hairpin traffic
only), kube-proxy's burst of 2 quick syncs (the stand-in allows 1: if anything, windows measured
against it are wider), and kube-proxy's incremental transactions (it replaces its tables atomically).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from kubernetes import client

from sandbox.node.netns import SERVICE_CIDR, SERVICE_CIDR6, nft
from shared.constants import SERVICE_PROXY_NAME_LABEL
from shared.kube import Reflector

TABLE = "kube-proxy"
FAMILIES = {4: "ip", 6: "ip6"}
PRIORITY_DSTNAT = -100
PRIORITY_SRCNAT = 100
MASQ_MARK = 0x4000  # kube-proxy's masquerade bit
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROTOCOLS = ("TCP", "UDP", "SCTP")
DEFAULT_MIN_SYNC_PERIOD = 1.0


@dataclass(frozen=True, order=True)
class Backend:
    ip: str
    port: int


@dataclass(frozen=True, order=True)
class ServicePort:
    """One Service port of one IP family, resolved to its ready backends."""

    namespace: str
    name: str
    port_name: str
    protocol: str
    family: int
    cluster_ip: str
    port: int
    node_port: int | None
    backends: tuple[Backend, ...]

    @property
    def ident(self) -> str:
        """kube-proxy's chain name suffix: namespace/name/protocol/port-name."""
        label = self.port_name or str(self.port)
        return re.sub(r"[^A-Za-z0-9/_.-]", "-", f"{self.namespace}/{self.name}/{self.protocol.lower()}/{label}")

    @property
    def chain(self) -> str:
        return f"service-{_hash(self.ident)}-{self.ident}"

    def endpoint_chain(self, backend: Backend) -> str:
        ident = f"{self.ident}__{backend.ip}/{backend.port}".replace(":", ".")
        return f"endpoint-{_hash(ident)}-{ident}"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port_name or self.port}/{self.protocol}"


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:8]


def _family(ip: str) -> int:
    return 6 if ":" in ip else 4


def ignored(service: Mapping[str, Any]) -> bool:
    """kube-proxy leaves a Service alone when it names another service proxy; so do we."""
    labels = (service.get("metadata") or {}).get("labels") or {}
    return SERVICE_PROXY_NAME_LABEL in labels


def _backends(
    slices: Iterable[Mapping[str, Any]], family: int, port_name: str, protocol: str
) -> tuple[Backend, ...]:
    found: set[Backend] = set()
    for eps in slices:
        if eps.get("addressType") != f"IPv{family}":
            continue
        ports = [
            p
            for p in eps.get("ports") or []
            if (p.get("name") or "") == port_name and (p.get("protocol") or "TCP") == protocol
        ]
        if not ports or ports[0].get("port") is None:
            continue
        for ep in eps.get("endpoints") or []:
            ready = (ep.get("conditions") or {}).get("ready")
            if ready is False or not ep.get("addresses"):
                continue  # unset means ready, per the EndpointSlice API
            found.add(Backend(ep["addresses"][0], int(ports[0]["port"])))
    return tuple(sorted(found))


def service_ports(
    services: Iterable[Mapping[str, Any]], endpointslices: Iterable[Mapping[str, Any]]
) -> list[ServicePort]:
    """Services (API JSON dicts) + EndpointSlices -> what to program, skipping what kube-proxy would."""
    by_service: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for eps in endpointslices:
        meta = eps.get("metadata") or {}
        svc_name = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if svc_name:
            by_service.setdefault((meta.get("namespace") or "", svc_name), []).append(eps)
    out = []
    for svc in services:
        meta, spec = svc.get("metadata") or {}, svc.get("spec") or {}
        if ignored(svc) or spec.get("type") == "ExternalName":
            continue
        cluster_ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
        key = (meta.get("namespace") or "", meta.get("name") or "")
        for ip in cluster_ips:
            if not ip or ip == "None":
                continue
            for p in spec.get("ports") or []:
                protocol = p.get("protocol") or "TCP"
                if protocol not in PROTOCOLS:
                    continue
                port_name = p.get("name") or ""
                out.append(
                    ServicePort(
                        namespace=key[0],
                        name=key[1],
                        port_name=port_name,
                        protocol=protocol,
                        family=_family(ip),
                        cluster_ip=ip,
                        port=int(p["port"]),
                        node_port=p.get("nodePort"),
                        backends=_backends(by_service.get(key, []), _family(ip), port_name, protocol),
                    )
                )
    return sorted(out)


def _bracket(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _elements(items: list[str]) -> str:
    return f" elements = {{ {', '.join(items)} }}" if items else ""


def _table(family: int, ports: list[ServicePort]) -> str:
    """One family's table in kube-proxy's nftables layout (see the module docstring)."""
    ipf = FAMILIES[family]
    addr_type = "ipv4_addr" if family == 4 else "ipv6_addr"
    loopback = "127.0.0.0/8" if family == 4 else "::1"
    cidr = SERVICE_CIDR if family == 4 else SERVICE_CIDR6
    service_ips: list[str] = []
    node_ports: list[str] = []
    no_endpoints: list[str] = []
    no_endpoint_nodeports: list[str] = []
    cluster_ips: set[str] = set()
    chains: list[str] = []
    for sp in (p for p in ports if p.family == family):
        l4 = sp.protocol.lower()
        cluster_ips.add(sp.cluster_ip)
        if not sp.backends:
            no_endpoints.append(f"{sp.cluster_ip} . {l4} . {sp.port} : goto reject-chain")
            if sp.node_port:
                no_endpoint_nodeports.append(f"{l4} . {sp.node_port} : goto reject-chain")
            continue
        service_ips.append(f"{sp.cluster_ip} . {l4} . {sp.port} : goto {sp.chain}")
        if sp.node_port:
            node_ports.append(f"{l4} . {sp.node_port} : goto {sp.chain}")
        endpoint_chains = [sp.endpoint_chain(b) for b in sp.backends]
        if len(endpoint_chains) == 1:
            pick = f"goto {endpoint_chains[0]}"
        else:
            verdicts = ", ".join(f"{i} : goto {c}" for i, c in enumerate(endpoint_chains))
            pick = f"numgen random mod {len(endpoint_chains)} vmap {{ {verdicts} }}"
        chains.append(f'\tchain {sp.chain} {{\n\t\t{pick} comment "{sp}"\n\t}}')
        for chain, be in zip(endpoint_chains, sp.backends, strict=True):
            chains.append(
                f"\tchain {chain} {{\n"
                f"\t\t{ipf} saddr {be.ip} jump mark-for-masquerade\n"
                f"\t\tmeta l4proto {l4} dnat to {_bracket(be.ip)}:{be.port}\n\t}}"
            )
    tuple_type = f"{addr_type} . inet_proto . inet_service : verdict"
    body = [
        f"\tset cluster-ips {{ type {addr_type};{_elements(sorted(cluster_ips))} }}",
        f"\tmap service-ips {{ type {tuple_type};{_elements(service_ips)} }}",
        f"\tmap service-nodeports {{ type inet_proto . inet_service : verdict;{_elements(node_ports)} }}",
        f"\tmap no-endpoint-services {{ type {tuple_type};{_elements(no_endpoints)} }}",
        f"\tmap no-endpoint-nodeports {{ type inet_proto . inet_service : verdict;{_elements(no_endpoint_nodeports)} }}",
        "\tchain reject-chain {\n\t\treject\n\t}",
        f"\tchain mark-for-masquerade {{\n\t\tmeta mark set meta mark | {MASQ_MARK:#x}\n\t}}",
        f"\tchain masquerading {{\n\t\tmeta mark & {MASQ_MARK:#x} == 0 return\n"
        f"\t\tmeta mark set meta mark ^ {MASQ_MARK:#x}\n\t\tmasquerade fully-random\n\t}}",
        f"\tchain services {{\n\t\t{ipf} daddr . meta l4proto . th dport vmap @service-ips\n"
        f"\t\tfib daddr type local {ipf} daddr != {loopback} meta l4proto . th dport vmap @service-nodeports\n\t}}",
        f"\tchain nat-prerouting {{\n\t\ttype nat hook prerouting priority {PRIORITY_DSTNAT}; policy accept;\n"
        "\t\tjump services\n\t}",
        f"\tchain nat-output {{\n\t\ttype nat hook output priority {PRIORITY_DSTNAT}; policy accept;\n"
        "\t\tjump services\n\t}",
        f"\tchain nat-postrouting {{\n\t\ttype nat hook postrouting priority {PRIORITY_SRCNAT}; policy accept;\n"
        "\t\tjump masquerading\n\t}",
        f'\tchain cluster-ips-check {{\n\t\t{ipf} daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"\n'
        f'\t\t{ipf} daddr {cidr} drop comment "Drop traffic to unallocated ClusterIPs"\n\t}}',
        f"\tchain endpoints-check {{\n\t\t{ipf} daddr . meta l4proto . th dport vmap @no-endpoint-services\n"
        f"\t\tfib daddr type local {ipf} daddr != {loopback} meta l4proto . th dport vmap @no-endpoint-nodeports\n\t}}",
        "\tchain filter-forward {\n\t\ttype filter hook forward priority -110; policy accept;\n"
        "\t\tct state new jump endpoints-check\n\t\tct state new jump cluster-ips-check\n\t}",
        "\tchain filter-input {\n\t\ttype filter hook input priority -110; policy accept;\n"
        "\t\tct state new jump endpoints-check\n\t}",
        "\tchain filter-output {\n\t\ttype filter hook output priority -110; policy accept;\n"
        "\t\tct state new jump endpoints-check\n\t}",
        "\tchain filter-output-post-dnat {\n\t\ttype filter hook output priority -90; policy accept;\n"
        "\t\tct state new jump cluster-ips-check\n\t}",
        *chains,
    ]
    return f"add table {ipf} {TABLE}\ndelete table {ipf} {TABLE}\ntable {ipf} {TABLE} {{\n" + "\n".join(body) + "\n}\n"


def standin_ruleset(
    services: Iterable[Mapping[str, Any]], endpointslices: Iterable[Mapping[str, Any]]
) -> str:
    """Both tables as one nft script that atomically replaces any previous version."""
    ports = service_ports(services, endpointslices)
    return _table(4, ports) + _table(6, ports)


def apply(netns_name: str, ruleset: str) -> None:
    """Replace the stand-in's tables inside ``netns_name`` in one nft transaction."""
    nft(netns_name, ruleset)


def remove(netns_name: str) -> None:
    """Delete the stand-in's tables (idempotent)."""
    nft(netns_name, "".join(f"add table {f} {TABLE}\ndelete table {f} {TABLE}\n" for f in FAMILIES.values()))


log = logging.getLogger(__name__)
Key = tuple[str, str]


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


class _Cache:
    """A ``shared.kube.WatchSink`` keeping one kind's objects for the stand-in."""

    def __init__(self, sync: StandinSync, kind: str) -> None:
        self.sync, self.kind = sync, kind

    def replace(self, items: Iterable[dict[str, Any]]) -> None:
        self.sync._changed(self.kind, relisted={_key(o): o for o in items})

    def upsert(self, obj: dict[str, Any]) -> None:
        self.sync._changed(self.kind, put=obj)

    def delete(self, obj: dict[str, Any]) -> None:
        self.sync._changed(self.kind, deleted=obj)

    def restarted(self, reason: str) -> None:
        if reason != "expired":
            self.sync.errors += 1


class StandinSync:
    """Keeps the stand-in tables in ``netns_name`` in step with an API server, like a tiny kube-proxy.

    Services and EndpointSlices through the project's reflector; a sync thread recomputes the ruleset when
    the caches change and applies it only when the text differs, at most once per ``min_sync_period``.
    Nothing is applied before both resources were listed. ``sync_times`` keeps when each apply finished.
    """

    def __init__(
        self, api_client: client.ApiClient, netns_name: str, *, watch_timeout: int = 5, backoff: float = 0.5,
        min_sync_period: float = DEFAULT_MIN_SYNC_PERIOD, mode: str = "nftables",
    ) -> None:
        """``mode``: "nftables" (this module's tables) or "iptables" (``sandbox.kubeproxy_iptables``)."""
        if mode not in ("nftables", "iptables"):
            raise ValueError(f"mode must be nftables or iptables, not {mode!r}")
        core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
        self.netns_name = netns_name
        self.mode = mode
        self.min_sync_period = min_sync_period
        self._backoff = backoff
        self._cache: dict[str, dict[Key, Mapping[str, Any]]] = {"services": {}, "endpointslices": {}}
        options: dict[str, Any] = {"server_timeout": watch_timeout, "read_timeout": watch_timeout + 2.0,
                   "backoff_base": min(0.1, backoff), "backoff_max": backoff}
        self._reflectors = [
            Reflector(core.list_service_for_all_namespaces, _Cache(self, "services"), what="services", **options),
            Reflector(discovery.list_endpoint_slice_for_all_namespaces, _Cache(self, "endpointslices"),
                      what="endpointslices", **options),
        ]
        self._listed: set[str] = set()
        self._dirty = False
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.applied: str | None = None
        self.syncs = 0
        self.errors = 0
        self.sync_times: list[float] = []  # monotonic, when each apply finished

    def start(self) -> StandinSync:
        targets: list[Callable[[], None]] = [r.run for r in self._reflectors] + [self._sync_loop]
        for target in targets:
            thread = threading.Thread(target=target, name="kubeproxy-standin", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for reflector in self._reflectors:
            reflector.stop()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> StandinSync:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        """Block until an applied ruleset satisfies ``predicate``; return it (TimeoutError otherwise)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.applied is not None and predicate(self.applied), timeout):
                raise TimeoutError(f"kube-proxy stand-in: no matching ruleset applied within {timeout}s")
            assert self.applied is not None
            return self.applied

    def _changed(
        self,
        kind: str,
        *,
        relisted: dict[Key, Mapping[str, Any]] | None = None,
        put: Mapping[str, Any] | None = None,
        deleted: Mapping[str, Any] | None = None,
    ) -> None:
        with self._cond:
            cache = self._cache[kind]
            if relisted is not None:
                cache.clear()
                cache.update(relisted)
                self._listed.add(kind)
            if put is not None:
                cache[_key(put)] = put
            if deleted is not None:
                cache.pop(_key(deleted), None)
            self._dirty = True
            self._cond.notify_all()

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                ready = self._cond.wait_for(
                    lambda: self._stop.is_set() or (self._dirty and self._listed == set(self._cache)), timeout=1
                )
                if self._stop.is_set() or not ready:
                    continue
            # BoundedFrequencyRunner: no two syncs closer than min_sync_period.
            if self.sync_times:
                wait = self.sync_times[-1] + self.min_sync_period - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return
            with self._cond:
                self._dirty = False
                services = list(self._cache["services"].values())
                slices = list(self._cache["endpointslices"].values())
            if self.mode == "iptables":
                from sandbox import kubeproxy_iptables

                ports = service_ports(services, slices)
                ruleset = kubeproxy_iptables.render(ports)
            else:
                ruleset = standin_ruleset(services, slices)
            if ruleset == self.applied:
                continue
            try:
                if self.mode == "iptables":
                    kubeproxy_iptables.apply(self.netns_name, ports)
                else:
                    apply(self.netns_name, ruleset)
            except Exception as exc:  # noqa: BLE001 - retry on the next round
                self.errors += 1
                log.warning("kube-proxy stand-in: apply failed", extra={"error": repr(exc)})
                with self._cond:
                    self._dirty = True
                self._stop.wait(self._backoff)
                continue
            with self._cond:
                self.applied = ruleset
                self.syncs += 1
                self.sync_times.append(time.monotonic())
                self._cond.notify_all()
