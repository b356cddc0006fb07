"""Raw API objects to a validated ClusterState, skipping (and reporting) what is malformed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kproxy.convert import convert_node, convert_service, convert_slice
from kproxy.errors import InvalidObject
from kproxy.heap import gc_paused
from kproxy.model import ClusterState, EndpointSlice, Node, Service


def build_state(
    objects: Iterable[Mapping[str, Any]], *, service_proxy_name: str = ""
) -> tuple[ClusterState, list[InvalidObject]]:
    services: dict[tuple[str, str], Service] = {}
    slices: dict[tuple[str, str], EndpointSlice] = {}
    nodes: dict[str, Node] = {}
    rejected: list[InvalidObject] = []
    # `objects` may be a file parsed as it is iterated: neither allocates reference cycles.
    with gc_paused():
        for obj in objects:
            kind = obj.get("kind")
            try:
                if kind == "Service":
                    svc = convert_service(obj, service_proxy_name=service_proxy_name)
                    if svc is not None:
                        services[svc.key] = svc
                elif kind == "EndpointSlice":
                    es = convert_slice(obj)
                    if es is not None:
                        slices[es.key] = es
                elif kind == "Node":
                    node = convert_node(obj)
                    nodes[node.name] = node
            except InvalidObject as e:
                rejected.append(e)
    return ClusterState(services=services, slices=slices, nodes=nodes), rejected
