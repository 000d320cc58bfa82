"""The node agent assembled: one set of watches feeding both the kernel side and the control plane.

    Services reflector ──FanOut──> ChangeTracker ──> Agent (sync loop) ──> nftables / iptables
                             └───> ControlPlane ──> Store ──> AdsServer ──> Envoy
    EndpointSlices reflector ────> ControlPlane           ACKs ──> gate ──> Agent

``NodeAgent`` owns the threads; ``redirector.__main__`` runs one until SIGTERM, tests and benchmarks run
one in-process. The tracker goes first in the fan-out, so the kernel side always knows a Service before
Envoy can ACK it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message
from kubernetes import client

from controlplane import resources as res
from controlplane.controller import ControlPlane, Mangle
from controlplane.metrics import ControlPlaneMetrics
from controlplane.server import AdsServer
from controlplane.translate import NodeInfo
from redirector.agent import Agent
from redirector.blocks import Transparent
from redirector.changes import ChangeTracker
from redirector.config import Settings
from redirector.kubeproxy_rules import KubeProxyRules
from redirector.lease import LeaseReporter
from redirector.model import Backend
from redirector.watch import EndpointSliceWatcher, NodeWatcher, ServiceWatcher
from shared import constants as c
from shared.kube import FanOut
from shared.kubeapi import Api

if TYPE_CHECKING:
    from redirector.fallback import Watchdog

log = logging.getLogger(__name__)


def node_has_ipv6() -> bool:
    """Can this node bind an IPv6 listener? (Envoy would refuse the whole IPv6 listener otherwise.)"""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
        return True
    except OSError:
        return False


@dataclass
class NodeAgent:
    agent: Agent
    services: ServiceWatcher
    plane: ControlPlane | None = None
    slices: EndpointSliceWatcher | None = None
    server: AdsServer | None = None
    node: NodeWatcher | None = None
    lease: LeaseReporter | None = None
    fallback: Watchdog | None = None
    owner: Any = None  # (redirector.owner.OwnerState, its Reflector): is our DaemonSet being deleted?
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, settings: Settings, *, socket_owner: int | None = None) -> NodeAgent:
        """``socket_owner``: the proxy's UID, given the xDS socket so a non-root Envoy can connect."""
        if self.server is not None:
            self.server.start(socket_path=settings.xds_socket, tcp_address=settings.xds_address, owner=socket_owner)
        targets: list[tuple[str, Any]] = [("watch-services", self.services.run), ("sync", self.agent.run)]
        if self.plane is not None and self.slices is not None:
            targets += [("watch-endpointslices", self.slices.run), ("controlplane", self.plane.run)]
        if self.node is not None:
            targets.append(("watch-node", self.node.run))
        if self.lease is not None:
            targets.append(("lease", self.lease.run))
        if self.fallback is not None:
            targets.append(("fallback", self.fallback.run))
        if self.owner is not None:
            targets.append(("watch-daemonset", self.owner[1].run))
        self.threads = [threading.Thread(target=fn, name=name, daemon=True) for name, fn in targets]
        for thread in self.threads:
            thread.start()
        return self

    @property
    def sync_thread(self) -> threading.Thread:
        return self.threads[1]

    def alive(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def stop(self) -> None:
        """Threads end; the kernel rules stay, and Envoy keeps serving its last configuration."""
        self.services.stop()
        if self.slices is not None:
            self.slices.stop()
        if self.node is not None:
            self.node.stop()
        if self.lease is not None:
            self.lease.stop()
        if self.fallback is not None:
            self.fallback.stop()
        if self.owner is not None:
            self.owner[1].stop()
        if self.plane is not None:
            self.plane.stop()
        self.agent.stop()
        if self.server is not None:
            self.server.stop()
        for thread in self.threads:
            thread.join(timeout=5)


TEST_REFUSE_ENV = "LIGHTPATH_TEST_REFUSE_SERVICE"


def refuse_service(sid: str) -> Mangle:
    """TEST HOOK (``$LIGHTPATH_TEST_REFUSE_SERVICE=namespace/name``): give that Service's clusters a connect
    timeout Envoy's validation refuses, so tests can watch a real NACK. Never set in a deployment."""
    namespace, _, name = sid.partition("/")
    prefix = f"{namespace}_{name}_"

    def mangle(type_url: str, message: Message) -> None:
        if type_url == res.CLUSTER and getattr(message, "alt_stat_name", "").startswith(prefix):
            message.connect_timeout.seconds = -1  # type: ignore[attr-defined]

    return mangle


def build(settings: Settings, backend: Backend, api: client.ApiClient, *, mangle: Mangle | None = None,
          ipv6: bool | None = None) -> NodeAgent:
    """The agent for ``settings``: with the control plane unless both xDS listeners are off."""
    kube = Api(api)  # paths, not the generated API classes (shared/kubeapi.py says why)
    watch: dict[str, Any] = {"server_timeout": settings.watch_timeout, "read_timeout": settings.watch_read_timeout}
    label = (c.SERVICE_PROXY_NAME_LABEL, settings.proxy_name)
    if settings.xds_socket is None and settings.xds_address is None:
        tracker = ChangeTracker(label)  # built with the watch it listens to
        # All Services, as with the control plane: a label removal must read as a handback, not a deletion.
        services = ServiceWatcher(kube, tracker, **watch)
        agent = Agent(backend, proxy_label=label, resync_period=settings.resync_period, tracker=tracker,
                      watcher=services, batch_idle=settings.batch_idle, batch_max=settings.batch_max,
                      kube_proxy=KubeProxyRules().read, handback_hold=settings.handback_hold,
                      handback_timeout=settings.handback_timeout)
        return NodeAgent(agent, services, lease=_lease(settings, kube, agent), owner=_owner(settings, kube, watch))
    node = NodeInfo(settings.node, ipv6=node_has_ipv6() if ipv6 is None else ipv6)
    if mangle is None and os.environ.get(TEST_REFUSE_ENV):
        log.warning("TEST HOOK active: Envoy will refuse a Service's clusters", extra={"service": os.environ[TEST_REFUSE_ENV]})
        mangle = refuse_service(os.environ[TEST_REFUSE_ENV])
    transparent = _transparent(settings)
    plane = ControlPlane(node, proxy_port=settings.proxy_port, proxy_name=settings.proxy_name, mangle=mangle,
                         envoy_admin=_envoy_admin(settings), on_demand=settings.envoy_clusters == "on-demand",
                         batch_idle=settings.batch_idle, batch_max=max(settings.batch_max, 0.02),
                         transparent=(transparent.port, transparent.mark) if transparent is not None else None)
    tracker = ChangeTracker(label)  # built with the watch it listens to (the kernel side first in the fan-out)
    services = ServiceWatcher(kube, FanOut(tracker, plane.services), **watch)
    agent = Agent(backend, proxy_label=label, resync_period=settings.resync_period, batch_idle=settings.batch_idle,
                  batch_max=settings.batch_max, gate=plane, plane=plane, tracker=tracker, watcher=services,
                  kube_proxy=KubeProxyRules().read, handback_hold=settings.handback_hold,
                  handback_timeout=settings.handback_timeout)
    plane.metrics = ControlPlaneMetrics(agent.metrics.registry)
    from controlplane.servicemetrics import ServiceTraffic

    agent.metrics.registry.register(ServiceTraffic(plane.traffic_source))
    plane.on_gate = agent.gate_changed
    from redirector.healthcheck import HealthChecks

    plane.on_health = HealthChecks().apply
    # The kernel's own answers (no endpoints, unexposed ClusterIP ports, LB source ranges) are an nftables
    # table on both backends: its chains hook before every NAT, iptables' included (nf_tables is in every
    # kernel the agent supports; the image ships libnftables).
    blocks = _kernel_blocks(settings, transparent)
    if blocks is not None:
        plane.on_blocked = blocks.apply_answers
    server = AdsServer(plane.store, expected_node=settings.node, on_ack=plane.acked, on_nack=plane.nacked,
                       ready=plane.first_push_done, on_push=plane.pushed, on_demand=plane.on_demand)
    plane.attach(server)
    slices = EndpointSliceWatcher(kube, plane.slices, **watch)
    node_watch = NodeWatcher(kube, plane.nodes, settings.node, **watch)
    watchdog = _watchdog(settings, agent, plane, server)
    agent.fallback = watchdog
    return NodeAgent(agent, services, plane, slices, server, node=node_watch, lease=_lease(settings, kube, agent),
                     fallback=watchdog, owner=_owner(settings, kube, watch))


def _transparent(settings: Settings) -> Transparent | None:
    """The transparent listener (its port, the proxy's mark, the redirect's target addresses) with
    --preserve-source-ip on, else None: one value for the control plane and the kernel answers table."""
    if settings.preserve_source_ip != "on" or settings.proxy_mark is None:  # Settings refuses on without a mark
        return None
    return Transparent(settings.transparent_port, settings.proxy_mark, settings.redirect_mode,
                       settings.redirect_address, settings.redirect_address6)


def _kernel_blocks(settings: Settings, transparent: Transparent | None) -> Any:
    """redirector.blocks.KernelBlocks for ``<nft-table>-block``, or None (logged) where libnftables is missing."""
    try:
        from redirector.blocks import KernelBlocks

        return KernelBlocks(f"{settings.nft_table}-block", transparent)
    except ImportError as exc:
        log.error("no kernel answers for Services without endpoints (refused/dropped) nor unexposed ports: "
                  "libnftables is missing", extra={"error": str(exc)})
        return None


def _owner(settings: Settings, api: Api, watch: dict[str, Any]) -> Any:
    """The watch on this agent's own DaemonSet (--daemonset in --lease-namespace), or None."""
    if settings.daemonset is None or settings.lease_namespace is None:
        return None
    from redirector.owner import OwnerState, owner_watch

    state = OwnerState(settings.daemonset)
    return state, owner_watch(api, settings.lease_namespace, settings.daemonset, state, **watch)


def _envoy_admin(settings: Settings) -> Any:
    """Where /debug/proxy reads Envoy's counters: a fixed address, or ("auto") the loopback listeners of the
    proxy's uid (any uid without --proxy-uid) found with sock_diag at each (cached) read; None: nowhere."""
    if settings.envoy_admin is None:
        return None
    if settings.envoy_admin != "auto":
        host, _, port = settings.envoy_admin.rpartition(":")
        return host.strip("[]"), int(port)
    # Never our own servers (or the proxy port): what is left on loopback is Envoy's admin, one per Envoy.
    ours = {settings.proxy_port, settings.health_port, settings.debug_port}
    if settings.xds_address:
        ours.add(int(settings.xds_address.rpartition(":")[2]))
    from redirector.debug.netlink import NetlinkProbe

    probe = NetlinkProbe(timeout=2.0)
    uid, exclude = settings.proxy_uid, frozenset(ours)
    return lambda: [(s.address, s.port) for s in probe.loopback_listeners(uid, exclude)]


def _watchdog(settings: Settings, agent: Agent, plane: ControlPlane, server: AdsServer) -> Watchdog | None:
    """The kernel L4 fallback while Envoy is down (on unless --fallback off): an nftables table of its own,
    or statistic-mode chains on the iptables backend (written through that backend's runner)."""
    if settings.fallback != "on":
        return None
    from redirector.fallback import Watchdog, port_accepts

    kernel: dict[str, Any] = {}
    if settings.backend == "iptables":
        from redirector.iptables import IptablesBackend
        from redirector.iptables_fallback import IptablesFallback

        if not isinstance(agent.backend, IptablesBackend):
            return None
        chains = IptablesFallback(agent.backend)
        kernel = {"render": chains.render, "write": chains.write}

    def switched(on: bool) -> None:
        plane.set_proxy_down(on)  # withdraws the transparent overlay at once (on iptables it precedes the fallback)
        agent.metrics.fallback_active.set(1 if on else 0)
        agent.metrics.fallback_switches.labels("fallback" if on else "envoy").inc()

    return Watchdog(f"{settings.nft_table}-fallback", connected=lambda: server.newest() is not None,
                    in_sync=plane.in_sync, accepting=lambda: port_accepts(settings.proxy_port),
                    targets=lambda: plane.endpoints_for(agent.applied_keys()), on_switch=switched,
                    revision=lambda: (plane.store.revision, agent.status.transactions), **kernel)


def _lease(settings: Settings, api: Api, agent: Agent) -> LeaseReporter | None:
    if settings.lease_namespace is None:
        return None
    traffic = None
    if agent.plane is not None:
        from controlplane.servicemetrics import TrafficWindow

        plane = agent.plane
        traffic = TrafficWindow(lambda: plane.traffic_source(cached=False))
    reporter = LeaseReporter(api, settings.lease_namespace, settings.node, agent.prepared,
                             redirects=agent.applied_count, traffic=traffic)
    agent.on_synced = reporter.changed
    return reporter

