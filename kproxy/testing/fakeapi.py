"""An in-process fake of the Kubernetes API server's list/watch protocol, for tests.

`FakeAPIServer` serves plain HTTP on 127.0.0.1 (port 0 by default) with the real wire format, so
the official `kubernetes` client can be pointed at it through a kubeconfig (`write_kubeconfig`).

What it guarantees, because the reflector's tests depend on it:

- One global, monotonically increasing resourceVersion (an integer rendered as a string, as
  etcd's revision is). Every write bumps it; a list reports the current one.
- Watches are exact: a watch from RV ``r`` gets every event with an RV greater than ``r``, in RV
  order, once; the events come from a bounded history. A watch from an RV the history no longer
  covers gets what the real API server sends: HTTP 200, then one ``ERROR`` event carrying a
  ``Status`` with code 410 and reason ``Expired`` ("too old resource version"). A watch that falls
  behind the history while open gets the same ERROR. ``resourceVersion`` unset or ``"0"`` starts
  with synthetic ``ADDED`` events for the current objects, as the real watch cache does.
- List items carry no ``kind``/``apiVersion`` (the list does), as the real server's; objects in
  watch events carry both.
- Selectors behave as the watch cache's: an object that stops matching a watch's selector is sent
  as ``DELETED`` (previous content, new RV), one that starts matching as ``ADDED``.
- Watch streams are chunked HTTP/1.1, one JSON event per line, so a client can tell a stream that
  ended (timeoutSeconds elapsed: the terminating chunk is sent) from one that was cut
  (`drop_connections`, `stop`: the socket is shut down mid-stream).
- ``BOOKMARK`` events (only to watches that asked with ``allowWatchBookmarks=true``) carry the
  current RV and are sent only after every earlier event for that watch has been written.
- A client that hangs up is noticed at once (a reader per stream), so `open_watches` is exact;
  the connection of a watch is closed when the watch ends rather than reused.
- `stop` ends every stream and joins every thread it started; `start` brings the server back on
  the same port with the same objects and history, like an API server restart in front of the
  same etcd.
- Every request is recorded (`requests`), and tests wait on the server's state with
  `wait_for(predicate, timeout)`, woken by every change, never by polling.
- Lists page as etcd3's store does: with ``limit`` a list answers at most that many items in
  key order (namespace/name) and, when keys are left, ``metadata.continue`` (opaque: unpadded
  base64 of JSON with the list's RV and the last key) and ``remainingItemCount`` (only when no
  selector filters, as then the count is known). Every page of a list is served from the first
  page's snapshot and carries its RV, whatever is written between the requests (the state at that
  RV is rebuilt from the history). A token whose RV is older than the compacted history answers
  410 ``Expired`` with etcd3's message and, as the real server does, a fresh token that continues
  from the latest state (inconsistently); a malformed token, or one sent with a
  ``resourceVersion``, answers 400 ``BadRequest``. ``limit`` is ignored on a watch and on a list
  with ``resourceVersion=0`` (the watch cache serves those whole).

Deliberately simple: no auth, no admission, no defaulting, merge patches only. The resource
table (`RESOURCES`) is data: another kind is one more `ResourceType` line.

Why one module of ~1,150 lines: a faithful fake of one protocol (resourceVersion, bookmarks, 410,
paging, selectors, status subresources, chunked watches) whose parts share one store and one lock.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import copy
import json
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

Obj = dict[str, Any]

__all__ = [
    "RESOURCES",
    "ApiError",
    "FakeAPIServer",
    "Request",
    "ResourceType",
]


@dataclass(frozen=True, slots=True)
class ResourceType:
    """One kind the fake serves: its REST name, its Kind and where it lives."""

    plural: str
    kind: str
    api_version: str
    namespaced: bool

    @property
    def prefix(self) -> str:
        """The API path prefix: ``/api/v1`` for the core group, ``/apis/<group>/<version>`` else."""
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("services", "Service", "v1", True),
    ResourceType("endpointslices", "EndpointSlice", "discovery.k8s.io/v1", True),
    ResourceType("nodes", "Node", "v1", False),
    ResourceType("pods", "Pod", "v1", True),
    ResourceType("secrets", "Secret", "v1", True),
    ResourceType("configmaps", "ConfigMap", "v1", True),
    ResourceType("namespaces", "Namespace", "v1", False),
    ResourceType("events", "Event", "v1", True),
    ResourceType("events", "Event", "events.k8s.io/v1", True),
    ResourceType("ingresses", "Ingress", "networking.k8s.io/v1", True),
    ResourceType("ingressclasses", "IngressClass", "networking.k8s.io/v1", False),
    ResourceType("servicecidrs", "ServiceCIDR", "networking.k8s.io/v1", False),
    # Gateway API CRDs (served with their status subresource, as the published CRDs are)
    ResourceType("gatewayclasses", "GatewayClass", "gateway.networking.k8s.io/v1", False),
    ResourceType("gateways", "Gateway", "gateway.networking.k8s.io/v1", True),
    ResourceType("httproutes", "HTTPRoute", "gateway.networking.k8s.io/v1", True),
    ResourceType("referencegrants", "ReferenceGrant", "gateway.networking.k8s.io/v1beta1", True),
)


@dataclass(frozen=True, slots=True)
class Request:
    """One request the fake received, recorded for assertions."""

    method: str
    path: str
    query: Mapping[str, str]
    verb: str  # list, watch, get, create, update, patch, delete, or unknown
    resource: str | None  # the plural, when the path named a served resource

    @property
    def resource_version(self) -> str | None:
        return self.query.get("resourceVersion")


@dataclass(slots=True)
class _Event:
    rv: int
    resource: ResourceType
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj
    old: Obj | None


@dataclass(eq=False, slots=True)
class _Watch:
    """Server-side state of one open watch stream."""

    resource: ResourceType
    namespace: str | None
    selector: _Selector
    pos: int  # every event with rv <= pos has been written (or filtered out)
    bookmarks: bool
    sock: socket.socket
    bookmark_gen: int
    dropped: bool = False  # cut by a control, or the client hung up: end without a last chunk
    finished: bool = False  # the stream thread is done with it


@dataclass(slots=True)
class _Failure:
    remaining: int
    status: int


class ApiError(Exception):
    """An error answered as a Kubernetes Status object; also what `create`, `update` and
    `delete` raise for a conflict or a missing object (`code` 409 or 404)."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.continue_token: str | None = None  # a 410 on a continued list offers one


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


