"""Services + EndpointSlices -> configuration of the node-local Envoy (pure; ``sandbox.envoy_process`` runs it).

WHY one place: the proxy must answer exactly the (ip, port) pairs the redirector sends it, so the keys
come from ``redirector.desired`` (the redirector's own translation) and the per-port HTTP/TCP choice from
``shared.policy.service_ports``; nothing here re-implements a rule.

Shape: ONE listener per IP family on the proxy port with the ``original_dst`` listener filter (the kernel
REDIRECT keeps the dialled ClusterIP in SO_ORIGINAL_DST); one filter chain per redirected (ip, port)
(NodePorts: port only) -> an http_connection_manager (HTTP appProtocol: Envoy adds x-request-id and
x-envoy-* headers) or a tcp_proxy, to a STATIC cluster of the Service port's ready endpoints. Upstream
sockets carry SO_MARK = the proxy mark so the redirector never redirects Envoy's own connections.

Envoy reads listeners and clusters from files (``bootstrap``: ``dynamic_resources`` with
``path_config_source``) that are replaced by atomic rename, so Services change without restarting Envoy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redirector.desired import desired_state
from redirector.model import Entry, Family
from shared import constants as c
from shared import policy

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SOL_SOCKET, SO_MARK = 1, 36  # linux/socket.h
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
JsonDict = dict[str, Any]
UNMATCHED = "lightpath_unmatched"


@dataclass(frozen=True)
class EnvoyResources:
    """What Envoy should hold: listeners and clusters as v3 JSON, plus the routes for humans."""

    listeners: tuple[JsonDict, ...]
    clusters: tuple[JsonDict, ...]
    routes: tuple[str, ...] = field(default=())  # "10.96.0.10:80 -> demo_web_80 (http)"


def served(service: Mapping[str, Any], proxy_name: str = c.DEFAULT_PROXY_NAME) -> bool:
    """Should Envoy know this Service? Ours (labelled) or eligible and not another proxy's.

    Knowing eligible Services BEFORE they are labelled means a redirect that appears never lands on an
    Envoy without a matching filter chain (which would close the connection).
    """
    labels = _mapping(_mapping(service.get("metadata")).get("labels"))
    label = labels.get(c.SERVICE_PROXY_NAME_LABEL)
    if label == proxy_name:
        return True
    return label is None and policy.ineligibility(service) is None


def cluster_name(namespace: str, name: str, port: int, family: int = 4) -> str:
    """Stats-friendly: Kubernetes names never contain '_' or '.', so this stays unambiguous."""
    return f"{namespace}_{name}_{port}" + ("_ipv6" if family == 6 else "")


def ready_endpoints(
    namespace: str, name: str, port_name: str, slices: Iterable[Mapping[str, Any]], family: int = 4
) -> tuple[tuple[str, int], ...]:
    """(ip, targetPort) of the Service port's ready endpoints of one IP family (as kube-proxy: a ClusterIP
    of a family goes to endpoints of that family), from its EndpointSlices, deduplicated."""
    found: set[tuple[str, int]] = set()
    for s in slices:
        meta = _mapping(s.get("metadata"))
        if meta.get("namespace", namespace) != namespace:
            continue
        if _mapping(meta.get("labels")).get(SERVICE_NAME_LABEL) != name:
            continue
        if s.get("addressType", "IPv4") != f"IPv{family}":
            continue
        numbers = [
            p.get("port")
            for p in (_mapping(x) for x in _list(s.get("ports")))
            if str(p.get("name") or "") == port_name and str(p.get("protocol") or "TCP") == "TCP"
        ]
        if not numbers or not isinstance(numbers[0], int):
            continue
        for ep in (_mapping(x) for x in _list(s.get("endpoints"))):
            if _mapping(ep.get("conditions")).get("ready") is False:
                continue
            found.update((str(ip), numbers[0]) for ip in _list(ep.get("addresses")))
    return tuple(sorted(found))


def translate(
    services: Iterable[Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    *,
    proxy_port: int = c.DEFAULT_PROXY_PORT,
    mark: int = c.DEFAULT_PROXY_MARK,
    proxy_name: str = c.DEFAULT_PROXY_NAME,
    ipv6: bool = True,
) -> EnvoyResources:
    """The pure translation. Same input, same output (sorted), so unchanged config is never rewritten."""
    services = [s for s in services if served(s, proxy_name)]
    slices = list(slices)
    by_id = {_sid(s): s for s in services}
    state = desired_state(services)
    chains: dict[Family, list[JsonDict]] = {4: [], 6: []}
    clusters: dict[str, JsonDict] = {}
    routes: list[str] = []
    # Key(order=True) cannot compare a NodePort key (ip None) with an address key: sort on our own terms.
    for key, entry in sorted(state.entries.items(), key=lambda kv: (kv[0].family, kv[0].ip or "", kv[0].port)):
        if key.family == 6 and not ipv6:
            continue
        service = by_id[f"{entry.owner.namespace}/{entry.owner.name}"]
        port = next(p for p in policy.service_ports(service) if p.name == entry.owner.port_name)
        assert port.port is not None  # desired_state skips ports without a number
        name = cluster_name(entry.owner.namespace, entry.owner.name, port.port, key.family)
        if name not in clusters:
            eps = ready_endpoints(entry.owner.namespace, entry.owner.name, port.name, slices, key.family)
            clusters[name] = _cluster(name, eps, mark)
        chains[key.family].append(_filter_chain(entry, name, port.app_protocol))
        routes.append(f"{key} -> {name} ({port.app_protocol}, {len(clusters[name]['load_assignment']['endpoints'][0]['lb_endpoints'])} endpoints)")
    clusters[UNMATCHED] = _cluster(UNMATCHED, (), mark)
    listeners = [_listener(4, "0.0.0.0", proxy_port, chains[4])]
    if ipv6:
        listeners.append(_listener(6, "::", proxy_port, chains[6]))
    return EnvoyResources(tuple(listeners), tuple(clusters[k] for k in sorted(clusters)), tuple(routes))


def _filter_chain(entry: Entry, cluster: str, app_protocol: str) -> JsonDict:
    key = entry.key
    match: JsonDict = {"destination_port": key.port}
    if key.ip is not None:
        match["prefix_ranges"] = [{"address_prefix": key.ip, "prefix_len": 128 if key.family == 6 else 32}]
    stat = f"{cluster}_{'any' if key.ip is None else key.ip.replace(':', '-')}"
    if app_protocol == "http":
        filt = {
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": stat,
                "use_remote_address": True,
                "generate_request_id": True,
                "route_config": {
                    "name": cluster,
                    "virtual_hosts": [
                        {"name": cluster, "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}
                    ],
                },
                "http_filters": [
                    {
                        "name": "envoy.filters.http.router",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                    }
                ],
            },
        }
    else:
        filt = {
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": stat,
                "cluster": cluster,
            },
        }
    return {"name": f"{key}", "filter_chain_match": match, "filters": [filt]}


def _listener(family: Family, address: str, port: int, chains: list[JsonDict]) -> JsonDict:
    listener: JsonDict = {
        "@type": LISTENER_TYPE,
        "name": f"lightpath_ipv{family}",
        "address": {"socket_address": {"address": address, "port_value": port}},
        "listener_filters": [
            {
                "name": "envoy.filters.listener.original_dst",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
                },
            }
        ],
        "filter_chains": chains,
        # Envoy refuses a listener without chains; unknown destinations land here and are closed
        # (counted as cluster.lightpath_unmatched.upstream_cx_none_healthy).
        "default_filter_chain": {
            "name": "unmatched",
            "filters": [
                {
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": UNMATCHED,
                        "cluster": UNMATCHED,
                    },
                }
            ],
        },
    }
    return listener


def _cluster(name: str, endpoints: tuple[tuple[str, int], ...], mark: int) -> JsonDict:
    return {
        "@type": CLUSTER_TYPE,
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "upstream_bind_config": {
            "socket_options": [
                {"level": SOL_SOCKET, "name": SO_MARK, "int_value": mark, "state": "STATE_PREBIND"}
            ]
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}}
                        for ip, port in endpoints
                    ]
                }
            ],
        },
    }


def bootstrap(config_dir: Path, *, admin_port: int = c.ENVOY_ADMIN_PORT, node_id: str = "lightpath") -> JsonDict:
    """Envoy's bootstrap: admin on loopback, listeners and clusters from watched files in ``config_dir``."""
    return {
        "node": {"id": node_id, "cluster": "lightpath"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "cds_config": {"path_config_source": {"path": str(config_dir / "cds.json")}, "resource_api_version": "V3"},
            "lds_config": {"path_config_source": {"path": str(config_dir / "lds.json")}, "resource_api_version": "V3"},
        },
    }


def discovery_response(resources: Iterable[JsonDict], version: str) -> JsonDict:
    return {"version_info": version, "resources": list(resources)}


def _sid(service: Mapping[str, Any]) -> str:
    meta = _mapping(service.get("metadata"))
    return f"{meta.get('namespace') or 'default'}/{meta.get('name') or ''}"


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
