"""The agent's sync loop, in-process, against real nftables in a throw-away netns.

The watch side is driven through the agent's ``ChangeTracker`` (the same calls the watcher makes), so these
tests pin batching, ordering and failure handling without an API server; test_e2e.py runs the whole thing.
"""

from __future__ import annotations

import copy
import fcntl
import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from redirector.agent import Agent
from redirector.model import Key
from sandbox.node.netns import NetNS, nft
from sandbox.node.traffic import wait_until
from shared import constants as c
from tests.redirector.conftest import handles, nft_backend
from tests.redirector.factories import numbered, service

pytestmark = pytest.mark.root
LABEL = (c.SERVICE_PROXY_NAME_LABEL, c.DEFAULT_PROXY_NAME)


@pytest.fixture
def node() -> Iterator[NetNS]:
    ns = NetNS(f"lpr-{os.getpid()}-{next(_ids)}-agent")
    with ns:
        yield ns


_ids = itertools.count()


class Running:
    """An agent and its sync thread; stopped (rules left in place) at the end of the test."""

    def __init__(self, netns: NetNS, **kwargs: Any) -> None:
        self.backend = nft_backend(netns.name)
        self.agent = Agent(self.backend, proxy_label=LABEL, **kwargs)
        self.thread = threading.Thread(target=self.agent.run, daemon=True)
        self.thread.start()

    def metric(self, name: str, **labels: str) -> float:
        value = self.agent.metrics.registry.get_sample_value(f"lightpath_redirector_{name}", labels)
        return value or 0.0

    def kernel_has(self, keys: set[Key]) -> bool:
        return self.backend.read() == keys

    def stop(self) -> None:
        self.agent.stop()
        self.thread.join(timeout=5)


@pytest.fixture
def running(node: NetNS) -> Iterator[Running]:
    r = Running(node, resync_period=3600)
    yield r
    r.stop()


def test_nothing_is_programmed_before_the_first_list(node: NetNS, running: Running) -> None:
    tracker, agent = running.agent.tracker, running.agent
    with tracker.cond:  # re-entrant: the loop cannot look between the event and the count
        tracker.upsert(service("a", cluster_ips=["10.96.0.1"]))
        seen = agent.idle_checks
    # The loop woke up for the event, looked, and chose to wait: a deterministic signal, no sleep.
    wait_until(lambda: agent.idle_checks > seen, what="the sync loop considered the event")
    assert agent.status.transactions == 0 and not agent.status.first_sync_done
    assert "lightpath" not in nft(node.name, "list tables")
    tracker.replace([service("b", cluster_ips=["10.96.0.2"])])  # the list supersedes earlier events
    wait_until(lambda: running.kernel_has({Key(4, "10.96.0.2", 80)}), what="first full sync")
    assert running.agent.status.first_sync_done and running.metric("last_sync_timestamp_seconds", kind="full") > 0


def test_single_changes_reach_the_kernel_incrementally(running: Running) -> None:
    tracker = running.agent.tracker
    tracker.replace([])
    wait_until(lambda: running.agent.status.first_sync_done)
    s = service("a", cluster_ips=["10.96.0.1"], type_="NodePort", ports=[{"name": "h", "port": 80, "nodePort": 30080}])
    tracker.upsert(s)
    wait_until(lambda: running.kernel_has({Key(4, "10.96.0.1", 80), Key(4, None, 30080)}))
    changed = copy.deepcopy(s)
    changed["spec"]["ports"][0]["port"] = 8080
    tracker.upsert(changed)
    wait_until(lambda: running.kernel_has({Key(4, "10.96.0.1", 8080), Key(4, None, 30080)}))
    unlabelled = copy.deepcopy(changed)
    unlabelled["metadata"]["labels"] = {}
    tracker.upsert(unlabelled)  # label removed: treated as gone even if the watch said MODIFIED
    wait_until(lambda: running.kernel_has(set()))
    assert running.metric("sync_duration_seconds_count", kind="incremental") >= 3
    assert running.metric("event_to_rule_seconds_count") >= 3
    assert running.metric("sync_duration_seconds_count", kind="full") == 1


def test_a_burst_of_changes_becomes_a_few_transactions(running: Running) -> None:
    tracker = running.agent.tracker
    tracker.replace([])
    wait_until(lambda: running.agent.status.first_sync_done)
    before = running.agent.status.transactions
    n = 2000
    for i in range(n):
        tracker.upsert(numbered(i))
    want = {Key(4, f"10.96.{i >> 8}.{i & 255}", 80) for i in range(n)} | {
        Key(6, f"fd00:10:96::{i + 1:x}", 80) for i in range(n)}
    wait_until(lambda: running.kernel_has(want), timeout=20)
    transactions = running.agent.status.transactions - before
    assert 1 <= transactions < n / 10, transactions
    assert running.metric("entries", family="ipv6", match="address") == n


def test_a_failed_transaction_schedules_a_full_sync_that_repairs(node: NetNS, running: Running) -> None:
    tracker = running.agent.tracker
    tracker.replace([service("a", cluster_ips=["10.96.0.1"]), service("b", cluster_ips=["10.96.0.2"])])
    wait_until(lambda: running.kernel_has({Key(4, "10.96.0.1", 80), Key(4, "10.96.0.2", 80)}))
    nft(node.name, "delete element inet lightpath svc4 { 10.96.0.1 . 80 }")  # someone meddles
    tracker.delete(service("a"))  # deleting the missing element fails the transaction
    wait_until(lambda: running.metric("sync_errors_total", kind="incremental") == 1)
    wait_until(lambda: running.kernel_has({Key(4, "10.96.0.2", 80)}) and not running.agent.status.full_sync_pending)
    assert running.metric("sync_duration_seconds_count", kind="full") == 2
    snap = running.agent.snapshot()
    assert snap["last_error"].startswith("incremental sync: ")  # the failure is reported...
    assert snap["last_error_time"] is None and snap["last_success"] is not None  # ...and cleared by the repair
    assert running.metric("drift_repairs_total") == 0  # the meddling left the kernel as wanted: nothing repaired


