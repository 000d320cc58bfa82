"""The real processes of the end-to-end scenario, started as a user would start them.

WHY a module of its own: ``sandbox.scenario`` tells the story; this holds the plumbing that makes each
piece run for real: the webhook as a ``lightpath-webhook`` process over TLS, its registration from the
manifests ``kubectl kustomize deploy/default`` builds, the redirector as ``lightpath-redirector run`` in
the node namespace with its control plane (the product's: it programs the node's Envoy over xDS).
"""

from __future__ import annotations

import base64
import logging
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from sandbox.node.netns import NetNS, run_in_netns
from sandbox.node.traffic import wait_until
from shared import constants as c
from shared.errors import SandboxError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
log = logging.getLogger(__name__)


class ComponentError(SandboxError, RuntimeError):
    """A component did not start or did not behave; the message carries its log tail."""


def tool(name: str) -> list[str]:
    """argv prefix for one of our console scripts (``lightpath``, ...) from the running venv."""
    script = BIN / name
    if script.exists():
        return [str(script)]
    modules = {"lightpath": "cli.main", "lightpath-webhook": "webhook", "lightpath-redirector": "redirector"}
    return [sys.executable, "-m", modules[name]]


def run_tool(name: str, args: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*tool(name), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def poll(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """``sandbox.node.traffic.wait_until`` (the one polling loop), failing as a ComponentError for the scenario."""
    try:
        return wait_until(fn, timeout=timeout, interval=interval, what=what)
    except TimeoutError as exc:
        raise ComponentError(f"{what}: {exc}") from None


def _stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 5) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- webhook ----------------------------------------------------------------------------------------


def generate_certs(out: Path) -> subprocess.CompletedProcess[str]:
    """``lightpath certs generate --secret-only``: CA + serving cert for lightpath-webhook.lightpath-system.svc."""
    done = run_tool("lightpath", ["certs", "generate", "--secret-only", "--output-dir", str(out), "--force"])
    if done.returncode != 0:
        raise ComponentError(f"lightpath certs generate failed ({done.returncode}): {done.stderr.strip()}")
    return done


class WebhookProcess:
    """``lightpath-webhook`` on the root namespace's loopback (where the sandbox API server dials it)."""

    def __init__(self, kubeconfig: Path, certs: Path, log_path: Path) -> None:
        self.kubeconfig, self.certs, self.log_path = kubeconfig, certs, log_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 20) -> WebhookProcess:
        argv = [*tool("lightpath-webhook"), "--kubeconfig", str(self.kubeconfig),
                "--tls-cert-file", str(self.certs / "tls.crt"), "--tls-key-file", str(self.certs / "tls.key"),
                "--bind-address", "127.0.0.1", "--port", str(self.port)]
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        poll(lambda: self._alive() and self.get("/readyz"), timeout, "webhook /readyz")
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise ComponentError(f"lightpath-webhook exited with {self.proc.returncode}:\n{log_tail(self.log_path)}")
        return True

    def get(self, path: str) -> str:
        """GET over TLS, verified against the generated CA (hostname aside: we dial 127.0.0.1)."""
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        ctx.check_hostname = False
        with urllib.request.urlopen(f"https://127.0.0.1:{self.port}{path}", timeout=3, context=ctx) as resp:  # noqa: S310
            return str(resp.read().decode())

    def stop(self) -> None:
        _stop_process(self.proc)
        if self._log is not None:
            self._log.close()


def webhook_configuration(ca_pem: bytes) -> dict[str, Any]:
    """The MutatingWebhookConfiguration exactly as ``kubectl kustomize deploy/default`` builds it, plus caBundle."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ComponentError("kubectl is not installed: its built-in kustomize builds the webhook registration "
                             "from deploy/default (install kubectl, then run again)")
    built = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy" / "default")],
                           capture_output=True, text=True, timeout=60, check=False)
    if built.returncode != 0:
        raise ComponentError(f"kubectl kustomize deploy/default failed: {built.stderr.strip()}")
    docs = [d for d in yaml.safe_load_all(built.stdout) if d and d.get("kind") == "MutatingWebhookConfiguration"]
    if len(docs) != 1:
        raise ComponentError(f"expected one MutatingWebhookConfiguration in deploy/default, found {len(docs)}")
    config: dict[str, Any] = docs[0]
    for hook in config["webhooks"]:
        hook["clientConfig"]["caBundle"] = base64.b64encode(ca_pem).decode()
    return config


# -- redirector ---------------------------------------------------------------------------------------


def node_kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig for processes in the node namespace (the API server is reached through the relay)."""
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": "sandbox", "preferences": {},
        "clusters": [{"name": "sandbox", "cluster": {"server": server}}],
        "users": [{"name": "sandbox", "user": {"token": "sandbox-no-auth"}}],
        "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": "sandbox"}}],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _http_get(url: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def netns_get(netns: NetNS, url: str, timeout: float = 3) -> tuple[int, str]:
    """(status, body) of a GET made from inside ``netns`` (for loopback-only endpoints there)."""
    return run_in_netns(netns.name, _http_get, url, timeout, timeout=timeout + 10)


class RedirectorProcess:
    """``lightpath-redirector run`` (nftables backend, control plane on ``xds_socket``) inside the node namespace."""

    DEBUG = f"http://{c.REDIRECTOR_DEBUG_ADDRESS}:{c.REDIRECTOR_DEBUG_PORT}"

    NODE_NAME = "sandbox-node"

    def __init__(self, node: NetNS, kubeconfig: Path, log_path: Path, extra_args: Sequence[str] = (),
                 *, xds_socket: Path) -> None:
        self.node, self.kubeconfig, self.log_path, self.extra_args = node, kubeconfig, log_path, list(extra_args)
        self.xds_socket = xds_socket
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 20) -> RedirectorProcess:
        argv = [*tool("lightpath-redirector"), "run", "--kubeconfig", str(self.kubeconfig),
                "--backend", "nftables", "--node-name", self.NODE_NAME, "--xds-socket", str(self.xds_socket),
                *self.extra_args]
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as out:
            self.proc = self.node.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.starts += 1
        poll(lambda: self._alive() and self.ready(offset), timeout, "redirector ready")
        return self

    def ready(self, log_offset: int = 0) -> bool:
        """THIS process synced once (its log says so: the rules of an earlier run survive a restart, so the
        table alone proves nothing), and its debug server answers /healthz with 200 (it starts listening
        a moment after the first sync; until then the connection is refused and we keep polling)."""
        with self.log_path.open("rb") as f:
            f.seek(log_offset)
            if b'"full sync done"' not in f.read():
                return False
        try:
            return self.debug("/healthz")[0] == 200
        except OSError:  # URLError included: not listening yet
            return False

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise ComponentError(f"lightpath-redirector exited with {self.proc.returncode}:\n{log_tail(self.log_path)}")
        return True

    def debug(self, path: str) -> tuple[int, str]:
        return netns_get(self.node, self.DEBUG + path)

    def debug_text(self, path: str, limit: int = 800) -> str:
        """``HTTP <status>: <body>`` of a debug endpoint, or why there is none (for the demo's evidence)."""
        try:
            status, body = self.debug(path)
        except OSError as exc:
            return f"(no answer on {self.DEBUG}{path}: {exc})"
        body = body.strip()
        body = body if len(body) <= limit else body[:limit] + " ..."
        return f"HTTP {status}" + ("\n" if "\n" in body else ": ") + body

    def stop(self) -> None:
        _stop_process(self.proc)

