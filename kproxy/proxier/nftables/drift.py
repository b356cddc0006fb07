"""What the nftables mode expects its table to hold, in counts, and what a probe shows astray.

Pure: the proxier reads the kernel (`NftablesBackend.probe`, netlink counts, no `nft list`) and
hands the result here. Counted are the rules of every chain the last commit wrote and the
elements of every fixed map and set whose elements are exactly the keys we added; interval sets
(the kernel stores an interval as two elements and may merge neighbours) and the affinity sets
(filled by packets) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from kproxy.backends.nftnl import TableProbe
from kproxy.proxier.nftables.plan import Applied
from kproxy.proxier.nftables.render import Ruleset
from kproxy.view import Repair

SHOWN = 5  # objects named per repair line; the rest are counted


@dataclass(frozen=True)
class Expected:
    rules: dict[str, int]  # chain -> rules written (chains with none left out)
    elements: dict[str, int]  # counted set or map -> keys written


def expected(last: Ruleset, applied: Applied) -> Expected:
    rules = {c.name: len(c.rules) for c in (*last.chains, *last.shared_chains) if c.rules}
    for objs in last.services.values():
        rules.update((c.name, len(c.rules)) for c in objs.chains if c.rules)
    counted = [c.name for c in (*last.containers, *last.shared_sets) if "interval" not in c.flags and not c.timeout]
    elements = {name: len(applied.claims.get(name, {})) for name in counted}
    return Expected(rules, elements)


def compare(want: Expected, found: TableProbe, family: str, table: str, handle: int | None) -> list[Repair]:
    """What drifted; `handle` is the table's handle when last seen intact (None: not known)."""
    where = f"table {family} {table}"
    if found.handle is None:
        return [Repair("table", f"{where} deleted")]
    if handle is not None and found.handle != handle:
        return [Repair("table", f"{where} deleted and created again")]
    repairs: list[Repair] = []
    chains = sorted(set(want.rules) | set(found.rules))
    astray = [c for c in chains if want.rules.get(c, 0) != found.rules.get(c, 0)]
    if astray and all(found.rules.get(c, 0) == 0 for c in want.rules):
        return [Repair("table", f"{where} flushed ({sum(want.rules.values())} rules gone)")]
    repairs += [
        Repair("chain", f"chain {c}: {found.rules.get(c, 0)} rules, {want.rules.get(c, 0)} written")
        for c in astray[:SHOWN]
    ]
    if len(astray) > SHOWN:
        repairs.append(Repair("chain", f"and {len(astray) - SHOWN} more chains"))
    for name, count in sorted(want.elements.items()):
        got = found.elements.get(name, -1)
        if got != count:
            state = "deleted" if got < 0 else f"{got} elements, {count} written"
            repairs.append(Repair("map", f"map {name}: {state}"))
    return repairs
