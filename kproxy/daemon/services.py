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
Read-only: the server answers GET only.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping

from kproxy.daemon.health import go_time
from kproxy.httpd import JSON, Response
from kproxy.model import Endpoint, IPFamily, ServicePort, ServicePortName
from kproxy.node import NodeContext
from kproxy.status import Describe, service_table
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
        self._pending = {family: set() for family in views}

    # -- the HTTP threads ----------------------------------------------------------------------

    def to_json(self) -> dict[str, object]:
        with self._lock:
            families = {
                f: (FamilyView(dict(self._ports.get(f, {})), dict(self._endpoints.get(f, {}))), ctx)
                for f, ctx in self._contexts.items()
            }
            last = self._last_sync
        table = service_table(
            families,
            self._describe,
            mode=self._mode,
            source="daemon",
            last_sync=None if last is None else go_time(last),
        )
        return table.to_json()

    def response(self) -> Response:
        return Response(200, JSON, json.dumps(self.to_json(), indent=1).encode() + b"\n")
