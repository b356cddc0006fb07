"""A packet tracer for the IPVS mode: where does the first packet of a flow end up?

It walks the hooks a new connection meets on the node, in the kernel's order, through the rules
and sets kproxy rendered and through its IPVS table:

- from elsewhere: mangle PREROUTING, nat PREROUTING, routing (local if the destination is a
  node address or bound to kproxy-ipvs0), then filter INPUT, IPVS (LOCAL_IN, priority 99: after
  filter), filter OUTPUT on the forwarded packet, nat POSTROUTING; or filter FORWARD when the
  destination is not local;
- from the node itself: mangle OUTPUT, nat OUTPUT, IPVS (LOCAL_OUT, priority -98: after nat,
  before filter), filter OUTPUT, then filter INPUT if it stays local, nat POSTROUTING.

A VS with real servers yields one DNAT outcome per real server of weight > 0 (or the one a
persistence template pins the client to, `affinity`); a VS without any refuses the packet as
IPVS does (ICMP port unreachable: REJECT); a local destination IPVS does not serve reaches the
node's own stack (UNTOUCHED). Outcomes are `kproxy.proxier.iptables.trace.Outcome`s, so flow tables
read the same as the iptables mode's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import replace

from kproxy.model import Protocol
from kproxy.proxier.iptables.render import FILTER, NAT
from kproxy.proxier.iptables.trace import DNAT, DROP, REJECT, UNTOUCHED, Outcome, Packet, Trace, Tracer
from kproxy.proxier.ipvs import render as pv

MANGLE = pv.MANGLE


class _RuleTracer(Tracer):
    """The iptables tracer, taught `-m set --match-set NAME FLAGS` against the rendered sets."""

    def __init__(self, state: pv.IpvsState, local_ips: tuple[str, ...]) -> None:
        super().__init__(state.iptables, local_ips)
        self.sets = state.ipsets

    def _match(self, toks: tuple[str, ...], p: Packet, ctstate_dnat: bool) -> list[tuple[bool, Packet]]:
        rest: list[str] = []
        ok = True
        i = 0
        while i < len(toks):
            t = toks[i]
            if t == "-m" and i + 1 < len(toks) and toks[i + 1] == "set":
                i += 2
                continue
            neg = t == "!" and i + 1 < len(toks) and toks[i + 1] == "--match-set"
            if t == "--match-set" or neg:
                j = i + 1 if neg else i
                hit = self._in_set(toks[j + 1], toks[j + 2], p)
                ok = ok and (not hit if neg else hit)
                i = j + 3
                continue
            rest.append(t)
            i += 1
        if not ok:
            return [(False, p)]
        return super()._match(tuple(rest), p, ctstate_dnat)

    def _in_set(self, name: str, flags: str, p: Packet) -> bool:
        s = self.sets.get(name)
        if s is None:
            raise KeyError(f"ipset {name} is referenced but not rendered")
        dims = flags.split(",")

        def ip_of(flag: str) -> str:
            return p.dst if flag == "dst" else p.src

        if s.type == "bitmap:port":
            return dims[0] == "dst" and str(p.dport) in s.entries
        if s.type == "hash:ip":
            return str(ipaddress.ip_address(ip_of(dims[0]))) in s.entries
        if dims[1] != "dst":
            return False  # source ports are not traced
        head = f"{ipaddress.ip_address(ip_of(dims[0]))},{p.proto}:{p.dport}"
        if s.type == "hash:ip,port":
            return head in s.entries
        third = ip_of(dims[2])
        if s.type == "hash:ip,port,ip":
            return f"{head},{ipaddress.ip_address(third)}" in s.entries
        if s.type == "hash:ip,port,net":
            addr = ipaddress.ip_address(third)
            for e in s.entries:
                h, _, net = e.rpartition(",")
                if h == head and addr in ipaddress.ip_network(net, strict=False):
                    return True
            return False
        raise ValueError(f"tracer does not know ipset type {s.type}")


class IpvsTracer:
    def __init__(
        self,
        state: pv.IpvsState,
        local_ips: tuple[str, ...],
        affinity: Mapping[tuple[str, str], str] | None = None,
    ) -> None:
        """`local_ips`: the node's addresses (the dummy device's are added); `affinity`: a
        persistence template, (VS address "ip:port", client IP) -> the real server it pins."""
        self.state = state
        self.rules = _RuleTracer(state, tuple(local_ips) + tuple(state.addresses))
        self.affinity = dict(affinity or {})

    def is_local(self, ip: str) -> bool:
        return self.rules.is_local(ip)

    def trace(self, src: str, dst: str, dport: int, proto: str = "tcp", iface: str = "eth0") -> Trace:
        pkt = Packet(src=src, dst=dst, dport=dport, proto=proto.lower(), iface=iface)
        local_origin = self.is_local(src)
        outcomes: list[Outcome] = []
        first = ["mangle/OUTPUT", "nat/OUTPUT"] if local_origin else ["mangle/PREROUTING", "nat/PREROUTING"]
        for p, verdict in self._hooks(first, [(pkt, "continue")]):
            if verdict in (DROP, REJECT):
                outcomes.append(Outcome(verdict, trail=p.trail))
                continue
            if p.dnat:
                p = self._rewrite(p)
            if local_origin:
                outcomes.extend(self._from_node(p))
            else:
                outcomes.extend(self._from_elsewhere(p))
        return Trace(tuple(outcomes))

    # ----- the two paths

    def _from_elsewhere(self, p: Packet) -> list[Outcome]:
        if not self.is_local(p.dst):
            return self._finish(self._hooks(["filter/FORWARD"], [(p, "continue")]))
        out: list[Outcome] = []
        for q, v in self._hooks(["filter/INPUT"], [(p, "continue")]):
            if v in (DROP, REJECT):
                out.append(Outcome(v, trail=q.trail))
                continue
            for r, how in self._ipvs(q):
                if how == "pass":  # delivered to the node's own stack
                    out.append(Outcome(UNTOUCHED, trail=r.trail + ("local delivery",)))
                    continue
                if how != DNAT:
                    out.append(Outcome(how, trail=r.trail))
                    continue
                out.extend(self._finish(self._hooks(["filter/OUTPUT"], [(r, "continue")])))
        return out

    def _from_node(self, p: Packet) -> list[Outcome]:
        out: list[Outcome] = []
        for q, how in self._ipvs(p) if self.is_local(p.dst) else [(p, "pass")]:
            if how in (REJECT,):
                out.append(Outcome(how, trail=q.trail))
                continue
            results = self._hooks(["filter/OUTPUT"], [(q, "continue")])
            if how != DNAT and self.is_local(q.dst):
                results = self._hooks(["filter/INPUT"], results)
            out.extend(self._finish(results))
        return out

    def _finish(self, results: list[tuple[Packet, str]]) -> list[Outcome]:
        out: list[Outcome] = []
        for q, v in results:
            if v in (DROP, REJECT):
                out.append(Outcome(v, trail=q.trail))
                continue
            for r, _ in self._hooks(["nat/POSTROUTING"], [(q, "continue")]):
                if r.dnat:
                    out.append(Outcome(DNAT, r.dnat, r.masquerade, r.trail))
                else:
                    out.append(Outcome(UNTOUCHED, "", r.masquerade, r.trail))
        return out

    # ----- pieces

    def _hooks(self, hooks: list[str], packets: list[tuple[Packet, str]]) -> list[tuple[Packet, str]]:
        for hook in hooks:
            table, chain = hook.split("/")
            nxt: list[tuple[Packet, str]] = []
            for p, v in packets:
                if v in (DROP, REJECT):
                    nxt.append((p, v))
                    continue
                for q, w in self.rules._builtin(table, chain, p, ctstate_dnat=bool(p.dnat)):
                    nxt.append((q, w if w in (DROP, REJECT) else "continue"))
            packets = nxt
        return packets

    @staticmethod
    def _rewrite(p: Packet) -> Packet:
        host, _, port = p.dnat.rpartition(":")
        return replace(p, dst=host.strip("[]"), dport=int(port), dnat="")

    def _ipvs(self, p: Packet) -> list[tuple[Packet, str]]:
        """What IPVS does with a packet to a local address: (packet, DNAT | REJECT | "pass")."""
        proto = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP"}.get(p.proto)
        vs = None
        if proto is not None:
            vs = self.state.virtual_servers.get((Protocol(proto), str(ipaddress.ip_address(p.dst)), p.dport))
        if vs is None:
            return [(p, "pass")]
        step = f"ipvs: {vs.header()}"
        live = [rs for rs in vs.real_servers if rs.weight > 0]
        pinned = self.affinity.get((vs.addr, p.src))
        if pinned is not None and vs.persistent:
            live = [rs for rs in live if rs.addr == pinned] or live
        if not live:
            return [(replace(p, trail=p.trail + (step + " (no real server: ICMP port unreachable)",)), REJECT)]
        return [
            (
                replace(p, dst=rs.ip, dport=rs.port, dnat=rs.addr, trail=p.trail + (f"{step} -> {rs.addr} Masq",)),
                DNAT,
            )
            for rs in live
        ]


__all__ = ["IpvsTracer", "DNAT", "DROP", "REJECT", "UNTOUCHED", "FILTER", "NAT", "MANGLE"]
