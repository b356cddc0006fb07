"""`kproxy run`: watch the API server and keep this node's kernel converged.

Wiring: three reflectors (Services, EndpointSlices, this node's Node by field selector) feed the
change trackers; a bounded-frequency runner calls `Daemon.sync` on its one thread; each sync
programs one proxier per IP family of the kernel: an `IptablesProxier`, or in the IPVS mode an
`IpvsProxier` (whose netlink socket therefore lives in the runner's thread). Guarantees:

- **Nothing is programmed before every resource has been listed once.** Until then no sync runs,
  so a daemon that cannot reach the API server leaves the rules it found exactly as they are.
- **Drift is repaired within one sync period.** One sync per sync period (due a period after the
  last one started, however many partial syncs came between: `runner.run_by`) is a *verifying*
  sync: it lists our chains with their rule counts and our jumps, and holds them against what was
  last written. A chain someone flushed, deleted, or added rules to or deleted rules from, and a
  jump someone removed, are written again in that same sync, logged (``rules_tampered``, naming
  each) and counted (``kproxy_rules_tampered_total{kind}``). Other partial syncs read nothing
  back: at scale the listing costs more than the write (docs/benchmarks.md). The canary chain
  (`KPROXY-PROXY-CANARY`, in mangle, nat and filter, with one inert rule), as upstream's, is
  checked once per sync period too; a missing canary brings a full sync at once. A mode that
  writes no iptables (`ModeInfo.iptables`: nftables) has no canary: its verifying sync checks
  its own table (the ruleset generation, then netlink counts) and rewrites it when it drifted.
- **Full syncs** happen first, after a failed sync, after this node's topology labels changed, and
  when the canary is gone. Every other sync is partial: it writes only the chains whose rules
  changed or drifted, and nothing at all when neither happened.
- **The IPVS mode** also syncs in full once per sync period ("periodic"), as upstream's IPVS mode
  syncs every time: a real server, ipset entry or address someone removed by hand is only seen
  by a full read. Partial syncs read the virtual server list and the real servers of what
  changed or still drains, so a deleted virtual server comes back at the next sync. Graceful
  termination needs no timer of its own: every sync (at least one per sync period) deletes the
  draining real servers whose connections have ended.
- **Adoption.** A restarted daemon's first (full) sync rewrites every chain in one
  ``iptables-restore --noflush`` transaction per family: rules are replaced atomically, nothing is
  flushed first, and conntrack keeps established flows on their endpoints.
- **An unreachable API server never flushes rules**: the trackers keep the last state, and the
  periodic syncs (every sync period) keep programming it.
- **Failures** (a refused transaction, a missing tool) are logged with their context, counted, mark
  the families unhealthy-pending, and are retried as a full sync with backoff; they never stop the
  daemon. A bug (any other exception) ends the sync thread loudly and the daemon exits 1.
- **Switching modes.** The IPVS mode's first full sync replaces the iptables mode's chains in
  one transaction (the modes share their filter and nat chain names). The other way, after its
  first sync the iptables mode removes what only the IPVS mode used (`leave_ipvs_mode`: mangle
  chains, ipsets, virtual servers, the dummy device), so a deleted Service cannot keep
  answering through a stale virtual server. Into or out of the nftables mode, the old mode's
  objects go after the new mode's first sync: its iptables chains and jumps (the iptables mode's
  `leave`, then the IPVS mode's), or its tables (the nftables mode's `leave`). A failure there
  is logged; traffic flows either way.
- **Configuration changes** restart: as kube-proxy, the daemon exits (status 1) when its
  --config file changes, so the DaemonSet restarts it with the edited ConfigMap.
- **SIGTERM** (`stop`) lets the sync in progress finish, stops the watches and servers, and leaves
  every rule in place so traffic keeps flowing through a rolling upgrade.
- **Stale UDP conntrack flows** are deleted after the first sync and after every sync in which a
  UDP Service port or its endpoints changed (`conntrack.clean_stale_udp`, the same driver and
  rule as `kproxy sync`, in both modes); a cleanup that failed is logged and retried after the
  next sync.
- **One log line per sync**: ``sync_complete`` with kind (full/partial), services, endpoints,
  changed, render_ms, plan_ms, apply_ms (or ``sync_failed``). The same figures, for the last 20
  syncs, answer ``/debug/sync`` on the healthz server (kproxy/daemon/debug.py); the metrics add
  the phase durations, what each family holds (rules per table, the mode's objects) and the
  conntrack cleanup's duration and deletions.

Why one module of ~680 lines: the daemon's guarantees (first list before any sync, full and verifying
syncs, drift, the canary, failures, mode switches) are one state machine over one lock and one
runner; split, its invariants would be spread over modules that each hold half of its state.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from kproxy import modes as registry
from kproxy.backends.conntrack import Conntrack
from kproxy.backends.iptables import (
    CANARY_CHAIN,
    Iptables,
    SavedState,
    canary_intact,
    detect_variant,
    ensure_canary,
)
from kproxy.backends.protocols import ConntrackBackend, IptablesBackend
from kproxy.config import RunConfig
from kproxy.conntrack import clean_stale_udp
from kproxy.daemon.debug import Phases, SyncLog, SyncRecord
from kproxy.daemon.health import ProxyHealth, ServiceHealthServers, serve_health
from kproxy.daemon.services import ServiceTableFeed
from kproxy.errors import BackendError, KproxyError
from kproxy.families import kernel_families
from kproxy.heap import keep_long_lived
from kproxy.httpd import HTTPServer, WithQuery
from kproxy.metrics import ProxyMetrics
from kproxy.metrics import serve as serve_metrics
from kproxy.model import IPFamily, Node, ServicePortName
from kproxy.modes import Proxier, SyncOutcome
from kproxy.node import NodeContext
from kproxy.proxier.loop import sync_families
from kproxy.runner import BoundedFrequencyRunner, Clock, MonotonicClock
from kproxy.tracker import ChangeTrackers, Checkout
from kproxy.view import FamilyView, node_context, with_primary_ip
from kproxy.views import IncrementalView

log = structlog.get_logger(__name__)

Obj = dict[str, Any]
RESOURCES = ("services", "endpointslices", "nodes")


class Host(Protocol):
    """What the daemon reads and sets on the node outside the proxiers (faked in tests)."""

    def local_addresses(self, family: IPFamily) -> tuple[str, ...]: ...

    def set_sysctl(self, name: str, value: str) -> bool: ...

    def set_oom_score_adj(self, value: int) -> None: ...


class RealHost:
    def local_addresses(self, family: IPFamily) -> tuple[str, ...]:
        from kproxy.backends.host import local_addresses

        return local_addresses(family)

    def set_sysctl(self, name: str, value: str) -> bool:
        from kproxy.backends.host import set_sysctl

        return set_sysctl(name, value)

    def set_oom_score_adj(self, value: int) -> None:
        from kproxy.backends.process import set_oom_score_adj

        set_oom_score_adj(value)


class CanaryHidden:
    """The `Iptables` a proxier is given: the same, except that listings leave out the canary.

    The plan garbage-collects every ``KPROXY-`` chain it did not render; the canary is ours too,
    but it belongs to the daemon, not to the rendered ruleset, and must survive every sync.

    It also reads, for free, what every sync's listing says of the canary: once our rules are
    known to be in place (`expect_intact`), a missing canary chain (someone ran ``-X`` on the
    table) sets `tampered`, and the daemon follows up with a full sync at once instead of waiting
    for the periodic canary check. Everything else a listing shows astray (our chains' rule
    counts, our jumps) the proxier repairs in the same sync.
    """

    def __init__(self, inner: IptablesBackend) -> None:
        self.inner = inner
        self.family = inner.family
        self.variant = inner.variant
        self.expect_intact = False
        self.tampered = False

    def save(self, tables: tuple[str, ...] = ("filter", "nat"), prefixes: tuple[str, ...] = ("KPROXY-",)) -> SavedState:
        saved = self.inner.save(tables, prefixes)
        if self.expect_intact and _canary_gone(saved, tables):
            self.tampered = True
        chains = {t: names - {CANARY_CHAIN} for t, names in saved.chains.items()}
        counts = {t: {c: n for c, n in found.items() if c != CANARY_CHAIN} for t, found in saved.rule_counts.items()}
        return SavedState(chains, saved.jumps, saved.jump_rules, counts)

    def restore(self, text: str) -> None:
        self.inner.restore(text)


def _canary_gone(saved: SavedState, tables: tuple[str, ...]) -> bool:
    return any(CANARY_CHAIN not in saved.chains.get(table, {CANARY_CHAIN}) for table in tables)


@dataclass
class FamilyPlane:
    """The data plane of one IP family: its iptables (real or fake), conntrack, the canary, and
    the mode's proxier, built over the canary-hiding view of that iptables by `make_proxier`, or
    by the configured mode (the registry's) when that is not given."""

    family: IPFamily
    iptables: IptablesBackend
    conntrack: ConntrackBackend | None = None
    canary_check: Callable[[IptablesBackend], bool] = canary_intact
    canary_create: Callable[[IptablesBackend], None] = ensure_canary
    make_proxier: Callable[[CanaryHidden], Proxier] | None = None
    proxier: Proxier = field(init=False)
    listing: CanaryHidden = field(init=False)

    def __post_init__(self) -> None:
        self.listing = CanaryHidden(self.iptables)
        if self.make_proxier is not None:
            self.proxier = self.make_proxier(self.listing)


def real_planes(variant: str) -> dict[IPFamily, FamilyPlane]:
    """One plane per IP family of this kernel; the daemon gives each its mode's proxier."""
    return {f: FamilyPlane(f, Iptables(f, variant), Conntrack(f)) for f in kernel_families()}


class Daemon:
    """The per-node daemon: see the module docstring. `run` is the whole life cycle."""

    def __init__(
        self,
        cfg: RunConfig,
        planes: Mapping[IPFamily, FamilyPlane],
        client_configuration: Any,
        *,
        host: Host | None = None,
        metrics: ProxyMetrics | None = None,
        clock: Clock | None = None,
        wall_clock: Callable[[], float] = time.time,
        reflector_options: Callable[[], Mapping[str, Any]] | None = None,
        after_first_sync: Callable[[], str | None] | None = None,
    ) -> None:
        self.cfg = cfg
        # Once the first sync's rules are in place: what another mode left behind is removed.
        self._after_first_sync = after_first_sync
        self.planes = dict(planes)
        mode = registry.MODES[cfg.proxy.mode]
        for family, plane in self.planes.items():
            if plane.make_proxier is None:
                plane.proxier = mode.load().proxier(family, cfg, plane.listing)
        self._client_configuration = client_configuration
        self._host: Host = host if host is not None else RealHost()
        self.metrics = metrics if metrics is not None else ProxyMetrics()
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._wall = wall_clock
        # A factory: each reflector needs its own options (a Backoff is stateful).
        self._reflector_options = reflector_options or dict
        p = cfg.proxy
        self.health = ProxyHealth(2 * p.sync_period, clock=wall_clock, metrics=self.metrics)
        self.hc_servers = ServiceHealthServers(self.health, p.node_name)
        # Service -> (healthCheckNodePort, its port names), kept by _note_health_checked.
        self._health_checked: dict[tuple[str, str], tuple[int, tuple[ServicePortName, ...]]] = {}
        self.trackers = ChangeTrackers(
            p.node_name, self.metrics, service_proxy_name=p.service_proxy_name, wall_clock=wall_clock
        )
        self.runner = BoundedFrequencyRunner(
            "sync",
            self.sync,
            min_interval=p.min_sync_period,
            max_interval=max(p.sync_period, p.min_sync_period),
            # Retry a failed sync soon, then back off to the sync period (runner doubles it).
            retry_interval=min(max(p.min_sync_period, 1.0), p.sync_period),
            clock=self._clock,
        )
        self._views = {f: IncrementalView(f) for f in self.planes}
        self._lock = threading.Lock()
        self._synced: set[str] = set()
        self._initialized = threading.Event()
        self._need_full = True
        self._tamper_follow_up = False
        self._first_done = False
        # Stale UDP flows are looked for after the first sync and after UDP changes, until found.
        self._conntrack_pending = True
        self._pending_triggers: list[float] = []
        self._next_canary_check = 0.0
        self._next_verify = 0.0
        self._full_every_period = mode.periodic_full
        # A mode that writes no iptables (nftables) gets no canary there: its proxier checks its
        # own table for drift in every verifying sync instead.
        self._iptables_canary = mode.iptables
        self._next_periodic_full = 0.0
        self._reflectors: list[Any] = []
        self._servers: list[HTTPServer] = []
        self.syncs = 0
        self.sync_log = SyncLog()
        # /debug/services: the Service table as last programmed (the mode names its objects).
        self.service_table = ServiceTableFeed(mode.name, lambda view, ctx: mode.load().describe(cfg, view, ctx))

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the servers, apply the host settings, start watching. Syncs start once listed."""
        self._start_servers()
        self.apply_host_settings()
        from kproxy.sources.kube import ENDPOINT_SLICES, NODES, SERVICES, key_informer, name_selector

        # The trackers convert each object as it arrives and take only the key from an update's
        # `old`, so the stores keep keys and resourceVersions, never the API objects.
        config, opts = self._client_configuration, self._reflector_options
        node_selector = name_selector(self.cfg.proxy.node_name)
        self._reflectors = [
            key_informer(SERVICES, config, self, **opts())[0],
            key_informer(ENDPOINT_SLICES, config, self, **opts())[0],
            key_informer(NODES, config, self, field_selector=node_selector, **opts())[0],
        ]
        for reflector in self._reflectors:
            reflector.start()
        log.info(
            "kproxy_started",
            node=self.cfg.proxy.node_name,
            mode=self.cfg.proxy.mode,
            families=[int(f) for f in self.planes],
            sync_period=self.cfg.proxy.sync_period,
            min_sync_period=self.cfg.proxy.min_sync_period,
            healthz=self.cfg.healthz_bind_address,
            metrics=self.cfg.metrics_bind_address,
        )

    def stop(self) -> None:
        """Stop watching and syncing (after the sync in progress); the rules stay in place."""
        for reflector in self._reflectors:
            reflector.stop()
        self.runner.stop()
        self.hc_servers.stop()
        for server in self._servers:
            server.stop()
        self._servers = []
        log.info("kproxy_stopped", syncs=self.syncs)

    def crashed(self) -> BaseException | None:
        """The bug that ended a reflector or the sync thread, if one did."""
        if self.runner.error is not None:
            return self.runner.error
        return next((r.error for r in self._reflectors if r.error is not None), None)

    def run(self, stop: threading.Event, check_every: float = 1.0) -> int:
        """Run until `stop` is set (0), a bug ends a thread (1), or the --config file changes (1).

        The last is kube-proxy's behaviour: an edited ConfigMap takes effect by a restart, which
        the exit status makes the DaemonSet do. The rules stay in place meanwhile.
        """
        config_stamp = _file_stamp(self.cfg.config_file)
        self.start()
        try:
            while not stop.wait(check_every):
                if self.crashed() is not None:
                    return 1
                if _file_stamp(self.cfg.config_file) != config_stamp:
                    log.error("config_file_changed", path=self.cfg.config_file)
                    return 1
            return 0
        finally:
            self.stop()

    @property
    def reflectors(self) -> tuple[Any, ...]:
        """The Services, EndpointSlices and Node reflectors, in that order (once started)."""
        return tuple(self._reflectors)

    def wait_initialized(self, timeout: float) -> bool:
        return self._initialized.wait(timeout)

    def _start_servers(self) -> None:
        servers: list[tuple[str, str, Callable[[str], HTTPServer]]] = [
            (
                "healthz",
                self.cfg.healthz_bind_address,
                lambda a: serve_health(
                    self.health,
                    a,
                    {"/debug/sync": self.sync_log.response, "/debug/services": WithQuery(self.service_table.response)},
                ),
            ),
            ("metrics", self.cfg.metrics_bind_address, lambda a: serve_metrics(self.metrics, a, self.cfg.proxy.mode)),
        ]
        for what, address, start in servers:
            if not address:
                continue
            try:
                self._servers.append(start(address))
            except OSError as e:
                if self.cfg.bind_address_hard_fail:
                    for server in self._servers:
                        server.stop()
                    raise KproxyError(f"cannot serve {what} on {address}: {e}") from e
                log.error("server_bind_failed", server=what, address=address, error=str(e))

    def apply_host_settings(self) -> None:
        """OOM score and conntrack sysctls, as kube-proxy; a refusal is logged, never fatal."""
        cfg = self.cfg
        if cfg.oom_score_adj is not None:
            try:
                self._host.set_oom_score_adj(cfg.oom_score_adj)
            except BackendError as e:
                log.warning("host_setting_failed", setting="oom_score_adj", error=str(e))
        ct = cfg.conntrack
        sysctls = {
            "net/netfilter/nf_conntrack_tcp_timeout_established": ct.tcp_established_timeout,
            "net/netfilter/nf_conntrack_tcp_timeout_close_wait": ct.tcp_close_wait_timeout,
            "net/netfilter/nf_conntrack_udp_timeout": ct.udp_timeout,
            "net/netfilter/nf_conntrack_udp_timeout_stream": ct.udp_stream_timeout,
            "net/netfilter/nf_conntrack_tcp_be_liberal": 1 if ct.tcp_be_liberal else None,
        }
        for name, value in sysctls.items():
            if value is None:
                continue
            try:
                self._host.set_sysctl(name, str(int(round(value))))
            except BackendError as e:
                log.warning("host_setting_failed", setting=name, error=str(e))

    # -- handlers (reflector threads) ----------------------------------------------------------

    def on_service_add(self, obj: Obj) -> None:
        self._changed(self.trackers.services.update(None, obj))

    def on_service_update(self, old: Obj, new: Obj) -> None:
        self._changed(self.trackers.services.update(old, new))

    def on_service_delete(self, obj: Obj) -> None:
        self._changed(self.trackers.services.update(obj, None))

    def on_service_synced(self) -> None:
        self._listed("services")

    def on_endpoint_slice_add(self, obj: Obj) -> None:
        self._changed(self.trackers.slices.update(None, obj))

    def on_endpoint_slice_update(self, old: Obj, new: Obj) -> None:
        self._changed(self.trackers.slices.update(old, new))

    def on_endpoint_slice_delete(self, obj: Obj) -> None:
        self._changed(self.trackers.slices.update(obj, None))

    def on_endpoint_slice_synced(self) -> None:
        self._listed("endpointslices")

    def on_node_add(self, obj: Obj) -> None:
        self._node_event(None, obj)

    def on_node_update(self, old: Obj, new: Obj) -> None:
        self._node_event(old, new)

    def on_node_delete(self, obj: Obj) -> None:
        self._node_event(obj, None)

    def on_node_synced(self) -> None:
        self._listed("nodes")

    def _node_event(self, old: Obj | None, new: Obj | None) -> None:
        changed = self.trackers.node.update(old, new)
        self.health.set_node(self.trackers.node.node)
        self._changed(changed)

    def _listed(self, resource: str) -> None:
        with self._lock:
            self._synced.add(resource)
            ready = self._synced >= set(RESOURCES) and not self._initialized.is_set()
            if ready:
                self._initialized.set()
        if ready:
            log.info("initial_list_complete", resources=list(RESOURCES))
            self.runner.start()
            self.runner.run()  # the first (full) sync, at once

    def _changed(self, changed: bool) -> None:
        if not changed or not self._initialized.is_set():
            return  # before the first complete list the first sync will see everything anyway
        for family in self.planes:
            self.health.queued(family)
        self.metrics.last_queued_timestamp.set(self._wall())
        self.runner.run()

    # -- the sync (runner thread) --------------------------------------------------------------

    def sync(self) -> bool:
        """One sync of every family; False when it must be retried (as a full sync)."""
        started = time.perf_counter()
        started_wall = self._wall()
        snap = self.trackers.checkout()
        self._conntrack_pending = self._conntrack_pending or snap.udp_changed
        self._pending_triggers.extend(t for times in snap.trigger_times.values() for t in times)
        node = snap.state.nodes.get(self.cfg.proxy.node_name)
        reason = self._full_sync_reason(snap)
        full = bool(reason)
        now = self._clock.now()
        verify = full or now >= self._next_verify
        # Every family's view takes this checkout's changes before any family syncs: a failure
        # half-way must not leave a view behind the trackers.
        views = {f: v.update(snap.state, snap.changed, snap.slices_by_service) for f, v in self._views.items()}
        self.service_table.staged(views)
        contexts = {f: self._context(f, node) for f in self.planes}
        jobs = {f: (plane.proxier, views[f], contexts[f]) for f, plane in self.planes.items()}
        try:
            results = list(sync_families(jobs, full=full, verify=verify, synced=self.health.updated).values())
            if full and reason != "periodic" and self._iptables_canary:  # periodic: found in place
                for plane in self.planes.values():
                    plane.canary_create(plane.iptables)
                    plane.listing.expect_intact = True
        except BackendError as e:
            return self._failed(e, full, reason, started, started_wall, len(snap.changed))
        self._need_full = False
        self.service_table.synced(views, contexts, started_wall)
        if not self._first_done:
            self._first_done = True
            self._leave_other_mode()
        if full:
            self._next_periodic_full = self._clock.now() + self.cfg.proxy.sync_period
            keep_long_lived()
        if verify:
            self._next_verify = now + self.cfg.proxy.sync_period
        self.runner.run_by(self._next_verify)
        self._after_sync(snap, views, contexts, full)
        self._report_repairs(results)
        self._observe(results, snap, started, started_wall, full, reason)
        self._follow_up_if_tampered(full)
        return True

    def _leave_other_mode(self) -> None:
        if self._after_first_sync is None:
            return
        try:
            removed = self._after_first_sync()
        except BackendError as e:  # traffic flows either way: the new mode's rules are in place
            log.warning("other_mode_cleanup_failed", error=str(e))
            return
        if removed:
            log.info("other_mode_cleaned_up", removed=removed)

    def _report_repairs(self, results: list[SyncOutcome]) -> None:
        for family, result in zip(self.planes, results, strict=True):
            if not result.repairs:
                continue
            for repair in result.repairs:
                self.metrics.rules_tampered.labels(repair.kind).inc()
            log.warning("rules_tampered", family=int(family), repaired=[r.what for r in result.repairs])

    def _follow_up_if_tampered(self, full: bool) -> None:
        tampered = [p.family for p in self.planes.values() if p.listing.tampered]
        for plane in self.planes.values():
            plane.listing.tampered = False
        if tampered and not full:  # a full sync has just rewritten everything anyway
            log.warning("rules_tampered", families=[int(f) for f in tampered], repaired=[f"{CANARY_CHAIN} deleted"])
            self.metrics.rules_tampered.labels("canary").inc(len(tampered))
            self._need_full = True
            self._tamper_follow_up = True
            self.runner.run()

    def _full_sync_reason(self, snap: Checkout) -> str:
        """Why this sync must be full, or "" for a partial one."""
        if self._tamper_follow_up:
            self._tamper_follow_up = False
            return "tampered"
        if self._need_full:
            return "retry" if self._first_done else "start"
        if snap.topology_changed:
            return "topology"
        if self._canary_missing():
            return "canary"
        if self._full_every_period and self._clock.now() >= self._next_periodic_full:
            return "periodic"
        return ""

    def _context(self, family: IPFamily, node: Node | None) -> NodeContext:
        ctx = node_context(self.cfg.proxy, family, node, self._host.local_addresses(family))
        return with_primary_ip(ctx, self.cfg.bind_address)

    def _canary_missing(self) -> bool:
        now = self._clock.now()
        if not self._iptables_canary or now < self._next_canary_check:
            return False
        self._next_canary_check = now + self.cfg.proxy.sync_period
        for plane in self.planes.values():
            try:
                if not plane.canary_check(plane.iptables):
                    log.warning("canary_missing", family=int(plane.family), chain=CANARY_CHAIN)
                    return True
            except BackendError as e:
                log.warning("canary_check_failed", family=int(plane.family), error=str(e))
        return False

    def _failed(
        self, error: BackendError, full: bool, reason: str, started: float, started_wall: float, changed: int
    ) -> bool:
        self._need_full = True
        if self._iptables_canary:
            self.metrics.restore_failures.inc()
            if not full:
                self.metrics.partial_restore_failures.inc()
        else:  # a mode that writes no iptables has upstream's nftables counter instead
            self.metrics.nftables_sync_failures.inc()
        kind = "full" if full else "partial"
        self.metrics.syncs.labels(kind, "failed").inc()
        for family in self.planes:
            # Not converged: /healthz turns 503 if the retries do not succeed within the timeout.
            self.health.queued(family)
        self.syncs += 1
        elapsed = time.perf_counter() - started
        self.sync_log.add(SyncRecord(kind, reason or None, started_wall, elapsed, changed, error=str(error)))
        log.error("sync_failed", kind=kind, changed=changed, error=str(error), duration_ms=round(elapsed * 1000, 1))
        return False

    def _after_sync(
        self,
        snap: Checkout,
        views: Mapping[IPFamily, FamilyView],
        contexts: Mapping[IPFamily, NodeContext],
        full: bool,
    ) -> None:
        if self._conntrack_pending:
            self._conntrack_pending = not self._clean_conntrack(views, contexts)
        self._note_health_checked(snap, full)
        wanted = {key: port for key, (port, _) in self._health_checked.items()}
        addresses: tuple[str, ...] = ()
        if self.cfg.proxy.nodeport_addresses:
            addresses = tuple(sorted({ip for c in contexts.values() for ip in (c.nodeport_ips or ())}))
        self.hc_servers.sync_services(wanted, addresses)
        ports = {key: names for key, (_, names) in self._health_checked.items()}
        self.hc_servers.sync_endpoints(local_ready_endpoints(views.values(), ports, self.cfg.proxy.node_name))

    def _note_health_checked(self, snap: Checkout, full: bool) -> None:
        """The Services with a healthCheckNodePort, kept up to date from the changed ones (a full
        sync looks at all): walking every Service after each sync would cost what changed not."""
        if full:
            self._health_checked.clear()
        for key in snap.state.services if full else snap.changed:
            svc = snap.state.services.get(key)
            port = max((sp.health_check_node_port for sp in svc.ports), default=0) if svc is not None else 0
            if port and svc is not None:
                self._health_checked[key] = (port, tuple(sp.name for sp in svc.ports))
            else:
                self._health_checked.pop(key, None)

    def _clean_conntrack(self, views: Mapping[IPFamily, FamilyView], contexts: Mapping[IPFamily, NodeContext]) -> bool:
        ok = True
        for family, plane in self.planes.items():
            if plane.conntrack is None:
                continue
            started = time.perf_counter()
            try:
                deleted = clean_stale_udp(plane.conntrack, views[family], contexts[family])
                self.metrics.conntrack_duration.labels(family.label).observe(time.perf_counter() - started)
                self.metrics.conntrack_deleted.labels(family.label).inc(deleted)
                if deleted:
                    log.info("conntrack_cleaned", family=int(family), deleted=deleted)
            except BackendError as e:
                ok = False
                log.warning("conntrack_cleanup_failed", family=int(family), error=str(e))
        return ok

    def _observe(
        self, results: list[SyncOutcome], snap: Checkout, started: float, started_wall: float, full: bool, reason: str
    ) -> None:
        elapsed = time.perf_counter() - started
        kind_full = full or any(r.full for r in results)
        kind = "full" if kind_full else "partial"
        m = self.metrics
        m.syncs.labels(kind, "ok").inc()
        phases = Phases(*(sum(getattr(r, f"{p}_seconds") for r in results) for p in ("render", "plan", "apply")))
        m.phase_duration.labels("render").observe(phases.render)
        m.phase_duration.labels("plan").observe(phases.plan)
        m.phase_duration.labels("apply").observe(phases.apply)
        for family, result in zip(self.planes, results, strict=True):
            for table, rules in result.iptables_rules.items():
                m.iptables_rules.labels(table, family.label).set(rules)
            for table, rules in result.iptables_rules_written.items():
                m.iptables_rules_last.labels(table, family.label).set(rules)
            for what, count in result.objects.items():
                m.objects.labels(what, family.label).set(count)
        written = _summed(r.log_fields() for r in results)
        service_ports = sum(r.services for r in results)
        endpoints = sum(r.endpoints for r in results)
        self.sync_log.add(
            SyncRecord(
                kind,
                reason or None,
                started_wall,
                elapsed,
                len(snap.changed),
                phases,
                service_ports,
                endpoints,
                written,
            )
        )
        m.sync_duration.observe(elapsed)
        (m.sync_full_duration if kind_full else m.sync_partial_duration).observe(elapsed)
        now = self._wall()
        m.last_timestamp.set(now)
        for t in self._pending_triggers:
            if now >= t:
                m.network_programming.observe(now - t)
        self._pending_triggers.clear()
        # Dual stack counts a Service once per family; the larger family count is the Service count.
        m.no_local_endpoints.labels("internal").set(max((r.no_local_internal for r in results), default=0))
        m.no_local_endpoints.labels("external").set(max((r.no_local_external for r in results), default=0))
        self.syncs += 1
        log.info(
            "sync_complete",
            kind=kind,
            reason=reason or None,
            services=len(snap.state.services),
            service_ports=service_ports,
            endpoints=endpoints,
            changed=len(snap.changed),
            **written,
            render_ms=round(phases.render * 1000, 1),
            plan_ms=round(phases.plan * 1000, 1),
            apply_ms=round(phases.apply * 1000, 1),
            duration_ms=round(elapsed * 1000, 1),
        )


def _summed(fields: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in fields:
        for key, value in one.items():
            total[key] = total.get(key, 0) + value
    return total


def _file_stamp(path: str) -> tuple[int, int, int, int] | None:
    """What tells a changed file: its identity, size and modification time (None: no file)."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0, 0)
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


def local_ready_endpoints(
    views: Any, services: Mapping[tuple[str, str], Iterable[ServicePortName]], node_name: str
) -> dict[tuple[str, str], int]:
    """Ready, non-terminating endpoints on this node per Service (given with its ports), counted
    by IP (upstream's LocalReadyEndpoints: one pod serving two ports is one endpoint). Per
    family, the larger."""
    counts: dict[tuple[str, str], int] = {}
    for view in views:
        ips: dict[tuple[str, str], set[str]] = {}
        for key, names in services.items():
            for name in names:
                for ep in view.endpoints.get(name, ()):
                    if ep.ready and not ep.terminating and ep.node_name == node_name:
                        ips.setdefault(key, set()).add(ep.ip)
        for key, found in ips.items():
            counts[key] = max(counts.get(key, 0), len(found))
    return counts


def build_daemon(cfg: RunConfig, **options: Any) -> Daemon:
    """The daemon with the real kernel backends and API client for `cfg`."""
    from kproxy.sources.kube import load_client_configuration

    configuration = load_client_configuration(cfg.kubeconfig or None)
    if cfg.master:
        configuration.host = cfg.master
    mode = registry.MODES[cfg.proxy.mode]
    try:
        variant = cfg.proxy.iptables_backend or detect_variant()
    except BackendError:
        if mode.iptables:
            raise
        # A mode without iptables runs on a node without iptables too; the other modes' leave
        # then finds nothing of theirs there (or fails, logged, with traffic on the new table).
        variant = "nft"

    def leave() -> str | None:
        # Each other mode removes what only it used; the new mode's sync replaced the rest.
        found = [s for other in registry.others(mode.name) if (s := other.load().leave(variant, mode))]
        return "; ".join(found) or None

    return Daemon(
        cfg,
        real_planes(variant),
        configuration,
        metrics=ProxyMetrics(process=True),
        after_first_sync=leave,
        **options,
    )


__all__ = [
    "Daemon",
    "FamilyPlane",
    "Host",
    "RealHost",
    "build_daemon",
    "local_ready_endpoints",
    "real_planes",
]
