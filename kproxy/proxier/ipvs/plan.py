"""The IPVS mode's plans, pure: what the kernel holds (as read back) against what `render`
wants, turned into the writes that close the gap.

- `ipvs_plan`: IPVS operations in an order that never drops a packet (services and real servers
  added before the old ones go; a TCP real server leaving is set to weight 0 and drained).
- `ipset_plan`: one `ipset restore` text per sync, each set changed in place or rebuilt under a
  temporary name and swapped in.
- `ipvs_drift`: what someone else changed since the last sync programmed it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from kproxy.model import IPFamily, Protocol
from kproxy.proxier.ipvs.render import (
    FWD_MASQ,
    SVC_F_HASHED,
    IpSet,
    IpvsState,
    RealServer,
    VirtualServer,
    VSKey,
    entry_sort_key,
    fmt_addr,
    owns_set,
    tmp_set_name,
    vs_sort_key,
)
from kproxy.view import Repair


@dataclass(frozen=True, slots=True)
class KernelSet:
    """An ipset as `ipset save` shows it."""

    name: str
    type: str
    family: str  # "inet", "inet6" or "" (bitmap types)
    maxelem: int
    entries: frozenset[str]


def ipvs_drift(
    last: IpvsState,
    desired: IpvsState,
    current: Mapping[VSKey, KernelService],
    sets: Mapping[str, KernelSet] | None,
) -> tuple[Repair, ...]:
    """What someone else changed in IPVS and the ipsets since `last` was programmed.

    Only objects `desired` still wants exactly as `last` had them count: anything else is this
    sync's own change. Real servers are checked where `current` read them, ipsets where `sets`
    was read (None: not this sync)."""
    found: list[Repair] = []
    for key, vs in sorted(last.virtual_servers.items(), key=lambda kv: (kv[0][0].value, kv[0][1], kv[0][2])):
        if desired.virtual_servers.get(key) != vs:
            continue
        kernel = current.get(key)
        if kernel is None:
            found.append(Repair("virtual_server", f"{vs.protocol.value} {fmt_addr(vs.ip, vs.port)} deleted"))
            continue
        if kernel.dests is None:
            continue
        have = {d.key for d in kernel.dests}
        for rs in vs.real_servers:
            if (rs.ip, rs.port) not in have:
                where = fmt_addr(vs.ip, vs.port)
                found.append(
                    Repair("real_server", f"{fmt_addr(rs.ip, rs.port)} of {vs.protocol.value} {where} deleted")
                )
    for name, want in sorted(last.ipsets.items()):
        if sets is None or desired.ipsets.get(name) != want:
            continue
        ks = sets.get(name)
        if ks is None:
            found.append(Repair("ipset", f"{name} destroyed"))
        elif ks.entries != want.entries:
            missing, extra = len(want.entries - ks.entries), len(ks.entries - want.entries)
            found.append(Repair("ipset", f"{name}: {missing} entries missing, {extra} foreign"))
    return tuple(found)


@dataclass(frozen=True)
class IpsetPlan:
    # `ipset restore` input run before iptables (creates, adds, deletes, rebuild-and-swap) ...
    text: str
    # ... and after it, once no rule references them any more.
    destroy: tuple[str, ...]
    added: int
    removed: int
    rebuilt: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.text and not self.destroy


def ipset_plan(desired: Mapping[str, IpSet], existing: Mapping[str, KernelSet], family: IPFamily) -> IpsetPlan:
    """What turns the owned sets of `existing` into `desired`.

    A set is changed in place (adds, then deletes) unless its header differs (size) or most of it
    changes: then it is rebuilt in a temporary set and swapped in, so no packet ever sees it half
    filled. Owned sets nobody wants are destroyed after iptables stops referring to them.
    """
    lines: list[str] = []
    added = removed = 0
    rebuilt: list[str] = []
    for name in sorted(desired):
        want = desired[name]
        have = existing.get(name)
        if have is None:
            lines.append(want.create_line())
            lines.extend(f"add {name} {e}" for e in sorted(want.entries, key=entry_sort_key))
            added += len(want.entries)
            continue
        if have.type != want.type:
            raise ValueError(
                f"ipset {name} is a {have.type}, kproxy needs a {want.type}: run `kproxy cleanup --mode ipvs` first"
            )
        fam = "" if want.type.startswith("bitmap") else ("inet" if family is IPFamily.V4 else "inet6")
        add = want.entries - have.entries
        rem = have.entries - want.entries
        header_ok = (have.family in ("", fam)) and (fam == "" or have.maxelem == want.maxelem)
        if header_ok and len(add) + len(rem) <= max(len(want.entries), 16):
            lines.extend(f"add {name} {e}" for e in sorted(add, key=entry_sort_key))
            lines.extend(f"del {name} {e}" for e in sorted(rem, key=entry_sort_key))
            added, removed = added + len(add), removed + len(rem)
            continue
        tmp = tmp_set_name(name, family)
        if tmp in existing:
            lines.append(f"destroy {tmp}")
        lines.append(want.create_line(tmp))
        lines.extend(f"add {tmp} {e}" for e in sorted(want.entries, key=entry_sort_key))
        lines.append(f"swap {tmp} {name}")
        lines.append(f"destroy {tmp}")
        rebuilt.append(name)
        added, removed = added + len(add), removed + len(rem)
    destroy = tuple(sorted(n for n in existing if n not in desired and owns_set(n, family)))
    return IpsetPlan("\n".join(lines) + "\n" if lines else "", destroy, added, removed, tuple(rebuilt))


@dataclass(frozen=True, slots=True)
class KernelDest:
    ip: str
    port: int
    weight: int
    fwd: int = FWD_MASQ
    active: int = 0
    inactive: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.ip, self.port)

    @property
    def connections(self) -> int:
        return self.active + self.inactive


@dataclass(frozen=True, slots=True)
class KernelService:
    protocol: Protocol
    ip: str
    port: int
    scheduler: str
    flags: int
    timeout: int
    dests: tuple[KernelDest, ...] | None = None  # None: not read this time

    @property
    def key(self) -> VSKey:
        return (self.protocol, self.ip, self.port)

    @property
    def addr(self) -> str:
        return fmt_addr(self.ip, self.port)


@dataclass(frozen=True, slots=True)
class IpvsOp:
    """One netlink write: `op` is add/update/delete of a service or a dest (real server)."""

    op: str  # "add_service", "update_service", "delete_service", "add_dest", "update_dest", "delete_dest"
    vs: VirtualServer
    rs: RealServer | None = None

    def __str__(self) -> str:
        what = f"{self.vs.protocol.value} {self.vs.addr}"
        return f"{self.op} {what}" + (f" -> {self.rs.addr} weight {self.rs.weight}" if self.rs else "")


@dataclass(frozen=True)
class IpvsPlan:
    # Service and real-server additions and updates: applied before the addresses are bound.
    early: tuple[IpvsOp, ...]
    # Deletions of services nobody wants: applied after the addresses are unbound.
    late: tuple[IpvsOp, ...]
    # (VS, real server) pairs left at weight 0 until their connections drain.
    draining: tuple[tuple[VSKey, tuple[str, int]], ...]

    @property
    def ops(self) -> tuple[IpvsOp, ...]:
        return self.early + self.late


def kernel_as_vs(ks: KernelService) -> VirtualServer:
    return VirtualServer(ks.protocol, ks.ip, ks.port, ks.scheduler, ks.flags & ~SVC_F_HASHED, ks.timeout)


def ipvs_plan(
    desired: Mapping[VSKey, VirtualServer],
    current: Mapping[VSKey, KernelService],
    owned: Iterable[VSKey],
) -> IpvsPlan:
    """Netlink writes turning `current` into `desired`.

    `owned`: the current VS keys this proxier may delete. A real server the VS no longer wants is
    deleted at once if it has no connections or is UDP/SCTP (their "connections" are timers, and a
    client must not keep sending into a gone pod); a TCP one with connections is set to weight 0 so
    that no new connection picks it while the open ones finish (upstream's graceful termination),
    and deleted by a later plan once ActiveConn + InActConn reach 0. A VS whose dests were not
    read (`dests` None) is taken to hold exactly what it should.
    """
    early: list[IpvsOp] = []
    late: list[IpvsOp] = []
    draining: list[tuple[VSKey, tuple[str, int]]] = []
    for key in sorted(desired, key=lambda k: vs_sort_key(desired[k])):
        want = desired[key]
        have = current.get(key)
        if have is None:
            early.append(IpvsOp("add_service", want))
            early.extend(IpvsOp("add_dest", want, rs) for rs in want.real_servers)
            continue
        if not want.same_settings(have.scheduler, have.flags, have.timeout):
            early.append(IpvsOp("update_service", want))
        if have.dests is None:
            continue
        dests = {d.key: d for d in have.dests}
        for rs in want.real_servers:
            d = dests.get(rs.key)
            if d is None:
                early.append(IpvsOp("add_dest", want, rs))
            elif d.weight != rs.weight or d.fwd != FWD_MASQ:
                early.append(IpvsOp("update_dest", want, rs))
        wanted = {rs.key for rs in want.real_servers}
        for d in have.dests:
            if d.key in wanted:
                continue
            gone = RealServer(d.ip, d.port, 0)
            if want.protocol is Protocol.TCP and d.connections > 0:
                if d.weight != 0:
                    early.append(IpvsOp("update_dest", want, gone))
                draining.append((key, d.key))
            else:
                early.append(IpvsOp("delete_dest", want, gone))
    own = set(owned)
    for key in sorted(own - set(desired), key=lambda k: (k[0].value, k[1], k[2])):
        if key in current:
            late.append(IpvsOp("delete_service", kernel_as_vs(current[key])))
    return IpvsPlan(tuple(early), tuple(late), tuple(draining))


@lru_cache(maxsize=64)
def _net(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr, strict=False)


def in_cidrs(ip: str, cidrs: Iterable[str]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr.version == _net(c).version and addr in _net(c) for c in cidrs)
