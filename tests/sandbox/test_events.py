"""core/v1 Events in the sandbox API server (a test double): create/list with kube-apiserver's event field
selectors, its legacy validation, a namespace delete taking them along, an RBAC-style 403 on demand, and
`kubectl describe` / `kubectl get events` reading them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from sandbox.api.apiserver import SandboxApiServer
from sandbox.api.resources import EVENTS


@pytest.fixture
def core(server: SandboxApiServer) -> CoreV1Api:
    api = CoreV1Api(server.api_client())
    api.create_namespace({"metadata": {"name": "demo"}})
    return api


def event(name: str, involved: dict[str, Any], reason: str = "Tested", **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "involvedObject": involved, "reason": reason, "message": f"{reason}!",
            "type": "Normal", "source": {"component": "tester"}, "count": 1, **extra}


def test_events_are_created_and_selected_by_involved_object(core: CoreV1Api) -> None:
    web = core.create_namespaced_service("demo", {"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}})
    ref = {"apiVersion": "v1", "kind": "Service", "namespace": "demo", "name": "web", "uid": web.metadata.uid}
    core.create_namespaced_event("demo", event("web.1", ref, "First"))
    core.create_namespaced_event("demo", event("web.2", ref, "Second", type="Warning"))
    core.create_namespaced_event("demo", event("api.1", {**ref, "name": "api", "uid": "other"}))
    selected = core.list_namespaced_event(
        "demo", field_selector=f"involvedObject.name=web,involvedObject.namespace=demo,involvedObject.kind=Service,"
                               f"involvedObject.uid={web.metadata.uid}")
    assert [(e.metadata.name, e.reason) for e in selected.items] == [("web.1", "First"), ("web.2", "Second")]
    assert [e.reason for e in core.list_namespaced_event("demo", field_selector="type=Warning").items] == ["Second"]
    assert len(core.list_namespaced_event("demo", field_selector="source=tester").items) == 3
    assert len(core.list_event_for_all_namespaces().items) == 3
    with pytest.raises(ApiException) as exc:
        core.list_namespaced_event("demo", field_selector="spec.type=x")
    assert exc.value.status == 400
    core.delete_namespace("demo")  # a Namespace takes everything in it along
    assert core.list_event_for_all_namespaces().items == []


def test_legacy_event_validation(core: CoreV1Api) -> None:
    elsewhere = {"kind": "Service", "namespace": "other", "name": "web"}
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_event("demo", event("web.1", elsewhere))
    assert exc.value.status == 422 and "does not match event.namespace" in json.loads(exc.value.body)["message"]
    # The newer form (eventTime) needs the reporting fields and a message of at most 1 KiB.
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_event("demo", event("web.2", {**elsewhere, "namespace": "demo"},
                                                   eventTime="2026-12-02T12:00:00.000000Z", message="x" * 1025))
    message = json.loads(exc.value.body)["message"]
    assert exc.value.status == 422
    assert all(f in message for f in ("reportingComponent", "reportingInstance", "action", "message"))


def test_forbid_answers_like_rbac(server: SandboxApiServer, core: CoreV1Api) -> None:
    server.forbid(EVENTS, "create")
    involved = {"kind": "Service", "namespace": "demo", "name": "web"}
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_event("demo", event("web.1", involved))
    status = json.loads(exc.value.body)
    assert exc.value.status == 403 and status["reason"] == "Forbidden"
    assert status["message"] == ('events is forbidden: User "system:anonymous" cannot create resource "events" '
                                 'in API group "" in the namespace "demo"')
    assert core.list_namespaced_event("demo").items == []  # list is still allowed
    server.forbid(EVENTS, "create", on=False)
    core.create_namespaced_event("demo", event("web.1", involved))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_describe_lists_the_events(server: SandboxApiServer, core: CoreV1Api, tmp_path: Path) -> None:
    web = core.create_namespaced_service("demo", {"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}})
    ref = {"apiVersion": "v1", "kind": "Service", "namespace": "demo", "name": "web", "uid": web.metadata.uid}
    core.create_namespaced_event("demo", event("web.1", ref, "HandoverStarted", message="waiting for 3 agents",
                                               firstTimestamp="2026-12-02T12:00:00Z",
                                               lastTimestamp="2026-12-02T12:00:00Z"))
    kubeconfig = str(server.write_kubeconfig(tmp_path / "kubeconfig"))

    def kubectl(*args: str) -> str:
        done = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, *args], capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    described = kubectl("describe", "service", "-n", "demo", "web")
    (line,) = [x for x in described.splitlines() if "HandoverStarted" in x]
    assert line.split()[:2] == ["Normal", "HandoverStarted"] and "tester" in line and "waiting for 3 agents" in line
    listed = kubectl("get", "events", "-n", "demo")
    assert "service/web" in listed and "HandoverStarted" in listed
