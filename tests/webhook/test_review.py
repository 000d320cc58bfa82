"""AdmissionReview parsing and answering: 400 for a broken envelope, allowed untouched for the rest."""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonpatch
import pytest

from shared import constants as c
from shared.policy import PolicyConfig
from webhook.review import API_VERSION, KIND, InvalidReview, admit, allow_untouched, parse_review

CONFIG = PolicyConfig()
OPTED_IN = {c.OPT_LABEL: c.OPT_ENABLED}
SERVICE_KIND = {"group": "", "version": "v1", "kind": "Service"}


def service(name: str = "web", namespace: str | None = "shop") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {"ports": [{"port": 80}]}}


def review(**request: Any) -> dict[str, Any]:
    req = {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "kind": SERVICE_KIND, "operation": "CREATE",
           "namespace": "shop", "object": service()}
    req.update(request)
    return {"apiVersion": API_VERSION, "kind": KIND, "request": req}


def patch_of(resp: dict[str, Any]) -> list[dict[str, Any]]:
    r = resp["response"]
    if "patch" not in r:
        return []
    assert r["patchType"] == "JSONPatch"
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(r["patch"]))
    return ops


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "body must be a JSON object"),
        ({"kind": KIND, "request": {"uid": "x"}}, "apiVersion must be admission.k8s.io/v1"),
        ({"apiVersion": "admission.k8s.io/v1beta1", "kind": KIND, "request": {"uid": "x"}}, "apiVersion must be"),
        ({"apiVersion": API_VERSION, "kind": "Status", "request": {"uid": "x"}}, "kind must be AdmissionReview"),
        ({"apiVersion": API_VERSION, "kind": KIND}, "request must be an object"),
        ({"apiVersion": API_VERSION, "kind": KIND, "request": "x"}, "request must be an object"),
        ({"apiVersion": API_VERSION, "kind": KIND, "request": {}}, "request.uid must be a non-empty string"),
        ({"apiVersion": API_VERSION, "kind": KIND, "request": {"uid": 42}}, "request.uid must be a non-empty string"),
        ({"apiVersion": API_VERSION, "kind": KIND, "request": {"uid": ""}}, "request.uid must be a non-empty string"),
    ],
)
def test_broken_envelope_is_invalid(doc: Any, message: str) -> None:
    with pytest.raises(InvalidReview, match=message):
        parse_review(doc)


