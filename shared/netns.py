"""Enter a named network namespace (``ip netns`` names, /run/netns/<name>) from Python.

WHY here: the redirector's debug probes (production) and the sandbox's test helpers both need it, and
production code must not import the sandbox (a test double).

setns() moves only the calling THREAD (or a forked single-threaded child). Callers either do it in a
throw-away thread or child, or use ``entered`` to come back; sockets opened inside keep that namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h


def _setns(fd: int, what: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({what}): {os.strerror(err)}")


def enter_fd(fd: int, what: str = "netns fd") -> None:
    """Move the calling thread into the namespace ``fd`` refers to (kept open by a caller that must come
    back to a namespace it has no name for, e.g. the one it was created in)."""
    _setns(fd, what)


def enter(name: str) -> None:
    """Move the calling thread into netns ``name`` for good (OSError when it cannot)."""
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd, name)
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """The calling thread in netns ``name`` for the block, then back in the one it was in."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter(name)
        try:
            yield
        finally:
            _setns(own, "back to our own netns")
    finally:
        os.close(own)
