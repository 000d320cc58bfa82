"""shared.netns: a thread enters a named netns (and ``entered`` comes back); other threads stay put."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator

import pytest

from shared.netns import NETNS_DIR, enter, entered


def _netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"lpsh-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


@pytest.mark.root
def test_entered_moves_this_thread_for_the_block_only(netns: str) -> None:
    own, target = _netns_inode(), os.stat(NETNS_DIR / netns).st_ino
    seen_elsewhere: list[int] = []
    go = threading.Event()

    def elsewhere() -> None:  # a thread that already runs (a new one would inherit the block's netns)
        go.wait(10)
        seen_elsewhere.append(_netns_inode())

    other = threading.Thread(target=elsewhere)
    other.start()
    with entered(netns):
        assert _netns_inode() == target
        go.set()
        other.join()
    assert _netns_inode() == own
    assert seen_elsewhere == [own]  # setns moves the calling thread, not the process


@pytest.mark.root
def test_enter_moves_the_calling_thread_for_good(netns: str) -> None:
    seen: list[int] = []

    def work() -> None:
        enter(netns)
        seen.append(_netns_inode())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [os.stat(NETNS_DIR / netns).st_ino]


def test_a_missing_netns_is_an_oserror() -> None:
    with pytest.raises(OSError):
        enter(f"lpsh-missing-{os.getpid()}")
