"""Remove what kproxy (and, on request, kube-proxy) left in the kernel, by name only."""

from __future__ import annotations

import shutil

from kproxy.backends.iptables import Iptables, cleanup_text
from kproxy.families import kernel_families
from kproxy.proxier import names

# kube-proxy's own chains. KUBE-FIREWALL, KUBE-KUBELET-CANARY and KUBE-IPTABLES-HINT belong to
# kubelet and stay, as `kube-proxy --cleanup` leaves them.
_UPSTREAM_FIXED = {
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    "KUBE-NODE-PORT",
    "KUBE-LOAD-BALANCER",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
}
_UPSTREAM_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-", "KUBE-XLB-")


def _owned(upstream: bool):  # type: ignore[no-untyped-def]
    def owned(name: str) -> bool:
        if names.is_owned(name):
            return True
        return upstream and (name in _UPSTREAM_FIXED or name.startswith(_UPSTREAM_PREFIXES))

    return owned


def cleanup_iptables(upstream: bool = False) -> int:
    removed = 0
    for variant in ("nft", "legacy"):
        for family in kernel_families():
            ipt = Iptables(family, variant)
            if (
                not ipt.available()
                or shutil.which(f"{'iptables' if family == 4 else 'ip6tables'}-{variant}-save") is None
            ):
                continue
            owned = _owned(upstream)
            prefixes = (names.PREFIX, names.UPSTREAM_PREFIX) if upstream else (names.PREFIX,)
            saved = ipt.save(("filter", "nat", "mangle"), prefixes=prefixes)
            text = cleanup_text(saved, owned)
            ipt.restore(text)
            removed += sum(1 for chains in saved.chains.values() for c in chains if owned(c))
    return removed
