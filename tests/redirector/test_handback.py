"""Handback, make-before-break: a Service whose label goes keeps its redirect until kube-proxy's rule for it
is visible (or a bounded hold); a deleted Service loses it at once. The decisions against the in-memory
FakeBackend (no root); the parsers of kube-proxy's rules against the stand-in's real ruleset text."""

from __future__ import annotations

import time
from typing import Any

from redirector.agent import Agent
from redirector.fake_backend import FakeBackend
from redirector.kubeproxy_rules import parse_iptables_save, parse_nft_maps
from redirector.model import Key
from sandbox import kubeproxy
from shared import constants as c
from tests.redirector.factories import service
from tests.support.polling import wait_for

LABEL = (c.SERVICE_PROXY_NAME_LABEL, c.DEFAULT_PROXY_NAME)
A = Key(4, "10.96.0.1", 80)


class KubeProxy:
    """What kube-proxy is seen to serve (None: its rules cannot be read)."""

    def __init__(self) -> None:
        self.serving: frozenset[Key] | None = frozenset()
        self.reads = 0

    def __call__(self) -> frozenset[Key] | None:
        self.reads += 1
        return self.serving


def agent(kube: KubeProxy, **kwargs: Any) -> tuple[Agent, FakeBackend]:
    fake = FakeBackend()
    a = Agent(fake, proxy_label=LABEL, resync_period=3600, kube_proxy=kube, **kwargs)
    a.tracker.replace([service("a", cluster_ips=[A.ip])])  # type: ignore[list-item]
    a.sync_once()
    assert fake.dump() == [A]
    return a, fake


def unlabel(a: Agent) -> None:
    a.tracker.upsert(service("a", cluster_ips=[A.ip], labelled=False))


def released(a: Agent, fake: FakeBackend) -> bool:
    """One sync with the hold due for a check (the loop's 20 ms spacing skipped); True once the kernel is empty."""
    a._next_hold_check = 0
    a.sync_once()
    return not fake.dump()


def test_the_redirect_stays_until_kube_proxys_rule_is_visible() -> None:
    kube = KubeProxy()
    a, fake = agent(kube)
    unlabel(a)
    a.sync_once()
    assert fake.dump() == [A] and str(A) in a.held()  # kube-proxy has nothing for it yet: keep ours
    a._next_hold_check = 0
    a.sync_once()
    assert fake.dump() == [A]
    kube.serving = frozenset({A})  # kube-proxy programmed it (still shadowed by our redirect)
    a._next_hold_check = 0
    a.sync_once()
    assert fake.dump() == [] and a.held() == {}
    assert a.metrics.registry.get_sample_value("lightpath_redirector_handback_hold_seconds_count",
                                               {"released_by": "kube-proxy"}) == 1


def test_a_rollback_right_after_a_migration_ignores_the_rule_kube_proxy_is_about_to_remove() -> None:
    """Labelled at T0, unlabelled at T1 < T0 + handback_hold: kube-proxy (rate-limited) may not have applied
    the label yet, so the rule we see is the one its next sync removes. Found on three nodes (uninstall right
    after a migrate: 1 s of SYN timeouts). Its rule counts only once the label is handback_hold old."""
    kube = KubeProxy()
    a, fake = agent(kube, handback_hold=0.3)  # listed labelled: labelled before this agent started
    b = Key(4, "10.96.0.2", 80)
    a.tracker.upsert(service("b", cluster_ips=[b.ip]))  # migrated now
    a.sync_once()
    assert set(fake.dump()) == {A, b}
    kube.serving = frozenset({A, b})  # kube-proxy still shows b's rule from before the label
    a.tracker.upsert(service("b", cluster_ips=[b.ip], labelled=False))
    unlabel(a)
    a.sync_once()
    assert fake.dump() == [b], "A (labelled long ago) goes at once; b waits for the label to settle"
    labelled_for = time.monotonic()
    wait_for(lambda: released(a, fake), "b's redirect released", timeout=5, interval=0.01)
    assert fake.dump() == [] and time.monotonic() - labelled_for >= 0.2  # released once settled, not before


def test_a_deleted_service_loses_its_redirect_at_once() -> None:
    kube = KubeProxy()
    a, fake = agent(kube)
    a.tracker.delete(service("a", cluster_ips=[A.ip]))
    a.sync_once()
    assert fake.dump() == [] and a.held() == {}


def test_unreadable_kube_proxy_rules_mean_a_bounded_hold() -> None:
    kube = KubeProxy()
    kube.serving = None
    a, fake = agent(kube, handback_hold=0.05)
    unlabel(a)
    a.sync_once()
    assert fake.dump() == [A]
    wait_for(lambda: released(a, fake), "the bounded hold to run out", timeout=5, interval=0.005)
    assert fake.dump() == []
    assert a.metrics.registry.get_sample_value("lightpath_redirector_handback_hold_seconds_count",
                                               {"released_by": "hold"}) == 1


def test_relabelled_during_the_hold_keeps_the_redirect_for_good() -> None:
    kube = KubeProxy()
    a, fake = agent(kube, handback_timeout=0.0)
    unlabel(a)
    a.sync_once()
    a.tracker.upsert(service("a", cluster_ips=[A.ip]))  # the later intent: migrate again
    a.sync_once()
    a._next_hold_check = 0
    a.sync_once()
    assert fake.dump() == [A] and a.held() == {}


