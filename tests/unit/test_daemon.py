"""The daemon's sync loop against the fake API server, with an in-memory iptables and a fake clock.

No kernel is touched: iptables is `FakeIptables`, the host is a stub, and time moves only when a
test advances the runner's clock. Waits are on conditions with deadlines (the runner's run count,
the fake API server's state); every daemon and server is stopped by the fixtures.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from kproxy.config import load_run_config
from kproxy.daemon.daemon import Daemon, FamilyPlane
from kproxy.daemon.health import ProxyHealth
from kproxy.errors import BackendError
from kproxy.metrics import ProxyMetrics
from kproxy.model import Flow, IPFamily, Protocol, ServicePortName
from kproxy.proxier import names
from kproxy.proxier.ipvs import render as pv
from kproxy.proxier.ipvs.proxier import IpvsProxier
from kproxy.sources.kube import Backoff, load_client_configuration
from kproxy.testing.builders import endpoint, endpoint_slice, node, service
from kproxy.testing.clock import FakeClock
from kproxy.testing.fakeapi import FakeAPIServer
from kproxy.testing.fakeconntrack import FakeConntrack
from kproxy.testing.fakeiptables import FakeIptables, canary_intact, ensure_canary
from kproxy.testing.fakenft import FakeNft
from kproxy.testing.ipvs_fakes import FakeDummy, FakeIpset, FakeIpvs

DEADLINE = 10.0
SYNC_PERIOD = 30.0
T0 = 1_700_000_000.0


class Wall:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class StubHost:
    def __init__(self) -> None:
        self.sysctls: dict[str, str] = {}
        self.oom: int | None = None

    def local_addresses(self, family: IPFamily) -> tuple[str, ...]:
        return ("127.0.0.1", "192.168.0.2") if family is IPFamily.V4 else ("::1", "fd00:192:168::2")

    def set_sysctl(self, name: str, value: str) -> bool:
        self.sysctls[name] = value
        return True

    def set_oom_score_adj(self, value: int) -> None:
        self.oom = value


@dataclass
class World:
    api: FakeAPIServer
    tmp: Path
    clock: FakeClock = field(default_factory=FakeClock)
    wall: Wall = field(default_factory=Wall)
    host: StubHost = field(default_factory=StubHost)
    ipts: dict[IPFamily, FakeIptables] = field(
        default_factory=lambda: {f: FakeIptables(f) for f in (IPFamily.V4, IPFamily.V6)}
    )
    conntracks: dict[IPFamily, FakeConntrack] = field(
        default_factory=lambda: {f: FakeConntrack() for f in (IPFamily.V4, IPFamily.V6)}
    )
    ipvs: FakeIpvs = field(default_factory=FakeIpvs)
    dummy: FakeDummy = field(default_factory=FakeDummy)
    ipsets: dict[IPFamily, FakeIpset] = field(default_factory=dict)
    nft: FakeNft = field(default_factory=FakeNft)  # one kernel: both families' tables
    daemons: list[tuple[Daemon, threading.Thread, threading.Event]] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)

    @property
    def ipt(self) -> FakeIptables:
        return self.ipts[IPFamily.V4]

    def start(
        self,
        *flags: str,
        families: tuple[IPFamily, ...] = (IPFamily.V4,),
        after_first_sync: Any = None,
        page_size: int = 500,
    ) -> Daemon:
        kubeconfig = self.api.write_kubeconfig(self.tmp / "kubeconfig")
        given: dict[str, Any] = {
            "kubeconfig": str(kubeconfig),
            "hostname-override": "node-1",
            "cluster-cidr": "10.0.0.0/8",
            "healthz-bind-address": "127.0.0.1:0",
            "metrics-bind-address": "127.0.0.1:0",
            "min-sync-period": "0s",
            "sync-period": f"{SYNC_PERIOD}s",
        }
        for flag in flags:
            name, _, value = flag.lstrip("-").partition("=")
            given[name] = value
        cfg = load_run_config(given).config
        planes = {
            f: FamilyPlane(f, self.ipts[f], self.conntracks[f], canary_check=canary_intact, canary_create=ensure_canary)
            for f in families
        }
        if cfg.proxy.mode == "ipvs":
            (family,) = families  # one IPVS table and dummy device: one family here

            self.ipsets[family] = FakeIpset(self.ipts[family])

            def ipvs_proxier(listing: Any) -> IpvsProxier:
                return IpvsProxier(
                    family, cfg.ipvs, ipvs=self.ipvs, ipset=self.ipsets[family], iptables=listing,
                    device=self.dummy, sysctl=self.host.set_sysctl, kernel=(6, 1),
                )  # fmt: skip

            planes = {
                family: FamilyPlane(
                    family, self.ipts[family], self.conntracks[family], canary_intact, ensure_canary, ipvs_proxier
                )
            }
        if cfg.proxy.mode == "nftables":
            from kproxy.proxier.nftables.proxier import NftablesProxier

            planes = {
                f: FamilyPlane(
                    f,
                    self.ipts[f],
                    self.conntracks[f],
                    canary_intact,
                    ensure_canary,
                    lambda _: NftablesProxier(self.nft),
                )
                for f in families
            }
        daemon = Daemon(
            cfg,
            planes,
            load_client_configuration(str(kubeconfig)),
            host=self.host,
            metrics=ProxyMetrics(CollectorRegistry()),
            clock=self.clock,
            wall_clock=self.wall,
            reflector_options=lambda: {"backoff": Backoff(0.01, 0.05), "page_size": page_size},
            after_first_sync=after_first_sync,
        )
        stop = threading.Event()

        def run() -> None:
            self.exit_codes.append(daemon.run(stop, 0.05))

        thread = threading.Thread(target=run, name="daemon")
        thread.start()
        self.daemons.append((daemon, thread, stop))
        return daemon

    def stop(self, daemon: Daemon) -> None:
        for d, thread, stop in self.daemons:
            if d is daemon:
                stop.set()
                thread.join(DEADLINE)
                assert not thread.is_alive(), "daemon did not stop"

    def settle(self, daemon: Daemon, runs: int) -> None:
        """Wait until `runs` syncs have finished and the runner waits again on the clock."""
        assert daemon.runner.wait_runs(runs, DEADLINE), f"only {daemon.runner.runs} syncs, wanted {runs}"
        assert self.clock.wait_parked(1, DEADLINE)
        assert daemon.runner.runs == runs, f"{daemon.runner.runs} syncs, expected exactly {runs}"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    api = FakeAPIServer().start()
    w = World(api, tmp_path)
    api.create("nodes", node(labels={"topology.kubernetes.io/zone": "a"}))
    api.create("services", service())
    api.create("endpointslices", endpoint_slice(endpoints=[endpoint("10.0.1.10", "node-1")]))
    try:
        yield w
    finally:
        for _, thread, stop in w.daemons:
            stop.set()
            thread.join(DEADLINE)
        api.stop()
        assert not any(t.is_alive() for _, t, _ in w.daemons)
        left = [t.name for t in threading.enumerate() if t.name.startswith(("reflector-", "runner:", "http:"))]
        assert left == [], f"threads left behind: {left}"


SPN = ServicePortName("ns1", "svc1", "p80", Protocol.TCP)


def svc_chain() -> str:
    return names.service_chain(SPN)


def sync_lines(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] in ("sync_complete", "sync_failed")]


def sample(daemon: Daemon, name: str, **labels: str) -> float:
    value = daemon.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


# -- start-up ----------------------------------------------------------------------------------


def test_nothing_is_programmed_before_every_resource_is_listed(world: World) -> None:
    world.api.fail_next("endpointslices", n=10_000, status=500)
    daemon = world.start()
    assert world.api.wait_for(lambda: len(world.api.requests("list", "endpointslices")) >= 3, DEADLINE)
    assert world.api.wait_for(lambda: bool(world.api.requests("watch", "nodes")), DEADLINE)
    assert world.ipt.transactions == [] and daemon.runner.runs == 0
    world.api.fail_next("endpointslices", n=0)
    world.settle(daemon, 1)
    assert svc_chain() in world.ipt.chains("nat")


def test_first_sync_is_full_later_ones_partial_one_line_each(world: World) -> None:
    with capture_logs() as logs:
        daemon = world.start()
        world.settle(daemon, 1)
        world.api.update(
            "endpointslices",
            endpoint_slice(endpoints=[endpoint("10.0.1.10", "node-1"), endpoint("10.0.1.11", "node-1")]),
        )
        world.settle(daemon, 2)
    first, second = sync_lines(logs)
    assert (first["kind"], first["reason"], first["services"], first["endpoints"]) == ("full", "start", 1, 1)
    assert (second["kind"], second["changed"], second["endpoints"]) == ("partial", 1, 2)
    assert {"render_ms", "apply_ms"} <= second.keys()
    # The partial sync wrote the Service's chain and the new endpoint's, not the dispatch chain.
    assert second["written"] == 2
    assert f":{names.SERVICES} " not in world.ipt.transactions[-1]
    assert len(world.ipt.rules("nat", svc_chain())) == 3  # the masquerade rule and two endpoints
    assert sample(daemon, "kubeproxy_sync_full_proxy_rules_duration_seconds_count") == 1
    assert sample(daemon, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count") == 1
    assert sample(daemon, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") == T0
    assert world.host.oom == -999
    assert world.host.sysctls["net/netfilter/nf_conntrack_tcp_timeout_established"] == "86400"


def test_a_change_undone_before_the_sync_programs_nothing(world: World) -> None:
    daemon = world.start("min-sync-period=5s")
    world.settle(daemon, 1)
    before = len(world.ipt.transactions)
    world.api.update("services", service(port=81))
    back = world.api.update("services", service())
    assert daemon.reflectors[0].wait_for_resource_version(back["metadata"]["resourceVersion"], DEADLINE)
    assert daemon.trackers.services.pending == 0
    world.clock.advance(5)
    world.settle(daemon, 2)  # the queued run happens, and writes nothing
    assert world.ipt.transactions[before:] == []


# -- keeping the node converged ----------------------------------------------------------------


def test_unreachable_api_server_never_flushes_rules(world: World) -> None:
    daemon = world.start()
    world.settle(daemon, 1)
    tables = copy.deepcopy(world.ipt.tables)
    world.api.stop()
    for n in (2, 3):
        world.clock.advance(SYNC_PERIOD)  # the periodic sync goes on without the API server
        world.settle(daemon, n)
    assert world.ipt.tables == tables
    assert daemon.health.healthy


@pytest.mark.parametrize("deleted", [True, False], ids=["flushed-and-deleted", "flushed-only"])
def test_chains_removed_by_hand_come_back_within_one_sync_period(world: World, deleted: bool) -> None:
    daemon = world.start()
    world.settle(daemon, 1)
    wanted = copy.deepcopy(world.ipt.tables)
    for table in ("filter", "nat", "mangle"):
        if deleted:
            world.ipt.flush_and_delete_all(table)
        else:  # `iptables -F` alone: chains stay, empty; only the canary's rule tells
            for chain in world.ipt.chains(table):
                world.ipt.tables[table][chain] = []
    with capture_logs() as logs:
        world.clock.advance(SYNC_PERIOD)
        world.settle(daemon, 2)
    [line] = sync_lines(logs)
    assert (line["kind"], line["reason"]) == ("full", "canary")
    assert world.ipt.tables == wanted


def test_a_refused_transaction_is_counted_and_retried_as_a_full_sync(world: World) -> None:
    daemon = world.start()
    world.settle(daemon, 1)
    world.ipt.fail_next(1)
    with capture_logs() as logs:
        world.api.update("endpointslices", endpoint_slice(endpoints=[endpoint("10.0.1.11", "node-1")]))
        world.settle(daemon, 2)
        assert sample(daemon, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total") == 1
        assert sample(daemon, "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total") == 1
        world.clock.advance(1.0)  # the first retry, after max(min-sync-period, 1 s)
        world.settle(daemon, 3)
    failed, retried = sync_lines(logs)
    assert failed["event"] == "sync_failed" and "injected" in failed["error"]
    assert (retried["kind"], retried["reason"]) == ("full", "retry")
    assert world.ipt.rules("nat", svc_chain())[-1].endswith(names.endpoint_chain(SPN, "10.0.1.11:80"))


def test_failing_syncs_turn_health_503_after_twice_the_sync_period(world: World) -> None:
    daemon = world.start()
    world.settle(daemon, 1)
    health: ProxyHealth = daemon.health
    world.ipt.fail_next(1000)
    world.api.update("endpointslices", endpoint_slice(endpoints=[]))
    world.settle(daemon, 2)
    world.wall.t += 2 * SYNC_PERIOD - 1
    assert health.livez().status == 200
    world.wall.t += 1
    assert health.livez().status == 503
    world.ipt.fail_next(0)
    world.clock.advance(SYNC_PERIOD)
    world.settle(daemon, 3)
    assert health.livez().status == 200


def test_topology_label_change_forces_a_full_sync(world: World) -> None:
    daemon = world.start()
    world.settle(daemon, 1)
    with capture_logs() as logs:
        world.api.update("nodes", node(labels={"topology.kubernetes.io/zone": "b"}))
        world.settle(daemon, 2)
        world.api.update("nodes", node(labels={"topology.kubernetes.io/zone": "b", "team": "x"}))
        world.settle(daemon, 3)
    first, second = sync_lines(logs)
    assert (first["kind"], first["reason"]) == ("full", "topology")
    assert second["kind"] == "partial"


def test_node_being_deleted_fails_healthz_only(world: World) -> None:
    daemon = world.start()
    world.settle(daemon, 1)
    doomed = node(labels={"topology.kubernetes.io/zone": "a"})
    doomed["spec"]["taints"] = [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]
    world.api.update("nodes", doomed)
    world.settle(daemon, 2)
    assert daemon.health.healthz().status == 503
    assert daemon.health.livez().status == 200


def test_stop_leaves_every_rule_in_place(world: World) -> None:
    daemon = world.start()
    world.settle(daemon, 1)
    tables = copy.deepcopy(world.ipt.tables)
    count = len(world.ipt.transactions)
    world.stop(daemon)
    assert world.ipt.tables == tables and len(world.ipt.transactions) == count


def test_a_restarted_daemon_adopts_the_rules_it_finds(world: World) -> None:
    first = world.start()
    world.settle(first, 1)
    tables = copy.deepcopy(world.ipt.tables)
    world.stop(first)
    world.clock = FakeClock()
    second = world.start()
    world.settle(second, 1)
    # The full sync rewrote every chain in one transaction, declaring (not deleting) them, and
    # added no second copy of the jumps from the built-in chains.
    assert world.ipt.tables == tables
    assert "-X " not in world.ipt.transactions[-1] and "-I " not in world.ipt.transactions[-1]


def test_the_other_modes_leftovers_go_once_after_the_first_sync(world: World) -> None:
    calls: list[bool] = []

    def leave() -> str:
        calls.append(svc_chain() in world.ipt.chains("nat"))  # only once our rules are in place
        raise BackendError("ipset destroy refused")

    with capture_logs() as logs:
        daemon = world.start(after_first_sync=leave)
        world.settle(daemon, 1)
        world.api.update("endpointslices", endpoint_slice(endpoints=[endpoint("10.0.1.11", "node-1")]))
        world.settle(daemon, 2)
    assert calls == [True]
    assert [e["error"] for e in logs if e["event"] == "other_mode_cleanup_failed"] == ["ipset destroy refused"]
    assert [e["kind"] for e in sync_lines(logs)] == ["full", "partial"]  # a failure there fails no sync


DNS_IP = "172.30.0.53"


def dns_slice(*ips: str) -> dict[str, Any]:
    return endpoint_slice(
        "dns", endpoints=[endpoint(ip, "node-1") for ip in ips], protocol="UDP", port=53, port_name="p53"
    )


def udp_flow(client: str, reply: str) -> Flow:
    return Flow(Protocol.UDP, client, DNS_IP, 40000, 53, reply, 53)


@pytest.mark.parametrize("mode", ["iptables", "ipvs"])
def test_stale_udp_flows_are_looked_for_after_the_first_sync_and_udp_changes_only(world: World, mode: str) -> None:
    world.api.create("services", service("dns", cluster_ip=DNS_IP, protocol="UDP", port=53))
    world.api.create("endpointslices", dns_slice("10.0.1.20"))
    ct = world.conntracks[IPFamily.V4]
    gone, live = udp_flow("10.0.1.30", "10.0.2.99"), udp_flow("10.0.1.31", "10.0.1.20")
    ct.flows = [gone, live]
    daemon = world.start(*(["proxy-mode=ipvs"] if mode == "ipvs" else []))
    world.settle(daemon, 1)
    assert ct.lists == 1 and ct.deleted == [gone], "the first sync is full: it cleans up"
    world.api.update("endpointslices", endpoint_slice(endpoints=[endpoint("10.0.1.11", "node-1")]))
    world.settle(daemon, 2)
    world.api.create("services", service("web", cluster_ip="172.30.0.44"))
    world.settle(daemon, 3)
    world.clock.advance(SYNC_PERIOD)  # periodic: verifying, and in the IPVS mode a full read-back
    world.settle(daemon, 4)
    assert ct.lists == 1, "no UDP Service port changed"
    world.api.update("endpointslices", dns_slice("10.0.1.21"))
    world.settle(daemon, 5)
    assert ct.lists == 2 and ct.deleted == [gone, live]


def test_a_failed_conntrack_cleanup_is_retried_after_the_next_sync(world: World) -> None:
    world.api.create("services", service("dns", cluster_ip=DNS_IP, protocol="UDP", port=53))
    world.api.create("endpointslices", dns_slice("10.0.1.20"))
    ct = world.conntracks[IPFamily.V4]
    daemon = world.start()
    world.settle(daemon, 1)
    stale = udp_flow("10.0.1.30", "10.0.1.20")
    ct.flows = [stale]
    ct.fail_next()
    with capture_logs() as logs:
        world.api.update("endpointslices", dns_slice("10.0.1.21"))
        world.settle(daemon, 2)
        assert ct.flows == [stale]
        world.clock.advance(SYNC_PERIOD)
        world.settle(daemon, 3)
    assert ct.lists == 3 and ct.deleted == [stale]
    assert [e["event"] for e in logs if e["event"].startswith("conntrack_")] == [
        "conntrack_cleanup_failed",
        "conntrack_cleaned",
    ]
    assert [e["kind"] for e in sync_lines(logs)] == ["partial", "partial"]  # a failure there fails no sync


# -- what a sync reports -----------------------------------------------------------------------


def test_network_programming_latency_from_the_trigger_time(world: World) -> None:
    daemon = world.start()
    world.settle(daemon, 1)
    world.wall.t = T0 + 100
    changed = endpoint_slice(endpoints=[endpoint("10.0.1.12", "node-1")])
    changed["metadata"]["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": "2023-11-14T22:14:58Z"}
    world.api.update("endpointslices", changed)  # triggered at T0 + 98, programmed at T0 + 100
    world.settle(daemon, 2)
    assert sample(daemon, "kubeproxy_network_programming_duration_seconds_count") == 1
    assert sample(daemon, "kubeproxy_network_programming_duration_seconds_sum") == pytest.approx(2.0)


def test_invalid_object_is_skipped_and_the_rest_programmed(world: World) -> None:
    world.api.create("services", service(name="bad", cluster_ip="172.30.0.42", protocol="HTTP"))
    with capture_logs() as logs:
        daemon = world.start()
        world.settle(daemon, 1)
    assert sample(daemon, "kproxy_invalid_objects_total", kind="Service") == 1
    assert svc_chain() in world.ipt.chains("nat")
    assert any(e["event"] == "object_invalid" and e["object"] == "Service ns1/bad" for e in logs)


def test_lists_come_in_pages_and_an_invalid_object_on_one_is_skipped_alone(world: World) -> None:
    ips = {f"svc{i}": f"172.30.0.{50 + i}" for i in range(2, 7)}
    for name, ip in ips.items():
        bad = name == "svc4"
        world.api.create("services", service(name=name, cluster_ip=ip, protocol="HTTP" if bad else "TCP"))
        world.api.create("endpointslices", endpoint_slice(name, endpoints=[endpoint(f"10.0.2.{ip[-2:]}", "node-1")]))
    with capture_logs() as logs:
        daemon = world.start(page_size=2)
        world.settle(daemon, 1)
    # Six Services and six slices: three pages of each, converted as they came.
    for resource in ("services", "endpointslices"):
        limits = [r.query.get("limit") for r in world.api.requests("list", resource)]
        assert limits == ["2", "2", "2"], resource
    assert sample(daemon, "kproxy_invalid_objects_total", kind="Service") == 1
    invalid = [e for e in logs if e["event"] == "object_invalid"]
    assert [(e["object"], e["field"]) for e in invalid] == [("Service ns1/svc4", "spec.ports[0].protocol")]
    nat = world.ipt.chains("nat")
    for name in ("svc1", "svc2", "svc3", "svc5", "svc6"):
        assert names.service_chain(ServicePortName("ns1", name, "p80", Protocol.TCP)) in nat, name
    assert names.service_chain(ServicePortName("ns1", "svc4", "p80", Protocol.TCP)) not in nat


def test_a_service_deleted_while_the_history_expired_goes_after_the_relist(world: World) -> None:
    world.api.create("services", service(name="svc2", cluster_ip="172.30.0.52"))
    world.api.create("endpointslices", endpoint_slice("svc2", endpoints=[endpoint("10.0.1.52", "node-1")]))
    daemon = world.start(page_size=1)
    world.settle(daemon, 1)
    gone = names.service_chain(ServicePortName("ns1", "svc2", "p80", Protocol.TCP))
    assert gone in world.ipt.chains("nat")
    with world.api.batch():  # no watch sees the delete: only the relist's end can tell
        world.api.delete("services", "svc2", namespace="ns1")
        world.api.expire_history()
    world.settle(daemon, 2)
    assert gone not in world.ipt.chains("nat")
    assert svc_chain() in world.ipt.chains("nat")


def test_health_check_node_port_of_an_etp_local_load_balancer(world: World) -> None:
    import http.client
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world.api.create(
        "services",
        service(
            name="lb",
            cluster_ip="172.30.0.50",
            type="LoadBalancer",
            etp="Local",
            hc_node_port=port,
            node_port=30080,
            lb_ips=["198.51.100.10"],
        ),
    )
    world.api.create(
        "endpointslices",
        endpoint_slice("lb", endpoints=[endpoint("10.0.1.10", "node-1"), endpoint("10.0.2.10", "node-2")]),
    )
    daemon = world.start("nodeport-addresses=127.0.0.0/8")
    world.settle(daemon, 1)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read()) == {
            "service": {"namespace": "ns1", "name": "lb"},
            "localEndpoints": 1,
            "serviceProxyHealthy": True,
        }
    finally:
        conn.close()
    assert daemon.hc_servers.ports() == {("ns1", "lb"): port}


def test_dual_stack_is_one_proxier_per_family(world: World) -> None:
    world.api.create("services", service(name="ds", cluster_ip=["172.30.0.60", "fd00:172:30::60"]))
    world.api.create("endpointslices", endpoint_slice("ds", name="ds-v4", endpoints=[endpoint("10.0.1.10", "node-1")]))
    world.api.create(
        "endpointslices",
        endpoint_slice("ds", name="ds-v6", address_type="IPv6", endpoints=[endpoint("fd00:10:1::10", "node-1")]),
    )
    daemon = world.start(families=(IPFamily.V4, IPFamily.V6))
    world.settle(daemon, 1)
    ds = ServicePortName("ns1", "ds", "p80", Protocol.TCP)
    v4_rules = " ".join(world.ipt.rules("nat", names.endpoint_chain(ds, "10.0.1.10:80")))
    v6_rules = " ".join(world.ipts[IPFamily.V6].rules("nat", names.endpoint_chain(ds, "[fd00:10:1::10]:80")))
    assert "--to-destination 10.0.1.10:80" in v4_rules
    assert "--to-destination [fd00:10:1::10]:80" in v6_rules
    assert svc_chain() not in world.ipts[IPFamily.V6].chains("nat")  # the IPv4-only Service


def test_a_failure_in_one_family_loses_no_change_in_the_other(world: World) -> None:
    world.api.create("services", service(name="ds", cluster_ip=["172.30.0.60", "fd00:172:30::60"]))
    daemon = world.start(families=(IPFamily.V4, IPFamily.V6))
    world.settle(daemon, 1)
    world.ipts[IPFamily.V4].fail_next(1)  # IPv4 syncs first: its failure ends this sync early
    world.api.update("services", service(name="ds", cluster_ip=["172.30.0.60", "fd00:172:30::60"], port=81))
    world.settle(daemon, 2)  # refused
    world.clock.advance(1.0)
    world.settle(daemon, 3)  # the full retry
    rejects = world.ipts[IPFamily.V6].rules("filter", names.SERVICES)  # no endpoints for port 81
    assert any("--dport 81" in r for r in rejects)


def test_a_change_meeting_chains_deleted_by_hand_fails_and_the_full_retry_restores_them(world: World) -> None:
    daemon = world.start()
    world.settle(daemon, 1)
    world.api.update("endpointslices", endpoint_slice(endpoints=[endpoint("10.0.1.11", "node-1")]))
    world.settle(daemon, 2)  # partial; nothing is read back until the next verifying sync
    wanted = copy.deepcopy(world.ipt.tables)
    for table in ("filter", "nat"):
        world.ipt.flush_and_delete_all(table)
    with capture_logs() as logs:
        world.api.update("endpointslices", endpoint_slice(endpoints=[endpoint("10.0.1.12", "node-1")]))
        world.settle(daemon, 3)  # refused: the new chains jump to chains that are gone
        world.clock.advance(1.0)
        world.settle(daemon, 4)
    failed, full = sync_lines(logs)
    assert (failed["event"], failed["kind"]) == ("sync_failed", "partial")
    assert (full["kind"], full["reason"]) == ("full", "retry")
    sep = names.endpoint_chain(SPN, "10.0.1.12:80")
    assert world.ipt.rules("nat", svc_chain())[-1].endswith(sep)
    assert set(world.ipt.chains("nat")) == set(wanted["nat"]) - {names.endpoint_chain(SPN, "10.0.1.11:80")} | {sep}


def test_a_deleted_canary_seen_by_a_verifying_sync_brings_a_full_sync_at_once(world: World) -> None:
    daemon = world.start()
    world.settle(daemon, 1)
    wanted = copy.deepcopy(world.ipt.tables)
    world.clock.advance(SYNC_PERIOD / 2)
    world.settle(daemon, 1)
    del world.ipt.tables["nat"]["KPROXY-PROXY-CANARY"]  # `iptables -t nat -X KPROXY-PROXY-CANARY`
    with capture_logs() as logs:
        world.clock.advance(SYNC_PERIOD / 2)  # the verifying sync is due, and the canary check
        world.settle(daemon, 2)
    [line] = sync_lines(logs)
    assert (line["kind"], line["reason"]) == ("full", "canary")
    assert world.ipt.tables == wanted


def _tamper(world: World, how: str) -> list[str]:
    """Change our rules as someone else would; the chains touched, as `rules_tampered` names them."""
    rules = world.ipt.tables["nat"]
    if how == "flush-dispatch":  # `iptables -t nat -F KPROXY-SERVICES`
        rules[names.SERVICES] = []
        return [f"nat/{names.SERVICES}"]
    if how == "flush-every-chain":  # `iptables -t nat -F` and `-t filter -F`: jumps gone too
        for table in ("nat", "filter"):
            for chain in world.ipt.tables[table]:
                world.ipt.tables[table][chain] = []
        return [f"nat/{names.SERVICES}", f"nat/{svc_chain()}", "nat/PREROUTING jump to KPROXY-SERVICES"]
    if how == "delete-one-rule":  # `iptables -t nat -D KPROXY-SVC-... 1`
        del rules[svc_chain()][0]
        return [f"nat/{svc_chain()}"]
    # `iptables -t nat -I KPROXY-SERVICES 1 ...`: a foreign rule in our dispatch chain
    rules[names.SERVICES].insert(0, "-d 172.30.0.41/32 -p tcp --dport 80 -j RETURN")
    return [f"nat/{names.SERVICES}"]


@pytest.mark.parametrize("how", ["flush-dispatch", "flush-every-chain", "delete-one-rule", "foreign-rule"])
def test_drift_is_repaired_by_the_next_periodic_sync_without_an_api_change(world: World, how: str) -> None:
    daemon = world.start()
    world.settle(daemon, 1)
    wanted = copy.deepcopy(world.ipt.tables)
    touched = _tamper(world, how)
    transactions = len(world.ipt.transactions)
    with capture_logs() as logs:
        world.clock.advance(SYNC_PERIOD)  # nothing changed in the API: the periodic sync
        world.settle(daemon, 2)
    assert world.ipt.tables == wanted
    [tampered] = [e for e in logs if e["event"] == "rules_tampered"]
    for name in touched:
        assert any(found.startswith(name) for found in tampered["repaired"]), (name, tampered["repaired"])
    assert sample(daemon, "kproxy_rules_tampered_total", kind="chain") >= 1
    # One transaction repaired it: only the drifted chains (and missing jumps) were written.
    assert len(world.ipt.transactions) == transactions + 1 + (how == "flush-every-chain")  # + the canary's


def test_changes_in_between_do_not_push_the_drift_check_past_a_sync_period(world: World) -> None:
    daemon = world.start()
    world.settle(daemon, 1)
    world.ipt.tables["nat"][names.SERVICES] = []  # `iptables -t nat -F KPROXY-SERVICES`
    world.clock.advance(SYNC_PERIOD / 2)
    world.api.update("endpointslices", endpoint_slice(endpoints=[endpoint("10.0.1.11", "node-1")]))
    world.settle(daemon, 2)  # partial, not verifying: the flush is still there
    assert world.ipt.rules("nat", names.SERVICES) == []
    with capture_logs() as logs:
        world.clock.advance(SYNC_PERIOD / 2)  # a period after the last verifying sync, not after the last sync
        world.settle(daemon, 3)
    assert world.ipt.rules("nat", names.SERVICES)
    assert any(e["event"] == "rules_tampered" for e in logs)


def test_a_sync_with_nothing_to_write_writes_nothing(world: World) -> None:
    daemon = world.start()
    world.settle(daemon, 1)
    transactions = len(world.ipt.transactions)
    with capture_logs() as logs:
        for n in (2, 3, 4):
            world.clock.advance(SYNC_PERIOD)
            world.settle(daemon, n)
    assert len(world.ipt.transactions) == transactions
    assert [line["written"] for line in sync_lines(logs)] == [0, 0, 0]
    assert not any(e["event"] == "rules_tampered" for e in logs)


def test_an_edited_config_file_ends_the_daemon_for_a_restart(world: World) -> None:
    config = world.tmp / "config.conf"
    config.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n")
    daemon = world.start(f"config={config}")
    world.settle(daemon, 1)
    tables = copy.deepcopy(world.ipt.tables)
    config.write_text(config.read_text() + "clusterCIDR: 10.244.0.0/16\n")
    _, thread, _ = world.daemons[-1]
    thread.join(DEADLINE)
    assert world.exit_codes == [1]
    assert world.ipt.tables == tables  # the rules stay for the restarted daemon to adopt


# -- the IPVS mode -----------------------------------------------------------------------------

VS = (Protocol.TCP, "172.30.0.41", 80)


def test_ipvs_mode_programs_ipvs_and_reads_everything_back_once_per_sync_period(world: World) -> None:
    with capture_logs() as logs:
        daemon = world.start("proxy-mode=ipvs")
        world.settle(daemon, 1)
    [first] = sync_lines(logs)
    assert (first["kind"], first["reason"], first["ipvs_writes"]) == ("full", "start", 2)
    assert world.ipvs.real_servers(VS) == {("10.0.1.10", 80): 1}
    assert world.dummy.addrs == {"172.30.0.41"}
    assert world.host.sysctls["net/ipv4/vs/conntrack"] == "1"
    assert any(r.endswith(f"-j {pv.PROXY_FIREWALL}") for r in world.ipt.rules("mangle", "PREROUTING"))
    world.ipvs.delete_dest(*VS, "10.0.1.10", 80)  # by hand: only a full read sees it
    with capture_logs() as logs:
        world.clock.advance(SYNC_PERIOD)
        world.settle(daemon, 2)
    [periodic] = sync_lines(logs)
    assert (periodic["kind"], periodic["reason"], periodic["ipvs_writes"]) == ("full", "periodic", 1)
    assert world.ipvs.real_servers(VS) == {("10.0.1.10", 80): 1}
    [tampered] = [e for e in logs if e["event"] == "rules_tampered"]
    assert tampered["repaired"] == ["10.0.1.10:80 of TCP 172.30.0.41:80 deleted"]
    assert sample(daemon, "kproxy_rules_tampered_total", kind="real_server") == 1


def test_ipvs_mode_periodic_sync_repairs_only_what_drifted(world: World) -> None:
    daemon = world.start("proxy-mode=ipvs")
    world.settle(daemon, 1)
    wanted, sets = copy.deepcopy(world.ipt.tables), dict(world.ipsets[IPFamily.V4].sets)
    world.ipt.tables["nat"][names.SERVICES] = []  # `iptables -t nat -F KPROXY-SERVICES`
    vips = next(n for n, s in sets.items() if pv.SET_CLUSTER_IP in n and s.entries)
    world.ipsets[IPFamily.V4].sets[vips] = sets[vips]._replace(entries=frozenset())  # `ipset flush`
    transactions = len(world.ipt.transactions)
    with capture_logs() as logs:
        world.clock.advance(SYNC_PERIOD)
        world.settle(daemon, 2)
    assert world.ipt.tables == wanted and world.ipsets[IPFamily.V4].sets == sets
    [tampered] = [e for e in logs if e["event"] == "rules_tampered"]
    assert tampered["repaired"] == [
        f"{vips}: 1 entries missing, 0 foreign",
        f"nat/{names.SERVICES} flushed: 0 rules, {len(wanted['nat'][names.SERVICES])} written",
    ]
    # The periodic full read rewrote the one flushed chain, not the whole ruleset.
    assert len(world.ipt.transactions) == transactions + 1
    assert world.ipt.transactions[-1].count(" - [0:0]") == 1


def test_ipvs_mode_drains_a_removed_endpoint_then_deletes_it(world: World) -> None:
    two = [endpoint("10.0.1.10", "node-1"), endpoint("10.0.1.11", "node-1")]
    world.api.update("endpointslices", endpoint_slice(endpoints=two))
    daemon = world.start("proxy-mode=ipvs")
    world.settle(daemon, 1)
    world.ipvs.set_connections(VS, ("10.0.1.11", 80), active=1)
    world.api.update("endpointslices", endpoint_slice(endpoints=two[:1]))
    world.settle(daemon, 2)
    assert world.ipvs.real_servers(VS) == {("10.0.1.10", 80): 1, ("10.0.1.11", 80): 0}  # weight 0: draining
    world.ipvs.set_connections(VS, ("10.0.1.11", 80), active=0)
    with capture_logs() as logs:
        world.clock.advance(SYNC_PERIOD)  # no timer of its own: the periodic sync deletes it
        world.settle(daemon, 3)
    assert world.ipvs.real_servers(VS) == {("10.0.1.10", 80): 1}
    assert sync_lines(logs)[0]["draining"] == 0


def test_ipvs_mode_repairs_flushed_rules_within_one_sync_period(world: World) -> None:
    daemon = world.start("proxy-mode=ipvs")
    world.settle(daemon, 1)
    wanted = copy.deepcopy(world.ipt.tables)
    for table in ("filter", "nat", "mangle"):
        world.ipt.flush_and_delete_all(table)
    with capture_logs() as logs:
        world.clock.advance(SYNC_PERIOD)
        world.settle(daemon, 2)
    [line] = sync_lines(logs)
    assert (line["kind"], line["reason"]) == ("full", "canary")
    assert world.ipt.tables == wanted
