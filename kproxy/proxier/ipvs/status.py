"""The IPVS mode's part of `kproxy status`: each Service port's virtual servers, real servers,
ipset entries and chains, from its own render (`render.port_objects`), over the node context a
sync renders with: without the addresses bound to the dummy device (`bound`), which the
namespace lists among its own but which are VIPs, not node addresses.

`check` holds them against the kernel: the IPVS table over netlink, the ipsets (`ipset save`) and
the nat chains (`iptables-save`), by key only: a virtual or real server, an entry or a chain
missing, and over the whole table a virtual server on a Service address nobody wants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set

from kproxy.backends.protocols import IpsetBackend, IptablesBackend, IpvsBackend
from kproxy.config import IpvsConfig
from kproxy.model import IPFamily, ServicePortName
from kproxy.node import NodeContext
from kproxy.proxier.ipvs import render as pv
from kproxy.status import KernelObject
from kproxy.view import FamilyView

VS = "virtual-server"
RS = "real-server"
ENTRY = "ipset-entry"
IPVS = "ipvs"


def vs_name(protocol: str, addr: str) -> str:
    return f"{protocol} {addr}"


def describe(
    cfg: IpvsConfig, view: FamilyView, ctx: NodeContext, bound: Set[str] = frozenset()
) -> dict[ServicePortName, tuple[KernelObject, ...]]:
    """Each Service port's objects. `bound`: the dummy device's addresses (`IpvsMode.describe`
    reads them), taken out of `ctx` as the proxier does before it renders."""
    ctx = pv.without_addresses(ctx, bound)
    node_ips = pv.nodeport_addresses(ctx, {ip for sp in view.ports.values() for ip in sp.cluster_ips})
    out: dict[ServicePortName, tuple[KernelObject, ...]] = {}
    for name, svc in view.ports.items():
        vss, sets, chains = pv.port_objects(svc, view.endpoints.get(name, ()), ctx, cfg, node_ips)
        found: list[KernelObject] = []
        for vs in vss:
            key = vs_name(vs.protocol.value, vs.addr)
            found.append(KernelObject(VS, IPVS, key, value=vs.kind))
            found += [KernelObject(RS, key, rs.addr) for rs in vs.real_servers]
        for base in sorted(sets):
            where = pv.set_name(base, ctx.family)
            found += [KernelObject(ENTRY, where, e) for e in sorted(sets[base])]
        found += [KernelObject("chain", pv.NAT, chain, len(rules)) for chain, rules in chains.items()]
        out[name] = tuple(found)
    return out


def differences(
    expected: Sequence[KernelObject],
    servers: Mapping[str, set[str]],
    ipsets: Mapping[str, frozenset[str]],
    chains: Mapping[str, set[str]],
    complete: bool,
) -> list[str]:
    """`servers`: virtual server name -> its real servers' addresses; `ipsets`: name -> entries
    (as `ipset save` prints them: `pv.canonical_entry` form); `chains`: per table."""
    out: list[str] = []
    wanted: set[str] = set()
    for obj in expected:
        if obj.kind == VS:
            wanted.add(obj.name)
            if obj.name not in servers:
                out.append(f"missing: virtual server {obj.name}")
        elif obj.kind == RS:
            if obj.where in servers and obj.name not in servers[obj.where]:
                out.append(f"missing: real server {obj.name} of {obj.where}")
        elif obj.kind == ENTRY:
            if obj.where not in ipsets:
                out.append(f"missing: ipset {obj.where} (for {obj.name})")
            elif obj.name not in ipsets[obj.where]:
                out.append(f"missing: ipset entry {obj.where}: {obj.name}")
        elif obj.kind == "chain" and obj.name not in chains.get(obj.where, ()):
            out.append(f"missing: chain {obj.where}/{obj.name}")
    if complete:
        out += [f"unexpected: virtual server {name}" for name in sorted(set(servers) - wanted)]
    return out


def check(
    expected: Sequence[KernelObject],
    family: IPFamily,
    ours: Set[str],
    ipvs: IpvsBackend,
    ipset: IpsetBackend,
    iptables: IptablesBackend,
    complete: bool,
) -> list[str]:
    """Read this family's IPVS table, ipsets and nat chains through the backends and compare.
    Only virtual servers on `ours` (the node's and the dummy device's addresses) are read: others
    may be another tool's."""
    servers: dict[str, set[str]] = {}
    for svc in ipvs.services(family):
        if svc.ip in ours:
            servers[vs_name(svc.protocol.value, pv.fmt_addr(svc.ip, svc.port))] = {
                pv.fmt_addr(d.ip, d.port) for d in ipvs.dests(svc.protocol, svc.ip, svc.port)
            }
    ipsets = {
        n: frozenset(pv.canonical_entry(e.type, x) for x in e.entries)
        for n, e in ipset.save(lambda n: pv.owns_set(n, family)).items()
    }
    return differences(expected, servers, ipsets, iptables.save(("nat",)).chains, complete)
