"""The nftables mode's part of `kproxy status`: each Service port's objects, from its own render.

`describe` renders each Service port (`render.render_service`, what a sync writes) and lists its
`ServiceObjects`: the chains it owns (with their rule counts), the shared `lb-N` chains it goes
through, its affinity sets, and its elements (`service-ips-N`, `backends-tcp`, `service-ips`,
`no-endpoint-services`, ...: container, key and value). A plain Service port of the shared
layout owns no chain, only elements. `check` holds them against `nft -j list table` (run only
for `--check`: it fetches the whole ruleset): a chain, set or element key missing, a rule count
that differs, and over the whole table a Service chain or a Service element nobody wants.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kproxy.model import ServicePortName
from kproxy.node import NodeContext
from kproxy.proxier.nftables import names
from kproxy.proxier.nftables.render import render_service
from kproxy.status import KernelObject
from kproxy.view import FamilyView

# The containers whose every element is some Service port's: an element there that no Service
# port renders is stale. (cluster-ips and hairpin-ips are shared between Service ports.)
_PER_SERVICE = (
    names.SERVICE_IPS,
    names.SERVICE_NODEPORTS,
    names.NO_ENDPOINT_SERVICES,
    names.NO_ENDPOINT_NODEPORTS,
    *(names.backends(p) for p in names.PROTOCOLS),
    *(names.nodeport_backends(p) for p in names.PROTOCOLS),
    names.FIREWALL_IPS,
)


def _per_service(container: str) -> bool:
    return container in _PER_SERVICE or container.startswith(("service-ips-", "service-nodeports-"))


def describe(view: FamilyView, ctx: NodeContext) -> dict[ServicePortName, tuple[KernelObject, ...]]:
    out: dict[ServicePortName, tuple[KernelObject, ...]] = {}
    for name, svc in view.ports.items():
        objs = render_service(svc, view.endpoints.get(name, ()), ctx)
        found = [KernelObject("chain", names.TABLE, c.name, len(c.rules)) for c in objs.chains]
        found += [KernelObject("chain", names.TABLE, c) for c in objs.shared]
        found += [KernelObject("set", names.TABLE, s.name) for s in objs.sets]
        found += [KernelObject("element", cont, key, value=value) for cont, key, value in objs.elements]
        out[name] = tuple(found)
    return out


def _part(v: Any) -> str:
    if isinstance(v, dict):
        if "concat" in v:
            return " . ".join(_part(x) for x in v["concat"])
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        if "range" in v:
            return "-".join(_part(x) for x in v["range"])
        if "elem" in v:  # an element with options (timeout, comment): its value is "val"
            return _part(v["elem"].get("val"))
    return str(v)


def _key(text: str) -> str:
    """A key as nft lists it: a host prefix (/32, /128) is printed as the bare address."""
    return " . ".join(p.removesuffix("/32").removesuffix("/128") for p in text.split(" . "))


def listing(objects: Iterable[Mapping[str, Any]]) -> tuple[dict[str, int], set[str], dict[str, set[str]]]:
    """From `nft -j list table`: rules per chain, the sets and maps, and the element keys of each."""
    rules: dict[str, int] = {}
    containers: set[str] = set()
    elements: dict[str, set[str]] = {}
    for obj in objects:
        if "chain" in obj:
            rules.setdefault(obj["chain"]["name"], 0)
        elif "rule" in obj:
            chain = obj["rule"]["chain"]
            rules[chain] = rules.get(chain, 0) + 1
        for kind in ("set", "map"):
            if kind in obj:
                c = obj[kind]
                containers.add(c["name"])
                keys = elements.setdefault(c["name"], set())
                for e in c.get("elem", ()):
                    keys.add(_key(_part(e[0] if isinstance(e, list) else e)))
    return rules, containers, elements


def differences(
    expected: Sequence[KernelObject], listed: list[dict[str, Any]] | None, complete: bool, table: str
) -> list[str]:
    if listed is None:
        return [f"missing: table {table}"] if expected else []
    rules, containers, elements = listing(listed)
    out: list[str] = []
    wanted_chains: set[str] = set()
    wanted: dict[str, set[str]] = {}
    for obj in expected:
        if obj.kind == "chain":
            wanted_chains.add(obj.name)
            if obj.name not in rules:
                out.append(f"missing: chain {table}/{obj.name}")
            elif obj.rules is not None and rules[obj.name] != obj.rules:
                out.append(f"differs: chain {table}/{obj.name} holds {rules[obj.name]} rules, {obj.rules} expected")
        elif obj.kind == "set":
            if obj.name not in containers:
                out.append(f"missing: set {table}/{obj.name}")
        elif obj.kind == "element":
            key = _key(obj.name)
            wanted.setdefault(obj.where, set()).add(key)
            if obj.where not in containers:
                out.append(f"missing: {obj.where} (the set or map) for element {obj.name}")
            elif key not in elements.get(obj.where, set()):
                out.append(f"missing: element {obj.where}: {obj.name}")
    if complete:
        for chain in sorted(rules):
            if names.is_service_object(chain) and chain not in wanted_chains:
                out.append(f"unexpected: chain {table}/{chain}")
        for cont in sorted(elements):
            if _per_service(cont):
                out += [f"unexpected: element {cont}: {k}" for k in sorted(elements[cont] - wanted.get(cont, set()))]
    return out
