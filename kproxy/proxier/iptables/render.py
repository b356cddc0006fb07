"""The iptables mode, pure: cluster state in, desired chains out, and the restore plan.

Rule layout and semantics follow upstream kube-proxy's iptables proxier (see
docs/mode-iptables.md): per Service port an SVC (cluster policy), SVL (local policy), EXT
(external destinations) and FW (source ranges) chain, one SEP chain per endpoint; REJECT in
filter when a Service has no endpoints at all, DROP when a Local policy has none here.

Two things differ on purpose, both to write less at scale (DESIGN.md section 6):
- Each Service port renders into its own `ServiceRules` value; a partial render reuses the
  previous value of every Service whose objects did not change.
- The plan writes a chain only when its rules differ from what was last applied, so one
  endpoint change rewrites one SVC chain and one SEP chain, not the top-level dispatch chains.
- What is remembered between syncs is compact (`compacted`): a per-Service chain is kept as a
  `Stamp` (its rule count and a hash of its rules), not its text, which was most of a daemon's
  heap (100 MB at 10,000 Services x 10 endpoints). A chain that must be written again without a
  change of its own (drift) is rendered again from its Service's inputs.

Why one module of ~670 lines: the render and its plan are one contract (chain names, the rules
of each chain, what a partial render may reuse) that the tracer and the IPVS mode import whole.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache

from kproxy.heap import gc_paused
from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.node import LocalDetector, NodeContext
from kproxy.proxier import names
from kproxy.proxier.fixed_chains import FORWARD_JUMP, LOCALNET_JUMPS, POSTROUTING_JUMP, fixed_chains, localnet_guard
from kproxy.topology import categorize
from kproxy.view import Repair

# Above this many endpoints per-endpoint comments are left out (~40% less restore input), as
# upstream's large-cluster mode.
LARGE_CLUSTER_ENDPOINTS = 1000

NAT = "nat"
FILTER = "filter"

# Jumps from the built-in chains: (table, built-in chain, match, our chain, comment). Inserted
# at the top, as upstream, so that other agents' rules cannot pre-empt service traffic.
JUMPS: tuple[tuple[str, str, str, str, str], ...] = (
    (
        FILTER,
        "INPUT",
        "-m conntrack --ctstate NEW",
        names.EXTERNAL_SERVICES,
        "kproxy externally-visible service portals",
    ),
    (
        FILTER,
        "FORWARD",
        "-m conntrack --ctstate NEW",
        names.EXTERNAL_SERVICES,
        "kproxy externally-visible service portals",
    ),
    (FILTER, "INPUT", "", names.NODEPORTS, "kproxy health check service ports"),
    (FILTER, "FORWARD", "-m conntrack --ctstate NEW", names.SERVICES, "kproxy service portals"),
    (FILTER, "OUTPUT", "-m conntrack --ctstate NEW", names.SERVICES, "kproxy service portals"),
    FORWARD_JUMP,
    (FILTER, "INPUT", "-m conntrack --ctstate NEW", names.PROXY_FIREWALL, "kproxy load balancer firewall"),
    (FILTER, "OUTPUT", "-m conntrack --ctstate NEW", names.PROXY_FIREWALL, "kproxy load balancer firewall"),
    (FILTER, "FORWARD", "-m conntrack --ctstate NEW", names.PROXY_FIREWALL, "kproxy load balancer firewall"),
    (NAT, "OUTPUT", "", names.SERVICES, "kproxy service portals"),
    (NAT, "PREROUTING", "", names.SERVICES, "kproxy service portals"),
    POSTROUTING_JUMP,
)

Chains = dict[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Stamp:
    """A chain as written, without its text: enough to tell a change, and to count its rules.
    The hash is Python's, salted per process: stamps are only compared within one."""

    count: int
    digest: int


# A chain's rules as rendered (text), or as remembered once written (a stamp).
Held = tuple[str, ...] | Stamp


def stamp(rules: Held) -> Stamp:
    return rules if isinstance(rules, Stamp) else Stamp(len(rules), hash(rules))


def rule_count(rules: Held) -> int:
    return rules.count if isinstance(rules, Stamp) else len(rules)


