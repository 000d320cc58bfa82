"""KUBE-PROXY STAND-IN, IPTABLES MODE (tests only; NOT kube-proxy): the rules kube-proxy v1.33's iptables mode
(pkg/proxy/iptables) writes for what a handover depends on, so the agent's handback -- which reads
``KUBE-SERVICES`` / ``KUBE-NODEPORTS`` from ``iptables-save`` -- is measured against the real layout:

    nat:    PREROUTING, OUTPUT -> KUBE-SERVICES ("kubernetes service portals"); POSTROUTING -> KUBE-POSTROUTING
            KUBE-SERVICES: -d <clusterIP>/32 -p tcp -m comment --comment "<ns/name:port> cluster IP"
                           -m tcp --dport <port> -j KUBE-SVC-<hash>; last: -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
            KUBE-NODEPORTS: -p tcp -m tcp --dport <nodePort> -j KUBE-SVC-<hash>
            KUBE-SVC-*: -m statistic --mode random --probability 1/n ... -j KUBE-SEP-<hash> (the last unconditional)
            KUBE-SEP-*: -s <ip>/32 -j KUBE-MARK-MASQ; -p tcp -m tcp -j DNAT --to-destination <ip>:<port>
            KUBE-MARK-MASQ / KUBE-POSTROUTING: the 0x4000 mark and MASQUERADE, as kube-proxy
    filter: INPUT, FORWARD, OUTPUT (ctstate NEW) -> KUBE-SERVICES: REJECT for a Service without endpoints

Unlike nftables mode, iptables mode does not drop traffic to unknown ClusterIPs: unNATed, it is routed to the
service device and dies there (a SYN timeout, as on a real node without a route). Every sync is one
``iptables-restore --noflush`` batch per table and family that declares (flushes) every chain of ours and
deletes the stale ones -- kube-proxy's full sync. The Service model comes from ``sandbox.kubeproxy``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable

from redirector.iptables_rules import SavedNat, parse_save
from sandbox.kubeproxy import MASQ_MARK, ServicePort
from sandbox.node.netns import NetNS

TOOLS = {4: ("iptables-restore", "iptables-save"), 6: ("ip6tables-restore", "ip6tables-save")}
FIXED_NAT = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ")
# hook -> (match, comment, target) of kube-proxy's jump into its chains
NAT_JUMPS = {"PREROUTING": ("", "kubernetes service portals", "KUBE-SERVICES"),
             "OUTPUT": ("", "kubernetes service portals", "KUBE-SERVICES"),
             "POSTROUTING": ("", "kubernetes postrouting rules", "KUBE-POSTROUTING")}
FILTER_JUMPS = {hook: ("-m conntrack --ctstate NEW ", "kubernetes service portals", "KUBE-SERVICES")
                for hook in ("INPUT", "FORWARD", "OUTPUT")}


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def _comment(text: str) -> str:
    return f'-m comment --comment "{text}"'


def nat_rules(family: int, ports: Iterable[ServicePort]) -> dict[str, list[str]]:
    """Chain -> rule specs of the nat table for one family (pure)."""
    mark = f"{MASQ_MARK:#x}/{MASQ_MARK:#x}"
    chains: dict[str, list[str]] = {
        "KUBE-SERVICES": [], "KUBE-NODEPORTS": [],
        "KUBE-POSTROUTING": [f"-m mark ! --mark {mark} -j RETURN", f"-j MARK --set-xmark {MASQ_MARK:#x}/0x0",
                             "-j MASQUERADE --random-fully"],
        "KUBE-MARK-MASQ": [f"-j MARK --set-xmark {mark}"],
    }
    plen = 32 if family == 4 else 128
    for sp in (p for p in ports if p.family == family and p.backends):
        l4 = sp.protocol.lower()
        svc = f"KUBE-SVC-{_hash(sp.ident)}"
        chains["KUBE-SERVICES"].append(f"-d {sp.cluster_ip}/{plen} -p {l4} {_comment(f'{sp} cluster IP')} "
                                       f"-m {l4} --dport {sp.port} -j {svc}")
        if sp.node_port:
            chains["KUBE-NODEPORTS"].append(f"-p {l4} {_comment(str(sp))} -m {l4} --dport {sp.node_port} -j {svc}")
        picks = []
        for i, backend in enumerate(sp.backends):
            sep = f"KUBE-SEP-{_hash(f'{sp.ident}__{backend.ip}/{backend.port}')}"
            left = len(sp.backends) - i
            odds = "" if left == 1 else f"-m statistic --mode random --probability {1 / left:.10f} "
            picks.append(f"{_comment(str(sp))} {odds}-j {sep}")
            host = backend.ip if family == 4 else f"[{backend.ip}]"
            chains[sep] = [f"-s {backend.ip}/{plen} {_comment(str(sp))} -j KUBE-MARK-MASQ",
                           f"-p {l4} {_comment(str(sp))} -m {l4} -j DNAT --to-destination {host}:{backend.port}"]
        chains[svc] = picks
    chains["KUBE-SERVICES"].append(
        f"{_comment('kubernetes service nodeports; NOTE: this must be the last rule in this chain')} "
        "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
    return chains


def filter_rules(family: int, ports: Iterable[ServicePort]) -> list[str]:
    """The filter table's KUBE-SERVICES: reject a Service port without endpoints (pure)."""
    plen = 32 if family == 4 else 128
    reject = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
    return [f"-d {sp.cluster_ip}/{plen} -p {sp.protocol.lower()} {_comment(f'{sp} has no endpoints')} "
            f"-m {sp.protocol.lower()} --dport {sp.port} -j REJECT --reject-with {reject}"
            for sp in ports if sp.family == family and not sp.backends]


