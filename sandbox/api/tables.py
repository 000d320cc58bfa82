"""Server-side printing (meta.k8s.io/v1 Table) so `kubectl get` shows real columns against the double.

WHY: `make demo` and people debugging tests point kubectl at the sandbox; without Tables kubectl
only prints NAME and AGE. Columns follow kube-apiserver's printers for the kinds listed below.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sandbox.api.resources import ResourceType

Obj = Mapping[str, Any]


def wants_table(accept: str | None) -> bool:
    return bool(accept) and "as=Table" in (accept or "")


def age(timestamp: str | None, now: datetime.datetime | None = None) -> str:
    """kubectl's short human duration ("42s", "5m", "3h", "2d")."""
    if not timestamp:
        return "<unknown>"
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = int(((now or datetime.datetime.now(datetime.UTC)) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "m" else 1):
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _ports(ports: Iterable[Mapping[str, Any]]) -> str:
    out = []
    for p in ports:
        node = f":{p['nodePort']}" if p.get("nodePort") else ""
        out.append(f"{p.get('port')}{node}/{p.get('protocol', 'TCP')}")
    return ",".join(out) or "<none>"


def _service(o: Obj) -> tuple[list[Any], list[Any]]:
    spec = o.get("spec") or {}
    ingress = ((o.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    external = [i.get("ip") or i.get("hostname") for i in ingress] + list(spec.get("externalIPs") or [])
    if spec.get("type") == "ExternalName":
        external = [spec.get("externalName")]
    elif spec.get("type") == "LoadBalancer" and not external:
        external = ["<pending>"]
    selector = ",".join(f"{k}={v}" for k, v in (spec.get("selector") or {}).items()) or "<none>"
    return [spec.get("type"), spec.get("clusterIP") or "<none>", ",".join(external) or "<none>",
            _ports(spec.get("ports") or [])], [selector]


def _namespace(o: Obj) -> tuple[list[Any], list[Any]]:
    return [(o.get("status") or {}).get("phase", "Active")], []


def _endpointslice(o: Obj) -> tuple[list[Any], list[Any]]:
    ports = ",".join(str(p.get("port")) for p in o.get("ports") or []) or "<unset>"
    addrs = [a for ep in o.get("endpoints") or [] for a in ep.get("addresses") or []]
    shown = ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")
    return [o.get("addressType"), ports, shown or "<unset>"], []


def _event(o: Obj) -> tuple[list[Any], list[Any]]:
    involved = o.get("involvedObject") or {}
    source = (o.get("source") or {}).get("component") or o.get("reportingComponent") or ""
    return ([o.get("type"), o.get("reason"), f"{str(involved.get('kind') or '').lower()}/{involved.get('name')}",
             o.get("message")], [source, o.get("count") or 1])


def _webhooks(o: Obj) -> tuple[list[Any], list[Any]]:
    return [len(o.get("webhooks") or [])], []


Columns = list[tuple[str, str]]
# kind -> (columns before Age, wide columns after Age, cells)
_PRINTERS: dict[str, tuple[Columns, Columns, Callable[[Obj], tuple[list[Any], list[Any]]]]] = {
    "Service": ([("Type", "string"), ("Cluster-IP", "string"), ("External-IP", "string"), ("Port(s)", "string")],
                [("Selector", "string")], _service),
    "Namespace": ([("Status", "string")], [], _namespace),
    "EndpointSlice": ([("AddressType", "string"), ("Ports", "string"), ("Endpoints", "string")], [], _endpointslice),
    "MutatingWebhookConfiguration": ([("Webhooks", "integer")], [], _webhooks),
    "Event": ([("Type", "string"), ("Reason", "string"), ("Object", "string"), ("Message", "string")],
              [("Source", "string"), ("Count", "integer")], _event),
}


def _row(rt: ResourceType, obj: Obj) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    before, after = _PRINTERS[rt.kind][2](obj)
    return {
        "cells": [meta.get("name"), *before, age(meta.get("creationTimestamp")), *after],
        "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta},
    }


def table(rt: ResourceType, objects: Iterable[Obj], list_meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    before, after, _ = _PRINTERS[rt.kind]
    columns = [("Name", "string", 0)] + [(n, t, 0) for n, t in before] + [("Age", "date", 0)]
    columns += [(n, t, 1) for n, t in after]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": dict(list_meta or {}),
        "columnDefinitions": [
            {"name": n, "type": t, "format": "name" if n == "Name" else "", "description": "", "priority": p}
            for n, t, p in columns
        ],
        "rows": [_row(rt, o) for o in objects],
    }
