"""`make images` and the kustomize `images:` override that README and docs/install.md describe (issue 17
item 11: the manifests named images published nowhere, so a new user got ImagePullBackOff).

`make images` runs against a stand-in `docker`/`podman` on the PATH (a shell script that records its
arguments: a test double, no image is built here); the documented override is cut out of
docs/install.md and README.md and built with the real kustomize.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.manifests import REPO, Obj, container, copy_deploy, kustomize, one

MAKE = shutil.which("make") or "/usr/bin/make"
DEFAULT_IMAGES = {"webhook": "ghcr.io/lightpath-cloud/lightpath-webhook:0.1.0",
                  "redirector": "ghcr.io/lightpath-cloud/lightpath-redirector:0.1.0"}


def make_images(tmp_path: Path, tools: tuple[str, ...], *args: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    """`make images` with only ``tools`` (stand-ins recording their argv) on the PATH."""
    if not Path(MAKE).exists():
        pytest.skip("make is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for tool in tools:
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\nprintf "%s\\n" "{tool} $*" >> {calls}\n')
        script.chmod(0o755)
    proc = subprocess.run([MAKE, "--no-print-directory", "-C", str(REPO), "images", *args], capture_output=True,
                          text=True, timeout=60, check=False, env={"PATH": str(bin_dir)})
    lines = calls.read_text().splitlines() if calls.exists() else []
    return proc, [line.split() for line in lines]


def test_make_images_builds_both_with_docker_and_pushes_on_request(tmp_path: Path) -> None:
    proc, calls = make_images(tmp_path, ("docker", "podman"), "IMAGE_REGISTRY=registry.example.com/lp", "IMAGE_TAG=1.2.3", "PUSH=1")
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        ["docker", "build", "-f", "Dockerfile.webhook", "--build-arg", "VERSION=1.2.3", "-t", "registry.example.com/lp/lightpath-webhook:1.2.3", "."],
        ["docker", "push", "registry.example.com/lp/lightpath-webhook:1.2.3"],
        ["docker", "build", "-f", "Dockerfile.redirector", "--build-arg", "VERSION=1.2.3", "-t", "registry.example.com/lp/lightpath-redirector:1.2.3", "."],
        ["docker", "push", "registry.example.com/lp/lightpath-redirector:1.2.3"],
    ]


def test_make_images_defaults_to_the_names_the_manifests_use(tmp_path: Path, default_objs: list[Obj]) -> None:
    proc, calls = make_images(tmp_path, ("podman",))
    assert proc.returncode == 0, proc.stderr
    assert [c[0] for c in calls] == ["podman", "podman"] and not any(c[1] == "push" for c in calls)
    built = {c[c.index("-t") + 1] for c in calls}
    used = {container(one(default_objs, "Deployment", "lightpath-webhook"))["image"],
            container(one(default_objs, "DaemonSet", "lightpath-redirector"))["image"]}
    assert built == used == set(DEFAULT_IMAGES.values())


def test_make_images_without_docker_or_podman_skips_with_a_message(tmp_path: Path) -> None:
    proc, calls = make_images(tmp_path, ())
    assert proc.returncode == 0 and calls == []
    assert "skipped: neither docker nor podman is installed" in proc.stdout


def test_a_failed_build_fails_make(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    (bin_dir / "docker").chmod(0o755)
    if not Path(MAKE).exists():
        pytest.skip("make is not installed")
    proc = subprocess.run([MAKE, "-C", str(REPO), "images"], capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": str(bin_dir)})
    assert proc.returncode != 0 and "Cannot connect to the Docker daemon" in proc.stderr


def _yaml_blocks(doc: Path) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", doc.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", ["docs/install.md", "README.md"])
def test_the_documented_images_override_points_the_manifests_at_the_pushed_images(tmp_path: Path, doc: str) -> None:
    blocks = [b for b in _yaml_blocks(REPO / doc) if "newName:" in b]
    assert len(blocks) == 1, f"{doc} should show one kustomize images: override"
    override = blocks[0]
    deploy = copy_deploy(tmp_path)
    if "resources:" in override:  # an overlay of one's own next to deploy/ (docs/install.md)
        target = tmp_path / "my-lightpath"
        target.mkdir()
        (target / "kustomization.yaml").write_text(override)
    else:  # the images: list that replaces deploy/default's own (README)
        target = deploy / "default"
        kustomization = target / "kustomization.yaml"
        head, found, _ = kustomization.read_text().partition("\nimages:\n")
        assert found, "deploy/default/kustomization.yaml has no images: list to edit"
        kustomization.write_text(head + "\n" + override)
    objs = kustomize(target)
    images = {container(one(objs, "Deployment", "lightpath-webhook"))["image"],
              container(one(objs, "DaemonSet", "lightpath-redirector"))["image"]}
    assert images == {"registry.example.com/lightpath/lightpath-webhook:0.1.0",
                      "registry.example.com/lightpath/lightpath-redirector:0.1.0"}
    assert "make images" in (REPO / doc).read_text()
