"""The redirector's configuration: one typed object from flags, then ``LIGHTPATH_*`` env, then defaults.

Every value is validated while parsing, so a bad flag or env value stops the agent at start-up with a
clear message and exit status 2 (argparse's usage-error convention), never half-way through a sync.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redirector.model import Family
from shared import constants as c

ENV_PREFIX = "LIGHTPATH_"
BACKENDS = ("nftables", "iptables")
IPTABLES_VARIANTS = ("auto", "nft", "legacy")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Settings:
    """Everything the agent needs to know."""

    backend: str = "nftables"
    proxy_port: int = c.DEFAULT_PROXY_PORT
    proxy_name: str = c.DEFAULT_PROXY_NAME
    node_name: str = ""  # default: $NODE_NAME (downward API), else the hostname
    resync_period: float = 30.0
    proxy_uid: int | None = None
    proxy_mark: int | None = c.DEFAULT_PROXY_MARK
    nft_table: str = c.DEFAULT_NFT_TABLE
    iptables_chain: str = c.DEFAULT_IPTABLES_CHAIN
    # Which iptables binaries write the rules. Must match the host's (kube-proxy's) variant, or our jump
    # lands in the other ruleset; "auto" trusts the image's `iptables` alternative.
    iptables_variant: str = "auto"
    # How the kernel sends Service traffic to the proxy: DNAT to these node-local addresses (kept on lo by the
    # backend), or REDIRECT, which drops pod traffic on CNIs that leave the host veth without an address.
    redirect_mode: str = c.DEFAULT_REDIRECT_MODE
    redirect_address: str = c.DEFAULT_REDIRECT_ADDRESS
    redirect_address6: str = c.DEFAULT_REDIRECT_ADDRESS6
    # The health server (/healthz, /readyz, /metrics) is always on: the kubelet probes it.
    health_address: str = c.REDIRECTOR_HEALTH_ADDRESS
    health_port: int = c.REDIRECTOR_HEALTH_PORT
    debug_address: str = c.REDIRECTOR_DEBUG_ADDRESS
    debug_port: int = c.REDIRECTOR_DEBUG_PORT  # 0 disables the debug server
    kubeconfig: Path | None = None  # None: in-cluster configuration
    watch_timeout: int = 300  # server-side timeoutSeconds of one watch request
    watch_read_timeout: float = 90.0  # client read timeout: above the ~60 s bookmark period
    batch_idle: float = 0.002
    batch_max: float = 0.010
    log_level: str = "INFO"
    # The control plane (Envoy over Delta ADS). Both None: no control plane, redirects are not gated (a
    # kernel-only agent for a proxy configured some other way).
    xds_socket: Path | None = Path(c.DEFAULT_XDS_SOCKET)
    # eager: Envoy holds every migrated key's cluster (validated before its redirect); on-demand: Envoy fetches
    # a cluster when a connection first needs it (memory and start-up scale with what the node uses).
    envoy_clusters: str = "eager"
    xds_address: str | None = None  # optional loopback TCP listener, e.g. 127.0.0.1:18000
    # Handback: keep a handed-back Service's redirect until kube-proxy's rule is visible (at most
    # handback_timeout), or for handback_hold when kube-proxy's rules cannot be read (>= 2 x its minSyncPeriod).
    handback_hold: float = 2.0
    handback_timeout: float = 10.0
    # Where this agent's Lease lives (make-before-break migration); None: no Lease.
    lease_namespace: str | None = os.environ.get("POD_NAMESPACE") or c.DEFAULT_AGENT_NAMESPACE
    # Envoy's admin API, read for the per-Service traffic figures in /debug/proxy (None: not read).
    # "auto": every loopback listener of --proxy-uid but the proxy port and our own servers (the shipped
    # Envoy's admin port is picked by the kernel; two Envoys during a rollout: their counters are added).
    envoy_admin: str | None = "auto"
    # Kernel L4 fallback while Envoy is down (either backend, with the control plane).
    fallback: str = "on"
    # externalTrafficPolicy Local: the backend sees the client's source address, as behind kube-proxy, through
    # Envoy's transparent listener on transparent_port (Envoy needs CAP_NET_ADMIN; docs/conformance.md row 6).
    preserve_source_ip: str = "off"
    transparent_port: int = c.DEFAULT_TRANSPARENT_PORT
    # Where the node's sysctls are (redirector.sysctls): /proc/sys in the node's netns, or the DaemonSet's
    # mount of the node's /proc/sys/net; None: the agent sets none.
    proc_sys: Path | None = Path("/proc/sys")
    # The DaemonSet that runs this agent (in lease_namespace): when it is deleted, the agent removes its
    # rules as it stops (redirector.owner); None: the rules always stay.
    daemonset: str | None = None

    def __post_init__(self) -> None:
        if self.proxy_uid is None and self.proxy_mark is None:
            raise ValueError("set --proxy-mark and/or --proxy-uid: the proxy's own traffic must never be redirected")
        if self.preserve_source_ip == "on":
            if self.proxy_mark is None:
                raise ValueError("--preserve-source-ip on needs --proxy-mark: the replies of the proxy's "
                                 "transparent connections are routed back to it by that mark")
            if self.transparent_port == self.proxy_port:
                raise ValueError(f"--transparent-port {self.transparent_port} is the proxy port: choose another")
            if self.transparent_port in (self.health_port, self.debug_port):
                raise ValueError(f"--transparent-port {self.transparent_port} collides with the health or debug "
                                 "port: choose another")
            reply = c.TRANSPARENT_REPLY_MARK
            if self.proxy_mark & reply == reply:  # the reply rule matches fwmark 0x1667/0x1667
                raise ValueError(f"--proxy-mark 0x{self.proxy_mark:x} holds every bit of the mark the agent puts on "
                                 f"the transparent listener's replies (0x{reply:x}): the proxy's own packets would be "
                                 "routed to lo; choose another")
        if self.batch_max < self.batch_idle:
            raise ValueError("--batch-max must be >= --batch-idle")
        # A colliding health or debug port is a configuration error: refuse to start rather than run without it.
        from redirector.debug.settings import check_bind

        check_bind(self.health_address, self.health_port, self.proxy_port, server="health")
        if self.debug_port:
            check_bind(self.debug_address, self.debug_port, self.proxy_port)
            if self.debug_port == self.health_port:
                raise ValueError(f"--debug-port {self.debug_port} collides with --health-port: choose another "
                                 "(the health server is always on)")

    @property
    def node(self) -> str:
        return self.node_name or os.environ.get("NODE_NAME") or socket.gethostname()


def _choice(values: Sequence[str], *, upper: bool = False) -> Callable[[str], str]:
    def convert(text: str) -> str:
        value = text.upper() if upper else text.lower()
        if value not in values:
            raise ValueError(f"must be one of {', '.join(values)}")
        return value

    return convert


def _int_range(lo: int, hi: int, what: str) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise ValueError(f"must be an integer {what}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return convert


def _optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def wrapped(text: str) -> Any:
        return None if text.strip().lower() in ("", "none", "off") else convert(text)

    return wrapped


def _seconds(minimum: float) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("must be a number of seconds") from None
        if not value >= minimum or value == float("inf"):
            raise ValueError(f"must be a number of seconds >= {minimum}")
        return value

    return convert


def _loopback(text: str) -> str:
    """A loopback IP:port (the xDS TCP listener, Envoy's admin): never a routable address."""
    from controlplane.server import check_loopback

    check_loopback(text)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} must be IP:PORT with a port 1-65535")
    return text


