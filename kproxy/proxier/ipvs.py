"""The IPVS mode, pure: cluster state in, the desired IPVS table, dummy-device addresses, ipsets
and the few iptables rules IPVS needs out; plus the plans that turn what the kernel holds into it.

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
- Masquerade uses the iptables mode's mark chain layout (KPROXY-MARK-MASQ, KPROXY-POSTROUTING):
  off-cluster sources to ClusterIPs (local detector, or --masquerade-all; with no detector,
  the node's own connections that took a VIP as source, as upstream), every external
  destination of an eTP=Cluster Service, and hairpin (an endpoint reaching itself, ipset
  KPROXY-LOOP-BACK).
- The VIP filter (upstream's KUBE-IPVS-FILTER, #72236; here the tail of filter KPROXY-SERVICES):
  a new connection to an address bound to the dummy device on a port that is no Service's is
  REJECTed, so VIPs never expose the node's own services.
- ipset names start with `KPROXY-` (IPv6 ones with `KPROXY-6-`) and fit IPSET_NAME_MAX.

Nothing here touches the kernel: the driver (ipvs_proxier.py) reads the kernel through the
backends, hands the readings to the plans below and applies what they say.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from kproxy.config import DEFAULT_SCHEDULER, IpvsConfig
from kproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, family_of
from kproxy.proxier import iptables as ipt
from kproxy.proxier import names
from kproxy.proxier.context import NodeContext
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


def _fmt_addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True, slots=True, order=True)
class RealServer:
    ip: str
    port: int
    weight: int = 1

    @property
    def addr(self) -> str:
        return _fmt_addr(self.ip, self.port)

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
        return _fmt_addr(self.ip, self.port)

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
        out.extend(f"add {s.name} {e}" for e in sorted(s.entries, key=_entry_sort_key))
    return "\n".join(out) + "\n"


def _entry_sort_key(entry: str) -> tuple[object, ...]:
    head = entry.split(",", 1)[0]
    try:
        a = ipaddress.ip_address(head)
        return (0, a.version, int(a), entry)
    except ValueError:
        return (1, int(head) if head.isdigit() else 0, 0, entry)


# ----------------------------------------------------------------------------------------------
# ipset entries, in the canonical text `ipset save` prints


def ipport(ip: str, proto: Protocol, port: int) -> str:
    return f"{ip},{proto.lower}:{port}"


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
    with ipt.gc_paused():
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
    p = f"-m {proto.lower} -p {proto.lower}"
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
        to = _fmt_addr(cip, port)
        rules = []
        if ctx.local_detector.implemented:
            # Pods reaching an external address behave as if they went out to the LB and back:
            # every endpoint, through the ClusterIP's VS.
            rules.append(
                f'-A {ext_chain} -m comment --comment "pod traffic for {spn_s} external destinations" '
                f"{ctx.local_detector.if_local()} {p} -j DNAT --to-destination {to}"
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
        S[SET_LOOP_BACK].add(f"{ep.ip},{proto.lower}:{ep.port},{ep.ip}")
    if svc.health_check_node_port:
        S[SET_HEALTH_CHECK].add(str(svc.health_check_node_port))


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
    (FILTER, "FORWARD", "", names.FORWARD, "kproxy forwarding rules"),
    (NAT, "OUTPUT", "", names.SERVICES, "kproxy service portals"),
    (NAT, "PREROUTING", "", names.SERVICES, "kproxy service portals"),
    (NAT, "POSTROUTING", "", names.POSTROUTING, "kproxy postrouting rules"),
)


def _iptables(ctx: NodeContext, acc: _Acc) -> ipt.Ruleset:
    fam = ctx.family

    def ms(base: str, flags: str) -> str:
        return f"-m set --match-set {set_name(base, fam)} {flags}"

    mark = f"{ctx.mark}/{ctx.mark}"
    detector = ctx.local_detector
    svc_comment = '-m comment --comment "kproxy service IP + port for masquerade purpose"'
    nat_services = list(acc.ext_dispatch)
    if ctx.masquerade_all:
        nat_services.append(f"-A {names.SERVICES} {svc_comment} {ms(SET_CLUSTER_IP, 'dst,dst')} -j {names.MARK_MASQ}")
    elif detector.implemented:
        # Off-cluster traffic to a VIP may be routed back out to another node: masquerade it so
        # the reply comes back through us.
        nat_services.append(
            f"-A {names.SERVICES} {svc_comment} {ms(SET_CLUSTER_IP, 'dst,dst')} {detector.if_not_local()} "
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
    nat: dict[str, tuple[str, ...]] = {
        names.SERVICES: tuple(nat_services),
        names.POSTROUTING: (
            f'-A {names.POSTROUTING} -m comment --comment "kproxy endpoint reaching itself (hairpin)" '
            f"{ms(SET_LOOP_BACK, 'dst,dst,src')} -j MASQUERADE",
            f"-A {names.POSTROUTING} -m mark ! --mark {mark} -j RETURN",
            # Clear the mark so a packet that traverses the stack again is not masqueraded twice.
            f"-A {names.POSTROUTING} -j MARK --xor-mark {ctx.mark}",
            f'-A {names.POSTROUTING} -m comment --comment "kproxy service traffic requiring SNAT" '
            "-j MASQUERADE --random-fully",
        ),
        names.MARK_MASQ: (f"-A {names.MARK_MASQ} -j MARK --or-mark {ctx.mark}",),
    }
    nat.update(acc.ext_chains)

    forward = []
    if not ctx.conntrack_tcp_liberal:
        forward.append(f"-A {names.FORWARD} -m conntrack --ctstate INVALID -j DROP")
    forward.append(f'-A {names.FORWARD} -m comment --comment "kproxy forwarding rules" -m mark --mark {mark} -j ACCEPT')
    forward.append(
        f'-A {names.FORWARD} -m comment --comment "kproxy forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )
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
        names.FORWARD: tuple(forward),
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
    jumps = JUMPS
    if ctx.family is IPFamily.V4 and ctx.localhost_nodeports:
        # The iptables mode's route_localnet guard (CVE-2020-8558), kept under the same condition:
        # route_localnet may still be 1 from it, and that mode finds its chain where it left it.
        filt[names.LOCALNET_FIREWALL] = (
            f'-A {names.LOCALNET_FIREWALL} -m comment --comment "block incoming localnet connections" '
            "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        )
        jumps = JUMPS + ipt.LOCALNET_JUMPS
    return ipt.Ruleset(tables={MANGLE: mangle, FILTER: filt, NAT: nat}, jumps=jumps, ctx=ctx)


# ----------------------------------------------------------------------------------------------
# Plans


RestorePlan = ipt.RestorePlan


def iptables_plan(
    desired: ipt.Ruleset,
    applied: Mapping[str, Mapping[str, tuple[str, ...]]] | None,
    saved_chains: Mapping[str, set[str]] | None,
    saved_jumps: Mapping[str, list[str]] | None = None,
) -> RestorePlan:
    """One iptables-restore transaction over mangle, filter and nat: the iptables mode's plan,
    owning only this proxier's chains (`is_proxier_chain`, never hostPort's or the canary) and
    removing jumps to them that we no longer want (`saved_jumps`: the built-in chains' rules
    as iptables-save prints them), which is what switching from the iptables mode leaves."""
    present = None
    if saved_jumps is not None:
        present = {
            table: {(r.split(" ", 2)[1], r.rsplit("-j ", 1)[1].split(" ", 1)[0]) for r in rules}
            for table, rules in saved_jumps.items()
        }
    return ipt.plan(desired, applied, saved_chains, present, owned=is_proxier_chain, saved_jump_rules=saved_jumps)


@dataclass(frozen=True, slots=True)
class KernelSet:
    """An ipset as `ipset save` shows it."""

    name: str
    type: str
    family: str  # "inet", "inet6" or "" (bitmap types)
    maxelem: int
    entries: frozenset[str]


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
            lines.extend(f"add {name} {e}" for e in sorted(want.entries, key=_entry_sort_key))
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
            lines.extend(f"add {name} {e}" for e in sorted(add, key=_entry_sort_key))
            lines.extend(f"del {name} {e}" for e in sorted(rem, key=_entry_sort_key))
            added, removed = added + len(add), removed + len(rem)
            continue
        tmp = tmp_set_name(name, family)
        if tmp in existing:
            lines.append(f"destroy {tmp}")
        lines.append(want.create_line(tmp))
        lines.extend(f"add {tmp} {e}" for e in sorted(want.entries, key=_entry_sort_key))
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
        return _fmt_addr(self.ip, self.port)


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
