"""Service and EndpointSlice dicts shaped as the API server returns them, and a few Delta xDS helpers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from shared import constants as c

OURS = c.DEFAULT_PROXY_NAME
NODE = "node-a"


def service(name: str = "web", namespace: str = "shop", *, ips: Iterable[str] = ("10.96.0.10",),
            ports: list[dict[str, Any]] | None = None, type_: str = "ClusterIP", label: str | None = OURS,
            itp: object = None, etp: object = None, external_ips: Iterable[str] = (),
            ingress: Iterable[str] = ()) -> dict[str, Any]:
    ips = list(ips)
    spec: dict[str, Any] = {
        "type": type_, "clusterIP": ips[0] if ips else None, "clusterIPs": ips,
        "ipFamilies": ["IPv6" if ":" in ip else "IPv4" for ip in ips],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}] if ports is None else ports,
    }
    if itp is not None:
        spec["internalTrafficPolicy"] = itp
    if etp is not None:
        spec["externalTrafficPolicy"] = etp
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    obj: dict[str, Any] = {"metadata": {"name": name, "namespace": namespace, "resourceVersion": "1",
                                        "labels": {} if label is None else {c.SERVICE_PROXY_NAME_LABEL: label}},
                           "spec": spec}
    if ingress:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in ingress]}}
    return obj


def endpoint(ip: str, node: str | None = NODE, *, ready: bool | None = True, serving: bool | None = None,
             terminating: bool | None = None, more: Iterable[str] = ()) -> dict[str, Any]:
    conditions = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
                  if v is not None}
    ep: dict[str, Any] = {"addresses": [ip, *more], "conditions": conditions}
    if node is not None:
        ep["nodeName"] = node
    return ep


def endpoint_slice(name: str = "web-abc", service_name: str = "web", namespace: str = "shop", *,
                   family: str = "IPv4", ports: Mapping[str, int] | Iterable[tuple[str, int, str]] = (("http", 8080, "TCP"),),
                   endpoints: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    items = [(n, p, "TCP") for n, p in ports.items()] if isinstance(ports, Mapping) else list(ports)
    return {"metadata": {"name": name, "namespace": namespace, "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": family, "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in items],
            "endpoints": list(endpoints)}


def request(type_url: str, *, node: str | None = NODE, nonce: str = "", subscribe: Iterable[str] = (),
            unsubscribe: Iterable[str] = (), initial: Mapping[str, str] | None = None,
            error: str | None = None) -> discovery_pb2.DeltaDiscoveryRequest:
    """A DeltaDiscoveryRequest as Envoy sends one."""
    req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce,
                                              resource_names_subscribe=list(subscribe),
                                              resource_names_unsubscribe=list(unsubscribe))
    if node is not None:
        req.node.id = node
    if initial:
        req.initial_resource_versions.update(initial)
    if error is not None:
        req.error_detail.code = 3  # INVALID_ARGUMENT, as Envoy sends
        req.error_detail.message = error
    return req


def contents(response: discovery_pb2.DeltaDiscoveryResponse) -> tuple[dict[str, str], list[str]]:
    """(name -> version sent, removed names) of a response."""
    return {r.name: r.version for r in response.resources}, list(response.removed_resources)