@dataclass(frozen=True, slots=True)
class ServiceRules:
    """Everything one Service port contributes, as full restore lines (`-A CHAIN ...`)."""

    nat_chains: tuple[tuple[str, Held], ...] = ()
    nat_services: tuple[str, ...] = ()
    nat_nodeports: tuple[str, ...] = ()
    filter_services: tuple[str, ...] = ()
    filter_external: tuple[str, ...] = ()
    filter_nodeports: tuple[str, ...] = ()
    filter_firewall: tuple[str, ...] = ()
    no_local_internal: bool = False
    no_local_external: bool = False


@dataclass(frozen=True)
class Ruleset:
    """The desired iptables state of one family: chain name -> full rule lines, per table."""

    tables: Mapping[str, Mapping[str, Held]]
    jumps: tuple[tuple[str, str, str, str, str], ...]
    services: Mapping[ServicePortName, ServiceRules] = field(default_factory=dict)
    ctx: NodeContext | None = None
    # The inputs each ServiceRules was rendered from, so the next partial render can reuse it.
    inputs: Mapping[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]] = field(default_factory=dict)

    def __str__(self) -> str:
        return plan(self, None, None, {}).text

    @property
    def rule_count(self) -> dict[str, int]:
        return {t: sum(rule_count(r) for r in chains.values()) for t, chains in self.tables.items()}

    def owners(self) -> dict[str, ServicePortName]:
        """Which Service port each per-Service chain belongs to."""
        return {chain: name for name, rules in self.services.items() for chain, _ in rules.nat_chains}


def compacted(rs: Ruleset) -> Ruleset:
    """`rs` as remembered after it was written: every per-Service chain a `Stamp`, the same
    object in `services` and in `tables`, so that the next plan tells an unchanged chain by
    identity. The dispatch and fixed chains keep their text (they are assembled every sync)."""
    services: dict[ServicePortName, ServiceRules] = {}
    stamps: dict[str, Stamp] = {}
    for name, rules in rs.services.items():
        if not all(isinstance(r, Stamp) for _, r in rules.nat_chains):  # rendered this sync
            rules = replace(rules, nat_chains=tuple((c, stamp(r)) for c, r in rules.nat_chains))
        services[name] = rules
        for chain, held in rules.nat_chains:
            stamps[chain] = stamp(held)  # the very object in `services`: stamp() returns a Stamp as is
    tables = {t: {c: stamps.get(c, r) if t == NAT else r for c, r in chains.items()} for t, chains in rs.tables.items()}
    return Ruleset(tables=tables, jumps=rs.jumps, services=services, ctx=rs.ctx, inputs=rs.inputs)


def local_match(detector: LocalDetector, negate: bool = False) -> str:
    """The iptables match for traffic the detector calls local (a pod's), both modes' syntax."""
    if detector.is_cidr:
        match = f"-s {detector.value}"
    elif detector.is_bridge:
        match = f"-i {detector.value}"
    else:
        match = f"-i {detector.value}+"  # an interface-name prefix
    return f"! {match}" if negate else match


def jump_rule(builtin: str, match: str, target: str, comment: str) -> str:
    m = f"{match} " if match else ""
    return f'{builtin} -m comment --comment "{comment}" {m}-j {target}'


def render(
    ports: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
    ctx: NodeContext,
    previous: Ruleset | None = None,
    changed: Collection[ServicePortName] | None = None,
    force: Collection[ServicePortName] = (),
) -> Ruleset:
    """Desired state for one family. `ports` must already be this family's view.

    With `previous`, a Service port whose inputs equal last time's reuses its rendered rules.
    `changed`, when the caller knows it (the change trackers do), names the only Service ports
    whose inputs may differ, so the others are reused without even being compared: that is
    what makes a partial sync cost what changed. `force` names Service ports rendered again
    whatever their inputs (their chains must be written again and are remembered as stamps).
    """
    with gc_paused():
        return _render(ports, endpoints, ctx, previous, changed, force)


