"""Build the kustomize packages under deploy/ with the real kubectl and look objects up in the output.

WHY kubectl and not a copy of the YAML: the tests must exercise exactly what `kubectl apply -k`
would send to a cluster (the same kustomize, the same transformers).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CRD_DIR = REPO.parent / "shared" / "testdata" / "cert-manager-crds"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"

Obj = dict[str, Any]


def need_kubectl() -> None:
    if not Path(KUBECTL).exists():
        pytest.skip("kubectl is not installed (its built-in kustomize builds deploy/); install kubectl to run this test")


def kustomize(path: Path) -> list[Obj]:
    """`kubectl kustomize <path>` as a list of objects; a build error fails with kustomize's message."""
    need_kubectl()
    proc = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def find(objs: Iterable[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: Iterable[Obj], kind: str, name: str | None = None) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(workload: Obj, name: str | None = None) -> Obj:
    containers = workload["spec"]["template"]["spec"]["containers"]
    if name is None:
        assert len(containers) == 1, f"{workload['metadata']['name']} has {len(containers)} containers"
        return dict(containers[0])
    return next(c for c in containers if c["name"] == name)


def env_of(ctr: Obj) -> dict[str, str]:
    """Plain-value environment variables (valueFrom ones map to '<from>')."""
    return {e["name"]: e.get("value", "<from>") for e in ctr.get("env", [])}


def port_number(ctr: Obj, port: int | str) -> int:
    """Resolve a probe's or Service's named port against the container's ports, as kubelet does."""
    if isinstance(port, int):
        return port
    for p in ctr.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"container {ctr['name']} has no port named {port!r}")


def copy_deploy(dest: Path) -> Path:
    """A copy of deploy/ (without generated overlay files) to generate overlays into; returns dest/deploy."""
    target = dest / "deploy"
    shutil.copytree(DEPLOY, target, ignore=shutil.ignore_patterns("*.key", "*.crt", "secret.yaml"))
    generated = target / "overlays" / "self-signed" / "kustomization.yaml"
    generated.unlink(missing_ok=True)
    return target
