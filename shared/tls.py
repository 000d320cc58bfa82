"""Make a private CA and serving certificates signed by it.

WHY: an admission webhook must serve TLS that the API server verifies against the `caBundle` in the
webhook configuration. The sandbox, the webhook tests and `lightpath certs generate` all need the same
small PKI, so it lives here once. EC P-256 keys: fast to generate, accepted by every TLS stack we use.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Backdate validity a little so a freshly made pair verifies on a host whose clock is slightly behind.
_CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, with the PEM encodings every consumer wants."""

    certificate: x509.Certificate
    private_key: CertificateIssuerPrivateKeyTypes

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """PKCS#8, unencrypted: what uvicorn/ssl and Kubernetes TLS Secrets accept."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def serial(self) -> int:
        return self.certificate.serial_number


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    now = datetime.datetime.now(datetime.UTC)
    return now - _CLOCK_SKEW, now + datetime.timedelta(days=days)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """digitalSignature (ECDSA handshakes) for every certificate; keyCertSign and cRLSign for a CA only."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(common_name: str, *, days: int = 365) -> KeyPair:
    """A self-signed CA certificate (basicConstraints CA:true, keyCertSign)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(certificate=cert, private_key=key)


def _san(name: str) -> x509.GeneralName:
    """An IP literal becomes an IPAddress SAN (hostname checks need that), anything else a DNSName."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_serving_cert(
    ca: KeyPair,
    dns_names: Sequence[str],
    *,
    days: int = 90,
    serial: int | None = None,
) -> KeyPair:
    """A leaf certificate for a TLS server: SANs = dns_names, EKU serverAuth, signed by `ca`."""
    if not dns_names:
        raise ValueError("a serving certificate needs at least one DNS name")
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in dns_names]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )
    return KeyPair(certificate=cert, private_key=key)
