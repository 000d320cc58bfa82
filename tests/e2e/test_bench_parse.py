"""The benchmarks' pure parts: the end-to-end benchmark reads wrk's output correctly (units differ line by
line); the L7 benchmark's failing backend fails exactly its percentage, and its kill window and table say
what happened."""

from __future__ import annotations

import pytest

from bench.e2e_bench import parse_wrk
from bench.l7_bench import kill_window, summary, table
from tests.e2e.l7_backend import fails

WRK = """Running 10s test @ http://10.96.0.20/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.40ms  600.00us  20.00ms   90.00%
  Latency Distribution
     50%  812.00us
     75%    1.50ms
     90%    2.00ms
     99%    1.02s
  300000 requests in 10.00s, 20.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 3
Requests/sec:  29679.12
Transfer/sec:      2.00MB
"""


def test_parse_wrk() -> None:
    r = parse_wrk(WRK)
    assert r["p50"] == pytest.approx(812e-6) and r["p99"] == pytest.approx(1.02)
    assert r["rps"] == pytest.approx(29679.12)
    assert r["errors"] == "connect 0, read 2, write 0, timeout 1 non-2xx 3"


def test_the_failing_backend_fails_exactly_its_percentage_evenly() -> None:
    assert [n for n in range(1, 21) if fails(n, 30)] == [4, 7, 10, 14, 17, 20]  # 3 of every 10, never two in a row
    for percent in (0, 1, 30, 33, 50, 100):
        assert sum(fails(n, percent) for n in range(1, 1001)) == 10 * percent
        assert all(sum(fails(n, percent) for n in range(k, k + 100)) == percent for k in (1, 37, 501))


def test_the_kill_window() -> None:
    killed = 100.0
    results = [(99.0 + i / 10, 0.002, 200) for i in range(40)]
    results[12] = (100.2, 0.001, None)  # refused 0.2 s after the kill
    results[25] = (101.5, 2.0, 503)
    samples = [(99.0, 0, 0), (99.9, 0, 0), (100.1, 0, 1), (100.3, 1, 5), (103.0, 0, 5)]
    window = kill_window(results, killed, samples)
    assert window == {"failures": 2, "last_failure_s": 1.5, "statuses": {"503": 1, "none": 1}, "ejected_after_s": 0.3,
                      "refused_attempts": 5}
    assert kill_window(results[:10], killed, None) == {"failures": 0, "last_failure_s": None}  # DNAT: no Envoy
    assert kill_window(results[:10], killed, [(99.0, 0, 0)])["ejected_after_s"] is None
    s = summary(results)
    assert (s["requests"], s["errors"], s["error_pct"], s["p50_ms"]) == (40, 2, 5.0, 2.0)
    out = {"rate": 10, "duration_s": 4, "kill_at_s": 1, "unready_after_s": 3,
           "cases": {"d one backend killed at 1 s": {"kp": s, "lpnr": s}},
           "kill": {"kp": kill_window(results, killed, None), "lpnr": window}}
    text = table(out)
    assert ("| kube-proxy stand-in (DNAT) | 2 (1 x 503, 1 x none) | 1500 ms | no ejection: chosen until the endpoint "
            "update | - |") in text
    assert "| 2 (1 x 503, 1 x none) | 1500 ms | 300 ms | 5 |" in text
