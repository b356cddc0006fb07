"""``/debug/sync`` on the healthz server: the daemon's last syncs, newest first, as JSON.

What an operator asks when a change seems slow or a node misbehaves: did a sync run, full or
partial, why, how long each phase took, what it wrote, and did it fail. The answers are the
same numbers as the ``sync_complete`` / ``sync_failed`` log lines, kept in a bounded ring
(`SyncLog`, 20 by default) so that the endpoint costs nothing between requests and its memory
never grows. Thread-safe: the sync thread adds, the HTTP threads read. Read-only: the server
answers GET only.

One record per sync (all IP families together, as the log line):
``{"kind", "reason", "started", "durationSeconds", "phases": {"render", "plan", "apply"},
"servicePorts", "endpoints", "changed", "written", "result", "error"}``. ``written`` is what the
mode reports it wrote (chains, elements, IPVS writes...: its ``log_fields``, summed over the
families). A failed sync has ``result: "failed"``, its error, and no phases (it stopped midway).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from kproxy.daemon.health import go_time
from kproxy.httpd import JSON, Response

RING_SIZE = 20


@dataclass(frozen=True, slots=True)
class Phases:
    render: float
    plan: float
    apply: float


@dataclass(frozen=True, slots=True)
class SyncRecord:
    kind: str  # "full" or "partial"
    reason: str | None  # why a full sync was full (start, retry, topology, canary, periodic, tampered)
    started: float  # wall clock, seconds since the epoch
    duration: float
    changed: int  # Services whose objects changed since the sync before
    phases: Phases | None = None  # None: the sync failed before it could report them
    service_ports: int = 0
    endpoints: int = 0
    written: Mapping[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, object]:
        phases = self.phases
        return {
            "kind": self.kind,
            "reason": self.reason,
            "started": go_time(self.started),
            "durationSeconds": round(self.duration, 6),
            "phases": None
            if phases is None
            else {"render": round(phases.render, 6), "plan": round(phases.plan, 6), "apply": round(phases.apply, 6)},
            "servicePorts": self.service_ports,
            "endpoints": self.endpoints,
            "changed": self.changed,
            "written": dict(sorted(self.written.items())),
            "result": "ok" if self.ok else "failed",
            "error": self.error,
        }


class SyncLog:
    """The last `size` syncs; the oldest falls out when a new one comes in."""

    def __init__(self, size: int = RING_SIZE) -> None:
        self._lock = threading.Lock()
        self._records: deque[SyncRecord] = deque(maxlen=size)

    def add(self, record: SyncRecord) -> None:
        with self._lock:
            self._records.append(record)

    def records(self) -> list[SyncRecord]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._records))

    def to_json(self) -> dict[str, object]:
        return {"syncs": [r.to_json() for r in self.records()]}

    def response(self) -> Response:
        return Response(200, JSON, json.dumps(self.to_json(), indent=1).encode() + b"\n")
