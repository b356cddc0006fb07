"""The Ingress controller: watch, rebuild, render, check, reload nginx, publish status.

Data flow (one sync thread; reflector threads only request syncs)::

    Ingresses, IngressClasses, Services, Secrets (+ EndpointSlices in endpoints mode, + Nodes
    for status) ──reflectors──► stores ──► build_routes ──► Reloader.apply (render, nginx -t,
    swap, reload) ──► status.loadBalancer of our Ingresses, Events, metrics

Guarantees:
- **Nothing before the first complete list** of every watched resource: no configuration is
  rendered and no status written from a partial view.
- **Coalesced and bounded**: any number of changes while a sync is pending or running make one
  more sync, never sooner than ``min_sync_period`` after the previous one (kproxy's
  `BoundedFrequencyRunner`); a periodic sync every ``sync_period`` re-checks everything, and a
  light watchdog restarts a dead nginx at once. A change that renders the same text (endpoint
  churn in the default ``service`` upstream mode, an unrelated Secret) writes and reloads nothing.
- **Readiness is gated on the first successful apply** (`ready`, ``/healthz``): until nginx has
  accepted and loaded a configuration built from complete lists, the controller is not ready
  and publishes no status, so a load balancer in front never sends traffic to an empty nginx.
- **Status only for our Ingresses**: ``status.loadBalancer.ingress`` is written for the
  Ingresses in `RoutingTable.ours` (our class, accepted or not), never for another controller's.
  The addresses are ``--publish-status-address`` if given, else the addresses of the nodes
  matching the edge selector (ExternalIPs, or InternalIPs for nodes without one), Ready nodes
  only, sorted — the same list on every replica, so replicas on several edge nodes agree
  without leader election. A status already equal is not written. An Ingress that stops being
  ours loses the status we wrote, if it still carries exactly that.
- **Failures are reported, not fatal**: a configuration nginx rejects is logged, counted and
  turned into Events on the Ingresses whose server block failed; parts of Ingresses that were
  rejected are logged once when they appear and posted as Events once while they last; failed
  API writes are logged, counted and retried at the next sync. The last good configuration
  keeps serving throughout.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from kproxy.backends.nginx import NginxProcess
from kproxy.convert import convert_service, convert_slice
from kproxy.endpointslices import endpoints_by_port
from kproxy.errors import InvalidObject, KproxyError
from kproxy.ingress.convert import ClassOptions, build_routes
from kproxy.ingress.events import Problem, Recorder
from kproxy.ingress.metrics import IngressMetrics
from kproxy.ingress.model import IngressRef, Reason, RoutingTable
from kproxy.ingress.nginx import NginxOptions, UpstreamMode
from kproxy.ingress.reload import ApplyResult, Reloader
from kproxy.ingress.selector import DEFAULT_EDGE_SELECTOR, LabelSelector, parse_selector
from kproxy.model import IPFamily, Service

log = structlog.get_logger(__name__)

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    classes: ClassOptions = ClassOptions()
    nginx: NginxOptions = NginxOptions()
    nginx_binary: str = "/usr/sbin/nginx"
    state_dir: str = "/var/lib/kproxy/ingress"
    publish_status_address: tuple[str, ...] = ()
    edge_selector: LabelSelector = field(default_factory=lambda: parse_selector(DEFAULT_EDGE_SELECTOR))
    node_name: str = ""
    min_sync_period: float = 1.0
    sync_period: float = 60.0
    retry_period: float = 2.0
    reload_timeout: float = 10.0
    watchdog_period: float = 2.0
    stop_nginx: bool = True  # on stop(); False leaves it serving for the next controller to adopt
    gateway_controller: str = ""  # Gateway API: serve GatewayClasses with this controllerName ("" off)


def parse_status_addresses(text: str) -> tuple[str, ...]:
    """``--publish-status-address``: comma-separated IPs or DNS names."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            out.append(str(ipaddress.ip_address(item)))
            continue
        except ValueError:
            pass
        labels = item.rstrip(".").split(".")
        if (
            not all(
                0 < len(x) <= 63
                and x.replace("-", "").isalnum()
                and x.isascii()
                and not x.startswith("-")
                and not x.endswith("-")
                for x in labels
            )
            or len(item) > 253
        ):
            raise ValueError(f"{item!r} is neither an IP address nor a DNS name")
        out.append(item.rstrip(".").lower())
    return tuple(dict.fromkeys(out))


