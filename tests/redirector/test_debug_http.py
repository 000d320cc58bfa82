"""The debug server as an HTTP surface: read-only, validated, bounded, fuzzed (schemathesis), and its
own failures never touching the sync loop. Against a real agent on real nftables (``DebugNode``)."""

from __future__ import annotations

import argparse
import io
import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection, status_code_conformance

from redirector.debug import cli as debug_cli
from redirector.debug import launch
from redirector.debug.server import DebugServer
from redirector.model import Key
from sandbox.node.traffic import wait_until
from tests.redirector.test_debug_node import NS, DebugNode

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def dn() -> Iterator[DebugNode]:
    node = DebugNode()
    try:
        wait_until(lambda: node.agent.status.first_sync_done, timeout=20, what="first sync")
        svc = node.service("web", type_="NodePort", dual=True)
        wait_until(lambda: node.synced({Key(4, svc["spec"]["clusterIPs"][0], 80)}))
        yield node
    finally:
        node.close()


@pytest.mark.parametrize(("path", "params", "message"), [
    ("/debug/lookup", {"ip": "10.96.0.300", "port": "80"}, "is not an IPv4 or IPv6 address"),
    ("/debug/lookup", {"ip": "fe80::1%eth0", "port": "80"}, "is not an IPv4 or IPv6 address"),
    ("/debug/lookup", {"ip": "10.96.0.1", "port": "0"}, "query parameter 'port'"),
    ("/debug/lookup", {"ip": "10.96.0.1", "port": "65536"}, "query parameter 'port'"),
    ("/debug/lookup", {"ip": "10.96.0.1", "port": "http"}, "query parameter 'port'"),
    ("/debug/lookup", {"port": "80"}, "query parameter 'ip'"),
    ("/debug/lookup", {"ip": "", "port": "80"}, "ip is required"),
    ("/debug/rules", {"limit": "0"}, "query parameter 'limit'"),
    ("/debug/rules", {"limit": "5001"}, "query parameter 'limit'"),
    ("/debug/rules", {"continue": "not-a-token"}, "invalid continue token"),
    ("/debug/services", {"limit": "-1"}, "query parameter 'limit'"),
    ("/debug/services", {"continue": "eyJrIjoicnVsZXMiLCJhIjpbNCxmYWxzZSwiMTAuOTYuMS4yIiw3MDAwXX0"},
     "invalid continue token"),  # a /debug/rules token
    ("/debug/diff", {"limit": "many"}, "query parameter 'limit'"),
    ("/healthz", {"format": "yaml"}, "query parameter 'format'"),
])
def test_bad_query_parameters_get_400_with_a_message(
    dn: DebugNode, path: str, params: dict[str, str], message: str
) -> None:
    resp = dn.http.get(path, params=params)
    assert resp.status_code == 400, resp.text
    assert message in resp.json()["detail"]


def test_read_only_get_without_body(dn: DebugNode) -> None:
    for method in ("POST", "PUT", "PATCH", "DELETE", "HEAD"):
        resp = dn.http.request(method, "/debug/rules")
        assert resp.status_code == 405, (method, resp.status_code)
        assert resp.headers.get("allow") == "GET"
    resp = dn.http.request("GET", "/debug/services", content=b'{"limit": 1}')
    assert resp.status_code == 400 and "no request body" in resp.json()["detail"]
    assert dn.http.get("/nope").status_code == 404
    assert dn.http.get("/docs").status_code == 404  # no UI served from a node agent


def test_pages_are_bounded_and_chain(dn: DebugNode) -> None:
    for i in range(3):
        dn.service(f"page-{i}")
    wait_until(lambda: dn.json("/debug/services")["total_services"] == 4)
    names, token = [], None
    while True:
        page = dn.json("/debug/services", limit=1, **({"continue": token} if token else {}))
        assert len(page["services"]) == 1
        names.append(page["services"][0]["name"])
        token = page["continue"]
        if token is None:
            break
    assert names == ["page-0", "page-1", "page-2", "web"]


