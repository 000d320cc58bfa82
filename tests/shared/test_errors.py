"""Every exception class lightpath defines sits under ``shared.errors.LightpathError``, below its package's
base, and no two share a name (the issue found fourteen unrelated classes, two ``BadRequest``, two ``Gone``)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections import Counter

import pytest

from shared import errors

PACKAGES = {"shared": errors.SharedError, "redirector": errors.RedirectorError, "webhook": errors.WebhookError,
            "cli": errors.CliError, "controlplane": errors.ControlPlaneError, "sandbox": errors.SandboxError}


def _our_exceptions() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            for _name, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


EXCEPTIONS = _our_exceptions()


def test_there_are_exceptions_to_check() -> None:
    assert len(EXCEPTIONS) >= 14


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=lambda e: f"{e.__module__}.{e.__qualname__}")
def test_every_exception_is_under_its_package_base(exc: type[BaseException]) -> None:
    if exc.__module__ == "shared.errors":
        assert issubclass(exc, errors.LightpathError)
        return
    base = PACKAGES[exc.__module__.split(".")[0]]
    assert issubclass(exc, base), f"{exc.__module__}.{exc.__qualname__} should derive from {base.__name__}"


def test_no_two_exceptions_share_a_name() -> None:
    names = Counter(e.__qualname__ for e in EXCEPTIONS)
    assert [n for n, count in names.items() if count > 1] == []


def test_builtin_bases_are_kept() -> None:
    """Re-parenting changed no ``except``: what was a ValueError/RuntimeError still is."""
    from cli.kube import ClusterError
    from cli.selection import SelectionError
    from redirector.debug.pages import BadRequest
    from redirector.iptables import IptablesError
    from redirector.model import BackendError
    from sandbox.scenario import ScenarioError
    from webhook.certs import CertificateError
    from webhook.review import InvalidReview

    for cls, builtin in ((ClusterError, RuntimeError), (SelectionError, ValueError), (BadRequest, ValueError),
                         (BackendError, RuntimeError), (IptablesError, RuntimeError), (ScenarioError, AssertionError),
                         (CertificateError, ValueError), (InvalidReview, ValueError)):
        assert issubclass(cls, builtin), cls
