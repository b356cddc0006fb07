"""kube-proxy's health semantics: /healthz and /livez, and the health-check node port servers.

`ProxyHealth` is upstream's ProxyHealthServer state (pkg/proxy/healthcheck/proxy_health.go):
- `queued(family)` is called whenever a change is queued for a family's proxier, `updated(family)`
  after that family synced successfully. A family is unhealthy when its oldest queued change is
  older than the timeout (2 × sync period) and still not applied. As upstream, a family that has
  never synced successfully is not judged (a long first sync does not fail the probes).
- /livez answers 200 while every family is healthy, else 503. /healthz also answers 503 while the
  node is not eligible: its Node object carries a deletionTimestamp or the cluster autoscaler's
  ``ToBeDeletedByClusterAutoscaler`` taint, or was deleted (eligible until the first Node event,
  as kube-proxy up to 1.32). Bodies are upstream's JSON; when healthy, ``lastUpdated`` reads "now"
  (upstream's backward-compatible quirk). Each answer counts in ``kubeproxy_proxy_{healthz,livez}_total``.
- The clock is injected: tests drive time, nothing sleeps.

`ServiceHealthServers` is upstream's service_health.go: one HTTP server per eTP=Local
LoadBalancer Service on its healthCheckNodePort, answering 200 when the Service has a ready,
non-terminating endpoint on this node and kproxy is healthy, else 503, with upstream's body.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from kproxy.httpd import ANY_PATH, JSON, HTTPServer, Response, Route, listen
from kproxy.metrics import ProxyMetrics
from kproxy.model import IPFamily, Node

log = structlog.get_logger(__name__)

ServiceKey = tuple[str, str]


def go_time(ts: float | None) -> str:
    """A timestamp as Go's time.Time marshals to JSON (RFC 3339 with nanoseconds, trimmed)."""
    if ts is None:
        return "0001-01-01T00:00:00Z"
    dt = datetime.fromtimestamp(ts, UTC)
    frac = f"{dt.microsecond:06d}".rstrip("0")
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


@dataclass(frozen=True, slots=True)
class Health:
    healthy: bool
    last_updated: float | None
    current_time: float
    # Per family: (last successful update, healthy).
    status: Mapping[IPFamily, tuple[float, bool]]


