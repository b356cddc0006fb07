"""Which IP families this node can proxy: one proxier per family, as upstream's MetaProxier."""

from __future__ import annotations

from pathlib import Path

from kproxy.model import IPFamily


def kernel_families() -> tuple[IPFamily, ...]:
    # A kernel booted with ipv6.disable=1 has no if_inet6; ip6tables would fail on every sync.
    if Path("/proc/net/if_inet6").exists():
        return (IPFamily.V4, IPFamily.V6)
    return (IPFamily.V4,)
