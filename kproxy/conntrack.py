"""Which UDP conntrack entries are stale, pure (upstream's conntrack reconciler).

UDP has no connection to end, so a client that keeps sending from one source port stays pinned
to whatever endpoint its first packet was DNATed to, even after that endpoint is gone. An
entry is stale when its original destination is a UDP Service address (ClusterIP, externalIP,
LB IP) and port, or a UDP NodePort on a local address, and its reply source is not a serving
endpoint of that Service. TCP is left alone: its connections end and fail visibly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kproxy.model import Endpoint, Flow, Protocol, ServicePort, ServicePortName


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
        serving = by_vip.get((fl.orig_dst, fl.orig_dport))
        if serving is None and fl.orig_dst in local:
            serving = by_nodeport.get(fl.orig_dport)
        if serving is not None and (fl.reply_src, fl.reply_sport) not in serving:
            stale.append(fl)
    return stale
