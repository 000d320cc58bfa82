"""Who handles a Service: kube-proxy or our proxy. One pure function, used by every component.

The rules, in the order they are applied (docs/policy.md has the same table with examples):

| #  | rule                                                        | outcome                                   |
|----|-------------------------------------------------------------|-------------------------------------------|
| 1  | handoff label names ANOTHER proxy                           | leave (that proxy owns it)                |
| 2  | namespace is excluded                                       | leave (never touched)                     |
| 3  | type is not ClusterIP/NodePort/LoadBalancer (ExternalName)  | ineligible                                |
| 4  | headless (clusterIP: None)                                  | ineligible                                |
| 5  | no ports                                                    | ineligible                                |
| 6  | any port UDP or SCTP (mixed included)                       | ineligible: the label would move ALL ports|
| 7  | Service label lightpath.cloud/proxy=enabled|disabled        | wins                                      |
| 8  | Namespace label lightpath.cloud/proxy=enabled|disabled      | wins over the global mode                 |
| 9  | global mode opt-in (default) / opt-out                      | wants proxy: no / yes                     |
| 10 | eligible & wanted -> label; otherwise carrying OUR label -> unlabel; else leave              |

appProtocol never makes a TCP Service ineligible; it is recorded per port ("http" or "tcp") for the proxy.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared import constants as c

ELIGIBLE_TYPES = frozenset({"ClusterIP", "NodePort", "LoadBalancer"})
PROXY_PROTOCOL = "TCP"


class Action(enum.StrEnum):
    """What should happen to the handoff label."""

    LABEL = "label"
    UNLABEL = "unlabel"
    LEAVE = "leave"


@dataclass(frozen=True)
class PolicyConfig:
    """The knobs of the policy; validated on construction so a bad flag fails loudly at start-up."""

    proxy_name: str = c.DEFAULT_PROXY_NAME
    mode: str = c.DEFAULT_MODE
    excluded_namespaces: frozenset[str] = field(default_factory=lambda: frozenset(c.DEFAULT_EXCLUDED_NAMESPACES))

    def __post_init__(self) -> None:
        if self.mode not in c.MODES:
            raise ValueError(f"mode must be one of {', '.join(c.MODES)}, not {self.mode!r}")
        if not self.proxy_name or len(self.proxy_name) > 63:
            raise ValueError(f"proxy name must be a non-empty label value of at most 63 characters: {self.proxy_name!r}")
        if not isinstance(self.excluded_namespaces, frozenset):
            object.__setattr__(self, "excluded_namespaces", frozenset(self.excluded_namespaces))


@dataclass(frozen=True)
class PortInfo:
    """One Service port as the policy sees it."""

    name: str
    port: int | None
    protocol: str
    app_protocol: str  # "http" or "tcp" (meaningful for TCP ports only)

    def describe(self) -> str:
        label = self.name or "(unnamed)"
        return f"{label}/{self.protocol} {self.port if self.port is not None else '?'}"


@dataclass(frozen=True)
class Decision:
    """The outcome: the action on the label, a short human reason, and the facts behind it."""

    action: Action
    reason: str
    # Should the Service end up with OUR handoff label? (None: not ours to decide: another proxy, excluded.)
    wants_proxy: bool | None
    eligible: bool
    labelled_by_us: bool
    ports: tuple[PortInfo, ...] = ()
    # Who serves the Service now: "kube-proxy", "lightpath" or "other:<proxy name>".
    handled_by: str = "kube-proxy"

    @property
    def pending(self) -> bool:
        """True when the label and the policy disagree (e.g. admitted while the webhook was down)."""
        return self.action is not Action.LEAVE


def handled_by(label_value: str | None, proxy_name: str) -> str:
    """Who serves a Service whose handoff label has ``label_value``."""
    if label_value is None:
        return "kube-proxy"
    if label_value == proxy_name:
        return "lightpath"
    return f"other:{label_value}"


def classify_app_protocol(app_protocol: str | None) -> str:
    """'http' for HTTP-ish appProtocols (http, https, h2c, grpc, kubernetes.io/ws, ...), else 'tcp'."""
    if not app_protocol:
        return "tcp"
    return "http" if app_protocol.strip().lower() in c.HTTP_APP_PROTOCOLS else "tcp"


def service_ports(service: Mapping[str, Any]) -> tuple[PortInfo, ...]:
    """The Service's ports with defaults applied (missing protocol means TCP, as the apiserver defaults)."""
    spec = _mapping(service.get("spec"))
    raw = spec.get("ports")
    ports: list[PortInfo] = []
    for item in raw if isinstance(raw, list) else []:
        p = _mapping(item)
        number = p.get("port")
        protocol = p.get("protocol") or "TCP"
        ports.append(
            PortInfo(
                name=str(p.get("name") or ""),
                port=number if isinstance(number, int) else None,
                protocol=str(protocol).upper(),
                app_protocol=classify_app_protocol(p.get("appProtocol") if isinstance(p.get("appProtocol"), str) else None),
            )
        )
    return tuple(ports)


