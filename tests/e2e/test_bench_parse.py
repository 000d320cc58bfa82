"""The end-to-end benchmark reads wrk's output correctly (units differ line by line)."""

from __future__ import annotations

import pytest

from bench.e2e_bench import parse_wrk

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
