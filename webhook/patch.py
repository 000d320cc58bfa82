"""From a policy decision to the JSONPatch (RFC 6902) that puts a Service in its decided state.

Pure. The patch touches two keys only: the handoff label and the ``lightpath.cloud/reason``
annotation. The annotation carries the reason of the *steady* decision (the decision on the
patched Service), so that admitting the patched Service again yields no patch at all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared import constants as c
from shared.policy import Action, Decision, PolicyConfig, decide, wants_proxy

Op = dict[str, Any]
ANNOTATIONS_LIMIT = 256 * 1024  # bytes of keys and values; kube-apiserver refuses a larger total
_NOT_PRINTABLE = re.compile(r"[^ -~]")


def escape(token: str) -> str:
    """JSON-pointer escaping (RFC 6901): ``~`` first, then ``/``."""
    return token.replace("~", "~0").replace("/", "~1")


LABEL_PATH = "/metadata/labels/" + escape(c.SERVICE_PROXY_NAME_LABEL)
REASON_PATH = "/metadata/annotations/" + escape(c.REASON_ANNOTATION)
MARK_PATH = "/metadata/annotations/" + escape(c.HANDOVER_ANNOTATION)


@dataclass(frozen=True)
class Plan:
    """The patch, the reason annotation we keep (None: not ours to annotate) and a user warning."""

    ops: tuple[Op, ...] = ()
    annotation: str | None = None
    warning: str | None = None


def _map_or_none(value: object) -> bool:
    return value is None or isinstance(value, Mapping)


def plan(
    service: Mapping[str, Any],
    decision: Decision,
    namespace_labels: Mapping[str, str],
    config: PolicyConfig,
    *,
    on_label: str = "label",
) -> Plan:
    """The ops that bring ``service`` to ``decision``; empty when it is already there.

    ``on_label`` (``webhook.review.handover_step``) is what a decision to label becomes: "label"; "mark" --
    the handover annotation instead, so the node agents prepare the Service before its label; "none".

    A Service owned by another proxy or in an excluded namespace is never touched (no label, no
    annotation). Otherwise the reason annotation is kept when the Service is "ours to explain": we act
    on it, it carries our label, it asked for the proxy (Service, Namespace or global opt-out), or it
    already carries the annotation. Services nobody opted in stay untouched.
    """
    if decision.wants_proxy is None:
        return Plan()
    meta = service.get("metadata")
    if not isinstance(meta, Mapping):
        return Plan()
    labels = meta.get("labels")
    annotations = meta.get("annotations")
    if not (_map_or_none(labels) and _map_or_none(annotations)):
        return Plan()  # malformed metadata: the apiserver rejects the object anyway
    labels = labels or {}
    annotations = annotations or {}

    ops: list[Op] = []
    steady = decision
    if decision.action is Action.LABEL and on_label != "label":
        if on_label == "mark" and not _annotation_fits(annotations, c.HANDOVER_MIGRATE, c.HANDOVER_ANNOTATION):
            # The mark would push the annotations over kube-apiserver's limit: the write would be refused
            # after we answered 200. Nothing is written; the Service stays with kube-proxy, and says why.
            return Plan((), decision.reason, _printable(
                "handover not started: the Service's annotations leave no room for the handover mark "
                f"({c.HANDOVER_ANNOTATION}); it stays with kube-proxy"))
        if on_label == "mark":
            if isinstance(meta.get("annotations"), Mapping):
                ops.append({"op": "add", "path": MARK_PATH, "value": c.HANDOVER_MIGRATE})
            else:
                ops.append({"op": "add", "path": "/metadata/annotations", "value": {c.HANDOVER_ANNOTATION: c.HANDOVER_MIGRATE}})
                meta = {**meta, "annotations": {c.HANDOVER_ANNOTATION: c.HANDOVER_MIGRATE}}
            annotations = {**annotations, c.HANDOVER_ANNOTATION: c.HANDOVER_MIGRATE}  # the reason must fit beside it
        # The reason annotation below is the labelled Service's (it follows once the nodes are ready), so
        # admitting the Service again after its label lands yields no patch.
        labelled = {**labels, c.SERVICE_PROXY_NAME_LABEL: config.proxy_name}
        steady = decide({**service, "metadata": {**meta, "labels": labelled}}, namespace_labels, config)
    elif decision.action is not Action.LEAVE:
        new_labels = dict(labels)
        if decision.action is Action.LABEL:
            new_labels[c.SERVICE_PROXY_NAME_LABEL] = config.proxy_name
            if isinstance(meta.get("labels"), Mapping):
                ops.append({"op": "add", "path": LABEL_PATH, "value": config.proxy_name})
            else:
                ops.append({"op": "add", "path": "/metadata/labels", "value": dict(new_labels)})
        else:
            new_labels.pop(c.SERVICE_PROXY_NAME_LABEL, None)
            ops.append({"op": "remove", "path": LABEL_PATH})
        steady = decide({**service, "metadata": {**meta, "labels": new_labels}}, namespace_labels, config)

    asked, _ = wants_proxy(labels, namespace_labels, config.mode)
    current = annotations.get(c.REASON_ANNOTATION)
    ours_to_explain = decision.action is not Action.LEAVE or decision.labelled_by_us or asked or current is not None
    if not ours_to_explain:
        return Plan()

    if current != steady.reason and _annotation_fits(annotations, steady.reason):
        if isinstance(meta.get("annotations"), Mapping):
            op = "replace" if c.REASON_ANNOTATION in annotations else "add"
            ops.append({"op": op, "path": REASON_PATH, "value": steady.reason})
        else:
            ops.append({"op": "add", "path": "/metadata/annotations", "value": {c.REASON_ANNOTATION: steady.reason}})

    warning = _warning(service, decision, asked)
    if decision.action is Action.LABEL and on_label == "mark":
        warning = _printable(f"{warning}: handover started (labelled once every node agent has prepared it)")
    return Plan(tuple(ops), steady.reason, warning)


def _annotation_fits(annotations: Mapping[str, Any], value: str, key: str = c.REASON_ANNOTATION) -> bool:
    """Would the Service's annotations stay within kube-apiserver's total limit with ``key`` set to ``value``?
    If not, we leave it out: the write would be refused after we answered 200 (for the reason, the label
    still moves)."""
    others = sum(len(str(k).encode()) + len(str(v).encode()) for k, v in annotations.items()
                 if k != key and isinstance(v, str))
    return others + len(key.encode()) + len(value.encode()) <= ANNOTATIONS_LIMIT


def _warning(service: Mapping[str, Any], decision: Decision, asked: bool) -> str | None:
    """A warning for a change of hands, or for a Service that asked for the proxy but cannot have it."""
    meta = service.get("metadata")
    name = str(meta.get("name") or meta.get("generateName") or "") if isinstance(meta, Mapping) else ""
    if decision.action is not Action.LEAVE:
        return _printable(f"lightpath: Service {name}: {decision.reason}")
    if asked and not decision.eligible:
        return _printable(f"lightpath: Service {name} keeps kube-proxy: {decision.reason}")
    return None


def _printable(text: str, limit: int = 256) -> str:
    """Warnings travel as HTTP Warning headers: printable ASCII, bounded length."""
    clean = _NOT_PRINTABLE.sub("?", text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."
