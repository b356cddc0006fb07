"""Change trackers: API events in, at sync time one consistent snapshot and what changed.

As upstream's ServiceChangeTracker and EndpointsChangeTracker (pkg/proxy/*changetracker.go):

- Events are converted (`kproxy.convert`) when they arrive, on the reflector's thread, so the sync
  thread only folds values. Per object key the tracker keeps the value the last snapshot saw and
  the latest pending one; an event that brings an object back to what the last snapshot saw drops
  the pending change, so a change undone before the sync costs nothing.
- Each `update` returns whether it left a change pending, which is when a sync is worth asking for.
  Of `old` only the key (metadata name and namespace) is read, and only when `new` is None, so the
  daemon's stores keep no objects (`kproxy.sources.stores.KeyStore` passes a stub).
- A malformed object is skipped: one ``object_invalid`` log line naming the object and the field,
  and ``kproxy_invalid_objects_total{kind}``. Its previous good version is **dropped**, as upstream
  treats a Service it cannot parse as gone: the API server validates what it stores, so an object
  kproxy cannot read is one it must not guess about, and keeping rules for a version that no
  longer exists would be as wrong as removing them, only less visible.
- `checkout` (sync thread) folds every pending change and returns a `Checkout`: the full
  `ClusterState`, the Services whose Service or EndpointSlices changed (drives partial syncs),
  whether a UDP Service port or UDP endpoints changed (stale conntrack entries to clear), the
  EndpointSlices' last-change-trigger-times (network programming latency; only times after the
  tracker started, so a restart does not report the age of every object), and whether this node's
  topology labels changed (full sync).

All methods are thread-safe. The trackers never call out while holding their lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from kproxy.convert import convert_node, convert_service, convert_slice
from kproxy.errors import InvalidObject
from kproxy.metrics import ProxyMetrics
from kproxy.model import ClusterState, EndpointSlice, Node, Protocol, Service

log = structlog.get_logger(__name__)

Obj = Mapping[str, Any]
ServiceKey = tuple[str, str]
SliceKey = tuple[str, str]
# Node labels whose change re-decides every topology-aware endpoint choice (upstream resyncs fully).
TOPOLOGY_LABEL_PREFIXES = ("topology.kubernetes.io/", "failure-domain.beta.kubernetes.io/")


@dataclass(frozen=True, slots=True)
class Checkout:
    """Everything one sync needs, as of one `ChangeTrackers.checkout`."""

    # The trackers' own folded maps, not copies (50,000 entries each): only a checkout changes
    # them, and only the sync thread checks out, so they hold still until its next checkout.
    # Watch threads read them under the tracker's lock meanwhile; nothing else may keep them.
    state: ClusterState
    # Services (namespace, name) whose Service or EndpointSlices changed since the last checkout.
    changed: frozenset[ServiceKey] = frozenset()
    # A UDP Service port or the endpoints of one changed: stale UDP conntrack entries may exist.
    udp_changed: bool = False
    # EndpointSlice -> last-change-trigger-times (seconds since the epoch) not yet reported.
    trigger_times: Mapping[SliceKey, tuple[float, ...]] = field(default_factory=dict)
    # This node's topology labels changed: every Service's endpoint choice may differ.
    topology_changed: bool = False
    # Anything about this node changed (addresses, pod CIDRs, labels, deletion).
    node_changed: bool = False
    # The EndpointSlices of each Service, for incremental views.
    slices_by_service: Mapping[ServiceKey, frozenset[SliceKey]] = field(default_factory=dict)


def _key(obj: Obj) -> tuple[str, str] | None:
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    return (str(meta.get("namespace") or "default"), name)


class _Pending:
    """Applied and pending values per key, with no-op folding. Callers hold the owner's lock."""

    def __init__(self) -> None:
        self.applied: dict[Any, Any] = {}
        self.pending: dict[Any, Any] = {}

    def record(self, key: Any, new: Any) -> bool:
        """Record the latest value (None: gone); True when a change is left pending."""
        seen = self.applied.get(key)
        if new == seen:
            self.pending.pop(key, None)  # back to what the last sync saw: nothing to do
            return False
        self.pending[key] = new
        return True


class _Tracker:
    kind = ""

    def __init__(self, metrics: ProxyMetrics | None) -> None:
        self._lock = threading.Lock()
        self._metrics = metrics
        self._values = _Pending()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._values.pending)

    def _invalid(self, error: InvalidObject) -> None:
        log.warning("object_invalid", kind=self.kind, object=error.ref, field=error.field, reason=error.reason)
        if self._metrics is not None:
            self._metrics.invalid_objects.labels(self.kind).inc()


class ServiceChangeTracker(_Tracker):
    kind = "Service"

    def __init__(self, metrics: ProxyMetrics | None = None, *, service_proxy_name: str = "") -> None:
        super().__init__(metrics)
        self._proxy_name = service_proxy_name

    def update(self, old: Obj | None, new: Obj | None) -> bool:
        """A Service was added (old None), changed, or deleted (new None)."""
        key = _key(new if new is not None else old or {})
        if key is None:
            return False
        value: Service | None = None
        if new is not None:
            try:
                value = convert_service(new, service_proxy_name=self._proxy_name)
            except InvalidObject as e:
                self._invalid(e)
        with self._lock:
            changed = self._values.record(key, value)
            pending = len(self._values.pending)
        if self._metrics is not None:
            self._metrics.service_changes_total.inc()
            self._metrics.service_changes_pending.set(pending)
        return changed

    def _fold(self) -> tuple[dict[ServiceKey, Service], set[ServiceKey], bool]:
        with self._lock:
            changes, self._values.pending = self._values.pending, {}
            udp = False
            for key, value in changes.items():
                before = self._values.applied.get(key)
                udp = udp or _has_udp(before) or _has_udp(value)
                if value is None:
                    self._values.applied.pop(key, None)
                else:
                    self._values.applied[key] = value
            services = self._values.applied
        if self._metrics is not None:
            self._metrics.service_changes_pending.set(0)
        return services, set(changes), udp


