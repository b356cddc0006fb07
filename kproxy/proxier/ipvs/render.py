"""The IPVS mode, pure: cluster state in, the desired IPVS table, dummy-device addresses, ipsets
and the few iptables rules IPVS needs out (plan.py turns what the kernel holds into it).

Its size (about 680 lines) is one render: the four outputs are computed in one pass over the
Service ports and must agree with each other, and the names and text forms they share (ipset
names and entries, `ipvsadm -Ln` lines) are defined here once for render, plan and the tracer.

What it guarantees (docs/mode-ipvs.md has the packet walk-through):

- Every Service port gets a virtual server (VS), masquerade forwarding, on its ClusterIP, each
  externalIP, each LoadBalancer IP and, for a NodePort, each node address (`nodeport_ips`, or
  every non-loopback, non-link-local address of the node: IPVS has no localhost NodePorts, as
  upstream). ClusterIPs, externalIPs and LB IPs are bound to the dummy device `kproxy-ipvs0`
  (unless they already are node addresses), so the node accepts them and IPVS sees them.
- Real servers follow `topology.categorize`: the internal policy's set on the ClusterIP VS, the
  external policy's set on the others (only this node's endpoints under a Local policy, the
  serving-and-terminating fallback included), weight 1 each. Session affinity ClientIP is IPVS
  persistence with the affinity timeout; the scheduler is the configured one (rr by default).
- Observable results match the iptables mode's case by case (tests/unit/test_ipvs_render.py
  lists the few that cannot, and why):
  * no usable endpoint anywhere: the VS stays without real servers and the destination is
    REJECTed in filter (IPVS itself would answer ICMP port unreachable: the same refusal; the
    rule also keeps a local listener on that port from answering);
  * a Local policy with no endpoint on this node while others exist: no VS at all and a DROP in
    filter. A VS without real servers answers with an ICMP error (ip_vs_leave), and for the
    node's own connections IPVS (LOCAL_OUT, priority -98) runs before filter OUTPUT, so only
    the absence of the VS lets the DROP be a silent drop from everywhere;
  * eTP=Local: outside clients keep their address and reach local endpoints only; pods (local
    detector) and the node's own processes are short-circuited to the ClusterIP by a DNAT in nat
    (the node's traffic marked for masquerade), where the cluster-wide VS balances them, as the
    iptables mode's KPROXY-EXT chain does;
  * loadBalancerSourceRanges: checked in mangle PREROUTING/OUTPUT, before nat and before IPVS
    for both outside and the node's own traffic (the iptables mode drops un-DNATed traffic in
    filter, which IPVS would pre-empt for local sources); a range holding the node IP also
    admits the LB IP as source (the node reaching a locally bound LB IP). NodePorts ignore it.
- Masquerade uses the iptables mode's mark chain layout (KPROXY-MARK-MASQ, KPROXY-POSTROUTING;
  fixed_chains.py renders them, and KPROXY-FORWARD, for both modes): off-cluster sources to
  ClusterIPs (local detector, or --masquerade-all; with no detector, the node's own connections
  that took a VIP as source, as upstream), every external destination of an eTP=Cluster
  Service, and hairpin (an endpoint reaching itself, ipset KPROXY-LOOP-BACK).
- The VIP filter (upstream's KUBE-IPVS-FILTER, #72236; here the tail of filter KPROXY-SERVICES):
  a new connection to an address bound to the dummy device on a port that is no Service's is
  REJECTed, so VIPs never expose the node's own services.
- ipset names start with `KPROXY-` (IPv6 ones with `KPROXY-6-`) and fit IPSET_NAME_MAX.

Nothing here touches the kernel: the driver (proxier.py) reads the kernel through the backends,
hands the readings to the plans (plan.py) and applies what they say.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field, replace

from kproxy.config import DEFAULT_SCHEDULER, IpvsConfig
from kproxy.heap import gc_paused
from kproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, family_of
from kproxy.node import NodeContext
from kproxy.proxier import names
from kproxy.proxier.fixed_chains import FORWARD_JUMP, POSTROUTING_JUMP, fixed_chains
from kproxy.proxier.iptables import render as ipt
from kproxy.topology import categorize

MANGLE = "mangle"
FILTER = ipt.FILTER
NAT = ipt.NAT
TABLES = (MANGLE, FILTER, NAT)

# include/uapi/linux/ip_vs.h
SVC_F_PERSISTENT = 0x0001
SVC_F_HASHED = 0x0002  # the kernel sets it on every hashed service: never compared
SVC_F_ONEPACKET = 0x0004
SVC_F_SCHED1 = 0x0008  # sh-fallback / mh-fallback
SVC_F_SCHED2 = 0x0010  # sh-port / mh-port
SVC_F_SCHED3 = 0x0020
FWD_MASQ = 0
FWD_NAMES = {0: "Masq", 1: "Local", 2: "Tunnel", 3: "Route", 4: "Bypass"}

# Fixed chains of the IPVS mode (mangle), beside names.py's shared ones. In filter and nat the
# mode uses only chain names the iptables mode also writes, so that switching to it needs no
# jump of ours removed from a built-in chain.
PROXY_FIREWALL = "KPROXY-PROXY-FIREWALL"  # mangle
SOURCE_RANGES = "KPROXY-SOURCE-RANGES"  # mangle
MANGLE_CHAINS = frozenset({PROXY_FIREWALL, SOURCE_RANGES})


def is_proxier_chain(table: str, name: str) -> bool:
    """A chain the Service proxier (in either mode) owns and may garbage-collect. hostPort's
    chains and the canary share the KPROXY- prefix but belong to other writers."""
    return name in MANGLE_CHAINS if table == MANGLE else names.is_service_chain(name)


# ipsets: base name -> (type, what it holds). The family's prefix goes in front (set_name()).
SET_CLUSTER_IP = "CLUSTER-IP"
SET_EXTERNAL = "EXTERNAL"
SET_EXTERNAL_LOCAL = "EXTERNAL-LOCAL"
SET_LB_FW = "LOAD-BALANCER-FW"
SET_LB_SOURCE_CIDR = "LB-SOURCE-CIDR"
SET_LB_SOURCE_IP = "LB-SOURCE-IP"
SET_LOOP_BACK = "LOOP-BACK"
SET_IPVS_IPS = "IPVS-IPS"
SET_NO_ENDPOINTS = "NO-ENDPOINTS"
SET_NO_LOCAL_ENDPOINTS = "NO-LOCAL-ENDPOINTS"
SET_HEALTH_CHECK = "HEALTH-CHECK-NODE-PORT"

SET_TYPES: dict[str, tuple[str, str]] = {
    SET_CLUSTER_IP: ("hash:ip,port", "every Service ClusterIP:port"),
    SET_EXTERNAL: ("hash:ip,port", "external destinations of eTP=Cluster Services (masqueraded)"),
    SET_EXTERNAL_LOCAL: ("hash:ip,port", "external destinations of eTP=Local Services"),
    SET_LB_FW: ("hash:ip,port", "LB IP:port with loadBalancerSourceRanges"),
    SET_LB_SOURCE_CIDR: ("hash:ip,port,net", "LB IP:port and an allowed source range"),
    SET_LB_SOURCE_IP: ("hash:ip,port,ip", "LB IP:port and an allowed source address"),
    SET_LOOP_BACK: ("hash:ip,port,ip", "endpoint IP:port and itself, for hairpin masquerade"),
    SET_IPVS_IPS: ("hash:ip", "addresses bound to kproxy-ipvs0"),
    SET_NO_ENDPOINTS: ("hash:ip,port", "destinations of Services without endpoints (REJECT)"),
    SET_NO_LOCAL_ENDPOINTS: ("hash:ip,port", "destinations a Local policy leaves without endpoints (DROP)"),
    SET_HEALTH_CHECK: ("bitmap:port", "health check node ports (accepted)"),
}
DEFAULT_MAXELEM = 65536
TMP_SET_PREFIX = "KPROXY-TMP-"


def set_prefix(family: IPFamily) -> str:
    return names.PREFIX if family is IPFamily.V4 else names.PREFIX + "6-"


def set_name(base: str, family: IPFamily) -> str:
    return set_prefix(family) + base


def owns_set(name: str, family: IPFamily) -> bool:
    """Whether the proxier of `family` owns ipset `name` (the two families never touch each other's)."""
    if family is IPFamily.V6:
        return name.startswith(set_prefix(IPFamily.V6)) or name.startswith(TMP_SET_PREFIX + "6-")
    return (
        name.startswith(names.PREFIX)
        and not name.startswith(set_prefix(IPFamily.V6))
        and not name.startswith(TMP_SET_PREFIX + "6-")
    )


def tmp_set_name(name: str, family: IPFamily) -> str:
    """A short, owned, deterministic name to rebuild `name` in before swapping it in."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return TMP_SET_PREFIX + ("6-" if family is IPFamily.V6 else "") + digest


for _base in SET_TYPES:
    for _fam in IPFamily:
        assert len(set_name(_base, _fam)) <= names.IPSET_NAME_MAX, set_name(_base, _fam)
assert len(tmp_set_name("x", IPFamily.V6)) <= names.IPSET_NAME_MAX


# ----------------------------------------------------------------------------------------------
# Configuration


DEFAULT_CONFIG = IpvsConfig()


def scheduler_flags(scheduler: str) -> int:
    # As upstream: mh hashes on the source port too (IP_VS_SVC_F_SCHED_MH_PORT).
    return SVC_F_SCHED2 if scheduler == "mh" else 0


# ----------------------------------------------------------------------------------------------
# Values


def fmt_addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True, slots=True, order=True)
class RealServer:
    ip: str
    port: int
    weight: int = 1

    @property
    def addr(self) -> str:
        return fmt_addr(self.ip, self.port)

    @property
    def key(self) -> tuple[str, int]:
        return (self.ip, self.port)


VSKey = tuple[Protocol, str, int]


@dataclass(frozen=True, slots=True)
class VirtualServer:
    """One IPVS service with its real servers. `service`/`kind` only explain it."""

    protocol: Protocol
    ip: str
    port: int
    scheduler: str = DEFAULT_SCHEDULER
    flags: int = 0
    timeout: int = 0
    real_servers: tuple[RealServer, ...] = ()
    service: str = field(default="", compare=False)
    kind: str = field(default="", compare=False)

    @property
    def key(self) -> VSKey:
        return (self.protocol, self.ip, self.port)

    @property
    def addr(self) -> str:
        return fmt_addr(self.ip, self.port)

    @property
    def persistent(self) -> bool:
        return bool(self.flags & SVC_F_PERSISTENT)

    def same_settings(self, scheduler: str, flags: int, timeout: int) -> bool:
        """Whether the kernel's service settings (as dumped) are what this VS wants."""
        want_timeout = self.timeout if self.persistent else 0
        got_timeout = timeout if flags & SVC_F_PERSISTENT else 0
        return (
            self.scheduler == scheduler
            and (self.flags & ~SVC_F_HASHED) == (flags & ~SVC_F_HASHED)
            and want_timeout == got_timeout
        )

    def header(self) -> str:
        """The service line of `ipvsadm -Ln`."""
        line = f"{self.protocol.value:<4} {self.addr} {self.scheduler}"
        sched = _sched_flags(self.scheduler, self.flags)
        if sched:
            line += f" ({sched})"
        if self.persistent:
            line += f" persistent {self.timeout}"
        return line


def _sched_flags(scheduler: str, flags: int) -> str:
    # ipvsadm prints scheduler flags by the scheduler's own names (print_sched_flags).
    if scheduler not in ("sh", "mh"):
        return ""
    names_ = []
    if flags & SVC_F_SCHED1:
        names_.append(f"{scheduler}-fallback")
    if flags & SVC_F_SCHED2:
        names_.append(f"{scheduler}-port")
    return ",".join(names_)


def rs_line(addr: str, fwd: int, weight: int, active: int = 0, inactive: int = 0) -> str:
    """A real server line of `ipvsadm -Ln` (its printf format, trailing blanks included)."""
    return f"  -> {addr:<28} {FWD_NAMES.get(fwd, str(fwd)):<7} {weight:<6} {active:<10} {inactive:<10}"


IPVSADM_TITLE = (
    "Prot LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn"
)


def ipvsadm_text(virtual_servers: Iterable[VirtualServer]) -> str:
    """`ipvsadm -Ln` as it would print this table (without the kernel's version line)."""
    out = [IPVSADM_TITLE]
    for vs in sorted(virtual_servers, key=vs_sort_key):
        out.append(vs.header())
        out.extend(rs_line(rs.addr, FWD_MASQ, rs.weight) for rs in vs.real_servers)
    return "\n".join(out) + "\n"


PROTO_NUMBERS = {Protocol.TCP: 6, Protocol.UDP: 17, Protocol.SCTP: 132}


def vs_sort_key(vs: VirtualServer) -> tuple[int, int, int, int]:
    """`ipvsadm -Ln --sort` order: family, protocol number, address, port."""
    addr = ipaddress.ip_address(vs.ip)
    return (addr.version, PROTO_NUMBERS[vs.protocol], int(addr), vs.port)


@dataclass(frozen=True, slots=True)
class IpSet:
    name: str
    type: str
    family: IPFamily
    entries: frozenset[str]
    maxelem: int = DEFAULT_MAXELEM

    def create_line(self, name: str | None = None) -> str:
        n = name or self.name
        if self.type.startswith("bitmap:port"):
            return f"create {n} {self.type} range 0-65535"
        fam = "inet" if self.family is IPFamily.V4 else "inet6"
        return f"create {n} {self.type} family {fam} hashsize 1024 maxelem {self.maxelem}"


def _maxelem(n: int) -> int:
    size = DEFAULT_MAXELEM
    while n > size * 3 // 4:
        size *= 2
    return size


@dataclass(frozen=True)
class IpvsState:
    """The desired IPVS-mode state of one family."""

    family: IPFamily
    virtual_servers: Mapping[VSKey, VirtualServer]
    addresses: frozenset[str]
    ipsets: Mapping[str, IpSet]
    iptables: ipt.Ruleset
    ctx: NodeContext | None = None
    no_local_internal: int = 0
    no_local_external: int = 0

    def __str__(self) -> str:
        """`--dry-run`: the table in `ipvsadm -Ln` form, the dummy addresses, the ipsets and the rules."""
        plen = self.family.host_bits
        parts = [
            ipvsadm_text(self.virtual_servers.values()),
            f"# {names.IPVS_DEVICE} addresses\n" + "".join(f"{a}/{plen}\n" for a in sorted_ips(self.addresses)),
            "# ipsets (ipset restore input)\n" + ipsets_text(self.ipsets.values()),
            "# iptables-restore --noflush input\n" + iptables_plan(self.iptables, None, None).text,
        ]
        return "\n".join(parts)


def sorted_ips(ips: Iterable[str]) -> list[str]:
    return sorted(ips, key=lambda a: (ipaddress.ip_address(a).version, int(ipaddress.ip_address(a))))


def ipsets_text(sets: Iterable[IpSet]) -> str:
    out: list[str] = []
    for s in sorted(sets, key=lambda s: s.name):
        out.append(s.create_line())
        out.extend(f"add {s.name} {e}" for e in sorted(s.entries, key=entry_sort_key))
    return "\n".join(out) + "\n"


def entry_sort_key(entry: str) -> tuple[object, ...]:
    head = entry.split(",", 1)[0]
    try:
        a = ipaddress.ip_address(head)
        return (0, a.version, int(a), entry)
    except ValueError:
        return (1, int(head) if head.isdigit() else 0, 0, entry)


# ----------------------------------------------------------------------------------------------
# ipset entries, in the canonical text `ipset save` prints


def ipport(ip: str, proto: Protocol, port: int) -> str:
    return f"{ip},{proto.lowercase}:{port}"


def canonical_entry(set_type: str, text: str) -> str:
    """An entry as this module writes it, from `ipset save`'s text (addresses normalised)."""
    if set_type.startswith("bitmap:port"):
        return str(int(text.rsplit(":", 1)[-1]))
    parts = text.split(",")
    out = []
    for i, part in enumerate(parts):
        if i == 1 and ":" in part and set_type.startswith("hash:ip,port"):
            proto, _, port = part.rpartition(":")
            out.append(f"{proto.lower()}:{int(port)}")
            continue
        if "/" in part:
            net = ipaddress.ip_network(part, strict=False)
            out.append(str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net))
        else:
            out.append(str(ipaddress.ip_address(part)))
    return ",".join(out)


