"""The whole path for real (issue 8): the demo's scenario with assertions, plus the failure cases.

Real webhook and redirector processes, a real Envoy, nftables in network namespaces and real connections;
the Kubernetes API is the sandbox TEST DOUBLE and kube-proxy the sandbox STAND-IN.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.node.netns import NETNS_DIR
from sandbox.scenario import DNS, MIXED, WEB, Scenario
from shared import constants as c
from tests.support.polling import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_full_system(tmp_path: Path) -> None:
    with Scenario(say=print, workdir=tmp_path) as s:
        s.control_plane()
        s.node()
        s.services()  # raises ScenarioError unless only the HTTP Service is labelled and redirected
        assert s.label(WEB) == c.DEFAULT_PROXY_NAME and s.label(DNS) is None and s.label(MIXED) is None
        assert all("UDP" in " ".join(s.warnings[n]) for n in (DNS, MIXED)), s.warnings
        assert {k.ip for k in s.redirect_keys()} == {s.ips[WEB]}

        s.traffic()  # HTTP via Envoy (headers, stats), UDP and mixed via the stand-in

        handovers = s.handover_loop()  # rollback then migrate, under a client loop
        assert all(h.gap is not None for h in handovers.values()), handovers
        assert s.label(WEB) == c.DEFAULT_PROXY_NAME and s.has_redirect(WEB)

        # Restarting the redirector must not cost a request: the rules stay while it is away.
        records = s.restart_redirector_under_load()
        assert s.redirector.starts == 2
        failed = [r for r in records if not r.ok]
        assert not failed, failed[:5]
        assert all(r.via == "envoy" for r in records)

        # Delete the HTTP Service -> its redirect is gone (how fast is a benchmark figure, not an assertion).
        seconds = s.delete_service(WEB)
        print(f"redirect removed {seconds * 1000:.0f} ms after the delete")
        assert s.redirect_keys() == frozenset()


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def test_failure_mid_scenario_tears_everything_down() -> None:
    with pytest.raises(RuntimeError, match="boom"), Scenario(say=print) as s:
        s.control_plane()
        s.node()
        namespaces = [ns.name for ns in s.topo.all]
        pids = [p.pid for p in (s.webhook.proc, s.redirector.proc, s.envoy.proc) if p is not None]
        workdir = s.workdir
        raise RuntimeError("boom")
    assert not [n for n in namespaces if (NETNS_DIR / n).exists()]
    wait_for(lambda: not _pids_alive(pids), "every process to exit", timeout=5)
    assert not workdir.exists()


def test_demo_on_ctrl_c_exits_130_and_leaves_nothing() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "sandbox.demo"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen, deadline = "", time.monotonic() + 60
    while "== 4." not in seen:
        assert time.monotonic() < deadline and proc.poll() is None, seen
        if select.select([proc.stdout], [], [], 1)[0]:
            seen += proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + out
    assert "== 7. Teardown" in out and "network namespaces left: none" in out
    assert not [p for p in NETNS_DIR.iterdir() if p.name.startswith(f"lpdemo-{proc.pid}-")]
