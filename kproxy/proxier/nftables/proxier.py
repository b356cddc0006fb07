"""Drives the nftables mode of one IP family: render, plan, one transaction.

It remembers what its last committed transaction put in the kernel (plan.Applied: the rendered
per-Service objects, shared with the render's reuse, and who claims each map and set key), so
the next sync writes only what changed; nothing is read back. Any failure forgets it, so the
next sync is full, and a full sync replaces the whole table in one transaction: that is also
what repairs a table someone deleted or flushed.

A verifying sync (the daemon asks for one per sync period) first checks for drift, cheaply: the
kernel's ruleset generation, read right after our own commit, unchanged means nobody committed
anything since (one netlink round trip). Only when it moved are the table's counts read back
over netlink (drift.py: rules per chain, elements per map; never `nft list`), and anything astray
makes this sync full, with a `Repair` per finding for the daemon's ``rules_tampered`` line.

Stale UDP conntrack flows are the caller's (kproxy/conntrack.py), as in every mode.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass

from kproxy.backends.protocols import NftablesBackend
from kproxy.errors import BackendError
from kproxy.model import ServicePortName
from kproxy.node import NodeContext
from kproxy.proxier.nftables import drift
from kproxy.proxier.nftables import plan as nftplan
from kproxy.proxier.nftables import render as nft
from kproxy.proxier.nftables.names import TABLE
from kproxy.proxier.result import SyncResult as BaseResult
from kproxy.view import FamilyView, Repair


@dataclass
class SyncResult(BaseResult):
    chains_written: int = 0
    chains_deleted: int = 0
    elements_added: int = 0
    elements_deleted: int = 0

    def log_fields(self) -> dict[str, int]:
        return {
            "written": self.chains_written,
            "deleted": self.chains_deleted,
            "elements_added": self.elements_added,
            "elements_deleted": self.elements_deleted,
        }

    def written_summary(self) -> str:
        return (
            f"{'full' if self.full else 'partial'} nft transaction: wrote {self.chains_written} chains, "
            f"deleted {self.chains_deleted}, elements +{self.elements_added} -{self.elements_deleted}"
        )


class NftablesProxier:
    def __init__(self, nft_backend: NftablesBackend) -> None:
        self.nft = nft_backend
        self._last: nft.Ruleset | None = None
        self._applied: nftplan.Applied | None = None
        # The generation our last commit left (None: someone else committed around it), and
        # our table's handle once seen intact (a full sync makes a new table).
        self._quiet_generation: int | None = None
        self._handle: int | None = None
        self._elements = 0  # map and set elements the committed transactions left

    def force_full(self) -> None:
        self._last = None
        self._applied = None
        self._quiet_generation = None
        self._handle = None

    def check_drift(self, family: str) -> list[Repair]:
        """What someone else changed in our table since our last commit; [] when nothing."""
        if self._last is None or self._applied is None:
            return []
        if self._quiet_generation is not None and self.nft.generation() == self._quiet_generation:
            return []
        want = drift.expected(self._last, self._applied)
        found = self.nft.probe(family, TABLE, want.elements)
        repairs = drift.compare(want, found, family, TABLE, self._handle)
        if not repairs:
            self._quiet_generation, self._handle = found.generation, found.handle
        return repairs

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
        objects changed since the last sync; None compares them all (by identity first)."""
        t0 = time.perf_counter()
        repairs: list[Repair] = []
        if verify and not full and not dry_run:
            repairs = self.check_drift(nft.nft_family(ctx.family))
            if repairs:
                self.force_full()
        t_checked = time.perf_counter()
        full = full or self._applied is None
        previous = None if full else self._last
        if changed is None:
            changed = view.changed
        if previous is None or previous.ctx != ctx:
            changed = None  # another node context re-renders every Service port: plan them all
        desired = nft.render(
            view.ports, view.endpoints, ctx, previous=previous, changed=None if full else changed, in_place=not dry_run
        )
        t1 = time.perf_counter()
        applied = None if full else self._applied
        script = nftplan.plan(desired, applied, None if full else changed)
        t_planned = time.perf_counter()
        result = SyncResult(
            family=int(ctx.family),
            full=script.full,
            services=len(view.ports),
            endpoints=desired.endpoint_count,
            render_seconds=t1 - t_checked,
            plan_seconds=(t_planned - t1) + (t_checked - t0),  # the drift check reads, to plan
            no_local_internal=desired.no_local_internal,
            no_local_external=desired.no_local_external,
            payload=script.text,
            chains_written=script.chains_written,
            chains_deleted=script.chains_deleted,
            elements_added=script.elements_added,
            elements_deleted=script.elements_deleted,
            repairs=tuple(repairs),
        )
        if dry_run:
            return result
        try:
            if script.text:
                before = self.nft.generation()
                self.nft.apply(script.text)
                after = self.nft.generation()
                # One step: ours alone. More: someone committed around it; the next check reads.
                self._quiet_generation = after if after == before + 1 else None
                if script.full:
                    self._handle = None
        except BackendError:
            self.force_full()
            raise
        self._applied = nftplan.committed(desired, applied, script)
        self._last = desired
        result.apply_seconds = time.perf_counter() - t_planned
        # Held elements follow from what each commit added and deleted (a full one adds them all).
        self._elements = script.elements_added + (0 if script.full else self._elements - script.elements_deleted)
        result.objects = {"chain": desired.chain_count, "rule": desired.rule_count, "element": self._elements}
        return result
