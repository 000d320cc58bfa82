"""Events on the Service during a handover (cli.events): the pure builders, and the CLI against the sandbox
API server (a test double) with the real webhook, as `kubectl describe service` would list them."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import jsonschema
import pytest
from kubernetes import client

from cli import events
from cli.rows import Ref
from redirector.lease import lease_body, lease_name
from sandbox.api.resources import EVENTS
from shared import constants as c
from shared import events as shared_events
from tests.cli.cluster import OURS, namespace, service
from tests.cli.conftest import Cluster
from tests.cli.schema import REPORT_SCHEMA
from tests.support.polling import wait_for

NOW = datetime(2026, 12, 2, 12, 0, 0, 123456, tzinfo=UTC)
REF = Ref("shop", "web")


# ---- pure ---------------------------------------------------------------------------------------------
def test_node_lists_and_messages_are_bounded() -> None:
    assert shared_events.node_list(["a", "b"]) == "a, b"
    assert shared_events.node_list([f"n{i}" for i in range(8)]) == "n0, n1, n2, n3, n4 and 3 more"
    nodes = [f"node-{i:03d}-" + "x" * 240 for i in range(300)]  # 300 nodes with 250-character names
    message = events.aborted_message(30, nodes, 310)
    assert len(message.encode()) <= c.EVENT_MESSAGE_MAX_BYTES
    assert "300 of 310 live node(s)" in message and "(prepared on 10/310)" in message
    assert nodes[0] in message and nodes[5] not in message and "and 295 more" not in message  # cut, marked
    assert message.endswith("…")
    short = events.aborted_message(0.5, ["node-b"], 2)
    assert short == ("not prepared within 0.5s on 1 of 2 live node(s) (prepared on 1/2); aborted: the mark is "
                     "removed and kube-proxy keeps serving it (`lightpath-redirector debug proxy` on those nodes "
                     "says why); not ready: node-b")
    many = events.aborted_message(30, [f"node-{i}" for i in range(12)], 12)
    assert "node-0, node-1, node-2, node-3, node-4 and 7 more" in many and "node-5" not in many


def test_bounded_cuts_on_a_character_boundary() -> None:
    text = "é" * 600  # 1,200 bytes
    cut = shared_events.bounded(text)
    assert len(cut.encode()) <= 1024 and cut.endswith("…") and set(cut[:-1]) == {"é"}
    assert shared_events.bounded("short") == "short"


def test_event_body_is_a_core_v1_event_on_the_service() -> None:
    body = events.event_body(REF, "uid-1", c.EVENT_HANDOVER_ABORTED, c.EVENT_WARNING, "x" * 5000,
                             action="Migrate", now=NOW, instance="lightpath-cli@laptop")
    nanos = int(NOW.timestamp()) * 10**9 + NOW.microsecond * 1000
    assert body["metadata"] == {"name": f"web.{nanos:x}", "namespace": "shop"}
    assert body["involvedObject"] == {"apiVersion": "v1", "kind": "Service", "namespace": "shop", "name": "web",
                                      "uid": "uid-1"}
    assert (body["reason"], body["type"], body["action"]) == ("HandoverAborted", "Warning", "Migrate")
    assert body["source"] == {"component": "lightpath-cli"} and body["reportingComponent"] == "lightpath-cli"
    assert body["firstTimestamp"] == body["lastTimestamp"] == "2026-12-02T12:00:00Z" and body["count"] == 1
    assert len(body["message"].encode()) <= 1024
    assert "uid" not in events.event_body(REF, None, "R", "Normal", "m", action="Migrate", now=NOW,
                                          instance="i")["involvedObject"]


def test_migrated_message_says_how() -> None:
    assert events.migrated_message("lightpath.cloud", 1.234, "migrate", 3) == (
        "migrated to lightpath.cloud by `lightpath migrate` in 1.23s (make-before-break: prepared on 3/3 live "
        "nodes first)")
    assert "no live node agent Lease" in events.migrated_message("p", 0.1, "migrate", 0)
    assert "--no-handover" in events.migrated_message("p", 0.1, "migrate", None, handover=False)


# ---- the CLI against the sandbox ----------------------------------------------------------------------
class Agents:
    """Stand-in for the node agents' Leases (the agent itself is tested in tests/redirector and tests/e2e):
    every ``nodes`` entry keeps a live Lease; those marked True list each Service carrying the handover mark,
    as an agent does once Envoy ACKed it and its redirect is in place; False ones never do (Envoy refused)."""

    def __init__(self, cluster: Cluster, nodes: dict[str, bool]) -> None:
        self.api = cluster.api.api_client()
        self.core, self.leases = client.CoreV1Api(self.api), client.CoordinationV1Api(self.api)
        self.nodes = nodes
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="fake-agents")
        for node in nodes:
            self.leases.create_namespaced_lease(c.DEFAULT_AGENT_NAMESPACE, lease_body(node, [], datetime.now(UTC)))

    def _marked(self) -> list[str]:
        return sorted(f"{s.metadata.namespace}/{s.metadata.name}"
                      for s in self.core.list_service_for_all_namespaces().items
                      if (s.metadata.annotations or {}).get(c.HANDOVER_ANNOTATION) == c.HANDOVER_MIGRATE)

    def _run(self) -> None:
        while not self.done.wait(0.05):
            marked = self._marked()
            for node, prepares in self.nodes.items():
                body = lease_body(node, marked if prepares else [], datetime.now(UTC))
                self.leases.patch_namespaced_lease(lease_name(node), c.DEFAULT_AGENT_NAMESPACE, body)

    def __enter__(self) -> Agents:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.thread.join(5)


@pytest.fixture
def shop(cluster: Cluster) -> Iterator[Cluster]:
    cluster.create([namespace("shop"), namespace(c.DEFAULT_AGENT_NAMESPACE)],
                   [service("web", "shop"), service("api", "shop")])
    yield cluster


def service_events(cluster: Cluster, name: str) -> list[Any]:
    """The Events `kubectl describe service` lists: selected by the involved object's name, kind and uid."""
    uid = cluster.core.read_namespaced_service(name, "shop").metadata.uid
    found = cluster.core.list_namespaced_event(
        "shop", field_selector=f"involvedObject.name={name},involvedObject.namespace=shop,"
                               f"involvedObject.kind=Service,involvedObject.uid={uid}").items
    return sorted(found, key=lambda e: int(e.metadata.resource_version))


