"""Properties over random Services: the answer is always a valid AdmissionReview, the patch always
applies and yields a Service valid against the Kubernetes OpenAPI schema, the label ends up exactly
where the policy wants it, and admitting the patched Service again changes nothing."""

from __future__ import annotations

import base64
import copy
import json
import re
from typing import Any

import jsonpatch
import kubernetes_validate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import constants as c
from shared.policy import PolicyConfig, decide
from webhook.review import API_VERSION, KIND, admit, parse_review

K8S_VERSION = kubernetes_validate.utils.latest_version()
NAMESPACES = ["default", "shop", "team-a", *c.DEFAULT_EXCLUDED_NAMESPACES]
DNS_LABEL = st.from_regex(r"\A[a-z]([-a-z0-9]{0,8}[a-z0-9])?\Z")
QUALIFIED_KEY = re.compile(r"^[a-z0-9A-Z]([-a-z0-9A-Z_.]*[a-z0-9A-Z])?$")

opt_values = st.sampled_from([c.OPT_ENABLED, c.OPT_DISABLED, "maybe"])
proxy_values = st.sampled_from([c.DEFAULT_PROXY_NAME, "edge", "other-proxy"])


@st.composite
def label_maps(draw: st.DrawFn, with_handoff: bool) -> dict[str, str]:
    labels: dict[str, str] = {}
    if draw(st.booleans()):
        labels[c.OPT_LABEL] = draw(opt_values)
    if with_handoff and draw(st.booleans()):
        labels[c.SERVICE_PROXY_NAME_LABEL] = draw(proxy_values)
    if draw(st.booleans()):
        labels["app.kubernetes.io/name"] = draw(DNS_LABEL)
    return labels


@st.composite
def ports(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(0, 4))
    names = draw(st.lists(DNS_LABEL, min_size=count, max_size=count, unique=True))
    out = []
    for name in names:
        port: dict[str, Any] = {"name": name, "port": draw(st.integers(1, 65535))}
        protocol = draw(st.sampled_from([None, "TCP", "TCP", "TCP", "UDP", "SCTP"]))
        if protocol:
            port["protocol"] = protocol
        app_protocol = draw(st.sampled_from([None, "http", "grpc", "kubernetes.io/h2c", "postgres"]))
        if app_protocol:
            port["appProtocol"] = app_protocol
        out.append(port)
    return out


