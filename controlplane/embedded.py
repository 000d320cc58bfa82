"""The product's control plane fed straight from Service and EndpointSlice dicts instead of API watches:
for benchmarks (the same translation, store and ADS server as the agent, minus the reflectors) and tools.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from controlplane.controller import ControlPlane
from controlplane.server import AdsServer, wait_in_sync
from controlplane.translate import NodeInfo
from shared import constants as c


class EmbeddedControlPlane:
    """``start(socket)`` -> serve ``services``/``slices`` to whichever Envoy connects as ``node``."""

    def __init__(self, node: str, services: Iterable[dict[str, Any]] = (), slices: Iterable[dict[str, Any]] = (),
                 *, proxy_port: int = c.DEFAULT_PROXY_PORT, ipv6: bool = True, on_demand: bool = False) -> None:
        self.plane = ControlPlane(NodeInfo(node, ipv6=ipv6), proxy_port=proxy_port, on_demand=on_demand)
        self.server = AdsServer(self.plane.store, expected_node=node, on_ack=self.plane.acked,
                                on_nack=self.plane.nacked, on_push=self.plane.pushed,
                                ready=self.plane.first_push_done, on_demand=on_demand)
        self.plane.attach(self.server)
        self.plane.services.replace(list(services))
        self.plane.slices.replace(list(slices))
        self._thread = threading.Thread(target=self.plane.run, name="controlplane", daemon=True)

    def start(self, socket: Path) -> EmbeddedControlPlane:
        self.server.start(socket_path=socket)
        self._thread.start()
        return self

    def wait_in_sync(self, timeout: float = 30) -> bool:
        return self.plane.first_push_done.wait(timeout) and wait_in_sync(self.server, timeout)

    def stop(self) -> None:
        self.plane.stop()
        self.server.stop()
        self._thread.join(timeout=5)
