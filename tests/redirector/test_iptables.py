"""IptablesBackend against the real kernel: iptables-nft and iptables-legacy, IPv4 and IPv6, real TCP.

Each test builds a throw-away node netns (sandbox.node.netns.Topology, one pod) with a proxy echo
listener on port 1666 that reports SO_ORIGINAL_DST. ClusterIPs in 10.96.0.0/16 route to a device
where unredirected traffic dies; the LOCAL4/LOCAL6 ranges are local instead, so "not redirected"
answers at once (refused, or the "origin" listener on port 80) instead of timing out.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from redirector import iptables_rules as rules
from redirector.iptables import IptablesBackend, IptablesError, Variant, binaries
from redirector.model import BackendError, Delta, Family, Key
from sandbox.node.netns import NetNS, Topology, cleanup_stale, run_in_netns, tcp_listener

pytestmark = pytest.mark.root

LOCAL4, LOCAL6 = "10.96.1.0/24", "fd00:10:96::100/120"
CLUSTER = {4: "10.96.0.10", 6: "fd00:10:96::a"}  # routed away: only a redirect answers
QUICK = {4: "10.96.1.10", 6: "fd00:10:96::110"}  # local: refused or "origin" when not redirected
PROXY_UID = 65534


@dataclass
class Node:
    topo: Topology
    variant: Variant

    @property
    def ns(self) -> NetNS:
        return self.topo.node

    def backend(self, **kw: Any) -> IptablesBackend:
        return IptablesBackend(variant=self.variant, netns=self.ns.name, **kw)

    def iptables(self, family: Family, *args: str) -> str:
        restore, _ = binaries(self.variant, family)
        return self.ns.run([restore.removesuffix("-restore"), "-w", "5", "-t", "nat", *args]).stdout

    def saved(self, family: Family) -> rules.SavedNat:
        return rules.parse_save(self.ns.run([binaries(self.variant, family)[1], "-t", "nat"]).stdout)


def _dial(ip: str, port: int, mark: int | None, uid: int | None) -> dict[str, Any]:
    """Runs in a forked child inside the netns: connect, return the listener's JSON line."""
    if uid is not None:
        os.setgid(uid)
        os.setuid(uid)  # before socket(): the owner match sees the socket's creator
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM) as sock:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.settimeout(5)
        try:
            sock.connect((ip, port))
        except ConnectionRefusedError:
            return {"server": "refused"}
        reply: dict[str, Any] = json.loads(sock.makefile("rb").readline())
        return reply


def dial(ns: NetNS, ip: str, port: int, mark: int | None = None, uid: int | None = None) -> dict[str, Any]:
    return run_in_netns(ns.name, _dial, ip, port, mark, uid, timeout=20)


def assert_redirected(ns: NetNS, ip: str, port: int, **kw: Any) -> None:
    reply = dial(ns, ip, port, **kw)
    assert reply["server"] == "proxy", reply
    assert reply["original_dst"] == [ip, port], reply


@pytest.fixture(scope="module", autouse=True)
def _clean_stale_netns() -> None:
    cleanup_stale("lp-ipt")  # namespaces a crashed earlier run of this module left behind


@contextmanager
def make_node(variant: Variant) -> Iterator[Node]:
    with Topology(pods=1, prefix="lp-ipt") as topo:
        topo.node.run(["ip", "route", "add", "local", LOCAL4, "dev", "lo"])
        topo.node.run(["ip", "-6", "route", "add", "local", LOCAL6, "dev", "lo"])
        for family in (4, 6):
            tcp_listener(topo.node, 1666, family, name="proxy")
            tcp_listener(topo.node, 80, family, name="origin")
        yield Node(topo, variant)


@pytest.fixture(params=["nft", "legacy"])
def node(request: pytest.FixtureRequest) -> Iterator[Node]:
    with make_node(request.param) as made:
        yield made


@pytest.mark.parametrize("family", [4, 6])
def test_cluster_ip_is_redirected_on_the_output_path(node: Node, family: Family) -> None:
    backend = node.backend()
    keys = {Key(family, CLUSTER[family], 80), Key(family, QUICK[family], 8080)}
    assert backend.ensure(keys) is True
    assert backend.read() == keys
    assert_redirected(node.ns, CLUSTER[family], 80)
    assert_redirected(node.ns, QUICK[family], 8080)
    assert dial(node.ns, QUICK[family], 8081)["server"] == "refused"  # only the listed port
    assert backend.ensure(keys) is False  # converged: a second ensure writes nothing


