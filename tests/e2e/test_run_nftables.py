"""`kproxy run --proxy-mode nftables` end to end, and switching to and from the iptables mode.

The lab, the fake API server and the probes are test_run.py's (read its docstring); this module
has its own lab and runs in order: converge, churn, drift, restart, API outage in the nftables
mode, then iptables -> nftables -> iptables under a stream of connections. Every wait polls a
condition with a deadline; nothing sleeps.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from test_run import BOTH, CONVERGE, PORT, SYNC_PERIOD, VIP, WEB, converges_to, slice_for
from test_run import Env as IptablesEnv

from kproxy.lab.namespaces import Lab
from kproxy.testing.builders import node
from kproxy.testing.daemon_process import KproxyProcess
from kproxy.testing.fakeapi import FakeAPIServer
from kproxy.testing.netns import EchoServer, ProbeStream, call_in, wait_for

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None,
        reason="end-to-end tests need root, iproute2 and nft (network namespaces)",
    ),
]


@dataclass
class Env(IptablesEnv):
    mode: str = "nftables"

    def start_kproxy(self) -> KproxyProcess:
        kubeconfig = self.api.write_kubeconfig(self.tmp / "kubeconfig")
        kp = KproxyProcess.start(
            self.node,
            self.tmp / f"kproxy-{len(self.kproxies) + 1}-{self.mode}.log",
            f"--kubeconfig={kubeconfig}",
            f"--proxy-mode={self.mode}",
            "--hostname-override=node-1",
            "--cluster-cidr=10.0.0.0/8,fd00:10::/32",
            f"--sync-period={SYNC_PERIOD:g}s",
            "--min-sync-period=100ms",
            "--v=2",
        )
        self.kproxies.append(kp)
        return kp

    def nft(self, *args: str) -> str:
        return self.lab.run(self.node, ["nft", *args]).stdout

    def kproxy_chains(self) -> str:
        """Every KPROXY- line of both iptables backends, both families."""
        out = []
        for binary in ("iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"):
            if shutil.which(binary):
                done = self.lab.run(self.node, [binary], check=False).stdout
                out += [line for line in done.splitlines() if "KPROXY" in line]
        return "\n".join(out)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("e2e-nft")
    with Lab(prefix=f"kn{os.getpid()}e", nodes=1, pods_per_node=2, clients=1) as lab:
        servers = [EchoServer(pod, PORT, proto="both").start() for pod in lab.all_pods]
        api = call_in(lab.node(1).ns, FakeAPIServer().start)
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


def test_traffic_flows_to_a_new_service(env: Env) -> None:
    env.api.create("services", WEB)
    env.api.create("endpointslices", slice_for("pod-1a", "pod-1b"))
    converges_to(env, BOTH, "ClusterIP served by both pods")
    # The packets may pass before the sync's log line is written.
    wait_for(lambda: env.kproxy.events("sync_complete"), timeout=CONVERGE, message="the first sync logged")
    # Packets flow as soon as the transaction lands; the sync's log line follows a moment later.
    first = wait_for(lambda: env.kproxy.events("sync_complete"), message="the first sync logged")[0]
    assert (first["kind"], first["reason"]) == ("full", "start")
    assert "table ip kproxy" in env.nft("list", "tables")
    assert env.kproxy_chains() == ""  # no canary nor any chain in iptables


def test_endpoint_churn_writes_partial_syncs(env: Env) -> None:
    syncs = len(env.kproxy.events("sync_complete"))
    env.api.update("endpointslices", slice_for("pod-1a"))
    converges_to(env, {"pod-1a"}, "only pod-1a left")
    env.api.update("endpointslices", slice_for("pod-1a", "pod-1b"))
    converges_to(env, BOTH, "pod-1b back")
    later = env.kproxy.events("sync_complete")[syncs:]
    assert later and all(e["kind"] == "partial" for e in later if e["changed"]), later


@pytest.mark.parametrize(
    ("how", "found"),
    [
        (("delete", "table", "ip", "kproxy"), "table ip kproxy deleted"),
        (("flush", "table", "ip", "kproxy"), "table ip kproxy flushed"),
        (("flush", "map", "ip", "kproxy", "backends-tcp"), "map backends-tcp: 0 elements"),
    ],
    ids=["table-deleted", "table-flushed", "map-flushed"],
)
def test_a_table_changed_by_hand_is_repaired_within_a_sync_period(env: Env, how: tuple[str, ...], found: str) -> None:
    since = len(env.kproxy.events("rules_tampered"))
    env.nft(*how)
    wait_for(
        lambda: len(env.kproxy.events("rules_tampered")) > since,
        timeout=SYNC_PERIOD + 5,
        message=f"drift seen after nft {' '.join(how)}",
    )
    tampered = env.kproxy.events("rules_tampered")[since]
    assert any(r.startswith(found) for r in tampered["repaired"]), tampered
    converges_to(env, BOTH, "both pods after the repair")
    kind = "map" if "map" in how else "table"
    assert (env.metric("kproxy_rules_tampered_total", kind=kind) or 0) >= 1


def test_a_restart_under_a_stream_of_connections_loses_none(env: Env) -> None:
    with ProbeStream(env.client, VIP, 80) as stream:
        results = stream.results
        wait_for(lambda: len(results) >= 20, timeout=CONVERGE, message="stream running")
        assert env.kproxy.stop() == 0
        assert "table ip kproxy" in env.nft("list", "tables")  # SIGTERM left the table in place
        new = env.start_kproxy()
        wait_for(lambda: new.events("sync_complete"), timeout=CONVERGE, message="restarted kproxy synced")
        synced_at = len(results)
        wait_for(lambda: len(results) >= synced_at + 20, timeout=CONVERGE, message="stream after the restart")
    failed = stream.failed()
    assert failed == [], f"{len(failed)} of {len(results)} connections lost: {failed[:3]}"


def test_traffic_keeps_flowing_while_the_api_server_is_down(env: Env) -> None:
    table = env.nft("list", "table", "ip", "kproxy")
    env.api.stop()
    try:
        syncs = len(env.kproxy.events("sync_complete"))
        wait_for(
            lambda: len(env.kproxy.events("sync_complete")) >= syncs + 2,
            timeout=3 * SYNC_PERIOD + 5,
            message="periodic syncs while the API server is down",
        )
        with ProbeStream(env.client, VIP, 80) as stream:
            wait_for(lambda: len(stream.results) >= 20, timeout=CONVERGE, message="stream during the outage")
        assert stream.failed() == []
        assert env.nft("list", "table", "ip", "kproxy") == table
    finally:
        call_in(env.node, env.api.start)
    env.api.update("endpointslices", slice_for("pod-1a"))
    converges_to(env, {"pod-1a"}, "a change after the API server came back")
    env.api.update("endpointslices", slice_for("pod-1a", "pod-1b"))
    converges_to(env, BOTH, "both pods again")


def _switch(env: Env, mode: str) -> KproxyProcess:
    """Stop the running mode, start `mode`, under a stream of connections that must all answer."""
    with ProbeStream(env.client, VIP, 80) as stream:
        results = stream.results
        wait_for(lambda: len(results) >= 20, timeout=CONVERGE, message="stream running")
        assert env.kproxy.stop() == 0
        env.mode = mode
        new = env.start_kproxy()
        wait_for(lambda: new.events("other_mode_cleaned_up"), timeout=CONVERGE, message=f"{mode} took over")
        cleaned_at = len(results)
        wait_for(lambda: len(results) >= cleaned_at + 20, timeout=CONVERGE, message="stream after the switch")
    failed = stream.failed()
    assert failed == [], f"{len(failed)} of {len(results)} connections lost switching to {mode}: {failed[:3]}"
    return new


def test_switch_to_iptables_removes_the_tables(env: Env) -> None:
    new = _switch(env, "iptables")
    assert "kproxy" not in env.nft("list", "tables")
    assert "KPROXY-SERVICES" in env.kproxy_chains()
    assert any("nftables" in e["removed"] for e in new.events("other_mode_cleaned_up"))
    converges_to(env, BOTH, "the iptables mode serves both pods")


def test_switch_back_to_nftables_removes_every_chain(env: Env) -> None:
    new = _switch(env, "nftables")
    assert env.kproxy_chains() == ""
    assert "table ip kproxy" in env.nft("list", "tables")
    assert any("KPROXY- chains" in e["removed"] for e in new.events("other_mode_cleaned_up"))
    converges_to(env, BOTH, "the nftables mode serves both pods")


def test_and_to_iptables_again(env: Env) -> None:
    _switch(env, "iptables")
    assert "kproxy" not in env.nft("list", "tables")
    converges_to(env, BOTH, "the iptables mode serves both pods")
