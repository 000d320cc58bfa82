"""``lightpath-redirector run`` as a real process in the node netns, talking to the sandbox API server
through a relay, with its JSON log in a file the tests read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sandbox.api.apiserver import SandboxApiServer
from sandbox.components import node_kubeconfig
from sandbox.node.netns import NetNS
from sandbox.node.nsrelay import NetnsRelay
from sandbox.node.traffic import wait_until

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(sys.executable).parent / "lightpath-redirector"


class AgentProcess:
    """Start/stop/kill the agent; read its log lines."""

    def __init__(self, node: NetNS, api: SandboxApiServer, workdir: Path, args: Sequence[str] = ()) -> None:
        self.node = node
        self.relay = NetnsRelay(node.name, (api.host, api.port))
        self.kubeconfig = node_kubeconfig(workdir / "node-kubeconfig", self.relay.url)
        self.log_path = workdir / "redirector.log"
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str, env: dict[str, str] | None = None) -> AgentProcess:
        # Kernel-only (no control plane, redirects not gated on Envoy): these tests are about the kernel side;
        # tests/e2e runs the agent with its control plane and a real Envoy.
        xds = [] if any(a.startswith("--xds") for a in (*self.args, *extra)) else ["--xds-socket", "none"]
        argv = [str(BINARY), "run", "--kubeconfig", str(self.kubeconfig), "--debug-port", "0",
                "--log-level", "DEBUG", *xds, *self.args, *extra]
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as out:
            self.proc = self.node.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                        env={**os.environ, **env} if env else None)
        return self

    def wait_synced(self, timeout: float = 30) -> None:
        """Until this run of the agent logged its first full sync."""
        wait_until(lambda: self.alive() and self.logged("full sync done"), timeout=timeout, what="first full sync")

    def alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"redirector exited with {self.proc.returncode}:\n{self.tail()}")
        return True

    def lines(self, since_start: bool = True) -> list[dict[str, Any]]:
        data = self.log_path.read_bytes()[self._offset if since_start else 0:]
        out = []
        for raw in data.splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                out.append({"msg": raw.decode(errors="replace")})
        return out

    def logged(self, message: str, **fields: Any) -> int:
        return sum(1 for line in self.lines() if message in str(line.get("msg", ""))
                   and all(line.get(k) == v for k, v in fields.items()))

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def signal(self, sig: int) -> int:
        """Send ``sig`` to the agent itself (``ip netns exec`` execs it: same pid) and reap it."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        return self.proc.wait(timeout=15)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.relay.close()
