"""The kernel L4 fallback: Envoy SIGKILLed under a client loop (a new connection every 5 ms) -> the agent
notices, the kernel load-balances the migrated Services itself; Envoy back and in sync -> back to Envoy
with no failed connection. Real agent, real Envoy, real kernel in network namespaces."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from redirector.model import Key
from sandbox.node.client_loop import ClientLoop
from sandbox.node.traffic import wait_until
from tests.e2e.envoynode import CLUSTER_IPS, EnvoyNode, envoy_node

pytestmark = pytest.mark.root
IP, TCP_IP = CLUSTER_IPS[0], "10.96.0.20"


def metric(node: EnvoyNode, name: str) -> float:
    text = node.debug("/metrics")[1]
    line = next((x for x in str(text).splitlines() if x.startswith(name + " ")), None)
    return float(line.split()[-1]) if line else 0.0


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_envoy_killed_the_kernel_serves_then_envoy_again(tmp_path: Path, backend: str) -> None:
    with envoy_node(tmp_path, agent_args=["--backend", backend]) as node:
        for pod in (0, 1):
            node.serve(pod, "http", 4, port=8080)
            node.serve(pod, "tcp", 4, port=5433)
        node.service("web", [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}])
        node.service("db", [{"name": "db", "port": 5432, "targetPort": 5433}], ips=(TCP_IP,))
        node.endpoints("web", {"http": 8080}, [0, 1])
        node.endpoints("db", {"db": 5433}, [0, 1])
        wait_until(lambda: {Key(4, IP, 80), Key(4, TCP_IP, 5432)} <= node.kernel_keys(), timeout=20, what="migrated")
        # Envoy started after the agent here: the agent fell back until Envoy was connected and in sync.
        wait_until(lambda: metric(node, "lightpath_redirector_fallback_active") == 0, timeout=20, what="on Envoy")
        switches = metric(node, 'lightpath_redirector_fallback_switches_total{to="fallback"}')
        loops = [ClientLoop(node.topo.pods[2], IP, 80, stop_file=tmp_path / "http.stop", duration=60, timeout=1.0),
                 ClientLoop(node.topo.pods[2], TCP_IP, 5432, stop_file=tmp_path / "tcp.stop", duration=60,
                            timeout=1.0, tcp=True)]
        try:
            for loop in loops:
                loop.wait_for(20)
            assert all(r.via == "envoy" for r in loops[0].records[-10:])  # on Envoy before the kill
            killed = time.monotonic()
            node.envoy.kill()
            wait_until(lambda: metric(node, "lightpath_redirector_fallback_active") == 1, timeout=10,
                       what="the kernel fallback switched on")
            on = time.monotonic()
            status, ready = node.debug("/readyz")
            assert status == 503 and "kernel fallback" in str(ready), ready
            for loop in loops:
                loop.wait_for(60)  # served by the kernel meanwhile
            restarted = time.monotonic()
            node.envoy.start()
            wait_until(lambda: metric(node, "lightpath_redirector_fallback_active") == 0, timeout=20,
                       what="back to Envoy")
            back = time.monotonic()
            for loop in loops:
                loop.wait_for(40)
        finally:
            records = [loop.stop() for loop in loops]
        for recs in records:
            failed = [r for r in recs if not r.ok]
            assert all(r.t0 < on for r in failed), [r for r in failed if r.t0 >= on][:3]  # none once the kernel serves
            during = [r for r in recs if on <= r.t0 and r.t1 < restarted]
            assert during and all(r.ok and r.via in ("direct", "tcp") for r in during)  # the kernel, not a proxy
            after = [r for r in recs if r.t0 >= back + 0.1]
            assert after and all(r.ok for r in after)
            window = max((r.t1 for r in failed), default=killed) - killed
            print(f"{len(failed)} failed of {len(recs)}, failures within {window * 1000:.0f} ms of the kill; "
                  f"fallback on {(on - killed) * 1000:.0f} ms after it")
        assert metric(node, 'lightpath_redirector_fallback_switches_total{to="fallback"}') == switches + 1


