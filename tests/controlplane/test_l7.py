"""l7: the original Lightpath's annotation names and defaults, the Service-wide form, and every class of bad
input the issue lists (a problem, the default used, nothing else affected)."""

from __future__ import annotations

import pytest

from controlplane import l7

P = l7.PREFIX
PORTS = [("http", True), ("db", False)]


def parse(annotations: dict[str, object], ports: list[tuple[str, bool]] = PORTS) -> l7.Parsed:
    return l7.parse(annotations, ports)


def only(parsed: l7.Parsed, port: str) -> l7.PortOptions:
    found = parsed.of(port)
    assert found is not None
    return found


def test_defaults_are_the_original_lightpaths() -> None:
    parsed = parse({})
    assert parsed.problems == ()
    http, db = only(parsed, "http"), only(parsed, "db")
    assert http.route == l7.RouteOptions(timeout_ms=15_000, per_try_timeout_ms=5_000, idle_timeout_ms=300_000,
                                         retry_enabled=True, retry_on="5xx,reset,retriable-headers", num_retries=2)
    assert http.cluster.connect_timeout_ms == 5_000 and http.cluster.upstream_idle_timeout_ms == 15_000
    assert http.cluster.lb_policy == "LEAST_REQUEST" and http.cluster.access_log is True
    assert http.cluster.outlier == l7.Outlier(10_000, 30_000, 300_000, 10, 5, 5)
    assert db.route is None and db.cluster == l7.TCP_CLUSTER_DEFAULT and db.cluster.upstream_idle_timeout_ms is None


def test_every_option_per_port() -> None:
    parsed = parse({
        P + "http-idle-timeout": "1m", P + "http-request-timeout": "300ms", P + "http-upstream-request-timeout": "2",
        P + "http-upstream-idle-timeout": "1.5s", P + "http-upstream-connect-timeout": "250ms",
        P + "http-retry-enabled": "false", P + "http-retry-on": "gateway-error, reset", P + "http-num-retries": "4",
        P + "http-lb-policy": "round_robin", P + "http-access-log": "off",
        P + "http-circuit-breaker-default-max-connections": "10", P + "http-circuit-breaker-default-max-pending-requests": "11",
        P + "http-circuit-breaker-default-max-requests": "12", P + "http-circuit-breaker-default-max-retries": "0",
        P + "http-circuit-breaker-default-track-remaining": "true", P + "http-circuit-breaker-high-max-connections": "20",
        P + "http-circuit-breaker-high-max-pending-requests": "21", P + "http-circuit-breaker-high-max-requests": "22",
        P + "http-circuit-breaker-high-max-retries": "23", P + "http-circuit-breaker-high-track-remaining": "yes",
        P + "http-outlier-detection-interval": "1s", P + "http-outlier-detection-base-ejection-time": "2s",
        P + "http-outlier-detection-max-ejection-time": "3s", P + "http-outlier-detection-max-ejection-percent": "50",
        P + "http-outlier-detection-consecutive-5xx": "2", P + "http-outlier-detection-consecutive-gateway-failure": "3",
    })
    assert parsed.problems == ()
    http = only(parsed, "http")
    assert http.route == l7.RouteOptions(300, 2_000, 60_000, False, "gateway-error,reset", 4)
    assert http.cluster == l7.ClusterOptions(
        connect_timeout_ms=250, lb_policy="ROUND_ROBIN", default_priority=l7.Breaker(10, 11, 12, 0, True),
        high_priority=l7.Breaker(20, 21, 22, 23, True), outlier=l7.Outlier(1_000, 2_000, 3_000, 50, 2, 3),
        upstream_idle_timeout_ms=1_500, access_log=False)
    assert only(parsed, "db") == l7.PortOptions(l7.TCP_CLUSTER_DEFAULT, None)  # the other port is untouched


