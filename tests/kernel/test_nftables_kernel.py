"""The nftables mode with real packets: `kproxy sync --mode nftables` programs node-1 of a lab.

The same lab, echo servers, address plan and cases as the iptables mode's kernel tests
(test_iptables_kernel.py, whose fixture and helpers this module reuses): which pods answer over
many new connections, the source they saw (masquerading), REJECT (refused at once) versus DROP
(a timeout). Where the nftables mode differs from the iptables mode on purpose (no localhost
NodePorts, unknown ports of a ClusterIP rejected), the test says so.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import test_iptables_kernel as ipt
import yaml

from kproxy.lab.namespaces import Lab
from kproxy.testing.builders import endpoint_slice, node, service
from kproxy.testing.netns import Outcome, probe, probe_many

world = ipt.world  # the lab with echo servers on every pod (a module fixture)
svc, eps, ip, answered_by, sources = ipt.svc, ipt.eps, ipt.ip, ipt.answered_by, ipt.sources
KPROXY, N, PORT, CIP, LB = ipt.KPROXY, ipt.N, ipt.PORT, ipt.CIP, ipt.LB
CFG = ["--cluster-cidr", "10.0.0.0/8,fd00:10::/32"]


def state_file(tmp_path: Path, objects: list[dict[str, Any]]) -> Path:
    state = tmp_path / "state.yaml"
    items = [node(addresses=["192.168.0.2", "fd00:192:168::2"]), *objects]
    state.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
    return state


def sync(lab: Lab, tmp_path: Path, objects: list[dict[str, Any]], *flags: str) -> subprocess.CompletedProcess[str]:
    args = [KPROXY, "sync", "--mode", "nftables", "--node", "node-1", "--state", str(state_file(tmp_path, objects))]
    return lab.run(lab.node(1).ns, [*args, *CFG, *flags])


def test_cluster_ip_from_pod_node_and_outside(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a", "pod-2a"))
    from_pod = probe_many(world.pod("pod-1b"), CIP, 80, count=N)
    assert answered_by(from_pod) == {"pod-1a", "pod-2a"}
    assert sources(from_pod) == {ip("pod-1b")}, "pod traffic to a ClusterIP keeps its source"
    from_outside = probe_many(world.client(1), CIP, 80, count=N, src_ip="203.0.113.10")
    assert answered_by(from_outside) == {"pod-1a", "pod-2a"}
    assert sources(from_outside) <= {"10.0.1.1", "192.168.0.2"}, "off-cluster sources are masqueraded"
    assert answered_by(probe_many(world.node(1), CIP, 80, count=N)) == {"pod-1a", "pod-2a"}
    # Unlike the iptables mode, as upstream's nftables mode: a port no Service serves is refused.
    assert probe(world.pod("pod-1b"), CIP, 81, timeout=1.0).outcome is Outcome.REFUSED


def test_no_endpoints_is_rejected_at_once(world: Lab, tmp_path: Path) -> None:
    objs = [
        service(type="LoadBalancer", port=80, node_port=30080, lb_ips=[LB]),
        endpoint_slice(endpoints=[], port=PORT),
        service(name="dns", protocol="UDP", port=53, cluster_ip="172.30.0.53"),
    ]
    sync(world, tmp_path, objs)
    for ns, dst, port in [
        (world.pod("pod-1b"), CIP, 80),
        (world.client(1), "192.168.0.2", 30080),
        (world.client(1), LB, 80),
    ]:
        r = probe(ns, dst, port, timeout=2.0)
        assert r.outcome is Outcome.REFUSED, r
        assert r.elapsed < 1.0
    assert probe(world.pod("pod-1b"), "172.30.0.53", 53, proto="udp").outcome is Outcome.REFUSED


def test_node_port_on_the_node_ip_but_not_localhost(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a", "pod-2a", type="NodePort", node_port=30080))
    outside = probe_many(world.client(1), "192.168.0.2", 30080, count=N, src_ip="203.0.113.10")
    assert answered_by(outside) == {"pod-1a", "pod-2a"}
    assert "203.0.113.10" not in sources(outside), "eTP Cluster node ports are masqueraded"
    assert answered_by(probe_many(world.pod("pod-1b"), "192.168.0.2", 30080, count=4))
    # No localhost NodePorts in the nftables mode (upstream's choice): nobody listens there.
    assert probe(world.node(1), "127.0.0.1", 30080, timeout=0.5).outcome is Outcome.REFUSED


def test_external_ip(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a", "pod-2a", external_ips=["198.51.100.20"]))
    res = probe_many(world.client(1), "198.51.100.20", 80, count=N, src_ip="203.0.113.10")
    assert answered_by(res) == {"pod-1a", "pod-2a"}
    assert "203.0.113.10" not in sources(res)


def test_etp_local_keeps_client_ip_and_drops_without_local_endpoints(world: Lab, tmp_path: Path) -> None:
    lb = dict(type="LoadBalancer", node_port=30090, lb_ips=[LB], etp="Local", hc_node_port=32000)
    sync(world, tmp_path, svc("pod-1a", "pod-2a", **lb))
    res = probe_many(world.client(1), LB, 80, count=N, src_ip="203.0.113.10")
    assert answered_by(res) == {"pod-1a"} and sources(res) == {"203.0.113.10"}
    res = probe_many(world.client(1), "192.168.0.2", 30090, count=N, src_ip="203.0.113.10")
    assert answered_by(res) == {"pod-1a"} and sources(res) == {"203.0.113.10"}
    assert answered_by(probe_many(world.pod("pod-1b"), LB, 80, count=N)) == {"pod-1a", "pod-2a"}

    sync(world, tmp_path, svc("pod-2a", **lb))
    r = probe(world.client(1), LB, 80, src_ip="203.0.113.10", timeout=0.5)
    assert r.outcome is Outcome.TIMEOUT, f"no local endpoint: DROP, not REJECT ({r})"
    assert answered_by(probe_many(world.pod("pod-1b"), LB, 80, count=4)) == {"pod-2a"}
    assert answered_by(probe_many(world.node(1), LB, 80, count=4)) == {"pod-2a"}


def test_itp_local(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a", "pod-2a", itp="Local"))
    assert answered_by(probe_many(world.pod("pod-1b"), CIP, 80, count=N)) == {"pod-1a"}
    sync(world, tmp_path, svc("pod-2a", itp="Local"))
    assert probe(world.pod("pod-1b"), CIP, 80, timeout=0.5).outcome is Outcome.TIMEOUT


def test_source_ranges(world: Lab, tmp_path: Path) -> None:
    objs = svc("pod-1a", "pod-2a", type="LoadBalancer", node_port=30091, lb_ips=[LB], source_ranges=["203.0.113.0/25"])
    sync(world, tmp_path, objs)
    assert answered_by(probe_many(world.client(1), LB, 80, count=N, src_ip="203.0.113.10")) == {"pod-1a", "pod-2a"}
    assert probe(world.client(1), LB, 80, src_ip="203.0.113.201", timeout=0.5).outcome is Outcome.TIMEOUT
    assert answered_by(probe_many(world.client(1), "192.168.0.2", 30091, count=4, src_ip="203.0.113.201"))


def test_hairpin_is_masqueraded(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a"))
    res = probe_many(world.pod("pod-1a"), CIP, 80, count=4)
    assert answered_by(res) == {"pod-1a"}
    assert sources(res) == {"10.0.1.1"}, "a pod reaching itself sees the node, or the reply would skip the DNAT"


def test_session_affinity(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a", "pod-2a", affinity=600))
    assert len(answered_by(probe_many(world.pod("pod-1b"), CIP, 80, count=N))) == 1
    assert len(answered_by(probe_many(world.client(1), CIP, 80, count=N, src_ip="203.0.113.11"))) == 1


def test_udp_and_masquerade_all(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a", "pod-2a", protocol="UDP"), "--masquerade-all")
    res = probe_many(world.pod("pod-1b"), CIP, 80, proto="udp", count=N)
    assert answered_by(res) == {"pod-1a", "pod-2a"}
    assert sources(res) <= {"10.0.1.1", "192.168.0.2"}, "--masquerade-all masquerades pods too"


def test_detect_local_by_bridge(world: Lab, tmp_path: Path) -> None:
    sync(world, tmp_path, svc("pod-1a"), "--detect-local-mode", "BridgeInterface", "--pod-bridge-interface", "cbr0")
    assert sources(probe_many(world.pod("pod-1b"), CIP, 80, count=4)) == {ip("pod-1b")}
    assert sources(probe_many(world.client(1), CIP, 80, count=4, src_ip="203.0.113.10")) == {"10.0.1.1"}


def test_ipv6(world: Lab, tmp_path: Path) -> None:
    objs = [
        service(type="NodePort", port=80, node_port=30086, cluster_ip=["172.30.0.41", "fd00:172:30::41"]),
        endpoint_slice(endpoints=eps("pod-1a", "pod-2a"), port=PORT),
        endpoint_slice(name="svc1-v6", address_type="IPv6", port=PORT, endpoints=eps("pod-1a", "pod-2a", family=6)),
    ]
    sync(world, tmp_path, objs)
    res6 = probe_many(world.pod("pod-1b"), "fd00:172:30::41", 80, count=N)
    assert answered_by(res6) == {"pod-1a", "pod-2a"} and sources(res6) == {ip("pod-1b", 6)}
    assert answered_by(probe_many(world.client(1), "fd00:192:168::2", 30086, count=N)) == {"pod-1a", "pod-2a"}
    assert answered_by(probe_many(world.pod("pod-1b"), CIP, 80, count=4))


_TWO_SYNCS = textwrap.dedent(
    """
    import sys
    from kproxy.backends.nftables import Nft
    from kproxy.config import ProxyConfig, validate
    from kproxy.model import IPFamily
    from kproxy.proxier.nftables.proxier import NftablesProxier
    from kproxy.sources.files import iter_objects
    from kproxy.state import build_state
    from kproxy.view import family_view, node_context

    cfg = validate(ProxyConfig(node_name="node-1", cluster_cidrs=("10.0.0.0/8",)))
    proxier = NftablesProxier(Nft())
    for path in sys.argv[1:]:
        state, _ = build_state(iter_objects([path]), service_proxy_name="")
        ctx = node_context(cfg, IPFamily.V4, state.nodes.get("node-1"), ("192.168.0.2",))
        result = proxier.sync(family_view(state, IPFamily.V4), ctx)
    print(result.payload, end="")
    """
)


def test_one_endpoint_change_writes_only_that_services_objects(world: Lab, tmp_path: Path) -> None:
    other = [
        service(name="other", cluster_ip="172.30.0.42"),
        endpoint_slice("other", endpoints=eps("pod-2b"), port=PORT),
    ]
    before, after = tmp_path / "a", tmp_path / "b"
    before.mkdir(), after.mkdir()
    state_file(before, [*svc("pod-1a", "pod-2a"), *other])
    state_file(after, [*svc("pod-1a", "pod-2b"), *other])
    res = world.run(
        world.node(1).ns, [sys.executable, "-c", _TWO_SYNCS, str(before / "state.yaml"), str(after / "state.yaml")]
    )
    script = res.stdout
    assert script and "delete table" not in script, script
    # A plain Service port is elements of the shared layout only: its endpoint moves in
    # `backends` under its own key (and its hairpin pair), and nothing else is written.
    own = f"{CIP} . 80 . "
    assert all(own in line or "hairpin-ips" in line for line in script.splitlines()), script
    assert "chain" not in script and "172.30.0.42" not in script
    assert answered_by(probe_many(world.pod("pod-1b"), CIP, 80, count=N)) == {"pod-1a", "pod-2b"}


def test_prefer_same_node_hints_then_one_endpoint_without_a_hint(world: Lab, tmp_path: Path) -> None:
    # As the iptables mode's test: the same categorize decides, the nftables table carries it.
    sync(world, tmp_path, ipt.same_node_svc("pod-1a", "pod-2a", "pod-2b"))
    for who in (world.pod("pod-1b"), world.node(1)):
        assert answered_by(probe_many(who, CIP, 80, count=N)) == {"pod-1a"}, "only this node's endpoint"
    sync(world, tmp_path, ipt.same_node_svc("pod-1a", "pod-2a", "pod-2b", unhinted=("pod-2b",)))
    assert answered_by(probe_many(world.pod("pod-1b"), CIP, 80, count=3 * N)) == {"pod-1a", "pod-2a", "pod-2b"}


@pytest.mark.parametrize(
    ("before", "after", "chains"),
    [
        (
            ("pod-1a", "pod-2a"),
            ("pod-1a", "pod-2a", "pod-2b"),
            ("add chain ip kproxy lb-3", "delete chain ip kproxy lb-2"),
        ),
        (("pod-1a", "pod-2a", "pod-2b"), ("pod-2b",), ("add chain ip kproxy lb-1", "delete chain ip kproxy lb-3")),
    ],
    ids=["2-to-3", "3-to-1"],
)
def test_a_new_endpoint_count_moves_the_service_between_shared_chains(
    world: Lab, tmp_path: Path, before: tuple[str, ...], after: tuple[str, ...], chains: tuple[str, ...]
) -> None:
    """The kernel takes the partial transaction that moves a Service port's key from one
    endpoint count's set to another's, creating and deleting the shared chains on the way."""
    paths = []
    for step, pods in (("a", before), ("b", after)):
        (tmp_path / step).mkdir()
        paths.append(str(state_file(tmp_path / step, svc(*pods))))
    res = world.run(world.node(1).ns, [sys.executable, "-c", _TWO_SYNCS, *paths])
    script = res.stdout
    assert "delete table" not in script and all(c in script for c in chains), script
    assert answered_by(probe_many(world.pod("pod-1b"), CIP, 80, count=N)) == set(after)


def test_a_table_deleted_by_hand_is_back_after_the_next_sync(world: Lab, tmp_path: Path) -> None:
    n1 = world.node(1).ns
    sync(world, tmp_path, svc("pod-1a"))
    world.run(n1, ["nft", "delete", "table", "ip", "kproxy"])
    assert probe(world.pod("pod-1b"), CIP, 80, timeout=0.5).outcome is not Outcome.ANSWERED
    sync(world, tmp_path, svc("pod-1a"))
    assert answered_by(probe_many(world.pod("pod-1b"), CIP, 80, count=4)) == {"pod-1a"}


@pytest.mark.parametrize("in_process", [True, False], ids=["libnftables", "nft -f"])
def test_a_refused_transaction_keeps_the_working_rules(world: Lab, tmp_path: Path, in_process: bool) -> None:
    sync(world, tmp_path, svc("pod-1a"))
    code = (
        "from kproxy.backends.nftables import Nft\n"
        f"Nft(in_process={in_process}).apply("
        "'flush chain ip kproxy services\\nadd rule ip kproxy services jump no-such-chain\\n')\n"
    )
    res = world.run(world.node(1).ns, [sys.executable, "-c", code], check=False)
    assert res.returncode != 0 and "no-such-chain" in res.stderr and "previous ruleset stays" in res.stderr
    assert ">     2: add rule ip kproxy services jump no-such-chain" in res.stderr
    assert answered_by(probe_many(world.pod("pod-1b"), CIP, 80, count=4)) == {"pod-1a"}


def test_cleanup_removes_our_tables_and_nothing_else(world: Lab, tmp_path: Path) -> None:
    n1 = world.node(1).ns
    world.run(n1, ["nft", "add", "table", "ip", "someone-else"])
    try:
        sync(world, tmp_path, svc("pod-1a"))
        world.run(n1, [KPROXY, "cleanup"])
        tables = world.run(n1, ["nft", "list", "tables"]).stdout
        assert "kproxy" not in tables and "someone-else" in tables
    finally:
        world.run(n1, ["nft", "delete", "table", "ip", "someone-else"], check=False)