class ProxyHealth:
    """Thread-safe health state of every family's proxier; see the module docstring."""

    def __init__(
        self,
        timeout: float,
        *,
        clock: Callable[[], float] = time.time,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.timeout = timeout
        self._clock = clock
        self._metrics = metrics
        self._lock = threading.Lock()
        self._last_updated: dict[IPFamily, float] = {}
        self._oldest_queued: dict[IPFamily, float] = {}
        self._node_eligible = True

    def queued(self, family: IPFamily) -> None:
        with self._lock:
            self._oldest_queued.setdefault(family, self._clock())

    def updated(self, family: IPFamily) -> None:
        with self._lock:
            self._oldest_queued.pop(family, None)
            self._last_updated[family] = self._clock()

    def set_node(self, node: Node | None) -> None:
        """This node's Node object as last seen; None once it was deleted."""
        with self._lock:
            self._node_eligible = node is not None and not node.being_deleted

    @property
    def node_eligible(self) -> bool:
        with self._lock:
            return self._node_eligible

    def health(self) -> Health:
        with self._lock:
            now = self._clock()
            status: dict[IPFamily, tuple[float, bool]] = {}
            healthy = True
            for family, last in self._last_updated.items():
                queued = self._oldest_queued.get(family)
                ok = queued is None or now - queued < self.timeout
                status[family] = (last, ok)
                healthy = healthy and ok
            last_updated = max(self._last_updated.values(), default=None)
        return Health(healthy, last_updated, now, status)

    @property
    def healthy(self) -> bool:
        return self.health().healthy

    def healthz(self) -> Response:
        h = self.health()
        eligible = self.node_eligible
        return self._answer(h, h.healthy and eligible, eligible, "healthz")

    def livez(self) -> Response:
        h = self.health()
        return self._answer(h, h.healthy, None, "livez")

    def _answer(self, h: Health, ok: bool, eligible: bool | None, what: str) -> Response:
        code = 200 if ok else 503
        if self._metrics is not None:
            counter = self._metrics.healthz_total if what == "healthz" else self._metrics.livez_total
            counter.labels(str(code)).inc()
        # Field order and names as upstream's ProxyHealth struct marshals.
        body: dict[str, object] = {
            "lastUpdated": go_time(h.current_time if ok else h.last_updated),
            "currentTime": go_time(h.current_time),
        }
        if eligible is not None:
            body["nodeEligible"] = eligible
        body["healthy"] = h.healthy
        if h.status:
            body["status"] = {
                f.label: {"lastUpdated": go_time(last), "healthy": fam_ok}
                for f, (last, fam_ok) in sorted(h.status.items())
            }
        return Response(code, JSON, json.dumps(body, separators=(",", ":")).encode())


def serve_health(health: ProxyHealth, address: str, debug: Mapping[str, Route] | None = None) -> HTTPServer:
    """Serve /healthz and /livez (and the `debug` routes, e.g. /debug/sync) on `address`;
    OSError when it cannot be bound."""
    return listen(address, {"/healthz": health.healthz, "/livez": health.livez, **(debug or {})})


def service_health_body(key: ServiceKey, count: int, proxy_healthy: bool) -> bytes:
    """Upstream's body, byte for byte (a dedented, tab-indented JSON document)."""
    namespace, name = key
    return (
        "{\n"
        '\t"service": {\n'
        f'\t\t"namespace": {json.dumps(namespace)},\n'
        f'\t\t"name": {json.dumps(name)}\n'
        "\t},\n"
        f'\t"localEndpoints": {count},\n'
        f'\t"serviceProxyHealthy": {"true" if proxy_healthy else "false"}\n'
        "}"
    ).encode()


class _ServiceServer:
    def __init__(self, port: int, servers: list[HTTPServer]) -> None:
        self.port = port
        self.servers = servers
        self.endpoints = 0


class ServiceHealthServers:
    """Health-check node port servers, reconciled after every sync (upstream's SyncServices and
    SyncEndpoints). A port that cannot be opened is logged and tried again at the next sync."""

    def __init__(
        self,
        health: ProxyHealth,
        node_name: str,
        *,
        listener: Callable[[str, dict[str, Route]], HTTPServer] = listen,
    ) -> None:
        self._health = health
        self._node = node_name
        self._listen = listener
        self._lock = threading.Lock()
        self._services: dict[ServiceKey, _ServiceServer] = {}

    def sync_services(self, wanted: Mapping[ServiceKey, int], addresses: Iterable[str] = ()) -> None:
        """Serve exactly `wanted` (Service → healthCheckNodePort) on `addresses` (IPs; none: all)."""
        ips = tuple(addresses) or ("0.0.0.0",)
        with self._lock:
            stale = [k for k, s in self._services.items() if wanted.get(k) != s.port]
            closing = [self._services.pop(k) for k in stale]
        for server in closing:
            for s in server.servers:
                s.stop()
        for key, port in sorted(wanted.items()):
            with self._lock:
                if key in self._services:
                    continue
            opened: list[HTTPServer] = []
            try:
                for ip in ips:
                    address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                    opened.append(self._listen(address, {ANY_PATH: self._handler(key)}))
            except OSError as e:
                for s in opened:
                    s.stop()
                log.error(
                    "service_healthcheck_failed",
                    service=f"{key[0]}/{key[1]}",
                    port=port,
                    node=self._node,
                    error=str(e),
                )
                continue
            with self._lock:
                self._services[key] = _ServiceServer(port, opened)

    def sync_endpoints(self, counts: Mapping[ServiceKey, int]) -> None:
        """Ready local endpoints per Service; Services not named have none."""
        with self._lock:
            for key, server in self._services.items():
                server.endpoints = counts.get(key, 0)

    def ports(self) -> dict[ServiceKey, int]:
        with self._lock:
            return {k: s.port for k, s in self._services.items()}

    def stop(self) -> None:
        self.sync_services({})

    def _handler(self, key: ServiceKey) -> Callable[[], Response]:
        def answer() -> Response:
            with self._lock:
                server = self._services.get(key)
                count = server.endpoints if server is not None else 0
            healthy = self._health.healthy
            code = 200 if count and healthy else 503
            return Response(
                code,
                JSON,
                service_health_body(key, count, healthy),
                (("X-Load-Balancing-Endpoint-Weight", str(count)),),
            )

        return answer
