"""KUBE-PROXY STAND-IN FOR TESTS AND THE DEMO. THIS IS NOT KUBE-PROXY AND NOT A PRODUCTION DATA PLANE.

WHY: lightpath's whole point is the hand-over between kube-proxy and the node-local proxy. Tests and
``make demo`` need "the other side" programmed in a real kernel: Services that kube-proxy still
owns must be DNATed to their endpoints, and Services labelled
``service.kubernetes.io/service-proxy-name`` must be IGNORED, exactly as kube-proxy ignores them.

What it does (a small subset of kube-proxy's nftables mode, same shape):
- one table ``inet kubeproxy-standin``, replaced atomically on every apply;
- chains at prerouting and output, priority dstnat (-100; numeric because nft 1.0.6 rejects the
  ``dstnat`` name on the output hook), so lightpath's redirector can hook before it (e.g. -110);
- ``StandinSync``: list+watch Services and EndpointSlices on an API server (the sandbox one) and
  re-apply whenever the computed ruleset changes;
- ClusterIP:port (TCP/UDP/SCTP, IPv4 and IPv6) and NodePorts (any local address) -> one ready
  endpoint, chosen by ``numgen random`` when there are several; hairpin traffic (a pod reaching
  itself through its Service) is masqueraded.
What it does not: externalIPs, LoadBalancer IPs, session affinity, traffic policies, topology,
terminating endpoints, rejecting Services without endpoints (their packets just go unanswered).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from kubernetes import client, watch

from sandbox.netns import nft
from shared.constants import SERVICE_PROXY_NAME_LABEL

TABLE = "kubeproxy-standin"
FAMILY = "inet"
PRIORITY_DSTNAT = -100
PRIORITY_SRCNAT = 100
MASQ_MARK = 0x4000  # kube-proxy's masquerade bit
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROTOCOLS = ("TCP", "UDP", "SCTP")


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
    def chain(self) -> str:
        label = self.port_name or str(self.port)
        raw = f"svc-{self.namespace}-{self.name}-{label}-{self.protocol}-v{self.family}".lower()
        return re.sub(r"[^a-z0-9-]", "-", raw)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port_name or self.port}/{self.protocol}"


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


def standin_ruleset(
    services: Iterable[Mapping[str, Any]], endpointslices: Iterable[Mapping[str, Any]]
) -> str:
    """The whole table as one nft script that atomically replaces any previous version."""
    ports = service_ports(services, endpointslices)
    dispatch: list[str] = []
    chains: list[str] = []
    for sp in ports:
        if not sp.backends:
            continue
        ipf, l4 = f"ip{'6' if sp.family == 6 else ''}", sp.protocol.lower()
        comment = f'comment "{sp}"'
        dispatch.append(f"{ipf} daddr {sp.cluster_ip} meta l4proto {l4} th dport {sp.port} goto {sp.chain} {comment}")
        if sp.node_port:
            nfproto = "ipv6" if sp.family == 6 else "ipv4"
            dispatch.append(
                f"meta nfproto {nfproto} fib daddr type local meta l4proto {l4} th dport {sp.node_port} "
                f"goto {sp.chain} {comment}"
            )
        endpoint_chains = [f"{sp.chain}-ep{i}" for i in range(len(sp.backends))]
        if len(endpoint_chains) == 1:
            pick = f"goto {endpoint_chains[0]}"
        else:
            verdicts = ", ".join(f"{i} : goto {c}" for i, c in enumerate(endpoint_chains))
            pick = f"numgen random mod {len(endpoint_chains)} vmap {{ {verdicts} }}"
        chains.append(f"\tchain {sp.chain} {{\n\t\t{pick}\n\t}}")
        for chain, be in zip(endpoint_chains, sp.backends, strict=True):
            chains.append(
                f"\tchain {chain} {{\n"
                f"\t\t{ipf} saddr {be.ip} meta mark set meta mark | {MASQ_MARK:#x} comment \"hairpin\"\n"
                f"\t\tmeta l4proto {l4} dnat {ipf} to {_bracket(be.ip)}:{be.port}\n\t}}"
            )
    body = [
        f"\tchain prerouting {{\n\t\ttype nat hook prerouting priority {PRIORITY_DSTNAT}; policy accept;\n"
        "\t\tjump services\n\t}",
        f"\tchain output {{\n\t\ttype nat hook output priority {PRIORITY_DSTNAT}; policy accept;\n"
        "\t\tjump services\n\t}",
        f"\tchain postrouting {{\n\t\ttype nat hook postrouting priority {PRIORITY_SRCNAT}; policy accept;\n"
        f"\t\tmeta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} masquerade\n\t}}",
        "\tchain services {\n" + "".join(f"\t\t{rule}\n" for rule in dispatch) + "\t}",
        *chains,
    ]
    return (
        f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
        f"table {FAMILY} {TABLE} {{\n" + "\n".join(body) + "\n}\n"
    )


def apply(netns_name: str, ruleset: str) -> None:
    """Replace the stand-in's table inside ``netns_name`` in one nft transaction."""
    nft(netns_name, ruleset)


