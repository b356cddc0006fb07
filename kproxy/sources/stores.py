"""What a reflector feeds: sinks that turn its list pages and watch events into handler calls.

A reflector hands every list to its sink page by page (`ReflectorSink.begin_list`, `list_page`
per page, `end_list` with the list's resourceVersion) and every watch event one by one (`add`,
`update`, `delete`), on its own thread, one call at a time. A list may be begun again before it
ends (a failed page retried from the start, or an expired one listed again in full); only the
last begun list counts, and `end_list` carries the complete state: whatever the sink held that
was not in it is gone.

Two sinks, both calling a `Handler` with kproxy's convention (``on_update(old, new)``):

- `Store` caches every object by key (``namespace/name``) and reports changes with the previous
  object. For consumers that read objects back (the ingress controller, the hostPort syncer).
  It gathers a list's pages and compares the whole list with its cache at `end_list`.
- `KeyStore` keeps per key only the resourceVersion, never the object: for consumers that
  convert each object as it arrives and keep their own values (the daemon's change trackers).
  A page is passed on as it arrives, so its dicts can be dropped once handled, and a relist
  reports only what changed (by resourceVersion) and, at `end_list`, deletes of keys it no longer
  had. The `old` of ``on_update`` and the object of a delete a relist reveals are *stubs*
  carrying only ``metadata`` name, namespace and the last resourceVersion seen: enough for the
  object's key, which is all the trackers take from them.

Both report a relist's changes in key order; `Store` reports its deletes first, `KeyStore` last
(only the end of a list tells which keys are gone). Both call ``on_synced`` once, after the first
complete list. Reads are safe from any thread; handler calls come after the store is updated.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import structlog

Obj = dict[str, Any]

__all__ = [
    "Handler",
    "KeyStore",
    "ReflectorSink",
    "Store",
    "named_handler",
    "object_key",
    "resource_version_of",
]

log = structlog.get_logger(__name__)


def object_key(obj: Obj) -> str:
    """``namespace/name``, or ``name`` for cluster-scoped objects (client-go's key function)."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    namespace = meta.get("namespace")
    return f"{namespace}/{name}" if namespace else name


def resource_version_of(obj: Obj) -> str | None:
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    return str(rv) if rv else None


class ReflectorSink(Protocol):
    """What a reflector feeds. Called on the reflector's thread only, one call at a time."""

    def begin_list(self) -> None:
        """A list starts (the first, a relist, or one started over): pages follow."""

    def list_page(self, items: list[Obj]) -> None:
        """One page of the list, in key order. The sink may keep the dicts or drop them."""

    def end_list(self, resource_version: str) -> None:
        """The list begun last is complete, as of `resource_version`."""

    def add(self, obj: Obj) -> None: ...

    def update(self, obj: Obj) -> None: ...

    def delete(self, obj: Obj) -> None:
        """`obj` is the object's last state as the API server reports it."""


class Handler(Protocol):
    """Change notifications with the previous state, as kproxy's trackers want them."""

    def on_add(self, obj: Obj) -> None: ...

    def on_update(self, old: Obj, new: Obj) -> None: ...

    def on_delete(self, obj: Obj) -> None: ...

    def on_synced(self) -> None:
        """Once: every object of the first list has been passed to `on_add`."""


class _NamedHandler:
    """Adapts ``target.on_<prefix>_add/update/delete/synced`` to `Handler`."""

    def __init__(self, target: object, prefix: str) -> None:
        self.on_add: Callable[[Obj], None] = getattr(target, f"on_{prefix}_add")
        self.on_update: Callable[[Obj, Obj], None] = getattr(target, f"on_{prefix}_update")
        self.on_delete: Callable[[Obj], None] = getattr(target, f"on_{prefix}_delete")
        self.on_synced: Callable[[], None] = getattr(target, f"on_{prefix}_synced")


def named_handler(target: object, prefix: str) -> Handler:
    """A `Handler` calling ``target.on_<prefix>_add(obj)``, ``..._update(old, new)``,
    ``..._delete(obj)`` and ``..._synced()``; missing methods fail here, not at the first event."""
    return _NamedHandler(target, prefix)


class Store:
    """A `ReflectorSink` that caches objects by key and reports changes with their old state.

    `replace` (what `end_list` does with the gathered pages) compares the new list with the cache:
    objects gone are reported deleted (with their last cached state), new ones added, and ones
    whose resourceVersion changed updated; objects that did not change are not reported. Deletes
    are reported first, then adds and updates, each in key order. `on_synced` follows the first
    `replace`. Reads (`get`, `objects`, `keys`) are safe from any thread; handler calls come after
    the cache is updated, so a handler reading it sees the change.
    """

    def __init__(self, handler: Handler | None = None) -> None:
        self._handler = handler
        self._lock = threading.Lock()
        self._items: dict[str, Obj] = {}
        self._listing: list[Obj] = []
        self._resource_version: str | None = None
        self._synced = False

    @property
    def resource_version(self) -> str | None:
        """The resourceVersion of the last list (objects carry their own)."""
        with self._lock:
            return self._resource_version

    def get(self, key: str) -> Obj | None:
        with self._lock:
            return self._items.get(key)

    def objects(self) -> list[Obj]:
        """Every cached object, in key order."""
        with self._lock:
            return [self._items[k] for k in sorted(self._items)]

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._items)

    def begin_list(self) -> None:
        self._listing = []

    def list_page(self, items: list[Obj]) -> None:
        self._listing.extend(items)

    def end_list(self, resource_version: str) -> None:
        items, self._listing = self._listing, []
        self.replace(items, resource_version)

    def replace(self, items: list[Obj], resource_version: str) -> None:
        new = {object_key(obj): obj for obj in items}
        with self._lock:
            old = self._items
            self._items = new
            self._resource_version = resource_version
            first = not self._synced
            self._synced = True
        handler = self._handler
        if handler is None:
            return
        for key in sorted(old.keys() - new.keys()):
            handler.on_delete(old[key])
        for key in sorted(new):
            before = old.get(key)
            if before is None:
                handler.on_add(new[key])
            elif resource_version_of(before) != resource_version_of(new[key]) or (
                resource_version_of(before) is None and before != new[key]
            ):
                handler.on_update(before, new[key])
        if first:
            handler.on_synced()

    def add(self, obj: Obj) -> None:
        # ADDED for a key we hold happens when an object re-enters a selector; it is an update.
        self.update(obj)

    def update(self, obj: Obj) -> None:
        key = object_key(obj)
        with self._lock:
            before = self._items.get(key)
            self._items[key] = obj
        if self._handler is None:
            return
        if before is None:
            self._handler.on_add(obj)
        else:
            self._handler.on_update(before, obj)

    def delete(self, obj: Obj) -> None:
        key = object_key(obj)
        with self._lock:
            before = self._items.pop(key, None)
        if before is None:
            # Never seen (or already removed by a relist): the handler has nothing to forget.
            log.debug("watch_delete_unknown", key=key)
            return
        if self._handler is not None:
            self._handler.on_delete(obj)


