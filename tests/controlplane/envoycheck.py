"""``envoy --mode validate`` over what the control plane builds: the proof that a configuration is one Envoy
accepts (the real binary's validation, not ours). The clusters become STATIC with one endpoint and the route
configurations are inlined in the listener's HTTP chains, since validation mode talks to no xDS server."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import json_format

from controlplane import resources as res
from sandbox.node.envoy_process import ENVOY_BIN


def _static(cluster: cluster_pb2.Cluster) -> dict[str, object]:
    copy = cluster_pb2.Cluster()
    copy.CopyFrom(cluster)
    copy.ClearField("eds_cluster_config")
    copy.type = cluster_pb2.Cluster.STATIC
    lb = copy.load_assignment.endpoints.add().lb_endpoints.add()
    lb.endpoint.address.socket_address.address = "127.0.0.1"
    lb.endpoint.address.socket_address.port_value = 9
    copy.load_assignment.cluster_name = copy.name
    return json_format.MessageToDict(copy)


def _inline(listener: listener_pb2.Listener, config: route_pb2.RouteConfiguration) -> dict[str, object]:
    copy = listener_pb2.Listener()
    copy.CopyFrom(listener)
    for chain in copy.filter_chains:
        for flt in chain.filters:
            if flt.name == "envoy.filters.network.http_connection_manager":
                manager = hcm_pb2.HttpConnectionManager()
                flt.typed_config.Unpack(manager)
                manager.ClearField("rds")
                manager.route_config.CopyFrom(config)
                flt.typed_config.Pack(manager)
    return json_format.MessageToDict(copy)


def validate(clusters: Iterable[cluster_pb2.Cluster], config: route_pb2.RouteConfiguration,
             listener: listener_pb2.Listener | None = None) -> tuple[bool, str]:
    """(Envoy accepted it, Envoy's output)."""
    listener = listener if listener is not None else res.ListenerBuilder(4, port=0).listener
    boot = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {"clusters": [_static(c) for c in clusters], "listeners": [_inline(listener, config)]}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "envoy.json"
        path.write_text(json.dumps(boot))
        proc = subprocess.run([str(ENVOY_BIN), "--mode", "validate", "-c", str(path), "-l", "error"],
                              capture_output=True, text=True, timeout=120, check=False)
    return proc.returncode == 0, proc.stdout + proc.stderr