def _net_entry(cidr: str) -> str:
    net = ipaddress.ip_network(cidr, strict=False)
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


# ----------------------------------------------------------------------------------------------
# Render


def without_addresses(ctx: NodeContext, bound: Set[str]) -> NodeContext:
    """The node context with the dummy device's addresses taken out: they are VIPs, not node IPs.

    The namespace's address list holds them too, so every caller that renders (a sync, `trace`,
    `kproxy status`) takes them out first, or a NodePort gains virtual servers on the VIPs."""
    if not bound:
        return ctx
    local = tuple(a for a in ctx.local_ips if a not in bound)
    nodeport_ips = None if ctx.nodeport_ips is None else tuple(a for a in ctx.nodeport_ips if a not in bound)
    node_ip = ctx.node_ip
    if node_ip in bound:
        node_ip = next((a for a in local if not ipaddress.ip_address(a).is_loopback), "")
    return replace(ctx, local_ips=local, nodeport_ips=nodeport_ips, node_ip=node_ip)


def nodeport_addresses(ctx: NodeContext, vips: Iterable[str] = ()) -> tuple[str, ...]:
    """Where NodePort VSs go: `nodeport_ips`, or every node address; never loopback (IPVS cannot
    serve 127.0.0.1, as upstream) nor link-local, nor one of `vips`."""
    skip = set(vips)
    source = ctx.nodeport_ips if ctx.nodeport_ips is not None else ctx.local_ips
    out = []
    for a in source:
        addr = ipaddress.ip_address(a)
        if addr.is_loopback or addr.is_link_local or a in skip or family_of(a) != ctx.family:
            continue
        out.append(a)
    return tuple(dict.fromkeys(out))


