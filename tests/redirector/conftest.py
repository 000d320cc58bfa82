"""Redirector fixtures: a node with pods (real netns), and kernel backends bound to the node's netns."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from shared.netns import entered


@pytest.fixture(scope="session", autouse=True)
def _clean_stale_netns() -> None:
    if os.geteuid() == 0:
        from sandbox.node.netns import cleanup_stale

        cleanup_stale("lpr")


def nft_backend(netns: str, **kwargs: Any) -> Any:
    """An NftBackend whose libnftables sockets live in ``netns`` (the test process stays where it is): libnftables
    opens its netlink socket when a context is created, and a socket keeps the netns it was opened in."""
    from redirector.nft import NftBackend

    with entered(netns):
        return NftBackend(**kwargs)


def marked_connect(ip: str, port: int, mark: int | None, timeout: float = 2.0) -> dict[str, Any] | str:
    """Connect with SO_MARK ``mark``; the echo server's JSON line, or the error's name when it failed."""
    import json

    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.settimeout(timeout)
        try:
            sock.connect((ip, port))
            line = sock.makefile("rb").readline()
        except OSError as exc:
            return type(exc).__name__
        return json.loads(line) if line else "closed"


def _json_list(table: str) -> str:
    import nftables

    n = nftables.Nftables()
    n.set_json_output(True)
    rc, out, err = n.cmd(f"list table inet {table}")
    if rc != 0:
        raise RuntimeError(err)
    return str(out)


def handles(netns: str, table: str = "lightpath") -> list[tuple[str, int]]:
    """(kind, handle) of every table/chain/set/rule of our table: equal before and after = nothing recreated."""
    import json

    from sandbox.node.netns import run_in_netns

    items = json.loads(run_in_netns(netns, _json_list, table))["nftables"]
    return sorted((kind, item[kind]["handle"]) for item in items for kind in ("table", "chain", "set", "rule")
                  if kind in item)
