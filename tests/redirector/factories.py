"""Service objects shaped as the API server returns them (dicts), for the redirector tests."""

from __future__ import annotations

from typing import Any

from shared import constants as c

LABELS = {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}


def service(
    name: str = "web",
    namespace: str = "shop",
    *,
    type_: str = "ClusterIP",
    cluster_ips: list[str] | None = None,
    families: list[str] | None = None,
    ports: list[dict[str, Any]] | None = None,
    external_ips: list[str] | None = None,
    ingress: list[dict[str, Any]] | None = None,
    labelled: bool = True,
    rv: str = "1",
) -> dict[str, Any]:
    ips = ["10.96.0.10"] if cluster_ips is None else cluster_ips
    spec: dict[str, Any] = {
        "type": type_,
        "clusterIP": ips[0] if ips else None,
        "clusterIPs": ips,
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}] if ports is None else ports,
    }
    if families is not None:
        spec["ipFamilies"] = families
    if external_ips:
        spec["externalIPs"] = external_ips
    obj: dict[str, Any] = {
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": rv,
                     "labels": dict(LABELS) if labelled else {}},
        "spec": spec,
    }
    if ingress is not None:
        obj["status"] = {"loadBalancer": {"ingress": ingress}}
    return obj


def numbered(i: int, *, dual_stack: bool = True, port: int = 80) -> dict[str, Any]:
    """Service number ``i`` with a ClusterIP (and an IPv6 one) derived from ``i``: 65,000 distinct."""
    v4 = f"10.{96 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"
    v6 = f"fd00:10:96::{i + 1:x}"
    return service(f"svc-{i}", "scale", cluster_ips=[v4, v6] if dual_stack else [v4],
                   families=["IPv4", "IPv6"] if dual_stack else ["IPv4"], ports=[{"name": "http", "port": port}])
