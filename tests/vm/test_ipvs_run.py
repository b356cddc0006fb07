"""`kproxy run --proxy-mode=ipvs` end to end, inside the VM: the real daemon as a process in
node-1's namespace, the fake API server, real packets.

The lab is one node with two pods (pod-1a 10.0.1.11, pod-1b 10.0.1.12) and an outside client.
The fake API server's socket is created inside node-1, so kproxy reaches it on 127.0.0.1. kproxy
first runs in the iptables mode and is then restarted in the IPVS mode under a stream of
connections, as an operator switching a node's mode would; the later tests run in order against
that IPVS-mode daemon, each from the state the previous one left. Starting Python costs ~20 s in
this VM (no KVM), so the module starts the daemon twice, no more. Every wait polls a condition
with a deadline; nothing sleeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kproxy.lab.namespaces import Lab
from kproxy.testing.builders import endpoint, endpoint_slice, node, service
from kproxy.testing.daemon_process import KPROXY, DaemonEnv, KproxyProcess
from kproxy.testing.fakeapi import FakeAPIServer
from kproxy.testing.linesrv import LineServer, line_client, read_line
from kproxy.testing.netns import EchoServer, ProbeStream, call_in, probe, probe_many, wait_for

pytestmark = pytest.mark.vm

VIP = "172.30.0.10"  # Service "web": both pods, port 8080 (EchoServer)
HOLD_VIP = "172.30.0.11"  # Service "hold": port 9090 (LineServer: connections stay open)
PORT, HOLD = 8080, 9090
SYNC_PERIOD = 3.0
START = 120.0  # deadline for a started daemon's first sync: Python alone takes ~20 s here
CONVERGE = 30.0  # deadline for a change to show in the data plane (TCG is slow); ~1 s when passing
BOTH = {"pod-1a", "pod-1b"}
LAB = Lab(prefix="unused", nodes=1)  # the address plan only


def slice_for(svc: str, port: int, *pods: str) -> dict[str, Any]:
    """The Service's one EndpointSlice: `pods` serving on `port` (the Service ports are 80 and 90)."""
    eps = [endpoint(LAB.pod(p).ipv4, LAB.pod(p).node) for p in pods]
    port_name = "p80" if svc == "web" else "p90"
    return endpoint_slice(svc, "default", name=f"{svc}-1", port=port, port_name=port_name, endpoints=eps)


@dataclass
class Env(DaemonEnv):
    lines: dict[str, LineServer] = field(default_factory=dict)

    def start_kproxy(self, mode: str) -> KproxyProcess:
        kubeconfig = self.api.write_kubeconfig(self.tmp / "kubeconfig")
        kp = KproxyProcess.start(
            self.node,
            self.tmp / f"kproxy-{len(self.kproxies) + 1}-{mode}.log",
            f"--kubeconfig={kubeconfig}",
            "--hostname-override=node-1",
            "--cluster-cidr=10.0.0.0/8",
            f"--proxy-mode={mode}",
            "--iptables-backend=nft",
            # The mode-neutral flags: the IPVS mode must take them as its own periods.
            f"--sync-period={SYNC_PERIOD:g}s",
            "--min-sync-period=100ms",
            # A server's FIN ends a connection for IPVS after this, not after 2 minutes.
            "--ipvs-tcpfin-timeout=2s",
            "--v=2",
        )
        self.kproxies.append(kp)
        return kp

    def sh(self, *argv: str) -> str:
        return self.lab.run(self.node, list(argv)).stdout

    def real_servers(self, vip: str, port: int) -> dict[str, tuple[int, int]]:
        """`ipvsadm -Ln` of one virtual server: real server -> (weight, ActiveConn)."""
        out: dict[str, tuple[int, int]] = {}
        done = self.lab.run(self.node, ["ipvsadm", "-Ln", "-t", f"{vip}:{port}"], check=False)
        for line in done.stdout.splitlines():
            parts = line.split()
            if parts[:1] == ["->"] and parts[1][0].isdigit():
                out[parts[1]] = (int(parts[3]), int(parts[4]))
        return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    subprocess.run(["modprobe", "-a", "br_netfilter", "ip_vs", "ip_vs_rr"], check=True)
    tmp = tmp_path_factory.mktemp("ipvs-run")
    lab = Lab(prefix=f"kr{os.getpid() % 100000}", nodes=1, pods_per_node=2, clients=1).up()
    servers: list[Any] = []
    codes: list[int] = []
    try:
        servers += [EchoServer(pod, PORT, proto="both").start() for pod in lab.all_pods]
        lines = {pod.name: LineServer(pod.ns, pod.name, HOLD) for pod in lab.all_pods}
        servers += lines.values()
        api = call_in(lab.node(1).ns, FakeAPIServer().start)
        env = Env(lab, api, tmp, lines=lines)
        try:
            api.create("nodes", node(addresses=["192.168.0.2"], pod_cidrs=["10.0.1.0/24"]))
            api.create("services", service("web", "default", cluster_ip=VIP, port=80))
            api.create("endpointslices", slice_for("web", PORT, "pod-1a", "pod-1b"))
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


