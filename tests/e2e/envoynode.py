"""A node as deployed: ``lightpath-redirector run`` with its control plane, a real Envoy on the xDS socket,
pods with echo servers, all in network namespaces; the Kubernetes API is the sandbox TEST DOUBLE."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubernetes import client

from redirector.iptables import IptablesBackend
from redirector.model import Key
from sandbox.api.apiserver import SandboxApiServer
from sandbox.api.resources import NAMESPACES
from sandbox.components import netns_get
from sandbox.node.envoy_process import EnvoyProcess
from sandbox.node.netns import NetNS, Topology
from sandbox.node.traffic import Listener, http_listener, tcp_listener
from shared import constants as c
from tests.redirector.agentproc import AgentProcess
from tests.redirector.conftest import nft_backend

NS = "shop"
NODE = "sandbox-node"
DEBUG = f"http://{c.REDIRECTOR_DEBUG_ADDRESS}:{c.REDIRECTOR_DEBUG_PORT}"
CLUSTER_IPS = ("10.96.0.10", "fd00:10:96::10")
DB_IPS = ("10.96.0.20", "fd00:10:96::20")
HTTP_PORTS = [{"name": "http", "port": 80, "targetPort": "web", "appProtocol": "http"}]
TCP_PORTS = [{"name": "db", "port": 5432, "targetPort": 5433}]


class EnvoyNode:
    def __init__(self, api: SandboxApiServer, topo: Topology, workdir: Path, agent_args: Sequence[str] = (),
                 name: str = NODE) -> None:
        self.api, self.topo, self.workdir, self.name = api, topo, workdir, name
        self.socket = workdir / "run" / "xds.sock"
        self.agent = AgentProcess(topo.node, api, workdir, args=[
            "--xds-socket", str(self.socket), "--node-name", name, "--debug-port", str(c.REDIRECTOR_DEBUG_PORT),
            "--batch-idle", "0.001", *agent_args])
        self.envoy = EnvoyProcess(topo.node, workdir / "envoy", xds_socket=self.socket, node_id=name)
        self.core = client.CoreV1Api(api.api_client())
        self.discovery = client.DiscoveryV1Api(api.api_client())
        args = list(agent_args)
        iptables = "--backend" in args and args[args.index("--backend") + 1] == "iptables"
        self.kernel = IptablesBackend(netns=topo.node.name) if iptables else nft_backend(topo.node.name)
        self.listeners: list[Listener] = []
        self.more_envoys: list[EnvoyProcess] = []

    # -- objects --------------------------------------------------------------------------------------

    def service(self, name: str, ports: Sequence[dict[str, Any]], *, ips: Sequence[str] = CLUSTER_IPS[:1],
                labelled: bool = True, **spec: Any) -> dict[str, Any]:
        labels = {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME} if labelled else {}
        families = ["IPv6" if ":" in ip else "IPv4" for ip in ips]
        body = {"metadata": {"name": name, "namespace": NS, "labels": labels},
                "spec": {"clusterIP": ips[0], "clusterIPs": list(ips), "ipFamilies": families,
                         "ipFamilyPolicy": "RequireDualStack" if len(ips) > 1 else "SingleStack",
                         "ports": [{"protocol": "TCP", **p} for p in ports], **spec}}
        created: dict[str, Any] = self.core.create_namespaced_service(NS, body, _preload_content=False).json()
        return created

    def endpoints(self, service: str, ports: dict[str, int], pods: Sequence[int], *, family: int = 4,
                  ready: Sequence[bool] | None = None, name: str | None = None) -> None:
        """Create or replace the Service's EndpointSlice of ``family`` listing ``pods`` (indexes) on this node."""
        states = list(ready) if ready is not None else [True] * len(pods)
        self.slice(service, ports, [{"pod": i, "ready": ok} for i, ok in zip(pods, states, strict=True)],
                   family=family, name=name)

    def slice(self, service: str, ports: dict[str, int], endpoints: Sequence[dict[str, Any]], *, family: int = 4,
              name: str | None = None) -> None:
        """Create or replace an EndpointSlice from endpoint specs: {"pod": i, "node": name, "ready": bool,
        "serving": bool, "terminating": bool, "zone": z, "for_zones": [...], "for_nodes": [...]}."""
        ips = self.topo.pod_ips if family == 4 else self.topo.pod_ips6
        items = []
        for spec in endpoints:
            conditions = {k: spec[k] for k in ("ready", "serving", "terminating") if k in spec}
            item: dict[str, Any] = {"addresses": [ips[spec["pod"]]], "nodeName": spec.get("node", self.name),
                                    "conditions": conditions or {"ready": True}}
            if "zone" in spec:
                item["zone"] = spec["zone"]
            hints = {}
            if "for_zones" in spec:
                hints["forZones"] = [{"name": z} for z in spec["for_zones"]]
            if "for_nodes" in spec:
                hints["forNodes"] = [{"name": n} for n in spec["for_nodes"]]
            if hints:
                item["hints"] = hints
            items.append(item)
        slice_name = name or f"{service}-ipv{family}"
        body = {"metadata": {"name": slice_name, "namespace": NS, "labels": {"kubernetes.io/service-name": service}},
                "addressType": f"IPv{family}", "endpoints": items,
                "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports.items()]}
        try:
            self.discovery.read_namespaced_endpoint_slice(slice_name, NS, _preload_content=False)
        except client.ApiException:
            self.discovery.create_namespaced_endpoint_slice(NS, body, _preload_content=False)
        else:
            self.discovery.replace_namespaced_endpoint_slice(slice_name, NS, body, _preload_content=False)

    def web_and_db(self) -> frozenset[Key]:
        """The dual-stack workload of the control-plane tests: HTTP ``web`` (CLUSTER_IPS, pod 1) and TCP ``db``
        (DB_IPS, pod 2, port 5433); the four keys the kernel redirects once Envoy serves them."""
        web4, web6 = self.serve(1, "http", 4), self.serve(1, "http", 6)
        self.serve(2, "tcp", 4, port=5433)
        self.serve(2, "tcp", 6, port=5433)
        self.service("web", HTTP_PORTS, ips=CLUSTER_IPS)
        self.endpoints("web", {"http": web4.port}, [1], family=4)
        self.endpoints("web", {"http": web6.port}, [1], family=6)
        self.service("db", TCP_PORTS, ips=DB_IPS)
        self.endpoints("db", {"db": 5433}, [2], family=4)
        self.endpoints("db", {"db": 5433}, [2], family=6)
        return frozenset({Key(4, CLUSTER_IPS[0], 80), Key(6, CLUSTER_IPS[1], 80), Key(4, DB_IPS[0], 5432),
                          Key(6, DB_IPS[1], 5432)})

    def another_envoy(self, name: str, **kw: Any) -> EnvoyProcess:
        """One more Envoy on the same xDS socket (a rollout's successor: its own workdir, base id and, with
        ``admin_port=0``, admin port), stopped with the node; not started."""
        envoy = EnvoyProcess(self.topo.node, self.workdir / name, xds_socket=self.socket, node_id=self.name, **kw)
        self.more_envoys.append(envoy)
        return envoy

    def serve(self, pod: int, mode: str = "http", family: int = 4, port: int = 0) -> Listener:
        ns = self.topo.pods[pod]
        listener = (http_listener if mode == "http" else tcp_listener)(ns, port, family, name=f"pod{pod}")
        self.listeners.append(listener)
        return listener

    # -- facts ----------------------------------------------------------------------------------------

    def kernel_keys(self) -> frozenset[Key]:
        return frozenset(self.kernel.read())

    def debug(self, path: str) -> tuple[int, Any]:
        status, body = netns_get(self.topo.node, DEBUG + path)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def proxy(self, service: str | None = None) -> dict[str, Any]:
        status, body = self.debug("/debug/proxy" + (f"?service={NS}/{service}" if service else ""))
        assert status == 200, body
        return dict(body)

    def envoy_counter(self, name: str) -> int:
        """One of this node's Envoy counters (0 when Envoy has not created it yet)."""
        status, body = netns_get(self.topo.node, f"http://127.0.0.1:{c.ENVOY_ADMIN_PORT}/stats?filter=^{name}$")
        assert status == 200, body
        found = [line.split(": ", 1)[1] for line in body.splitlines() if line.startswith(f"{name}: ")]
        return int(found[0]) if found else 0

    def served_keys(self, service: str) -> set[str]:
        rows = self.proxy(service)["services"]
        return {k["key"] for row in rows for k in row["keys"] if k["served"]}

    def close(self) -> None:
        for listener in self.listeners:
            listener.stop()
        for envoy in self.more_envoys:
            envoy.stop()
        self.envoy.stop()
        self.agent.stop()


@contextmanager
def envoy_node(workdir: Path, *, pods: int = 3, start_envoy: bool = True, agent_args: Sequence[str] = (),
               agent_env: dict[str, str] | None = None, addressless: bool = False) -> Iterator[EnvoyNode]:
    """``addressless``: the Calico-style node (``Topology(addressless=True)``), host veths without an address."""
    with SandboxApiServer(bookmark_interval=1.0) as api, Topology(pods, prefix="lpr", addressless=addressless) as topo:
        api.operations.create(NAMESPACES, None, {"metadata": {"name": NS}})
        api.operations.create(NAMESPACES, None, {"metadata": {"name": c.DEFAULT_AGENT_NAMESPACE}})  # its Lease
        node = EnvoyNode(api, topo, workdir, agent_args)
        try:
            node.agent.start(env=agent_env)
            node.agent.wait_synced()
            if start_envoy:
                node.envoy.start()
            yield node
        finally:
            node.close()


def pod(node: EnvoyNode, i: int) -> NetNS:
    return node.topo.pods[i]
