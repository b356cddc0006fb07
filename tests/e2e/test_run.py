"""`kproxy run` end to end: the real daemon in node-1's namespace, the fake API server, real packets.

The lab is one node with two pods and an outside client (the shared IP plan: node-1 192.168.0.2,
pods 10.0.1.11 and 10.0.1.12, client 192.168.0.101 routed through node-1). The fake API server is
created from a thread inside node-1's namespace, so its socket lives there and kproxy reaches it
on 127.0.0.1; the test drives it from here. kproxy runs as a subprocess (``ip netns exec``), logs
JSON lines to a file the tests read, and is sent SIGTERM like a DaemonSet pod.

The tests share one lab and one API server and run in order: each starts from the converged state
the previous one left (ClusterIP 172.30.0.10 served by both pods). Every wait polls a condition
with a deadline; nothing sleeps. Everything is stopped and the lab removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kproxy.lab.namespaces import Lab
from kproxy.testing.builders import endpoint, endpoint_slice, node, service
from kproxy.testing.daemon_process import DaemonEnv, KproxyProcess
from kproxy.testing.fakeapi import FakeAPIServer
from kproxy.testing.netns import EchoServer, ProbeStream, Sender, call_in, probe_many, wait_for

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None,
        reason="end-to-end tests need root, iproute2 and iptables (network namespaces)",
    ),
]

VIP = "172.30.0.10"
PORT = 8080
SYNC_PERIOD = 2.0
CONVERGE = 15.0  # deadline for a change to show in the data plane; a passing test needs ~1 s
HC_PORT = 32100
BOTH = {"pod-1a", "pod-1b"}


def slice_for(*pods: str, name: str = "web-1") -> dict[str, Any]:
    lab = Lab(prefix="unused")  # the address plan only
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "web"},
            "annotations": {
                # RFC 3339 with nanoseconds, as the EndpointSlice controller writes it: a time
                # truncated to the second may fall before kproxy started, and not be counted.
                "endpoints.kubernetes.io/last-change-trigger-time": datetime.now(UTC).isoformat()
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "port": PORT, "protocol": "TCP"}, {"name": "udp", "port": PORT, "protocol": "UDP"}],
        "endpoints": [endpoint(lab.pod(p).ipv4, lab.pod(p).node) for p in pods],
    }


WEB = service(
    "web",
    "default",
    cluster_ip=VIP,
    ports=[{"name": "tcp", "port": 80, "protocol": "TCP"}, {"name": "udp", "port": 80, "protocol": "UDP"}],
)


@dataclass
class Env(DaemonEnv):
    _variant: str = ""

    def start_kproxy(self) -> KproxyProcess:
        kubeconfig = self.api.write_kubeconfig(self.tmp / "kubeconfig")
        kp = KproxyProcess.start(
            self.node,
            self.tmp / f"kproxy-{len(self.kproxies) + 1}.log",
            f"--kubeconfig={kubeconfig}",
            "--hostname-override=node-1",
            "--cluster-cidr=10.0.0.0/8,fd00:10::/32",
            f"--iptables-sync-period={SYNC_PERIOD:g}s",
            "--iptables-min-sync-period=100ms",
            "--v=2",
        )
        self.kproxies.append(kp)
        return kp

    def iptables(self, *args: str) -> str:
        return self.lab.run(self.node, [f"iptables-{self.variant()}", *args]).stdout

    def variant(self) -> str:
        """The iptables backend kproxy chose in node-1 (found once, where its chains are)."""
        if not self._variant:
            for variant in ("nft", "legacy"):
                done = self.lab.run(self.node, [f"iptables-{variant}-save", "-t", "nat"], check=False)
                if "KPROXY-SERVICES" in done.stdout:
                    self._variant = variant
                    break
            else:
                raise AssertionError("no KPROXY chains in either iptables backend")
        return self._variant

    def metric(self, name: str, **labels: str) -> float | None:
        code, body = self.get(10249, "/metrics")
        assert code == 200
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return None


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("e2e")
    with Lab(prefix=f"kt{os.getpid()}e", nodes=1, pods_per_node=2, clients=1) as lab:
        servers = [EchoServer(pod, PORT, proto="both").start() for pod in lab.all_pods]
        # The API server's listening socket is created inside node-1, where kproxy runs.
        api = call_in(lab.node(1).ns, FakeAPIServer().start)
        # Node-originated traffic to a VIP needs a route before nat OUTPUT rewrites it, as on any
        # real node (which has a default route).
        lab.run(lab.node(1).ns, ["ip", "route", "replace", "default", "via", lab.client(1).ipv4])
        env = Env(lab, api, tmp)
        try:
            api.create("nodes", node(addresses=["192.168.0.2", "fd00:192:168::2"], pod_cidrs=["10.0.1.0/24"]))
            env.start_kproxy()
            yield env
        finally:
            codes = [kp.stop() for kp in env.kproxies]
            api.stop()
            for s in servers:
                s.stop()
            assert all(s.errors == [] for s in servers)
        assert codes[-1] == 0


def answered_by(env: Env, count: int = 10) -> set[str] | None:
    """Which pods answered `count` new TCP connections to the ClusterIP; None if any failed."""
    results = probe_many(env.client, VIP, 80, count=count, timeout=0.5)
    return results.names() if all(r.answered for r in results) else None


def converges_to(env: Env, pods: set[str], why: str) -> None:
    wait_for(lambda: answered_by(env) == pods, timeout=CONVERGE, message=why)


# -- the scenarios, in order ------------------------------------------------------------------


def test_traffic_flows_to_a_new_service(env: Env) -> None:
    env.api.create("services", WEB)
    env.api.create("endpointslices", slice_for("pod-1a", "pod-1b"))
    converges_to(env, BOTH, "ClusterIP served by both pods")
    # Packets flow as soon as the transaction lands; the sync's log line follows a moment later.
    first = wait_for(lambda: env.kproxy.events("sync_complete"), message="the first sync logged")[0]
    assert (first["kind"], first["reason"]) == ("full", "start")


def test_a_removed_endpoint_leaves(env: Env) -> None:
    env.api.update("endpointslices", slice_for("pod-1a"))
    converges_to(env, {"pod-1a"}, "only pod-1a left")
    env.api.update("endpointslices", slice_for("pod-1a", "pod-1b"))
    converges_to(env, BOTH, "pod-1b back")


def test_an_expired_watch_relists_and_stays_converged(env: Env) -> None:
    lists = len(env.api.requests("list", "endpointslices"))
    with env.api.batch():  # no watch sees this change: it is only in the list after the 410
        env.api.update("endpointslices", slice_for("pod-1b"))
        env.api.expire_history()
    converges_to(env, {"pod-1b"}, "the change found by the relist")
    assert len(env.api.requests("list", "endpointslices")) > lists
    env.api.update("endpointslices", slice_for("pod-1a", "pod-1b"))
    converges_to(env, BOTH, "both pods again")


def _rules_in_our_chains(env: Env, table: str) -> int:
    """Rules in kproxy's ruleset chains of `table` as iptables-save prints them (the daemon's
    canary is not the ruleset's, and jumps from built-in chains are not in our chains)."""
    saved = env.lab.run(env.node, [f"iptables-{env.variant()}-save", "-t", table]).stdout
    return sum(1 for line in saved.splitlines() if line.startswith("-A KPROXY-") and "CANARY" not in line)


