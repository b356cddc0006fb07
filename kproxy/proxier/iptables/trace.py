"""A packet tracer over rendered iptables rules: where does the first packet of a flow end up?

It walks the netfilter hooks a new connection meets (nat PREROUTING or OUTPUT, routing, filter
INPUT/FORWARD/OUTPUT, nat POSTROUTING) through the rules kproxy rendered, following every
`statistic` branch, and reports each possible outcome: the endpoint it was DNATed to, whether
it was marked for masquerade, or REJECT / DROP, or untouched. Tests use it for flow tables;
`kproxy trace` uses it to explain a packet to an operator.

Built-in chains are assumed to hold only kproxy's jumps with ACCEPT policies, and a client is
new (`recent --rcheck` finds no affinity entry) unless `affinity` names the endpoint chain.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache

from kproxy.proxier.iptables.render import FILTER, NAT, Ruleset, Stamp, jump_rule

DNAT = "dnat"
REJECT = "reject"
DROP = "drop"
UNTOUCHED = "untouched"


@dataclass(frozen=True, slots=True)
class Packet:
    src: str
    dst: str
    dport: int
    proto: str = "tcp"
    iface: str = "eth0"
    mark: int = 0
    dnat: str = ""
    masquerade: bool = False
    trail: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: str
    endpoint: str = ""
    masquerade: bool = False
    trail: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Trace:
    outcomes: tuple[Outcome, ...]

    @property
    def endpoints(self) -> set[str]:
        return {o.endpoint for o in self.outcomes if o.verdict == DNAT}

    @property
    def verdicts(self) -> set[str]:
        return {o.verdict for o in self.outcomes}

    @property
    def masquerade(self) -> set[bool]:
        return {o.masquerade for o in self.outcomes}

    def explain(self) -> list[str]:
        """Each distinct outcome with the rules that led there, as `kproxy trace` prints it."""
        lines: list[str] = []
        seen: set[tuple[str, str, bool]] = set()
        for o in self.outcomes:
            if (o.verdict, o.endpoint, o.masquerade) in seen:
                continue
            seen.add((o.verdict, o.endpoint, o.masquerade))
            what = f"DNAT to {o.endpoint}" if o.verdict == DNAT else o.verdict.upper()
            lines.append(f"=> {what}{', masqueraded' if o.masquerade else ''}")
            lines.extend(f"     {step}" for step in o.trail)
        return lines


@lru_cache(maxsize=65536)
def _tokens(rule: str) -> tuple[str, ...]:
    return tuple(shlex.split(rule))


def _ip_in(ip: str, spec: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(spec, strict=False)
    except ValueError:
        return False


class Tracer:
    def __init__(self, ruleset: Ruleset, local_ips: tuple[str, ...], affinity: Mapping[str, str] | None = None):
        self.tables = ruleset.tables
        self.jumps = ruleset.jumps
        self.local = set(local_ips) | {"127.0.0.1", "::1"}
        # recent-list name -> client source that is already in it (an established affinity)
        self.affinity = dict(affinity or {})

    def is_local(self, ip: str) -> bool:
        return ip in self.local or ip.startswith("127.")

    # ---------------------------------------------------------------------------------------
    def trace(self, src: str, dst: str, dport: int, proto: str = "tcp", iface: str = "eth0") -> Trace:
        pkt = Packet(src=src, dst=dst, dport=dport, proto=proto.lower(), iface=iface)
        local_origin = self.is_local(src)
        outcomes: list[Outcome] = []
        for p, verdict in self._builtin(NAT, "OUTPUT" if local_origin else "PREROUTING", pkt):
            if verdict in (DROP, REJECT):
                outcomes.append(Outcome(verdict, trail=p.trail))
                continue
            # Later hooks see the DNATed destination; routing decides on it too.
            if p.dnat:
                host, _, port = p.dnat.rpartition(":")
                p = replace(p, dst=host.strip("[]"), dport=int(port))
            dst_now = p.dst
            if local_origin:
                chains = ["OUTPUT"] + (["INPUT"] if self.is_local(dst_now) else [])
            else:
                chains = ["INPUT"] if self.is_local(dst_now) else ["FORWARD"]
            results = [(p, "continue")]
            for hook in chains:
                nxt = []
                for q, v in results:
                    if v != "continue":
                        nxt.append((q, v))
                        continue
                    nxt.extend(self._builtin(FILTER, hook, q, ctstate_dnat=bool(q.dnat)))
                results = nxt
            for q, v in results:
                if v in (DROP, REJECT):
                    outcomes.append(Outcome(v, trail=q.trail))
                    continue
                for r, _ in self._builtin(NAT, "POSTROUTING", q):
                    if r.dnat:
                        outcomes.append(Outcome(DNAT, r.dnat, r.masquerade, r.trail))
                    else:
                        outcomes.append(Outcome(UNTOUCHED, "", r.masquerade, r.trail))
        return Trace(tuple(outcomes))

    def _builtin(self, table: str, hook: str, pkt: Packet, ctstate_dnat: bool = False) -> list[tuple[Packet, str]]:
        rules = ["-A " + jump_rule(b, m, t, c) for (tb, b, m, t, c) in self.jumps if tb == table and b == hook]
        return self._rules(table, rules, pkt, ctstate_dnat, builtin=True)

    def _chain(self, table: str, chain: str, pkt: Packet, ctstate_dnat: bool) -> list[tuple[Packet, str]]:
        rules = self.tables.get(table, {}).get(chain)
        if rules is None:
            # A jump to a chain that does not exist is refused by iptables-restore; here it is a bug.
            raise KeyError(f"{table} chain {chain} is referenced but not rendered")
        if isinstance(rules, Stamp):
            raise ValueError(f"{table} chain {chain} is remembered, not rendered: trace a fresh render")
        return self._rules(table, list(rules), replace(pkt, trail=pkt.trail + (f"{table}/{chain}",)), ctstate_dnat)

    def _rules(
        self, table: str, rules: list[str], pkt: Packet, ctstate_dnat: bool, builtin: bool = False
    ) -> list[tuple[Packet, str]]:
        """Run packet through rules; returns (packet, verdict) for every branch.

        verdict is "continue" when the packet fell off the end (or RETURNed), else the terminal
        verdict (DNAT counts as an accept in nat, so "accept").
        """
        done: list[tuple[Packet, str]] = []
        live: list[Packet] = [pkt]
        for rule in rules:
            if not live:
                break
            toks = _tokens(rule)
            still: list[Packet] = []
            for p in live:
                for matched, q in self._match(toks, p, ctstate_dnat):
                    if not matched:
                        still.append(q)
                        continue
                    for r, verdict in self._target(table, toks, q, rule, ctstate_dnat):
                        if verdict == "continue":
                            still.append(r)
                        else:
                            done.append((r, verdict))
            live = still
        done.extend((p, "continue") for p in live)
        return [(p, "continue" if v == "return" else v) for p, v in done]

    def _match(self, toks: tuple[str, ...], p: Packet, ctstate_dnat: bool) -> list[tuple[bool, Packet]]:
        i, neg = 2, False  # skip "-A CHAIN"
        branches: list[tuple[bool, Packet]] = []
        ok = True
        while i < len(toks) and toks[i] not in ("-j", "-g"):
            t = toks[i]
            if t == "!":
                neg = True
                i += 1
                continue
            arg = toks[i + 1] if i + 1 < len(toks) else ""
            res: bool | None = None
            if t == "-m":
                if arg == "statistic":
                    # --mode random --probability P: both outcomes are possible.
                    branches = [(True, p), (False, p)]
                i += 2
                continue
            if t == "--comment":
                i += 2
                continue
            if t == "-p":
                res = p.proto == arg
            elif t == "-d":
                res = _ip_in(p.dst, arg)
            elif t == "-s":
                res = _ip_in(p.src, arg)
            elif t == "--dport":
                res = p.dport == int(arg)
            elif t == "-i":
                res = p.iface.startswith(arg[:-1]) if arg.endswith("+") else p.iface == arg
            elif t == "--dst-type":
                res = self.is_local(p.dst) if arg == "LOCAL" else False
            elif t == "--src-type":
                res = self.is_local(p.src) if arg == "LOCAL" else False
            elif t == "--mark":
                value, _, mask = arg.partition("/")
                res = (p.mark & int(mask or value, 16)) == int(value, 16)
            elif t == "--ctstate":
                states = set(arg.split(","))
                res = "NEW" in states or ("DNAT" in states and ctstate_dnat)
            elif t in ("--mode", "--probability"):
                i += 2
                continue
            elif t == "--name":
                i += 2
                continue
            elif t == "--rcheck":
                name = toks[toks.index("--name") + 1]
                res = self.affinity.get(name) == p.src
                i += 1
                if neg:
                    res = not res
                    neg = False
                ok = ok and res
                continue
            elif t in ("--seconds",):
                i += 2
                continue
            elif t in ("--reap", "--set"):
                i += 1
                continue
            else:
                raise ValueError(f"tracer does not understand {t!r} in: {' '.join(toks)}")
            if neg:
                res = not res
                neg = False
            ok = ok and bool(res)
            i += 2
        if not ok:
            return [(False, p)]
        return branches or [(True, p)]

    def _target(
        self, table: str, toks: tuple[str, ...], p: Packet, rule: str, ctstate_dnat: bool
    ) -> list[tuple[Packet, str]]:
        if "-j" not in toks:
            return [(p, "continue")]  # a rule without a target only counts packets
        j = toks.index("-j")
        target = toks[j + 1]
        p = replace(p, trail=p.trail + (rule,))
        if target == "DNAT":
            dest = toks[toks.index("--to-destination") + 1]
            return [(replace(p, dnat=dest), "accept")]
        if target == "MARK":
            if "--or-mark" in toks:
                return [(replace(p, mark=p.mark | int(toks[toks.index("--or-mark") + 1], 16)), "continue")]
            return [(replace(p, mark=p.mark ^ int(toks[toks.index("--xor-mark") + 1], 16)), "continue")]
        if target == "MASQUERADE":
            return [(replace(p, masquerade=True), "accept")]
        if target == "RETURN":
            return [(p, "return")]
        if target == "ACCEPT":
            return [(p, "accept")]
        if target == "REJECT":
            return [(p, REJECT)]
        if target == "DROP":
            return [(p, DROP)]
        out = []
        for q, v in self._chain(table, target, p, ctstate_dnat):
            out.append((q, "continue" if v in ("continue", "return") else v))
        return out
