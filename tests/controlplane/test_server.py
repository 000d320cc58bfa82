"""server: the optional TCP listener is loopback only."""

from __future__ import annotations

import pytest

from controlplane.server import check_loopback


@pytest.mark.parametrize("address", ["127.0.0.1:18000", "[::1]:18000", "127.0.0.2:18000"])
def test_loopback_addresses_are_accepted(address: str) -> None:
    check_loopback(address)


@pytest.mark.parametrize("address", ["0.0.0.0:18000", "[::]:18000", "10.0.0.5:18000", "192.168.1.1:18000",
                                     "[fd00::1]:18000"])
def test_routable_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="not loopback"):
        check_loopback(address)


@pytest.mark.parametrize("address", ["localhost:18000", "xds.example:18000", "", "18000"])
def test_names_and_garbage_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="loopback IP:port"):
        check_loopback(address)
