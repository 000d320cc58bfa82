"""Envoy's memory with eager clusters: the control plane counts them and warns once past a threshold."""

from __future__ import annotations

import logging

import pytest

from controlplane.controller import ControlPlane
from controlplane.translate import NodeInfo
from tests.controlplane.factories import NODE, service


def test_many_eager_clusters_are_counted_and_warned_about_once(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Envoy holds ~32 KiB per eager cluster: the count is a metric, and past the threshold the agent says
    once what that costs and what to do (the shipped proxy's 512 MiB limit is exceeded from ~6,000 Services)."""
    from controlplane import controller

    monkeypatch.setattr(controller, "EAGER_CLUSTERS_WARNING", 3)
    p = ControlPlane(NodeInfo(NODE, ipv6=False))
    caplog.set_level(logging.WARNING, logger="controlplane.controller")
    ports = [{"name": f"p{i}", "port": 80 + i, "protocol": "TCP"} for i in range(2)]
    p.services.replace([service("a", ips=("10.96.0.41",), ports=ports)])
    p.sync(["shop/a"])
    assert p.metrics.clusters._value.get() == 2 and "many eager Envoy clusters" not in caplog.text
    p.services.upsert(service("b", ips=("10.96.0.42",), ports=ports))
    p.sync(["shop/b"])
    p.services.upsert(service("c", ips=("10.96.0.43",), ports=ports))
    p.sync(["shop/c"])
    assert p.metrics.clusters._value.get() == 6
    assert caplog.text.count("many eager Envoy clusters") == 1
    on_demand = ControlPlane(NodeInfo(NODE, ipv6=False), on_demand=True)
    on_demand.services.replace([service(n, ips=(f"10.96.0.4{i}",), ports=ports) for i, n in enumerate("ab")])
    on_demand.sync(["shop/a", "shop/b"])
    assert on_demand.metrics.clusters._value.get() == 4
    assert caplog.text.count("many eager Envoy clusters") == 1  # on demand Envoy holds only what it uses
