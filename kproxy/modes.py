"""The data-plane modes: what the command line, the daemon, the configuration and cleanup ask
instead of naming a mode.

A mode is one `ModeInfo` line in `MODES` (plain data: its name, the KubeProxyConfiguration
section it reads, whether it reads everything back once per sync period) and one object that
implements `DataPlaneMode`, named by ``module:attribute`` and imported on first use, so that
loading the configuration or the command line imports no mode's backends. Adding a mode is one
package plus one line here.

`Proxier` and `SyncOutcome` are what every mode's per-family proxier offers the daemon; a
mode's own result type adds its fields (`log_fields` carries them into the sync's log line).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from kproxy.config import RunConfig
    from kproxy.model import ClusterState, IPFamily, ServicePortName
    from kproxy.node import NodeContext
    from kproxy.status import KernelObject
    from kproxy.view import FamilyView, Repair


class SyncOutcome(Protocol):
    """What the daemon reads of one family's sync result, in every mode."""

    full: bool
    services: int
    endpoints: int
    render_seconds: float
    plan_seconds: float
    apply_seconds: float
    no_local_internal: int
    no_local_external: int
    repairs: tuple[Repair, ...]
    payload: str  # what a dry run would write, in the mode's own text form
    conntrack_deleted: int  # stale UDP flows deleted after the sync (kproxy sync fills it in)
    iptables_rules: dict[str, int]  # rules in our chains per table after the sync (iptables mode)
    iptables_rules_written: dict[str, int]  # of those, the ones this sync wrote
    objects: dict[str, int]  # the mode's own kernel objects after the sync, by kind

    def log_fields(self) -> dict[str, int]: ...

    def summary(self) -> str:
        """One line for `kproxy sync`."""
        ...


class Proxier(Protocol):
    """One IP family's proxier: `sync` renders the view, plans against what it last wrote (and,
    when `full` or `verify`, against what the kernel holds) and applies the difference, or with
    `dry_run` only says what it would write (the result's `payload`)."""

    def sync(
        self, view: FamilyView, ctx: NodeContext, *, full: bool = False, verify: bool = True, dry_run: bool = False
    ) -> SyncOutcome: ...

    def force_full(self) -> None: ...


@runtime_checkable
class DataPlaneMode(Protocol):
    """Everything a mode does that is not the daemon's loop; see each implementation."""

    def proxier(self, family: IPFamily, cfg: RunConfig, iptables: Any) -> Proxier:
        """The proxier of one family over the real kernel, writing iptables through `iptables`
        (the daemon hands a view that hides its canary). Used from the calling thread only."""
        ...

    def sync_once(self, cfg: RunConfig, state: ClusterState, *, dry_run: bool) -> str:
        """`kproxy sync`: one full sync of every family of this kernel; what to print (a summary
        per family, or the dry-run text)."""
        ...

    def trace(
        self,
        cfg: RunConfig,
        state: ClusterState,
        family: IPFamily,
        host: tuple[str, ...],
        packet: tuple[str, str, int, str, str],
    ) -> list[str]:
        """`kproxy trace`: the rules `packet` (src, dst, port, proto, iface) meets, explained."""
        ...

    def describe(
        self, cfg: RunConfig, view: FamilyView, ctx: NodeContext
    ) -> Mapping[ServicePortName, Sequence[KernelObject]]:
        """`kproxy status`, `/debug/services`: the kernel objects each Service port of `view`
        needs, named from the mode's own render of it (pure)."""
        ...

    def check(self, cfg: RunConfig, family: IPFamily, expected: Sequence[KernelObject], complete: bool) -> list[str]:
        """`kproxy status --check`: read this kernel's objects of `family` (names, keys and counts,
        never rule text) and name each difference from `expected`; objects nobody expects too
        when `complete` (`expected` covers every Service). Empty when they agree."""
        ...

    def cleanup(self, upstream: bool) -> str | None:
        """`kproxy cleanup`: remove what only this mode creates beyond the `KPROXY-` chains
        (which cleanup removes for every mode); a summary, or None when there is nothing such."""
        ...

    def leave(self, variant: str, successor: ModeInfo) -> str | None:
        """Once `successor` has taken the node over (after its first sync): remove what only
        this mode used and the new mode's sync did not replace. None when none was found."""
        ...


@dataclass(frozen=True)
class ModeInfo:
    name: str  # --proxy-mode / mode
    section: str  # the KubeProxyConfiguration section holding its syncPeriod and minSyncPeriod
    # Fields (or `section.` prefixes) only this mode reads; named in a warning in the others.
    own_fields: tuple[str, ...]
    # Read everything back (and write what drifted) once per sync period, as upstream's IPVS mode
    # does on every sync: some of its kernel state is only seen by a full read.
    periodic_full: bool
    implementation: str  # "module:attribute" of its DataPlaneMode
    # Writes `KPROXY-` chains in iptables, and so keeps the daemon's iptables canary there. A mode
    # that does not (nftables) checks its own objects for drift, and on taking a node over has the
    # iptables chains another mode left removed.
    iptables: bool = True
    # Fields another mode reads too but this one does not (named in its warning when set).
    ignores: tuple[str, ...] = ()

    def load(self) -> DataPlaneMode:
        return _load(self.implementation)

    def owns(self, path: str) -> bool:
        return any(path == f or (f.endswith(".") and path.startswith(f)) for f in self.own_fields)


# kube-proxy's modes; a name here but not in MODES is refused with a message that says so.
KNOWN = ("iptables", "ipvs", "nftables")

MODES: dict[str, ModeInfo] = {
    m.name: m
    for m in (
        ModeInfo(
            "iptables",
            "iptables",
            ("iptables.syncPeriod", "iptables.minSyncPeriod"),
            periodic_full=False,
            implementation="kproxy.proxier.iptables.mode:MODE",
        ),
        ModeInfo("ipvs", "ipvs", ("ipvs.",), periodic_full=True, implementation="kproxy.proxier.ipvs.mode:MODE"),
        ModeInfo(
            "nftables",
            "nftables",
            ("nftables.",),
            periodic_full=False,
            implementation="kproxy.proxier.nftables.mode:MODE",
            iptables=False,
            # Its own section's masquerade fields instead (the flags still win); no localhost NodePorts.
            ignores=("iptables.masqueradeBit", "iptables.masqueradeAll", "iptables.localhostNodePorts"),
        ),
    )
}
DEFAULT = "iptables"


def names() -> tuple[str, ...]:
    return tuple(MODES)


def others(name: str) -> Sequence[ModeInfo]:
    """Every registered mode but `name`: the ones whose leftovers a new mode removes."""
    return [m for m in MODES.values() if m.name != name]


@cache
def _load(where: str) -> DataPlaneMode:
    module, _, attribute = where.partition(":")
    mode = getattr(importlib.import_module(module), attribute)
    if not isinstance(mode, DataPlaneMode):
        raise TypeError(f"{where} does not implement DataPlaneMode")
    return mode
