"""The installed console scripts, run as a user would: `lightpath`, `kubectl-lightpath` and `kubectl lightpath`."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.cluster import mixed_cluster, namespace, service
from tests.cli.conftest import Cluster

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow  # subprocesses: a few seconds each


def _run(argv: list[str], cluster: Cluster) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "KUBECONFIG": str(cluster.kubeconfig),
    }
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
    assert "migrated  shop/web -> lightpath" in migrated.stdout
    assert "\r" not in migrated.stderr  # no progress bar when stderr is not a terminal
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


def _read_pty(fd: int) -> str:
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            break
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed its side
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_and_colour_only_on_a_terminal(cluster: Cluster) -> None:
    exe = BIN / "lightpath"
    if not exe.exists():
        pytest.skip(f"{exe} is not installed (pip install -e .)")
    cluster.create([namespace("shop")], [service(f"svc{i}", "shop") for i in range(4)])

    master, slave = pty.openpty()
    try:
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        env.pop("NO_COLOR", None)
        done = subprocess.run(
            [str(exe), "migrate", "-n", "shop", "--batch", "2"],
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        bar = _read_pty(master)
        assert done.returncode == 0
        assert "\rmigrate [###############...............] 2/4" in bar and "] 4/4" in bar
        assert "\033[" not in done.stdout and "migrated  shop/svc3 -> lightpath" in done.stdout

        shown = subprocess.run(
            [str(exe), "status", "-n", "shop"],
            stdout=slave,
            stderr=subprocess.PIPE,
            env=env,
            timeout=60,
            check=False,
        )
        table = _read_pty(master)
        assert shown.returncode == 0
        assert "\033[32mlightpath\033[0m" in table and "\033[1mNAMESPACE\033[0m" in table
    finally:
        os.close(master)
        os.close(slave)
