"""iptables backend: the redirects as REDIRECT rules in a ``nat`` chain of ours, written like kube-proxy.

WHY this shape: for nodes where nftables cannot be used. Every sync is ONE ``iptables-restore
--noflush -w`` batch per family (atomic per table; declaring our chain flushes only our chain), so
the kernel never holds half a change, and ``-w`` honours the xtables lock other writers (kube-proxy,
CNI plugins) take. ``variant`` picks the binaries, so the same code drives iptables-nft and
iptables-legacy hosts. The rule text and every decision live in ``redirector.iptables_rules``;
this module only runs ``*-save`` / ``*-restore``. python-iptables is not used: it only sees the
legacy tables (see docs/redirector.md, "iptables backend"). In "dnat" mode (the default) it also owns
the DNAT targets on lo (``redirector.localaddr``): added before any rule points at them, removed after.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterable, Sequence
from typing import Literal

from redirector import iptables_rules as rules
from redirector.localaddr import LoopbackAddresses
from redirector.model import BackendError, Delta, Family, Key
from shared import constants as c
from shared.constants import DEFAULT_IPTABLES_CHAIN, DEFAULT_PROXY_MARK, DEFAULT_PROXY_PORT

Variant = Literal["auto", "nft", "legacy"]
log = logging.getLogger("lightpath.redirector.iptables")

_TOOL = {4: "iptables", 6: "ip6tables"}


class IptablesError(BackendError):
    """A ``*-restore``/``*-save`` run failed; carries the failing batch line when iptables named one.

    A ``BackendError`` like every other kernel read/write failure (the agent treats them all alike)."""

    def __init__(
        self, argv: Sequence[str], returncode: int, stderr: str, line_no: int | None = None, line: str = ""
    ) -> None:
        self.argv, self.returncode, self.stderr = list(argv), returncode, stderr
        self.line_no, self.line = line_no, line
        where = f" at batch line {line_no}: {line!r}" if line_no is not None else ""
        super().__init__(f"{' '.join(self.argv)} exited {returncode}{where}: {stderr.strip()}")


def binaries(variant: Variant, family: Family) -> tuple[str, str]:
    """(restore, save) for a variant: "auto" is whatever the host's ``iptables`` alternative is."""
    tool = _TOOL[family]
    infix = "" if variant == "auto" else f"-{variant}"
    return f"{tool}{infix}-restore", f"{tool}{infix}-save"