# -- paging ------------------------------------------------------------------------------------

# etcd3's store's words for a continue token whose snapshot was compacted (it hands out a token
# to continue from the latest state with the 410, which is what the last sentence is about).
_CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. You can "
    "start a new list without the continue parameter, or use the continue token in this response "
    "to retrieve the remainder of the results. Continuing with the provided token results in an "
    "inconsistent list - objects that were created, modified, or deleted between the time the "
    "first chunk was returned and now may show up in the list."
)
_TOKEN_VERSION = "meta.k8s.io/v1"


def _encode_continue(rv: int, last_key: str) -> str:
    """The real server's token: unpadded URL-safe base64 of JSON holding the list's RV and the
    key to start from (the last key returned, plus the smallest suffix, NUL)."""
    raw = json.dumps({"v": _TOKEN_VERSION, "rv": rv, "start": last_key + "\x00"}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, str]:
    """(RV, key to list after) of a token, or 400 as the real server answers a bad one."""

    def invalid(why: str) -> ApiError:
        return ApiError(400, "BadRequest", f"invalid continue token: continue key is not valid: {why}")

    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
    except (ValueError, binascii.Error) as exc:
        raise invalid(str(exc)) from exc
    if not isinstance(data, dict) or data.get("v") != _TOKEN_VERSION:
        raise invalid("server does not recognize this encoded key")
    rv, start = data.get("rv"), data.get("start")
    if not isinstance(rv, int) or isinstance(rv, bool) or rv == 0:
        raise invalid(f"incorrect encoded start resourceVersion (version {_TOKEN_VERSION})")
    if not isinstance(start, str) or not start:
        raise invalid(f"encoded start key empty (version {_TOKEN_VERSION})")
    # The start key is the last key returned plus NUL: list the keys after that last key.
    return rv, start.removesuffix("\x00")


def _paging(query: Mapping[str, str]) -> tuple[int, str | None]:
    """``limit`` (0: unlimited) and ``continue`` of a list request, checked as the server does."""
    text = query.get("limit", "")
    try:
        limit = int(text) if text else 0
    except ValueError as exc:
        raise ApiError(400, "BadRequest", f"invalid limit {text!r}") from exc
    token = query.get("continue") or None
    if token is not None and query.get("resourceVersion"):
        raise ApiError(400, "BadRequest", "specifying resource version is not allowed when using continue")
    if token is None and query.get("resourceVersion") == "0":
        limit = 0  # served from the watch cache, which ignores limit
    return max(limit, 0), token


# -- selectors ---------------------------------------------------------------------------------


def _field_value(obj: Obj, path: str) -> str | None:
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if node is None:
        return None
    return node if isinstance(node, str) else json.dumps(node)


