"""What kube-proxy serves on this node, read from the kernel (never written): the handback check.

When a Service is handed back (its handoff label removed), kube-proxy programs it again within its
minSyncPeriod; the agent keeps its own redirect -- which hooks before kube-proxy's DNAT and shadows it --
until kube-proxy's rule for the key is visible here, so no packet meets a node that serves the Service
with neither (make-before-break). Read:

- nftables mode: tables ``ip kube-proxy`` / ``ip6 kube-proxy``, verdict maps ``service-ips``
  (``ip . tcp . port``) and ``service-nodeports`` (``tcp . port``);
- iptables mode: ``iptables-save -t nat`` / ``ip6tables-save``, chains ``KUBE-SERVICES`` (``-d ip/32 -p tcp
  --dport port``) and ``KUBE-NODEPORTS`` (``-p tcp --dport port``).

``None`` means "cannot tell" (neither mode's rules are readable here): the agent then holds for a bounded time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

from redirector.model import Family, Key
from redirector.service_fields import parse_ip

_NFT_ADDRESS = re.compile(r"([0-9A-Fa-f:.]+) \. tcp \. (\d+) :")
_NFT_NODEPORT = re.compile(r"(?<!\. )(?<![\w.])tcp \. (\d+) :")  # "tcp . port", not "ip . tcp . port"
_IPT_SERVICE = re.compile(r"^-A KUBE-SERVICES .*-d ([0-9A-Fa-f:.]+)/(?:32|128) .*-p tcp .*--dport (\d+)", re.M)
_IPT_NODEPORT = re.compile(r"^-A KUBE-NODEPORTS .*-p tcp .*--dport (\d+)", re.M)


def parse_nft_maps(family: Family, service_ips: str, service_nodeports: str) -> frozenset[Key]:
    """Keys in kube-proxy's nftables maps (their ``nft list map`` text). Pure."""
    keys: set[Key] = set()
    for ip, port in _NFT_ADDRESS.findall(service_ips):
        parsed = parse_ip(ip)
        if parsed is not None and parsed[0] == family:
            keys.add(Key(family, parsed[1], int(port)))
    keys.update(Key(family, None, int(port)) for port in _NFT_NODEPORT.findall(service_nodeports))
    return frozenset(keys)


def parse_iptables_save(family: Family, text: str) -> frozenset[Key]:
    """Keys in kube-proxy's iptables-mode nat rules (``iptables-save -t nat`` text). Pure."""
    keys: set[Key] = set()
    for ip, port in _IPT_SERVICE.findall(text):
        parsed = parse_ip(ip)
        if parsed is not None and parsed[0] == family:
            keys.add(Key(family, parsed[1], int(port)))
    keys.update(Key(family, None, int(port)) for port in _IPT_NODEPORT.findall(text))
    return frozenset(keys)


class KubeProxyRules:
    """Reads kube-proxy's rules in the current network namespace (libnftables, else iptables-save)."""

    def __init__(self) -> None:
        self._nft: Any = None

    def _nft_list(self, what: str) -> str | None:
        try:
            if self._nft is None:
                import nftables  # type: ignore[import-untyped,unused-ignore]

                self._nft = nftables.Nftables()
            rc, out, _err = self._nft.cmd(f"list {what}")
        except Exception:  # noqa: BLE001 - no libnftables here: try iptables
            return None
        return str(out) if rc == 0 else None

    def read(self) -> frozenset[Key] | None:
        keys: set[Key] = set()
        found = False
        for family, table in ((4, "ip"), (6, "ip6")):
            ips = self._nft_list(f"map {table} kube-proxy service-ips")
            if ips is None:
                continue
            found = True
            nodeports = self._nft_list(f"map {table} kube-proxy service-nodeports") or ""
            keys |= parse_nft_maps(family, ips, nodeports)  # type: ignore[arg-type]
        if found:
            return frozenset(keys)
        for family, tool in ((4, "iptables-save"), (6, "ip6tables-save")):
            binary = shutil.which(tool)
            if binary is None:
                continue
            try:
                text = subprocess.run([binary, "-t", "nat"], capture_output=True, text=True, timeout=10,
                                      check=True).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            if "KUBE-SERVICES" in text:
                found = True
                keys |= parse_iptables_save(family, text)  # type: ignore[arg-type]
        return frozenset(keys) if found else None
