"""A client that keeps asking a Service, one NEW connection per request, and what its record says.

WHY a new connection per request: the kernel decides REDIRECT vs DNAT once per connection (conntrack),
so only fresh connections show when a handover happens and whether any request fell into a gap.

Runs as ``python -m sandbox.client_loop`` inside a pod namespace (``ClientLoop`` starts it there),
bounded by a request count AND a duration, and prints one JSON line per request:
``{"i", "t0", "t1", "ok", "status", "via", "error"}`` with ``time.monotonic()`` stamps (one clock for
every process on the machine) and ``via`` = "envoy" when the echoed request carries Envoy's headers.
``handover`` (pure) turns the record into "how many failed, for how long".
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.netns import NetNS

ENVOY_HEADER = "x-envoy-expected-rq-timeout-ms"


@dataclass(frozen=True)
class Record:
    i: int
    t0: float
    t1: float
    ok: bool
    status: int | None
    via: str | None  # "envoy" | "direct" | None (failed)
    error: str | None


def one_request(host: str, port: int, timeout: float) -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/loop", headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read()
        via = None
        if resp.status == 200:
            headers = json.loads(body).get("headers") or {}
            via = "envoy" if ENVOY_HEADER in headers else "direct"
        return {"ok": resp.status == 200, "status": resp.status, "via": via, "error": None}
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return {"ok": False, "status": None, "via": None, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()


def run(host: str, port: int, *, count: int, duration: float, interval: float, timeout: float, stop: Path | None) -> None:
    deadline = time.monotonic() + duration
    for i in range(count):
        if time.monotonic() >= deadline or (stop is not None and stop.exists()):
            break
        t0 = time.monotonic()
        result = one_request(host, port, timeout)
        sys.stdout.write(json.dumps({"i": i, "t0": t0, "t1": time.monotonic(), **result}) + "\n")
        sys.stdout.flush()
        time.sleep(interval)


class ClientLoop:
    """The loop as a subprocess in ``netns``; ``records`` fills in as lines arrive."""

    def __init__(
        self, netns: NetNS, host: str, port: int, *, stop_file: Path, count: int = 20000, duration: float = 60,
        interval: float = 0.005, timeout: float = 1.0,
    ) -> None:
        self.stop_file = stop_file
        stop_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "sandbox.client_loop", host, str(port), "--count", str(count),
                "--duration", str(duration), "--interval", str(interval), "--timeout", str(timeout),
                "--stop-file", str(stop_file)]
        self.proc = netns.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parents[1])
        self.records: list[Record] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.records.append(Record(**json.loads(line)))

    def wait_for(self, n: int, timeout: float = 10) -> None:
        """Until ``n`` more requests were made (proof the loop is running), polling with a deadline."""
        want, deadline = len(self.records) + n, time.monotonic() + timeout
        while len(self.records) < want:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError(f"client loop made {len(self.records)} of {want} requests")
            time.sleep(0.01)

    def stop(self, timeout: float = 10) -> list[Record]:
        self.stop_file.touch()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout)
        self.stop_file.unlink(missing_ok=True)
        return list(self.records)


@dataclass(frozen=True)
class Handover:
    """One handover as the client saw it, from the moment it was triggered to the first answer on the new path."""

    requests: int  # requests in that window
    failed: int
    outage: float  # longest stretch (s) from a failed request's start to the next success's start
    gap: float | None  # s from the last answer on the old path to the first on the new one (None: never switched)
    errors: tuple[str, ...]

    def describe(self) -> str:
        switch = "never switched" if self.gap is None else f"last old-path answer -> first new-path answer {self.gap * 1000:.0f} ms"
        text = f"{self.requests} requests, {self.failed} failed, outage {self.outage * 1000:.0f} ms, {switch}"
        return text + (f" (errors: {', '.join(sorted(set(self.errors)))})" if self.errors else "")


def handover(records: Sequence[Record], start: float, new_via: str, end: float | None = None) -> Handover:
    """Records from ``start`` (a monotonic stamp) until the first success via ``new_via`` (or ``end``)."""
    ordered = sorted(records, key=lambda r: r.t0)
    window = [r for r in ordered if r.t1 >= start and (end is None or r.t0 < end)]
    switched: Record | None = next((r for r in window if r.ok and r.via == new_via), None)
    if switched is not None:
        window = [r for r in window if r.t0 <= switched.t0]
    old = [r for r in ordered if r.ok and r.via != new_via and (switched is None or r.t0 < switched.t0)]
    failed = [r for r in window if not r.ok]
    outage, run_start = 0.0, None
    for r in window:
        if not r.ok and run_start is None:
            run_start = r.t0
        elif r.ok and run_start is not None:
            outage, run_start = max(outage, r.t0 - run_start), None
    if run_start is not None and window:
        outage = max(outage, window[-1].t1 - run_start)
    return Handover(
        requests=len(window),
        failed=len(failed),
        outage=outage,
        gap=None if switched is None or not old else max(0.0, switched.t1 - old[-1].t1),
        errors=tuple(r.error or f"HTTP {r.status}" for r in failed),
    )


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--stop-file", type=Path, default=None)
    a = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        run(a.host, a.port, count=a.count, duration=a.duration, interval=a.interval, timeout=a.timeout, stop=a.stop_file)


if __name__ == "__main__":
    main()
