"""Our nftables table as data: the libnftables JSON commands that build it and fill it, and the check that a
table listed from the kernel has exactly that shape. Pure: the kernel I/O lives in ``redirector.nft``.

The table (``inet lightpath`` by default)::

    set svc4      { type ipv4_addr . inet_service }   # ClusterIPs, externalIPs, LB ingress IPs
    set svc6      { type ipv6_addr . inet_service }
    set nodeports { type nf_proto . inet_service }    # (ipv4|ipv6) . nodePort, any local address
    chain prerouting { type nat hook prerouting priority dstnat - 10 }   # pods -> Services
    chain output     { type nat hook output priority -110 }              # the node itself -> Services
        meta mark <proxy mark> return          # the proxy's own traffic is never redirected
        meta skuid <proxy uid> return          # (output only; when a proxy uid is configured)
        ip daddr . tcp dport @svc4 dnat ip to <address>:<proxy port>
        ip6 daddr . tcp dport @svc6 dnat ip6 to [<address6>]:<proxy port>
        meta nfproto ipv4 fib daddr type local meta nfproto . tcp dport @nodeports dnat ip to <address>:<proxy port>
        meta nfproto ipv6 fib daddr type local meta nfproto . tcp dport @nodeports dnat ip6 to [<address6>]:<proxy port>

The DNAT targets are node-local addresses of ours on lo (``redirector.localaddr``). With ``mode="redirect"``
each of those verdicts is ``redirect to :<proxy port>`` instead (and one NodePort rule serves both families):
REDIRECT rewrites to the incoming interface's primary address and drops pod traffic when that interface has
none, which is what Calico, Cilium (chaining) and the AWS VPC CNI leave on a pod's host veth. Either way
conntrack keeps the original destination for the proxy's SO_ORIGINAL_DST.

One set lookup per family: the per-packet cost does not depend on the number of Services. Both chains run
before kube-proxy's (priority dstnat = -100 on prerouting and output). NodePorts are keyed by family too,
so an IPv4-only Service does not capture IPv6 traffic to its node port.
The ``expr`` below is written exactly as libnftables 1.0 lists it back, so a listed rule compares equal.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redirector.localaddr import redirect_target
from redirector.model import Delta, Family, Key
from shared import constants as c

Command = dict[str, Any]
PRIORITY = -110  # dstnat (-100) - 10: before kube-proxy's nat chains, iptables' and nftables' alike
COMMENT = "lightpath.cloud redirector"
SET_TYPES: dict[str, list[str]] = {
    "svc4": ["ipv4_addr", "inet_service"],
    "svc6": ["ipv6_addr", "inet_service"],
    "nodeports": ["nf_proto", "inet_service"],
}
NFPROTO: dict[Family, str] = {4: "ipv4", 6: "ipv6"}
FAMILY_OF: dict[str, Family] = {"ipv4": 4, "ipv6": 6}


@dataclass(frozen=True)
class Layout:
    """The knobs that decide the table's shape."""

    table: str = "lightpath"
    proxy_port: int = 1666
    proxy_mark: int | None = 0x1666
    proxy_uid: int | None = None
    mode: str = c.DEFAULT_REDIRECT_MODE
    address4: str = c.DEFAULT_REDIRECT_ADDRESS
    address6: str = c.DEFAULT_REDIRECT_ADDRESS6

    def __post_init__(self) -> None:
        # Canonical text, so the rules compare equal to what libnftables lists back.
        address4, address6 = redirect_target(self.mode, self.address4, self.address6)
        object.__setattr__(self, "address4", address4)
        object.__setattr__(self, "address6", address6)
        if not self.table or not self.table.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"nftables table name must be alphanumeric: {self.table!r}")
        if not 0 < self.proxy_port < 65536:
            raise ValueError(f"proxy port must be 1-65535, not {self.proxy_port}")
        if self.proxy_mark is not None and not 0 < self.proxy_mark < 2**32:
            raise ValueError(f"proxy mark must be 1..2^32-1, not {self.proxy_mark}")
        if self.proxy_uid is not None and not 0 <= self.proxy_uid < 2**32:
            raise ValueError(f"proxy uid must be 0..2^32-1, not {self.proxy_uid}")

    @property
    def table_ref(self) -> dict[str, str]:
        return {"family": "inet", "name": self.table}

    def chains(self) -> dict[str, dict[str, Any]]:
        """Chain name -> its attributes as listed back."""
        base = {"type": "nat", "prio": PRIORITY, "policy": "accept"}
        return {"prerouting": {**base, "hook": "prerouting"}, "output": {**base, "hook": "output"}}

    def rules(self, chain: str) -> list[tuple[list[Any], str]]:
        """The (expr, comment) of each rule of ``chain``, in order."""
        rules: list[tuple[list[Any], str]] = []
        if self.proxy_mark is not None:
            rules.append(([_match({"meta": {"key": "mark"}}, self.proxy_mark), {"return": None}],
                          f"{COMMENT}: traffic marked by the proxy is never redirected"))
        if chain == "output" and self.proxy_uid is not None:
            rules.append(([_match({"meta": {"key": "skuid"}}, self.proxy_uid), {"return": None}],
                          f"{COMMENT}: traffic of the proxy's user is never redirected"))
        tcp_dport = {"payload": {"protocol": "tcp", "field": "dport"}}
        for proto, set_name, what in (("ip", "svc4", "IPv4"), ("ip6", "svc6", "IPv6")):
            daddr = {"payload": {"protocol": proto, "field": "daddr"}}
            rules.append(([_match({"concat": [daddr, tcp_dport]}, f"@{set_name}"), self.verdict(proto)],
                          f"{COMMENT}: {what} Service addresses to the local proxy"))
        fib_local = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
        nodeports = _match({"concat": [{"meta": {"key": "nfproto"}}, tcp_dport]}, "@nodeports")
        comment = f"{COMMENT}: NodePorts on the node's own addresses to the local proxy"
        if self.mode == "redirect":
            rules.append(([fib_local, nodeports, self.verdict("ip")], comment))
        else:  # one rule per family: the DNAT target is an address of that family
            for proto, nfproto in (("ip", "ipv4"), ("ip6", "ipv6")):
                rules.append(([_match({"meta": {"key": "nfproto"}}, nfproto), fib_local, nodeports,
                               self.verdict(proto)], comment))
        return rules

    def verdict(self, proto: str) -> dict[str, Any]:
        """The statement sending a packet of ``proto`` ("ip"/"ip6") to the proxy, as libnftables lists it."""
        if self.mode == "redirect":
            return {"redirect": {"port": self.proxy_port}}
        return {"dnat": {"family": proto, "addr": self.address4 if proto == "ip" else self.address6,
                         "port": self.proxy_port}}

    def addresses(self) -> list[tuple[Family, str]]:
        """The DNAT targets (kept on lo by the backend in "dnat" mode, removed by its cleanup in either)."""
        return [(4, self.address4), (6, self.address6)]

    # -- transactions ---------------------------------------------------------------------------------

    def skeleton(self) -> list[Command]:
        """Commands creating the (empty) table, its sets, chains and rules, each with a comment. Debian 12's
        libnftables 1.0.6 keeps only the rules' ones: its JSON parser drops table, set and chain comments
        (checked with ``nft list table``; nft syntax keeps them, but parses 20,000 elements ~7 % slower and would
        need a second rendering of the rules, so the comments wait for a newer libnftables)."""
        t = {"family": "inet", "table": self.table}
        cmds: list[Command] = [{"add": {"table": {**self.table_ref, "comment": f"{COMMENT}: Service redirects"}}}]
        for name, set_type in SET_TYPES.items():
            cmds.append({"add": {"set": {**t, "name": name, "type": set_type,
                                         "comment": f"{COMMENT}: {name} redirect keys"}}})
        for name, attrs in self.chains().items():
            cmds.append({"add": {"chain": {**t, "name": name, **attrs, "comment": f"{COMMENT}: {name}"}}})
        for name in self.chains():
            for expr, comment in self.rules(name):
                cmds.append({"add": {"rule": {**t, "chain": name, "expr": expr, "comment": comment}}})
        return cmds

    def create(self, keys: Iterable[Key], *, replace: bool) -> list[Command]:
        """One transaction: (delete the old table,) build ours and fill it."""
        head: list[Command] = [{"delete": {"table": self.table_ref}}] if replace else []
        return head + self.skeleton() + self.element_commands("add", keys)

    def delta_commands(self, delta: Delta) -> list[Command]:
        """One transaction: delete then add elements (never touches the chains: no flush)."""
        return self.element_commands("delete", delta.delete) + self.element_commands("add", delta.add)

    def element_commands(self, verb: str, keys: Iterable[Key]) -> list[Command]:
        by_set: dict[str, list[Key]] = {"nodeports": [], "svc4": [], "svc6": []}
        for key in keys:
            by_set["nodeports" if key.ip is None else "svc4" if key.family == 4 else "svc6"].append(key)
        return [{verb: {"element": {"family": "inet", "table": self.table, "name": name, "elem": Elements(elems)}}}
                for name, elems in by_set.items() if elems]

    # -- reading back ---------------------------------------------------------------------------------

    def inspect(self, listing: Iterable[Mapping[str, Any]]) -> tuple[bool, frozenset[Key]]:
        """From a ``list table`` answer: (does the table have exactly our shape?, the keys in our sets)."""
        sets: dict[str, list[str]] = {}
        chains: dict[str, dict[str, Any]] = {}
        rules: dict[str, list[tuple[Any, Any]]] = {}
        keys: set[Key] = set()
        for item in listing:
            if "set" in item:
                s = item["set"]
                set_type = s.get("type")
                sets[s["name"]] = set_type if isinstance(set_type, list) else [set_type]
                if s["name"] in SET_TYPES and sets[s["name"]] == SET_TYPES[s["name"]] and not s.get("flags"):
                    keys.update(decode(s["name"], e) for e in s.get("elem", ()))
                elif s.get("flags") or s.get("map"):
                    sets[s["name"]] = [*sets[s["name"]], "unexpected flags"]
            elif "map" in item:
                sets[item["map"]["name"]] = ["map"]
            elif "chain" in item:
                c = item["chain"]
                chains[c["name"]] = {k: c.get(k) for k in ("type", "hook", "prio", "policy")}
            elif "rule" in item:
                r = item["rule"]
                rules.setdefault(r["chain"], []).append((r.get("expr"), r.get("comment")))
        want_rules = {name: [(expr, comment) for expr, comment in self.rules(name)] for name in self.chains()}
        shape_ok = sets == SET_TYPES and chains == self.chains() and rules == want_rules
        keys.discard(_BAD)
        return shape_ok, frozenset(keys)