def _render(
    ports: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
    ctx: NodeContext,
    previous: Ruleset | None,
    changed: Collection[ServicePortName] | None,
    force: Collection[ServicePortName],
) -> Ruleset:
    large = sum(len(endpoints.get(n, ())) for n in ports) > LARGE_CLUSTER_ENDPOINTS
    prev_inputs = previous.inputs if previous is not None else {}
    prev_rules = previous.services if previous is not None else {}
    # A changed node context (addresses, detector, flags) changes every Service's rules.
    reuse_ok = previous is not None and previous.ctx == ctx and _large_flag(previous) == large
    services: dict[ServicePortName, ServiceRules] = {}
    inputs: dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]] = {}
    for name in sorted(ports):
        svc = ports[name]
        eps = endpoints.get(name, ())
        key = (svc, eps)
        old = prev_inputs.get(name)
        if (
            reuse_ok
            and old is not None
            and name not in force
            and (
                (changed is not None and name not in changed)
                or ((old[0] is svc or old[0] == svc) and (old[1] is eps or old[1] == eps))
            )
        ):
            services[name] = prev_rules[name]
            inputs[name] = old
            continue
        services[name] = render_service(svc, eps, ctx, large)
        inputs[name] = key

    return Ruleset(
        tables=_assemble(services, ctx),
        jumps=JUMPS + (LOCALNET_JUMPS if localnet_guard(ctx) else ()),
        services=services,
        ctx=ctx,
        inputs=inputs,
    )


def _large_flag(rs: Ruleset) -> bool:
    return sum(len(eps) for _, eps in rs.inputs.values()) > LARGE_CLUSTER_ENDPOINTS