@dataclass
class _Acc:
    """What the Service ports contribute while rendering."""

    vss: dict[VSKey, VirtualServer] = field(default_factory=dict)
    addresses: set[str] = field(default_factory=set)
    sets: dict[str, set[str]] = field(default_factory=lambda: {b: set() for b in SET_TYPES})
    ext_chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ext_dispatch: list[str] = field(default_factory=list)
    no_local_internal: int = 0
    no_local_external: int = 0


def render(
    ports: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
    ctx: NodeContext,
    cfg: IpvsConfig = DEFAULT_CONFIG,
) -> IpvsState:
    """Desired state for one family. `ports` must already be this family's view; `ctx.local_ips`
    the node's addresses without those bound to the dummy device."""
    with gc_paused():
        return _render(ports, endpoints, ctx, cfg)


def _render(
    ports: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
    ctx: NodeContext,
    cfg: IpvsConfig,
) -> IpvsState:
    sched = cfg.scheduler or DEFAULT_SCHEDULER
    host = set(ctx.local_ips)
    # ClusterIPs are never node addresses; an externalIP or LB IP may be one (then it is not
    # bound to the dummy device and serves NodePorts too).
    node_ips = nodeport_addresses(ctx, {ip for sp in ports.values() for ip in sp.cluster_ips})
    acc = _Acc()
    for name in sorted(ports):
        _render_port(ports[name], endpoints.get(name, ()), ctx, sched, host, node_ips, acc)
    acc.sets[SET_IPVS_IPS] = set(acc.addresses)
    ipsets = {
        set_name(base, ctx.family): IpSet(
            set_name(base, ctx.family), SET_TYPES[base][0], ctx.family, frozenset(entries), _maxelem(len(entries))
        )
        for base, entries in acc.sets.items()
    }
    return IpvsState(
        family=ctx.family,
        virtual_servers=acc.vss,
        addresses=frozenset(acc.addresses),
        ipsets=ipsets,
        iptables=_iptables(ctx, acc),
        ctx=ctx,
        no_local_internal=acc.no_local_internal,
        no_local_external=acc.no_local_external,
    )


