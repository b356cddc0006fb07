"""Fold the EndpointSlices of a Service into endpoints per Service port and IP family.

As upstream's endpointSliceCache: a slice port (name, protocol) names a Service port; the
first address of each slice endpoint is the endpoint; an endpoint listed by two slices is kept
once, preferring the ready copy. Endpoints come out sorted by address, so renders are
deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable

from kproxy.model import Endpoint, EndpointSlice, IPFamily, ServicePortName


def endpoints_by_port(slices: Iterable[EndpointSlice], family: IPFamily) -> dict[ServicePortName, tuple[Endpoint, ...]]:
    merged: dict[ServicePortName, dict[tuple[str, int], Endpoint]] = {}
    for es in slices:
        if es.family != family:
            continue
        for sp in es.ports:
            name = ServicePortName(es.namespace, es.service_name, sp.name, sp.protocol)
            bucket = merged.setdefault(name, {})
            for se in es.endpoints:
                key = (se.ip, sp.port)
                if key in bucket and bucket[key].ready:
                    continue
                bucket[key] = Endpoint(
                    ip=se.ip,
                    port=sp.port,
                    ready=se.ready,
                    serving=se.serving,
                    terminating=se.terminating,
                    node_name=se.node_name,
                    zone=se.zone,
                    zone_hints=se.zone_hints,
                    node_hints=se.node_hints,
                )
    return {name: tuple(sorted(bucket.values(), key=lambda ep: ep.addr)) for name, bucket in merged.items()}
