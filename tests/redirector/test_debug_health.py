"""/healthz against a sync loop that really gets stuck: the iptables backend (legacy variant) waits on an
xtables lock the test holds, so no transaction can succeed until it is released. Also /debug/rules read
back from iptables, compared with an independent ``iptables-legacy-save``."""

from __future__ import annotations

import fcntl
import re
from pathlib import Path

import pytest

from redirector.model import Key
from sandbox.node.traffic import wait_until
from tests.redirector.test_debug_node import PROXY_PORT, DebugNode

pytestmark = pytest.mark.root


def saved_keys(dn: DebugNode) -> set[tuple[int, str | None, int]]:
    """DNAT (or REDIRECT) rules of our chain to the proxy per ``iptables-legacy-save`` / ``ip6tables-legacy-save``
    (parsed here)."""
    keys: set[tuple[int, str | None, int]] = set()
    for family, tool, host in ((4, "iptables-legacy-save", "/32"), (6, "ip6tables-legacy-save", "/128")):
        for line in dn.node.run([tool, "-t", "nat"]).stdout.splitlines():
            to_proxy = line.endswith((f"--to-ports {PROXY_PORT}", f":{PROXY_PORT}"))  # REDIRECT or DNAT
            if not line.startswith("-A LIGHTPATH") or not to_proxy:
                continue
            port = int(re.search(r"--dport (\d+)", line).group(1))  # type: ignore[union-attr]
            dest = re.search(r" -d (\S+?)" + re.escape(host) + " ", line)
            keys.add((family, dest.group(1) if dest else None, port))
    return keys


def test_healthz_turns_503_while_syncing_is_stuck_and_recovers(tmp_path: Path) -> None:
    lock = tmp_path / "xtables.lock"
    lock.touch()
    dn = DebugNode("iptables", resync_period=0.3, health_timeout=2.0, retry_max=0.3,
                   variant="legacy", lock_path=str(lock), lock_wait=1, families=(4, 6))
    try:
        wait_until(lambda: dn.get("/healthz").status_code == 200 and dn.agent.status.first_sync_done,
                   timeout=20, what="healthy after the first sync")
        first = dn.service("first")
        wait_until(lambda: dn.synced({Key(4, first["spec"]["clusterIP"], 80)}))
        entries = dn.json("/debug/rules")["entries"]
        assert {(e["family"], e["ip"], e["port"]) for e in entries} == saved_keys(dn)
        assert dn.json("/debug/rules")["kernel"]["backend"] == "iptables"

        with lock.open("w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # every iptables-restore now waits 1 s, then fails
            stuck = dn.service("stuck")
            key = Key(4, stuck["spec"]["clusterIP"], 80)
            wait_until(lambda: dn.get("/healthz").status_code == 503, timeout=30, what="healthz 503 while stuck")
            body = dn.get("/healthz").json()
            assert body["status"] == "unhealthy" and body["ageSeconds"] > body["thresholdSeconds"] == 2.0
            assert "last successful sync is" in body["reason"]
            wait_until(lambda: "xtables lock" in (dn.get("/healthz").json()["lastError"] or ""),
                       what="the failed transaction reported")
            assert body["loopAlive"] is True and body["lastUpdated"] < body["currentTime"]
            assert key not in dn.kernel_keys()
            diff = dn.json("/debug/diff")
            assert [m["key"] for m in diff["missing"]] == [str(key)]
            fcntl.flock(held, fcntl.LOCK_UN)

        wait_until(lambda: dn.get("/healthz").status_code == 200, timeout=30, what="healthy again")
        wait_until(lambda: key in dn.kernel_keys())
        assert dn.json("/debug/diff")["in_sync"]

        dn.agent.stop()  # the sync loop ends: unhealthy at once, whatever the age
        dn.threads[1].join(5)
        resp = dn.get("/healthz")
        assert resp.status_code == 503 and resp.json()["reason"] == "the sync loop is not running"
    finally:
        dn.close()