def batch(table: str, chains: dict[str, list[str]], saved: SavedNat, jumps: dict[str, tuple[str, str, str]]) -> str:
    """One restore batch: declare (flush) our chains, write them, delete stale KUBE-SVC/SEP chains, add the
    hooks' jumps when missing (pure). ``saved``: that table as ``iptables-save`` printed it (parsed by
    ``redirector.iptables_rules.parse_save``, the one parser of that text)."""
    rules = saved.rules
    stale = sorted(n for n in saved.chains if n.startswith(("KUBE-SVC-", "KUBE-SEP-")) and n not in chains)
    lines = [f"*{table}", *(f":{name} - [0:0]" for name in [*chains, *stale])]
    for hook, (match, comment, target) in jumps.items():
        if not any(spec.endswith(f"-j {target}") for spec in rules.get(hook, [])):
            lines.append(f"-I {hook} 1 {match}{_comment(comment)} -j {target}")
    lines += [f"-A {name} {spec}" for name, specs in chains.items() for spec in specs]
    lines += [f"-X {name}" for name in stale]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def render(ports: list[ServicePort]) -> str:
    """What the stand-in holds (the text ``StandinSync.applied`` compares and tests read). Pure."""
    parts = []
    for family in (4, 6):
        nat = nat_rules(family, ports)
        parts.append(f"# ipv{family} nat\n" + "\n".join(f"-A {c} {s}" for c, specs in nat.items() for s in specs))
        parts.append(f"# ipv{family} filter\n" + "\n".join(f"-A KUBE-SERVICES {s}" for s in filter_rules(family, ports)))
    return "\n".join(parts) + "\n"


def apply(netns_name: str, ports: list[ServicePort]) -> None:
    """Program both families' nat and filter tables in ``netns_name`` (one restore per table and family)."""
    ns = NetNS(netns_name)
    for family, (restore, save) in TOOLS.items():
        saved = ns.run([save]).stdout
        nat = batch("nat", nat_rules(family, ports), parse_save(saved, "nat"), NAT_JUMPS)
        filt = batch("filter", {"KUBE-SERVICES": filter_rules(family, ports)}, parse_save(saved, "filter"),
                     FILTER_JUMPS)
        ns.run([restore, "--noflush", "-w", "5"], input=nat + filt)
