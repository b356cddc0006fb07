"""The per-family sync loop, one for `kproxy sync` (every mode) and `kproxy run`.

Each IP family of the kernel has its own proxier, view and node context (dual stack is one
proxier per family, not `if v6` branches); a sync runs them in order and stops at the first
backend failure, which the caller turns into a retry (the daemon) or an exit status (the
command). `synced` is told of each family done, for the daemon's health.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from kproxy.model import IPFamily

if TYPE_CHECKING:
    from kproxy.backends.protocols import ConntrackBackend
    from kproxy.modes import Proxier, SyncOutcome
    from kproxy.node import NodeContext
    from kproxy.view import FamilyView


def sync_families(
    jobs: Mapping[IPFamily, tuple[Proxier, FamilyView, NodeContext]],
    *,
    full: bool,
    verify: bool = True,
    dry_run: bool = False,
    synced: Callable[[IPFamily], None] | None = None,
) -> dict[IPFamily, SyncOutcome]:
    results: dict[IPFamily, SyncOutcome] = {}
    for family, (proxier, view, ctx) in jobs.items():
        results[family] = proxier.sync(view, ctx, full=full, verify=verify, dry_run=dry_run)
        if synced is not None:
            synced(family)
    return results


def sync_once(
    jobs: Mapping[IPFamily, tuple[Proxier, FamilyView, NodeContext]],
    *,
    dry_run: bool,
    header: Callable[[IPFamily], str],
    conntrack: Callable[[IPFamily], ConntrackBackend],
) -> str:
    """`kproxy sync` in every mode: one full sync of each family, the stale UDP flows of each
    cleaned after it (the one sync of the command is full, so some may be stale), and what to
    print: a summary line per family, or with `dry_run` the `header` line and the payload."""
    from kproxy.conntrack import clean_stale_udp

    results = sync_families(jobs, full=True, dry_run=dry_run)
    out: list[str] = []
    for family, result in results.items():
        if dry_run:
            out.append(header(family) + "\n" + result.payload)
            continue
        _, view, ctx = jobs[family]
        result.conntrack_deleted = clean_stale_udp(conntrack(family), view, ctx)
        out.append(result.summary() + "\n")
    return "".join(out)
