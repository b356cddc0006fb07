"""``/debug/services`` on the healthz server: the Service table as the daemon last programmed it.

The same JSON as `kproxy status -o json` (kproxy/status.py), with the time of the last
successful sync. What it shows is what the last successful sync wrote: the sync thread hands
over, after each successful sync, the Service ports that changed since the last hand-over
(kept while syncs fail, so a failed sync is never shown as programmed).

Cost, and why it is safe at 50,000 Services:
- The sync thread owns its incremental views and changes them in place. `staged` (before the
  proxiers run) only notes which Service ports changed; `synced` (after success) copies the
  values of those ports and the node contexts into this table's own dicts under its lock. Both
  are O(changed): a partial sync never walks every Service for this endpoint. A full view (the
  first, or after a reset) is copied whole, as its sync is O(cluster) anyway.
- A request copies the dicts under the lock (a C-level copy, about a millisecond at 50,000
  entries: the only moment the sync thread may wait), then builds the table and the JSON outside
  it, on the HTTP thread, from frozen values: the mode's `describe` renders each Service port
  again, which is pure and equals what the sync rendered.
- That render is seconds of CPU at 50,000 Services, and it holds the interpreter's lock the
  sync thread needs: the whole table's answer is kept until the next hand-over, so a poller
  asking every few seconds costs one render per sync, and ``?service=NAMESPACE/NAME``
  (`kproxy status --from URL --service`) renders that Service's ports only.
Read-only: the server answers GET only.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping

from kproxy.daemon.health import go_time
from kproxy.httpd import JSON, TEXT, Response
from kproxy.model import Endpoint, IPFamily, ServicePort, ServicePortName
from kproxy.node import NodeContext
from kproxy.status import Describe, narrowed, service_key, service_table
from kproxy.view import FamilyView


class ServiceTableFeed:
    def __init__(self, mode: str, describe: Describe) -> None:
        self._mode = mode
        self._describe = describe
        self._lock = threading.Lock()
        self._ports: dict[IPFamily, dict[ServicePortName, ServicePort]] = {}
        self._endpoints: dict[IPFamily, dict[ServicePortName, tuple[Endpoint, ...]]] = {}
        self._contexts: dict[IPFamily, NodeContext] = {}
        self._last_sync: float | None = None
        self._handovers = 0  # bumped by each hand-over: what a kept answer is valid for
        self._kept: tuple[int, bytes] | None = None  # the whole table's answer, and its hand-over
        # Sync thread only: the ports changed since the last hand-over (None: all of them).
        self._pending: dict[IPFamily, set[ServicePortName] | None] = {}

    # -- the sync thread -----------------------------------------------------------------------

    def staged(self, views: Mapping[IPFamily, FamilyView]) -> None:
        """The views a sync is about to program (their `changed`: what moved since the last)."""
        for family, view in views.items():
            pending = self._pending.get(family, set())
            if view.changed is None or pending is None:
                self._pending[family] = None
            else:
                pending.update(view.changed)
                self._pending[family] = pending

    def synced(
        self, views: Mapping[IPFamily, FamilyView], contexts: Mapping[IPFamily, NodeContext], when: float
    ) -> None:
        """The sync of `views` succeeded at `when` (wall clock): hand over what changed."""
        updates: dict[IPFamily, dict[ServicePortName, tuple[ServicePort | None, tuple[Endpoint, ...]]]] = {}
        whole: dict[IPFamily, FamilyView] = {}
        for family, view in views.items():
            pending = self._pending.get(family, set())
            if pending is None:
                whole[family] = view
                continue
            updates[family] = {n: (view.ports.get(n), view.endpoints.get(n, ())) for n in pending}
        with self._lock:
            for family, view in whole.items():
                self._ports[family] = dict(view.ports)
                self._endpoints[family] = dict(view.endpoints)
            for family, changes in updates.items():
                ports = self._ports.setdefault(family, {})
                endpoints = self._endpoints.setdefault(family, {})
                for name, (port, eps) in changes.items():
                    if port is None:
                        ports.pop(name, None)
                        endpoints.pop(name, None)
                    else:
                        ports[name] = port
                        endpoints[name] = eps
            self._contexts.update(contexts)
            self._last_sync = when
            self._handovers += 1
        self._pending = {family: set() for family in views}

    # -- the HTTP threads ----------------------------------------------------------------------

    def to_json(self, service: tuple[str, str] | None = None) -> dict[str, object]:
        return self._table(service)[1]

    def _table(self, service: tuple[str, str] | None) -> tuple[int, dict[str, object]]:
        families: dict[IPFamily, tuple[FamilyView, NodeContext]] = {}
        with self._lock:
            for f, ctx in self._contexts.items():
                ports, endpoints = self._ports.get(f, {}), self._endpoints.get(f, {})
                if service is None:
                    families[f] = (FamilyView(dict(ports), dict(endpoints)), ctx)
                else:  # that Service's ports only are copied (the scan is milliseconds at 50,000)
                    families[f] = (narrowed(FamilyView(ports, endpoints), service), ctx)
            last, handover = self._last_sync, self._handovers
        table = service_table(
            families,
            self._describe,
            mode=self._mode,
            source="daemon",
            last_sync=None if last is None else go_time(last),
        )
        return handover, table.to_json()

    def response(self, query: Mapping[str, list[str]]) -> Response:
        wanted = [service_key(text) for text in query.get("service", [])]
        if len(wanted) > 1 or wanted[:1] == [None]:
            return Response(400, TEXT, b"service: one NAMESPACE/NAME\n")
        if wanted:
            _, table = self._table(wanted[0])
            return Response(200, JSON, _encode(table))
        with self._lock:
            kept = self._kept if self._kept is not None and self._kept[0] == self._handovers else None
        if kept is None:
            handover, table = self._table(None)
            kept = (handover, _encode(table))
            with self._lock:
                if self._kept is None or self._kept[0] < handover:
                    self._kept = kept
        return Response(200, JSON, kept[1])


def _encode(table: dict[str, object]) -> bytes:
    return json.dumps(table, indent=1).encode() + b"\n"
