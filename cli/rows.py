"""Status rows: one per Service, straight from ``shared.policy.decide`` (pure, no I/O).

WHY a separate row type: the table, JSON and YAML renderers and the plan all need the same few facts
(who serves the Service now, who the policy wants, why, and whether the two disagree) in one shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shared import constants as c
from shared.policy import Action, Decision, PolicyConfig, PortInfo, decide

KUBE_PROXY = "kube-proxy"
LIGHTPATH = "lightpath"
OTHER_PREFIX = "other:"


@dataclass(frozen=True, order=True)
class Ref:
    """A Service (or, with an empty namespace, a Namespace) by name."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True)
class Row:
    """One Service as `lightpath status` shows it."""

    ref: Ref
    type: str
    ports: tuple[PortInfo, ...]
    handled_by: str  # "kube-proxy", "lightpath" or "other:<proxy name>"
    wants: str  # who serves it once the policy is applied (same vocabulary)
    action: Action
    reason: str
    eligible: bool
    # A handover mark (lightpath.cloud/handover): a make-before-break migration is under way, or one whose
    # CLI died before it labelled or unmarked the Service (docs/migration.md, "Handover protocol").
    handover: str | None = None

    @property
    def pending(self) -> bool:
        """Label and policy disagree (e.g. the Service was admitted while the webhook was down)."""
        return self.action is not Action.LEAVE

    def to_dict(self) -> dict[str, Any]:
        """The machine-readable form used by ``-o json|yaml`` (stable keys, camelCase like kubectl)."""
        return {
            "namespace": self.ref.namespace,
            "name": self.ref.name,
            "type": self.type,
            "ports": [
                {"name": p.name, "port": p.port, "protocol": p.protocol, "appProtocol": p.app_protocol}
                for p in self.ports
            ],
            "portsText": ports_text(self.ports),
            "handledBy": self.handled_by,
            "wants": self.wants,
            "action": str(self.action),
            "reason": self.reason,
            "eligible": self.eligible,
            "pending": self.pending,
            "handover": self.handover,
        }


def ref_of(service: Mapping[str, Any]) -> Ref:
    meta = service.get("metadata") or {}
    return Ref(str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


def labels_of(obj: Mapping[str, Any]) -> dict[str, str]:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return {str(k): str(v) for k, v in labels.items() if v is not None}


def namespace_labels(namespaces: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """Namespace name -> its labels, the only thing the policy needs from a Namespace."""
    return {str((ns.get("metadata") or {}).get("name")): labels_of(ns) for ns in namespaces}


def outcome(decision: Decision) -> str:
    """Who serves the Service once ``decision`` is applied (what the webhook would leave behind)."""
    if decision.action is Action.LABEL:
        return LIGHTPATH
    if decision.action is Action.UNLABEL:
        return KUBE_PROXY
    return decision.handled_by


def display_handler(handled_by: str) -> str:
    """Human form: "other:cilium" -> "other proxy cilium"."""
    if handled_by.startswith(OTHER_PREFIX):
        return f"other proxy {handled_by[len(OTHER_PREFIX) :]}"
    return handled_by


def ports_text(ports: Iterable[PortInfo]) -> str:
    """'80/TCP(http),53/UDP': the appProtocol class is shown only where the proxy uses it (HTTP on TCP)."""
    parts = []
    for p in ports:
        text = f"{p.port if p.port is not None else '?'}/{p.protocol}"
        if p.protocol == "TCP" and p.app_protocol == "http":
            text += "(http)"
        parts.append(text)
    return ",".join(parts) or "<none>"


def build_row(service: Mapping[str, Any], ns_labels: Mapping[str, str], config: PolicyConfig) -> Row:
    decision = decide(service, ns_labels, config)
    spec = service.get("spec") or {}
    return Row(
        ref=ref_of(service),
        type=str(spec.get("type") or "ClusterIP"),
        ports=decision.ports,
        handled_by=decision.handled_by,
        wants=outcome(decision),
        action=decision.action,
        reason=decision.reason,
        eligible=decision.eligible,
        handover=_handover(service),
    )


def _handover(service: Mapping[str, Any]) -> str | None:
    value = ((service.get("metadata") or {}).get("annotations") or {}).get(c.HANDOVER_ANNOTATION)
    return str(value)[:64] if value is not None else None


def build_rows(
    services: Iterable[Mapping[str, Any]],
    namespaces: Mapping[str, Mapping[str, str]],
    config: PolicyConfig,
) -> list[Row]:
    """Rows sorted by namespace/name; a Service whose Namespace is unknown is judged with no namespace labels."""
    rows = [build_row(s, namespaces.get(ref_of(s).namespace, {}), config) for s in services]
    rows.sort(key=lambda r: r.ref)
    return rows


@dataclass(frozen=True)
class Summary:
    total: int
    lightpath: int
    kube_proxy: int
    other_proxy: int
    pending: int
    ineligible: int

    def to_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "lightpath": self.lightpath,
            "kubeProxy": self.kube_proxy,
            "otherProxy": self.other_proxy,
            "pending": self.pending,
            "ineligible": self.ineligible,
        }

    def text(self) -> str:
        noun = "Service" if self.total == 1 else "Services"
        return (
            f"{self.total} {noun}: {self.lightpath} on lightpath, {self.kube_proxy} on kube-proxy, "
            f"{self.other_proxy} on other proxies; {self.pending} PENDING; {self.ineligible} not eligible"
        )


def summarize(rows: Iterable[Row]) -> Summary:
    rows = list(rows)
    return Summary(
        total=len(rows),
        lightpath=sum(r.handled_by == LIGHTPATH for r in rows),
        kube_proxy=sum(r.handled_by == KUBE_PROXY for r in rows),
        other_proxy=sum(r.handled_by.startswith(OTHER_PREFIX) for r in rows),
        pending=sum(r.pending for r in rows),
        ineligible=sum(not r.eligible for r in rows),
    )
