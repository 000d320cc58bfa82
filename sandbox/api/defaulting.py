"""Scheme defaulting: what the real API server fills in when it decodes a request, BEFORE admission.

WHY: a mutating webhook sees objects after defaulting (type, protocol, targetPort, sessionAffinity...)
but before the Service REST storage allocates cluster IPs and node ports (sandbox/api/allocation.py runs
after admission, as in kube-apiserver). Getting that order right is what lets webhook tests mean
something. Pure functions on plain dicts; they return new dicts.
"""

from __future__ import annotations

import copy
from typing import Any

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def _service(obj: dict[str, Any]) -> None:
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        return
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    svc_type = spec["type"]
    for port in spec.get("ports") or []:
        if not isinstance(port, dict):
            continue
        port.setdefault("protocol", "TCP")
        if port.get("targetPort") in (None, 0, "") and port.get("port") is not None:
            port["targetPort"] = port["port"]
    if svc_type != "ExternalName":
        spec.setdefault("internalTrafficPolicy", "Cluster")
    if svc_type in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    if svc_type == "LoadBalancer":
        spec.setdefault("allocateLoadBalancerNodePorts", True)
    if spec.get("sessionAffinity") == "ClientIP":
        spec.setdefault("sessionAffinityConfig", {"clientIP": {"timeoutSeconds": 10800}})


def _namespace(obj: dict[str, Any]) -> None:
    meta = obj.setdefault("metadata", {})
    name = meta.get("name")
    if name:
        # The real API server forces this label to the namespace's name on every write.
        meta.setdefault("labels", {})
        if isinstance(meta["labels"], dict):
            meta["labels"][NAMESPACE_NAME_LABEL] = name
    spec = obj.setdefault("spec", {})
    if isinstance(spec, dict):
        spec.setdefault("finalizers", ["kubernetes"])


def _endpointslice(obj: dict[str, Any]) -> None:
    if obj.get("endpoints") is None:
        obj["endpoints"] = []
    for ep in obj["endpoints"] if isinstance(obj["endpoints"], list) else []:
        if isinstance(ep, dict):
            ep.setdefault("conditions", {})
    for port in obj.get("ports") or []:
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")
            port.setdefault("name", "")


def _mutating_webhooks(obj: dict[str, Any]) -> None:
    for hook in obj.get("webhooks") or []:
        if not isinstance(hook, dict):
            continue
        hook.setdefault("failurePolicy", "Fail")
        hook.setdefault("matchPolicy", "Equivalent")
        hook.setdefault("namespaceSelector", {})
        hook.setdefault("objectSelector", {})
        hook.setdefault("timeoutSeconds", 10)
        hook.setdefault("reinvocationPolicy", "Never")
        service = (hook.get("clientConfig") or {}).get("service")
        if isinstance(service, dict):
            service.setdefault("port", 443)
        for rule in hook.get("rules") or []:
            if isinstance(rule, dict):
                rule.setdefault("scope", "*")


_BY_KIND = {
    "Service": _service,
    "Namespace": _namespace,
    "EndpointSlice": _endpointslice,
    "MutatingWebhookConfiguration": _mutating_webhooks,
}


def apply_defaults(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """A defaulted copy of `obj`; tolerant of malformed input (validation reports that later)."""
    out = copy.deepcopy(obj)
    if not isinstance(out.get("metadata"), dict):
        out["metadata"] = {}
    fn = _BY_KIND.get(kind)
    if fn is not None:
        fn(out)
    return out