def _render_port(
    svc: ServicePort,
    eps: tuple[Endpoint, ...],
    ctx: NodeContext,
    sched: str,
    host: set[str],
    node_ips: tuple[str, ...],
    acc: _Acc,
) -> None:
    spn_s = str(svc.name)
    proto = svc.protocol
    sets = categorize(eps, svc, ctx.node_name, ctx.zone)
    has_any = sets.has_any
    internal = sets.local if svc.internal_policy_local else sets.cluster
    external = sets.local if svc.external_policy_local else sets.cluster
    flags = scheduler_flags(sched) | (SVC_F_PERSISTENT if svc.affinity_timeout else 0)
    timeout = svc.affinity_timeout

    def vs(ip: str, port: int, chosen: tuple[Endpoint, ...], kind: str) -> None:
        rss = tuple(sorted({RealServer(ep.ip, ep.port) for ep in chosen}, key=_rs_sort_key))
        v = VirtualServer(proto, ip, port, sched, flags, timeout, rss, spn_s, kind)
        # Two Services claiming one address and port: the first (by name) keeps it.
        acc.vss.setdefault(v.key, v)

    S = acc.sets
    cip, port = svc.cluster_ip, svc.port
    S[SET_CLUSTER_IP].add(ipport(cip, proto, port))
    acc.addresses.add(cip)
    if not has_any:
        S[SET_NO_ENDPOINTS].add(ipport(cip, proto, port))
        vs(cip, port, (), "cluster IP")
    elif not internal:
        S[SET_NO_LOCAL_ENDPOINTS].add(ipport(cip, proto, port))
        acc.no_local_internal += 1
    else:
        vs(cip, port, internal, "cluster IP")

    dests: list[tuple[str, int, str]] = [(ip, port, "external IP") for ip in svc.external_ips]
    dests += [(ip, port, "load balancer IP") for ip in svc.lb_ips]
    if svc.node_port:
        dests += [(ip, svc.node_port, "node port") for ip in node_ips]
    if svc.external_policy_local and has_any and not external and dests:
        acc.no_local_external += 1
    ext_set = SET_EXTERNAL_LOCAL if svc.external_policy_local else SET_EXTERNAL
    ext_chain = names.external_chain(svc.name)
    p = f"-m {proto.lowercase} -p {proto.lowercase}"
    for ip, dport, kind in dests:
        entry = ipport(ip, proto, dport)
        S[ext_set].add(entry)
        if kind != "node port" and ip not in host:
            acc.addresses.add(ip)
        if not has_any:
            S[SET_NO_ENDPOINTS].add(entry)
            vs(ip, dport, (), kind)
        elif not external:
            S[SET_NO_LOCAL_ENDPOINTS].add(entry)
        else:
            vs(ip, dport, external, kind)
        if has_any and svc.external_policy_local:
            acc.ext_dispatch.append(
                f'-A {names.SERVICES} -m comment --comment "{spn_s} {kind}" {p} -d {ip} --dport {dport} -j {ext_chain}'
            )

    if has_any and svc.external_policy_local and dests:
        to = fmt_addr(cip, port)
        rules = []
        if ctx.local_detector.implemented:
            # Pods reaching an external address behave as if they went out to the LB and back:
            # every endpoint, through the ClusterIP's VS.
            rules.append(
                f'-A {ext_chain} -m comment --comment "pod traffic for {spn_s} external destinations" '
                f"{ipt.local_match(ctx.local_detector)} {p} -j DNAT --to-destination {to}"
            )
        rules.append(
            f'-A {ext_chain} -m comment --comment "masquerade LOCAL traffic for {spn_s} external destinations" '
            f"-m addrtype --src-type LOCAL -j {names.MARK_MASQ}"
        )
        rules.append(
            f'-A {ext_chain} -m comment --comment "route LOCAL traffic for {spn_s} external destinations" '
            f"-m addrtype --src-type LOCAL {p} -j DNAT --to-destination {to}"
        )
        acc.ext_chains[ext_chain] = tuple(rules)

    if has_any and svc.lb_ips and svc.lb_source_ranges:
        allow_node = bool(ctx.node_ip) and any(_cidr_contains(c, ctx.node_ip) for c in svc.lb_source_ranges)
        for ip in svc.lb_ips:
            head = ipport(ip, proto, port)
            S[SET_LB_FW].add(head)
            S[SET_LB_SOURCE_CIDR].update(f"{head},{_net_entry(c)}" for c in svc.lb_source_ranges)
            if allow_node:
                # The node reaching an LB IP bound here uses that IP as its source.
                S[SET_LB_SOURCE_IP].add(f"{head},{ip}")

    for ep in sets.reachable:
        S[SET_LOOP_BACK].add(f"{ep.ip},{proto.lowercase}:{ep.port},{ep.ip}")
    if svc.health_check_node_port:
        S[SET_HEALTH_CHECK].add(str(svc.health_check_node_port))


