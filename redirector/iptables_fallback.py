"""The kernel L4 fallback on the iptables backend: statistic-mode DNAT chains, laid out like kube-proxy's.

WHY: ``redirector.fallback`` keeps migrated Services alive while the node's Envoy is down; on nftables it
writes a table of its own, here the same decisions become ``nat`` chains, the way kube-proxy's iptables
mode load-balances (KUBE-SVC-* choosing a KUBE-SEP-* with ``-m statistic --mode random --probability
1/n``, 1/(n-1), ..., the last one unconditional). Per family (``iptables`` / ``ip6tables``):

    -A PREROUTING -m comment --comment "lightpath fallback" -j LIGHTPATH-FB     (before our redirect's jump)
    -A OUTPUT     -m comment --comment "lightpath fallback" -j LIGHTPATH-FB
    -A POSTROUTING -m comment --comment "lightpath fallback" -j LIGHTPATH-FBPOST
    -A LIGHTPATH-FB -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j LPFB-xxxx-<key hash>
    -A LIGHTPATH-FB -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 30080 -j LPFB-xxxx-<key hash>N
    -A LPFB-xxxx-<key>N -j MARK --set-xmark 0x20000000/0x20000000                (NodePort: masquerade)
    -A LPFB-xxxx-<key>N -j LPFB-xxxx-<key>
    -A LPFB-xxxx-<key> -m statistic --mode random --probability 0.5000000000 -j LPFB-xxxx-<endpoint hash>
    -A LPFB-xxxx-<key> -j LPFB-xxxx-<endpoint hash>
    -A LPFB-xxxx-<ep> -s 10.244.0.10/32 -j MARK --set-xmark 0x20000000/0x20000000    (hairpin)
    -A LPFB-xxxx-<ep> -p tcp -m tcp -j DNAT --to-destination 10.244.0.10:8080
    -A LIGHTPATH-FBPOST -m mark --mark 0x20000000/0x20000000 -j MASQUERADE

``xxxx`` is a hash of our redirect chain's name, so two agents with different chains in one netns (tests)
never take each other's chains for stale ones. ``render`` is pure (text per family); ``IptablesFallback``
is the shell: it reads ``iptables-save``, adds the lines that delete stale chains of ours and keep our
jumps first, and runs ONE ``iptables-restore --noflush`` batch per family through the backend's own
runner -- atomic per family (IPv4 and IPv6 are two tables; nftables does both in one transaction).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from redirector import iptables_rules as rules
from redirector.fallback import MASQUERADE_MARK, Endpoint
from redirector.iptables import IptablesBackend, IptablesError
from redirector.model import Family, Key

JUMP_COMMENT = "lightpath fallback"
_MARK = f"{MASQUERADE_MARK:#x}/{MASQUERADE_MARK:#x}"
_SEPARATOR = "# lightpath fallback ipv"


def _hash(text: str, size: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size].upper()


@dataclass(frozen=True)
class Names:
    """Our fallback chains' names, derived from the redirect chain's (at most 28 characters each)."""

    chain: str  # the redirect chain (``--iptables-chain``)

    @property
    def dispatch(self) -> str:
        return f"{self.chain}-FB"

    @property
    def post(self) -> str:
        return f"{self.chain}-FBPOST"

    @property
    def prefix(self) -> str:
        """Every per-key and per-endpoint chain starts with this: how stale ones are recognised."""
        return f"LPFB-{_hash(self.chain, 4)}-"

    def key(self, key: Key) -> str:
        return self.prefix + _hash(f"{key.family}/{key.ip}/{key.port}", 16)

    def endpoint(self, key: Key, endpoint: Endpoint) -> str:
        return self.prefix + _hash(f"{key.family}/{key.ip}/{key.port}>{endpoint[0]}:{endpoint[1]}", 16)

    @property
    def hooks(self) -> dict[str, str]:
        return {"PREROUTING": self.dispatch, "OUTPUT": self.dispatch, "POSTROUTING": self.post}

    @property
    def redirect(self) -> dict[str, str]:
        """Hook -> the redirect's chain our jump must come before."""
        return {"PREROUTING": self.chain, "OUTPUT": f"{self.chain}-OUTPUT"}

    def ours(self, chain: str) -> bool:
        return chain in (self.dispatch, self.post) or chain.startswith(self.prefix)


def _probability(remaining: int) -> str:
    return f"{1 / remaining:.10f}"  # kube-proxy's format; iptables-save prints it back with one more digit


