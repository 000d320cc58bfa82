"""The agent's batching, retry, drift and resync logic against the in-memory ``FakeBackend``: no root, no
netns, milliseconds. test_agent.py runs the same loop against real nftables; these pin the decisions.

Most tests call ``sync_once`` directly (deterministic: one call, one decision); the timing tests (retry
backoff, periodic resync) run the loop in a thread with tiny periods and poll with a deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from redirector.agent import Agent
from redirector.changes import ChangeTracker
from redirector.desired import DesiredIndex
from redirector.fake_backend import FakeBackend
from redirector.model import BackendError, Delta, Key
from sandbox.node.traffic import wait_until
from shared import constants as c
from tests.redirector.factories import numbered, service

LABEL = (c.SERVICE_PROXY_NAME_LABEL, c.DEFAULT_PROXY_NAME)
A, B = Key(4, "10.96.0.1", 80), Key(4, "10.96.0.2", 80)


def until(fn: Any, **kwargs: Any) -> Any:
    """``wait_until`` polling every 2 ms: the fake answers at once, so the loop's own timing dominates."""
    kwargs.setdefault("interval", 0.002)
    return wait_until(fn, **kwargs)


def svc(name: str, ip: str) -> dict[str, Any]:
    return service(name, cluster_ips=[ip])


def metric(agent: Agent, name: str, **labels: str) -> float:
    return agent.metrics.registry.get_sample_value(f"lightpath_redirector_{name}", labels) or 0.0


def make(fake: FakeBackend | None = None, **kwargs: Any) -> tuple[Agent, FakeBackend]:
    fake = fake if fake is not None else FakeBackend()
    kwargs.setdefault("resync_period", 3600)
    return Agent(fake, proxy_label=LABEL, **kwargs), fake


