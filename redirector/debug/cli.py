"""``lightpath-redirector debug <endpoint>``: ask the node's debug server and print the answer as a table.

Run on the node (or ``kubectl exec`` into the agent's pod): the server listens on loopback by default.
Exit status: 0 on success, 1 when the endpoint says unhealthy/not ready (503) or refused the query (4xx),
2 on a usage error, 3 when the debug server cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

import httpx

from shared import constants as c

ENDPOINTS: Mapping[str, str] = {
    "healthz": "/healthz",
    "readyz": "/readyz",
    "metrics": "/metrics",
    "services": "/debug/services",
    "rules": "/debug/rules",
    "diff": "/debug/diff",
    "lookup": "/debug/lookup",
    "config": "/debug/config",
    "proxy": "/debug/proxy",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``debug`` subcommand's arguments (also used standalone by ``main``)."""
    env = os.environ
    parser.add_argument("endpoint", choices=list(ENDPOINTS), help="which answer to print")
    parser.add_argument("target", nargs="*", metavar="IP[:PORT] [PORT]",
                        help="lookup only: the destination, as 10.96.0.10:80, [fd00::1]:80 or 10.96.0.10 80")
    parser.add_argument("--debug-address", default=env.get("LIGHTPATH_DEBUG_ADDRESS", c.REDIRECTOR_DEBUG_ADDRESS),
                        help="the debug server's address [env LIGHTPATH_DEBUG_ADDRESS; default: %(default)s]")
    # A string default is converted by argparse only when ``debug`` runs: a bad env value is a usage error
    # of that subcommand (exit 2), not a crash of every subcommand while the parser is built.
    parser.add_argument("--debug-port", type=int, default=env.get("LIGHTPATH_DEBUG_PORT", str(c.REDIRECTOR_DEBUG_PORT)),
                        help="the debug server's port [env LIGHTPATH_DEBUG_PORT; default: %(default)s]")
    parser.add_argument("--limit", type=int, help="services/rules/diff: page size [no env]")
    parser.add_argument("--continue", dest="continue_token", metavar="TOKEN", help="services/rules: next page [no env]")
    parser.add_argument("--service", metavar="NAMESPACE/NAME", help="proxy only: one Service [no env]")
    parser.add_argument("--json", action="store_true", help="print the JSON answer instead of the table [no env]")
    parser.add_argument("--timeout", type=float, default=15.0,
                        help="seconds to wait for the answer [no env; default: %(default)s]")


def lookup_target(target: Sequence[str]) -> tuple[str, str]:
    """(ip, port) from ``10.96.0.10:80``, ``[fd00::1]:80`` or ``10.96.0.10 80``; ValueError otherwise."""
    if len(target) == 2:
        return target[0], target[1]
    if len(target) != 1:
        raise ValueError("lookup needs a destination: IP:PORT, [IPv6]:PORT or IP PORT")
    text = target[0]
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if sep:
            return host, port
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, port
    raise ValueError(f"cannot read a destination from {text!r}: use IP:PORT, [IPv6]:PORT or IP PORT")


def request_for(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """The URL and query parameters ``args`` ask for (ValueError on a usage error)."""
    params: dict[str, str] = {}
    if args.endpoint == "lookup":
        params["ip"], params["port"] = lookup_target(args.target)
    elif args.target:
        raise ValueError(f"{args.endpoint} takes no destination argument")
    if args.limit is not None:
        params["limit"] = str(args.limit)
    if args.continue_token:
        params["continue"] = args.continue_token
    if getattr(args, "service", None):
        if args.endpoint != "proxy":
            raise ValueError("--service is for the proxy endpoint only")
        params["service"] = args.service
    if args.endpoint != "metrics":
        params["format"] = "json" if args.json else "text"
    host = f"[{args.debug_address}]" if ":" in args.debug_address else args.debug_address
    return f"http://{host}:{args.debug_port}{ENDPOINTS[args.endpoint]}", params


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    # Resolved at call time, not import time, so redirected/captured streams are honoured.
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        url, params = request_for(args)
    except ValueError as exc:
        print(f"lightpath-redirector debug: {exc}", file=err)
        return 2
    try:
        with httpx.Client(timeout=args.timeout, trust_env=False) as client:
            resp = client.get(url, params=params)
    except httpx.HTTPError as exc:
        print(f"lightpath-redirector debug: cannot reach the debug server at {url}: {exc}", file=err)
        return 3
    text = resp.text
    if resp.status_code == 400:
        print(f"lightpath-redirector debug: refused: {_detail(resp)}", file=err)
        return 1
    out.write(text if text.endswith("\n") or not text else text + "\n")
    return 0 if resp.is_success else 1


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()
    return str(body.get("detail")) if isinstance(body, dict) else resp.text.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightpath-redirector debug",
                                     description="Print an answer of the node's redirector debug server.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
