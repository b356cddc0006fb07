"""The iptables mode with real packets: `kproxy sync` programs node-1 of a namespace lab.

Echo servers on every pod report which pod answered and the source they saw, so each flow
checks the set of endpoints reached over many new connections, whether the source was
masqueraded, and REJECT (refused at once) versus DROP (a timeout). Node-1 is 192.168.0.2 with
pods pod-1a and pod-1b (10.0.1.0/24); node-2's pods are pod-2a and pod-2b (10.0.2.0/24); the
outside client is 203.0.113.10 (also .11 and .201). Addresses are taken from the lab.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy.lab.namespaces import Lab
from kproxy.testing.builders import endpoint, endpoint_slice, hinted, node, service
from kproxy.testing.netns import EchoServer, Outcome, ProbeResults, Sender, probe, probe_many

KPROXY = str(Path(sys.executable).with_name("kproxy"))
PORT = 8080
N = 16  # new connections per flow: a 50/50 split misses an endpoint with probability 2^-15
V4_NODE_CFG = ["--cluster-cidr", "10.0.0.0/8,fd00:10::/32"]


@pytest.fixture(scope="module")
def world(lab: Lab) -> Iterator[Lab]:
    servers = [EchoServer(pod, PORT, proto="both").start() for pod in lab.all_pods]
    # Node-originated traffic to a VIP needs a route before nat OUTPUT rewrites it, as on any
    # real node (which has a default route).
    n1 = lab.node(1).ns
    lab.run(n1, ["ip", "route", "replace", "default", "via", lab.client(1).ipv4])
    lab.run(n1, ["ip", "-6", "route", "replace", "default", "via", lab.client(1).ipv6])
    try:
        yield lab
    finally:
        for s in servers:
            s.stop()
        lab.run(n1, [KPROXY, "cleanup"], check=False)


def sync(
    lab: Lab, tmp_path: Path, objects: list[dict[str, Any]], *flags: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    state = tmp_path / "state.yaml"
    state.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [node(addresses=["192.168.0.2", "fd00:192:168::2"]), *objects],
            }
        )
    )
    args = [KPROXY, "sync", "--mode", "iptables", "--node", "node-1", "--state", str(state), *flags]
    return lab.run(lab.node(1).ns, args, check=check)


LAB = Lab(prefix="unused")  # only for the address plan, which every lab shares


def eps(*pods: str, family: int = 4) -> list[dict[str, Any]]:
    return [endpoint(LAB.pod(p).ip(family), LAB.pod(p).node) for p in pods]


def ip(pod: str, family: int = 4) -> str:
    return LAB.pod(pod).ip(family)


def svc(*pods: str, name: str = "svc1", protocol: str = "TCP", **kw: Any) -> list[dict[str, Any]]:
    return [
        service(name=name, port=80, protocol=protocol, **kw),
        endpoint_slice(name, endpoints=eps(*pods), port=PORT, protocol=protocol),
    ]


def same_node_svc(*pods: str, unhinted: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """A PreferSameNode Service whose endpoints carry the hints the EndpointSlice controller
    writes for it (a node and a zone hint each), except the pods in `unhinted`."""
    hinted_eps = [
        e if p in unhinted else hinted(e, "PreferSameNode", "zone-a") for p, e in zip(pods, eps(*pods), strict=True)
    ]
    return [
        service(port=80, trafficDistribution="PreferSameNode"),
        endpoint_slice(endpoints=hinted_eps, port=PORT),
    ]


def answered_by(results: ProbeResults) -> set[str]:
    assert all(r.answered for r in results), [str(r) for r in results if not r.answered]
    return results.names()


def sources(results: ProbeResults) -> set[str]:
    return {r.peer_ip or "" for r in results}


CIP = "172.30.0.41"
LB = "198.51.100.10"


def test_cluster_ip_from_pod_node_and_outside(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a", "pod-2a"), *V4_NODE_CFG)
    from_pod = probe_many(world.pod("pod-1b"), CIP, 80, count=N)
    assert answered_by(from_pod) == {"pod-1a", "pod-2a"}
    assert sources(from_pod) == {ip("pod-1b")}, "pod traffic to a ClusterIP keeps its source"
    from_outside = probe_many(world.client(1), CIP, 80, count=N, src_ip="203.0.113.10")
    assert answered_by(from_outside) == {"pod-1a", "pod-2a"}
    assert sources(from_outside) <= {"10.0.1.1", "192.168.0.2"}, "off-cluster sources are masqueraded"
    from_node = probe_many(world.node(1), CIP, 80, count=N)
    assert answered_by(from_node) == {"pod-1a", "pod-2a"}
    assert probe(world.pod("pod-1b"), CIP, 81, timeout=0.5).outcome is not Outcome.ANSWERED


def test_no_endpoints_is_rejected_at_once(world: Lab, tmp_path: Path) -> None:
    objs = [
        service(type="LoadBalancer", port=80, node_port=30080, lb_ips=[LB]),
        endpoint_slice(endpoints=[], port=PORT),
        service(name="dns", protocol="UDP", port=53, cluster_ip="172.30.0.53"),
    ]
    sync(world, tmp_path, objs, *V4_NODE_CFG)
    for ns, dst, port in [
        (world.pod("pod-1b"), CIP, 80),
        (world.client(1), "192.168.0.2", 30080),
        (world.client(1), LB, 80),
    ]:
        r = probe(ns, dst, port, timeout=2.0)
        assert r.outcome is Outcome.REFUSED, r
        assert r.elapsed < 1.0
    assert probe(world.pod("pod-1b"), "172.30.0.53", 53, proto="udp").outcome is Outcome.REFUSED


def test_node_port_on_node_ip_and_localhost(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a", "pod-2a", type="NodePort", node_port=30080), *V4_NODE_CFG)
    outside = probe_many(world.client(1), "192.168.0.2", 30080, count=N, src_ip="203.0.113.10")
    assert answered_by(outside) == {"pod-1a", "pod-2a"}
    assert "203.0.113.10" not in sources(outside), "eTP Cluster node ports are masqueraded"
    local = probe_many(world.node(1), "127.0.0.1", 30080, count=N)
    assert answered_by(local) == {"pod-1a", "pod-2a"}
    assert world.run(world.node(1).ns, ["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip() == "1"


def test_localhost_node_ports_can_be_turned_off(world: Lab, tmp_path: Path) -> None:
    objs = svc("pod-1a", type="NodePort", node_port=30080)
    sync(world, tmp_path, objs, *V4_NODE_CFG)
    assert answered_by(probe_many(world.node(1), "127.0.0.1", 30080, count=4)) == {"pod-1a"}
    # kube-proxy's flag syntax, as `kproxy run` takes it.
    sync(world, tmp_path, objs, *V4_NODE_CFG, "--iptables-localhost-nodeports=false")
    assert probe(world.node(1), "127.0.0.1", 30080, timeout=0.5).outcome is Outcome.REFUSED  # nobody listens there
    assert answered_by(probe_many(world.node(1), "192.168.0.2", 30080, count=4)) == {"pod-1a"}


def test_node_port_addresses_restrict_where_node_ports_answer(world: Lab, tmp_path: Path) -> None:
    sync(
        world,
        tmp_path,
        svc("pod-1a", type="NodePort", node_port=30080),
        *V4_NODE_CFG,
        "--nodeport-addresses",
        "192.168.0.0/24",
    )
    assert answered_by(probe_many(world.client(1), "192.168.0.2", 30080, count=4)) == {"pod-1a"}
    assert probe(world.node(1), "127.0.0.1", 30080, timeout=0.5).outcome is Outcome.REFUSED  # nobody listens there


def test_external_ip(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a", "pod-2a", external_ips=["198.51.100.20"]), *V4_NODE_CFG)
    res = probe_many(world.client(1), "198.51.100.20", 80, count=N, src_ip="203.0.113.10")
    assert answered_by(res) == {"pod-1a", "pod-2a"}
    assert "203.0.113.10" not in sources(res)


def test_etp_local_keeps_client_ip_and_drops_without_local_endpoints(world: Lab, tmp_path: Path) -> None:
    lb = dict(type="LoadBalancer", node_port=30090, lb_ips=[LB], etp="Local", hc_node_port=32000)
    sync(world, tmp_path, svc("pod-1a", "pod-2a", **lb), *V4_NODE_CFG)
    res = probe_many(world.client(1), LB, 80, count=N, src_ip="203.0.113.10")
    assert answered_by(res) == {"pod-1a"}
    assert sources(res) == {"203.0.113.10"}, "eTP Local preserves the client IP"
    res = probe_many(world.client(1), "192.168.0.2", 30090, count=N, src_ip="203.0.113.10")
    assert answered_by(res) == {"pod-1a"} and sources(res) == {"203.0.113.10"}
    from_pod = probe_many(world.pod("pod-1b"), LB, 80, count=N)
    assert answered_by(from_pod) == {"pod-1a", "pod-2a"}, "pods are short-circuited to every endpoint"

    sync(world, tmp_path, svc("pod-2a", **lb), *V4_NODE_CFG)
    r = probe(world.client(1), LB, 80, src_ip="203.0.113.10", timeout=0.5)
    assert r.outcome is Outcome.TIMEOUT, f"no local endpoint: DROP, not REJECT ({r})"
    assert answered_by(probe_many(world.pod("pod-1b"), LB, 80, count=4)) == {"pod-2a"}


def test_itp_local(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a", "pod-2a", itp="Local"), *V4_NODE_CFG)
    assert answered_by(probe_many(world.pod("pod-1b"), CIP, 80, count=N)) == {"pod-1a"}
    sync(world, tmp_path, svc("pod-2a", itp="Local"), *V4_NODE_CFG)
    assert probe(world.pod("pod-1b"), CIP, 80, timeout=0.5).outcome is Outcome.TIMEOUT


def test_source_ranges(world: Lab, tmp_path: Path) -> None:
    objs = svc("pod-1a", "pod-2a", type="LoadBalancer", node_port=30091, lb_ips=[LB], source_ranges=["203.0.113.0/25"])
    sync(world, tmp_path, objs, *V4_NODE_CFG)
    assert answered_by(probe_many(world.client(1), LB, 80, count=N, src_ip="203.0.113.10")) == {"pod-1a", "pod-2a"}
    assert probe(world.client(1), LB, 80, src_ip="203.0.113.201", timeout=0.5).outcome is Outcome.TIMEOUT
    # NodePorts ignore source ranges, as upstream.
    assert answered_by(probe_many(world.client(1), "192.168.0.2", 30091, count=4, src_ip="203.0.113.201"))


def test_hairpin_is_masqueraded(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a"), *V4_NODE_CFG)
    res = probe_many(world.pod("pod-1a"), CIP, 80, count=4)
    assert answered_by(res) == {"pod-1a"}
    assert sources(res) == {"10.0.1.1"}, "a pod reaching itself sees the node, or the reply would skip the DNAT"


def test_session_affinity(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a", "pod-2a", affinity=600), *V4_NODE_CFG)
    assert len(answered_by(probe_many(world.pod("pod-1b"), CIP, 80, count=N))) == 1
    assert len(answered_by(probe_many(world.client(1), CIP, 80, count=N, src_ip="203.0.113.11"))) == 1


def test_udp_and_masquerade_all(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a", "pod-2a", protocol="UDP"), *V4_NODE_CFG, "--masquerade-all")
    res = probe_many(world.pod("pod-1b"), CIP, 80, proto="udp", count=N)
    assert answered_by(res) == {"pod-1a", "pod-2a"}
    assert sources(res) <= {"10.0.1.1", "192.168.0.2"}, "--masquerade-all masquerades pods too"


def test_detect_local_by_bridge(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a"), "--detect-local-mode", "BridgeInterface", "--pod-bridge-interface", "cbr0")
    assert sources(probe_many(world.pod("pod-1b"), CIP, 80, count=4)) == {ip("pod-1b")}
    assert sources(probe_many(world.client(1), CIP, 80, count=4, src_ip="203.0.113.10")) == {"10.0.1.1"}


def test_ipv6_side_by_side(world: Lab, tmp_path: Path) -> None:
    objs = [
        service(type="NodePort", port=80, node_port=30086, cluster_ip=["172.30.0.41", "fd00:172:30::41"]),
        endpoint_slice(endpoints=eps("pod-1a", "pod-2a"), port=PORT),
        endpoint_slice(name="svc1-v6", address_type="IPv6", port=PORT, endpoints=eps("pod-1a", "pod-2a", family=6)),
    ]
    sync(world, tmp_path, objs, *V4_NODE_CFG)
    res6 = probe_many(world.pod("pod-1b"), "fd00:172:30::41", 80, count=N)
    assert answered_by(res6) == {"pod-1a", "pod-2a"} and sources(res6) == {ip("pod-1b", 6)}
    res6 = probe_many(world.client(1), "fd00:192:168::2", 30086, count=N)
    assert answered_by(res6) == {"pod-1a", "pod-2a"}
    assert answered_by(probe_many(world.pod("pod-1b"), CIP, 80, count=4))


def test_health_check_node_port_is_accepted_under_a_drop_policy(world: Lab, tmp_path: Path) -> None:
    n1 = world.node(1).ns
    lb = svc("pod-2a", type="LoadBalancer", node_port=30092, lb_ips=[LB], etp="Local", hc_node_port=32000)
    sync(world, tmp_path, lb, *V4_NODE_CFG)
    with EchoServer(world.node(1), 32000, proto="tcp"), EchoServer(world.node(1), 32001, proto="tcp"):
        world.run(n1, ["iptables", "-P", "INPUT", "DROP"])
        try:
            assert probe(world.client(1), "192.168.0.2", 32000).answered
            assert probe(world.client(1), "192.168.0.2", 32001, timeout=0.5).outcome is Outcome.TIMEOUT
        finally:
            world.run(n1, ["iptables", "-P", "INPUT", "ACCEPT"])


def test_udp_client_moves_off_a_removed_endpoint(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-2a", protocol="UDP"), *V4_NODE_CFG)
    with Sender(world.pod("pod-1b"), CIP, 80) as sender:
        assert sender.send().name == "pod-2a"
        assert sender.send().name == "pod-2a"
        # pod-2a still runs: only the conntrack cleanup can move this flow.
        sync(world, tmp_path, svc("pod-1a", protocol="UDP"), *V4_NODE_CFG)
        assert sender.send().name == "pod-1a"


def test_prefer_same_node_hints_then_one_endpoint_without_a_hint(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, same_node_svc("pod-1a", "pod-2a", "pod-2b"), *V4_NODE_CFG)
    for who in (world.pod("pod-1b"), world.node(1)):
        assert answered_by(probe_many(who, CIP, 80, count=N)) == {"pod-1a"}, "only this node's endpoint"
    # The EndpointSlice controller has not hinted pod-2b yet: node (and zone) hints are
    # incomplete, so upstream ignores them and every ready endpoint serves again.
    sync(world, tmp_path, same_node_svc("pod-1a", "pod-2a", "pod-2b", unhinted=("pod-2b",)), *V4_NODE_CFG)
    assert answered_by(probe_many(world.pod("pod-1b"), CIP, 80, count=3 * N)) == {"pod-1a", "pod-2a", "pod-2b"}


def test_a_refused_transaction_keeps_the_working_rules(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a"), *V4_NODE_CFG)
    code = (
        "from kproxy.backends.iptables import Iptables, detect_variant\n"
        "from kproxy.model import IPFamily\n"
        "ipt = Iptables(IPFamily.V4, detect_variant())\n"
        "ipt.restore('*nat\\n:KPROXY-SERVICES - [0:0]\\n-A KPROXY-SERVICES -j NO-SUCH-CHAIN\\nCOMMIT\\n')\n"
    )
    res = world.run(world.node(1).ns, [sys.executable, "-c", code], check=False)
    assert res.returncode != 0 and "NO-SUCH-CHAIN" in res.stderr and "previous rules stay" in res.stderr
    assert answered_by(probe_many(world.pod("pod-1b"), CIP, 80, count=4)) == {"pod-1a"}


def test_malformed_object_is_skipped_and_the_rest_programmed(world: Lab, tmp_path: Path) -> None:
    bad = service(name="bad", port=70000, cluster_ip="172.30.0.99")
    res = sync(world, tmp_path, [bad, *svc("pod-1a")], *V4_NODE_CFG)
    assert res.returncode == 0 and "Service ns1/bad: spec.ports[0].port" in res.stderr
    assert answered_by(probe_many(world.pod("pod-1b"), CIP, 80, count=4)) == {"pod-1a"}
    strict = sync(world, tmp_path, [bad, *svc("pod-1a")], *V4_NODE_CFG, "--strict", check=False)
    assert strict.returncode == 2


def test_cleanup_removes_everything_it_created_and_nothing_else(world: Lab, tmp_path: Path) -> None:
    n1 = world.node(1).ns
    world.run(n1, ["iptables", "-t", "nat", "-N", "SOMEONE-ELSE"])
    world.run(n1, ["iptables", "-t", "nat", "-A", "PREROUTING", "-j", "SOMEONE-ELSE"])
    try:
        sync(world, tmp_path, svc("pod-1a"), *V4_NODE_CFG)
        world.run(n1, [KPROXY, "cleanup"])
        saved = world.run(n1, ["iptables-save"]).stdout + world.run(n1, ["ip6tables-save"]).stdout
        assert "KPROXY" not in saved
        assert "-A PREROUTING -j SOMEONE-ELSE" in saved
        assert probe(world.pod("pod-1b"), CIP, 80, timeout=0.5).outcome is not Outcome.ANSWERED
    finally:
        world.run(n1, ["iptables", "-t", "nat", "-D", "PREROUTING", "-j", "SOMEONE-ELSE"], check=False)
        world.run(n1, ["iptables", "-t", "nat", "-X", "SOMEONE-ELSE"], check=False)
