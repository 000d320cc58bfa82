"""Why the iptables backend writes with iptables-restore, not python-iptables (iptc): measured, not assumed.

Run as root: ``.venv/bin/python -m bench.iptables_writer_bench [--rules 1000] [--json out.json]``.
Every scenario runs in a fresh network namespace (sandbox.node.netns), inside a forked child that
entered it, so in-process iptc and the restore binaries act on the same tables. Prints markdown.

Measures:
1. Writing N REDIRECT rules: iptc with one commit per rule, iptc with one commit, one
   iptables-legacy-restore batch, one iptables-nft-restore batch.
2. Visibility: after iptc wrote N rules, how many rules iptables-legacy-save and iptables-nft-save see.
3. IptablesBackend per variant at 10 / 1,000 / 10,000 entries: first ensure (full write), no-op ensure
   (save + compare), read(), apply() of one change (a patch batch: one ``-A`` or ``-D``), and the same
   change as a full chain rewrite (what kube-proxy does) for comparison.
4. Connect latency through the redirect to the LAST rule at 10 vs 10,000 entries (linear rule walk).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from redirector import iptables_rules as rules
from redirector.iptables import IptablesBackend, Variant
from redirector.model import Delta, Key
from sandbox.node.netns import Topology, run_in_netns

BASE4 = int(ipaddress.ip_address("10.96.0.1"))


def keys4(n: int) -> list[Key]:
    return [Key(4, str(ipaddress.ip_address(BASE4 + i)), 80) for i in range(n)]


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _iptc_write(n: int, per_rule_commit: bool) -> dict[str, Any]:
    """In the netns: write n REDIRECT rules into a fresh chain with python-iptables (legacy tables)."""
    import iptc  # python-iptables: libiptc, i.e. the legacy x_tables interface only

    table = iptc.Table(iptc.Table.NAT)
    table.autocommit = per_rule_commit
    chain = table.create_chain("LIGHTPATH")

    def write() -> None:
        for key in keys4(n):
            rule = iptc.Rule()
            rule.dst = f"{key.ip}/32"
            rule.protocol = "tcp"
            rule.create_match("tcp").dport = str(key.port)
            rule.create_target("REDIRECT").to_ports = "1666"
            chain.append_rule(rule)
        if not per_rule_commit:
            table.commit()

    seconds = timed(write)
    seen = {}
    for variant in ("legacy", "nft"):
        out = subprocess.run([f"iptables-{variant}-save", "-t", "nat"], capture_output=True, text=True).stdout
        seen[variant] = len(rules.parse_save(out).rules.get("LIGHTPATH", []))
    return {"seconds": seconds, "seen_by": seen}


def _restore_write(n: int, variant: Variant) -> float:
    cfg = rules.RuleConfig(proxy_mark=None)
    batch = rules.render_batch(rules.chain_rules(cfg, rules.redirect_specs(cfg, keys4(n), {}).values()))
    argv = [f"iptables-{variant}-restore", "--noflush", "-w", "5"]
    return timed(lambda: subprocess.run(argv, input=batch, text=True, check=True))


def _backend_costs(n: int, variant: Variant, repeat: int = 5) -> dict[str, float]:
    """Median of ``repeat`` runs of each operation (the first ensure runs once: it is the full load)."""
    backend = IptablesBackend(variant=variant, families=(4,))
    keys = keys4(n)
    extra = Key(4, "10.96.255.254", 80)
    out = {"ensure_full": timed(lambda: backend.ensure(keys))}

    def median(fn: Callable[[], Any]) -> float:
        return statistics.median(timed(fn) for _ in range(repeat))

    out["ensure_noop"] = median(lambda: backend.ensure(keys))
    out["read"] = median(backend.read)
    flip = iter([Delta(add=frozenset({extra})), Delta(delete=frozenset({extra}))] * repeat)
    out["apply_one_patch"] = median(lambda: backend.apply(next(flip)))
    full = rules.render_batch(rules.chain_rules(backend.cfg, rules.redirect_specs(backend.cfg, [*keys, extra], {}).values()))
    out["apply_one_rewrite"] = median(lambda: backend.restore_batch(4, full))
    return out


def _connect_latency(n: int, variant: Variant, samples: int) -> dict[str, float]:
    """Median/p99 connect() time to the last of n redirected ClusterIPs (output path, loopback proxy)."""
    IptablesBackend(variant=variant, families=(4,)).ensure(keys4(n))
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 1666))
    server.listen(512)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    last = keys4(n)[-1]
    assert last.ip is not None
    times = []
    for _ in range(samples):
        with socket.socket() as sock:
            start = time.perf_counter()
            sock.connect((last.ip, last.port))
            times.append(time.perf_counter() - start)
    server.close()
    times.sort()
    return {"median": statistics.median(times), "p99": times[int(len(times) * 0.99) - 1]}


def in_fresh_netns(fn: Callable[..., Any], *args: Any) -> Any:
    with Topology(pods=0, ipv6=False, prefix="lp-iptb") as topo:
        return run_in_netns(topo.node.name, fn, *args, timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    n, results = args.rules, {}

    for name, fn, arg in [
        ("iptc_per_rule_commit", _iptc_write, True),
        ("iptc_one_commit", _iptc_write, False),
        ("restore_legacy", _restore_write, "legacy"),
        ("restore_nft", _restore_write, "nft"),
    ]:
        runs = [in_fresh_netns(fn, n, arg) for _ in range(args.repeat)]  # a fresh netns each time
        if fn is _iptc_write:
            results[name] = {**runs[0], "seconds": statistics.median(r["seconds"] for r in runs)}
        else:
            results[name] = statistics.median(runs)
    print(f"## Writing {n} REDIRECT rules (median of {args.repeat} runs, each in a fresh netns)\n")
    print("| writer | time | rules seen by iptables-legacy-save | by iptables-nft-save |")
    print("|---|---|---|---|")
    for name in ("iptc_per_rule_commit", "iptc_one_commit"):
        r = results[name]
        print(f"| {name} | {r['seconds'] * 1000:.1f} ms | {r['seen_by']['legacy']} | {r['seen_by']['nft']} |")
    for name in ("restore_legacy", "restore_nft"):
        print(f"| {name} (one batch) | {results[name] * 1000:.1f} ms | | |")

    print("\n## IptablesBackend (IPv4 only; ms; medians of 5 except the first ensure)\n")
    print("| variant | entries | first ensure | no-op ensure | read() | apply() 1 change (patch) | 1 change as full rewrite |")
    print("|---|---|---|---|---|---|---|")
    for variant in ("nft", "legacy"):
        for size in (10, 1000, 10_000):
            c = in_fresh_netns(_backend_costs, size, variant)
            results[f"backend_{variant}_{size}"] = c
            cells = " | ".join(
                f"{c[k] * 1000:.1f}"
                for k in ("ensure_full", "ensure_noop", "read", "apply_one_patch", "apply_one_rewrite")
            )
            print(f"| {variant} | {size} | {cells} |")

    print(f"\n## Connect latency to the last rule's ClusterIP ({args.samples} connects; µs)\n")
    print("| variant | entries | median | p99 |")
    print("|---|---|---|---|")
    for variant in ("nft", "legacy"):
        for size in (10, 10_000):
            c = in_fresh_netns(_connect_latency, size, variant, args.samples)
            results[f"connect_{variant}_{size}"] = c
            print(f"| {variant} | {size} | {c['median'] * 1e6:.0f} | {c['p99'] * 1e6:.0f} |")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