def test_service_wide_form_applies_to_every_port_and_the_per_port_form_wins() -> None:
    parsed = parse({P + "upstream-connect-timeout": "1s", P + "db-upstream-connect-timeout": "2s",
                    P + "num-retries": "5", P + "lb-policy": "MAGLEV"})
    assert parsed.problems == ()
    http, db = only(parsed, "http"), only(parsed, "db")
    assert (http.cluster.connect_timeout_ms, db.cluster.connect_timeout_ms) == (1_000, 2_000)
    assert http.route is not None and http.route.num_retries == 5 and db.route is None  # HTTP options: HTTP ports
    assert http.cluster.lb_policy == db.cluster.lb_policy == "MAGLEV"


def test_tcp_ports_get_no_http_options_and_say_so() -> None:
    parsed = parse({P + "db-request-timeout": "1s", P + "db-idle-timeout": "10s", P + "db-upstream-idle-timeout": "1s"})
    assert only(parsed, "db") == l7.PortOptions(l7.TCP_CLUSTER_DEFAULT, None)
    assert len(parsed.problems) == 3
    assert any("idle timeout is node-wide" in p for p in parsed.problems)
    assert all("HTTP ports only" in p for p in parsed.problems if "idle-timeout" not in p or "upstream" in p)


def test_an_http_only_outlier_option_on_a_tcp_port_is_reported() -> None:
    # A TCP cluster's outlier detection counts connection failures only: consecutive 5xx would be silently void.
    parsed = parse({P + "db-outlier-detection-consecutive-5xx": "2",
                    P + "db-outlier-detection-consecutive-gateway-failure": "3"})
    assert only(parsed, "db").cluster.outlier == l7.Outlier(consecutive_gateway_failure=3)  # the other still applies
    assert only(parsed, "http") == l7.PortOptions(l7.HTTP_CLUSTER_DEFAULT, l7.DEFAULT_ROUTE)
    assert len(parsed.problems) == 1, parsed.problems
    problem = parsed.problems[0]
    assert problem.startswith(P + "db-outlier-detection-consecutive-5xx: applies to HTTP ports only")
    assert "consecutive-gateway-failure" in problem and problem.endswith("ignored") and len(problem) < 200
    # every HTTP-only option, not only this one, is reported on a TCP port
    http_only = [name for name, option in l7.OPTIONS.items() if option.http_only]
    assert "outlier-detection-consecutive-5xx" in http_only
    values = {"duration0": "1s", "bool": "true", "retry_on": "reset", "retries": "1", "count": "2"}
    every = parse({P + "db-" + name: values[l7.OPTIONS[name].kind] for name in http_only})
    assert len(every.problems) == len(http_only) and only(every, "db") == l7.PortOptions(l7.TCP_CLUSTER_DEFAULT, None)


def test_the_service_wide_consecutive_5xx_applies_to_http_ports_only_silently() -> None:
    parsed = parse({P + "outlier-detection-consecutive-5xx": "2"})
    assert parsed.problems == ()
    assert only(parsed, "http").cluster.outlier.consecutive_5xx == 2
    assert only(parsed, "db").cluster == l7.TCP_CLUSTER_DEFAULT  # shares the defaults' cluster


def test_durations() -> None:
    ok = {"5s": 5_000, "300ms": 300, "1m": 60_000, "2h": 7_200_000, "5": 5_000, "1.5s": 1_500, " 7S ": 7_000,
          "0.25m": 15_000, "24h": 86_400_000}
    for text, ms in ok.items():
        assert l7.duration_ms(text, allow_zero=False) == ms, text
    assert l7.duration_ms("0", allow_zero=True) == 0
    assert l7.duration_ms("0s", allow_zero=False) == l7.Invalid("must be more than 0")
    for text, why in {"-5s": "negative", "25h": "more than 24h", "99999999999999": "not a duration", "5 s": "not a duration",
                      "1.5ms": "whole number of milliseconds", "1e3": "not a duration", "": "not a duration",
                      "5d": "not a duration", "NaN": "not a duration", "٣s": "not a duration"}.items():
        result = l7.duration_ms(text, allow_zero=True)
        assert isinstance(result, l7.Invalid) and why in result.why, (text, result)


