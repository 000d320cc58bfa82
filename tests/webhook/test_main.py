"""``lightpath-webhook`` as a process: starts with a self-signed pair, serves, stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sandbox.api.apiserver import SandboxApiServer
from shared import constants as c
from shared.tls import KeyPair, make_serving_cert
from tests.support.polling import wait_for
from tests.webhook.conftest import HOSTNAME
from tests.webhook.test_server import patch_ops, review

pytestmark = pytest.mark.slow  # process start-ups (imports) take a few seconds each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pair_files(tmp_path: Path, ca: KeyPair) -> tuple[Path, Path, Path]:
    pair = make_serving_cert(ca, [HOSTNAME])
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    (tmp_path / "tls.crt").write_bytes(pair.cert_pem)
    (tmp_path / "tls.key").write_bytes(pair.key_pem)
    return tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key"


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LIGHTPATH_", "KUBERNETES_")) and k != "KUBECONFIG"}
    env["HOME"] = str(home)
    return env


@pytest.fixture
def run_webhook(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def start(procs: list[subprocess.Popen[bytes]], args: list[str], home: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "webhook", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=clean_env(home))
    procs.append(proc)
    return proc


def get(ca: Path, port: int, path: str) -> httpx.Response | None:
    try:
        with httpx.Client(verify=str(ca), timeout=5) as http:
            return http.get(f"https://127.0.0.1:{port}{path}", extensions={"sni_hostname": HOSTNAME})
    except httpx.HTTPError:
        return None


def stop_gracefully(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM: uvicorn drains, shuts down, then re-raises the signal (exit status -15 by design)."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) in (0, -signal.SIGTERM)
    assert "Finished server process" in log.read_text()


def test_serves_against_a_cluster_and_stops_on_sigterm(
    tmp_path: Path, pair_files: tuple[Path, Path, Path], run_webhook: list[subprocess.Popen[bytes]]
) -> None:
    ca, crt, key = pair_files
    port = free_port()
    with SandboxApiServer() as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        proc = start(run_webhook, ["--kubeconfig", str(kubeconfig), "--tls-cert-file", str(crt), "--tls-key-file",
                                   str(key), "--bind-address", "127.0.0.1", "--port", str(port)],
                     tmp_path, tmp_path / "webhook.log")
        wait_for(lambda: (r := get(ca, port, "/readyz")) is not None and r.status_code == 200, "/readyz 200", 30)
        with httpx.Client(verify=str(ca), timeout=5) as http:
            r = http.post(f"https://127.0.0.1:{port}/mutate", json=review(uid="from-main"),
                          extensions={"sni_hostname": HOSTNAME})
        assert r.status_code == 200 and patch_ops(r.json())[0]["value"] == c.DEFAULT_PROXY_NAME
        stop_gracefully(proc, tmp_path / "webhook.log")
    lines = [json.loads(line) for line in (tmp_path / "webhook.log").read_text().splitlines()]
    admission = [line for line in lines if line["msg"] == "admission"]
    assert len(admission) == 1 and admission[0]["uid"] == "from-main" and admission[0]["decision"] == "label"
    assert all("color_message" not in line for line in lines)


def test_starts_without_any_cluster_but_is_not_ready(
    tmp_path: Path, pair_files: tuple[Path, Path, Path], run_webhook: list[subprocess.Popen[bytes]]
) -> None:
    ca, crt, key = pair_files
    port = free_port()
    proc = start(run_webhook, ["--tls-cert-file", str(crt), "--tls-key-file", str(key), "--bind-address",
                               "127.0.0.1", "--port", str(port)], tmp_path, tmp_path / "webhook.log")
    wait_for(lambda: (r := get(ca, port, "/healthz")) is not None and r.status_code == 200, "/healthz 200", 30)
    ready = get(ca, port, "/readyz")
    assert ready is not None and ready.status_code == 503 and ready.json()["namespace_cache"] is False
    stop_gracefully(proc, tmp_path / "webhook.log")
    assert "no Kubernetes API configured" in (tmp_path / "webhook.log").read_text()


def test_broken_pair_at_start_exits_1_with_the_reason(
    tmp_path: Path, pair_files: tuple[Path, Path, Path], ca: KeyPair, run_webhook: list[subprocess.Popen[bytes]]
) -> None:
    _, crt, _ = pair_files
    other = tmp_path / "other.key"
    other.write_bytes(make_serving_cert(ca, [HOSTNAME]).key_pem)
    proc = start(run_webhook, ["--tls-cert-file", str(crt), "--tls-key-file", str(other), "--port", str(free_port())],
                 tmp_path, tmp_path / "webhook.log")
    assert proc.wait(30) == 1
    assert "certificate does not match the private key" in (tmp_path / "webhook.log").read_text()
