"""The nftables mode behind the registry: its proxier, `kproxy sync`, `trace`, `cleanup`, `leave`.

Backends are imported inside the functions, so that registering the mode costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kproxy.model import IPFamily

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kproxy.config import RunConfig
    from kproxy.model import ClusterState, ServicePortName
    from kproxy.modes import ModeInfo
    from kproxy.node import NodeContext
    from kproxy.proxier.nftables.proxier import NftablesProxier
    from kproxy.status import KernelObject
    from kproxy.view import FamilyView

# kube-proxy's own nftables table, removed by `kproxy cleanup --upstream` for migrations.
UPSTREAM_TABLE = "kube-proxy"


def _delete_tables(tables: tuple[str, ...]) -> list[str]:
    from kproxy.backends.nftables import Nft

    nft = Nft()
    removed = []
    for name in tables:
        for family in ("ip", "ip6"):
            if nft.delete_table(family, name):
                removed.append(f"{family} {name}")
    return removed


class NftablesMode:
    def proxier(self, family: IPFamily, cfg: RunConfig, iptables: Any) -> NftablesProxier:
        from kproxy.backends.nftables import Nft
        from kproxy.proxier.nftables.proxier import NftablesProxier

        return NftablesProxier(Nft())

    def sync_once(self, cfg: RunConfig, state: ClusterState, *, dry_run: bool) -> str:
        from kproxy.backends.conntrack import Conntrack
        from kproxy.backends.host import local_addresses
        from kproxy.backends.nftables import Nft
        from kproxy.families import kernel_families
        from kproxy.proxier.loop import sync_once
        from kproxy.proxier.nftables.proxier import NftablesProxier
        from kproxy.view import family_inputs

        jobs = {
            family: (
                NftablesProxier(Nft()),
                *family_inputs(cfg.proxy, cfg.bind_address, state, family, local_addresses(family)),
            )
            for family in kernel_families()
        }

        def header(family: IPFamily) -> str:
            return f"# {family.label}: nft -f - input"

        return sync_once(jobs, dry_run=dry_run, header=header, conntrack=Conntrack)

    def trace(
        self,
        cfg: RunConfig,
        state: ClusterState,
        family: IPFamily,
        host: tuple[str, ...],
        packet: tuple[str, str, int, str, str],
    ) -> list[str]:
        from kproxy.proxier.nftables import render as nft
        from kproxy.proxier.nftables.trace import Tracer
        from kproxy.view import family_inputs

        view, ctx = family_inputs(cfg.proxy, cfg.bind_address, state, family, host)
        return Tracer(nft.render(view.ports, view.endpoints, ctx), ctx.local_ips).trace(*packet).explain()

    def describe(
        self, cfg: RunConfig, view: FamilyView, ctx: NodeContext
    ) -> dict[ServicePortName, tuple[KernelObject, ...]]:
        from kproxy.proxier.nftables.status import describe

        return describe(view, ctx)

    def check(self, cfg: RunConfig, family: IPFamily, expected: Sequence[KernelObject], complete: bool) -> list[str]:
        from kproxy.backends.nftables import Nft
        from kproxy.proxier.nftables.names import TABLE
        from kproxy.proxier.nftables.render import nft_family
        from kproxy.proxier.nftables.status import differences

        ipx = nft_family(family)
        return differences(expected, Nft().list_table(ipx, TABLE), complete, f"{ipx} {TABLE}")

    def cleanup(self, upstream: bool) -> str | None:
        from kproxy.proxier.nftables.names import TABLE

        removed = _delete_tables((TABLE, UPSTREAM_TABLE) if upstream else (TABLE,))
        return f"removed nftables tables: {', '.join(removed)}" if removed else None

    def leave(self, variant: str, successor: ModeInfo) -> str | None:
        # Another mode owns the node now: our tables would still DNAT every Service packet.
        from kproxy.proxier.nftables.names import TABLE

        removed = _delete_tables((TABLE,))
        return f"removed nftables tables: {', '.join(removed)}" if removed else None


MODE = NftablesMode()
