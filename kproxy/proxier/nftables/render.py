"""The nftables mode, pure: one family's view and node context in, the desired table out.

The layout follows upstream's nftables mode (pkg/proxy/nftables, see docs/mode-nftables.md):
base chains at upstream's hooks and priorities, dispatch keyed on `address . protocol . port`
and `protocol . port`, the no-endpoint REJECT / no-local-endpoint DROP maps checked from the
filter hooks, the `cluster-ips` REJECT of unknown ports, masquerading by mark. It uses far fewer
kernel objects, because at scale the kernel's cost is per object (docs/mode-nftables.md,
"Kernel interface: measured"):

- **Most Service ports are only elements (the shared layout).** A Service port without session
  affinity, external IPs, LoadBalancer IPs or `externalTrafficPolicy: Local` (ClusterIP and
  NodePort Services, nearly all of a cluster) owns no chain and no set: its ClusterIP key is an
  element of `service-ips-N` (N: how many endpoints it balances over), its NodePort one of
  `service-nodeports-N`, its endpoints elements of its protocol's `backends-tcp` (`VIP . port .
  index : endpoint . port`) and `nodeport-backends-tcp`. One chain per endpoint count, `lb-N`,
  picks `numgen random mod N` and DNATs through the backends map in one rule per protocol. Dispatch to `lb-N` is a rule
  per count on a plain set, not a verdict-map element: adding a `goto` element makes the kernel
  re-validate the whole jump graph on commit, which grows with the table, while adding a plain
  element costs the same at any size.
- **No chain per endpoint**, even for the Service ports that keep their own chain (below): it
  picks its endpoint and DNATs in one rule, `dnat to numgen random mod N map { 0 : ip . port,
  ... }`. Upstream's endpoint chain held two more things: the hairpin masquerade, done here by
  one global set `hairpin-ips` of `endpoint . endpoint` pairs matched in `masquerading` (a
  DNATed packet whose source is its new destination), and the affinity update, done here in
  the Service chain.
- **Own chains only where behaviour needs them**: ClientIP affinity (one timed set per
  endpoint, as upstream; the Service chain first sends a remembered client to its endpoint,
  then chooses one by a `numgen random mod (N-i) 0` cascade that records the choice, uniform
  as iptables' statistic), eTP Local (its short-circuit rules), and external IPs or LB IPs
  (two Services may claim one external address and port; a verdict-map key is claimed by one).
  These are reached by `goto` from the verdict maps `service-ips` and `service-nodeports`.
- **No firewall chain per Service.** `loadBalancerSourceRanges` are elements of two sets:
  `firewall-ips` (which LB IP . protocol . port are guarded) and `firewall-allow` (those keys
  concatenated with the allowed source ranges, an interval set); one rule drops the rest.
- **No external chain for `externalTrafficPolicy: Cluster`.** External destinations go straight
  to the Service chain, which marks every packet whose destination is not the ClusterIP.

Each Service port renders into its own `ServiceObjects` value; a render given the previous
`Ruleset` reuses the value of every Service port whose inputs did not change (and, told which
changed, looks at no other), so the plan (plan.py) can write only what changed. The shared
chains and sets follow from how many Service ports use each endpoint count, kept as a count.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import cast

from kproxy.heap import gc_paused
from kproxy.model import Endpoint, IPFamily, ServicePort, ServicePortName
from kproxy.node import LocalDetector, NodeContext
from kproxy.proxier.nftables import names
from kproxy.topology import EndpointSets, categorize

REJECT_VERDICT = f"goto {names.REJECT_CHAIN}"
DROP_VERDICT = "drop"


@dataclass(frozen=True, slots=True)
class Container:
    """A named set or map of the table."""

    name: str
    # Named types ("ipv4_addr . inet_service"), or with `typeof` the expressions whose types
    # they are (a numgen key has no named type).
    type: str
    kind: str = "set"  # or "map"
    flags: tuple[str, ...] = ()
    timeout: int = 0
    comment: str = ""
    typeof: bool = False

    def spec(self) -> str:
        """The body of `add set|map ip kproxy NAME { ... }`."""
        parts = [f"{'typeof' if self.typeof else 'type'} {self.type} ;"]
        if self.flags:
            parts.append(f"flags {','.join(self.flags)} ;")
        if self.timeout:
            parts.append(f"timeout {self.timeout}s ;")
        if self.comment:
            parts.append(f'comment "{self.comment}" ;')
        return "{ " + " ".join(parts) + " }"


@dataclass(frozen=True, slots=True)
class Chain:
    name: str
    rules: tuple[str, ...]
    # Base chains only: "type filter hook input priority 0".
    hook: str = ""


# An element: (container, key, value); value "" for a set's element.
Element = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class ServiceObjects:
    """Everything one Service port contributes to the table."""

    chains: tuple[Chain, ...] = ()
    elements: tuple[Element, ...] = ()
    sets: tuple[Container, ...] = ()  # its affinity sets
    no_local_internal: bool = False
    no_local_external: bool = False
    # The shared balancing chains its elements go through (`lb-3`, `nodeport-lb-3`).
    shared: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ruleset:
    """The desired table of one family."""

    family: IPFamily
    # Base chains and the fixed regular chains, the fixed sets and maps, and their elements
    # that are not any Service's (the NodePort addresses).
    chains: tuple[Chain, ...]
    containers: tuple[Container, ...]
    elements: tuple[Element, ...]
    services: Mapping[ServicePortName, ServiceObjects] = field(default_factory=dict)
    ctx: NodeContext | None = None
    inputs: Mapping[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]] = field(default_factory=dict)
    # The shared layout's chains and sets, and how many Service ports use each shared chain.
    shared_chains: tuple[Chain, ...] = ()
    shared_sets: tuple[Container, ...] = ()
    uses: Mapping[str, int] = field(default_factory=dict)
    # Service ports with endpoints elsewhere but none here for internal / external traffic.
    no_local_internal: int = 0
    no_local_external: int = 0
    # Chains and rules of the Service ports' own chains.
    own_chains: int = 0
    own_rules: int = 0
    endpoint_count: int = 0
    # An in-place render: what the ports it rendered had in the previous render (None: absent).
    replaced: Mapping[ServicePortName, ServiceObjects | None] = field(default_factory=dict)

    @property
    def chain_count(self) -> int:
        return len(self.chains) + len(self.shared_chains) + self.own_chains

    @property
    def rule_count(self) -> int:
        fixed = sum(len(c.rules) for c in (*self.chains, *self.shared_chains))
        return fixed + self.own_rules

    @property
    def nft_family(self) -> str:
        return nft_family(self.family)

    def __str__(self) -> str:
        from kproxy.proxier.nftables.plan import full_script

        return full_script(self)

    def all_chains(self) -> dict[str, Chain]:
        out = {c.name: c for c in (*self.chains, *self.shared_chains)}
        for objs in self.services.values():
            out.update((c.name, c) for c in objs.chains)
        return out

    def all_elements(self) -> dict[str, dict[str, str]]:
        """Every container's elements, key -> value; where two Services claim one key with
        different values the first in name order wins, as the first rule would in iptables."""
        out: dict[str, dict[str, str]] = {c.name: {} for c in (*self.containers, *self.shared_sets)}
        for cont, key, value in self.elements:
            out[cont].setdefault(key, value)
        for spn in sorted(self.services):
            for cont, key, value in self.services[spn].elements:
                out[cont].setdefault(key, value)
        return out

    def all_sets(self) -> dict[str, Container]:
        out = {c.name: c for c in (*self.containers, *self.shared_sets)}
        for objs in self.services.values():
            out.update((s.name, s) for s in objs.sets)
        return out


def nft_family(family: IPFamily) -> str:
    return "ip" if family is IPFamily.V4 else "ip6"


def _addr_type(family: IPFamily) -> str:
    return "ipv4_addr" if family is IPFamily.V4 else "ipv6_addr"


def local_match(detector: LocalDetector, ipx: str, negate: bool = False) -> str:
    """The nft match for traffic the detector calls a pod's (or, negated, not a pod's)."""
    op = "!= " if negate else ""
    if detector.is_cidr:
        return f"{ipx} saddr {op}{detector.value}"
    if detector.is_bridge:
        return f'iifname {op}"{detector.value}"'
    return f'iifname {op}"{detector.value}*"'  # an interface-name prefix


def render(
    ports: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
    ctx: NodeContext,
    previous: Ruleset | None = None,
    changed: Collection[ServicePortName] | None = None,
    in_place: bool = False,
) -> Ruleset:
    """The desired table for one family; `ports` must be this family's view.

    With `previous`, a Service port whose inputs equal last time's reuses its rendered objects;
    when `changed` is given too, only the Service ports it names are looked at, so a sync after
    one change costs the same at any size. `in_place` lets that render take over `previous`'s
    per-port dicts instead of copying them (50,000 entries each): `previous` is then spent, and
    the result's `replaced` holds what the changed ports had in it, for the plan.
    """
    reuse = previous is not None and previous.ctx == ctx
    replaced: dict[ServicePortName, ServiceObjects | None] = {}
    if previous is not None and reuse and changed is not None:
        services = cast(dict[ServicePortName, ServiceObjects], previous.services)
        inputs = cast(dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]], previous.inputs)
        if not in_place:
            services, inputs = dict(services), dict(inputs)
        tally = _Tally(previous)
        todo: Collection[ServicePortName] = changed
    else:
        services, inputs, tally = {}, {}, _Tally(None)
        todo = list(ports)
        in_place = False
    prev_inputs = previous.inputs if previous is not None and reuse else {}
    prev_objs = previous.services if previous is not None and reuse else {}
    with gc_paused():  # hundreds of thousands of acyclic objects on a full render
        for name in todo:
            old, old_objs = prev_inputs.get(name), prev_objs.get(name)
            if in_place:
                replaced[name] = old_objs
            current = services.pop(name, None)
            was = inputs.pop(name, None)
            if current is not None and was is not None:
                tally.add(current, len(was[1]), -1)
            svc = ports.get(name)
            if svc is None:
                continue
            eps = endpoints.get(name, ())
            if old is not None and old_objs is not None and (old[0] is svc or old[0] == svc) and old[1] == eps:
                objs, inputs[name] = old_objs, old
            else:
                objs, inputs[name] = render_service(svc, eps, ctx), (svc, eps)
            services[name] = objs
            tally.add(objs, len(eps))
    chains, containers, elements = fixed(ctx)
    if previous is not None and reuse and tally.uses == previous.uses:
        shared_chains, shared_sets = previous.shared_chains, previous.shared_sets
    else:
        shared_chains, shared_sets = shared_objects(tally.uses, ctx)
    return Ruleset(
        ctx.family,
        chains,
        containers,
        elements,
        services,
        ctx,
        inputs,
        shared_chains,
        shared_sets,
        dict(tally.uses),
        tally.no_local_internal,
        tally.no_local_external,
        tally.own_chains,
        tally.own_rules,
        tally.endpoints,
        replaced,
    )


class _Tally:
    """What the Ruleset counts over its Service ports, kept up to date one port at a time."""

    def __init__(self, previous: Ruleset | None) -> None:
        self.uses: Counter[str] = Counter(previous.uses if previous is not None else {})
        self.no_local_internal = previous.no_local_internal if previous is not None else 0
        self.no_local_external = previous.no_local_external if previous is not None else 0
        self.own_chains = previous.own_chains if previous is not None else 0
        self.own_rules = previous.own_rules if previous is not None else 0
        self.endpoints = previous.endpoint_count if previous is not None else 0

    def add(self, objs: ServiceObjects, endpoints: int, sign: int = 1) -> None:
        for chain in objs.shared:
            self.uses[chain] += sign
            if not self.uses[chain]:
                del self.uses[chain]
        self.no_local_internal += sign * objs.no_local_internal
        self.no_local_external += sign * objs.no_local_external
        self.own_chains += sign * len(objs.chains)
        self.own_rules += sign * sum(len(c.rules) for c in objs.chains)
        self.endpoints += sign * endpoints


def _lb_count(chain: str) -> int:
    return int(chain.rpartition("-")[2])


def shared_objects(uses: Mapping[str, int], ctx: NodeContext) -> tuple[tuple[Chain, ...], tuple[Container, ...]]:
    """The balancing chains `lb-N` / `nodeport-lb-N` in use, their key sets, and the two
    dispatch chains with one rule per endpoint count."""
    ipx = nft_family(ctx.family)
    addr = _addr_type(ctx.family)
    lbs = sorted((c for c in uses if c.startswith("lb-")), key=_lb_count)
    nps = sorted((c for c in uses if c.startswith("nodeport-lb-")), key=_lb_count)
    dest_key = f"{ipx} daddr . meta l4proto . th dport"
    # One DNAT rule per protocol, each through its own map: nft 1.0.6 cannot add a rule that
    # looks up a map declared with `th dport` in its key once that map is in the kernel
    # ("conflicting protocols specified: tcp vs. th"), and a new endpoint count adds one.
    dnat = f"dnat {ipx} addr . port to"
    head: tuple[str, ...] = ()
    if ctx.masquerade_all:
        head = (f"jump {names.MARK_MASQ}",)
    elif ctx.local_detector.implemented:
        # Off-cluster traffic to a VIP may be routed back out to another node: masquerade it
        # so the reply comes back through us.
        head = (f"{local_match(ctx.local_detector, ipx, negate=True)} jump {names.MARK_MASQ}",)
    chains = [
        Chain(names.SHARED_SERVICE_IPS, tuple(f"{dest_key} @{names.lb_keys(c)} goto {c}" for c in lbs)),
        Chain(names.SHARED_NODEPORTS, tuple(f"meta l4proto . th dport @{names.lb_keys(c)} goto {c}" for c in nps)),
    ]
    chains += [
        Chain(
            c,
            (
                *head,
                *(
                    f"meta l4proto {p} {dnat} {ipx} daddr . {p} dport . numgen random mod {_lb_count(c)}"
                    f" map @{names.backends(p)}"
                    for p in names.PROTOCOLS
                ),
            ),
        )
        for c in lbs
    ]
    # NodePort traffic with eTP Cluster may leave for another node: always masqueraded.
    chains += [
        Chain(
            c,
            (
                f"jump {names.MARK_MASQ}",
                *(
                    f"meta l4proto {p} {dnat} {p} dport . numgen random mod {_lb_count(c)}"
                    f" map @{names.nodeport_backends(p)}"
                    for p in names.PROTOCOLS
                ),
            ),
        )
        for c in nps
    ]
    sets = [Container(names.lb_keys(c), f"{addr} . inet_proto . inet_service") for c in lbs]
    sets += [Container(names.lb_keys(c), "inet_proto . inet_service") for c in nps]
    return tuple(chains), tuple(sets)


def nodeport_ips(ctx: NodeContext) -> tuple[str, ...] | None:
    """Where NodePorts answer: upstream's nftables mode takes the node's primary IP when
    --nodeport-addresses is unset, and never a loopback address (no localhost NodePorts)."""
    ips = ctx.nodeport_ips
    if ips is None:
        ips = (ctx.node_ip,) if ctx.node_ip else None
    if ips is None:
        return None
    return tuple(ip for ip in ips if not ipaddress.ip_address(ip).is_loopback)


def fixed(ctx: NodeContext) -> tuple[tuple[Chain, ...], tuple[Container, ...], tuple[Element, ...]]:
    """The base chains, the fixed regular chains, the sets and maps, the NodePort addresses."""
    fam = ctx.family
    ipx = nft_family(fam)
    addr = _addr_type(fam)
    loopback = "127.0.0.0/8" if fam is IPFamily.V4 else "::1"
    n = names
    new = "ct state new"
    nodeports = nodeport_ips(ctx)
    if nodeports is None:
        np_match = f"fib daddr type local {ipx} daddr != {loopback}"
        np_check = f"{ipx} daddr != {loopback} meta l4proto . th dport vmap @{n.NO_ENDPOINT_NODEPORTS}"
    else:
        np_match = f"{ipx} daddr @{n.NODEPORT_IPS}"
        np_check = f"{ipx} daddr @{n.NODEPORT_IPS} meta l4proto . th dport vmap @{n.NO_ENDPOINT_NODEPORTS}"
    np_dispatch = f"{np_match} meta l4proto . th dport vmap @{n.SERVICE_NODEPORTS}"
    forward = []
    if not ctx.conntrack_tcp_liberal:
        # An INVALID packet that slips past conntrack would reach the pod un-NATed and draw a
        # RST (kubernetes #74839); upstream's nftables mode dropped this rule, the iptables
        # mode keeps it, and so do we.
        forward.append("ct state invalid drop")
    forward += [f"{new} jump {n.SERVICE_ENDPOINTS_CHECK}", f"{new} jump {n.CLUSTER_IPS_CHECK}"]
    mark = ctx.mark
    dest_key = f"{ipx} daddr . meta l4proto . th dport"
    # Priorities as numbers: nft names them per hook (no `dstnat` in output); dstnat is -100,
    # srcnat 100, filter 0, as upstream's DNATPriority-10 for the pre-DNAT filter chains.
    chains = (
        # Filtering on the destination as the client wrote it must run before DNAT.
        Chain(
            n.FILTER_PREROUTING_PRE_DNAT,
            (f"{new} jump {n.FIREWALL_CHECK}",),
            "type filter hook prerouting priority -110",
        ),
        Chain(n.FILTER_OUTPUT_PRE_DNAT, (f"{new} jump {n.FIREWALL_CHECK}",), "type filter hook output priority -110"),
        # The endpoint checks run after DNAT, so a packet already sent to an endpoint (a pod's
        # short-circuit under eTP Local) is not dropped; REJECT needs input/forward/output.
        Chain(
            n.FILTER_INPUT,
            (f"{new} jump {n.NODEPORT_ENDPOINTS_CHECK}", f"{new} jump {n.SERVICE_ENDPOINTS_CHECK}"),
            "type filter hook input priority 0",
        ),
        Chain(n.FILTER_FORWARD, tuple(forward), "type filter hook forward priority 0"),
        Chain(
            n.FILTER_OUTPUT,
            (f"{new} jump {n.SERVICE_ENDPOINTS_CHECK}", f"{new} jump {n.CLUSTER_IPS_CHECK}"),
            "type filter hook output priority 0",
        ),
        Chain(n.NAT_PREROUTING, (f"jump {n.SERVICES}",), "type nat hook prerouting priority -100"),
        Chain(n.NAT_OUTPUT, (f"jump {n.SERVICES}",), "type nat hook output priority -100"),
        Chain(n.NAT_POSTROUTING, (f"jump {n.MASQUERADING}",), "type nat hook postrouting priority 100"),
        Chain(
            n.SERVICES,
            (
                f"{dest_key} vmap @{n.SERVICE_IPS}",
                f"jump {n.SHARED_SERVICE_IPS}",
                np_dispatch,
                f"{np_match} jump {n.SHARED_NODEPORTS}",
            ),
        ),
        Chain(n.SERVICE_ENDPOINTS_CHECK, (f"{dest_key} vmap @{n.NO_ENDPOINT_SERVICES}",)),
        Chain(n.NODEPORT_ENDPOINTS_CHECK, (np_check,)),
        # A live ClusterIP answers only on its Service ports (upstream's nftables mode).
        Chain(n.CLUSTER_IPS_CHECK, (f"{ipx} daddr @{n.CLUSTER_IPS} reject",)),
        Chain(
            n.FIREWALL_CHECK,
            (f"{dest_key} @{n.FIREWALL_IPS} {dest_key} . {ipx} saddr != @{n.FIREWALL_ALLOW} drop",),
        ),
        Chain(n.REJECT_CHAIN, ("reject",)),
        Chain(n.MARK_MASQ, (f"meta mark set meta mark | {mark}",)),
        Chain(
            n.MASQUERADING,
            (
                # Hairpin: a pod reaching itself through a Service is masqueraded, or its reply
                # would skip the reverse NAT.
                f"ct status dnat {ipx} saddr . {ipx} daddr @{n.HAIRPIN} jump {n.MARK_MASQ}",
                f"meta mark & {mark} == 0 return",
                # Clear the mark so a packet traversing the stack again is not masqueraded twice.
                f"meta mark set meta mark ^ {mark}",
                "masquerade fully-random",
            ),
        ),
    )
    vkey = f"{addr} . inet_proto . inet_service"
    containers = (
        Container(n.CLUSTER_IPS, addr, comment="Active ClusterIPs"),
        Container(n.NODEPORT_IPS, addr, comment="IPs that accept NodePort traffic"),
        Container(
            n.SERVICE_IPS, f"{vkey} : verdict", "map", comment="ClusterIP, ExternalIP and LoadBalancer IP traffic"
        ),
        Container(n.SERVICE_NODEPORTS, "inet_proto . inet_service : verdict", "map", comment="NodePort traffic"),
        Container(n.NO_ENDPOINT_SERVICES, f"{vkey} : verdict", "map", comment="services without usable endpoints"),
        Container(
            n.NO_ENDPOINT_NODEPORTS, "inet_proto . inet_service : verdict", "map", comment="nodeports without endpoints"
        ),
        Container(n.FIREWALL_IPS, vkey, comment="destinations subject to loadBalancerSourceRanges"),
        Container(n.FIREWALL_ALLOW, f"{vkey} . {addr}", flags=("interval",), comment="allowed sources"),
        Container(n.HAIRPIN, f"{addr} . {addr}", comment="endpoint . endpoint: hairpin traffic"),
        *_backend_maps(ipx),
    )
    elements = tuple((n.NODEPORT_IPS, ip, "") for ip in nodeports or ())
    return chains, containers, elements


def _backend_maps(ipx: str) -> tuple[Container, ...]:
    """Per protocol: `backends-P` (VIP . port . index) and `nodeport-backends-P` (NodePort .
    index) to endpoint . port, the shared layout's endpoints."""
    kinds = (
        (names.backends, "VIP . port", f"{ipx} daddr . {{p}} dport"),
        (names.nodeport_backends, "NodePort", "{p} dport"),
    )
    return tuple(
        Container(
            name_of(p),
            f"{key.format(p=p)} . numgen random mod 1 : {ipx} daddr . {p} dport",
            "map",
            comment=f"{what} . index: endpoint of a shared-layout {p.upper()} Service port",
            typeof=True,
        )
        for name_of, what, key in kinds
        for p in names.PROTOCOLS
    )