class Loop:
    """The agent's sync loop in a thread, stopped at the end."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.thread = threading.Thread(target=agent.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.agent.stop()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()


@pytest.fixture
def loops() -> Iterator[list[Loop]]:
    started: list[Loop] = []
    yield started
    for loop in started:
        loop.stop()


# -- the fake itself keeps the Backend contract ------------------------------------------------------


def test_fake_backend_keeps_the_contract() -> None:
    fake = FakeBackend()
    assert fake.read() == frozenset() and not fake.has_table
    with pytest.raises(BackendError, match="table missing"):
        fake.apply(Delta(add=frozenset({A})))  # no repair inside apply
    assert fake.ensure({B, A}) is True and fake.last_seen is None  # what ensure found: no table
    assert fake.ensure({A, B}) is False and fake.last_seen == {A, B}
    assert fake.dump() == [A, B]
    with pytest.raises(BackendError, match="absent"):
        fake.apply(Delta(add=frozenset({Key(6, "fd00::1", 80)}), delete=frozenset({Key(4, None, 30080)})))
    assert fake.dump() == [A, B]  # all or nothing: the add did not happen either
    fake.fail("ensure", times=2)
    for _ in range(2):
        with pytest.raises(BackendError, match="injected"):
            fake.ensure(set())
        assert fake.last_seen is None  # a failed ensure reports nothing it did not see
    assert fake.dump() == [A, B] and fake.ensure(set()) is True and fake.dump() == []
    assert fake.calls["ensure"] == 5 and fake.calls["apply"] == 2
    with pytest.raises(ValueError, match="operation"):
        fake.fail("write")


def test_nodeports_sort_after_addresses_in_the_dump() -> None:
    fake = FakeBackend([Key(4, None, 30080), Key(6, "fd00::1", 80), B, A])
    assert fake.dump() == [A, B, Key(4, None, 30080), Key(6, "fd00::1", 80)]


# -- batching -----------------------------------------------------------------------------------------


def test_first_sync_is_full_then_changes_are_incremental() -> None:
    agent, fake = make()
    agent.tracker.replace([svc("a", "10.96.0.1")])
    agent.sync_once()
    assert fake.dump() == [A] and fake.calls == {"ensure": 1}
    assert agent.status.first_sync_done and not agent.status.full_sync_pending
    agent.tracker.upsert(svc("b", "10.96.0.2"))
    agent.sync_once()
    assert fake.dump() == [A, B] and fake.calls["apply"] == 1 and fake.calls["ensure"] == 1
    assert agent.applied_count() == len(agent.applied_keys()) == 2
    agent.tracker.delete(svc("a", "10.96.0.1"))
    agent.sync_once()
    assert fake.dump() == [B] and fake.calls["apply"] == 2
    assert agent.applied_count() == 1
    assert metric(agent, "sync_duration_seconds_count", kind="incremental") == 2
    assert metric(agent, "entries", family="ipv4", match="address") == 1


def test_many_pending_changes_become_one_transaction() -> None:
    agent, fake = make()
    agent.tracker.replace([])
    agent.sync_once()
    for i in range(500):
        agent.tracker.upsert(numbered(i))
    for i in range(0, 500, 2):  # half of them edited again before the sync: still one change each
        agent.tracker.upsert(numbered(i, port=8080))
    agent.sync_once()
    assert fake.calls["apply"] == 1 and len(fake.dump()) == 1000
    assert metric(agent, "sync_batch_changes_sum") == 500
    assert Key(4, "10.96.0.0", 8080) in fake.dump() and Key(4, "10.96.0.1", 80) in fake.dump()


def test_a_relist_supersedes_pending_events() -> None:
    agent, fake = make()
    agent.tracker.replace([svc("a", "10.96.0.1"), svc("b", "10.96.0.2")])
    agent.sync_once()
    agent.tracker.upsert(svc("c", "10.96.0.3"))
    agent.tracker.replace([svc("b", "10.96.0.2")])  # after a 410: the list is the truth
    agent.sync_once()
    assert fake.dump() == [B] and agent.snapshot()["services"] == 1


def test_the_tracker_drains_into_the_index_and_says_what_changed() -> None:
    tracker = ChangeTracker(LABEL)
    index = DesiredIndex()
    tracker.replace([svc("a", "10.96.0.1"), svc("b", "10.96.0.2")])
    first = tracker.drain_into(index)
    assert first.delta == Delta(add=frozenset({A, B})) and first.size == 2 and len(first.arrivals) == 1
    tracker.upsert(svc("a", "10.96.0.1") | {"metadata": {"name": "a", "namespace": "shop", "labels": {}}})
    tracker.delete(svc("b", "10.96.0.2"))
    tracker.restarted("expired")
    second = tracker.drain_into(index)
    assert second.delta == Delta(delete=frozenset({A, B})) and set(index.service_ids()) == set()
    assert second.handed_back == {A: 0.0}  # the label went (labelled before this tracker's first list)
    assert second.restarts == ["expired"] and second.size == 2 and len(second.arrivals) == 2
    empty = tracker.drain_into(index)
    assert not empty.delta and empty.size == 0 and empty.arrivals == [] and empty.restarts == []


def test_a_burst_through_the_running_loop_is_coalesced(loops: list[Loop]) -> None:
    agent, fake = make(batch_idle=0.005, batch_max=0.05)
    loops.append(Loop(agent))
    agent.tracker.replace([])
    until(lambda: agent.status.first_sync_done)
    for i in range(1000):
        agent.tracker.upsert(numbered(i))
    until(lambda: len(fake.dump()) == 2000)
    assert 1 <= fake.calls["apply"] < 100, fake.calls  # not one transaction per change


def test_nothing_is_written_before_the_first_list(loops: list[Loop]) -> None:
    agent, fake = make()
    loops.append(Loop(agent))
    with agent.tracker.cond:  # re-entrant: the loop cannot look between the event and the count
        agent.tracker.upsert(svc("a", "10.96.0.1"))
        seen = agent.idle_checks
    until(lambda: agent.idle_checks > seen, what="the loop considered the event")
    assert sum(fake.calls.values()) == 0 and not fake.has_table
    agent.tracker.replace([svc("b", "10.96.0.2")])
    until(lambda: agent.status.first_sync_done)
    assert fake.dump() == [B] and fake.calls == {"ensure": 1}


# -- failures, retry, drift ---------------------------------------------------------------------------


def test_a_failed_change_schedules_a_full_sync_and_is_not_drift_when_nothing_changed() -> None:
    agent, fake = make(FakeBackend(), retry_min=0.0)
    agent.tracker.replace([svc("a", "10.96.0.1")])
    agent.sync_once()
    fake.fail("apply")  # e.g. the xtables lock held by someone else: the kernel stays as it was
    agent.tracker.upsert(svc("b", "10.96.0.2"))
    agent.sync_once()
    assert fake.dump() == [A] and agent.status.full_sync_pending
    assert metric(agent, "sync_errors_total", kind="incremental") == 1
    assert agent.status.last_error is not None and agent.status.last_error.startswith("incremental sync: ")
    reads = fake.calls["read"]
    agent.sync_once()  # the full sync applies the change that failed
    assert fake.dump() == [A, B] and not agent.status.full_sync_pending
    assert fake.calls["read"] == reads and fake.calls["ensure"] >= 2  # the kernel read once: by ensure itself
    assert metric(agent, "drift_repairs_total") == 0
    assert agent.status.last_error_time is None


def test_a_change_failing_on_a_hand_edited_kernel_counts_the_drift() -> None:
    agent, fake = make(retry_min=0.0)
    agent.tracker.replace([svc("a", "10.96.0.1"), svc("b", "10.96.0.2")])
    agent.sync_once()
    fake.tamper(delete={A})  # someone deletes our element
    agent.tracker.delete(svc("a", "10.96.0.1"))  # deleting it again fails, like nftables
    agent.sync_once()
    assert metric(agent, "sync_errors_total", kind="incremental") == 1
    agent.sync_once()
    assert fake.dump() == [B]
    assert metric(agent, "drift_repairs_total") == 0  # the kernel already holds what we want: nothing repaired
    fake.drop_table()  # now someone deletes the whole table
    agent.tracker.upsert(svc("c", "10.96.0.3"))
    agent.sync_once()
    agent.sync_once()
    assert fake.dump() == [B, Key(4, "10.96.0.3", 80)]
    assert metric(agent, "drift_repairs_total") == 1


class NothingServed:
    """A gate (the control plane's role) whose proxy serves nothing yet."""

    def servable(self, keys: Any) -> set[Key]:
        return set()


def test_a_gated_first_full_sync_retried_after_a_failure_reads_the_kernel_once() -> None:
    agent, fake = make(FakeBackend([A]), gate=NothingServed())  # a restart: the kernel holds A already
    agent.tracker.replace([svc("a", "10.96.0.1"), svc("b", "10.96.0.2")])
    fake.fail("ensure")
    agent.sync_once()
    assert fake.calls == {"read": 1, "ensure": 1} and agent.status.full_sync_pending
    agent.sync_once()  # the retry: the inherited keys were read by the failed attempt; only ensure reads
    assert fake.calls == {"read": 1, "ensure": 2} and not agent.status.full_sync_pending
    assert fake.dump() == [A]  # inherited A stays; B waits for the proxy


def test_failed_full_syncs_are_retried_with_a_growing_delay(loops: list[Loop]) -> None:
    agent, fake = make(retry_min=0.01, retry_max=0.04)
    fake.fail("ensure", times=4)
    loops.append(Loop(agent))
    agent.tracker.replace([svc("a", "10.96.0.1")])
    until(lambda: agent.status.first_sync_done, what="the fifth attempt succeeds")
    assert fake.dump() == [A] and fake.calls["ensure"] == 5
    assert metric(agent, "sync_errors_total", kind="full") == 4
    assert agent._retry_delay == agent.retry_min  # reset by the success


def test_periodic_resync_counts_only_real_drift(loops: list[Loop]) -> None:
    agent, fake = make(resync_period=0.02)
    loops.append(Loop(agent))
    agent.tracker.replace([svc("a", "10.96.0.1"), svc("b", "10.96.0.2")])
    until(lambda: metric(agent, "last_sync_timestamp_seconds", kind="full") > 0 and fake.calls["ensure"] >= 5)
    assert metric(agent, "drift_repairs_total") == 0 and fake.transactions == 1  # resyncs that found nothing
    fake.tamper(delete={A}, add={Key(4, "10.96.9.9", 80)})
    until(lambda: metric(agent, "drift_repairs_total") == 1)
    assert fake.dump() == [A, B]
    fake.drop_table()
    until(lambda: metric(agent, "drift_repairs_total") == 2)
    assert fake.dump() == [A, B]


def test_changes_pending_at_a_periodic_resync_are_not_drift() -> None:
    agent, fake = make(resync_period=0.005)
    agent.tracker.replace([svc("a", "10.96.0.1")])
    agent.sync_once()
    resync_due = time.monotonic() + 0.01
    agent.tracker.upsert(svc("b", "10.96.0.2"))
    until(lambda: time.monotonic() > resync_due)  # the resync period has passed
    agent.sync_once()  # applies the change, then resyncs
    assert fake.dump() == [A, B] and fake.calls["apply"] == 1 and fake.calls["ensure"] == 2
    assert metric(agent, "drift_repairs_total") == 0


def test_stop_leaves_the_rules_in_place(loops: list[Loop]) -> None:
    agent, fake = make()
    loop = Loop(agent)
    agent.tracker.replace([svc("a", "10.96.0.1")])
    until(lambda: fake.dump() == [A])
    loop.stop()
    assert fake.dump() == [A] and fake.calls["cleanup"] == 0
