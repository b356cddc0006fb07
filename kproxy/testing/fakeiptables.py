"""An in-memory iptables for tests of the sync loop: `save` and `restore` as `Iptables` has them.

It keeps chains and their rules per table and applies ``iptables-restore --noflush`` input as the
kernel does: a transaction is all or nothing; declaring a chain (``:NAME - [0:0]``) creates or
flushes it; ``-A``/``-I`` need an existing chain and an existing jump target; ``-X`` refuses a
chain that is still referenced. What the kernel would refuse, it refuses with a BackendError.
Tests can also fail the next transactions on purpose and play the admin who flushes or deletes
chains by hand. Rule text is stored as given (no normalisation): tests compare what kproxy wrote.
"""

from __future__ import annotations

import copy
import threading

from kproxy.backends.iptables import CANARY_CHAIN, CANARY_TABLES, SavedState
from kproxy.errors import BackendError
from kproxy.model import IPFamily

BUILTIN = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
}
BUILTIN_ALL = {c for chains in BUILTIN.values() for c in chains}
_VERDICTS = {"ACCEPT", "DROP", "REJECT", "RETURN", "DNAT", "SNAT", "MASQUERADE", "MARK", "CONNMARK", "LOG"}

Tables = dict[str, dict[str, list[str]]]


class FakeIptables:
    def __init__(self, family: IPFamily = IPFamily.V4, variant: str = "nft") -> None:
        self.family = family
        self.variant = variant
        self._lock = threading.Lock()
        self.tables: Tables = {t: {c: [] for c in chains} for t, chains in BUILTIN.items()}
        self.transactions: list[str] = []
        self._fail_next = 0

    # -- what Iptables offers --------------------------------------------------------------------

    def available(self) -> bool:
        return True

    def save(self, tables: tuple[str, ...] = ("filter", "nat"), prefixes: tuple[str, ...] = ("KPROXY-",)) -> SavedState:
        with self._lock:
            chains: dict[str, set[str]] = {}
            jumps: dict[str, set[tuple[str, str]]] = {}
            jump_rules: dict[str, list[str]] = {}
            rule_counts: dict[str, dict[str, int]] = {}
            for table in tables:
                content = self.tables.get(table, {})
                chains[table] = set(content)
                jumps[table], jump_rules[table] = set(), []
                rule_counts[table] = {c: len(r) for c, r in content.items() if c.startswith(prefixes) and r}
                for chain, rules in content.items():
                    if chain.startswith(prefixes):
                        continue
                    for rule in rules:
                        target = _target(rule)
                        if target and target.startswith(prefixes):
                            jumps[table].add((chain, target))
                            jump_rules[table].append(f"-A {chain} {rule}")
            return SavedState(chains, jumps, jump_rules, rule_counts)

    def restore(self, text: str) -> None:
        with self._lock:
            self.transactions.append(text)
            if self._fail_next:
                self._fail_next -= 1
                raise BackendError("iptables-restore refused the transaction (injected)", returncode=1)
            work = copy.deepcopy(self.tables)
            table: str | None = None
            for n, line in enumerate(text.splitlines(), 1):
                if not line or line.startswith("#"):
                    continue
                if line.startswith("*"):
                    table = line[1:]
                    work.setdefault(table, {c: [] for c in BUILTIN.get(table, ())})
                elif line == "COMMIT":
                    table = None
                elif table is None:
                    raise _refused(n, line, "outside a table")
                else:
                    _apply(work[table], line, n)
            for name, chains in work.items():
                for chain, rules in chains.items():
                    for rule in rules:
                        target = _target(rule)
                        if target and target not in _VERDICTS and target not in chains:
                            raise _refused(0, f"-A {chain} {rule}", f"{name}: no chain {target!r}")
            self.tables = work

    # -- test controls ---------------------------------------------------------------------------

    def fail_next(self, n: int = 1) -> None:
        with self._lock:
            self._fail_next = n

    def flush_and_delete_all(self, table: str) -> None:
        """What `iptables -t TABLE -F; iptables -t TABLE -X` does: every rule, every user chain."""
        with self._lock:
            self.tables[table] = {c: [] for c in BUILTIN[table]}

    def rules(self, table: str, chain: str) -> list[str]:
        with self._lock:
            return list(self.tables.get(table, {}).get(chain, []))

    def chains(self, table: str) -> set[str]:
        with self._lock:
            return set(self.tables.get(table, {}))


def _target(rule: str) -> str:
    return rule.rsplit("-j ", 1)[1].split(" ", 1)[0] if "-j " in rule else ""


def _refused(n: int, line: str, why: str) -> BackendError:
    return BackendError(f"iptables-restore: line {n} failed: {why}", returncode=1, context=line)


def _apply(chains: dict[str, list[str]], line: str, n: int) -> None:
    if line.startswith(":"):
        name = line[1:].split(" ", 1)[0]
        chains[name] = []  # --noflush: a declared chain is created, or flushed
        return
    op, _, rest = line.partition(" ")
    chain, _, rule = rest.partition(" ")
    if op in ("-A", "-I", "-D") and chain not in chains:
        raise _refused(n, line, f"no chain {chain!r}")
    if op == "-A":
        chains[chain].append(rule)
    elif op == "-I":
        pos, _, body = rule.partition(" ")
        chains[chain].insert(int(pos) - 1, body)
    elif op == "-D":
        if rule not in chains[chain]:
            raise _refused(n, line, "no such rule")
        chains[chain].remove(rule)
    elif op == "-X":
        if chain not in chains or chain in BUILTIN_ALL:
            raise _refused(n, line, f"cannot delete {chain!r}")
        if chains[chain] or any(_target(r) == chain for rules in chains.values() for r in rules):
            raise _refused(n, line, f"chain {chain!r} is not empty or still referenced")
        del chains[chain]
    else:
        raise _refused(n, line, f"unsupported {op!r}")


def canary_intact(ipt: FakeIptables) -> bool:
    return all(ipt.rules(t, CANARY_CHAIN) for t in CANARY_TABLES)


def ensure_canary(ipt: FakeIptables) -> None:
    rule = f"-A {CANARY_CHAIN} -j RETURN"
    ipt.restore("".join(f"*{t}\n:{CANARY_CHAIN} - [0:0]\n{rule}\nCOMMIT\n" for t in CANARY_TABLES))
