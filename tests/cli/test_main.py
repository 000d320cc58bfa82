"""The command line itself: --help with examples everywhere, kubectl-style global flags, exit codes."""

from __future__ import annotations

import pytest

from cli.commands import policy_config
from cli.main import build_parser, main
from shared import constants as c

COMMANDS = ["status", "plan", "migrate", "rollback", "reconcile"]


@pytest.mark.parametrize("argv", [[], *[[cmd] for cmd in COMMANDS]])
def test_help_everywhere_with_examples(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "lightpath " in out and "--kubeconfig" in out and "--context" in out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_global_flags_before_or_after_the_command() -> None:
    parser = build_parser()
    before = parser.parse_args(["--context", "prod", "--mode", "opt-out", "status", "-A"])
    after = parser.parse_args(["status", "-A", "--context", "prod", "--mode", "opt-out"])
    for args in (before, after):
        assert args.context == "prod" and args.mode == "opt-out" and args.all_namespaces
    defaults = parser.parse_args(["status"])
    assert defaults.kubeconfig is None and defaults.proxy_name == c.DEFAULT_PROXY_NAME
    config = policy_config(defaults)
    assert config.excluded_namespaces == frozenset(c.DEFAULT_EXCLUDED_NAMESPACES)
    assert (
        policy_config(parser.parse_args(["status", "--excluded-namespaces", ""])).excluded_namespaces
        == frozenset()
    )


def test_bad_flags_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["migrate", "-A", "--batch", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["status", "--mode", "sometimes"])
    assert "invalid choice" in capsys.readouterr().err


def test_missing_selection_fails_before_connecting(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    kubeconfig = tmp_path / "nowhere.yaml"  # not even read: selection is checked first
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    assert main(["--kubeconfig", str(kubeconfig), "migrate"]) == 2
    assert "say what to change" in capsys.readouterr().err
    assert main(["--kubeconfig", str(kubeconfig), "--proxy-name", "", "status"]) == 2
    assert "proxy name" in capsys.readouterr().err


def test_unreadable_kubeconfig_is_a_clear_error(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--kubeconfig", str(tmp_path / "missing"), "status"]) == 1
    assert "cannot load kubeconfig" in capsys.readouterr().err
