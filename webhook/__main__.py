"""``lightpath-webhook``: parse settings, load the certificate, start the watchers, serve HTTPS."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from kubernetes import client, config

from webhook import logs
from webhook.app import create_app
from webhook.certs import CertificateError, CertStore
from webhook.namespaces import NamespaceCache
from webhook.server import build_server
from webhook.settings import Settings, parse_settings

log = logging.getLogger("lightpath.webhook")


def kube_client(settings: Settings) -> client.ApiClient:
    """From --kubeconfig when given, else the in-cluster service account."""
    configuration = client.Configuration()
    if settings.kubeconfig is not None:
        config.load_kube_config(config_file=str(settings.kubeconfig), client_configuration=configuration)
    else:
        config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logs.configure(settings.log_level)
    certs = CertStore(settings.tls_cert_file, settings.tls_key_file, reload_interval=settings.cert_reload_interval)
    try:
        certs.load()
    except CertificateError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    try:
        api = kube_client(settings)
    except Exception as exc:
        log.error("no Kubernetes API configuration (pass --kubeconfig outside a cluster): %s", exc)
        return 1
    namespaces = NamespaceCache(api)
    namespaces.start()
    certs.start()
    app = create_app(settings, namespaces, certs)
    log.info(
        "lightpath-webhook starting",
        extra={"address": settings.bind_address, "port": settings.port, "mode": settings.mode,
               "proxy_name": settings.proxy_name, "excluded_namespaces": sorted(settings.excluded_namespaces)},
    )
    try:
        build_server(app, certs, host=settings.bind_address, port=settings.port).run()
    finally:
        certs.stop()
        namespaces.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
