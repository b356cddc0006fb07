"""Kubernetes Events about Ingresses and Pods, deduplicated, never blocking a sync.

A problem that persists (a rejected annotation, a hostPort conflict, a certificate nginx
refuses) is reported once per process while it lasts, not on every sync: `Recorder.report`
takes the complete set of current problems, posts an Event for each one not reported before,
and forgets those that went away (so a problem that comes back is reported again). A failing
write is logged and counted, and retried at the next report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from kproxy.errors import KproxyError

log = structlog.get_logger(__name__)

WARNING = "Warning"
NORMAL = "Normal"


class EventSink(Protocol):
    def event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str  # Ingress, Pod
    namespace: str
    name: str
    reason: str  # CamelCase, e.g. HostPortConflict
    message: str
    type: str = WARNING

    def involved(self, uid: str = "") -> dict[str, Any]:
        api = "networking.k8s.io/v1" if self.kind == "Ingress" else "v1"
        return {"apiVersion": api, "kind": self.kind, "namespace": self.namespace, "name": self.name, "uid": uid}


class Recorder:
    def __init__(
        self,
        sink: EventSink | None,
        *,
        uid_of: Callable[[Problem], str] = lambda p: "",
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._sink = sink
        self._uid_of = uid_of
        self._on_error = on_error
        self._reported: set[Problem] = set()

    def report(self, problems: Iterable[Problem]) -> int:
        """Post the new ones; returns how many were posted."""
        current = set(problems)
        self._reported &= current
        posted = 0
        for p in sorted(current - self._reported, key=lambda p: (p.kind, p.namespace, p.name, p.message)):
            if self._sink is None:
                self._reported.add(p)
                continue
            try:
                self._sink.event(p.involved(self._uid_of(p)), p.type, p.reason, p.message)
            except KproxyError as e:  # an API write error: try again next time
                self._on_error()
                log.warning("event_failed", object=f"{p.kind} {p.namespace}/{p.name}", reason=p.reason, error=str(e))
                continue
            self._reported.add(p)
            posted += 1
        return posted