def render_service(svc: ServicePort, eps: tuple[Endpoint, ...], ctx: NodeContext, large: bool) -> ServiceRules:
    spn = svc.name
    spn_s = str(spn)
    proto = svc.protocol.lowercase
    p = f"-m {proto} -p {proto}"
    sets = categorize(eps, svc, ctx.node_name, ctx.zone)
    has_any = sets.has_any

    svc_chain = names.service_chain(spn)
    svl_chain = names.local_chain(spn)
    ext_chain = names.external_chain(spn)
    fw_chain = names.firewall_chain(spn)
    uses_cluster_chain = bool(sets.cluster) and svc.uses_cluster_endpoints
    uses_local_chain = bool(sets.local) and svc.uses_local_endpoints

    internal_chain, has_internal = svc_chain, has_any
    if svc.internal_policy_local:
        internal_chain, has_internal = svl_chain, bool(sets.local)
    external_policy_chain, has_external = svc_chain, has_any
    if svc.external_policy_local:
        external_policy_chain, has_external = svl_chain, bool(sets.local)
    uses_ext_chain = has_any and svc.externally_accessible
    uses_fw_chain = has_any and bool(svc.lb_ips) and bool(svc.lb_source_ranges)
    lb_chain = fw_chain if uses_fw_chain else ext_chain

    if not has_any:
        int_target = ext_target = "REJECT"
        int_comment = ext_comment = f'"{spn_s} has no endpoints"'
    else:
        int_target = ext_target = ""
        int_comment = ext_comment = ""
        if not has_internal:
            int_target, int_comment = "DROP", f'"{spn_s} has no local endpoints"'
        if not has_external:
            ext_target, ext_comment = "DROP", f'"{spn_s} has no local endpoints"'

    nat_services: list[str] = []
    nat_nodeports: list[str] = []
    f_services: list[str] = []
    f_external: list[str] = []
    f_nodeports: list[str] = []
    f_firewall: list[str] = []
    cip = svc.cluster_ip
    port = svc.port

    cluster_match = f'-m comment --comment "{spn_s} cluster IP" {p} -d {cip} --dport {port}'
    if has_internal:
        nat_services.append(f"-A {names.SERVICES} {cluster_match} -j {internal_chain}")
    else:
        f_services.append(
            f"-A {names.SERVICES} -m comment --comment {int_comment} {p} -d {cip} --dport {port} -j {int_target}"
        )

    for ip in svc.external_ips:
        if has_any:
            nat_services.append(
                f'-A {names.SERVICES} -m comment --comment "{spn_s} external IP" {p} -d {ip} --dport {port} -j {ext_chain}'
            )
        if not has_external:
            f_external.append(
                f"-A {names.EXTERNAL_SERVICES} -m comment --comment {ext_comment} {p} -d {ip} --dport {port} -j {ext_target}"
            )
    for ip in svc.lb_ips:
        if has_any:
            nat_services.append(
                f'-A {names.SERVICES} -m comment --comment "{spn_s} loadbalancer IP" {p} -d {ip} --dport {port} -j {lb_chain}'
            )
        if uses_fw_chain:
            f_firewall.append(
                f'-A {names.PROXY_FIREWALL} -m comment --comment "{spn_s} traffic not accepted by {fw_chain}" '
                f"{p} -d {ip} --dport {port} -j DROP"
            )
    if not has_external:
        for ip in svc.lb_ips:
            f_external.append(
                f"-A {names.EXTERNAL_SERVICES} -m comment --comment {ext_comment} {p} -d {ip} --dport {port} -j {ext_target}"
            )
    if svc.node_port:
        if has_any:
            # NodePorts are not subject to loadBalancerSourceRanges, as upstream.
            nat_nodeports.append(
                f"-A {names.NODEPORTS} -m comment --comment {spn_s} {p} --dport {svc.node_port} -j {ext_chain}"
            )
        if not has_external:
            f_external.append(
                f"-A {names.EXTERNAL_SERVICES} -m comment --comment {ext_comment} -m addrtype --dst-type LOCAL "
                f"{p} --dport {svc.node_port} -j {ext_target}"
            )
    if svc.health_check_node_port:
        # Accepted even with no local endpoint: the health check must be able to answer 503.
        f_nodeports.append(
            f'-A {names.NODEPORTS} -m comment --comment "{spn_s} health check node port" '
            f"-m tcp -p tcp --dport {svc.health_check_node_port} -j ACCEPT"
        )

    chains: list[tuple[str, tuple[str, ...]]] = []
    detector = ctx.local_detector
    seps = names.endpoint_chains(spn, [ep.addr for ep in sets.reachable])

    # Masquerading for ClusterIP traffic is written at the head of the internal policy chain.
    internal_head: list[str] = []
    if has_internal:
        if ctx.masquerade_all:
            internal_head.append(f"-A {internal_chain} {cluster_match} -j {names.MARK_MASQ}")
        elif detector.implemented:
            # Off-cluster traffic to a VIP may be routed back out to another node: masquerade
            # it so the reply comes back through us.
            internal_head.append(
                f"-A {internal_chain} {cluster_match} {local_match(detector, negate=True)} -j {names.MARK_MASQ}"
            )

    if uses_ext_chain:
        rules: list[str] = []
        if not svc.external_policy_local:
            rules.append(
                f'-A {ext_chain} -m comment --comment "masquerade traffic for {spn_s} external destinations" -j {names.MARK_MASQ}'
            )
        else:
            if detector.implemented:
                # Pods reaching an external address behave as if they went out to the LB and back.
                rules.append(
                    f'-A {ext_chain} -m comment --comment "pod traffic for {spn_s} external destinations" '
                    f"{local_match(detector)} -j {svc_chain}"
                )
            rules.append(
                f'-A {ext_chain} -m comment --comment "masquerade LOCAL traffic for {spn_s} external destinations" '
                f"-m addrtype --src-type LOCAL -j {names.MARK_MASQ}"
            )
            rules.append(
                f'-A {ext_chain} -m comment --comment "route LOCAL traffic for {spn_s} external destinations" '
                f"-m addrtype --src-type LOCAL -j {svc_chain}"
            )
        if has_external:
            rules.append(f"-A {ext_chain} -j {external_policy_chain}")
        chains.append((ext_chain, tuple(rules)))

    if uses_fw_chain:
        fw_head = f'-A {fw_chain} -m comment --comment "{spn_s} loadbalancer IP"'
        rules = [f"{fw_head} -s {cidr} -j {ext_chain}" for cidr in svc.lb_source_ranges]
        if ctx.node_ip and any(_cidr_contains(cidr, ctx.node_ip) for cidr in svc.lb_source_ranges):
            # A node reaching an LB IP bound locally arrives with the LB IP as source.
            rules.extend(f"{fw_head} -s {ip} -j {ext_chain}" for ip in svc.lb_ips)
        rules.append(
            f'-A {fw_chain} -m comment --comment "other traffic to {spn_s} will be dropped by {names.PROXY_FIREWALL}"'
        )
        chains.append((fw_chain, tuple(rules)))

    if uses_cluster_chain:
        head = internal_head if internal_chain == svc_chain else []
        chains.append((svc_chain, tuple(head + _balance(svc, spn_s, svc_chain, sets.cluster, seps, large))))
    if uses_local_chain:
        head = internal_head if internal_chain == svl_chain else []
        chains.append((svl_chain, tuple(head + _balance(svc, spn_s, svl_chain, sets.local, seps, large))))

    for ep in sets.reachable:
        sep = seps[ep.addr]
        comment = "" if large else f"-m comment --comment {spn_s} "
        recent = f"-m recent --name {sep} --set " if svc.affinity_timeout else ""
        chains.append(
            (
                sep,
                (
                    # Hairpin: a pod reaching itself through the Service must be masqueraded or
                    # its reply would bypass the DNAT.
                    f"-A {sep} {comment}-s {ep.ip} -j {names.MARK_MASQ}",
                    f"-A {sep} {comment}{recent}{p} -j DNAT --to-destination {ep.addr}",
                ),
            )
        )

    return ServiceRules(
        nat_chains=tuple(chains),
        nat_services=tuple(nat_services),
        nat_nodeports=tuple(nat_nodeports),
        filter_services=tuple(f_services),
        filter_external=tuple(f_external),
        filter_nodeports=tuple(f_nodeports),
        filter_firewall=tuple(f_firewall),
        no_local_internal=has_any and not has_internal,
        no_local_external=has_any and not has_external,
    )


