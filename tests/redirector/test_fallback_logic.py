"""The kernel fallback's decisions (no kernel: the script writer is recorded) and its nft script."""

from __future__ import annotations

from redirector.fallback import Watchdog, fallback_script
from redirector.model import Key

A = Key(4, "10.96.0.10", 80)
EPS = {A: (("10.244.0.10", 8080), ("10.244.0.11", 8080))}


class Envoy:
    def __init__(self) -> None:
        self.connected = True
        self.in_sync = True
        self.accepting = True


def dog(envoy: Envoy, written: list[str]) -> Watchdog:
    def write(script: str) -> str | None:
        written.append(script)
        return None

    return Watchdog("t", connected=lambda: envoy.connected, in_sync=lambda: envoy.in_sync,
                    accepting=lambda: envoy.accepting, targets=lambda: EPS, write=write)


def test_switches_on_after_down_after_and_back_only_after_up_after() -> None:
    envoy, written = Envoy(), []
    w = dog(envoy, written)
    w.check(0.0)
    assert not w.active and written == []
    envoy.connected = envoy.accepting = False
    w.check(1.0)
    w.check(1.2)
    assert not w.active  # down for 0.2 s only
    w.check(1.31)
    assert w.active and "numgen random mod 2" in written[-1] and "dnat ip to 10.244.0.11:8080" in written[-1]
    envoy.connected = envoy.accepting = True
    envoy.in_sync = False  # connected but not yet ACKed the current version: stay in the fallback
    w.check(2.0)
    w.check(5.0)
    assert w.active
    envoy.in_sync = True
    w.check(5.1)
    w.check(5.9)
    assert w.active  # serving for 0.8 s only
    w.check(6.2)
    assert not w.active and written[-1] == "add table inet t\ndelete table inet t\n"


def test_a_flapping_envoy_returns_at_most_once_per_min_interval() -> None:
    envoy, written = Envoy(), []
    w = dog(envoy, written)
    t, returns = 0.0, 0
    for i in range(200):  # down and up every 0.5 s, for 20 s
        envoy.connected = envoy.accepting = (i // 5) % 2 == 0
        was = w.active
        w.check(t)
        returns += was and not w.active
        t += 0.1
    assert returns <= 20 / 2.0 and w.switches <= 2 * returns + 1


def test_the_script_is_empty_without_targets_and_masquerades_nodeports_and_hairpin() -> None:
    assert fallback_script("t", {}) == "add table inet t\ndelete table inet t\n"
    assert fallback_script("t", {A: ()}) == "add table inet t\ndelete table inet t\n"
    script = fallback_script("t", {Key(4, None, 30080): (("10.244.0.10", 8080),)})
    assert "30080 : goto k4-np-30080-np" in script and "meta mark set meta mark | 0x20000000" in script
    assert "priority -115" in script and "masquerade" in script


def test_in_fallback_targets_are_recomputed_only_when_the_revision_moves() -> None:
    envoy, written, calls, rev = Envoy(), [], [], [1]

    def targets() -> dict[Key, tuple[tuple[str, int], ...]]:
        calls.append(1)
        return EPS

    w = Watchdog("t", connected=lambda: envoy.connected, in_sync=lambda: envoy.in_sync,
                 accepting=lambda: envoy.accepting, targets=targets, write=lambda s: written.append(s) or None,
                 revision=lambda: rev[0])
    envoy.connected = envoy.accepting = False
    w.check(0.0)
    w.check(0.4)
    assert w.active
    before = len(calls)
    for t in (0.5, 0.6, 0.7):
        w.check(t)
    assert len(calls) == before + 1  # the first period records the revision; then nothing moved
    rev[0] = 2
    w.check(0.8)
    assert len(calls) == before + 2
