"""The handover controller: the pure round (what to do with each marked Service), and the shell against the
sandbox API server (the TEST DOUBLE, through the real kubernetes client) with agent Leases written as the
node agents write them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client

from sandbox.api.apiserver import SandboxApiServer
from sandbox.api.resources import NAMESPACES
from shared import constants as c
from shared.policy import PolicyConfig
from tests.support.polling import wait_for
from webhook.handover import HandoverController, Marked, actions

OPTED = {c.OPT_LABEL: c.OPT_ENABLED}


def test_a_round_labels_the_prepared_aborts_the_late_and_drops_stale_marks() -> None:
    agents = {"n1": {"shop/a", "shop/b"}, "n2": {"shop/a"}}
    steps = actions([Marked("shop/a", True, 0.0), Marked("shop/b", True, 0.0), Marked("shop/c", True, 9.0),
                     Marked("shop/d", False, 0.0), Marked("shop/e", False, 9.0)], agents, now=10.0, timeout=5.0)
    by = {s.sid: s for s in steps}
    assert by["shop/a"].what == "label" and by["shop/a"].agents == 2
    assert by["shop/b"].what == "abort" and by["shop/b"].nodes == ("n2",)
    assert "shop/c" not in by  # marked 1 s ago: still waiting
    assert by["shop/d"].what == "drop"  # not wanted, marked for 2 x timeout: its driver is gone
    assert "shop/e" not in by
    assert actions([Marked("shop/a", True, 0.0)], {}, 0.0, 5.0)[0].what == "label"  # no live agent: nothing blocks


@pytest.fixture
def api() -> Iterator[SandboxApiServer]:
    with SandboxApiServer() as server:
        for ns in ("shop", c.DEFAULT_AGENT_NAMESPACE):
            server.operations.create(NAMESPACES, None, {"metadata": {"name": ns, "labels": OPTED}})
        yield server


def agent_lease(api: SandboxApiServer, node: str, prepared: list[str], *, age: float = 0.0) -> None:
    renewed = datetime.now(UTC) - timedelta(seconds=age)
    body = {"metadata": {"name": c.AGENT_LEASE_PREFIX + node,
                         "annotations": {c.PREPARED_ANNOTATION: json.dumps(prepared)}},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": 15,
                     "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
    leases = client.CoordinationV1Api(api.api_client())
    try:  # as the agents do: a merge patch, created when missing (never deleted meanwhile)
        leases.patch_namespaced_lease(body["metadata"]["name"], c.DEFAULT_AGENT_NAMESPACE, body)
    except client.ApiException:
        leases.create_namespaced_lease(c.DEFAULT_AGENT_NAMESPACE, body)


def marked(api: SandboxApiServer, name: str, value: str = c.HANDOVER_MIGRATE, protocol: str = "TCP") -> None:
    client.CoreV1Api(api.api_client()).create_namespaced_service("shop", {
        "metadata": {"name": name, "annotations": {c.HANDOVER_ANNOTATION: value}},
        "spec": {"ports": [{"name": "http", "port": 80, "protocol": protocol}]}})


def controller(api: SandboxApiServer, events: list[tuple[str, str, str]], **kw: Any) -> HandoverController:
    ctl = HandoverController(api.api_client(), PolicyConfig(), lambda ns: OPTED, period=0.05,
                             emit=lambda svc, kind, reason, message: events.append((kind, reason, message)), **kw)
    ctl.start()
    return ctl


def service(api: SandboxApiServer, name: str) -> Any:
    return client.CoreV1Api(api.api_client()).read_namespaced_service(name, "shop").metadata


def test_the_controller_labels_once_every_live_agent_prepared_it(api: SandboxApiServer) -> None:
    agent_lease(api, "n1", [])
    agent_lease(api, "n2", [])
    agent_lease(api, "gone", [], age=60)  # expired: does not block
    events: list[tuple[str, str, str]] = []
    marked(api, "web")
    ctl = controller(api, events)
    try:
        wait_for(lambda: any(e[1] == c.EVENT_HANDOVER_STARTED for e in events), "the handover-started event")
        agent_lease(api, "n1", ["shop/web"])
        rounds = ctl.rounds
        wait_for(lambda: ctl.rounds >= rounds + 5, "five more rounds")  # several rounds with n2 not ready: nothing may happen
        assert c.SERVICE_PROXY_NAME_LABEL not in (service(api, "web").labels or {})
        agent_lease(api, "n2", ["shop/web"])
        wait_for(lambda: (service(api, "web").labels or {}).get(c.SERVICE_PROXY_NAME_LABEL) == c.DEFAULT_PROXY_NAME,
                 "the handoff label")
        assert c.HANDOVER_ANNOTATION not in (service(api, "web").annotations or {})
        wait_for(lambda: any(e[1] == c.EVENT_MIGRATED for e in events), "the migrated event")
        assert "prepared on all 2 live node(s)" in [e for e in events if e[1] == c.EVENT_MIGRATED][0][2]
    finally:
        ctl.stop()


def test_the_controller_aborts_after_its_timeout_naming_the_nodes(api: SandboxApiServer) -> None:
    agent_lease(api, "n1", [])
    events: list[tuple[str, str, str]] = []
    marked(api, "web")
    ctl = controller(api, events, timeout=0.5)
    try:
        wait_for(lambda: any(e[1] == c.EVENT_HANDOVER_ABORTED for e in events), "the handover-aborted event")
        meta = service(api, "web")
        assert c.HANDOVER_ANNOTATION not in (meta.annotations or {})
        assert c.SERVICE_PROXY_NAME_LABEL not in (meta.labels or {})
        (kind, _, message), = [e for e in events if e[1] == c.EVENT_HANDOVER_ABORTED]
        assert kind == c.EVENT_WARNING and "on 1 of 1 live node(s) (n1)" in message
        assert ctl.done["abort"] == 1
    finally:
        ctl.stop()


def test_a_follower_does_nothing(api: SandboxApiServer) -> None:
    events: list[tuple[str, str, str]] = []
    marked(api, "web")
    ctl = controller(api, events, leading=lambda: False)
    try:
        wait_for(lambda: ctl.reflector.lists >= 1, "the first list")
        wait_for(lambda: ctl.rounds >= 5, "five rounds")  # rounds pass: a follower never writes
        assert c.HANDOVER_ANNOTATION in (service(api, "web").annotations or {}) and not events
    finally:
        ctl.stop()


def test_an_annotation_agents_ignore_gets_one_warning_event_and_no_write(api: SandboxApiServer) -> None:
    events: list[tuple[str, str, str]] = []
    marked(api, "odd", value="yes please")
    marked(api, "dns", protocol="UDP")
    versions = {n: service(api, n).resource_version for n in ("odd", "dns")}
    ctl = controller(api, events)
    try:
        wait_for(lambda: ctl.rounds >= 5, "five rounds")
        ignored = sorted(m for kind, reason, m in events if reason == c.EVENT_HANDOVER_IGNORED and kind == c.EVENT_WARNING)
        assert len(ignored) == 2, events  # once each, not once per round
        assert "value 'yes please' is not 'migrate'" in ignored[1] and "cannot be handed over" in ignored[0]
        assert {n: service(api, n).resource_version for n in ("odd", "dns")} == versions  # nothing written
    finally:
        ctl.stop()
