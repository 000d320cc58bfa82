"""``make demo``: the whole lightpath path on this machine, step by step, with the evidence.

Runs ``sandbox.scenario`` (the same scenario the full-system test asserts) and prints it. Needs root
(network namespaces, nftables). Exit status: 0 when every step behaved, 1 when one did not, 130 on
Ctrl-C; everything is torn down in every case.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType

from sandbox.node.netns import NETNS_DIR, cleanup_stale
from sandbox.scenario import Scenario, ScenarioError

PREFIX = "lpdemo"
BANNER = """\
lightpath demo: Services move between a kube-proxy stand-in and a node-local Envoy, for real packets.
Real: the webhook process (TLS), the redirector process (nftables), Envoy, the Linux network namespaces and
every connection. Stand-ins: the Kubernetes API is a TEST DOUBLE (sandbox.api.apiserver) and "kube-proxy" is a
STAND-IN that writes plain nftables DNAT (sandbox.kubeproxy). Nothing touches this host's own network."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _leftovers() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(f"{PREFIX}-{os.getpid()}-")) if NETNS_DIR.is_dir() else []


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root: it creates network namespaces and nftables rules inside them (sudo make demo)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    stale = cleanup_stale(PREFIX)
    print(BANNER)
    if stale:
        print(f"(removed namespaces left by an earlier, killed demo: {', '.join(stale)})")
    started = time.monotonic()
    status = 0
    scenario = Scenario(say=lambda line: print(line, flush=True), netns_prefix=PREFIX)
    try:
        scenario.run()
    except ScenarioError as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("\ninterrupted: tearing down", file=sys.stderr)
        status = 130
    except Exception:  # noqa: BLE001 - any failure is reported, then everything is torn down
        traceback.print_exc()
        logs = [p for p in (scenario.workdir / n for n in ("webhook.log", "redirector.log", "envoy/envoy.log")) if p.exists()]
        for log in logs:
            print(f"--- tail of {log.name} ---\n" + "\n".join(Path(log).read_text(errors="replace").splitlines()[-15:]), file=sys.stderr)
        status = 1
    finally:
        print("\n== 7. Teardown: client loop, stand-in, redirector, Envoy, webhook, API server, namespaces, files")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        scenario.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        left = _leftovers()
        print(f"   network namespaces left: {', '.join(left) if left else 'none'}")
        if left:
            status = status or 1
    elapsed = time.monotonic() - started
    if status == 0:
        print(f"\nOK: every step behaved ({elapsed:.1f} s).")
        for name, h in scenario.handovers.items():
            window = scenario.kernel.get(name)
            kernel = f"; kernel window with neither rule {window.uncovered * 1000:.1f} ms" if window else ""
            print(f"   {name}: {h.failed} failed request(s), outage {h.outage * 1000:.0f} ms{kernel}")
        print("   A failed request during a handover is reported, not hidden: it is the baseline for zero-downtime work (docs/demo.md).")
    return status


if __name__ == "__main__":
    sys.exit(main())