def _dnat_target(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def balance(svc: ServicePort, eps: tuple[Endpoint, ...], ipx: str) -> list[str]:
    """The rules that choose one of `eps` and DNAT to it (with ClientIP affinity, remembered)."""
    proto = f"meta l4proto {svc.protocol.lowercase}"
    n = len(eps)
    if not svc.affinity_timeout:
        if n == 1:
            return [f"{proto} dnat to {_dnat_target(eps[0].ip, eps[0].port)}"]
        choices = ", ".join(f"{i} : {ep.ip} . {ep.port}" for i, ep in enumerate(eps))
        return [f"{proto} dnat to numgen random mod {n} map {{ {choices} }}"]
    sets = [names.affinity_set(svc.name, ep.ip, ep.port) for ep in eps]
    rules = [
        f"{ipx} saddr @{s} update @{s} {{ {ipx} saddr }} {proto} dnat to {_dnat_target(ep.ip, ep.port)}"
        for s, ep in zip(sets, eps, strict=True)
    ]
    for i, (s, ep) in enumerate(zip(sets, eps, strict=True)):
        # Each rule draws anew: 1/(n-i) of what is left, so every endpoint gets 1/n.
        pick = f"numgen random mod {n - i} 0 " if i < n - 1 else ""
        rules.append(f"{pick}update @{s} {{ {ipx} saddr }} {proto} dnat to {_dnat_target(ep.ip, ep.port)}")
    return rules


def _collapse(cidrs: list[str]) -> list[str]:
    """Overlapping ranges merged: an interval set refuses overlapping elements."""
    v4 = [n for n in map(_network, cidrs) if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in map(_network, cidrs) if isinstance(n, ipaddress.IPv6Network)]
    return [str(c) for c in (*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6))]


