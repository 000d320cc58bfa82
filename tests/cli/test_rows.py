"""Status rows come from the shared policy: who serves each Service, who should, and PENDING mismatches."""

from __future__ import annotations

from cli.rows import Ref, build_rows, namespace_labels, ports_text, summarize
from shared import constants as c
from shared.policy import Action, PolicyConfig, service_ports
from tests.cli.cluster import ENABLED, LABELLED, mixed_cluster, namespace, port, service

CFG = PolicyConfig()


def _rows_by_name(services, namespaces, config=CFG):
    return {r.ref.name: r for r in build_rows(services, namespace_labels(namespaces), config)}


def test_mixed_cluster_rows() -> None:
    namespaces, services = mixed_cluster()
    rows = _rows_by_name(services, namespaces)

    assert rows["web"].handled_by == "kube-proxy" and rows["web"].wants == "kube-proxy"
    assert "not opted in" in rows["web"].reason and not rows["web"].pending
    assert rows["api"].eligible and ports_text(rows["api"].ports) == "8080/TCP(http),8443/TCP(http)"
    assert "UDP" in rows["dns"].reason and not rows["dns"].eligible
    assert ports_text(rows["dns-mixed"].ports) == "53/TCP,53/UDP" and "dns/UDP 53" in rows["dns-mixed"].reason
    assert "headless" in rows["db"].reason
    assert rows["mesh"].handled_by == "other:cilium" and rows["mesh"].wants == "other:cilium"
    assert "excluded" in rows["metrics"].reason and rows["metrics"].wants == "kube-proxy"
    assert not any(r.pending for r in rows.values())


def test_rows_are_sorted_by_namespace_then_name() -> None:
    namespaces, services = mixed_cluster()
    refs = [r.ref for r in build_rows(services, namespace_labels(namespaces), CFG)]
    assert refs == sorted(refs) and refs[0] == Ref("infra", "dns")


def test_pending_when_label_and_policy_disagree() -> None:
    admitted_while_down = service("cart", "shop", labels=ENABLED)  # opted in, handoff label never added
    disabled_but_ours = service("old", "shop", labels={**LABELLED, c.OPT_LABEL: c.OPT_DISABLED})
    rows = _rows_by_name([admitted_while_down, disabled_but_ours], [namespace("shop")])

    assert rows["cart"].pending and rows["cart"].action is Action.LABEL
    assert rows["cart"].handled_by == "kube-proxy" and rows["cart"].wants == "lightpath"
    assert rows["old"].pending and rows["old"].handled_by == "lightpath" and rows["old"].wants == "kube-proxy"


def test_namespace_labels_feed_the_policy() -> None:
    rows = _rows_by_name([service("web", "shop")], [namespace("shop", ENABLED)])
    assert rows["web"].wants == "lightpath" and "namespace opted in" in rows["web"].reason


def test_policy_config_is_honoured() -> None:
    opt_out = PolicyConfig(mode=c.MODE_OPT_OUT, excluded_namespaces=frozenset())
    namespaces, services = mixed_cluster()
    rows = _rows_by_name(services, namespaces, opt_out)
    assert rows["web"].wants == "lightpath" and rows["metrics"].wants == "lightpath"
    assert rows["dns"].wants == "kube-proxy"


def test_summary_counts() -> None:
    namespaces, services = mixed_cluster()
    services.append(service("cart", "shop", labels={**ENABLED, **LABELLED}))
    services.append(service("late", "shop", labels=ENABLED))
    summary = summarize(build_rows(services, namespace_labels(namespaces), CFG))
    assert summary.to_dict() == {
        "total": 9,
        "lightpath": 1,
        "kubeProxy": 7,
        "otherProxy": 1,
        "pending": 1,
        "ineligible": 5,
    }
    assert summary.text().startswith(
        "9 Services: 1 on lightpath, 7 on kube-proxy, 1 on other proxies; 1 PENDING"
    )


def test_row_dict_is_plain_json() -> None:
    row = build_rows([service("api", "shop", port(80, app="http"), port(53, "UDP"))], {}, CFG)[0]
    d = row.to_dict()
    assert d["ports"] == [
        {"name": "p80-tcp", "port": 80, "protocol": "TCP", "appProtocol": "http"},
        {"name": "p53-udp", "port": 53, "protocol": "UDP", "appProtocol": "tcp"},
    ]
    assert d["portsText"] == "80/TCP(http),53/UDP" and d["pending"] is False and d["action"] == "leave"


def test_ports_text_without_ports() -> None:
    assert ports_text(service_ports({"spec": {}})) == "<none>"


def test_a_service_in_handover_says_so() -> None:
    """A make-before-break migration under way (or one whose CLI died before it unmarked the Service) shows
    as HANDOVER in the table and as ``handover`` in JSON; other rows say null."""
    from cli import render

    marked = service("web", "shop", labels=ENABLED)
    marked["metadata"]["annotations"] = {c.HANDOVER_ANNOTATION: c.HANDOVER_MIGRATE}
    rows = build_rows([marked, service("api", "shop")], {}, CFG)
    by_name = {r.ref.name: r for r in rows}
    assert by_name["web"].to_dict()["handover"] == "migrate" and by_name["api"].to_dict()["handover"] is None
    table = render.status_table(rows, summarize(rows), colour=False)
    assert "HANDOVER" in next(line for line in table.splitlines() if " web " in line)
    assert "HANDOVER" not in next(line for line in table.splitlines() if " api " in line)