class IptablesBackend:
    """The ``Backend`` protocol on iptables (see ``redirector.model.Backend``)."""

    name = "iptables"

    def __init__(
        self,
        *,
        proxy_port: int = DEFAULT_PROXY_PORT,
        proxy_mark: int | None = DEFAULT_PROXY_MARK,
        proxy_uid: int | None = None,
        chain: str = DEFAULT_IPTABLES_CHAIN,
        variant: Variant = "auto",
        lock_path: str = "/run/xtables.lock",
        lock_wait: int = 5,
        families: Iterable[Family] = (4, 6),
        netns: str | None = None,
        timeout: float = 120.0,
        mode: str = c.DEFAULT_REDIRECT_MODE,
        address4: str = c.DEFAULT_REDIRECT_ADDRESS,
        address6: str = c.DEFAULT_REDIRECT_ADDRESS6,
    ) -> None:
        """``netns`` runs the binaries inside /run/netns/<name> (tests, benchmarks); None = our own netns.

        ``families`` lets a node with IPv6 disabled run without ip6tables. ``lock_wait`` is the
        ``-w`` seconds; the legacy binaries poll the lock every 100 ms like kube-proxy (``-W``).
        """
        if variant not in ("auto", "nft", "legacy"):
            raise ValueError(f"variant must be auto, nft or legacy, not {variant!r}")
        self.cfg = rules.RuleConfig(chain=chain, proxy_port=proxy_port, proxy_mark=proxy_mark, proxy_uid=proxy_uid,
                                    mode=mode, address4=address4, address6=address6)
        self.variant: Variant = variant
        self.lock_path, self.lock_wait, self.timeout = lock_path, lock_wait, timeout
        self.families: tuple[Family, ...] = tuple(sorted(set(families)))
        self.netns = netns
        self.addresses = LoopbackAddresses([(f, self.cfg.address(f)) for f in self.families], netns=netns)
        self._prefix = ["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []
        # What the kernel holds as far as we know (key -> exact rule spec); None = ask the kernel.
        self._written: dict[Family, dict[Key, str]] | None = None

    # -- Backend protocol ---------------------------------------------------------------------

    last_seen: frozenset[Key] | None = None  # the keys the last ``ensure`` found (the Backend contract)

    def ensure(self, keys: Iterable[Key]) -> bool:
        """Converge to exactly ``keys``: rewrite a family's chains only when they differ. True = repaired.

        Our REDIRECT rules carry no owner comment (``/debug/rules`` names each key's owner from the desired
        state); comments found in the kernel (an older agent wrote them) are labels, never drift.
        """
        wanted = self._by_family(keys)
        repaired, written = False, {}
        self.last_seen = None
        seen: set[Key] = set()
        self._written = None  # memory is either right or absent: a failure below leaves it absent
        if self.cfg.mode == "dnat":  # the targets first: no rule ever points at an address we lack
            added = self.addresses.ensure()
            if added:
                log.info("redirect addresses added to lo", extra={"addresses": added})
                repaired = True
        for family in self.families:
            saved = rules.parse_save(self.save(family))
            seen |= rules.saved_rules(saved, self.cfg, family).keys()
            specs = rules.redirect_specs(self.cfg, wanted[family], {})
            expected = rules.chain_rules(self.cfg, specs.values())
            fixes = rules.jump_fixes(saved, self.cfg)
            if fixes or rules.chains_differ(saved, expected):
                log.info(
                    "iptables repair",
                    extra={"family": family, "jump_fixes": len(fixes), "entries": len(specs)},
                )
                self.restore_batch(family, rules.render_batch(expected, fixes))
                repaired = True
                written[family] = specs
            else:
                written[family] = rules.saved_rules(saved, self.cfg, family)
        self._written = written
        self.last_seen = frozenset(seen)
        return repaired

    def apply(self, delta: Delta) -> None:
        """Add/delete keys with one patch batch per touched family (``-D``/``-A`` of those rules only).

        The patch trusts what this backend last wrote or read. If the kernel disagrees (a hand edit, a
        missing chain) the family's batch fails atomically and ``IptablesError`` is raised: no repair here
        (the Backend contract, ``redirector.model.Backend``), so the agent counts the failure and its full
        sync (``ensure``) counts the drift it repairs. Figures: docs/redirector.md.
        """
        written = self._written if self._written is not None else self._read_written()
        self._written = None  # until every batch below went through
        add, delete = self._by_family(delta.add), self._by_family(delta.delete)
        result = dict(written)
        for family in self.families:
            current = written[family]
            gone = [current[k] for k in sorted(delete[family] & current.keys(), key=rules.sort_key)]
            new = rules.redirect_specs(self.cfg, add[family] - current.keys() - delete[family], {})
            if not gone and not new:
                continue
            self.restore_batch(family, rules.patch_batch(self.cfg.chain, new.values(), gone))  # raises: memory stays None
            result[family] = {k: v for k, v in current.items() if k not in delete[family]} | new
        self._written = result

    def read(self) -> frozenset[Key]:
        """The keys our chains redirect to the proxy port, parsed from ``iptables-save``."""
        return frozenset().union(*(specs.keys() for specs in self._read_written().values()))

    def describe(self) -> dict[str, object]:
        rules_text: dict[str, list[str]] = {}
        jumps: dict[str, dict[str, list[int]]] = {}
        for family in self.families:
            saved = rules.parse_save(self.save(family))
            rules_text[f"ipv{family}"] = [
                f"-A {chain} {spec}" for chain in self.cfg.chains for spec in saved.rules.get(chain, [])
            ]
            jumps[f"ipv{family}"] = rules.jump_positions(saved, self.cfg)
        return {
            "backend": self.name,
            "variant": self.variant,
            "binaries": {f"ipv{f}": list(binaries(self.variant, f)) for f in self.families},
            "table": "nat",
            "chains": list(self.cfg.chains),
            "hooks": self.cfg.hooks,
            "jump_positions": jumps,
            "proxy_port": self.cfg.proxy_port,
            "proxy_mark": None if self.cfg.proxy_mark is None else f"{self.cfg.proxy_mark:#x}",
            "proxy_uid": self.cfg.proxy_uid,
            "redirect_mode": self.cfg.mode,
            "redirect_to": {f"ipv{f}": self.cfg.jump(f) for f in self.families},
            "rules": rules_text,
        }

    def cleanup(self) -> None:
        """Remove every jump to our chains and the chains themselves; others' rules stay."""
        for family in self.families:
            batch = rules.cleanup_batch(rules.parse_save(self.save(family)), self.cfg)
            if batch is not None:
                self.restore_batch(family, batch)
        self._written = None
        removed = self.addresses.remove()  # after the rules: never a DNAT to an address that is gone
        if removed:
            log.info("redirect addresses removed from lo", extra={"addresses": removed})

    # -- the imperative shell --------------------------------------------------------------------

    def save(self, family: Family) -> str:
        """``iptables-save -t nat`` (or ip6tables-save) output."""
        argv = [*self._prefix, binaries(self.variant, family)[1], "-t", "nat"]
        proc = self._run(argv, None)
        if proc.returncode != 0:
            raise IptablesError(argv, proc.returncode, proc.stderr)
        return proc.stdout

    def restore_batch(self, family: Family, batch: str) -> None:
        """Run one ``*-restore --noflush -w`` batch; a failure names the batch line iptables rejected."""
        argv = [*self._prefix, binaries(self.variant, family)[0], "--noflush", "-w", str(self.lock_wait)]
        if self.variant == "legacy":
            argv += ["-W", "100000"]  # poll the lock every 100 ms, not every second
        proc = self._run(argv, batch)
        if proc.returncode != 0:
            where = rules.failing_line(batch, proc.stderr)
            raise IptablesError(argv, proc.returncode, proc.stderr, *(where or (None, "")))

    def _run(self, argv: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "XTABLES_LOCKFILE": self.lock_path}
        try:
            return subprocess.run(
                argv, input=stdin, capture_output=True, text=True, env=env, timeout=self.timeout, check=False
            )
        except FileNotFoundError as exc:
            raise IptablesError(argv, 127, f"{exc.filename} not found (variant {self.variant!r})") from exc

    def _read_written(self) -> dict[Family, dict[Key, str]]:
        """Per family, key -> rule spec exactly as the kernel holds it."""
        return {f: rules.saved_rules(rules.parse_save(self.save(f)), self.cfg, f) for f in self.families}

    def _by_family(self, keys: Iterable[Key]) -> dict[Family, frozenset[Key]]:
        """Normalised keys split per family; invalid ones are logged and skipped, never half-written."""
        out: dict[Family, set[Key]] = {f: set() for f in self.families}
        for key in keys:
            norm = rules.normalise_key(key)
            if norm is None or norm.family not in out:
                log.error("iptables: skipping a key it cannot program", extra={"key": repr(key)})
                continue
            out[norm.family].add(norm)
        return {f: frozenset(v) for f, v in out.items()}
