"""The exception hierarchy: one base for everything lightpath raises on purpose, one below it per package.

WHY: a caller (or a test) can catch "any lightpath error" or "any redirector error" without listing
classes, and no two classes share a name. Classes that used to derive from a builtin (``ValueError``,
``RuntimeError``, ``AssertionError``) keep it as a second base, so every existing ``except`` still matches.
"""

from __future__ import annotations


class LightpathError(Exception):
    """Base of every exception lightpath defines."""


class SharedError(LightpathError):
    """Raised by ``shared/`` (e.g. ``shared.kube.KubeError``)."""


class RedirectorError(LightpathError):
    """Raised by the node agent (``redirector/``): backends, netlink, the debug server."""


class WebhookError(LightpathError):
    """Raised by the admission webhook (``webhook/``)."""


class CliError(LightpathError):
    """Raised by the ``lightpath`` CLI (``cli/``): the message is meant for the user."""


class ControlPlaneError(LightpathError):
    """Raised by the Envoy control plane (``controlplane/``)."""


class SandboxError(LightpathError):
    """Raised by the test double (``sandbox/``)."""