def test_debug_sync_lists_the_partial_sync_and_metrics_count_the_rules(env: Env) -> None:
    since = time.time()
    env.api.update("endpointslices", slice_for("pod-1a"))
    converges_to(env, {"pod-1a"}, "only pod-1a left")

    def latest() -> dict[str, Any] | None:
        code, body = env.get(10256, "/debug/sync")
        assert code == 200
        syncs: list[dict[str, Any]] = json.loads(body)["syncs"]  # newest first
        # The first sync that took a change after the update. Traffic converges when its
        # transaction lands and its record follows a moment later, so until then the newest
        # record may be the previous test's last sync, which started (tens of milliseconds)
        # before the update: only syncs started since it count (`started` has microseconds),
        # and the oldest of them is the one.
        done = [s for s in syncs if datetime.fromisoformat(s["started"]).timestamp() >= since and s["changed"] >= 1]
        return done[-1] if done else None

    sync = wait_for(latest, timeout=CONVERGE, message="/debug/sync lists the sync of the endpoint change")
    assert sync is not None
    assert (sync["kind"], sync["result"], sync["error"]) == ("partial", "ok", None)
    # pod-1b's endpoint chains (TCP and UDP) deleted, the two Service chains written again.
    assert sync["written"]["deleted"] >= 2 and sync["written"]["written"] >= 2, sync["written"]
    assert sum(sync["phases"].values()) <= sync["durationSeconds"]

    def counted(table: str) -> bool:
        gauge = env.metric("kubeproxy_sync_proxy_rules_iptables_total", table=table, ip_family="IPv4")
        return gauge == _rules_in_our_chains(env, table)

    for table in ("filter", "nat"):
        wait_for(
            partial(counted, table), timeout=CONVERGE, message=f"the {table} rule count gauge matches iptables-save"
        )
    assert (env.metric("kproxy_syncs_total", kind="partial", result="ok") or 0) >= 1
    assert (env.metric("kproxy_sync_proxy_rules_phase_duration_seconds_count", phase="apply") or 0) >= 2
    env.api.update("endpointslices", slice_for("pod-1a", "pod-1b"))
    converges_to(env, BOTH, "both pods again")


