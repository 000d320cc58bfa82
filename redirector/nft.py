"""nftables backend: our table in the kernel, through libnftables' JSON API (Debian python3-nftables).

No subprocess: each write is ONE libnftables call with a JSON document (``{"nftables": [...]}``, rendered
by ``nftshape.dumps``; ``json_cmd`` would do the same with a slower ``json.dumps`` of 20,000 element dicts),
which libnftables sends as one netlink batch, so the kernel applies all of it or none of it.

Two libnftables contexts: one writes, one reads. Listing a big table fills a context's cache with every
element, and the next command on that context first throws the cache away (about 11 ms for 20,000
elements): a separate reader keeps single-element writes at ~0.2 ms.

In "dnat" mode (the default) the backend also owns the DNAT targets on lo (``redirector.localaddr``):
``ensure`` adds a missing one before it writes any rule pointing at it, ``cleanup`` removes them after the
table. Both live in the namespace of the thread that constructed the backend, like the libnftables sockets.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from redirector.localaddr import LoopbackAddresses
from redirector.model import BackendError, Delta, Key, diff
from redirector.nftshape import Command, Layout, dumps
from shared import constants as c

log = logging.getLogger(__name__)


class NftBackend:
    """The ``Backend`` for nftables. Thread-safe (one lock around the libnftables contexts)."""

    name = "nftables"

    def __init__(
        self,
        *,
        table: str = c.DEFAULT_NFT_TABLE,
        proxy_port: int = c.DEFAULT_PROXY_PORT,
        proxy_mark: int | None = c.DEFAULT_PROXY_MARK,
        proxy_uid: int | None = None,
        mode: str = c.DEFAULT_REDIRECT_MODE,
        address4: str = c.DEFAULT_REDIRECT_ADDRESS,
        address6: str = c.DEFAULT_REDIRECT_ADDRESS6,
    ) -> None:
        import nftables  # type: ignore[import-untyped]  # Debian python3-nftables: imported here so the rest of the agent imports without it

        self.layout = Layout(table=table, proxy_port=proxy_port, proxy_mark=proxy_mark, proxy_uid=proxy_uid,
                             mode=mode, address4=address4, address6=address6)
        self.addresses = LoopbackAddresses(self.layout.addresses())
        # libnftables opens its netlink socket here: the objects belong to the caller's network namespace.
        self._writer = nftables.Nftables()
        self._writer.set_json_output(True)  # libnftables 1.0 parses its input as JSON when this is on
        self._reader = nftables.Nftables()
        self._text = nftables.Nftables()
        self._text.set_terse_output(True)  # describe(): rules without the (possibly huge) element lists
        self._lock = threading.Lock()

    # -- Backend --------------------------------------------------------------------------------------

    # ``ensure`` records what it found (None: no table, or one of another shape), so the agent's full sync
    # after a failure reads the kernel once, not twice (the Backend contract).
    last_seen: frozenset[Key] | None = None

    def ensure(self, keys: Iterable[Key]) -> bool:
        want = frozenset(keys)
        with self._lock:
            self.last_seen = None
            added = self._ensure_addresses()
            listing = self._list()
            if listing is None:
                log.info("nftables table missing: creating it", extra={"table": self.layout.table, "entries": len(want)})
                self._run(self.layout.create(want, replace=False))
                return True
            shape_ok, actual = self.layout.inspect(listing)
            if shape_ok:  # no drift (the usual case): the caller's own set, not a second copy of 20,000 keys
                self.last_seen = want if actual == want else frozenset(actual)
            if not shape_ok:
                log.warning("nftables table has an unexpected shape: replacing it atomically",
                            extra={"table": self.layout.table, "entries": len(want)})
                self._run(self.layout.create(want, replace=True))
                return True
            delta = diff(want, actual)
            if delta:
                log.info("nftables elements differ: applying the difference",
                         extra={"add": len(delta.add), "delete": len(delta.delete)})
                self._run(self.layout.delta_commands(delta))
                return True
            return bool(added)

    def _ensure_addresses(self) -> list[str]:
        """DNAT mode: put the missing targets on lo first, so no rule ever points at an address we lack."""
        if self.layout.mode != "dnat":
            return []
        added = self.addresses.ensure()
        if added:
            log.info("redirect addresses added to lo", extra={"addresses": added})
        return added

    def apply(self, delta: Delta) -> None:
        if not delta:
            return
        with self._lock:
            self._run(self.layout.delta_commands(delta))

    def read(self) -> frozenset[Key]:
        with self._lock:
            listing = self._list()
        if listing is None:
            return frozenset()
        return self.layout.inspect(listing)[1]

    def shape_ok(self) -> bool:
        """True when the table exists with exactly our chains, rules and sets (for the debug endpoints)."""
        with self._lock:
            listing = self._list()
        return listing is not None and self.layout.inspect(listing)[0]

    def describe(self) -> dict[str, object]:
        with self._lock:
            rc, out, err = self._text.cmd(f"list table inet {self.layout.table}")
        return {
            "backend": self.name,
            "table": f"inet {self.layout.table}",
            "sets": ["svc4", "svc6", "nodeports"],
            "chains": list(self.layout.chains()),
            "proxy_port": self.layout.proxy_port,
            "proxy_mark": self.layout.proxy_mark,
            "proxy_uid": self.layout.proxy_uid,
            "redirect_mode": self.layout.mode,
            "redirect_addresses": self._addresses_held(),
            "ruleset": out if rc == 0 else None,
            "error": err.strip() if rc != 0 else None,
        }

    def cleanup(self) -> None:
        with self._lock:
            rc, _, err = self._writer.json_cmd({"nftables": [{"delete": {"table": self.layout.table_ref}}]})
        if rc != 0 and not _not_found(err):
            raise BackendError(f"nftables: deleting table inet {self.layout.table}: {err.strip()}")
        removed = self.addresses.remove()  # after the rules: never a DNAT to an address that is gone
        if removed:
            log.info("redirect addresses removed from lo", extra={"addresses": removed})

    def _addresses_held(self) -> dict[str, bool] | None:
        """DNAT target -> is it on lo (None: netlink failed; {} in REDIRECT mode), for the debug endpoints."""
        if self.layout.mode != "dnat":
            return {}
        try:
            held = set(self.addresses.present())
        except BackendError:
            return None
        return {f"{s.address}/{s.prefixlen}": f"{s.address}/{s.prefixlen}" in held for s in self.addresses.specs}

    # -- raw transactions (also used by the benchmark for the raw floor) ------------------------------

    def run(self, commands: list[Command]) -> None:
        """Run ``commands`` as ONE transaction."""
        with self._lock:
            self._run(commands)

    def _run(self, commands: list[Command]) -> None:
        if not commands:
            return
        rc, _, err = self._writer.cmd(dumps(commands))
        if rc != 0:
            raise BackendError(f"nftables transaction of {len(commands)} commands failed: {_first_lines(err)}")

    def _list(self) -> list[dict[str, Any]] | None:
        """Our table as listed by the kernel, or None when it does not exist."""
        rc, out, err = self._reader.json_cmd({"nftables": [{"list": {"table": self.layout.table_ref}}]})
        _drop_cache(self._reader)
        if rc != 0:
            if _not_found(err):
                return None
            raise BackendError(f"nftables: listing table inet {self.layout.table}: {_first_lines(err)}")
        items = out.get("nftables", []) if isinstance(out, dict) else []
        return [item for item in items if isinstance(item, dict) and "metainfo" not in item]


def _drop_cache(ctx: Any) -> None:
    """libnftables keeps the ruleset a command listed cached in its context until the next command: ~15 MiB
    of C heap for our 20,000-element set between two full syncs. A command whose cache is one missing table
    releases it (measured: 55 -> 41 MiB RSS after ``malloc_trim``). A fresh context per listing would too,
    but its netlink socket would open in the calling thread's network namespace, not the backend's."""
    ctx.cmd(f"list table ip {_NO_TABLE}")


_NO_TABLE = "lightpath-cache-release"  # never created


def _not_found(err: str) -> bool:
    return "No such file or directory" in err


def _first_lines(err: str, n: int = 3) -> str:
    return " | ".join(line.strip() for line in err.strip().splitlines()[:n])
