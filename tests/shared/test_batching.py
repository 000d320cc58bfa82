"""The one coalescing window (shared.batching), used by the agent's sync loop and the control plane's."""

from __future__ import annotations

import threading
import time

from shared.batching import wait_for_quiet


class CountingCondition(threading.Condition):
    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


def test_an_old_change_is_acted_on_without_waiting() -> None:
    cond = CountingCondition()
    with cond:
        wait_for_quiet(cond, lambda: time.monotonic() - 10, idle=0.05, longest=1.0)
    assert cond.waits == 0


def test_it_returns_once_the_last_change_is_idle_seconds_old() -> None:
    cond = threading.Condition()
    last = time.monotonic()
    with cond:
        wait_for_quiet(cond, lambda: last, idle=0.05, longest=5.0)
    assert time.monotonic() - last >= 0.05


def test_a_burst_that_never_ends_is_cut_at_longest() -> None:
    cond = threading.Condition()
    state = {"last": time.monotonic(), "running": True}

    def produce() -> None:
        while state["running"]:
            with cond:
                state["last"] = time.monotonic()
                cond.notify_all()
            time.sleep(0.001)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        with cond:
            wait_for_quiet(cond, lambda: float(state["last"]), idle=0.05, longest=0.2)
        assert state["running"] and producer.is_alive()  # returned while changes still arrived
    finally:
        state["running"] = False
        producer.join(5)


def test_a_stop_ends_the_wait() -> None:
    cond = CountingCondition()
    with cond:
        wait_for_quiet(cond, time.monotonic, idle=60, longest=60, stopped=lambda: True)
    assert cond.waits == 0  # a stopping loop does not sit out the window