def test_health_metrics_and_health_check_node_port(env: Env) -> None:
    env.api.create(
        "services",
        service(
            "lb",
            "default",
            type="LoadBalancer",
            cluster_ip="172.30.0.20",
            node_port=30080,
            lb_ips=["198.51.100.10"],
            etp="Local",
            hc_node_port=HC_PORT,
        ),
    )
    pods = [env.lab.pod("pod-1a"), env.lab.pod("pod-1b")]
    env.api.create(
        "endpointslices",
        endpoint_slice("lb", "default", name="lb-1", port=PORT, endpoints=[endpoint(p.ipv4, p.node) for p in pods]),
    )
    env.api.create("services", service("broken", "default", cluster_ip="172.30.0.30", protocol="HTTP"))

    def hc() -> tuple[int, bytes] | None:
        try:
            answer = env.get(HC_PORT, "/")
        except OSError:
            return None  # not listening yet
        return answer if answer[0] == 200 else None  # 503 until the endpoints are synced too

    answer = wait_for(hc, timeout=CONVERGE, message="health-check node port answering 200")
    assert answer is not None
    body = answer[1]
    assert json.loads(body) == {
        "service": {"namespace": "default", "name": "lb"},
        "localEndpoints": 2,
        "serviceProxyHealthy": True,
    }

    code, body = env.get(10256, "/healthz")
    doc = json.loads(body)
    assert code == 200
    assert doc["healthy"] is True and doc["nodeEligible"] is True
    assert set(doc["status"]) == {"IPv4", "IPv6"}
    code, body = env.get(10256, "/livez")
    assert code == 200 and "nodeEligible" not in json.loads(body)

    # The health-check server learns the endpoints just before the sync's metrics are recorded.
    wait_for(
        lambda: (env.metric("kubeproxy_network_programming_duration_seconds_count") or 0) >= 1,
        message="network programming latency recorded",
    )
    assert (env.metric("kubeproxy_sync_proxy_rules_duration_seconds_count") or 0) >= 3
    assert (env.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds") or 0) > time.time() - 60
    assert env.metric("kubeproxy_proxy_healthz_total", code="200") == 1
    assert env.metric("kproxy_invalid_objects_total", kind="Service") == 1
    assert env.get(10249, "/proxyMode") == (200, b"iptables")
    invalid = wait_for(lambda: env.kproxy.events("object_invalid"), message="the invalid Service logged")
    assert invalid[0]["object"] == "Service default/broken"


@pytest.mark.parametrize("how", [("-F",), ("-F", "-X")], ids=["flushed", "flushed-and-deleted"])
def test_rules_removed_by_hand_come_back_within_a_sync_period(env: Env, how: tuple[str, ...]) -> None:
    assert "-N KPROXY-PROXY-CANARY" in env.iptables("-t", "mangle", "-S")
    fulls = len([e for e in env.kproxy.events("sync_complete") if e["kind"] == "full"])
    started = time.monotonic()
    for flag in how:  # the whole nat table, as a firewall reload does
        env.iptables("-t", "nat", flag)
    assert "-j KPROXY" not in env.iptables("-t", "nat", "-S")
    converges_to(env, BOTH, "rules restored")
    assert time.monotonic() - started < SYNC_PERIOD + 3.0
    assert "-N KPROXY-PROXY-CANARY" in env.iptables("-t", "nat", "-S")
    # Packets flow as soon as the transaction lands; the sync's log line follows a moment later.
    repairs = wait_for(
        lambda: [e for e in env.kproxy.events("sync_complete") if e["kind"] == "full"][fulls:],
        timeout=5.0,
        message="the repairing full sync logged",
    )
    assert repairs and repairs[0]["reason"] in ("canary", "tampered")


def _our_chains(env: Env, table: str) -> list[str]:
    """Our chains of `table` that hold rules (flushing an empty one changes nothing)."""
    rules = env.iptables("-t", table, "-S").splitlines()
    return sorted(
        {r.split()[1] for r in rules if r.startswith("-A KPROXY-") and not r.startswith("-A KPROXY-PROXY-CANARY")}
    )


def _repaired(env: Env, since: int, name: str) -> bool:
    return any(
        any(found.startswith(name) for found in e.get("repaired", ()))
        for e in env.kproxy.events("rules_tampered")[since:]
    )


def test_each_chain_flushed_or_edited_by_hand_is_repaired_within_a_sync_period(env: Env) -> None:
    before = {t: env.iptables("-t", t, "-S") for t in ("nat", "filter")}
    cases: list[tuple[str, tuple[str, ...]]] = [
        (f"{t}/{c}", ("-t", t, "-F", c)) for t in ("nat", "filter") for c in _our_chains(env, t)
    ]
    svc = next(c for c in _our_chains(env, "nat") if c.startswith("KPROXY-SVC-"))
    cases.append((f"nat/{svc}", ("-t", "nat", "-D", svc, "1")))  # one rule deleted
    cases.append(("nat/KPROXY-SERVICES", ("-t", "nat", "-I", "KPROXY-SERVICES", "1", "-d", VIP, "-j", "RETURN")))
    assert len(cases) > 10
    counted = env.metric("kproxy_rules_tampered_total", kind="chain") or 0
    slowest = 0.0
    with ProbeStream(env.node, VIP, 80) as stream:
        for name, change in cases:
            seen = len(env.kproxy.events("rules_tampered"))
            started = time.monotonic()
            env.iptables(*change)
            wait_for(lambda s=seen, n=name: _repaired(env, s, n), timeout=SYNC_PERIOD + 5, message=f"{name} repaired")
            slowest = max(slowest, time.monotonic() - started)
            assert {t: env.iptables("-t", t, "-S") for t in before} == before, name
        # The connection in flight now may have met the last change before its repair.
        in_flight = len(stream.results) + 1
        wait_for(lambda: len(stream.results) >= in_flight, timeout=CONVERGE, message="the stream going on")
        # While a chain was broken, new connections went out untranslated; their conntrack entries
        # (unreplied, kept 120 s) send a later connection from a reused source port the same way.
        # They are this test's doing, not the proxy's: remove them, as a node's operator would.
        env.lab.run(env.node, ["conntrack", "-D", "-d", VIP, "--status", "UNREPLIED"], check=False)
        recovered = len(stream.results) + 1  # the one in flight during the removal may have met one
        wait_for(lambda: len(stream.results) >= recovered + 20, timeout=CONVERGE, message="stream after the repairs")
    after = [str(r) for r in stream.results[recovered:] if not r.answered]
    assert after == [], f"{len(after)} connections lost after the repairs: {after[:3]}"
    assert slowest < SYNC_PERIOD + 1.5  # one sync period, plus the sync itself
    assert (env.metric("kproxy_rules_tampered_total", kind="chain") or 0) >= counted + len(cases)
    converges_to(env, BOTH, "both pods after the repairs")


def test_a_restart_under_a_stream_of_connections_loses_none(env: Env) -> None:
    udp = Sender(env.client, VIP, 80)  # one UDP flow, established before the restart
    before = udp.send()
    with ProbeStream(env.client, VIP, 80) as stream:
        results = stream.results
        wait_for(lambda: len(results) >= 20, timeout=CONVERGE, message="stream running")
        old = env.kproxy
        assert old.stop() == 0
        assert old.events("kproxy_stopped")
        rules = env.iptables("-t", "nat", "-S")
        assert "KPROXY-SERVICES" in rules  # SIGTERM left the rules in place
        during = len(results)
        new = env.start_kproxy()
        wait_for(lambda: new.events("sync_complete"), timeout=CONVERGE, message="restarted kproxy synced")
        synced_at = len(results)
        wait_for(lambda: len(results) >= synced_at + 20, timeout=CONVERGE, message="stream after the restart")
    first = new.events("sync_complete")[0]
    assert (first["kind"], first["reason"]) == ("full", "start")
    failed = stream.failed()
    assert failed == [], f"{len(failed)} of {len(results)} connections lost: {failed[:3]}"
    assert len(results) > during > 20
    after = udp.send()
    udp.close()
    assert before.answered and after.answered and after.name == before.name  # the flow kept its endpoint


def test_traffic_keeps_flowing_while_the_api_server_is_down(env: Env) -> None:
    rules = (env.iptables("-t", "nat", "-S"), env.iptables("-t", "filter", "-S"))
    env.api.stop()
    try:
        syncs = len(env.kproxy.events("sync_complete"))
        # Two periodic syncs pass without the API server: they must leave the rules alone.
        wait_for(
            lambda: len(env.kproxy.events("sync_complete")) >= syncs + 2,
            timeout=3 * SYNC_PERIOD + 5,
            message="periodic syncs while the API server is down",
        )
        assert answered_by(env, count=20) == BOTH
        assert (env.iptables("-t", "nat", "-S"), env.iptables("-t", "filter", "-S")) == rules
        assert json.loads(env.get(10256, "/healthz")[1])["healthy"] is True
    finally:
        call_in(env.node, env.api.start)  # the same port, objects and history
    env.api.update("endpointslices", slice_for("pod-1a"))
    converges_to(env, {"pod-1a"}, "a change after the API server came back")


def tcp_counters(env: Env) -> dict[str, int]:
    """Kernel TCP counters that tell a SYN lost to a pod's TIME_WAIT from one a rule lost."""
    wanted = ("TcpExtTCPSynRetrans", "TcpExtPAWSTimewait", "TcpOutRsts")
    totals: dict[str, int] = {}
    for ns in [env.node, env.client, *(p.ns for p in env.lab.all_pods)]:
        out = env.lab.run(ns, ["nstat", "-asz", *wanted]).stdout
        for line in out.splitlines():
            if line.startswith("#"):
                continue
            name, value = line.split()[:2]
            totals[f"{ns.rsplit('-', 1)[-1]}:{name}"] = int(value)
    return totals


OUTAGES = 20
# The documented bound (docs/architecture.md): the reflectors retry within 5 s of the API server
# answering again (backoff capped at 4 s, +25 % jitter), and the change is then one sync away.
RECOVERY = 8.0


def test_repeated_api_outages_lose_no_connection(env: Env) -> None:
    worst = 0.0
    counters = tcp_counters(env)
    stale = env.lab.run(env.node, ["conntrack", "-L", "-d", VIP, "--status", "UNREPLIED"], check=False).stdout
    with ProbeStream(env.node, VIP, 80) as from_node, ProbeStream(env.client, VIP, 80) as from_client:
        for i in range(OUTAGES):
            syncs = len(env.kproxy.events("sync_complete"))
            env.api.stop()
            try:
                # A periodic sync while the API server is gone; every third outage outlasts the
                # reflectors' backoff cap, so their retries reach it.
                wait_for(
                    lambda syncs=syncs: len(env.kproxy.events("sync_complete")) > syncs,
                    timeout=3 * SYNC_PERIOD + 5,
                    message=f"a sync during outage {i + 1}",
                )
                if i % 3 == 2:
                    time.sleep(6.0)  # the outage's length itself, not a wait for a condition
            finally:
                call_in(env.node, env.api.start)
            back = time.monotonic()
            want = BOTH if i % 2 else {"pod-1b"}
            env.api.update("endpointslices", slice_for(*sorted(want)))
            converges_to(env, want, f"a change after outage {i + 1}")
            worst = max(worst, time.monotonic() - back)
    after = tcp_counters(env)
    grown = {k: v - counters.get(k, 0) for k, v in after.items() if v != counters.get(k, 0)}
    for stream in (from_node, from_client):
        failed = [repr(r) for r in stream.results if not r.answered]
        assert failed == [], (
            f"{len(failed)} of {len(stream.results)} connections lost: {failed[:3]}; {grown}; "
            f"{stale.count(chr(10))} unreplied conntrack entries to the VIP at the start"
        )
        assert len(stream.results) > 10 * OUTAGES
    assert worst < RECOVERY, f"a change after an outage took {worst:.1f} s to reach the data plane"
    env.api.update("endpointslices", slice_for("pod-1a", "pod-1b"))
    converges_to(env, BOTH, "both pods again")