_BAD = Key(4, "bad", 0)


_ELEMENT = '{"concat":["%s",%d]}'


class Elements:
    """The keys of one element command (of one set). Serialized by ``dumps`` straight to JSON text: building 20,000
    element dicts and walking them in ``json.dumps`` costs more than libnftables' own parsing."""

    __slots__ = ("keys",)

    def __init__(self, keys: list[Key]) -> None:
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def json_text(self) -> str:
        # One set's keys: all NodePorts or none. IPs are canonical literals (digits, a-f, '.', ':'): nothing to
        # escape. %d renders a port as a number even if it came as a bool, as int() did.
        if self.keys and self.keys[0].ip is None:
            return "[" + ",".join([_ELEMENT % (NFPROTO[family], port) for family, _, port in self.keys]) + "]"
        return "[" + ",".join([_ELEMENT % (ip, port) for _, ip, port in self.keys]) + "]"

    def as_list(self) -> list[Any]:
        return [encode(key)[1] for key in self.keys]


def dumps(commands: list[Command]) -> str:
    """The ``{"nftables": [...]}`` document as JSON text, element lists rendered directly."""
    rendered: list[str] = []

    def placeholder(obj: object) -> str:
        if isinstance(obj, Elements):
            rendered.append(obj.json_text())
            return f"\x00elements{len(rendered) - 1}\x00"
        raise TypeError(f"cannot serialize {type(obj).__name__}")

    text = json.dumps({"nftables": commands}, default=placeholder, separators=(",", ":"))
    for i, elems in enumerate(rendered):
        text = text.replace(f'"\\u0000elements{i}\\u0000"', elems, 1)
    return text


def encode(key: Key) -> tuple[str, Any]:
    """A Key as (set name, JSON element)."""
    if key.ip is None:
        return "nodeports", {"concat": [NFPROTO[key.family], key.port]}
    return ("svc4" if key.family == 4 else "svc6"), {"concat": [key.ip, key.port]}


def decode(set_name: str, elem: Any) -> Key:
    """A listed JSON element of one of our sets back to a Key (a foreign shape decodes to a marker)."""
    if isinstance(elem, dict) and "elem" in elem:  # an element with a comment/timeout is wrapped
        elem = elem["elem"].get("val")
    parts = elem.get("concat") if isinstance(elem, dict) else None
    if not isinstance(parts, list) or len(parts) != 2 or not isinstance(parts[1], int):
        return _BAD
    first, port = parts
    if set_name == "nodeports":
        family = FAMILY_OF.get(first) if isinstance(first, str) else None
        return Key(family, None, port) if family else _BAD
    return Key(4 if set_name == "svc4" else 6, str(first), port)


def _match(left: Any, right: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}