def port_objects(
    svc: ServicePort, eps: tuple[Endpoint, ...], ctx: NodeContext, cfg: IpvsConfig, node_ips: tuple[str, ...]
) -> tuple[tuple[VirtualServer, ...], dict[str, set[str]], dict[str, tuple[str, ...]]]:
    """What one Service port contributes, as `render` computes it (`kproxy status`): its virtual
    servers, its ipset entries by set base name, its nat chains. `node_ips`: `nodeport_addresses`."""
    acc = _Acc()
    _render_port(svc, eps, ctx, cfg.scheduler or DEFAULT_SCHEDULER, set(ctx.local_ips), node_ips, acc)
    return tuple(acc.vss.values()), {b: e for b, e in acc.sets.items() if e}, acc.ext_chains


def _rs_sort_key(rs: RealServer) -> tuple[int, int]:
    return (int(ipaddress.ip_address(rs.ip)), rs.port)


def _cidr_contains(cidr: str, ip: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr, strict=False)


# Jumps from the built-in chains: (table, built-in chain, match, our chain, comment), inserted at
# the top as in the iptables mode.
JUMPS: tuple[tuple[str, str, str, str, str], ...] = (
    (MANGLE, "PREROUTING", "", PROXY_FIREWALL, "kproxy load balancer firewall"),
    (MANGLE, "OUTPUT", "", PROXY_FIREWALL, "kproxy load balancer firewall"),
    (FILTER, "INPUT", "-m conntrack --ctstate NEW", names.SERVICES, "kproxy service portals"),
    (FILTER, "OUTPUT", "-m conntrack --ctstate NEW", names.SERVICES, "kproxy service portals"),
    (FILTER, "INPUT", "", names.NODEPORTS, "kproxy health check service ports"),
    FORWARD_JUMP,
    (NAT, "OUTPUT", "", names.SERVICES, "kproxy service portals"),
    (NAT, "PREROUTING", "", names.SERVICES, "kproxy service portals"),
    POSTROUTING_JUMP,
)