@pytest.mark.parametrize(("annotation", "value", "words"), [
    ("http-request-timeout", "-5s", "is negative"),
    ("http-request-timeout", "10000h", "more than 24h"),
    ("http-num-retries", "many", "not a whole number"),
    ("http-num-retries", "-1", "is negative"),
    ("http-num-retries", "101", "more than 100"),
    ("http-num-retries", "2.5", "not a whole number"),
    ("http-circuit-breaker-default-max-connections", "4294967296", "more than 4294967295"),
    ("http-circuit-breaker-default-max-connections", "0", "at least 1"),
    ("http-circuit-breaker-high-track-remaining", "maybe", "not true or false"),
    ("http-outlier-detection-max-ejection-percent", "101", "more than 100"),
    ("http-outlier-detection-consecutive-5xx", "0", "at least 1"),
    ("http-outlier-detection-interval", "0s", "more than 0"),
    ("http-upstream-connect-timeout", "0", "more than 0"),
    ("http-lb-policy", "FASTEST", "is not one of"),
    ("http-retry-on", "5xx,sometimes", "unknown conditions (sometimes)"),
    ("http-retry-on", "5xx,,reset", "empty"),
    ("http-retry-enabled", "9" * 257, "not a short text"),
])
def test_a_bad_value_is_a_problem_and_the_default_is_used(annotation: str, value: str, words: str) -> None:
    other = {P + "http-access-log": "off"}  # a valid annotation beside the bad one still applies
    parsed = parse({P + annotation: value, **other})
    assert len(parsed.problems) == 1 and words in parsed.problems[0], parsed.problems
    assert parsed.problems[0].startswith(P + annotation + ":") and "default used" in parsed.problems[0]
    assert len(parsed.problems[0]) < 200
    assert parsed.ports == parse(other).ports


def test_names_and_odd_input() -> None:
    parsed = parse({P + "web-num-retries": "3", P + "frobnicate": "1", P + "http-frobnicate": "1",
                    "other.example/num-retries": "7", P + "num-retries": 3, 42: "x"})
    assert [p.split(":")[0] for p in parsed.problems] == [P + "frobnicate", P + "http-frobnicate", P + "num-retries",
                                                           P + "web-num-retries"]
    assert "no port is named 'web'" in parsed.problems[3] and "unknown option" in parsed.problems[0]
    assert parsed.ports == parse({}).ports
    for odd in (None, "text", ["a"], {P + "x" * 100_000: "y" * 100_000}):
        result = l7.parse(odd, PORTS)
        assert result.ports == parse({}).ports and all(len(p) < 200 for p in result.problems)


def test_a_port_name_ending_like_an_option_is_still_a_port() -> None:
    parsed = parse({P + "api-retry-on": "reset"}, [("api-retry", True), ("api", True)])
    assert parsed.problems == ()  # "api-retry" + "on"? no such option: the longest option name decides
    api = only(parsed, "api").route
    assert api is not None and api.retry_on == "reset"


def test_unnamed_single_port_takes_the_service_wide_form() -> None:
    parsed = l7.parse({P + "num-retries": "1"}, [("", True)])
    route = only(parsed, "").route
    assert route is not None and route.num_retries == 1 and parsed.problems == ()


def test_max_ejection_time_never_below_the_base() -> None:
    parsed = parse({P + "http-outlier-detection-base-ejection-time": "10m"})
    outlier = only(parsed, "http").cluster.outlier
    assert outlier.base_ejection_ms == outlier.max_ejection_ms == 600_000
    assert len(parsed.problems) == 1 and "base ejection time" in parsed.problems[0]


def test_options_are_hashable_and_equal_by_value() -> None:
    assert hash(parse({P + "num-retries": "1"})) == hash(parse({P + "num-retries": "1"}))
    assert parse({P + "num-retries": "1"}) == parse({P + "num-retries": "1"}) != parse({})
