"""`kproxy sync|trace|cleanup --mode ipvs`: the IPVS mode behind the command line.

cli.py parses the common options and the cluster state and hands them here; this module builds
the backends for the IPVS mode, runs one sync per IP family, explains a packet, or removes what
the mode created. Imports of the backends (pyroute2) stay inside the functions, so that loading
the command line costs nothing for the other modes.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from kproxy.config import (
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    IpvsConfig,
    ProxyConfig,
    parse_duration,
    validate_ipvs_config,
)
from kproxy.errors import BackendError, ConfigError
from kproxy.model import ClusterState, IPFamily
from kproxy.proxier import ipvs as pv
from kproxy.proxier import names

F = TypeVar("F", bound=Callable[..., Any])

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


def parse_seconds(text: str, flag: str) -> float:
    """Seconds from a plain number or a Go duration as kube-proxy's flags take (`900s`, `1m30s`)."""
    s = text.strip()
    if re.fullmatch(r"\d+(\.\d*)?", s):
        return float(s)
    try:
        return parse_duration(s)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None


def ipvs_options(fn: F) -> F:
    """kube-proxy's --ipvs-* flags, for `kproxy sync` and `kproxy trace`."""
    for opt in reversed(
        [
            click.option(
                "--ipvs-scheduler",
                default=DEFAULT_SCHEDULER,
                show_default=True,
                help=f"IPVS mode: scheduler ({', '.join(SCHEDULERS)}).",
            ),
            click.option("--ipvs-strict-arp", is_flag=True, help="IPVS mode: arp_ignore=1, arp_announce=2."),
            click.option("--ipvs-tcp-timeout", default="0", help="IPVS mode: idle TCP timeout (900s; 0 keeps)."),
            click.option("--ipvs-tcpfin-timeout", default="0", help="IPVS mode: TCP FIN_WAIT timeout (0 keeps)."),
            click.option("--ipvs-udp-timeout", default="0", help="IPVS mode: UDP timeout (0 keeps)."),
            click.option(
                "--ipvs-exclude-cidrs", default="", help="IPVS mode: CIDRs whose virtual servers are not ours."
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def ipvs_config(kw: dict[str, Any]) -> IpvsConfig:
    from kproxy.config import parse_cidr_list

    return validate_ipvs_config(
        IpvsConfig(
            scheduler=kw.get("ipvs_scheduler") or DEFAULT_SCHEDULER,
            strict_arp=bool(kw.get("ipvs_strict_arp")),
            tcp_timeout=parse_seconds(kw.get("ipvs_tcp_timeout") or "0", "--ipvs-tcp-timeout"),
            tcp_fin_timeout=parse_seconds(kw.get("ipvs_tcpfin_timeout") or "0", "--ipvs-tcpfin-timeout"),
            udp_timeout=parse_seconds(kw.get("ipvs_udp_timeout") or "0", "--ipvs-udp-timeout"),
            exclude_cidrs=parse_cidr_list(kw.get("ipvs_exclude_cidrs") or "", "--ipvs-exclude-cidrs"),
        )
    )


def make_proxier(family: IPFamily, ipvs_cfg: IpvsConfig, variant: str, conntrack: bool = True) -> Any:
    """An IpvsProxier over the real backends, for use in the calling thread."""
    from kproxy.backends.conntrack import Conntrack
    from kproxy.backends.iptables import Iptables
    from kproxy.proxier.ipvs_proxier import real_ipvs_proxier

    return real_ipvs_proxier(family, ipvs_cfg, Iptables(family, variant), Conntrack(family) if conntrack else None)


def sync_ipvs(cfg: ProxyConfig, ipvs_cfg: IpvsConfig, state: ClusterState, *, dry_run: bool, variant: str) -> list[Any]:
    """One sync per IP family of this kernel; prints the dry-run text or a summary per family."""
    from kproxy.backends.host import local_addresses
    from kproxy.families import kernel_families
    from kproxy.proxier.base import family_view, node_context

    node = state.nodes.get(cfg.node_name)
    results = []
    for family in kernel_families():
        proxier = make_proxier(family, ipvs_cfg, variant, conntrack=not dry_run)
        note = ""
        try:
            bound = _bound(proxier)
            host = tuple(a for a in local_addresses(family) if a not in bound)
            node_ips = node.addresses_of(family) if node is not None else ()
            if dry_run and node_ips and not set(node_ips) & set(host):
                # Reading another node's dump: NodePorts go on that node's addresses, not ours.
                host = node_ips + (("127.0.0.1",) if family is IPFamily.V4 else ("::1",))
                note = f" (NodePorts on the Node object's addresses: this host is not {cfg.node_name})"
            ctx = node_context(cfg, family, node, host)
            result = proxier.sync(family_view(state, family), ctx, full=True, dry_run=dry_run)
        finally:
            proxier.ipvs.close()
        results.append(result)
        name = "IPv4" if family is IPFamily.V4 else "IPv6"
        if dry_run:
            click.echo(f"# {name}: IPVS table in ipvsadm -Ln form, then addresses, ipsets and iptables rules{note}")
            click.echo(result.payload, nl=False)
        else:
            click.echo(result.summary())
    return results


def _bound(proxier: Any) -> set[str]:
    try:
        return set(proxier.device.addresses())
    except BackendError:
        return set()


def trace_ipvs(
    cfg: ProxyConfig,
    ipvs_cfg: IpvsConfig,
    state: ClusterState,
    family: IPFamily,
    host: tuple[str, ...],
    src: str,
    dst: str,
    port: int,
    proto: str,
    iface: str,
) -> None:
    from kproxy.backends.dummy import DummyDevice
    from kproxy.proxier.base import family_view, node_context
    from kproxy.testing.ipvs_tracer import IpvsTracer

    node = state.nodes.get(cfg.node_name)
    try:
        bound = DummyDevice(names.IPVS_DEVICE).addresses(family)
    except BackendError:
        bound = set()
    ctx = node_context(cfg, family, node, tuple(a for a in host if a not in bound))
    view = family_view(state, family)
    desired = pv.render(view.ports, view.endpoints, ctx, ipvs_cfg)
    result = IpvsTracer(desired, ctx.local_ips).trace(src, dst, port, proto, iface)
    click.echo("\n".join(result.explain()))


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
