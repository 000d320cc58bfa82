"""AdmissionReview v1 in, AdmissionReview v1 out: the webhook's pure core (no I/O, no clock).

Two kinds of bad input, two answers. A body that is not an AdmissionReview v1 at all (wrong
apiVersion/kind, no request, no uid) is the caller's bug: ``InvalidReview`` -> HTTP 400. Anything
inside a valid envelope that we do not understand (another kind, DELETE, an odd object) is allowed
untouched: a mutating webhook must never block what it does not own.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.l7 import check_service
from shared import constants as c
from shared.errors import WebhookError
from shared.policy import MAX_REASON, Decision, PolicyConfig, decide
from webhook.patch import Op, plan

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
MUTATED_OPERATIONS = frozenset({"CREATE", "UPDATE"})
KNOWN_OPERATIONS = frozenset({"CREATE", "UPDATE", "DELETE", "CONNECT"})
SKIP = "skip"
ERROR = "error"


class InvalidReview(WebhookError, ValueError):
    """The body is not an AdmissionReview v1 request: answered with HTTP 400 and this message."""


@dataclass(frozen=True)
class AdmissionRequest:
    """The fields of ``request`` we use, with types checked loosely (odd values mean "skip")."""

    uid: str
    operation: str
    namespace: str
    name: str
    kind: Mapping[str, Any]
    sub_resource: str
    object: Any
    dry_run: bool = False
    old_object: Any = None  # UPDATE: the stored Service (how a handover mark moved)

    @property
    def metric_operation(self) -> str:
        """The operation as a bounded metric label value."""
        return self.operation if self.operation in KNOWN_OPERATIONS else "other"


@dataclass(frozen=True)
class Admission:
    """The answer and what the shell logs and counts about it."""

    review: dict[str, Any]
    decision: str  # label | unlabel | leave | skip | error
    reason: str
    ops: tuple[Op, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)


def parse_review(doc: Any) -> AdmissionRequest:
    """Check the envelope strictly and the request loosely."""
    if not isinstance(doc, dict):
        raise InvalidReview("body must be a JSON object (an AdmissionReview)")
    if doc.get("apiVersion") != API_VERSION:
        raise InvalidReview(f"apiVersion must be {API_VERSION}, got {_short(doc.get('apiVersion'))}")
    if doc.get("kind") != KIND:
        raise InvalidReview(f"kind must be {KIND}, got {_short(doc.get('kind'))}")
    req = doc.get("request")
    if not isinstance(req, dict):
        raise InvalidReview("request must be an object")
    uid = req.get("uid")
    if not isinstance(uid, str) or not uid:
        raise InvalidReview("request.uid must be a non-empty string")
    obj = req.get("object")
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    kind = req.get("kind")
    return AdmissionRequest(
        uid=uid,
        operation=_text(req.get("operation")),
        namespace=_text(req.get("namespace")) or _text(meta.get("namespace")),
        name=_text(req.get("name")) or _text(meta.get("name")) or _text(meta.get("generateName")),
        kind=kind if isinstance(kind, dict) else {},
        sub_resource=_text(req.get("subResource")),
        object=obj,
        dry_run=req.get("dryRun") is True,
        old_object=req.get("oldObject"),
    )


def skip_reason(req: AdmissionRequest) -> str | None:
    """Why the request is allowed untouched without consulting the policy, or None to decide."""
    if req.operation not in KNOWN_OPERATIONS:
        return f"unknown operation {_short(req.operation)}"
    if req.operation not in MUTATED_OPERATIONS:
        return f"operation {req.operation} is never mutated"
    k = req.kind
    if (k.get("group"), k.get("version"), k.get("kind")) != ("", "v1", "Service"):
        return f"not a v1 Service ({_short(k.get('group'))}/{_short(k.get('version'))} {_short(k.get('kind'))})"
    if req.sub_resource:
        return f"subresource {req.sub_resource} is never mutated"
    if not isinstance(req.object, dict):
        return "request.object is not an object"
    if not isinstance(req.object.get("metadata"), dict):
        return "request.object.metadata is not an object"
    if not req.namespace:
        return "no namespace in the request"
    return None


def admit(req: AdmissionRequest, namespace_labels: Mapping[str, str], config: PolicyConfig, *,
          handover: bool = True) -> Admission:
    """Decide and answer. ``namespace_labels`` are the labels of ``req.namespace``; ``handover``: an UPDATE
    that makes a Service wanted marks it for a make-before-break migration instead of labelling it."""
    why_skip = skip_reason(req)
    if why_skip is not None:
        return allow_untouched(req.uid, why_skip)
    service: dict[str, Any] = req.object
    meta = service["metadata"]
    if meta.get("namespace") != req.namespace:
        # On CREATE the namespace may come from the URL only; the policy reads it from metadata.
        service = {**service, "metadata": {**meta, "namespace": req.namespace}}
    decision = decide(service, namespace_labels, config)
    on_label = handover_step(req.operation, service, req.old_object) if handover else "label"
    p = plan(service, decision, namespace_labels, config, on_label=on_label)
    warnings = ((p.warning,) if p.warning else ()) + option_warnings(service) + mark_warnings(service, decision)
    audit = {"decision": decision.action.value, "reason": decision.reason}
    return Admission(
        review=review(req.uid, p.ops, warnings, audit),
        decision=decision.action.value,
        reason=decision.reason,
        ops=p.ops,
        warnings=warnings,
    )


def _mark(obj: Any) -> object:
    """The handover annotation's value on a Service (None when absent or unreadable)."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    return annotations.get(c.HANDOVER_ANNOTATION) if isinstance(annotations, Mapping) else None


