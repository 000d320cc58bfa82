"""Lint the images without a Docker engine (none runs on these machines; hadolint is not installable offline).

Checks what a failed `docker build` or a broken pod would otherwise reveal late: every COPY source
exists and survives .dockerignore, the entrypoint is a real console script, the final stage carries no
build tools, the webhook runs as a non-root UID, OCI labels are present, and every third-party module the
code imports is installed by the image (pyproject dependencies, transitively, or the Debian packages).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.deploy.dockerfile import DockerIgnore, copy_sources, labels, parse

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMAGES = {"webhook": "lightpath-webhook", "redirector": "lightpath-redirector"}
BUILD_TOOLS = {"gcc", "g++", "cc", "clang", "make", "build-essential", "python3-dev", "libc6-dev", "cargo", "rustc"}
OCI_LABELS = {"title", "description", "source", "licenses", "version", "revision"}
# Python modules the images get from Debian packages rather than pip.
DEBIAN_MODULES = {"webhook": set(), "redirector": {"nftables"}}
OWN_PACKAGES = {"shared", "webhook", "redirector", "controlplane", "cli", "sandbox", "tests", "bench"}


def _dockerfile(image: str) -> Path:
    return REPO / f"Dockerfile.{image}"


@pytest.mark.parametrize("image", IMAGES)
def test_multi_stage_on_slim_debian(image: str) -> None:
    df = parse(_dockerfile(image))
    assert len(df.stages) >= 2, "build in one stage, copy the result into a clean one"
    assert all(re.fullmatch(r"debian:[a-z]+-slim", s.base) for s in df.stages), [s.base for s in df.stages]
    assert df.final.all("HEALTHCHECK") == [], "Kubernetes probes the pods; no HEALTHCHECK"


@pytest.mark.parametrize("image", IMAGES)
def test_every_copy_source_exists_and_is_in_the_build_context(image: str) -> None:
    ignore = DockerIgnore((REPO / ".dockerignore").read_text())
    df = parse(_dockerfile(image))
    sources = [src for stage in df.stages for src in copy_sources(stage)]
    assert sources, "no COPY from the build context?"
    for src in sources:
        path = REPO / src
        assert path.exists(), f"COPY {src}: no such file in the repository"
        files = [p for p in path.rglob("*.py")] if path.is_dir() else [path]
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            assert not ignore.excluded(rel), f"COPY {src}: {rel} is excluded by .dockerignore"
    assert "sandbox/" not in sources and "tests/" not in sources, "the test double stays out of the images"


def test_dockerignore_keeps_secrets_and_junk_out() -> None:
    ignore = DockerIgnore((REPO / ".dockerignore").read_text())
    for path in (".git/config", ".venv/bin/python", "tests/conftest.py", "deploy/overlays/self-signed/tls.key",
                 "shared/__pycache__/policy.cpython-311.pyc", "webhook/tls.key"):
        assert ignore.excluded(path), path
    assert not ignore.excluded("shared/policy.py") and not ignore.excluded("pyproject.toml")


@pytest.mark.parametrize("image", IMAGES)
def test_entrypoint_is_a_real_console_script(image: str) -> None:
    df = parse(_dockerfile(image))
    (entry,) = df.final.all("ENTRYPOINT")
    argv = entry.exec_form()
    assert argv, "ENTRYPOINT in exec form, so signals reach the process"
    script = argv[0].rsplit("/", 1)[-1]
    assert script == IMAGES[image]
    assert script in PYPROJECT["project"]["scripts"], f"{script} is not a [project.scripts] entry"
    target = PYPROJECT["project"]["scripts"][script]
    module, func = target.split(":")
    proc = subprocess.run([sys.executable, "-c", f"import {module}; assert callable({module}.{func})"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{target}: {proc.stderr}"
    # The build stage proves the installed script starts.
    build = " ".join(i.args for s in df.stages[:-1] for i in s.all("RUN"))
    assert f"/opt/lightpath/bin/{script} --help" in build


@pytest.mark.parametrize("image", IMAGES)
def test_final_stage_has_no_build_tools(image: str) -> None:
    df = parse(_dockerfile(image))
    runs = " ".join(i.args for i in df.final.all("RUN"))
    installed = set(re.findall(r"apt-get install[^&;]*", runs)[0].split()) if "apt-get install" in runs else set()
    assert not installed & BUILD_TOOLS, installed & BUILD_TOOLS
    assert "pip install" not in runs, "dependencies are installed in the build stage"
    assert "rm -rf /var/lib/apt/lists/*" in runs


@pytest.mark.parametrize("image", IMAGES)
def test_oci_labels(image: str) -> None:
    found = labels(parse(_dockerfile(image)).final)
    assert {f"org.opencontainers.image.{k}" for k in OCI_LABELS} <= set(found)
    assert found["org.opencontainers.image.title"] == IMAGES[image]
    assert found["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]  # SPDX expression


def test_webhook_runs_as_a_numeric_non_root_user() -> None:
    (user,) = parse(_dockerfile("webhook")).final.all("USER")
    uid = user.args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric, so runAsNonRoot can verify it"


def test_redirector_image_has_the_netfilter_tools_and_bindings() -> None:
    df = parse(_dockerfile("redirector"))
    runs = " ".join(i.args for i in df.final.all("RUN"))
    for pkg in ("nftables", "iptables", "python3-nftables"):
        assert re.search(rf"\b{re.escape(pkg)}\b", runs), pkg
    build = " ".join(i.args for i in df.stages[0].all("RUN"))
    assert "--system-site-packages" in build, "the venv must see Debian's python3-nftables"


def _dependency_closure() -> set[str]:
    """Normalised names of the distributions `pip install .` pulls in (installed metadata, markers evaluated)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        key = name + "[" + ",".join(sorted(req.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        seen.add(name)
        try:
            requires = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append(sub)
    return {s for s in seen if "[" not in s}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules(package: str) -> set[str]:
    """Top-level third-party modules the package needs: imports (not optional ones inside
    try/except ImportError) plus modules named by uvicorn's loop=/http= settings."""
    mods: set[str] = set()
    for path in (REPO / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        optional: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
            ):
                optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods.add(node.module.split(".")[0])
            elif (isinstance(node, ast.keyword) and node.arg in ("loop", "http") and isinstance(node.value, ast.Constant)
                  and node.value.value in ("uvloop", "httptools")):
                mods.add(str(node.value.value))
    return {m for m in mods if m not in sys.stdlib_module_names and m not in OWN_PACKAGES and m != "__future__"}


IMAGE_ALSO = {"redirector": ("controlplane",), "webhook": ("controlplane",)}  # packages an image's code imports besides shared/


@pytest.mark.parametrize("image", IMAGES)
def test_image_installs_every_module_the_code_imports(image: str) -> None:
    closure = _dependency_closure()
    providers = md.packages_distributions()
    missing = []
    for package in ("shared", image, *IMAGE_ALSO.get(image, ())):
        for mod in sorted(_imported_modules(package)):
            if mod in DEBIAN_MODULES[image]:
                continue
            dists = {_norm(d) for d in providers.get(mod, [])}
            if not dists & closure:
                missing.append(f"{package}/ imports {mod} (from {sorted(dists) or 'nowhere'})")
    assert not missing, "not installed by `pip install .` in the image; add to [project].dependencies: " + "; ".join(missing)


def test_hadolint_if_available() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (no offline package for it here); the lint tests above stand in for it")
    for image in IMAGES:
        proc = subprocess.run([hadolint, str(_dockerfile(image))], capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def _constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_norm(name)] = version
    return pins


@pytest.mark.parametrize("image", IMAGES)
def test_image_installs_with_the_constraints_file(image: str) -> None:
    df = parse(_dockerfile(image))
    sources = [src for stage in df.stages for src in copy_sources(stage)]
    assert "constraints.txt" in sources
    installs = [i.args for s in df.stages for i in s.all("RUN") if "pip install" in i.args]
    assert installs and all("-c constraints.txt" in args for args in installs), installs


def test_bootstrap_installs_with_the_constraints_file() -> None:
    script = (REPO / "scripts" / "bootstrap.sh").read_text()
    installs = [line for line in script.splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs), installs


def test_constraints_pin_every_dependency_at_the_installed_version() -> None:
    """Every distribution the runtime and test dependencies pull in is pinned, at what this venv runs (so the
    images get what the tests ran against); a stale file is regenerated with scripts/lock.py."""
    pins = _constraints()
    missing = sorted(_dependency_closure() - pins.keys())
    assert not missing, f"not pinned in constraints.txt (run scripts/lock.py): {missing}"
    for req in PYPROJECT["project"]["optional-dependencies"]["test"]:
        assert _norm(Requirement(req).name) in pins, req
    stale = {n: (v, md.version(n)) for n, v in pins.items() if md.version(n) != v}
    assert not stale, f"constraints.txt differs from the venv (pinned, installed): {stale}"