def test_pod_traffic_and_nodeports_are_redirected(node: Node) -> None:
    backend = node.backend()
    topo, pod = node.topo, node.topo.pods[0]
    keys = {Key(4, CLUSTER[4], 80), Key(6, CLUSTER[6], 80), Key(4, None, 30080), Key(6, None, 30080)}
    backend.ensure(keys)
    for ip in (CLUSTER[4], CLUSTER[6]):
        assert_redirected(pod, ip, 80)  # prerouting
    for ip in (topo.node_ip, topo.node_ip6):
        assert ip is not None
        assert_redirected(pod, ip, 30080)  # NodePort from a pod
        assert_redirected(node.ns, ip, 30080)  # NodePort from the node itself
    assert dial(node.ns, QUICK[4], 30081)["server"] == "refused"


def test_apply_adds_and_removes_and_read_returns_what_was_written(node: Node) -> None:
    backend = node.backend()
    old4, old6 = Key(4, QUICK[4], 8080), Key(6, QUICK[6], 8080)
    new4, new6 = Key(4, CLUSTER[4], 443), Key(6, CLUSTER[6], 443)
    backend.ensure({old4, old6})
    backend.apply(Delta(add=frozenset({new4, new6}), delete=frozenset({old4})))
    assert backend.read() == {new4, new6, old6}
    assert IptablesBackend(variant=node.variant, netns=node.ns.name).read() == {new4, new6, old6}  # from the kernel
    assert_redirected(node.ns, CLUSTER[4], 443)
    assert_redirected(node.ns, CLUSTER[6], 443)
    assert_redirected(node.ns, QUICK[6], 8080)
    assert dial(node.ns, QUICK[4], 8080)["server"] == "refused"
    text = json.dumps(node.backend().describe())
    assert f"-d {CLUSTER[4]}/32 -p tcp -m tcp --dport 443 -j DNAT --to-destination 169.254.16.66:1666" in text
    backend.apply(Delta(delete=frozenset({old6})))
    assert backend.read() == {new4, new6}
    assert dial(node.ns, QUICK[6], 8080)["server"] == "refused"
    assert backend.ensure({new4, new6}) is False


def test_apply_patches_only_the_touched_rules_even_from_a_fresh_instance(node: Node) -> None:
    first, later = Key(4, QUICK[4], 81), Key(4, QUICK[4], 82)
    # Rules with owner comments, as an older agent wrote them: a restarted agent adopts them as they are.
    older = node.backend()
    specs = [rules.redirect_spec(k, older.cfg, "shop/cart:https") for k in (first, later)]
    older.ensure(set())
    older.restore_batch(4, rules.render_batch(rules.chain_rules(older.cfg, specs)))
    assert node.backend().ensure({first, later}) is False  # comments are labels, not drift
    restarted = node.backend()  # no memory: learns the exact (commented) specs from the kernel
    lowest = Key(4, "10.96.0.1", 80)
    restarted.apply(Delta(add=frozenset({lowest}), delete=frozenset({first})))
    chain = node.saved(4).rules["LIGHTPATH"]
    # Patched in place: the new rule is appended (a rewrite would have sorted it first).
    to = rules.To("169.254.16.66", 1666)
    assert [rules.parse_redirect(spec, 4) for spec in chain[1:]] == [(later, to), (lowest, to)]
    assert 'shop/cart:https' in chain[1]
    assert restarted.ensure({later, lowest}) is False  # rule order is not drift
    assert_redirected(node.ns, "10.96.0.1", 80)
    assert dial(node.ns, QUICK[4], 81)["server"] == "refused"


def test_apply_does_not_repair_a_kernel_that_drifted_under_it(node: Node) -> None:
    """The Backend contract: apply raises (a BackendError) and changes nothing; ensure repairs."""
    backend = node.backend()
    a, b, c = Key(4, QUICK[4], 81), Key(4, QUICK[4], 82), Key(4, QUICK[4], 83)
    backend.ensure({a, b})
    node.iptables(4, "-D", "LIGHTPATH", *rules.redirect_spec(b, backend.cfg).split())
    with pytest.raises(BackendError, match="batch line"):
        backend.apply(Delta(add=frozenset({c}), delete=frozenset({b})))  # the patch's "-D b" fails
    assert backend.read() == {a}  # the whole batch was refused: c was not added either
    assert backend.ensure({a, c}) is True
    assert backend.read() == {a, c}
    node.iptables(4, "-F", "LIGHTPATH")
    backend.apply(Delta(add=frozenset({b})))  # a pure append succeeds: apply trusts its memory...
    assert backend.read() == {b}
    assert backend.ensure({a, b, c}) is True  # ...and ensure (the periodic resync) checks the kernel
    assert backend.read() == {a, b, c}
    for port in (81, 82, 83):
        assert_redirected(node.ns, QUICK[4], port)


