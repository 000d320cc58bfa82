"""redirector.memory: freed heap handed back to the OS after big jobs (issue 11: agent RSS)."""

from __future__ import annotations

from pathlib import Path

import pytest

from redirector import memory


def rss_mib() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(memory._LIBC is None or not hasattr(memory._LIBC, "malloc_trim"), reason="not glibc")
def test_freed_pages_inside_the_heap_go_back_to_the_os() -> None:
    """64 MiB of 2 KiB blocks (malloc, not Python's small-object arenas), every 16th kept alive so glibc
    cannot shrink the heap from its top: the RSS stays until ``release_freed``, which returns the holes."""
    blocks = [bytes(2048) for _ in range(32 * 1024)]
    kept = blocks[::16]
    del blocks
    before = rss_mib()
    assert memory.release_freed("test")
    after = rss_mib()
    assert before - after > 32, (before, after)
    assert len(kept) == 2048


def test_malloc_arena_max_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert memory.limit_malloc_arenas() is False


def test_settle_collects_cycles_first_then_freezes_the_survivors() -> None:
    """A cycle that is garbage at settle time is collected, not frozen in for good; what survives leaves
    the GC's view (later collections do not rescan it)."""
    import gc
    import weakref

    class Node:
        other: object = None

    garbage = Node()
    garbage.other = garbage
    gone = weakref.ref(garbage)
    kept = Node()
    del garbage
    try:
        memory.settle("test")
        assert gone() is None
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # frozen: out of every generation
    finally:
        gc.unfreeze()
