"""``lightpath-webhook``: parse settings, load the certificate, start the watchers, serve HTTPS."""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from kubernetes import client, config

from shared import logs
from webhook.app import NamespaceSource, create_app
from webhook.certs import CertificateError, CertStore
from webhook.namespaces import NamespaceCache
from webhook.server import build_server
from webhook.settings import Settings, parse_settings

log = logging.getLogger("lightpath.webhook")


class NoApiServer:
    """Namespace labels when no Kubernetes API is configured (a local trial run): never ready, and
    every review that needs namespace labels is allowed untouched (the fail-safe answer)."""

    synced = False

    def labels(self, name: str) -> dict[str, str] | None:
        return None

    def fetch(self, name: str) -> dict[str, str]:
        raise RuntimeError("no Kubernetes API configured (pass --kubeconfig, or run in a cluster)")


def kube_client(settings: Settings) -> client.ApiClient | None:
    """--kubeconfig; else in-cluster; else $KUBECONFIG or ~/.kube/config like kubectl; else None."""
    configuration = client.Configuration()
    if settings.kubeconfig is not None:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(settings.kubeconfig), client_configuration=configuration
        )
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or str(Path.home() / ".kube" / "config")
        if not Path(path).is_file():
            return None
        config.load_kube_config(config_file=path, client_configuration=configuration)  # type: ignore[no-untyped-call]
    return client.ApiClient(configuration)


def start_handover(settings: Settings, api: client.ApiClient | None, namespaces: NamespaceSource) -> Callable[[], None]:
    """The leader-elected handover controller (``webhook.handover``), unless --handover off or no API."""
    if not settings.handover or api is None:
        return lambda: None
    from webhook.handover import LEADER_LEASE, HandoverController, event_recorder
    from webhook.leader import LeaderElector

    identity = settings.pod_name or socket.gethostname()
    elector = LeaderElector(api, settings.agent_namespace, LEADER_LEASE, identity)
    controller = HandoverController(api, settings.policy(), namespaces.labels, agent_namespace=settings.agent_namespace,
                                    timeout=settings.handover_timeout, leading=lambda: elector.leading,
                                    emit=event_recorder(api, identity))
    threading.Thread(target=elector.run, name="leader-election", daemon=True).start()
    controller.start()

    def stop() -> None:
        controller.stop()
        elector.stop()

    return stop


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    # uvicorn's loggers come with their own handlers: adopt them. One line per admission is ours; uvicorn's
    # access line would only repeat it without the decision.
    logs.configure(settings.log_level, adopt=("uvicorn", "uvicorn.error", "uvicorn.access"),
                   levels={"uvicorn.access": logging.WARNING})
    certs = CertStore(settings.tls_cert_file, settings.tls_key_file, reload_interval=settings.cert_reload_interval)
    try:
        certs.load()
    except CertificateError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    try:
        api = kube_client(settings)
    except Exception as exc:
        log.error("cannot load the Kubernetes configuration: %s", exc)
        return 1
    namespaces: NamespaceSource
    if api is None:
        log.error("no Kubernetes API configured (no --kubeconfig, not in a cluster, no ~/.kube/config): "
                  "namespace labels are unavailable, /readyz stays 503 and reviews are allowed untouched")
        namespaces = NoApiServer()
    else:
        cache = NamespaceCache(api)
        cache.start()
        namespaces = cache
    certs.start()
    stop_handover = start_handover(settings, api, namespaces)
    app = create_app(settings, namespaces, certs)
    log.info(
        "lightpath-webhook starting",
        extra={"address": settings.bind_address, "port": settings.port, "mode": settings.mode,
               "proxy_name": settings.proxy_name, "excluded_namespaces": sorted(settings.excluded_namespaces)},
    )
    server = build_server(app, certs, host=settings.bind_address, port=settings.port)
    # Everything imported and built so far lives as long as the process. Freezing it keeps the ~70k
    # start-up objects out of every later full collection, which otherwise pauses the event loop for
    # tens of milliseconds in the middle of an admission (docs/performance.md).
    gc.collect()
    gc.freeze()
    try:
        server.run()
    finally:
        stop_handover()
        certs.stop()
        if isinstance(namespaces, NamespaceCache):
            namespaces.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