@pytest.mark.parametrize("family", [4, 6])
def test_proxy_marked_traffic_is_not_redirected(node: Node, family: Family) -> None:
    node.backend(proxy_mark=0x1666).ensure({Key(family, QUICK[family], 80)})
    assert_redirected(node.ns, QUICK[family], 80)
    assert_redirected(node.ns, QUICK[family], 80, mark=0x1)  # another mark is still redirected
    assert dial(node.ns, QUICK[family], 80, mark=0x1666)["server"] == "origin"


def test_proxy_uid_traffic_is_not_redirected(node: Node) -> None:
    node.backend(proxy_uid=PROXY_UID, proxy_mark=None).ensure({Key(4, QUICK[4], 80), Key(6, QUICK[6], 80)})
    for family in (4, 6):
        assert_redirected(node.ns, QUICK[family], 80)
        assert_redirected(node.ns, QUICK[family], 80, uid=PROXY_UID + 1)
        assert dial(node.ns, QUICK[family], 80, uid=PROXY_UID)["server"] == "origin"
        assert dial(node.ns, QUICK[family], 80, mark=0x1666)["server"] == "proxy"  # no mark configured


def test_hand_edits_are_repaired_by_ensure(node: Node) -> None:
    backend = node.backend()
    keys = {Key(4, CLUSTER[4], 80), Key(4, QUICK[4], 81), Key(6, CLUSTER[6], 80), Key(4, None, 30080)}
    assert backend.ensure(keys) is True
    jump = shlex.split(rules.jump_spec("LIGHTPATH"))
    out_jump = shlex.split(rules.jump_spec("LIGHTPATH-OUTPUT"))
    rule4 = rules.redirect_spec(Key(4, CLUSTER[4], 80), backend.cfg).split()
    edits: dict[str, list[tuple[Family, list[str]]]] = {
        "rule deleted": [(4, ["-D", "LIGHTPATH", *rule4])],
        "output jump deleted": [(4, ["-D", "OUTPUT", *out_jump])],
        "prerouting jump deleted": [(6, ["-D", "PREROUTING", *jump])],
        "jump duplicated": [(4, ["-A", "OUTPUT", *out_jump])],
        "chain flushed": [(6, ["-F", "LIGHTPATH"])],
        "rule retargeted": [(4, ["-R", "LIGHTPATH", "2", *rule4[:-1], "169.254.16.66:1667"])],
        "foreign rule added": [(4, ["-I", "LIGHTPATH", "1", "-j", "RETURN"])],
        "everything deleted": [
            (4, ["-D", "PREROUTING", *jump]),
            (4, ["-D", "OUTPUT", *out_jump]),
            (4, ["-F", "LIGHTPATH-OUTPUT"]),
            (4, ["-X", "LIGHTPATH-OUTPUT"]),
            (4, ["-F", "LIGHTPATH"]),
            (4, ["-X", "LIGHTPATH"]),
        ],
    }
    for what, commands in edits.items():
        for family, args in commands:
            node.iptables(family, *args)
        assert backend.ensure(keys) is True, what
        assert backend.read() == keys, what
        for family in (4, 6):
            positions = rules.jump_positions(node.saved(family), backend.cfg)
            assert positions == {"PREROUTING": [1], "OUTPUT": [1]}, (what, family)
        assert_redirected(node.ns, CLUSTER[4], 80)
        assert_redirected(node.ns, CLUSTER[6], 80)
        assert backend.ensure(keys) is False, what


def test_jump_goes_first_and_only_once_among_other_owners_rules(node: Node) -> None:
    for family in (4, 6):
        node.iptables(family, "-A", "PREROUTING", "-p", "udp", "--dport", "53", "-j", "RETURN")
        node.iptables(family, "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN")
    backend = node.backend()
    backend.ensure({Key(4, CLUSTER[4], 80), Key(6, CLUSTER[6], 80)})
    backend.ensure({Key(4, CLUSTER[4], 80), Key(6, CLUSTER[6], 80)})
    for family in (4, 6):
        saved = node.saved(family)
        assert rules.jump_positions(saved, backend.cfg) == {"PREROUTING": [1], "OUTPUT": [1]}
        assert len(saved.rules["PREROUTING"]) == len(saved.rules["OUTPUT"]) == 2
    # Another owner inserting above us later is left alone (no fight over position 1).
    node.iptables(4, "-I", "PREROUTING", "1", "-p", "udp", "--dport", "54", "-j", "RETURN")
    assert backend.ensure({Key(4, CLUSTER[4], 80), Key(6, CLUSTER[6], 80)}) is False


