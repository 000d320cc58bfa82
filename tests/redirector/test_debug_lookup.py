"""/debug/lookup's pure decision: the kernel's keys decide, in the kernel's order; the desired state and
the cluster's Services explain a miss."""

from __future__ import annotations

from typing import Any

import pytest

from redirector.debug.lookup import is_local, lookup, parse_query
from redirector.debug.pages import BadRequest
from redirector.desired import desired_state
from redirector.model import DesiredState, Key
from tests.redirector.factories import service

LOCAL = ["127.0.0.0/8", "10.244.0.1/32", "::1/128", "fd00:10:244::1/128"]
WEB = service("web", cluster_ips=["10.96.0.10", "fd00:10:96::a"], families=["IPv4", "IPv6"], type_="NodePort",
              ports=[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}])
DESIRED = desired_state([WEB])
KERNEL = DESIRED.keys()


def ask(ip: str, port: int, *, kernel: frozenset[Key] = KERNEL, desired: DesiredState = DESIRED,
        services: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return lookup(parse_query(ip, port), kernel=kernel, desired=desired, local_prefixes=LOCAL, proxy_port=1666,
                  services=services)


@pytest.mark.parametrize(("ip", "port", "message"), [
    (None, 80, "ip is required"), ("", 80, "ip is required"), ("10.96.0", 80, "not an IPv4 or IPv6"),
    ("fe80::1%eth0", 80, "not an IPv4 or IPv6"), ("010.096.000.010", 80, "not an IPv4 or IPv6"),
    ("10.96.0.10", None, "port is required"), ("10.96.0.10", 0, "between 1 and 65535"),
    ("10.96.0.10", 70000, "between 1 and 65535"),
])
def test_bad_queries_are_refused_with_the_reason(ip: str | None, port: int | None, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_query(ip, port)


def test_addresses_are_canonicalised() -> None:
    assert parse_query("FD00:10:96:0::A", 80).ip == "fd00:10:96::a"
    assert ask("FD00:10:96:0::A", 80)["redirected"] is True


def test_a_service_address_in_the_kernel_is_redirected_with_its_owner() -> None:
    answer = ask("10.96.0.10", 80)
    assert answer["redirected"] and answer["match"] == "address" and answer["proxy_port"] == 1666
    assert answer["service"] == {"namespace": "shop", "name": "web", "port_name": "http", "kind": "clusterIP"}
    assert answer["handled_by"] == "lightpath" and answer["in_kernel"] and answer["in_desired_state"]


def test_a_node_port_matches_only_on_local_addresses() -> None:
    for ip in ("10.244.0.1", "127.0.0.53", "::1"):
        answer = ask(ip, 30080)
        assert answer["redirected"] and answer["match"] == "nodePort" and answer["local_address"], ip
        assert answer["service"]["kind"] == "nodePort"
    remote = ask("10.244.0.99", 30080, services=[WEB])
    assert not remote["redirected"] and not remote["local_address"] and remote["handled_by"] == "none"


def test_an_address_entry_wins_over_a_node_port_on_a_local_address() -> None:
    local_svc = service("local", cluster_ips=["10.244.0.1"], ports=[{"name": "p", "port": 30080}])
    desired = desired_state([WEB, local_svc])
    answer = ask("10.244.0.1", 30080, kernel=desired.keys(), desired=desired)
    assert answer["match"] == "address" and answer["service"]["name"] == "local"


def test_the_kernel_decides_not_the_desired_state() -> None:
    missing = ask("10.96.0.10", 80, kernel=frozenset())
    assert not missing["redirected"] and missing["in_desired_state"] and not missing["in_kernel"]
    assert "does not hold it" in missing["reason"] and missing["handled_by"] == "lightpath"
    stale = ask("10.96.0.99", 80, kernel=KERNEL | {Key(4, "10.96.0.99", 80)})
    assert stale["redirected"] and stale["service"] is None and "stale entry" in stale["reason"]


def test_a_miss_is_explained_by_the_cluster_services() -> None:
    kube = service("legacy", cluster_ips=["10.96.0.20"], labelled=False)
    other = service("other", cluster_ips=["10.96.0.30"])
    other["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "cilium"}
    udp = service("dns", cluster_ips=["10.96.0.40"], labelled=False,
                  ports=[{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "tcp", "port": 5353}])
    headless = service("headless", cluster_ips=["None"], labelled=False)
    services = [WEB, kube, other, udp, headless]
    assert ask("10.96.0.20", 80, services=services)["handled_by"] == "kube-proxy"
    assert ask("10.96.0.20", 80, services=services)["service"]["name"] == "legacy"
    assert ask("10.96.0.30", 80, services=services)["handled_by"] == "other:cilium"
    no_port = ask("10.96.0.40", 53, services=services)
    assert no_port["handled_by"] == "kube-proxy" and "no TCP port 53" in no_port["reason"]
    none = ask("192.0.2.1", 443, services=services)
    assert none["handled_by"] == "none" and none["service"] is None
    labelled_not_synced = ask("10.96.0.10", 80, kernel=frozenset(), desired=DesiredState(), services=services)
    assert labelled_not_synced["handled_by"] == "lightpath" and "no entry" in labelled_not_synced["reason"]
    assert ask("192.0.2.1", 443)["handled_by"] == "unknown"  # the API was not consulted


def test_is_local_ignores_garbage_prefixes() -> None:
    assert is_local("10.244.0.1", ["nonsense", "10.244.0.1/32"])
    assert not is_local("10.244.0.2", ["nonsense", "10.244.0.1/32"])
    assert not is_local("::1", ["127.0.0.0/8"])
