"""hostPort with real packets: `kproxy ingress hostports` programs node-1 of a namespace lab.

node-1 (192.168.0.2, fd00:192:168::2) runs four pods (10.0.1.11-14), each with a TCP and UDP echo
server on port 80 that answers with its name and the source it saw; client-1 (192.168.0.101) is
outside. Every kproxy command runs inside node-1's namespace (``ip netns exec``); nothing here
touches the namespace the tests run in. The lab has its own prefix (``kh<pid>``), so colleagues'
labs (``kt<pid>``, ``kp``) never collide with it.

Each test writes the Pods (and the Node) it wants into a state file and runs one sync, which
replaces whatever the previous test programmed; the module ends with `kproxy cleanup` and checks
that no kproxy chain is left.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy.lab.namespaces import NETNS_DIR, Lab, lab_namespaces, remove_namespaces
from kproxy.testing.fakeapi import FakeAPIServer
from kproxy.testing.netns import EchoServer, Outcome, Sender, call_in, probe, wait_for

KPROXY = str(Path(sys.executable).with_name("kproxy"))
FAMILIES = [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")]
EDGE = {"node-role.kubernetes.io/edge": ""}
POD_PORT = 80
CLUSTER_IP = "172.30.0.10"
VIP_ONLY = "172.30.0.99"  # on the IPVS dummy device, no Service port behind it

_OWN = re.compile(r"kh(\d+)-")


def _remove_dead_labs() -> None:
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return
    for pid in sorted({m.group(1) for m in map(_OWN.match, names) if m}):
        if not Path(f"/proc/{pid}").exists():
            remove_namespaces(f"kh{pid}")


@pytest.fixture(scope="module")
def hlab() -> Iterator[Lab]:
    _remove_dead_labs()
    with Lab(prefix=f"kh{os.getpid()}", nodes=1, pods_per_node=4, clients=1) as running:
        yield running
    assert not lab_namespaces(running.prefix)


@pytest.fixture(scope="module")
def servers(hlab: Lab) -> Iterator[dict[str, EchoServer]]:
    started: dict[str, EchoServer] = {}
    try:
        for pod in hlab.pods(1):
            started[pod.name] = EchoServer(pod, POD_PORT, proto="both").start()
        yield started
    finally:
        for s in started.values():
            s.stop()
    for s in started.values():
        assert s.errors == [], f"{s.name}: {s.errors}"


@pytest.fixture(scope="module")
def kp(hlab: Lab, servers: dict[str, EchoServer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Runs kproxy commands in node-1; cleans up after the module and checks it did."""
    k = _Kproxy(hlab, tmp_path_factory.mktemp("hostport"))
    yield k
    k.run("cleanup")
    left = hlab.run(hlab.node(1), ["iptables-save"]).stdout + hlab.run(hlab.node(1), ["ip6tables-save"]).stdout
    assert "KPROXY-" not in left


class _Kproxy:
    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.node = lab.node(1)
        self.n = 0

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = self.lab.run(self.node, [KPROXY, *args], check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"kproxy {' '.join(args)} exited {res.returncode}:\n{res.stderr}")
        return res

    def state(self, objects: list[dict[str, Any]]) -> str:
        self.n += 1
        path = self.tmp / f"state{self.n}.yaml"
        path.write_text(yaml.safe_dump_all(objects))
        return str(path)

    def hostports(self, *pods: dict[str, Any], node: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
        objects = [node if node is not None else node_obj(self.lab), *pods]
        return self.run("ingress", "hostports", "--node", "node-1", "--state", self.state(list(objects)))

    def nat(self, family: int = 4) -> str:
        return self.lab.run(self.node, ["iptables-save" if family == 4 else "ip6tables-save", "-t", "nat"]).stdout


def node_obj(lab: Lab, labels: dict[str, str] | None = None) -> dict[str, Any]:
    n = lab.node(1)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": n.name, "labels": EDGE if labels is None else labels},
        "status": {"addresses": [{"type": "InternalIP", "address": n.ipv4}, {"type": "InternalIP", "address": n.ipv6}]},
    }


def pod_obj(
    lab: Lab, letter: str, *ports: dict[str, Any], created: str = "2024-01-01T00:00:00Z", name: str | None = None
) -> dict[str, Any]:
    p = lab.pod(f"pod-1{letter}")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name or p.name,
            "namespace": "default",
            "uid": f"uid-{name or p.name}",
            "creationTimestamp": created,
        },
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "ports": list(ports)}]},
        "status": {"phase": "Running", "podIP": p.ipv4, "podIPs": [{"ip": p.ipv4}, {"ip": p.ipv6}]},
    }


