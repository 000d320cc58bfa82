"""End-to-end fixtures: clear network namespaces that a crashed earlier run left behind."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _clean_stale_netns() -> None:
    if os.geteuid() == 0:
        from sandbox.node.netns import cleanup_stale

        for prefix in ("lpe2e", "lpdemo", "lpbench"):
            cleanup_stale(prefix)
