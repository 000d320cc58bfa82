"""The I/O shell against the sandbox API server (a test double): paginated lists, merge patches, errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes.client.exceptions import ApiException

from cli.kube import Cluster, ClusterError, connect
from sandbox.api.apiserver import SandboxApiServer
from shared import constants as c
from tests.cli.cluster import namespace, service


@pytest.fixture
def api() -> Iterator[SandboxApiServer]:
    with SandboxApiServer() as server:
        yield server


def test_lists_are_paginated_and_complete(api: SandboxApiServer) -> None:
    cluster = Cluster(api.api_client(), page_size=3)
    core = cluster.core
    core.create_namespace(namespace("a"))
    core.create_namespace(namespace("b"))
    for i in range(7):
        core.create_namespaced_service("a" if i % 2 else "b", service(f"s{i}", "a" if i % 2 else "b"))
    everything = cluster.list_services(None)
    assert sorted(s["metadata"]["name"] for s in everything) == [f"s{i}" for i in range(7)]
    assert {s["metadata"]["name"] for s in cluster.list_services("a")} == {"s1", "s3", "s5"}
    assert {"a", "b"} <= {n["metadata"]["name"] for n in cluster.list_namespaces()}


def test_merge_patch_touches_only_the_one_label(api: SandboxApiServer) -> None:
    cluster = Cluster(api.api_client())
    cluster.core.create_namespace(namespace("shop"))
    cluster.core.create_namespaced_service("shop", service("web", "shop", labels={"team": "a"}))
    stored = cluster.patch_service("shop", "web", {"metadata": {"labels": {c.OPT_LABEL: c.OPT_ENABLED}}})
    assert stored["metadata"]["labels"] == {"team": "a", c.OPT_LABEL: c.OPT_ENABLED}
    removed = cluster.patch_service("shop", "web", {"metadata": {"labels": {c.OPT_LABEL: None}}})
    assert removed["metadata"]["labels"] == {"team": "a"}
    assert (
        cluster.patch_namespace("shop", {"metadata": {"labels": {"x": "y"}}})["metadata"]["labels"]["x"]
        == "y"
    )
    assert cluster.get_service("shop", "nope") is None


def test_conflicts_are_retried_other_errors_are_not(api: SandboxApiServer) -> None:
    cluster = Cluster(api.api_client())
    attempts: list[int] = []

    def conflict_twice() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ApiException(status=409, reason="Conflict")
        return "ok"

    assert cluster._call("patch Service x/y", conflict_twice) == "ok" and len(attempts) == 3

    def forbidden() -> str:
        raise ApiException(status=403, reason="Forbidden")

    with pytest.raises(ClusterError, match="patch Service x/y: 403 Forbidden") as info:
        cluster._call("patch Service x/y", forbidden)
    assert info.value.status == 403


def test_api_errors_carry_the_server_message(api: SandboxApiServer) -> None:
    cluster = Cluster(api.api_client())
    with pytest.raises(ClusterError, match=r"patch Service ghost/web: 404 .*not found"):
        cluster.patch_service("ghost", "web", {"metadata": {"labels": {"a": "b"}}})


def test_unreachable_api_server(api: SandboxApiServer, tmp_path) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    cluster, default_ns = connect(str(kubeconfig), None)
    assert default_ns == "default"
    api.stop()
    cluster.api.configuration.retries = 0
    with pytest.raises(ClusterError, match="cannot reach the API server"):
        cluster.list_namespaces()


def test_unknown_context(api: SandboxApiServer, tmp_path) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    with pytest.raises(ClusterError, match="cannot load kubeconfig"):
        connect(str(kubeconfig), "prod")
