"""Sandbox test fixtures: clear network namespaces a crashed earlier run left behind; a fresh API server."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sandbox.api.apiserver import SandboxApiServer


@pytest.fixture(scope="session", autouse=True)
def _clean_stale_netns() -> None:
    if os.geteuid() == 0:
        from sandbox.node.netns import cleanup_stale

        cleanup_stale("lp")


@pytest.fixture
def server() -> Iterator[SandboxApiServer]:
    """A sandbox API server with default settings for one test (a module may override it)."""
    with SandboxApiServer() as srv:
        yield srv
