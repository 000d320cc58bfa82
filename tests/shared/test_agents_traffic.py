"""The traffic the node agents report in their Leases, read back and added up for ``lightpath status``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from redirector.lease import lease_body
from shared import constants as c
from shared.agents import live_agents, traffic

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def lease(node: str, figures: object, *, age: float = 1.0) -> dict[str, object]:
    body = lease_body(node, [], NOW - timedelta(seconds=age), traffic=figures if isinstance(figures, dict) else None)
    if not isinstance(figures, dict):
        body["metadata"]["annotations"][c.TRAFFIC_ANNOTATION] = figures  # type: ignore[index]
    return body


def test_nodes_add_up_and_the_worst_p99_is_shown() -> None:
    leases = [lease("a", {"window": 5.0, "services": {"shop/web": [10.0, 1.0, 2.0, 8.5], "shop/db": [3.0, 0, 0, None]}}),
              lease("b", {"window": 5.2, "services": {"shop/web": [5.0, 0.5, 0.0, 12.0]}})]
    seen = traffic(leases, NOW)
    web = seen["shop/web"]
    assert (web.requests, web.errors, web.retries, web.p99_ms, web.nodes, web.window) == (15.0, 1.5, 2.0, 12.0, 2, 5.2)
    assert web.error_ratio == 0.1
    assert seen["shop/db"].p99_ms is None and seen["shop/db"].nodes == 1
    assert set(live_agents(leases, NOW)) == {"a", "b"}  # the same Leases, read for handovers


def test_expired_leases_and_garbage_count_for_nothing_and_break_nothing() -> None:
    leases = [lease("gone", {"window": 5, "services": {"shop/web": [99, 0, 0, 1]}}, age=60),
              lease("junk", "not json"), lease("list", "[1, 2]"),
              lease("odd", {"window": "x", "services": {"shop/web": [1, -5, 0, 1], "shop/x": "y", "shop/y": [1, 2],
                                                       "shop/ok": [1, 0, 0, "slow"], "shop/bool": [True, 0, 0, None]}})]
    seen = traffic(leases, NOW)
    assert set(seen) == {"shop/ok"}
    assert (seen["shop/ok"].requests, seen["shop/ok"].p99_ms, seen["shop/ok"].window) == (1.0, None, 0.0)


def test_the_lease_always_carries_the_annotation_so_old_figures_do_not_linger() -> None:
    body = lease_body("a", [], NOW)
    assert json.loads(body["metadata"]["annotations"][c.TRAFFIC_ANNOTATION]) == {}
