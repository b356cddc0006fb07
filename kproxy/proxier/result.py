"""What one family's sync reports, in every mode: the common fields; each mode adds its own.

The sync's time is split in three phases, the same in every mode: `render_seconds` (the view
into the mode's desired state, pure), `plan_seconds` (reading back what the kernel holds, when the
sync reads, and working out what to write) and `apply_seconds` (writing it). What the kernel holds
of ours after the sync is counted in the mode's own terms: `iptables_rules` per table (the
iptables mode, as upstream's ``kubeproxy_sync_proxy_rules_iptables_total``), and `objects` by kind
(the nftables mode's chains, rules and elements, the IPVS mode's virtual and real servers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kproxy.model import IPFamily
from kproxy.view import Repair


@dataclass
class SyncResult:
    family: int
    full: bool
    services: int
    endpoints: int
    render_seconds: float = 0.0
    plan_seconds: float = 0.0
    apply_seconds: float = 0.0
    # Filled in by `kproxy sync`, which cleans conntrack after the sync (clean_stale_udp).
    conntrack_deleted: int = 0
    no_local_internal: int = 0
    no_local_external: int = 0
    payload: str = ""  # what a dry run would write, in the mode's own text form
    repairs: tuple[Repair, ...] = ()
    # Rules in our chains per table after the sync, and of those the rules this sync wrote.
    iptables_rules: dict[str, int] = field(default_factory=dict)
    iptables_rules_written: dict[str, int] = field(default_factory=dict)
    # The mode's own kernel objects after the sync, by kind ("chain", "element", "virtual_server").
    objects: dict[str, int] = field(default_factory=dict)

    def log_fields(self) -> dict[str, int]:
        """The mode's own counts for the daemon's ``sync_complete`` line."""
        return {}

    def summary(self) -> str:
        """One line for `kproxy sync`: the counts, what the mode wrote, the timings, its notes."""
        parts = [
            f"{IPFamily(self.family).label}: {self.services} service ports, {self.endpoints} endpoints",
            self.written_summary(),
            f"render {self.render_seconds * 1000:.1f} ms, plan {self.plan_seconds * 1000:.1f} ms, "
            f"apply {self.apply_seconds * 1000:.1f} ms",
            *self.notes(),
        ]
        if self.conntrack_deleted:
            parts.append(f"{self.conntrack_deleted} stale UDP flows deleted")
        return "; ".join(p for p in parts if p)

    def written_summary(self) -> str:
        """What the mode wrote, in its own terms."""
        return ""

    def notes(self) -> list[str]:
        """Anything else the mode has to say after the timings."""
        return []