def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr, strict=False)


def is_shared(svc: ServicePort) -> bool:
    """Whether a Service port is elements of the shared layout only (see the module's text)."""
    return not (
        svc.affinity_timeout
        or svc.external_ips
        or svc.lb_ips
        or (svc.externally_accessible and svc.external_policy_local)
    )


def render_service(svc: ServicePort, eps: tuple[Endpoint, ...], ctx: NodeContext) -> ServiceObjects:
    sets = categorize(eps, svc, ctx.node_name, ctx.zone)
    if is_shared(svc):
        return _shared_service(svc, sets)
    return _own_chains(svc, sets, ctx)


def _backends(container: str, key: str, eps: tuple[Endpoint, ...]) -> list[Element]:
    return [(container, f"{key} . {i}", f"{ep.ip} . {ep.port}") for i, ep in enumerate(eps)]


def _shared_service(svc: ServicePort, sets: EndpointSets) -> ServiceObjects:
    proto = svc.protocol.lowercase
    key = f"{svc.cluster_ip} . {proto} . {svc.port}"
    internal = sets.local if svc.internal_policy_local else sets.cluster
    elements: list[Element] = [(names.CLUSTER_IPS, svc.cluster_ip, "")]
    shared: list[str] = []
    if internal:
        lb = names.lb_chain(len(internal))
        shared.append(lb)
        elements.append((names.lb_keys(lb), key, ""))
        elements += _backends(names.backends(proto), f"{svc.cluster_ip} . {svc.port}", internal)
    else:
        elements.append((names.NO_ENDPOINT_SERVICES, key, DROP_VERDICT if sets.has_any else REJECT_VERDICT))
    if svc.node_port:
        np_key = f"{proto} . {svc.node_port}"
        if sets.cluster:
            lb = names.nodeport_lb_chain(len(sets.cluster))
            shared.append(lb)
            elements.append((names.lb_keys(lb), np_key, ""))
            elements += _backends(names.nodeport_backends(proto), str(svc.node_port), sets.cluster)
        else:
            elements.append((names.NO_ENDPOINT_NODEPORTS, np_key, REJECT_VERDICT))
    elements.extend((names.HAIRPIN, f"{ep.ip} . {ep.ip}", "") for ep in sets.reachable)
    return ServiceObjects(
        elements=tuple(elements), no_local_internal=sets.has_any and not internal, shared=tuple(shared)
    )


