"""Service/Namespace builders and the mixed cluster the CLI tests share (plain JSON dicts, as the API serves them)."""

from __future__ import annotations

from typing import Any

from shared import constants as c

OURS = c.DEFAULT_PROXY_NAME
ENABLED = {c.OPT_LABEL: c.OPT_ENABLED}
DISABLED = {c.OPT_LABEL: c.OPT_DISABLED}
LABELLED = {c.SERVICE_PROXY_NAME_LABEL: OURS}


def port(
    number: int, protocol: str = "TCP", name: str | None = None, app: str | None = None
) -> dict[str, Any]:
    p: dict[str, Any] = {
        "name": name or f"p{number}-{protocol.lower()}",
        "port": number,
        "protocol": protocol,
    }
    if app:
        p["appProtocol"] = app
    return p


def service(
    name: str,
    namespace: str = "shop",
    *ports: dict[str, Any],
    type_: str = "ClusterIP",
    headless: bool = False,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Service as a client would POST it (the apiserver fills in clusterIP unless headless)."""
    spec: dict[str, Any] = {"type": type_, "ports": list(ports) or [port(80)]}
    if headless:
        spec["clusterIP"] = "None"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": spec,
    }


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": dict(labels or {})}}


def mixed_cluster() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Namespaces and Services covering every kind of row `status` must get right."""
    namespaces = [namespace("shop"), namespace("infra"), namespace("kube-system")]
    services = [
        service("web", "shop", port(80, name="http")),
        service(
            "api",
            "shop",
            port(8080, name="http", app="http"),
            port(8443, name="grpc", app="kubernetes.io/h2c"),
        ),
        service("dns", "infra", port(53, "UDP", name="dns")),
        service("dns-mixed", "infra", port(53, "TCP", name="dns-tcp"), port(53, "UDP", name="dns")),
        service("db", "shop", port(5432, name="pg"), headless=True),
        service("mesh", "shop", port(80), labels={c.SERVICE_PROXY_NAME_LABEL: "cilium"}),
        service("metrics", "kube-system", port(9100), labels=ENABLED),
    ]
    return namespaces, services