def test_cleanup_removes_ours_and_leaves_other_owners_rules(node: Node) -> None:
    for family in (4, 6):
        node.iptables(family, "-N", "KUBE-SERVICES")
        node.iptables(family, "-A", "KUBE-SERVICES", "-p", "udp", "--dport", "53", "-j", "RETURN")
        node.iptables(family, "-A", "PREROUTING", "-j", "KUBE-SERVICES")
        node.iptables(family, "-A", "OUTPUT", "-j", "KUBE-SERVICES")
        node.iptables(family, "-A", "OUTPUT", "-p", "tcp", "--dport", "8443", "-j", "REDIRECT", "--to-ports", "8444")
    before = {family: node.saved(family) for family in (4, 6)}
    backend = node.backend(proxy_uid=PROXY_UID)
    backend.ensure({Key(4, QUICK[4], 8080), Key(6, QUICK[6], 8080), Key(4, None, 30080)})
    assert_redirected(node.ns, QUICK[4], 8080)
    backend.cleanup()
    for family in (4, 6):
        after = node.saved(family)
        assert (after.chains, after.rules) == (before[family].chains, before[family].rules)
        assert "LIGHTPATH" not in after.chains
    assert backend.read() == frozenset()
    assert backend.addresses.present() == []  # the DNAT targets on lo go with the rules
    assert dial(node.ns, QUICK[4], 8080)["server"] == "refused"
    assert dial(node.ns, QUICK[6], 8080)["server"] == "refused"
    backend.cleanup()  # idempotent: nothing of ours left, nothing written


def test_a_rejected_batch_names_its_failing_line_and_changes_nothing(node: Node) -> None:
    backend = node.backend()
    keys = {Key(4, CLUSTER[4], 80)}
    backend.ensure(keys)
    parse_error = "*nat\n:LIGHTPATH - [0:0]\n-A LIGHTPATH -d 10.96.0.999/32 -p tcp --dport 80 -j RETURN\nCOMMIT\n"
    with pytest.raises(IptablesError) as info:
        backend.restore_batch(4, parse_error)
    assert info.value.line_no == 3
    assert "-A LIGHTPATH -d 10.96.0.999/32" in str(info.value)
    # Rejected by the kernel at commit: the owner match in a chain PREROUTING reaches.
    kernel_error = (
        "*nat\n:LIGHTPATH - [0:0]\n-A LIGHTPATH -m owner --uid-owner 0 -j RETURN\n"
        "-I PREROUTING 1 -j LIGHTPATH\nCOMMIT\n"
    )
    with pytest.raises(IptablesError) as info:
        backend.restore_batch(4, kernel_error)
    assert info.value.line_no is not None
    assert info.value.line and info.value.line in str(info.value)
    assert backend.read() == keys  # atomic: the flush of our chain in both batches never happened
    assert_redirected(node.ns, CLUSTER[4], 80)


@pytest.mark.slow
def test_ten_thousand_entries_per_family_load_in_one_batch_each(node: Node) -> None:
    import ipaddress

    v4, v6 = (int(ipaddress.ip_address(n)) for n in ("10.96.16.0", "fd00:10:96::8000"))
    keys = {Key(4, str(ipaddress.ip_address(v4 + i)), 80) for i in range(10_000)}
    keys |= {Key(6, ipaddress.ip_address(v6 + i).compressed, 80) for i in range(10_000)}
    backend = node.backend()
    assert backend.ensure(keys) is True
    assert backend.read() == keys
    for family in (4, 6):
        assert len(node.saved(family).rules["LIGHTPATH"]) == 10_001
    for key in sorted(keys, key=rules.sort_key)[::4999]:
        assert key.ip is not None
        assert_redirected(node.ns, key.ip, 80)
    assert backend.ensure(keys) is False


def test_auto_variant_uses_the_hosts_iptables() -> None:
    with make_node("auto") as node:
        _check_auto(node)


def _check_auto(node: Node) -> None:
    backend = IptablesBackend(variant="auto", netns=node.ns.name)
    backend.ensure({Key(4, CLUSTER[4], 80)})
    assert backend.describe()["binaries"] == {
        "ipv4": ["iptables-restore", "iptables-save"],
        "ipv6": ["ip6tables-restore", "ip6tables-save"],
    }
    assert_redirected(node.ns, CLUSTER[4], 80)
    backend.cleanup()


def test_legacy_writer_honours_the_xtables_lock(tmp_path: Path) -> None:
    """Only iptables-legacy takes the lock (iptables-nft commits are atomic in the kernel)."""
    with make_node("legacy") as node:
        _check_lock(node, tmp_path)


def _check_lock(node: Node, tmp_path: Path) -> None:
    lock = tmp_path / "xtables.lock"
    backend = node.backend(lock_path=str(lock), lock_wait=1)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(IptablesError, match="xtables lock"):
            backend.ensure({Key(4, CLUSTER[4], 80)})
        assert backend.read() == frozenset()
    assert backend.ensure({Key(4, CLUSTER[4], 80)}) is True
    assert_redirected(node.ns, CLUSTER[4], 80)