def ineligibility(service: Mapping[str, Any], ports: Iterable[PortInfo] | None = None) -> str | None:
    """Why the Service cannot be handed to the proxy (rules 3-6), or None when it can."""
    spec = _mapping(service.get("spec"))
    svc_type = spec.get("type") or "ClusterIP"
    if svc_type not in ELIGIBLE_TYPES:
        return f"type {svc_type} stays with kube-proxy"
    if spec.get("clusterIP") == "None":
        return "headless Service (clusterIP: None) has no virtual IP to redirect"
    port_list = tuple(service_ports(service) if ports is None else ports)
    if not port_list:
        return "Service has no ports"
    other = [p for p in port_list if p.protocol != PROXY_PROTOCOL]
    if other:
        listed = ", ".join(p.describe() for p in other)
        verb = "stays" if len(other) == 1 else "stay"
        return f"port {listed} {verb} with kube-proxy (the label would move every port)"
    return None


def _opt_value(labels: Mapping[str, str]) -> str | None:
    value = labels.get(c.OPT_LABEL)
    return value if value in (c.OPT_ENABLED, c.OPT_DISABLED) else None


def wants_proxy(
    service_labels: Mapping[str, str], namespace_labels: Mapping[str, str], mode: str
) -> tuple[bool, str]:
    """Rules 7-9: Service label wins over Namespace label, which wins over the global mode."""
    svc = _opt_value(service_labels)
    if svc is not None:
        return svc == c.OPT_ENABLED, f"Service opted {'in' if svc == c.OPT_ENABLED else 'out'}"
    ns = _opt_value(namespace_labels)
    if ns is not None:
        return ns == c.OPT_ENABLED, f"namespace opted {'in' if ns == c.OPT_ENABLED else 'out'}"
    if mode == c.MODE_OPT_OUT:
        return True, "global mode opt-out"
    return False, "not opted in (global mode opt-in)"


def decide(service: Mapping[str, Any], namespace_labels: Mapping[str, str], config: PolicyConfig) -> Decision:
    """Decide who handles ``service`` (a Service as a JSON dict). Pure: no I/O, never raises on odd input."""
    meta = _mapping(service.get("metadata"))
    labels = _str_mapping(meta.get("labels"))
    namespace = str(meta.get("namespace") or "default")
    current = labels.get(c.SERVICE_PROXY_NAME_LABEL)
    ours = current == config.proxy_name
    ports = service_ports(service)

    def done(action: Action, reason: str, wants: bool | None, eligible: bool) -> Decision:
        return Decision(action, reason, wants, eligible, ours, ports, handled_by(current, config.proxy_name))

    # Rule 1: another proxy owns it.
    if current is not None and not ours:
        return done(Action.LEAVE, f"handled by another proxy ({current})", None, False)
    # Rule 2: excluded namespace.
    if namespace in config.excluded_namespaces:
        return done(Action.LEAVE, f"namespace {namespace} is excluded", None, False)
    # Rules 3-6: eligibility.
    why_not = ineligibility(service, ports)
    if why_not is not None:
        if ours:
            return done(Action.UNLABEL, f"back to kube-proxy: {why_not}", False, False)
        return done(Action.LEAVE, why_not, False, False)
    # Rules 7-9: opt-in / opt-out.
    wanted, why = wants_proxy(labels, namespace_labels, config.mode)
    # Rule 10.
    if wanted:
        return done(Action.LEAVE if ours else Action.LABEL, f"{why}: TCP Service handled by {config.proxy_name}", True, True)
    if ours:
        return done(Action.UNLABEL, f"{why}: back to kube-proxy", False, True)
    return done(Action.LEAVE, f"{why}: stays with kube-proxy", False, True)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _str_mapping(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items() if v is not None}
