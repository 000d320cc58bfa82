"""The kernel L4 fallback: while the node's Envoy is down, migrated Services are load-balanced by the kernel.

A node-local proxy is a single point of failure for every migrated Service on its node, because kube-proxy
ignores them. So the agent watches its Envoy (``Watchdog``): when the ADS stream is gone AND the proxy port
accepts no connection for ``down_after`` (default 0.3 s, checked every 0.1 s), it programs the table
``inet <table>-fallback`` in ONE transaction: a nat chain at priority -115 -- before our redirect (-110)
and kube-proxy's DNAT (-100) -- that DNATs each redirected key straight to its ready endpoints, chosen by
``numgen random`` per new connection, the way kube-proxy's nftables mode does; NodePort and hairpin traffic
is masqueraded so replies come back through this node. When Envoy is connected, has ACKed the current
revision and accepts on the proxy port again for ``up_after`` (1 s), the table is deleted and new
connections go to Envoy again; established fallback connections keep their DNAT (conntrack).

Limits (docs/redirector.md): L4 only -- no retries, timeouts or outlier detection while in fallback; the
backend sees the client's address, or the node's for NodePort and hairpin traffic; keys without endpoints
stay rejected/dropped by ``redirector.blocks`` (nftables). On the iptables backend the same decisions become
statistic-mode chains (``redirector.iptables_fallback``). Hysteresis bounds the switching: into
the fallback at once, back to Envoy only after it served for ``up_after`` and at most once per
``min_interval`` (2 s) -- so a flapping Envoy costs at most one round trip per 2 s.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from redirector.model import Key

log = logging.getLogger(__name__)
PRIORITY = -115
MASQUERADE_MARK = 0x20000000  # our own bit: masquerade in our postrouting chain
Endpoint = tuple[str, int]


def _chain(key: Key) -> str:
    host = "np" if key.ip is None else re.sub(r"[^0-9A-Za-z]", "-", key.ip)
    return f"k{key.family}-{host}-{key.port}"


def _bracket(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def fallback_script(table: str, targets: Mapping[Key, tuple[Endpoint, ...]]) -> str:
    """The nft script that load-balances ``targets`` in the kernel (pure); deletes the table when empty."""
    head = f"add table inet {table}\ndelete table inet {table}\n"
    targets = {k: eps for k, eps in targets.items() if eps}
    if not targets:
        return head
    maps: dict[str, list[str]] = {"fb4": [], "fb6": [], "fbnp4": [], "fbnp6": []}
    chains: list[str] = []
    for key in sorted(targets):
        eps = targets[key]
        name = _chain(key)
        ipf = "ip" if key.family == 4 else "ip6"
        if key.ip is None:
            maps[f"fbnp{key.family}"].append(f"{key.port} : goto {name}-np")
            chains.append(f"\tchain {name}-np {{\n\t\tmeta mark set meta mark | {MASQUERADE_MARK:#x}\n\t\tgoto {name}\n\t}}")
        else:
            maps[f"fb{key.family}"].append(f"{key.ip} . {key.port} : goto {name}")
        ends = [f"{name}-e{i}" for i in range(len(eps))]
        pick = f"goto {ends[0]}" if len(ends) == 1 else \
            f"numgen random mod {len(ends)} vmap {{ {', '.join(f'{i} : goto {c}' for i, c in enumerate(ends))} }}"
        chains.append(f"\tchain {name} {{\n\t\t{pick}\n\t}}")
        for chain, (ip, port) in zip(ends, eps, strict=True):
            chains.append(f"\tchain {chain} {{\n\t\t{ipf} saddr {ip} meta mark set meta mark | {MASQUERADE_MARK:#x}\n"
                          f"\t\tmeta l4proto tcp dnat {ipf} to {_bracket(ip)}:{port}\n\t}}")
    types = {"fb4": "ipv4_addr . inet_service", "fb6": "ipv6_addr . inet_service", "fbnp4": "inet_service",
             "fbnp6": "inet_service"}
    body = [f"\tmap {m} {{ type {types[m]} : verdict;" + (f" elements = {{ {', '.join(v)} }};" if v else "") + " }"
            for m, v in maps.items()]
    dispatch = ("\t\tip daddr . tcp dport vmap @fb4\n\t\tip6 daddr . tcp dport vmap @fb6\n"
                "\t\tfib daddr type local meta nfproto ipv4 tcp dport vmap @fbnp4\n"
                "\t\tfib daddr type local meta nfproto ipv6 tcp dport vmap @fbnp6\n")
    for hook in ("prerouting", "output"):
        body.append(f"\tchain {hook} {{\n\t\ttype nat hook {hook} priority {PRIORITY}; policy accept;\n{dispatch}\t}}")
    body.append(f"\tchain postrouting {{\n\t\ttype nat hook postrouting priority 110; policy accept;\n"
                f"\t\tmeta mark & {MASQUERADE_MARK:#x} == {MASQUERADE_MARK:#x} masquerade\n\t}}")
    return head + f"table inet {table} {{\n" + "\n".join(body + chains) + "\n}\n"


def port_accepts(port: int, timeout: float = 0.2) -> bool:
    """Does something accept TCP on this node's proxy port (IPv4 loopback)?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


