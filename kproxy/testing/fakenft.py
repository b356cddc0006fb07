"""An in-memory nft that applies the nftables mode's scripts and refuses what nft refuses.

It understands the commands the plan writes (`add|delete table`, `add|flush|delete chain`,
`add|delete set|map`, `add rule`, `add|delete element`) and applies a script as one
transaction: on the first refused line nothing changes and a `BackendError` names the line,
as `nft -f` does. Refused, as by nft 1.0.6 on this kernel (checked by hand in a namespace):
a jump or goto (in a rule or a map element) to a missing chain; a rule or element naming a
missing set or map; a rule looking up a map whose `typeof` key has `th dport` in a later
transaction than the map's own; `add element` of a key already there with another value (the same value is
accepted); deleting a missing table, chain, set or element; deleting a chain a rule or element
still points to, or a set a rule still names.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from kproxy.backends.nftnl import TableProbe
from kproxy.errors import BackendError
from kproxy.model import IPFamily
from kproxy.proxier.nftables.trace import Table

_TARGET = re.compile(r"\b(?:jump|goto) (\S+)")
_SETREF = re.compile(r"@(\S+)")


@dataclass
class FakeTable:
    chains: dict[str, list[str]] = field(default_factory=dict)
    hooks: dict[str, str] = field(default_factory=dict)
    containers: dict[str, str] = field(default_factory=dict)  # name -> "set" | "map"
    specs: dict[str, str] = field(default_factory=dict)
    elements: dict[str, dict[str, str]] = field(default_factory=dict)

    def view(self) -> Table:
        hooks = {}
        for name, spec in self.hooks.items():
            w = spec.strip("{} ;").split()
            hooks[name] = (w[1], w[3], int(w[5]))
        return Table({n: tuple(r) for n, r in self.chains.items()}, hooks, self.elements)


class FakeNft:
    """Tables by (family, name); `scripts` keeps every script applied, for tests to read."""

    def __init__(self) -> None:
        self.tables: dict[tuple[str, str], FakeTable] = {}
        self.scripts: list[str] = []
        self.fail_next: str = ""  # a test may make the next transaction fail with this message
        # The kernel's ruleset generation: one step per committed transaction, anyone's.
        self.generation_id = 1
        self.probes = 0  # read-backs of a table (`probe`), for tests to count
        self._handles = 0
        self.handles: dict[tuple[str, str], int] = {}

    def table(self, family: IPFamily, name: str = "kproxy") -> FakeTable:
        return self.tables[("ip" if family is IPFamily.V4 else "ip6", name)]

    def apply(self, script: str) -> None:
        if self.fail_next:
            message, self.fail_next = self.fail_next, ""
            raise BackendError(message, argv=("nft", "-f", "-"), returncode=1)
        work = copy.deepcopy(self.tables)
        for number, line in enumerate(script.splitlines(), 1):
            if not line.strip():
                continue
            try:
                _command(work, line, self.tables)
            except _Refused as e:
                raise BackendError(
                    f"nft refused the transaction: {e}",
                    argv=("nft", "-f", "-"),
                    returncode=1,
                    stderr=f"/dev/stdin:{number}:1-1: Error: {e}\n{line}\n",
                    context=f"{number:>6}: {line}",
                ) from None
        self.tables = work
        self.scripts.append(script)
        self._committed()

    def _committed(self) -> None:
        self.generation_id += 1
        for key in self.tables:
            if key not in self.handles:
                self._handles += 1
                self.handles[key] = self._handles
        for key in set(self.handles) - set(self.tables):
            del self.handles[key]

    def delete_table(self, family: str, name: str = "kproxy") -> bool:
        """`nft delete table`, ours or someone else's."""
        found = self.tables.pop((family, name), None) is not None
        self._committed()
        return found

    def tamper(self, family: IPFamily, change: str, name: str = "") -> None:
        """What someone else does by hand: "flush table", "flush chain NAME", "flush map NAME"."""
        tb = self.table(family)
        if change == "flush table":
            tb.chains = {c: [] for c in tb.chains}
        elif change == "flush chain":
            tb.chains[name] = []
        elif change == "flush map":
            tb.elements[name] = {}
        else:
            raise ValueError(change)
        self._committed()

    def generation(self) -> int:
        return self.generation_id

    def probe(self, family: str, table: str, sets: Iterable[str]) -> TableProbe:
        self.probes += 1
        tb = self.tables.get((family, table))
        if tb is None:
            return TableProbe(self.generation_id, None, {}, {})
        rules = {c: len(r) for c, r in tb.chains.items() if r}
        elements = {s: len(tb.elements[s]) if s in tb.elements else -1 for s in sets}
        return TableProbe(self.generation_id, self.handles[(family, table)], rules, elements)


