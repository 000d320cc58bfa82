"""Leader election on a Lease: the pure decision, and two electors against the sandbox API server (the TEST
DOUBLE, through the real kubernetes client): exactly one leads; when it stops renewing, the other takes over
only after the Lease expired."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

from sandbox.api.apiserver import SandboxApiServer
from sandbox.api.resources import NAMESPACES
from tests.support.polling import wait_for
from webhook.leader import LeaderElector, decide

NOW = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)


def stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_decide_takes_a_free_or_expired_lease_and_respects_a_valid_one() -> None:
    taken = decide(None, "a", NOW, 15)
    assert taken is not None and taken["holderIdentity"] == "a" and taken["leaseTransitions"] == 0
    theirs = {"holderIdentity": "b", "renewTime": stamp(NOW - timedelta(seconds=5)), "leaseDurationSeconds": 15,
              "leaseTransitions": 3}
    assert decide(theirs, "a", NOW, 15) is None  # b renewed 5 s ago: still b's
    expired = {**theirs, "renewTime": stamp(NOW - timedelta(seconds=16))}
    over = decide(expired, "a", NOW, 15)
    assert over is not None and over["holderIdentity"] == "a" and over["leaseTransitions"] == 4
    mine = {"holderIdentity": "a", "renewTime": stamp(NOW - timedelta(seconds=5)), "acquireTime": "T0",
            "leaseDurationSeconds": 15, "leaseTransitions": 4}
    renewed = decide(mine, "a", NOW, 15)
    assert renewed is not None and renewed["acquireTime"] == "T0" and renewed["leaseTransitions"] == 4
    garbage = {"holderIdentity": "b", "renewTime": "not a time", "leaseDurationSeconds": "x"}
    assert decide(garbage, "a", NOW, 15) is not None  # unreadable: treated as expired, never a crash


def test_two_replicas_one_leader_and_a_takeover_after_expiry() -> None:
    with SandboxApiServer() as api:
        api.operations.create(NAMESPACES, None, {"metadata": {"name": "lightpath-node"}})
        changes: dict[str, list[bool]] = {"a": [], "b": []}
        electors = {n: LeaderElector(api.api_client(), "lightpath-node", "ctl", n, duration=2, renew=0.3,
                                     retry=0.1, on_change=changes[n].append) for n in ("a", "b")}
        threads = [threading.Thread(target=e.run, daemon=True) for e in electors.values()]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: any(e.leading for e in electors.values()), "a leader", timeout=5)
            until = time.monotonic() + 1.0  # several renew rounds, sampled: never two leaders
            while time.monotonic() < until:
                assert sum(e.leading for e in electors.values()) == 1
                time.sleep(0.01)
            leaders = [n for n, e in electors.items() if e.leading]
            assert len(leaders) == 1, leaders
            first = leaders[0]
            other = "b" if first == "a" else "a"
            electors[first].stop()
            stopped = time.monotonic()
            wait_for(lambda: electors[other].leading, "the takeover", timeout=6)
            assert time.monotonic() - stopped >= 1.0  # only once the Lease (2 s) had run out
            assert changes[first] == [True, False] and changes[other] == [True]
        finally:
            for e in electors.values():
                e.stop()