def _balance(
    svc: ServicePort, spn_s: str, chain: str, eps: tuple[Endpoint, ...], seps: Mapping[str, str], large: bool
) -> list[str]:
    rules = []
    n = len(eps)
    if svc.affinity_timeout:
        for ep in eps:
            sep = seps[ep.addr]
            comment = "" if large else f'-m comment --comment "{spn_s} -> {ep.addr}" '
            rules.append(
                f"-A {chain} {comment}-m recent --name {sep} --rcheck --seconds {svc.affinity_timeout} --reap -j {sep}"
            )
    for i, ep in enumerate(eps):
        comment = "" if large else f'-m comment --comment "{spn_s} -> {ep.addr}" '
        stat = f"-m statistic --mode random --probability {probability(n - i)} " if i < n - 1 else ""
        rules.append(f"-A {chain} {comment}{stat}-j {seps[ep.addr]}")
    return rules


@lru_cache(maxsize=4096)
def probability(n: int) -> str:
    return f"{1.0 / n:0.10f}"


def _cidr_contains(cidr: str, ip: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)


def _assemble(services: Mapping[ServicePortName, ServiceRules], ctx: NodeContext) -> dict[str, dict[str, Held]]:
    nat_services: list[str] = []
    nat_nodeports: list[str] = []
    f_services: list[str] = []
    f_external: list[str] = []
    f_nodeports: list[str] = []
    f_firewall: list[str] = []
    nat: dict[str, Held] = {}
    for rules in services.values():
        nat_services.extend(rules.nat_services)
        nat_nodeports.extend(rules.nat_nodeports)
        f_services.extend(rules.filter_services)
        f_external.extend(rules.filter_external)
        f_nodeports.extend(rules.filter_nodeports)
        f_firewall.extend(rules.filter_firewall)
        nat.update(rules.nat_chains)

    nat_services.extend(_nodeport_dispatch(ctx))
    nat[names.SERVICES] = tuple(nat_services)
    nat[names.NODEPORTS] = tuple(nat_nodeports)
    # Masquerade, forwarding and the localnet guard: the same chains as the IPVS mode's. Hairpin
    # traffic is marked in each SEP chain, so KPROXY-POSTROUTING has no rule of this mode's own.
    fixed = fixed_chains(ctx)
    nat.update(fixed.nat)
    filt: dict[str, Held] = {
        names.SERVICES: tuple(f_services),
        names.EXTERNAL_SERVICES: tuple(f_external),
        names.NODEPORTS: tuple(f_nodeports),
        names.FORWARD: fixed.forward,
        names.PROXY_FIREWALL: tuple(f_firewall),
        **fixed.localnet,
    }
    return {FILTER: filt, NAT: nat}