@st.composite
def services(draw: st.DrawFn) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": draw(DNS_LABEL), "namespace": draw(st.sampled_from(NAMESPACES))}
    shape = draw(st.sampled_from(["absent", "null", "map"]))
    if shape == "null":
        meta["labels"] = None
    elif shape == "map":
        meta["labels"] = draw(label_maps(with_handoff=True))
    annotations = draw(st.sampled_from(["absent", "empty", "reason", "other"]))
    if annotations == "empty":
        meta["annotations"] = {}
    elif annotations == "reason":
        meta["annotations"] = {c.REASON_ANNOTATION: draw(st.text(max_size=40))}
    elif annotations == "other":
        meta["annotations"] = {"team": "a"}
    spec: dict[str, Any] = {"ports": draw(ports())}
    svc_type = draw(st.sampled_from([None, "ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]))
    if svc_type:
        spec["type"] = svc_type
    if svc_type == "ExternalName":
        spec["externalName"] = "db.example.com"
    cluster_ip = draw(st.sampled_from([None, "None", "10.96.0.10"]))
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


configs = st.builds(
    PolicyConfig,
    proxy_name=st.sampled_from([c.DEFAULT_PROXY_NAME, "edge"]),
    mode=st.sampled_from(list(c.MODES)),
    excluded_namespaces=st.just(frozenset(c.DEFAULT_EXCLUDED_NAMESPACES)),
)


def review(svc: dict[str, Any], operation: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "request": {
        "uid": "uid-1", "kind": {"group": "", "version": "v1", "kind": "Service"}, "operation": operation,
        "namespace": svc["metadata"]["namespace"], "name": svc["metadata"]["name"], "object": svc}}


def check_response(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Everything kube-apiserver checks on an AdmissionReview response; returns the patch ops."""
    assert doc["apiVersion"] == API_VERSION and doc["kind"] == KIND
    resp = doc["response"]
    assert resp["uid"] == "uid-1" and resp["allowed"] is True
    assert set(resp) <= {"uid", "allowed", "patchType", "patch", "warnings", "auditAnnotations"}
    for warning in resp.get("warnings", []):
        assert isinstance(warning, str) and warning.isprintable() and len(warning) <= 256
    for key, value in resp.get("auditAnnotations", {}).items():
        assert QUALIFIED_KEY.match(key) and isinstance(value, str)
    assert ("patch" in resp) == ("patchType" in resp)
    if "patch" not in resp:
        return []
    assert resp["patchType"] == "JSONPatch"
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(resp["patch"], validate=True))
    assert ops and all(o["op"] in ("add", "remove", "replace") for o in ops)
    assert all(o["path"].startswith(("/metadata/labels", "/metadata/annotations")) for o in ops)
    return ops


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(svc=services(), ns_labels=label_maps(with_handoff=False), config=configs,
       operation=st.sampled_from(["CREATE", "UPDATE"]))
def test_answer_valid_patch_applies_and_is_idempotent(
    svc: dict[str, Any], ns_labels: dict[str, str], config: PolicyConfig, operation: str
) -> None:
    original = copy.deepcopy(svc)
    result = admit(parse_review(review(svc, operation)), ns_labels, config)
    assert svc == original, "the input must not be mutated"
    ops = check_response(result.review)
    patched = jsonpatch.apply_patch(svc, ops)

    decision = decide(svc, ns_labels, config)
    label = (patched["metadata"].get("labels") or {}).get(c.SERVICE_PROXY_NAME_LABEL)
    if decision.wants_proxy is None:  # another proxy's, or an excluded namespace: untouched
        assert ops == []
    elif decision.wants_proxy and decision.eligible:
        mark = (patched["metadata"].get("annotations") or {}).get(c.HANDOVER_ANNOTATION)
        if operation == "UPDATE" and label is None:  # it may carry traffic: marked for the handover instead
            assert mark == c.HANDOVER_MIGRATE
        else:
            assert label == config.proxy_name
    else:
        assert label is None

    again = admit(parse_review(review(patched, "UPDATE")), ns_labels, config)
    assert check_response(again.review) == [], "admitting the patched Service again must be a no-op"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(svc=services(), ns_labels=label_maps(with_handoff=False), config=configs)
def test_patched_service_is_still_a_valid_service(
    svc: dict[str, Any], ns_labels: dict[str, str], config: PolicyConfig
) -> None:
    kubernetes_validate.validate(svc, K8S_VERSION, strict=True)  # the generator makes valid input
    ops = check_response(admit(parse_review(review(svc, "CREATE")), ns_labels, config).review)
    kubernetes_validate.validate(jsonpatch.apply_patch(svc, ops), K8S_VERSION, strict=True)


@settings(max_examples=200, deadline=None)
@given(doc=st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
))
def test_arbitrary_request_objects_never_raise(doc: Any) -> None:
    """Whatever sits inside a valid envelope, the answer is allowed and well formed."""
    envelope = {"apiVersion": API_VERSION, "kind": KIND, "request": {
        "uid": "uid-1", "kind": {"group": "", "version": "v1", "kind": "Service"}, "operation": "CREATE",
        "namespace": "shop", "object": {"metadata": {"name": "x"}, "spec": doc} if isinstance(doc, dict) else doc}}
    check_response(admit(parse_review(envelope), {c.OPT_LABEL: c.OPT_ENABLED}, PolicyConfig()).review)