def handover_step(operation: str, service: Mapping[str, Any], old: Any) -> str:
    """What a decision to label becomes (docs/migration.md, "Handover protocol"). Pure.

    CREATE: "label" -- a new Service has no traffic to hand over. UPDATE (the Service becomes wanted while it
    may carry traffic through kube-proxy): "none" while it is marked (its driver -- the CLI or the handover
    controller -- sets the label once every live node agent prepared it) and when the update removes the
    mark (the driver aborted; the Service's next change starts again); otherwise "mark": the handover starts.
    """
    if operation != "UPDATE":
        return "label"
    if _mark(service) == c.HANDOVER_MIGRATE:
        return "none"
    if _mark(old) == c.HANDOVER_MIGRATE:
        return "none"
    return "mark"


def mark_warnings(service: Mapping[str, Any], decision: Decision) -> tuple[str, ...]:
    """A handover annotation agents will ignore: a garbage value, an ineligible Service, another proxy's."""
    value = _mark(service)
    if value is None:
        return ()
    meta = service.get("metadata")
    name = _short(str(meta.get("name") or "") if isinstance(meta, Mapping) else "")
    if value != c.HANDOVER_MIGRATE:
        why = f"value {_short(value)} is not {c.HANDOVER_MIGRATE!r}"
    elif not decision.eligible:
        why = f"the Service is not eligible ({decision.reason})"
    elif decision.wants_proxy is None:
        why = "the Service belongs to another proxy"
    else:
        return ()
    return (_printable(f"lightpath: Service {name}: {c.HANDOVER_ANNOTATION} ignored: {why}"),)


MAX_OPTION_WARNINGS = 5  # each one bounded by the L7 parser (well under 256 characters); the rest counted


def option_warnings(service: Mapping[str, Any]) -> tuple[str, ...]:
    """Unknown ``config.lightpath.cloud/`` options and invalid values: warnings, never a denial (the agent
    uses the default for each and reports it per Service). The agent's own parser decides."""
    problems = check_service(service)
    meta = service.get("metadata")
    name = _short(str(meta.get("name") or meta.get("generateName") or "") if isinstance(meta, Mapping) else "")
    out = [_printable(f"lightpath: Service {name}: {p}") for p in problems[:MAX_OPTION_WARNINGS]]
    if len(problems) > MAX_OPTION_WARNINGS:
        out.append(f"lightpath: Service {name}: {len(problems) - MAX_OPTION_WARNINGS} more option problems (docs/l7.md)")
    return tuple(out)


def _printable(text: str, limit: int = MAX_REASON) -> str:
    """Warnings travel as HTTP Warning headers: printable ASCII, bounded length."""
    clean = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def allow_untouched(uid: str, reason: str, decision: str = SKIP) -> Admission:
    """The fail-safe answer: allowed, no patch, the (bounded) reason in the audit log."""
    reason = _short(reason, MAX_REASON)
    return Admission(review(uid, (), (), {"decision": decision, "reason": reason}), decision, reason)


def review(uid: str, ops: tuple[Op, ...], warnings: tuple[str, ...], audit: Mapping[str, str]) -> dict[str, Any]:
    """The AdmissionReview v1 response document."""
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode("ascii")
    if warnings:
        response["warnings"] = list(warnings)
    if audit:
        response["auditAnnotations"] = dict(audit)
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _short(value: object, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit] + "..."