def _own_chains(svc: ServicePort, sets: EndpointSets, ctx: NodeContext) -> ServiceObjects:
    spn = svc.name
    ipx = nft_family(ctx.family)
    proto = svc.protocol.lowercase
    has_any = sets.has_any

    svc_chain = names.service_chain(spn)
    local_chain = names.local_chain(spn)
    ext_chain = names.external_chain(spn)
    uses_cluster_chain = bool(sets.cluster) and svc.uses_cluster_endpoints

    internal_chain, has_internal = svc_chain, has_any
    if svc.internal_policy_local:
        internal_chain, has_internal = local_chain, bool(sets.local)
    has_external = bool(sets.local) if svc.external_policy_local else has_any
    uses_ext_chain = has_any and svc.externally_accessible and svc.external_policy_local
    # Without eTP Local, external destinations go straight to the Service chain.
    ext_target = ext_chain if svc.external_policy_local else svc_chain

    if not has_any:
        int_verdict = ext_verdict = REJECT_VERDICT
    else:
        int_verdict = ext_verdict = DROP_VERDICT

    cip, port = svc.cluster_ip, svc.port
    elements: list[Element] = [(names.CLUSTER_IPS, cip, "")]
    if has_internal:
        elements.append((names.SERVICE_IPS, f"{cip} . {proto} . {port}", f"goto {internal_chain}"))
    else:
        elements.append((names.NO_ENDPOINT_SERVICES, f"{cip} . {proto} . {port}", int_verdict))
    for ip in (*svc.external_ips, *svc.lb_ips):
        if has_any:
            elements.append((names.SERVICE_IPS, f"{ip} . {proto} . {port}", f"goto {ext_target}"))
        if not has_external:
            elements.append((names.NO_ENDPOINT_SERVICES, f"{ip} . {proto} . {port}", ext_verdict))
    if svc.lb_ips and svc.lb_source_ranges:
        allowed = list(svc.lb_source_ranges)
        if ctx.node_ip and any(_contains(c, ctx.node_ip) for c in svc.lb_source_ranges):
            # A node reaching an LB IP bound locally arrives with the LB IP as its source.
            allowed += list(svc.lb_ips)
        for ip in svc.lb_ips:
            key = f"{ip} . {proto} . {port}"
            elements.append((names.FIREWALL_IPS, key, ""))
            elements.extend((names.FIREWALL_ALLOW, f"{key} . {cidr}", "") for cidr in _collapse(allowed))
    if svc.node_port:
        key = f"{proto} . {svc.node_port}"
        if has_any:
            # NodePorts are not subject to loadBalancerSourceRanges, as upstream.
            elements.append((names.SERVICE_NODEPORTS, key, f"goto {ext_target}"))
        if not has_external:
            elements.append((names.NO_ENDPOINT_NODEPORTS, key, ext_verdict))
    elements.extend((names.HAIRPIN, f"{ep.ip} . {ep.ip}", "") for ep in sets.reachable)

    detector = ctx.local_detector
    internal_head: list[str] = []
    if has_internal:
        dest = f"{ipx} daddr {cip} {proto} dport {port}"
        if ctx.masquerade_all:
            internal_head.append(f"{dest} jump {names.MARK_MASQ}")
        elif detector.implemented:
            # Off-cluster traffic to a VIP may be routed back out to another node: masquerade
            # it so the reply comes back through us.
            internal_head.append(f"{dest} {local_match(detector, ipx, negate=True)} jump {names.MARK_MASQ}")

    chains: list[Chain] = []
    if uses_cluster_chain:
        rules = list(internal_head) if internal_chain == svc_chain else []
        if has_any and svc.externally_accessible and not svc.external_policy_local:
            # External destinations (NodePort, LB, external IPs) with eTP Cluster may be sent
            # to another node: always masqueraded, as upstream's external chain does.
            rules.append(f"{ipx} daddr != {cip} jump {names.MARK_MASQ}")
        chains.append(Chain(svc_chain, tuple(rules + balance(svc, sets.cluster, ipx))))
    if svc.internal_policy_local and sets.local:
        chains.append(Chain(local_chain, tuple(internal_head + balance(svc, sets.local, ipx))))
    if uses_ext_chain:
        rules = []
        if detector.implemented:
            # Pods reaching an external address behave as if they went out to the LB and back.
            rules.append(f"{local_match(detector, ipx)} goto {svc_chain}")
        # The node's own traffic is masqueraded (its source would be the LB IP) and sent to
        # every endpoint.
        rules.append(f"fib saddr type local jump {names.MARK_MASQ}")
        rules.append(f"fib saddr type local goto {svc_chain}")
        if sets.local:
            rules += balance(svc, sets.local, ipx)
        chains.append(Chain(ext_chain, tuple(rules)))

    affinity: tuple[Container, ...] = ()
    if svc.affinity_timeout:
        addr = _addr_type(ctx.family)
        affinity = tuple(
            Container(
                names.affinity_set(spn, ep.ip, ep.port),
                addr,
                flags=("dynamic", "timeout"),
                timeout=svc.affinity_timeout,
            )
            for ep in sets.reachable
        )
    return ServiceObjects(
        chains=tuple(chains),
        elements=tuple(elements),
        sets=affinity,
        no_local_internal=has_any and not has_internal,
        no_local_external=has_any and not has_external,
    )


def _contains(cidr: str, ip: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr, strict=False)
