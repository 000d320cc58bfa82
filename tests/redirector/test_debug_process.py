"""The debug server inside the real agent process (``lightpath-redirector run`` in the node netns): it
serves on the default loopback address, the ``debug`` client prints its tables, and a debug port that is
already taken never stops the redirects from being programmed."""

from __future__ import annotations

import json
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from sandbox.api.apiserver import SandboxApiServer
from sandbox.components import netns_get
from sandbox.node.netns import NetNS, Topology
from sandbox.node.traffic import tcp_listener, wait_until
from shared import constants as c
from tests.redirector.agentproc import AgentProcess

pytestmark = [pytest.mark.root, pytest.mark.slow]
DEBUG = f"http://{c.REDIRECTOR_DEBUG_ADDRESS}:{c.REDIRECTOR_DEBUG_PORT}"
LABELS = {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[NetNS, SandboxApiServer, client.CoreV1Api]]:
    with Topology(pods=0, prefix="lpr") as topo, SandboxApiServer() as api:
        core = client.CoreV1Api(api.api_client())
        core.create_namespace({"metadata": {"name": "shop"}})
        yield topo.node, api, core


def labelled_service(core: client.CoreV1Api, name: str) -> str:
    body = {"metadata": {"name": name, "labels": LABELS}, "spec": {"ports": [{"name": "http", "port": 80}]}}
    created = json.loads(core.create_namespaced_service("shop", body, _preload_content=False).data)
    return str(created["spec"]["clusterIP"])


def kernel_elements(node: NetNS) -> str:
    return node.run(["nft", "list", "set", "inet", "lightpath", "svc4"], check=False).stdout


def test_the_agent_serves_its_debug_endpoints_and_the_client_prints_them(
    world: tuple[NetNS, SandboxApiServer, client.CoreV1Api], tmp_path: Path
) -> None:
    node, api, core = world
    ip = labelled_service(core, "web")
    agent = AgentProcess(node, api, tmp_path)
    try:
        agent.start("--debug-port", str(c.REDIRECTOR_DEBUG_PORT))
        agent.wait_synced()
        wait_until(lambda: netns_get(node, DEBUG + "/healthz")[0] == 200, what="healthz 200")
        status, body = netns_get(node, DEBUG + "/debug/rules")
        assert status == 200 and [e["key"] for e in json.loads(body)["entries"]] == [f"{ip}:80"]
        status, body = netns_get(node, DEBUG + "/readyz")
        assert status == 503 and "nothing listens on TCP port 1666" in json.loads(body)["reason"]
        status, body = netns_get(node, DEBUG + "/debug/config")
        config = json.loads(body)
        assert config["agent"]["backend"] == "nftables" and config["agent"]["debug_port"] == 10666
        printed = node.run([sys.executable, "-m", "redirector.debug.cli", "lookup", f"{ip}:80"], check=False)
        assert printed.returncode == 0, printed.stderr
        assert "redirected         yes" in printed.stdout and "shop/web:http" in printed.stdout
        assert agent.logged("debug server listening") == 1
    finally:
        agent.stop()
        agent.close()


def test_a_taken_debug_port_does_not_stop_the_redirects(
    world: tuple[NetNS, SandboxApiServer, client.CoreV1Api], tmp_path: Path
) -> None:
    node, api, core = world
    squatter = tcp_listener(node, c.REDIRECTOR_DEBUG_PORT, 4, bind=c.REDIRECTOR_DEBUG_ADDRESS, name="squatter")
    agent = AgentProcess(node, api, tmp_path)
    try:
        agent.start("--debug-port", str(c.REDIRECTOR_DEBUG_PORT))
        agent.wait_synced()
        ip = labelled_service(core, "after")
        wait_until(lambda: ip in kernel_elements(node), what="redirect programmed without a debug server")
        assert agent.alive()
        wait_until(lambda: agent.logged("debug server failed"), what="the bind failure logged")
        failed = [line for line in agent.lines() if "debug server failed" in str(line.get("msg"))]
        assert failed and failed[0]["reason"] == "bind" and "in use" in failed[0]["error"]
    finally:
        agent.stop()
        agent.close()
        squatter.stop()


HEALTH = f"http://{c.REDIRECTOR_HEALTH_ADDRESS}:{c.REDIRECTOR_HEALTH_PORT}"


def test_the_health_server_serves_the_probes_with_the_debug_server_off(
    world: tuple[NetNS, SandboxApiServer, client.CoreV1Api], tmp_path: Path
) -> None:
    """``--debug-port 0`` (AgentProcess's default): /healthz, /readyz, /metrics still answer on the health
    port, which serves nothing else; the debug port is closed."""
    node, api, core = world
    labelled_service(core, "web")
    agent = AgentProcess(node, api, tmp_path)
    try:
        agent.start()
        agent.wait_synced()
        wait_until(lambda: netns_get(node, HEALTH + "/healthz")[0] == 200, what="healthz 200")
        status, body = netns_get(node, HEALTH + "/readyz")
        assert status == 503 and "nothing listens on TCP port 1666" in json.loads(body)["reason"]
        status, body = netns_get(node, HEALTH + "/metrics")
        assert status == 200 and "lightpath_redirector_entries" in body
        assert netns_get(node, HEALTH + "/debug/config")[0] == 404
        with pytest.raises(urllib.error.URLError, match="Connection refused"):
            netns_get(node, DEBUG + "/healthz")
        assert agent.logged("health server listening") == 1 and agent.logged("debug server listening") == 0
    finally:
        agent.stop()
        agent.close()


def test_a_taken_health_port_stops_the_agent_with_a_clear_error_and_keeps_the_rules(
    world: tuple[NetNS, SandboxApiServer, client.CoreV1Api], tmp_path: Path
) -> None:
    node, api, core = world
    labelled_service(core, "web")
    agent = AgentProcess(node, api, tmp_path)
    try:
        agent.start()
        agent.wait_synced()
        agent.stop()
        squatter = tcp_listener(node, c.REDIRECTOR_HEALTH_PORT, 4, bind=c.REDIRECTOR_HEALTH_ADDRESS, name="squatter")
        try:
            agent.start()
            assert agent.proc is not None and agent.proc.wait(timeout=30) == 1
            failed = [line for line in agent.lines() if "health server failed to start" in str(line.get("msg"))]
            assert failed and "in use" in failed[0]["error"], agent.tail()
            assert "lightpath" in node.run(["nft", "list", "tables"]).stdout, "the rules stay in place"
        finally:
            squatter.stop()
    finally:
        agent.stop()
        agent.close()
