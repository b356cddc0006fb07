"""Prometheus metrics with kube-proxy's names, types, help texts and buckets.

Guarantees:
- Every kube-proxy metric kproxy can report has upstream's name (subsystem ``kubeproxy``), type and
  buckets, so existing dashboards and alerts keep working: sync durations (1 ms × 2^0..14), the
  network programming latency (upstream's 0, 0.25 s … 5 min buckets), last synced and last queued
  timestamps, pending and total changes, restore failures, no-local-endpoint gauges, and the
  healthz/livez counters. kproxy's own series carry the ``kproxy_`` prefix.
- The per-mode counts of what is programmed: upstream's ``sync_proxy_rules_iptables_total`` and
  ``_last`` (rules in our chains per table, and those the last sync wrote; iptables mode), and
  ``kproxy_sync_proxy_rules_objects{kind}`` for what upstream counts nowhere (the nftables mode's
  chains, rules and elements; the IPVS mode's virtual and real servers). They, and upstream's
  conntrack reconciler series, carry upstream's ``ip_family`` label (``IPv4``/``IPv6``): a
  dual-stack node holds a count per family. The older series above carry none, as upstream's
  did before 1.33; they count the whole node.
- Sync phases (``kproxy_sync_proxy_rules_phase_duration_seconds{phase}``: render, plan, apply,
  summed over the families of one sync) and syncs by kind and result (``kproxy_syncs_total``).
- Each `ProxyMetrics` has its own registry (tests build as many as they like); `serve` exposes one
  on ``/metrics`` in the text format, with ``/healthz`` and ``/proxyMode`` as kube-proxy's metrics
  server has them.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from kproxy.httpd import TEXT, HTTPServer, Response, listen

# Upstream exports no *_created series; neither do we (process-wide switch of prometheus_client).
disable_created_metrics()  # type: ignore[no-untyped-call]

SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# pkg/proxy/metrics: merge() starts from a zero bucket, then 0.25 s, 0.5 s, 1..59 s, 60..115 s by 5,
# 120..300 s by 30.
NETWORK_PROGRAMMING_BUCKETS = (
    (0.0, 0.25, 0.5)
    + tuple(float(s) for s in range(1, 60))
    + tuple(float(s) for s in range(60, 120, 5))
    + tuple(float(s) for s in range(120, 301, 30))
)


class ProxyMetrics:
    """The metrics of one kproxy process (or one test), in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
        ns = "kubeproxy"
        self.sync_duration = Histogram(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            namespace=ns,
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.sync_full_duration = Histogram(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            namespace=ns,
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.sync_partial_duration = Histogram(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            namespace=ns,
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.network_programming = Histogram(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            namespace=ns,
            buckets=NETWORK_PROGRAMMING_BUCKETS,
            registry=r,
        )
        self.last_timestamp = Gauge(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            namespace=ns,
            registry=r,
        )
        self.last_queued_timestamp = Gauge(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            namespace=ns,
            registry=r,
        )
        self.endpoint_changes_pending = Gauge(
            "sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            namespace=ns,
            registry=r,
        )
        self.endpoint_changes_total = Counter(
            "sync_proxy_rules_endpoint_changes_total",
            "Cumulative proxy rules Endpoint changes",
            namespace=ns,
            registry=r,
        )
        self.service_changes_pending = Gauge(
            "sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            namespace=ns,
            registry=r,
        )
        self.service_changes_total = Counter(
            "sync_proxy_rules_service_changes_total",
            "Cumulative proxy rules Service changes",
            namespace=ns,
            registry=r,
        )
        self.restore_failures = Counter(
            "sync_proxy_rules_iptables_restore_failures_total",
            "Cumulative proxy iptables restore failures",
            namespace=ns,
            registry=r,
        )
        self.partial_restore_failures = Counter(
            "sync_proxy_rules_iptables_partial_restore_failures_total",
            "Cumulative proxy iptables partial restore failures",
            namespace=ns,
            registry=r,
        )
        # A gauge despite its name, as upstream.
        self.no_local_endpoints = Gauge(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ["traffic_policy"],
            namespace=ns,
            registry=r,
        )
        self.healthz_total = Counter(
            "proxy_healthz_total", "Cumulative proxy healthz HTTP status", ["code"], namespace=ns, registry=r
        )
        self.livez_total = Counter(
            "proxy_livez_total", "Cumulative proxy livez HTTP status", ["code"], namespace=ns, registry=r
        )
        self.invalid_objects = Counter(
            "kproxy_invalid_objects_total",
            "API objects skipped because they could not be converted",
            ["kind"],
            registry=r,
        )
        self.rules_tampered = Counter(
            "kproxy_rules_tampered_total",
            "Programmed objects found changed by someone else and put back, by kind "
            "(chain, jump, canary, ipset, virtual_server, real_server; nftables mode: table, chain, map)",
            ["kind"],
            registry=r,
        )
        self.nftables_sync_failures = Counter(
            "sync_proxy_rules_nftables_sync_failures_total",
            "Cumulative proxy nftables sync failures",
            namespace=ns,
            registry=r,
        )
        self.iptables_rules = Gauge(
            "sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kube-proxy",
            ["table", "ip_family"],
            namespace=ns,
            registry=r,
        )
        self.iptables_rules_last = Gauge(
            "sync_proxy_rules_iptables_last",
            "Number of iptables rules written by kube-proxy in last sync",
            ["table", "ip_family"],
            namespace=ns,
            registry=r,
        )
        self.conntrack_deleted = Counter(
            "conntrack_reconciler_deleted_entries_total",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            ["ip_family"],
            namespace=ns,
            registry=r,
        )
        self.conntrack_duration = Histogram(
            "conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            ["ip_family"],
            namespace=ns,
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.objects = Gauge(
            "kproxy_sync_proxy_rules_objects",
            "Kernel objects kproxy holds after the last successful sync, by kind "
            "(nftables mode: chain, rule, element; IPVS mode: virtual_server, real_server)",
            ["kind", "ip_family"],
            registry=r,
        )
        self.phase_duration = Histogram(
            "kproxy_sync_proxy_rules_phase_duration_seconds",
            "Time one sync spent per phase, summed over IP families: render (desired state), "
            "plan (read back and diff), apply (kernel writes)",
            ["phase"],
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.syncs = Counter(
            "kproxy_syncs_total",
            "Syncs by kind (full, partial) and result (ok, failed)",
            ["kind", "result"],
            registry=r,
        )
        for kind in ("full", "partial"):
            for outcome in ("ok", "failed"):
                self.syncs.labels(kind, outcome).inc(0)
        # Upstream pre-creates both label values; a dashboard then sees zeros, not gaps.
        for policy in ("internal", "external"):
            self.no_local_endpoints.labels(policy).set(0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def serve(metrics: ProxyMetrics, address: str, mode: str = "iptables") -> HTTPServer:
    """Serve ``/metrics`` (and ``/healthz``, ``/proxyMode``) on `address`; OSError if it is taken."""
    return listen(
        address,
        {
            "/metrics": lambda: Response(200, CONTENT_TYPE_LATEST, metrics.exposition()),
            "/healthz": lambda: Response(200, TEXT, b"ok"),
            "/proxyMode": lambda: Response(200, TEXT, mode.encode()),
        },
    )
