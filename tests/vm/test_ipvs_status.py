"""`kproxy status` against a running `kproxy run --proxy-mode=ipvs`, inside the VM: what it says
the node does is what packets do, and `--check` finds a real server removed by hand (exit 1,
naming it) until the daemon's next full sync puts it back (exit 0).

tests/e2e/test_status.py does the same for the iptables and nftables modes on the host; IPVS
needs the VM. The lab has two nodes with one pod each (pod-1a on node-1, pod-2a on node-2) and an
outside client; the daemon runs in node-1 only, against the fake API server (its socket made
inside node-1, so kproxy reaches it on 127.0.0.1), and pod-2a is reached through node-2 as a
remote endpoint is. Service "web" is a NodePort with trafficDistribution PreferSameNode; Service
"ext" has an external IP, which the IPVS mode binds to kproxy-ipvs0, so the node's address list
holds a VIP (status once described NodePort virtual servers on it). `kproxy status` runs as an
operator would, in node-1's namespace: ``kproxy status --from http://127.0.0.1:10256``.

Starting Python costs seconds to tens of seconds in this VM (no KVM), so the daemon starts once
and each test reads status a few times only. The tests run in order against that daemon, each
leaving "web" served by both pods. Every wait polls a condition with a deadline; nothing sleeps.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from test_ipvs_run import synced

from kproxy.lab.namespaces import Lab
from kproxy.testing.builders import endpoint, endpoint_slice, hinted, node, service
from kproxy.testing.daemon_process import KPROXY, DaemonEnv, KproxyProcess
from kproxy.testing.fakeapi import FakeAPIServer
from kproxy.testing.netns import EchoServer, call_in, probe_many, wait_for

pytestmark = pytest.mark.vm

VIP, EXT_VIP, EXT_IP = "172.30.0.10", "172.30.0.11", "172.30.1.50"
PORT, NODE_PORT = 8080, 30080
# Long enough that `kproxy status --check` (a Python start here: 15-35 s) reads the kernel before
# the periodic full sync repairs what a test removed by hand; short enough to wait for that repair.
SYNC_PERIOD = 45.0
# The daemon's periodic full syncs may come up to two sync periods apart: the next one is due a
# period after the last one *ended*, but the runner wakes a period after the last verify *started*;
# when a full sync takes seconds (here), that wake-up finds it not yet due and does a partial one.
FULL_SYNC_GAP = 2 * SYNC_PERIOD
START = 120.0  # deadline for the daemon's first sync
CONVERGE = 30.0  # deadline for a change to show in the data plane (TCG is slow)
STATUS = 120.0  # deadline for one `kproxy status` command
URL = "http://127.0.0.1:10256"
BOTH = {"pod-1a", "pod-2a"}
ZONE = "zone-a"
LAB = Lab(prefix="unused", nodes=2, pods_per_node=1)  # the address plan only


def rs(pod: str) -> str:
    """A pod's real server address, as IPVS and status write it."""
    return f"{LAB.pod(pod).ipv4}:{PORT}"


def web_slice(*pods: str, hints: bool = False, unhinted: str = "") -> dict[str, Any]:
    """The one EndpointSlice of "web"; with `hints`, as the EndpointSlice controller writes them
    for PreferSameNode (a node and a zone hint each), except on `unhinted`."""
    eps = [endpoint(LAB.pod(p).ipv4, LAB.pod(p).node, zone=ZONE) for p in pods]
    if hints:
        eps = [e if p == unhinted else hinted(e, "PreferSameNode", ZONE) for p, e in zip(pods, eps, strict=True)]
    return endpoint_slice("web", "default", name="web-1", port=PORT, endpoints=eps)


