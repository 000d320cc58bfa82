"""The policy table, row by row (docs/policy.md has the same rows)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import constants as c
from shared.policy import Action, PolicyConfig, classify_app_protocol, decide, ineligibility, service_ports

OURS = c.DEFAULT_PROXY_NAME
CFG = PolicyConfig()
OPT_OUT = PolicyConfig(mode=c.MODE_OPT_OUT)
ENABLED = {c.OPT_LABEL: c.OPT_ENABLED}
DISABLED = {c.OPT_LABEL: c.OPT_DISABLED}


def svc(
    *ports: dict[str, Any],
    ns: str = "shop",
    type_: str | None = "ClusterIP",
    cluster_ip: str | None = "10.96.0.10",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": list(ports)}
    if type_ is not None:
        spec["type"] = type_
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": ns, "labels": labels or {}}, "spec": spec}


def tcp(port: int = 80, name: str = "http", **extra: Any) -> dict[str, Any]:
    return {"name": name, "port": port, "protocol": "TCP", **extra}


def udp(port: int = 53, name: str = "dns") -> dict[str, Any]:
    return {"name": name, "port": port, "protocol": "UDP"}


def sctp(port: int = 9999, name: str = "sig") -> dict[str, Any]:
    return {"name": name, "port": port, "protocol": "SCTP"}


LABELLED = {c.SERVICE_PROXY_NAME_LABEL: OURS}

# (row id, service, namespace labels, config, expected action, expected substring of the reason)
ROWS: list[tuple[str, dict[str, Any], dict[str, str], PolicyConfig, Action, str]] = [
    # Rule 1: another proxy's label is never touched.
    ("other-proxy", svc(tcp(), labels={c.SERVICE_PROXY_NAME_LABEL: "cilium", **ENABLED}), ENABLED, CFG, Action.LEAVE, "another proxy (cilium)"),
    # Rule 2: excluded namespaces, default and configured.
    ("excluded-kube-system", svc(tcp(), ns="kube-system", labels=ENABLED), {}, CFG, Action.LEAVE, "excluded"),
    ("excluded-cert-manager", svc(tcp(), ns="cert-manager", labels=ENABLED), {}, OPT_OUT, Action.LEAVE, "excluded"),
    ("excluded-own-namespace", svc(tcp(), ns=c.DEFAULT_NAMESPACE, labels=LABELLED), {}, CFG, Action.LEAVE, "excluded"),
    ("excluded-configured", svc(tcp(), ns="legacy"), {}, PolicyConfig(mode=c.MODE_OPT_OUT, excluded_namespaces=frozenset({"legacy"})), Action.LEAVE, "excluded"),
    # Rule 3: ExternalName (and unknown types) are not eligible.
    ("externalname", svc(tcp(), type_="ExternalName", cluster_ip=None, labels=ENABLED), {}, CFG, Action.LEAVE, "type ExternalName"),
    # Rule 4: headless.
    ("headless", svc(tcp(), cluster_ip="None", labels=ENABLED), {}, CFG, Action.LEAVE, "headless"),
    # Rule 5: no ports.
    ("no-ports", svc(labels=ENABLED), {}, CFG, Action.LEAVE, "no ports"),
    # Rule 6: any UDP/SCTP port keeps the whole Service on kube-proxy.
    ("udp-only", svc(udp(), labels=ENABLED), {}, CFG, Action.LEAVE, "port dns/UDP 53 stays with kube-proxy"),
    ("mixed-tcp-udp", svc(tcp(53, "dns-tcp"), udp(), labels=ENABLED), {}, CFG, Action.LEAVE, "dns/UDP 53"),
    ("sctp", svc(tcp(), sctp(), labels=ENABLED), {}, OPT_OUT, Action.LEAVE, "sig/SCTP 9999"),
    # Eligible types.
    ("nodeport", svc(tcp(), type_="NodePort", labels=ENABLED), {}, CFG, Action.LABEL, "Service opted in"),
    ("loadbalancer", svc(tcp(), type_="LoadBalancer", labels=ENABLED), {}, CFG, Action.LABEL, "Service opted in"),
    ("type-missing-means-clusterip", svc(tcp(), type_=None, labels=ENABLED), {}, CFG, Action.LABEL, "opted in"),
    # Missing protocol means TCP; appProtocol never makes a TCP Service ineligible.
    ("missing-protocol", svc({"name": "web", "port": 8080}, labels=ENABLED), {}, CFG, Action.LABEL, "opted in"),
    ("appprotocol-http", svc(tcp(appProtocol="http"), labels=ENABLED), {}, CFG, Action.LABEL, "opted in"),
    ("appprotocol-unknown", svc(tcp(appProtocol="example.com/custom"), labels=ENABLED), {}, CFG, Action.LABEL, "opted in"),
    # Rule 7: the Service label wins over the Namespace label...
    ("svc-enabled-beats-ns-disabled", svc(tcp(), labels=ENABLED), DISABLED, CFG, Action.LABEL, "Service opted in"),
    ("svc-disabled-beats-ns-enabled", svc(tcp(), labels=DISABLED), ENABLED, CFG, Action.LEAVE, "Service opted out"),
    # Rule 8: ...which wins over the global mode.
    ("ns-enabled-in-opt-in", svc(tcp()), ENABLED, CFG, Action.LABEL, "namespace opted in"),
    ("ns-disabled-in-opt-out", svc(tcp()), DISABLED, OPT_OUT, Action.LEAVE, "namespace opted out"),
    # Rule 9: global mode.
    ("opt-in-default-leaves", svc(tcp()), {}, CFG, Action.LEAVE, "not opted in"),
    ("opt-out-migrates", svc(tcp()), {}, OPT_OUT, Action.LABEL, "global mode opt-out"),
    ("invalid-opt-value-ignored", svc(tcp(), labels={c.OPT_LABEL: "yes"}), {}, CFG, Action.LEAVE, "not opted in"),
    # Rule 10: our label on a Service that should not have it is removed; idempotent when right.
    ("already-labelled", svc(tcp(), labels={**LABELLED, **ENABLED}), {}, CFG, Action.LEAVE, "handled by"),
    ("unlabel-when-disabled", svc(tcp(), labels={**LABELLED, **DISABLED}), {}, CFG, Action.UNLABEL, "back to kube-proxy"),
    ("unlabel-when-udp-added", svc(tcp(), udp(), labels={**LABELLED, **ENABLED}), {}, CFG, Action.UNLABEL, "back to kube-proxy: port dns/UDP 53"),
    ("unlabel-when-headless", svc(tcp(), cluster_ip="None", labels=LABELLED), {}, OPT_OUT, Action.UNLABEL, "headless"),
    ("unlabel-when-ns-opted-out", svc(tcp(), labels=LABELLED), DISABLED, OPT_OUT, Action.UNLABEL, "namespace opted out"),
]


@pytest.mark.parametrize(("service", "ns_labels", "config", "action", "reason"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_policy_table(service: dict[str, Any], ns_labels: dict[str, str], config: PolicyConfig, action: Action, reason: str) -> None:
    decision = decide(service, ns_labels, config)
    assert decision.action is action
    assert reason in decision.reason


def test_every_documented_row_has_a_test() -> None:
    """docs/policy.md lists each row id; a row documented without a test (or vice versa) fails here."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "policy.md").read_text()
    documented = {line.split("`")[1] for line in doc.splitlines() if line.startswith("| `")}
    assert documented == {r[0] for r in ROWS}