def _nodeport_dispatch(ctx: NodeContext) -> list[str]:
    comment = '-m comment --comment "kproxy service nodeports; NOTE: this must be the last rule in this chain"'
    if ctx.nodeport_ips is None:
        if ctx.family == 6:
            dest = "-m addrtype --dst-type LOCAL ! -d ::1/128"
        elif not ctx.localhost_nodeports:
            dest = "-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8"
        else:
            dest = "-m addrtype --dst-type LOCAL"
        return [f"-A {names.SERVICES} {comment} {dest} -j {names.NODEPORTS}"]
    out = []
    for ip in ctx.nodeport_ips:
        if ip.startswith("127.") and not (ctx.family == 4 and ctx.localhost_nodeports):
            continue
        if ip == "::1":
            continue  # localhost NodePorts cannot work on IPv6
        out.append(f"-A {names.SERVICES} {comment} -d {ip} -j {names.NODEPORTS}")
    return out


# ----------------------------------------------------------------------------------------------
# The plan: what one iptables-restore transaction must say to turn `applied` into `desired`.


@dataclass(frozen=True)
class RestorePlan:
    text: str
    written: dict[str, int]
    deleted: dict[str, int]
    # Rules in the chains written, per table (upstream's kubeproxy_sync_proxy_rules_iptables_last).
    rules_written: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text

    @property
    def empty(self) -> bool:
        return not self.text


def _service_chain(table: str, name: str) -> bool:
    return names.is_service_chain(name)


def _differs(old: Held | None, new: Held) -> bool:
    # Identity first: an unchanged Service's chains are the very objects last remembered.
    return old is None or (old is not new and stamp(old) != stamp(new))


def plan(
    desired: Ruleset,
    applied: Mapping[str, Mapping[str, Held]] | None,
    existing_chains: Mapping[str, set[str]] | None,
    existing_jumps: Mapping[str, set[tuple[str, str]]] | None,
    *,
    owned: Callable[[str, str], bool] = _service_chain,
    saved_jump_rules: Mapping[str, Iterable[str]] | None = None,
) -> RestorePlan:
    """The restore input that turns the kernel into `desired`.

    `applied` is what the last successful transaction wrote (None forces a full write).
    `existing_chains` are the chain names the kernel holds per table, or None when they were
    not read this time (large clusters read them at most once per sync period, as upstream);
    `existing_jumps` are the (built-in chain, target) jumps already in place, or None when not
    read (then a partial plan trusts that the last full write put them there). `owned(table,
    chain)` says which chains this writer may garbage-collect: never another writer's chain that
    shares the KPROXY- prefix. `saved_jump_rules` (built-in chain rules as iptables-save prints
    them) lets a plan also remove jumps to owned chains it no longer wants, which is what
    switching from another mode leaves behind.
    """
    write: dict[str, set[str]] = {}
    delete: dict[str, set[str]] = {}
    add_jumps: dict[str, list[str]] = {}
    drop_jumps: dict[str, list[str]] = {}
    wanted = {(tb, b, t) for (tb, b, _, t, _) in desired.jumps}
    for table, chains in desired.tables.items():
        have = existing_chains.get(table, set()) if existing_chains is not None else None
        old = applied.get(table, {}) if applied is not None else {}
        if applied is None:
            write[table] = set(chains)
        else:
            # A chain someone else deleted is written again even if our rules did not change.
            write[table] = {
                c for c, rules in chains.items() if _differs(old.get(c), rules) or (have is not None and c not in have)
            }
        stale = set(old) - set(chains)
        if have is not None:
            stale = ((stale | {c for c in have if owned(table, c)}) - set(chains)) & have
        delete[table] = stale
        drop_jumps[table] = []
        for rule in (saved_jump_rules or {}).get(table, ()):
            builtin = rule.split(" ", 2)[1]
            target = rule.rsplit("-j ", 1)[1].split(" ", 1)[0]
            if owned(table, target) and (target in stale or (table, builtin, target) not in wanted):
                drop_jumps[table].append("-D " + rule[len("-A ") :])
        if existing_jumps is None and applied is not None:
            add_jumps[table] = []
        else:
            present = (existing_jumps or {}).get(table, set())
            add_jumps[table] = [
                jump_rule(b, m, t, c) for (tb, b, m, t, c) in desired.jumps if tb == table and (b, t) not in present
            ]
    with gc_paused():
        text = restore_text(desired.tables, write, delete, add_jumps, drop_jumps)
    return RestorePlan(
        text=text,
        written={t: len(c) for t, c in write.items()},
        deleted={t: len(c) for t, c in delete.items()},
        rules_written={t: sum(rule_count(desired.tables[t][c]) for c in chains) for t, chains in write.items()},
    )


