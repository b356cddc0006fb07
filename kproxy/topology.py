"""Which endpoints serve which traffic: upstream's CategorizeEndpoints, pure.

- Cluster set: ready endpoints, narrowed by zone hints when usable; if none are ready, the
  serving-and-terminating ones (so a rollout never black-holes traffic); never non-serving ones.
- Local set (only when a Local policy applies): this node's ready endpoints, else this node's
  serving-and-terminating ones.
- Zone hints are honoured only when every ready endpoint has one and one names this node's
  zone; otherwise one missing hint could starve a zone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kproxy.model import Endpoint, ServicePort


@dataclass(frozen=True, slots=True)
class EndpointSets:
    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]
    # Every endpoint some rule of this node can send to: the union of the two sets above.
    reachable: tuple[Endpoint, ...]
    # Any usable endpoint anywhere in the cluster: decides REJECT (none) versus DROP (none here).
    has_any: bool


def _serving_terminating(ep: Endpoint) -> bool:
    return ep.serving and ep.terminating


def can_use_zone_hints(endpoints: Sequence[Endpoint], zone: str) -> bool:
    if not zone:
        return False
    found = False
    for ep in endpoints:
        if not ep.ready:
            continue
        if not ep.zone_hints:
            return False
        found = found or zone in ep.zone_hints
    return found


def categorize(endpoints: Sequence[Endpoint], svc: ServicePort, node_name: str, zone: str = "") -> EndpointSets:
    cluster: tuple[Endpoint, ...] = ()
    has_any = False
    if svc.uses_cluster_endpoints:
        use_zone = can_use_zone_hints(endpoints, zone)
        cluster = tuple(ep for ep in endpoints if ep.ready and (not use_zone or zone in ep.zone_hints))
        if not cluster:
            cluster = tuple(ep for ep in endpoints if _serving_terminating(ep))
        has_any = bool(cluster)

    if not svc.uses_local_endpoints:
        return EndpointSets(cluster, (), cluster, has_any)

    local_ready = tuple(ep for ep in endpoints if ep.ready and ep.node_name == node_name)
    local = local_ready or tuple(ep for ep in endpoints if _serving_terminating(ep) and ep.node_name == node_name)
    has_any = has_any or any(ep.ready or _serving_terminating(ep) for ep in endpoints)

    if not svc.uses_cluster_endpoints:
        return EndpointSets((), local, local, has_any)
    seen = {ep.addr for ep in cluster}
    reachable = cluster + tuple(ep for ep in local if ep.addr not in seen)
    return EndpointSets(cluster, local, reachable, has_any)
