"""The iptables backend's rule text: render one ``iptables-restore`` batch, parse ``iptables-save``. Pure.

WHY pure: what the kernel should hold, whether it drifted and which batch line failed are decisions;
keeping them free of subprocesses lets them be tested without root, and keeps the shell
(``redirector.iptables``) down to "save, decide, restore".

Shape (per family, ``nat`` table), the way kube-proxy lays out KUBE-SERVICES:

    -A PREROUTING -m comment --comment "lightpath redirects" -j LIGHTPATH          (first rule)
    -A OUTPUT -m comment --comment "lightpath redirects" -j LIGHTPATH-OUTPUT       (first rule)
    -A LIGHTPATH-OUTPUT -m owner --uid-owner UID -j RETURN      (only with a proxy UID)
    -A LIGHTPATH-OUTPUT -j LIGHTPATH
    -A LIGHTPATH -m mark --mark 0x1666 -j RETURN                (only with a proxy mark)
    -A LIGHTPATH -d IP/32 -p tcp -m tcp --dport P -j DNAT --to-destination 169.254.16.66:1666
    -A LIGHTPATH -p tcp -m addrtype --dst-type LOCAL -m tcp --dport NODEPORT -j DNAT --to-destination 169.254.16.66:1666

IPv6 DNATs to ``[<address6>]:1666``. The DNAT targets are node-local addresses of ours on lo
(``redirector.localaddr``); with ``mode="redirect"`` the target is ``-j REDIRECT --to-ports 1666``, which drops
pod traffic arriving on an interface without an address (see ``redirector.nftshape``). Reading back accepts
either target to the proxy, so a mode switch adopts the keys and the next ``ensure`` rewrites the chain.

The owner match is only valid in OUTPUT/POSTROUTING (the kernel rejects it in any chain reachable from
PREROUTING), hence the separate OUTPUT chain in front of the shared one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from redirector.localaddr import redirect_target
from redirector.model import Family, Key
from shared import constants as c
from shared.constants import DEFAULT_IPTABLES_CHAIN, DEFAULT_PROXY_MARK, DEFAULT_PROXY_PORT

JUMP_COMMENT = "lightpath redirects"
MAX_CHAIN_NAME = 28  # XT_EXTENSION_MAXNAMELEN - 1
_CHAIN_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_COMMENT = re.compile(r' -m comment --comment (?:"(?:[^"\\]|\\.)*"|\S+)')
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9._:/@-]")
_LINE_NO = re.compile(r"\bline:? (\d+)")
_REDIRECT = re.compile(
    r"^(?:-d (?P<ip>[0-9A-Fa-f.:]+)/(?P<plen>\d+) -p tcp|-p tcp -m addrtype --dst-type LOCAL)"
    r" -m tcp --dport (?P<port>\d+) -j (?:REDIRECT --to-ports (?P<to>\d+)"
    r"|DNAT --to-destination (?:(?P<addr4>[0-9.]+)|\[(?P<addr6>[0-9A-Fa-f:]+)\]):(?P<dnat_to>\d+))$"
)
TO_PROXY_TARGETS = ("REDIRECT", "DNAT")


class To(NamedTuple):
    """Where one of our rules sends a packet: ``address`` None is REDIRECT (to the incoming interface)."""

    address: str | None
    port: int


@dataclass(frozen=True)
class RuleConfig:
    """What the rules depend on besides the keys."""

    chain: str = DEFAULT_IPTABLES_CHAIN
    proxy_port: int = DEFAULT_PROXY_PORT
    proxy_mark: int | None = DEFAULT_PROXY_MARK
    proxy_uid: int | None = None
    mode: str = c.DEFAULT_REDIRECT_MODE
    address4: str = c.DEFAULT_REDIRECT_ADDRESS
    address6: str = c.DEFAULT_REDIRECT_ADDRESS6

    def __post_init__(self) -> None:
        # Canonical text, so our specs compare equal to what iptables-save prints back.
        address4, address6 = redirect_target(self.mode, self.address4, self.address6)
        object.__setattr__(self, "address4", address4)
        object.__setattr__(self, "address6", address6)
        if not _CHAIN_NAME.match(self.chain) or len(self.output_chain) > MAX_CHAIN_NAME:
            raise ValueError(
                f"chain {self.chain!r}: letters, digits, '_' and '-' only, at most "
                f"{MAX_CHAIN_NAME - len('-OUTPUT')} characters"
            )
        if not 0 < self.proxy_port < 65536:
            raise ValueError(f"proxy_port {self.proxy_port} out of range")
        if self.proxy_mark is not None and not 0 < self.proxy_mark <= 0xFFFFFFFF:
            raise ValueError(f"proxy_mark {self.proxy_mark:#x} out of range")
        if self.proxy_uid is not None and self.proxy_uid < 0:
            raise ValueError(f"proxy_uid {self.proxy_uid} is negative")

    @property
    def output_chain(self) -> str:
        return f"{self.chain}-OUTPUT"

    @property
    def chains(self) -> tuple[str, str]:
        """Our chains, in the order they are declared (and deleted in reverse)."""
        return (self.chain, self.output_chain)

    @property
    def hooks(self) -> dict[str, str]:
        """Built-in chain -> the chain of ours it jumps to first."""
        return {"PREROUTING": self.chain, "OUTPUT": self.output_chain}

    def address(self, family: Family) -> str:
        """The DNAT target of ``family`` (kept on lo by the backend in "dnat" mode)."""
        return self.address4 if family == 4 else self.address6

    def jump(self, family: Family) -> str:
        """The target of every rule sending ``family`` to the proxy, printed as ``iptables-save`` prints it."""
        if self.mode == "redirect":
            return f"-j REDIRECT --to-ports {self.proxy_port}"
        host = self.address4 if family == 4 else f"[{self.address6}]"
        return f"-j DNAT --to-destination {host}:{self.proxy_port}"

    def reaches_proxy(self, family: Family, to: To) -> bool:
        """Does a rule with target ``to`` deliver to our proxy? (REDIRECT or DNAT to our address, either mode.)"""
        return to.port == self.proxy_port and to.address in (None, self.address(family))


@dataclass
class SavedNat:
    """One table (``nat`` unless asked otherwise) as ``iptables-save`` printed it: declared chains and rule specs."""

    chains: set[str] = field(default_factory=set)
    rules: dict[str, list[str]] = field(default_factory=dict)  # chain -> specs (text after "-A CHAIN ")


def normalise_key(key: Key) -> Key | None:
    """The key with its address in canonical form, or None when it cannot be a redirect."""
    if not 0 < key.port < 65536 or key.family not in (4, 6):
        return None
    if key.ip is None:
        return key
    try:
        addr = ipaddress.ip_address(key.ip)
    except ValueError:
        return None
    if addr.version != key.family:
        return None
    return Key(key.family, addr.compressed, key.port)


def sort_key(key: Key) -> tuple[bool, int, int]:
    """Deterministic rule order: addresses numerically, NodePorts last (like KUBE-NODEPORTS)."""
    return (key.ip is None, int(ipaddress.ip_address(key.ip)) if key.ip else 0, key.port)


def comment_text(text: str) -> str:
    """A comment iptables accepts verbatim: no quotes or spaces, at most 255 bytes."""
    return _COMMENT_UNSAFE.sub("_", text)[:255]


def jump_spec(target: str) -> str:
    return f'-m comment --comment "{JUMP_COMMENT}" -j {target}'


def redirect_spec(key: Key, cfg: RuleConfig, comment: str | None = None) -> str:
    """One rule spec sending ``key`` to the proxy (DNAT or REDIRECT per ``cfg.mode``), printed exactly as
    ``iptables-save`` prints it back."""
    if key.ip is None:
        match = f"-p tcp -m addrtype --dst-type LOCAL -m tcp --dport {key.port}"
    else:
        match = f"-d {key.ip}/{32 if key.family == 4 else 128} -p tcp -m tcp --dport {key.port}"
    note = f' -m comment --comment "{comment_text(comment)}"' if comment else ""
    return f"{match}{note} {cfg.jump(key.family)}"


def redirect_specs(cfg: RuleConfig, keys: Iterable[Key], comments: Mapping[Key, str]) -> dict[Key, str]:
    """Each (normalised) key's spec, in rule order."""
    return {k: redirect_spec(k, cfg, comments.get(k)) for k in sorted(keys, key=sort_key)}


