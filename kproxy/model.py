"""Frozen values that everything past `convert` works with.

No API client object or raw dict crosses this line. IP addresses are kept as their canonical
text (as `ipaddress` prints them) because the renderers format hundreds of thousands of them
and the canonical text is what the kernel tools print back.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class IPFamily(enum.IntEnum):
    V4 = 4
    V6 = 6

    @property
    def any_cidr(self) -> str:
        return "0.0.0.0/0" if self is IPFamily.V4 else "::/0"

    @property
    def host_bits(self) -> int:
        return 32 if self is IPFamily.V4 else 128

    @property
    def label(self) -> str:
        return "IPv4" if self is IPFamily.V4 else "IPv6"


def family_of(ip: str) -> IPFamily:
    """Family of a canonical IP or CIDR text."""
    return IPFamily.V6 if ":" in ip else IPFamily.V4


class Protocol(str, enum.Enum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def lowercase(self) -> str:
        # Not `lower`: that would shadow str.lower with a property of another type.
        return self.value.lower()


class ServiceType(str, enum.Enum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"


class TrafficDistribution(str, enum.Enum):
    """`spec.trafficDistribution` as kproxy keeps it.

    The proxy never filters by it: the EndpointSlice controller turns it into hints (zone hints
    for PreferSameZone; node and zone hints for PreferSameNode) and the hints are what
    `topology.categorize` honours, as upstream's kube-proxy. It is kept to be shown beside the
    hints. `PreferClose` is the older name of PreferSameZone (KEP-3015) and becomes it here.
    """

    DEFAULT = ""
    PREFER_SAME_ZONE = "PreferSameZone"
    PREFER_SAME_NODE = "PreferSameNode"


# An empty frozenset is 216 bytes and, since Python 3.10, not a singleton: endpoints without
# hints (nearly all) share this one, which saved 43 MB at 100,000 endpoints.
NO_NAMES: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """One port of one Service: the unit that gets its own chains, as upstream."""

    namespace: str
    name: str
    port: str
    protocol: Protocol

    def __str__(self) -> str:
        # Upstream's ServicePortName.String(): "ns/name:port", or "ns/name" for an unnamed port.
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base

    @property
    def service_key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class ServicePort:
    """Everything the data plane needs about one Service port, for every IP family."""

    name: ServicePortName
    port: int
    node_port: int = 0
    cluster_ips: tuple[str, ...] = ()
    external_ips: tuple[str, ...] = ()
    lb_ips: tuple[str, ...] = ()
    lb_source_ranges: tuple[str, ...] = ()
    affinity_timeout: int = 0
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0
    # NodePort, LoadBalancer, or externalIPs: reachable from outside, so eTP applies.
    externally_accessible: bool = False
    traffic_distribution: TrafficDistribution = TrafficDistribution.DEFAULT

    @property
    def protocol(self) -> Protocol:
        return self.name.protocol

    def for_family(self, family: IPFamily) -> ServicePort | None:
        """This port as the proxier of one family sees it, or None if it has no IP there."""
        v6 = family is IPFamily.V6
        if len(self.cluster_ips) == 1 and all(
            (":" in ip) is v6
            for ips in (self.cluster_ips, self.external_ips, self.lb_ips, self.lb_source_ranges)
            for ip in ips
        ):
            return self  # single stack, nearly every Service: already this family's whole view
        cluster = tuple(ip for ip in self.cluster_ips if family_of(ip) == family)
        if not cluster:
            return None
        return ServicePort(
            name=self.name,
            port=self.port,
            node_port=self.node_port,
            cluster_ips=cluster[:1],
            external_ips=tuple(ip for ip in self.external_ips if family_of(ip) == family),
            lb_ips=tuple(ip for ip in self.lb_ips if family_of(ip) == family),
            lb_source_ranges=tuple(c for c in self.lb_source_ranges if family_of(c) == family),
            affinity_timeout=self.affinity_timeout,
            external_policy_local=self.external_policy_local,
            internal_policy_local=self.internal_policy_local,
            health_check_node_port=self.health_check_node_port,
            externally_accessible=self.externally_accessible,
            traffic_distribution=self.traffic_distribution,
        )

    @property
    def cluster_ip(self) -> str:
        return self.cluster_ips[0]

    @property
    def uses_cluster_endpoints(self) -> bool:
        # Upstream's UsesClusterEndpoints: even with eTP Local, an externally accessible Service
        # needs the cluster set, because pods and the node reaching its external addresses are
        # short-circuited to every endpoint.
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        return self.internal_policy_local or self.external_policy_local


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    type: ServiceType
    ports: tuple[ServicePort, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of one Service port (an IP and a port)."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    zone_hints: frozenset[str] = NO_NAMES
    node_hints: frozenset[str] = NO_NAMES
    # "ip:port" ("[ip]:port" for IPv6): computed once, the renderers use it several times each.
    addr: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        addr = f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"
        object.__setattr__(self, "addr", addr)


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    port: int
    protocol: Protocol


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    ip: str
    ready: bool
    serving: bool
    terminating: bool
    node_name: str = ""
    zone: str = ""
    zone_hints: frozenset[str] = NO_NAMES
    node_hints: frozenset[str] = NO_NAMES


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str
    family: IPFamily
    ports: tuple[SlicePort, ...]
    endpoints: tuple[SliceEndpoint, ...]
    # endpoints.kubernetes.io/last-change-trigger-time, seconds since the epoch.
    trigger_time: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def service_key(self) -> tuple[str, str]:
        return (self.namespace, self.service_name)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    addresses: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    pod_cidrs: tuple[str, ...] = ()
    being_deleted: bool = False

    @property
    def zone(self) -> str:
        return dict(self.labels).get("topology.kubernetes.io/zone", "")

    def addresses_of(self, family: IPFamily) -> tuple[str, ...]:
        return tuple(ip for ip in self.addresses if family_of(ip) == family)


@dataclass(frozen=True, slots=True)
class ClusterState:
    """A snapshot of everything one sync reads, already validated."""

    services: Mapping[tuple[str, str], Service] = field(default_factory=dict)
    slices: Mapping[tuple[str, str], EndpointSlice] = field(default_factory=dict)
    nodes: Mapping[str, Node] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Flow:
    """One conntrack entry: the original direction and the source of the reply direction."""

    protocol: Protocol
    orig_src: str
    orig_dst: str
    orig_sport: int
    orig_dport: int
    reply_src: str
    reply_sport: int