def _has_udp(value: Service | EndpointSlice | None) -> bool:
    return value is not None and any(p.protocol is Protocol.UDP for p in value.ports)


@dataclass(frozen=True, slots=True)
class _SliceFold:
    slices: dict[SliceKey, EndpointSlice]
    services: set[ServiceKey]
    udp: bool
    triggers: dict[SliceKey, tuple[float, ...]]
    index: dict[ServiceKey, frozenset[SliceKey]]


class EndpointSliceChangeTracker(_Tracker):
    kind = "EndpointSlice"

    def __init__(self, metrics: ProxyMetrics | None = None, *, wall_clock: Callable[[], float] = time.time) -> None:
        super().__init__(metrics)
        self._started = wall_clock()
        self._triggers: dict[SliceKey, list[float]] = {}
        self._by_service: dict[ServiceKey, frozenset[SliceKey]] = {}

    def update(self, old: Obj | None, new: Obj | None) -> bool:
        """An EndpointSlice was added (old None), changed, or deleted (new None)."""
        key = _key(new if new is not None else old or {})
        if key is None:
            return False
        value: EndpointSlice | None = None
        if new is not None:
            try:
                value = convert_slice(new)
            except InvalidObject as e:
                self._invalid(e)
        with self._lock:
            changed = self._values.record(key, value)
            if not changed:
                self._triggers.pop(key, None)  # its changes cancelled out: nothing was programmed
            elif value is not None and value.trigger_time is not None and value.trigger_time >= self._started:
                self._triggers.setdefault(key, []).append(value.trigger_time)
            pending = len(self._values.pending)
        if self._metrics is not None:
            self._metrics.endpoint_changes_total.inc()
            self._metrics.endpoint_changes_pending.set(pending)
        return changed

    def _fold(self) -> _SliceFold:
        with self._lock:
            changes, self._values.pending = self._values.pending, {}
            triggers, self._triggers = self._triggers, {}
            services: set[ServiceKey] = set()
            udp = False
            for key, value in changes.items():
                before = self._values.applied.get(key)
                udp = udp or _has_udp(before) or _has_udp(value)
                for es in (before, value):
                    if es is not None:
                        services.add(es.service_key)
                if before is not None:
                    self._unindex(before.service_key, key)
                if value is None:
                    self._values.applied.pop(key, None)
                else:
                    self._values.applied[key] = value
                    indexed = self._by_service.get(value.service_key, frozenset())
                    self._by_service[value.service_key] = indexed | {key}
            fold = _SliceFold(
                slices=self._values.applied,
                services=services,
                udp=udp,
                triggers={k: tuple(v) for k, v in triggers.items()},
                index=self._by_service,
            )
        if self._metrics is not None:
            self._metrics.endpoint_changes_pending.set(0)
        return fold

    def _unindex(self, service: ServiceKey, key: SliceKey) -> None:
        rest = self._by_service.get(service, frozenset()) - {key}
        if rest:
            self._by_service[service] = rest
        else:
            self._by_service.pop(service, None)


class NodeTracker(_Tracker):
    """This node's Node object (the reflector's field selector names only it)."""

    kind = "Node"

    def __init__(self, node_name: str, metrics: ProxyMetrics | None = None) -> None:
        super().__init__(metrics)
        self.node_name = node_name
        self._node: Node | None = None
        self._changed = False
        self._topology_changed = False

    def update(self, old: Obj | None, new: Obj | None) -> bool:
        """True when the node changed in a way a sync must see."""
        value: Node | None = None
        if new is not None:
            meta = new.get("metadata") or {}
            if meta.get("name") != self.node_name:
                return False
            try:
                value = convert_node(new)
            except InvalidObject as e:
                self._invalid(e)
        with self._lock:
            before, self._node = self._node, value
            if value == before:
                return False
            if _topology(before) != _topology(value):
                self._topology_changed = True
            self._changed = True
            return True

    @property
    def node(self) -> Node | None:
        with self._lock:
            return self._node

    def _fold(self) -> tuple[Node | None, bool, bool]:
        with self._lock:
            changed, self._changed = self._changed, False
            topology, self._topology_changed = self._topology_changed, False
            return self._node, changed, topology


def _topology(node: Node | None) -> tuple[tuple[str, str], ...]:
    if node is None:
        return ()
    return tuple((k, v) for k, v in node.labels if k.startswith(TOPOLOGY_LABEL_PREFIXES))


class ChangeTrackers:
    """The three trackers of one daemon, and the one `checkout` the sync thread calls."""

    def __init__(
        self,
        node_name: str,
        metrics: ProxyMetrics | None = None,
        *,
        service_proxy_name: str = "",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.services = ServiceChangeTracker(metrics, service_proxy_name=service_proxy_name)
        self.slices = EndpointSliceChangeTracker(metrics, wall_clock=wall_clock)
        self.node = NodeTracker(node_name, metrics)

    def checkout(self) -> Checkout:
        services, changed_services, udp_services = self.services._fold()
        sf = self.slices._fold()
        node, node_changed, topology_changed = self.node._fold()
        return Checkout(
            state=ClusterState(
                services=services,
                slices=sf.slices,
                nodes={node.name: node} if node is not None else {},
            ),
            changed=frozenset(changed_services | sf.services),
            udp_changed=udp_services or sf.udp,
            trigger_times=sf.triggers,
            topology_changed=topology_changed,
            node_changed=node_changed,
            slices_by_service=sf.index,
        )
