"""shared.tls: the CA and serving certificates verify the way a TLS client checks them."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from shared.tls import make_ca, make_serving_cert


def test_ca_is_a_self_signed_ca() -> None:
    ca = make_ca("lightpath-ca")
    cert = ca.certificate
    assert cert.subject == cert.issuer
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(cert)
    assert ca.serial == cert.serial_number


def test_serving_cert_chains_to_ca_with_sans_and_server_auth() -> None:
    ca = make_ca("lightpath-ca")
    names = ["lightpath.lightpath-system.svc", "lightpath.lightpath-system.svc.cluster.local", "127.0.0.1"]
    leaf = make_serving_cert(ca, names, serial=4242)
    leaf.certificate.verify_directly_issued_by(ca.certificate)
    san = leaf.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == names[:2]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = leaf.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not leaf.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.serial == 4242


def test_only_the_ca_may_sign_certificates() -> None:
    ca = make_ca("lightpath-ca")
    leaf = make_serving_cert(ca, ["a.example"])
    ca_usage = ca.certificate.extensions.get_extension_for_class(x509.KeyUsage)
    leaf_usage = leaf.certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert ca_usage.critical and leaf_usage.critical
    assert ca_usage.value.digital_signature and ca_usage.value.key_cert_sign and ca_usage.value.crl_sign
    assert leaf_usage.value.digital_signature
    assert not leaf_usage.value.key_cert_sign and not leaf_usage.value.crl_sign
    assert not leaf_usage.value.key_encipherment  # an EC key: no RSA key transport

def test_pem_encodings_round_trip() -> None:
    ca = make_ca("ca")
    leaf = make_serving_cert(ca, ["a.example"])
    assert x509.load_pem_x509_certificate(leaf.cert_pem) == leaf.certificate
    assert leaf.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    key = serialization.load_pem_private_key(leaf.key_pem, password=None)
    assert key.public_key().public_numbers() == leaf.private_key.public_key().public_numbers()  # type: ignore[union-attr]


def test_bad_arguments_are_refused() -> None:
    ca = make_ca("ca")
    with pytest.raises(ValueError):
        make_serving_cert(ca, [])
    with pytest.raises(ValueError):
        make_ca("ca", days=0)


def _tls_server(tmp_path: Path, cert_pem: bytes, key_pem: bytes) -> tuple[socket.socket, threading.Thread]:
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        for _ in range(2):
            conn, _addr = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_real_tls_handshake_verifies_hostname_against_sans(tmp_path: Path) -> None:
    ca = make_ca("ca")
    leaf = make_serving_cert(ca, ["hook.ns.svc"])
    listener, thread = _tls_server(tmp_path, leaf.cert_pem, leaf.key_pem)
    client = ssl.create_default_context(cadata=ca.cert_pem.decode())
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)) as raw, client.wrap_socket(raw, server_hostname="hook.ns.svc") as tls:
        assert tls.recv(5) == b"hello"
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="match"),
    ):
        client.wrap_socket(raw, server_hostname="other.ns.svc")
    thread.join(timeout=5)
    listener.close()