class _Refused(Exception):
    pass


def _items(body: str) -> list[tuple[str, str]]:
    inner = body.strip()[1:-1]
    out = []
    for item in inner.split(","):
        key, _, value = item.partition(" : ")
        out.append((key.strip(), value.strip()))
    return out


def _referenced(tb: FakeTable, chain: str) -> bool:
    for rules in tb.chains.values():
        if any(chain in _TARGET.findall(r) for r in rules):
            return True
    return any(v.split(" ", 1)[-1] == chain for els in tb.elements.values() for v in els.values())


def _check_rule(tb: FakeTable, rule: str, committed: FakeTable | None) -> None:
    for target in _TARGET.findall(rule):
        if target not in tb.chains:
            raise _Refused(f"Could not process rule: No such file or directory: chain {target}")
    for ref in _SETREF.findall(rule):
        if ref not in tb.containers:
            raise _Refused(f"Could not process rule: No such file or directory: set {ref}")
        # nft 1.0.6 rebuilds a map's `typeof` from the kernel and cannot then evaluate a
        # lookup whose key has `th dport`; within the transaction that created it, it can.
        spec = committed.specs.get(ref, "") if committed is not None else ""
        if "typeof" in spec and " th dport" in spec.partition(":")[0]:
            raise _Refused("conflicting protocols specified: tcp vs. th")


def _command(  # noqa: C901
    tables: dict[tuple[str, str], FakeTable], line: str, committed: dict[tuple[str, str], FakeTable]
) -> None:
    words = line.split(" ", 4)
    verb, obj, family, tname = words[0], words[1], words[2], words[3]
    rest = words[4] if len(words) > 4 else ""
    key = (family, tname)
    if obj == "table":
        if verb == "add":
            tables.setdefault(key, FakeTable())
        elif verb == "delete":
            if key not in tables:
                raise _Refused("Could not process rule: No such file or directory: table")
            del tables[key]
        return
    tb = tables.get(key)
    if tb is None:
        raise _Refused(f"Could not process rule: No such file or directory: table {tname}")
    name, _, body = rest.partition(" ")
    if obj == "chain":
        if verb == "add":
            tb.chains.setdefault(name, [])
            if body:
                tb.hooks[name] = body
        elif name not in tb.chains:
            raise _Refused(f"Could not process rule: No such file or directory: chain {name}")
        elif verb == "flush":
            tb.chains[name] = []
        elif verb == "delete":
            if _referenced(tb, name):
                raise _Refused(f"Could not process rule: Device or resource busy: chain {name}")
            del tb.chains[name]
            tb.hooks.pop(name, None)
    elif obj in ("set", "map"):
        if verb == "add":
            if name in tb.containers and tb.specs[name] != body:
                raise _Refused(f"Could not process rule: File exists: {obj} {name} with another definition")
            tb.containers[name] = obj
            tb.specs[name] = body
            tb.elements.setdefault(name, {})
        elif verb == "delete":
            if name not in tb.containers:
                raise _Refused(f"Could not process rule: No such file or directory: {obj} {name}")
            if any(name in _SETREF.findall(r) for rules in tb.chains.values() for r in rules):
                raise _Refused(f"Could not process rule: Device or resource busy: {obj} {name}")
            del tb.containers[name], tb.specs[name], tb.elements[name]
    elif obj == "rule":
        if name not in tb.chains:
            raise _Refused(f"Could not process rule: No such file or directory: chain {name}")
        _check_rule(tb, body, committed.get(key))
        tb.chains[name].append(body)
    elif obj == "element":
        if name not in tb.containers:
            raise _Refused(f"Could not process rule: No such file or directory: set {name}")
        els = tb.elements[name]
        for k, v in _items(body):
            if verb == "add":
                for target in _TARGET.findall(v):
                    if target not in tb.chains:
                        raise _Refused(f"Could not process rule: No such file or directory: chain {target}")
                if k in els and els[k] != v:
                    raise _Refused(f"Could not process rule: File exists: element {k}")
                els[k] = v
            elif verb == "delete":
                if k not in els:
                    raise _Refused(f"Could not process rule: No such file or directory: element {k}")
                del els[k]
    else:
        raise _Refused(f"syntax error: {obj}")