@pytest.mark.parametrize(
    ("request_fields", "reason"),
    [
        ({"operation": "DELETE", "object": None}, "operation DELETE is never mutated"),
        ({"operation": "CONNECT"}, "operation CONNECT is never mutated"),
        ({"operation": "PATCH"}, "unknown operation PATCH"),
        ({"operation": 7}, "unknown operation"),
        ({"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}}, "not a v1 Service"),
        ({"kind": {"group": "", "version": "v2", "kind": "Service"}}, "not a v1 Service"),
        ({"kind": "Service"}, "not a v1 Service"),
        ({"subResource": "status"}, "subresource status is never mutated"),
        ({"object": None}, "request.object is not an object"),
        ({"object": {"spec": {}}}, "request.object.metadata is not an object"),
        ({"namespace": None, "object": service(namespace=None)}, "no namespace"),
    ],
)
def test_not_understood_is_allowed_untouched(request_fields: dict[str, Any], reason: str) -> None:
    req = parse_review(review(**request_fields))
    result = admit(req, OPTED_IN, CONFIG)
    resp = result.review["response"]
    assert result.decision == "skip" and reason in result.reason
    assert resp["allowed"] is True and resp["uid"] == req.uid
    assert "patch" not in resp and "patchType" not in resp
    assert resp["auditAnnotations"]["decision"] == "skip"


def test_create_answer_echoes_uid_and_carries_a_base64_json_patch() -> None:
    result = admit(parse_review(review()), OPTED_IN, CONFIG)
    doc = result.review
    assert doc["apiVersion"] == API_VERSION and doc["kind"] == KIND
    resp = doc["response"]
    assert resp["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002" and resp["allowed"] is True
    assert patch_of(doc)[0] == {"op": "add", "path": "/metadata/labels",
                                "value": {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}}
    assert resp["auditAnnotations"] == {"decision": "label", "reason": result.reason}
    assert resp["warnings"] == [f"lightpath: Service web: {result.reason}"]
    json.dumps(doc)  # serialisable as is


def test_namespace_from_the_request_when_the_object_has_none() -> None:
    # Excluded namespace given only in the request: must be honoured (policy reads metadata.namespace).
    result = admit(parse_review(review(namespace="kube-system", object=service(namespace=None))), OPTED_IN, CONFIG)
    assert result.decision == "leave" and "kube-system is excluded" in result.reason
    assert patch_of(result.review) == []


def test_dry_run_is_answered_the_same_way() -> None:
    wet = admit(parse_review(review()), OPTED_IN, CONFIG)
    dry_req = parse_review(review(dryRun=True))
    assert dry_req.dry_run is True
    assert admit(dry_req, OPTED_IN, CONFIG).review == wet.review


def test_update_of_a_service_already_right_has_no_patch_and_no_warning() -> None:
    obj = service()
    obj["metadata"]["labels"] = {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}
    obj["metadata"]["annotations"] = {c.REASON_ANNOTATION: "namespace opted in: TCP Service handled by lightpath.cloud"}
    result = admit(parse_review(review(operation="UPDATE", object=obj, oldObject=obj)), OPTED_IN, CONFIG)
    assert result.decision == "leave" and result.ops == ()
    assert "patch" not in result.review["response"] and "warnings" not in result.review["response"]


def test_metric_operation_is_bounded() -> None:
    assert parse_review(review(operation="UPDATE")).metric_operation == "UPDATE"
    assert parse_review(review(operation="x" * 500)).metric_operation == "other"


WARNING_LIMIT = 256  # kube-apiserver may truncate longer warnings


def _annotation_bytes(annotations: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())


@pytest.mark.parametrize("count", [10_000, 20_000])
@pytest.mark.parametrize("labels", [OPTED_IN, {**OPTED_IN, c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}], ids=["opted-in", "labelled"])
def test_what_the_webhook_adds_is_bounded_whatever_the_ports(count: int, labels: dict[str, str]) -> None:
    """Issue 17 item 1: 10,000 UDP ports got 270,080 bytes of annotations (20,000: 337,864), which the
    apiserver refuses after the webhook said 200. The reason annotation, warnings and audit annotations
    stay short whatever the input."""
    obj = service("rtp")
    obj["metadata"]["labels"] = dict(labels)
    obj["spec"]["ports"] = [{"name": f"rtp-media-{i:05d}", "port": 10000 + i, "protocol": "UDP"} for i in range(count)]
    result = admit(parse_review(review(object=obj)), {}, CONFIG)
    patched = jsonpatch.apply_patch(obj, patch_of(result.review))
    added = _annotation_bytes(patched["metadata"].get("annotations") or {})
    assert 0 < added <= 512, added
    assert patched["metadata"]["annotations"][c.REASON_ANNOTATION].startswith(f"{count} of {count} ports are UDP")
    assert result.warnings and all(len(w) <= WARNING_LIMIT for w in result.warnings)
    audit = result.review["response"]["auditAnnotations"]
    assert all(len(v) <= 512 for v in audit.values())
    assert c.SERVICE_PROXY_NAME_LABEL not in patched["metadata"]["labels"]


def test_an_internal_error_reason_is_bounded() -> None:
    answer = allow_untouched("u", "internal error: ValueError: " + "x" * 100_000, decision="error")
    assert len(answer.reason) <= 512 and len(answer.review["response"]["auditAnnotations"]["reason"]) <= 512
