"""What an operator reads of the daemon's syncs: ``/debug/sync`` and the per-mode metrics.

The ring and its JSON first, pure; then the daemon over test_daemon.py's world (fake API server,
fake kernel), where the gauges must say what the fake kernel holds, in each mode.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
from test_daemon import DEADLINE, DNS_IP, SYNC_PERIOD, T0, World, dns_slice, sample, udp_flow, world

from kproxy.daemon.daemon import Daemon
from kproxy.daemon.debug import Phases, SyncLog, SyncRecord
from kproxy.model import IPFamily
from kproxy.testing.builders import endpoint, endpoint_slice, service

__all__ = ["world"]  # the fixture, used by name


def record(n: int, **overrides: Any) -> SyncRecord:
    fields: dict[str, Any] = {
        "kind": "partial",
        "reason": None,
        "started": T0 + n,
        "duration": 0.004,
        "changed": 1,
        "phases": Phases(0.001, 0.002, 0.001),
        "service_ports": 3,
        "endpoints": 5,
        "written": {"written": 2, "deleted": 0},
    }
    fields.update(overrides)
    return SyncRecord(**fields)


# -- the ring ----------------------------------------------------------------------------------


def test_the_ring_keeps_the_last_syncs_newest_first() -> None:
    ring = SyncLog(size=20)
    for n in range(25):
        ring.add(record(n))
    started = [r.started for r in ring.records()]
    assert started == [T0 + n for n in range(24, 4, -1)]


def test_an_empty_ring_answers_an_empty_list() -> None:
    response = SyncLog().response()
    assert (response.status, response.content_type) == (200, "application/json")
    assert json.loads(response.body) == {"syncs": []}


def test_json_of_a_partial_sync_and_of_a_failed_full_one() -> None:
    ring = SyncLog()
    ring.add(record(0))
    ring.add(record(1, kind="full", reason="retry", phases=None, written={}, error="iptables-restore: exit 1"))
    failed, ok = json.loads(ring.response().body)["syncs"]
    assert ok == {
        "kind": "partial",
        "reason": None,
        "started": "2023-11-14T22:13:20Z",
        "durationSeconds": 0.004,
        "phases": {"render": 0.001, "plan": 0.002, "apply": 0.001},
        "servicePorts": 3,
        "endpoints": 5,
        "changed": 1,
        "written": {"deleted": 0, "written": 2},
        "result": "ok",
        "error": None,
    }
    assert (failed["kind"], failed["reason"], failed["result"]) == ("full", "retry", "failed")
    assert failed["phases"] is None and failed["error"] == "iptables-restore: exit 1"


# -- the daemon --------------------------------------------------------------------------------


def debug_sync(daemon: Daemon) -> list[dict[str, Any]]:
    """GET /debug/sync from the daemon's healthz server, as an operator would."""
    port = daemon._servers[0].port  # the healthz server is started first
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/sync", timeout=DEADLINE) as answer:
        syncs: list[dict[str, Any]] = json.load(answer)["syncs"]
        return syncs


def add_endpoint(world: World) -> None:
    world.api.update(
        "endpointslices", endpoint_slice(endpoints=[endpoint("10.0.1.10", "node-1"), endpoint("10.0.1.11", "node-1")])
    )


def test_iptables_mode_lists_the_partial_sync_and_counts_the_rules_it_holds(world: World) -> None:
    daemon = world.start()
    world.settle(daemon, 1)
    add_endpoint(world)
    world.settle(daemon, 2)
    partial, first = debug_sync(daemon)
    assert (first["kind"], first["reason"], first["result"]) == ("full", "start", "ok")
    assert (partial["kind"], partial["reason"], partial["changed"], partial["endpoints"]) == ("partial", None, 1, 2)
    assert partial["written"]["written"] == 2  # the Service's chain and the new endpoint's
    assert set(partial["phases"]) == {"render", "plan", "apply"}
    assert sum(partial["phases"].values()) <= partial["durationSeconds"]
    for table in ("filter", "nat"):
        held = sum(len(world.ipt.rules(table, c)) for c in world.ipt.chains(table) if c.startswith("KPROXY-"))
        held -= len(world.ipt.rules(table, "KPROXY-PROXY-CANARY"))  # the daemon's, not the ruleset's
        assert sample(daemon, "kubeproxy_sync_proxy_rules_iptables_total", table=table, ip_family="IPv4") == held
    # The partial sync wrote two nat chains: the Service's (masquerade, two endpoints) and the
    # new endpoint's (masquerade, DNAT).
    assert sample(daemon, "kubeproxy_sync_proxy_rules_iptables_last", table="nat", ip_family="IPv4") == 5
    assert sample(daemon, "kproxy_syncs_total", kind="partial", result="ok") == 1
    assert sample(daemon, "kproxy_sync_proxy_rules_phase_duration_seconds_count", phase="plan") == 2


def test_a_failed_sync_is_listed_with_its_error(world: World) -> None:
    daemon = world.start()
    world.settle(daemon, 1)
    world.ipt.fail_next(1)
    add_endpoint(world)
    world.settle(daemon, 2)
    failed = debug_sync(daemon)[0]
    assert (failed["kind"], failed["result"], failed["phases"]) == ("partial", "failed", None)
    assert "injected" in failed["error"]
    assert sample(daemon, "kproxy_syncs_total", kind="partial", result="failed") == 1
    world.clock.advance(1.0)  # the retry
    world.settle(daemon, 3)
    retry = debug_sync(daemon)[0]
    assert (retry["kind"], retry["reason"], retry["result"]) == ("full", "retry", "ok")


