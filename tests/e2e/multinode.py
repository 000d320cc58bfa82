"""Several nodes as deployed, on one pod network (``sandbox.node.multinode``): per node the agent with its
control plane, a real Envoy and the kube-proxy STAND-IN, all watching one sandbox API server (the TEST
DOUBLE), and the real webhook over TLS registered from deploy/default, as ``make demo`` runs it (the CLI's
migrate opts Services in; the webhook labels them). Services are created unlabelled (not opted in);
EndpointSlices list pods on every node."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

from sandbox import components as comp
from sandbox.api.apiserver import SandboxApiServer
from sandbox.api.resources import NAMESPACES
from sandbox.kubeproxy import StandinSync
from sandbox.node.multinode import MultiNode
from shared import constants as c
from tests.e2e.envoynode import NS, EnvoyNode


@dataclass
class Cluster:
    api: SandboxApiServer
    nodes: list[EnvoyNode]
    standins: list[StandinSync] = field(default_factory=list)

    @property
    def core(self) -> client.CoreV1Api:
        return self.nodes[0].core

    def service(self, name: str, ports: Sequence[dict[str, Any]], ip: str, **kw: Any) -> None:
        self.nodes[0].service(name, ports, ips=(ip,), labelled=False, **kw)

    def slice(self, service: str, ports: dict[str, int], placements: Sequence[tuple[int, int]]) -> None:
        """One IPv4 EndpointSlice: a ready endpoint per (node index, pod index)."""
        items = [{"addresses": [self.nodes[n].topo.pod_ips[p]], "nodeName": self.nodes[n].name,
                  "conditions": {"ready": True}} for n, p in placements]
        body = {"metadata": {"name": f"{service}-ipv4", "namespace": NS,
                             "labels": {"kubernetes.io/service-name": service}},
                "addressType": "IPv4", "endpoints": items,
                "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports.items()]}
        client.DiscoveryV1Api(self.api.api_client()).create_namespaced_endpoint_slice(NS, body, _preload_content=False)


@contextmanager
def cluster(workdir: Path, *, nodes: int = 3, pods: int = 2, agent_args: Sequence[str] = (),
            min_sync_period: float = 1.0, agent_env: Mapping[int, dict[str, str]] | None = None) -> Iterator[Cluster]:
    """``agent_env``: node index -> extra environment for that node's agent (test hooks)."""
    with SandboxApiServer(bookmark_interval=1.0) as api, MultiNode(nodes, pods) as net, ExitStack() as stack:
        api.operations.create(NAMESPACES, None, {"metadata": {"name": NS}})
        api.operations.create(NAMESPACES, None, {"metadata": {"name": c.DEFAULT_AGENT_NAMESPACE}})
        _webhook(api, workdir, stack)
        for i in range(nodes):
            (workdir / f"node{i}").mkdir(parents=True, exist_ok=True)
        made = Cluster(api, [EnvoyNode(api, topo, workdir / f"node{i}", agent_args, name=f"node-{i}")
                             for i, topo in enumerate(net.nodes)])
        try:
            for i, node in enumerate(made.nodes):
                node.agent.start(env=(agent_env or {}).get(i))
            for node in made.nodes:
                node.agent.wait_synced()
                node.envoy.start()
            for node in made.nodes:
                made.standins.append(stack.enter_context(StandinSync(
                    api.api_client(), node.topo.node.name, watch_timeout=5, min_sync_period=min_sync_period)))
            yield made
        finally:
            for node in made.nodes:
                node.close()


def _webhook(api: SandboxApiServer, workdir: Path, stack: ExitStack) -> None:
    certs = workdir / "certs"
    comp.generate_certs(certs)
    webhook = comp.WebhookProcess(api.write_kubeconfig(workdir / "kubeconfig"), certs, workdir / "webhook.log")
    stack.callback(webhook.stop)
    webhook.start()
    config = comp.webhook_configuration((certs / "ca.crt").read_bytes())
    ref = config["webhooks"][0]["clientConfig"]["service"]
    api.route_service(ref["namespace"], ref["name"], webhook.port)
    client.AdmissionregistrationV1Api(api.api_client()).create_mutating_webhook_configuration(config)
