"""Wait for a condition with a deadline: tests poll, they never sleep and hope.

The one polling loop is ``sandbox.node.traffic.wait_until``; this keeps the tests' older spelling, failing as
an AssertionError that names what was awaited.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sandbox.node.traffic import wait_until


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 10.0, *, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until truthy and return its value; fail naming ``what`` at the deadline."""
    try:
        return wait_until(predicate, timeout=timeout, interval=interval, what=what)
    except TimeoutError as exc:
        raise AssertionError(f"timed out waiting for {what}: {exc}") from None