def chain_rules(cfg: RuleConfig, redirects: Iterable[str]) -> dict[str, list[str]]:
    """The full contents of our chains: proxy RETURNs first, then the ``redirects`` specs."""
    services: list[str] = []
    if cfg.proxy_mark is not None:
        services.append(f"-m mark --mark {cfg.proxy_mark:#x} -j RETURN")
    services += redirects
    output: list[str] = []
    if cfg.proxy_uid is not None:
        output.append(f"-m owner --uid-owner {cfg.proxy_uid} -j RETURN")
    output.append(f"-j {cfg.chain}")
    return {cfg.chain: services, cfg.output_chain: output}


def patch_batch(chain: str, add: Iterable[str], delete: Iterable[str]) -> str:
    """A batch that only deletes/appends REDIRECT rules (no chain declared, so nothing is flushed).

    ``delete`` specs must be exactly as the kernel holds them (comments included) or the batch fails.
    """
    lines = ["*nat", *(f"-D {chain} {spec}" for spec in delete), *(f"-A {chain} {spec}" for spec in add)]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def render_batch(chains: Mapping[str, list[str]], fixes: Iterable[str] = ()) -> str:
    """One ``iptables-restore --noflush`` batch: declaring a chain flushes only that chain."""
    lines = ["*nat"]
    lines += [f":{name} - [0:0]" for name in chains]
    lines += [f"-A {name} {spec}" for name, specs in chains.items() for spec in specs]
    lines += list(fixes)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def parse_save(text: str, table: str = "nat") -> SavedNat:
    """Parse the ``*<table>`` section of ``iptables-save`` output (comments and other tables ignored). Also
    the kube-proxy stand-in's parser (``sandbox.kubeproxy_iptables``), for its nat and filter tables."""
    saved, inside = SavedNat(), False
    for line in text.splitlines():
        if line.startswith("*"):
            inside = line == f"*{table}"
        elif not inside:
            continue
        elif line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            saved.chains.add(name)
            saved.rules.setdefault(name, [])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            saved.rules.setdefault(chain, []).append(spec)
    return saved


