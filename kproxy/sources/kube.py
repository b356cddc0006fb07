"""Reflectors: keep a local view of one API resource in step with the API server.

A `Reflector` lists a resource in pages, hands each page to its sink as it arrives
(`ReflectorSink.begin_list`, `list_page`, `end_list` with the list's resourceVersion; see
`kproxy.sources.stores`), then watches from the list's resourceVersion and hands on every change
(`add`, `update`, `delete`). Guarantees:

- **Order and exactness.** Changes reach the sink in the order the API server sent them, on the
  reflector's own thread, one call at a time. The resourceVersion is tracked from every event,
  bookmarks included, and a watch that ends or is cut resumes from it, so nothing is delivered
  twice or lost while the API server still has the history.
- **Paged lists, one snapshot.** A list asks for `page_size` objects at a time (``limit``, 500 by
  default as client-go's pager) and follows ``continue``: the API server serves every page from
  the first page's snapshot, so a list is one consistent state whatever is written meanwhile, and
  its resourceVersion (the first page's) is where the watch starts. Each page is parsed from the
  raw JSON (never into the client's model classes) and handed on before the next is asked for,
  so at most one page of raw objects is alive at a time on this side. When the snapshot is
  compacted away mid-list (410 Expired on a ``continue``), the reflector does what client-go's
  pager does: logs ``list_expired_paging`` and lists once more in full, without ``limit``, and
  the sink begins that list afresh.
- **Relist on 410 Gone.** When the history is gone (an ``ERROR`` event with code 410, or HTTP 410
  on the watch request) the reflector lists again and the sink, at the list's end, has the full
  new state; it works out what was added, changed or deleted meanwhile (both stores do).
  The official client's ``watch.Watch`` gives up after one expired resourceVersion, which is why
  the stream is read here, line by line, over the raw response.
- **Bounded retries.** A failed list (any page), a refused connection, an API error or a cut
  stream is retried after a jittered exponential backoff: 0.5 s doubling to 4 s, each delay up
  to 25 % longer (`BACKOFF_CAP`); a list is retried from its first page. So once the API server
  answers again after an outage of any length, every reflector is back within 5 s, and a change
  made then is programmed one sync later. The backoff is reset by success: a complete list, or a
  watch that moved the resourceVersion forward or stayed open for `min_watch_duration`. A server
  that accepts and at once drops every watch without events therefore still backs off, so no
  failure mode can spin.
- **Synced.** `has_synced`/`wait_synced` turn true after the first complete list has been handed
  to the sink, and stay true across relists.
- **Prompt stop.** `stop` ends the thread within about a second whatever it is blocked on: every
  socket the reflector's client opens is tracked and shut down, and no further page is asked for.
  Independently, each watch asks the server for a bounded ``timeoutSeconds`` and reads with a
  socket timeout a little longer than it.
- **Loud bugs.** An exception raised by the sink is not retried: the reflector logs
  ``reflector_crashed``, keeps the exception in `error` and ends.

`informer` wires a reflector to a `Store` (which keeps every object, for consumers that read
them back) and `key_informer` to a `KeyStore` (which keeps only keys and resourceVersions, for
consumers that convert each object as it arrives: the daemon); both call
``on_<kind>_add/update/delete/synced`` (kproxy's handler convention, `named_handler`).

Objects are plain dicts shaped as ``kubectl get -o json`` prints them (what `kproxy.convert`
takes); nothing here deserialises into the client's model classes. The `kubernetes` client is
confined to this module (and `convert`), as the layer contract says.

Why one module of ~700 lines: the reflector's retry, relist, paging and stop guarantees depend
on each other (a socket registry for prompt stops, the backoff, the pager's fallback), and this
module is also where the `kubernetes` client is confined.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from kproxy.errors import ConfigError, WatchError
from kproxy.sources.stores import (
    Handler,
    KeyStore,
    ReflectorSink,
    Store,
    named_handler,
    object_key,
    resource_version_of,
)

Obj = dict[str, Any]

__all__ = [
    "ENDPOINT_SLICES",
    "INGRESSES",
    "INGRESS_CLASSES",
    "GATEWAY_CLASSES",
    "GATEWAYS",
    "HTTP_ROUTES",
    "NAMESPACES",
    "REFERENCE_GRANTS",
    "NODES",
    "PODS",
    "SECRETS",
    "SERVICES",
    "Backoff",
    "Handler",
    "KeyStore",
    "Reflector",
    "ReflectorSink",
    "Resource",
    "Store",
    "informer",
    "key_informer",
    "load_client_configuration",
    "name_selector",
    "named_handler",
    "node_pods_selector",
    "object_key",
]

log = structlog.get_logger(__name__)


# -- resources ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resource:
    """One kind a reflector can follow: where the API server lists and watches it.

    Requests go through the client's `ApiClient` (configuration, authentication, TLS, its REST
    layer and `ApiException`s), not its generated API classes: ``CoreV1Api``'s module imports
    every core model and wraps each of its hundreds of methods in pydantic's ``validate_call``,
    20 MiB of the daemon's memory and most of a second at start, for two GET requests.
    """

    name: str  # plural, as in the API path; used in logs
    path: str  # the cluster-wide collection, e.g. /api/v1/services
    handler_prefix: str  # on_<prefix>_add ... for named_handler


SERVICES = Resource("services", "/api/v1/services", "service")
ENDPOINT_SLICES = Resource("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices", "endpoint_slice")
NODES = Resource("nodes", "/api/v1/nodes", "node")
PODS = Resource("pods", "/api/v1/pods", "pod")
SECRETS = Resource("secrets", "/api/v1/secrets", "secret")
INGRESSES = Resource("ingresses", "/apis/networking.k8s.io/v1/ingresses", "ingress")
INGRESS_CLASSES = Resource("ingressclasses", "/apis/networking.k8s.io/v1/ingressclasses", "ingress_class")
NAMESPACES = Resource("namespaces", "/api/v1/namespaces", "namespace")


def _gateway_api(plural: str, version: str, prefix: str) -> Resource:
    return Resource(plural, f"/apis/gateway.networking.k8s.io/{version}/{plural}", prefix)


GATEWAY_CLASSES = _gateway_api("gatewayclasses", "v1", "gateway_class")
GATEWAYS = _gateway_api("gateways", "v1", "gateway")
HTTP_ROUTES = _gateway_api("httproutes", "v1", "http_route")
REFERENCE_GRANTS = _gateway_api("referencegrants", "v1beta1", "reference_grant")


def name_selector(name: str) -> str:
    """Field selector for one object by name (kube-proxy watches only its own Node this way)."""
    return f"metadata.name={name}"


def node_pods_selector(node: str) -> str:
    """Field selector for the pods scheduled on one node (hostPort programming needs only those)."""
    return f"spec.nodeName={node}"


# The client's loaders are untyped; these names give them a type once.
_load_kube_config: Callable[..., None] = k8s_config.load_kube_config
_load_incluster_config: Callable[..., None] = k8s_config.load_incluster_config


def load_client_configuration(kubeconfig: str | None = None, *, context: str | None = None) -> k8s.Configuration:
    """Client configuration from a kubeconfig file, or in-cluster when `kubeconfig` is None.

    Without a kubeconfig and outside a cluster, falls back to ``$KUBECONFIG`` or
    ``~/.kube/config`` as kubectl does. The result is shared by all reflectors; each one builds
    its own `ApiClient` (and connection pool) from it.
    """
    configuration = k8s.Configuration()
    try:
        if kubeconfig is not None:
            _load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
        else:
            try:
                _load_incluster_config(client_configuration=configuration)
            except ConfigException:
                _load_kube_config(context=context, client_configuration=configuration)
    except (ConfigException, OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the API server configuration: {exc}") from exc
    return configuration


# -- backoff -----------------------------------------------------------------------------------


# The reflectors' retry delays: what bounds how long a node takes to see the API server again
# after an outage. client-go caps at 30 s, which left nodes 10-25 s behind after a 30 s outage;
# 4 s keeps that to a few seconds while the jitter still spreads a fleet's reconnects.
BACKOFF_INITIAL = 0.5
BACKOFF_CAP = 4.0
BACKOFF_JITTER = 0.25


class Backoff:
    """Jittered exponential backoff: initial, ×factor per failure, capped; `reset` on progress.

    The n-th delay is ``min(cap, initial * factor**n) * (1 + jitter * rand())``, client-go's
    shape: the jitter spreads the reconnects of many nodes after an API server restart.
    """

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL,
        cap: float = BACKOFF_CAP,
        *,
        factor: float = 2.0,
        jitter: float = BACKOFF_JITTER,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if initial <= 0 or cap < initial or factor < 1:
            raise ValueError("backoff needs 0 < initial <= cap and factor >= 1")
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self._rand = rand
        self._failures = 0

    @property
    def failures(self) -> int:
        """Failures since the last reset."""
        return self._failures

    def next_delay(self) -> float:
        base = min(self.cap, self.initial * self.factor**self._failures)
        self._failures += 1
        return base * (1 + self.jitter * self._rand())

    def reset(self) -> None:
        self._failures = 0


# -- the reflector -----------------------------------------------------------------------------


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class _ContinueExpired(Exception):
    """A later page of a list answered 410: the first page's snapshot is gone."""

    def __init__(self, error: ApiException, pages: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.pages = pages


class _SinkFailed(Exception):
    """The sink raised: a bug in the consumer, never retried."""


class _Stopped(Exception):
    """A connection attempt after `stop`. Deliberately not an OSError: urllib3 retries those."""


class _SocketRegistry:
    """Every socket one ApiClient connects, so `stop` can unblock any read on them.

    urllib3 offers no way to interrupt a request blocked waiting for headers or a streamed body;
    shutting the socket down does (for TLS sockets too), from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._closed = False

    def add(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self._sockets.add(sock)
        if closed:
            _shutdown(sock)

    def check_open(self) -> None:
        if self._closed:
            raise _Stopped

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def _track_sockets(api_client: k8s.ApiClient, registry: _SocketRegistry) -> bool:
    """Make `api_client`'s pools register every connected socket with `registry`.

    Swaps the pool manager's pool classes for subclasses whose connection class registers its
    socket after ``connect()`` (after TLS wrapping, which detaches the raw socket). Relies on
    urllib3 2.x internals (``pool_classes_by_scheme``, ``ConnectionCls``); if they are missing
    nothing is changed and `stop` falls back to the socket timeouts.
    """
    pool_manager = getattr(api_client.rest_client, "pool_manager", None)
    pool_classes = getattr(pool_manager, "pool_classes_by_scheme", None)
    if pool_manager is None or not isinstance(pool_classes, dict):
        return False

    def tracked_pool(pool_cls: type[Any]) -> type[Any]:
        base_conn: type[Any] = pool_cls.ConnectionCls

        def connect(self: Any) -> None:
            registry.check_open()
            base_conn.connect(self)
            registry.add(self.sock)

        conn_cls = type(base_conn.__name__, (base_conn,), {"connect": connect})
        return type(pool_cls.__name__, (pool_cls,), {"ConnectionCls": conn_cls})

    pool_manager.pool_classes_by_scheme = {scheme: tracked_pool(cls) for scheme, cls in pool_classes.items()}
    pool_manager.clear()  # no pool may predate the swap
    return True


# Errors that mean "the API server or the network failed": retried with backoff. Anything else
# (a TypeError, say) is a bug and ends the reflector loudly.
_RETRYABLE = (
    ApiException,
    urllib3.exceptions.HTTPError,
    OSError,
    WatchError,
    json.JSONDecodeError,
    UnicodeDecodeError,
)


class Reflector:
    """List and watch one resource into a `ReflectorSink`; see the module docstring.

    `configuration` is a ``kubernetes.client.Configuration`` (`load_client_configuration`); the
    reflector builds and closes its own ``ApiClient``. `backoff`, `clock` and `rand` are
    injectable for tests. `watch_timeout` is the base of the server-side ``timeoutSeconds``
    (randomised up to twice that, as client-go does, so a fleet does not reconnect in step).
    `page_size` is the ``limit`` of each list request (0 lists everything in one response).
    """

    def __init__(
        self,
        resource: Resource,
        configuration: k8s.Configuration,
        sink: ReflectorSink,
        *,
        field_selector: str | None = None,
        label_selector: str | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        watch_timeout: float = 300.0,
        read_grace: float = 15.0,
        list_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        min_watch_duration: float = 1.0,
        page_size: int = 500,
    ) -> None:
        if page_size < 0:
            raise ValueError("page_size must be 0 (no paging) or more")
        self.resource = resource
        self.sink = sink
        self._configuration = configuration
        self._field_selector = field_selector
        self._label_selector = label_selector
        self._backoff = backoff if backoff is not None else Backoff(rand=rand)
        self._clock = clock
        self._rand = rand
        self._watch_timeout = watch_timeout
        self._read_grace = read_grace
        self._list_timeout = list_timeout
        self._connect_timeout = connect_timeout
        self._min_watch_duration = min_watch_duration
        self._page_size = page_size
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._rv: str | None = None
        self._rv_changed = threading.Condition()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._sockets = _SocketRegistry()
        self._api_client: k8s.ApiClient | None = None

    # -- public surface ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the reflector's thread (once)."""
        if self._thread is not None:
            raise RuntimeError("reflector already started")
        self._api_client = k8s.ApiClient(self._configuration)
        _track_sockets(self._api_client, self._sockets)
        self._thread = threading.Thread(target=self._run, name=f"reflector-{self.resource.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close the client; returns once the thread has ended (or `timeout`)."""
        self._stop.set()
        self._sockets.close()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._api_client is not None and (self._thread is None or not self._thread.is_alive()):
            self._api_client.close()  # type: ignore[no-untyped-call]

    def __enter__(self) -> Reflector:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def has_synced(self) -> bool:
        return self._synced.is_set()

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    @property
    def resource_version(self) -> str | None:
        """The last resourceVersion seen (list, event or bookmark)."""
        return self._rv

    def wait_for_resource_version(self, resource_version: str, timeout: float | None = None) -> bool:
        """Wait until the reflector has seen exactly `resource_version` (from a list, an event or a
        bookmark). resourceVersions are opaque, so this compares for equality only."""
        with self._rv_changed:
            return self._rv_changed.wait_for(lambda: self._rv == resource_version, timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (after `stop`, or a crash); True when it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.alive

    @property
    def error(self) -> BaseException | None:
        """The sink's exception that ended the reflector, if one did."""
        return self._error

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except _Stopped:
            pass  # stop() closed the door on a request being (re)tried
        except _SinkFailed as exc:
            self._error = exc.__cause__
            self._emit("error", "reflector_crashed", exc_info=exc.__cause__)
        except Exception as exc:  # a bug of ours: end loudly too, never spin on it
            self._error = exc
            self._emit("error", "reflector_crashed", exc_info=exc)

    def _loop(self) -> None:
        need_list = True
        while not self._stop.is_set():
            listed = need_list
            if need_list:
                try:
                    self._list()
                except _RETRYABLE as exc:
                    self._retry_later("list_failed", exc)
                    continue
                need_list = False
                self._backoff.reset()  # the API server answers: the next failure starts afresh
            rv_before, started = self._rv, self._clock()
            try:
                self._watch()
            except _Gone:
                need_list = True
                self._emit("info", "watch_relist", resource_version=self._rv)
                if listed and self._rv == rv_before:
                    # Too old straight after a fresh list: relisting at once could spin.
                    self._wait(self._backoff.next_delay())
                continue
            except _RETRYABLE as exc:
                if self._rv != rv_before and not self._stop.is_set():
                    self._backoff.reset()  # the stream was working: resume at once
                    self._emit("info", "watch_dropped", resource_version=self._rv, error=_describe(exc), delay=0.0)
                else:
                    if self._clock() - started >= self._min_watch_duration:
                        self._backoff.reset()  # it was open a while: an outage starts here
                    self._retry_later("watch_dropped", exc)
                continue
            # The stream ended cleanly (timeoutSeconds elapsed): watch again from where it ended,
            # unless it ended suspiciously fast without progress, which would otherwise spin.
            if self._rv != rv_before:
                self._backoff.reset()
            elif self._clock() - started < self._min_watch_duration:
                self._retry_later("watch_dropped", WatchError("watch ended at once without events"))

    def _retry_later(self, event: str, exc: BaseException) -> None:
        if self._stop.is_set():
            return  # the error is our own stop() cutting the connection
        delay = self._backoff.next_delay()
        status = exc.status if isinstance(exc, ApiException) else None
        self._emit(
            "warning",
            event,
            resource_version=self._rv,
            error=_describe(exc),
            status=status,
            delay=round(delay, 3),
        )
        self._wait(delay)

    def _emit(self, level: str, event: str, **fields: Any) -> None:
        # Looked up per call, not bound once: structlog's configuration (and capture_logs in
        # tests) applies to loggers bound after it changes.
        getattr(log, level)(event, resource=self.resource.name, **fields)

    def _wait(self, delay: float) -> None:
        self._stop.wait(delay)  # interruptible by stop()

    def _get(self, query: list[tuple[str, Any]], timeout: tuple[float, float]) -> Any:
        """GET the resource's collection with `query`: the raw, unread urllib3 response.

        What the generated ``list_*`` functions do with ``_preload_content=False``: the client's
        own request building (default headers, authentication) and REST call; a status other
        than 2xx is read and raised as the client's `ApiException`.
        """
        client = self._api_client
        assert client is not None  # started
        query = [*self._selectors(), *query]
        request = client.param_serialize(
            method="GET",
            resource_path=self.resource.path,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response: Any = client.call_api(*request, _request_timeout=timeout)  # RESTResponse is untyped
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response

    def _selectors(self) -> list[tuple[str, str]]:
        found = []
        if self._field_selector:
            found.append(("fieldSelector", self._field_selector))
        if self._label_selector:
            found.append(("labelSelector", self._label_selector))
        return found

    def _list(self) -> None:
        # No resourceVersion: a consistent read of the latest state (after a 410 that matters;
        # RV "0" could be served from a stale cache, and would ignore the limit besides).
        self._deliver(self.sink.begin_list)
        try:
            rv, items = self._list_pages(self._page_size)
        except _ContinueExpired as exc:
            # The first page's snapshot was compacted while we paged: client-go's pager lists
            # again in full, which needs no snapshot to outlive a request. What was delivered
            # stays delivered; the full list's end tells the sink what is gone.
            self._emit("warning", "list_expired_paging", pages=exc.pages, error=_describe(exc.error))
            self._deliver(self.sink.begin_list)
            rv, items = self._list_pages(0)
        self._deliver(self.sink.end_list, rv)
        self._set_resource_version(rv)
        self._emit("debug", "watch_listed", resource_version=rv, items=items)
        if not self._synced.is_set():
            self._synced.set()
            self._emit("info", "watch_synced", resource_version=rv, items=items)

    def _list_pages(self, limit: int) -> tuple[str, int]:
        """Ask for pages of `limit` objects (0: all at once) and hand each to the sink.

        Returns the list's resourceVersion (its first page's) and how many objects it had.
        """
        token: str | None = None
        rv: str | None = None
        items = pages = 0
        while True:
            if self._stop.is_set():
                raise _Stopped
            paging: list[tuple[str, Any]] = [("limit", limit)] if limit > 0 else []
            if token:
                paging.append(("continue", token))
            try:
                resp = self._get(paging, (self._connect_timeout, self._list_timeout))
            except ApiException as exc:
                if exc.status == 410 and token:
                    raise _ContinueExpired(exc, pages) from exc
                raise
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            if not isinstance(body, dict) or not isinstance(body.get("items"), list):
                raise WatchError(f"list of {self.resource.name} is not a list object")
            meta = body.get("metadata") or {}
            if rv is None:
                rv = resource_version_of(body)
                if rv is None:
                    raise WatchError(f"list of {self.resource.name} has no resourceVersion")
            page = _with_type_meta(body)
            del body  # the page's dicts live on in `page` only until the sink has them
            pages += 1
            items += len(page)
            self._deliver(self.sink.list_page, page)
            del page
            token = meta.get("continue") or None
            if token is None:
                return rv, items

    def _watch(self) -> None:
        timeout_seconds = max(1, int(self._watch_timeout * (1 + self._rand())))
        try:
            resp = self._get(
                [
                    ("watch", True),
                    *([("resourceVersion", self._rv)] if self._rv is not None else []),
                    ("allowWatchBookmarks", True),
                    ("timeoutSeconds", timeout_seconds),
                ],
                # The server ends the stream after timeout_seconds; a longer read timeout catches
                # a peer that vanished without closing.
                (self._connect_timeout, timeout_seconds + self._read_grace),
            )
        except ApiException as exc:
            if exc.status == 410:  # some servers refuse the request itself rather than stream ERROR
                raise _Gone(exc.reason) from exc
            raise
        try:
            for line in _lines(resp):
                if self._stop.is_set():
                    return
                self._handle_event(line)
        finally:
            resp.close()
            resp.release_conn()

    def _handle_event(self, line: bytes) -> None:
        event = json.loads(line)
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(obj, dict):
            raise WatchError(f"malformed watch event: {line[:200]!r}")
        if kind == "ERROR":
            code, reason, message = obj.get("code"), obj.get("reason"), obj.get("message")
            if code == 410:
                raise _Gone(message)
            raise WatchError(f"watch error {code} {reason}: {message}")
        rv = resource_version_of(obj)
        if kind == "ADDED":
            self._deliver(self.sink.add, obj)
        elif kind == "MODIFIED":
            self._deliver(self.sink.update, obj)
        elif kind == "DELETED":
            self._deliver(self.sink.delete, obj)
        elif kind != "BOOKMARK":
            self._emit("warning", "watch_event_unknown", event_type=kind)
            return
        if rv is not None:
            self._set_resource_version(rv)

    def _set_resource_version(self, rv: str) -> None:
        with self._rv_changed:
            self._rv = rv
            self._rv_changed.notify_all()

    @staticmethod
    def _deliver(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            raise _SinkFailed from exc


def _with_type_meta(body: Obj) -> list[Obj]:
    """The list's items with ``kind`` and ``apiVersion`` set.

    The API server leaves them out of list items (watch events carry them), while the converter
    takes objects as kubectl prints them, with both; they come from the list's own type.
    """
    list_kind = str(body.get("kind", ""))
    kind = list_kind.removesuffix("List") if list_kind.endswith("List") else None
    api_version = body.get("apiVersion")
    items: list[Obj] = []
    for item in body["items"]:
        if not isinstance(item, dict):
            raise WatchError(f"list item is not an object: {str(item)[:200]}")
        if kind and "kind" not in item:
            item["kind"] = kind
        if api_version and "apiVersion" not in item:
            item["apiVersion"] = api_version
        items.append(item)
    return items


def _lines(resp: Any) -> Iterator[bytes]:
    """Complete lines of a streamed response, as they arrive.

    Chunked responses (what the API server sends) are read chunk by chunk, so an event is handed
    on as soon as its chunk is in; ``stream()`` on a non-chunked body would wait for its buffer to
    fill. A stream cut mid-chunk raises urllib3's ProtocolError, never a silent end.
    """
    chunks: Iterator[bytes]
    if getattr(resp, "chunked", False):
        chunks = resp.read_chunked(decode_content=True)
    else:
        chunks = iter(lambda: bytes(resp.read1()), b"")
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def informer(
    resource: Resource, configuration: k8s.Configuration, target: object, **options: Any
) -> tuple[Reflector, Store]:
    """A reflector feeding a `Store` that calls ``target.on_<kind>_add/update/delete/synced``.

    `options` go to `Reflector` (selectors, backoff, timeouts). Start the reflector; the store
    answers reads.
    """
    store = Store(named_handler(target, resource.handler_prefix))
    return Reflector(resource, configuration, store, **options), store


def key_informer(
    resource: Resource, configuration: k8s.Configuration, target: object, **options: Any
) -> tuple[Reflector, KeyStore]:
    """A reflector feeding a `KeyStore` that calls ``target.on_<kind>_add/update/delete/synced``.

    For targets that convert each object as it arrives and keep nothing of the dict: the store
    holds keys and resourceVersions only, and the ``old`` of an update is a stub (see
    `kproxy.sources.stores`). `options` go to `Reflector`.
    """
    store = KeyStore(named_handler(target, resource.handler_prefix))
    return Reflector(resource, configuration, store, **options), store
