"""`kproxy status` against a running `kproxy run`, in the iptables and nftables modes: what it
says the node does is what packets do, and `--check` finds an object removed by hand (exit 1,
naming it) until the daemon's next sync puts it back (exit 0).

The lab and probes are test_run.py's (read its docstring); each mode gets its own lab and
daemon. The command runs as an operator would, in node-1's namespace:
``kproxy status --from http://127.0.0.1:10256``. Every wait polls with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from test_run import BOTH, CONVERGE, PORT, SYNC_PERIOD, WEB, converges_to, slice_for
from test_run import Env as IptablesEnv
from test_run_nftables import Env as NftablesEnv

from kproxy.lab.namespaces import Lab
from kproxy.testing.builders import node
from kproxy.testing.daemon_process import KPROXY
from kproxy.testing.fakeapi import FakeAPIServer
from kproxy.testing.netns import EchoServer, call_in, wait_for

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        os.geteuid() != 0
        or shutil.which("ip") is None
        or shutil.which("iptables") is None
        or shutil.which("nft") is None,
        reason="end-to-end tests need root, iproute2, iptables and nft (network namespaces)",
    ),
]

Env = IptablesEnv | NftablesEnv


@pytest.fixture(scope="module", params=["iptables", "nftables"])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    mode: str = request.param
    tmp = tmp_path_factory.mktemp(f"e2e-status-{mode}")
    with Lab(prefix=f"ks{os.getpid() % 10000}{mode[0]}", nodes=1, pods_per_node=2, clients=1) as lab:
        servers = [EchoServer(pod, PORT, proto="both").start() for pod in lab.all_pods]
        api = call_in(lab.node(1).ns, FakeAPIServer().start)
        lab.run(lab.node(1).ns, ["ip", "route", "replace", "default", "via", lab.client(1).ipv4])
        env: Env = NftablesEnv(lab, api, tmp) if mode == "nftables" else IptablesEnv(lab, api, tmp)
        try:
            api.create("nodes", node(addresses=["192.168.0.2", "fd00:192:168::2"], pod_cidrs=["10.0.1.0/24"]))
            api.create("services", WEB)
            api.create("endpointslices", slice_for("pod-1a", "pod-1b"))
            env.start_kproxy()
            converges_to(env, BOTH, "ClusterIP served by both pods")
            yield env
        finally:
            codes = [kp.stop() for kp in env.kproxies]
            api.stop()
            for s in servers:
                s.stop()
        assert codes[-1] == 0


def status(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    argv = ["ip", "netns", "exec", env.node, KPROXY, "status", "--from", "http://127.0.0.1:10256", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def tcp_port(env: Env) -> dict[str, Any]:
    done = status(env, "-o", "json", "--service", "default/web")
    assert done.returncode == 0, done.stderr
    table = json.loads(done.stdout)
    (port,) = [p for p in table["servicePorts"] if p["family"] == 4 and p["protocol"] == "TCP"]
    return port


def pods_used(env: Env) -> set[str]:
    """The pods `kproxy status` says the ClusterIP sends to, by lab name."""
    by_ip = {env.lab.pod(p).ipv4: p for p in ("pod-1a", "pod-1b")}
    return {by_ip[e["ip"]] for e in tcp_port(env)["endpoints"] if "cluster" in e["usedFor"]}


def hinted_slice(*pods: str) -> dict[str, Any]:
    """`slice_for` with PreferSameNode hints: pod-1a for node-1 (here), pod-1b for node-2."""
    out = slice_for(*pods)
    for ep, hint_node in zip(out["endpoints"], ("node-1", "node-2"), strict=False):
        ep["zone"] = "zone-a"
        ep["hints"] = {"forNodes": [{"name": hint_node}], "forZones": [{"name": "zone-a"}]}
    return out


def test_status_names_the_endpoints_packets_reach(env: Env) -> None:
    assert pods_used(env) == BOTH
    port = tcp_port(env)
    assert port["clusterRule"] == "ready" and port["internal"] == "forward"
    assert port["kernelObjects"]
    done = status(env)
    assert done.returncode == 0, done.stderr
    assert "default/web:tcp" in done.stdout and "forward to 2 of 2 endpoints (ready)" in done.stdout
    assert all(len(line) <= 100 for line in done.stdout.splitlines())
    assert json.loads(status(env, "-o", "json").stdout)["lastSync"]


def test_node_hints_are_why_only_this_nodes_pod_answers(env: Env) -> None:
    env.api.update("endpointslices", hinted_slice("pod-1a", "pod-1b"))
    converges_to(env, {"pod-1a"}, "only the pod hinted for node-1")
    wait_for(lambda: pods_used(env) == {"pod-1a"}, timeout=CONVERGE, message="status shows the hinted pod only")
    port = tcp_port(env)
    assert port["clusterRule"] == "node-hints"
    why = {e["ip"]: e["why"] for e in port["endpoints"]}
    assert why == {env.lab.pod("pod-1a").ipv4: "node-hints", env.lab.pod("pod-1b").ipv4: "hinted-for-other-node"}
    # One endpoint without a hint: hints are ignored, both answer, and status says so.
    unhinted = hinted_slice("pod-1a", "pod-1b")
    del unhinted["endpoints"][1]["hints"]
    env.api.update("endpointslices", unhinted)
    converges_to(env, BOTH, "both pods once one lacks its hint")
    wait_for(lambda: pods_used(env) == BOTH, timeout=CONVERGE, message="status shows both pods")
    assert tcp_port(env)["hintsSkipped"] == ["node-hint-missing", "zone-hint-missing"]
    env.api.update("endpointslices", slice_for("pod-1a", "pod-1b"))
    converges_to(env, BOTH, "plain slice again")


def _remove_by_hand(env: Env, port: dict[str, Any]) -> str:
    """Remove one of the port's objects as an operator's mistake would; what --check should name."""
    objects = port["kernelObjects"]
    if isinstance(env, NftablesEnv):
        element = next(o for o in objects if o["kind"] == "element" and o["where"] == "backends-tcp")
        env.nft("delete", "element", "ip", "kproxy", "backends-tcp", "{ " + element["name"] + " }")
        return f"missing: element backends-tcp: {element['name']}"
    chain = next(o for o in objects if o["kind"] == "chain" and o["name"].startswith("KPROXY-SEP-"))
    env.iptables("-t", "nat", "-F", chain["name"])
    return f"chain nat/{chain['name']} holds 0 rules"


def test_check_finds_an_object_removed_by_hand_until_the_next_sync(env: Env) -> None:
    wait_for(lambda: status(env, "--check").returncode == 0, timeout=CONVERGE, message="kernel as expected")
    # The daemon's verifying sync (once per 2 s sync period here) may put the object back before
    # --check has read the kernel: then it logged the repair, and the removal is tried again.
    for _ in range(5):
        repairs = len(env.kproxy.events("rules_tampered"))
        named = _remove_by_hand(env, tcp_port(env))
        done = status(env, "--check")
        if done.returncode == 1:
            break
        wait_for(
            lambda n=repairs: len(env.kproxy.events("rules_tampered")) > n, timeout=CONVERGE, message="repaired already"
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert named in done.stdout, done.stdout
    # The verifying sync finds the drift and writes it again.
    wait_for(
        lambda: status(env, "--check").returncode == 0,
        timeout=SYNC_PERIOD + CONVERGE,
        message="--check passes after the next sync",
    )
    converges_to(env, BOTH, "both pods after the repair")
