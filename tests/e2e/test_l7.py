"""Per-Service L7 options for real: annotations -> the agent's control plane -> a real Envoy, with backends
that fail or answer late (tests/e2e/l7_backend.py). Real TCP through network namespaces."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cli.main import main
from redirector.model import Key
from sandbox.node.traffic import Listener, _read_ready, http_request, wait_until
from shared import constants as c
from tests.e2e.envoynode import NS, EnvoyNode, envoy_node

pytestmark = pytest.mark.root
BACKEND = Path(__file__).with_name("l7_backend.py")
P = "config.lightpath.cloud/"


def backend(node: EnvoyNode, pod: int, *args: str) -> Listener:
    ns = node.topo.pods[pod]
    proc = ns.popen([sys.executable, "-P", str(BACKEND), "--name", f"pod{pod}", *args],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    listener = Listener(ns, _read_ready(proc, 20), 4, "http", proc)
    node.listeners.append(listener)
    return listener


def http_service(node: EnvoyNode, name: str, ip: str, port: int, pods: list[int], annotations: dict[str, str]) -> Key:
    body = {"metadata": {"name": name, "namespace": NS, "labels": {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME},
                         "annotations": annotations},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                     "ports": [{"name": "http", "port": 80, "targetPort": port, "protocol": "TCP", "appProtocol": "http"}]}}
    node.core.create_namespaced_service(NS, body, _preload_content=False)
    node.endpoints(name, {"http": port}, pods)
    key = Key(4, ip, 80)
    wait_until(lambda: key in node.kernel_keys(), timeout=20, what=f"{name}'s redirect")
    return key


def get(node: EnvoyNode, ip: str) -> dict[str, object]:
    reply = http_request(node.topo.pods[2], ip, 80, "/")
    reply["json"] = json.loads(reply["body"]) if reply["body"].startswith("{") else None
    return reply


def status_traffic(node: EnvoyNode, tmp: Path, request: Callable[[], object]) -> dict[str, Any]:
    """``lightpath status -o json``'s traffic for shop/flaky once the agent's Lease reports it (requests keep
    coming meanwhile: the Lease holds the rates of its last renewal period)."""
    kubeconfig = node.api.write_kubeconfig(tmp / "cli-kubeconfig")

    def reported() -> dict[str, Any] | None:
        request()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["--kubeconfig", str(kubeconfig), "status", "-n", NS, "-o", "json"]) == 0
        item = next(i for i in json.loads(out.getvalue())["items"] if i["name"] == "flaky")
        traffic = item["traffic"]
        return traffic if traffic and traffic["retriesPerSecond"] > 0 and traffic["p99Milliseconds"] is not None else None

    found: dict[str, Any] = wait_until(reported, timeout=40, interval=0.2, what="shop/flaky's traffic in lightpath status")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["--kubeconfig", str(kubeconfig), "--color", "never", "status", "-n", NS])
    assert "TRAFFIC" in out.getvalue() and "req/s" in out.getvalue(), out.getvalue()
    return found


def test_retries_turn_a_backends_500_into_a_200_and_can_be_turned_off(tmp_path: Path) -> None:
    with envoy_node(tmp_path) as node:
        flaky = backend(node, 0, "--fail-every", "2", "--port", "8081")  # requests 1, 3, 5... fail
        also = backend(node, 1, "--fail-every", "2", "--port", "8082")
        http_service(node, "flaky", "10.96.0.40", flaky.port, [0], {})  # the defaults: 2 retries on 5xx
        http_service(node, "strict", "10.96.0.41", also.port, [1], {P + "http-retry-enabled": "false"})
        replies = [get(node, "10.96.0.40") for _ in range(10)]
        assert [r["status"] for r in replies] == [200] * 10, replies
        assert node.envoy.counter("cluster.shop_flaky_80_ipv4.upstream_rq_retry") >= 10  # each one was retried
        statuses = [get(node, "10.96.0.41")["status"] for _ in range(10)]
        assert statuses.count(500) == 5 and statuses.count(200) == 5, statuses  # no retry: the backend's own answers
        assert node.envoy.counter("cluster.shop_strict_80_ipv4.upstream_rq_retry") == 0
        # The same figures per Service in the agent's /debug/proxy (from Envoy's admin).
        flaky_row = node.proxy("flaky")["services"][0]["keys"][0]["traffic"]
        strict_row = node.proxy("strict")["services"][0]["keys"][0]["traffic"]
        assert isinstance(flaky_row, dict), flaky_row
        assert flaky_row["upstream_rq_retry"] >= 10 and flaky_row["upstream_rq_2xx"] == 10, flaky_row
        assert strict_row["upstream_rq_total"] == 10 and strict_row["upstream_rq_5xx"] == 5, strict_row
        # ... and in the agent's /metrics, per Service port, for Prometheus.
        metrics = node.debug("/metrics")[1]
        assert 'lightpath_service_requests_total{namespace="shop",port="80",service="strict"} 10.0' in metrics
        assert 'lightpath_service_errors_total{namespace="shop",port="80",service="strict"} 5.0' in metrics
        assert 'lightpath_service_errors_total{namespace="shop",port="80",service="flaky"} 0.0' in metrics
        # What migrating changed, as an operator sees it: the agent's Lease carries this node's figures and
        # `lightpath status` adds the nodes up (requests per second, 5xx, retries, p99).
        seen = status_traffic(node, tmp_path, lambda: get(node, "10.96.0.40"))
        assert seen["requestsPerSecond"] > 0 and seen["retriesPerSecond"] > 0 and seen["nodes"] == 1, seen
        assert seen["p99Milliseconds"] is not None and seen["p99Milliseconds"] >= 0, seen


def test_outlier_detection_ejects_a_failing_backend(tmp_path: Path) -> None:
    with envoy_node(tmp_path) as node:
        bad = backend(node, 0, "--fail-every", "1", "--port", "8083")  # always 500
        good = backend(node, 1, "--port", "8083")
        assert bad.port == good.port == 8083
        http_service(node, "eject", "10.96.0.42", 8083, [0, 1], {
            P + "http-retry-enabled": "false", P + "http-outlier-detection-consecutive-5xx": "2",
            P + "http-outlier-detection-max-ejection-percent": "50", P + "http-outlier-detection-base-ejection-time": "5m"})
        ejected = "cluster.shop_eject_80_ipv4.outlier_detection.ejections_active"

        def ejected_after_one_more() -> bool:
            get(node, "10.96.0.42")
            return node.envoy.counter(ejected) == 1

        wait_until(ejected_after_one_more, timeout=30, what="the failing backend ejected")
        # The ejection reaches Envoy's worker threads a moment after the counter moves: wait for that (20 in a
        # row: with two hosts, 5 good answers in a row before the ejection applied happen by chance 1 in 32,
        # which CI once hit), then every request of a long run goes to the healthy pod.
        wait_until(lambda: all(get(node, "10.96.0.42")["status"] == 200 for _ in range(20)), timeout=15,
                   what="the ejection applied on the workers")
        replies = [get(node, "10.96.0.42") for _ in range(20)]
        assert {(r["status"], r["json"]["server"]) for r in replies} == {(200, "pod1")}, replies  # type: ignore[index]


def test_a_request_timeout_fires_with_a_504(tmp_path: Path) -> None:
    with envoy_node(tmp_path) as node:
        slow = backend(node, 0, "--delay", "30", "--port", "8084")
        http_service(node, "slow", "10.96.0.43", slow.port, [0], {P + "request-timeout": "300ms"})
        reply = get(node, "10.96.0.43")  # the client would give up after 5 s; the route's timeout is 0.3 s
        assert reply["status"] == 504 and "upstream request timeout" in str(reply["body"]), reply
        assert node.envoy.counter("cluster.shop_slow_80_ipv4.upstream_rq_timeout") == 1
        row = node.proxy("slow")["services"][0]
        assert row["problems"] == [] and all(k["served"] for k in row["keys"])



def test_a_per_try_timeout_gives_up_on_a_slow_attempt_and_the_retry_answers(tmp_path: Path) -> None:
    """`upstream-request-timeout` (route retry_policy.per_try_timeout): the first attempt of each pair takes
    30 s, the next answers at once. With the default retries the client gets the retry's 200 long before the
    15 s request timeout (and its own 5 s); without retries the per-try timeout alone answers 504. (Envoy's
    upstream_rq_per_try_timeout is not in the stats the bootstrap keeps: the request's own timeout counter
    staying 0 is what tells the two timeouts apart.)"""
    with envoy_node(tmp_path) as node:
        retried = backend(node, 0, "--delay", "30", "--slow-every", "2", "--port", "8085")  # requests 1, 3... late
        alone = backend(node, 1, "--delay", "30", "--slow-every", "2", "--port", "8086")
        http_service(node, "pertry", "10.96.0.44", retried.port, [0], {P + "http-upstream-request-timeout": "300ms"})
        http_service(node, "pertry-once", "10.96.0.45", alone.port, [1], {
            P + "http-upstream-request-timeout": "300ms", P + "http-retry-enabled": "false"})
        reply = get(node, "10.96.0.44")  # attempt 1 hangs, is abandoned after 0.3 s; attempt 2 answers
        assert reply["status"] == 200 and reply["json"] == {"server": "pod0", "n": 2, "failed": False}, reply
        stats = "cluster.shop_pertry_80_ipv4."
        assert node.envoy.counter(stats + "upstream_rq_total") == 2
        assert node.envoy.counter(stats + "upstream_rq_retry") == node.envoy.counter(stats + "upstream_rq_retry_success") == 1
        assert node.envoy.counter(stats + "upstream_rq_timeout") == 0  # the request's own timeout never fired
        assert node.envoy.counter(stats + "upstream_rq_per_try_timeout") == 1  # the try's did (a kept stat now)
        reply = get(node, "10.96.0.45")
        assert reply["status"] == 504 and "upstream request timeout" in str(reply["body"]), reply
        once = "cluster.shop_pertry-once_80_ipv4."
        assert node.envoy.counter(once + "upstream_rq_total") == 1 and node.envoy.counter(once + "upstream_rq_retry") == 0
        assert node.envoy.counter(once + "upstream_rq_timeout") == 0  # 0.3 s per try, not the 15 s request timeout
        for name in ("pertry", "pertry-once"):
            row = node.proxy(name)["services"][0]
            assert row["problems"] == [] and all(k["served"] for k in row["keys"]), row
