"""The agent and its DaemonSet: rules stay on any stop (rolling update, eviction, crash), and go when the
DaemonSet was deleted (``kubectl delete -k deploy/default``): ``OwnerState`` (pure sink) and the real agent
process with real nftables against the sandbox API server (a test double)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from redirector.owner import OwnerState
from sandbox.api.apiserver import SandboxApiServer
from sandbox.api.resources import NAMESPACES, SERVICES
from sandbox.node.netns import Topology, nft
from sandbox.node.traffic import wait_until
from shared import constants as c
from tests.redirector.agentproc import AgentProcess

DS = "lightpath-redirector"
NS = "lightpath-node"


def ds(deleting: bool = False, name: str = DS) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-02T12:00:00Z"
    return {"metadata": meta}


def test_owner_state_follows_its_daemonset_only() -> None:
    state = OwnerState(DS)
    state.replace([])
    assert not state.deleting  # never seen (wrong name, or not run by a DaemonSet): unsure, keep the rules
    state.replace([ds()])
    assert (state.seen, state.deleting) == (True, False)
    state.upsert(ds(name="other"))
    state.delete(ds(name="other"))
    assert not state.deleting
    state.upsert(ds(deleting=True))  # foreground deletion: marked first
    assert state.deleting
    state.upsert(ds())
    assert not state.deleting
    state.delete(ds())
    assert state.deleting
    again = OwnerState(DS)
    again.replace([ds()])
    again.replace([])  # gone while the watch was down: the re-list says so
    assert again.deleting


def daemonset() -> dict[str, Any]:
    labels = {"app": "lightpath-redirector"}
    return {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": DS},
            "spec": {"selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "r", "image": "i"}]}}}}


@pytest.mark.root
def test_rules_stay_on_a_stop_and_go_once_the_daemonset_is_deleted(tmp_path: Path) -> None:
    with Topology(pods=1, prefix="lpo") as topo, SandboxApiServer(bookmark_interval=0.2) as api:
        for ns in ("shop", NS):
            api.operations.create(NAMESPACES, None, {"metadata": {"name": ns}})
        apps = client.AppsV1Api(api.api_client())
        apps.create_namespaced_daemon_set(NS, daemonset())
        api.operations.create(SERVICES, "shop", {"metadata": {"name": "web", "labels": {
            c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}}, "spec": {"ports": [{"port": 80}]}})
        agent = AgentProcess(topo.node, api, tmp_path, ["--daemonset", DS, "--lease-namespace", NS,
                                                        "--watch-read-timeout", "1.5", "--watch-timeout", "30"])

        def tables() -> str:
            return nft(topo.node.name, "list tables")

        def lo() -> str:
            return topo.node.run(["ip", "addr", "show", "dev", "lo"]).stdout

        try:
            agent.start().wait_synced()
            wait_until(lambda: "inet lightpath" in tables(), timeout=10, what="our table")
            assert agent.signal(signal.SIGTERM) == 0  # e.g. a rolling update: the DaemonSet is still there
            assert "inet lightpath" in tables() and c.DEFAULT_REDIRECT_ADDRESS in lo()
            agent.start().wait_synced()
            apps.delete_namespaced_daemon_set(DS, NS)
            wait_until(lambda: agent.logged("DaemonSet is being deleted"), timeout=10, what="the deletion seen")
            assert agent.signal(signal.SIGTERM) == 0
            assert "lightpath" not in tables() and c.DEFAULT_REDIRECT_ADDRESS not in lo()
            assert agent.logged("cleanup done")
        finally:
            agent.close()