def family_chains(names: Names, family: Family, targets: Mapping[Key, tuple[Endpoint, ...]]) -> dict[str, list[str]]:
    """Chain -> rule specs for one family (empty when nothing falls back). Pure."""
    keys = sorted((k for k, eps in targets.items() if eps and k.family == family), key=rules.sort_key)
    if not keys:
        return {}
    plen = 32 if family == 4 else 128
    dispatch: list[str] = []
    chains: dict[str, list[str]] = {names.dispatch: dispatch, names.post: [f"-m mark --mark {_MARK} -j MASQUERADE"]}
    for key in keys:
        service = names.key(key)
        if key.ip is None:
            nodeport = service + "N"
            dispatch.append(f"-p tcp -m addrtype --dst-type LOCAL -m tcp --dport {key.port} -j {nodeport}")
            chains[nodeport] = [f"-j MARK --set-xmark {_MARK}", f"-j {service}"]
        else:
            dispatch.append(f"-d {key.ip}/{plen} -p tcp -m tcp --dport {key.port} -j {service}")
        eps = sorted(set(targets[key]))
        picks: list[str] = []
        for i, endpoint in enumerate(eps):
            chain = names.endpoint(key, endpoint)
            left = len(eps) - i
            picks.append(f"-j {chain}" if left == 1 else
                         f"-m statistic --mode random --probability {_probability(left)} -j {chain}")
            host = endpoint[0] if family == 4 else f"[{endpoint[0]}]"
            chains[chain] = [f"-s {endpoint[0]}/{plen} -j MARK --set-xmark {_MARK}",
                             f"-p tcp -m tcp -j DNAT --to-destination {host}:{endpoint[1]}"]
        chains[service] = picks
    return chains


def render(chain: str, families: tuple[Family, ...], targets: Mapping[Key, tuple[Endpoint, ...]]) -> str:
    """What the kernel should hold, per family, as one text (what the watchdog compares and hands to
    ``IptablesFallback.write``). Pure."""
    names = Names(chain)
    parts = []
    for family in families:
        body = rules.render_batch(family_chains(names, family, targets))
        parts.append(f"{_SEPARATOR}{family}\n{body}")
    return "".join(parts)


def _split(script: str) -> dict[Family, dict[str, list[str]]]:
    """Back from ``render``'s text to chain -> specs per family."""
    out: dict[Family, dict[str, list[str]]] = {}
    for part in script.split(_SEPARATOR)[1:]:
        head, _, body = part.partition("\n")
        family: Family = 4 if head == "4" else 6
        saved = rules.parse_save(body)
        out[family] = {name: saved.rules.get(name, []) for name in saved.chains}
    return out


def batch(names: Names, saved: rules.SavedNat, chains: Mapping[str, list[str]]) -> str | None:
    """One restore batch taking the kernel from ``saved`` to exactly ``chains`` (None: nothing to do). Pure.

    Our jumps stay first in their hooks -- before the redirect's own jump, so the fallback wins while it
    exists; stale chains of ours are flushed (declared) and deleted; with no chains everything of ours goes.
    """
    stale = sorted(name for name in saved.chains if names.ours(name) and name not in chains)
    fixes: list[str] = []
    for hook, target in names.hooks.items():
        specs = saved.rules.get(hook, [])
        jumps = [s for s in specs if rules.target(s) == target]
        redirect = next((i for i, s in enumerate(specs) if rules.target(s) == names.redirect.get(hook)), len(specs))
        fine = len(jumps) == 1 and specs.index(jumps[0]) < redirect and \
            rules.without_comments(jumps[0]) == rules.without_comments(_jump(target))
        if chains and fine:
            continue
        fixes += [f"-D {hook} {spec}" for spec in jumps]
        if chains:
            fixes.append(f"-I {hook} 1 {_jump(target)}")
    if not chains and not stale and not fixes:
        return None  # nothing of ours there (the watchdog itself skips rewriting an unchanged script)
    fixes += [f"-X {name}" for name in stale]
    return rules.render_batch({**dict(chains), **{name: [] for name in stale}}, fixes)


def _jump(target: str) -> str:
    return f'-m comment --comment "{JUMP_COMMENT}" -j {target}'


class IptablesFallback:
    """Runs ``render``'s text against the kernel through an ``IptablesBackend`` (its binaries, variant,
    lock and netns): ``write`` is the watchdog's writer, returning an error text or None."""

    def __init__(self, backend: IptablesBackend) -> None:
        self.backend = backend
        self.names = Names(backend.cfg.chain)

    def render(self, targets: Mapping[Key, tuple[Endpoint, ...]]) -> str:
        return render(self.backend.cfg.chain, self.backend.families, targets)

    def write(self, script: str) -> str | None:
        try:
            self._apply(script)
        except IptablesError as exc:
            return str(exc)
        return None

    def cleanup(self) -> None:
        """Remove every fallback chain and jump of ours (``lightpath-redirector cleanup``); raises on failure."""
        self._apply(self.render({}))

    def _apply(self, script: str) -> None:
        for family, chains in _split(script).items():
            text = batch(self.names, rules.parse_save(self.backend.save(family)), chains)
            if text is not None:
                self.backend.restore_batch(family, text)