def lb_entries(addresses: Iterable[str]) -> list[Obj]:
    out: list[Obj] = []
    for a in addresses:
        try:
            ipaddress.ip_address(a)
            out.append({"ip": a})
        except ValueError:
            out.append({"hostname": a})
    return out


def edge_addresses(nodes: Iterable[Mapping[str, Any]], selector: LabelSelector) -> tuple[str, ...]:
    """The status addresses of the edge nodes (see the module docstring)."""
    found: set[str] = set()
    for n in nodes:
        meta = n.get("metadata") or {}
        if meta.get("deletionTimestamp") or not selector.matches(meta.get("labels") or {}):
            continue
        status = n.get("status") or {}
        ready = [c for c in status.get("conditions") or [] if isinstance(c, Mapping) and c.get("type") == "Ready"]
        if ready and ready[0].get("status") != "True":
            continue
        addrs = [a for a in status.get("addresses") or [] if isinstance(a, Mapping)]
        external = [a.get("address") for a in addrs if a.get("type") == "ExternalIP"]
        internal = [a.get("address") for a in addrs if a.get("type") == "InternalIP"]
        for a in external or internal:
            try:
                found.add(str(ipaddress.ip_address(str(a))))
            except ValueError:
                continue
    return tuple(sorted(found, key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a))))


def _current_lb(obj: Mapping[str, Any] | None) -> list[Obj]:
    if obj is None:
        return []
    lb = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return [{k: v for k, v in e.items() if k in ("ip", "hostname") and v} for e in lb if isinstance(e, Mapping)]


def _ref_of(text: str) -> IngressRef | None:
    """``Ingress ns/name`` (a `Reason.ref`) → IngressRef."""
    if not text.startswith("Ingress "):
        return None
    ns, _, name = text[len("Ingress ") :].partition("/")
    return IngressRef(ns, name) if ns and name and "?" not in (ns + name) else None