def hp(
    host_port: int, proto: str = "TCP", host_ip: str | None = None, container_port: int = POD_PORT
) -> dict[str, Any]:
    out: dict[str, Any] = {"containerPort": container_port, "hostPort": host_port, "protocol": proto}
    if host_ip is not None:
        out["hostIP"] = host_ip
    return out


def answered_by(result: Any, name: str) -> bool:
    return result.outcome is Outcome.ANSWERED and result.name == name


# --- reachability ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_hostport_reachable_from_outside_the_node_and_pods(hlab: Lab, kp: _Kproxy, family: int) -> None:
    kp.hostports(pod_obj(hlab, "a", hp(8080), hp(8080, "UDP")))
    node, client = hlab.node(1), hlab.client(1)
    a, b = hlab.pod("pod-1a"), hlab.pod("pod-1b")
    node_ip = node.ip(family)
    for proto in ("tcp", "udp"):
        # From outside: the pod sees the client's own address (no SNAT on the way in).
        r = probe(client, node_ip, 8080, proto)
        assert answered_by(r, "pod-1a"), r
        assert r.peer_ip == client.ip(family), r
        # From the node itself, to its own address.
        r = probe(node, node_ip, 8080, proto)
        assert answered_by(r, "pod-1a"), r
        # Hairpin: the pod reaches its own hostPort; masqueraded, or its reply would never leave it.
        r = probe(a, node_ip, 8080, proto)
        assert answered_by(r, "pod-1a"), r
        assert r.peer_ip == (node.gateway_v4 if family == 4 else node.gateway_v6), r
        # Another pod of the node: reached with its own address, as a Service would be.
        r = probe(b, node_ip, 8080, proto)
        assert answered_by(r, "pod-1a"), r
        assert r.peer_ip == b.ip(family), r
    # Ports without a mapping are untouched: nothing listens on the node there.
    assert probe(client, node_ip, 8081).outcome is Outcome.REFUSED


def test_hostport_on_localhost_needs_route_localnet_and_is_guarded(hlab: Lab, kp: _Kproxy) -> None:
    node = hlab.node(1)
    # A new namespace copies "all" from the host's; pin both off so the sync has to set cbr0's.
    hlab.run(node, ["sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=0", "net.ipv4.conf.cbr0.route_localnet=0"])
    kp.hostports(pod_obj(hlab, "a", hp(8080), hp(8080, "UDP")))
    for proto in ("tcp", "udp"):
        r = probe(node, "127.0.0.1", 8080, proto)
        assert answered_by(r, "pod-1a"), r
        assert r.peer_ip == node.gateway_v4, r  # masqueraded to the address towards the pod
    sysctl = hlab.run(node, ["sysctl", "-n", "net.ipv4.conf.cbr0.route_localnet", "net.ipv4.conf.all.route_localnet"])
    assert sysctl.stdout.split() == ["1", "0"]  # only the interface towards the pods
    filt = hlab.run(node, ["iptables-save", "-t", "filter"]).stdout
    assert "-A INPUT -j KPROXY-HOSTPORT-LOCALNET" in filt
    assert re.search(r"KPROXY-HOSTPORT-LOCALNET ! -s 127.0.0.0/8 -d 127.0.0.0/8 .* -j DROP", filt)


def test_same_hostport_on_different_host_ips_and_protocols(hlab: Lab, kp: _Kproxy) -> None:
    """Upstream conformance: "HostPort validates that there is no conflict between pods with same
    hostPort but different hostIP and protocol" (test/e2e/network/hostport.go)."""
    node, client = hlab.node(1), hlab.client(1)
    port = 54323
    res = kp.hostports(
        pod_obj(hlab, "b", hp(port, "TCP", "127.0.0.1")),
        pod_obj(hlab, "c", hp(port, "TCP", node.ipv4)),
        pod_obj(hlab, "d", hp(port, "UDP", node.ipv4)),
    )
    assert "conflict" not in res.stderr, res.stderr
    assert answered_by(probe(node, "127.0.0.1", port), "pod-1b")
    assert answered_by(probe(node, node.ipv4, port), "pod-1c")
    assert answered_by(probe(node, node.ipv4, port, "udp"), "pod-1d")
    assert answered_by(probe(client, node.ipv4, port), "pod-1c")
    assert answered_by(probe(client, node.ipv4, port, "udp"), "pod-1d")
    # Nothing claims UDP on 127.0.0.1.
    assert probe(node, "127.0.0.1", port, "udp").outcome is Outcome.REFUSED
    # hostIP is IPv4: nothing is mapped on the node's IPv6 address.
    assert probe(client, node.ipv6, port).outcome is Outcome.REFUSED


