"""API objects (dicts shaped as `kubectl get -o yaml` prints them) to frozen model values.

All validation lives here. A converter either returns a model value, returns None for an
object that is valid but not proxied (headless, ExternalName, another proxy's Service, an FQDN
slice), or raises InvalidObject naming the object and the field. Odd but valid IP text is
normalised the way upstream's ParseIPSloppy does (`172.30.0.041` is `172.30.0.41`).
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from kproxy.errors import InvalidObject
from kproxy.model import (
    NO_NAMES,
    EndpointSlice,
    IPFamily,
    Node,
    Protocol,
    Service,
    ServicePort,
    ServicePortName,
    ServiceType,
    SliceEndpoint,
    SlicePort,
    TrafficDistribution,
    family_of,
)

SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
LB_SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"
DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"

Obj = Mapping[str, Any]


def parse_ip(text: Any, ref: str, field: str) -> str:
    """Canonical text of an IP address, accepting upstream's sloppy IPv4 (leading zeros)."""
    if not isinstance(text, str) or not text:
        raise InvalidObject(ref, field, f"not an IP address: {text!r}")
    if ":" not in text:
        # The common case, ten times faster than ipaddress: an IPv4 address already canonical
        # (inet_pton refuses leading zeros, so what it accepts and prints back is canonical).
        try:
            if socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text)) == text:
                return text
        except OSError:
            pass
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    parts = text.split(".")
    if len(parts) == 4 and all(p.isdigit() and len(p) <= 3 and int(p) <= 255 for p in parts):
        return ".".join(str(int(p)) for p in parts)
    raise InvalidObject(ref, field, f"not an IP address: {text!r}")


def parse_cidr(text: Any, ref: str, field: str) -> str:
    """Canonical text of a CIDR; host bits are masked off as upstream's ParseCIDRSloppy does."""
    if not isinstance(text, str) or "/" not in text:
        raise InvalidObject(ref, field, f"not a CIDR: {text!r}")
    ip_text, _, bits = text.strip().partition("/")
    ip = parse_ip(ip_text, ref, field)
    if not bits.isdigit() or int(bits) > family_of(ip).host_bits:
        raise InvalidObject(ref, field, f"not a CIDR: {text!r}")
    return str(ipaddress.ip_network(f"{ip}/{int(bits)}", strict=False))


def _port(value: Any, ref: str, field: str, *, allow_zero: bool = False) -> int:
    if value is None and allow_zero:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidObject(ref, field, f"not a port number: {value!r}")
    if allow_zero and value == 0:
        return 0
    if not 1 <= value <= 65535:
        raise InvalidObject(ref, field, f"port {value} out of range 1-65535")
    return value


def _protocol(value: Any, ref: str, field: str) -> Protocol:
    if value is None:
        return Protocol.TCP
    try:
        return Protocol(value)
    except ValueError:
        raise InvalidObject(ref, field, f"unknown protocol {value!r} (TCP, UDP or SCTP)") from None


def _meta(obj: Obj, kind: str) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    namespace = _shared(meta.get("namespace") or ("" if kind == "Node" else "default"))
    if not isinstance(name, str) or not name:
        raise InvalidObject(f"{kind} {namespace}/?", "metadata.name", "missing")
    ref = f"{kind} {name}" if kind == "Node" else f"{kind} {namespace}/{name}"
    return namespace, name, ref


def _shared(text: Any) -> Any:
    """One copy of a string repeated across many endpoints (node names, zones): at 100,000
    endpoints the parser's separate copies cost megabytes."""
    return sys.intern(text) if type(text) is str else text


def _hint_names(hints: Any, key: str) -> frozenset[str]:
    """The names of `hints.forZones` or `hints.forNodes`. An entry without a name (the API
    server would refuse it) is skipped, not kept as "": an endpoint left with no hint of that
    kind makes `topology.categorize` ignore that kind for the whole Service, the safe way."""
    found = _list(hints, key) if isinstance(hints, Mapping) else []
    if not found:
        return NO_NAMES  # nearly every endpoint: no lists built
    names = [h.get("name") for h in found if isinstance(h, Mapping)]
    kept = [n for n in names if isinstance(n, str) and n]
    return frozenset(_shared(n) for n in kept) if kept else NO_NAMES


