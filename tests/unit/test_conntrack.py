"""Stale UDP flows: pinned to an endpoint that no longer serves the Service."""

from __future__ import annotations

from kproxy.backends.conntrack import parse_flows
from kproxy.conntrack import stale_flows
from kproxy.model import Endpoint, Flow, Protocol, ServicePort, ServicePortName

DNS = ServicePortName("kube-system", "dns", "dns", Protocol.UDP)
PORTS = {
    DNS: ServicePort(name=DNS, port=53, node_port=30053, cluster_ips=("172.30.0.10",), external_ips=("198.51.100.53",))
}
LIVE = {DNS: (Endpoint("10.0.2.10", 5353),)}


def flow(dst: str, dport: int, reply: str, rport: int = 5353, proto: Protocol = Protocol.UDP) -> Flow:
    return Flow(proto, "10.0.1.20", dst, 40000, dport, reply, rport)


def test_flow_to_a_removed_endpoint_is_stale() -> None:
    gone = flow("172.30.0.10", 53, "10.0.2.99")
    live = flow("172.30.0.10", 53, "10.0.2.10")
    assert stale_flows([gone, live], PORTS, LIVE) == [gone]


def test_external_ip_and_node_port_flows() -> None:
    ext = flow("198.51.100.53", 53, "10.0.2.99")
    nodeport = flow("192.168.0.2", 30053, "10.0.2.99")
    other_host_port = flow("192.168.0.9", 30053, "10.0.2.99")
    assert stale_flows([ext, nodeport, other_host_port], PORTS, LIVE, local_ips=["192.168.0.2"]) == [ext, nodeport]


def test_flows_cached_while_there_were_no_endpoints_are_stale() -> None:
    # The Service's own address as reply source: the packet was never DNATed.
    cached = flow("172.30.0.10", 53, "172.30.0.10", 53)
    assert stale_flows([cached], PORTS, LIVE) == [cached]


def test_tcp_and_unrelated_flows_are_left_alone() -> None:
    tcp = flow("172.30.0.10", 53, "10.0.2.99", proto=Protocol.TCP)
    unrelated = flow("172.30.0.11", 53, "10.0.2.99")
    terminating = {DNS: (Endpoint("10.0.2.99", 5353, ready=False, serving=True, terminating=True),)}
    assert stale_flows([tcp, unrelated], PORTS, LIVE) == []
    assert stale_flows([flow("172.30.0.10", 53, "10.0.2.99")], PORTS, terminating) == []


def test_parse_conntrack_listing() -> None:
    text = (
        "udp      17 28 src=10.0.1.20 dst=172.30.0.10 sport=40000 dport=53 src=10.0.2.10 dst=10.0.1.20 "
        "sport=5353 dport=40000 mark=0 use=1\n"
        "conntrack v1.4.7 (conntrack-tools): 1 flow entries have been shown.\n"
    )
    assert parse_flows(text, Protocol.UDP) == [flow("172.30.0.10", 53, "10.0.2.10")]
