"""hostPort on edge nodes: the driver that programs `hostport_rules` into this network namespace.

`HostPortSyncer.sync` takes the Pods of this node and its Node object, and makes the kernel hold
exactly the hostPort rules for them — or none at all when the node does not match the edge
selector. Per IP family it reads the node's addresses over netlink, renders, reads back only
chain names and the order of the jumps in the built-in chains, and applies one
``iptables-restore --noflush`` transaction when anything differs. Side effects, as the CNI
portmap plugin has them: ``route_localnet=1`` on the interface towards a pod mapped on
127.0.0.1 (IPv4), and UDP conntrack entries to a hostPort deleted when its mapping appears or
changes target. Conflicting claims are logged (``hostport_conflict``, once while they last),
counted (``kproxy_hostport_conflicts``) and posted as Events on the losing Pod.

`HostPortDaemon` is the long-running form: it watches this node's Node object and its Pods
(field selectors ``metadata.name`` and ``spec.nodeName``), syncs through a bounded-frequency
runner (coalesced, at most one sync per `min_sync_period`, retried with backoff after a refused
transaction) and re-checks every `address_poll` seconds, so a changed node address is picked up
and a flushed ruleset restored (a full comparison with the kernel every `sync_period`).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from kproxy.backends.conntrack import Conntrack
from kproxy.backends.host import set_sysctl
from kproxy.backends.iptables import Iptables, detect_variant
from kproxy.backends.netdev import addresses_by_device, output_device
from kproxy.errors import BackendError, InvalidObject
from kproxy.families import kernel_families
from kproxy.hostport import rules as hr
from kproxy.ingress.events import Problem, Recorder
from kproxy.ingress.metrics import HostPortMetrics
from kproxy.ingress.selector import LabelSelector
from kproxy.model import IPFamily, Protocol

log = structlog.get_logger(__name__)

Obj = dict[str, Any]


@dataclass
class HostPortResult:
    edge: bool
    mappings: tuple[hr.PortMapping, ...] = ()
    conflicts: tuple[hr.Conflict, ...] = ()
    rejected: list[InvalidObject] = field(default_factory=list)
    unmapped: tuple[str, ...] = ()
    plans: dict[IPFamily, hr.Plan] = field(default_factory=dict)
    rules: dict[IPFamily, hr.HostPortRules] = field(default_factory=dict)
    udp_flushed: int = 0

    @property
    def changed(self) -> bool:
        return any(p.text for p in self.plans.values())

    def summary(self) -> str:
        fams = ", ".join(
            f"IPv{int(f)}: {sum(1 for m in self.mappings if m.family is f)} mappings, "
            f"{'wrote ' + str(len(p.written)) + ' chains, deleted ' + str(len(p.deleted)) if p.text else 'unchanged'}"
            for f, p in sorted(self.plans.items())
        )
        edge = "edge node" if self.edge else "not an edge node (no hostPort rules)"
        extra = f"; {len(self.conflicts)} conflicts" if self.conflicts else ""
        extra += f"; {self.udp_flushed} UDP flows flushed" if self.udp_flushed else ""
        return f"{edge}; {fams}{extra}"


def is_edge(node: Mapping[str, Any] | None, selector: LabelSelector) -> bool:
    """Whether this node gets hostPort rules. Without its Node object only the empty selector
    (everything) matches: labels that cannot be read match nothing."""
    if node is None:
        return not selector.requirements
    labels = (node.get("metadata") or {}).get("labels") or {}
    return selector.matches({str(k): str(v) for k, v in labels.items()})


def pods_of_node(pods: Iterable[Mapping[str, Any]], node_name: str) -> list[Mapping[str, Any]]:
    return [p for p in pods if p.get("kind", "Pod") == "Pod" and (p.get("spec") or {}).get("nodeName") == node_name]


class HostPortSyncer:
    """Programs hostPorts into the current network namespace, one transaction per family."""

    def __init__(
        self,
        node_name: str,
        selector: LabelSelector,
        *,
        variant: str = "",
        families: Iterable[IPFamily] | None = None,
        conntrack: bool = True,
        metrics: HostPortMetrics | None = None,
        recorder: Recorder | None = None,
        sync_period: float = 30.0,
    ) -> None:
        self.node_name = node_name
        self.selector = selector
        self._variant = variant
        self._families = tuple(families) if families is not None else kernel_families()
        self._conntrack = conntrack
        self.metrics = metrics if metrics is not None else HostPortMetrics()
        self.recorder = recorder if recorder is not None else Recorder(None)
        self._sync_period = sync_period
        self._applied: dict[IPFamily, hr.HostPortRules | None] = {}
        self._mapped: dict[IPFamily, tuple[hr.PortMapping, ...]] = {}
        self._checked_at: dict[IPFamily, float] = {}
        self._conflicts_logged: set[str] = set()
        self._lock = threading.Lock()

    def _iptables(self, family: IPFamily) -> Iptables:
        if not self._variant:
            self._variant = detect_variant()
        return Iptables(family, self._variant)

    def sync(
        self,
        pods: Iterable[Mapping[str, Any]],
        node: Mapping[str, Any] | None,
        *,
        dry_run: bool = False,
        force: bool = False,
    ) -> HostPortResult:
        """Make the kernel match `pods` (this node's) and `node`. Raises `BackendError` when a
        family's transaction is refused (the other family is still programmed first); the
        refused family's next sync is a full one."""
        with self._lock:
            return self._sync(pods, node, dry_run=dry_run, force=force)

    def _sync(
        self, pods: Iterable[Mapping[str, Any]], node: Mapping[str, Any] | None, *, dry_run: bool, force: bool
    ) -> HostPortResult:
        edge = is_edge(node, self.selector)
        result = HostPortResult(edge=edge)
        parsed: list[hr.PodPorts] = []
        for obj in pods_of_node(pods, self.node_name):
            try:
                p = hr.parse_pod(obj)
            except InvalidObject as e:
                result.rejected.append(e)
                continue
            if p is not None:
                parsed.append(p)
        resolved = hr.resolve(parsed) if edge else hr.Resolved((), (), ())
        result.mappings, result.conflicts, result.unmapped = resolved.mappings, resolved.conflicts, resolved.unmapped
        self._report_conflicts(resolved.conflicts, dry_run)

        by_device = addresses_by_device()
        failures: list[BackendError] = []
        for family in self._families:
            ipt = self._iptables(family)
            addresses = hr.node_addresses(by_device, family)
            desired = hr.render(resolved.mappings, family, addresses)
            result.rules[family] = desired
            applied = self._applied.get(family)
            now = time.monotonic()
            if (
                not dry_run
                and not force
                and applied is not None
                and applied == desired
                and now - self._checked_at.get(family, 0.0) < self._sync_period
            ):
                result.plans[family] = hr.Plan("")
                continue
            try:
                saved = ipt.save(("nat", "filter"), prefixes=("KPROXY-", "KUBE-"))
                view = hr.KernelView(saved.chains, saved.jump_rules)
            except BackendError:
                if not dry_run:
                    raise
                view = hr.KernelView({}, {})
            the_plan = hr.plan(desired, view, None if force else applied)
            result.plans[family] = the_plan
            if dry_run:
                continue
            mapped = tuple(m for m in resolved.mappings if m.family is family)
            try:
                if family is IPFamily.V4:
                    self._route_localnet(mapped)
                ipt.restore(the_plan.text)
            except BackendError as e:
                self._applied[family] = None
                self.metrics.sync_failures.inc()
                log.error("hostport_sync_failed", family=int(family), error=str(e))
                failures.append(e)
                continue
            self._applied[family] = desired
            self._checked_at[family] = now
            if the_plan.text:
                self.metrics.syncs.inc()
            self.metrics.mappings.labels(f"IPv{int(family)}").set(len(mapped))
            previous = self._mapped.get(family, ())
            self._mapped[family] = mapped
            if self._conntrack:
                result.udp_flushed += self._flush_udp(family, previous, mapped, addresses)
        self.metrics.edge.set(1 if edge else 0)
        self.metrics.conflicts.set(len(resolved.conflicts))
        if result.changed and not dry_run:
            log.info(
                "hostport_synced",
                edge=edge,
                mappings=len(resolved.mappings),
                conflicts=len(resolved.conflicts),
                written=sum(len(p.written) for p in result.plans.values()),
                deleted=sum(len(p.deleted) for p in result.plans.values()),
                udp_flushed=result.udp_flushed,
            )
        if failures:
            raise failures[0]
        return result

    def _route_localnet(self, mapped: Iterable[hr.PortMapping]) -> None:
        # 127.0.0.1:hostPort → pod: the DNATed packet keeps its loopback source until
        # POSTROUTING masquerades it, and the routing code drops it as a martian on the way out
        # unless route_localnet is on for the outgoing interface (only that one, not "all").
        devices = {output_device(m.pod_ip) for m in mapped if m.localhost}
        for dev in sorted(d for d in devices if d and d != "lo"):
            if set_sysctl(f"net/ipv4/conf/{dev}/route_localnet", "1"):
                log.info("hostport_route_localnet", device=dev)

    def _flush_udp(
        self,
        family: IPFamily,
        before: tuple[hr.PortMapping, ...],
        after: tuple[hr.PortMapping, ...],
        addresses: tuple[str, ...],
    ) -> int:
        ports = set(hr.udp_ports_to_flush(before, after))
        if not ports:
            return 0
        nets = [ipaddress.ip_network(a if "/" in a else f"{a}/{int(family.host_bits)}") for a in addresses]
        nets += [ipaddress.ip_network(m.host_ip) for m in after if m.host_ip]
        ct = Conntrack(family)
        try:
            flows = [
                f
                for f in ct.list(Protocol.UDP)
                if f.orig_dport in ports and any(ipaddress.ip_address(f.orig_dst) in n for n in nets)
            ]
            deleted = ct.delete(flows)
        except BackendError as e:  # as portmap: a failed flush is logged, the mapping stays
            log.warning("hostport_conntrack_flush_failed", family=int(family), error=str(e))
            return 0
        self.metrics.udp_flows_flushed.inc(deleted)
        return deleted

    def _report_conflicts(self, conflicts: tuple[hr.Conflict, ...], dry_run: bool) -> None:
        texts = {str(c) for c in conflicts}
        for c in conflicts:
            if str(c) not in self._conflicts_logged:
                log.warning(
                    "hostport_conflict",
                    pod=f"{c.loser.pod.namespace}/{c.loser.pod.name}",
                    field=c.loser.field,
                    claim=str(c.loser),
                    holder=f"{c.winner.pod.namespace}/{c.winner.pod.name}",
                )
        self._conflicts_logged = texts
        if dry_run:
            return
        self.recorder.report(
            Problem("Pod", c.loser.pod.namespace, c.loser.pod.name, "HostPortConflict", str(c)) for c in conflicts
        )


class HostPortDaemon:
    """Watch this node and its pods; keep the hostPort rules in step (see the module docstring)."""

    def __init__(
        self,
        configuration: Any,
        syncer: HostPortSyncer,
        *,
        min_sync_period: float = 1.0,
        address_poll: float = 5.0,
    ) -> None:
        from kproxy.runner import BoundedFrequencyRunner
        from kproxy.sources.kube import NODES, PODS, informer, name_selector, node_pods_selector

        self.syncer = syncer
        name = syncer.node_name
        self._node_reflector, self._node_store = informer(
            NODES, configuration, self, field_selector=name_selector(name)
        )
        self._pod_reflector, self._pod_store = informer(
            PODS, configuration, self, field_selector=node_pods_selector(name)
        )
        self._synced = {"node": threading.Event(), "pod": threading.Event()}
        self.runner = BoundedFrequencyRunner(
            "hostports",
            self._run,
            min_interval=min_sync_period,
            max_interval=address_poll,
            retry_interval=max(min_sync_period, 0.5),
        )
        self.last_result: HostPortResult | None = None
        self.last_error: BaseException | None = None
        self.synced_once = threading.Event()

    # handlers (reflector threads): only request a sync
    def on_pod_add(self, obj: Obj) -> None:
        self.runner.run()

    def on_pod_update(self, old: Obj, new: Obj) -> None:
        self.runner.run()

    def on_pod_delete(self, obj: Obj) -> None:
        self.runner.run()

    def on_pod_synced(self) -> None:
        self._synced["pod"].set()
        self.runner.run()

    on_node_add = on_pod_add
    on_node_update = on_pod_update
    on_node_delete = on_pod_delete

    def on_node_synced(self) -> None:
        self._synced["node"].set()
        self.runner.run()

    def _run(self) -> bool:
        if not all(e.is_set() for e in self._synced.values()):
            return True  # nothing is programmed before the first complete list of both
        node = self._node_store.get(self.syncer.node_name)
        try:
            self.last_result = self.syncer.sync(self._pod_store.objects(), node)
        except BackendError as e:
            self.last_error = e
            return False
        self.last_error = None
        self.synced_once.set()
        return True

    def start(self) -> None:
        self._node_reflector.start()
        self._pod_reflector.start()
        self.runner.start()

    def stop(self) -> None:
        self.runner.stop(timeout=30)
        self._pod_reflector.stop()
        self._node_reflector.stop()

    @property
    def crashed(self) -> BaseException | None:
        return self.runner.error or self._node_reflector.error or self._pod_reflector.error
