"""`lightpath uninstall`: which Services it hands back, which nodes it waits for (pure), and against the
sandbox API server (a test double): a node still holding redirects stops it with the node named; the
command line reaches it."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client

from cli.kube import Cluster
from cli.main import main
from cli.uninstall import handed_off, redirects_left, uninstall
from redirector.lease import lease_body
from sandbox.api.apiserver import SandboxApiServer
from sandbox.api.resources import LEASES, MUTATING_WEBHOOKS, NAMESPACES, SERVICES
from shared import constants as c

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
OURS = {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}


def svc(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "shop", "labels": labels}}


def test_only_our_label_is_handed_back() -> None:
    services = [svc("web", OURS), svc("mesh", {c.SERVICE_PROXY_NAME_LABEL: "cilium"}), svc("plain", {})]
    assert handed_off(services, c.DEFAULT_PROXY_NAME) == [("shop", "web")]


def versioned(lease: dict[str, Any], rv: str) -> dict[str, Any]:
    lease["metadata"]["resourceVersion"] = rv
    return lease


def test_live_agents_must_report_zero_and_expired_ones_do_not_block() -> None:
    leases = [versioned(lease_body("n1", [], NOW, redirects=0), "1"), versioned(lease_body("n2", [], NOW, redirects=3), "2"),
              versioned(lease_body("n3", [], NOW), "3"),
              versioned(lease_body("n4", [], NOW - timedelta(minutes=5), redirects=9), "4")]
    left, seen = redirects_left(leases, NOW)
    # n3: an agent that does not report; n4 expired; n1's "0" counts only once written after this first read
    assert left == {"n1": "not renewed since the hand-back", "n2": "3", "n3": "?"}
    assert seen == {"n1": "1", "n2": "2", "n3": "3"}
    # A "0" written before the labels went does not count: the Lease must have been written again.
    assert redirects_left(leases, NOW, baseline=seen)[0]["n1"] == "not renewed since the hand-back"
    renewed = [versioned(lease_body("n1", [], NOW, redirects=0), "7")]
    assert redirects_left(renewed, NOW, baseline=seen)[0] == {}


def test_a_node_still_holding_redirects_stops_the_uninstall_and_is_named(tmp_path: Any) -> None:
    with SandboxApiServer() as api:
        for ns in ("shop", c.DEFAULT_AGENT_NAMESPACE):
            api.operations.create(NAMESPACES, None, {"metadata": {"name": ns}})
        api.operations.create(MUTATING_WEBHOOKS, None, {"metadata": {
            "name": "lightpath", "labels": {"app.kubernetes.io/part-of": "lightpath"}}, "webhooks": []})
        api.operations.create(MUTATING_WEBHOOKS, None, {"metadata": {"name": "someone-else"}, "webhooks": []})
        api.operations.create(SERVICES, "shop", {"metadata": {"name": "web", "labels": OURS},
                                                 "spec": {"ports": [{"port": 80}]}})
        lease = lease_body("node-a", [], datetime.now(UTC), redirects=2)
        api.operations.create(LEASES, c.DEFAULT_AGENT_NAMESPACE, lease)
        said: list[str] = []
        cluster = Cluster(api.api_client())
        assert uninstall(cluster, proxy_name=c.DEFAULT_PROXY_NAME, agent_namespace=c.DEFAULT_AGENT_NAMESPACE,
                         timeout=0.5, say=said.append) == 1
        assert any("node-a (2)" in line and "do not delete" in line for line in said), said
        service = cluster.get_service("shop", "web")
        assert service is not None and c.SERVICE_PROXY_NAME_LABEL not in (service["metadata"].get("labels") or {})
        hooks = [h["metadata"]["name"] for h in cluster.list_webhook_configurations("")]
        assert hooks == ["someone-else"]  # only ours deleted
        # Once the node's agent writes 0 (renewing its Lease, as agents do every 5 s), the command line
        # finishes with 0.
        leases = client.CoordinationV1Api(api.api_client())
        done = threading.Event()

        def agent_renews() -> None:
            while not done.wait(0.1):
                leases.patch_namespaced_lease(
                    lease["metadata"]["name"], c.DEFAULT_AGENT_NAMESPACE,
                    {"metadata": {"annotations": {c.REDIRECTS_ANNOTATION: "0"}},
                     "spec": {"renewTime": lease_body("node-a", [], datetime.now(UTC))["spec"]["renewTime"]}},
                    _content_type="application/merge-patch+json")

        renewer = threading.Thread(target=agent_renews, daemon=True)
        renewer.start()
        try:
            kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
            assert main(["--kubeconfig", str(kubeconfig), "uninstall", "--timeout", "10"]) == 0
        finally:
            done.set()
            renewer.join(5)
