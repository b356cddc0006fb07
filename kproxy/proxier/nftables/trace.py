"""A packet tracer over an nftables table of ours: where does the first packet of a flow end up?

It walks the hooks a new connection meets, in priority order, through the base chains of the
table (prerouting or output; then input, forward or output after routing; postrouting), follows
jumps, gotos and verdict maps, every `numgen` branch and every element of a DNAT map, and
reports each possible outcome as the iptables tracer does (`Trace`): DNAT to an endpoint and
whether it was masqueraded, REJECT, DROP, or untouched. `kproxy trace --mode nftables` prints it;
the packet-flow tests run the shared table through it.

It reads only the rule forms the render writes (an unknown one is an error, not a guess). A
client is new to every affinity set unless `affinity` names the set it is already in.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache

from kproxy.proxier.iptables.trace import DNAT, DROP, REJECT, UNTOUCHED, Outcome, Trace
from kproxy.proxier.nftables.render import Ruleset

__all__ = ["DNAT", "DROP", "REJECT", "UNTOUCHED", "Table", "Tracer"]

CONTINUE = "continue"
ACCEPT = "accept"


@dataclass(frozen=True)
class Table:
    """What the tracer needs of a table: chains (base chains with their hook and priority) and
    the elements of each set and map."""

    chains: Mapping[str, tuple[str, ...]]
    hooks: Mapping[str, tuple[str, str, int]]  # base chain -> (type, hook, priority)
    elements: Mapping[str, Mapping[str, str]]

    @classmethod
    def of(cls, rs: Ruleset) -> Table:
        hooks = {}
        for c in rs.chains:
            if c.hook:
                w = c.hook.split()
                hooks[c.name] = (w[1], w[3], int(w[5]))
        return cls({n: c.rules for n, c in rs.all_chains().items()}, hooks, rs.all_elements())


@dataclass(frozen=True, slots=True)
class Packet:
    src: str
    dst: str
    dport: int
    proto: str
    iface: str
    mark: int = 0
    dnat: str = ""
    masquerade: bool = False
    trail: tuple[str, ...] = ()


@lru_cache(maxsize=65536)
def _tokens(rule: str) -> tuple[str, ...]:
    return tuple(t.rstrip(",") for t in shlex.split(rule) if t != ",")


def _in(ip: str, spec: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(spec, strict=False)
    except ValueError:
        return False


class Tracer:
    def __init__(self, table: Table | Ruleset, local_ips: tuple[str, ...], affinity: Mapping[str, str] | None = None):
        self.table = table if isinstance(table, Table) else Table.of(table)
        self.local = set(local_ips) | {"127.0.0.1", "::1"}
        self.affinity = dict(affinity or {})  # affinity set -> the client already in it

    def is_local(self, ip: str) -> bool:
        return ip in self.local or ip.startswith("127.")

    def _base(self, hook: str, typ: str | None = None) -> list[str]:
        found = [(p, n) for n, (t, h, p) in self.table.hooks.items() if h == hook and (typ is None or t == typ)]
        return [n for _, n in sorted(found)]

    def trace(self, src: str, dst: str, dport: int, proto: str = "tcp", iface: str = "eth0") -> Trace:
        pkt = Packet(src, dst, dport, proto.lower(), iface)
        local_origin = self.is_local(src)
        first = "output" if local_origin else "prerouting"
        outcomes: list[Outcome] = []
        for p, verdict in self._hook(first, [pkt]):
            if verdict in (DROP, REJECT):
                outcomes.append(Outcome(verdict, trail=p.trail))
                continue
            if local_origin:
                later = ["input"] if self.is_local(p.dst) else []
                # nat output ran within the output hook; the filter chains after it see the DNAT.
            else:
                later = ["input"] if self.is_local(p.dst) else ["forward"]
            results = [(p, ACCEPT)]
            for hook in later:
                results = [r for q, v in results for r in ([(q, v)] if v != ACCEPT else self._hook(hook, [q]))]
            for q, v in results:
                if v in (DROP, REJECT):
                    outcomes.append(Outcome(v, trail=q.trail))
                    continue
                for r, _ in self._hook("postrouting", [q]):
                    masq = r.masquerade
                    if r.dnat:
                        outcomes.append(Outcome(DNAT, r.dnat, masq, r.trail))
                    else:
                        outcomes.append(Outcome(UNTOUCHED, "", masq, r.trail))
        return Trace(tuple(outcomes))

    def _hook(self, hook: str, pkts: list[Packet]) -> list[tuple[Packet, str]]:
        """Every base chain of `hook` in priority order; ACCEPT unless one drops or rejects."""
        results = [(p, ACCEPT) for p in pkts]
        for chain in self._base(hook):
            nxt: list[tuple[Packet, str]] = []
            for p, v in results:
                if v != ACCEPT:
                    nxt.append((p, v))
                    continue
                for q, w in self._chain(chain, p):
                    nxt.append((q, ACCEPT if w in (CONTINUE, ACCEPT) else w))
            results = nxt
        return results

    def _chain(self, name: str, pkt: Packet) -> list[tuple[Packet, str]]:
        rules = self.table.chains.get(name)
        if rules is None:
            raise KeyError(f"chain {name} is referenced but not in the table")
        live = [replace(pkt, trail=pkt.trail + (f"chain {name}",))]
        done: list[tuple[Packet, str]] = []
        for rule in rules:
            still: list[Packet] = []
            for p in live:
                for q, v in self._rule(rule, p):
                    (still.append(q) if v == CONTINUE else done.append((q, v)))
            live = still
            if not live:
                break
        done.extend((p, CONTINUE) for p in live)
        return [(p, CONTINUE if v == "return" else v) for p, v in done]

    def _verdict(self, verdict: str, p: Packet) -> list[tuple[Packet, str]]:
        word, _, target = verdict.partition(" ")
        if word in ("jump", "goto"):
            out = []
            for q, v in self._chain(target, p):
                if v == CONTINUE:
                    # After a jump the caller goes on; after a goto it returns.
                    out.append((q, CONTINUE if word == "jump" else "return"))
                else:
                    out.append((q, v))
            return out
        if word == "reject":
            return [(p, REJECT)]
        if word in ("drop", "accept", "return"):
            return [(p, DROP if word == "drop" else word)]
        raise ValueError(f"tracer does not understand verdict {verdict!r}")

    def _field(self, p: Packet, sel: str) -> str:
        return {
            "saddr": p.src,
            "daddr": p.dst,
            "l4proto": p.proto,
            "dport": str(p.dport),
        }[sel]

    def _rule(self, rule: str, pkt: Packet) -> list[tuple[Packet, str]]:
        t = _tokens(rule)
        p = replace(pkt, trail=pkt.trail + (rule,))
        return self._run(t, 0, p)

    def _run(self, t: tuple[str, ...], i: int, p: Packet) -> list[tuple[Packet, str]]:  # noqa: C901
        """Statements from t[i] on: a failed match ends with CONTINUE (the next rule)."""
        nomatch = [(replace(p, trail=p.trail[:-1]), CONTINUE)]
        while i < len(t):
            w = t[i]
            if w == "ct":
                what, value = t[i + 1], t[i + 2]
                ok = (value == "new") if what == "state" else bool(p.dnat)
                if not ok:
                    return nomatch
                i += 3
            elif w in ("ip", "ip6", "meta", "th") and i + 2 < len(t) and t[i + 2] == ".":
                keys, i = self._concat(t, i, p)
                op = t[i]
                if op == "vmap":
                    verdict = self.table.elements[t[i + 1][1:]].get(keys)
                    if verdict is None:
                        return nomatch
                    return self._after_verdict(self._verdict(verdict, p))
                negate = op == "!="
                name = t[i + 1 if negate else i][1:]
                found = self._member(name, keys)
                if found == negate:
                    return nomatch
                i += 2 if negate else 1
            elif w in ("ip", "ip6"):
                value = self._field(p, t[i + 1])
                negate = t[i + 2] == "!="
                arg = t[i + 3 if negate else i + 2]
                ok = self._member(arg[1:], value) if arg.startswith("@") else _in(value, arg)
                if ok == negate:
                    return nomatch
                i += 4 if negate else 3
            elif w in ("tcp", "udp", "sctp") and t[i + 1] == "dport":
                if p.proto != w or p.dport != int(t[i + 2]):
                    return nomatch
                i += 3
            elif w == "meta" and t[i + 1] == "l4proto" and t[i + 2] == "{":
                end = t.index("}", i)
                if p.proto not in t[i + 3 : end]:
                    return nomatch
                i = end + 1
            elif w == "meta" and t[i + 1] == "l4proto" and t[i + 2] != ".":
                if p.proto != t[i + 2]:
                    return nomatch
                i += 3
            elif w == "meta" and t[i + 1] == "mark" and t[i + 2] == "set":
                bits = int(t[i + 6], 16)
                mark = p.mark | bits if t[i + 5] == "|" else p.mark ^ bits
                p = replace(p, mark=mark)
                i += 7
            elif w == "meta" and t[i + 1] == "mark" and t[i + 2] == "&":
                if (p.mark & int(t[i + 3], 16)) != int(t[i + 5], 16):
                    return nomatch
                i += 6
            elif w == "fib":
                ip = p.src if t[i + 1] == "saddr" else p.dst
                if not self.is_local(ip):
                    return nomatch
                i += 4
            elif w == "iifname":
                negate = t[i + 1] == "!="
                name = t[i + 2 if negate else i + 1]
                ok = p.iface.startswith(name[:-1]) if name.endswith("*") else p.iface == name
                if ok == negate:
                    return nomatch
                i += 3 if negate else 2
            elif w == "numgen":
                # `numgen random mod K V`: either way is possible.
                hit = self._run(t, i + 5, p)
                return hit + nomatch
            elif w == "update":
                i += 6  # `update @set { ip saddr }`: remembers the client; nothing to match
            elif w == "dnat" and t[i + 2] == "addr":
                # `dnat ip addr . port to <key> . numgen random mod N map @M`: every index.
                to = t.index("to", i)
                gen = t.index("numgen", to)
                key = " . ".join(self._field(p, t[j + 1]) for j in range(to + 1, gen, 3))
                table = self.table.elements.get(t[gen + 5][1:], {})
                out = []
                for k in range(int(t[gen + 3])):
                    target = table.get(f"{key} . {k}")
                    if target is None:
                        out += nomatch  # a missing element breaks the rule, as a failed lookup
                        continue
                    ip, _, port = target.partition(" . ")
                    out.append(self._dnat(p, ip, port))
                return out
            elif w == "dnat":
                if t[i + 2] == "numgen":
                    body = t[t.index("{", i) + 1 : t.index("}", i)]
                    return [self._dnat(p, body[k + 2], body[k + 4]) for k in range(0, len(body), 5)]
                host, _, port = t[i + 2].rpartition(":")
                return [self._dnat(p, host.strip("[]"), port)]
            elif w == "masquerade":
                return [(replace(p, masquerade=True), ACCEPT)]
            elif w in ("jump", "goto"):
                return self._after_verdict(self._verdict(f"{w} {t[i + 1]}", p))
            elif w in ("drop", "reject", "accept", "return"):
                return self._verdict(w, p)
            else:
                raise ValueError(f"tracer does not understand {w!r} in: {' '.join(t)}")
        return [(p, CONTINUE)]

    @staticmethod
    def _dnat(p: Packet, ip: str, port: str) -> tuple[Packet, str]:
        # Later chains (filter after DNAT, postrouting) see the new destination.
        shown = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        return replace(p, dnat=shown, dst=ip, dport=int(port)), ACCEPT

    @staticmethod
    def _after_verdict(results: list[tuple[Packet, str]]) -> list[tuple[Packet, str]]:
        return results

    def _concat(self, t: tuple[str, ...], i: int, p: Packet) -> tuple[str, int]:
        parts = []
        while True:
            parts.append(self._field(p, t[i + 1]))
            i += 2
            if i < len(t) and t[i] == ".":
                i += 1
                continue
            return " . ".join(parts), i

    def _member(self, name: str, key: str) -> bool:
        if name.startswith("affinity-"):
            return self.affinity.get(name) == key
        elements = self.table.elements.get(name, {})
        if key in elements:
            return True
        if name.endswith("allow"):
            # An interval set: the last field of an element may be a CIDR.
            head, _, ip = key.rpartition(" . ")
            return any(k.rpartition(" . ")[0] == head and _in(ip, k.rpartition(" . ")[2]) for k in elements)
        return False
