"""``make bench``: every benchmark, one after the other; each prints its figures (see docs/performance.md).

Run as root (the redirector and end-to-end benchmarks program nftables/iptables in network namespaces).
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = (
    ("webhook", ["-m", "bench.webhook_bench"]),
    ("redirector", ["-m", "bench.redirector_bench"]),
    ("iptables writers", ["-m", "bench.iptables_writer_bench"]),
    ("cli status", ["-m", "bench.cli_status_bench"]),
    ("end to end", ["-m", "bench.e2e_bench"]),
    ("control plane", ["-m", "bench.controlplane_bench"]),
    ("redirect primitive", ["-m", "bench.redirect_primitive_bench"]),
    ("l7 resilience", ["-m", "bench.l7_bench"]),
    ("client source address", ["-m", "bench.transparent_bench"]),
)


def main() -> int:
    failed = []
    for name, argv in BENCHMARKS:
        print(f"\n===== {name}: {sys.executable} {' '.join(argv)}", flush=True)
        if subprocess.run([sys.executable, *argv], check=False).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
