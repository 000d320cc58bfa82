"""Shared pytest hooks: tests marked ``root`` need root and network namespaces."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# Machines here are noisy (2 cores shared with kernels and servers under test): no per-example deadline.
settings.register_profile("lightpath", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("lightpath")

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root to create network namespaces and program netfilter (CI runs as root)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