def _iptables(ctx: NodeContext, acc: _Acc) -> ipt.Ruleset:
    fam = ctx.family

    def ms(base: str, flags: str) -> str:
        return f"-m set --match-set {set_name(base, fam)} {flags}"

    detector = ctx.local_detector
    svc_comment = '-m comment --comment "kproxy service IP + port for masquerade purpose"'
    nat_services = list(acc.ext_dispatch)
    if ctx.masquerade_all:
        nat_services.append(f"-A {names.SERVICES} {svc_comment} {ms(SET_CLUSTER_IP, 'dst,dst')} -j {names.MARK_MASQ}")
    elif detector.implemented:
        # Off-cluster traffic to a VIP may be routed back out to another node: masquerade it so
        # the reply comes back through us.
        nat_services.append(
            f"-A {names.SERVICES} {svc_comment} {ms(SET_CLUSTER_IP, 'dst,dst')} {ipt.local_match(detector, negate=True)} "
            f"-j {names.MARK_MASQ}"
        )
    else:
        # No way to tell pods from the rest: masquerade at least the node's own connections, which
        # take a VIP of the dummy device as their source (as upstream).
        nat_services.append(f"-A {names.SERVICES} {svc_comment} {ms(SET_CLUSTER_IP, 'src,dst')} -j {names.MARK_MASQ}")
    nat_services.append(
        f'-A {names.SERVICES} -m comment --comment "kproxy external destinations (eTP Cluster)" '
        f"{ms(SET_EXTERNAL, 'dst,dst')} -j {names.MARK_MASQ}"
    )
    # Masquerade, forwarding and the localnet guard: the iptables mode's chains, the same rules.
    # Hairpin traffic (an endpoint reaching itself) has no SEP chain to be marked in here: it is
    # masqueraded at the head of KPROXY-POSTROUTING, by ipset.
    fixed = fixed_chains(
        ctx,
        postrouting_head=(
            f'-A {names.POSTROUTING} -m comment --comment "kproxy endpoint reaching itself (hairpin)" '
            f"{ms(SET_LOOP_BACK, 'dst,dst,src')} -j MASQUERADE",
        ),
    )
    nat: dict[str, tuple[str, ...]] = {names.SERVICES: tuple(nat_services), **fixed.nat}
    nat.update(acc.ext_chains)

    filt: dict[str, tuple[str, ...]] = {
        names.SERVICES: (
            f'-A {names.SERVICES} -m comment --comment "kproxy services without endpoints" '
            f"{ms(SET_NO_ENDPOINTS, 'dst,dst')} -j REJECT",
            f'-A {names.SERVICES} -m comment --comment "kproxy services without local endpoints" '
            f"{ms(SET_NO_LOCAL_ENDPOINTS, 'dst,dst')} -j DROP",
            # The VIP filter (upstream's KUBE-IPVS-FILTER): Service destinations pass ...
            *(
                f"-A {names.SERVICES} {ms(base, 'dst,dst')} -j RETURN"
                for base in (SET_CLUSTER_IP, SET_EXTERNAL, SET_EXTERNAL_LOCAL)
            ),
            f"-A {names.SERVICES} -m tcp -p tcp {ms(SET_HEALTH_CHECK, 'dst')} -j RETURN",
            # ... any other port of a dummy-device address is refused.
            f'-A {names.SERVICES} -m comment --comment "kproxy VIPs expose Service ports only" '
            f"-m conntrack --ctstate NEW {ms(SET_IPVS_IPS, 'dst')} -j REJECT",
        ),
        names.NODEPORTS: (
            f'-A {names.NODEPORTS} -m comment --comment "kproxy health check node ports" '
            f"-m tcp -p tcp {ms(SET_HEALTH_CHECK, 'dst')} -j ACCEPT",
        ),
        names.FORWARD: fixed.forward,
        # The iptables mode's route_localnet guard (CVE-2020-8558), kept under the same condition:
        # route_localnet may still be 1 from it, and that mode finds its chain where it left it.
        **fixed.localnet,
    }
    mangle: dict[str, tuple[str, ...]] = {
        PROXY_FIREWALL: (
            f"-A {PROXY_FIREWALL} -m conntrack --ctstate NEW {ms(SET_LB_FW, 'dst,dst')} -j {SOURCE_RANGES}",
        ),
        SOURCE_RANGES: (
            f"-A {SOURCE_RANGES} {ms(SET_LB_SOURCE_CIDR, 'dst,dst,src')} -j RETURN",
            f"-A {SOURCE_RANGES} {ms(SET_LB_SOURCE_IP, 'dst,dst,src')} -j RETURN",
            f'-A {SOURCE_RANGES} -m comment --comment "kproxy loadBalancerSourceRanges" -j DROP',
        ),
    }
    return ipt.Ruleset(tables={MANGLE: mangle, FILTER: filt, NAT: nat}, jumps=JUMPS + fixed.localnet_jumps, ctx=ctx)


