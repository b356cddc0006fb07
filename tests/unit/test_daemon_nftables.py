"""The daemon in the nftables mode, over the fake nft (test_daemon.py's world and fixtures).

What a user sees: the table converged, a partial sync that writes only the changed Service's
objects, drift found and put back within one sync period (``rules_tampered`` and its metric),
a refused transaction retried in full, and no iptables canary in a mode that writes no iptables.
"""

from __future__ import annotations

import copy

import pytest
from structlog.testing import capture_logs
from test_daemon import SYNC_PERIOD, World, sample, sync_lines, world

from kproxy.model import IPFamily
from kproxy.proxier.nftables import names as nn
from kproxy.proxier.nftables.trace import Tracer
from kproxy.testing.builders import endpoint, endpoint_slice, service

__all__ = ["world"]  # the fixture, used by name

NFT = "proxy-mode=nftables"
CIP = "172.30.0.41"  # the builders' default ClusterIP
CLIENT = "10.0.9.9"


def answered_by(world: World, family: IPFamily = IPFamily.V4) -> set[str]:
    """The endpoints a new connection from a pod to the Service's ClusterIP may reach."""
    table = world.nft.table(family).view()
    return Tracer(table, ("127.0.0.1", "192.168.0.2")).trace(CLIENT, CIP, 80).endpoints


def test_converges_then_writes_only_the_changed_services_objects(world: World) -> None:
    world.api.create("services", service(name="other", cluster_ip="172.30.0.42"))
    world.api.create(
        "endpointslices", endpoint_slice(name="other-abc", service="other", endpoints=[endpoint("10.0.1.20", "node-1")])
    )
    with capture_logs() as logs:
        daemon = world.start(NFT)
        world.settle(daemon, 1)
        assert answered_by(world) == {"10.0.1.10:80"}
        world.api.update(
            "endpointslices",
            endpoint_slice(endpoints=[endpoint("10.0.1.10", "node-1"), endpoint("10.0.1.11", "node-1")]),
        )
        world.settle(daemon, 2)
    first, second = sync_lines(logs)
    assert (first["kind"], first["reason"], first["services"]) == ("full", "start", 2)
    assert (second["kind"], second["changed"], second["endpoints"]) == ("partial", 1, 3)
    assert answered_by(world) == {"10.0.1.10:80", "10.0.1.11:80"}
    script = world.nft.scripts[-1]
    # svc1 went from one endpoint to two: its elements move to the two-endpoint set and chain.
    assert "delete table" not in script and "172.30.0.41 . 80" in script and "172.30.0.42" not in script
    assert "add chain ip kproxy lb-2" in script, script
    # No iptables canary (nor any chain) in a mode that writes no iptables.
    assert world.ipt.transactions == []


@pytest.mark.parametrize(
    ("change", "name", "kind", "found"),
    [
        ("delete table", "", "table", "table ip kproxy deleted"),
        ("flush table", "", "table", "table ip kproxy flushed"),
        ("flush chain", nn.SERVICES, "chain", f"chain {nn.SERVICES}: 0 rules"),
        ("flush map", nn.backends("tcp"), "map", f"map {nn.backends('tcp')}: 0 elements"),
    ],
)
def test_drift_is_repaired_within_one_sync_period(world: World, change: str, name: str, kind: str, found: str) -> None:
    daemon = world.start(NFT)
    world.settle(daemon, 1)
    wanted = copy.deepcopy(world.nft.table(IPFamily.V4).view())
    if change == "delete table":
        world.nft.delete_table("ip")
    else:
        world.nft.tamper(IPFamily.V4, change, name)
    with capture_logs() as logs:
        world.clock.advance(SYNC_PERIOD)  # nothing changed in the API: the verifying sync
        world.settle(daemon, 2)
    assert world.nft.table(IPFamily.V4).view() == wanted
    [tampered] = [e for e in logs if e["event"] == "rules_tampered"]
    assert any(r.startswith(found) for r in tampered["repaired"]), tampered["repaired"]
    assert sample(daemon, "kproxy_rules_tampered_total", kind=kind) >= 1
    [line] = sync_lines(logs)
    assert line["kind"] == "full"


def test_an_untouched_table_costs_no_read_back(world: World) -> None:
    daemon = world.start(NFT)
    world.settle(daemon, 1)
    for n in (2, 3):
        world.clock.advance(SYNC_PERIOD)
        world.settle(daemon, n)
    assert world.nft.probes == 0  # the ruleset generation alone said nothing moved
    assert len(world.nft.scripts) == 1


def test_a_refused_transaction_is_retried_as_a_full_sync(world: World) -> None:
    daemon = world.start(NFT)
    world.settle(daemon, 1)
    world.nft.fail_next = "injected"
    with capture_logs() as logs:
        world.api.update("endpointslices", endpoint_slice(endpoints=[endpoint("10.0.1.11", "node-1")]))
        world.settle(daemon, 2)
        assert answered_by(world) == {"10.0.1.10:80"}  # the old table stays
        world.clock.advance(1.0)  # the first retry, after max(min-sync-period, 1 s)
        world.settle(daemon, 3)
    failed, retried = sync_lines(logs)
    assert failed["event"] == "sync_failed" and "injected" in failed["error"]
    assert (retried["kind"], retried["reason"]) == ("full", "retry")
    assert world.nft.scripts[-1].startswith("add table ip kproxy")
    assert answered_by(world) == {"10.0.1.11:80"}


def test_dual_stack_is_one_table_per_family(world: World) -> None:
    world.api.create("services", service(name="ds", cluster_ip=["172.30.0.60", "fd00:172:30::60"]))
    world.api.create(
        "endpointslices",
        endpoint_slice("ds", name="ds-v6", address_type="IPv6", endpoints=[endpoint("fd00:10:1::10", "node-1")]),
    )
    daemon = world.start(NFT, families=(IPFamily.V4, IPFamily.V6))
    world.settle(daemon, 1)
    assert set(world.nft.tables) == {("ip", "kproxy"), ("ip6", "kproxy")}
    v6 = Tracer(world.nft.table(IPFamily.V6).view(), ("::1", "fd00:192:168::2"))
    assert v6.trace("fd00:10:9::9", "fd00:172:30::60", 80).endpoints == {"[fd00:10:1::10]:80"}
