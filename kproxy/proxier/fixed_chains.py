"""The fixed chains the iptables and IPVS modes share, rendered once for both. Pure.

- nat KPROXY-MARK-MASQ marks a packet for masquerade; nat KPROXY-POSTROUTING masquerades what
  is marked (fully random) and clears the mark, so a packet that traverses the stack again is
  not masqueraded twice.
- filter KPROXY-FORWARD drops INVALID packets (unless nf_conntrack_tcp_be_liberal is set) and
  accepts marked and established traffic, so Services work under a DROP forward policy.
- filter KPROXY-FIREWALL, for IPv4 with localhost NodePorts only: the route_localnet guard
  (CVE-2020-8558), with its jumps from INPUT and OUTPUT.

Both modes write these chains under the same names with the same rules, so switching modes
finds them as the other mode left them. The one difference is a parameter: the IPVS mode
masquerades hairpin traffic (an endpoint reaching itself, ipset KPROXY-LOOP-BACK) with rules at
the head of KPROXY-POSTROUTING (`postrouting_head`), where the iptables mode marks it in each
endpoint's SEP chain instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from kproxy.model import IPFamily
from kproxy.node import NodeContext
from kproxy.proxier import names

NAT = "nat"
FILTER = "filter"

Jump = tuple[str, str, str, str, str]

# Jumps from the built-in chains to the fixed chains: (table, built-in chain, match, our chain,
# comment). Each mode places them in its own jump list.
FORWARD_JUMP: Jump = (FILTER, "FORWARD", "", names.FORWARD, "kproxy forwarding rules")
POSTROUTING_JUMP: Jump = (NAT, "POSTROUTING", "", names.POSTROUTING, "kproxy postrouting rules")
LOCALNET_JUMPS: tuple[Jump, ...] = (
    (FILTER, "INPUT", "", names.LOCALNET_FIREWALL, "kproxy localnet firewall"),
    (FILTER, "OUTPUT", "", names.LOCALNET_FIREWALL, "kproxy localnet firewall"),
)


@dataclass(frozen=True, slots=True)
class FixedChains:
    """The shared chains of one family, as full restore lines (`-A CHAIN ...`)."""

    postrouting: tuple[str, ...]
    mark_masq: tuple[str, ...]
    forward: tuple[str, ...]
    # Empty without the route_localnet guard; then neither the chain nor its jumps are written.
    localnet_firewall: tuple[str, ...]

    @property
    def nat(self) -> dict[str, tuple[str, ...]]:
        return {names.POSTROUTING: self.postrouting, names.MARK_MASQ: self.mark_masq}

    @property
    def localnet(self) -> dict[str, tuple[str, ...]]:
        """The guard chain (filter), or nothing."""
        return {names.LOCALNET_FIREWALL: self.localnet_firewall} if self.localnet_firewall else {}

    @property
    def localnet_jumps(self) -> tuple[Jump, ...]:
        return LOCALNET_JUMPS if self.localnet_firewall else ()


def localnet_guard(ctx: NodeContext) -> bool:
    """Whether localhost NodePorts (IPv4 only) need the route_localnet guard."""
    return ctx.family is IPFamily.V4 and ctx.localhost_nodeports


def fixed_chains(ctx: NodeContext, *, postrouting_head: tuple[str, ...] = ()) -> FixedChains:
    """The shared chains for `ctx`; `postrouting_head` goes first in KPROXY-POSTROUTING."""
    mark = f"{ctx.mark}/{ctx.mark}"
    postrouting = (
        *postrouting_head,
        f"-A {names.POSTROUTING} -m mark ! --mark {mark} -j RETURN",
        # Clear the mark so a packet that traverses the stack again is not masqueraded twice.
        f"-A {names.POSTROUTING} -j MARK --xor-mark {ctx.mark}",
        f'-A {names.POSTROUTING} -m comment --comment "kproxy service traffic requiring SNAT" -j MASQUERADE --random-fully',
    )
    forward = []
    if not ctx.conntrack_tcp_liberal:
        # An INVALID packet that slips past conntrack would reach the pod un-NATed and draw a RST.
        forward.append(f"-A {names.FORWARD} -m conntrack --ctstate INVALID -j DROP")
    forward.append(f'-A {names.FORWARD} -m comment --comment "kproxy forwarding rules" -m mark --mark {mark} -j ACCEPT')
    forward.append(
        f'-A {names.FORWARD} -m comment --comment "kproxy forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )
    localnet: tuple[str, ...] = ()
    if localnet_guard(ctx):
        localnet = (
            f'-A {names.LOCALNET_FIREWALL} -m comment --comment "block incoming localnet connections" '
            "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        )
    return FixedChains(
        postrouting=postrouting,
        mark_masq=(f"-A {names.MARK_MASQ} -j MARK --or-mark {ctx.mark}",),
        forward=tuple(forward),
        localnet_firewall=localnet,
    )
