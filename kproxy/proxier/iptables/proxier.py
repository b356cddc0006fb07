"""Drives the iptables mode of one IP family: render, plan, one transaction.

It remembers what its last successful transaction wrote, so the next sync writes only the
chains that changed. Any failure forgets it, so the next sync is full, as upstream.

A full sync, and a partial one asked to `verify`, read the listing (chain names, rule counts of
our chains, our jumps) and hold it against what was last written: a chain someone flushed,
deleted or edited, or a jump someone removed, is written again in that same sync and reported
in `SyncResult.repairs`. Other partial syncs read nothing: they trust what they wrote (the
daemon verifies once per sync period; reading costs more than writing one chain at scale, see
docs/benchmarks.md). A sync that finds nothing changed and no drift writes nothing.

Stale UDP conntrack flows are not the proxier's: the command or the daemon deletes them after
the sync (kproxy/conntrack.py, `clean_stale_udp`), in every mode alike.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field

from kproxy.backends.host import set_sysctl
from kproxy.backends.iptables import SavedState
from kproxy.backends.protocols import IptablesBackend
from kproxy.errors import BackendError
from kproxy.model import ServicePortName
from kproxy.node import NodeContext
from kproxy.proxier.iptables import render as ipt
from kproxy.proxier.result import SyncResult as BaseResult
from kproxy.view import FamilyView, Repair, needs_route_localnet


@dataclass
class SyncResult(BaseResult):
    written: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)

    def log_fields(self) -> dict[str, int]:
        """What this sync wrote, for the daemon's ``sync_complete`` line."""
        return {"written": sum(self.written.values()), "deleted": sum(self.deleted.values())}

    def written_summary(self) -> str:
        return f"wrote {sum(self.written.values())} chains, deleted {sum(self.deleted.values())}"


class IptablesProxier:
    def __init__(self, iptables: IptablesBackend) -> None:
        self.iptables = iptables
        # What the last transaction wrote, compact (`ipt.compacted`): per-Service chains as stamps.
        self._last: ipt.Ruleset | None = None

    def force_full(self) -> None:
        self._last = None

    def render(
        self,
        view: FamilyView,
        ctx: NodeContext,
        full: bool,
        changed: Collection[ServicePortName] | None = None,
        force: Collection[ServicePortName] = (),
    ) -> ipt.Ruleset:
        if full:
            return ipt.render(view.ports, view.endpoints, ctx)
        return ipt.render(view.ports, view.endpoints, ctx, previous=self._last, changed=changed, force=force)

    def sync(
        self,
        view: FamilyView,
        ctx: NodeContext,
        *,
        full: bool = False,
        dry_run: bool = False,
        changed: Collection[ServicePortName] | None = None,
        verify: bool = True,
    ) -> SyncResult:
        """One sync. `changed` (from the change trackers) names the only Service ports whose
        objects changed since the last sync; None means "compare them all". A partial sync reads
        the kernel's listing only with `verify`."""
        full = full or self._last is None
        t0 = time.perf_counter()
        saved: SavedState | None = None
        existing: dict[str, set[str]] | None = None
        jumps: dict[str, set[tuple[str, str]]] | None = None
        if full or verify or dry_run:
            try:
                saved = self.iptables.save()
                existing, jumps = saved.chains, saved.jumps
            except BackendError:
                if not dry_run:
                    raise
                jumps = {}  # a dry run without rights still shows the full payload
        applied = None if full or self._last is None else self._last.tables
        repairs: tuple[Repair, ...] = ()
        force: set[ServicePortName] = set()
        if saved is not None and self._last is not None:
            last_jumps = ((t, b, target) for t, b, _, target, _ in self._last.jumps)
            rewrite, repairs = ipt.drift(self._last.tables, saved.chains, saved.rule_counts, last_jumps, saved.jumps)
            if applied is not None:
                applied = ipt.without(applied, rewrite)
                # Chains to write again (altered, or gone) are remembered as stamps only: their
                # Services are rendered again, whatever their inputs.
                again = {c for t, held in applied.items() for c in held if c not in saved.chains.get(t, ())}
                again |= {c for chains in rewrite.values() for c in chains}
                if again:
                    owners = self._last.owners()
                    force = {owners[c] for c in again if c in owners}
        t_listed = time.perf_counter()
        desired = self.render(view, ctx, full, changed, force)
        t1 = time.perf_counter()
        # Our jumps from built-in chains to chains this sync no longer renders (the localnet
        # firewall once localhost NodePorts are turned off) go first: a chain still jumped to
        # cannot be deleted, and the whole transaction would be refused.
        restore = ipt.plan(
            desired, applied, existing, jumps, saved_jump_rules=saved.jump_rules if saved is not None else None
        )
        t_planned = time.perf_counter()
        result = SyncResult(
            family=int(ctx.family),
            full=full,
            services=len(view.ports),
            endpoints=sum(len(e) for e in view.endpoints.values()),
            written=restore.written,
            deleted=restore.deleted,
            render_seconds=t1 - t_listed,
            # Reading the listing back is part of working out what to write.
            plan_seconds=(t_planned - t1) + (t_listed - t0),
            no_local_internal=sum(1 for r in desired.services.values() if r.no_local_internal),
            no_local_external=sum(1 for r in desired.services.values() if r.no_local_external),
            payload=restore.text,
            repairs=repairs,
            iptables_rules=desired.rule_count,
            iptables_rules_written=restore.rules_written,
        )
        if dry_run:
            return result
        try:
            if needs_route_localnet(ctx):
                set_sysctl("net/ipv4/conf/all/route_localnet", "1")
            if restore.text:
                self.iptables.restore(restore.text)
        except BackendError:
            self.force_full()
            raise
        self._last = ipt.compacted(desired)
        result.apply_seconds = time.perf_counter() - t_planned
        return result