def reasons(found: list[Any]) -> list[tuple[str, str]]:
    return [(e.reason, e.type) for e in found]


def test_a_migration_tells_the_operator_on_the_service(shop: Cluster) -> None:
    with Agents(shop, {"node-a": True, "node-b": True}):
        result = shop.run("migrate", "shop/web", "-o", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["verified"] == ["shop/web"] and report["aborted"] == []
    assert 0 < report["durations"]["shop/web"] <= report["durationSeconds"]
    assert shop.handoff("shop", "web") == OURS
    found = service_events(shop, "web")
    assert reasons(found) == [("HandoverStarted", "Normal"), ("HandoverPrepared", "Normal"), ("Migrated", "Normal")]
    started, prepared, migrated = (e.message for e in found)
    assert started == ("migration to lightpath.cloud started: waiting for 2 live node agents to prepare it "
                       "(timeout 30s)")
    assert prepared.startswith("prepared on 2/2 nodes")
    assert migrated.startswith("migrated to lightpath.cloud by `lightpath migrate` in ")
    assert migrated.endswith("s (make-before-break: prepared on 2/2 live nodes first)")
    assert f"in {report['durations']['shop/web']:.2f}s" in migrated  # the same duration the report gives
    assert {(e.source.component, e.reporting_component, e.action) for e in found} == {
        ("lightpath-cli", "lightpath-cli", "Migrate")}
    assert service_events(shop, "api") == []  # nothing about a Service that was not touched


def test_the_text_report_gives_the_duration(shop: Cluster) -> None:
    result = shop.run("migrate", "shop/web")  # no live Lease: labelled at once
    assert result.code == 0, result.err
    line = next(x for x in result.out.splitlines() if x.startswith("migrated  shop/web -> lightpath"))
    assert line.endswith("s") and " in " in line
    assert "migrate: 1 done, 0 unchanged, 0 skipped, 0 failed, 0 not attempted in " in result.out
    (migrated,) = service_events(shop, "web")
    assert migrated.reason == "Migrated" and "no live node agent Lease" in migrated.message


def test_an_aborted_handover_is_a_warning_naming_the_nodes(shop: Cluster) -> None:
    with Agents(shop, {"node-a": True, "node-b": False}):
        result = shop.run("migrate", "shop/web", "--handover-timeout", "0.5", "-o", "json")
        text = shop.run("migrate", "shop/api", "--handover-timeout", "0.3")
    assert result.code == 1
    report = json.loads(result.out)
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["aborted"] == [{"service": "shop/web", "nodes": ["node-b"]}] and report["verified"] == []
    assert shop.handoff("shop", "web") is None  # kube-proxy keeps it
    found = service_events(shop, "web")
    assert reasons(found) == [("HandoverStarted", "Normal"), ("HandoverAborted", "Warning")]
    aborted = found[-1].message
    assert aborted.startswith("not prepared within 0.5s on 1 of 2 live node(s) (prepared on 1/2); aborted")
    assert "kube-proxy keeps serving it" in aborted and aborted.endswith("not ready: node-b")
    assert text.code == 1 and "1 handover(s) aborted" in text.out and "ABORTED   shop/api" in text.out


def test_a_rollback_is_an_event_too(shop: Cluster) -> None:
    assert shop.run("migrate", "shop/web").code == 0  # no live Lease: labelled at once
    back = shop.run("rollback", "shop/web", "-o", "json")
    assert back.code == 0, back.err
    jsonschema.validate(json.loads(back.out), REPORT_SCHEMA)
    assert shop.handoff("shop", "web") is None
    found = service_events(shop, "web")
    assert reasons(found) == [("Migrated", "Normal"), ("RolledBack", "Normal")]
    assert "no live node agent Lease" in found[0].message
    assert found[1].message.startswith("handed back to kube-proxy by `lightpath rollback` in ")
    assert found[1].action == "Rollback"


def test_events_refused_do_not_fail_or_stop_the_migration(shop: Cluster) -> None:
    """The CLI's user may not create Events (no RBAC grant): the API says 403, the migration goes on, and the
    warning is said once for the namespace, not once per Event."""
    shop.api.forbid(EVENTS, "create")
    with Agents(shop, {"node-a": True}):
        result = shop.run("migrate", "shop/web", "shop/api")
    assert result.code == 0, result.err
    assert shop.handoff("shop", "web") == OURS and shop.handoff("shop", "api") == OURS
    warnings = [x for x in result.out.splitlines() if x.startswith("warning   cannot write Events")]
    assert len(warnings) == 1 and "namespace shop" in warnings[0] and "403" in warnings[0], result.out
    assert shop.core.list_namespaced_event("shop").items == []
    # JSON output stays parseable: the warning goes to stderr
    shop.api.forbid(EVENTS, "create", on=True)
    back = shop.run("rollback", "shop/web", "-o", "json")
    assert back.code == 0 and json.loads(back.out)["verified"] == ["shop/web"]
    assert "cannot write Events in namespace shop" in back.err


def test_no_events_writes_none(shop: Cluster) -> None:
    assert shop.run("migrate", "shop/web", "--no-events").code == 0
    assert shop.core.list_namespaced_event("shop").items == []


def test_a_rollback_during_a_migration_wins_cleanly(shop: Cluster) -> None:
    """Two operators at once (issue 14, bad input): a migration waits for its nodes, a rollback of the same
    Service arrives. The rollback opts out and removes the mark; the migration's final write is guarded by
    the mark's resourceVersion, so it fails cleanly instead of labelling: the later intent wins."""
    gate = threading.Event()
    agents = Agents(shop, {"node-a": True})
    with agents:
        def slow_sleep(seconds: float) -> None:  # the migration's wait for its nodes, held until the rollback
            gate.wait(10)

        from cli.execute import Runner, now_stamp
        from cli.kube import Cluster as KubeCluster
        from cli.plan import Direction, plan_services
        from shared.policy import PolicyConfig

        kube = KubeCluster(shop.api.api_client())
        plan = plan_services(Direction.MIGRATE, [s for s in kube.list_services("shop") if s["metadata"]["name"] == "web"],
                             {"shop": {}}, PolicyConfig(), now_stamp())
        said: list[str] = []
        runner = Runner(cluster=kube, config=PolicyConfig(), ns_labels={"shop": {}}, say=said.append,
                        sleep=slow_sleep, handover_timeout=10)
        result: list[Any] = []
        migration = threading.Thread(target=lambda: result.append(runner.run(plan)))
        migration.start()
        lease = lease_name("node-a")
        wait_for(lambda: "shop/web" in (client.CoordinationV1Api(
            shop.api.api_client()).read_namespaced_lease(lease, c.DEFAULT_AGENT_NAMESPACE).metadata.annotations
            .get(c.PREPARED_ANNOTATION, "")), "node-a to report shop/web prepared")
        agents.done.set()  # the node's last word stands (its Lease stays live): prepared, just before...
        agents.thread.join(5)
        back = shop.run("rollback", "shop/web")  # ...the second operator's rollback
        assert back.code == 0, back.err
        gate.set()
        migration.join(20)
    (report,) = result
    assert not report.ok and any("409" in message or "Conflict" in message for _, message in report.failures), \
        report.failures
    svc = shop.core.read_namespaced_service("web", "shop").metadata
    assert shop.handoff("shop", "web") is None and (svc.labels or {}).get(c.OPT_LABEL) == c.OPT_DISABLED
    assert c.HANDOVER_ANNOTATION not in (svc.annotations or {})