def _address(family: Family) -> Callable[[str], str]:
    def convert(text: str) -> str:
        from redirector.localaddr import check_address

        return check_address(text, family)

    return convert


def _admin(text: str) -> str:
    return "auto" if text.strip().lower() == "auto" else _loopback(text)


def _name(text: str) -> str:
    if not text or len(text) > 63 or not text.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError("must be 1-63 letters, digits, '-', '_' or '.'")
    return text


# (flag, env suffix, field, converter, help)
ENVOY_CLUSTER_MODES = ("eager", "on-demand")
OPTIONS: tuple[tuple[str, str, str, Callable[[str], Any], str], ...] = (
    ("--backend", "BACKEND", "backend", _choice(BACKENDS), "kernel backend: nftables (default) or iptables"),
    ("--proxy-port", "PROXY_PORT", "proxy_port", _int_range(1, 65535, "port"), "local port the proxy listens on"),
    ("--proxy-name", "PROXY_NAME", "proxy_name", _name,
     "the Services labelled service.kubernetes.io/service-proxy-name=<this> are ours to redirect (every Service "
     "is watched: Envoy is prepared before a handoff label lands)"),
    ("--node-name", "NODE_NAME", "node_name", _name, "this node's name"),
    ("--resync-period", "RESYNC_PERIOD", "resync_period", _seconds(0.05),
     "seconds between full resyncs against the kernel (drift repair)"),
    ("--proxy-uid", "PROXY_UID", "proxy_uid", _optional(_int_range(0, 2**32 - 1, "uid")),
     "traffic of this uid is never redirected (output path); 'none' to disable"),
    ("--proxy-mark", "PROXY_MARK", "proxy_mark", _optional(_int_range(1, 2**32 - 1, "fwmark")),
     "packets with this fwmark (set by the proxy) are never redirected; 'none' to disable"),
    ("--nft-table", "NFT_TABLE", "nft_table", _name, "nftables table (family inet) the agent owns"),
    ("--iptables-chain", "IPTABLES_CHAIN", "iptables_chain", _name, "iptables nat chain the agent owns"),
    ("--iptables-variant", "IPTABLES_VARIANT", "iptables_variant", _choice(IPTABLES_VARIANTS),
     "iptables binaries: nft, legacy, or auto (the image's `iptables`); must match the host's kube-proxy"),
    ("--redirect-mode", "REDIRECT_MODE", "redirect_mode", _choice(c.REDIRECT_MODES),
     "dnat: to --redirect-address(6), kept on lo by the agent (works on every CNI); redirect: REDIRECT, which "
     "drops pod traffic where the host veth has no address (Calico, Cilium chaining, AWS VPC CNI)"),
    ("--redirect-address", "REDIRECT_ADDRESS", "redirect_address", _address(4),
     "node-local IPv4 address the dnat mode sends Service traffic to (never 127.0.0.0/8)"),
    ("--redirect-address6", "REDIRECT_ADDRESS6", "redirect_address6", _address(6),
     "node-local IPv6 address the dnat mode sends Service traffic to (a ULA; not ::1 or link-local)"),
    ("--health-address", "HEALTH_ADDRESS", "health_address", str,
     "address of the always-on health server (/healthz, /readyz, /metrics)"),
    ("--health-port", "HEALTH_PORT", "health_port", _int_range(1, 65535, "port"),
     "health server port (always on: the kubelet probes it)"),
    ("--debug-address", "DEBUG_ADDRESS", "debug_address", str, "address of the read-only debug server"),
    ("--debug-port", "DEBUG_PORT", "debug_port", _int_range(0, 65535, "port"), "debug server port (0: off)"),
    ("--kubeconfig", "KUBECONFIG", "kubeconfig", Path, "kubeconfig file"),
    ("--watch-timeout", "WATCH_TIMEOUT", "watch_timeout", _int_range(1, 3600, "number of seconds"),
     "server-side timeout of one watch request"),
    ("--watch-read-timeout", "WATCH_READ_TIMEOUT", "watch_read_timeout", _seconds(0.1),
     "client read timeout of the watch stream: a stream silent for longer is restarted"),
    ("--batch-idle", "BATCH_IDLE", "batch_idle", _seconds(0.0), "quiet time that ends a batch of changes"),
    ("--batch-max", "BATCH_MAX", "batch_max", _seconds(0.0), "longest a change waits for its batch"),
    ("--xds-socket", "XDS_SOCKET", "xds_socket", _optional(Path),
     "unix socket the control plane serves Envoy on (shared with the Envoy pod); 'none' with no --xds-address: "
     "no control plane, redirects not gated on Envoy"),
    ("--xds-address", "XDS_ADDRESS", "xds_address", _optional(_loopback),
     "optional loopback TCP address for xDS as well, e.g. 127.0.0.1:18000 (never a routable address)"),
    ("--envoy-clusters", "ENVOY_CLUSTERS", "envoy_clusters", _choice(ENVOY_CLUSTER_MODES),
     "eager: Envoy holds every migrated Service port's cluster, each ACKed before its redirect; on-demand: "
     "Envoy asks for a cluster when a connection first needs it (for many Services: Envoy's memory and "
     "start-up follow what this node uses; docs/controlplane.md)"),
    ("--handback-hold", "HANDBACK_HOLD", "handback_hold", _seconds(0.0),
     "seconds a handed-back Service keeps its redirect when kube-proxy's rules cannot be read "
     "(at least 2 x kube-proxy's minSyncPeriod)"),
    ("--handback-timeout", "HANDBACK_TIMEOUT", "handback_timeout", _seconds(0.0),
     "longest a handed-back Service keeps its redirect waiting for kube-proxy's rule to appear"),
    ("--lease-namespace", "LEASE_NAMESPACE", "lease_namespace", _optional(_name),
     "namespace of this agent's Lease, which reports the Services it prepared for a migration; 'none': no Lease"),
    ("--envoy-admin", "ENVOY_ADMIN", "envoy_admin", _optional(_admin),
     "Envoy's admin address (loopback) for per-Service traffic figures in /debug/proxy; 'auto': every loopback "
     "listener of --proxy-uid (any uid without it) but the proxy port and the agent's own servers, found at each "
     "read (the shipped Envoy's admin port is picked by the kernel); 'none': not read"),
    ("--preserve-source-ip", "PRESERVE_SOURCE_IP", "preserve_source_ip", _choice(("on", "off")),
     "on: externalTrafficPolicy Local traffic reaches its backend from the client's own address (as with "
     "kube-proxy) through the proxy's transparent listener on --transparent-port; the proxy needs CAP_NET_ADMIN "
     "(deploy/overlays/preserve-source-ip); off: the backend sees the proxy's address"),
    ("--transparent-port", "TRANSPARENT_PORT", "transparent_port", _int_range(1, 65535, "port"),
     "port of the proxy's transparent listener (--preserve-source-ip)"),
    ("--fallback", "FALLBACK", "fallback", _choice(("on", "off")),
     "while the node's Envoy is down, load-balance migrated Services in the kernel (L4 only): on or off"),
    ("--proc-sys", "PROC_SYS", "proc_sys", _optional(Path),
     "the node's /proc/sys (a writable mount of it in a container): the agent sets net.ipv4.tcp_migrate_req=1 "
     "so an Envoy rollout resets no queued connection; 'none': set nothing"),
    ("--daemonset", "DAEMONSET", "daemonset", _optional(_name),
     "the DaemonSet running this agent (in --lease-namespace): once it is deleted, the agent removes its rules "
     "when it stops (a rolling update keeps them); 'none': always keep them"),
    ("--log-level", "LOG_LEVEL", "log_level", _choice(LOG_LEVELS, upper=True), f"one of {', '.join(LOG_LEVELS)}"),
)


# Defaults that are a lookup rather than a value (see Settings.node and redirector.__main__.api_client).
SHOWN_DEFAULTS: Mapping[str, str] = {
    "node_name": "$NODE_NAME, else the hostname",
    "kubeconfig": "in-cluster, else $KUBECONFIG or ~/.kube/config",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    for flag, env, name, _conv, help_text in OPTIONS:
        default = getattr(defaults, name)
        shown = SHOWN_DEFAULTS.get(name, "none" if default is None else default)
        if name == "proxy_mark" and isinstance(default, int):
            shown = hex(default)
        parser.add_argument(flag, dest=name, default=None, metavar=name.split("_")[-1].upper(),
                            help=f"{help_text} [env {ENV_PREFIX}{env}; default: {shown}]")


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags win over the environment, which wins over the defaults. Raises ValueError with the culprit."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for flag, suffix, name, convert, _help in OPTIONS:
        raw = getattr(args, name, None)
        source = flag
        if raw is None:
            raw = env.get(ENV_PREFIX + suffix)
            source = ENV_PREFIX + suffix
        if raw is None:
            continue
        try:
            values[name] = convert(str(raw))
        except ValueError as exc:
            raise ValueError(f"{source}={raw!r}: {exc}") from None
    return Settings(**values)
