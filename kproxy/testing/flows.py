"""The packet-flow table every mode is tested against (upstream's packetFlowTest style).

Each case: which endpoints a new connection can reach, whether it is masqueraded, or REJECT /
DROP / untouched. A case the IPVS mode cannot match says what it gives instead and why
(`ipvs=`, `ipvs_why=`). The test IP plan: node-1 192.168.0.2 with pods 10.0.1.0/24, node-2's pods
10.0.2.0/24, cluster CIDR 10.0.0.0/8, outside clients 203.0.113.0/24, LB IPs 198.51.100.0/24.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from kproxy.config import ProxyConfig
from kproxy.proxier.iptables.trace import DROP, REJECT, UNTOUCHED
from kproxy.testing.builders import endpoint, endpoint_slice, hinted, node, service

LOCAL_POD, LOCAL_POD2, REMOTE_POD = "10.0.1.10", "10.0.1.11", "10.0.2.10"
FAR_POD = "10.0.3.10"  # on node-3, in another zone
OTHER_POD = "10.0.1.20"
NODE_IP = "192.168.0.2"
OUTSIDE, OUTSIDE_FAR = "203.0.113.10", "203.0.113.200"
LB_IP, EXT_IP = "198.51.100.10", "198.51.100.20"
BOTH = {f"{LOCAL_POD}:80", f"{REMOTE_POD}:80"}
LOCAL_ONLY = {f"{LOCAL_POD}:80"}
REMOTE_ONLY = {f"{REMOTE_POD}:80"}
BASE_CFG = ProxyConfig(node_name="node-1", cluster_cidrs=("10.0.0.0/8",))
ZONE_A = node(labels={"topology.kubernetes.io/zone": "zone-a"})  # node-1, in zone-a


def both_endpoints() -> list[dict[str, Any]]:
    return [endpoint(LOCAL_POD, "node-1"), endpoint(REMOTE_POD, "node-2")]


def spread(distribution: str, *, unhinted: str = "") -> list[dict[str, Any]]:
    """node-1's and node-2's pods in zone-a, node-3's in zone-b, hinted as the EndpointSlice
    controller hints them for `distribution`, except the pod at `unhinted`."""
    eps = [(LOCAL_POD, "node-1", "zone-a"), (REMOTE_POD, "node-2", "zone-a"), (FAR_POD, "node-3", "zone-b")]
    return [endpoint(ip, n) if ip == unhinted else hinted(endpoint(ip, n), distribution, z) for ip, n, z in eps]


@dataclass
class Flow:
    name: str
    src: str
    dst: str
    port: int
    expect: set[str] | str  # endpoint set, or REJECT / DROP / UNTOUCHED
    masq: bool | None = None
    proto: str = "tcp"
    iface: str = "eth0"
    # Where the IPVS mode cannot give the iptables mode's result: what it gives, and why.
    ipvs: set[str] | str | None = None
    ipvs_why: str = ""

    def expected(self, mode: str) -> set[str] | str:
        return self.ipvs if mode == "ipvs" and self.ipvs is not None else self.expect

    def expected_masq(self, mode: str) -> bool | None:
        return None if mode == "ipvs" and self.ipvs is not None else self.masq


@dataclass
class Scenario:
    name: str
    objects: list[dict[str, Any]]
    flows: list[Flow]
    cfg: ProxyConfig = BASE_CFG
    affinity: dict[str, str] = field(default_factory=dict)


SCENARIOS = [
    Scenario(
        "clusterip",
        [service(), endpoint_slice(endpoints=both_endpoints())],
        [
            Flow("pod to cluster IP", OTHER_POD, "172.30.0.41", 80, BOTH, masq=False, iface="cbr0"),
            Flow("node to cluster IP", NODE_IP, "172.30.0.41", 80, BOTH, masq=True),
            Flow("outside to cluster IP", OUTSIDE, "172.30.0.41", 80, BOTH, masq=True),
            Flow(
                "other port untouched",
                OTHER_POD,
                "172.30.0.41",
                81,
                UNTOUCHED,
                ipvs=REJECT,
                ipvs_why="The VIP is a local address in the IPVS mode, so its VIP filter refuses what no Service serves (upstream KUBE-IPVS-FILTER, #72236); iptables routes it on",
            ),
            Flow(
                "udp to a tcp service untouched",
                OTHER_POD,
                "172.30.0.41",
                80,
                UNTOUCHED,
                proto="udp",
                ipvs=REJECT,
                ipvs_why="The VIP is a local address in the IPVS mode, so its VIP filter refuses what no Service serves (upstream KUBE-IPVS-FILTER, #72236); iptables routes it on",
            ),
        ],
    ),
    Scenario(
        "no endpoints reject",
        [
            service(type="LoadBalancer", node_port=30080, lb_ips=[LB_IP], external_ips=[EXT_IP]),
            endpoint_slice(endpoints=[]),
        ],
        [
            Flow("pod to cluster IP", OTHER_POD, "172.30.0.41", 80, REJECT),
            Flow("node to cluster IP", NODE_IP, "172.30.0.41", 80, REJECT),
            Flow("outside to node port", OUTSIDE, NODE_IP, 30080, REJECT),
            Flow("outside to LB IP", OUTSIDE, LB_IP, 80, REJECT),
            Flow("outside to external IP", OUTSIDE, EXT_IP, 80, REJECT),
        ],
    ),
    Scenario(
        "only non-serving terminating endpoints reject",
        [service(), endpoint_slice(endpoints=[endpoint(REMOTE_POD, ready=False, serving=False, terminating=True)])],
        [Flow("pod to cluster IP", OTHER_POD, "172.30.0.41", 80, REJECT)],
    ),
    Scenario(
        "serving terminating endpoints are the fallback",
        [service(), endpoint_slice(endpoints=[endpoint(REMOTE_POD, ready=False, serving=True, terminating=True)])],
        [Flow("pod to cluster IP", OTHER_POD, "172.30.0.41", 80, REMOTE_ONLY, masq=False)],
    ),
    Scenario(
        "hairpin",
        [service(), endpoint_slice(endpoints=[endpoint(LOCAL_POD, "node-1")])],
        [Flow("pod to itself through the service", LOCAL_POD, "172.30.0.41", 80, LOCAL_ONLY, masq=True)],
    ),
    Scenario(
        "nodeport",
        [service(type="NodePort", node_port=30080), endpoint_slice(endpoints=both_endpoints())],
        [
            Flow("outside to node IP", OUTSIDE, NODE_IP, 30080, BOTH, masq=True),
            Flow("node to its own IP", NODE_IP, NODE_IP, 30080, BOTH, masq=True),
            Flow(
                "node to localhost",
                "127.0.0.1",
                "127.0.0.1",
                30080,
                BOTH,
                masq=True,
                ipvs=UNTOUCHED,
                ipvs_why="no localhost NodePorts in the IPVS mode, as upstream; the node's own stack gets the packet",
            ),
            Flow("pod to node IP", OTHER_POD, NODE_IP, 30080, BOTH, masq=True),
            Flow("not a node address", OUTSIDE, "192.168.0.99", 30080, UNTOUCHED),
        ],
    ),
    Scenario(
        "nodeport addresses restricted",
        [service(type="NodePort", node_port=30080), endpoint_slice(endpoints=both_endpoints())],
        [
            Flow("outside to node IP", OUTSIDE, NODE_IP, 30080, BOTH, masq=True),
            Flow("localhost not in the CIDRs", "127.0.0.1", "127.0.0.1", 30080, UNTOUCHED),
        ],
        cfg=replace(BASE_CFG, nodeport_addresses=("192.168.0.0/24",)),
    ),
    Scenario(
        "nodeport addresses primary",
        [node(), service(type="NodePort", node_port=30080), endpoint_slice(endpoints=both_endpoints())],
        [
            Flow("outside to primary IP", OUTSIDE, NODE_IP, 30080, BOTH, masq=True),
            Flow("localhost is not primary", "127.0.0.1", "127.0.0.1", 30080, UNTOUCHED),
        ],
        cfg=replace(BASE_CFG, nodeport_addresses=("primary",)),
    ),
    Scenario(
        "external IP",
        [service(external_ips=[EXT_IP]), endpoint_slice(endpoints=both_endpoints())],
        [Flow("outside to external IP", OUTSIDE, EXT_IP, 80, BOTH, masq=True)],
    ),
    Scenario(
        "etp local with a local endpoint",
        [
            service(type="LoadBalancer", node_port=30080, lb_ips=[LB_IP], etp="Local", hc_node_port=32000),
            endpoint_slice(endpoints=both_endpoints()),
        ],
        [
            Flow("outside to LB keeps client IP", OUTSIDE, LB_IP, 80, LOCAL_ONLY, masq=False),
            Flow("outside to node port keeps client IP", OUTSIDE, NODE_IP, 30080, LOCAL_ONLY, masq=False),
            Flow("pod to LB is short-circuited", OTHER_POD, LB_IP, 80, BOTH, masq=False, iface="cbr0"),
            Flow("node to LB is masqueraded", NODE_IP, LB_IP, 80, BOTH, masq=True),
            Flow("cluster IP still uses every endpoint", OTHER_POD, "172.30.0.41", 80, BOTH, masq=False),
        ],
    ),
    Scenario(
        "etp local without a local endpoint",
        [
            service(type="LoadBalancer", node_port=30080, lb_ips=[LB_IP], etp="Local", hc_node_port=32000),
            endpoint_slice(endpoints=[endpoint(REMOTE_POD)]),
        ],
        [
            Flow("outside to LB dropped", OUTSIDE, LB_IP, 80, DROP),
            Flow("outside to node port dropped", OUTSIDE, NODE_IP, 30080, DROP),
            Flow("pod to LB still served", OTHER_POD, LB_IP, 80, REMOTE_ONLY, masq=False),
            Flow("node to LB still served", NODE_IP, LB_IP, 80, REMOTE_ONLY, masq=True),
            Flow("health check port accepted", OUTSIDE, NODE_IP, 32000, UNTOUCHED),
        ],
    ),
    Scenario(
        "etp and itp both local",
        [
            service(type="LoadBalancer", node_port=30080, lb_ips=[LB_IP], etp="Local", itp="Local"),
            endpoint_slice(endpoints=both_endpoints()),
        ],
        [
            Flow("outside to LB gets the local endpoint", OUTSIDE, LB_IP, 80, LOCAL_ONLY, masq=False),
            Flow(
                "pod to LB is short-circuited to every endpoint",
                OTHER_POD,
                LB_IP,
                80,
                BOTH,
                masq=False,
                ipvs=LOCAL_ONLY,
                ipvs_why="the IPVS mode short-circuits pods through the ClusterIP, which iTP Local confines "
                "to this node's endpoints; iptables jumps to the cluster chain directly",
            ),
            Flow("pod to cluster IP gets the local endpoint", OTHER_POD, "172.30.0.41", 80, LOCAL_ONLY),
        ],
    ),
    Scenario(
        "itp local",
        [service(itp="Local"), endpoint_slice(endpoints=both_endpoints())],
        [Flow("pod gets the local endpoint only", OTHER_POD, "172.30.0.41", 80, LOCAL_ONLY, masq=False)],
    ),
    Scenario(
        "itp local without a local endpoint",
        [service(itp="Local"), endpoint_slice(endpoints=[endpoint(REMOTE_POD)])],
        [
            Flow("pod dropped", OTHER_POD, "172.30.0.41", 80, DROP),
            Flow("node dropped", NODE_IP, "172.30.0.41", 80, DROP),
        ],
    ),
    Scenario(
        "prefer same node",
        [ZONE_A, service(trafficDistribution="PreferSameNode"), endpoint_slice(endpoints=spread("PreferSameNode"))],
        [
            Flow("pod gets this node's endpoint", OTHER_POD, "172.30.0.41", 80, LOCAL_ONLY, masq=False),
            Flow("node gets this node's endpoint", NODE_IP, "172.30.0.41", 80, LOCAL_ONLY, masq=True),
            Flow("outside gets this node's endpoint", OUTSIDE, "172.30.0.41", 80, LOCAL_ONLY, masq=True),
        ],
    ),
    Scenario(
        "prefer same node, one endpoint without hints",
        [
            ZONE_A,
            service(trafficDistribution="PreferSameNode"),
            endpoint_slice(endpoints=spread("PreferSameNode", unhinted=FAR_POD)),
        ],
        [Flow("pod gets every endpoint", OTHER_POD, "172.30.0.41", 80, {*BOTH, f"{FAR_POD}:80"}, masq=False)],
    ),
    Scenario(
        "prefer same node, none on this node: zone hints",
        [
            ZONE_A,
            service(trafficDistribution="PreferSameNode"),
            endpoint_slice(endpoints=spread("PreferSameNode")[1:]),
        ],
        [Flow("pod gets this zone's endpoint", OTHER_POD, "172.30.0.41", 80, REMOTE_ONLY, masq=False)],
    ),
    Scenario(
        "prefer close is prefer same zone",
        [ZONE_A, service(trafficDistribution="PreferClose"), endpoint_slice(endpoints=spread("PreferClose"))],
        [Flow("pod gets this zone's endpoints", OTHER_POD, "172.30.0.41", 80, BOTH, masq=False)],
    ),
    Scenario(
        "zone hints on a node without a zone label",
        [service(trafficDistribution="PreferSameZone"), endpoint_slice(endpoints=spread("PreferSameZone")[1:])],
        [Flow("pod gets every endpoint", OTHER_POD, "172.30.0.41", 80, {*REMOTE_ONLY, f"{FAR_POD}:80"}, masq=False)],
    ),
    Scenario(
        "prefer same node with etp local and no local endpoint",
        [
            ZONE_A,
            service(
                type="LoadBalancer", node_port=30080, lb_ips=[LB_IP], etp="Local", trafficDistribution="PreferSameNode"
            ),
            endpoint_slice(endpoints=spread("PreferSameNode")[1:]),
        ],
        [
            Flow("outside to LB dropped: hints never widen the local set", OUTSIDE, LB_IP, 80, DROP),
            Flow("pod to cluster IP gets this zone's endpoint", OTHER_POD, "172.30.0.41", 80, REMOTE_ONLY, masq=False),
            Flow("pod to LB is short-circuited to the hinted set", OTHER_POD, LB_IP, 80, REMOTE_ONLY, masq=False),
        ],
    ),
    Scenario(
        "source ranges",
        [
            service(type="LoadBalancer", node_port=30080, lb_ips=[LB_IP], source_ranges=["203.0.113.0/25"]),
            endpoint_slice(endpoints=both_endpoints()),
        ],
        [
            Flow("allowed source", OUTSIDE, LB_IP, 80, BOTH, masq=True),
            Flow("other source dropped", OUTSIDE_FAR, LB_IP, 80, DROP),
            Flow("node not in range dropped", NODE_IP, LB_IP, 80, DROP),
            Flow("node ports ignore ranges", OUTSIDE_FAR, NODE_IP, 30080, BOTH, masq=True),
        ],
    ),
    Scenario(
        "source range holding the node IP",
        [
            service(type="LoadBalancer", node_port=30080, lb_ips=[LB_IP], source_ranges=["192.168.0.0/24"]),
            endpoint_slice(endpoints=both_endpoints()),
        ],
        [
            Flow("node allowed", NODE_IP, LB_IP, 80, BOTH, masq=True),
            Flow("node with the LB IP as source allowed", LB_IP, LB_IP, 80, BOTH, masq=True),
            Flow("outside dropped", OUTSIDE, LB_IP, 80, DROP),
        ],
    ),
    Scenario(
        "masquerade all",
        [service(), endpoint_slice(endpoints=both_endpoints())],
        [Flow("pod is masqueraded", OTHER_POD, "172.30.0.41", 80, BOTH, masq=True)],
        cfg=replace(BASE_CFG, masquerade_all=True),
    ),
    Scenario(
        "no local detector",
        [service(), endpoint_slice(endpoints=both_endpoints())],
        [
            Flow("outside is not masqueraded", OUTSIDE, "172.30.0.41", 80, BOTH, masq=False),
        ],
        cfg=replace(BASE_CFG, cluster_cidrs=()),
    ),
    Scenario(
        "detect local by node CIDR",
        [node(), service(), endpoint_slice(endpoints=both_endpoints())],
        [
            Flow("own pod not masqueraded", OTHER_POD, "172.30.0.41", 80, BOTH, masq=False),
            Flow("pod of another node masqueraded", "10.0.2.20", "172.30.0.41", 80, BOTH, masq=True),
        ],
        cfg=replace(BASE_CFG, detect_local_mode="NodeCIDR"),
    ),
    Scenario(
        "detect local by bridge",
        [service(), endpoint_slice(endpoints=both_endpoints())],
        [
            Flow("from the bridge", OTHER_POD, "172.30.0.41", 80, BOTH, masq=False, iface="cbr0"),
            Flow("from the uplink", OUTSIDE, "172.30.0.41", 80, BOTH, masq=True, iface="eth0"),
        ],
        cfg=replace(BASE_CFG, detect_local_mode="BridgeInterface", bridge_interface="cbr0"),
    ),
    Scenario(
        "detect local by interface prefix",
        [service(), endpoint_slice(endpoints=both_endpoints())],
        [
            Flow("from a pod veth", OTHER_POD, "172.30.0.41", 80, BOTH, masq=False, iface="veth12"),
            Flow("from the uplink", OUTSIDE, "172.30.0.41", 80, BOTH, masq=True, iface="eth0"),
        ],
        cfg=replace(BASE_CFG, detect_local_mode="InterfaceNamePrefix", interface_name_prefix="veth"),
    ),
    Scenario(
        "udp and sctp",
        [
            service(name="dns", protocol="UDP", port=53),
            endpoint_slice("dns", endpoints=both_endpoints(), port=53, port_name="p53", protocol="UDP"),
            service(name="sig", protocol="SCTP", port=80, cluster_ip="172.30.0.42"),
            endpoint_slice("sig", endpoints=both_endpoints(), protocol="SCTP"),
        ],
        [
            Flow("udp", OTHER_POD, "172.30.0.41", 53, {f"{LOCAL_POD}:53", f"{REMOTE_POD}:53"}, masq=False, proto="udp"),
            Flow(
                "tcp on the udp port untouched",
                OTHER_POD,
                "172.30.0.41",
                53,
                UNTOUCHED,
                ipvs=REJECT,
                ipvs_why="The VIP is a local address in the IPVS mode, so its VIP filter refuses what no Service serves (upstream KUBE-IPVS-FILTER, #72236); iptables routes it on",
            ),
            Flow("sctp", OTHER_POD, "172.30.0.42", 80, BOTH, masq=False, proto="sctp"),
        ],
    ),
]


def check(tracer: Any, f: Flow, mode: str = "iptables") -> None:
    """Assert where the first packet of `f` ends up through a tracer of `mode`."""
    trace = tracer.trace(f.src, f.dst, f.port, f.proto, f.iface)
    expect, masq = f.expected(mode), f.expected_masq(mode)
    if isinstance(expect, set):
        assert trace.verdicts == {"dnat"}, trace.outcomes
        assert trace.endpoints == expect
    else:
        assert trace.verdicts == {expect}, trace.outcomes
    if masq is not None:
        assert trace.masquerade == {masq}, trace.outcomes


V6 = ProxyConfig(node_name="node-1", cluster_cidrs=("10.0.0.0/8", "fd00:10::/32"))