# spec.trafficDistribution values; anything else is ignored, as the EndpointSlice controller
# ignores a value it does not know (a newer API server may accept values this proxy predates).
_TRAFFIC_DISTRIBUTIONS = {
    "PreferClose": TrafficDistribution.PREFER_SAME_ZONE,  # the older name (KEP-3015)
    "PreferSameZone": TrafficDistribution.PREFER_SAME_ZONE,
    "PreferSameNode": TrafficDistribution.PREFER_SAME_NODE,
}


def _traffic_distribution(spec: Obj) -> TrafficDistribution:
    value = spec.get("trafficDistribution")
    if not isinstance(value, str):
        return TrafficDistribution.DEFAULT
    return _TRAFFIC_DISTRIBUTIONS.get(value, TrafficDistribution.DEFAULT)


_EMPTY: Mapping[str, Any] = {}


def _list(obj: Obj, key: str) -> list[Any]:
    value = obj.get(key)
    return value if isinstance(value, list) else []


def convert_service(obj: Obj, *, service_proxy_name: str = "") -> Service | None:
    """A v1 Service as the model, or None when kproxy must not proxy it."""
    namespace, name, ref = _meta(obj, "Service")
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(SERVICE_PROXY_NAME_LABEL, "") != service_proxy_name:
        return None
    spec = obj.get("spec") or {}
    try:
        svc_type = ServiceType(spec.get("type") or "ClusterIP")
    except ValueError:
        raise InvalidObject(ref, "spec.type", f"unknown type {spec.get('type')!r}") from None
    if svc_type is ServiceType.EXTERNAL_NAME:
        return None
    cluster_ips = _cluster_ips(spec, ref)
    if cluster_ips is None:
        return None

    external_ips = tuple(parse_ip(ip, ref, f"spec.externalIPs[{i}]") for i, ip in enumerate(_list(spec, "externalIPs")))
    lb_ips: tuple[str, ...] = ()
    source_ranges: tuple[str, ...] = ()
    if svc_type is ServiceType.LOAD_BALANCER:
        lb_ips = _lb_ingress_ips(obj, ref)
        source_ranges = _source_ranges(spec, meta, ref)

    affinity = _affinity_timeout(spec, ref)
    externally_accessible = svc_type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER) or bool(external_ips)
    etp_local = externally_accessible and _policy(spec, "externalTrafficPolicy", ref)
    itp_local = _policy(spec, "internalTrafficPolicy", ref)
    distribution = _traffic_distribution(spec)
    hc_port = 0
    if svc_type is ServiceType.LOAD_BALANCER and etp_local:
        hc_port = _port(spec.get("healthCheckNodePort"), ref, "spec.healthCheckNodePort", allow_zero=True)

    raw_ports = _list(spec, "ports")
    if not raw_ports:
        raise InvalidObject(ref, "spec.ports", "a proxied Service needs at least one port")
    seen_names: set[str] = set()
    seen_ports: set[tuple[int, Protocol]] = set()
    ports = []
    for i, raw in enumerate(raw_ports):
        field = f"spec.ports[{i}]"
        if not isinstance(raw, Mapping):
            raise InvalidObject(ref, field, "not an object")
        port_name = raw.get("name") or ""
        if not isinstance(port_name, str):
            raise InvalidObject(ref, f"{field}.name", f"not a string: {port_name!r}")
        protocol = _protocol(raw.get("protocol"), ref, f"{field}.protocol")
        number = _port(raw.get("port"), ref, f"{field}.port")
        node_port = 0
        if svc_type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER):
            node_port = _port(raw.get("nodePort"), ref, f"{field}.nodePort", allow_zero=True)
        if port_name in seen_names:
            raise InvalidObject(ref, f"{field}.name", f"duplicate port name {port_name!r}")
        if (number, protocol) in seen_ports:
            raise InvalidObject(ref, f"{field}.port", f"duplicate port {number}/{protocol.value}")
        seen_names.add(port_name)
        seen_ports.add((number, protocol))
        ports.append(
            ServicePort(
                name=ServicePortName(namespace, name, port_name, protocol),
                port=number,
                node_port=node_port,
                cluster_ips=cluster_ips,
                external_ips=external_ips,
                lb_ips=lb_ips,
                lb_source_ranges=source_ranges,
                affinity_timeout=affinity,
                external_policy_local=etp_local,
                internal_policy_local=itp_local,
                health_check_node_port=hc_port,
                externally_accessible=externally_accessible,
                traffic_distribution=distribution,
            )
        )
    return Service(namespace=namespace, name=name, type=svc_type, ports=tuple(ports))


