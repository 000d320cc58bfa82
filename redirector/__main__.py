"""``lightpath-redirector run|cleanup|version``: the node agent's command line.

``run`` keeps the kernel redirects in sync with the labelled Services until SIGTERM/SIGINT, then exits
leaving the rules in place (an upgrade or restart must not drop a redirect). ``cleanup`` removes what the
chosen backend owns and nothing else. Bad flags or env values: a clear message and exit status 2.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from importlib import metadata
from types import FrameType
from typing import TYPE_CHECKING, Any

from redirector import config, memory
from redirector.debug import cli as debug_cli
from shared import constants as c
from shared import logs

if TYPE_CHECKING:
    from redirector.debug.server import DebugServer

log = logging.getLogger("redirector")
ENV_NOTE = "A flag showing an env variable can also be set by it; the flag wins over the environment."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightpath-redirector",
        description="Node agent: keeps nftables/iptables REDIRECT rules sending labelled Services' TCP "
                    "traffic to the node-local proxy.",
        epilog=f"'<command> --help' lists its flags. {ENV_NOTE}",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,cleanup,debug,version}")
    run = sub.add_parser("run", help="watch Services and keep the kernel rules in sync (until SIGTERM)",
                         epilog=ENV_NOTE)
    config.add_arguments(run)
    cleanup = sub.add_parser("cleanup", help="remove the rules the chosen backend owns, nothing else",
                             epilog=ENV_NOTE)
    config.add_arguments(cleanup)
    debug = sub.add_parser("debug", help="print a debug endpoint of this node's agent as a table (or --json)",
                           epilog=ENV_NOTE)
    debug_cli.add_arguments(debug)
    boot = sub.add_parser("bootstrap", help="print the node-local Envoy's bootstrap (what deploy/proxy ships)")
    boot.add_argument("--node-id", default="lightpath-proxy",
                      help="node.id (the DaemonSet overrides it with --service-node $(NODE_NAME)) [default: %(default)s]")
    boot.add_argument("--xds-socket", default=c.DEFAULT_XDS_SOCKET, help="the agent's xDS socket [default: %(default)s]")
    boot.add_argument("--admin-port", type=int, default=c.ENVOY_ADMIN_PORT, help="admin port on 127.0.0.1 [default: %(default)s]")
    boot.add_argument("--proxy-mark", default="none",
                      help="SO_MARK on upstream sockets (needs CAP_NET_ADMIN), or 'none' when the agent exempts "
                           "Envoy's UID instead (the shipped DaemonSet) [default: %(default)s]")
    sub.add_parser("version", help="print the version")
    return parser


def version() -> str:
    try:
        return metadata.version("lightpath")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        print(f"lightpath-redirector {version()}")
        return 0
    if args.command == "bootstrap":
        return print_bootstrap(args)
    if args.command == "debug":
        return debug_cli.run(args)
    try:
        settings = config.settings_from(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2
    # The kubernetes client logs every retry of urllib3 at WARNING: our own watch log says it better. pyroute2
    # logs every netlink message at DEBUG (the redirect addresses are checked on each resync).
    logs.configure(settings.log_level, levels={"urllib3": logging.ERROR, "pyroute2": logging.INFO})
    if args.command == "cleanup":
        return cleanup(settings)
    return run(settings)


def print_bootstrap(args: argparse.Namespace) -> int:
    import json

    from controlplane.resources import bootstrap

    try:
        mark = None if str(args.proxy_mark).lower() == "none" else int(str(args.proxy_mark), 0)
    except ValueError:
        print(f"lightpath-redirector bootstrap: --proxy-mark {args.proxy_mark!r} is not a number or 'none'", file=sys.stderr)
        return 2
    print(json.dumps(bootstrap(node_id=args.node_id, xds_socket=args.xds_socket, admin_port=args.admin_port, mark=mark),
                     indent=2))
    return 0


def cleanup(settings: config.Settings) -> int:
    """Remove what the agent owns, every step tried even when an earlier one failed (the redirect itself
    above all: left behind, it would point migrated Services at a proxy that is going away)."""
    from redirector.backends import make_backend

    failed: list[str] = []

    def step(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - report, go on with the next step, fail at the end
            failed.append(what)
            log.error("cleanup step failed", extra={"step": what, "backend": settings.backend, "error": str(exc)})

    try:
        backend = make_backend(settings)
    except Exception as exc:  # noqa: BLE001 - nothing to clean up with
        log.error("cleanup failed", extra={"backend": settings.backend, "error": str(exc)})
        return 1

    def answers() -> None:
        try:
            from redirector.blocks import KernelBlocks
        except ImportError:  # no libnftables on this node: the agent never wrote that table (node._kernel_blocks)
            log.info("no libnftables: no kernel answers table to remove", extra={"backend": settings.backend})
            return
        KernelBlocks(f"{settings.nft_table}-block").cleanup()  # both backends write it

    def reply_route() -> None:  # --preserve-source-ip's (this agent's or an earlier one's)
        from redirector.transparent import ReplyRoute

        ReplyRoute(c.TRANSPARENT_REPLY_MARK).remove()

    def fallback() -> None:
        if settings.backend == "nftables":
            import nftables  # type: ignore[import-untyped,unused-ignore]

            from redirector.fallback import fallback_script

            nftables.Nftables().cmd(fallback_script(f"{settings.nft_table}-fallback", {}))
        else:
            from redirector.iptables import IptablesBackend
            from redirector.iptables_fallback import IptablesFallback

            if isinstance(backend, IptablesBackend):
                IptablesFallback(backend).cleanup()

    # The kernel answers table first: its transparent chain DNATs to the redirect addresses that the
    # backend's cleanup removes from lo.
    step("kernel answers table", answers)
    step("reply route", reply_route)
    step("redirect", backend.cleanup)
    step("kernel fallback", fallback)
    if failed:
        log.error("cleanup incomplete", extra={"backend": settings.backend, "failed": failed})
        return 1
    log.info("cleanup done: our rules are removed", extra={"backend": settings.backend})
    return 0


def run(settings: config.Settings) -> int:
    from redirector.backends import make_backend
    from redirector.node import build

    # Fewer, later collections: the agent holds ~100k small long-lived objects at 10,000 Services, and the
    # default thresholds would walk them all many times during a full sync.
    gc.set_threshold(50_000, 20, 20)
    memory.limit_malloc_arenas()
    if settings.proc_sys is not None and (settings.xds_socket is not None or settings.xds_address is not None):
        from redirector.sysctls import ensure

        ensure(settings.proc_sys)  # a failure is logged with its consequence; the agent still runs
    try:
        backend = make_backend(settings)
        node = build(settings, backend, api_client(settings))
    except Exception as exc:  # noqa: BLE001
        log.error("cannot start", extra={"backend": settings.backend, "error": str(exc)})
        return 1
    agent = node.agent
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received: stopping, the rules stay in place", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        node.start(settings, socket_owner=settings.proxy_uid)
    except Exception as exc:  # noqa: BLE001 - e.g. the xDS socket directory is not writable
        log.error("cannot start", extra={"error": str(exc), "xds_socket": str(settings.xds_socket)})
        node.stop()
        return 1
    health = start_health_server(agent, settings, node.sync_thread)
    if health is None:
        node.stop()
        return 1
    stop_debug = start_debug_server(agent, settings, node.sync_thread)
    log.info("redirector running", extra={"backend": backend.name, "proxy_name": settings.proxy_name,
                                          "node": settings.node, "proxy_port": settings.proxy_port,
                                          "control_plane": node.plane is not None,
                                          "xds_socket": str(settings.xds_socket), "version": version()})
    while not stop.wait(1.0):
        if not node.alive():
            log.error("an agent thread died: exiting")
            break
        if not health.running:
            log.error("the health server stopped: exiting (the kubelet probes it)", extra={"error": health.error})
            break
    node.stop()
    if stop_debug is not None:
        stop_debug()
    health.stop()
    if node.owner is not None and node.owner[0].deleting and stop.is_set():
        log.warning("the DaemonSet was deleted: removing this agent's rules (labelled Services on this node "
                    "now have no data plane until they are rolled back)",
                    extra={"daemonset": settings.daemonset, "redirects": len(agent.applied_keys())})
        return cleanup(settings)
    return 0 if stop.is_set() else 1


def api_client(settings: config.Settings) -> Any:
    """A ``kubernetes.client.ApiClient`` from --kubeconfig when given, else in-cluster, else the usual
    kubeconfig lookup ($KUBECONFIG, ~/.kube/config)."""
    from kubernetes import client
    from kubernetes import config as kube_config

    if settings.kubeconfig is not None:
        return kube_config.new_client_from_config(config_file=str(settings.kubeconfig))  # type: ignore[no-untyped-call]
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = client.Configuration()
        kube_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        return client.ApiClient(cfg)
    return kube_config.new_client_from_config()  # type: ignore[no-untyped-call]


def start_health_server(agent: object, settings: config.Settings, sync_thread: threading.Thread) -> DebugServer | None:
    """The always-on /healthz, /readyz, /metrics server; None (logged) when it cannot listen: the agent then
    exits, since the kubelet would restart it for failing its probes anyway (the rules stay in place)."""
    from redirector.debug.launch import start_health

    server: DebugServer | None = None
    try:
        server = start_health(agent, settings.health_address, settings.health_port, settings=settings,
                              sync_thread=sync_thread)
        error = server.error or ""
    except Exception as exc:  # noqa: BLE001 - reported below like a bind failure
        error = str(exc)
    if server is None or not server.running:
        log.error("health server failed to start: exiting, the rules stay in place",
                  extra={"address": settings.health_address, "port": settings.health_port, "error": error})
        return None
    return server


def start_debug_server(
    agent: object, settings: config.Settings, sync_thread: threading.Thread
) -> Callable[[], None] | None:
    """The debug server (``redirector.debug.launch.start``), returning its stop function; port 0: none."""
    if settings.debug_port == 0:
        return None
    from redirector.debug import launch

    try:
        stop: Callable[[], None] = launch.start(agent, settings.debug_address, settings.debug_port,
                                                settings=settings, sync_thread=sync_thread)
    except Exception as exc:  # noqa: BLE001 - the agent works without its debug server
        log.error("debug server failed to start", extra={"error": str(exc)})
        return None
    return stop


if __name__ == "__main__":
    sys.exit(main())
