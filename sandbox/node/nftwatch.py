"""When did the node's kernel hold which rule for a Service? ``nft monitor``, time-stamped per transaction.

WHY: during a handover two independent agents rewrite the node (the redirector removes or adds the
redirect, the kube-proxy stand-in adds or removes the DNAT). A connection opened while NEITHER rule is
present is lost, so the kernel-side window is the root-cause figure behind the client's failed requests.
``nft monitor`` prints every committed change followed by ``# new generation N``; each generation is
stamped with ``time.monotonic()`` as it arrives. ``coverage`` (pure) replays them for one Service port.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sandbox.node.netns import NetNS

Generation = tuple[float, tuple[str, ...]]  # (monotonic stamp, the lines of one committed transaction)


@dataclass(frozen=True)
class Coverage:
    """From ``start``: how long neither rule was in the kernel, and when each side last changed."""

    uncovered: float  # seconds with neither the redirect nor the stand-in DNAT
    redirect_changed: float | None  # seconds after start
    standin_changed: float | None

    def describe(self) -> str:
        def at(t: float | None) -> str:
            return "unchanged" if t is None else f"{t * 1000:.0f} ms"

        return (f"kernel: redirect changed at {at(self.redirect_changed)}, stand-in DNAT at {at(self.standin_changed)}; "
                f"neither rule present for {self.uncovered * 1000:.1f} ms")


def _apply(state: tuple[bool, bool], lines: Sequence[str], ip: str, port: int, redirect_table: str,
           standin_table: str) -> tuple[bool, bool]:
    redirect, standin = state
    element = f"{ip} . {port}"
    standin_family, served = ("ip6" if ":" in ip else "ip"), f"{ip} . tcp . {port} :"
    ours = f"inet {redirect_table} "  # the table itself, not lightpath-block or lightpath-fallback
    for line in lines:
        if f"{line} ".startswith(f"delete table {ours}"):
            redirect = False
        elif ours in f"{line} " and element in line and ("add element" in line or "elements =" in line):
            redirect = True
        elif line.startswith(f"delete element inet {redirect_table} ") and element in line:
            redirect = False
        # The stand-in (kube-proxy's nftables layout) replaces its per-family table atomically; the Service is
        # served while its element is in the ``service-ips`` verdict map.
        if line.startswith(f"delete table {standin_family} {standin_table}"):
            standin = False
        elif (f"{standin_family} {standin_table} service-ips" in line and served in line
              and ("add element" in line or "elements =" in line)):
            standin = True
        elif line.startswith(f"delete element {standin_family} {standin_table} service-ips") and served in line:
            standin = False
    return redirect, standin


def coverage(generations: Sequence[Generation], ip: str, port: int, start: float, end: float | None = None, *,
             redirect_table: str = "lightpath", standin_table: str = "kube-proxy") -> Coverage:
    """Replay the generations (state before ``start`` included) and measure the window from ``start`` to ``end``."""
    state, uncovered = (False, False), 0.0
    since: float | None = None  # when the current "neither" stretch began (after start)
    changed: list[float | None] = [None, None]
    for stamp, lines in generations:
        if end is not None and stamp >= end:
            break
        new = _apply(state, lines, ip, port, redirect_table, standin_table)
        if stamp >= start:
            for i in (0, 1):
                if new[i] != state[i]:
                    changed[i] = stamp - start
            if not any(new) and since is None:
                since = stamp
            elif any(new) and since is not None:
                uncovered, since = uncovered + (stamp - since), None
        state = new
    return Coverage(uncovered, changed[0], changed[1])


class NftMonitor:
    """``nft monitor`` in ``netns``; ``generations`` fills in as transactions commit."""

    def __init__(self, netns: NetNS) -> None:
        self.proc = netns.popen(["nft", "monitor"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.generations: list[Generation] = []
        self._thread = threading.Thread(target=self._read, name="nft-monitor", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        pending: list[str] = []
        for line in self.proc.stdout:
            if line.startswith("# new generation"):
                self.generations.append((time.monotonic(), tuple(pending)))
                pending = []
            else:
                pending.append(line.strip())

    def coverage(self, ip: str, port: int, start: float, end: float | None = None) -> Coverage:
        return coverage(list(self.generations), ip, port, start, end)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self._thread.join(5)