class Watchdog:
    """Switches the kernel between Envoy and the L4 fallback (see the module docstring). Thread: ``run``."""

    def __init__(self, table: str, *, connected: Callable[[], bool], in_sync: Callable[[], bool],
                 accepting: Callable[[], bool], targets: Callable[[], Mapping[Key, tuple[Endpoint, ...]]],
                 period: float = 0.1, down_after: float = 0.3, up_after: float = 1.0, min_interval: float = 2.0,
                 on_switch: Callable[[bool], None] | None = None, write: Callable[[str], str | None] | None = None,
                 revision: Callable[[], object] | None = None,
                 render: Callable[[Mapping[Key, tuple[Endpoint, ...]]], str] | None = None) -> None:
        """``render`` turns targets into the kernel's text (default: ``fallback_script`` for ``table``) and
        ``write`` runs it, returning an error or None (default: libnftables here); the iptables backend
        passes both from ``redirector.iptables_fallback``.
        ``revision`` changes whenever the targets may have: while in fallback they are recomputed only then
        (not every period: at 10,000 Services the script is large)."""
        self.revision = revision
        self._revision: object = None
        self.table = table
        self._run = write or self._libnftables
        self._render = render or (lambda targets: fallback_script(table, targets))
        self.connected, self.in_sync, self.accepting, self.targets = connected, in_sync, accepting, targets
        self.period, self.down_after, self.up_after, self.min_interval = period, down_after, up_after, min_interval
        self.on_switch = on_switch
        self._nft: Any = None
        self._stop = threading.Event()
        self.active = False
        self.switches = 0
        self.since: float | None = None  # when the current fallback began (monotonic)
        self.last_error: str | None = None
        self._applied = ""
        self._down_since: float | None = None
        self._up_since: float | None = None
        self._last_switch = -1e9

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        self._write(self._render({}))  # a previous agent's fallback: Envoy decides anew
        while not self._stop.wait(self.period):
            try:
                self.check(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - never let the watchdog die; say why
                self.last_error = str(exc)[:300]
                log.error("fallback watchdog check failed", extra={"error": self.last_error})

    def check(self, now: float) -> None:
        # Probe the port only when it matters (each probe is a connection Envoy sees): while the stream is
        # gone, and while in fallback to decide on switching back.
        connected = self.connected()
        envoy_down = not self.active and not connected and not self.accepting()
        serving = self.active and connected and self.in_sync() and self.accepting()
        if not envoy_down:
            self._down_since = None
        elif self._down_since is None:
            self._down_since = now
        if not serving:
            self._up_since = None
        elif self._up_since is None:
            self._up_since = now
        # Into the fallback as soon as Envoy is seen down (safety first); back to Envoy only after it served
        # for ``up_after`` and at most once per ``min_interval`` -- which also bounds the switches into it.
        may_return = now - self._last_switch >= self.min_interval
        if not self.active and self._down_since is not None and now - self._down_since >= self.down_after:
            if self.targets():  # nothing redirected (e.g. no Envoy ever ACKed anything): nothing to fall back for
                self._switch(True, now)
        elif self.active and self._up_since is not None and now - self._up_since >= self.up_after and may_return:
            self._switch(False, now)
        elif self.active and (self.revision is None or self.revision() != self._revision):
            self._revision = self.revision() if self.revision is not None else None
            self._write(self._render(self.targets()))  # endpoints changed meanwhile

    def _switch(self, on: bool, now: float) -> None:
        targets = self.targets() if on else {}
        script = self._render(targets)
        if not self._write(script):
            return
        self.active, self._last_switch, self.switches = on, now, self.switches + 1
        self.since = now if on else None
        if on:
            log.warning("Envoy is not serving: migrated Services fall back to kernel load-balancing (L4 only)",
                        extra={"keys": sum(1 for eps in targets.values() if eps)})
        else:
            log.info("Envoy serves again: kernel fallback removed")
        if self.on_switch is not None:
            self.on_switch(on)

    def _libnftables(self, script: str) -> str | None:
        if self._nft is None:
            import nftables  # type: ignore[import-untyped,unused-ignore]  # Debian python3-nftables

            self._nft = nftables.Nftables()
        rc, _out, err = self._nft.cmd(script)
        return None if rc == 0 else str(err)

    def _write(self, script: str) -> bool:
        if script == self._applied:
            return True
        error = self._run(script)
        if error is not None:
            self.last_error = error[:300]
            log.error("programming the kernel fallback failed", extra={"error": self.last_error})
            return False
        self._applied = script
        return True
