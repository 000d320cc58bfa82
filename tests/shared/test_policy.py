"""The policy table, row by row (docs/policy.md has the same rows)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import constants as c
from shared.policy import (
    MAX_REASON,
    Action,
    PolicyConfig,
    classify_app_protocol,
    decide,
    ineligibility,
    service_ports,
)

OURS = c.DEFAULT_PROXY_NAME
CFG = PolicyConfig()
OPT_OUT = PolicyConfig(mode=c.MODE_OPT_OUT)
ENABLED = {c.OPT_LABEL: c.OPT_ENABLED}
DISABLED = {c.OPT_LABEL: c.OPT_DISABLED}


def svc(
    *ports: dict[str, Any],
    ns: str = "shop",
    name: str = "web",
    type_: str | None = "ClusterIP",
    cluster_ip: str | None = "10.96.0.10",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": list(ports)}
    if type_ is not None:
        spec["type"] = type_
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns, "labels": labels or {}}, "spec": spec}


def apiserver(labels: dict[str, str] | None = None) -> dict[str, Any]:
    """default/kubernetes as kube-apiserver creates it."""
    return svc(tcp(443, "https"), ns="default", name="kubernetes", cluster_ip="10.96.0.1", labels=labels)


def tcp(port: int = 80, name: str = "http", **extra: Any) -> dict[str, Any]:
    return {"name": name, "port": port, "protocol": "TCP"} | extra


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
    # Rule 2a: default/kubernetes, the API server's own Service, is never migrated.
    ("apiserver-service-opt-out", apiserver(), {}, OPT_OUT, Action.LEAVE, "API server's own Service"),
    ("apiserver-service-ns-enabled", apiserver(labels=ENABLED), ENABLED, CFG, Action.LEAVE, "never migrated"),
    ("apiserver-service-unlabelled", apiserver(labels=LABELLED), {}, OPT_OUT, Action.UNLABEL, "back to kube-proxy: default/kubernetes"),
    ("kubernetes-elsewhere-migrates", svc(tcp(443, "https"), name="kubernetes"), {}, OPT_OUT, Action.LABEL, "global mode opt-out"),
    # Rule 3: ExternalName (and unknown types) are not eligible.
    ("externalname", svc(tcp(), type_="ExternalName", cluster_ip=None, labels=ENABLED), {}, CFG, Action.LEAVE, "type ExternalName"),
    ("type-list", svc(tcp(), type_=["ClusterIP"], labels=ENABLED), {}, OPT_OUT, Action.LEAVE, "type [...] stays"),  # type: ignore[arg-type]
    ("type-object", svc(tcp(), type_={"name": "ClusterIP"}, labels=ENABLED), {}, OPT_OUT, Action.LEAVE, "type {...} stays"),  # type: ignore[arg-type]
    # Rule 4: headless.
    ("headless", svc(tcp(), cluster_ip="None", labels=ENABLED), {}, CFG, Action.LEAVE, "headless"),
    # Rule 5: no ports.
    ("no-ports", svc(labels=ENABLED), {}, CFG, Action.LEAVE, "no ports"),
    # ...or a port the policy cannot read: never taken for TCP.
    ("port-null", svc(None, labels=ENABLED), {}, OPT_OUT, Action.LEAVE, "port #1 cannot be read (null, not an object)"),  # type: ignore[arg-type]
    ("port-string", svc("80/TCP", labels=ENABLED), {}, OPT_OUT, Action.LEAVE, "port #1 cannot be read ('80/TCP'"),  # type: ignore[arg-type]
    ("protocol-lower-case", svc(tcp(protocol="tcp"), labels=ENABLED), {}, OPT_OUT, Action.LEAVE, "protocol 'tcp' is not TCP, UDP or SCTP"),
    ("port-number-missing", svc({"name": "web", "protocol": "TCP"}, labels=ENABLED), {}, OPT_OUT, Action.LEAVE, "port #1 (web) cannot be read"),
    ("unlabel-when-port-unreadable", svc(tcp(), tcp(81, "alt", protocol="Tcp"), labels=LABELLED), {}, OPT_OUT, Action.UNLABEL, "back to kube-proxy: port #2 (alt)"),
    # Rule 6: any UDP/SCTP port keeps the whole Service on kube-proxy.
    ("udp-only", svc(udp(), labels=ENABLED), {}, CFG, Action.LEAVE, "port dns/UDP 53 stays with kube-proxy"),
    ("mixed-tcp-udp", svc(tcp(53, "dns-tcp"), udp(), labels=ENABLED), {}, CFG, Action.LEAVE, "dns/UDP 53"),
    ("sctp", svc(tcp(), sctp(), labels=ENABLED), {}, OPT_OUT, Action.LEAVE, "sig/SCTP 9999"),
    ("many-udp-ports", svc(*[udp(10000 + i, f"rtp-media-{i:05d}") for i in range(50)], labels=ENABLED), {}, CFG,
     Action.LEAVE, "50 of 50 ports are UDP and stay with kube-proxy"),
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
    assert [p.app_protocol for p in ports] == ["http", "tcp", "tcp"]  # HTTPS: TLS the proxy cannot read
    assert classify_app_protocol("grpc") == "http" and classify_app_protocol("mysql") == "tcp"
    # One classification: what the control plane speaks HTTP for is what the CLI calls http.
    from controlplane.l7 import upstream_protocol

    for value in ("http", "https", "h2", "h2c", "grpc", "grpc-web", "ws", "wss", "kubernetes.io/wss",
                  "https-terminated-elsewhere", "mysql", ""):
        assert (classify_app_protocol(value) == "http") == (upstream_protocol(value) != "tcp"), value


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


# Junk in the places decide() actually reads (the generic junk above almost never hits "type" or "ports").
SHAPED = st.fixed_dictionaries(
    {},
    optional={
        "metadata": st.fixed_dictionaries({}, optional={
            "name": junk, "namespace": st.sampled_from(["default", "shop"]) | junk,
            "labels": st.dictionaries(st.sampled_from([c.OPT_LABEL, c.SERVICE_PROXY_NAME_LABEL]), junk, max_size=2) | junk,
        }),
        "spec": st.fixed_dictionaries({}, optional={
            "type": st.sampled_from(["ClusterIP", "ExternalName"]) | junk,
            "clusterIP": st.sampled_from(["None", "10.0.0.1"]) | junk,
            "ports": st.lists(junk | st.fixed_dictionaries({}, optional={
                "name": junk, "port": st.integers(-1, 70000) | junk, "protocol": st.sampled_from(["TCP", "UDP", "tcp"]) | junk,
                "appProtocol": junk,
            }), max_size=4) | junk,
        }),
    },
)


@given(SHAPED, st.sampled_from([CFG, OPT_OUT]))
def test_decide_never_raises_on_odd_values_in_real_fields(service: dict[str, Any], config: PolicyConfig) -> None:
    """Issue 17 item 4: spec.type as a list or map raised TypeError (unhashable)."""
    d = decide(service, ENABLED, config)
    assert d.action in set(Action) and 0 < len(d.reason) <= MAX_REASON


@given(SHAPED)
def test_only_readable_all_tcp_ports_are_eligible(service: dict[str, Any]) -> None:
    """Issue 17 item 5: null, string and lower-case-protocol ports were taken for TCP."""
    if ineligibility(service) is not None:
        return
    raw = service["spec"].get("ports")
    assert isinstance(raw, list) and raw
    for port in raw:
        assert isinstance(port, dict) and port.get("protocol") in (None, "", "TCP")
        assert type(port.get("port")) is int and 1 <= port["port"] <= 65535


def test_reason_is_bounded_whatever_the_ports() -> None:
    """Issue 17 item 1: 10,000 UDP ports made a 270 kB reason (annotation, warning, audit annotation)."""
    long_name = "n" * 100_000
    cases = [
        svc(*[udp(10000 + i, f"rtp-media-{i:05d}") for i in range(20_000)], labels=ENABLED),
        svc(tcp(), *[{"name": f"p{i}", "port": i + 1, "protocol": p} for i, p in enumerate(["UDP", "SCTP"] * 50)], labels=ENABLED),
        svc(udp(name=long_name), labels=ENABLED),
        svc(*[{"port": "x" * 10_000, "protocol": "y" * 10_000, "name": long_name}] * 50, labels=ENABLED),
        svc(tcp(), type_=long_name, labels=ENABLED),
        svc(tcp(), labels={c.SERVICE_PROXY_NAME_LABEL: long_name}),
    ]
    for service in cases:
        for config in (CFG, OPT_OUT):
            reason = decide(service, ENABLED, config).reason
            assert len(reason) <= MAX_REASON, reason[:300]
    many = decide(cases[0], {}, CFG).reason
    assert many.startswith("20000 of 20000 ports are UDP") and "first: rtp-media-00000/UDP 10000" in many
    mixed = decide(cases[1], {}, CFG).reason
    assert mixed.startswith("100 of 101 ports are not TCP") and "p0/UDP 1, p1/SCTP 2, p2/UDP 3, ..." in mixed


def test_a_few_non_tcp_ports_are_all_named() -> None:
    reason = decide(svc(udp(1, "a"), udp(2, "b"), sctp(3, "c"), labels=ENABLED), {}, CFG).reason
    assert reason == "port a/UDP 1, b/UDP 2, c/SCTP 3 stay with kube-proxy (the label would move every port)"


def test_huge_integers_never_raise() -> None:
    """str() of an int over 4,300 digits raises ValueError; decide() reads such values without it."""
    huge = 10**5000
    service = svc({"name": huge, "port": huge, "protocol": huge}, labels={c.OPT_LABEL: huge})  # type: ignore[dict-item]
    service["metadata"]["namespace"] = huge
    d = decide(service, ENABLED, OPT_OUT)
    assert d.action is Action.LEAVE and "cannot be read" in d.reason and len(d.reason) <= MAX_REASON
