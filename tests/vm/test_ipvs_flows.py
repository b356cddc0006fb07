"""The IPVS mode with real packets, inside the VM (IPVS kernel): the iptables mode's packet-flow
scenarios (tests/kernel/test_iptables_kernel.py), graceful termination with a live connection,
and a sync that changes one endpoint writing one real server.

Node-1 of a namespace lab (kproxy.lab.namespaces: 2 nodes x 2 pods, 1 client) runs the IPVS proxier
in-process, on one worker thread that lives in node-1's namespace (pyroute2 sockets belong to
the thread and namespace that open them; ipset/iptables/conntrack children inherit both). A
Python process costs about a minute to start in this VM, so no test runs `kproxy` as a command:
`test_cli_*` drive the click command in-process in that thread instead.

Pods pod-1a and pod-1b (10.0.1.11/.12) sit on node-1 (192.168.0.2), pod-2a and pod-2b
(10.0.2.11/.12) on node-2; the outside client is 203.0.113.10 (also .11 and .201). To keep the
run short, most scenarios live in one cluster state (`BIG`, one Service each) programmed once;
rr scheduling alternates real servers, so a few connections show every endpoint.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from kproxy.config import IpvsConfig, ProxyConfig, validate
from kproxy.lab.namespaces import NETNS_DIR, Lab
from kproxy.model import IPFamily, Protocol
from kproxy.proxier.ipvs import render as pv
from kproxy.testing.builders import endpoint, endpoint_slice, hinted, node, service
from kproxy.testing.linesrv import LineServer, line_client, read_line
from kproxy.testing.netns import (
    EchoServer,
    Outcome,
    ProbeResults,
    Sender,
    probe,
    probe_many,
    wait_for,
)

pytestmark = pytest.mark.vm
T = TypeVar("T")

PORT = 8080  # EchoServer on every pod (TCP and UDP, one JSON line per connection or datagram)
HOLD = 9090  # LineServer on every pod: a greeting, then one line per line, until closed
SCTP = 9000  # LineServer over SCTP
N = 6  # rr alternates real servers: 6 new connections reach each of 2 endpoints 3 times
BASE = validate(ProxyConfig(node_name="node-1", cluster_cidrs=("10.0.0.0/8", "fd00:10::/32")))
# Short FIN_WAIT so that a connection the server closed stops counting quickly (graceful test).
IPVS_CFG = IpvsConfig(tcp_fin_timeout=2)
NODE_IP, CLIENT = "192.168.0.2", "203.0.113.10"
LAB = Lab(prefix="unused")  # the shared address plan


def ip(pod: str, family: int = 4) -> str:
    return LAB.pod(pod).ip(family)


def eps(*pods: str, family: int = 4) -> list[dict[str, Any]]:
    return [endpoint(LAB.pod(p).ip(family), LAB.pod(p).node) for p in pods]


def svc(name: str, cip: str, *pods: str, port: int = PORT, protocol: str = "TCP", **kw: Any) -> list[dict[str, Any]]:
    return [
        service(name=name, cluster_ip=cip, port=80, protocol=protocol, **kw),
        endpoint_slice(name, endpoints=eps(*pods), port=port, protocol=protocol),
    ]


# One Service per scenario, each on its own ClusterIP (and node port, LB IP).
BIG: list[dict[str, Any]] = [
    node(addresses=[NODE_IP, "fd00:192:168::2"]),
    *svc("clusterip", "172.30.0.41", "pod-1a", "pod-2a"),
    *svc("hairpin", "172.30.0.42", "pod-1a"),
    *svc("empty", "172.30.0.43", type="LoadBalancer", node_port=30080, lb_ips=["198.51.100.10"]),
    *svc("emptyudp", "172.30.0.53", protocol="UDP"),
    *svc("nodeport", "172.30.0.44", "pod-1a", "pod-2a", type="NodePort", node_port=30081),
    *svc("external", "172.30.0.45", "pod-1a", "pod-2a", external_ips=["198.51.100.21"]),
    *svc(
        "etplocal", "172.30.0.46", "pod-1a", "pod-2a", type="LoadBalancer", node_port=30082,
        lb_ips=["198.51.100.11"], etp="Local", hc_node_port=32000,
    ),
    *svc(
        "etpnone", "172.30.0.47", "pod-2a", type="LoadBalancer", node_port=30083, lb_ips=["198.51.100.12"],
        etp="Local", hc_node_port=32001,
    ),
    *svc("itplocal", "172.30.0.48", "pod-1a", "pod-2a", itp="Local"),
    *svc("itpnone", "172.30.0.49", "pod-2a", itp="Local"),
    *svc(
        "ranges", "172.30.0.50", "pod-1a", "pod-2a", type="LoadBalancer", node_port=30084,
        lb_ips=["198.51.100.13"], source_ranges=["203.0.113.0/25"],
    ),
    *svc("affinity", "172.30.0.51", "pod-1a", "pod-2a", affinity=600),
    *svc("udp", "172.30.0.52", "pod-1a", "pod-2a", protocol="UDP"),
    *svc("sctp", "172.30.0.54", "pod-1a", "pod-2a", port=SCTP, protocol="SCTP"),
]  # fmt: skip


# ----- the node: a worker thread in node-1's namespace running the proxiers

_libc = ctypes.CDLL(None, use_errno=True)


def _enter(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


class Node:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.ns = lab.node(1).ns
        self._pool = ThreadPoolExecutor(1, initializer=_enter, initargs=(os.path.join(NETNS_DIR, self.ns),))
        self.proxiers: dict[IPFamily, Any] = {}
        self.line_servers: list[LineServer] = []
        self._last: tuple[str, ...] | None = None

    def run(self, fn: Callable[[], T]) -> T:
        return self._pool.submit(fn).result()

    def proxier(self, family: IPFamily) -> Any:
        from kproxy.proxier.ipvs.mode import make_proxier

        if family not in self.proxiers:
            self.proxiers[family] = self.run(lambda: make_proxier(family, IPVS_CFG, "nft"))
        return self.proxiers[family]

    def sync(
        self, objects: list[dict[str, Any]], cfg: ProxyConfig = BASE, families: tuple[IPFamily, ...] = (IPFamily.V4,)
    ) -> list[Any]:
        from kproxy.backends.conntrack import Conntrack
        from kproxy.backends.host import local_addresses
        from kproxy.conntrack import clean_stale_udp
        from kproxy.state import build_state
        from kproxy.view import family_view, node_context

        state, rejected = build_state(objects)
        assert not rejected, rejected
        proxiers = [self.proxier(f) for f in families]

        def work() -> list[Any]:
            out = []
            for fam, p in zip(families, proxiers, strict=True):
                bound = p.device.addresses(fam)
                host = tuple(a for a in local_addresses(fam) if a not in bound)
                ctx = node_context(cfg, fam, state.nodes.get(cfg.node_name), host)
                view = family_view(state, fam)
                result = p.sync(view, ctx)
                # As `kproxy sync` does after its sync: stale UDP flows are the caller's to delete.
                result.conntrack_deleted = clean_stale_udp(Conntrack(fam), view, ctx)
                out.append(result)
            return out

        self._last = None
        return self.run(work)

    def ensure(self, objects: list[dict[str, Any]]) -> None:
        """Sync `objects` unless they are what the last `ensure` programmed."""
        key = tuple(json.dumps(o, sort_keys=True) for o in objects)
        if self._last != key:
            self.sync(objects)
            self._last = key

    def sh(self, *argv: str, check: bool = True) -> str:
        return self.lab.run(self.ns, list(argv), check=check).stdout

    def close(self) -> None:
        def shut() -> None:
            for p in self.proxiers.values():
                p.ipvs.close()

        self.run(shut)
        self._pool.shutdown()


@pytest.fixture(scope="module")
def world() -> Iterator[Node]:
    subprocess.run(["modprobe", "-a", "br_netfilter", "ip_vs", "ip_vs_rr", "sctp"], check=True)
    lab = Lab(prefix=f"kv{os.getpid() % 100000}", nodes=2, pods_per_node=2, clients=1).up()
    servers: list[Any] = []
    n: Node | None = None
    try:
        servers += [EchoServer(pod, PORT, proto="both").start() for pod in lab.all_pods]
        lines = [LineServer(pod.ns, pod.name, HOLD) for pod in lab.all_pods]
        lines += [LineServer(pod.ns, pod.name, SCTP, socket.IPPROTO_SCTP) for pod in lab.all_pods]
        servers += lines
        # The node's own connections to a VIP need a route before the VIP is local, as on any
        # real node (which has a default route).
        lab.run(lab.node(1).ns, ["ip", "route", "replace", "default", "via", lab.client(1).ipv4])
        lab.run(lab.node(1).ns, ["ip", "-6", "route", "replace", "default", "via", lab.client(1).ipv6])
        n = Node(lab)
        n.line_servers = lines
        yield n
    finally:
        if n is not None:
            n.close()
        for s in servers:
            s.stop()
        lab.down()


def names_of(results: ProbeResults) -> set[str]:
    assert all(r.answered for r in results), [str(r) for r in results if not r.answered]
    return results.names()


def sources(results: ProbeResults) -> set[str]:
    return {r.peer_ip or "" for r in results}


POD_GW = {"10.0.1.1", NODE_IP}  # what a masqueraded source looks like from node-1's pods / node-2's


# ----- the table is what the dry run says


def test_kernel_table_is_the_dry_run_table(world: Node) -> None:
    world.ensure(BIG)
    desired = world.proxier(IPFamily.V4).state
    shown = world.sh("ipvsadm", "-Ln", "--sort").splitlines()[1:]  # without the version line
    want = pv.ipvsadm_text(desired.virtual_servers.values()).splitlines()

    def blocks(lines: list[str]) -> dict[str, list[str]]:
        # Service line -> its real servers, connection counters aside. Compared as a mapping:
        # `ipvsadm --sort` compares addresses by a wrapping int subtraction, an order no sane
        # key reproduces (kproxy prints numeric order).
        out: dict[str, list[str]] = {}
        head = ""
        for line in lines[2:]:
            if line.startswith("  ->"):
                out[head].append(" ".join(line.split()[:4]))
            else:
                head = line.rstrip()
                out[head] = []
        return out

    assert shown[:2] == want[:2]
    assert blocks(shown) == blocks(want)
    sets = world.sh("ipset", "list", "-n").split()
    assert sorted(s for s in sets if s.startswith("KPROXY-")) == sorted(desired.ipsets)
    assert "Masq" in "\n".join(shown) and "Route" not in "\n".join(shown)
    assert world.run(lambda: world.proxier(IPFamily.V4).ipvs.timeouts())[1] == 2


# ----- the iptables mode's scenarios


def test_cluster_ip_from_pod_node_and_outside(world: Node) -> None:
    world.ensure(BIG)
    cip = "172.30.0.41"
    from_pod = probe_many(world.lab.pod("pod-1b"), cip, 80, count=N)
    assert names_of(from_pod) == {"pod-1a", "pod-2a"}
    assert sources(from_pod) == {ip("pod-1b")}, "pod traffic to a ClusterIP keeps its source"
    from_outside = probe_many(world.lab.client(1), cip, 80, count=N, src_ip=CLIENT)
    assert names_of(from_outside) == {"pod-1a", "pod-2a"}
    assert sources(from_outside) <= POD_GW, "off-cluster sources are masqueraded"
    assert names_of(probe_many(world.lab.node(1), cip, 80, count=N)) == {"pod-1a", "pod-2a"}
    # The VIP is local: other ports are refused by the VIP filter (the iptables mode routes
    # them on, unanswered), never reach the node's own listeners.
    with EchoServer(world.lab.node(1), 81, proto="tcp"):
        assert probe(world.lab.pod("pod-1b"), cip, 81, timeout=1.0).outcome is Outcome.REFUSED
        assert probe(world.lab.pod("pod-1b"), NODE_IP, 81).answered, "the node's own address still serves it"


def test_no_endpoints_is_refused_at_once(world: Node) -> None:
    world.ensure(BIG)
    for ns, dst, port in [
        (world.lab.pod("pod-1b"), "172.30.0.43", 80),
        (world.lab.node(1), "172.30.0.43", 80),
        (world.lab.client(1), NODE_IP, 30080),
        (world.lab.client(1), "198.51.100.10", 80),
    ]:
        r = probe(ns, dst, port, timeout=2.0)
        assert r.outcome is Outcome.REFUSED, (dst, port, r)
        assert r.elapsed < 1.0
    assert probe(world.lab.pod("pod-1b"), "172.30.0.53", 80, proto="udp").outcome is Outcome.REFUSED


def test_hairpin_is_masqueraded(world: Node) -> None:
    world.ensure(BIG)
    res = probe_many(world.lab.pod("pod-1a"), "172.30.0.42", 80, count=4)
    assert names_of(res) == {"pod-1a"}
    assert sources(res) == {"10.0.1.1"}, "a pod reaching itself sees the node, or the reply would skip the un-NAT"


def test_node_port(world: Node) -> None:
    world.ensure(BIG)
    outside = probe_many(world.lab.client(1), NODE_IP, 30081, count=N, src_ip=CLIENT)
    assert names_of(outside) == {"pod-1a", "pod-2a"}
    assert CLIENT not in sources(outside), "eTP Cluster node ports are masqueraded"
    assert names_of(probe_many(world.lab.pod("pod-1b"), NODE_IP, 30081, count=N)) == {"pod-1a", "pod-2a"}
    # No localhost NodePorts in IPVS (the iptables mode has them): nobody listens there.
    assert probe(world.lab.node(1), "127.0.0.1", 30081, timeout=0.5).outcome is Outcome.REFUSED


def test_external_ip(world: Node) -> None:
    world.ensure(BIG)
    res = probe_many(world.lab.client(1), "198.51.100.21", 80, count=N, src_ip=CLIENT)
    assert names_of(res) == {"pod-1a", "pod-2a"}
    assert CLIENT not in sources(res)


def test_etp_local_keeps_client_ip_and_drops_without_local_endpoints(world: Node) -> None:
    world.ensure(BIG)
    lb, client, pod = "198.51.100.11", world.lab.client(1), world.lab.pod("pod-1b")
    res = probe_many(client, lb, 80, count=N, src_ip=CLIENT)
    assert names_of(res) == {"pod-1a"} and sources(res) == {CLIENT}, "eTP Local preserves the client IP"
    res = probe_many(client, NODE_IP, 30082, count=N, src_ip=CLIENT)
    assert names_of(res) == {"pod-1a"} and sources(res) == {CLIENT}
    from_pod = probe_many(pod, lb, 80, count=N)
    assert names_of(from_pod) == {"pod-1a", "pod-2a"}, "pods are short-circuited to every endpoint"
    assert sources(from_pod) == {ip("pod-1b")}
    from_node = probe_many(world.lab.node(1), lb, 80, count=N)
    assert names_of(from_node) == {"pod-1a", "pod-2a"} and sources(from_node) <= POD_GW

    r = probe(client, "198.51.100.12", 80, src_ip=CLIENT, timeout=0.5)
    assert r.outcome is Outcome.TIMEOUT, f"no local endpoint: DROP, not REJECT ({r})"
    assert probe(client, NODE_IP, 30083, src_ip=CLIENT, timeout=0.5).outcome is Outcome.TIMEOUT
    assert names_of(probe_many(pod, "198.51.100.12", 80, count=4)) == {"pod-2a"}
    assert names_of(probe_many(world.lab.node(1), "198.51.100.12", 80, count=2)) == {"pod-2a"}


def test_itp_local(world: Node) -> None:
    world.ensure(BIG)
    assert names_of(probe_many(world.lab.pod("pod-1b"), "172.30.0.48", 80, count=N)) == {"pod-1a"}
    assert probe(world.lab.pod("pod-1b"), "172.30.0.49", 80, timeout=0.5).outcome is Outcome.TIMEOUT
    assert probe(world.lab.node(1), "172.30.0.49", 80, timeout=0.5).outcome is Outcome.TIMEOUT


def test_source_ranges(world: Node) -> None:
    world.ensure(BIG)
    client = world.lab.client(1)
    assert names_of(probe_many(client, "198.51.100.13", 80, count=N, src_ip=CLIENT)) == {"pod-1a", "pod-2a"}
    assert probe(client, "198.51.100.13", 80, src_ip="203.0.113.201", timeout=0.5).outcome is Outcome.TIMEOUT
    assert probe(world.lab.node(1), "198.51.100.13", 80, timeout=0.5).outcome is Outcome.TIMEOUT
    # NodePorts ignore source ranges, as upstream.
    assert names_of(probe_many(client, NODE_IP, 30084, count=2, src_ip="203.0.113.201"))


def test_session_affinity(world: Node) -> None:
    world.ensure(BIG)
    assert len(names_of(probe_many(world.lab.pod("pod-1b"), "172.30.0.51", 80, count=8))) == 1
    assert len(names_of(probe_many(world.lab.client(1), "172.30.0.51", 80, count=8, src_ip="203.0.113.11"))) == 1


def test_udp(world: Node) -> None:
    world.ensure(BIG)
    res = probe_many(world.lab.pod("pod-1b"), "172.30.0.52", 80, proto="udp", count=N)
    assert names_of(res) == {"pod-1a", "pod-2a"} and sources(res) == {ip("pod-1b")}


def test_sctp(world: Node) -> None:
    world.ensure(BIG)
    seen = set()
    for _ in range(4):
        sock, hello = line_client(world.lab.pod("pod-1b").ns, "172.30.0.54", 80, socket.IPPROTO_SCTP)
        sock.close()
        seen.add(hello["name"])
        assert hello["peer"] == ip("pod-1b")
    assert seen == {"pod-1a", "pod-2a"}


def test_health_check_node_port_is_accepted_under_a_drop_policy(world: Node) -> None:
    world.ensure(BIG)
    with EchoServer(world.lab.node(1), 32000, proto="tcp"), EchoServer(world.lab.node(1), 32009, proto="tcp"):
        world.sh("iptables", "-P", "INPUT", "DROP")
        try:
            assert probe(world.lab.client(1), NODE_IP, 32000).answered
            assert probe(world.lab.client(1), NODE_IP, 32009, timeout=0.5).outcome is Outcome.TIMEOUT
        finally:
            world.sh("iptables", "-P", "INPUT", "ACCEPT")


def test_masquerade_all_and_local_detection_modes(world: Node) -> None:
    objs = [
        node(addresses=[NODE_IP]),
        *svc("clusterip", "172.30.0.41", "pod-1a", "pod-2a"),
        *svc("local", "172.30.0.55", "pod-1a"),
    ]
    world.sync(objs, validate(ProxyConfig(node_name="node-1", cluster_cidrs=("10.0.0.0/8",), masquerade_all=True)))
    assert sources(probe_many(world.lab.pod("pod-1b"), "172.30.0.41", 80, count=4)) <= POD_GW
    bridge = ProxyConfig(node_name="node-1", detect_local_mode="BridgeInterface", bridge_interface="cbr0")
    world.sync(objs, validate(bridge))
    assert sources(probe_many(world.lab.pod("pod-1b"), "172.30.0.41", 80, count=4)) == {ip("pod-1b")}
    assert sources(probe_many(world.lab.client(1), "172.30.0.41", 80, count=4, src_ip=CLIENT)) <= POD_GW
    world.sync(objs, validate(ProxyConfig(node_name="node-1")))  # no detector at all
    # Not masqueraded: only an endpoint whose reply comes back through node-1 can answer.
    assert sources(probe_many(world.lab.client(1), "172.30.0.55", 80, count=4, src_ip=CLIENT)) == {CLIENT}
    assert names_of(probe_many(world.lab.node(1), "172.30.0.41", 80, count=4)) == {"pod-1a", "pod-2a"}


def test_ipv6_side_by_side(world: Node) -> None:
    objs = [
        node(addresses=[NODE_IP, "fd00:192:168::2"]),
        service(type="NodePort", port=80, node_port=30086, cluster_ip=["172.30.0.41", "fd00:172:30::41"]),
        endpoint_slice(endpoints=eps("pod-1a", "pod-2a"), port=PORT),
        endpoint_slice(name="svc1-v6", address_type="IPv6", port=PORT, endpoints=eps("pod-1a", "pod-2a", family=6)),
    ]
    world.sync(objs, families=(IPFamily.V4, IPFamily.V6))
    res6 = probe_many(world.lab.pod("pod-1b"), "fd00:172:30::41", 80, count=N)
    assert names_of(res6) == {"pod-1a", "pod-2a"} and sources(res6) == {ip("pod-1b", 6)}
    assert names_of(probe_many(world.lab.client(1), "fd00:192:168::2", 30086, count=N)) == {"pod-1a", "pod-2a"}
    assert names_of(probe_many(world.lab.pod("pod-1b"), "172.30.0.41", 80, count=2))
    assert "KPROXY-6-CLUSTER-IP" in world.sh("ipset", "list", "-n")
    world.sync([], families=(IPFamily.V6,))  # the v6 proxier removes its part; v4 is untouched
    assert "fd00:172:30::41" not in world.sh("ipvsadm", "-Ln")
    assert names_of(probe_many(world.lab.pod("pod-1b"), "172.30.0.41", 80, count=2))


def test_prefer_same_node_hints_then_zone_hints_then_every_endpoint(world: Node) -> None:
    # As the EndpointSlice controller hints a PreferSameNode Service: a node and a zone hint on
    # each endpoint. Node-1 is in zone-a with pod-2a; pod-2b is in zone-b.
    zones = {"pod-1a": "zone-a", "pod-2a": "zone-a", "pod-2b": "zone-b"}

    def objs(*pods: str, unhinted: str = "") -> list[dict[str, Any]]:
        hinted_eps = [
            e if p == unhinted else hinted(e, "PreferSameNode", zones[p]) for p, e in zip(pods, eps(*pods), strict=True)
        ]
        return [
            node(addresses=[NODE_IP], labels={"topology.kubernetes.io/zone": "zone-a"}),
            service(name="near", cluster_ip="172.30.0.62", port=80, trafficDistribution="PreferSameNode"),
            endpoint_slice("near", endpoints=hinted_eps, port=PORT),
        ]

    cip, pod = "172.30.0.62", world.lab.pod("pod-1b")
    world.sync(objs("pod-1a", "pod-2a", "pod-2b"))
    assert names_of(probe_many(pod, cip, 80, count=N)) == {"pod-1a"}, "node hints: this node's endpoint only"
    assert names_of(probe_many(world.lab.node(1), cip, 80, count=N)) == {"pod-1a"}
    shown = world.sh("ipvsadm", "-Ln", "-t", f"{cip}:80").splitlines()
    assert [line.split()[1] for line in shown if f":{PORT} " in line] == [f"{ip('pod-1a')}:{PORT}"], shown
    world.sync(objs("pod-2a", "pod-2b"))
    assert names_of(probe_many(pod, cip, 80, count=N)) == {"pod-2a"}, "no endpoint here: zone hints"
    world.sync(objs("pod-1a", "pod-2a", "pod-2b", unhinted="pod-2b"))
    assert names_of(probe_many(pod, cip, 80, count=N)) == {"pod-1a", "pod-2a", "pod-2b"}, "a hint missing: all"


# ----- applying only the difference


def test_one_endpoint_change_writes_one_real_server(world: Node) -> None:
    objs = [*BIG, *svc("one", "172.30.0.60", "pod-1a", "pod-2a")]
    world.sync(objs)
    p = world.proxier(IPFamily.V4)
    before = (p.ipvs.writes.copy(), p.device.writes.copy(), p.ipset.restores)
    moved = [*BIG, *svc("one", "172.30.0.60", "pod-1a", "pod-2b")]
    (result,) = world.sync(moved)
    assert p.ipvs.writes - before[0] == {"add_dest": 1, "delete_dest": 1}, result.ipvs_ops
    assert result.ipvs_ops == (
        f"add_dest TCP 172.30.0.60:80 -> {ip('pod-2b')}:{PORT} weight 1",
        f"delete_dest TCP 172.30.0.60:80 -> {ip('pod-2a')}:{PORT} weight 0",
    )
    assert p.device.writes == before[1], "no address bound or unbound"
    # One LOOP-BACK entry added; pod-2a:8080 stays in it through the other Services.
    assert result.chains_written == {} and result.ipset_lines == 1, "no iptables-restore; LOOP-BACK only"
    assert p.ipset.restores == before[2] + 1
    assert names_of(probe_many(world.lab.pod("pod-1b"), "172.30.0.60", 80, count=4)) == {"pod-1a", "pod-2b"}


def test_graceful_termination_with_a_live_connection(world: Node) -> None:
    p = world.proxier(IPFamily.V4)
    key = (Protocol.TCP, "172.30.0.61", 80)
    world.sync([*BIG, *svc("drain", "172.30.0.61", "pod-2a", port=HOLD)])
    conn, hello = line_client(world.lab.pod("pod-1b").ns, "172.30.0.61", 80)
    try:
        assert hello["name"] == "pod-2a"
        (result,) = world.sync([*BIG, *svc("drain", "172.30.0.61", "pod-1a", port=HOLD)])
        assert result.draining == 1

        def dests() -> dict[str, tuple[int, int, int]]:
            got = world.run(lambda: p.ipvs.dests(*key))
            return {f"{d.ip}:{d.port}": (d.weight, d.active, d.inactive) for d in got}

        assert dests()[f"{ip('pod-2a')}:{HOLD}"] == (0, 1, 0), "kept at weight 0 while connected"
        conn.sendall(b"still there?\n")
        assert read_line(conn)["name"] == "pod-2a", "the open connection keeps working"
        assert names_of(probe_many(world.lab.pod("pod-1b"), "172.30.0.61", 80, count=4)) == {"pod-1a"}
        assert world.run(p.drain) == 1, "still connected: not deleted"
        # pod-2a ends the connection (FIN). IPVS counts it until its FIN_WAIT timer (2 s here,
        # --ipvs-tcpfin-timeout) runs out; nothing signals that, so wait for the count.
        for server in world.line_servers:
            if server.name == "pod-2a":
                server.shutdown_all()
        assert conn.recv(1) == b""
        wait_for(lambda: world.run(p.drain) == 0, timeout=30, interval=0.25, message="real server drained")
        assert f"{ip('pod-2a')}:{HOLD}" not in dests()
        assert set(dests()) == {f"{ip('pod-1a')}:{HOLD}"}
    finally:
        conn.close()


def test_udp_client_moves_off_a_removed_endpoint(world: Node) -> None:
    world.sync([*BIG, *svc("mover", "172.30.0.62", "pod-2a", protocol="UDP")])
    with Sender(world.lab.pod("pod-1b"), "172.30.0.62", 80) as sender:
        assert sender.send().name == "pod-2a"
        assert sender.send().name == "pod-2a"
        # pod-2a still runs: only deleting the real server and the flow can move this client.
        (result,) = world.sync([*BIG, *svc("mover", "172.30.0.62", "pod-1a", protocol="UDP")])
        assert result.draining == 0, "UDP real servers go at once"
        assert wait_for(lambda: sender.send(timeout=0.5).name == "pod-1a", timeout=5, message="moved")


# ----- the command line, in-process, and cleanup


def _cli(world: Node, *args: str) -> Any:
    from click.testing import CliRunner

    from kproxy.cli.main import main

    return world.run(lambda: CliRunner().invoke(main, list(args), catch_exceptions=False))


def test_cli_sync_on_a_programmed_kernel_writes_nothing_to_ipvs(world: Node, tmp_path: Path) -> None:
    world.ensure(BIG)
    state = tmp_path / "state.yaml"
    state.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": BIG}))
    common = ["--mode", "ipvs", "--node", "node-1", "--state", str(state), "--cluster-cidr", "10.0.0.0/8,fd00:10::/32"]
    res = _cli(world, "sync", *common, "--iptables-backend", "nft", "--ipvs-tcpfin-timeout", "2s")
    assert res.exit_code == 0, res.output
    v4 = next(line for line in res.output.splitlines() if line.startswith("IPv4:"))
    assert " 0 IPVS writes, 0+/0- addresses, 0 ipset lines" in v4, v4
    dry = _cli(world, "sync", *common, "--dry-run")
    assert dry.exit_code == 0 and "TCP  172.30.0.41:80 rr" in dry.output
    assert "# kproxy-ipvs0 addresses" in dry.output


def test_cleanup_removes_everything_it_created_and_nothing_else(world: Node) -> None:
    world.ensure(BIG)
    # Someone else's chain, virtual server (on no node address) and set; one shell, few execs.
    theirs = (
        "iptables -t nat -N SOMEONE-ELSE && iptables -t nat -A PREROUTING -j SOMEONE-ELSE"
        " && ipvsadm -A -t 10.99.0.1:80 -s rr && ipset create SOMEONE-ELSES hash:ip"
    )
    world.sh("sh", "-c", theirs)
    try:
        res = _cli(world, "cleanup", "--mode", "ipvs")
        assert res.exit_code == 0, res.output
        assert "ipvs: removed" in res.output and "device kproxy-ipvs0" in res.output
        saved, table, sets, links = world.sh(
            "sh",
            "-c",
            "iptables-save; ip6tables-save; echo @@; ipvsadm -Ln; echo @@; ipset list -n; echo @@; ip -o link",
        ).split("@@\n")
        assert "KPROXY" not in saved and "-A PREROUTING -j SOMEONE-ELSE" in saved
        assert table.splitlines()[3:] == ["TCP  10.99.0.1:80 rr"], "a VS on no node address is not ours"
        assert not [s for s in sets.split() if s.startswith("KPROXY-")] and "SOMEONE-ELSES" in sets.split()
        assert "kproxy-ipvs0" not in links
        assert probe(world.lab.pod("pod-1b"), "172.30.0.41", 80, timeout=0.5).outcome is not Outcome.ANSWERED
    finally:
        world.sh(
            "sh",
            "-c",
            "iptables -t nat -D PREROUTING -j SOMEONE-ELSE; iptables -t nat -X SOMEONE-ELSE;"
            " ipvsadm -D -t 10.99.0.1:80; ipset destroy SOMEONE-ELSES",
            check=False,
        )
        for p in world.proxiers.values():
            p.force_full()
        world._last = None
