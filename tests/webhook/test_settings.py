"""Flags over env over defaults; a bad value stops start-up with exit status 2 and says why."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared import constants as c
from webhook.settings import Settings, parse_settings


def test_defaults() -> None:
    s = parse_settings([], {})
    assert s == Settings()
    assert s.port == c.WEBHOOK_PORT and s.mode == c.MODE_OPT_IN and s.proxy_name == c.DEFAULT_PROXY_NAME
    assert s.excluded_namespaces == frozenset(c.DEFAULT_EXCLUDED_NAMESPACES)
    assert s.kubeconfig is None and s.cert_reload_interval == 2.0


def test_env_then_flags_win() -> None:
    env = {"LIGHTPATH_MODE": "opt-out", "LIGHTPATH_PORT": "9443", "LIGHTPATH_EXCLUDED_NAMESPACES": "a, b,,",
           "LIGHTPATH_TLS_CERT_FILE": "/x/tls.crt", "LIGHTPATH_LOG_LEVEL": "debug"}
    s = parse_settings(["--port", "10443", "--kubeconfig", "/k/config", "--cert-reload-interval", "0.5"], env)
    assert s.mode == "opt-out" and s.port == 10443 and s.excluded_namespaces == frozenset({"a", "b"})
    assert s.tls_cert_file == Path("/x/tls.crt") and s.log_level == "DEBUG"
    assert s.kubeconfig == Path("/k/config") and s.cert_reload_interval == 0.5
    assert s.policy().mode == "opt-out"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--mode", "sometimes"], {}, "mode must be one of opt-in, opt-out"),
        ([], {"LIGHTPATH_MODE": "sometimes"}, "mode must be one of"),
        (["--port", "0"], {}, "--port='0': must be between 1 and 65535"),
        ([], {"LIGHTPATH_PORT": "https"}, "LIGHTPATH_PORT='https': must be an integer"),
        (["--log-level", "LOUD"], {}, "must be one of DEBUG, INFO, WARNING, ERROR"),
        (["--cert-reload-interval", "-1"], {}, "must be a positive number of seconds"),
        (["--cert-reload-interval", "nan"], {}, "must be a positive number of seconds"),
        (["--proxy-name", ""], {}, "proxy name must be a non-empty label value"),
        (["--no-such-flag"], {}, "unrecognized arguments"),
    ],
)
def test_bad_values_exit_2_with_a_clear_message(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings(argv, env)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_console_script_help_documents_every_flag_and_env() -> None:
    out = subprocess.run([sys.executable, "-m", "webhook", "--help"], capture_output=True, text=True, check=True).stdout
    documented = [("--proxy-name", "PROXY_NAME"), ("--mode", "MODE"), ("--excluded-namespaces", "EXCLUDED_NAMESPACES"),
                  ("--tls-cert-file", "TLS_CERT_FILE"), ("--tls-key-file", "TLS_KEY_FILE"),
                  ("--bind-address", "BIND_ADDRESS"), ("--port", "PORT"), ("--log-level", "LOG_LEVEL"),
                  ("--kubeconfig", "KUBECONFIG"), ("--cert-reload-interval", "CERT_RELOAD_INTERVAL"),
                  ("--handover", "HANDOVER"), ("--handover-timeout", "HANDOVER_TIMEOUT"),
                  ("--agent-namespace", "AGENT_NAMESPACE"), ("--pod-name", "POD_NAME")]
    for flag, env in documented:
        assert flag in out and f"LIGHTPATH_{env}" in out
    # No flag without its env variable: every flag the help shows is one of the pairs above.
    assert set(re.findall(r"--[a-z][a-z-]*", out)) - {"--help"} == {flag for flag, _ in documented}
    assert "in-cluster, else $KUBECONFIG or ~/.kube/config" in " ".join(out.split())


def test_handover_flags_parse_and_refuse_bad_values() -> None:
    from webhook.settings import parse_settings

    assert parse_settings(["--handover", "off", "--handover-timeout", "5"], {}).handover is False
    assert parse_settings([], {"LIGHTPATH_HANDOVER": "on"}).handover is True
    proc = subprocess.run([sys.executable, "-m", "webhook", "--handover", "maybe"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--handover='maybe': must be on or off" in proc.stderr


def test_bad_flag_exits_2_from_the_command_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "webhook", "--mode", "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "mode must be one of" in proc.stderr
