"""The namespace lab routes real packets with no kproxy rules at all, and the probes tell apart
an answer, a refusal, a silent drop and an unreachable network."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from kproxy.lab.namespaces import NETNS_DIR, Host, Lab, lab_namespaces
from kproxy.testing.netns import EchoServer, Outcome, Sender, probe, probe_many, socket_in

PORT = 8080
FAMILIES = [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")]


@pytest.fixture(scope="module")
def servers(lab: Lab) -> Iterator[dict[str, EchoServer]]:
    """TCP and UDP echo servers on every pod and on node-2 (host network), all addresses."""
    started: dict[str, EchoServer] = {}
    try:
        hosts: list[Host] = [*lab.pods(), lab.node(2)]
        for host in hosts:
            started[host.name] = EchoServer(host, PORT, proto="both").start()
        yield started
    finally:
        for server in started.values():
            server.stop()
    for server in started.values():
        assert server.errors == [], f"{server.name} met errors: {server.errors}"


# ----- the lab describes itself


def test_hosts_follow_the_shared_ip_plan() -> None:
    lab = Lab(prefix="plan", nodes=2, pods_per_node=2, clients=2)
    assert [n.ipv4 for n in lab.nodes] == ["192.168.0.2", "192.168.0.3"]
    assert lab.node("node-2").pod_cidr_v6 == "fd00:10:2::/64"
    assert [p.name for p in lab.pods(node=2)] == ["pod-2a", "pod-2b"]
    pod = lab.pod("pod-2b")
    assert (pod.ns, pod.node, pod.ipv4, pod.ipv6) == ("plan-pod2b", "node-2", "10.0.2.12", "fd00:10:2::12")
    client = lab.client(2)
    assert (client.ipv4, client.ipv6) == ("192.168.0.102", "fd00:192:168::102")
    assert client.extra_v4 == ("203.0.113.20", "203.0.113.21", "203.0.113.202")
    assert client.extra_v6 == ("2001:db8:203::20", "2001:db8:203::202")
    assert lab.host("client-1").ns == "plan-client1"
    assert lab.namespaces[0] == "plan-lan"


def test_nodes_forward_and_send_bridged_traffic_through_netfilter(lab: Lab) -> None:
    wanted = {
        "net.ipv4.ip_forward": "1",
        "net.ipv6.conf.all.forwarding": "1",
        "net.bridge.bridge-nf-call-iptables": "1",
        "net.bridge.bridge-nf-call-ip6tables": "1",
    }
    out = lab.run(lab.node(1), ["sysctl", "-n", *wanted]).stdout.split()
    assert dict(zip(wanted, out, strict=True)) == wanted


# ----- plain routing, real packets


@pytest.mark.parametrize("family", FAMILIES)
def test_client_reaches_a_pod_and_the_pod_sees_the_client(
    lab: Lab, servers: dict[str, EchoServer], family: int
) -> None:
    pod, client = lab.pod("pod-1a"), lab.client(1)
    result = probe(client, pod.ip(family), PORT)
    assert result.outcome is Outcome.ANSWERED, result
    assert result.name == "pod-1a"
    assert (result.local_ip, result.local_port) == (pod.ip(family), PORT)
    assert result.peer_ip == client.ip(family)
    assert result.peer == result.source


@pytest.mark.parametrize("family", FAMILIES)
def test_client_chooses_a_source_outside_the_lan(lab: Lab, servers: dict[str, EchoServer], family: int) -> None:
    client = lab.client(1)
    source = client.extra_v4[1] if family == 4 else client.extra_v6[1]
    result = probe(client, lab.pod("pod-2a").ip(family), PORT, src_ip=source)
    assert result.answered, result
    assert result.peer_ip == source


@pytest.mark.parametrize("family", FAMILIES)
def test_pod_reaches_a_pod_on_another_node(lab: Lab, servers: dict[str, EchoServer], family: int) -> None:
    result = probe(lab.pod("pod-1a"), lab.pod("pod-2b").ip(family), PORT)
    assert (result.name, result.peer_ip) == ("pod-2b", lab.pod("pod-1a").ip(family)), result


@pytest.mark.parametrize("family", FAMILIES)
def test_pod_reaches_a_pod_on_the_same_bridge(lab: Lab, servers: dict[str, EchoServer], family: int) -> None:
    result = probe(lab.pod("pod-1a"), lab.pod("pod-1b").ip(family), PORT, proto="udp")
    assert (result.name, result.peer_ip) == ("pod-1b", lab.pod("pod-1a").ip(family)), result


@pytest.mark.parametrize("family", FAMILIES)
def test_node_reaches_its_own_pod(lab: Lab, servers: dict[str, EchoServer], family: int) -> None:
    node = lab.node(1)
    result = probe(node, lab.pod("pod-1b").ip(family), PORT)
    assert result.name == "pod-1b", result
    gateway = node.gateway_v4 if family == 4 else node.gateway_v6
    assert result.peer_ip == gateway  # the node leaves through cbr0, from its address there


@pytest.mark.parametrize("family", FAMILIES)
def test_pod_reaches_a_host_network_server_on_another_node(
    lab: Lab, servers: dict[str, EchoServer], family: int
) -> None:
    result = probe(lab.pod("pod-1a"), lab.node(2).ip(family), PORT)
    assert result.name == "node-2", result


def test_server_on_node_loopback_is_reachable_from_the_node_only(lab: Lab) -> None:
    node = lab.node(1)
    with EchoServer(node, 9100, proto="both", ips=["127.0.0.1"]):
        for proto in ("tcp", "udp"):
            result = probe(node, "127.0.0.1", 9100, proto=proto)
            assert (result.name, result.local) == ("node-1", "127.0.0.1:9100"), result
        assert probe(lab.client(1), node.ipv4, 9100).outcome is Outcome.REFUSED


@pytest.mark.parametrize("family", FAMILIES)
def test_udp_reply_names_the_address_it_was_sent_to(lab: Lab, servers: dict[str, EchoServer], family: int) -> None:
    node, client = lab.node(2), lab.client(1)
    result = probe(client, node.ip(family), PORT, proto="udp")
    assert (result.name, result.local_ip, result.peer_ip) == ("node-2", node.ip(family), client.ip(family))


# ----- what a probe reports when nothing answers


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_closed_port_is_refused_at_once(lab: Lab, family: int, proto: str) -> None:
    started = time.monotonic()
    result = probe(lab.client(1), lab.pod("pod-2a").ip(family), 9999, proto=proto)
    assert result.outcome is Outcome.REFUSED, result
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_dropped_packets_time_out(lab: Lab, servers: dict[str, EchoServer], family: int) -> None:
    pod = lab.pod("pod-2a")
    tool = "iptables" if family == 4 else "ip6tables"
    rule = ["INPUT", "-p", "tcp", "--dport", str(PORT), "-j", "DROP"]
    lab.run(pod, [tool, "-w", "-I", *rule])
    try:
        result = probe(lab.client(1), pod.ip(family), PORT, timeout=0.3)
        assert result.outcome is Outcome.TIMEOUT, result
    finally:
        lab.run(pod, [tool, "-w", "-D", *rule])
    assert probe(lab.client(1), pod.ip(family), PORT).answered


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_reject_on_the_way_is_refused_every_time(lab: Lab, family: int, proto: str) -> None:
    # What kube-proxy does for a Service without endpoints. The ICMP error comes back while
    # connect() still holds the socket, and several come back to one client within a second
    # (which the kernel rate-limits unless the lab turns that off): both must still read
    # as refused, at once.
    node, pod = lab.node(1), lab.pod("pod-1b")
    tool = "iptables" if family == 4 else "ip6tables"
    rule = ["FORWARD", "-p", proto, "--dport", "9300", "-j", "REJECT"]
    lab.run(node, [tool, "-w", "-I", *rule])
    try:
        results = probe_many(lab.client(1), pod.ip(family), 9300, proto=proto, count=10)
    finally:
        lab.run(node, [tool, "-w", "-D", *rule])
    assert results.outcomes() == {Outcome.REFUSED: 10}
    assert max(r.elapsed for r in results) < 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_no_route_is_unreachable(lab: Lab, family: int) -> None:
    # node-1 is the client's gateway and has no route to 10.0.99.0/24: it answers with an
    # ICMP network unreachable.
    destination = "10.0.99.1" if family == 4 else "fd00:10:99::1"
    result = probe(lab.client(1), destination, PORT)
    assert result.outcome is Outcome.UNREACHABLE, result


# ----- many flows, one flow


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_probe_many_opens_a_new_flow_each_time(lab: Lab, servers: dict[str, EchoServer], proto: str) -> None:
    results = probe_many(lab.client(1), lab.pod("pod-1b").ipv4, PORT, proto=proto, count=20)
    assert results.counts() == {"pod-1b": 20}
    assert len({r.peer_port for r in results}) == 20


def test_sender_keeps_its_source_port(lab: Lab, servers: dict[str, EchoServer]) -> None:
    with Sender(lab.client(1), lab.pod("pod-2b").ipv6, PORT, src_port=40404) as sender:
        replies = [sender.send() for _ in range(3)]
        assert {(r.name, r.peer_port) for r in replies} == {("pod-2b", 40404)}
    with Sender(lab.client(1), lab.pod("pod-2b").ipv4, 9999) as sender:
        assert sender.send().outcome is Outcome.REFUSED
        assert sender.send().outcome is Outcome.REFUSED  # an earlier error does not leak into the next


def test_socket_in_creates_the_socket_inside_the_namespace(lab: Lab) -> None:
    with socket_in(lab.pod("pod-1a"), socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((lab.pod("pod-1a").ipv4, 0))  # an address only that namespace has


def test_echo_server_answers_a_client_that_speaks_first(lab: Lab, servers: dict[str, EchoServer]) -> None:
    pod = lab.pod("pod-2a")
    with socket_in(lab.client(1), socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        sock.connect((pod.ipv6, PORT))
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n" * 50)
        reply = sock.makefile("rb").readline()
    assert json.loads(reply)["name"] == "pod-2a"


def test_echo_server_stops_with_a_client_still_connected(lab: Lab) -> None:
    pod = lab.pod("pod-1a")
    server = EchoServer(pod, 9200).start()
    with socket_in(lab.client(1), socket.AF_INET, socket.SOCK_STREAM) as idle:
        idle.connect((pod.ipv4, 9200))
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.0
    assert probe(lab.client(1), pod.ipv4, 9200).outcome is Outcome.REFUSED


# ----- lifecycle


def _namespaces_starting_with(prefix: str) -> list[str]:
    return [n for n in os.listdir(NETNS_DIR) if n.startswith(f"{prefix}-")]


def test_up_replaces_leftovers_and_down_removes_everything(make_lab: Callable[..., Lab]) -> None:
    crashed = make_lab("x", nodes=3, pods_per_node=1).up()  # never taken down, as after a crash
    assert len(lab_namespaces(crashed.prefix)) == 1 + 3 + 3 + 1
    lab = make_lab("x", nodes=2, pods_per_node=1).up()
    assert sorted(_namespaces_starting_with(lab.prefix)) == sorted(lab.namespaces)  # node3 gone too
    with EchoServer(lab.pod("pod-2a"), PORT):
        assert probe(lab.client(1), lab.pod("pod-2a").ipv6, PORT).name == "pod-2a"
    lab.down()
    assert _namespaces_starting_with(lab.prefix) == []