def _stub(key: str, resource_version: str | None) -> Obj:
    """The stand-in for an object a `KeyStore` no longer has: its key and last resourceVersion."""
    namespace, _, name = key.rpartition("/")
    meta: Obj = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    if resource_version is not None:
        meta["resourceVersion"] = resource_version
    return {"metadata": meta}


class KeyStore:
    """A `ReflectorSink` that keeps per key only the last resourceVersion; see the module doc.

    A list item or watch event whose resourceVersion equals the one held is not reported (it is
    the same object); one without a resourceVersion always is. Reads (`keys`, `version`, `len`)
    are safe from any thread.
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._lock = threading.Lock()
        self._versions: dict[str, str | None] = {}
        self._listed: set[str] = set()  # keys in the list being received
        self._resource_version: str | None = None
        self._synced = False

    @property
    def resource_version(self) -> str | None:
        """The resourceVersion of the last complete list."""
        with self._lock:
            return self._resource_version

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._versions)

    def version(self, key: str) -> str | None:
        """The resourceVersion held for `key` (None when unknown or unversioned)."""
        with self._lock:
            return self._versions.get(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._versions)

    def begin_list(self) -> None:
        # Keys delivered by a list begun earlier stay held: the new list's end decides about them.
        self._listed = set()

    def list_page(self, items: list[Obj]) -> None:
        for obj in items:
            key = object_key(obj)
            self._listed.add(key)
            self._upsert(key, obj)

    def end_list(self, resource_version: str) -> None:
        listed, self._listed = self._listed, set()
        with self._lock:
            gone = sorted(self._versions.keys() - listed)
            last = [(key, self._versions.pop(key)) for key in gone]
            self._resource_version = resource_version
            first = not self._synced
            self._synced = True
        for key, rv in last:
            self._handler.on_delete(_stub(key, rv))
        if first:
            self._handler.on_synced()

    def add(self, obj: Obj) -> None:
        # ADDED for a key we hold happens when an object re-enters a selector; it is an update.
        self._upsert(object_key(obj), obj)

    def update(self, obj: Obj) -> None:
        self._upsert(object_key(obj), obj)

    def delete(self, obj: Obj) -> None:
        key = object_key(obj)
        with self._lock:
            known = key in self._versions
            self._versions.pop(key, None)
        if not known:
            log.debug("watch_delete_unknown", key=key)
            return
        self._handler.on_delete(obj)

    def _upsert(self, key: str, obj: Obj) -> None:
        rv = resource_version_of(obj)
        with self._lock:
            known = key in self._versions
            before = self._versions.get(key)
            self._versions[key] = rv
        if not known:
            self._handler.on_add(obj)
        elif rv is None or rv != before:
            self._handler.on_update(_stub(key, before), obj)