class IngressController:
    """See the module docstring. `configuration` is a kubernetes client Configuration
    (`kproxy.sources.kube.load_client_configuration`)."""

    def __init__(
        self,
        cfg: ControllerConfig,
        configuration: Any,
        *,
        metrics: IngressMetrics | None = None,
        writer: Any = None,
        render_fn: Any = None,
    ) -> None:
        from kproxy.runner import BoundedFrequencyRunner
        from kproxy.sources.kube import (
            ENDPOINT_SLICES,
            INGRESS_CLASSES,
            INGRESSES,
            NODES,
            SECRETS,
            SERVICES,
            informer,
        )

        self.cfg = cfg
        self.metrics = metrics if metrics is not None else IngressMetrics()
        if writer is None:
            from kproxy.sources.kube_write import ApiWriter

            writer = ApiWriter(configuration, component="kproxy-ingress", instance=cfg.node_name)
            self._owns_writer = True
        else:
            self._owns_writer = False
        self.writer = writer
        state = Path(cfg.state_dir)
        self.nginx = NginxProcess(
            cfg.nginx_binary,
            str(state),
            str(state / "nginx.conf"),
            f"{cfg.nginx.run_dir}/nginx.pid",
            str(state / "nginx.log"),
        )
        self.reloader = Reloader(
            self.nginx,
            cfg.nginx,
            conf_path=str(state / "nginx.conf"),
            metrics=self.metrics,
            reload_timeout=cfg.reload_timeout,
            **({"render_fn": render_fn} if render_fn is not None else {}),
        )
        resources = [INGRESSES, INGRESS_CLASSES, SERVICES, SECRETS]
        if cfg.nginx.upstream_mode is UpstreamMode.ENDPOINTS:
            resources.append(ENDPOINT_SLICES)
        if not cfg.publish_status_address:
            resources.append(NODES)
        if cfg.gateway_controller:
            from kproxy.sources.kube import GATEWAY_CLASSES, GATEWAYS, HTTP_ROUTES, NAMESPACES, REFERENCE_GRANTS

            resources += [GATEWAY_CLASSES, GATEWAYS, HTTP_ROUTES, REFERENCE_GRANTS, NAMESPACES]
        self._reflectors = {}
        self._stores = {}
        self._synced: dict[str, threading.Event] = {}
        for res in resources:
            self._synced[res.handler_prefix] = threading.Event()
            self._reflectors[res.handler_prefix], self._stores[res.handler_prefix] = informer(
                res, configuration, _Handlers(self, res.handler_prefix)
            )
        self.runner = BoundedFrequencyRunner(
            "ingress",
            self._sync,
            min_interval=cfg.min_sync_period,
            max_interval=cfg.sync_period,
            retry_interval=cfg.retry_period,
        )
        self.ready = threading.Event()
        self.last_result: ApplyResult | None = None
        self.last_table: RoutingTable | None = None
        self._services_memo: dict[str, tuple[str, Service | None]] = {}
        self._logged_reasons: set[Reason] = set()
        self._published: dict[IngressRef, list[Obj]] = {}
        self._gateway_result: Any = None
        self._recorder = Recorder(writer, uid_of=self._uid_of, on_error=self.metrics.api_errors.inc)
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    # --- lifecycle

    def start(self) -> None:
        for r in self._reflectors.values():
            r.start()
        self.runner.start()
        self._watchdog = threading.Thread(target=self._watch_nginx, name="ingress-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        self._stop.set()
        self.runner.stop(timeout=60)
        if self._watchdog is not None:
            self._watchdog.join(timeout=10)
        for r in self._reflectors.values():
            r.stop()
        if self.cfg.stop_nginx:
            self.reloader.stop()
        if self._owns_writer:
            self.writer.close()

    @property
    def crashed(self) -> BaseException | None:
        """A bug that ended the sync thread or a reflector (the process should exit)."""
        return self.runner.error or next((r.error for r in self._reflectors.values() if r.error), None)

    def healthy(self) -> bool:
        return self.ready.is_set() and self.crashed is None and self.nginx.running()

    def request_sync(self) -> None:
        self.runner.run()

    def _watch_nginx(self) -> None:
        while not self._stop.wait(self.cfg.watchdog_period):
            if self.ready.is_set() and not self.nginx.running():
                log.warning("nginx_not_running", action="restart")
                self.runner.run()

    # --- the sync

    def _all_synced(self) -> bool:
        return all(e.is_set() for e in self._synced.values())

    def _services(self) -> list[Service]:
        out: list[Service] = []
        seen = set()
        for obj in self._stores["service"].objects():
            meta = obj.get("metadata") or {}
            key = f"{meta.get('namespace')}/{meta.get('name')}"
            seen.add(key)
            rv = str(meta.get("resourceVersion", ""))
            memo = self._services_memo.get(key)
            if memo is None or memo[0] != rv or not rv:
                try:
                    svc = convert_service(obj)
                except InvalidObject as e:
                    log.warning("object_skipped", object=e.ref, field=e.field, reason=e.reason)
                    svc = None
                memo = (rv, svc)
                self._services_memo[key] = memo
            if memo[1] is not None:
                out.append(memo[1])
        for gone in set(self._services_memo) - seen:
            del self._services_memo[gone]
        return out

    def _endpoints(self) -> dict[Any, tuple[Any, ...]]:
        if "endpoint_slice" not in self._stores:
            return {}
        slices = []
        for obj in self._stores["endpoint_slice"].objects():
            try:
                es = convert_slice(obj)
            except InvalidObject:
                continue
            if es is not None:
                slices.append(es)
        merged: dict[Any, tuple[Any, ...]] = {}
        for family in IPFamily:
            for name, eps in endpoints_by_port(slices, family).items():
                merged[name] = merged.get(name, ()) + eps
        return merged

    def build(self) -> RoutingTable:
        services = self._services()
        table = build_routes(
            self._stores["ingress"].objects(),
            services,
            self._stores["secret"].objects(),
            self._stores["ingress_class"].objects(),
            self.cfg.classes,
        )
        if not self.cfg.gateway_controller:
            return table
        from kproxy.ingress.gateway import GatewayOptions, build_gateway, combine

        o = self.cfg.nginx
        opts = GatewayOptions(
            controller=self.cfg.gateway_controller,
            addresses=self.status_addresses(),
            ingress_http_port=next((lp for lp, np in o.gateway_ports if np == o.http_port), o.http_port),
            ingress_https_port=next((lp for lp, np in o.gateway_ports if np == o.https_port), o.https_port),
        )
        self._gateway_result = build_gateway(
            self._stores["gateway_class"].objects(),
            self._stores["gateway"].objects(),
            self._stores["http_route"].objects(),
            services,
            self._stores["secret"].objects(),
            self._stores["reference_grant"].objects(),
            self._stores["namespace"].objects(),
            opts,
        )
        return combine(table, self._gateway_result, opts)

    def _sync(self) -> bool:
        if not self._all_synced() or self._stop.is_set():
            return True
        self.metrics.syncs.inc()
        table = self.build()
        result = self.reloader.apply(table, self._endpoints())
        self.last_result = result
        self.last_table = result.table
        if result.ok and not self.ready.is_set():
            self.ready.set()
            self.metrics.ready.set(1)
            log.info("ingress_ready", ingresses=len(table.ours), servers=len(table.servers))
        self._report(result)
        if self.ready.is_set():
            self._publish_status(result.table)
            if self._gateway_result is not None:
                self._publish_gateway_status(self._gateway_result)
        return result.ok

    def _publish_gateway_status(self, result: Any) -> None:
        """Gateway API status of every object we own, written only when it changes."""
        from datetime import UTC, datetime

        from kproxy.ingress.gateway import status_update

        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        stores = {"GatewayClass": "gateway_class", "Gateway": "gateway", "HTTPRoute": "http_route"}
        plurals = {"GatewayClass": "gatewayclasses", "Gateway": "gateways", "HTTPRoute": "httproutes"}
        for key, wanted in result.statuses:
            store = self._stores[stores[key.kind]]
            obj = store.get(f"{key.namespace}/{key.name}" if key.namespace else key.name)
            if obj is None:
                continue
            new = status_update(key.kind, obj.get("status"), wanted, self.cfg.gateway_controller, now)
            if new is None:
                continue
            try:
                self.writer.patch_gateway_status(plurals[key.kind], key.namespace, key.name, new)
            except KproxyError as e:
                self.metrics.api_errors.inc()
                log.warning("gateway_status_failed", object=str(key), error=str(e))
                self.runner.run()
                continue
            self.metrics.status_updates.inc()
            log.info("gateway_status_updated", object=str(key))

    # --- reporting

    def _report(self, result: ApplyResult) -> None:
        table = result.table
        ours = set(table.ours)
        reasons = set(table.reasons) | set(result.config.reasons)
        new = sorted(reasons - self._logged_reasons, key=lambda r: (r.ref, r.field, r.message))
        for r in new:
            log.warning("ingress_reason", object=r.ref, field=r.field, reason=r.message)
        self._logged_reasons = reasons
        self.metrics.reasons.set(len(reasons))
        problems: list[Problem] = []
        tls_msgs = {(str(t.ingress), t.secret) for t in result.rejected_tls}
        for r in reasons:
            ref = _ref_of(r.ref)
            if ref is None or ref not in ours:
                continue
            kind = "TLSSecretRejected" if any(r.ref == i and s in r.message for i, s in tls_msgs) else "Rejected"
            problems.append(Problem("Ingress", ref.namespace, ref.name, kind, f"{r.field}: {r.message}"))
        if not result.ok:
            msg = f"nginx rejected the configuration, the previous one keeps serving: {result.error}"
            for ref in result.involved:
                problems.append(Problem("Ingress", ref.namespace, ref.name, "ReloadFailed", msg[:1000]))
        self._recorder.report(problems)

    def _uid_of(self, p: Problem) -> str:
        obj = self._stores["ingress"].get(f"{p.namespace}/{p.name}")
        return str(((obj or {}).get("metadata") or {}).get("uid") or "")

    def status_addresses(self) -> tuple[str, ...]:
        if self.cfg.publish_status_address:
            return self.cfg.publish_status_address
        return edge_addresses(self._stores["node"].objects(), self.cfg.edge_selector)

    def _publish_status(self, table: RoutingTable) -> None:
        want = lb_entries(self.status_addresses())
        store = self._stores["ingress"]
        for ref in table.ours:
            obj = store.get(f"{ref.namespace}/{ref.name}")
            if obj is None:
                continue
            if _current_lb(obj) != want and self._patch_status(ref, want):
                log.info(
                    "ingress_status_updated",
                    ingress=f"{ref.namespace}/{ref.name}",
                    addresses=[e.get("ip") or e.get("hostname") for e in want],
                )
            self._published[ref] = want
        for ref in sorted(set(self._published) - set(table.ours)):
            written = self._published.pop(ref)
            obj = store.get(f"{ref.namespace}/{ref.name}")
            if obj is not None and written and _current_lb(obj) == written:
                # No longer ours (class changed): take back what we published, nothing else.
                self._patch_status(ref, [])

    def _patch_status(self, ref: IngressRef, lb: list[Obj]) -> bool:
        try:
            self.writer.patch_ingress_status(ref.namespace, ref.name, lb)
        except KproxyError as e:
            self.metrics.api_errors.inc()
            log.warning("ingress_status_failed", ingress=f"{ref.namespace}/{ref.name}", error=str(e))
            self.runner.run()  # try again (after the minimum interval), not only at the next change
            return False
        self.metrics.status_updates.inc()
        return True


class _Handlers:
    """``on_<kind>_add/update/delete/synced`` for one resource: each only requests a sync."""

    def __init__(self, ctl: IngressController, prefix: str) -> None:
        self._ctl = ctl
        self._prefix = prefix

    def __getattr__(self, name: str) -> Any:
        base = f"on_{self._prefix}_"
        if not name.startswith(base):
            raise AttributeError(name)
        what = name[len(base) :]
        if what == "synced":
            return self._synced
        if what in ("add", "delete"):
            return lambda obj: self._ctl.request_sync()
        if what == "update":
            return lambda old, new: self._ctl.request_sync()
        raise AttributeError(name)

    def _synced(self) -> None:
        self._ctl._synced[self._prefix].set()
        self._ctl.request_sync()


def serve_health(ctl: IngressController, address: str) -> Any:
    """``/metrics``, ``/healthz`` (200 once the first configuration is applied and nginx runs)
    and ``/livez`` on `address` (``IP:port``)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    from kproxy.httpd import TEXT, Response, listen

    def healthz() -> Response:
        ok = ctl.healthy()
        return Response(200 if ok else 503, TEXT, b"ok\n" if ok else b"not ready\n")

    return listen(
        address,
        {
            "/metrics": lambda: Response(200, CONTENT_TYPE_LATEST, ctl.metrics.exposition()),
            "/healthz": healthz,
            "/readyz": healthz,
            "/livez": lambda: Response(200, TEXT, b"ok\n"),
        },
    )


__all__ = [
    "ControllerConfig",
    "IngressController",
    "edge_addresses",
    "lb_entries",
    "parse_status_addresses",
    "serve_health",
]