def without_comments(spec: str) -> str:
    """A spec with its comment matches removed: comments are labels, not behaviour."""
    return _COMMENT.sub("", " " + spec).strip()


def target(spec: str) -> str | None:
    """The chain or target a rule jumps/goes to."""
    words = without_comments(spec).split()
    for flag in ("-j", "-g"):
        if flag in words[:-1]:
            return words[words.index(flag) + 1]
    return None


def parse_redirect(spec: str, family: Family) -> tuple[Key, To] | None:
    """(key, where it goes) of a rule in our exact REDIRECT or DNAT shape, else None."""
    m = _REDIRECT.match(without_comments(spec))
    if m is None:
        return None
    ip = m["ip"]
    if ip is not None and int(m["plen"]) != (32 if family == 4 else 128):
        return None
    key = Key(family, ip, int(m["port"]))
    if m["to"] is not None:
        return key, To(None, int(m["to"]))
    address = m["addr4"] if family == 4 else m["addr6"]
    return (key, To(address, int(m["dnat_to"]))) if address is not None else None


def saved_rules(saved: SavedNat, cfg: RuleConfig, family: Family) -> dict[Key, str]:
    """Key -> the exact spec (comment included) of each rule our chain sends to the proxy."""
    found = {}
    for spec in saved.rules.get(cfg.chain, []):
        parsed = parse_redirect(spec, family)
        if parsed is not None and cfg.reaches_proxy(family, parsed[1]):
            found[parsed[0]] = spec
    return found


def saved_keys(saved: SavedNat, cfg: RuleConfig, family: Family) -> frozenset[Key]:
    """Keys our chain redirects to the proxy port."""
    return frozenset(saved_rules(saved, cfg, family))


def chains_differ(saved: SavedNat, expected: Mapping[str, list[str]]) -> bool:
    """True when a chain of ours is missing or its rules differ (comments aside) from ``expected``.

    The leading RETURN rules must match in order; the REDIRECT/DNAT rules after them are compared as a
    multiset, because incremental appends land at the end and their order changes nothing.
    """
    for name, specs in expected.items():
        if name not in saved.chains:
            return True
        have = [without_comments(s) for s in saved.rules.get(name, [])]
        want = [without_comments(s) for s in specs]
        head = next((i for i, s in enumerate(want) if target(s) in TO_PROXY_TARGETS), len(want))
        if len(have) != len(want) or have[:head] != want[:head] or sorted(have[head:]) != sorted(want[head:]):
            return True
    return False


def jump_fixes(saved: SavedNat, cfg: RuleConfig) -> list[str]:
    """Batch lines that leave exactly one jump of ours per hook, inserted first when (re)added.

    A single correct jump is left where it is, even if another owner later inserted rules above it:
    moving it back would fight that owner on every resync (kube-proxy's EnsureRule behaves the same).
    """
    fixes: list[str] = []
    for hook, chain in cfg.hooks.items():
        jumps = [spec for spec in saved.rules.get(hook, []) if target(spec) == chain]
        if [without_comments(j) for j in jumps] == [without_comments(jump_spec(chain))]:
            continue
        fixes += [f"-D {hook} {spec}" for spec in jumps]
        fixes.append(f"-I {hook} 1 {jump_spec(chain)}")
    return fixes


def jump_positions(saved: SavedNat, cfg: RuleConfig) -> dict[str, list[int]]:
    """1-based positions of our jumps in each hook (for describe: ``[1]`` is the healthy shape)."""
    return {
        hook: [i for i, spec in enumerate(saved.rules.get(hook, []), 1) if target(spec) == chain]
        for hook, chain in cfg.hooks.items()
    }


def cleanup_batch(saved: SavedNat, cfg: RuleConfig) -> str | None:
    """A batch removing every reference to our chains, then the chains; None when nothing is ours."""
    ours = set(cfg.chains)
    fixes = [
        f"-D {chain} {spec}"
        for chain, specs in saved.rules.items()
        if chain not in ours
        for spec in specs
        if target(spec) in ours
    ]
    present = [name for name in cfg.chains if name in saved.chains]
    if not fixes and not present:
        return None
    # Declaring flushes our chains (so no reference between them remains), then delete them.
    fixes += [f"-X {name}" for name in reversed(present)]
    return render_batch({name: [] for name in present}, fixes)


def failing_line(batch: str, stderr: str) -> tuple[int, str] | None:
    """Map iptables-restore's "line N" ("Error occurred at line: N", "line N failed") to batch text."""
    m = _LINE_NO.search(stderr)
    if m is None:
        return None
    number = int(m[1])
    lines = batch.splitlines()
    return (number, lines[number - 1]) if 0 < number <= len(lines) else (number, "")
