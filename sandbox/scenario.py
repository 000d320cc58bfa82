"""The end-to-end scenario (issue 8), shared by ``make demo`` (which prints it) and the full-system test.

Everything real except the cluster: the webhook process over TLS, the redirector process with nftables in
a "node" network namespace, a real Envoy there, pods as network namespaces, and real connections. The
Kubernetes API is ``SandboxApiServer`` (a TEST DOUBLE) and kube-proxy is ``sandbox.kubeproxy`` (a
STAND-IN: plain nftables DNAT that, like kube-proxy, ignores Services carrying the proxy-name label).

Each step narrates through ``say`` with its evidence and raises ``ScenarioError`` when something did not
behave, so the demo can exit non-zero and the test fails with the story so far. ``close`` (also on
Ctrl-C) tears everything down: processes, namespaces, files.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from kubernetes import client

from redirector.model import Key
from sandbox import components as comp
from sandbox.api.apiserver import SandboxApiServer
from sandbox.kubeproxy import TABLE as STANDIN_TABLE
from sandbox.kubeproxy import StandinSync
from sandbox.node.client_loop import ClientLoop, Handover, Record, handover
from sandbox.node.envoy_process import EnvoyProcess
from sandbox.node.netns import Topology, run_in_netns
from sandbox.node.nftwatch import Coverage, NftMonitor
from sandbox.node.nsrelay import NetnsRelay
from sandbox.node.traffic import (
    http_listener,
    http_request,
    tcp_listener,
    tcp_request,
    udp_listener,
    udp_request,
)
from shared import constants as c
from shared.errors import SandboxError

NAMESPACE = "demo"
WEB, DNS, MIXED = "web", "dns", "mixed"
WEB_STAT = f"cluster.{NAMESPACE}_{WEB}_80_ipv4.upstream_rq_total"  # controlplane.translate.stat_name
Say = Callable[[str], None]
DEBUG_PATHS = ("/healthz", "/readyz", "/debug/services", "/debug/diff", "/debug/lookup?ip={web}&port=80",
               "/debug/lookup?ip={dns}&port=53")


class ScenarioError(SandboxError, AssertionError):
    """A step did not behave as the scenario says it must."""


def check(ok: object, message: str) -> None:
    if not ok:
        raise ScenarioError(message)


def _ports(*items: tuple[str, int, int, str, str | None]) -> list[dict[str, Any]]:
    return [{"name": n, "port": p, "targetPort": t, "protocol": proto, **({"appProtocol": ap} if ap else {})}
            for n, p, t, proto, ap in items]


SERVICES: dict[str, list[dict[str, Any]]] = {
    WEB: _ports(("http", 80, 8080, "TCP", "http")),
    DNS: _ports(("dns", 53, 5353, "UDP", None)),
    MIXED: _ports(("tcp", 7000, 7001, "TCP", None), ("udp", 7000, 7001, "UDP", None)),
}


def _read_keys() -> frozenset[Key]:
    from redirector.nft import NftBackend  # in the forked child, inside the node namespace

    return NftBackend().read()


class Scenario:
    """Build with ``with Scenario(say) as s: s.run()`` (or the steps one by one, as the test does)."""

    def __init__(self, say: Say = print, workdir: Path | None = None, netns_prefix: str = "lpe2e") -> None:
        self.say, self.prefix = say, netns_prefix
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="lightpath-e2e-")) if workdir is None else workdir
        self.stack = ExitStack()
        self.ips: dict[str, str] = {}
        self.handovers: dict[str, Handover] = {}
        self.kernel: dict[str, Coverage] = {}
        self.warnings: dict[str, list[str]] = {}

    # -- lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> Scenario:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Step 7: everything goes, in reverse order of creation, whatever happened before."""
        try:
            self.stack.close()
        finally:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def run(self) -> None:
        self.control_plane()
        self.node()
        self.services()
        self.traffic()
        self.handover_loop()

    def step(self, n: int | str, title: str) -> None:
        self.say(f"\n== {n}. {title}")

    def show(self, label: str, text: str) -> None:
        body = text.rstrip("\n").splitlines() or [""]
        self.say(f"   {label}: {body[0]}" if len(body) == 1 else f"   {label}:\n" + "\n".join(f"      {x}" for x in body))

    # -- step 1 -------------------------------------------------------------------------------------
    def control_plane(self) -> None:
        self.step(1, "Control plane: sandbox API server (a TEST DOUBLE, not a cluster) and the webhook over TLS")
        self.api = self.stack.enter_context(SandboxApiServer())
        self.kubeconfig = self.api.write_kubeconfig(self.workdir / "kubeconfig")
        self.core = client.CoreV1Api(self.api.api_client())
        self.discovery = client.DiscoveryV1Api(self.api.api_client())
        self.show("API server", f"{self.api.url} (kubeconfig {self.kubeconfig})")
        certs = self.workdir / "certs"
        done = comp.generate_certs(certs)
        self.show("$ lightpath certs generate --secret-only", done.stdout.strip().splitlines()[0])
        self.webhook = comp.WebhookProcess(self.kubeconfig, certs, self.workdir / "webhook.log")
        self.stack.callback(self.webhook.stop)
        self.webhook.start()
        self.show("lightpath-webhook", f"https://127.0.0.1:{self.webhook.port} /readyz -> {self.webhook.get('/readyz').strip()}")
        config = comp.webhook_configuration((certs / "ca.crt").read_bytes())
        ref = config["webhooks"][0]["clientConfig"]["service"]
        self.api.route_service(ref["namespace"], ref["name"], self.webhook.port)
        client.AdmissionregistrationV1Api(self.api.api_client()).create_mutating_webhook_configuration(config)
        self.show("registered", f"MutatingWebhookConfiguration {config['metadata']['name']} from `kubectl kustomize "
                  f"deploy/default`, caBundle = generated CA, service {ref['namespace']}/{ref['name']} -> 127.0.0.1:{self.webhook.port}")

    # -- steps 2 and 3 ------------------------------------------------------------------------------
    def node(self) -> None:
        self.step(2, "A node (network namespace) with the redirector and a real Envoy; pods for a backend and a client")
        self.topo = self.stack.enter_context(Topology(pods=2, prefix=self.prefix))
        self.backend, self.client = self.topo.pods
        self.show("namespaces", f"node {self.topo.node.name}; backend pod {self.topo.pod_ips[0]}; client pod {self.topo.pod_ips[1]}")
        self.monitor = NftMonitor(self.topo.node)  # every rule change in the node, time-stamped
        self.stack.callback(self.monitor.stop)
        relay = self.stack.enter_context(NetnsRelay(self.topo.node.name, ("127.0.0.1", self.api.port)))
        node_kubeconfig = comp.node_kubeconfig(self.workdir / "node-kubeconfig", relay.url)
        self.show("API from the node", f"{relay.url} (a relay into the node namespace; the host network is untouched)")
        # The agents' namespace: each writes its Lease there (make-before-break migration, docs/migration.md).
        self.core.create_namespace({"metadata": {"name": c.DEFAULT_AGENT_NAMESPACE,
                                                 "labels": {c.OPT_LABEL: c.OPT_DISABLED}}})
        xds = self.workdir / "run" / "xds.sock"
        self.redirector = comp.RedirectorProcess(self.topo.node, node_kubeconfig, self.workdir / "redirector.log",
                                                 xds_socket=xds)
        self.stack.callback(self.redirector.stop)
        self.redirector.start()
        self.show("lightpath-redirector run --backend nftables", f"pid {self.redirector.proc.pid if self.redirector.proc else '?'}; "
                  f"control plane on unix:{xds}; /healthz -> {self.redirector.debug_text('/healthz', 200)}")
        self.envoy = EnvoyProcess(self.topo.node, self.workdir / "envoy", xds_socket=xds,
                                  node_id=comp.RedirectorProcess.NODE_NAME)
        self.stack.callback(self.envoy.stop)
        self.envoy.start()
        self.show("envoy", f"{self.envoy.binary}: bootstrap = Delta ADS over unix:{xds} (as deploy/proxy ships it), "
                  f"admin 127.0.0.1:{c.ENVOY_ADMIN_PORT} in the node; listeners, clusters and endpoints come from "
                  "the agent's control plane")
        self.listeners = [
            http_listener(self.backend, 8080, name="backend-http"),
            udp_listener(self.backend, 5353, name="backend-dns"),
            tcp_listener(self.backend, 7001, name="backend-mixed-tcp"),
            udp_listener(self.backend, 7001, name="backend-mixed-udp"),
        ]
        self.show("backend pod", "HTTP echo :8080, UDP echo :5353, TCP+UDP echo :7001")

        self.step(3, "kube-proxy STAND-IN in the node (plain nftables DNAT; NOT kube-proxy): ignores labelled Services")
        self.standin = self.stack.enter_context(StandinSync(self.api.api_client(), self.topo.node.name))
        self.show("stand-in", f"tables ip/ip6 {STANDIN_TABLE} in kube-proxy v1.33's nftables layout (DNAT at priority "
                  "dstnat -100, drops unknown ClusterIPs, minSyncPeriod 1 s); the redirector hooks before it (-110)")

    # -- step 4 -------------------------------------------------------------------------------------
    def services(self) -> None:
        self.step(4, f"Namespace {NAMESPACE} opted in; an HTTP, a DNS-like UDP and a mixed TCP/UDP Service")
        self.core.create_namespace({"metadata": {"name": NAMESPACE, "labels": {c.OPT_LABEL: c.OPT_ENABLED}}})
        for name, ports in SERVICES.items():
            warnings = self.warnings[name] = self.create_service(name, ports)
            svc = self.core.read_namespaced_service(name, NAMESPACE)
            self.ips[name] = svc.spec.cluster_ip
            labels = {k: v for k, v in (svc.metadata.labels or {}).items()}
            self.show(f"{name} {svc.spec.cluster_ip} {[f'{p.port}/{p.protocol}' for p in svc.spec.ports]}", f"labels {labels}")
            for w in warnings:
                self.show("   warning", w)
        handoff = {n: self.label(n) for n in SERVICES}
        check(handoff == {WEB: c.DEFAULT_PROXY_NAME, DNS: None, MIXED: None},
              f"the webhook should label only {WEB}: {handoff}")
        self.wait_redirect(WEB, present=True)
        self.wait_envoy_route(WEB)
        self.standin.wait_for(lambda rs: self.ips[DNS] in rs and self.ips[MIXED] in rs and self.ips[WEB] not in rs)
        self.show("redirector rule set (nft list table inet lightpath)", self.node_nft(f"inet {c.DEFAULT_NFT_TABLE}"))
        self.show("stand-in services chain", self.standin_chain())

    def create_service(self, name: str, ports: list[dict[str, Any]]) -> list[str]:
        body = {"metadata": {"name": name, "namespace": NAMESPACE}, "spec": {"selector": {"app": name}, "ports": ports}}
        resp = self.core.create_namespaced_service(NAMESPACE, body, _preload_content=False)
        resp.read()  # drain, so the pooled connection is reused rather than reset
        resp.release_conn()
        self.discovery.create_namespaced_endpoint_slice(NAMESPACE, {
            "metadata": {"name": f"{name}-1", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [self.topo.pod_ips[0]], "conditions": {"ready": True}}],
            "ports": [{"name": p["name"], "port": p["targetPort"], "protocol": p["protocol"]} for p in ports],
        })
        raw = resp.headers.getlist("Warning") if hasattr(resp.headers, "getlist") else [resp.headers.get("Warning", "")]
        return [w.split('"', 1)[1].rsplit('"', 1)[0] if '"' in w else w for w in raw if w]

    # -- step 5 -------------------------------------------------------------------------------------
    def traffic(self) -> None:
        self.step(5, "Traffic: the HTTP Service goes through Envoy; UDP and mixed stay on the stand-in's DNAT")
        before = self.envoy.counter(WEB_STAT)
        resp = http_request(self.client, self.ips[WEB], 80, "/hello")
        check(resp["status"] == 200, f"HTTP via the ClusterIP failed: {resp}")
        headers = json.loads(resp["body"])["headers"]
        envoy_headers = {k: v for k, v in headers.items() if k.startswith("x-envoy") or k in ("x-request-id", "x-forwarded-for")}
        self.show(f"GET http://{self.ips[WEB]}/hello from the client pod -> headers the backend received", json.dumps(envoy_headers, indent=1))
        check("x-request-id" in headers and "x-forwarded-proto" in headers, "no Envoy headers: not proxied")
        after = self.envoy.counter(WEB_STAT)
        self.show("envoy admin /stats", f"{WEB_STAT}: {before} -> {after}")
        check(after == before + 1, "Envoy's stats did not count the request")
        reply = udp_request(self.client, self.ips[DNS], 53, payload=b"dns?")
        self.show(f"UDP {self.ips[DNS]}:53", f"answered by {reply['server']} at {reply['local']}, seen from {reply['peer'][0]} (the client: DNAT, not a proxy)")
        check(reply["server"] == "backend-dns" and reply["peer"][0] == self.topo.pod_ips[1], f"UDP not via the stand-in: {reply}")
        tcp = tcp_request(self.client, self.ips[MIXED], 7000)
        self.show(f"TCP {self.ips[MIXED]}:7000 (mixed Service)", f"answered by {tcp['server']}, seen from {tcp['peer'][0]} (the client: stand-in DNAT)")
        check(tcp["peer"][0] == self.topo.pod_ips[1], f"mixed TCP went through a proxy: {tcp}")
        check(self.envoy.counter(WEB_STAT) == after, "Envoy counted traffic that was not its own")
        for template in DEBUG_PATHS:
            path = template.format(web=self.ips[WEB], dns=self.ips[DNS])
            sep = "&" if "?" in path else "?"
            self.show(f"redirector debug {path}", self.redirector.debug_text(f"{path}{sep}format=text"))

    # -- step 6 -------------------------------------------------------------------------------------
    def handover_loop(self) -> dict[str, Handover]:
        self.step(6, "Handovers under load: `lightpath rollback`, then `lightpath migrate`, new connection per request")
        loop = self.start_loop()
        t_rollback = time.monotonic()
        self.cli("rollback", f"{NAMESPACE}/{WEB}")
        self.wait_handoff(WEB, lightpath=False, loop=loop)
        self.show("after rollback", f"label {c.SERVICE_PROXY_NAME_LABEL}={self.label(WEB)}; redirect gone; stand-in: {self.standin_chain(WEB)}")
        loop.wait_for(20)
        t_migrate = time.monotonic()
        self.cli("migrate", f"{NAMESPACE}/{WEB}")
        self.wait_handoff(WEB, lightpath=True, loop=loop)
        loop.wait_for(20)
        records = loop.stop()
        rollback, migrate = "rollback (Envoy -> stand-in)", "migrate  (stand-in -> Envoy)"
        self.handovers = {rollback: handover(records, t_rollback, "direct", end=t_migrate),
                          migrate: handover(records, t_migrate, "envoy")}
        self.kernel = {rollback: self.monitor.coverage(self.ips[WEB], 80, t_rollback, t_migrate),
                       migrate: self.monitor.coverage(self.ips[WEB], 80, t_migrate)}
        failed = sum(not r.ok for r in records)
        self.show("client loop", f"{len(records)} requests, {failed} failed in total")
        for name, h in self.handovers.items():
            self.show(name, f"{h.describe()}\n{self.kernel[name].describe()}")
        return self.handovers

    def start_loop(self, timeout: float = 1.0) -> ClientLoop:
        loop = ClientLoop(self.client, self.ips[WEB], 80, stop_file=self.workdir / "loop.stop", duration=40, timeout=timeout)
        self.stack.callback(loop.stop)
        loop.wait_for(20)
        return loop

    def cli(self, command: str, *args: str) -> None:
        started = time.monotonic()
        done = comp.run_tool("lightpath", [command, *args, "--kubeconfig", str(self.kubeconfig), "--color", "never"])
        took = time.monotonic() - started
        self.show(f"$ lightpath {command} {' '.join(args)} (exit {done.returncode}, {took:.1f} s)", done.stdout.strip() or done.stderr.strip())
        check(done.returncode == 0, f"lightpath {command} failed: {done.stderr.strip()}")

    def wait_handoff(self, name: str, *, lightpath: bool, loop: ClientLoop | None = None, timeout: float = 10) -> None:
        want = c.DEFAULT_PROXY_NAME if lightpath else None
        comp.poll(lambda: self.label(name) == want, timeout, f"{name}: handoff label {want}")
        self.wait_redirect(name, present=lightpath, timeout=timeout)
        # Hybrid mode: the stand-in, like kube-proxy, programs the Service exactly when it is not labelled.
        self.standin.wait_for(lambda rs: (self.ips[name] in rs) != lightpath, timeout)
        if loop is not None:
            via = "envoy" if lightpath else "direct"
            start = len(loop.records)
            comp.poll(lambda: any(r.ok and r.via == via for r in loop.records[start:]), timeout, f"client served via {via}")

    # -- kernel and proxy state -----------------------------------------------------------------------
    def label(self, name: str) -> str | None:
        labels = self.core.read_namespaced_service(name, NAMESPACE).metadata.labels or {}
        return labels.get(c.SERVICE_PROXY_NAME_LABEL)

    def redirect_keys(self) -> frozenset[Key]:
        return run_in_netns(self.topo.node.name, _read_keys)

    def has_redirect(self, name: str) -> bool:
        return any(k.ip == self.ips[name] for k in self.redirect_keys())

    def wait_redirect(self, name: str, *, present: bool, timeout: float = 10) -> float:
        """Seconds until the node's redirect for ``name`` is (or is no longer) in the kernel."""
        start = time.monotonic()
        comp.poll(lambda: self.has_redirect(name) == present, timeout, f"redirect for {name} {'present' if present else 'gone'}", interval=0.005)
        return time.monotonic() - start

    def wait_envoy_route(self, name: str, timeout: float = 10) -> None:
        """Until the node's Envoy serves ``name`` (ACKed by Envoy, per the agent's /debug/proxy), then show it."""
        def served() -> bool:
            status, body = self.redirector.debug(f"/debug/proxy?service={NAMESPACE}/{name}")
            rows = json.loads(body)["services"] if status == 200 else []
            return bool(rows) and all(k["served"] for k in rows[0]["keys"])

        comp.poll(served, timeout, f"Envoy serving {name}")
        self.show(f"lightpath-redirector debug proxy --service {NAMESPACE}/{name} (what Envoy ACKed)",
                  self.redirector.debug_text(f"/debug/proxy?service={NAMESPACE}/{name}&format=text", limit=1500))

    def node_nft(self, table: str) -> str:
        return self.topo.node.run(["nft", "list", "table", *table.split()]).stdout

    def standin_chain(self, only: str | None = None) -> str:
        """The stand-in's ``service-ips`` entries (ClusterIP . proto . port : goto service chain)."""
        text = self.node_nft(f"ip {STANDIN_TABLE}")
        lines = [m.group(0) for m in re.finditer(r"[0-9.]+ \. (?:tcp|udp|sctp) \. \d+ : goto service-\S+", text)]
        if only is not None:
            lines = [x for x in lines if x.startswith(self.ips[only] + " ")]
        return "\n".join(lines) or "(none)"

    # -- extra checks of the full-system test -----------------------------------------------------------
    def restart_redirector_under_load(self) -> list[Record]:
        """Stop and start the redirector while the client loop runs; returns the loop's record."""
        loop = self.start_loop(timeout=3.0)  # a lost redirect still fails; a busy machine's slow answer does not
        self.redirector.stop()
        loop.wait_for(10)
        self.redirector.start()
        loop.wait_for(20)
        return loop.stop()

    def delete_service(self, name: str) -> float:
        """Delete ``name``; seconds from the API answer until its redirect is gone from the kernel."""
        self.core.delete_namespaced_service(name, NAMESPACE)
        return self.wait_redirect(name, present=False, timeout=5)