def test_a_deleted_table_repaired_after_a_failed_change_counts_as_drift(node: NetNS, running: Running) -> None:
    tracker = running.agent.tracker
    tracker.replace([service("a", cluster_ips=["10.96.0.1"])])
    wait_until(lambda: running.kernel_has({Key(4, "10.96.0.1", 80)}))
    nft(node.name, "delete table inet lightpath")
    tracker.upsert(service("b", cluster_ips=["10.96.0.2"]))  # no table to add the element to: fails
    wait_until(lambda: running.kernel_has({Key(4, "10.96.0.1", 80), Key(4, "10.96.0.2", 80)})
               and not running.agent.status.full_sync_pending, what="repaired by the follow-up full sync")
    assert running.metric("sync_errors_total", kind="incremental") == 1
    assert running.metric("drift_repairs_total") == 1


def test_a_failure_without_drift_is_not_counted_as_drift(tmp_path: Path) -> None:
    """The xtables lock held by someone else fails a change; the kernel still holds what we applied."""
    from redirector.iptables import IptablesBackend

    lock = tmp_path / "xtables.lock"
    lock.touch()
    with NetNS(f"lpr-{os.getpid()}-{next(_ids)}-nodrift") as ns:
        backend = IptablesBackend(variant="legacy", netns=ns.name, lock_path=str(lock), lock_wait=1, families=(4,))
        # The retry comes 3 s after the failure: the lock is released by then, so the full sync that
        # follows succeeds at its first try and has to judge drift.
        agent = Agent(backend, proxy_label=LABEL, resync_period=3600, retry_min=3.0, retry_max=3.0)
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        try:
            agent.tracker.replace([service("a", cluster_ips=["10.96.0.1"])])
            wait_until(lambda: backend.read() == {Key(4, "10.96.0.1", 80)})
            errors = agent.metrics.registry.get_sample_value
            with lock.open("w") as held:
                fcntl.flock(held, fcntl.LOCK_EX)
                agent.tracker.upsert(service("b", cluster_ips=["10.96.0.2"]))
                wait_until(lambda: errors("lightpath_redirector_sync_errors_total", {"kind": "incremental"}) == 1)
            wait_until(lambda: backend.read() == {Key(4, "10.96.0.1", 80), Key(4, "10.96.0.2", 80)}
                       and not agent.status.full_sync_pending, what="the change applied by the full sync")
            assert errors("lightpath_redirector_sync_errors_total", {"kind": "full"}) == 0
            assert errors("lightpath_redirector_drift_repairs_total", {}) == 0
        finally:
            agent.stop()
            thread.join(timeout=5)


def test_periodic_resync_repairs_drift_and_counts_it(node: NetNS) -> None:
    r = Running(node, resync_period=0.2)
    try:
        keys = {Key(4, "10.96.0.1", 80), Key(6, "fd00:10:96::1", 80)}
        r.agent.tracker.replace([service("a", cluster_ips=["10.96.0.1", "fd00:10:96::1"])])
        wait_until(lambda: r.kernel_has(keys))
        wait_until(lambda: r.metric("sync_duration_seconds_count", kind="full") >= 3)  # resyncs without drift...
        assert r.metric("drift_repairs_total") == 0  # ...count nothing
        nft(node.name, "flush set inet lightpath svc4")
        wait_until(lambda: r.metric("drift_repairs_total") == 1 and r.kernel_has(keys), timeout=5)
        nft(node.name, "delete table inet lightpath")
        wait_until(lambda: r.metric("drift_repairs_total") == 2 and r.kernel_has(keys), timeout=5)
    finally:
        r.stop()


def test_unserved_ports_and_errors_are_reported(running: Running) -> None:
    udp = service("dns", cluster_ips=["10.96.0.53"], ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                                                             {"name": "dns-tcp", "port": 53, "protocol": "TCP"}])
    bad = service("bad", cluster_ips=["10.96.0.7"], external_ips=["300.1.1.1"])
    running.agent.tracker.replace([udp, bad])
    wait_until(lambda: running.kernel_has({Key(4, "10.96.0.53", 53), Key(4, "10.96.0.7", 80)}))
    wait_until(lambda: running.metric("unserved_ports") == 1 and running.metric("service_errors") == 1)
    desired = running.agent.desired()
    assert [u.port for u in desired.unserved] == [53] and set(desired.errors) == {"shop/bad"}
    snap = running.agent.snapshot()
    assert snap["unserved_ports"] == 1 and snap["services"] == 2 and snap["applied_entries"] == 2


def test_a_restarted_agent_adopts_the_rules_without_flushing(node: NetNS) -> None:
    services = [numbered(i) for i in range(50)]
    first = Running(node, resync_period=3600)
    first.agent.tracker.replace(services)
    want = first.backend.read
    wait_until(lambda: len(want()) == 100)
    first.stop()
    handles_before = handles(node.name)
    second = Running(node, resync_period=3600)
    try:
        assert len(second.backend.read()) == 100  # untouched while the new agent has not listed yet
        second.agent.tracker.replace(services)
        wait_until(lambda: second.agent.status.first_sync_done)
        assert len(second.backend.read()) == 100
        assert handles(node.name) == handles_before
    finally:
        second.stop()
