"""Prometheus metrics of the ingress controller and of hostPort programming.

Names follow ingress-nginx's where the meaning is the same (``..._config_last_reload_successful``,
``..._config_hash``, ``..._success``), under kproxy's ``kproxy_ingress_`` prefix, so a dashboard
needs only its prefix changed. Each object has its own registry, so tests build as many as they
like; `IngressMetrics.exposition` is the ``/metrics`` body.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class IngressMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ns = "kproxy_ingress"
        self.last_reload_successful = Gauge(
            "config_last_reload_successful",
            "Whether the last configuration check and reload succeeded (1) or failed (0)",
            namespace=ns,
            registry=r,
        )
        self.last_reload_success_timestamp = Gauge(
            "config_last_reload_successful_timestamp_seconds",
            "When the last successful reload happened",
            namespace=ns,
            registry=r,
        )
        self.config_hash = Gauge(
            "config_hash",
            "First 52 bits of sha256 of the configuration nginx is running",
            namespace=ns,
            registry=r,
        )
        self.reloads = Counter(
            "success",
            "Successful reloads (nginx started or given a new configuration)",
            namespace=ns,
            registry=r,
        )
        self.reload_failures = Counter(
            "reload_failures",
            "Configurations rejected by nginx -t, or reloads nginx did not take",
            namespace=ns,
            registry=r,
        )
        self.tls_rejected = Gauge(
            "tls_certificates_rejected",
            "TLS certificates nginx rejected (their hosts fail closed on HTTPS)",
            namespace=ns,
            registry=r,
        )
        self.reasons = Gauge(
            "object_reasons",
            "Parts of Ingress objects rejected, ignored or failing closed",
            namespace=ns,
            registry=r,
        )
        self.status_updates = Counter(
            "status_updates", "Ingress status.loadBalancer updates written", namespace=ns, registry=r
        )
        self.api_errors = Counter(
            "api_write_errors", "Failed writes to the API server (status, events)", namespace=ns, registry=r
        )
        self.syncs = Counter("syncs", "Rebuilds of the routing table", namespace=ns, registry=r)
        self.ready = Gauge("ready", "1 once a configuration has been applied successfully", namespace=ns, registry=r)
        self.last_reload_successful.set(0)
        self.ready.set(0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class HostPortMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ns = "kproxy_hostport"
        self.mappings = Gauge("mappings", "hostPort mappings programmed", ["family"], namespace=ns, registry=r)
        self.conflicts = Gauge(
            "conflicts",
            "hostPort claims not programmed because an older pod holds the port",
            namespace=ns,
            registry=r,
        )
        self.sync_failures = Counter("sync_failures", "hostPort syncs the kernel refused", namespace=ns, registry=r)
        self.syncs = Counter("syncs", "hostPort syncs that changed the kernel", namespace=ns, registry=r)
        self.udp_flows_flushed = Counter(
            "udp_flows_flushed",
            "UDP conntrack entries deleted for new hostPort mappings",
            namespace=ns,
            registry=r,
        )
        self.edge = Gauge("edge_node", "1 when this node matches the edge selector", namespace=ns, registry=r)
        self.conflicts.set(0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
