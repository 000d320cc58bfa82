"""Built manifests, shared by the deploy tests (each package is built once per session)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.manifests import REPO, Obj, copy_deploy, kustomize


@pytest.fixture(scope="session")
def default_objs() -> list[Obj]:
    """What `kubectl apply -k deploy/default` would send."""
    return kustomize(REPO / "deploy" / "default")


@pytest.fixture(scope="session")
def self_signed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/ with the overlay that `lightpath certs generate` writes, made by the real command."""
    root = tmp_path_factory.mktemp("self-signed")
    copy_deploy(root)
    proc = subprocess.run(
        [sys.executable, "-m", "cli.certs", "generate"], cwd=root, capture_output=True, text=True, timeout=60, check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    return root / "deploy" / "overlays" / "self-signed"


@pytest.fixture(scope="session")
def self_signed_objs(self_signed_dir: Path) -> list[Obj]:
    return kustomize(self_signed_dir)
