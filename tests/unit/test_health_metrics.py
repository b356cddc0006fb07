"""/healthz, /livez, the health-check node ports and /metrics, served on loopback, scraped, parsed.

Time is a fake wall clock the tests move; every server a test starts is stopped by a fixture.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from kproxy.daemon.daemon import local_ready_endpoints
from kproxy.daemon.health import ProxyHealth, ServiceHealthServers, go_time, serve_health, service_health_body
from kproxy.httpd import REQUEST_TIMEOUT, HTTPServer
from kproxy.metrics import NETWORK_PROGRAMMING_BUCKETS, SYNC_BUCKETS, ProxyMetrics
from kproxy.metrics import serve as serve_metrics
from kproxy.model import Endpoint, IPFamily, Node, Protocol, ServicePortName
from kproxy.view import FamilyView

V4, V6 = IPFamily.V4, IPFamily.V6
TIMEOUT = 60.0  # 2 x a 30 s sync period


class Wall:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
def metrics() -> ProxyMetrics:
    return ProxyMetrics(CollectorRegistry())


@pytest.fixture
def health(wall: Wall, metrics: ProxyMetrics) -> ProxyHealth:
    return ProxyHealth(TIMEOUT, clock=wall, metrics=metrics)


@pytest.fixture
def servers() -> Iterator[list[HTTPServer]]:
    started: list[HTTPServer] = []
    yield started
    for s in started:
        s.stop()
    left = [t.name for t in threading.enumerate() if t.name.startswith("http:")]
    assert left == [], f"threads left behind: {left}"


def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sample(metrics: ProxyMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels or None)


# -- proxy health ------------------------------------------------------------------------------


def test_healthy_while_starting_and_before_any_sync(health: ProxyHealth, wall: Wall) -> None:
    assert health.healthy
    health.queued(V4)
    wall.t += 10 * TIMEOUT
    assert health.healthy  # never synced: not judged, as upstream (a long first sync is fine)


def test_a_queued_change_not_applied_in_time_is_unhealthy(health: ProxyHealth, wall: Wall) -> None:
    health.updated(V4)
    health.updated(V6)
    wall.t += 100
    health.queued(V6)
    wall.t += TIMEOUT - 1
    assert health.healthy
    health.queued(V6)  # a newer change does not restart the clock: the oldest counts
    wall.t += 1
    h = health.health()
    assert not h.healthy
    assert h.status[V4][1] is True and h.status[V6][1] is False
    health.updated(V6)
    assert health.healthy


@pytest.mark.parametrize(
    ("name", "node", "healthz"),
    [
        ("ready node", Node("node-1"), 200),
        ("being deleted", Node("node-1", being_deleted=True), 503),
        ("deleted", None, 503),
    ],
)
def test_healthz_follows_node_eligibility_livez_does_not(
    health: ProxyHealth, name: str, node: Node | None, healthz: int
) -> None:
    health.set_node(node)
    assert health.healthz().status == healthz, name
    assert health.livez().status == 200, name


def test_healthz_and_livez_over_http_with_upstream_json(
    health: ProxyHealth, wall: Wall, metrics: ProxyMetrics, servers: list[HTTPServer]
) -> None:
    server = serve_health(health, "127.0.0.1:0")
    servers.append(server)
    health.updated(V4)
    synced_at = wall.t
    wall.t += 5
    code, headers, body = get(server.port, "/healthz")
    assert code == 200
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert list(doc) == ["lastUpdated", "currentTime", "nodeEligible", "healthy", "status"]
    assert doc["lastUpdated"] == doc["currentTime"] == go_time(wall.t)  # "now" when healthy
    assert doc["nodeEligible"] is True and doc["healthy"] is True
    assert doc["status"] == {"IPv4": {"lastUpdated": go_time(synced_at), "healthy": True}}

    health.queued(V4)
    wall.t += TIMEOUT
    code, _, body = get(server.port, "/livez")
    doc = json.loads(body)
    assert code == 503
    assert "nodeEligible" not in doc
    assert doc["healthy"] is False and doc["lastUpdated"] == go_time(synced_at)
    assert get(server.port, "/other")[0] == 404
    assert sample(metrics, "kubeproxy_proxy_healthz_total", code="200") == 1
    assert sample(metrics, "kubeproxy_proxy_livez_total", code="503") == 1


def test_go_time_format() -> None:
    assert go_time(None) == "0001-01-01T00:00:00Z"
    assert go_time(1_700_000_000.0) == "2023-11-14T22:13:20Z"
    assert go_time(1_700_000_000.25) == "2023-11-14T22:13:20.25Z"


# -- health-check node ports -------------------------------------------------------------------


@pytest.fixture
def hc(health: ProxyHealth) -> Iterator[ServiceHealthServers]:
    servers = ServiceHealthServers(health, "node-1")
    yield servers
    servers.stop()


def test_service_health_check_port(hc: ServiceHealthServers, health: ProxyHealth, wall: Wall) -> None:
    port = free_port()
    key = ("ns1", "lb")
    hc.sync_services({key: port}, ["127.0.0.1"])
    code, headers, body = get(port, "/")
    assert code == 503
    assert json.loads(body) == {
        "service": {"namespace": "ns1", "name": "lb"},
        "localEndpoints": 0,
        "serviceProxyHealthy": True,
    }
    hc.sync_endpoints({key: 2})
    code, headers, body = get(port, "/anything")
    assert code == 200
    assert headers["x-load-balancing-endpoint-weight"] == "2"
    assert body == service_health_body(key, 2, True)
    # upstream's dedented, tab-indented body, byte for byte
    assert body == (
        b'{\n\t"service": {\n\t\t"namespace": "ns1",\n\t\t"name": "lb"\n\t},\n'
        b'\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}'
    )
    health.updated(V4)
    health.queued(V4)
    wall.t += TIMEOUT
    code, _, body = get(port, "/")
    assert code == 503 and json.loads(body)["serviceProxyHealthy"] is False


def test_service_health_servers_follow_the_services(hc: ServiceHealthServers) -> None:
    p1, p2 = free_port(), free_port()
    hc.sync_services({("ns", "a"): p1, ("ns", "b"): p2}, ["127.0.0.1"])
    assert hc.ports() == {("ns", "a"): p1, ("ns", "b"): p2}
    hc.sync_services({("ns", "b"): p2}, ["127.0.0.1"])
    assert hc.ports() == {("ns", "b"): p2}
    with pytest.raises(ConnectionRefusedError):
        get(p1, "/")
    assert get(p2, "/")[0] == 503


def test_a_taken_port_is_logged_and_retried(hc: ServiceHealthServers) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        hc.sync_services({("ns", "a"): port}, ["127.0.0.1"])
        assert hc.ports() == {}
    hc.sync_services({("ns", "a"): port}, ["127.0.0.1"])
    assert hc.ports() == {("ns", "a"): port}


def _ep(ip: str, node: str, ready: bool = True, terminating: bool = False, port: int = 80) -> Endpoint:
    return Endpoint(
        ip=ip, port=port, ready=ready, serving=ready or terminating, terminating=terminating, node_name=node
    )


def test_local_ready_endpoints_count_ips_of_ready_local_endpoints() -> None:
    a, b = ServicePortName("ns", "lb", "http", Protocol.TCP), ServicePortName("ns", "lb", "https", Protocol.TCP)
    other = ServicePortName("ns", "other", "", Protocol.TCP)
    v4 = FamilyView(
        ports={},
        endpoints={
            a: (
                _ep("10.0.1.10", "node-1"),
                _ep("10.0.1.11", "node-1", ready=False, terminating=True),
                _ep("10.0.2.10", "node-2"),
            ),
            b: (_ep("10.0.1.10", "node-1", port=443), _ep("10.0.1.12", "node-1", port=443)),
            other: (_ep("10.0.1.20", "node-1"),),
        },
    )
    v6 = FamilyView(ports={}, endpoints={a: (_ep("fd00:10:1::10", "node-1"),)})
    counts = local_ready_endpoints([v4, v6], {("ns", "lb"): (a, b)}, "node-1")
    # 10.0.1.10 serves two ports: one endpoint; the terminating and the remote one do not count.
    assert counts == {("ns", "lb"): 2}


# -- metrics -----------------------------------------------------------------------------------


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_scraped_over_http_and_parsed(metrics: ProxyMetrics, servers: list[HTTPServer]) -> None:
    server = serve_metrics(metrics, "127.0.0.1:0")
    servers.append(server)
    metrics.sync_duration.observe(0.003)
    metrics.sync_full_duration.observe(0.003)
    metrics.network_programming.observe(1.2)
    metrics.last_timestamp.set(1_700_000_000)
    metrics.restore_failures.inc()
    metrics.no_local_endpoints.labels("external").set(3)
    metrics.invalid_objects.labels("Service").inc()

    code, headers, body = get(server.port, "/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    fams = _families(body.decode())
    types = {name: f.type for name, f in fams.items()}
    assert types == {
        "kubeproxy_sync_proxy_rules_duration_seconds": "histogram",
        "kubeproxy_sync_full_proxy_rules_duration_seconds": "histogram",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds": "histogram",
        "kubeproxy_network_programming_duration_seconds": "histogram",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds": "gauge",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds": "gauge",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending": "gauge",
        "kubeproxy_sync_proxy_rules_endpoint_changes": "counter",
        "kubeproxy_sync_proxy_rules_service_changes_pending": "gauge",
        "kubeproxy_sync_proxy_rules_service_changes": "counter",
        "kubeproxy_sync_proxy_rules_iptables_restore_failures": "counter",
        "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures": "counter",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total": "gauge",
        "kubeproxy_proxy_healthz": "counter",
        "kubeproxy_proxy_livez": "counter",
        "kproxy_invalid_objects": "counter",
        "kproxy_rules_tampered": "counter",
        "kubeproxy_sync_proxy_rules_nftables_sync_failures": "counter",
        "kubeproxy_sync_proxy_rules_iptables_total": "gauge",
        "kubeproxy_sync_proxy_rules_iptables_last": "gauge",
        "kubeproxy_conntrack_reconciler_deleted_entries": "counter",
        "kubeproxy_conntrack_reconciler_sync_duration_seconds": "histogram",
        "kproxy_sync_proxy_rules_objects": "gauge",
        "kproxy_sync_proxy_rules_phase_duration_seconds": "histogram",
        "kproxy_syncs": "counter",
    }
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert not any(name.endswith("_created") for name, _ in samples)  # as upstream: no _created series
    les = [
        float(s.labels["le"])
        for s in fams["kubeproxy_sync_proxy_rules_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
    ]
    assert les == pytest.approx(SYNC_BUCKETS) and les[0] == 0.001 and les[-1] == pytest.approx(16.384)
    np_les = [
        float(s.labels["le"])
        for s in fams["kubeproxy_network_programming_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
    ]
    assert np_les == list(NETWORK_PROGRAMMING_BUCKETS) and np_les[:4] == [0, 0.25, 0.5, 1] and np_les[-1] == 300
    assert samples[("kubeproxy_sync_proxy_rules_duration_seconds_bucket", (("le", "0.004"),))] == 1
    assert samples[("kubeproxy_network_programming_duration_seconds_count", ())] == 1
    assert samples[("kubeproxy_sync_proxy_rules_last_timestamp_seconds", ())] == 1_700_000_000
    assert samples[("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", ())] == 1
    assert samples[("kubeproxy_sync_proxy_rules_no_local_endpoints_total", (("traffic_policy", "external"),))] == 3
    assert samples[("kubeproxy_sync_proxy_rules_no_local_endpoints_total", (("traffic_policy", "internal"),))] == 0
    assert samples[("kproxy_invalid_objects_total", (("kind", "Service"),))] == 1

    assert get(server.port, "/healthz")[2] == b"ok"
    assert get(server.port, "/proxyMode")[2] == b"iptables"


def test_unspecified_address_serves_both_families(metrics: ProxyMetrics, servers: list[HTTPServer]) -> None:
    server = serve_metrics(metrics, "0.0.0.0:0")
    servers.append(server)
    assert get(server.port, "/healthz", "127.0.0.1")[0] == 200
    if socket.has_ipv6:
        try:
            assert get(server.port, "/healthz", "::1")[0] == 200
        except OSError as e:  # a kernel without IPv6 loopback: nothing to check
            pytest.skip(f"no IPv6 loopback: {e}")


def test_stop_does_not_wait_for_a_silent_client(metrics: ProxyMetrics) -> None:
    server = serve_metrics(metrics, "127.0.0.1:0")
    silent = socket.create_connection(("127.0.0.1", server.port))
    try:
        get(server.port, "/healthz")  # the accept loop has taken the silent connection by now
        started = time.monotonic()
        server.stop()
        # Without cutting the connection, stop() would wait for the request timeout.
        assert time.monotonic() - started < REQUEST_TIMEOUT / 2
    finally:
        silent.close()
