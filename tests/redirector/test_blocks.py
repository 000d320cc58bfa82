"""The kernel's answers for migrated Services without endpoints: which keys (the translation, pure) and the
nft script (pure); tests/e2e/test_conformance.py proves the packets."""

from __future__ import annotations

import re
from typing import Any

import pytest

from controlplane.translate import NodeInfo, project_service, translate_service
from redirector.blocks import blocks_script
from redirector.model import Key
from shared import constants as c


def svc(labelled: bool = True, **spec: Any) -> dict[str, Any]:
    labels = {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME} if labelled else {}
    return {"metadata": {"name": "web", "namespace": "shop", "labels": labels},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}], **spec}}


def blocked(service: dict[str, Any], endpoints_on: list[str]) -> dict[Key, str]:
    from controlplane.endpoints import project_slice

    slices = [project_slice({"metadata": {"name": f"s{i}", "namespace": "shop",
                                          "labels": {"kubernetes.io/service-name": "web"}},
                             "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                             "endpoints": [{"addresses": [f"10.244.0.{10 + i}"], "nodeName": node}]})
              for i, node in enumerate(endpoints_on)]
    res = translate_service(project_service(service), [s for s in slices if s is not None], NodeInfo("n1"))
    return dict(res.blocked)


def test_only_labelled_services_without_a_usable_endpoint_are_blocked() -> None:
    key = Key(4, "10.96.0.10", 80)
    assert blocked(svc(), []) == {key: "reject"}
    assert blocked(svc(), ["n2"]) == {}
    assert blocked(svc(internalTrafficPolicy="Local"), ["n2"]) == {key: "drop"}  # endpoints, none here
    assert blocked(svc(internalTrafficPolicy="Local"), ["n1"]) == {}
    # Unlabelled: kube-proxy serves (and rejects) it; the agent must never answer for it.
    assert blocked(svc(labelled=False), []) == {}


def test_script_holds_exactly_the_blocked_keys_and_removes_the_table_when_empty() -> None:
    script = blocks_script("t", {Key(4, "10.96.0.10", 80): "reject", Key(6, "fd00::1", 443): "drop",
                                 Key(4, None, 30080): "reject"})
    assert script.startswith("add table inet t\ndelete table inet t\ntable inet t {")
    assert "set reject4 { type ipv4_addr . inet_service; elements = { 10.96.0.10 . 80 }; }" in script
    assert "set drop6 { type ipv6_addr . inet_service; elements = { fd00::1 . 443 }; }" in script
    assert "set reject4np { type inet_service; elements = { 30080 }; }" in script
    assert script.count("priority -120") == 2 and "reject with tcp reset" in script
    assert blocks_script("t", {}) == "add table inet t\ndelete table inet t\n"


def test_labelled_services_expose_only_their_cluster_ip_ports() -> None:
    """The ClusterIP check (row 12) covers the ClusterIPs of labelled Services only, with their exposed TCP
    ports; externalIPs, NodePorts and LB IPs are not ClusterIPs (kube-proxy does not check them either)."""
    def exposed(service: dict[str, Any]) -> set[Key]:
        res = translate_service(project_service(service), [], NodeInfo("n1", ipv6=True))
        return set(res.exposed)

    two = svc(type="NodePort", externalIPs=["192.0.2.7"], clusterIPs=["10.96.0.10", "fd00::10"],
              ports=[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
                     {"name": "https", "port": 443, "protocol": "TCP", "nodePort": 30443}])
    assert exposed(two) == {Key(4, "10.96.0.10", 80), Key(4, "10.96.0.10", 443), Key(6, "fd00::10", 80),
                            Key(6, "fd00::10", 443)}
    assert exposed(svc(labelled=False)) == set()


def test_script_rejects_unexposed_ports_of_cluster_ips_after_every_dnat() -> None:
    script = blocks_script("t", {}, {Key(4, "10.96.0.10", 80), Key(4, "10.96.0.10", 443), Key(6, "fd00::10", 80)})
    assert "set clusterips4 { type ipv4_addr; elements = { 10.96.0.10 }; }" in script
    assert ("set exposed4 { type ipv4_addr . inet_proto . inet_service; "
            "elements = { 10.96.0.10 . tcp . 443, 10.96.0.10 . tcp . 80 }; }") in script
    assert "elements = { fd00::10 . tcp . 80 }" in script
    rule = "ct state new ip daddr @clusterips4 ip daddr . meta l4proto . th dport != @exposed4 reject\n"
    # forward before kube-proxy's drop (-110); output after both output DNATs (ours -110, kube-proxy's -100)
    assert "type filter hook forward priority -115;" in script and "type filter hook output priority -95;" in script
    assert script.count(rule) == 2


def test_a_change_is_a_diff_of_elements_not_a_rewrite() -> None:
    from redirector.blocks import Answers, changes, changes_json, ip_counts

    a, a443, b = Key(4, "10.96.0.10", 80), Key(4, "10.96.0.10", 443), Key(4, "10.96.0.11", 80)
    delta, counts = changes(Answers({a: "reject"}, frozenset({a, a443})), Answers({a: "drop"}, frozenset({a, b})),
                            ip_counts({a, a443}))
    assert counts == ip_counts({a, b}) == {(4, "10.96.0.10"): 1, (4, "10.96.0.11"): 1}
    assert delta == {"reject4": ({("10.96.0.10", 80)}, set()), "drop4": (set(), {("10.96.0.10", 80)}),
                     "exposed4": ({("10.96.0.10", "tcp", 443)}, {("10.96.0.11", "tcp", 80)}),
                     "clusterips4": (set(), {"10.96.0.11"})}  # 10.96.0.10 keeps port 80: stays
    assert changes(Answers({}, frozenset({a})), Answers({}, frozenset({a})), ip_counts({a}))[0] == {}
    gone = changes(Answers({}, frozenset({a, a443})), Answers(), ip_counts({a, a443}))[0]
    assert gone["clusterips4"] == ({"10.96.0.10"}, set())
    # the IP's only port renumbered: it stays
    moved, _ = changes(Answers({}, frozenset({a})), Answers({}, frozenset({a443})), ip_counts({a}))
    assert "clusterips4" not in moved and moved["exposed4"] == ({("10.96.0.10", "tcp", 80)}, {("10.96.0.10", "tcp", 443)})
    commands = changes_json("t", delta)["nftables"]
    # deletions first: a key moving from reject to drop never holds both verdicts
    assert [next(iter(c)) for c in commands] == ["delete", "delete", "add", "add", "add"]
    assert {"add": {"element": {"family": "inet", "table": "t", "name": "exposed4",
                                "elem": [{"concat": ["10.96.0.11", "tcp", 80]}]}}} in commands
    lb = Key(4, "192.0.2.1", 80)
    ranged, _ = changes(Answers(firewall={lb: ("10.0.0.0/8", "203.0.113.0/25")}),
                        Answers(firewall={lb: ("10.0.0.0/8", "198.51.100.7/32")}), {})
    assert ranged == {"allowed4": ({("192.0.2.1", 80, ("prefix", "203.0.113.0", 25))},
                                   {("192.0.2.1", 80, ("prefix", "198.51.100.7", 32))})}
    assert changes_json("t", ranged)["nftables"][1] == {"add": {"element": {
        "family": "inet", "table": "t", "name": "allowed4",
        "elem": [{"concat": ["192.0.2.1", 80, {"prefix": {"addr": "198.51.100.7", "len": 32}}]}]}}}


@pytest.mark.root
def test_kernel_blocks_apply_changes_in_place_and_rebuild_a_deleted_table() -> None:
    """The real kernel: element changes while the table is there, a rebuild once someone deleted it, the
    table gone when nothing needs an answer."""
    from sandbox.node.netns import NetNS, nft, run_in_netns

    def scenario() -> list[str]:
        from redirector.blocks import KernelBlocks

        blocks = KernelBlocks("lp-block")
        shots = []
        a, b = Key(4, "10.96.0.10", 80), Key(6, "fd00::b", 443)
        blocks.apply({a: "reject"}, {a})
        shots.append(blocks._nft.cmd("list table inet lp-block")[1])
        blocks.apply({}, {a, b})  # in place: element changes in JSON
        assert blocks.rewrites == 1
        shots.append(blocks._nft.cmd("list table inet lp-block")[1])
        blocks._nft.cmd("delete table inet lp-block")
        blocks.apply({b: "drop"}, {a, b})  # the element change fails: rebuilt
        assert blocks.rewrites == 2
        shots.append(blocks._nft.cmd("list table inet lp-block")[1])
        blocks.apply({}, set())
        shots.append(blocks._nft.cmd("list tables")[1])
        return [*shots, str(blocks.errors)]

    with NetNS("lpblocks") as ns:
        first, second, rebuilt, gone, errors = run_in_netns(ns.name, scenario)
        assert nft(ns.name, "list tables").strip() == ""
    sets = lambda text: dict(re.findall(r"set (\w+) \{([^}]*)\}", text))  # noqa: E731
    assert "10.96.0.10 . 80" in sets(first)["reject4"] and "10.96.0.10" in sets(first)["clusterips4"]
    assert "elements" not in sets(second)["reject4"] and "fd00::b . tcp . 443" in sets(second)["exposed6"]
    assert "fd00::b . 443" in sets(rebuilt)["drop6"] and "10.96.0.10 . tcp . 80" in sets(rebuilt)["exposed4"]
    assert "lp-block" not in gone and errors == "0"


def test_health_check_node_port_only_for_labelled_local_load_balancers() -> None:
    from controlplane.endpoints import project_slice
    from redirector.healthcheck import answer

    lb = svc(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32100)
    sl = project_slice({"metadata": {"name": "s", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
                        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                        "endpoints": [{"addresses": ["10.244.0.10"], "nodeName": "n1"},
                                      {"addresses": ["10.244.0.11"], "nodeName": "n2"}]})
    assert sl is not None
    assert translate_service(project_service(lb), [sl], NodeInfo("n1")).health == (32100, 1)
    assert translate_service(project_service(lb), [sl], NodeInfo("n3")).health == (32100, 0)
    cluster_policy = svc(type="LoadBalancer", healthCheckNodePort=32100)
    assert translate_service(project_service(cluster_policy), [sl], NodeInfo("n1")).health is None
    assert translate_service(project_service({**lb, "metadata": {"name": "web", "namespace": "shop"}}), [sl],
                             NodeInfo("n1")).health is None  # unlabelled: kube-proxy answers it
    assert answer("shop/web", 2)[0] == 200 and answer("shop/web", 0)[0] == 503
    assert b'"localEndpoints": 0' in answer("shop/web", 0)[1]


def test_transparent_keys_get_their_dnat_and_mark_chains_only_with_a_target() -> None:
    from redirector.blocks import Answers, Transparent, changes, changes_json

    np4, ext6 = Key(4, None, 30081), Key(6, "fd00::7", 81)
    target = Transparent(1667, 0x1666)
    script = blocks_script("t", {}, transparent={np4: ("10.244.0.10",), ext6: ()}, target=target)
    assert "set transparent4np { type inet_service; elements = { 30081 }; }" in script
    assert "set transparent6 { type ipv6_addr . inet_service; elements = { fd00::7 . 81 }; }" in script
    assert f"fib daddr type local meta nfproto ipv4 tcp dport @transparent4np dnat ip to {c.DEFAULT_REDIRECT_ADDRESS}:1667" in script
    assert f"ip6 daddr . tcp dport @transparent6 dnat ip6 to [{c.DEFAULT_REDIRECT_ADDRESS6}]:1667" in script
    assert "type nat hook prerouting priority -112" in script  # after the fallback (-115), before our -110
    assert "set hairpin4np { type ipv4_addr . inet_service; elements = { 10.244.0.10 . 30081 }; }" in script
    assert script.index("@hairpin4np return") < script.index("@transparent4np dnat")  # the endpoint itself: ordinary
    assert "ip saddr @localpods4 return" in script and "set localpods4 { type ipv4_addr; flags interval; }" in script
    with_pods = blocks_script("t", {}, transparent={np4: ()}, target=target)
    assert "elements" not in with_pods.split("set localpods4")[1].split("}")[0]
    pods, _ = changes(Answers(transparent={np4: ()}), Answers(transparent={np4: ()}, local_sources=("10.244.0.0/24",)), {})
    assert pods == {"localpods4": (set(), {("prefix", "10.244.0.0", 24)})}
    assert "ct direction original meta mark 0x1666 ct mark set ct mark | 0x1666" in script  # other bits kept
    assert "ct direction reply ct mark & 0x1666 == 0x1666 meta mark set meta mark | 0x1667" in script  # the reply mark
    assert "chain transparent" not in blocks_script("t", {Key(4, "10.96.0.1", 80): "reject"})
    assert "redirect to :1667" in blocks_script("t", {}, transparent={np4: ()}, target=Transparent(1667, 0x1666, "redirect"))
    with pytest.raises(ValueError, match="reply mark"):
        Transparent(1667, 0x1667)
    with pytest.raises(ValueError, match="reply mark"):
        Transparent(1667, 0xFFFF)
    delta, _ = changes(Answers(transparent={np4: ("10.244.0.10",)}), Answers(transparent={ext6: ()}), {})
    assert delta == {"transparent4np": ({30081}, set()), "hairpin4np": ({("10.244.0.10", 30081)}, set()),
                     "transparent6": (set(), {("fd00::7", 81)})}
    moved, _ = changes(Answers(transparent={np4: ("10.244.0.10",)}), Answers(transparent={np4: ("10.244.0.11",)}), {})
    assert moved == {"hairpin4np": ({("10.244.0.10", 30081)}, {("10.244.0.11", 30081)})}  # the key itself stays
    assert changes_json("t", delta)["nftables"][0]["delete"]["element"]["name"] == "transparent4np"


@pytest.mark.root
def test_kernel_blocks_route_the_replies_while_a_key_is_transparent() -> None:
    """The real kernel: the reply route and the mark chains come with the first write (before any key goes
    to the transparent listener) and stay while the agent runs with it, keys or none (connections it
    carries must keep their replies); cleanup removes table and route, also when this agent never had them."""
    from sandbox.node.netns import NetNS, run_in_netns

    def scenario() -> list[str]:
        import subprocess

        from redirector.blocks import KernelBlocks, Transparent
        from redirector.transparent import ReplyRoute

        def rules() -> str:
            return subprocess.run(["ip", "rule"], capture_output=True, text=True, check=True).stdout

        blocks = KernelBlocks("lp-block", Transparent(1667, 0x1666))
        shots = [rules()]
        blocks.apply({}, set(), {}, {Key(4, None, 30081): ("10.244.0.10",)})
        shots += [rules(), blocks._nft.cmd("list table inet lp-block")[1]]
        blocks.apply({}, set(), {}, {})  # no key for a moment: route and chains stay, the element goes
        shots += [rules(), blocks._nft.cmd("list table inet lp-block")[1]]
        subprocess.run(["ip", "rule", "del", "fwmark", "0x1667/0x1667", "lookup", "1666"], check=True)  # someone flushes it
        blocks._route_checked = 0.0  # as 30 s later
        blocks.apply({}, set(), {}, {})  # the same answers again (the control plane's 30 s delivery)
        assert "fwmark 0x1667/0x1667 lookup 1666" in rules() and blocks.drift == 1
        blocks.cleanup()
        shots += [rules(), blocks._nft.cmd("list tables")[1]]
        blocks = KernelBlocks("lp-block", Transparent(1667, 0x1666))
        blocks.apply({}, set(), {}, {Key(4, "192.0.2.7", 81): ()})
        KernelBlocks("lp-block").cleanup()  # `lightpath-redirector cleanup` with the flag off...
        ReplyRoute(c.TRANSPARENT_REPLY_MARK).remove()  # ...removes the route too (__main__.cleanup)
        shots += [rules(), blocks._nft.cmd("list tables")[1]]
        return [*shots, str(blocks.errors)]

    with NetNS("lptransp") as ns:
        ns.run(["ip", "link", "set", "lo", "up"])
        before, during, table, empty_rules, empty_table, cleaned, tables, cleaned2, tables2, errors = run_in_netns(
            ns.name, scenario)
    assert "0x1667" not in before and "fwmark 0x1667/0x1667 lookup 1666" in during
    assert "30081" in table and "chain transparent" in table
    assert "fwmark 0x1667/0x1667 lookup 1666" in empty_rules
    assert "chain transparent-restore" in empty_table and "30081" not in empty_table
    assert "0x1667" not in cleaned and "lp-block" not in tables
    assert "0x1667" not in cleaned2 and "lp-block" not in tables2 and errors == "0"
