"""API-object builders for tests: a valid default, overridden by keyword.

The shared test IP plan (docs/testing.md): pods 10.0.0.0/8 (node-1's 10.0.1.0/24, node-2's
10.0.2.0/24), ClusterIPs 172.30.0.0/16, node-1 192.168.0.2, LB IPs 198.51.100.0/24, outside
clients 203.0.113.0/24; IPv6 mirrors it under fd00:: and 2001:db8::.
"""

from __future__ import annotations

from typing import Any

NODE = "node-1"
NODE_IP = "192.168.0.2"
NODE_IP6 = "fd00:192:168::2"
CLUSTER_CIDR = "10.0.0.0/8"
CLUSTER_CIDR6 = "fd00:10::/32"


def service(
    name: str = "svc1",
    namespace: str = "ns1",
    *,
    type: str = "ClusterIP",
    cluster_ip: str | list[str] = "172.30.0.41",
    ports: list[dict[str, Any]] | None = None,
    port: int = 80,
    protocol: str = "TCP",
    node_port: int | None = None,
    external_ips: list[str] | None = None,
    lb_ips: list[str] | None = None,
    source_ranges: list[str] | None = None,
    affinity: int | None = None,
    etp: str | None = None,
    itp: str | None = None,
    hc_node_port: int | None = None,
    labels: dict[str, str] | None = None,
    **spec_extra: Any,
) -> dict[str, Any]:
    ips = cluster_ip if isinstance(cluster_ip, list) else [cluster_ip]
    if ports is None:
        p: dict[str, Any] = {"name": "p80" if port == 80 else f"p{port}", "port": port, "protocol": protocol}
        if node_port is not None:
            p["nodePort"] = node_port
        ports = [p]
    spec: dict[str, Any] = {"type": type, "clusterIP": ips[0], "clusterIPs": ips, "ports": ports}
    if external_ips:
        spec["externalIPs"] = external_ips
    if source_ranges:
        spec["loadBalancerSourceRanges"] = source_ranges
    if affinity is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity}}
    if etp:
        spec["externalTrafficPolicy"] = etp
    if itp:
        spec["internalTrafficPolicy"] = itp
    if hc_node_port is not None:
        spec["healthCheckNodePort"] = hc_node_port
    spec.update(spec_extra)
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": spec,
    }
    if lb_ips:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}
    return obj


def endpoint(
    ip: str,
    node: str = "node-2",
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    zone: str | None = None,
    zone_hints: list[str] | None = None,
    node_hints: list[str] | None = None,
) -> dict[str, Any]:
    cond: dict[str, Any] = {"ready": ready}
    if serving is not None:
        cond["serving"] = serving
    if terminating is not None:
        cond["terminating"] = terminating
    ep: dict[str, Any] = {"addresses": [ip], "conditions": cond, "nodeName": node}
    if zone is not None:
        ep["zone"] = zone
    hints: dict[str, Any] = {}
    if zone_hints is not None:
        hints["forZones"] = [{"name": z} for z in zone_hints]
    if node_hints is not None:
        hints["forNodes"] = [{"name": n} for n in node_hints]
    if hints:
        ep["hints"] = hints
    return ep


def hinted(ep: dict[str, Any], distribution: str, zone: str) -> dict[str, Any]:
    """`ep` in zone `zone` with the hints the EndpointSlice controller writes for a Service's
    trafficDistribution (v1.35): a zone hint for PreferSameZone or PreferClose, a node and a
    zone hint for PreferSameNode."""
    hints: dict[str, Any] = {"forZones": [{"name": zone}]}
    if distribution == "PreferSameNode":
        hints["forNodes"] = [{"name": ep["nodeName"]}]
    return {**ep, "zone": zone, "hints": hints}


def endpoint_slice(
    service: str = "svc1",
    namespace: str = "ns1",
    *,
    name: str | None = None,
    endpoints: list[dict[str, Any]] | None = None,
    port: int = 80,
    port_name: str = "p80",
    protocol: str = "TCP",
    address_type: str = "IPv4",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service}-abcde",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": address_type,
        "ports": [{"name": port_name, "port": port, "protocol": protocol}],
        "endpoints": endpoints if endpoints is not None else [endpoint("10.0.2.10")],
    }


def node(
    name: str = NODE,
    *,
    addresses: list[str] | None = None,
    pod_cidrs: list[str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"podCIDRs": pod_cidrs or ["10.0.1.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in (addresses or [NODE_IP])]},
    }
