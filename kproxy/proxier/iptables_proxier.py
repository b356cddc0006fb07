"""Drives the iptables mode of one IP family: render, plan, one transaction, conntrack cleanup.

It remembers what its last successful transaction wrote, so the next sync writes only the
chains that changed. Any failure forgets it, so the next sync is full, as upstream.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field

from kproxy import conntrack as ct_policy
from kproxy.backends.conntrack import Conntrack
from kproxy.backends.host import set_sysctl
from kproxy.backends.iptables import Iptables
from kproxy.errors import BackendError
from kproxy.model import ServicePortName
from kproxy.proxier import iptables as ipt
from kproxy.proxier.base import FamilyView, needs_route_localnet
from kproxy.proxier.context import NodeContext


@dataclass
class SyncResult:
    family: int
    full: bool
    services: int
    endpoints: int
    written: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    render_seconds: float = 0.0
    apply_seconds: float = 0.0
    conntrack_deleted: int = 0
    no_local_internal: int = 0
    no_local_external: int = 0
    payload: str = ""

    def log_fields(self) -> dict[str, int]:
        """What this sync wrote, for the daemon's ``sync_complete`` line."""
        return {"written": sum(self.written.values()), "deleted": sum(self.deleted.values())}


class IptablesProxier:
    def __init__(self, iptables: Iptables, conntrack: Conntrack | None) -> None:
        self.iptables = iptables
        self.conntrack = conntrack
        self._last: ipt.Ruleset | None = None
        self._applied: dict[str, ipt.Chains] | None = None

    def force_full(self) -> None:
        self._last = None
        self._applied = None

    def render(
        self, view: FamilyView, ctx: NodeContext, full: bool, changed: Collection[ServicePortName] | None = None
    ) -> ipt.Ruleset:
        if full:
            return ipt.render(view.ports, view.endpoints, ctx)
        return ipt.render(view.ports, view.endpoints, ctx, previous=self._last, changed=changed)

    def sync(
        self,
        view: FamilyView,
        ctx: NodeContext,
        *,
        full: bool = False,
        dry_run: bool = False,
        changed: Collection[ServicePortName] | None = None,
    ) -> SyncResult:
        """One sync. `changed` (from the change trackers) names the only Service ports whose
        objects changed since the last sync; None means "compare them all"."""
        full = full or self._applied is None
        t0 = time.perf_counter()
        desired = self.render(view, ctx, full, changed)
        t1 = time.perf_counter()
        try:
            saved = self.iptables.save()
            existing, jumps = saved.chains, saved.jumps
        except BackendError:
            if not dry_run:
                raise
            existing, jumps = None, {}  # a dry run without rights still shows the full payload
        restore = ipt.plan(desired, None if full else self._applied, existing, jumps)
        result = SyncResult(
            family=int(ctx.family),
            full=full,
            services=len(view.ports),
            endpoints=sum(len(e) for e in view.endpoints.values()),
            written=restore.written,
            deleted=restore.deleted,
            render_seconds=t1 - t0,
            no_local_internal=sum(1 for r in desired.services.values() if r.no_local_internal),
            no_local_external=sum(1 for r in desired.services.values() if r.no_local_external),
            payload=restore.text,
        )
        if dry_run:
            return result
        try:
            if needs_route_localnet(ctx):
                set_sysctl("net/ipv4/conf/all/route_localnet", "1")
            self.iptables.restore(restore.text)
        except BackendError:
            self.force_full()
            raise
        self._last = desired
        self._applied = {t: dict(c) for t, c in desired.tables.items()}
        result.apply_seconds = time.perf_counter() - t1
        if self.conntrack is not None:
            flows = self.conntrack.list()
            result.conntrack_deleted = self.conntrack.delete(
                ct_policy.stale_flows(flows, view.ports, view.endpoints, _local_ips(ctx))
            )
        return result


def _local_ips(ctx: NodeContext) -> tuple[str, ...]:
    return ctx.nodeport_ips if ctx.nodeport_ips is not None else ctx.local_ips
