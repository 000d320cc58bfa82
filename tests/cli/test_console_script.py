"""The installed console scripts, run as a user would: `lightpath`, `kubectl-lightpath` and `kubectl lightpath`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.cluster import mixed_cluster
from tests.cli.conftest import Cluster

BIN = Path(sys.executable).parent


def _run(argv: list[str], cluster: Cluster) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "KUBECONFIG": str(cluster.kubeconfig)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)


@pytest.mark.parametrize("script", ["lightpath", "kubectl-lightpath"])
def test_console_script_status_and_migrate(cluster: Cluster, script: str) -> None:
    exe = BIN / script
    if not exe.exists():
        pytest.skip(f"{exe} is not installed (pip install -e .)")
    namespaces, services = mixed_cluster()
    cluster.create(namespaces, services)

    status = _run([str(exe), "status", "-A", "-o", "json"], cluster)  # kubeconfig from $KUBECONFIG
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["summary"]["total"] == 7

    migrated = _run([str(exe), "migrate", "shop/web"], cluster)
    assert migrated.returncode == 0, migrated.stderr
    assert "migrated  shop/web -> lightpath" in migrated.stdout and "\r" not in migrated.stderr  # no bar when piped
    assert cluster.handoff("shop", "web") == "lightpath.cloud"

    missing = _run([str(exe), "rollback", "shop/nope"], cluster)
    assert missing.returncode == 2 and "Service not found: shop/nope" in missing.stderr


def test_kubectl_plugin(cluster: Cluster) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None or not (BIN / "kubectl-lightpath").exists():
        pytest.skip("kubectl or the kubectl-lightpath script is not installed")
    namespaces, services = mixed_cluster()
    cluster.create(namespaces, services)
    result = _run([kubectl, "lightpath", "status", "-n", "shop"], cluster)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("NAMESPACE") and "shop" in result.stdout
