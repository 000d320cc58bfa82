"""Replay docs/migration.md's walkthrough and print every command with its REAL output.

Against the sandbox API server (a TEST DOUBLE, not a cluster) with the real webhook (webhook.app over
TLS, registered by a MutatingWebhookConfiguration, failurePolicy Ignore), driven through the installed
`lightpath` console script exactly as a user types it (output piped, hence no colour).

Run:  .venv/bin/python -m bench.cli_walkthrough > /tmp/walkthrough.txt
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kubernetes import client

from sandbox.api.apiserver import SandboxApiServer
from shared import constants as c
from shared.tls import make_ca, make_serving_cert
from tests.cli.cluster import namespace, port, service
from tests.cli.conftest import HOSTNAME, WEBHOOK_NAMESPACE, Cluster, webhook_configuration
from webhook.settings import Settings

BIN = Path(sys.executable).parent


def cluster_objects() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    namespaces = [namespace("shop"), namespace("payments"), namespace("infra"), namespace("kube-system")]
    services = [
        service("web", "shop", port(80, name="http")),
        service("api", "shop", port(8080, name="http", app="http")),
        service("cart", "shop", port(8080, name="http", app="http"), port(9090, name="grpc", app="grpc")),
        service("db", "shop", port(5432, name="pg"), headless=True),
        service("mesh", "shop", port(80, name="http"), labels={c.SERVICE_PROXY_NAME_LABEL: "cilium"}),
        service("checkout", "payments", port(443, name="https", app="https")),
        service("ledger", "payments", port(5000, name="tcp")),
        service("legacy", "payments", port(7000, name="tcp"), labels={c.OPT_LABEL: c.OPT_DISABLED}),
        service("dns", "infra", port(53, "UDP", name="dns"), port(53, "TCP", name="dns-tcp")),
        service("syslog", "infra", port(514, "UDP", name="syslog")),
        service("metrics-server", "kube-system", port(443, name="https")),
    ]
    return namespaces, services


class Walkthrough:
    def __init__(self, env: Cluster) -> None:
        self.env = env
        self.environ = {
            **os.environ,
            "KUBECONFIG": str(env.kubeconfig),
            "PATH": f"{BIN}:{os.environ['PATH']}",
        }

    def say(self, text: str) -> None:
        print(f"\n### {text}\n", flush=True)

    def run(self, *argv: str) -> int:
        print(f"$ lightpath {shlex.join(argv)}", flush=True)
        done = subprocess.run(
            [str(BIN / "lightpath"), *argv], capture_output=True, text=True, env=self.environ, check=False
        )
        sys.stdout.write(done.stdout + done.stderr)
        if done.returncode:
            print(f"(exit code {done.returncode})")
        return done.returncode

    def shell(self, line: str) -> int:
        """A pipeline as typed in bash (e.g. into jq), run with the same environment."""
        print(f"$ {line}", flush=True)
        done = subprocess.run(
            ["bash", "-c", line], capture_output=True, text=True, env=self.environ, check=False
        )
        sys.stdout.write(done.stdout + done.stderr)
        if done.returncode:
            print(f"(exit code {done.returncode})")
        return done.returncode


def main() -> int:
    ca = make_ca("lightpath-walkthrough-ca")
    pair = make_serving_cert(ca, [HOSTNAME])
    with SandboxApiServer() as api, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "tls.crt").write_bytes(pair.cert_pem)
        (folder / "tls.key").write_bytes(pair.key_pem)
        settings = Settings(
            tls_cert_file=folder / "tls.crt",
            tls_key_file=folder / "tls.key",
            bind_address="127.0.0.1",
            port=0,
        )
        env = Cluster(api, api.write_kubeconfig(folder / "kubeconfig"), folder, settings)
        env.core.create_namespace({"metadata": {"name": WEBHOOK_NAMESPACE}})
        client.AdmissionregistrationV1Api(api.api_client()).create_mutating_webhook_configuration(
            webhook_configuration(ca)
        )
        env.start_webhook()
        env.create(*cluster_objects())
        w = Walkthrough(env)
        try:
            w.say("1. Where does every Service stand?")
            w.run("status", "-A")
            w.say("2. Plan a canary")
            w.run("plan", "shop/web", "shop/api", "infra/dns")
            w.say("3. Migrate the canary")
            w.run("migrate", "shop/web")
            w.shell("kubectl lightpath status -n shop")
            w.say("4. A whole namespace, by its Namespace label, in batches")
            w.run("plan", "payments", "--namespace-label")
            w.run("migrate", "payments", "--namespace-label", "--batch", "1", "--pause", "1")
            w.say("5. The webhook goes down (failurePolicy Ignore) in the middle of a migration")
            env.stop_webhook()
            w.run("migrate", "shop/api", "shop/cart", "--batch", "1")
            env.create([], [service("search", "payments", port(9200, name="http", app="http"))])
            w.run("status", "-A")
            w.shell(
                "lightpath status -A -o json | jq -r '.items[] | select(.pending) | \"\\(.namespace)/\\(.name): \\(.reason)\"'"
            )
            w.say("6. The webhook is back: catch up")
            env.start_webhook()
            w.run("reconcile", "-A", "--dry-run")
            w.run("reconcile", "-A")
            w.run("migrate", "shop/api", "shop/cart")
            w.say("7. Roll everything back")
            w.run("rollback", "-A", "--dry-run")
            w.run("rollback", "-A")
            w.run("status", "-A")
            w.say("8. Mistakes are caught before anything changes")
            w.run("migrate", "shop/web", "shop/wbe", "ghost/api")
            w.say("9. Machine-readable")
            w.shell("lightpath status -A -o json | jq -c .summary")
            w.shell("lightpath status -n payments -o json | jq '.items[0]'")
        finally:
            env.stop_webhook()
    return 0


if __name__ == "__main__":
    sys.exit(main())
