"""The IPVS mode behind the registry: its proxier for the daemon, `kproxy sync`, `kproxy trace`,
`kproxy cleanup`, and what it leaves behind when another mode takes the node over.

The command line parses the configuration and the cluster state and hands them here; this module
builds the backends for the IPVS mode, runs one sync per IP family, explains a packet, or removes
what the mode created. Imports of the backends (pyroute2) stay inside the functions, so that
registering the mode costs nothing for the other modes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kproxy.config import IpvsConfig, RunConfig
from kproxy.errors import BackendError
from kproxy.model import ClusterState, IPFamily
from kproxy.proxier import names
from kproxy.proxier.ipvs import render as pv

if TYPE_CHECKING:
    from kproxy.modes import ModeInfo

# kube-proxy's IPVS leftovers, for `cleanup --upstream` (pkg/proxy/ipvs ipsetInfo; IPv6 copies
# are prefixed KUBE-6-).
UPSTREAM_DEVICE = "kube-ipvs0"
UPSTREAM_SETS = (
    "KUBE-LOOP-BACK", "KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL", "KUBE-LOAD-BALANCER",
    "KUBE-LOAD-BALANCER-FW", "KUBE-LOAD-BALANCER-LOCAL", "KUBE-LOAD-BALANCER-SOURCE-IP",
    "KUBE-LOAD-BALANCER-SOURCE-CIDR", "KUBE-NODE-PORT-TCP", "KUBE-NODE-PORT-LOCAL-TCP", "KUBE-NODE-PORT-UDP",
    "KUBE-NODE-PORT-LOCAL-UDP", "KUBE-NODE-PORT-SCTP-HASH", "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
    "KUBE-HEALTH-CHECK-NODE-PORT", "KUBE-IPVS-IPS",
)  # fmt: skip
UPSTREAM_SET_NAMES = frozenset(UPSTREAM_SETS) | {("KUBE-6-" + n[len("KUBE-") :])[:31] for n in UPSTREAM_SETS}


def make_proxier(family: IPFamily, ipvs_cfg: IpvsConfig, variant: str) -> Any:
    """An IpvsProxier over the real backends, for use in the calling thread."""
    from kproxy.backends.iptables import Iptables
    from kproxy.proxier.ipvs.proxier import real_ipvs_proxier

    return real_ipvs_proxier(family, ipvs_cfg, Iptables(family, variant))


def sync_ipvs(cfg: RunConfig, state: ClusterState, *, dry_run: bool) -> str:
    """One sync per IP family of this kernel; the dry-run text or a summary per family."""
    from kproxy.backends.conntrack import Conntrack
    from kproxy.backends.host import local_addresses
    from kproxy.families import kernel_families
    from kproxy.proxier.iptables.mode import node_variant
    from kproxy.proxier.loop import sync_once
    from kproxy.view import family_inputs

    node = state.nodes.get(cfg.proxy.node_name)
    variant = node_variant(cfg, dry_run)
    proxiers = {family: make_proxier(family, cfg.ipvs, variant) for family in kernel_families()}
    notes: dict[IPFamily, str] = {}
    try:
        jobs = {}
        for family, proxier in proxiers.items():
            bound = _bound(proxier)
            host = tuple(a for a in local_addresses(family) if a not in bound)
            node_ips = node.addresses_of(family) if node is not None else ()
            if dry_run and node_ips and not set(node_ips) & set(host):
                # Reading another node's dump: NodePorts go on that node's addresses, not ours.
                host = node_ips + (("127.0.0.1",) if family is IPFamily.V4 else ("::1",))
                notes[family] = f" (NodePorts on the Node object's addresses: this host is not {cfg.proxy.node_name})"
            # The context leaves out the dummy device's addresses, as the proxier's own does.
            jobs[family] = (proxier, *family_inputs(cfg.proxy, cfg.bind_address, state, family, host))

        def header(family: IPFamily) -> str:
            what = "IPVS table in ipvsadm -Ln form, then addresses, ipsets and iptables rules"
            return f"# {family.label}: {what}{notes.get(family, '')}"

        return sync_once(jobs, dry_run=dry_run, header=header, conntrack=Conntrack)
    finally:
        for proxier in proxiers.values():
            proxier.ipvs.close()


def _bound(proxier: Any) -> set[str]:
    try:
        return set(proxier.device.addresses())
    except BackendError:
        return set()


def trace_ipvs(
    cfg: RunConfig,
    state: ClusterState,
    family: IPFamily,
    host: tuple[str, ...],
    packet: tuple[str, str, int, str, str],
) -> list[str]:
    from kproxy.backends.dummy import DummyDevice
    from kproxy.proxier.ipvs.trace import IpvsTracer
    from kproxy.view import family_inputs

    try:
        bound = DummyDevice(names.IPVS_DEVICE).addresses(family)
    except BackendError:
        bound = set()
    view, ctx = family_inputs(cfg.proxy, cfg.bind_address, state, family, tuple(a for a in host if a not in bound))
    desired = pv.render(view.ports, view.endpoints, ctx, cfg.ipvs)
    return IpvsTracer(desired, ctx.local_ips).trace(*packet).explain()


def cleanup_ipvs(upstream: bool = False) -> str:
    """Remove the IPVS mode's virtual servers, dummy device and ipsets (chains: cleanup_iptables).

    Virtual servers removed: those on the dummy device's addresses and those on the node's other
    addresses (NodePorts) — every VS of the node's addresses, as kube-proxy's cleanup flushes the
    whole table; VSs on other addresses stay. Nothing is loaded: without ip_vs there is nothing
    to clean. Run after the iptables cleanup (rules name the sets).
    """
    from kproxy.backends.dummy import DummyDevice
    from kproxy.backends.host import local_addresses
    from kproxy.backends.ipset import Ipset
    from kproxy.families import kernel_families

    devices = [DummyDevice(names.IPVS_DEVICE)] + ([DummyDevice(UPSTREAM_DEVICE)] if upstream else [])
    vips = {a for d in devices for a in d.addresses()}
    removed_vs = 0
    if Path("/proc/thread-self/net/ip_vs").exists():
        from kproxy.backends.ipvs import Ipvs

        local = vips | {a for f in kernel_families() for a in local_addresses(f)}
        with Ipvs() as ipvs:
            for svc in ipvs.services():
                if svc.ip in local:
                    ipvs.delete_service(svc.protocol, svc.ip, svc.port)
                    removed_vs += 1
    removed_sets = 0
    if shutil.which("ipset"):
        ipset = Ipset()

        def owned(name: str) -> bool:
            if name.startswith(names.PREFIX):
                return True
            return upstream and name in UPSTREAM_SET_NAMES

        sets = sorted(ipset.save(owned))
        ipset.destroy(sets)
        removed_sets = len(sets)
    removed_devices = [d.name for d in devices if d.delete()]
    return f"ipvs: removed {removed_vs} virtual servers, {removed_sets} ipsets" + (
        f", device {', '.join(removed_devices)}" if removed_devices else ""
    )


def leave_ipvs_mode(variant: str) -> str | None:
    """What only the IPVS mode used, removed once the iptables mode has taken a node over.

    The two modes share their filter and nat chain names, so the iptables mode's first full
    sync has already replaced those. Left are the mangle firewall chains (which would keep
    filtering with stale ipsets), the ipsets, the virtual servers and the dummy device (whose
    VIPs would keep a deleted Service answering). None when the node shows no IPVS mode (no
    dummy device); run after the iptables mode's rules are in place, never before.
    """
    from kproxy.backends.dummy import DummyDevice
    from kproxy.backends.iptables import Iptables, cleanup_text
    from kproxy.families import kernel_families

    if not DummyDevice(names.IPVS_DEVICE).exists():
        return None
    for family in kernel_families():
        ipt = Iptables(family, variant)
        saved = ipt.save((pv.MANGLE,), prefixes=(names.PREFIX,))
        ipt.restore(cleanup_text(saved, lambda name: name in pv.MANGLE_CHAINS))
    return cleanup_ipvs()


def check_ipvs(cfg: RunConfig, family: IPFamily, expected: Any, complete: bool) -> list[str]:
    """`kproxy status --check` in the IPVS mode: the IPVS table, the ipsets and the nat chains of
    this kernel against `expected` (`status.check`). Only virtual servers on the node's or the
    dummy device's addresses count as ours (others may be another tool's)."""
    from kproxy.backends.dummy import DummyDevice
    from kproxy.backends.host import local_addresses
    from kproxy.backends.ipset import Ipset
    from kproxy.backends.iptables import Iptables
    from kproxy.backends.ipvs import Ipvs
    from kproxy.proxier.iptables.mode import node_variant
    from kproxy.proxier.ipvs.status import check

    try:
        ours = set(DummyDevice(names.IPVS_DEVICE).addresses(family)) | set(local_addresses(family))
    except BackendError:
        ours = set(local_addresses(family))
    iptables = Iptables(family, node_variant(cfg, dry_run=False))
    with Ipvs() as ipvs:
        return check(expected, family, ours, ipvs, Ipset(), iptables, complete)


class IpvsMode:
    def proxier(self, family: IPFamily, cfg: RunConfig, iptables: Any) -> Any:
        from kproxy.proxier.ipvs.proxier import real_ipvs_proxier

        return real_ipvs_proxier(family, cfg.ipvs, iptables)

    def sync_once(self, cfg: RunConfig, state: ClusterState, *, dry_run: bool) -> str:
        return sync_ipvs(cfg, state, dry_run=dry_run)

    def trace(
        self,
        cfg: RunConfig,
        state: ClusterState,
        family: IPFamily,
        host: tuple[str, ...],
        packet: tuple[str, str, int, str, str],
    ) -> list[str]:
        return trace_ipvs(cfg, state, family, host, packet)

    def describe(self, cfg: RunConfig, view: Any, ctx: Any) -> Any:
        from kproxy.backends.dummy import DummyDevice
        from kproxy.proxier.ipvs.status import describe

        # The daemon's and the command's contexts list every address of the namespace; the
        # proxier renders without the VIPs on the dummy device, and so must status.
        try:
            bound = DummyDevice(names.IPVS_DEVICE).addresses(ctx.family)
        except BackendError:
            bound = set()
        return describe(cfg.ipvs, view, ctx, bound)

    def check(self, cfg: RunConfig, family: IPFamily, expected: Any, complete: bool) -> list[str]:
        return check_ipvs(cfg, family, expected, complete)

    def cleanup(self, upstream: bool) -> str | None:
        return cleanup_ipvs(upstream)

    def leave(self, variant: str, successor: ModeInfo) -> str | None:
        # After the iptables mode's leave when the successor writes no iptables (MODES order):
        # the chains naming the ipsets are gone by then.
        return leave_ipvs_mode(variant)


MODE = IpvsMode()
