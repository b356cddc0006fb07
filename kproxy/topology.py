"""Which endpoints serve which traffic: upstream's CategorizeEndpoints (v1.35), pure.

- Cluster set: ready endpoints, narrowed by hints when they are usable; if none are ready, the
  serving-and-terminating ones, hints ignored (so a rollout never black-holes traffic); never
  non-serving ones.
- Hints, as upstream's topologyModeFromHints, looking at ready endpoints only: node hints
  (`hints.forNodes`, written for `trafficDistribution: PreferSameNode`) when every ready endpoint
  has one and one names this node; else zone hints (`hints.forZones`, written for PreferSameZone,
  its older name PreferClose, and PreferSameNode) when every ready endpoint has one and one names
  this node's zone; else every ready endpoint. A kind of hint that a single ready endpoint lacks
  is ignored for the whole Service: honouring the others could starve a node or zone that the
  hint-less endpoint was meant to serve. The Service's trafficDistribution itself is never read
  here: the hints are the EndpointSlice controller's verdict on it, as upstream.
- Local set (only when a Local policy applies): this node's ready endpoints, else this node's
  serving-and-terminating ones; hints never narrow it.

`EndpointSets` also says which rule chose each set and why a kind of hint was passed over, so
`kproxy status` can answer "why only node-1's endpoint?" without re-deriving it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from kproxy.model import Endpoint, ServicePort


class Selection(str, enum.Enum):
    """The rule that chose a set of endpoints; the value is what `kproxy status` prints."""

    NODE_HINTS = "node-hints"  # cluster: ready endpoints hinted for this node
    ZONE_HINTS = "zone-hints"  # cluster: ready endpoints hinted for this node's zone
    READY = "ready"  # cluster: every ready endpoint (no usable hints)
    TERMINATING = "terminating-fallback"  # no ready endpoint: the serving-and-terminating ones
    LOCAL_READY = "policy-local"  # local: this node's ready endpoints
    LOCAL_TERMINATING = "policy-local-terminating"  # local: this node's serving-and-terminating
    EMPTY = "none"  # the set applies but nothing qualifies
    UNUSED = "unused"  # the Service's policies never use this set


class HintsSkipped(str, enum.Enum):
    """Why a kind of hint that some ready endpoint carries was not used."""

    NODE_HINT_MISSING = "node-hint-missing"  # another ready endpoint has no node hint
    NO_NODE_HINT_HERE = "no-node-hint-for-this-node"
    ZONE_HINT_MISSING = "zone-hint-missing"  # another ready endpoint has no zone hint
    NODE_HAS_NO_ZONE = "node-has-no-zone-label"
    NO_ZONE_HINT_HERE = "no-zone-hint-for-this-zone"


@dataclass(frozen=True, slots=True)
class EndpointSets:
    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]
    # Every endpoint some rule of this node can send to: the union of the two sets above.
    reachable: tuple[Endpoint, ...]
    # Any usable endpoint anywhere in the cluster: decides REJECT (none) versus DROP (none here).
    has_any: bool
    cluster_rule: Selection = Selection.UNUSED
    local_rule: Selection = Selection.UNUSED
    # In the order they were considered (node hints, then zone hints); empty when hints were
    # used at the first level or no ready endpoint carries any.
    hints_skipped: tuple[HintsSkipped, ...] = ()


def _serving_terminating(ep: Endpoint) -> bool:
    return ep.serving and ep.terminating


# Enum member lookups cost a descriptor call each; categorize runs once per Service port per
# full sync (50,000 at scale), so the members it returns are looked up once, here.
_NODE_HINTS, _ZONE_HINTS, _READY = Selection.NODE_HINTS, Selection.ZONE_HINTS, Selection.READY
_TERMINATING, _EMPTY, _UNUSED = Selection.TERMINATING, Selection.EMPTY, Selection.UNUSED
_LOCAL_READY, _LOCAL_TERMINATING = Selection.LOCAL_READY, Selection.LOCAL_TERMINATING
_NO_HINTS: tuple[Selection, tuple[HintsSkipped, ...]] = (_READY, ())


def hint_mode(endpoints: Sequence[Endpoint], node_name: str, zone: str) -> tuple[Selection, tuple[HintsSkipped, ...]]:
    """NODE_HINTS, ZONE_HINTS or READY for the cluster set, and the kinds of hint passed over."""
    for ep in endpoints:
        if ep.node_hints or ep.zone_hints:
            break
    else:
        return _NO_HINTS  # nearly every Service: no hints at all, nothing more to look at
    any_ready = False
    all_node, for_node, some_node = True, False, False
    all_zone, for_zone, some_zone = True, False, False
    for ep in endpoints:
        if not ep.ready:
            continue
        any_ready = True
        if ep.node_hints:
            some_node = True
            for_node = for_node or node_name in ep.node_hints
        else:
            all_node = False
        if ep.zone_hints:
            some_zone = True
            for_zone = for_zone or (bool(zone) and zone in ep.zone_hints)
        else:
            all_zone = False
    if not any_ready:
        return _READY, ()
    skipped: list[HintsSkipped] = []
    if some_node:
        if not all_node:
            skipped.append(HintsSkipped.NODE_HINT_MISSING)
        elif for_node:
            return _NODE_HINTS, ()
        else:
            skipped.append(HintsSkipped.NO_NODE_HINT_HERE)
    if some_zone:
        if not all_zone:
            skipped.append(HintsSkipped.ZONE_HINT_MISSING)
        elif for_zone:
            return _ZONE_HINTS, tuple(skipped)
        else:
            skipped.append(HintsSkipped.NO_ZONE_HINT_HERE if zone else HintsSkipped.NODE_HAS_NO_ZONE)
    return _READY, tuple(skipped)


def _cluster_set(
    endpoints: Sequence[Endpoint], node_name: str, zone: str
) -> tuple[tuple[Endpoint, ...], Selection, tuple[HintsSkipped, ...]]:
    mode, skipped = hint_mode(endpoints, node_name, zone)
    if mode is _NODE_HINTS:
        chosen = tuple(ep for ep in endpoints if ep.ready and node_name in ep.node_hints)
    elif mode is _ZONE_HINTS:
        chosen = tuple(ep for ep in endpoints if ep.ready and zone in ep.zone_hints)
    else:
        chosen = tuple(ep for ep in endpoints if ep.ready)
    if chosen:
        return chosen, mode, skipped
    # No ready endpoint anywhere (a hint mode always keeps at least one): upstream falls back to
    # the serving-and-terminating ones and ignores hints, a best effort not to drop connections.
    chosen = tuple(ep for ep in endpoints if _serving_terminating(ep))
    return chosen, (_TERMINATING if chosen else _EMPTY), ()


def categorize(endpoints: Sequence[Endpoint], svc: ServicePort, node_name: str, zone: str = "") -> EndpointSets:
    cluster: tuple[Endpoint, ...] = ()
    cluster_rule = _UNUSED
    skipped: tuple[HintsSkipped, ...] = ()
    has_any = False
    if svc.uses_cluster_endpoints:
        cluster, cluster_rule, skipped = _cluster_set(endpoints, node_name, zone)
        has_any = bool(cluster)

    if not svc.uses_local_endpoints:
        return EndpointSets(cluster, (), cluster, has_any, cluster_rule, _UNUSED, skipped)

    local = tuple(ep for ep in endpoints if ep.ready and ep.node_name == node_name)
    local_rule = _LOCAL_READY
    if not local:
        local = tuple(ep for ep in endpoints if _serving_terminating(ep) and ep.node_name == node_name)
        local_rule = _LOCAL_TERMINATING if local else _EMPTY
    has_any = has_any or any(ep.ready or _serving_terminating(ep) for ep in endpoints)

    if not svc.uses_cluster_endpoints:
        return EndpointSets((), local, local, has_any, cluster_rule, local_rule, skipped)
    seen = {ep.addr for ep in cluster}
    reachable = cluster + tuple(ep for ep in local if ep.addr not in seen)
    return EndpointSets(cluster, local, reachable, has_any, cluster_rule, local_rule, skipped)
