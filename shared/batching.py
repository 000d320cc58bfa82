"""The one coalescing window of the project's sync loops (the agent's kernel sync, the control plane's
translation): act on a burst of changes once, soon after it ends.

kube-proxy's BoundedFrequencyRunner bounds how often a sync runs; here a change is applied once the stream
of changes has been quiet for ``idle`` seconds, and never later than ``longest`` after the first one: one
change is live in a few milliseconds, a burst of N changes becomes a handful of syncs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def wait_for_quiet(cond: threading.Condition, last_event: Callable[[], float], idle: float, longest: float,
                   stopped: Callable[[], bool] = lambda: False) -> None:
    """With ``cond`` held (the producers notify it with each change): return once ``last_event()`` (a
    ``time.monotonic`` value) is ``idle`` seconds old, ``longest`` seconds after the call, or when
    ``stopped()``."""
    start = time.monotonic()
    while not stopped():
        now = time.monotonic()
        quiet_until = last_event() + idle
        give_up = start + longest
        if now >= quiet_until or now >= give_up:
            return
        cond.wait(timeout=min(quiet_until, give_up) - now)
