"""Pick the kernel backend named in the settings (imported lazily: a node without libnftables can still
run the iptables backend, and the other way round)."""

from __future__ import annotations

from typing import cast

from redirector.config import Settings
from redirector.model import Backend


def make_backend(settings: Settings) -> Backend:
    if settings.backend == "nftables":
        from redirector.nft import NftBackend

        return NftBackend(table=settings.nft_table, proxy_port=settings.proxy_port,
                          proxy_mark=settings.proxy_mark, proxy_uid=settings.proxy_uid,
                          mode=settings.redirect_mode, address4=settings.redirect_address,
                          address6=settings.redirect_address6)
    if settings.backend == "iptables":
        from redirector.iptables import IptablesBackend, Variant  # type: ignore[import-not-found,unused-ignore]

        backend: Backend = IptablesBackend(chain=settings.iptables_chain, proxy_port=settings.proxy_port,
                                           proxy_mark=settings.proxy_mark, proxy_uid=settings.proxy_uid,
                                           variant=cast(Variant, settings.iptables_variant),
                                           mode=settings.redirect_mode, address4=settings.redirect_address,
                                           address6=settings.redirect_address6)
        return backend
    raise ValueError(f"unknown backend {settings.backend!r}")