def test_sctp_mappings_are_programmed(hlab: Lab, kp: _Kproxy) -> None:
    """The probes speak TCP and UDP only; for SCTP, the kernel takes the rules (an SCTP pod must
    not make the transaction, and every other hostPort with it, fail)."""
    client, node = hlab.client(1), hlab.node(1)
    kp.hostports(pod_obj(hlab, "a", hp(8080), hp(8080, "SCTP"), hp(9999, "SCTP", container_port=99)))
    nat = kp.nat(4)
    assert re.search(r"-A KPROXY-HOSTPORT-PODS -p sctp .*-m multiport --dports 8080,9999 ", nat), nat
    assert "-p sctp -m sctp --dport 9999 -j DNAT --to-destination 10.0.1.11:99" in nat
    assert "-p sctp -m sctp --dport 9999 -j DNAT --to-destination [fd00:10:1::11]:99" in kp.nat(6)
    assert answered_by(probe(client, node.ipv4, 8080), "pod-1a")


def test_conflicting_claims_go_to_the_oldest_pod(hlab: Lab, kp: _Kproxy) -> None:
    client, node = hlab.client(1), hlab.node(1)
    older = pod_obj(hlab, "b", hp(8090), created="2023-06-01T00:00:00Z")
    newer = pod_obj(hlab, "a", hp(8090), hp(8091), created="2024-06-01T00:00:00Z")
    res = kp.hostports(newer, older)  # the newer listed first: order must not matter
    assert "Pod default/pod-1a: spec.containers[0].ports[0]: hostPort 8090/TCP" in res.stderr
    assert "already claimed by the older Pod default/pod-1b" in res.stderr
    assert answered_by(probe(client, node.ipv4, 8090), "pod-1b")
    assert answered_by(probe(client, node.ipv4, 8091), "pod-1a")  # its other claim stands


def test_udp_conntrack_is_flushed_when_a_mapping_appears(hlab: Lab, kp: _Kproxy) -> None:
    client, node = hlab.client(1), hlab.node(1)
    kp.hostports(pod_obj(hlab, "a", hp(8080)))  # TCP only
    with Sender(client, node.ipv4, 8085, src_port=24085) as s:
        # Nothing on the node: refused, and conntrack now holds this flow without a DNAT.
        assert s.send().outcome is Outcome.REFUSED
        flows = hlab.run(node, ["conntrack", "-L", "-p", "udp", "--dport", "8085"], check=False).stdout
        assert "dport=8085" in flows
        kp.hostports(pod_obj(hlab, "a", hp(8080), hp(8085, "UDP")))
        # Same 5-tuple: without the flush it would keep following the old entry to the node.
        r = s.send()
        assert answered_by(r, "pod-1a"), r


def test_rules_go_away_when_the_node_is_not_an_edge_node(hlab: Lab, kp: _Kproxy) -> None:
    client, node = hlab.client(1), hlab.node(1)
    kp.hostports(pod_obj(hlab, "a", hp(8080)))
    assert answered_by(probe(client, node.ipv4, 8080), "pod-1a")
    res = kp.hostports(pod_obj(hlab, "a", hp(8080)), node=node_obj(hlab, labels={}))
    assert "not an edge node" in res.stdout
    assert "KPROXY-HOSTPORT" not in kp.nat(4) and "KPROXY-HP-" not in kp.nat(4)
    assert "KPROXY-HOSTPORT" not in kp.nat(6)
    assert probe(client, node.ipv4, 8080).outcome is Outcome.REFUSED
    # A custom selector: this node is an edge node again.
    state = kp.state([node_obj(hlab, labels={"tier": "edge"}), pod_obj(hlab, "a", hp(8080))])
    kp.run("ingress", "hostports", "--node", "node-1", "--state", state, "--edge-node-selector", "tier in (edge)")
    assert answered_by(probe(client, node.ipv4, 8080), "pod-1a")


# --- Service VIPs are never captured -----------------------------------------------------------


