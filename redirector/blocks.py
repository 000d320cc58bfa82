"""The kernel's own answer for migrated Services that have nowhere to send a new connection.

kube-proxy rejects a Service with no endpoints (the client gets "connection refused" at once; the upstream
e2e test "should be rejected when no endpoints exist") and drops traffic for a Local traffic policy with no
endpoint on this node. A labelled Service is served by nobody but us, and Envoy can only accept and then
close; so the agent keeps a small table of its own, ``inet <table>-block``, whose filter chains run before
every NAT (priority -120: before our redirect at -110 and kube-proxy's DNAT at -100) and answer those keys
in the kernel: ``reject with tcp reset`` or ``drop``, for new connections only. The control plane decides
which keys (``ServiceResources.blocked``, labelled Services only); this module only writes the kernel, in
one atomic transaction per change. The table is absent whenever nothing is blocked. Both backends: with the
iptables backend the same table hooks before iptables' NAT (legacy or nft) and after it where it must.

The same table does kube-proxy's ``cluster-ips-check`` for the ClusterIPs of labelled Services, which
kube-proxy no longer knows (it would DROP their traffic as "unallocated"): a new connection still addressed
to such a ClusterIP AFTER every DNAT (our redirect took the exposed ports) is for a port or protocol the
Service does not expose, and is rejected (``reject``: ICMP port unreachable, "connection refused"), as
kube-proxy rejects invalid ports of the ClusterIPs it serves. Post-DNAT means the forward hook and the
output hook at priority -95 (after our -110 and kube-proxy's -100); the forward chain runs at -115, before
kube-proxy's drop at -110. Exposed ports whose redirect is not installed yet (Envoy has not ACKed) are
exempt: their traffic is dropped by kube-proxy and retried by the client, not refused.

With ``--preserve-source-ip`` the table also sends the external keys of externalTrafficPolicy Local
Services to the proxy's TRANSPARENT listener (a nat chain at priority -112: after the kernel fallback's -115,
before our redirect's -110, and the first DNAT wins), but only the keys Envoy serves there -- any other key
falls through to the ordinary redirect -- and copies the proxy's socket mark into conntrack, marks the
replies of those connections with the reply mark, which ``redirector.transparent`` routes to the proxy
(docs/conformance.md row 6).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from redirector.localaddr import redirect_target
from redirector.model import Key
from redirector.transparent import ReplyRoute
from shared import constants as c

log = logging.getLogger(__name__)
PRIORITY = -120
CHECK_FORWARD_PRIORITY = -115  # before kube-proxy's filter-forward (-110), which would drop
CHECK_OUTPUT_PRIORITY = -95  # after every output DNAT (ours -110, kube-proxy's -100)
TRANSPARENT_PRIORITY = -112  # after the kernel fallback (-115), before our redirect (-110)
MARK_PRIORITY = -150  # mangle: the conntrack mark is copied before anything routes the packet
ROUTE_CHECK_S = 30.0  # the reply route is read back at most this often (the control plane redelivers every 30 s)


Sets = dict[str, frozenset[str]]  # set name -> its elements as nft prints them
_FAMILIES = ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr"))
_VERDICTS = (("reject", "reject with tcp reset"), ("drop", "drop"))


def _types() -> dict[str, str]:
    """Every set of the table and its nft type, in script order."""
    types: dict[str, str] = {}
    for verdict, _ in _VERDICTS:
        for family, _ipf, addr in _FAMILIES:
            types[f"{verdict}{family}"] = f"{addr} . inet_service"
            types[f"{verdict}{family}np"] = "inet_service"
    for family, _ipf, addr in _FAMILIES:
        types[f"clusterips{family}"] = addr
        types[f"exposed{family}"] = f"{addr} . inet_proto . inet_service"
        types[f"firewall{family}"] = f"{addr} . inet_service"
        types[f"allowed{family}"] = f"{addr} . inet_service . {addr}; flags interval"
    for family, _ipf, addr in _FAMILIES:
        types[f"transparent{family}"] = f"{addr} . inet_service"
        types[f"transparent{family}np"] = "inet_service"
        types[f"hairpin{family}"] = f"{addr} . {addr} . inet_service"  # endpoint . key address . port
        types[f"hairpin{family}np"] = f"{addr} . inet_service"  # endpoint . node port
        types[f"localpods{family}"] = f"{addr}; flags interval"
    return types


TYPES = _types()


class Answers(NamedTuple):
    """Everything the table answers for: keys without endpoints (verdict), the labelled Services' ClusterIP
    keys (the rest of their ClusterIPs is rejected), the load balancers' source ranges and the keys sent to
    the transparent listener (with the addresses of their endpoints, whose own connections to them, hairpin,
    keep the ordinary listener)."""

    blocked: Mapping[Key, str] = {}
    exposed: frozenset[Key] = frozenset()
    firewall: Mapping[Key, tuple[str, ...]] = {}
    transparent: Mapping[Key, tuple[str, ...]] = {}
    # Sources that keep the ordinary listener whatever the key: this node's pod CIDRs (NodeInfo.pod_cidrs).
    local_sources: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.blocked or self.exposed or self.firewall or self.transparent)


@dataclass(frozen=True)
class Transparent:
    """Where the transparent listener is (the redirect's own target addresses, another port) and the mark
    its upstream sockets carry."""

    port: int = c.DEFAULT_TRANSPARENT_PORT
    mark: int = c.DEFAULT_PROXY_MARK
    mode: str = c.DEFAULT_REDIRECT_MODE
    address4: str = c.DEFAULT_REDIRECT_ADDRESS
    address6: str = c.DEFAULT_REDIRECT_ADDRESS6
    reply_mark: int = c.TRANSPARENT_REPLY_MARK

    def __post_init__(self) -> None:
        if self.mark & self.reply_mark == self.reply_mark:  # the reply rule is fwmark <reply>/<reply>
            raise ValueError("the proxy mark must not hold every bit of the reply mark (the proxy's own packets "
                             "would match the reply route)")
        address4, address6 = redirect_target(self.mode, self.address4, self.address6)
        object.__setattr__(self, "address4", address4)
        object.__setattr__(self, "address6", address6)

    def verdict(self, family: int) -> str:
        if self.mode == "redirect":
            return f"redirect to :{self.port}"
        return f"dnat ip to {self.address4}:{self.port}" if family == 4 else f"dnat ip6 to [{self.address6}]:{self.port}"


def desired_sets(answers: Answers) -> Sets:
    """What each set must hold for ``answers`` (pure)."""
    out: dict[str, set[str]] = {name: set() for name in TYPES}
    for key, verdict in answers.blocked.items():
        if key.ip is None:
            out[f"{verdict}{key.family}np"].add(str(key.port))
        else:
            out[f"{verdict}{key.family}"].add(f"{key.ip} . {key.port}")
    for key in answers.exposed:
        if key.ip is not None:
            out[f"clusterips{key.family}"].add(str(key.ip))
            out[f"exposed{key.family}"].add(f"{key.ip} . tcp . {key.port}")
    for key, ranges in answers.firewall.items():
        if key.ip is not None:
            out[f"firewall{key.family}"].add(f"{key.ip} . {key.port}")
            out[f"allowed{key.family}"].update(f"{key.ip} . {key.port} . {cidr}" for cidr in ranges)
    for key, endpoints in answers.transparent.items():
        if key.ip is None:
            out[f"transparent{key.family}np"].add(str(key.port))
            out[f"hairpin{key.family}np"].update(f"{ip} . {key.port}" for ip in endpoints)
        else:
            out[f"transparent{key.family}"].add(f"{key.ip} . {key.port}")
            out[f"hairpin{key.family}"].update(f"{ip} . {key.ip} . {key.port}" for ip in endpoints)
    for cidr in answers.local_sources:
        out[f"localpods{6 if ':' in cidr else 4}"].add(cidr)
    return {name: frozenset(items) for name, items in out.items()}


def _listed(items: Collection[str]) -> str:
    return ", ".join(sorted(items))


def full_script(table: str, sets: Sets, transparent: Transparent | None = None) -> str:
    """The whole table for ``sets`` in one transaction that first deletes whatever is there; only the
    deletion when every set is empty (the table is absent whenever nothing needs an answer) -- unless the
    transparent listener is on (``transparent``): its chains stay, empty sets or not, so the replies of
    connections it already carries keep finding their way back while no key is sent to it for a moment
    (an Envoy rollout or reconnect, a policy change)."""
    head = f"add table inet {table}\ndelete table inet {table}\n"
    if not any(sets.values()) and transparent is None:
        return head
    lines = [f"\tset {name} {{ type {kind};" + (f" elements = {{ {_listed(sets[name])} }};" if sets.get(name) else "")
             + " }" for name, kind in TYPES.items()]
    rules: list[str] = []
    checks: list[str] = []
    for family, ipf, _addr in _FAMILIES:  # loadBalancerSourceRanges first, as kube-proxy's pre-DNAT check
        rules.append(f"ct state new {ipf} daddr . tcp dport @firewall{family} "
                     f"{ipf} daddr . tcp dport . {ipf} saddr != @allowed{family} drop")
    for verdict, action in _VERDICTS:
        for family, ipf, _addr in _FAMILIES:
            name = f"{verdict}{family}"
            rules.append(f"ct state new {ipf} daddr . tcp dport @{name} {action}")
            nfproto = "ipv4" if family == 4 else "ipv6"
            rules.append(f"ct state new fib daddr type local meta nfproto {nfproto} tcp dport @{name}np {action}")
    for family, ipf, _addr in _FAMILIES:
        checks.append(f"ct state new {ipf} daddr @clusterips{family} {ipf} daddr . meta l4proto . th dport "
                      f"!= @exposed{family} reject")
    chains = [f"\tchain {hook} {{\n\t\ttype filter hook {hook} priority {PRIORITY}; policy accept;\n"
              + "".join(f"\t\t{r}\n" for r in rules) + "\t}" for hook in ("prerouting", "output")]
    chains += [f"\tchain {name} {{\n\t\ttype filter hook {hook} priority {prio}; policy accept;\n"
               + "".join(f"\t\t{r}\n" for r in checks) + "\t}"
               for name, hook, prio in (("forward-check", "forward", CHECK_FORWARD_PRIORITY),
                                        ("output-check", "output", CHECK_OUTPUT_PRIORITY))]
    if transparent is not None:
        dnat = []
        for family, ipf, _addr in _FAMILIES:  # first this node's pods, and an endpoint dialling its own Service
            dnat.append(f"{ipf} saddr @localpods{family} return")
            dnat.append(f"{ipf} saddr . {ipf} daddr . tcp dport @hairpin{family} return")
            dnat.append(f"{ipf} saddr . tcp dport @hairpin{family}np return")
        for family, ipf, _addr in _FAMILIES:
            nfproto = "ipv4" if family == 4 else "ipv6"
            dnat.append(f"{ipf} daddr . tcp dport @transparent{family} {transparent.verdict(family)}")
            dnat.append(f"fib daddr type local meta nfproto {nfproto} tcp dport @transparent{family}np "
                        f"{transparent.verdict(family)}")
        mark, reply = f"0x{transparent.mark:x}", f"0x{transparent.reply_mark:x}"
        chains.append("\tchain transparent {\n\t\ttype nat hook prerouting priority "
                      f"{TRANSPARENT_PRIORITY}; policy accept;\n" + "".join(f"\t\t{r}\n" for r in dnat) + "\t}")
        chains.append("\tchain transparent-save {\n\t\ttype filter hook output priority "
                      f"{MARK_PRIORITY}; policy accept;\n\t\tct direction original meta mark {mark} ct mark set ct mark | {mark}\n\t}}")
        chains.append("\tchain transparent-restore {\n\t\ttype filter hook prerouting priority "
                      f"{MARK_PRIORITY}; policy accept;\n\t\tct direction reply ct mark & {mark} == {mark} meta mark set meta mark | {reply}\n\t}}")
        # A host-network endpoint's replies start on this node: a route chain, so the new mark re-routes them.
        chains.append("\tchain transparent-restore-local {\n\t\ttype route hook output priority "
                      f"{MARK_PRIORITY}; policy accept;\n\t\tct direction reply ct mark & {mark} == {mark} meta mark set meta mark | {reply}\n\t}}")
    return head + f"table inet {table} {{\n" + "\n".join(lines + chains) + "\n}\n"


Changes = dict[str, tuple[set[Any], set[Any]]]  # set name -> (elements to delete, elements to add), JSON form
IpCounts = dict[tuple[int, str], int]  # (family, ClusterIP) -> how many exposed keys it has


def ip_counts(exposed: Collection[Key]) -> IpCounts:
    counts: IpCounts = {}
    for key in exposed:
        if key.ip is not None:
            counts[(key.family, key.ip)] = counts.get((key.family, key.ip), 0) + 1
    return counts


def changes(old: Answers, new: Answers, counts: IpCounts) -> tuple[Changes, IpCounts]:
    """The element changes from ``old`` to ``new`` (``counts`` is ``ip_counts(old.exposed)``), and new's
    counts. Only the changed keys are visited: a Service's change costs what it changes, not 20,000 elements
    formatted and compared (pure). Elements in libnftables' JSON form (hashable: tuples stand for
    concatenations, ``("prefix", net, len)`` for a CIDR)."""
    out: Changes = {}

    def put(name: str, element: Any, add: bool) -> None:
        out.setdefault(name, (set(), set()))[1 if add else 0].add(element)

    old_blocked, new_blocked = dict(old.blocked), dict(new.blocked)
    for add, items in ((False, old_blocked.items() - new_blocked.items()), (True, new_blocked.items() - old_blocked.items())):
        for key, verdict in items:
            if key.ip is None:
                put(f"{verdict}{key.family}np", key.port, add)
            else:
                put(f"{verdict}{key.family}", (str(key.ip), key.port), add)
    was, now = old.exposed, new.exposed
    counts = dict(counts)
    for add, keys in ((False, was - now), (True, now - was)):
        for key in keys:
            if key.ip is None:
                continue
            put(f"exposed{key.family}", (key.ip, "tcp", key.port), add)
            ip = (key.family, key.ip)
            before = counts.get(ip, 0)
            counts[ip] = before + (1 if add else -1)
            if counts[ip] <= 0:
                del counts[ip]
                put(f"clusterips{key.family}", key.ip, False)
            elif add and before == 0:
                put(f"clusterips{key.family}", key.ip, True)
    old_fw, new_fw = dict(old.firewall), dict(new.firewall)
    for add, fw_items in ((False, old_fw.items() - new_fw.items()), (True, new_fw.items() - old_fw.items())):
        for key, ranges in fw_items:
            if key.ip is None:
                continue
            put(f"firewall{key.family}", (key.ip, key.port), add)
            for cidr in ranges:
                net, _, length = cidr.partition("/")
                put(f"allowed{key.family}", (key.ip, key.port, ("prefix", net, int(length))), add)
    old_t, new_t = dict(old.transparent), dict(new.transparent)
    for add, t_items in ((False, old_t.items() - new_t.items()), (True, new_t.items() - old_t.items())):
        for key, endpoints in t_items:
            if key.ip is None:
                put(f"transparent{key.family}np", key.port, add)
                for endpoint in endpoints:
                    put(f"hairpin{key.family}np", (endpoint, key.port), add)
            else:
                put(f"transparent{key.family}", (key.ip, key.port), add)
                for endpoint in endpoints:
                    put(f"hairpin{key.family}", (endpoint, key.ip, key.port), add)
    for add, cidrs in ((False, set(old.local_sources) - set(new.local_sources)),
                       (True, set(new.local_sources) - set(old.local_sources))):
        for cidr in cidrs:
            net, _, length = cidr.partition("/")
            put(f"localpods{6 if ':' in cidr else 4}", ("prefix", net, int(length)), add)
    # An element deleted and added in the same change (a ClusterIP whose last port went and whose new port
    # came; a range kept while another changed) stays.
    for deleted, added in out.values():
        both = deleted & added
        deleted -= both
        added -= both
    return {name: (d, a) for name, (d, a) in out.items() if d or a}, counts


def changes_json(table: str, delta: Changes) -> dict[str, Any]:
    """``delta`` as one libnftables JSON transaction: deletions first, so a key that moves from one verdict
    to another never holds both."""
    def elem(item: Any) -> Any:
        if isinstance(item, tuple) and item[0] == "prefix":
            return {"prefix": {"addr": item[1], "len": item[2]}}
        return {"concat": [elem(part) for part in item]} if isinstance(item, tuple) else item

    def ref(name: str, items: set[Any]) -> dict[str, Any]:
        return {"element": {"family": "inet", "table": table, "name": name, "elem": [elem(i) for i in sorted(items, key=str)]}}

    commands = [{"delete": ref(name, d)} for name, (d, _a) in delta.items() if d]
    commands += [{"add": ref(name, a)} for name, (_d, a) in delta.items() if a]
    return {"nftables": commands}


def blocks_script(table: str, blocked: Mapping[Key, str], exposed: Collection[Key] = (),
                  firewall: Mapping[Key, tuple[str, ...]] | None = None,
                  transparent: Mapping[Key, tuple[str, ...]] | None = None, target: Transparent | None = None) -> str:
    """The nft script that makes the kernel hold exactly these answers from any state (pure). Deletes the
    table when there are none."""
    answers = Answers(blocked, frozenset(exposed), firewall or {}, transparent or {})
    return full_script(table, desired_sets(answers), target)


class KernelBlocks:
    """Writes the table with libnftables in the agent's network namespace when it changes: element changes
    while the table is there, the whole table (atomically) when it is not, when its state is unknown (first
    apply after a start: a previous agent's table stays until then) or when a change failed (e.g. someone
    deleted the table)."""

    def __init__(self, table: str, transparent: Transparent | None = None) -> None:
        """``transparent``: the transparent listener (``--preserve-source-ip``); None: its keys are ignored."""
        import nftables  # type: ignore[import-untyped,unused-ignore]  # Debian python3-nftables

        self.table = table
        self.transparent = transparent
        self.reply_route = ReplyRoute(transparent.reply_mark) if transparent is not None else None
        self._routed = False  # reply_route ensured by us (and not removed since)
        self._nft: Any = nftables.Nftables()  # whole-table writes (text)
        # Element changes (JSON input), on a context of their own: a whole-table write leaves its 20,000
        # elements in its context's cache, which the next command there throws away first (~30 ms).
        self._json: Any = nftables.Nftables()
        self._json.set_json_output(True)  # libnftables 1.0 parses its input as JSON when this is on
        self._lock = threading.Lock()
        self.answers = Answers()
        self._counts: IpCounts = {}
        self.present: bool | None = None  # is the table in the kernel as we last wrote it? None: unknown
        self.errors = 0
        self.rewrites = 0  # whole-table writes (the rest are element changes)
        self.drift = 0  # our reply route found missing and put back
        self._route_checked = 0.0  # when the reply route was last read back (at most every ROUTE_CHECK_S)

    def apply(self, blocked: Mapping[Key, str], exposed: Collection[Key] = frozenset(),
              firewall: Mapping[Key, tuple[str, ...]] | None = None,
              transparent: Mapping[Key, tuple[str, ...]] | None = None, local_sources: tuple[str, ...] = ()) -> None:
        self.apply_answers(Answers(blocked, frozenset(exposed), firewall or {}, transparent or {}, local_sources))

    def apply_answers(self, wanted: Answers) -> None:
        """Make the table hold ``wanted`` (the control plane's ``on_blocked``; also delivered unchanged every
        30 s, when the reply route is checked: someone flushing `ip rule` would cut every transparent
        connection's replies)."""
        with self._lock:
            now = time.monotonic()
            if self._routed and self.reply_route is not None and now - self._route_checked >= ROUTE_CHECK_S:
                self._route_checked = now
                if not self._route_present():
                    log.warning("the transparent listener's reply route was removed under us: adding it again")
                    self.drift += 1
                    self._routed = False
            overlay = dict(wanted.transparent) if self.transparent is not None else {}
            if self.transparent is not None and not self._routed:  # from the first write on, kept (see _route)
                self._route()
                overlay = overlay if self._routed else {}
            answers = Answers(dict(wanted.blocked), frozenset(wanted.exposed), dict(wanted.firewall), overlay,
                              tuple(sorted(wanted.local_sources)) if overlay else ())
            if self.present is not None and answers == self.answers:
                return
            rc, err = 1, ""
            counts: IpCounts | None = None
            if self.present and (answers or self.transparent is not None):
                delta, counts = changes(self.answers, answers, self._counts)
                rc, _out, err = self._json.cmd(json.dumps(changes_json(self.table, delta))) if delta else (0, "", "")
            if rc != 0:
                self.rewrites += 1
                rc, _out, err = self._nft.cmd(full_script(self.table, desired_sets(answers), self.transparent))
            if rc != 0:
                self.errors += 1
                self.present = None
                log.error("could not program the kernel's answers for Services without endpoints",
                          extra={"table": self.table, "error": str(err)[:500]})
                return
            changed = answers.blocked != self.answers.blocked
            if answers.transparent != self.answers.transparent:
                log.info("keys sent to the transparent listener (client source addresses kept)",
                         extra={"keys": len(answers.transparent)})
            self.answers, self.present = answers, bool(answers) or self.transparent is not None
            self._counts = counts if counts is not None else ip_counts(answers.exposed)
            if changed:
                log.info("kernel answers for Services without endpoints", extra={
                    "reject": sum(v == "reject" for v in answers.blocked.values()),
                    "drop": sum(v == "drop" for v in answers.blocked.values())})

    @property
    def applied(self) -> Mapping[Key, str]:
        return self.answers.blocked

    def _route(self) -> None:
        """Under ``_lock``: the reply route before the first key goes to the transparent listener (without
        it those connections' replies would never reach Envoy); on failure the keys stay on the ordinary
        redirect (logged, counted, tried again at the next write). Kept while the agent runs with the
        transparent listener, like the mark chains: only replies the table marks use it, and removing it
        under connections still open would cut them. ``cleanup`` removes it."""
        assert self.reply_route is not None
        try:
            self.reply_route.ensure()
            self._routed = True
        except Exception as exc:  # noqa: BLE001 - a BackendError, or pyroute2 missing: keep the ordinary path
            self.errors += 1
            log.error("could not route the transparent listener's replies: client source addresses are not kept",
                      extra={"error": str(exc)[:500]})

    def _route_present(self) -> bool:
        assert self.reply_route is not None
        try:
            return self.reply_route.present()
        except Exception as exc:  # noqa: BLE001 - unreadable: keep what we believe, say why
            log.warning("could not read the transparent listener's reply route", extra={"error": str(exc)[:300]})
            return True

    def _unroute(self) -> None:
        assert self.reply_route is not None
        try:
            self.reply_route.remove()
            self._routed = False
        except Exception as exc:  # noqa: BLE001 - harmless left behind: only marked replies use it
            log.warning("could not remove the transparent listener's reply route", extra={"error": str(exc)[:500]})

    def cleanup(self) -> None:
        """Remove the table and the reply route (a previous agent's, too)."""
        transparent, self.transparent = self.transparent, None  # a plain deletion: no chains kept
        self.present = None
        self.apply({})
        self.transparent = transparent
        if self.reply_route is not None:
            with self._lock:
                self._unroute()
