"""The ValidatingAdmissionPolicy's CEL, evaluated with cel-python against the policy table.

The safety net must reject a Service exactly when it carries OUR handoff label and
shared.policy.ineligibility() says the proxy cannot serve it (ExternalName, headless, a non-TCP port),
or it is default/kubernetes (shared.policy.apiserver_service, rule 2a).
A Service with no ports is left to kube-apiserver's own validation (it rejects those anyway), and so
are ports without a valid number or that are not objects, and a spec.type that is not a string: such an
object fails decoding or validation before any validating admission policy sees it.
The expressions come from the built manifests (`kubectl kustomize deploy/default`), not a copy.
"""

from __future__ import annotations

import copy
from typing import Any

import celpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import constants as c
from shared.policy import apiserver_service, ineligibility, service_ports
from tests.deploy.manifests import Obj, container, env_of, one
from tests.shared.test_policy import ROWS

OURS = {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}
_ENV = celpy.Environment()


class Policy:
    """A compiled ValidatingAdmissionPolicy: variables, then validations, the way kube-apiserver runs them."""

    def __init__(self, vap: Obj) -> None:
        spec = vap["spec"]
        self.variables = [(v["name"], self._compile(v["expression"])) for v in spec.get("variables", [])]
        self.validations = [
            (self._compile(v["expression"]), v["message"], self._compile(v["messageExpression"]) if "messageExpression" in v else None)
            for v in spec["validations"]
        ]

    @staticmethod
    def _compile(expr: str) -> Any:
        return _ENV.program(_ENV.compile(expr))

    def denials(self, service: dict[str, Any]) -> list[str]:
        """The messages of every failed validation (empty: admitted)."""
        obj = celpy.json_to_cel(service)
        # Already CEL values: json_to_cel would turn a BoolType (an int subclass) into an IntType.
        variables = celpy.celtypes.MapType({})
        for name, prog in self.variables:
            variables[celpy.celtypes.StringType(name)] = prog.evaluate({"object": obj, "variables": variables})
        activation = {"object": obj, "variables": variables}
        out = []
        for prog, message, message_prog in self.validations:
            result = prog.evaluate(activation)
            assert isinstance(result, celpy.celtypes.BoolType), f"validation returned {result!r}, not a bool"
            if not result:
                out.append(str(message_prog.evaluate(activation)) if message_prog is not None else message)
        return out


@pytest.fixture(scope="module")
def policy(default_objs: list[Obj]) -> Policy:
    return Policy(one(default_objs, "ValidatingAdmissionPolicy"))


def should_reject(service: dict[str, Any]) -> bool:
    labels = (service.get("metadata") or {}).get("labels") or {}
    if labels.get(c.SERVICE_PROXY_NAME_LABEL) != c.DEFAULT_PROXY_NAME:
        return False
    if apiserver_service(service):
        return True
    if ineligibility(service) is None:
        return False
    if service_ports(service):
        return True
    # No ports: reject only for a reason that a TCP port would not fix (ExternalName, headless).
    with_port = copy.deepcopy(service)
    with_port.setdefault("spec", {})["ports"] = [{"port": 80, "protocol": "TCP"}]
    return ineligibility(with_port) is not None