def answered_by(env: Env, count: int = 6) -> set[str] | None:
    """Which pods answered `count` new TCP connections to the ClusterIP; None if any failed."""
    results = probe_many(env.client, VIP, 80, count=count, timeout=1.0)
    return results.names() if all(r.answered for r in results) else None


def converges_to(env: Env, pods: set[str], why: str) -> None:
    wait_for(lambda: answered_by(env) == pods, timeout=CONVERGE, message=why)


def synced(kp: KproxyProcess, after: int = 0, **fields: Any) -> list[dict[str, Any]]:
    """`sync_complete` lines after the first `after`, those with `fields` only."""
    lines = kp.events("sync_complete")[after:]
    return [e for e in lines if all(e.get(k) == v for k, v in fields.items())]


# -- the scenarios, in order ------------------------------------------------------------------


def test_the_iptables_mode_serves_first(env: Env) -> None:
    kp = env.start_kproxy("iptables")
    wait_for(lambda: synced(kp), timeout=START, message="the iptables-mode daemon synced")
    converges_to(env, BOTH, "ClusterIP served by both pods in the iptables mode")
    assert "KPROXY-SVC-" in env.sh("iptables-nft-save", "-t", "nat")


def test_switching_to_the_ipvs_mode_under_a_stream_loses_no_connection(env: Env) -> None:
    with ProbeStream(env.client, VIP, 80) as stream:
        results = stream.results
        wait_for(lambda: len(results) >= 10, timeout=CONVERGE, message="stream running")
        assert env.kproxy.stop() == 0
        new = env.start_kproxy("ipvs")
        wait_for(lambda: synced(new), timeout=START, message="the IPVS-mode daemon synced")
        synced_at = len(results)
        wait_for(lambda: len(results) >= synced_at + 10, timeout=CONVERGE, message="stream after the switch")
    failed = stream.failed()
    assert failed == [], f"{len(failed)} of {len(results)} connections lost: {failed[:3]}"
    first = synced(env.kproxy)[0]
    assert (first["kind"], first["reason"]) == ("full", "start")
    assert first["ipvs_writes"] == 3  # one virtual server, two real servers
    # The switch replaced the iptables mode's per-Service chains in the same transaction.
    assert "KPROXY-SVC-" not in env.sh("iptables-nft-save", "-t", "nat")
    assert VIP in env.sh("ip", "-o", "addr", "show", "dev", "kproxy-ipvs0")
    assert set(env.real_servers(VIP, 80)) == {f"{LAB.pod(p).ipv4}:{PORT}" for p in BOTH}
    assert answered_by(env) == BOTH


