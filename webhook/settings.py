"""The webhook's configuration: one typed object, from flags, then ``LIGHTPATH_*`` env, then defaults.

Every value is validated while parsing, so a bad flag or env value stops the process at start-up
with a clear message and exit status 2 (argparse's usage-error convention), never at the first
admission request.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shared import constants as c
from shared.policy import PolicyConfig

ENV_PREFIX = "LIGHTPATH_"
DEFAULT_CERT_FILE = "/etc/lightpath/tls/tls.crt"
DEFAULT_KEY_FILE = "/etc/lightpath/tls/tls.key"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Settings:
    """Everything the webhook process needs to know."""

    proxy_name: str = c.DEFAULT_PROXY_NAME
    mode: str = c.DEFAULT_MODE
    excluded_namespaces: frozenset[str] = field(default_factory=lambda: frozenset(c.DEFAULT_EXCLUDED_NAMESPACES))
    tls_cert_file: Path = Path(DEFAULT_CERT_FILE)
    tls_key_file: Path = Path(DEFAULT_KEY_FILE)
    bind_address: str = "0.0.0.0"
    port: int = c.WEBHOOK_PORT
    log_level: str = "INFO"
    kubeconfig: Path | None = None  # None: in-cluster configuration
    cert_reload_interval: float = 2.0
    # Make-before-break migration of Services that become wanted on UPDATE (docs/migration.md): the webhook
    # marks them and its leader-elected handover controller labels them once every live agent prepared them.
    handover: bool = True
    handover_timeout: float = 60.0
    agent_namespace: str = c.DEFAULT_AGENT_NAMESPACE
    pod_name: str = ""  # the leader-election identity (the Downward API's metadata.name); "" = the hostname

    def policy(self) -> PolicyConfig:
        return PolicyConfig(self.proxy_name, self.mode, self.excluded_namespaces)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("must be an integer port number") from None
    if not 1 <= value <= 65535:
        raise ValueError("must be between 1 and 65535")
    return value


def _level(text: str) -> str:
    value = text.upper()
    if value not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return value


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError("must be on or off")
    return text == "on"


def _namespaces(text: str) -> frozenset[str]:
    return frozenset(n.strip() for n in text.split(",") if n.strip())


# (flag, env suffix, field, converter, help)
_OPTIONS: tuple[tuple[str, str, str, object, str], ...] = (
    ("--proxy-name", "PROXY_NAME", "proxy_name", str,
     "value of service.kubernetes.io/service-proxy-name that hands a Service to the proxy"),
    ("--mode", "MODE", "mode", str, f"global mode: {' or '.join(c.MODES)} (Service and Namespace labels win)"),
    ("--excluded-namespaces", "EXCLUDED_NAMESPACES", "excluded_namespaces", _namespaces,
     "comma-separated namespaces never touched"),
    ("--tls-cert-file", "TLS_CERT_FILE", "tls_cert_file", Path, "serving certificate (PEM), e.g. tls.crt of a cert-manager Secret"),
    ("--tls-key-file", "TLS_KEY_FILE", "tls_key_file", Path, "serving private key (PEM)"),
    ("--bind-address", "BIND_ADDRESS", "bind_address", str, "address to listen on"),
    ("--port", "PORT", "port", _port, "HTTPS port"),
    ("--log-level", "LOG_LEVEL", "log_level", _level, f"one of {', '.join(LOG_LEVELS)}"),
    ("--kubeconfig", "KUBECONFIG", "kubeconfig", Path, "kubeconfig file"),
    ("--cert-reload-interval", "CERT_RELOAD_INTERVAL", "cert_reload_interval", _positive_float,
     "seconds between checks of the certificate files for a rotated pair"),
    ("--handover", "HANDOVER", "handover", _on_off,
     "on: a Service that becomes wanted on UPDATE is marked, and the leader-elected handover controller labels "
     "it once every live node agent prepared it (make-before-break); off: labelled at once"),
    ("--handover-timeout", "HANDOVER_TIMEOUT", "handover_timeout", _positive_float,
     "seconds the controller waits for every live node agent before it aborts a handover (removes the mark)"),
    ("--agent-namespace", "AGENT_NAMESPACE", "agent_namespace", str,
     "where the node agents' Leases are, and the controller's leader-election Lease"),
    ("--pod-name", "POD_NAME", "pod_name", str, "this replica's name, its leader-election identity"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightpath-webhook",
        description="Mutating admission webhook that hands eligible all-TCP Services to the lightpath proxy.",
        epilog="Every flag can also be set by the environment variable shown; a flag wins over the environment.",
    )
    defaults = Settings()
    for flag, env, name, _conv, help_text in _OPTIONS:
        default = getattr(defaults, name)
        if isinstance(default, bool):
            default = "on" if default else "off"
        elif default == "":  # pod name
            default = "the hostname"
        elif isinstance(default, frozenset):
            default = ",".join(sorted(default))
        elif default is None:  # kubeconfig: the lookup of webhook.__main__.kube_client
            default = "in-cluster, else $KUBECONFIG or ~/.kube/config"
        parser.add_argument(flag, dest=name, metavar=env, default=None,
                            help=f"{help_text} [env {ENV_PREFIX}{env}] (default: {default})")
    return parser


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags over env over defaults; exits with status 2 and a clear message on a bad value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for flag, env_name, name, conv, _help in _OPTIONS:
        raw, source = getattr(args, name), flag
        if raw is None and f"{ENV_PREFIX}{env_name}" in env:
            raw, source = env[f"{ENV_PREFIX}{env_name}"], f"{ENV_PREFIX}{env_name}"
        if raw is None:
            continue
        try:
            values[name] = conv(raw)  # type: ignore[operator]
        except ValueError as exc:
            parser.error(f"{source}={raw!r}: {exc}")
    settings = Settings(**values)  # type: ignore[arg-type]
    try:
        settings.policy()
    except ValueError as exc:
        parser.error(str(exc))
    return settings
