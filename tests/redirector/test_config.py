"""The command line: typed settings from flags and env, clear errors with exit 2, version, cleanup."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from redirector import config
from redirector.__main__ import build_parser, main
from sandbox.node.netns import NetNS, nft

BINARY = Path(sys.executable).parent / "lightpath-redirector"


def parse(argv: list[str], env: dict[str, str] | None = None) -> config.Settings:
    args = build_parser().parse_args(["run", *argv])
    return config.settings_from(args, env or {})


def test_defaults_match_the_shared_constants() -> None:
    s = parse([])
    assert (s.backend, s.proxy_port, s.proxy_name, s.proxy_mark, s.proxy_uid) == (
        "nftables", 1666, "lightpath.cloud", 0x1666, None)
    assert (s.debug_address, s.debug_port, s.nft_table, s.iptables_chain) == ("127.0.0.1", 10666, "lightpath", "LIGHTPATH")
    assert (s.health_address, s.health_port) == ("127.0.0.1", 10667)
    assert s.resync_period == 30.0 and s.kubeconfig is None
    assert (s.redirect_mode, s.redirect_address, s.redirect_address6) == ("dnat", "169.254.16.66", "fd6c:7066:1666::1")


def test_redirect_mode_and_addresses_from_flags_and_env() -> None:
    s = parse(["--redirect-mode", "REDIRECT"], {"LIGHTPATH_REDIRECT_ADDRESS6": "FD00:0::66",
                                                "LIGHTPATH_REDIRECT_ADDRESS": "169.254.99.1"})
    assert (s.redirect_mode, s.redirect_address, s.redirect_address6) == ("redirect", "169.254.99.1", "fd00::66")
    assert parse([], {"LIGHTPATH_REDIRECT_MODE": "dnat"}).redirect_mode == "dnat"


def test_flags_win_over_env_which_wins_over_defaults() -> None:
    env = {"LIGHTPATH_PROXY_PORT": "15001", "LIGHTPATH_BACKEND": "iptables", "LIGHTPATH_PROXY_MARK": "0x10",
           "LIGHTPATH_RESYNC_PERIOD": "5"}
    s = parse(["--proxy-port", "15006", "--proxy-uid", "1337"], env)
    assert (s.proxy_port, s.backend, s.proxy_mark, s.proxy_uid, s.resync_period) == (15006, "iptables", 16, 1337, 5.0)
    assert parse(["--proxy-mark", "none", "--proxy-uid", "0"]).proxy_mark is None


@pytest.mark.parametrize(
    ("argv", "env", "culprit"),
    [
        (["--proxy-port", "0"], {}, "--proxy-port"),
        (["--backend", "ebpf"], {}, "--backend"),
        (["--iptables-variant", "xtables"], {}, "--iptables-variant"),
        (["--resync-period", "-1"], {}, "--resync-period"),
        ([], {"LIGHTPATH_PROXY_UID": "root"}, "LIGHTPATH_PROXY_UID"),
        (["--proxy-mark", "none"], {}, "proxy-mark"),  # nothing would stop the proxy's own traffic looping
        (["--proxy-name", "has space"], {}, "--proxy-name"),
        (["--debug-port", "10249"], {}, "collides with kube-proxy"),
        (["--debug-port", "1777", "--proxy-port", "1777"], {}, "collides with the proxy port"),
        (["--debug-address", "localhost"], {}, "must be an IP address"),
        (["--health-port", "0"], {}, "--health-port"),  # always on: no "off" value
        (["--health-port", "10256"], {}, "health port 10256 collides with kube-proxy healthz"),
        ([], {"LIGHTPATH_HEALTH_PORT": "1666"}, "health port 1666 collides with the proxy"),
        (["--debug-port", "10667"], {}, "collides with --health-port"),
        (["--health-address", "localhost"], {}, "health address must be an IP address"),
        (["--redirect-mode", "tproxy"], {}, "--redirect-mode"),
        (["--redirect-address", "127.0.0.1"], {}, "route_localnet=1"),  # the CVE-2020-8558 class of problem
        (["--redirect-address", "fd00::1"], {}, "not an IPv4 address"),
        ([], {"LIGHTPATH_REDIRECT_ADDRESS6": "::1"}, "LIGHTPATH_REDIRECT_ADDRESS6.*loopback"),
        (["--redirect-address6", "fe80::1"], {}, "link-local"),
    ],
)
def test_bad_values_name_the_culprit(argv: list[str], env: dict[str, str], culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        parse(argv, env)


def test_bad_flags_exit_2_with_a_clear_message() -> None:
    done = subprocess.run([str(BINARY), "run", "--proxy-port", "70000"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--proxy-port='70000': must be between 1 and 65535" in done.stderr
    done = subprocess.run([str(BINARY), "frobnicate"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_debug_subcommand_reports_an_unreachable_agent(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 (discard) on loopback: nothing listens, so the client must say so and fail.
    assert main(["debug", "config", "--debug-port", "9"]) != 0
    assert "cannot reach the debug server at http://127.0.0.1:9/debug/config" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("lightpath-redirector ")


@pytest.mark.parametrize("command", ["run", "cleanup"])
def test_help_lists_every_setting_with_its_env_variable(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare word by word
    for flag, env, *_ in config.OPTIONS:
        assert flag in text and f"LIGHTPATH_{env}" in text
    # Defaults that are lookups are named as such, not shown as an empty value or a half truth.
    assert "default: $NODE_NAME, else the hostname]" in text
    assert "default: in-cluster, else $KUBECONFIG or ~/.kube/config]" in text
    assert "the flag wins over the environment" in text


def test_a_bad_debug_env_value_is_a_usage_error_of_debug_only() -> None:
    env = {**os.environ, "LIGHTPATH_DEBUG_PORT": "abc"}
    done = subprocess.run([str(BINARY), "version"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0 and done.stdout.startswith("lightpath-redirector "), done.stderr
    done = subprocess.run([str(BINARY), "debug", "config"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "argument --debug-port: invalid int value: 'abc'" in done.stderr
    done = subprocess.run([str(BINARY), "run"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "LIGHTPATH_DEBUG_PORT='abc'" in done.stderr


@pytest.mark.root
def test_cleanup_removes_our_table_and_nothing_else() -> None:
    with NetNS(f"lpr-{os.getpid()}-0-cleanup") as ns:
        nft(ns.name, "add table inet lightpath\nadd table inet keepme\nadd table ip nat")
        ns.run(["ip", "addr", "add", "169.254.16.66/32", "dev", "lo", "scope", "host"])
        ns.run(["ip", "addr", "add", "169.254.16.67/32", "dev", "lo"])
        done = ns.run([str(BINARY), "cleanup"], check=False)
        assert done.returncode == 0, done.stderr
        tables = nft(ns.name, "list tables")
        assert "lightpath" not in tables and "keepme" in tables and "table ip nat" in tables
        lo = ns.run(["ip", "-br", "addr", "show", "dev", "lo"]).stdout
        assert "169.254.16.66" not in lo and "169.254.16.67/32" in lo  # our DNAT target only
        assert ns.run([str(BINARY), "cleanup"], check=False).returncode == 0  # idempotent


@pytest.mark.root
def test_cleanup_on_the_iptables_backend_removes_the_redirect_and_the_fallback_chains() -> None:
    from redirector import iptables_rules as rules
    from redirector.iptables import IptablesBackend
    from redirector.iptables_fallback import IptablesFallback
    from redirector.model import Key

    with NetNS(f"lpr-{os.getpid()}-0-iptcleanup") as ns:
        backend = IptablesBackend(netns=ns.name, variant="nft")
        backend.ensure({Key(4, "10.96.0.10", 80)})
        fallback = IptablesFallback(backend)
        assert fallback.write(fallback.render({Key(4, "10.96.0.10", 80): (("10.244.0.10", 8080),)})) is None
        done = ns.run([str(BINARY), "cleanup", "--backend", "iptables", "--iptables-variant", "nft"], check=False)
        assert done.returncode == 0, done.stderr
        for family in (4, 6):
            saved = rules.parse_save(backend.save(family))
            assert not [c for c in saved.chains if c.startswith("LIGHTPATH") or fallback.names.ours(c)], saved.chains
        assert backend.read() == frozenset()


def test_iptables_variant_reaches_the_backend() -> None:
    from redirector.backends import make_backend

    backend = make_backend(parse(["--backend", "iptables", "--iptables-variant", "legacy"]))
    assert backend.describe()["variant"] == "legacy"
    assert backend.describe()["binaries"]["ipv4"] == ["iptables-legacy-restore", "iptables-legacy-save"]


def test_preserve_source_ip_is_off_by_default_and_needs_a_mark_and_a_port_of_its_own() -> None:
    assert parse([]).preserve_source_ip == "off"
    s = parse([], {"LIGHTPATH_PRESERVE_SOURCE_IP": "on", "LIGHTPATH_TRANSPARENT_PORT": "15007"})
    assert (s.preserve_source_ip, s.transparent_port) == ("on", 15007)
    with pytest.raises(ValueError, match="needs --proxy-mark"):
        parse(["--preserve-source-ip", "on", "--proxy-mark", "none", "--proxy-uid", "101"])
    with pytest.raises(ValueError, match="is the proxy port"):
        parse(["--preserve-source-ip", "on", "--transparent-port", "1666"])
    with pytest.raises(ValueError, match="health or debug"):
        parse(["--preserve-source-ip", "on", "--transparent-port", "10667", "--health-port", "10667"])
    with pytest.raises(ValueError, match="transparent listener's replies"):
        parse(["--preserve-source-ip", "on", "--proxy-mark", "0x1667"])
    with pytest.raises(ValueError, match="routed to lo"):
        parse(["--preserve-source-ip", "on", "--proxy-mark", "0xffff"])  # every reply bit: would match the rule
    assert parse(["--preserve-source-ip", "on", "--proxy-mark", "0x2000"]).proxy_mark == 0x2000