def remove_pod_1b_after_a_periodic_sync(env: Env) -> dict[str, Any]:
    """Wait for a periodic sync, remove pod-1b from "web", and return the sync that carried it."""
    periodic = len(synced(env.kproxy, reason="periodic"))
    wait_for(lambda: len(synced(env.kproxy, reason="periodic")) > periodic, timeout=CONVERGE, message="a periodic sync")
    before = len(synced(env.kproxy))
    env.api.update("endpointslices", slice_for("web", PORT, "pod-1a"))
    converges_to(env, {"pod-1a"}, "only pod-1a left")
    (change,) = wait_for(
        lambda: synced(env.kproxy, before, changed=1), timeout=CONVERGE, message="the change's sync logged"
    )
    return change


def test_an_endpoint_change_is_one_real_server_write(env: Env) -> None:
    """A partial sync writes the one real server and no iptables rule.

    A change that arrives when the periodic full sync is due rides on that full sync, which
    rewrites the (few) iptables rules as well: correct, but not what this test is about. So the
    change is made right after a periodic sync, leaving a whole sync period for its partial one,
    and made again (three tries at most) if it still fell on a periodic sync.
    """
    try:
        for _ in range(3):
            change = remove_pod_1b_after_a_periodic_sync(env)
            assert change["ipvs_writes"] == 1
            if change["kind"] == "partial":
                break
            env.api.update("endpointslices", slice_for("web", PORT, "pod-1a", "pod-1b"))
            converges_to(env, BOTH, "pod-1b back before trying again")
        assert (change["kind"], change["written"]) == ("partial", 0), change  # no iptables rule rewritten
    finally:  # the later tests start from both pods
        env.api.update("endpointslices", slice_for("web", PORT, "pod-1a", "pod-1b"))
    converges_to(env, BOTH, "pod-1b back")


def test_a_removed_endpoint_drains_its_open_connection_then_goes(env: Env) -> None:
    env.api.create("services", service("hold", "default", cluster_ip=HOLD_VIP, port=90))
    env.api.create("endpointslices", slice_for("hold", HOLD, "pod-1b"))
    pod_1b = f"{LAB.pod('pod-1b').ipv4}:{HOLD}"

    def connect() -> tuple[Any, dict[str, str]] | None:
        try:
            return line_client(env.client, HOLD_VIP, 90)
        except OSError:
            return None  # not programmed yet

    held = wait_for(connect, timeout=CONVERGE, message="the hold Service answering")
    assert held is not None
    conn, hello = held
    try:
        assert hello["name"] == "pod-1b"
        env.api.update("endpointslices", slice_for("hold", HOLD, "pod-1a"))
        wait_for(
            lambda: env.real_servers(HOLD_VIP, 90).get(pod_1b) == (0, 1),
            timeout=CONVERGE,
            message="pod-1b kept at weight 0 while its connection is open",
        )
        other, greeting = line_client(env.client, HOLD_VIP, 90)
        other.close()
        assert greeting["name"] == "pod-1a", "new connections go to the remaining endpoint"
        conn.sendall(b"still there?\n")
        assert read_line(conn)["name"] == "pod-1b", "the open connection keeps working"
        env.lines["pod-1b"].shutdown_all()  # the server ends it (FIN)
        assert conn.recv(1) == b""
        # IPVS counts the connection until its FIN_WAIT timer (2 s) runs out; nothing signals
        # that, so the next syncs look. The client stays half-open meanwhile: its own FIN would
        # move the connection to TIME_WAIT, counted for 2 minutes (as with kube-proxy).
        wait_for(
            lambda: pod_1b not in env.real_servers(HOLD_VIP, 90),
            timeout=CONVERGE,
            message="the drained real server deleted",
        )
    finally:
        conn.close()


