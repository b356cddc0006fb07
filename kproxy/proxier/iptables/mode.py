"""The iptables mode behind the registry: its proxier for the daemon, `kproxy sync`, `kproxy trace`.

Backends are imported inside the functions, so that registering the mode costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kproxy.errors import BackendError
from kproxy.model import IPFamily

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kproxy.config import RunConfig
    from kproxy.model import ClusterState, ServicePortName
    from kproxy.modes import ModeInfo
    from kproxy.node import NodeContext
    from kproxy.proxier.iptables.proxier import IptablesProxier
    from kproxy.status import KernelObject
    from kproxy.view import FamilyView


def node_variant(cfg: RunConfig, dry_run: bool) -> str:
    """The iptables backend to write to: the configured one, else the node's. A dry run writes
    nothing, so without rights to read the node's it shows the nft form."""
    from kproxy.backends.iptables import detect_variant

    if cfg.proxy.iptables_backend:
        return cfg.proxy.iptables_backend
    try:
        return detect_variant()
    except BackendError:
        if dry_run:
            return "nft"
        raise


class IptablesMode:
    def proxier(self, family: IPFamily, cfg: RunConfig, iptables: Any) -> IptablesProxier:
        from kproxy.proxier.iptables.proxier import IptablesProxier

        return IptablesProxier(iptables)

    def sync_once(self, cfg: RunConfig, state: ClusterState, *, dry_run: bool) -> str:
        from kproxy.backends.conntrack import Conntrack
        from kproxy.backends.host import local_addresses
        from kproxy.backends.iptables import Iptables
        from kproxy.families import kernel_families
        from kproxy.proxier.iptables.proxier import IptablesProxier
        from kproxy.proxier.loop import sync_once
        from kproxy.view import family_inputs

        variant = node_variant(cfg, dry_run)
        jobs = {
            family: (
                IptablesProxier(Iptables(family, variant)),
                *family_inputs(cfg.proxy, cfg.bind_address, state, family, local_addresses(family)),
            )
            for family in kernel_families()
        }

        def header(family: IPFamily) -> str:
            return f"# {family.label}: iptables-restore --noflush input ({variant} backend)"

        return sync_once(jobs, dry_run=dry_run, header=header, conntrack=Conntrack)

    def trace(
        self,
        cfg: RunConfig,
        state: ClusterState,
        family: IPFamily,
        host: tuple[str, ...],
        packet: tuple[str, str, int, str, str],
    ) -> list[str]:
        from kproxy.proxier.iptables import render as ipt
        from kproxy.proxier.iptables.trace import Tracer
        from kproxy.view import family_inputs

        view, ctx = family_inputs(cfg.proxy, cfg.bind_address, state, family, host)
        ruleset = ipt.render(view.ports, view.endpoints, ctx)
        return Tracer(ruleset, ctx.local_ips).trace(*packet).explain()

    def describe(
        self, cfg: RunConfig, view: FamilyView, ctx: NodeContext
    ) -> dict[ServicePortName, tuple[KernelObject, ...]]:
        from kproxy.proxier.iptables.status import describe

        return describe(view, ctx)

    def check(self, cfg: RunConfig, family: IPFamily, expected: Sequence[KernelObject], complete: bool) -> list[str]:
        from kproxy.backends.iptables import Iptables
        from kproxy.proxier.iptables.status import differences

        saved = Iptables(family, node_variant(cfg, dry_run=False)).save(("filter", "nat"))
        return differences(expected, saved.chains, saved.rule_counts, complete)

    def cleanup(self, upstream: bool) -> str | None:
        return None  # its chains are all `KPROXY-` chains, which cleanup removes for every mode

    def leave(self, variant: str, successor: ModeInfo) -> str | None:
        # Into a mode that writes iptables (IPVS), every chain it wrote is one that mode writes
        # too, or a Service chain its first full sync garbage-collects (names.is_service_chain).
        # Into one that does not (nftables), its chains would keep DNATing every Service packet
        # ahead of the new table: all `KPROXY-` chains (the canary's too) and their jumps go.
        if successor.iptables:
            return None
        return leave_iptables(variant)


def leave_iptables(variant: str) -> str | None:
    """Remove every mode's `KPROXY-` chain and jump of one iptables backend (the hostPort
    component's stay); None when there were none."""
    from kproxy.backends.iptables import Iptables, cleanup_text
    from kproxy.families import kernel_families
    from kproxy.proxier import names

    removed = 0
    for family in kernel_families():
        ipt = Iptables(family, variant)
        saved = ipt.save(("filter", "nat", "mangle"), prefixes=(names.PREFIX,))
        text = cleanup_text(saved, names.is_mode_chain)
        if text:
            ipt.restore(text)
            removed += sum(1 for chains in saved.chains.values() for c in chains if names.is_mode_chain(c))
    return f"iptables: removed {removed} KPROXY- chains" if removed else None


MODE = IptablesMode()
