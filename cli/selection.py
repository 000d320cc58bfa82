"""Which Services or Namespaces a command is about (pure).

WHY checked before anything is written: a typo in one name must not leave the cluster half-changed,
so every name is resolved against the listed objects first and all unknown names are reported at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cli.rows import Ref, ref_of
from shared.errors import CliError


class SelectionError(CliError, ValueError):
    """Bad or unknown names on the command line; nothing has been changed."""


@dataclass(frozen=True)
class Selection:
    """What the user typed: SERVICE… (name or namespace/name), -n NS, -A."""

    names: tuple[str, ...] = ()
    namespace: str | None = None
    all_namespaces: bool = False
    default_namespace: str = "default"

    def validate(self, *, require_explicit: bool) -> None:
        if self.all_namespaces and (self.names or self.namespace):
            raise SelectionError("-A/--all-namespaces cannot be combined with names or -n/--namespace")
        if require_explicit and not (self.names or self.namespace or self.all_namespaces):
            raise SelectionError("say what to change: SERVICE… (name or namespace/name), -n NAMESPACE or -A")

    def refs(self) -> list[Ref]:
        """The named Services as refs: "ns/name", or "name" in -n NS (else the context's namespace)."""
        out = []
        for raw in self.names:
            if raw.count("/") > 1 or raw.startswith("/") or raw.endswith("/"):
                raise SelectionError(f"bad Service name {raw!r}: use NAME or NAMESPACE/NAME")
            if "/" in raw:
                ns, name = raw.split("/")
                if self.namespace and ns != self.namespace:
                    raise SelectionError(f"{raw!r} is not in namespace {self.namespace!r} given with -n")
                out.append(Ref(ns, name))
            else:
                out.append(Ref(self.namespace or self.default_namespace, raw))
        return out

    def scope(self) -> set[str] | None:
        """Namespaces whose Services must be listed (None: all of them, one cluster-wide list)."""
        if self.all_namespaces:
            return None
        if self.names:
            return {r.namespace for r in self.refs()}
        return {self.namespace or self.default_namespace}

    def namespace_names(self) -> list[str]:
        """With --namespace-label the positional names are Namespaces (plus -n)."""
        names = list(dict.fromkeys([*self.names, *([self.namespace] if self.namespace else [])]))
        for n in names:
            if "/" in n:
                raise SelectionError(f"bad namespace name {n!r} (with --namespace-label, name Namespaces)")
        return names


def check_namespaces(wanted: Iterable[str], existing: Iterable[str]) -> None:
    known = set(existing)
    missing = sorted(set(wanted) - known)
    if missing:
        noun = "namespace" if len(missing) == 1 else "namespaces"
        raise SelectionError(f"{noun} not found: {', '.join(missing)}")


def select_services(
    selection: Selection, services: Sequence[Mapping[str, Any]], namespaces: Iterable[str]
) -> list[Mapping[str, Any]]:
    """The Services the selection names, in a stable order; raises SelectionError listing every unknown name."""
    namespaces = set(namespaces)
    scope = selection.scope()
    by_ref = {ref_of(s): s for s in services}
    if selection.names:
        refs = list(dict.fromkeys(selection.refs()))
        missing = [r for r in refs if r not in by_ref]
        if missing:
            noun = "Service" if len(missing) == 1 else "Services"
            gone = sorted({r.namespace for r in missing} - namespaces)
            why = f" (no namespace {', '.join(gone)})" if gone else ""
            raise SelectionError(f"{noun} not found: {', '.join(map(str, missing))}{why}")
        return [by_ref[r] for r in refs]
    if scope is not None:
        check_namespaces(scope, namespaces)
    chosen = [s for r, s in by_ref.items() if scope is None or r.namespace in scope]
    chosen.sort(key=ref_of)
    return chosen


def select_namespaces(selection: Selection, namespaces: Iterable[str]) -> list[str]:
    """Namespaces for --namespace-label: the named ones (all must exist) or, with -A, every one."""
    existing = sorted(set(namespaces))
    if selection.all_namespaces:
        return existing
    names = selection.namespace_names()
    check_namespaces(names, existing)
    return names