def test_ipvs_state_removed_by_hand_comes_back_within_a_sync_period(env: Env) -> None:
    pod_1a = f"{LAB.pod('pod-1a').ipv4}:{PORT}"
    env.sh("ipvsadm", "-d", "-t", f"{VIP}:80", "-r", pod_1a)  # only a full read-back sees this
    env.sh("ipvsadm", "-D", "-t", f"{HOLD_VIP}:90")
    fulls = len(synced(env.kproxy, reason="periodic"))
    started = time.monotonic()
    wait_for(
        lambda: pod_1a in env.real_servers(VIP, 80) and env.real_servers(HOLD_VIP, 90),
        timeout=CONVERGE,
        message="the virtual server and the real server back",
    )
    assert time.monotonic() - started < 2 * SYNC_PERIOD + 5.0
    wait_for(lambda: len(synced(env.kproxy, reason="periodic")) > fulls, timeout=CONVERGE, message="periodic")
    converges_to(env, BOTH, "both pods again")


def test_health_metrics_and_mode(env: Env) -> None:
    code, body = env.get(10256, "/healthz")
    assert code == 200 and json.loads(body)["healthy"] is True
    assert env.get(10249, "/proxyMode") == (200, b"ipvs")
    code, body = env.get(10249, "/metrics")
    samples = {s.name: s.value for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    assert samples["kubeproxy_sync_proxy_rules_duration_seconds_count"] >= 3
    assert samples["kubeproxy_sync_proxy_rules_last_timestamp_seconds"] > time.time() - 60


def test_sigterm_leaves_ipvs_in_place(env: Env) -> None:
    assert env.kproxy.stop() == 0
    assert env.kproxy.events("kproxy_stopped")
    assert set(env.real_servers(VIP, 80)) == {f"{LAB.pod(p).ipv4}:{PORT}" for p in BOTH}
    assert answered_by(env) == BOTH


def test_switching_back_to_the_iptables_mode_removes_what_only_ipvs_used(env: Env) -> None:
    kp = env.start_kproxy("iptables")
    wait_for(lambda: kp.events("other_mode_cleaned_up"), timeout=START, message="the IPVS leftovers removed")
    assert answered_by(env) == BOTH
    assert env.real_servers(VIP, 80) == {}
    assert env.lab.run(env.node, ["ip", "link", "show", "kproxy-ipvs0"], check=False).returncode != 0
    assert not [s for s in env.sh("ipset", "list", "-n").split() if s.startswith("KPROXY-")]
    assert "KPROXY-PROXY-FIREWALL" not in env.sh("iptables-nft-save", "-t", "mangle")
    # A Service deleted now stops answering: no stale virtual server or local VIP serves it.
    sock, hello = line_client(env.client, HOLD_VIP, 90)
    sock.close()
    assert hello["name"] == "pod-1a"
    env.api.delete("services", "hold", "default")
    wait_for(
        lambda: not probe(env.client, HOLD_VIP, 90, timeout=1.0).answered,
        timeout=CONVERGE,
        message="the deleted Service gone",
    )
    assert kp.stop() == 0  # its rules stay for the cleanup test


@pytest.fixture
def no_daemon(env: Env) -> Env:
    """Whatever the earlier tests left, no daemon runs now (it would put its rules back)."""
    for kp in env.kproxies:
        kp.stop()
    return env


def test_run_cleanup_removes_what_either_mode_left(no_daemon: Env) -> None:
    """`kproxy run --cleanup`, as kube-proxy's: every mode's leftovers, whatever the mode."""
    env = no_daemon
    done = env.lab.run(env.node, [KPROXY, "run", "--cleanup", "--hostname-override=node-1"], check=False, timeout=START)
    assert done.returncode == 0, done.stderr
    assert env.real_servers(VIP, 80) == {}
    assert "KPROXY" not in env.sh("iptables-nft-save")
    assert not [s for s in env.sh("ipset", "list", "-n").split() if s.startswith("KPROXY-")]
    links = env.lab.run(env.node, ["ip", "link", "show", "kproxy-ipvs0"], check=False)
    assert links.returncode != 0, "the dummy device is gone"
    assert probe(env.client, VIP, 80, timeout=1.0).answered is False