def remove(netns_name: str) -> None:
    """Delete the stand-in's table (idempotent)."""
    nft(netns_name, f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")


log = logging.getLogger(__name__)
Key = tuple[str, str]


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


class StandinSync:
    """Keeps the stand-in table in ``netns_name`` in step with an API server, like a tiny kube-proxy.

    One thread per resource does list, then watch from the list's resourceVersion (re-listing on
    any error, 410 and silent streams included); a sync thread recomputes the ruleset when the caches change and
    applies it only when the text differs. Nothing is applied before both resources were listed.
    """

    def __init__(
        self, api_client: client.ApiClient, netns_name: str, *, watch_timeout: int = 5, backoff: float = 0.5
    ) -> None:
        core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
        self.netns_name = netns_name
        self._list: dict[str, Callable[..., Any]] = {
            "services": core.list_service_for_all_namespaces,
            "endpointslices": discovery.list_endpoint_slice_for_all_namespaces,
        }
        self._watch_timeout, self._backoff = watch_timeout, backoff
        self._cache: dict[str, dict[Key, Mapping[str, Any]]] = {kind: {} for kind in self._list}
        self._listed: set[str] = set()
        self._dirty = False
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.applied: str | None = None
        self.syncs = 0
        self.errors = 0

    def start(self) -> StandinSync:
        targets = [(self._watch_loop, (kind,)) for kind in self._list] + [(self._sync_loop, ())]
        for target, args in targets:
            thread = threading.Thread(target=target, args=args, name=f"kubeproxy-standin{args}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=self._watch_timeout + 5)

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

    def _watch_loop(self, kind: str) -> None:
        list_fn = self._list[kind]
        while not self._stop.is_set():
            try:
                body = json.loads(list_fn(_preload_content=False, _request_timeout=10).data)
                rv = body["metadata"]["resourceVersion"]
                self._changed(kind, relisted={_key(o): o for o in body.get("items") or []})
                while not self._stop.is_set():
                    rv = self._watch_once(kind, list_fn, rv)
            except Exception as exc:  # noqa: BLE001 - any failure: back off and re-list
                if self._stop.is_set():
                    return
                self.errors += 1
                log.warning("kube-proxy stand-in: %s watch failed, re-listing", kind, extra={"error": repr(exc)})
                self._stop.wait(self._backoff)

    def _watch_once(self, kind: str, list_fn: Callable[..., Any], rv: str) -> str:
        stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
            list_fn,
            resource_version=rv,
            timeout_seconds=self._watch_timeout,
            allow_watch_bookmarks=True,
            deserialize=False,
            # A stream that goes silent (server stall, half-open connection) errors out and re-lists.
            _request_timeout=self._watch_timeout + 2,
        )
        for event in stream:
            obj, typ = event.get("object") or {}, event.get("type")
            if typ == "ERROR":
                raise RuntimeError(f"watch error: {obj}")
            rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
            if typ in ("ADDED", "MODIFIED"):
                self._changed(kind, put=obj)
            elif typ == "DELETED":
                self._changed(kind, deleted=obj)
            if self._stop.is_set():
                break
        return rv

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                ready = self._cond.wait_for(
                    lambda: self._stop.is_set() or (self._dirty and self._listed == set(self._list)), timeout=1
                )
                if self._stop.is_set() or not ready:
                    continue
                self._dirty = False
                services = list(self._cache["services"].values())
                slices = list(self._cache["endpointslices"].values())
            ruleset = standin_ruleset(services, slices)
            if ruleset == self.applied:
                continue
            try:
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
                self._cond.notify_all()
