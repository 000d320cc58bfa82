"""Who handles a Service: kube-proxy or our proxy. One pure function, used by every component.

The rules, in the order they are applied (docs/policy.md has the same table with examples):

| #  | rule                                                        | outcome                                   |
|----|-------------------------------------------------------------|-------------------------------------------|
| 1  | handoff label names ANOTHER proxy                           | leave (that proxy owns it)                |
| 2  | namespace is excluded                                       | leave (never touched)                     |
| 2a | default/kubernetes (the API server's own Service)           | leave; unlabel if it carries OUR label    |
| 3  | type is not ClusterIP/NodePort/LoadBalancer (ExternalName)  | ineligible                                |
| 4  | headless (clusterIP: None)                                  | ineligible                                |
| 5  | no ports, or a port the policy cannot read                  | ineligible                                |
| 6  | any port UDP or SCTP (mixed included)                       | ineligible: the label would move ALL ports|
| 7  | Service label lightpath.cloud/proxy=enabled|disabled        | wins                                      |
| 8  | Namespace label lightpath.cloud/proxy=enabled|disabled      | wins over the global mode                 |
| 9  | global mode opt-in (default) / opt-out                      | wants proxy: no / yes                     |
| 10 | eligible & wanted -> label; otherwise carrying OUR label -> unlabel; else leave              |

appProtocol never makes a TCP Service ineligible; it is recorded per port ("http" or "tcp") for the proxy.
Every reason is at most MAX_REASON characters, whatever the input (it becomes an annotation, a warning
and an audit annotation; a Service with 10,000 UDP ports must not get a 270 kB one).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared import constants as c

ELIGIBLE_TYPES = frozenset({"ClusterIP", "NodePort", "LoadBalancer"})
PROXY_PROTOCOL = "TCP"
PROTOCOLS = frozenset({"TCP", "UDP", "SCTP"})  # exactly as the API spells them: "tcp" is invalid
# The API server's own Service. Every in-cluster client reaches the API through it (the redirector
# included), so handing it to the proxy would make the whole cluster depend on our data path.
APISERVER_SERVICE = ("default", "kubernetes")
MAX_REASON = 256  # characters; bounds the annotation, warning and audit annotation the webhook adds
LISTED_PORTS = 3  # ports named in a reason; the rest are counted


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
    # Why the policy cannot read this port (not an object, invalid protocol, no port number), or None.
    problem: str | None = None

    def describe(self) -> str:
        label = _clip(self.name, 32) or "(unnamed)"
        return f"{label}/{_clip(self.protocol, 16)} {self.port if self.port is not None else '?'}"


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
    """'http' for the appProtocols the proxy speaks HTTP for (http, h2c, grpc, kubernetes.io/ws, ...:
    shared.constants.HTTP_APP_PROTOCOLS, the control plane's lists), else 'tcp'."""
    if not app_protocol:
        return "tcp"
    return "http" if app_protocol.strip().lower() in c.HTTP_APP_PROTOCOLS else "tcp"


def service_ports(service: Mapping[str, Any]) -> tuple[PortInfo, ...]:
    """The Service's ports with defaults applied (missing protocol means TCP, as the apiserver defaults).

    A port the policy cannot read keeps its place, with ``problem`` saying why (its protocol is then
    "?" or the invalid value as given, never "TCP"): such a Service is not eligible.
    """
    spec = _mapping(service.get("spec"))
    raw = spec.get("ports")
    return tuple(_port_info(item) for item in (raw if isinstance(raw, list) else []))


def _port_info(item: object) -> PortInfo:
    if not isinstance(item, Mapping):
        return PortInfo("", None, "?", "tcp", f"{_short(item)}, not an object")
    name = item.get("name")
    number = item.get("port")
    raw_protocol = item.get("protocol")
    app = item.get("appProtocol")
    missing = raw_protocol is None or raw_protocol == ""  # the apiserver defaults it to TCP
    valid = isinstance(raw_protocol, str) and raw_protocol in PROTOCOLS
    info = PortInfo(
        name=name if isinstance(name, str) else "",
        port=number if isinstance(number, int) and not isinstance(number, bool) else None,
        protocol="TCP" if missing else _clip(_text(raw_protocol), 16) or "?",
        app_protocol=classify_app_protocol(app if isinstance(app, str) else None),
    )
    if not (missing or valid):
        problem = f"protocol {_short(raw_protocol)} is not TCP, UDP or SCTP"
    elif info.port is None or not 1 <= info.port <= 65535:
        problem = f"port number {_short(number)} is not an integer from 1 to 65535"
    else:
        return info
    return PortInfo(info.name, info.port, info.protocol, info.app_protocol, problem)


def ineligibility(service: Mapping[str, Any], ports: Iterable[PortInfo] | None = None) -> str | None:
    """Why the Service cannot be handed to the proxy (rules 3-6), or None when it can.

    Bounded (MAX_REASON) whatever the input: at most LISTED_PORTS ports are named, the rest counted.
    """
    spec = _mapping(service.get("spec"))
    svc_type = spec.get("type") or "ClusterIP"
    if not isinstance(svc_type, str) or svc_type not in ELIGIBLE_TYPES:  # a list or map is unhashable
        shown = _clip(svc_type, 40) if isinstance(svc_type, str) else _short(svc_type)
        return f"type {shown} stays with kube-proxy"
    if spec.get("clusterIP") == "None":
        return "headless Service (clusterIP: None) has no virtual IP to redirect"
    port_list = tuple(service_ports(service) if ports is None else ports)
    if not port_list:
        return "Service has no ports"
    unreadable = [(i, p) for i, p in enumerate(port_list, 1) if p.problem is not None]
    if unreadable:
        i, p = unreadable[0]
        named = f"#{i}" + (f" ({_clip(p.name, 32)})" if p.name else "")
        if len(unreadable) == 1:
            return _clip(f"port {named} cannot be read ({p.problem}): the Service stays with kube-proxy")
        return _clip(f"{len(unreadable)} of {len(port_list)} ports cannot be read (first: port {named}, {p.problem}): "
                     "the Service stays with kube-proxy")
    other = [p for p in port_list if p.protocol != PROXY_PROTOCOL]
    if not other:
        return None
    listed = ", ".join(p.describe() for p in other[:LISTED_PORTS])
    if len(other) <= LISTED_PORTS:
        verb = "stays" if len(other) == 1 else "stay"
        return _clip(f"port {listed} {verb} with kube-proxy (the label would move every port)")
    protocols = {p.protocol for p in other}
    what = next(iter(protocols)) if len(protocols) == 1 else "not TCP"
    return _clip(f"{len(other)} of {len(port_list)} ports are {what} and stay with kube-proxy "
                 f"(the label would move every port); first: {listed}, ...")


def apiserver_service(service: Mapping[str, Any]) -> bool:
    """True for default/kubernetes, the API server's own Service (rule 2a: never migrated)."""
    meta = _mapping(service.get("metadata"))
    return (meta.get("namespace") or "default", meta.get("name")) == APISERVER_SERVICE


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
    namespace = _text(meta.get("namespace") or "default")
    current = labels.get(c.SERVICE_PROXY_NAME_LABEL)
    ours = current == config.proxy_name
    ports = service_ports(service)

    def done(action: Action, reason: str, wants: bool | None, eligible: bool) -> Decision:
        return Decision(action, _clip(reason), wants, eligible, ours, ports, handled_by(current, config.proxy_name))

    # Rule 1: another proxy owns it.
    if current is not None and not ours:
        return done(Action.LEAVE, f"handled by another proxy ({_clip(current, 63)})", None, False)
    # Rule 2: excluded namespace.
    if namespace in config.excluded_namespaces:
        return done(Action.LEAVE, f"namespace {_clip(namespace, 63)} is excluded", None, False)
    # Rule 2a: the API server's own Service is never migrated; our label on it is removed.
    if apiserver_service(service):
        why = "default/kubernetes is the API server's own Service: every in-cluster client depends on it"
        if ours:
            return done(Action.UNLABEL, f"back to kube-proxy: {why}", False, False)
        return done(Action.LEAVE, f"{why}; never migrated", None, False)
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
    return {_text(k): _text(v) for k, v in value.items() if v is not None}


def _text(value: object) -> str:
    """str(value), except that it never raises (str() of an int over 4,300 digits does)."""
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except ValueError:
        return f"<{type(value).__name__}>"


def _short(value: object, limit: int = 60) -> str:
    """A bounded, quoted rendering of a value from the input, for reasons."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(_clip(value, limit))
    if isinstance(value, (Mapping, list)):
        return "{...}" if isinstance(value, Mapping) else "[...]"
    return _clip(_text(value), limit)


def _clip(text: str, limit: int = MAX_REASON) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
