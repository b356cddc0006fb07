"""Packet-flow tables over the rendered iptables rules (upstream's packetFlowTest style).

Each case: which endpoints a new connection can reach, whether it is masqueraded, or
REJECT / DROP / untouched. The test IP plan: node-1 192.168.0.2 with pods 10.0.1.0/24, node-2's
pods 10.0.2.0/24, cluster CIDR 10.0.0.0/8, outside clients 203.0.113.0/24, LB IPs 198.51.100.0/24.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from kproxy.config import ProxyConfig
from kproxy.model import IPFamily, Protocol, ServicePortName
from kproxy.proxier import names
from kproxy.testing.builders import endpoint, endpoint_slice, node, service
from kproxy.testing.scenario import tracer_for
from kproxy.testing.tracer import DROP, REJECT, UNTOUCHED

LOCAL_POD, LOCAL_POD2, REMOTE_POD = "10.0.1.10", "10.0.1.11", "10.0.2.10"
OTHER_POD = "10.0.1.20"
NODE_IP = "192.168.0.2"
OUTSIDE, OUTSIDE_FAR = "203.0.113.10", "203.0.113.200"
LB_IP, EXT_IP = "198.51.100.10", "198.51.100.20"
BOTH = {f"{LOCAL_POD}:80", f"{REMOTE_POD}:80"}
LOCAL_ONLY = {f"{LOCAL_POD}:80"}
REMOTE_ONLY = {f"{REMOTE_POD}:80"}
BASE_CFG = ProxyConfig(node_name="node-1", cluster_cidrs=("10.0.0.0/8",))


def both_endpoints() -> list[dict]:
    return [endpoint(LOCAL_POD, "node-1"), endpoint(REMOTE_POD, "node-2")]


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


@dataclass
class Scenario:
    name: str
    objects: list[dict]
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
            Flow("other port untouched", OTHER_POD, "172.30.0.41", 81, UNTOUCHED),
            Flow("udp to a tcp service untouched", OTHER_POD, "172.30.0.41", 80, UNTOUCHED, proto="udp"),
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
            Flow("node to localhost", "127.0.0.1", "127.0.0.1", 30080, BOTH, masq=True),
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
            Flow("pod to LB is short-circuited to every endpoint", OTHER_POD, LB_IP, 80, BOTH, masq=False),
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
        [Flow("pod dropped", OTHER_POD, "172.30.0.41", 80, DROP)],
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
        [Flow("outside is not masqueraded", OUTSIDE, "172.30.0.41", 80, BOTH, masq=False)],
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
            Flow("tcp on the udp port untouched", OTHER_POD, "172.30.0.41", 53, UNTOUCHED),
            Flow("sctp", OTHER_POD, "172.30.0.42", 80, BOTH, masq=False, proto="sctp"),
        ],
    ),
]


def _check(tr, f: Flow) -> None:  # type: ignore[no-untyped-def]
    trace = tr.trace(f.src, f.dst, f.port, f.proto, f.iface)
    if isinstance(f.expect, set):
        assert trace.verdicts == {"dnat"}, trace.outcomes
        assert trace.endpoints == f.expect
    else:
        assert trace.verdicts == {f.expect}, trace.outcomes
    if f.masq is not None:
        assert trace.masquerade == {f.masq}, trace.outcomes


@pytest.mark.parametrize(
    "scenario,flow",
    [(s, f) for s in SCENARIOS for f in s.flows],
    ids=[f"{s.name}: {f.name}" for s in SCENARIOS for f in s.flows],
)
def test_flow(scenario: Scenario, flow: Flow) -> None:
    _check(tracer_for(scenario.objects, scenario.cfg), flow)


def test_session_affinity_sticks_to_the_remembered_endpoint() -> None:
    objs = [service(affinity=600), endpoint_slice(endpoints=both_endpoints())]
    spn = ServicePortName("ns1", "svc1", "p80", Protocol.TCP)
    sep = names.endpoint_chain(spn, f"{REMOTE_POD}:80")
    fresh = tracer_for(objs, BASE_CFG).trace(OTHER_POD, "172.30.0.41", 80)
    assert fresh.endpoints == BOTH
    sticky = tracer_for(objs, BASE_CFG, affinity={sep: OTHER_POD}).trace(OTHER_POD, "172.30.0.41", 80)
    assert sticky.endpoints == REMOTE_ONLY
    other_client = tracer_for(objs, BASE_CFG, affinity={sep: OTHER_POD}).trace("10.0.1.21", "172.30.0.41", 80)
    assert other_client.endpoints == BOTH


V6 = ProxyConfig(node_name="node-1", cluster_cidrs=("10.0.0.0/8", "fd00:10::/32"))


def test_ipv6_family() -> None:
    objs = [
        service(type="NodePort", node_port=30080, cluster_ip=["172.30.0.41", "fd00:172:30::41"]),
        endpoint_slice(endpoints=both_endpoints()),
        endpoint_slice(
            name="svc1-v6",
            address_type="IPv6",
            endpoints=[endpoint("fd00:10:1::10", "node-1"), endpoint("fd00:10:2::10", "node-2")],
        ),
    ]
    tr = tracer_for(objs, V6, family=IPFamily.V6)
    eps6 = {"[fd00:10:1::10]:80", "[fd00:10:2::10]:80"}
    _check(tr, Flow("pod to v6 cluster IP", "fd00:10:1::20", "fd00:172:30::41", 80, eps6, masq=False))
    _check(tr, Flow("outside to v6 node port", "2001:db8:203::10", "fd00:192:168::2", 30080, eps6, masq=True))
    _check(tr, Flow("no localhost node ports on v6", "::1", "::1", 30080, UNTOUCHED))
    _check(tr, Flow("a v4 address means nothing to the v6 rules", "fd00:10:1::20", "172.30.0.41", 80, UNTOUCHED))