def test_a_held_key_survives_a_full_resync() -> None:
    kube = KubeProxy()
    a, fake = agent(kube)
    unlabel(a)
    a.sync_once()
    a.status.full_sync_pending = True
    a.sync_once()
    assert fake.dump() == [A]


def test_parsers_read_kube_proxys_maps_and_iptables_rules() -> None:
    svc = {"metadata": {"namespace": "d", "name": "web"},
           "spec": {"type": "NodePort", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00:10:96::20"],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
                              {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]}}
    eps = {"metadata": {"namespace": "d", "name": "w", "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": [{"addresses": ["10.244.0.10"]}]}
    text = kubeproxy.standin_ruleset([svc], [eps])
    v4 = text[:text.index("add table ip6")]
    maps = v4[v4.index("map service-ips"):v4.index("map no-endpoint-services")]
    assert parse_nft_maps(4, maps, maps) == {Key(4, "10.96.0.20", 80), Key(4, None, 30080)}  # UDP is not ours
    save = ("-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m comment --comment \"d/web:http cluster IP\" -m tcp "
            "--dport 80 -j KUBE-SVC-ABC\n-A KUBE-SERVICES -d 10.96.0.21/32 -p udp -m udp --dport 53 -j KUBE-SVC-D\n"
            "-A KUBE-NODEPORTS -p tcp -m comment --comment \"d/web:http\" -m tcp --dport 30080 -j KUBE-EXT-ABC\n")
    assert parse_iptables_save(4, save) == {Key(4, "10.96.0.20", 80), Key(4, None, 30080)}
    assert parse_iptables_save(6, "-A KUBE-SERVICES -d fd00:10:96::20/128 -p tcp -m tcp --dport 80 -j X\n") == {
        Key(6, "fd00:10:96::20", 80)}


def _marked(name: str, ip: str) -> dict[str, Any]:
    svc = service(name, cluster_ips=[ip], labelled=False)
    svc["metadata"]["annotations"] = {c.HANDOVER_ANNOTATION: c.HANDOVER_MIGRATE}
    return svc


def test_handover_outcomes_and_prepare_time_are_counted_per_node() -> None:
    """Issue 14 point 4: this node's part in each migration -- prepared after how long, and how the mark went."""
    kube = KubeProxy()
    a, fake = agent(kube)
    b, d = Key(4, "10.96.0.2", 80), Key(4, "10.96.0.3", 80)
    a.tracker.upsert(_marked("b", b.ip))
    a.tracker.upsert(_marked("d", d.ip))
    a.sync_once()
    assert a.prepared() == ["shop/b", "shop/d"] and set(fake.dump()) == {A, b, d}
    a.prepared()  # asked again (every Lease write): counted once
    a.tracker.upsert(service("b", cluster_ips=[b.ip]))  # the label came: migrated
    a.tracker.upsert(service("d", cluster_ips=[d.ip], labelled=False))  # the mark went alone: aborted
    a.sync_once()

    def value(name: str, **labels: str) -> float | None:
        return a.metrics.registry.get_sample_value(f"lightpath_redirector_{name}", labels)

    assert value("handover_prepare_seconds_count") == 2
    assert value("handovers_total", outcome="migrated") == 1 and value("handovers_total", outcome="aborted") == 1
    assert value("handover_duration_seconds_count", outcome="aborted") == 1
    assert set(fake.dump()) >= {A, b}  # the migrated one stays; the aborted one is handed back (held)


def test_the_agent_reads_the_iptables_mode_stand_ins_rules() -> None:
    """The iptables-mode stand-in (kube-proxy v1.33's KUBE-SERVICES layout) and the agent's reader agree:
    served ports are found (NodePorts too), a port without endpoints (a REJECT in filter) is not."""
    from sandbox import kubeproxy_iptables

    served = {"metadata": {"name": "web", "namespace": "shop"},
              "spec": {"clusterIPs": ["10.96.0.20", "fd00:10:96::20"],
                       "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}}
    empty = {"metadata": {"name": "idle", "namespace": "shop"},
             "spec": {"clusterIPs": ["10.96.0.21"], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}
    slices = [{"metadata": {"namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": f"IPv{f}", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [{"addresses": [ip]}]} for f, ip in ((4, "10.244.0.10"), (6, "fd00:10:244::10"))]
    ports = kubeproxy.service_ports([served, empty], slices)
    nat4 = kubeproxy_iptables.nat_rules(4, ports)
    save4 = "\n".join(f"-A {chain} {spec}" for chain, specs in nat4.items() for spec in specs)
    assert parse_iptables_save(4, save4) == {Key(4, "10.96.0.20", 80), Key(4, None, 30080)}
    save6 = "\n".join(f"-A {c} {s}" for c, specs in kubeproxy_iptables.nat_rules(6, ports).items() for s in specs)
    assert parse_iptables_save(6, save6) == {Key(6, "fd00:10:96::20", 80), Key(6, None, 30080)}
    assert any("10.96.0.21/32" in r and "REJECT" in r for r in kubeproxy_iptables.filter_rules(4, ports))