def test_schema_has_no_422_and_documents_400(dn: DebugNode) -> None:
    schema = dn.http.get("/openapi.json").json()
    for path, ops in schema["paths"].items():
        assert set(ops) == {"get"}, path
        assert "422" not in ops["get"]["responses"] and "400" in ops["get"]["responses"], path


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_finds_no_server_errors(dn: DebugNode, mode: GenerationMode) -> None:
    """Every operation of the app's own OpenAPI schema, valid and invalid inputs, over ASGI in-process.

    (schemathesis' pytest loader ``from_fixture`` does not work with pytest 9, hence hypothesis directly.)
    """
    listener = dn.listen(4)  # a healthy, ready node: any 5xx is then a bug (503 is one for not_a_server_error)
    wait_until(lambda: dn.get("/readyz").status_code == 200)
    schema = schemathesis.openapi.from_asgi("/openapi.json", dn.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 9
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not operation.definition.raw.get("parameters"):
            continue  # /metrics takes nothing: there is no invalid input to make

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            case.call_and_validate(checks=[not_a_server_error, status_code_conformance, negative_data_rejection])

        check()
    listener.stop()
    dn.listeners.remove(listener)


def test_cli_prints_the_tables(dn: DebugNode) -> None:
    parser = argparse.ArgumentParser()
    debug_cli.add_arguments(parser)
    port = str(dn.server.port)
    web = json.loads(dn.core.read_namespaced_service("web", NS, _preload_content=False).data)["spec"]["clusterIP"]

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = debug_cli.run(parser.parse_args([*argv, "--debug-port", port]), out, err)
        return code, out.getvalue(), err.getvalue()

    code, out, _ = run("rules")
    assert code == 0 and f"{web}:80" in out and "OWNER" in out
    code, out, _ = run("lookup", f"{web}:80")
    assert code == 0 and "redirected         yes" in out
    code, out, err = run("lookup", "nonsense:80")
    assert code == 1 and "not an IPv4 or IPv6 address" in err
    code, out, _ = run("readyz")  # nothing listens on the proxy port in this module
    assert code == 1 and "not ready" in out
    code, out, _ = run("services", "--json")
    assert code == 0 and '"total_services"' in out
    assert run("lookup")[0] == 2
    err = io.StringIO()
    unreachable = parser.parse_args(["healthz", "--debug-port", str(_free_port())])
    assert debug_cli.run(unreachable, io.StringIO(), err) == 3 and "cannot reach" in err.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_taken_port_is_logged_counted_and_the_agent_carries_on(
    dn: DebugNode, caplog: pytest.LogCaptureFixture
) -> None:
    before = dn.metric("debug_server_failures_total", reason="bind")
    taken = DebugServer(dn.app, "127.0.0.1", dn.server.port, registry=dn.source.registry)
    with caplog.at_level(logging.ERROR, "lightpath.redirector.debug"):
        assert taken.start() is False
    assert "Address already in use" in (taken.error or "")
    assert dn.metric("debug_server_failures_total", reason="bind") == before + 1
    assert any("redirects are still programmed" in r.getMessage() for r in caplog.records)
    svc = dn.service("after-bind-failure")  # the sync loop is untouched
    wait_until(lambda: dn.synced({Key(4, svc["spec"]["clusterIP"], 80)}))


def test_start_hook_serves_the_agent(dn: DebugNode) -> None:
    """``redirector.debug.launch.start`` as ``redirector.__main__`` calls it (agent, host, port)."""
    port = _free_port()
    stop = launch.start(dn.agent, "127.0.0.1", port, settings=argparse.Namespace(proxy_port=1666, token="x"),
                       sync_thread=dn.threads[1])
    try:
        resp = httpx.get(f"http://127.0.0.1:{port}/healthz", trust_env=False)
        assert resp.status_code == 200 and resp.json()["loopAlive"] is True
        config = httpx.get(f"http://127.0.0.1:{port}/debug/config", trust_env=False).json()
        assert config["agent"] == {"proxy_port": 1666, "token": "<redacted>"}
    finally:
        stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", trust_env=False)
    with pytest.raises(ValueError, match="collides with kube-proxy healthz"):
        launch.start(dn.agent, "127.0.0.1", 10256)