def _cluster_ips(spec: Obj, ref: str) -> tuple[str, ...] | None:
    raw = _list(spec, "clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not raw or raw[0] in ("None", ""):
        return None  # headless: DNS only, nothing to program
    ips = tuple(parse_ip(ip, ref, f"spec.clusterIPs[{i}]") for i, ip in enumerate(raw))
    if spec.get("clusterIP") not in (None, "") and parse_ip(spec["clusterIP"], ref, "spec.clusterIP") != ips[0]:
        raise InvalidObject(ref, "spec.clusterIP", "must equal spec.clusterIPs[0]")
    families = [family_of(ip) for ip in ips]
    if len(ips) > 2 or len(set(families)) != len(families):
        raise InvalidObject(ref, "spec.clusterIPs", "at most one address per IP family")
    for i, declared in enumerate(_list(spec, "ipFamilies")[: len(ips)]):
        want = {"IPv4": IPFamily.V4, "IPv6": IPFamily.V6}.get(declared)
        if want is None:
            raise InvalidObject(ref, f"spec.ipFamilies[{i}]", f"unknown family {declared!r}")
        if want != families[i]:
            raise InvalidObject(ref, f"spec.clusterIPs[{i}]", f"{ips[i]} is not of family {declared}")
    return ips


def _lb_ingress_ips(obj: Obj, ref: str) -> tuple[str, ...]:
    status = (obj.get("status") or {}).get("loadBalancer") or {}
    ips = []
    for i, entry in enumerate(_list(status, "ingress")):
        if not isinstance(entry, Mapping) or not entry.get("ip"):
            continue  # hostname-only entries are for DNS, not for the data plane
        if entry.get("ipMode") == "Proxy":
            continue  # KEP-1860: the LB proxies, traffic arrives for the node, not the VIP
        ips.append(parse_ip(entry["ip"], ref, f"status.loadBalancer.ingress[{i}].ip"))
    return tuple(ips)


def _source_ranges(spec: Obj, meta: Obj, ref: str) -> tuple[str, ...]:
    raw = _list(spec, "loadBalancerSourceRanges")
    field = "spec.loadBalancerSourceRanges"
    if not raw:
        annotation = (meta.get("annotations") or {}).get(LB_SOURCE_RANGES_ANNOTATION, "")
        raw = [r for r in str(annotation).split(",") if r.strip()]
        field = f"metadata.annotations[{LB_SOURCE_RANGES_ANNOTATION}]"
    return tuple(parse_cidr(r.strip() if isinstance(r, str) else r, ref, f"{field}[{i}]") for i, r in enumerate(raw))


def _affinity_timeout(spec: Obj, ref: str) -> int:
    affinity = spec.get("sessionAffinity") or "None"
    if affinity == "None":
        return 0
    if affinity != "ClientIP":
        raise InvalidObject(ref, "spec.sessionAffinity", f"unknown affinity {affinity!r} (None or ClientIP)")
    config = (spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}
    timeout = config.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
        raise InvalidObject(
            ref,
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            f"{timeout!r} is not a whole number of seconds in 1-{MAX_AFFINITY_TIMEOUT}",
        )
    return timeout


def _policy(spec: Obj, key: str, ref: str) -> bool:
    value = spec.get(key) or "Cluster"
    if value not in ("Cluster", "Local"):
        raise InvalidObject(ref, f"spec.{key}", f"unknown policy {value!r} (Cluster or Local)")
    return value == "Local"


def convert_slice(obj: Obj) -> EndpointSlice | None:
    """A discovery.k8s.io/v1 EndpointSlice, or None when it carries nothing to proxy."""
    namespace, name, ref = _meta(obj, "EndpointSlice")
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    address_type = obj.get("addressType")
    if address_type == "FQDN":
        return None
    family = {"IPv4": IPFamily.V4, "IPv6": IPFamily.V6}.get(address_type)  # type: ignore[arg-type]
    if family is None:
        raise InvalidObject(ref, "addressType", f"unknown address type {address_type!r}")
    service_name = labels.get(SERVICE_NAME_LABEL)
    if not service_name:
        raise InvalidObject(ref, f"metadata.labels[{SERVICE_NAME_LABEL}]", "missing: no Service owns it")
    if HEADLESS_LABEL in labels:
        return None

    ports = []
    for i, raw in enumerate(_list(obj, "ports")):
        if not isinstance(raw, Mapping) or raw.get("port") is None:
            continue  # upstream skips ports without a number: they cannot be DNATed to
        ports.append(
            SlicePort(
                name=raw.get("name") or "",
                port=_port(raw.get("port"), ref, f"ports[{i}].port"),
                protocol=_protocol(raw.get("protocol"), ref, f"ports[{i}].protocol"),
            )
        )
    endpoints = []
    v6 = family is IPFamily.V6
    # The loop runs once per endpoint (100,000 at 10,000 Services), hence the plain-dict fast
    # paths before the general Mapping checks and no per-endpoint field names unless one fails.
    for i, raw in enumerate(_list(obj, "endpoints")):
        addresses = _list(raw, "addresses") if type(raw) is dict or isinstance(raw, Mapping) else []
        if not addresses:
            raise InvalidObject(ref, f"endpoints[{i}].addresses", "missing")
        ip = parse_ip(addresses[0], ref, f"endpoints[{i}].addresses[0]")
        if (":" in ip) is not v6:
            raise InvalidObject(ref, f"endpoints[{i}].addresses[0]", f"{ip} is not of addressType {address_type}")
        cond = raw.get("conditions") or _EMPTY
        ready = cond.get("ready") is not False  # nil means ready, as the API documents
        serving = cond.get("serving")
        hints = raw.get("hints")
        endpoints.append(
            SliceEndpoint(
                ip=ip,
                ready=ready,
                serving=ready if serving is None else bool(serving),
                terminating=bool(cond.get("terminating")),
                node_name=_shared(raw.get("nodeName") or ""),
                zone=_shared(raw.get("zone") or ""),
                zone_hints=_hint_names(hints, "forZones") if hints else NO_NAMES,
                node_hints=_hint_names(hints, "forNodes") if hints else NO_NAMES,
            )
        )
    trigger = (meta.get("annotations") or {}).get(TRIGGER_TIME_ANNOTATION)
    return EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=service_name,
        family=family,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        trigger_time=_parse_time(trigger),
    )


def _parse_time(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None  # a bad annotation only costs the latency metric, never the endpoints


def convert_node(obj: Obj) -> Node:
    _, name, ref = _meta(obj, "Node")
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    addresses: list[str] = []
    for kind in ("InternalIP", "ExternalIP"):
        for i, entry in enumerate(_list(status, "addresses")):
            if isinstance(entry, Mapping) and entry.get("type") == kind:
                ip = parse_ip(entry.get("address"), ref, f"status.addresses[{i}].address")
                if ip not in addresses:
                    addresses.append(ip)
    raw_cidrs = _list(spec, "podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    cidrs = tuple(parse_cidr(c, ref, f"spec.podCIDRs[{i}]") for i, c in enumerate(raw_cidrs))
    taints = [t.get("key") for t in _list(spec, "taints") if isinstance(t, Mapping)]
    labels = meta.get("labels") or {}
    return Node(
        name=name,
        addresses=tuple(addresses),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        pod_cidrs=cidrs,
        being_deleted=bool(meta.get("deletionTimestamp")) or TO_BE_DELETED_TAINT in taints,
    )
