"""The nftables transactions as data (pure): what the backend sends, and how a listing is judged."""

from __future__ import annotations

import json

import pytest

from redirector.model import Delta, Key
from redirector.nftshape import Layout, decode, dumps, encode

KEYS = [Key(4, "10.96.0.1", 80), Key(6, "fd00:10:96::1", 443), Key(4, None, 30080), Key(6, None, 30080)]


def test_elements_round_trip_through_their_json_form() -> None:
    for key in KEYS:
        name, elem = encode(key)
        assert decode(name, elem) == key
    assert decode("svc4", {"elem": {"val": {"concat": ["10.96.0.1", 80]}, "comment": "x"}}) == KEYS[0]
    assert decode("svc4", {"prefix": {"addr": "10.0.0.0", "len": 8}}).ip == "bad"


def test_dumps_renders_the_same_document_as_plain_json() -> None:
    layout = Layout()
    commands = layout.create(KEYS, replace=True)
    doc = json.loads(dumps(commands))
    plain = json.loads(json.dumps({"nftables": commands}, default=lambda e: e.as_list()))
    assert doc == plain
    assert doc["nftables"][0] == {"delete": {"table": {"family": "inet", "name": "lightpath"}}}
    elements = {c["add"]["element"]["name"]: c["add"]["element"]["elem"] for c in doc["nftables"]
                if "element" in c.get("add", {})}
    assert elements["nodeports"] == [{"concat": ["ipv4", 30080]}, {"concat": ["ipv6", 30080]}]


def test_a_delta_deletes_before_it_adds_and_never_touches_chains() -> None:
    commands = Layout().delta_commands(Delta(add=frozenset(KEYS[:1]), delete=frozenset(KEYS[1:2])))
    assert [next(iter(c)) for c in commands] == ["delete", "add"]
    assert all("element" in next(iter(c.values())) for c in commands)
    assert Layout().delta_commands(Delta()) == []


def listing(layout: Layout, keys: list[Key]) -> list[dict[str, object]]:
    """What libnftables lists back for a table built by ``layout`` (comments on rules only, as in 1.0.6)."""
    doc = json.loads(dumps(layout.create(keys, replace=False)))
    out: list[dict[str, object]] = []
    for cmd in doc["nftables"]:
        kind, body = next(iter(cmd["add"].items()))
        if kind in ("table", "set", "chain"):
            body = {k: v for k, v in body.items() if k != "comment"}
        if kind == "element":
            for item in out:
                if "set" in item and item["set"]["name"] == body["name"]:  # type: ignore[index]
                    item["set"]["elem"] = body["elem"]  # type: ignore[index]
            continue
        out.append({kind: body})
    return out


def test_inspect_accepts_our_shape_and_reads_the_keys() -> None:
    layout = Layout(proxy_uid=1000)
    assert layout.inspect(listing(layout, KEYS)) == (True, frozenset(KEYS))


@pytest.mark.parametrize("change", ["other port", "other mark", "no uid", "extra rule", "extra set", "redirect mode",
                                    "other address"])
def test_inspect_rejects_any_other_shape(change: str) -> None:
    built = listing(Layout(proxy_uid=1000), KEYS)
    judge = Layout(proxy_uid=1000)
    if change == "other port":
        judge = Layout(proxy_uid=1000, proxy_port=1667)
    elif change == "other mark":
        judge = Layout(proxy_uid=1000, proxy_mark=0x1)
    elif change == "no uid":
        judge = Layout()
    elif change == "redirect mode":  # a mode switch replaces the table, keeping the keys
        judge = Layout(proxy_uid=1000, mode="redirect")
    elif change == "other address":
        judge = Layout(proxy_uid=1000, address6="fd00::66")
    elif change == "extra rule":
        built.append({"rule": {"chain": "output", "expr": [{"counter": None}]}})
    else:
        built.append({"set": {"name": "extra", "type": "ipv4_addr"}})
    ok, keys = judge.inspect(built)
    assert not ok and keys == frozenset(KEYS)


@pytest.mark.parametrize("kwargs", [{"table": "bad name"}, {"proxy_port": 0}, {"proxy_mark": 0},
                                    {"proxy_uid": -1}, {"mode": "tproxy"}, {"address4": "127.0.0.1"},
                                    {"address6": "::1"}, {"address6": "fe80::1"}, {"address4": "::"}])
def test_layout_validates_its_knobs(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Layout(**kwargs)  # type: ignore[arg-type]


def test_dnat_sends_each_family_to_its_own_address_and_redirect_keeps_one_nodeport_rule() -> None:
    dnat = [expr[-1] for expr, _ in Layout().rules("prerouting")[1:]]
    v4 = {"dnat": {"family": "ip", "addr": "169.254.16.66", "port": 1666}}
    v6 = {"dnat": {"family": "ip6", "addr": "fd6c:7066:1666::1", "port": 1666}}
    assert dnat == [v4, v6, v4, v6]  # ClusterIPs, then NodePorts per family
    assert [expr[0] for expr, _ in Layout().rules("output")[-2:]] == [
        {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": nfproto}} for nfproto in ("ipv4", "ipv6")]
    redirect = [expr[-1] for expr, _ in Layout(mode="redirect").rules("prerouting")[1:]]
    assert redirect == [{"redirect": {"port": 1666}}] * 3
    assert Layout(address6="FD00::0:66").address6 == "fd00::66"
