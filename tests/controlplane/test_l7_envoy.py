"""No annotation can make Envoy refuse a configuration: every option at the extremes the parser accepts,
built by the real ``resources`` builders, through the real Envoy's ``--mode validate``."""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2

from controlplane import l7
from controlplane import resources as res
from controlplane.translate import ClusterSpec
from tests.controlplane.envoycheck import validate

EXTREMES = {
    "duration": ("1ms", "24h"), "duration0": ("0", "1ms", "24h"), "count": ("1", str(l7.MAX_COUNT)),
    "count0": ("0", str(l7.MAX_COUNT)), "percent": ("0", "100"), "retries": ("0", str(l7.MAX_RETRIES)),
    "bool": ("true", "false"), "lb": l7.LB_POLICIES, "retry_on": (",".join(sorted(l7.RETRY_ON)), "reset"),
}


def _variants() -> list[l7.PortOptions]:
    out = []
    for option in l7.OPTIONS.values():
        for text in EXTREMES[option.kind]:
            parsed = l7.parse({l7.PREFIX + "web-" + option.name: text}, [("web", True)])
            assert all("base ejection time" in p for p in parsed.problems), parsed.problems
            found = parsed.of("web")
            assert found is not None
            out.append(found)
    return out


def test_every_option_at_its_extremes_is_accepted_by_envoy() -> None:
    variants = _variants()
    clusters = []
    routes = res.RouteBuilder(4)
    for i, opts in enumerate(variants):
        for protocol in ("http", "h2c", "tcp"):
            name = f"10.96.{i // 250}.{i % 250}:{ {'http': 80, 'h2c': 81, 'tcp': 82}[protocol]}"
            cluster = opts.cluster if protocol != "tcp" else l7.parse({}, [("", False)]).ports[0][1].cluster
            clusters.append(res.cluster(ClusterSpec(name, f"s{i}_{protocol}", protocol, "shop/web", False, cluster)))
            clusters.append(res.cluster(ClusterSpec(name + "0", f"a{i}_{protocol}", protocol, "shop/web", True, cluster)))
        assert opts.route is not None
        routes.set(f"10.96.{i // 250}.{i % 250}:80", opts.route)
    tcp_variants = [l7.PortOptions(o.cluster, None) for o in variants]
    for i, opts in enumerate(tcp_variants):  # a TCP port gets the same cluster options minus the HTTP ones
        clusters.append(res.cluster(ClusterSpec(f"10.97.0.{i % 250}:{1000 + i}", f"t{i}", "tcp", "shop/db", False,
                                                opts.cluster)))
    ok, output = validate(clusters, routes.config)
    assert ok, output[-2000:]


def test_the_validation_does_refuse_what_envoy_refuses() -> None:
    """The check above is only worth something if validation reads the clusters and routes: it does."""
    bad = res.cluster(ClusterSpec("10.96.0.10:80", "s", "http", "shop/web", False,
                                  l7.ClusterOptions(outlier=l7.Outlier(base_ejection_ms=400_000))))
    ok, output = validate([bad], res.RouteBuilder(4).config)
    assert not ok and "max_ejection_time cannot be smaller than base_ejection_time" in output
    routes = res.RouteBuilder(4)  # an explicit route (inside the virtual host's matcher) without a cluster
    routes.set("10.96.0.10:80", l7.RouteOptions())
    entry = routes.config.virtual_hosts[0].matcher.matcher_tree.exact_match_map.map["10.96.0.10:80"]
    route = route_components_pb2.Route()
    entry.action.typed_config.Unpack(route)
    route.route.ClearField("cluster")
    entry.action.typed_config.Pack(route)
    ok, output = validate([], routes.config)
    assert not ok and "cluster_specifier" in output, output
