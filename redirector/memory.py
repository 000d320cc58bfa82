"""The agent's heap on glibc: fewer malloc arenas, and freed memory handed back after the big jobs.

A full list of 10,000 Services, their translation and a JSON listing of a 20,000-element nftables set each
allocate tens of MiB that are garbage a moment later; glibc keeps freed memory for reuse, so without this
the agent's RSS is its peak for ever (docs/performance.md, "The node agent as one process").
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import threading
import time

log = logging.getLogger(__name__)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


_LIBC = _libc()
_LOCK = threading.Lock()


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core); the agent's watch,
    gRPC and sync threads then keep freed memory in many half-empty arenas. $MALLOC_ARENA_MAX, when set,
    wins. False where this is not glibc."""
    if "MALLOC_ARENA_MAX" in os.environ or _LIBC is None:
        return False
    try:
        return bool(_LIBC.mallopt(-8, arenas))  # M_ARENA_MAX
    except AttributeError:
        return False


def release_freed(why: str) -> bool:
    """Give the OS the freed pages of every arena (``malloc_trim(0)``: a heap walk, milliseconds at the
    agent's size, so only after rare big jobs: a full sync, a large translation). False where this is
    not glibc or nothing was released."""
    if _LIBC is None or not hasattr(_LIBC, "malloc_trim"):
        return False
    with _LOCK:  # two threads finishing big jobs at once walk the heap once each, not concurrently
        started = time.monotonic()
        released = bool(_LIBC.malloc_trim(0))
    log.debug("freed memory handed back", extra={"after": why, "released": released,
                                                  "seconds": round(time.monotonic() - started, 4)})
    return released


def settle(why: str) -> None:
    """After a big job (a full sync, a translation of many Services): collect its garbage, move the
    survivors (the index, the views, the translation: ~500k objects at 10,000 Services, long-lived and free
    of reference cycles) out of the GC's view, and hand the freed heap back. Without the freeze every later
    full collection rescans them all, a pause of tens of ms holding the GIL, in the middle of an incremental
    sync or of an xDS answer Envoy is waiting for. Garbage is collected first (cheap: frozen objects are
    not scanned again), so no cycle is frozen in for good."""
    gc.collect()
    gc.freeze()
    release_freed(why)
