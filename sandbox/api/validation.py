"""Minimal validation, with the real API server's field paths and wording.

WHY: the double must refuse what a cluster refuses (422 Invalid with a clear cause) for the cases our
components can actually produce — a webhook patch that breaks a label, a Service without ports — while
staying small. It is NOT the full Kubernetes validation; docs/sandbox.md lists what is checked.
Pure: each function returns a list of (field, message) causes.
"""

from __future__ import annotations

import re
from typing import Any

from sandbox.api.label_selectors import from_label_selector_object

Causes = list[tuple[str, str]]

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
PROTOCOLS = ("TCP", "UDP", "SCTP")


def _name(meta: dict[str, Any], pattern: re.Pattern[str], max_len: int, what: str) -> Causes:
    name = meta.get("name")
    if not name:
        return [("metadata.name", "Required value: name or generateName is required")]
    if not isinstance(name, str) or len(name) > max_len or not pattern.match(name):
        return [("metadata.name", f"Invalid value: {name!r}: a {what} must consist of lower case alphanumeric "
                 f"characters or '-' (at most {max_len} characters)")]
    return []


def _labels(meta: dict[str, Any]) -> Causes:
    causes: Causes = []
    for field in ("labels", "annotations"):
        value = meta.get(field)
        if value is not None and not isinstance(value, dict):
            causes.append((f"metadata.{field}", "Invalid value: must be a map of string keys to string values"))
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        return causes
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix))) or len(name) > 63 or not LABEL_NAME.match(name):
            causes.append(("metadata.labels", f"Invalid value: {key!r}: not a valid label key"))
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            causes.append(("metadata.labels", f"Invalid value: {value!r}: a valid label value must be 63 characters "
                           "or less and consist of alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"))
    return causes


def _port_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def validate_service(obj: dict[str, Any]) -> Causes:
    meta = obj.get("metadata") or {}
    causes = _name(meta, DNS1035_LABEL, 63, "DNS-1035 label (starting with a letter)") + _labels(meta)
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return causes + [("spec", "Required value")]
    svc_type = spec.get("type")
    if svc_type not in SERVICE_TYPES:
        causes.append(("spec.type", f"Unsupported value: {svc_type!r}: supported values: " + ", ".join(map(repr, SERVICE_TYPES))))
    if spec.get("sessionAffinity") not in ("None", "ClientIP"):
        causes.append(("spec.sessionAffinity", f"Unsupported value: {spec.get('sessionAffinity')!r}: supported values: 'ClientIP', 'None'"))
    headless = spec.get("clusterIP") == "None" or (spec.get("clusterIPs") or [None])[0] == "None"
    ports = spec.get("ports")
    if ports is not None and not isinstance(ports, list):
        return causes + [("spec.ports", "Invalid value: must be a list")]
    ports = ports or []
    if svc_type == "ExternalName":
        if not spec.get("externalName"):
            causes.append(("spec.externalName", "Required value"))
    elif not ports and not headless:
        causes.append(("spec.ports", "Required value"))
    seen_names: set[str] = set()
    seen_ports: set[tuple[Any, Any]] = set()
    for i, port in enumerate(ports):
        path = f"spec.ports[{i}]"
        if not isinstance(port, dict):
            causes.append((path, "Invalid value: must be an object"))
            continue
        name = port.get("name") or ""
        if len(ports) > 1 and not name:
            causes.append((f"{path}.name", "Required value"))
        elif name and (len(name) > 15 or not IANA_SVC_NAME.match(name)):
            causes.append((f"{path}.name", f"Invalid value: {name!r}: must be a lowercase IANA service name"))
        if name and name in seen_names:
            causes.append((f"{path}.name", f"Duplicate value: {name!r}"))
        seen_names.add(name)
        if not _port_number(port.get("port")):
            causes.append((f"{path}.port", f"Invalid value: {port.get('port')!r}: must be between 1 and 65535, inclusive"))
        protocol = port.get("protocol")
        if protocol not in PROTOCOLS:
            causes.append((f"{path}.protocol", f"Unsupported value: {protocol!r}: supported values: \"SCTP\", \"TCP\", \"UDP\""))
        key = (port.get("port"), protocol)
        if key in seen_ports:
            causes.append((path, f"Duplicate value: {{port: {key[0]}, protocol: {key[1]}}}"))
        seen_ports.add(key)
        target = port.get("targetPort")
        if isinstance(target, str) and not target.isdigit():
            if len(target) > 15 or not IANA_SVC_NAME.match(target):
                causes.append((f"{path}.targetPort", f"Invalid value: {target!r}: must be a port number or IANA service name"))
        elif target is not None and not _port_number(_as_int(target)):
            causes.append((f"{path}.targetPort", f"Invalid value: {target!r}: must be between 1 and 65535, inclusive"))
        if "nodePort" in port and port["nodePort"] not in (None, 0) and svc_type not in ("NodePort", "LoadBalancer"):
            causes.append((f"{path}.nodePort", f"Forbidden: may not be used when `type` is '{svc_type}'"))
    return causes


def validate_namespace(obj: dict[str, Any]) -> Causes:
    meta = obj.get("metadata") or {}
    return _name(meta, DNS1123_LABEL, 63, "lowercase RFC 1123 label") + _labels(meta)