@dataclass
class Env(DaemonEnv):
    def start_kproxy(self) -> KproxyProcess:
        kubeconfig = self.api.write_kubeconfig(self.tmp / "kubeconfig")
        kp = KproxyProcess.start(
            self.node,
            self.tmp / "kproxy-ipvs.log",
            f"--kubeconfig={kubeconfig}",
            "--hostname-override=node-1",
            "--cluster-cidr=10.0.0.0/8",
            "--proxy-mode=ipvs",
            "--iptables-backend=nft",
            f"--sync-period={SYNC_PERIOD:g}s",
            "--min-sync-period=100ms",
            "--ipvs-tcpfin-timeout=2s",
            "--v=2",
        )
        self.kproxies.append(kp)
        return kp

    def real_servers(self, vip: str, port: int) -> dict[str, int]:
        """`ipvsadm -Ln` of one virtual server: real server -> weight."""
        out: dict[str, int] = {}
        done = self.lab.run(self.node, ["ipvsadm", "-Ln", "-t", f"{vip}:{port}"], check=False)
        for line in done.stdout.splitlines():
            parts = line.split()
            if parts[:1] == ["->"] and parts[1][0].isdigit():
                out[parts[1]] = int(parts[3])
        return out

    def status(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.lab.run(self.node, [KPROXY, "status", "--from", URL, *args], check=False, timeout=STATUS)

    def check(self) -> subprocess.CompletedProcess[str]:
        return self.status("--check", "--iptables-backend=nft")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    subprocess.run(["modprobe", "-a", "br_netfilter", "ip_vs", "ip_vs_rr"], check=True)
    tmp = tmp_path_factory.mktemp("ipvs-status")
    lab = Lab(prefix=f"ks{os.getpid() % 100000}", nodes=2, pods_per_node=1, clients=1).up()
    servers: list[Any] = []
    codes: list[int] = []
    try:
        servers += [EchoServer(pod, PORT, proto="both").start() for pod in lab.all_pods]
        api = call_in(lab.node(1).ns, FakeAPIServer().start)
        env = Env(lab, api, tmp)
        try:
            api.create(
                "nodes",
                node(
                    addresses=[lab.node(1).ipv4],
                    pod_cidrs=["10.0.1.0/24"],
                    labels={"topology.kubernetes.io/zone": ZONE},
                ),
            )
            api.create(
                "services",
                service(
                    "web", "default", type="NodePort", cluster_ip=VIP, port=80, node_port=NODE_PORT,
                    trafficDistribution="PreferSameNode",
                ),
            )  # fmt: skip
            api.create("endpointslices", web_slice("pod-1a", "pod-2a"))
            api.create("services", service("ext", "default", cluster_ip=EXT_VIP, port=80, external_ips=[EXT_IP]))
            api.create(
                "endpointslices",
                endpoint_slice("ext", "default", port=PORT, endpoints=[endpoint(LAB.pod("pod-1a").ipv4, "node-1")]),
            )
            kp = env.start_kproxy()
            wait_for(lambda: synced(kp), timeout=START, message="the IPVS-mode daemon synced")
            converges_to(env, BOTH, "ClusterIP served by both pods")
            yield env
        finally:
            codes = [kp.stop() for kp in env.kproxies]
            api.stop()
            for kp in env.kproxies:  # shown by pytest when a test failed
                print(f"--- {kp.log.name}:", *kp.log.read_text().splitlines()[-40:], sep="\n")
    finally:
        for s in servers:
            s.stop()
        lab.down()
    assert codes and all(code == 0 for code in codes), f"kproxy exit statuses: {codes}"


def answered_by(env: Env, ip: str = VIP, port: int = 80, count: int = 6) -> set[str] | None:
    """Which pods answered `count` new TCP connections from the client; None if any failed."""
    results = probe_many(env.client, ip, port, count=count, timeout=1.0)
    return results.names() if all(r.answered for r in results) else None


def converges_to(env: Env, pods: set[str], why: str) -> None:
    wait_for(lambda: answered_by(env) == pods, timeout=CONVERGE, message=why)


def web_port(env: Env) -> dict[str, Any]:
    """`kproxy status -o json --service default/web`: its one Service port."""
    done = env.status("-o", "json", "--service", "default/web")
    assert done.returncode == 0, done.stderr
    table = json.loads(done.stdout)
    assert (table["mode"], table["source"], table["node"]) == ("ipvs", "daemon", "node-1")
    (port,) = table["servicePorts"]
    return port


def used_for_cluster(port: dict[str, Any]) -> set[str]:
    """The pods status says cluster traffic goes to, by lab name."""
    by_ip = {LAB.pod(p).ipv4: p for p in BOTH}
    return {by_ip[e["ip"]] for e in port["endpoints"] if "cluster" in e["usedFor"]}


def kernel_real_servers(port: dict[str, Any], vip: str = VIP, vport: int = 80, kind: str = "cluster IP") -> set[str]:
    """The real servers status lists for one virtual server; asserts it lists the server."""
    name = f"TCP {vip}:{vport}"
    objects = port["kernelObjects"]
    assert {"kind": "virtual-server", "where": "ipvs", "name": name, "value": kind} in objects, objects
    return {o["name"] for o in objects if o["kind"] == "real-server" and o["where"] == name}


def serving(env: Env, vip: str = VIP, port: int = 80) -> set[str]:
    """What IPVS sends new connections to: the real servers of weight > 0 (a removed endpoint
    may stay at weight 0 while its connections drain)."""
    return {addr for addr, weight in env.real_servers(vip, port).items() if weight > 0}


# -- the scenarios, in order ------------------------------------------------------------------


def test_status_lists_the_endpoints_that_answer_and_the_ipvs_objects(env: Env) -> None:
    port = web_port(env)
    assert used_for_cluster(port) == BOTH == answered_by(env)
    assert (port["clusterRule"], port["internal"], port["external"]) == ("ready", "forward", "forward")
    assert port["trafficDistribution"] == "PreferSameNode"
    assert kernel_real_servers(port) == {rs("pod-1a"), rs("pod-2a")} == serving(env)
    node_port = f"TCP {env.lab.node(1).ipv4}:{NODE_PORT}"
    assert kernel_real_servers(port, env.lab.node(1).ipv4, NODE_PORT, "node port") == {rs("pod-1a"), rs("pod-2a")}
    assert answered_by(env, env.lab.node(1).ipv4, NODE_PORT) == BOTH
    # No NodePort virtual server on a VIP of the dummy device (the external IP of "ext").
    vss = {o["name"] for o in port["kernelObjects"] if o["kind"] == "virtual-server"}
    assert node_port in vss and f"TCP {EXT_IP}:{NODE_PORT}" not in vss, vss
    assert f"TCP {EXT_IP}:{NODE_PORT}" not in env.lab.run(env.node, ["ipvsadm", "-Ln"]).stdout
    done = env.status()
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "mode ipvs, from kproxy run, last sync " in out.splitlines()[0]
    assert "default/web:p80  TCP IPv4" in out and "forward to 2 of 2 endpoints (ready)" in out, out
    assert f"virtual-server ipvs: TCP {VIP}:80 : cluster IP" in out
    assert f"real-server TCP {VIP}:80: {rs('pod-1a')}" in out
    assert all(len(line) <= 100 for line in out.splitlines())


def test_check_passes_on_a_node_the_daemon_has_synced(env: Env) -> None:
    """The fixture waited until packets reach both pods: that sync is what the daemon serves.
    Its node addresses include the external IP of "ext" (on kproxy-ipvs0), where no NodePort
    virtual server goes and none may be expected."""
    done = env.check()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("Service port(s) need"), done.stdout


def test_node_hints_are_why_only_this_nodes_pod_answers(env: Env) -> None:
    try:
        env.api.update("endpointslices", web_slice("pod-1a", "pod-2a", hints=True))
        converges_to(env, {"pod-1a"}, "only the pod hinted for node-1")
        assert answered_by(env, env.lab.node(1).ipv4, NODE_PORT) == {"pod-1a"}, "external traffic too (Cluster)"
        port = wait_for(
            lambda: (p := web_port(env))["clusterRule"] == "node-hints" and p, timeout=STATUS, message="node hints"
        )
        assert used_for_cluster(port) == {"pod-1a"}
        why = {e["ip"]: e["why"] for e in port["endpoints"]}
        assert why == {LAB.pod("pod-1a").ipv4: "node-hints", LAB.pod("pod-2a").ipv4: "hinted-for-other-node"}
        assert kernel_real_servers(port) == {rs("pod-1a")} == serving(env)
        # One endpoint without a hint: hints are ignored, both answer, and status says why.
        env.api.update("endpointslices", web_slice("pod-1a", "pod-2a", hints=True, unhinted="pod-2a"))
        converges_to(env, BOTH, "both pods once one lacks its hints")
        port = wait_for(
            lambda: (p := web_port(env))["clusterRule"] == "ready" and p, timeout=STATUS, message="hints passed over"
        )
        assert used_for_cluster(port) == BOTH
        assert port["hintsSkipped"] == ["node-hint-missing", "zone-hint-missing"]
        assert kernel_real_servers(port) == {rs("pod-1a"), rs("pod-2a")} == serving(env)
    finally:
        env.api.update("endpointslices", web_slice("pod-1a", "pod-2a"))
    converges_to(env, BOTH, "plain slice again")


def test_check_finds_a_real_server_removed_by_hand_until_the_next_full_sync(env: Env) -> None:
    """The IPVS mode reads real servers back on its periodic full sync only, so the removal is
    made right after one, leaving at least a sync period for `--check`; should the repair still come
    first (a slow start), the daemon has logged it and the removal is made again."""
    done = env.check()
    assert done.returncode == 0, done.stdout + done.stderr
    kp = env.kproxy
    for _ in range(3):
        periodic = len(synced(kp, reason="periodic"))
        wait_for(
            lambda n=periodic: len(synced(kp, reason="periodic")) > n,
            timeout=FULL_SYNC_GAP + CONVERGE,
            message="a periodic full sync",
        )
        repairs = len(kp.events("rules_tampered"))
        env.lab.run(env.node, ["ipvsadm", "-d", "-t", f"{VIP}:80", "-r", rs("pod-1a")])
        during = answered_by(env)
        done = env.check()
        if done.returncode == 1:
            break
        wait_for(lambda n=repairs: len(kp.events("rules_tampered")) > n, timeout=CONVERGE, message="repaired already")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"IPv4: missing: real server {rs('pod-1a')} of TCP {VIP}:80" in done.stdout.splitlines(), done.stdout
    assert "check: 1 difference(s)" in done.stdout
    assert during == {"pod-2a"}, "what --check found is what packets met"
    # The next periodic full sync reads the real servers back, logs the drift and repairs it.
    tampered = wait_for(
        lambda: kp.events("rules_tampered")[repairs:], timeout=FULL_SYNC_GAP + CONVERGE, message="the repair"
    )[0]
    assert f"{rs('pod-1a')} of TCP {VIP}:80 deleted" in tampered["repaired"]
    assert rs("pod-1a") in serving(env)
    done = env.check()
    assert done.returncode == 0, done.stdout + done.stderr
    converges_to(env, BOTH, "both pods after the repair")
