"""What a proxier of one IP family knows about its node and its configuration.

A frozen value built once per sync from the config, the Node object and the host's
addresses, so that every renderer stays pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from kproxy.model import IPFamily

DETECT_CLUSTER_CIDR = "ClusterCIDR"
DETECT_NODE_CIDR = "NodeCIDR"
DETECT_BRIDGE = "BridgeInterface"
DETECT_PREFIX = "InterfaceNamePrefix"
DETECT_MODES = (DETECT_CLUSTER_CIDR, DETECT_NODE_CIDR, DETECT_BRIDGE, DETECT_PREFIX)


@dataclass(frozen=True, slots=True)
class LocalDetector:
    """Tells pod traffic from the rest, as upstream's LocalTrafficDetector: data only (a CIDR,
    a bridge or an interface-name prefix); each mode renders it into its own syntax.

    `mode` is empty when the configured mode cannot be satisfied (no cluster CIDR of this
    family, say): then nothing is known to be local, exactly as upstream's no-op detector.
    """

    mode: str = ""
    value: str = ""

    @property
    def implemented(self) -> bool:
        return bool(self.mode)

    @property
    def is_cidr(self) -> bool:
        return self.mode in (DETECT_CLUSTER_CIDR, DETECT_NODE_CIDR)

    @property
    def is_bridge(self) -> bool:
        return self.mode == DETECT_BRIDGE


@dataclass(frozen=True, slots=True)
class NodeContext:
    family: IPFamily
    node_name: str
    zone: str = ""
    # The node's primary IP of this family: decides whether a source range "holds the node".
    node_ip: str = ""
    # None: NodePorts on every local address. Otherwise exactly these addresses.
    nodeport_ips: tuple[str, ...] | None = None
    local_detector: LocalDetector = LocalDetector()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    localhost_nodeports: bool = True
    # With nf_conntrack_tcp_be_liberal set, INVALID packets are harmless and not dropped.
    conntrack_tcp_liberal: bool = False
    # Every address of this family on the node (loopback too): what `addrtype LOCAL` matches.
    local_ips: tuple[str, ...] = ()

    @property
    def mark(self) -> str:
        return f"0x{1 << self.masquerade_bit:x}"