def test_mixed_protocol_service_is_never_labelled_in_any_mode() -> None:
    for config in (CFG, OPT_OUT):
        for labels in ({}, ENABLED):
            d = decide(svc(tcp(), udp(), labels=labels), ENABLED, config)
            assert d.action is not Action.LABEL and d.wants_proxy is False


def test_custom_proxy_name_treats_default_name_as_other_proxy() -> None:
    config = PolicyConfig(proxy_name="my-envoy", mode=c.MODE_OPT_OUT)
    assert decide(svc(tcp(), labels=LABELLED), {}, config).handled_by == f"other:{OURS}"
    assert decide(svc(tcp(), labels={c.SERVICE_PROXY_NAME_LABEL: "my-envoy"}), {}, config).handled_by == "lightpath"


def test_app_protocols_are_recorded_per_port() -> None:
    ports = service_ports(svc(tcp(80, "web", appProtocol="kubernetes.io/h2c"), tcp(5432, "db"), tcp(443, "tls", appProtocol="HTTPS")))
    assert [p.app_protocol for p in ports] == ["http", "tcp", "http"]
    assert classify_app_protocol("grpc") == "http" and classify_app_protocol("mysql") == "tcp"


def test_config_rejects_bad_mode_and_name() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        PolicyConfig(mode="sometimes")
    with pytest.raises(ValueError, match="proxy name"):
        PolicyConfig(proxy_name="")


def test_pending_flags_disagreement() -> None:
    assert decide(svc(tcp()), ENABLED, CFG).pending
    assert not decide(svc(tcp(), labels=LABELLED), ENABLED, CFG).pending


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@given(st.dictionaries(st.sampled_from(["metadata", "spec", "status", "kind"]), junk))
def test_decide_never_raises_on_malformed_input(service: dict[str, Any]) -> None:
    d = decide(service, {}, CFG)
    assert d.action in set(Action) and d.reason


@given(
    st.lists(st.sampled_from(["TCP", "UDP", "SCTP", None]), max_size=4),
    st.sampled_from([None, c.OPT_ENABLED, c.OPT_DISABLED]),
    st.sampled_from([None, c.OPT_ENABLED, c.OPT_DISABLED]),
    st.booleans(),
    st.sampled_from([CFG, OPT_OUT]),
)
def test_applying_a_decision_converges(
    protocols: list[str | None], svc_opt: str | None, ns_opt: str | None, labelled: bool, config: PolicyConfig
) -> None:
    """Applying the action and deciding again always yields LEAVE (idempotence), and the label is set only on all-TCP."""
    ports = [{"name": f"p{i}", "port": 1000 + i, **({"protocol": p} if p else {})} for i, p in enumerate(protocols)]
    labels = {**({c.OPT_LABEL: svc_opt} if svc_opt else {}), **(LABELLED if labelled else {})}
    ns_labels = {c.OPT_LABEL: ns_opt} if ns_opt else {}
    service = svc(*ports, labels=labels)
    first = decide(service, ns_labels, config)
    if first.action is Action.LABEL:
        service["metadata"]["labels"][c.SERVICE_PROXY_NAME_LABEL] = OURS
    elif first.action is Action.UNLABEL:
        del service["metadata"]["labels"][c.SERVICE_PROXY_NAME_LABEL]
    second = decide(service, ns_labels, config)
    assert second.action is Action.LEAVE
    has_label = c.SERVICE_PROXY_NAME_LABEL in service["metadata"]["labels"]
    if has_label:
        assert ineligibility(service) is None
