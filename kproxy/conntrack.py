"""Which UDP conntrack entries are stale (upstream's conntrack reconciler), and the one driver
that deletes them, for every command and mode.

UDP has no connection to end, so a client that keeps sending from one source port stays pinned
to whatever endpoint its first packet was DNATed to, even after that endpoint is gone. An
entry is stale when its original destination is a UDP Service address (ClusterIP, externalIP,
LB IP) and port, or a UDP NodePort on a local address, and its reply source is not a serving
endpoint of that Service. TCP is left alone: its connections end and fail visibly.

`stale_flows` is the policy, pure. `clean_stale_udp` lists, applies it and deletes, through the
conntrack table it is given (backends/conntrack.py, or a fake); it imports no backend. When to
call it is one rule, upstream's (ConntrackCleanupRequired): after a proxier's first sync, which
is full (the one sync of `kproxy sync`, the first of `kproxy run`), and after every later sync
in which a UDP Service port or its endpoints changed (the change trackers' `udp_changed`); a
cleanup that failed stays due until one succeeds. Later full syncs (a retry, a topology change,
the IPVS mode's periodic read-back) change no endpoint, so they add nothing to clean. The
proxiers never clean: the command or the daemon calls the driver after their sync.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from kproxy.model import Endpoint, Flow, Protocol, ServicePort, ServicePortName
from kproxy.node import NodeContext
from kproxy.view import FamilyView

if TYPE_CHECKING:  # a backend's type only: this module stays pure
    from kproxy.backends.protocols import ConntrackBackend


def stale_flows(
    flows: Iterable[Flow],
    ports: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
    local_ips: Iterable[str] = (),
) -> list[Flow]:
    by_vip: dict[tuple[str, int], frozenset[tuple[str, int]]] = {}
    by_nodeport: dict[int, frozenset[tuple[str, int]]] = {}
    for name, svc in ports.items():
        if svc.protocol is not Protocol.UDP:
            continue
        serving = frozenset((ep.ip, ep.port) for ep in endpoints.get(name, ()) if ep.serving)
        for ip in svc.cluster_ips + svc.external_ips + svc.lb_ips:
            by_vip[(ip, svc.port)] = serving
        if svc.node_port:
            by_nodeport[svc.node_port] = serving
    local = set(local_ips)
    stale = []
    for fl in flows:
        if fl.protocol is not Protocol.UDP:
            continue
        expected = by_vip.get((fl.orig_dst, fl.orig_dport))
        if expected is None and fl.orig_dst in local:
            expected = by_nodeport.get(fl.orig_dport)
        if expected is not None and (fl.reply_src, fl.reply_sport) not in expected:
            stale.append(fl)
    return stale


def clean_stale_udp(conntrack: ConntrackBackend, view: FamilyView, ctx: NodeContext) -> int:
    """Delete one family's stale UDP flows (`stale_flows`); how many were deleted.

    Lists nothing when the view has no UDP Service port: then no flow can be stale. NodePort
    flows count on `ctx.nodeport_ips` (every local address when unset). Logs nothing; a failing
    conntrack tool raises BackendError, for the caller to report or retry.
    """
    if not any(sp.protocol is Protocol.UDP for sp in view.ports.values()):
        return 0
    local = ctx.nodeport_ips if ctx.nodeport_ips is not None else ctx.local_ips
    stale = stale_flows(conntrack.list(), view.ports, view.endpoints, local)
    return conntrack.delete(stale) if stale else 0
