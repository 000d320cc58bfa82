"""Certificate validation and the reload decision, on files laid out like a kubelet Secret volume."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.tls import KeyPair, make_ca, make_serving_cert
from tests.support.polling import wait_for
from tests.support.secret_volume import SecretVolume
from webhook.certs import CertificateError, CertStore, validate_pair

HOST = "lightpath-webhook.lightpath-system.svc"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def ca() -> KeyPair:
    return make_ca("test-ca")


def expired_pair(ca: KeyPair) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=10))
        .not_valid_after(NOW - dt.timedelta(days=1))
        .sign(ca.private_key, hashes.SHA256())
    )
    return KeyPair(cert, key)


def test_validate_accepts_a_matching_pair(ca: KeyPair) -> None:
    pair = make_serving_cert(ca, [HOST])
    assert validate_pair(pair.cert_pem + ca.cert_pem, pair.key_pem, NOW).serial_number == pair.serial


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("mismatch", "does not match the private key"),
        ("expired", "certificate expired"),
        ("garbage cert", "certificate does not parse"),
        ("garbage key", "private key does not parse"),
        ("empty", "does not parse"),
    ],
)
def test_validate_refuses_broken_pairs(ca: KeyPair, broken: str, message: str) -> None:
    a, b, exp = make_serving_cert(ca, [HOST]), make_serving_cert(ca, [HOST]), expired_pair(ca)
    cert, key = {
        "mismatch": (a.cert_pem, b.key_pem),
        "expired": (exp.cert_pem, exp.key_pem),
        "garbage cert": (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", a.key_pem),
        "garbage key": (a.cert_pem, b"not a key"),
        "empty": (b"", b""),
    }[broken]
    with pytest.raises(CertificateError, match=message):
        validate_pair(cert, key, NOW)


def _store(tmp_path: Path, pair: KeyPair) -> tuple[SecretVolume, CertStore]:
    vol = SecretVolume(tmp_path / "tls")
    vol.write({"tls.crt": pair.cert_pem, "tls.key": pair.key_pem})
    store = CertStore(vol.path("tls.crt"), vol.path("tls.key"), reload_interval=0.05)
    store.load()
    return vol, store


def test_rotation_swaps_in_a_valid_pair_once(tmp_path: Path, ca: KeyPair) -> None:
    first, second = make_serving_cert(ca, [HOST]), make_serving_cert(ca, [HOST])
    vol, store = _store(tmp_path, first)
    assert store.current.serial == first.serial and store.ready()
    assert store.check() is False  # nothing changed
    vol.write({"tls.crt": second.cert_pem, "tls.key": second.key_pem})
    assert store.check() is True
    assert store.current.serial == second.serial and store.reload_successes == 1
    assert store.check() is False


def test_broken_pair_is_refused_counted_once_and_old_pair_keeps_serving(tmp_path: Path, ca: KeyPair) -> None:
    first, a, b = (make_serving_cert(ca, [HOST]) for _ in range(3))
    vol, store = _store(tmp_path, first)
    old_context = store.current.context
    vol.write({"tls.crt": a.cert_pem, "tls.key": b.key_pem})
    assert store.check() is False and store.check() is False
    assert store.reload_failures == 1 and "does not match" in (store.last_error or "")
    assert store.current.serial == first.serial and store.current.context is old_context
    vol.write({"tls.crt": a.cert_pem, "tls.key": a.key_pem})  # the issuer fixes it
    assert store.check() is True and store.current.serial == a.serial and store.last_error is None


def test_expired_new_pair_is_refused(tmp_path: Path, ca: KeyPair) -> None:
    first, exp = make_serving_cert(ca, [HOST]), expired_pair(ca)
    vol, store = _store(tmp_path, first)
    vol.write({"tls.crt": exp.cert_pem, "tls.key": exp.key_pem})
    assert store.check() is False and store.reload_failures == 1 and "expired" in (store.last_error or "")


def test_missing_files_are_refused_without_dropping_the_pair(tmp_path: Path, ca: KeyPair) -> None:
    vol, store = _store(tmp_path, make_serving_cert(ca, [HOST]))
    vol.path("tls.key").unlink()
    assert store.check() is False and store.reload_failures == 1 and store.ready()


def test_initial_load_of_a_broken_pair_fails_loudly(tmp_path: Path, ca: KeyPair) -> None:
    a, b = make_serving_cert(ca, [HOST]), make_serving_cert(ca, [HOST])
    vol = SecretVolume(tmp_path / "tls")
    vol.write({"tls.crt": a.cert_pem, "tls.key": b.key_pem})
    with pytest.raises(CertificateError, match="does not match"):
        CertStore(vol.path("tls.crt"), vol.path("tls.key")).load()
    with pytest.raises(CertificateError, match="cannot read"):
        CertStore(tmp_path / "nope.crt", tmp_path / "nope.key").load()


def test_poller_picks_up_a_rotation(tmp_path: Path, ca: KeyPair) -> None:
    first, second = make_serving_cert(ca, [HOST]), make_serving_cert(ca, [HOST])
    vol, store = _store(tmp_path, first)
    store.start()
    try:
        vol.write({"tls.crt": second.cert_pem, "tls.key": second.key_pem})
        wait_for(lambda: store.current.serial == second.serial, "the poller to pick up the new pair")
    finally:
        store.stop()
