"""iptables through `iptables-restore --noflush` transactions, and `iptables-save` for names.

Rules are never read back for comparison (iptables normalises them, Calico's lesson); only
chain names, how many rules each of our chains holds, and our jumps in the built-in chains are
read. A rule count that differs from what was written is how drift is told (a chain someone
flushed, or whose rules someone added or deleted) without comparing rule text. The backend of the node (nf_tables
or legacy) is detected as upstream's iptables-wrapper does, because writing to the other one
would leave two disagreeing rulesets in the kernel.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kproxy.errors import BackendError
from kproxy.model import IPFamily

if TYPE_CHECKING:
    from kproxy.backends.protocols import IptablesBackend

# How long to wait for the xtables lock that other agents (kubelet, CNI plugins) also take.
LOCK_WAIT_SECONDS = 10
# Chains kubelet creates to tell which backend the node uses.
HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
OWN_PREFIX = "KPROXY-"
_FAILED_LINE = re.compile(r"line:? (\d+) failed|Error occurred at line: (\d+)")


def _run(argv: list[str], stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise BackendError(f"{argv[0]} is not installed", argv=tuple(argv)) from e
    except subprocess.TimeoutExpired as e:
        raise BackendError(f"{argv[0]} did not finish in {timeout}s", argv=tuple(argv)) from e


def restore_timeout(text: str) -> float:
    """How long one transaction may take before it counts as hung: 2 minutes, plus 1 s per 1,000
    lines. iptables-nft needs minutes for a first sync of 10,000 Services (462,000 lines); a
    fixed bound killed that sync every time, and every retry with it (the kernel keeps the old
    rules when a restore is killed, so waiting longer loses nothing)."""
    return 120.0 + text.count("\n") / 1000


def _binary(family: IPFamily, variant: str, tool: str) -> str:
    base = "iptables" if family is IPFamily.V4 else "ip6tables"
    suffix = f"-{tool}" if tool else ""
    return f"{base}-{variant}{suffix}"


def detect_variant() -> str:
    """'nft' or 'legacy': the iptables backend this node already uses.

    As upstream's iptables-wrapper: kubelet's hint chains decide if present; else whichever
    backend holds more rules; a tie (a fresh node) goes to nft, the distributions' default.
    """
    counts = {}
    for variant in ("nft", "legacy"):
        text = ""
        for family in IPFamily:
            save = _binary(family, variant, "save")
            if shutil.which(save) is None:
                continue
            text += _run([save], timeout=30).stdout
        if any(f":{hint} " in text for hint in HINT_CHAINS):
            return variant
        counts[variant] = sum(1 for line in text.splitlines() if line.startswith("-"))
    if not counts:
        raise BackendError("neither iptables-nft nor iptables-legacy is installed")
    return "legacy" if counts.get("legacy", 0) > counts.get("nft", 0) else "nft"


@dataclass(frozen=True)
class SavedState:
    chains: dict[str, set[str]]
    # (built-in chain, our target) of every jump already in the built-in chains, per table.
    jumps: dict[str, set[tuple[str, str]]]
    # The full text of rules in built-in chains that jump to an owned chain, per table (for cleanup).
    jump_rules: dict[str, list[str]]
    # How many rules each owned chain holds, per table (an empty chain is absent).
    rule_counts: dict[str, dict[str, int]] = field(default_factory=dict)


class Iptables:
    """One family of one iptables backend."""

    def __init__(self, family: IPFamily, variant: str) -> None:
        self.family = family
        self.variant = variant

    @property
    def restore_cmd(self) -> list[str]:
        return [_binary(self.family, self.variant, "restore"), "--noflush", "--counters", "-w", str(LOCK_WAIT_SECONDS)]

    def available(self) -> bool:
        return shutil.which(_binary(self.family, self.variant, "restore")) is not None

    def save(
        self, tables: tuple[str, ...] = ("filter", "nat"), prefixes: tuple[str, ...] = (OWN_PREFIX,)
    ) -> SavedState:
        chains: dict[str, set[str]] = {}
        jumps: dict[str, set[tuple[str, str]]] = {}
        jump_rules: dict[str, list[str]] = {}
        rule_counts: dict[str, dict[str, int]] = {}
        for table in tables:
            argv = [_binary(self.family, self.variant, "save"), "-t", table]
            res = _run(argv)
            if res.returncode != 0:
                # A table that was never used does not exist yet on the legacy backend.
                if "does not exist" in res.stderr or "Table does not exist" in res.stderr:
                    chains[table], jumps[table], jump_rules[table], rule_counts[table] = set(), set(), [], {}
                    continue
                raise BackendError(
                    "reading iptables failed", argv=tuple(argv), returncode=res.returncode, stderr=res.stderr
                )
            names: set[str] = set()
            found: set[tuple[str, str]] = set()
            rules: list[str] = []
            counts: dict[str, int] = {}
            for line in res.stdout.splitlines():
                if line.startswith(":"):
                    names.add(line[1:].split(" ", 1)[0])
                elif line.startswith("-A "):
                    chain = line.split(" ", 2)[1]
                    if chain.startswith(prefixes):
                        counts[chain] = counts.get(chain, 0) + 1
                        continue
                    if "-j " not in line:
                        continue
                    target = line.rsplit("-j ", 1)[1].split(" ", 1)[0]
                    if target.startswith(prefixes):
                        found.add((chain, target))
                        rules.append(line)
            chains[table], jumps[table], jump_rules[table], rule_counts[table] = names, found, rules, counts
        return SavedState(chains, jumps, jump_rules, rule_counts)

    def restore(self, text: str) -> None:
        """Apply one transaction; on failure the kernel keeps what it had."""
        if not text:
            return
        argv = self.restore_cmd
        res = _run(argv, stdin=text, timeout=restore_timeout(text))
        if res.returncode != 0:
            raise BackendError(
                "iptables-restore refused the transaction; the previous rules stay in place",
                argv=tuple(argv),
                returncode=res.returncode,
                stderr=res.stderr,
                context=failing_context(text, res.stderr),
            )


def failing_context(text: str, stderr: str, around: int = 3) -> str:
    """The numbered input lines around the line iptables-restore names in its error."""
    m = _FAILED_LINE.search(stderr)
    if not m:
        return ""
    n = int(m.group(1) or m.group(2))
    lines = text.splitlines()
    lo, hi = max(1, n - around), min(len(lines), n + around)
    return "\n".join(f"{'>' if i == n else ' '}{i:6d}  {lines[i - 1]}" for i in range(lo, hi + 1))


def cleanup_text(saved: SavedState, owned: Callable[[str], bool]) -> str:
    """Restore input removing our jumps from built-in chains, then every owned chain."""
    out: list[str] = []
    for table, chains in saved.chains.items():
        mine = sorted(c for c in chains if owned(c))
        jumps = [r for r in saved.jump_rules.get(table, []) if owned(r.rsplit("-j ", 1)[1].split(" ", 1)[0])]
        if not mine and not jumps:
            continue
        out.append(f"*{table}")
        out.extend(f":{c} - [0:0]" for c in mine)
        out.extend("-D " + r[len("-A ") :] for r in jumps)
        out.extend(f"-X {c}" for c in mine)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


# ----------------------------------------------------------------------------------------------
# The canary: how `kproxy run` notices that someone flushed or deleted its chains (a firewall
# reload, `iptables -F; iptables -X`), as upstream's KUBE-PROXY-CANARY. The chain is referenced
# by nothing; it holds one inert rule so that a flush (-F) is detected as well as a delete (-X).

CANARY_CHAIN = "KPROXY-PROXY-CANARY"
CANARY_TABLES = ("mangle", "nat", "filter")
# iptables' exit status when the chain does not exist; 2 is a bad argument, 4 a resource problem.
_NO_SUCH_CHAIN = 1


def ensure_canary(ipt: IptablesBackend) -> None:
    """Create (or reset) the canary chain with its rule in mangle, nat and filter: one transaction."""
    rule = f"-A {CANARY_CHAIN} -j RETURN"
    ipt.restore("".join(f"*{t}\n:{CANARY_CHAIN} - [0:0]\n{rule}\nCOMMIT\n" for t in CANARY_TABLES))


def canary_intact(ipt: IptablesBackend) -> bool:
    """Whether the canary chain and its rule are still there in all three tables."""
    for table in CANARY_TABLES:
        binary = _binary(ipt.family, ipt.variant, "")
        argv = [binary, "-w", str(LOCK_WAIT_SECONDS), "-t", table, "-S", CANARY_CHAIN]
        res = _run(argv, timeout=30)
        if res.returncode == _NO_SUCH_CHAIN:
            return False
        if res.returncode != 0:
            raise BackendError(
                "checking the canary chain failed",
                argv=tuple(argv),
                returncode=res.returncode,
                stderr=res.stderr,
            )
        if f"-A {CANARY_CHAIN} " not in res.stdout:
            return False
    return True