def _service_state(lab: Lab) -> list[dict[str, Any]]:
    b = lab.pod("pod-1b")
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": CLUSTER_IP,
            "clusterIPs": [CLUSTER_IP],
            "ports": [
                {"name": "alt", "port": 8080, "protocol": "TCP", "targetPort": POD_PORT},
                {"name": "https", "port": 443, "protocol": "TCP", "targetPort": POD_PORT},
            ],
        },
    }
    eps = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [
            {"name": "alt", "port": POD_PORT, "protocol": "TCP"},
            {"name": "https", "port": POD_PORT, "protocol": "TCP"},
        ],
        "endpoints": [{"addresses": [b.ipv4], "conditions": {"ready": True}, "nodeName": "node-1"}],
    }
    return [svc, eps]


def test_service_vips_are_never_captured(hlab: Lab, kp: _Kproxy) -> None:
    """An ingress pod on hostPorts 8080 and 443 next to a Service on the same ports.

    The ClusterIP and a second VIP sit on the IPVS dummy device ``kproxy-ipvs0``, as in IPVS mode,
    which makes them LOCAL addresses: ``addrtype LOCAL`` alone would send them to the pod
    (kubernetes/kubernetes#60305). The Service keeps its traffic (our jump comes after
    KPROXY-SERVICES), and a VIP port that is no Service port is not captured either (the allow-list
    of node addresses leaves the device out) — also for a VIP added after the sync.
    """
    node, client, c = hlab.node(1), hlab.client(1), hlab.pod("pod-1c")
    # The Service proxy syncs first (the test below covers the other order).
    kp.run("cleanup")
    # IPVS mode uses a dummy device; this kernel may lack the module, and all that matters is a
    # device of that name holding the VIPs (a down bridge does: its addresses are LOCAL too).
    made = hlab.run(node, ["ip", "link", "add", "kproxy-ipvs0", "type", "dummy"], check=False)
    if made.returncode != 0:
        hlab.run(node, ["ip", "link", "add", "kproxy-ipvs0", "type", "bridge"])
    try:
        hlab.run(node, ["ip", "addr", "add", f"{CLUSTER_IP}/32", "dev", "kproxy-ipvs0"])
        local = hlab.run(node, ["ip", "route", "show", "table", "local"]).stdout
        assert f"local {CLUSTER_IP} dev kproxy-ipvs0" in local, local  # a LOCAL address, as in IPVS mode
        state = kp.state([node_obj(hlab), *_service_state(hlab)])
        kp.run("sync", "--node", "node-1", "--state", state, "--cluster-cidr", "10.0.0.0/8")
        kp.hostports(pod_obj(hlab, "a", hp(8080), hp(443), hp(9090)))
        hlab.run(node, ["ip", "addr", "add", f"{VIP_ONLY}/32", "dev", "kproxy-ipvs0"])  # after the sync

        pre = [line for line in kp.nat(4).splitlines() if line.startswith("-A PREROUTING")]
        targets = [line.rsplit("-j ", 1)[1] for line in pre]
        assert targets.index("KPROXY-SERVICES") < targets.index("KPROXY-HOSTPORT-DNAT"), pre
        allow = [line for line in kp.nat(4).splitlines() if line.startswith("-A KPROXY-HOSTPORT-DNAT ")]
        assert allow and not any(CLUSTER_IP in line for line in allow), allow  # the VIP is not a node address

        for src in (node, c):
            for port in (8080, 443):
                r = probe(src, CLUSTER_IP, port)
                assert answered_by(r, "pod-1b"), f"{src.name} → {CLUSTER_IP}:{port}: {r}"
            for vip in (CLUSTER_IP, VIP_ONLY):
                r = probe(src, vip, 9090)  # no Service port: the node answers itself (nothing listens)
                assert r.outcome is Outcome.REFUSED, f"{src.name} → {vip}:9090 was captured: {r}"
        # The hostPorts themselves still work on the node's address.
        for port in (8080, 443, 9090):
            assert answered_by(probe(client, node.ipv4, port), "pod-1a")
    finally:
        hlab.run(node, ["ip", "link", "del", "kproxy-ipvs0"], check=False)
        kp.run("cleanup")


def test_service_sync_after_hostports_keeps_both(hlab: Lab, kp: _Kproxy) -> None:
    state = kp.state([node_obj(hlab), *_service_state(hlab)])
    try:
        kp.run("cleanup")
        kp.hostports(pod_obj(hlab, "a", hp(8080)))
        kp.run("sync", "--node", "node-1", "--state", state, "--cluster-cidr", "10.0.0.0/8")
        assert answered_by(probe(hlab.client(1), hlab.node(1).ipv4, 8080), "pod-1a")
        assert answered_by(probe(hlab.pod("pod-1c"), CLUSTER_IP, 8080), "pod-1b")
    finally:
        kp.run("cleanup")


