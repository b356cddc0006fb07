"""Change trackers and incremental family views: what a sync sees after a stream of events."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from kproxy.metrics import ProxyMetrics
from kproxy.model import IPFamily
from kproxy.state import build_state
from kproxy.testing.builders import endpoint, endpoint_slice, node, service
from kproxy.tracker import ChangeTrackers
from kproxy.view import family_view
from kproxy.views import IncrementalView

SVC = ("ns1", "svc1")
NOW = 1_700_000_000.0


def trackers(metrics: ProxyMetrics | None = None) -> ChangeTrackers:
    return ChangeTrackers("node-1", metrics, wall_clock=lambda: NOW)


def with_trigger(obj: dict[str, Any], ts: str) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"].setdefault("annotations", {})["endpoints.kubernetes.io/last-change-trigger-time"] = ts
    return obj


def sample(metrics: ProxyMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


# -- services ----------------------------------------------------------------------------------


def test_added_service_is_in_the_snapshot_and_changed() -> None:
    t = trackers()
    assert t.services.update(None, service()) is True
    out = t.checkout()
    assert set(out.state.services) == {SVC}
    assert out.changed == {SVC}
    assert t.checkout().changed == frozenset()  # folded: nothing left


def test_change_undone_before_the_sync_disappears() -> None:
    t = trackers()
    t.services.update(None, service())
    t.checkout()
    changed = service(port=8080)
    assert t.services.update(service(), changed) is True
    assert t.services.update(changed, service()) is False  # back to what the last sync saw
    assert t.services.pending == 0
    assert t.checkout().changed == frozenset()


def test_service_added_and_deleted_before_a_sync_leaves_nothing() -> None:
    t = trackers()
    t.services.update(None, service())
    assert t.services.update(service(), None) is False
    out = t.checkout()
    assert out.state.services == {} and out.changed == frozenset()


def test_deleted_service_leaves_the_snapshot() -> None:
    t = trackers()
    t.services.update(None, service())
    t.checkout()
    assert t.services.update(service(), None) is True
    out = t.checkout()
    assert out.state.services == {} and out.changed == {SVC}


def test_headless_service_is_tracked_as_absent() -> None:
    t = trackers()
    assert t.services.update(None, service(cluster_ip="None")) is False
    assert t.checkout().state.services == {}


def test_now_invalid_service_is_dropped_logged_and_counted() -> None:
    m = ProxyMetrics(CollectorRegistry())
    t = trackers(m)
    t.services.update(None, service())
    t.checkout()
    bad = service(protocol="HTTP")
    with capture_logs() as logs:
        assert t.services.update(service(), bad) is True
    out = t.checkout()
    assert out.state.services == {}  # upstream treats a Service it cannot parse as gone
    assert out.changed == {SVC}
    [line] = [e for e in logs if e["event"] == "object_invalid"]
    assert line["object"] == "Service ns1/svc1" and line["field"] == "spec.ports[0].protocol"
    assert sample(m, "kproxy_invalid_objects_total", kind="Service") == 1


def test_service_change_metrics() -> None:
    m = ProxyMetrics(CollectorRegistry())
    t = trackers(m)
    t.services.update(None, service())
    t.services.update(None, service(name="svc2"))
    assert sample(m, "kubeproxy_sync_proxy_rules_service_changes_pending") == 2
    assert sample(m, "kubeproxy_sync_proxy_rules_service_changes_total") == 2
    t.checkout()
    assert sample(m, "kubeproxy_sync_proxy_rules_service_changes_pending") == 0
    assert sample(m, "kubeproxy_sync_proxy_rules_service_changes_total") == 2


# -- endpoint slices ---------------------------------------------------------------------------


def test_slice_change_marks_its_service_changed_and_is_indexed() -> None:
    t = trackers()
    t.services.update(None, service())
    t.checkout()
    assert t.slices.update(None, endpoint_slice()) is True
    out = t.checkout()
    assert out.changed == {SVC}
    assert out.slices_by_service == {SVC: frozenset({("ns1", "svc1-abcde")})}


def test_slice_moving_to_another_service_changes_both() -> None:
    t = trackers()
    t.slices.update(None, endpoint_slice(name="s"))
    t.checkout()
    moved = endpoint_slice(name="s")
    moved["metadata"]["labels"]["kubernetes.io/service-name"] = "svc2"
    t.slices.update(endpoint_slice(name="s"), moved)
    out = t.checkout()
    assert out.changed == {SVC, ("ns1", "svc2")}
    assert out.slices_by_service == {("ns1", "svc2"): frozenset({("ns1", "s")})}


@pytest.mark.parametrize(
    ("name", "protocol", "udp"),
    [("tcp endpoints", "TCP", False), ("udp endpoints", "UDP", True), ("sctp endpoints", "SCTP", False)],
)
def test_udp_flag_follows_the_protocol_of_changed_endpoints(name: str, protocol: str, udp: bool) -> None:
    t = trackers()
    t.checkout()
    t.slices.update(None, endpoint_slice(protocol=protocol))
    assert t.checkout().udp_changed is udp, name


def test_udp_flag_for_a_removed_udp_service() -> None:
    t = trackers()
    t.services.update(None, service(protocol="UDP"))
    t.checkout()
    t.services.update(service(protocol="UDP"), None)
    assert t.checkout().udp_changed is True


def test_trigger_times_reported_once_and_only_after_the_tracker_started() -> None:
    t = trackers()
    t.slices.update(None, with_trigger(endpoint_slice(name="new"), "2023-11-14T22:13:30Z"))  # NOW + 10 s
    t.slices.update(None, with_trigger(endpoint_slice(name="old"), "2023-11-14T22:00:00Z"))  # before start
    out = t.checkout()
    assert out.trigger_times == {("ns1", "new"): (NOW + 10,)}
    assert t.checkout().trigger_times == {}


def test_trigger_time_of_a_cancelled_change_is_dropped() -> None:
    t = trackers()
    t.slices.update(None, endpoint_slice())
    t.checkout()
    changed = with_trigger(endpoint_slice(endpoints=[]), "2023-11-14T22:13:30Z")
    t.slices.update(endpoint_slice(), changed)
    t.slices.update(changed, endpoint_slice())
    assert t.checkout().trigger_times == {}


def test_invalid_slice_drops_its_endpoints() -> None:
    m = ProxyMetrics(CollectorRegistry())
    t = trackers(m)
    t.slices.update(None, endpoint_slice())
    t.checkout()
    bad = endpoint_slice(endpoints=[endpoint("not-an-ip")])
    with capture_logs():
        t.slices.update(endpoint_slice(), bad)
    out = t.checkout()
    assert out.state.slices == {} and out.changed == {SVC}
    assert sample(m, "kproxy_invalid_objects_total", kind="EndpointSlice") == 1


def test_endpoint_change_metrics() -> None:
    m = ProxyMetrics(CollectorRegistry())
    t = trackers(m)
    t.slices.update(None, endpoint_slice())
    assert sample(m, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 1
    t.checkout()
    assert sample(m, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0
    assert sample(m, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 1


# -- the node ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "labels", "node_changed", "topology_changed"),
    [
        ("same labels", {"topology.kubernetes.io/zone": "a"}, False, False),
        ("zone changed", {"topology.kubernetes.io/zone": "b"}, True, True),
        ("region added", {"topology.kubernetes.io/zone": "a", "topology.kubernetes.io/region": "r"}, True, True),
        ("other label", {"topology.kubernetes.io/zone": "a", "team": "x"}, True, False),
    ],
)
def test_node_label_changes(name: str, labels: dict[str, str], node_changed: bool, topology_changed: bool) -> None:
    t = trackers()
    first = node(labels={"topology.kubernetes.io/zone": "a"})
    t.node.update(None, first)
    t.checkout()
    assert t.node.update(first, node(labels=labels)) is node_changed, name
    out = t.checkout()
    assert (out.node_changed, out.topology_changed) == (node_changed, topology_changed), name


def test_other_nodes_are_ignored_and_deletion_is_seen() -> None:
    t = trackers()
    assert t.node.update(None, node(name="node-2")) is False
    assert t.node.update(None, node()) is True
    assert set(t.checkout().state.nodes) == {"node-1"}
    assert t.node.update(node(), None) is True
    assert t.checkout().state.nodes == {}


# -- a stream of events against a fresh build, and the incremental view ------------------------


def _random_world(rng: random.Random) -> dict[tuple[str, str], dict[str, Any]]:
    objs: dict[tuple[str, str], dict[str, Any]] = {}
    for i in range(rng.randint(0, 6)):
        name = f"svc{i}"
        if rng.random() < 0.8:
            objs[("Service", name)] = service(
                name=name,
                cluster_ip=[f"172.30.0.{i + 1}", f"fd00:172:30::{i + 1}"]
                if rng.random() < 0.5
                else f"172.30.0.{i + 1}",
                port=rng.choice([80, 443]),
                protocol=rng.choice(["TCP", "UDP"]),
            )
        for j in range(rng.randint(0, 2)):
            family = rng.choice(["IPv4", "IPv6"])
            ips = [
                f"10.0.{rng.randint(1, 2)}.{rng.randint(10, 20)}"
                if family == "IPv4"
                else f"fd00:10:1::{rng.randint(10, 20)}"
                for _ in range(rng.randint(0, 3))
            ]
            objs[("EndpointSlice", f"{name}-{j}")] = endpoint_slice(
                name,
                name=f"{name}-{j}",
                address_type=family,
                port=rng.choice([8080, 8443]),
                port_name=rng.choice(["p80", "p443"]),
                endpoints=[endpoint(ip, rng.choice(["node-1", "node-2"]), ready=rng.random() < 0.8) for ip in ips],
            )
    return objs


def _feed(t: ChangeTrackers, before: dict[Any, Any], after: dict[Any, Any]) -> None:
    for key in sorted(before.keys() | after.keys()):
        kind = key[0]
        update = t.services.update if kind == "Service" else t.slices.update
        old, new = before.get(key), after.get(key)
        if old != new:
            update(old, new)


@pytest.mark.parametrize("seed", range(40))
def test_snapshot_and_incremental_views_match_a_fresh_build(seed: int) -> None:
    rng = random.Random(seed)
    t = trackers()
    views = {f: IncrementalView(f) for f in IPFamily}
    seen: dict[IPFamily, tuple[dict[Any, Any], dict[Any, Any]]] = {f: ({}, {}) for f in IPFamily}
    world: dict[Any, Any] = {}
    for _ in range(5):
        new_world = _random_world(rng)
        _feed(t, world, new_world)
        world = new_world
        out = t.checkout()
        expected, rejected = build_state(world.values())
        assert not rejected
        assert dict(out.state.services) == dict(expected.services)
        assert dict(out.state.slices) == dict(expected.slices)
        for family, view in views.items():
            got = view.update(out.state, out.changed, out.slices_by_service)
            want = family_view(expected, family)
            assert got.ports == want.ports
            assert got.endpoints == want.endpoints
            # Every Service port that differs from the last view is named as changed (a partial
            # nftables sync looks at no other).
            ports, endpoints = seen[family]
            moved = {
                n
                for n in ports.keys() | got.ports.keys()
                if ports.get(n) != got.ports.get(n) or endpoints.get(n) != got.endpoints.get(n)
            }
            assert got.changed is None or moved <= got.changed
            seen[family] = (dict(got.ports), dict(got.endpoints))
