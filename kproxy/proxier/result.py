"""What one family's sync reports, in every mode: the common fields; each mode adds its own."""

from __future__ import annotations

from dataclasses import dataclass

from kproxy.model import IPFamily
from kproxy.view import Repair


@dataclass
class SyncResult:
    family: int
    full: bool
    services: int
    endpoints: int
    render_seconds: float = 0.0
    apply_seconds: float = 0.0
    # Filled in by `kproxy sync`, which cleans conntrack after the sync (clean_stale_udp).
    conntrack_deleted: int = 0
    no_local_internal: int = 0
    no_local_external: int = 0
    payload: str = ""  # what a dry run would write, in the mode's own text form
    repairs: tuple[Repair, ...] = ()

    def log_fields(self) -> dict[str, int]:
        """The mode's own counts for the daemon's ``sync_complete`` line."""
        return {}

    def summary(self) -> str:
        """One line for `kproxy sync`: the counts, what the mode wrote, the timings, its notes."""
        parts = [
            f"{IPFamily(self.family).label}: {self.services} service ports, {self.endpoints} endpoints",
            self.written_summary(),
            f"render {self.render_seconds * 1000:.1f} ms, apply {self.apply_seconds * 1000:.1f} ms",
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