@dataclass(frozen=True, slots=True)
class _Selector:
    """A field and label selector in the simple forms the API server accepts.

    Fields: ``path=value``, ``path==value``, ``path!=value`` on any dotted path (the real server
    supports a fixed set per kind; kproxy uses ``metadata.name`` and ``spec.nodeName``). Labels:
    ``key``, ``!key``, ``key=value``, ``key==value``, ``key!=value``. Set-based label forms
    (``in``, ``notin``) are refused with 400 rather than misread.
    """

    fields: tuple[tuple[str, str, str], ...] = ()  # (path, op, value)
    labels: tuple[tuple[str, str, str], ...] = ()  # (key, op, value); op in = != exists !exists

    @classmethod
    def parse(cls, field_selector: str, label_selector: str) -> _Selector:
        return cls(_parse_terms(field_selector, "field"), _parse_terms(label_selector, "label"))

    def matches(self, obj: Obj) -> bool:
        for path, op, value in self.fields:
            # A missing field compares as the empty string, as the API server's field sets do.
            actual = _field_value(obj, path) or ""
            if (actual == value) != (op == "="):
                return False
        labels = (obj.get("metadata") or {}).get("labels") or {}
        for key, op, value in self.labels:
            if op == "exists" and key not in labels:
                return False
            if op == "!exists" and key in labels:
                return False
            if op == "=" and labels.get(key) != value:
                return False
            if op == "!=" and labels.get(key) == value:
                return False
        return True


def _parse_terms(text: str, what: str) -> tuple[tuple[str, str, str], ...]:
    terms: list[tuple[str, str, str]] = []
    for raw in text.split(","):
        term = raw.strip()
        if not term:
            continue
        if " in " in term or " notin " in term or "(" in term:
            raise ApiError(400, "BadRequest", f"unsupported {what} selector term {term!r}")
        if "!=" in term:
            key, value = term.split("!=", 1)
            terms.append((key.strip(), "!=", value.strip()))
        elif "==" in term:
            key, value = term.split("==", 1)
            terms.append((key.strip(), "=", value.strip()))
        elif "=" in term:
            key, value = term.split("=", 1)
            terms.append((key.strip(), "=", value.strip()))
        elif what == "label" and term.startswith("!"):
            terms.append((term[1:].strip(), "!exists", ""))
        elif what == "label":
            terms.append((term, "exists", ""))
        else:
            raise ApiError(400, "BadRequest", f"invalid field selector term {term!r}")
    return tuple(terms)


# -- object helpers ----------------------------------------------------------------------------


def _meta(obj: Obj) -> dict[str, Any]:
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise ApiError(400, "BadRequest", "metadata must be an object")
    return meta


def _key(rt: ResourceType, namespace: str | None, name: str) -> str:
    return f"{namespace}/{name}" if rt.namespaced else name


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic merge patches; see the module doc)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _with_type_meta(rt: ResourceType, obj: Obj) -> Obj:
    """`obj` with apiVersion and kind first, as kubectl prints objects."""
    return {"apiVersion": obj.get("apiVersion", rt.api_version), "kind": obj.get("kind", rt.kind), **obj}