def test_cleanup_removes_every_hostport_chain_and_jump(hlab: Lab, kp: _Kproxy) -> None:
    kp.hostports(pod_obj(hlab, "a", hp(8080), hp(8080, "UDP")))
    assert "KPROXY-HOSTPORT-DNAT" in kp.nat(4) and "KPROXY-HOSTPORT-DNAT" in kp.nat(6)
    kp.run("cleanup")
    for family in (4, 6):
        save = hlab.run(hlab.node(1), ["iptables-save" if family == 4 else "ip6tables-save"]).stdout
        assert "KPROXY" not in save, save
    assert probe(hlab.client(1), hlab.node(1).ipv4, 8080).outcome is Outcome.REFUSED


# --- the daemon ------------------------------------------------------------------------------


def test_daemon_follows_pods_and_reports_conflicts(hlab: Lab, kp: _Kproxy, tmp_path: Path) -> None:
    """`kproxy ingress hostports --watch` in node-1, against a fake API server listening inside
    node-1's namespace (so the daemon reaches it on its own loopback)."""
    node, client = hlab.node(1), hlab.client(1)
    api = FakeAPIServer()
    call_in(node, api.start)  # the listening socket lives in node-1
    proc: subprocess.Popen[str] | None = None
    try:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        api.create("nodes", node_obj(hlab))
        api.create("pods", pod_obj(hlab, "a", hp(8080), created="2024-01-01T00:00:00Z"))
        elsewhere = pod_obj(hlab, "c", hp(8082), name="elsewhere")
        elsewhere["spec"]["nodeName"] = "node-2"  # another node's pod: not ours to program
        api.create("pods", elsewhere)
        # The one-shot form reads the API server too (this node's pods only).
        once = kp.run("ingress", "hostports", "--node", "node-1", "--kubeconfig", str(kubeconfig))
        assert "IPv4: 1 mappings" in once.stdout, once.stdout
        assert answered_by(probe(client, node.ipv4, 8080), "pod-1a")
        kp.run("cleanup")
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                node.ns,
                KPROXY,
                "ingress",
                "hostports",
                "--node",
                "node-1",
                "--watch",
                "--kubeconfig",
                str(kubeconfig),
                "--min-sync-period",
                "0.1",
                "--metrics-bind-address",
                "127.0.0.1:10259",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True)
        reader.start()

        def reached(port: int, name: str) -> bool:
            return answered_by(probe(client, node.ipv4, port), name)

        wait_for(lambda: reached(8080, "pod-1a"), timeout=20, message="pod-1a on hostPort 8080")
        # A newer pod claims the same port: reported on that pod, the older one keeps it.
        api.create("pods", pod_obj(hlab, "b", hp(8080), hp(8081), created="2025-01-01T00:00:00Z"))
        wait_for(lambda: reached(8081, "pod-1b"), timeout=10, message="pod-1b on hostPort 8081")
        assert reached(8080, "pod-1a")
        assert api.wait_for(
            lambda: any(
                e["reason"] == "HostPortConflict" and e["involvedObject"]["name"] == "pod-1b" for e in api.events()
            ),
            timeout=10,
        ), api.events()

        def metrics() -> str:
            raw = call_in(node, lambda: urllib.request.urlopen("http://127.0.0.1:10259/metrics", timeout=5).read())
            return bytes(raw).decode()

        # The gauges are set right after each family's transaction, a moment after the rules work.
        wait_for(lambda: "kproxy_hostport_conflicts 1.0" in metrics(), timeout=10, message="conflict metric")
        assert 'kproxy_hostport_mappings{family="IPv4"} 2.0' in metrics()  # 8080 → pod-1a, 8081 → pod-1b
        # The older pod goes: the port passes to the newer one.
        api.delete("pods", "pod-1a", "default")
        wait_for(lambda: reached(8080, "pod-1b"), timeout=10, message="pod-1b takes over hostPort 8080")
        # The node stops being an edge node: every rule goes.
        api.update("nodes", node_obj(hlab, labels={}))
        wait_for(lambda: probe(client, node.ipv4, 8081).outcome is Outcome.REFUSED, timeout=10, message="rules removed")
        assert "KPROXY-HOSTPORT" not in kp.nat(4)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            reader.join(timeout=10)
        api.stop()
        kp.run("cleanup")
    assert proc.returncode == 0, "".join(out)
