"""The kernel L4 fallback on the iptables backend: the pure chain text, and real TCP through the chains in a
node netns (iptables-nft and iptables-legacy, IPv4 and IPv6) with the redirect's own rules in place."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import pytest

from redirector import iptables_rules as rules
from redirector.iptables import IptablesBackend, Variant, binaries
from redirector.iptables_fallback import IptablesFallback, Names, batch, family_chains
from redirector.model import Key
from sandbox.node.netns import Topology, cleanup_stale
from sandbox.node.traffic import tcp_listener, tcp_request

A4, A6 = Key(4, "10.96.0.10", 80), Key(6, "fd00:10:96::a", 80)
NAMES = Names("LIGHTPATH")


def test_chains_pick_each_endpoint_with_kube_proxys_probabilities() -> None:
    eps = (("10.244.0.12", 8080), ("10.244.0.10", 8080), ("10.244.0.11", 8080))
    chains = family_chains(NAMES, 4, {A4: eps, A6: (("fd00:10:244::10", 8080),)})
    service = chains[NAMES.key(A4)]
    assert [s.rpartition("-j ")[0].strip() for s in service] == [
        "-m statistic --mode random --probability 0.3333333333",
        "-m statistic --mode random --probability 0.5000000000", ""]
    targets = [rules.target(s) for s in service]
    dnats = [chains[t][1] for t in targets]  # type: ignore[index]
    assert dnats == [f"-p tcp -m tcp -j DNAT --to-destination 10.244.0.{n}:8080" for n in (10, 11, 12)]
    assert chains[NAMES.dispatch] == [f"-d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j {NAMES.key(A4)}"]
    assert chains[NAMES.post] == ["-m mark --mark 0x20000000/0x20000000 -j MASQUERADE"]
    assert all(len(name) <= rules.MAX_CHAIN_NAME for name in chains)
    six = family_chains(NAMES, 6, {A4: eps, A6: (("fd00:10:244::10", 8080),)})
    assert "-p tcp -m tcp -j DNAT --to-destination [fd00:10:244::10]:8080" in str(six)
    assert NAMES.key(A4) not in six  # one family's keys per table


def test_nodeports_and_hairpin_are_marked_for_masquerade_and_empty_targets_render_nothing() -> None:
    np = Key(4, None, 30080)
    chains = family_chains(NAMES, 4, {np: (("10.244.0.10", 8080),), A4: ()})
    assert chains[NAMES.dispatch] == [f"-p tcp -m addrtype --dst-type LOCAL -m tcp --dport 30080 -j "
                                      f"{NAMES.key(np)}N"]
    assert chains[NAMES.key(np) + "N"] == ["-j MARK --set-xmark 0x20000000/0x20000000", f"-j {NAMES.key(np)}"]
    endpoint = chains[rules.target(chains[NAMES.key(np)][0]) or ""]
    assert endpoint[0] == "-s 10.244.0.10/32 -j MARK --set-xmark 0x20000000/0x20000000"  # hairpin
    assert family_chains(NAMES, 4, {A4: ()}) == {}
    assert Names("OTHER").prefix != NAMES.prefix  # another agent's chains are never taken for stale ones


def test_the_batch_keeps_our_jumps_before_the_redirect_and_deletes_stale_chains() -> None:
    stale = NAMES.prefix + "0123456789ABCDEF"
    saved = rules.parse_save("\n".join([
        "*nat", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]",
        f":{stale} - [0:0]", f":{NAMES.dispatch} - [0:0]", ":KUBE-SERVICES - [0:0]",
        '-A PREROUTING -m comment --comment "lightpath redirects" -j LIGHTPATH',
        f'-A PREROUTING -m comment --comment "lightpath fallback" -j {NAMES.dispatch}',  # after the redirect
        f'-A OUTPUT -m comment --comment "lightpath fallback" -j {NAMES.dispatch}',
        f"-A {NAMES.dispatch} -j {stale}", "COMMIT"]))
    chains = family_chains(NAMES, 4, {A4: (("10.244.0.10", 8080),)})
    text = batch(NAMES, saved, chains) or ""
    lines = text.splitlines()
    assert f'-D PREROUTING -m comment --comment "lightpath fallback" -j {NAMES.dispatch}' in lines
    assert f'-I PREROUTING 1 -m comment --comment "lightpath fallback" -j {NAMES.dispatch}' in lines
    assert not any(line.startswith("-D OUTPUT") or line.startswith("-I OUTPUT") for line in lines)  # fine there
    assert f'-I POSTROUTING 1 -m comment --comment "lightpath fallback" -j {NAMES.post}' in lines
    assert f":{stale} - [0:0]" in lines and lines.index(f"-X {stale}") > lines.index(f":{stale} - [0:0]")
    assert "KUBE-SERVICES" not in text  # never touches anybody else's chains
    off = batch(NAMES, saved, {}) or ""
    assert f":{NAMES.dispatch} - [0:0]" in off and f"-X {NAMES.dispatch}" in off  # flushed, then deleted
    assert "-I " not in off and "-D OUTPUT" in off and f"-X {stale}" in off
    assert batch(NAMES, rules.parse_save("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"), {}) is None  # nothing of ours


# -- real kernel -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _clean_stale_netns() -> None:
    if os.geteuid() == 0:  # root tests only; the pure ones run anywhere
        cleanup_stale("lp-iptfb")


@pytest.fixture(params=["nft", "legacy"])
def variant(request: pytest.FixtureRequest) -> Variant:
    restore = binaries(request.param, 4)[0]
    if not any(os.access(os.path.join(d, restore), os.X_OK) for d in os.environ.get("PATH", "").split(":")):
        pytest.skip(f"{restore} is not installed")
    value: Variant = request.param
    return value


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology(pods=3, prefix="lp-iptfb") as made:
        yield made


def _servers(topo: Topology) -> None:
    for i in (1, 2):
        for family in (4, 6):
            tcp_listener(topo.pods[i], 8080, family, name=f"pod{i}")


@pytest.mark.root
def test_fallback_chains_load_balance_real_connections_and_go_away(topo: Topology, variant: Variant) -> None:
    _servers(topo)
    backend = IptablesBackend(variant=variant, netns=topo.node.name)
    backend.ensure({A4, A6, Key(4, None, 30080)})  # the redirect is there (to a proxy that is down)
    fallback = IptablesFallback(backend)
    v4 = (("10.244.0.11", 8080), ("10.244.0.12", 8080))
    v6 = (("fd00:10:244::11", 8080), ("fd00:10:244::12", 8080))
    hairpin = Key(4, "10.96.0.11", 80)
    targets = {A4: v4, A6: v6, Key(4, None, 30080): v4[:1], hairpin: v4[:1]}
    assert fallback.write(fallback.render(targets)) is None
    seen = Counter(tcp_request(topo.pods[0], "10.96.0.10", 80)["server"] for _ in range(40))
    assert set(seen) == {"pod1", "pod2"}, seen  # both endpoints, picked per connection
    reply = tcp_request(topo.pods[0], "fd00:10:96::a", 80)
    assert reply["server"] in ("pod1", "pod2") and reply["peer"][0] == topo.pod_ips6[0]  # the client's address
    reply = tcp_request(topo.pods[0], topo.node_ip, 30080)
    assert reply["server"] == "pod1" and reply["peer"][0] == topo.node_ip  # NodePort: masqueraded
    reply = tcp_request(topo.pods[1], "10.96.0.11", 80)
    assert reply["server"] == "pod1" and reply["peer"][0] == topo.node_ip  # hairpin: masqueraded
    reply = tcp_request(topo.node, "10.96.0.10", 80)  # from the node itself (output hook)
    assert reply["server"] in ("pod1", "pod2")
    # Endpoints change while in fallback: one rewrite, the old endpoint's chain is gone.
    assert fallback.write(fallback.render({A4: v4[1:]})) is None
    assert {tcp_request(topo.pods[0], "10.96.0.10", 80)["server"] for _ in range(10)} == {"pod2"}
    saved = rules.parse_save(backend.save(4))
    assert len([c for c in saved.chains if fallback.names.ours(c)]) == 4  # dispatch, post, service, endpoint
    assert backend.read() == {A4, A6, Key(4, None, 30080)}  # the redirect's own rules are untouched
    fallback.cleanup()
    for family in (4, 6):
        saved = rules.parse_save(backend.save(family))
        assert not [c for c in saved.chains if fallback.names.ours(c)]
        assert not any(fallback.names.ours(rules.target(s) or "") for specs in saved.rules.values() for s in specs)
    assert backend.read() == {A4, A6, Key(4, None, 30080)}


@pytest.mark.root
def test_a_fallback_jump_pushed_below_the_redirect_is_put_back_first(topo: Topology, variant: Variant) -> None:
    _servers(topo)
    backend = IptablesBackend(variant=variant, netns=topo.node.name)
    fallback = IptablesFallback(backend)
    assert fallback.write(fallback.render({A4: (("10.244.0.11", 8080),)})) is None
    backend.ensure({A4})  # the redirect's jump was re-inserted first (e.g. repaired after a hand edit)
    before = rules.parse_save(backend.save(4)).rules["PREROUTING"]
    assert rules.target(before[0]) == "LIGHTPATH"
    assert fallback.write(fallback.render({A4: (("10.244.0.12", 8080),)})) is None
    prerouting = rules.parse_save(backend.save(4)).rules["PREROUTING"]
    assert rules.target(prerouting[0]) == fallback.names.dispatch
    assert tcp_request(topo.pods[0], "10.96.0.10", 80)["server"] == "pod2"
