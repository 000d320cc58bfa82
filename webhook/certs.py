"""The serving certificate: load, validate, and hot-swap a rotated pair without a restart.

uvicorn has no certificate reload and builds one SSLContext at start-up. We hand it a context whose
SNI callback (run by OpenSSL for every ClientHello, with or without SNI) points the new connection at
the *current* context. A rotation builds a complete new context off to the side and swaps a single
reference, so a handshake never sees a half-loaded pair; established connections keep the context
they negotiated with and are not disturbed.

Like cert-manager's file source and controller-runtime's certwatcher we poll (kubelet swaps a
``..data`` symlink; inotify on mounted Secrets is unreliable), compare bytes, and swap only a valid
pair: a broken one is refused, logged and counted, and the old pair keeps serving.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shared.errors import WebhookError

log = logging.getLogger("lightpath.webhook.certs")


class CertificateError(WebhookError, ValueError):
    """The pair cannot serve: unreadable, mismatched, expired, or refused by OpenSSL."""


@dataclass(frozen=True)
class ServingPair:
    """A validated pair and the SSLContext built from it."""

    cert_pem: bytes
    key_pem: bytes
    serial: int
    not_after: dt.datetime
    context: ssl.SSLContext


def new_server_context() -> ssl.SSLContext:
    """TLS 1.2+ server context speaking HTTP/1.1 (what kube-apiserver falls back to without h2)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def validate_pair(cert_pem: bytes, key_pem: bytes, now: dt.datetime) -> x509.Certificate:
    """The leaf certificate, if ``key_pem`` is its key and it has not expired at ``now``."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise CertificateError(f"certificate does not parse: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"private key does not parse: {exc}") from None
    leaf = chain[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise CertificateError("certificate does not match the private key")
    if leaf.not_valid_after_utc <= now:
        raise CertificateError(f"certificate expired at {leaf.not_valid_after_utc.isoformat()}")
    return leaf


def build_pair(cert_pem: bytes, key_pem: bytes, now: dt.datetime) -> ServingPair:
    """Validate and load into a fresh SSLContext (OpenSSL loads from files only: a private temp file)."""
    leaf = validate_pair(cert_pem, key_pem, now)
    ctx = new_server_context()
    tmpdir = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # keep key material off disk
    fd, path = tempfile.mkstemp(prefix="lightpath-webhook-", suffix=".pem", dir=tmpdir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem.rstrip(b"\n") + b"\n" + cert_pem)
        ctx.load_cert_chain(path)
    except ssl.SSLError as exc:
        raise CertificateError(f"OpenSSL refused the pair: {exc}") from None
    finally:
        os.unlink(path)
    return ServingPair(cert_pem, key_pem, leaf.serial_number, leaf.not_valid_after_utc, ctx)


def read_pair(cert_file: Path, key_file: Path) -> tuple[bytes, bytes]:
    """Both files from one generation: re-read when the certificate changed while reading the key."""
    for _ in range(5):
        cert = cert_file.read_bytes()
        key = key_file.read_bytes()
        if cert_file.read_bytes() == cert:
            return cert, key
    raise CertificateError("certificate files keep changing while being read")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertStore:
    """The live serving pair, the SSLContext uvicorn serves with, and the poller that rotates it."""

    def __init__(self, cert_file: Path, key_file: Path, *, reload_interval: float = 2.0) -> None:
        if reload_interval <= 0:
            raise ValueError("reload_interval must be positive")
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.reload_interval = reload_interval
        self.reload_successes = 0
        self.reload_failures = 0
        self.last_error: str | None = None
        self._current: ServingPair | None = None
        self._refused: tuple[bytes, bytes] | None = None
        self._base: ssl.SSLContext | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- state -------------------------------------------------------------------------------
    @property
    def current(self) -> ServingPair:
        if self._current is None:
            raise RuntimeError("no certificate loaded yet: call load() first")
        return self._current

    @property
    def loaded(self) -> bool:
        return self._current is not None

    def ready(self, now: dt.datetime | None = None) -> bool:
        """A pair is loaded and still valid."""
        return self._current is not None and self._current.not_after > (now or _utcnow())

    @property
    def server_context(self) -> ssl.SSLContext:
        """The context to give uvicorn, once: every new handshake is redirected to the current pair."""
        if self._base is None:
            self._base = self.current.context
            self._base.sni_callback = self._select
        return self._base

    def _select(self, sslobj: ssl.SSLObject, server_name: str | None, base: ssl.SSLContext) -> None:
        current = self._current
        if current is not None and current.context is not base:
            sslobj.context = current.context

    # -- loading -----------------------------------------------------------------------------
    def load(self) -> ServingPair:
        """The initial load: raises CertificateError (start-up fails) instead of serving nothing."""
        try:
            cert, key = read_pair(self.cert_file, self.key_file)
        except OSError as exc:
            raise CertificateError(f"cannot read {self.cert_file} / {self.key_file}: {exc}") from None
        self._current = build_pair(cert, key, _utcnow())
        log.info("serving certificate loaded", extra=self._describe(self._current))
        return self._current

    def check(self) -> bool:
        """One poll: swap in a changed, valid pair. True when swapped."""
        try:
            cert, key = read_pair(self.cert_file, self.key_file)
        except (OSError, CertificateError) as exc:
            self._refuse((b"unreadable", str(exc).encode()), f"cannot read the pair: {exc}")
            return False
        current = self.current
        if (cert, key) == (current.cert_pem, current.key_pem) or (cert, key) == self._refused:
            return False
        try:
            pair = build_pair(cert, key, _utcnow())
        except CertificateError as exc:
            self._refuse((cert, key), str(exc))
            return False
        self._current = pair  # the one reference new handshakes read
        self._refused = None
        self.last_error = None
        self.reload_successes += 1
        log.info("serving certificate reloaded", extra=self._describe(pair))
        return True

    def _refuse(self, fingerprint: tuple[bytes, bytes], message: str) -> None:
        if fingerprint == self._refused:
            return  # counted and logged once per broken pair, not once per poll
        self._refused = fingerprint
        self.last_error = message
        self.reload_failures += 1
        log.error("new certificate pair refused; the old one keeps serving",
                  extra={"error": message, "serial": self.current.serial})

    @staticmethod
    def _describe(pair: ServingPair) -> dict[str, object]:
        return {"serial": f"{pair.serial:x}", "not_after": pair.not_after.isoformat()}

    # -- poller ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="cert-reloader", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _poll(self) -> None:
        while not self._stop.wait(self.reload_interval):
            try:
                self.check()
            except Exception:  # the poller must outlive any surprise
                log.exception("certificate check failed")
