"""The reply route of the proxy's transparent connections (``--preserve-source-ip``).

Envoy's transparent listener opens each upstream connection FROM the client's own address (its
``original_src`` filter: IP_TRANSPARENT, the socket marked with the proxy mark), so the backend sees the
client, as behind kube-proxy with externalTrafficPolicy Local. The backend's replies are addressed to that
client, which is not an address of this node: routed normally, they would leave the node (or reach a local
client pod directly) and never come back to Envoy. The agent's block table copies the proxy mark into the
connection's conntrack mark and puts the REPLY mark on its reply packets (redirector.blocks); this module
keeps the routing that delivers packets carrying the reply mark locally, per family (the scheme of Envoy's
documentation of ``original_src``, with a mark of its own for the replies: the proxy's outgoing packets
carry the proxy mark and must be routed out as usual)::

    ip rule add fwmark <reply mark>/<reply mark> lookup <table> priority <priority>
    ip route replace local 0.0.0.0/0 dev lo table <table>        (and ::/0)

Only replies of the proxy's own connections carry the reply mark, and replies of its ordinary connections
are addressed to this node anyway (the ``local`` table, priority 0, answers them first). Written with
pyroute2 in the calling thread's network namespace (the agent's: the node's), idempotent.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from redirector.model import BackendError
from shared import constants as c

_FAMILIES = ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"))
SCOPE_HOST = 254


@dataclass(frozen=True)
class ReplyRoute:
    mark: int
    table: int = c.TRANSPARENT_ROUTE_TABLE
    priority: int = c.TRANSPARENT_RULE_PRIORITY

    def ensure(self) -> None:
        """Add the rule and the local default route of each family (present ones are no error). IPv6 is
        skipped where the node has it disabled (no IPv6 packet can need it)."""
        from pyroute2 import IPRoute  # type: ignore[import-untyped,unused-ignore]
        from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped,unused-ignore]

        with IPRoute() as ipr:
            lo = _lo(ipr)
            for family, default in _FAMILIES:
                try:
                    if not self._has_rule(ipr, family):
                        ipr.rule("add", family=family, **self._rule())
                    ipr.route("replace", family=family, table=self.table, type="local", oif=lo, dst=default,
                              dst_len=0, **({"scope": SCOPE_HOST} if family == socket.AF_INET else {}))
                except NetlinkError as exc:
                    if family == socket.AF_INET6 and exc.code in (errno.EAFNOSUPPORT, errno.EACCES):
                        continue
                    raise BackendError(f"reply route of the transparent listener (family {family}): {exc}") from exc

    def present(self) -> bool:
        """Both the IPv4 rule and route are there (what every transparent connection of IPv4 needs)."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            routes = ipr.get_routes(family=socket.AF_INET, table=self.table)
            return self._has_rule(ipr, socket.AF_INET) and any(r.get("type") == 2 for r in routes)  # RTN_LOCAL

    def remove(self) -> None:
        """Remove the rules and routes (absent ones are no error)."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            lo = _lo(ipr)
            for family, default in _FAMILIES:
                steps: tuple[tuple[str, dict[str, object]], ...] = (
                    ("rule", dict(self._rule())),
                    ("route", {"table": self.table, "type": "local", "oif": lo, "dst": default, "dst_len": 0}))
                for what, args in steps:
                    try:
                        getattr(ipr, what)("del", family=family, **args)
                    except NetlinkError as exc:
                        if exc.code not in (errno.ENOENT, errno.ESRCH, errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                            raise BackendError(f"removing the reply {what} (family {family}): {exc}") from exc

    def _rule(self) -> dict[str, int]:
        # Masked: the mark is OR-ed into the packet's (other bits -- Calico's, Cilium's -- stay as they are).
        return {"table": self.table, "priority": self.priority, "fwmark": self.mark, "fwmask": self.mark}

    def _has_rule(self, ipr: object, family: int) -> bool:
        for rule in ipr.get_rules(family=family):  # type: ignore[attr-defined]
            if (rule.get_attr("FRA_FWMARK") == self.mark and rule.get_attr("FRA_FWMASK") == self.mark
                    and rule.get_attr("FRA_PRIORITY") == self.priority
                    and (rule.get_attr("FRA_TABLE") or rule.get("table")) == self.table):
                return True
        return False


def _lo(ipr: object) -> int:
    found = ipr.link_lookup(ifname="lo")  # type: ignore[attr-defined]
    if not found:
        raise BackendError("no lo device in this network namespace")
    return int(found[0])