def test_nftables_mode_counts_what_its_table_holds(world: World) -> None:
    daemon = world.start("proxy-mode=nftables", families=(IPFamily.V4, IPFamily.V6))
    world.settle(daemon, 1)
    add_endpoint(world)
    world.settle(daemon, 2)
    world.api.update("endpointslices", endpoint_slice(endpoints=[endpoint("10.0.1.12", "node-1")]))
    world.settle(daemon, 3)
    for family in (IPFamily.V4, IPFamily.V6):
        table = world.nft.table(family)
        want = {
            "chain": len(table.chains),
            "rule": sum(len(rules) for rules in table.chains.values()),
            "element": sum(len(elements) for elements in table.elements.values()),
        }
        got = {k: sample(daemon, "kproxy_sync_proxy_rules_objects", kind=k, ip_family=family.label) for k in want}
        assert got == want, family
    # No iptables rules counted in a mode that writes none; no iptables restore failures either.
    assert (
        daemon.metrics.registry.get_sample_value(
            "kubeproxy_sync_proxy_rules_iptables_total", {"table": "nat", "ip_family": "IPv4"}
        )
        is None
    )
    world.nft.fail_next = "injected"
    world.api.update("endpointslices", endpoint_slice(endpoints=[endpoint("10.0.1.13", "node-1")]))
    world.settle(daemon, 4)
    assert sample(daemon, "kubeproxy_sync_proxy_rules_nftables_sync_failures_total") == 1
    assert sample(daemon, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total") == 0
    assert [s["result"] for s in debug_sync(daemon)] == ["failed", "ok", "ok", "ok"]


def test_ipvs_mode_counts_virtual_and_real_servers(world: World) -> None:
    daemon = world.start("proxy-mode=ipvs")
    world.settle(daemon, 1)
    add_endpoint(world)
    world.settle(daemon, 2)
    services = world.ipvs.services(IPFamily.V4)
    real = sum(len(world.ipvs.dests(s.protocol, s.ip, s.port)) for s in services)
    assert sample(daemon, "kproxy_sync_proxy_rules_objects", kind="virtual_server", ip_family="IPv4") == len(services)
    assert sample(daemon, "kproxy_sync_proxy_rules_objects", kind="real_server", ip_family="IPv4") == real == 2
    assert debug_sync(daemon)[0]["written"]["ipvs_writes"] == 1  # one real server added


@pytest.mark.parametrize("deleted", [0, 1])
def test_the_conntrack_cleanup_is_timed_and_counted_per_family(world: World, deleted: int) -> None:
    world.api.create("services", service("dns", cluster_ip=DNS_IP, protocol="UDP", port=53))
    world.api.create("endpointslices", dns_slice("10.0.1.20"))
    ct = world.conntracks[IPFamily.V4]
    ct.flows = [udp_flow("10.0.1.30", "10.0.2.99" if deleted else "10.0.1.20")]
    daemon = world.start()
    world.settle(daemon, 1)
    assert sample(daemon, "kubeproxy_conntrack_reconciler_sync_duration_seconds_count", ip_family="IPv4") == 1
    assert sample(daemon, "kubeproxy_conntrack_reconciler_deleted_entries_total", ip_family="IPv4") == deleted
    world.clock.advance(SYNC_PERIOD)  # a sync with no UDP change does not clean again
    world.settle(daemon, 2)
    assert sample(daemon, "kubeproxy_conntrack_reconciler_sync_duration_seconds_count", ip_family="IPv4") == 1


# -- /debug/services ---------------------------------------------------------------------------


def debug_services(daemon: Daemon) -> dict[str, Any]:
    port = daemon._servers[0].port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/services", timeout=DEADLINE) as answer:
        table: dict[str, Any] = json.load(answer)
        return table


@pytest.mark.parametrize("mode", ["iptables", "nftables", "ipvs"])
def test_debug_services_shows_what_the_last_successful_sync_programmed(world: World, mode: str) -> None:
    daemon = world.start(f"proxy-mode={mode}")
    world.settle(daemon, 1)
    table = debug_services(daemon)
    assert (table["mode"], table["source"], table["node"]) == (mode, "daemon", "node-1")
    assert table["lastSync"] is not None
    (port,) = [p for p in table["servicePorts"] if p["family"] == 4]
    assert [e["ip"] for e in port["endpoints"]] == ["10.0.1.10"]
    assert port["kernelObjects"]
    add_endpoint(world)
    world.settle(daemon, 2)
    (port,) = [p for p in debug_services(daemon)["servicePorts"] if p["family"] == 4]
    assert [(e["ip"], e["usedFor"]) for e in port["endpoints"]] == [
        ("10.0.1.10", ["cluster"]),
        ("10.0.1.11", ["cluster"]),
    ]
    # A sync that fails is not shown as programmed; its retry is.
    if mode == "iptables":
        world.ipt.fail_next(1)
    elif mode == "nftables":
        world.nft.fail_next = "injected"
    else:
        return
    world.api.update("endpointslices", endpoint_slice(endpoints=[endpoint("10.0.1.12", "node-1")]))
    world.settle(daemon, 3)
    (port,) = [p for p in debug_services(daemon)["servicePorts"] if p["family"] == 4]
    assert [e["ip"] for e in port["endpoints"]] == ["10.0.1.10", "10.0.1.11"]
    world.clock.advance(1.0)
    world.settle(daemon, 4)
    (port,) = [p for p in debug_services(daemon)["servicePorts"] if p["family"] == 4]
    assert [e["ip"] for e in port["endpoints"]] == ["10.0.1.12"]