# ----------------------------------------------------------------------------------------------
# Plans


RestorePlan = ipt.RestorePlan


def present_jumps(saved_jumps: Mapping[str, list[str]]) -> dict[str, set[tuple[str, str]]]:
    """(built-in chain, target) of each jump rule as iptables-save prints it, per table."""
    return {
        table: {(r.split(" ", 2)[1], r.rsplit("-j ", 1)[1].split(" ", 1)[0]) for r in rules}
        for table, rules in saved_jumps.items()
    }


def iptables_plan(
    desired: ipt.Ruleset,
    applied: Mapping[str, Mapping[str, ipt.Held]] | None,
    saved_chains: Mapping[str, set[str]] | None,
    saved_jumps: Mapping[str, list[str]] | None = None,
) -> RestorePlan:
    """One iptables-restore transaction over mangle, filter and nat: the iptables mode's plan,
    owning only this proxier's chains (`is_proxier_chain`, never hostPort's or the canary) and
    removing jumps to them that we no longer want (`saved_jumps`: the built-in chains' rules
    as iptables-save prints them), which is what switching from the iptables mode leaves."""
    present = None if saved_jumps is None else present_jumps(saved_jumps)
    return ipt.plan(desired, applied, saved_chains, present, owned=is_proxier_chain, saved_jump_rules=saved_jumps)