def _labelled(service: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    out = copy.deepcopy(service)
    out["metadata"]["labels"] = {**(out["metadata"].get("labels") or {}), **labels}
    return out


def _unlabelled(service: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(service)
    (out["metadata"].get("labels") or {}).pop(c.SERVICE_PROXY_NAME_LABEL, None)
    return out


def reaches_the_policy(service: dict[str, Any]) -> bool:
    """Would kube-apiserver hand this object to a validating admission policy at all? Not when it cannot
    decode it into a typed Service (a port that is not an object, a spec.type that is not a string) or
    its own validation refuses it first (a port without a number from 1 to 65535)."""
    spec = service.get("spec") or {}
    if not isinstance(spec.get("type", ""), str):
        return False
    return all(isinstance(p, dict) and type(p.get("port")) is int and 1 <= p["port"] <= 65535 for p in spec.get("ports") or [])


CEL_ROWS = [r for r in ROWS if reaches_the_policy(r[1])]


def test_only_undecodable_rows_are_left_out() -> None:
    assert {r[0] for r in ROWS} - {r[0] for r in CEL_ROWS} == {"type-list", "type-object", "port-null", "port-string", "port-number-missing"}


@pytest.mark.parametrize("row", CEL_ROWS, ids=[r[0] for r in CEL_ROWS])
def test_policy_table_rows(policy: Policy, row: tuple[Any, ...]) -> None:
    """Each row's Service as given, handed to us, and with no handoff label at all."""
    service = row[1]
    for variant in (service, _labelled(service, OURS), _unlabelled(service)):
        denied = policy.denials(variant)
        assert bool(denied) == should_reject(variant), f"{row[0]}: {variant['metadata'].get('labels')} -> {denied}"


def test_the_table_exercises_every_validation(policy: Policy) -> None:
    """Not vacuous: labelled rows from the table trip each of the three rules at least once."""
    messages = [m for row in CEL_ROWS for m in policy.denials(_labelled(row[1], OURS))]
    for word in ("ExternalName", "headless", "UDP", "SCTP", "default/kubernetes"):
        assert any(word in m for m in messages), f"no row made the policy say {word!r}: {messages}"


def test_udp_message_names_the_port(policy: Policy) -> None:
    svc = {"metadata": {"name": "dns", "namespace": "shop", "labels": OURS},
           "spec": {"ports": [{"name": "tcp", "port": 53, "protocol": "TCP"}, {"name": "udp", "port": 53, "protocol": "UDP"}]}}
    (message,) = policy.denials(svc)
    assert "Service dns" in message and "udp/UDP 53" in message and c.SERVICE_PROXY_NAME_LABEL in message


def test_missing_fields_never_error(policy: Policy) -> None:
    """CEL written defensively: objects without labels, type, clusterIP, ports or protocol evaluate cleanly."""
    for svc in ({"metadata": {}, "spec": {}}, {"metadata": {"labels": OURS}, "spec": {}},
                {"metadata": {"labels": OURS}, "spec": {"ports": [{"port": 80}]}}):
        assert policy.denials(svc) == []


def test_the_api_servers_own_service_cannot_be_handed_off(policy: Policy) -> None:
    """Issue 17 item 7: default/kubernetes refused with our label; same name elsewhere, or unlabelled, is fine."""
    kubernetes = {"metadata": {"name": "kubernetes", "namespace": "default", "labels": OURS},
                  "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "protocol": "TCP"}]}}
    (message,) = policy.denials(kubernetes)
    assert "default/kubernetes" in message and "API server" in message
    assert policy.denials(_unlabelled(kubernetes)) == []
    elsewhere = copy.deepcopy(kubernetes)
    elsewhere["metadata"]["namespace"] = "shop"
    assert policy.denials(elsewhere) == []
    other_proxy = _labelled(kubernetes, {c.SERVICE_PROXY_NAME_LABEL: "cilium"})
    assert policy.denials(other_proxy) == []


def test_another_proxys_label_is_not_our_business(policy: Policy) -> None:
    svc = {"metadata": {"labels": {c.SERVICE_PROXY_NAME_LABEL: "cilium"}}, "spec": {"ports": [{"port": 53, "protocol": "UDP"}]}}
    assert policy.denials(svc) == []


PROTOCOLS = st.sampled_from([None, "TCP", "UDP", "SCTP"])
PORT = st.builds(
    lambda name, port, proto: {k: v for k, v in {"name": name, "port": port, "protocol": proto}.items() if v is not None},
    st.sampled_from([None, "", "http", "dns"]), st.integers(1, 65535), PROTOCOLS,
)
SERVICE = st.builds(
    lambda t, ip, ports, label, opt, where: {
        "metadata": {"name": where[1], "namespace": where[0],
                     "labels": {k: v for k, v in {c.SERVICE_PROXY_NAME_LABEL: label, c.OPT_LABEL: opt}.items() if v}},
        "spec": {k: v for k, v in {"type": t, "clusterIP": ip, "ports": ports}.items() if v is not None},
    },
    st.sampled_from([None, "ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]),
    st.sampled_from([None, "None", "10.96.0.7"]),
    st.one_of(st.none(), st.lists(PORT, max_size=4)),
    st.sampled_from([None, c.DEFAULT_PROXY_NAME, "other-proxy"]),
    st.sampled_from([None, c.OPT_ENABLED, c.OPT_DISABLED]),
    st.sampled_from([("ns", "s"), ("default", "kubernetes"), ("ns", "kubernetes"), ("default", "s")]),
)


@given(service=SERVICE)
def test_policy_agrees_with_shared_policy_on_random_services(policy: Policy, service: dict[str, Any]) -> None:
    assert bool(policy.denials(service)) == should_reject(service)


def test_policy_shape_and_binding(default_objs: list[Obj]) -> None:
    vap = one(default_objs, "ValidatingAdmissionPolicy")
    spec = vap["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert spec["matchConstraints"]["resourceRules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["services"]}]
    binding = one(default_objs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == vap["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert "matchResources" not in binding["spec"], "the safety net applies in every namespace"
    # The proxy name the policy protects is the one the webhook hands Services to.
    proxy_name = Policy(vap).variables[0]
    assert proxy_name[0] == "proxyName" and str(proxy_name[1].evaluate({})) == c.DEFAULT_PROXY_NAME
    webhook_env = env_of(container(one(default_objs, "Deployment", "lightpath-webhook")))
    assert webhook_env["LIGHTPATH_PROXY_NAME"] == c.DEFAULT_PROXY_NAME