def drift(
    applied: Mapping[str, Mapping[str, Held]],
    chains: Mapping[str, set[str]],
    rule_counts: Mapping[str, Mapping[str, int]],
    jumps: Iterable[tuple[str, str, str]],
    present_jumps: Mapping[str, set[tuple[str, str]]],
) -> tuple[dict[str, set[str]], tuple[Repair, ...]]:
    """What someone else changed since `applied` was written, from one `iptables-save` listing.

    A chain we wrote whose rule count differs from what we wrote (flushed, a rule deleted, a
    foreign rule added), a chain we wrote that is gone, and a jump from a built-in chain
    (`jumps`: table, built-in, target) that is gone. Rule text is never compared (iptables
    normalises it); a count is what tells. Returns the chains to rewrite although their rules
    did not change (per table), and the findings. A plan repairs missing chains and jumps on
    its own once it is given the listing.
    """
    rewrite: dict[str, set[str]] = {}
    found: list[Repair] = []
    for table, written in applied.items():
        have, counts = chains.get(table, set()), rule_counts.get(table, {})
        for chain in sorted(written):
            want = rule_count(written[chain])
            if chain not in have:
                found.append(Repair("chain", f"{table}/{chain} deleted"))
            elif counts.get(chain, 0) != want:
                rewrite.setdefault(table, set()).add(chain)
                got = counts.get(chain, 0)
                state = "flushed" if got == 0 else "altered"
                found.append(Repair("chain", f"{table}/{chain} {state}: {got} rules, {want} written"))
    for table, builtin, target in sorted(set(jumps)):
        if table in applied and (builtin, target) not in present_jumps.get(table, set()):
            found.append(Repair("jump", f"{table}/{builtin} jump to {target} missing"))
    return rewrite, tuple(found)


def without(applied: Mapping[str, Mapping[str, Held]], chains: Mapping[str, set[str]]) -> dict[str, dict[str, Held]]:
    """`applied` less `chains`, so that a plan writes those again."""
    return {t: {c: r for c, r in written.items() if c not in chains.get(t, ())} for t, written in applied.items()}


TABLE_ORDER = ("mangle", FILTER, NAT)


def restore_text(
    tables: Mapping[str, Mapping[str, Held]],
    write: Mapping[str, set[str]],
    delete: Mapping[str, set[str]],
    jumps: Mapping[str, Iterable[str]],
    drop_jumps: Mapping[str, Iterable[str]] | None = None,
) -> str:
    out: list[str] = []
    for table in TABLE_ORDER:
        chains = tables.get(table, {})
        w = sorted(write.get(table, ()))
        d = sorted(delete.get(table, ()))
        j = list(jumps.get(table, ()))
        dj = list((drop_jumps or {}).get(table, ()))
        if not (w or d or j or dj):
            continue
        out.append(f"*{table}")
        # Declaring a chain flushes it (with --noflush, only the declared chains are touched).
        out.extend(f":{c} - [0:0]" for c in w)
        out.extend(f":{c} - [0:0]" for c in d)
        out.extend(dj)
        # Built-in hooks go in only once their target chains exist in this same transaction.
        out.extend(f"-I {rule.split(' ', 1)[0]} 1 {rule.split(' ', 1)[1]}" for rule in reversed(j))
        for c in _write_order(table, w):
            rules = chains[c]
            if isinstance(rules, Stamp):  # a caller's bug: it must render a chain it writes
                raise ValueError(f"{table}/{c} is to be written but only its stamp is known")
            out.extend(rules)
        out.extend(f"-X {c}" for c in d)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def _write_order(table: str, chains: list[str]) -> list[str]:
    # Fixed chains first, then per-service ones; restore does not care, readers of --dry-run do.
    per_service = names.SERVICE_CHAIN_PREFIXES
    return [c for c in chains if not c.startswith(per_service)] + [c for c in chains if c.startswith(per_service)]