def validate_endpointslice(obj: dict[str, Any]) -> Causes:
    meta = obj.get("metadata") or {}
    causes = _name(meta, DNS1123_SUBDOMAIN, 253, "lowercase RFC 1123 subdomain") + _labels(meta)
    if obj.get("addressType") not in ("IPv4", "IPv6", "FQDN"):
        causes.append(("addressType", f"Unsupported value: {obj.get('addressType')!r}: supported values: \"FQDN\", \"IPv4\", \"IPv6\""))
    endpoints = obj.get("endpoints")
    if not isinstance(endpoints, list):
        return causes + [("endpoints", "Invalid value: must be a list")]
    for i, ep in enumerate(endpoints):
        if not isinstance(ep, dict) or not ep.get("addresses"):
            causes.append((f"endpoints[{i}].addresses", "Required value: must contain at least 1 address"))
    return causes


def validate_mutating_webhooks(obj: dict[str, Any]) -> Causes:
    meta = obj.get("metadata") or {}
    causes = _name(meta, DNS1123_SUBDOMAIN, 253, "lowercase RFC 1123 subdomain") + _labels(meta)
    hooks = obj.get("webhooks") or []
    if not isinstance(hooks, list):
        return causes + [("webhooks", "Invalid value: must be a list")]
    names: set[str] = set()
    for i, hook in enumerate(hooks):
        path = f"webhooks[{i}]"
        if not isinstance(hook, dict):
            causes.append((path, "Invalid value: must be an object"))
            continue
        name = hook.get("name") or ""
        if not name or "." not in name or not DNS1123_SUBDOMAIN.match(name):
            causes.append((f"{path}.name", f"Invalid value: {name!r}: should be a domain with at least three segments"))
        if name in names:
            causes.append((f"{path}.name", f"Duplicate value: {name!r}"))
        names.add(name)
        cc = hook.get("clientConfig") or {}
        if bool(cc.get("url")) == bool(cc.get("service")):
            causes.append((f"{path}.clientConfig", "Required value: exactly one of url or service is required"))
        if cc.get("url") and not str(cc["url"]).startswith("https://"):
            causes.append((f"{path}.clientConfig.url", "Invalid value: 'https' is the only allowed URL scheme"))
        svc = cc.get("service") or {}
        if svc and (not svc.get("name") or not svc.get("namespace")):
            causes.append((f"{path}.clientConfig.service", "Required value: name and namespace are required"))
        if hook.get("sideEffects") not in ("None", "NoneOnDryRun"):
            causes.append((f"{path}.sideEffects", f"Unsupported value: {hook.get('sideEffects')!r}: supported values: \"None\", \"NoneOnDryRun\""))
        if "v1" not in (hook.get("admissionReviewVersions") or []):
            causes.append((f"{path}.admissionReviewVersions", "Required value: must include at least one of v1"))
        if hook.get("failurePolicy") not in ("Ignore", "Fail"):
            causes.append((f"{path}.failurePolicy", f"Unsupported value: {hook.get('failurePolicy')!r}"))
        timeout = hook.get("timeoutSeconds")
        if not isinstance(timeout, int) or not 1 <= timeout <= 30:
            causes.append((f"{path}.timeoutSeconds", f"Invalid value: {timeout!r}: the timeout value must be between 1 and 30 seconds"))
        for field in ("namespaceSelector", "objectSelector"):
            try:
                from_label_selector_object(hook.get(field), f"{path}.{field}")
            except ValueError as exc:
                causes.append((f"{path}.{field}", str(exc)))
    return causes


EVENT_NOTE_MAX = 1024  # kube-apiserver's NoteLengthLimit
EVENT_FIELD_MAX = 128  # ReportingInstance/Action/Reason length limits


def validate_event(obj: dict[str, Any]) -> Causes:
    """core/v1 Event, as kube-apiserver's legacyValidateEvent: the involved object's namespace is the Event's;
    an Event with eventTime (the newer form) also needs reportingComponent, reportingInstance, action and
    reason, and a message of at most 1 KiB."""
    meta = obj.get("metadata") or {}
    causes = _name(meta, DNS1123_SUBDOMAIN, 253, "lowercase RFC 1123 subdomain") + _labels(meta)
    involved = obj.get("involvedObject")
    if not isinstance(involved, dict):
        return causes + [("involvedObject", "Required value")]
    namespace, theirs = meta.get("namespace") or "", involved.get("namespace") or ""
    if (theirs and theirs != namespace) or (not theirs and namespace not in ("", "default", "kube-system")):
        causes.append(("involvedObject.namespace", f"Invalid value: {theirs!r}: does not match event.namespace"))
    if obj.get("eventTime"):
        for field in ("reportingComponent", "reportingInstance", "action", "reason"):
            value = obj.get(field) or ""
            if not value:
                causes.append((field, "Required value"))
            elif len(str(value)) > EVENT_FIELD_MAX:
                causes.append((field, f"Too long: may not be longer than {EVENT_FIELD_MAX}"))
        if len(str(obj.get("message") or "")) > EVENT_NOTE_MAX:
            causes.append(("message", f"Too long: may not be longer than {EVENT_NOTE_MAX}"))
    return causes


VALIDATORS = {
    "Service": validate_service,
    "Namespace": validate_namespace,
    "EndpointSlice": validate_endpointslice,
    "MutatingWebhookConfiguration": validate_mutating_webhooks,
    "Event": validate_event,
}


def validate(kind: str, obj: dict[str, Any]) -> Causes:
    fn = VALIDATORS.get(kind)
    return fn(obj) if fn else []
