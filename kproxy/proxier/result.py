"""What one family's sync reports, in every mode: the common fields; each mode adds its own."""

from __future__ import annotations

from dataclasses import dataclass

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
        """One line for `kproxy sync`."""
        name = "IPv4" if self.family == 4 else "IPv6"
        return f"{name}: {self.services} service ports, {self.endpoints} endpoints"
