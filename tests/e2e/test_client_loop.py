"""How a handover is measured from the client loop's record (pure), and the loop itself in a pod namespace."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.node.client_loop import ClientLoop, Record, handover
from sandbox.node.netns import Topology
from sandbox.node.traffic import http_listener


def rec(i: int, t0: float, ok: bool, via: str | None = None, dur: float = 0.01) -> Record:
    return Record(i, t0, t0 + dur, ok, 200 if ok else None, via if ok else None, None if ok else "TimeoutError: timed out")


def test_clean_switch_counts_no_failures() -> None:
    records = [rec(0, 0.0, True, "envoy"), rec(1, 1.0, True, "envoy"), rec(2, 2.0, True, "direct"), rec(3, 3.0, True, "direct")]
    h = handover(records, start=0.5, new_via="direct")
    assert (h.requests, h.failed, h.outage) == (2, 0, 0.0)
    assert h.gap == pytest.approx(1.0)  # last envoy answer at 1.01, first direct one at 2.01


def test_failures_and_the_outage_until_the_next_success() -> None:
    records = [
        rec(0, 0.0, True, "envoy"),
        rec(1, 1.0, False, dur=1.0),
        rec(2, 2.1, False, dur=1.0),
        rec(3, 3.2, True, "direct"),
        rec(4, 4.0, False, dur=1.0),  # after the switch: not part of this handover
    ]
    h = handover(records, start=0.9, new_via="direct")
    assert (h.requests, h.failed) == (3, 2)
    assert h.outage == pytest.approx(2.2)
    assert h.errors == ("TimeoutError: timed out",) * 2
    assert h.gap == pytest.approx(3.21 - 0.01)
    assert "2 failed" in h.describe()


def test_never_switched_and_window_end() -> None:
    records = [rec(0, 0.0, True, "envoy"), rec(1, 1.0, False, dur=0.5), rec(2, 2.0, True, "envoy")]
    h = handover(records, start=0.5, new_via="direct", end=1.9)
    assert h.gap is None and (h.requests, h.failed) == (1, 1)
    assert h.outage == pytest.approx(0.5)
    assert "never" in h.describe()


@pytest.mark.root
def test_loop_in_a_pod_namespace_opens_a_connection_per_request(tmp_path: Path) -> None:
    with Topology(pods=2, prefix="lpe2e") as topo:
        web = http_listener(topo.pods[0], 8080, name="web")
        loop = ClientLoop(topo.pods[1], topo.pod_ips[0], web.port, stop_file=tmp_path / "stop", interval=0.001)
        loop.wait_for(10)
        records = loop.stop()
        assert len(records) >= 10
        assert all(r.ok and r.via == "direct" for r in records)
        assert [r.i for r in records] == list(range(len(records)))
        web.stop()
        failing = ClientLoop(topo.pods[1], topo.pod_ips[0], web.port, stop_file=tmp_path / "stop", count=3)
        failing.proc.wait(10)
        records = failing.stop()
        assert len(records) == 3 and not any(r.ok for r in records)
        assert all("Connection refused" in (r.error or "") for r in records)
