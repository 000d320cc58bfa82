"""Every package under deploy/ builds, and every object it builds is valid for the API server.

Built-in kinds are checked with kubernetes-validate's strict schemas (unknown fields are errors) for
the oldest Kubernetes we support (1.30: ValidatingAdmissionPolicy v1 is GA there) and the newest the
package ships; cert-manager kinds against cert-manager's own CRD schemas.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import kubernetes_validate
import pytest

from tests.deploy import crds
from tests.deploy.manifests import DEPLOY, Obj, kustomize

K8S_VERSIONS = sorted({"1.30", kubernetes_validate.utils.major_minor(kubernetes_validate.latest_version())})
CERT_MANAGER_GROUP = "cert-manager.io"
COMPONENTS = ["namespace", "webhook", "policy", "redirector", "proxy", "node", "default"]
WEBHOOK_NAMESPACE, NODE_NAMESPACE = "lightpath-system", "lightpath-node"


def _is_cert_manager(obj: Obj) -> bool:
    return str(obj["apiVersion"]).startswith(CERT_MANAGER_GROUP + "/")


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_component_builds_on_its_own(component: str) -> None:
    assert kustomize(DEPLOY / component), f"deploy/{component} built nothing"


def test_default_has_every_piece(default_objs: list[Obj]) -> None:
    kinds = Counter(o["kind"] for o in default_objs)
    assert kinds == {
        "Namespace": 2, "ServiceAccount": 2, "ClusterRole": 2, "ClusterRoleBinding": 2, "Role": 2, "RoleBinding": 2, "ConfigMap": 1, "ResourceQuota": 1,
        "Service": 1, "Deployment": 1, "PodDisruptionBudget": 1, "DaemonSet": 2, "Issuer": 2, "Certificate": 2,
        "MutatingWebhookConfiguration": 1, "ValidatingAdmissionPolicy": 1, "ValidatingAdmissionPolicyBinding": 1,
    }


def test_namespaced_objects_live_in_their_components_namespace(default_objs: list[Obj]) -> None:
    """The webhook's objects in lightpath-system, the node agents' in lightpath-node (issue 17 item 10)."""
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration",
                      "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    node_components = {"redirector", "proxy", "node"}
    for o in default_objs:
        ns = o["metadata"].get("namespace")
        if o["kind"] in cluster_scoped:
            assert ns is None, f"{o['kind']} {o['metadata']['name']} is cluster-scoped but has namespace {ns}"
            continue
        component = (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component")
        # The webhook's Role on the agents' Leases (its handover controller) lives where those Leases are.
        leases_role = o["kind"] in ("Role", "RoleBinding") and o["metadata"]["name"] == "lightpath-webhook"
        want = NODE_NAMESPACE if component in node_components or leases_role else WEBHOOK_NAMESPACE
        assert ns == want, f"{o['kind']} {o['metadata']['name']} ({component}) is in {ns!r}, not {want}"
    assert {o["metadata"]["name"] for o in default_objs if o["kind"] == "Namespace"} == {WEBHOOK_NAMESPACE, NODE_NAMESPACE}
    for binding in (o for o in default_objs if o["kind"] == "ClusterRoleBinding"):
        for subject in binding["subjects"]:
            account = next(o for o in default_objs if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == subject["name"])
            assert subject["namespace"] == account["metadata"]["namespace"], f"{binding['metadata']['name']} binds a ServiceAccount that is not there"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_default_objects_validate_against_kubernetes_openapi(default_objs: list[Obj], version: str) -> None:
    _validate_builtin(default_objs, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_self_signed_objects_validate_against_kubernetes_openapi(self_signed_objs: list[Obj], version: str) -> None:
    _validate_builtin(self_signed_objs, version)


def _validate_builtin(objs: list[Obj], version: str) -> None:
    checked = 0
    for obj in objs:
        if _is_cert_manager(obj):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} invalid for Kubernetes {version}: {path}: {exc.message}")
        checked += 1
    assert checked >= 14


def test_cert_manager_objects_validate_against_their_crds(default_objs: list[Obj]) -> None:
    schemas = crds.crd_schemas()
    cm = [o for o in default_objs if _is_cert_manager(o)]
    assert {o["kind"] for o in cm} == {"Issuer", "Certificate"}
    for obj in cm:
        schema = schemas.get((obj["apiVersion"], obj["kind"]))
        assert schema is not None, f"no CRD schema for {obj['apiVersion']} {obj['kind']}"
        problems = crds.validate(obj, schema)
        assert not problems, f"{obj['kind']} {obj['metadata']['name']}: {problems}"


def test_crd_validation_catches_a_typo(default_objs: list[Obj]) -> None:
    """The CRD check is not vacuous: a misspelt field and a bad enum value are reported."""
    schemas = crds.crd_schemas()
    cert = next(o for o in default_objs if o["kind"] == "Certificate")
    broken = {**cert, "spec": {**cert["spec"], "renewbefore": "1h", "privateKey": {"algorithm": "DSA"}}}
    problems = crds.validate(broken, schemas[(cert["apiVersion"], "Certificate")])
    assert any("renewbefore" in p for p in problems) and any("DSA" in p for p in problems), problems


def test_self_signed_overlay_has_no_cert_manager_objects(self_signed_objs: list[Obj], self_signed_dir: Path) -> None:
    assert not [o for o in self_signed_objs if _is_cert_manager(o)]
    mwc = next(o for o in self_signed_objs if o["kind"] == "MutatingWebhookConfiguration")
    assert "cert-manager.io/inject-ca-from" not in (mwc["metadata"].get("annotations") or {})
    assert all(w["clientConfig"].get("caBundle") for w in mwc["webhooks"])
    secret = next(o for o in self_signed_objs if o["kind"] == "Secret")
    assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}


def test_openapi_validation_catches_a_typo(default_objs: list[Obj]) -> None:
    """The strict schema check is not vacuous: an unknown field in a pod template is an error."""
    deploy = next(o for o in default_objs if o["kind"] == "Deployment")
    spec = {**deploy["spec"], "template": {**deploy["spec"]["template"], "spec": {**deploy["spec"]["template"]["spec"], "hostnetwork": True}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**deploy, "spec": spec}, K8S_VERSIONS[-1], strict=True)
