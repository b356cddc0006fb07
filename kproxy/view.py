"""What every mode shares: one family's view of the cluster state, and its node context.

Pure: host addresses come in as arguments, read by the caller through a backend.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, replace

from kproxy.config import ProxyConfig
from kproxy.endpointslices import endpoints_by_port
from kproxy.model import ClusterState, Endpoint, IPFamily, Node, ServicePort, ServicePortName, family_of
from kproxy.node import DETECT_BRIDGE, DETECT_CLUSTER_CIDR, DETECT_NODE_CIDR, LocalDetector, NodeContext


@dataclass(frozen=True, slots=True)
class Repair:
    """One thing a sync found changed by someone else in what it had programmed, and put back.

    `kind` is the metric label (chain, jump, ipset, virtual_server, real_server); `what` names
    the object and what was found, for the ``rules_tampered`` log line."""

    kind: str
    what: str


@dataclass(frozen=True)
class FamilyView:
    ports: dict[ServicePortName, ServicePort]
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]]
    # The Service ports (before and after) of the Services changed since the previous view of
    # the same IncrementalView; None when not known (a whole view): compare them all.
    changed: frozenset[ServicePortName] | None = None


def family_view(state: ClusterState, family: IPFamily) -> FamilyView:
    ports: dict[ServicePortName, ServicePort] = {}
    for svc in state.services.values():
        for sp in svc.ports:
            view = sp.for_family(family)
            if view is not None:
                ports[sp.name] = view
    endpoints = endpoints_by_port(state.slices.values(), family)
    return FamilyView(ports, {n: eps for n, eps in endpoints.items() if n in ports})


def _in_any(ip: str, cidrs: Iterable[str]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in ipaddress.ip_network(c) for c in cidrs)


def node_context(cfg: ProxyConfig, family: IPFamily, node: Node | None, host_addrs: Iterable[str]) -> NodeContext:
    host = tuple(a for a in host_addrs if family_of(a) == family)
    node_ips = (
        node.addresses_of(family)
        if node is not None and node.addresses_of(family)
        else tuple(a for a in host if not ipaddress.ip_address(a).is_loopback)
    )
    nodeport_ips: tuple[str, ...] | None = None
    if cfg.nodeport_addresses == ("primary",):
        nodeport_ips = node_ips[:1]
    elif cfg.nodeport_addresses:
        cidrs = [c for c in cfg.nodeport_addresses if family_of(c) == family]
        if cidrs:
            nodeport_ips = tuple(a for a in host if _in_any(a, cidrs))

    detector = LocalDetector()
    mode = cfg.detect_local_mode
    if mode == DETECT_CLUSTER_CIDR and cfg.cluster_cidr(family):
        detector = LocalDetector(mode, cfg.cluster_cidr(family))
    elif mode == DETECT_NODE_CIDR and node is not None:
        cidr = next((c for c in node.pod_cidrs if family_of(c) == family), "")
        detector = LocalDetector(mode, cidr) if cidr else LocalDetector()
    elif mode == DETECT_BRIDGE and cfg.bridge_interface:
        detector = LocalDetector(mode, cfg.bridge_interface)
    elif mode not in (DETECT_CLUSTER_CIDR, DETECT_NODE_CIDR, DETECT_BRIDGE) and cfg.interface_name_prefix:
        detector = LocalDetector(mode, cfg.interface_name_prefix)

    return NodeContext(
        family=family,
        node_name=cfg.node_name,
        zone=node.zone if node is not None else "",
        node_ip=node_ips[0] if node_ips else "",
        nodeport_ips=nodeport_ips,
        local_detector=detector,
        masquerade_all=cfg.masquerade_all,
        masquerade_bit=cfg.masquerade_bit,
        localhost_nodeports=cfg.localhost_nodeports,
        conntrack_tcp_liberal=cfg.conntrack_tcp_liberal,
        local_ips=host,
    )


def with_primary_ip(ctx: NodeContext, bind_address: str) -> NodeContext:
    """`ctx` with kube-proxy's --bind-address as the node's primary IP, when of this family.

    Upstream takes a specified bind address as the primary IP (no socket is bound); the
    unspecified addresses (0.0.0.0, ::) and the other family's leave the detected one.
    """
    if bind_address and family_of(bind_address) == ctx.family and not ipaddress.ip_address(bind_address).is_unspecified:
        return replace(ctx, node_ip=bind_address)
    return ctx


def needs_route_localnet(ctx: NodeContext) -> bool:
    """IPv4 NodePorts on 127.0.0.1 need route_localnet=1 (guarded by the localnet firewall)."""
    if ctx.family is not IPFamily.V4 or not ctx.localhost_nodeports:
        return False
    return ctx.nodeport_ips is None or any(ip.startswith("127.") for ip in ctx.nodeport_ips)


def family_inputs(
    proxy: ProxyConfig, bind_address: str, state: ClusterState, family: IPFamily, host: Iterable[str]
) -> tuple[FamilyView, NodeContext]:
    """What one family's proxier syncs from, in every mode: its view of the state, and the node
    as this family sees it (`host`: the addresses of this namespace the mode counts as the node's)."""
    node = state.nodes.get(proxy.node_name)
    ctx = with_primary_ip(node_context(proxy, family, node, host), bind_address)
    return family_view(state, family), ctx
