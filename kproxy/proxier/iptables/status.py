"""The iptables mode's part of `kproxy status`: each Service port's chains, from its own render.

`describe` renders each Service port (`render.render_service`, what a sync writes) and names its
nat chains (SVC, SVL, EXT, FW, SEP) with their rule counts, and how many of its rules sit in the shared
chains (`KPROXY-SERVICES`: dispatch, and REJECT or DROP in filter); `check` holds them against an
`iptables-save` listing: a chain missing, a rule count that differs, and (over the whole table)
a Service chain nobody wants. Names and counts only, never rule text (iptables normalises it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kproxy.model import ServicePortName
from kproxy.node import NodeContext
from kproxy.proxier import names
from kproxy.proxier.iptables.render import FILTER, LARGE_CLUSTER_ENDPOINTS, NAT, render_service, rule_count
from kproxy.status import KernelObject
from kproxy.view import FamilyView

# Rules of a Service port in a chain every Service shares: shown, not checked (the chain's count
# is every Service's).
SHARED = "rules-in"


def describe(view: FamilyView, ctx: NodeContext) -> dict[ServicePortName, tuple[KernelObject, ...]]:
    large = sum(len(view.endpoints.get(n, ())) for n in view.ports) > LARGE_CLUSTER_ENDPOINTS
    out: dict[ServicePortName, tuple[KernelObject, ...]] = {}
    for name, svc in view.ports.items():
        rules = render_service(svc, view.endpoints.get(name, ()), ctx, large)
        found = [KernelObject("chain", NAT, chain, rule_count(held)) for chain, held in rules.nat_chains]
        # Its rules in the shared chains (dispatch, REJECT, DROP, source ranges), counted per chain.
        shared: dict[tuple[str, str], int] = {}
        for table, lines in (
            (NAT, rules.nat_services + rules.nat_nodeports),
            (FILTER, rules.filter_services + rules.filter_external + rules.filter_nodeports + rules.filter_firewall),
        ):
            for line in lines:
                chain = line.split(maxsplit=2)[1]
                shared[(table, chain)] = shared.get((table, chain), 0) + 1
        found += [KernelObject(SHARED, table, chain, n) for (table, chain), n in shared.items()]
        out[name] = tuple(found)
    return out


def differences(
    expected: Sequence[KernelObject],
    chains: Mapping[str, set[str]],
    counts: Mapping[str, Mapping[str, int]],
    complete: bool,
) -> list[str]:
    """What the listing (`chains` and rule `counts` per table) lacks or holds beyond `expected`;
    Service chains nobody expects only when `expected` covers every Service (`complete`)."""
    out: list[str] = []
    wanted: set[tuple[str, str]] = set()
    for obj in expected:
        if obj.kind != "chain":
            continue
        wanted.add((obj.where, obj.name))
        if obj.name not in chains.get(obj.where, ()):
            out.append(f"missing: chain {obj.where}/{obj.name}")
            continue
        held = counts.get(obj.where, {}).get(obj.name, 0)
        if obj.rules is not None and held != obj.rules:
            out.append(f"differs: chain {obj.where}/{obj.name} holds {held} rules, {obj.rules} expected")
    if complete:
        for table in sorted(chains):
            for chain in sorted(chains[table]):
                if chain.startswith(names.SERVICE_CHAIN_PREFIXES) and (table, chain) not in wanted:
                    out.append(f"unexpected: chain {table}/{chain}")
    return out