def _without_type_meta(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the server --------------------------------------------------------------------------------


class FakeAPIServer:
    """A fake API server; see the module docstring for what it guarantees.

    Use as a context manager, or call `start` and `stop`. Test-facing methods (`create`,
    `update`, `delete`, the controls) are thread-safe and work while the server is stopped.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        history_size: int = 1000,
        bookmark_interval: float | None = None,
        resources: Sequence[ResourceType] = RESOURCES,
        initial_resource_version: int = 100,
    ) -> None:
        self._host = host
        self._port = port
        self._history_size = history_size
        self._bookmark_interval = bookmark_interval
        self._resources = tuple(resources)
        # One lock guards all state; the condition wakes watch streams and test waiters.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._rv = initial_resource_version
        self._compacted = initial_resource_version  # a watch from RV r needs r >= this
        self._history: deque[_Event] = deque()
        self._store: dict[ResourceType, dict[str, Obj]] = {rt: {} for rt in self._resources}
        self._sorted_keys: dict[ResourceType, list[str]] = {}
        self._watches: set[_Watch] = set()
        self._connections: set[socket.socket] = set()
        self._failures: dict[tuple[str, str], _Failure] = {}
        self._list_delay = 0.0
        self._bookmark_gen = 0
        self._requests: list[Request] = []
        self._httpd: _HTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FakeAPIServer:
        """Listen (again) and serve. After a `stop`, the same port is used."""
        if self._httpd is not None:
            raise RuntimeError("fake API server already running")
        self._stopping.clear()
        httpd = _HTTPServer((self._host, self._port), _Handler)
        httpd.fake = self
        self._port = httpd.server_address[1]
        self._httpd = httpd
        self._serve_thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fakeapi-serve", daemon=True
        )
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: cut every open connection and join every thread. Idempotent.

        Must not be called inside `batch` (the stream threads need the lock to finish).
        """
        httpd, thread = self._httpd, self._serve_thread
        if httpd is None or thread is None:
            return
        with self._cond:
            self._stopping.set()
            for watch in self._watches:
                watch.dropped = True
            connections = list(self._connections)
            self._cond.notify_all()
        httpd.shutdown()  # no more accepts; returns when serve_forever has returned
        for sock in connections:
            _shutdown(sock)
        httpd.server_close()  # joins the handler threads (block_on_close)
        thread.join()
        with self._cond:
            self._watches.clear()
            self._connections.clear()
            self._cond.notify_all()
        self._httpd = None
        self._serve_thread = None

    def __enter__(self) -> FakeAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def write_kubeconfig(self, path: str | Path) -> Path:
        """Write a kubeconfig (no auth, plain http) for this server and return its path."""
        target = Path(path)
        if target.is_dir():
            target = target / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        target.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        return target

    # -- objects -------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def resource_type(self, resource: str, api_version: str | None = None) -> ResourceType:
        """Find a served type by plural (``services``) or Kind (``Service``)."""
        wanted = resource.lower()
        found = [rt for rt in self._resources if wanted in (rt.plural, rt.kind.lower())]
        if api_version is not None:
            found = [rt for rt in found if rt.api_version == api_version] or found
        if not found:
            raise KeyError(f"fake API server does not serve {resource!r}")
        return found[0]

    def create(self, resource: str, obj: Obj) -> Obj:
        """Store a new object, bump the RV, send ADDED. Returns the stored copy."""
        rt = self.resource_type(resource, obj.get("apiVersion"))
        with self._cond:
            return self._create(rt, copy.deepcopy(obj), None)

    def update(self, resource: str, obj: Obj) -> Obj:
        """Replace an existing object, bump the RV, send MODIFIED. Returns the stored copy."""
        rt = self.resource_type(resource, obj.get("apiVersion"))
        with self._cond:
            return self._update(rt, copy.deepcopy(obj), None, check_rv=False)

    def apply(self, resource: str, obj: Obj) -> Obj:
        """Create or update, whichever applies."""
        rt = self.resource_type(resource, obj.get("apiVersion"))
        meta = obj.get("metadata") or {}
        with self._cond:
            ns = meta.get("namespace", "default") if rt.namespaced else None
            if _key(rt, ns, meta.get("name", "")) in self._store[rt]:
                return self._update(rt, copy.deepcopy(obj), None, check_rv=False)
            return self._create(rt, copy.deepcopy(obj), None)

    def delete(self, resource: str, obj_or_name: Obj | str, namespace: str | None = None) -> Obj:
        """Remove an object, bump the RV, send DELETED. Returns the final state."""
        rt = self.resource_type(resource)
        if isinstance(obj_or_name, dict):
            meta = obj_or_name.get("metadata") or {}
            name = meta.get("name", "")
            namespace = meta.get("namespace", namespace)
        else:
            name = obj_or_name
        if rt.namespaced:
            namespace = namespace or "default"
        with self._cond:
            return self._delete(rt, namespace, name)

    def get(self, resource: str, name: str, namespace: str | None = None) -> Obj | None:
        rt = self.resource_type(resource)
        with self._lock:
            found = self._store[rt].get(_key(rt, namespace or "default", name))
            return copy.deepcopy(found) if found is not None else None

    def objects(self, resource: str, api_version: str | None = None) -> list[Obj]:
        """Every stored object of a type, ordered by namespace and name."""
        rt = self.resource_type(resource, api_version)
        with self._lock:
            return [copy.deepcopy(self._store[rt][k]) for k in sorted(self._store[rt])]

    def events(self) -> list[Obj]:
        """Every Event object posted (core v1 and events.k8s.io/v1), oldest first."""
        with self._lock:
            found = [o for rt in self._resources if rt.plural == "events" for o in self._store[rt].values()]
        return sorted(found, key=lambda o: int(o["metadata"]["resourceVersion"]))

    # -- controls ------------------------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Hold the server's lock: no stream writes anything until the block ends.

        Lets a test make several changes atomically with respect to every watch, e.g. delete an
        object and expire the history so that no watch ever sees the delete.
        """
        with self._cond:
            yield
            self._cond.notify_all()

    def send_bookmark(self) -> None:
        """Make every open watch that accepts bookmarks send one now (after its pending events)."""
        with self._cond:
            self._bookmark_gen += 1
            self._cond.notify_all()

    def drop_connections(self) -> int:
        """Cut every open watch stream mid-stream (no terminating chunk). Returns how many."""
        with self._cond:
            watches = [w for w in self._watches if not w.dropped]
            for watch in watches:
                watch.dropped = True
                _shutdown(watch.sock)
            self._cond.notify_all()
        return len(watches)

    def expire_history(self) -> None:
        """Compact: every RV handed out so far becomes too old to watch from.

        Open watches get the ERROR 410 event and end; new watches from an old RV get it at once.
        A list returns the new RV, from which watching works again.
        """
        with self._cond:
            self._rv += 1
            self._history.clear()
            self._compacted = self._rv
            self._cond.notify_all()

    def fail_next(self, resource: str, n: int = 1, status: int = 500, *, verb: str = "list") -> None:
        """Answer the next `n` `verb` (``list`` or ``watch``) requests for a type with `status`."""
        if verb not in ("list", "watch"):
            raise ValueError(f"verb must be list or watch, not {verb!r}")
        rt = self.resource_type(resource)
        with self._cond:
            self._failures[(rt.plural, verb)] = _Failure(n, status)

    def pending_failures(self, resource: str, verb: str = "list") -> int:
        rt = self.resource_type(resource)
        with self._lock:
            failure = self._failures.get((rt.plural, verb))
            return failure.remaining if failure else 0

    def slow_list(self, delay: float) -> None:
        """Delay every list response by `delay` seconds before its headers (0 turns it off)."""
        with self._cond:
            self._list_delay = delay

    # -- observation ---------------------------------------------------------------------------

    def requests(self, verb: str | None = None, resource: str | None = None) -> list[Request]:
        """The requests received so far, oldest first, optionally filtered."""
        plural = self.resource_type(resource).plural if resource else None
        with self._lock:
            return [
                r
                for r in self._requests
                if (verb is None or r.verb == verb) and (plural is None or r.resource == plural)
            ]

    def open_watches(self, resource: str | None = None) -> int:
        plural = self.resource_type(resource).plural if resource else None
        with self._lock:
            return sum(1 for w in self._watches if not w.dropped and plural in (None, w.resource.plural))

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` holds (checked whenever the server's state changes)."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_for_watches(self, resource: str, n: int = 1, timeout: float = 5.0) -> bool:
        """Wait until at least `n` watch streams for a type are open."""
        return self.wait_for(lambda: self.open_watches(resource) >= n, timeout)

    # -- internals: the store (all called with the lock held) ----------------------------------

    def _bump(self) -> int:
        self._rv += 1
        return self._rv

    def _record(self, rt: ResourceType, type_: str, obj: Obj, old: Obj | None) -> None:
        self._sorted_keys.pop(rt, None)
        self._history.append(_Event(self._rv, rt, type_, copy.deepcopy(obj), old))
        while len(self._history) > self._history_size:
            # A watch from before the evicted event can no longer be served exactly.
            self._compacted = self._history.popleft().rv
        self._cond.notify_all()

    def _create(self, rt: ResourceType, obj: Obj, namespace: str | None) -> Obj:
        meta = _meta(obj)
        if rt.namespaced:
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(400, "BadRequest", "metadata.name or metadata.generateName is required")
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        key = _key(rt, meta.get("namespace"), meta["name"])
        if key in self._store[rt]:
            raise ApiError(409, "AlreadyExists", f'{rt.plural} "{meta["name"]}" already exists')
        obj = _with_type_meta(rt, obj)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = str(self._bump())
        self._store[rt][key] = obj
        self._record(rt, "ADDED", obj, None)
        return copy.deepcopy(obj)

    def _update(
        self, rt: ResourceType, obj: Obj, namespace: str | None, *, check_rv: bool, status_only: bool = False
    ) -> Obj:
        meta = _meta(obj)
        ns = (namespace or meta.get("namespace") or "default") if rt.namespaced else None
        key = _key(rt, ns, meta.get("name", ""))
        old = self._store[rt].get(key)
        if old is None:
            raise ApiError(404, "NotFound", f'{rt.plural} "{meta.get("name", "")}" not found')
        sent_rv = meta.get("resourceVersion")
        if check_rv and sent_rv and sent_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {rt.plural} "{meta["name"]}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )
        if status_only:
            # The status subresource changes status and nothing else.
            new = copy.deepcopy(old)
            if "status" in obj:
                new["status"] = obj["status"]
            else:
                new.pop("status", None)
        else:
            new = _with_type_meta(rt, obj)
            new_meta = _meta(new)
            if rt.namespaced:
                new_meta["namespace"] = ns
            for kept in ("uid", "creationTimestamp"):
                new_meta[kept] = old["metadata"].get(kept)
        new["metadata"]["resourceVersion"] = str(self._bump())
        self._store[rt][key] = new
        self._record(rt, "MODIFIED", new, copy.deepcopy(old))
        return copy.deepcopy(new)

    def _delete(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        key = _key(rt, namespace, name)
        old = self._store[rt].pop(key, None)
        if old is None:
            raise ApiError(404, "NotFound", f'{rt.plural} "{name}" not found')
        final = copy.deepcopy(old)
        final["metadata"]["resourceVersion"] = str(self._bump())
        self._record(rt, "DELETED", final, old)
        return copy.deepcopy(final)

    def _list(self, rt: ResourceType, namespace: str | None, selector: _Selector, *, type_meta: bool = False) -> Obj:
        # Like the real server, list items carry no kind/apiVersion (the list does); watch
        # events' objects do.
        items = [
            copy.deepcopy(obj if type_meta else _without_type_meta(obj))
            for _, obj in sorted(self._store[rt].items())
            if (namespace is None or obj["metadata"].get("namespace") == namespace) and selector.matches(obj)
        ]
        return {
            "kind": rt.list_kind,
            "apiVersion": rt.api_version,
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def _list_page(
        self, rt: ResourceType, namespace: str | None, selector: _Selector, limit: int, token: str | None
    ) -> Obj:
        """One page of at most `limit` objects, as etcd3's store serves it (lock held).

        The first page reads the latest state; a continued one reads the state at the token's
        resourceVersion (rebuilt from the history, as etcd reads an old revision), from the key
        after the token's. Objects are taken in key order until `limit` of them match; the page
        says ``continue`` when keys are left after its last one, and ``remainingItemCount`` (how
        many) when nothing filters them, as only then does the server know.
        """
        if token is None:
            at, after, latest = self._rv, "", True
        else:
            at, after = _decode_continue(token)
            latest = at == -1  # the inconsistent continuation a 410 hands out: read the latest state
            if latest:
                at = self._rv
            elif at < self._compacted:
                expired = ApiError(410, "Expired", _CONTINUE_EXPIRED)
                expired.continue_token = _encode_continue(-1, after)
                raise expired
        past = None if latest else self._state_at(rt, at)
        state = self._store[rt] if past is None else past
        keys = self._key_order(rt) if past is None else sorted(past)
        lo, hi = 0, len(keys)
        if namespace is not None:  # one namespace's keys are one range: "ns/" up to "ns0"
            lo, hi = bisect.bisect_left(keys, namespace + "/"), bisect.bisect_left(keys, namespace + "0")
        lo = max(lo, bisect.bisect_right(keys, after))
        items: list[Obj] = []
        examined = lo
        for key in keys[lo:hi]:
            examined += 1
            if selector.matches(state[key]):
                items.append(copy.deepcopy(_without_type_meta(state[key])))
                if len(items) == limit:
                    break
        meta: Obj = {"resourceVersion": str(at)}
        remaining = hi - examined
        if remaining > 0:
            meta["continue"] = _encode_continue(at, keys[examined - 1])
            if not selector.fields and not selector.labels:
                meta["remainingItemCount"] = remaining
        return {"kind": rt.list_kind, "apiVersion": rt.api_version, "metadata": meta, "items": items}

    def _key_order(self, rt: ResourceType) -> list[str]:
        """The current keys of a type, sorted; kept until the next write (lock held), so that
        paging through a big list does not sort it once per page."""
        keys = self._sorted_keys.get(rt)
        if keys is None:
            keys = self._sorted_keys[rt] = sorted(self._store[rt])
        return keys

    def _state_at(self, rt: ResourceType, rv: int) -> dict[str, Obj] | None:
        """The objects of a type as they were at `rv` >= the compacted RV: the current ones with
        every later change undone, newest first; None when nothing changed since (lock held)."""
        state: dict[str, Obj] | None = None
        for ev in reversed(self._history):
            if ev.rv <= rv:
                break
            if ev.resource is not rt:
                continue
            if state is None:
                state = dict(self._store[rt])
            meta = ev.obj["metadata"]
            key = _key(rt, meta.get("namespace"), meta["name"])
            if ev.old is None:
                state.pop(key, None)
            else:
                state[key] = ev.old
        return state

    def _take_failure(self, rt: ResourceType, verb: str) -> int | None:
        failure = self._failures.get((rt.plural, verb))
        if failure is None or failure.remaining <= 0:
            return None
        failure.remaining -= 1
        self._cond.notify_all()
        return failure.status

    # -- internals: watch streams --------------------------------------------------------------

    def _watch_events(self, watch: _Watch) -> list[Obj]:
        """Events for `watch` since its position (lock held). Advances the position."""
        out: list[Obj] = []
        for ev in self._history:
            if ev.rv <= watch.pos or ev.resource is not watch.resource:
                continue
            now = self._visible(watch, ev.obj)
            before = ev.old is not None and self._visible(watch, ev.old)
            if ev.type == "DELETED":
                if before or now:
                    out.append({"type": "DELETED", "object": ev.obj})
            elif now and before:
                out.append({"type": "MODIFIED", "object": ev.obj})
            elif now:
                out.append({"type": "ADDED", "object": ev.obj})
            elif before and ev.old is not None:
                # Left the selector: the watch cache sends the previous content at the new RV.
                gone = copy.deepcopy(ev.old)
                gone["metadata"]["resourceVersion"] = str(ev.rv)
                out.append({"type": "DELETED", "object": gone})
        watch.pos = self._rv
        return out

    @staticmethod
    def _visible(watch: _Watch, obj: Obj) -> bool:
        if watch.namespace is not None and obj["metadata"].get("namespace") != watch.namespace:
            return False
        return watch.selector.matches(obj)

    def _bookmark(self, watch: _Watch) -> Obj:
        rt = watch.resource
        return {
            "type": "BOOKMARK",
            "object": {
                "kind": rt.kind,
                "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": str(watch.pos)},
            },
        }

    def _serve_watch(
        self, handler: _Handler, rt: ResourceType, namespace: str | None, query: Mapping[str, str]
    ) -> None:
        selector = _Selector.parse(query.get("fieldSelector", ""), query.get("labelSelector", ""))
        rv_text = query.get("resourceVersion", "")
        timeout = query.get("timeoutSeconds")
        deadline = time.monotonic() + float(timeout) if timeout else None
        bookmarks = query.get("allowWatchBookmarks") == "true"
        try:
            start_rv = int(rv_text) if rv_text not in ("", "0") else None
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"invalid resourceVersion {rv_text!r}") from exc
        with self._cond:
            status = self._take_failure(rt, "watch")
            if status is not None:
                raise ApiError(status, _REASONS.get(status, "InternalError"), "injected watch failure")
            initial: list[Obj] = []
            if start_rv is None:
                # "Any" RV: the watch starts with the current state as ADDED events.
                initial = [
                    {"type": "ADDED", "object": o} for o in self._list(rt, namespace, selector, type_meta=True)["items"]
                ]
                start_rv = self._rv
            watch = _Watch(rt, namespace, selector, start_rv, bookmarks, handler.connection, self._bookmark_gen)
            self._watches.add(watch)
            self._cond.notify_all()
        # The stream thread sleeps on the condition and would notice a client that hung up only
        # at its next write; this reader notices at once, as the real server's does.
        hangup = threading.Thread(target=self._await_hangup, args=(watch,), name="fakeapi-hangup")
        hangup.start()
        try:
            handler.start_stream()
            if initial:
                handler.write_events(initial)
            self._stream(handler, watch, deadline)
        except OSError:
            pass  # the client went away, or the socket was cut on purpose
        finally:
            with self._cond:
                self._watches.discard(watch)
                watch.finished = True
                self._cond.notify_all()
            # The connection is not reused after a watch: that ends the reader too.
            handler.close_connection = True
            _shutdown(handler.connection)
            hangup.join()

    def _await_hangup(self, watch: _Watch) -> None:
        while True:
            try:
                if not watch.sock.recv(4096):
                    break  # EOF: the client closed (or the socket was shut down)
            except TimeoutError:
                with self._lock:
                    if watch.finished:
                        return
                continue  # a quiet client is normal on a watch
            except OSError:
                break
        with self._cond:
            watch.dropped = True
            self._cond.notify_all()

    def _stream(self, handler: _Handler, watch: _Watch, deadline: float | None) -> None:
        last_bookmark = time.monotonic()
        while True:
            with self._cond:
                while True:
                    if watch.dropped or self._stopping.is_set():
                        return  # cut: no terminating chunk
                    if watch.pos < self._compacted:
                        expired = _status(410, "Expired", f"too old resource version: {watch.pos} ({self._compacted})")
                        batch = [{"type": "ERROR", "object": expired}]
                        done = True
                        break
                    batch = self._watch_events(watch)
                    done = False
                    now = time.monotonic()
                    if watch.bookmarks and (
                        watch.bookmark_gen != self._bookmark_gen
                        or (self._bookmark_interval is not None and now - last_bookmark >= self._bookmark_interval)
                    ):
                        watch.bookmark_gen = self._bookmark_gen
                        last_bookmark = now
                        batch.append(self._bookmark(watch))
                    if deadline is not None and now >= deadline:
                        done = True  # timeoutSeconds elapsed: end the stream cleanly
                    if batch or done:
                        break
                    waits = [1.0]
                    if deadline is not None:
                        waits.append(deadline - now)
                    if watch.bookmarks and self._bookmark_interval is not None:
                        waits.append(last_bookmark + self._bookmark_interval - now)
                    self._cond.wait(max(0.0, min(waits)))
            # Written outside the lock: a slow client must not stall the server.
            if batch:
                handler.write_events(batch)
            if done:
                handler.end_stream()
                return


def _at(parts: list[str], i: int) -> str | None:
    return parts[i] if len(parts) > i else None


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _HTTPServer(ThreadingHTTPServer):
    # Handler threads are joined by server_close(), so stop() leaves no thread behind.
    daemon_threads = False
    block_on_close = True
    fake: FakeAPIServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked watch streams, as the real server
    timeout = 30  # backstop for a client that connects and says nothing
    server: _HTTPServer

    # -- plumbing ------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        # As Go's server does: without it, Nagle holds the body back behind the headers until
        # the client's delayed ACK (40 ms per request).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fake = self.server.fake
        with fake._cond:
            fake._connections.add(self.connection)
            if fake._stopping.is_set():
                _shutdown(self.connection)

    def finish(self) -> None:
        fake = self.server.fake
        with fake._cond:
            fake._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # the stdlib's signature
        pass  # tests assert on recorded requests, not on access logs

    def send_json(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write_events(self, events: list[Obj]) -> None:
        for event in events:
            data = json.dumps(event).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"body is not JSON: {exc}") from exc

    # -- routing -------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_PUT(self) -> None:
        self.dispatch("PUT")

    def do_PATCH(self) -> None:
        self.dispatch("PATCH")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    def dispatch(self, method: str) -> None:
        fake = self.server.fake
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        body = self.read_body() if method in ("POST", "PUT", "PATCH") else None
        route = self.route(split.path)
        verb = self.verb(method, route, query)
        with fake._cond:
            fake._requests.append(Request(method, split.path, query, verb, route[0].plural if route else None))
            fake._cond.notify_all()
        try:
            if route is None:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({split.path})")
            rt, namespace, name, sub = route
            if verb == "watch":
                fake._serve_watch(self, rt, namespace, query)
                return
            code, answer = self.handle_verb(verb, rt, namespace, name, sub, query, body)
            self.send_json(code, answer)
        except ApiError as err:
            status = _status(err.code, err.reason, err.message)
            if err.continue_token is not None:
                status["metadata"]["continue"] = err.continue_token
            self.send_json(err.code, status)
        except OSError:
            self.close_connection = True

    def route(self, path: str) -> tuple[ResourceType, str | None, str | None, str | None] | None:
        """(type, namespace, name, subresource) for a path, or None when nothing is served there."""
        candidates = []
        for rt in self.server.fake._resources:
            if path.startswith(rt.prefix + "/"):
                candidates.append((rt, path[len(rt.prefix) + 1 :].strip("/").split("/")))
        # .../namespaces/NS/PLURAL[/NAME[/SUB]] first: "namespaces" is a served plural too.
        for rt, parts in candidates:
            if rt.namespaced and 3 <= len(parts) <= 5 and parts[0] == "namespaces" and parts[2] == rt.plural:
                return rt, parts[1], _at(parts, 3), _at(parts, 4)
        for rt, parts in candidates:
            # .../PLURAL (every namespace), or .../PLURAL/NAME[/SUB] for cluster-scoped types.
            if parts[0] == rt.plural and (len(parts) == 1 or (not rt.namespaced and len(parts) <= 3)):
                return rt, None, _at(parts, 1), _at(parts, 2)
        return None

    @staticmethod
    def verb(
        method: str,
        route: tuple[ResourceType, str | None, str | None, str | None] | None,
        query: Mapping[str, str],
    ) -> str:
        if route is None:
            return "unknown"
        named = route[2] is not None
        if method == "GET":
            if named:
                return "get"
            return "watch" if query.get("watch") in ("true", "1") else "list"
        return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]

    def handle_verb(
        self,
        verb: str,
        rt: ResourceType,
        namespace: str | None,
        name: str | None,
        sub: str | None,
        query: Mapping[str, str],
        body: Any,
    ) -> tuple[int, Obj]:
        fake = self.server.fake
        if sub not in (None, "status"):
            raise ApiError(404, "NotFound", f"subresource {sub!r} is not served")
        if verb == "list":
            selector = _Selector.parse(query.get("fieldSelector", ""), query.get("labelSelector", ""))
            with fake._cond:
                status = fake._take_failure(rt, "list")
                delay = fake._list_delay
            if status is not None:
                raise ApiError(status, _REASONS.get(status, "InternalError"), "injected list failure")
            if delay:
                # Simulated latency of a big list; cut short when the server stops.
                fake._stopping.wait(delay)
            limit, token = _paging(query)
            with fake._cond:
                if limit or token is not None:
                    return 200, fake._list_page(rt, namespace, selector, limit, token)
                return 200, fake._list(rt, namespace, selector)
        if verb == "create":
            if name is not None or not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "create takes an object posted to its collection")
            with fake._cond:
                return 201, fake._create(rt, body, namespace)
        assert name is not None
        with fake._cond:
            current = fake._store[rt].get(_key(rt, namespace, name))
            if current is None:
                raise ApiError(404, "NotFound", f'{rt.plural} "{name}" not found')
            if verb == "get":
                return 200, copy.deepcopy(current)
            if verb == "delete":
                return 200, fake._delete(rt, namespace, name)
            if verb == "update":
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "update takes an object")
                _meta(body)["name"] = name
                return 200, fake._update(rt, body, namespace, check_rv=True, status_only=sub == "status")
            # patch
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if content_type not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                raise ApiError(415, "UnsupportedMediaType", f"patch type {content_type!r} is not supported")
            patched = _merge_patch(current, body)
            patched["metadata"]["name"] = name
            patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            return 200, fake._update(rt, patched, namespace, check_rv=False, status_only=sub == "status")
