"""Stale UDP flows: pinned to an endpoint that no longer serves the Service; and the driver that
deletes them, over a fake conntrack table."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kproxy.backends.conntrack import parse_flows
from kproxy.conntrack import clean_stale_udp, stale_flows
from kproxy.errors import BackendError
from kproxy.model import Endpoint, Flow, IPFamily, Protocol, ServicePort, ServicePortName
from kproxy.node import NodeContext
from kproxy.testing.fakeconntrack import FakeConntrack
from kproxy.view import FamilyView

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


# -- the driver: list, choose, delete --------------------------------------------------------

WEB = ServicePortName("ns1", "web", "http", Protocol.TCP)
VIEW = FamilyView(
    ports={**PORTS, WEB: ServicePort(name=WEB, port=80, cluster_ips=("172.30.0.20",))},
    endpoints={**LIVE, WEB: (Endpoint("10.0.2.20", 8080),)},
)
CTX = NodeContext(family=IPFamily.V4, node_name="node-1", local_ips=("127.0.0.1", "192.168.0.2"))


def test_clean_stale_udp_deletes_exactly_the_stale_flows() -> None:
    gone = flow("172.30.0.10", 53, "10.0.2.99")
    live = flow("172.30.0.10", 53, "10.0.2.10")
    nodeport = flow("192.168.0.2", 30053, "10.0.2.99")
    elsewhere = flow("192.168.0.9", 30053, "10.0.2.99")
    tcp = flow("172.30.0.20", 80, "10.0.2.99", proto=Protocol.TCP)
    ct = FakeConntrack([gone, live, nodeport, elsewhere, tcp])
    assert clean_stale_udp(ct, VIEW, CTX) == 2
    assert ct.lists == 1 and ct.deleted == [gone, nodeport]
    assert ct.flows == [live, elsewhere, tcp]
    # nodePortAddresses: a NodePort flow counts on those addresses only.
    ct = FakeConntrack([nodeport])
    assert clean_stale_udp(ct, VIEW, replace(CTX, nodeport_ips=("192.168.0.3",))) == 0
    assert ct.flows == [nodeport]


def test_clean_stale_udp_lists_nothing_without_a_udp_service_port() -> None:
    ct = FakeConntrack([flow("172.30.0.10", 53, "10.0.2.99")])
    tcp_only = FamilyView(ports={WEB: VIEW.ports[WEB]}, endpoints={WEB: VIEW.endpoints[WEB]})
    assert clean_stale_udp(ct, tcp_only, CTX) == 0
    assert ct.lists == 0 and ct.deleted == []


def test_clean_stale_udp_raises_what_conntrack_raises() -> None:
    ct = FakeConntrack([flow("172.30.0.10", 53, "10.0.2.99")])
    ct.fail_next()
    with pytest.raises(BackendError, match="injected"):
        clean_stale_udp(ct, VIEW, CTX)
    assert clean_stale_udp(ct, VIEW, CTX) == 1
