"""Names on the command line are resolved before anything is written; every unknown name is reported."""

from __future__ import annotations

import pytest

from cli.rows import ref_of
from cli.selection import Selection, SelectionError, select_namespaces, select_services
from tests.cli.cluster import service

SERVICES = [service("web", "shop"), service("api", "shop"), service("dns", "infra")]
NAMESPACES = ["shop", "infra", "empty"]


def _names(selected) -> list[str]:
    return [str(ref_of(s)) for s in selected]


def test_names_bare_and_qualified() -> None:
    sel = Selection(names=("web", "infra/dns"), default_namespace="shop")
    assert _names(select_services(sel, SERVICES, NAMESPACES)) == ["shop/web", "infra/dns"]
    assert sel.scope() == {"shop", "infra"}


def test_bare_names_use_dash_n() -> None:
    sel = Selection(names=("dns",), namespace="infra")
    assert _names(select_services(sel, SERVICES, NAMESPACES)) == ["infra/dns"]


def test_namespace_and_all() -> None:
    assert _names(select_services(Selection(namespace="shop"), SERVICES, NAMESPACES)) == [
        "shop/api",
        "shop/web",
    ]
    everything = select_services(Selection(all_namespaces=True), SERVICES, NAMESPACES)
    assert (
        _names(everything) == ["infra/dns", "shop/api", "shop/web"]
        and Selection(all_namespaces=True).scope() is None
    )
    assert select_services(Selection(namespace="empty"), SERVICES, NAMESPACES) == []


def test_every_unknown_service_is_reported_at_once() -> None:
    sel = Selection(names=("web", "nope", "infra/gone"), default_namespace="shop")
    with pytest.raises(SelectionError, match=r"Services not found: shop/nope, infra/gone"):
        select_services(sel, SERVICES, NAMESPACES)


def test_unknown_namespace() -> None:
    with pytest.raises(SelectionError, match="namespace not found: ghost"):
        select_services(Selection(namespace="ghost"), SERVICES, NAMESPACES)
    with pytest.raises(SelectionError, match=r"Service not found: ghost/web \(no namespace ghost\)"):
        select_services(Selection(names=("ghost/web",)), SERVICES, NAMESPACES)


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        (Selection(names=("web",), all_namespaces=True), "cannot be combined"),
        (Selection(), "say what to change"),
    ],
)
def test_validate(selection: Selection, message: str) -> None:
    with pytest.raises(SelectionError, match=message):
        selection.validate(require_explicit=True)


@pytest.mark.parametrize("bad", ["a/b/c", "/web", "shop/"])
def test_bad_names(bad: str) -> None:
    with pytest.raises(SelectionError, match="bad Service name"):
        Selection(names=(bad,)).refs()


def test_qualified_name_must_match_dash_n() -> None:
    with pytest.raises(SelectionError, match="not in namespace"):
        Selection(names=("infra/dns",), namespace="shop").refs()


def test_namespace_mode_names() -> None:
    assert select_namespaces(Selection(names=("shop",), namespace="infra"), NAMESPACES) == ["shop", "infra"]
    assert select_namespaces(Selection(all_namespaces=True), NAMESPACES) == ["empty", "infra", "shop"]
    with pytest.raises(SelectionError, match="namespaces not found: a, b"):
        select_namespaces(Selection(names=("a", "b")), NAMESPACES)
