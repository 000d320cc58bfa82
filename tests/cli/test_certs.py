"""`lightpath certs generate`: a verifying chain, the right SANs, private files, a building overlay, no clobbering."""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from cli import certs
from tests.deploy.manifests import REPO, copy_deploy, kustomize

NAMES = [
    "lightpath-webhook",
    "lightpath-webhook.lightpath-system",
    "lightpath-webhook.lightpath-system.svc",
    "lightpath-webhook.lightpath-system.svc.cluster.local",
]


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it (a fresh process, the standalone entry point)."""
    return subprocess.run([sys.executable, "-m", "cli.certs", "generate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    copy_deploy(tmp_path)
    return tmp_path


def _out(workdir: Path) -> Path:
    return workdir / "deploy" / "overlays" / "self-signed"


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_chain_verifies_for_the_names_kube_apiserver_dials(workdir: Path) -> None:
    proc = run(workdir)
    assert proc.returncode == 0, proc.stderr
    out = _out(workdir)
    ca, leaf = _cert(out / "ca.crt"), _cert(out / "tls.crt")
    leaf.verify_directly_issued_by(ca)
    # Full path validation the way a TLS client does it, for the name kube-apiserver uses.
    from cryptography.x509.verification import PolicyBuilder, Store

    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("lightpath-webhook.lightpath-system.svc"))
    verifier.verify(leaf, [])
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == NAMES
    assert ExtendedKeyUsageOID.SERVER_AUTH in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    days = (leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).days
    assert 360 <= days <= 365


def test_files_and_modes(workdir: Path) -> None:
    assert run(workdir).returncode == 0
    out = _out(workdir)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if not p.name.startswith(".") and p.name != "README.md"}
    assert modes == {"ca.crt": 0o644, "ca.key": 0o600, "tls.crt": 0o644, "tls.key": 0o600,
                     "secret.yaml": 0o600, "kustomization.yaml": 0o644}
    assert not [p for p in out.iterdir() if ".tmp" in p.name], "no temporary files left behind"


def test_keys_are_0600_whatever_the_umask(workdir: Path) -> None:
    old = os.umask(0)
    try:
        assert run(workdir).returncode == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((_out(workdir) / "tls.key").stat().st_mode) == 0o600


def test_secret_holds_the_pair_and_the_ca(workdir: Path) -> None:
    assert run(workdir).returncode == 0
    out = _out(workdir)
    secret = yaml.safe_load((out / "secret.yaml").read_text())
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"] == {**secret["metadata"], "name": "lightpath-webhook-tls", "namespace": "lightpath-system"}
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert data == {"tls.crt": (out / "tls.crt").read_bytes(), "tls.key": (out / "tls.key").read_bytes(),
                    "ca.crt": (out / "ca.crt").read_bytes()}


def test_overlay_builds_and_puts_the_ca_in_cabundle(workdir: Path) -> None:
    assert run(workdir).returncode == 0
    objs = kustomize(_out(workdir))
    mwc = next(o for o in objs if o["kind"] == "MutatingWebhookConfiguration")
    bundle = base64.b64decode(mwc["webhooks"][0]["clientConfig"]["caBundle"])
    assert bundle == (_out(workdir) / "ca.crt").read_bytes()
    assert not [o for o in objs if o["apiVersion"].startswith("cert-manager.io/")]
    secret = next(o for o in objs if o["kind"] == "Secret")
    volume = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tls", "secret": {"secretName": secret["metadata"]["name"], "defaultMode": 0o440}} in volume


def test_rerun_without_force_refuses_and_changes_nothing(workdir: Path) -> None:
    assert run(workdir).returncode == 0
    out = _out(workdir)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run(workdir)
    assert proc.returncode == 1
    assert "refusing to overwrite" in proc.stderr and "--force" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_one_existing_file_is_enough_to_refuse(workdir: Path) -> None:
    out = _out(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tls.key").write_text("precious")
    proc = run(workdir)
    assert proc.returncode == 1 and "tls.key" in proc.stderr
    assert (out / "tls.key").read_text() == "precious"
    assert not (out / "ca.key").exists(), "nothing written when refusing"


def test_force_replaces_everything(workdir: Path) -> None:
    assert run(workdir).returncode == 0
    first = _cert(_out(workdir) / "tls.crt").serial_number
    assert run(workdir, "--force").returncode == 0
    assert _cert(_out(workdir) / "tls.crt").serial_number != first
    assert stat.S_IMODE((_out(workdir) / "tls.key").stat().st_mode) == 0o600


def test_renewal_with_the_same_ca_keeps_cabundle(workdir: Path) -> None:
    assert run(workdir).returncode == 0
    out = _out(workdir)
    ca_before, leaf_before = (out / "ca.crt").read_bytes(), _cert(out / "tls.crt")
    proc = run(workdir, "--force", "--ca-cert", str(out / "ca.crt"), "--ca-key", str(out / "ca.key"))
    assert proc.returncode == 0, proc.stderr
    assert (out / "ca.crt").read_bytes() == ca_before
    leaf = _cert(out / "tls.crt")
    assert leaf.serial_number != leaf_before.serial_number
    leaf.verify_directly_issued_by(_cert(out / "ca.crt"))
    assert "caBundle" in (out / "kustomization.yaml").read_text()


def test_mismatched_ca_key_is_refused(workdir: Path, tmp_path: Path) -> None:
    assert run(workdir).returncode == 0
    out = _out(workdir)
    other = tmp_path / "other"
    assert run(workdir, "-o", str(other), "--secret-only").returncode == 0
    proc = run(workdir, "-o", str(tmp_path / "third"), "--ca-cert", str(out / "ca.crt"), "--ca-key", str(other / "ca.key"))
    assert proc.returncode == 1 and "is not the private key of" in proc.stderr
    assert not (tmp_path / "third").exists()


def test_secret_only_for_another_install(workdir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "elsewhere"
    proc = run(workdir, "--namespace", "infra", "--service", "lp", "--secret-only", "-o", str(dest))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["ca.crt", "ca.key", "secret.yaml", "tls.crt", "tls.key"]
    san = _cert(dest / "tls.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["lp", "lp.infra", "lp.infra.svc", "lp.infra.svc.cluster.local"]
    assert yaml.safe_load((dest / "secret.yaml").read_text())["metadata"]["namespace"] == "infra"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--namespace", "infra"], "--secret-only"),
        (["--service", "Bad_Name"], "DNS-1123"),
        (["--base", "no/such/dir"], "no kustomization.yaml"),
        (["--ca-cert", "x.crt"], "go together"),
        (["--cluster-domain", "bad_domain"], "not a DNS name"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(workdir: Path, args: list[str], message: str) -> None:
    proc = run(workdir, *args)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert not (_out(workdir) / "tls.key").exists()


def test_unwritable_output_is_a_clear_error_not_a_traceback(workdir: Path) -> None:
    (workdir / "a-file").write_text("")
    proc = run(workdir, "--secret-only", "--output-dir", "a-file/certs")
    assert proc.returncode == 1, proc.stderr
    assert "error: cannot write to a-file/certs" in proc.stderr and "Traceback" not in proc.stderr


def test_days_out_of_range_is_a_usage_error(workdir: Path) -> None:
    proc = run(workdir, "--days", "0")
    assert proc.returncode == 2 and "--days" in proc.stderr


def test_registers_on_a_host_cli(tmp_path: Path) -> None:
    """add_certs_parser plugs `certs generate` into another argparse program (how `lightpath` uses it)."""
    parser = argparse.ArgumentParser(prog="host")
    certs.add_certs_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["certs", "generate", "-o", str(tmp_path / "x"), "--secret-only"])
    assert args.func is certs.generate
    assert args.func(args) == 0
    key = load_pem_private_key((tmp_path / "x" / "tls.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)


def test_lightpath_cli_exposes_certs_generate(tmp_path: Path) -> None:
    from cli.main import main as lightpath

    assert lightpath(["certs", "generate", "-o", str(tmp_path / "y"), "--secret-only"]) == 0
    assert (tmp_path / "y" / "secret.yaml").exists()


def test_render_is_pure_and_names_the_base() -> None:
    from shared.tls import make_ca, make_serving_cert

    ca = make_ca("t")
    leaf = make_serving_cert(ca, NAMES)
    files = certs.render(namespace="lightpath-system", base_ref="../../default", ca=ca, serving=leaf, new_ca=True, command="x")
    kust = yaml.safe_load(next(f for f in files if f.name == "kustomization.yaml").content)
    assert kust["resources"] == ["../../default", "secret.yaml"]
    assert {f.name: f.mode for f in files}["ca.key"] == 0o600


def test_generated_private_files_are_git_ignored() -> None:
    """The default output directory is inside the repository: its keys and Secret must never be committed."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    overlay = "deploy/overlays/self-signed"
    ca = certs.make_ca("ca")
    files = certs.render(namespace="ns", base_ref="../../default", ca=ca, serving=certs.make_serving_cert(ca, ["a"]),
                         new_ca=True, command="test")
    generated = [f"{overlay}/{f.name}" for f in files]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *generated, f"{overlay}/README.md"],
                          cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    assert sorted(proc.stdout.split()) == sorted(generated)
